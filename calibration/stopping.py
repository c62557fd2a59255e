"""Stopping rules fitted per precision: the fewest outer steps at the best fixed depth's accuracy.

`record_trajectories` runs the runtime loop (`eqr.runtime.loop`, through `Solver` and a
`RecordingBackend`) once at a fixed depth N and keeps, per trajectory and step, the predictions,
residual, logit_delta and q_halt logit. Every stopping rule the loop knows (tol + patience,
stable window, q_halt + threshold, a max_steps cap) is a pure function of that record, so
`simulate` replays the loop's own rule (same counters, same order, docs/algorithm.md) for any
rule without running a step, and `fit_rule` searches a grid of rules on one set of puzzles:
the rule with the fewest mean steps whose exact accuracy is within `margin` points of the best
fixed depth's wins (ties: the more accurate). "Within" is judged one standard error down: the
accuracy difference is paired per puzzle, and a rule that wins some puzzles and loses others
(a noisy rule, which would not hold on new puzzles) must keep the margin after its standard
error is subtracted. Recorded at breadth K (K trajectories per puzzle), accuracy is the puzzle's
answer under the loop's `converged` aggregation, so a rule is judged where it will run: a rule that
loses nothing on single trajectories can still stop a wrong one early with a low score, and that
one then wins the puzzle. `fit_and_evaluate` fits on one half of the puzzles and measures the chosen
rule on the other half (held-out: no puzzle is used for both).
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np

from eqr.runtime.aggregate import converged_top1
from eqr.runtime.config import SolveConfig
from eqr.runtime.stopping_rules import RULE_FIELDS, RULES, Signals, active_rules

WINDOWS = (None, 1, 2, 3, 4, 6, 8, 12, 16)
PATIENCES = (1, 2, 3, 4)
Q_HALT_THRESHOLDS = (None, -2.0, -1.0, 0.0, 1.0, 2.0)  # None: q_halt not trusted
TOL_FACTORS = (1.5, 3.0, 10.0, 30.0, 100.0)  # tol candidates: these multiples of the residual floor
DEFAULT_MARGIN = 1.0  # accuracy points the rule may lose against the best fixed depth
CONFIDENCE_Z = 1.0  # standard errors of the paired accuracy difference a rule must clear the margin by


@dataclass(frozen=True)
class Trajectories:
    """The per-step record of T = P * K trajectories over N steps (one fixed-depth run of the loop),
    K per puzzle (`breadth`), row p*K + k.

    preds        int32 (N, T, L)  argmax after each step
    residual     fp32  (N, T)     relative state residual of each step (NaN/Inf: diverged)
    logit_delta  fp32  (N, T)
    q_halt       fp32  (N, T)     q_halt logit after each step
    """

    preds: np.ndarray
    residual: np.ndarray
    logit_delta: np.ndarray
    q_halt: np.ndarray
    breadth: int = 1

    @property
    def steps(self) -> int:
        return self.preds.shape[0]

    def select(self, rows: np.ndarray) -> "Trajectories":
        """Trajectories `rows`, at breadth 1."""
        return Trajectories(self.preds[:, rows], self.residual[:, rows], self.logit_delta[:, rows],
                            self.q_halt[:, rows])

    def puzzles(self, index: np.ndarray) -> "Trajectories":
        """Every trajectory of the puzzles `index`, at this breadth."""
        K = self.breadth
        rows = (np.asarray(index)[:, None] * K + np.arange(K)).ravel()  # (P', K) -> (P' * K,)
        return dataclasses.replace(self.select(rows), breadth=K)


def record_trajectories(solver: Any, tokens: np.ndarray, steps: int, seed: int,
                        advance: Any = None, breadth: int = 1) -> Trajectories:
    """`breadth` trajectories per puzzle (seeds as `Solver.solve`), `steps` fixed steps, recorded.
    advance(n): progress in row-steps (len(tokens) x breadth x steps in all)."""
    from eqr.calibration.record import RecordingBackend

    tokens = np.asarray(tokens)
    recorder = RecordingBackend(solver.backend, preds_after=range(1, steps + 1), on_step=advance)
    inner, solver.backend = solver.backend, recorder
    try:
        with recorder:
            result = solver.solve(tokens, fixed_depth=steps, breadth=breadth, seed=seed, aggregate="first",
                                  stats="trace")
    finally:
        solver.backend = inner
    T, L = len(tokens) * breadth, tokens.shape[1]
    stats = result.stats
    # Every row is admitted at once and only diverged rows leave early (compaction keeps order):
    # after step n the recorded rows are those that had not diverged before step n.
    preds = np.zeros((steps, T, L), np.int32)
    q_halt = np.full((steps, T), np.nan, np.float32)
    for n in range(1, steps + 1):
        present = ~stats.diverged | (stats.nstep >= n)
        preds[n - 1, present] = recorder.preds[n]
        q_halt[n - 1, present] = recorder.q_halt[n]
        if n > 1:
            preds[n - 1, ~present] = preds[n - 2, ~present]  # last finite answer, as the loop keeps
    width = stats.residual_trace.shape[1]
    pad = lambda trace: np.pad(trace, ((0, 0), (0, steps - width)), constant_values=np.nan).T  # noqa: E731
    residual, logit_delta = pad(stats.residual_trace), pad(stats.logit_delta_trace)  # (T, N) -> (N, T), NaN once diverged
    return Trajectories(preds, residual.astype(np.float32), logit_delta.astype(np.float32), q_halt, breadth)


# --------------------------------------------------------------------------- replaying the loop's rule


def _first(hit: np.ndarray) -> np.ndarray:
    """(N, T) bool -> int (T,): the 1-based first step where hit is True, N + 1 where never."""
    N = hit.shape[0]
    return np.where(hit.any(axis=0), hit.argmax(axis=0) + 1, N + 1)


def _run_lengths(hit: np.ndarray) -> np.ndarray:
    """(N, T) bool -> int32 (N, T): consecutive True steps ending at each step (the loop's counters)."""
    counts = np.zeros(hit.shape, np.int32)
    run = np.zeros(hit.shape[1], np.int32)
    for n in range(hit.shape[0]):
        run = np.where(hit[n], run + 1, 0)
        counts[n] = run
    return counts


class Replay:
    """Per-trajectory facts every rule is read from: counters precomputed once, rules read in O(T).
    labels: int (P, L), one per puzzle (P = T / K)."""

    def __init__(self, traj: Trajectories, labels: np.ndarray | None) -> None:
        N, K = traj.steps, traj.breadth
        finite = np.isfinite(traj.residual) & np.isfinite(traj.logit_delta)  # (N, T)
        self.N = N
        self.diverged_at = _first(~finite)  # (T,)
        changed = np.ones(traj.residual.shape, bool)
        changed[1:] = (traj.preds[1:] != traj.preds[:-1]).any(axis=2)
        self.signals = Signals(residual=traj.residual, q_halt=traj.q_halt, changed=changed)  # (N, T) each
        self.traj, self.K = traj, K
        rows = None if labels is None else np.repeat(labels, K, axis=0)  # (P, L) -> (T, L)
        self.correct = None if labels is None else (traj.preds == rows[None]).all(axis=2)  # (N, T)
        summed = np.nan_to_num(traj.logit_delta, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float64)
        self.delta_sums = np.concatenate([np.zeros((1, summed.shape[1])), summed.cumsum(axis=0)])  # (N + 1, T)
        self._counts: dict[tuple[int, Any], np.ndarray] = {}
        self._first_cache: dict[tuple[int, Any, int], np.ndarray] = {}

    def _first_settled(self, index: int, rule: dict[str, Any]) -> np.ndarray:
        """int (T,): the first step at which RULES[index] settles each trajectory (N + 1: never)."""
        stopping = RULES[index]
        level, need = stopping.level(rule), stopping.need(rule)
        if (index, level) not in self._counts:
            self._counts[index, level] = _run_lengths(stopping.hits(self.signals, rule))
        if (index, level, need) not in self._first_cache:
            self._first_cache[index, level, need] = _first(self._counts[index, level] >= need)
        return self._first_cache[index, level, need]

    def stop_steps(self, rule: dict[str, Any]) -> np.ndarray:
        """int (T,): the step at which the loop stops each trajectory under `rule` (<= N)."""
        cap = min(int(rule.get("max_steps", self.N)), self.N)
        stop = np.minimum(self.diverged_at, cap)
        for index, _ in active_rules(rule):
            stop = np.minimum(stop, self._first_settled(index, rule))
        return stop

    def answers(self, stop: np.ndarray) -> np.ndarray:
        """int32 (T, L): each trajectory's answer at its stop (a diverged step keeps the last finite one)."""
        at = np.where(stop == self.diverged_at, stop - 2, stop - 1).clip(min=0)
        return self.traj.preds[at, np.arange(len(stop))]

    def chosen(self, stop: np.ndarray) -> np.ndarray:
        """int64 (P,): the trajectory the loop's `converged` aggregation picks per puzzle: the lowest mean
        logit_delta over its last score_window steps (all, if fewer); a diverged one never wins."""
        start = np.maximum(stop - SolveConfig.score_window, 0)
        columns = np.arange(len(stop))
        score = (self.delta_sums[stop, columns] - self.delta_sums[start, columns]) / (stop - start)  # (T,)
        K = self.K
        valid = (stop < self.diverged_at).reshape(-1, K)  # (T,) -> (P, K)
        return converged_top1(np.zeros((len(valid), K, 1)), score.reshape(-1, K), valid)

    def correct_under(self, rule: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """(bool (P,) the puzzle's answer right, int (T,) steps) of `rule` on these trajectories."""
        stop = self.stop_steps(rule)
        at = np.where(stop == self.diverged_at, stop - 2, stop - 1).clip(min=0)
        right = self.correct[at, np.arange(len(stop))]  # (T,)
        if self.K == 1:
            return right, stop
        by_puzzle = right.reshape(-1, self.K)  # (T,) -> (P, K)
        return by_puzzle[np.arange(len(by_puzzle)), self.chosen(stop)], stop

    def score(self, rule: dict[str, Any]) -> tuple[float, float]:
        """(exact accuracy in percent over puzzles, mean steps per trajectory) of `rule`."""
        correct, stop = self.correct_under(rule)
        return 100.0 * float(correct.mean()), float(stop.mean())

    def fixed_depths(self) -> list[tuple[int, float]]:
        """(depth, accuracy %) for every fixed depth 1..N."""
        return [(d, self.score({"max_steps": d})[0]) for d in range(1, self.N + 1)]


def simulate(traj: Trajectories, rule: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(nstep int (T,), preds int32 (T, L)) the loop gives each recorded trajectory under `rule`."""
    replay = Replay(traj, None)
    stop = replay.stop_steps(rule)
    return stop, replay.answers(stop)


# --------------------------------------------------------------------------- the fit


def rule_grid(traj: Trajectories, max_steps: int) -> list[dict[str, Any]]:
    """Candidate rules: caps x tol (multiples of the residual floor) x patience x window x q_halt."""
    late = traj.residual[traj.steps // 2:]
    floor = float(np.median(np.nanmin(np.where(np.isfinite(late), late, np.inf), axis=0)))
    tols: list[float | None] = [None]
    if np.isfinite(floor) and floor > 0:
        tols += [float(f"{floor * f:.3g}") for f in TOL_FACTORS]
    caps = sorted({*(2 ** i for i in range(max_steps.bit_length()) if 2 ** i <= max_steps), max_steps})
    rules = []
    for cap, tol, window, threshold in itertools.product(caps, tols, WINDOWS, Q_HALT_THRESHOLDS):
        uses_patience = tol is not None or threshold is not None
        for patience in PATIENCES if uses_patience else (2,):
            rules.append({"max_steps": cap, "tol": tol, "patience": patience, "window": window,
                          "q_halt": threshold is not None,
                          "q_halt_threshold": 0.0 if threshold is None else threshold})
    return rules


def fit_rule(traj: Trajectories, labels: np.ndarray, margin: float = DEFAULT_MARGIN,
             max_steps: int | None = None, z: float = CONFIDENCE_Z) -> dict[str, Any]:
    """The rule with the fewest mean steps whose accuracy is >= the best fixed depth's - margin,
    with the paired difference's standard error (times z) subtracted first.

    Accuracy is per puzzle at the record's breadth (labels int (P, L)), steps per trajectory.
    Returns {"rule", "accuracy", "mean_steps", "best_fixed_depth", "best_fixed_accuracy"} on `traj`.
    The best fixed depth is itself a candidate (difference 0, error 0), so some rule qualifies.
    """
    replay = Replay(traj, labels)
    cap = min(max_steps or traj.steps, traj.steps)
    fixed = replay.fixed_depths()[:cap]
    best_depth, best_accuracy = max(fixed, key=lambda da: (da[1], -da[0]))
    best_correct, _ = replay.correct_under({"max_steps": best_depth})
    P = len(best_correct)
    chosen, chosen_score = None, None
    for rule in rule_grid(traj, cap):
        correct, stop = replay.correct_under(rule)
        diff = correct.astype(np.float64) - best_correct  # (P,) paired: +1 won, -1 lost, 0 same
        lower = 100.0 * (diff.mean() - z * diff.std(ddof=1) / np.sqrt(P)) if P > 1 else 100.0 * diff.mean()
        if lower < -margin - 1e-9:
            continue
        accuracy, steps = 100.0 * float(correct.mean()), float(stop.mean())
        key = (steps, -accuracy)
        if chosen_score is None or key < chosen_score:
            chosen, chosen_score = rule, key
    assert chosen is not None and chosen_score is not None  # the best fixed depth qualifies
    return {"rule": _plain(chosen), "accuracy": -chosen_score[1], "mean_steps": chosen_score[0],
            "best_fixed_depth": best_depth, "best_fixed_accuracy": best_accuracy}


def evaluate_rule(traj: Trajectories, labels: np.ndarray, rule: dict[str, Any],
                  fixed_depth: int | None = None) -> dict[str, Any]:
    """Accuracy and mean steps of `rule`, the best fixed depth in hindsight and (given) the accuracy
    of `fixed_depth` (the depth chosen on the fitting puzzles: the fair comparison), on other trajectories."""
    replay = Replay(traj, labels)
    accuracy, steps = replay.score(rule)
    fixed = replay.fixed_depths()
    best_depth, best_accuracy = max(fixed, key=lambda da: (da[1], -da[0]))
    result = {"accuracy": accuracy, "mean_steps": steps, "best_fixed_depth": best_depth,
              "best_fixed_accuracy": best_accuracy, "puzzles": traj.preds.shape[1] // traj.breadth}
    if fixed_depth is not None:
        result |= {"fixed_depth": fixed_depth, "fixed_depth_accuracy": fixed[fixed_depth - 1][1]}
    return result


def fit_and_evaluate(traj: Trajectories, labels: np.ndarray, margin: float = DEFAULT_MARGIN) -> dict[str, Any]:
    """Fit on the even-numbered puzzles, measure on the odd-numbered ones (disjoint halves).

    The manifest's `stopping` entry: {"rule", "margin", "recorded_steps", "breadth", "fit": {...}, "heldout": {...}}.
    """
    P = len(labels)
    if P < 2:
        raise ValueError("fitting a stopping rule needs at least 2 puzzles (one to fit, one held out)")
    fit_rows, held_rows = np.arange(0, P, 2), np.arange(1, P, 2)
    fitted = fit_rule(traj.puzzles(fit_rows), labels[fit_rows], margin)
    rule = fitted.pop("rule")
    heldout = evaluate_rule(traj.puzzles(held_rows), labels[held_rows], rule, fitted["best_fixed_depth"])
    return {"rule": rule, "margin": margin, "recorded_steps": traj.steps, "breadth": traj.breadth,
            "fit": fitted | {"puzzles": len(fit_rows)}, "heldout": heldout}


def _plain(rule: dict[str, Any]) -> dict[str, Any]:
    """JSON-ready, in RULE_FIELDS order."""
    return {k: rule[k] for k in RULE_FIELDS if k in rule}
