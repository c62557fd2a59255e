"""`Solver`: puzzles -> K seeded trajectories each -> `solve` -> one aggregated answer per puzzle.

    solver = Solver.load("maze-small-eqr/", backend="auto", precision="fp32")
    tokens = solver.task.parse(lines)  # the artifact's task reads its text format: int32 [P, L]
    result = solver.solve(tokens, breadth=8, aggregate="converged", seed=0)
    result.preds, result.steps, result.converged, result.residual, result.agreement
    answers = solver.task.format(result.preds)

Stopping: the rule `eqr calibrate` fitted for the precision (manifest `stopping`, docs/algorithm.md)
is the default; arguments given to `solve`/`config` override it field by field. A precision
cascade ("int8+fp32") steps at the low precision to its residual floor, then at the high one
under the high precision's rule.

Initial states have the distribution of `EqRModel.initial_state` (the compensated truncated
normal of eqr.contract.artifact, with the manifest's init_std) but are drawn by numpy, so the runtime
needs no torch: each trajectory (puzzle i, breadth k) has its own generator seeded by
(seed, i, k), so an answer does not depend on batch composition, batch size or backend.

Inference is noise-free by default, so every backend computes the same map and the residual can
fall to a tolerance. `noise=sigma` (SolveConfig.noise) adds the official evaluation's path noise,
sigma * N(0, 1) at every damped update, drawn on the host per (seed, puzzle, trajectory, step)
(runtime/path_noise.py) and run by the noisy step graph (`eqr export --noisy`), so a noisy answer
too is independent of batch composition (docs/algorithm.md#path-noise).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from eqr.contract.artifact import (INIT_SCALE, INIT_TRUNCATION, Artifact, missing_noisy_graph, recommended_tol,
                                   split_precision)
from eqr.contract.errors import EqRError
from eqr.runtime.aggregate import get_aggregator, vote_share
from eqr.runtime.backends.base import Backend
from eqr.runtime.backends.registry import AUTO, create_backend
from eqr.runtime.config import SolveConfig
from eqr.runtime.loop import solve, wave_bounds
from eqr.runtime.resolve import load_artifact, resolve_task
from eqr.runtime.stats import SolveStats

if TYPE_CHECKING:
    from eqr.model.network import EqRModel
    from eqr.tasks import Task


def truncated_normal(rng: np.random.Generator, shape: tuple[int, ...], std: float) -> np.ndarray:
    """float32 `shape` of INIT_SCALE * std * t, t ~ N(0, 1) given |t| <= INIT_TRUNCATION (by rejection)."""
    n = int(np.prod(shape))
    out = np.empty(n, np.float32)
    filled = 0
    while filled < n:  # ~4.6% of draws fall outside +-2; one pass almost always suffices
        need = n - filled
        draw = rng.standard_normal(need + need // 16 + 16, dtype=np.float32)
        kept = draw[np.abs(draw) <= INIT_TRUNCATION][:need]
        out[filled:filled + len(kept)] = kept
        filled += len(kept)
    return (out * np.float32(INIT_SCALE * std)).reshape(shape)


def initial_states(seq_len: int, hidden_size: int, init_std: tuple[float, float], seed: int,
                   puzzles: np.ndarray, breadths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """z_H, z_L float32 [R, L, D] for trajectories (puzzles[r], breadths[r]); z_H drawn before z_L,
    each trajectory from numpy's default generator (PCG64) seeded by SeedSequence([seed, i, k])."""
    z_H = np.empty((len(puzzles), seq_len, hidden_size), np.float32)  # (R, L, D)
    z_L = np.empty_like(z_H)
    for r, (i, k) in enumerate(zip(puzzles.tolist(), breadths.tolist())):
        rng = np.random.default_rng(np.random.SeedSequence([seed, i, k]))
        z_H[r] = truncated_normal(rng, (seq_len, hidden_size), init_std[0])
        z_L[r] = truncated_normal(rng, (seq_len, hidden_size), init_std[1])
    return z_H, z_L


