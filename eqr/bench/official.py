"""frontier_vs_official: the official streaming evaluator (torch eager, q_halt halting, refilled slots,
convergence top-1) swept over its halting threshold, against the runtime's stopping rules swept the same
way, as accuracy-vs-puzzles/s frontiers on one puzzle set.

`official_solve` re-implements the official code's streaming evaluation (locuslab/EqR,
evaluators/eval_fn.py, `_evaluate_act_streaming`; configs `sudoku_*_act_streaming_noise05`) on eqr's
torch model. Like eqr/bench/reference.py it is a benchmark baseline with its own step loop, not product
code (docs/performance.md#the-official-streaming-evaluator-frontier_vs_official).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from eqr.bench.config import GOALS
from eqr.bench.result import Measurement
from eqr.bench.setting import Setting, exact_correct, puzzle_set, solver_for

NAME = "frontier_vs_official"
# The official streaming config (sudoku_*_act_streaming_noise05): its halting and its sampling.
HALT_MAX_STEPS = 64
HALT_MIN_STEPS = 1
SCORE_WINDOW = 3  # convergence_window
NOISE = 0.5  # path noise at inference (--reference-noise overrides)
INIT_STD = 1.0  # std of every job's initial z_H, z_L
# The swept q_halt thresholds around the official default 0 (on sudoku-6x6, 4 reaches 100% at ~7 steps
# a job; +inf would run every job to HALT_MAX_STEPS, 64 per job).
THRESHOLDS = (-2.0, 0.0, 2.0, 4.0)
AGREES = (1, 2, 4)  # the runtime's progressive-breadth variants (those below K)
MARGINS = (3.0, 10.0)  # refitted stopping rules besides the bench's (eqr.calibration.stopping margins)
ROUNDS = 2  # every point runs each round, rounds alternate the official and runtime sides
# Goal by breadth: the highest breadth listed at or below --breadth sets it; below the lowest, none.
GOAL_BY_BREADTH = {8: GOALS[NAME][1], 64: 10.0}


@dataclass
class OfficialRun:
    """The official streaming evaluation of P puzzles x K jobs.

    job_preds  int32 (P, K, L)  argmax of each job's logits at the step it halted
    scores     fp32  (P, K)     mean logit-delta norm over the job's last SCORE_WINDOW steps (its first step
                                has no delta; a job that halted at step 1 scores 0, as in the official code)
    steps      int32 (P, K)     outer steps each job ran
    seconds    wall time of the loop
    """

    job_preds: np.ndarray
    scores: np.ndarray
    steps: np.ndarray
    seconds: float

    def answers(self) -> np.ndarray:
        """int32 (P, L): each puzzle's lowest-score job (ties: the lowest init index, a stable argsort's first)."""
        chosen = np.argmin(self.scores, axis=1)  # (P,)
        return np.take_along_axis(self.job_preds, chosen[:, None, None], axis=1)[:, 0]


@dataclass
class _Slots:
    """The jobs running now, one per slot. S slots, L tokens, D width, W score window."""

    job: torch.Tensor  # int64 (S,) job id: puzzle job % G, init job // G
    state: Any  # LatentState, z_H and z_L [S, L, D]
    steps: torch.Tensor  # int64 (S,) steps the job has run
    previous: torch.Tensor | None  # fp32 [S, L, V] last step's logits
    recent: torch.Tensor  # fp32 (S, W) the job's last deltas, newest last, zeros before its first
    count: torch.Tensor  # int64 (S,) deltas in `recent`

    def keep(self, index: torch.Tensor) -> None:
        from eqr.model.network import LatentState

        self.job, self.steps = self.job[index], self.steps[index]
        self.state = LatentState(self.state.z_H[index], self.state.z_L[index])
        self.previous = None if self.previous is None else self.previous[index]
        self.recent, self.count = self.recent[index], self.count[index]


def _fresh_state(model: Any, n: int, init_std: float, generator: torch.Generator, device: torch.device) -> Any:
    """n initial states with the official std (both halves; z_H drawn first)."""
    from eqr.model.network import LatentState, trunc_normal

    shape = (n, model.config.seq_len, model.config.hidden_size)
    z_H = trunc_normal(shape, init_std, generator, model.dtype, device)
    return LatentState(z_H, trunc_normal(shape, init_std, generator, model.dtype, device))


def _record_delta(slots: _Slots, logits: torch.Tensor) -> None:
    """Push this step's mean logit-delta norm into each job's window (not on a job's first step)."""
    if slots.previous is not None:
        delta = (logits - slots.previous).norm(dim=-1).mean(-1)  # [S, L, V] -> (S,)
        has_previous = slots.steps > 1
        shifted = torch.cat([slots.recent[:, 1:], delta[:, None]], dim=1)  # (S, W)
        slots.recent = torch.where(has_previous[:, None], shifted, slots.recent)
        slots.count = torch.where(has_previous, torch.clamp(slots.count + 1, max=slots.recent.shape[1]), slots.count)
    slots.previous = logits


@torch.inference_mode()
def _stream_group(model: Any, tokens: torch.Tensor, breadth: int, threshold: float, noise: float,
                  generator: torch.Generator, init_std: float, max_steps: int) -> tuple[np.ndarray, ...]:
    """One loader batch of G puzzles: G slots, G*K jobs queued init-major (job j: puzzle j % G, init j // G);
    -> preds int32 (G, K, L), scores fp32 (G, K), steps int32 (G, K)."""
    G, L = tokens.shape
    device = tokens.device
    jobs = G * breadth
    preds = np.zeros((G, breadth, L), np.int32)
    scores = np.full((G, breadth), np.inf, np.float32)
    steps = np.zeros((G, breadth), np.int32)
    slots = _Slots(torch.arange(G, device=device), _fresh_state(model, G, init_std, generator, device),
                   torch.zeros(G, dtype=torch.long, device=device), None,
                   torch.zeros(G, SCORE_WINDOW, device=device), torch.zeros(G, dtype=torch.long, device=device))
    queued = G
    while len(slots.job):
        state, logits, q_halt = model.step(slots.state, tokens[slots.job % G], noise=noise, generator=generator)
        slots.state, slots.steps = state, slots.steps + 1
        logits = logits.float()
        _record_delta(slots, logits)
        halt = ((q_halt > threshold) & (slots.steps >= HALT_MIN_STEPS)) | (slots.steps >= max_steps)  # (S,)
        if not bool(halt.any()):
            continue
        halted = halt.nonzero()[:, 0]
        _record_halted(slots, halted, logits, (preds, scores, steps))
        refill = halted[:max(0, jobs - queued)]  # the first halted slots take the next queued jobs
        if len(refill):
            _restart(slots, refill, torch.arange(queued, queued + len(refill), device=device),
                     _fresh_state(model, len(refill), init_std, generator, device))
            queued += len(refill)
        if len(halted) > len(refill):  # slots left without a job leave the batch
            live = torch.ones(len(slots.job), dtype=torch.bool, device=device)
            live[halted[len(refill):]] = False
            slots.keep(live.nonzero()[:, 0])
    return preds, scores, steps


def _record_halted(slots: _Slots, halted: torch.Tensor, logits: torch.Tensor,
                   out: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    """Write the halted slots' jobs into out = (preds (G, K, L), scores (G, K), steps (G, K))."""
    preds, scores, steps = out
    G = len(preds)
    job = slots.job[halted].cpu().numpy()
    p, k = job % G, job // G
    preds[p, k] = logits[halted].argmax(-1).cpu().numpy()
    scores[p, k] = (slots.recent[halted].sum(1) / slots.count[halted].clamp(min=1)).cpu().numpy()
    steps[p, k] = slots.steps[halted].cpu().numpy()


def _restart(slots: _Slots, index: torch.Tensor, jobs: torch.Tensor, fresh: Any) -> None:
    """Slots `index` start jobs `jobs` from `fresh` states, with no steps and no deltas."""
    slots.job[index] = jobs
    slots.state.z_H[index], slots.state.z_L[index] = fresh.z_H, fresh.z_L
    slots.steps[index] = 0
    slots.recent[index] = 0.0
    slots.count[index] = 0


def official_solve(model: Any, tokens: np.ndarray, breadth: int, slots: int, threshold: float, seed: int,
                   noise: float = NOISE, init_std: float = INIT_STD, max_steps: int = HALT_MAX_STEPS,
                   progress: Callable[[int], None] | None = None) -> OfficialRun:
    """The official streaming evaluation of int tokens (P, L): loader batches of `slots` puzzles, each with
    `slots` running jobs refilled from its queue of slots * K, a job halting when q_halt > threshold after
    HALT_MIN_STEPS or at max_steps; torch eager on the model's device."""
    device = next(model.parameters()).device
    rows = torch.as_tensor(tokens).long().to(device)  # (P, L)
    generator = torch.Generator(device=device).manual_seed(seed)
    parts = []
    started = time.perf_counter()
    for start in range(0, len(rows), slots):
        group = rows[start:start + slots]
        parts.append(_stream_group(model, group, breadth, threshold, noise, generator, init_std, max_steps))
        if progress is not None:
            progress(len(group) * breadth)
    seconds = time.perf_counter() - started
    preds, scores, steps = (np.concatenate(arrays) for arrays in zip(*parts))
    return OfficialRun(preds, scores, steps, seconds)


@dataclass
class Point:
    """One point of a frontier: a side's setting, its answers over the rounds and their time."""

    side: str  # "official" or "eqr"
    label: str  # the setting in words
    key: str  # the setting in a RESULT field name
    answers: list[np.ndarray]  # int32 (P_r, L) per round
    seconds: float = 0.0
    steps: int = 0  # outer steps over every puzzle's K trajectories
    accuracy: float = float("nan")

    def rate(self, puzzles: int) -> float:
        return puzzles / self.seconds


def goal_threshold(breadth: int) -> float | None:
    """The goal at this breadth: that of the highest GOAL_BY_BREADTH breadth <= it; None below the lowest."""
    listed = [k for k in GOAL_BY_BREADTH if k <= breadth]
    return GOAL_BY_BREADTH[max(listed)] if listed else None


def eqr_rules(setting: Setting, solver: Any) -> list[tuple[str, str, Any]]:
    """The runtime's swept stopping rules -> (label, key, SolveConfig): the bench's rule and rules refitted
    at MARGINS (those that differ), each alone and with progressive breadth at every AGREES below K."""
    from eqr.runtime.config import SolveConfig

    c = setting.config
    rules = [("bench rule", "rule", solver.config())]
    for margin, rule in _refitted(setting).items():
        cfg = SolveConfig.from_dict(solver.rule | rule)
        if all(cfg != known for _, _, known in rules):  # a margin that fits an earlier rule adds no point
            rules.append((f"margin {margin:g}", f"m{margin:g}", cfg))
    agrees = [a for a in AGREES if a < c.breadth]
    return [(f"{label}, agree {a}" if a else label, f"{key}_a{a}" if a else key, cfg.replace(agree=a))
            for label, key, cfg in rules for a in (None, *agrees)]


def _refitted(setting: Setting) -> dict[float, dict[str, Any]]:
    """Stopping rules fitted at MARGINS (as the bench's own, eqr.calibration.stopping), on recorded FP32
    trajectories of `rule_puzzles` labelled puzzles; none with --paper (random weights)."""
    from eqr.bench.setting import mixed_puzzles
    from eqr.calibration.config import CalibConfig
    from eqr.calibration.stopping import fit_and_evaluate, record_trajectories

    c = setting.config
    if c.paper:
        return {}
    puzzles = mixed_puzzles(setting.task, c.rule_puzzles, c.seed + 200)  # eqr.bench.run.bench_rule's puzzles
    solver = solver_for(setting, batch_size=len(puzzles.inputs))  # the recorder wants one working batch
    try:
        traj = record_trajectories(solver, puzzles.inputs, CalibConfig.rule_steps, c.seed)
    finally:
        solver.close()
    return {m: fit_and_evaluate(traj, puzzles.labels, m)["rule"] | c.rule_overrides() for m in MARGINS}


def streaming_noise(setting: Setting) -> float:
    """The official streaming config's path noise, unless --reference-noise says otherwise."""
    c = setting.config
    return NOISE if c.reference_noise is None else c.reference_noise


def _key(threshold: float) -> str:
    return "q_inf" if math.isinf(threshold) else f"q{threshold:g}"


def _run_points(setting: Setting, solver: Any, rules: list[tuple[str, str, Any]]) -> list[Point]:
    """Every official threshold and every runtime rule on each of ROUNDS slices of the puzzle set, the two
    sides alternating within a round (round r seeds both with seed + r)."""
    c = setting.config
    puzzles = puzzle_set(setting)
    official = [Point("official", f"q_halt > {t:g}", _key(t), []) for t in THRESHOLDS]
    runtime = [Point("eqr", label, key, []) for label, key, _ in rules]
    P = len(puzzles.inputs)
    with setting.report.bar("official + eqr points", P * c.breadth * (len(official) + len(runtime))) as update:
        for r, index in enumerate(np.array_split(np.arange(P), min(ROUNDS, P))):
            for point, threshold in zip(official, THRESHOLDS):
                _official_round(setting, point, puzzles.inputs[index], threshold, c.seed + r, update)
            for point, (_, _, cfg) in zip(runtime, rules):
                _runtime_round(setting, solver, point, puzzles.inputs[index], cfg, c.seed + r, update)
    for point in official + runtime:
        point.accuracy = float(exact_correct(np.concatenate(point.answers), puzzles.labels).mean())
    return official + runtime


def _official_round(setting: Setting, point: Point, tokens: np.ndarray, threshold: float, seed: int,
                    update: Callable[[int], None]) -> None:
    c = setting.config
    run = official_solve(setting.model, tokens, c.breadth, c.batch_size, threshold, seed, streaming_noise(setting),
                         progress=update)
    point.answers.append(run.answers())
    point.seconds += run.seconds
    point.steps += int(run.steps.sum())


def _runtime_round(setting: Setting, solver: Any, point: Point, tokens: np.ndarray, cfg: Any, seed: int,
                   update: Callable[[int], None]) -> None:
    started = time.perf_counter()
    result = solver.run(tokens, cfg, setting.config.breadth, "converged", seed, progress=update)
    point.seconds += time.perf_counter() - started
    point.answers.append(result.preds)
    point.steps += int(result.steps.sum())


def frontier_ratios(official: list[Point], runtime: list[Point], puzzles: int) -> list[float]:
    """Per official point: the best runtime puzzles/s among runtime points at no lower accuracy, over the
    official point's puzzles/s (nan where no runtime point reaches its accuracy)."""
    ratios = []
    for point in official:
        rates = [e.rate(puzzles) for e in runtime if e.accuracy >= point.accuracy]
        ratios.append(max(rates) / point.rate(puzzles) if rates else float("nan"))
    return ratios


def on_frontier(point: Point, points: list[Point], puzzles: int) -> bool:
    """No other point of its side is at least as accurate and faster."""
    return not any(o is not point and o.accuracy >= point.accuracy and o.rate(puzzles) > point.rate(puzzles)
                   for o in points)


def frontier_vs_official(setting: Setting) -> Measurement:
    c = setting.config
    P = len(puzzle_set(setting).inputs)
    solver = solver_for(setting)
    try:
        rules = eqr_rules(setting, solver)
        official_solve(setting.model, puzzle_set(setting).inputs[:1], 1, 1, 0.0, c.seed)  # warm-ups, untimed
        solver.run(puzzle_set(setting).inputs[:1], rules[0][2], 1, "converged", c.seed)
        noise = streaming_noise(setting)
        setting.report.stage(f"official streaming: torch eager, {len(THRESHOLDS)} q_halt thresholds, noise {noise}, "
                             f"init std {INIT_STD}, cap {HALT_MAX_STEPS} | eqr: {c.backend} fp32, {len(rules)} rules "
                             f"| {P} puzzles x K {c.breadth}, slots/batch {c.batch_size}, {ROUNDS} alternating rounds")
        points = _run_points(setting, solver, rules)
    finally:
        solver.close()
    official = [p for p in points if p.side == "official"]
    runtime = [p for p in points if p.side == "eqr"]
    ratios = frontier_ratios(official, runtime, P)
    value = float("nan") if any(math.isnan(r) for r in ratios) else min(ratios, default=float("nan"))
    return _measurement(setting, official, runtime, ratios, value)


def _measurement(setting: Setting, official: list[Point], runtime: list[Point], ratios: list[float],
                 value: float) -> Measurement:
    c = setting.config
    P = len(puzzle_set(setting).inputs)
    ratio_of = dict(zip(map(id, official), ratios))
    rows, fields = [], {}
    for point in official + runtime:
        side = official if point.side == "official" else runtime
        ratio = ratio_of.get(id(point))
        rows.append((point.side, point.label, f"{point.rate(P):.2f}", f"{point.accuracy:.3f}",
                     f"{point.steps / P:.1f}", "yes" if on_frontier(point, side, P) else "",
                     "" if ratio is None else f"{ratio:.2f}"))
        fields |= {f"{point.side}_{point.key}_acc": point.accuracy, f"{point.side}_{point.key}_pps": point.rate(P)}
        if ratio is not None:
            fields[f"{point.side}_{point.key}_ratio"] = ratio
    threshold = goal_threshold(c.breadth)
    note = (f"{P} puzzles x K {c.breadth}; the value is the smallest ratio over the official points (a point "
            "off its side's frontier never sets it); nan when some official point is more accurate than every "
            "eqr point")
    if threshold is None:
        note += f"; the goal is defined from breadth {min(GOAL_BY_BREADTH)} (--breadth)"
    return Measurement(NAME, value, {"puzzles": P, "breadth": c.breadth, **fields},
                       ("side", "setting", "puzzles/s", "exact acc", "steps/puzzle", "frontier", "eqr/official"), rows,
                       note, goal_applies=not c.paper and threshold is not None, threshold=threshold)