# SolveResult's per-puzzle answer fields (what `eqr solve` reports, locally or from a server)
PER_PUZZLE = ("preds", "steps", "depth", "converged", "diverged", "residual", "agreement")


@dataclass(frozen=True)
class SolveResult:
    """One aggregated answer per puzzle. P puzzles, K breadth, L tokens, N steps.

    preds      int32 (P, L)  the chosen trajectory's final predictions
    steps      int32 (P,)    outer steps spent on the puzzle, summed over its launched trajectories
    depth      int32 (P,)    latency in steps: its longest trajectory's steps, summed over its waves (agree)
    converged  bool  (P,)    the chosen trajectory stopped by tol / stable preds / q_halt
    diverged   bool  (P,)    every launched trajectory of the puzzle went non-finite
    residual   fp32  (P,)    the chosen trajectory's final relative residual
    agreement  fp32  (P,)    vote share: fraction of launched, non-diverged trajectories giving the chosen answer
    chosen     int64 (P,)    breadth index of the chosen trajectory
    stats      SolveStats over the P*K trajectories, row p*K + k
    residual_trace, logit_delta_trace  fp32 (P, K, N) or None (stats="trace")
    trajectory_preds   int32 (P, K, L) or None   every trajectory's final predictions (keep_trajectories=True)
    """

    preds: np.ndarray
    steps: np.ndarray
    depth: np.ndarray
    converged: np.ndarray
    diverged: np.ndarray
    residual: np.ndarray
    agreement: np.ndarray
    chosen: np.ndarray
    stats: SolveStats
    residual_trace: np.ndarray | None = None
    logit_delta_trace: np.ndarray | None = None
    trajectory_preds: np.ndarray | None = None


class Solver:
    """A backend plus what the loop needs from the artifact: sizes, init stds, default stopping rule."""

    def __init__(self, backend: Backend, seq_len: int, hidden_size: int, init_std: tuple[float, float] = (1.0, 1.0),
                 default_tol: float | None = None, artifact: Artifact | None = None, batch_size: int | None = None,
                 precision: str = "fp32", rule: dict[str, Any] | None = None) -> None:
        """rule: SolveConfig fields (RULE_FIELDS, plus cascade_tol) used unless a call overrides them;
        None: only `default_tol`."""
        self.backend = backend
        self.seq_len, self.hidden_size, self.init_std = seq_len, hidden_size, init_std
        self.rule = dict(rule) if rule is not None else {"tol": default_tol}
        self.default_tol = default_tol  # the precision's residual tolerance (the rule may switch tol off)
        self.artifact = artifact
        self.batch_size = batch_size  # working-batch cap; None: all rows at once
        self.precision = precision
        self._task: "Task | None" = None

    @property
    def task(self) -> "Task":
        """The puzzle task the model was exported for (its manifest's, else the one its sizes fit):
        `task.parse(lines)` -> int32 [P, L] tokens, `task.format(preds)` -> one text line each."""
        if self._task is None:
            if self.artifact is None:
                raise EqRError("this Solver has no artifact to read its task from; use eqr.tasks.get_task")
            self._task = resolve_task(self.artifact)
        return self._task

    @classmethod
    def load(cls, artifact: str | os.PathLike[str] | Artifact, backend: str = AUTO, precision: str | None = None,
             batch_size: int | None = None, **backend_options: Any) -> "Solver":
        """ARTIFACT: export dir, ONNX file, engine, checkpoint, bundled name or preset.
        precision: one of PRECISIONS or a cascade "low+high" (eqr.contract.artifact.CASCADES); None: the one
        a single .onnx or engine file holds (model.step.int8.onnx: int8), else fp32. Heavy work
        (loading weights, building sessions) happens on first use, not here."""
        art = artifact if isinstance(artifact, Artifact) else load_artifact(artifact)
        stages = split_precision(precision) if precision else (art.precision or "fp32",)
        runner = create_backend(backend, art, stages[0], batch_size=batch_size, **backend_options)
        # a backend may run another graph of the precision (int8 on ONNX Runtime's CPU: int8-cpu):
        # its stopping rule and tol are that graph's
        stages = (getattr(runner, "precision", stages[0]) or stages[0], *stages[1:])
        rule = art.stopping_rule(stages[-1])
        if len(stages) == 2:
            from eqr.runtime.backends.cascade import CascadeBackend

            high = create_backend(runner.name, art, stages[1], batch_size=batch_size, **backend_options)
            runner = CascadeBackend(runner, high, "+".join(stages))
            rule["cascade_tol"] = art.default_tol(stages[0])  # the low precision's floor rule
        return cls(runner, art.seq_len, art.hidden_size, art.init_std, art.default_tol(stages[-1]), art,
                   batch_size, "+".join(stages), rule)

    @classmethod
    def from_model(cls, model: "EqRModel", batch_size: int | None = None,
                   default_tol: float | None = None, precision: str = "fp32", **backend_options: Any) -> "Solver":
        """A torch-backend solver for a model in memory (tests, notebooks, training evaluation).
        backend_options: TorchBackend's (device, dtype, static_shapes, cuda_graphs, ...); default_tol:
        the precision's unmeasured tolerance unless given."""
        from eqr.runtime.backends.torch_backend import TorchBackend

        c = model.config
        task = model.metadata.get("task") if isinstance(getattr(model, "metadata", None), dict) else None
        artifact = Artifact(kind="model", location="the model in memory", seq_len=c.seq_len,
                            hidden_size=c.hidden_size, vocab_size=c.vocab_size, init_std=(c.H_init_std, c.L_init_std),
                            config=c, task=task if isinstance(task, dict) else None)
        if default_tol is None:
            default_tol = recommended_tol(precision)["tol"]
        backend = TorchBackend(model, precision=precision, batch_size=batch_size, **backend_options)
        return cls(backend, c.seq_len, c.hidden_size, (c.H_init_std, c.L_init_std), default_tol,
                   artifact, batch_size=batch_size, precision=precision)

    def __enter__(self) -> "Solver":
        self.backend.activate()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.backend.deactivate()

    def config(self, max_steps: int | None = None, tol: float | None = None, **options: Any) -> SolveConfig:
        """A SolveConfig: this precision's stopping rule, overridden by every argument given (not None)."""
        given = {k: v for k, v in (("max_steps", max_steps), ("tol", tol)) if v is not None}
        return SolveConfig.from_dict(self.rule | given | options)

    def solve(self, tokens: np.ndarray, max_steps: int | None = None, tol: float | None = None, breadth: int = 1,
              aggregate: str = "converged", seed: int = 0, progress: Callable[[int], None] | None = None,
              keep_trajectories: bool = False, **options: Any) -> SolveResult:
        """Solve puzzles `tokens` (int [P, L]). max_steps, tol and options (the other SolveConfig
        fields: patience, window, q_halt, fixed_depth, agree, stats, ...) override the default rule."""
        return self.run(tokens, self.config(max_steps, tol, **options), breadth, aggregate, seed, progress,
                        keep_trajectories)

    def run(self, tokens: np.ndarray, cfg: SolveConfig, breadth: int = 1, aggregate: str = "converged",
            seed: int = 0, progress: Callable[[int], None] | None = None,
            keep_trajectories: bool = False) -> SolveResult:
        """`solve` with a ready SolveConfig. progress(n) gets the count of trajectories just stopped;
        keep_trajectories: the result also holds every trajectory's answer (for eqr.runtime.metrics)."""
        tokens = self.check_tokens(tokens)
        if breadth < 1:
            raise EqRError(f"breadth must be >= 1, got {breadth}")
        choose = get_aggregator(aggregate)
        P, K, L = len(tokens), breadth, self.seq_len
        puzzles = np.repeat(np.arange(P), K)  # row r = p*K + k
        breadths = np.tile(np.arange(K), P)

        def init(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return initial_states(L, self.hidden_size, self.init_std, seed, puzzles[rows], breadths[rows])

        if not self.backend.is_active:
            self.backend.activate()
        if cfg.noise > 0:
            self.check_noise()
        rows = np.repeat(tokens, K, axis=0)  # (P, L) -> (P*K, L), the K copies of a puzzle adjacent
        noise_keys = np.stack([np.full(P * K, seed, np.int64), puzzles, breadths], axis=1)  # (P*K, 3)
        outputs, stats = solve(self.backend, rows, init, cfg, groups=puzzles,
                               batch_size=self.batch_size, progress=progress, noise_keys=noise_keys)
        return aggregate_rows(outputs["preds"].reshape(P, K, L), stats, choose, P, K,  # (P*K, L) -> (P, K, L)
                              keep_trajectories, agree=cfg.agreeing)

    def check_noise(self) -> None:
        """EqRError saying how to get a noisy step graph when this (active) backend has none."""
        if self.backend.noise_shape is None:
            if self.artifact is None:
                raise EqRError(f"--noise: the {self.backend.name} backend has no noisy step graph")
            raise EqRError(missing_noisy_graph(self.artifact, self.precision))

    def check_tokens(self, tokens: np.ndarray) -> np.ndarray:
        """Puzzles as int32 [P, L] (a single [L] puzzle becomes [1, L]); EqRError if they do not fit."""
        tokens = np.asarray(tokens)
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.ndim != 2 or tokens.shape[1] != self.seq_len:
            raise EqRError(f"tokens must be [P, {self.seq_len}] for this model, got shape {tokens.shape}")
        vocab = self.artifact.vocab_size if self.artifact else None
        if tokens.size and (tokens.min() < 0 or (vocab is not None and tokens.max() >= vocab)):
            raise EqRError(f"token ids must be in 0..{(vocab or 0) - 1}, got {tokens.min()}..{tokens.max()}")
        return tokens.astype(np.int32)


def aggregate_rows(preds: np.ndarray, stats: SolveStats, choose: Callable, P: int, K: int,
                   keep_trajectories: bool = False, agree: int | None = None) -> SolveResult:
    """preds (P, K, L) and the stats of the P*K rows (row p*K + k) -> one SolveResult per puzzle;
    keep_trajectories: it keeps `preds` too. agree: the run's (its waves set the depth)."""
    valid = stats.voters.reshape(P, K)  # (P*K,) -> (P, K)
    score = stats.score.reshape(P, K)  # (P*K,) -> (P, K)
    chosen = choose(preds, score, valid).astype(np.int64)
    pick = np.arange(P) * K + chosen  # row of each chosen trajectory
    nstep = stats.nstep.reshape(P, K)  # (P*K,) -> (P, K)

    def by_puzzle(trace: np.ndarray | None) -> np.ndarray | None:
        return None if trace is None else trace.reshape(P, K, -1)  # (P*K, N) -> (P, K, N)

    return SolveResult(
        preds=np.take_along_axis(preds, chosen[:, None, None], axis=1)[:, 0], steps=nstep.sum(axis=1).astype(np.int32),
        depth=latency(nstep, agree), converged=stats.converged[pick],
        diverged=~valid.any(axis=1), residual=stats.residual[pick], agreement=vote_share(preds, valid, chosen),
        chosen=chosen, stats=stats, residual_trace=by_puzzle(stats.residual_trace),
        logit_delta_trace=by_puzzle(stats.logit_delta_trace), trajectory_preds=preds if keep_trajectories else None)


def latency(nstep: np.ndarray, agree: int | None) -> np.ndarray:
    """int32 (P,): steps until each puzzle's answer, from nstep (P, K): a wave starts once the one
    before it stopped (progressive breadth), so the longest trajectory of each wave adds up."""
    bounds = wave_bounds(agree, nstep.shape[1])
    wave = np.searchsorted(bounds, np.arange(nstep.shape[1]), side="right")  # (K,) wave of breadth index k
    return sum(nstep[:, wave == w].max(axis=1, initial=0) for w in range(len(bounds))).astype(np.int32)
