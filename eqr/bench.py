"""`eqr bench`: speed claims as ratios measured side by side in one run (never in tests).

Measurements (each a table plus one `RESULT name=value key=value ...` line at the end):

  reference_vs_runtime  the official evaluation protocol (spec 3.3b: torch eager, exactly D
                        outer steps, breadth K by repeating rows, path noise on, convergence
                        top-1) against the runtime (ONNX Runtime, gating, compaction, same K and
                        aggregation) on one mixed-difficulty set: puzzles/s ratio, both accuracies
  adaptive_steps        mean outer steps per trajectory under gating / the smallest fixed depth
                        whose official-protocol accuracy reaches the gated accuracy
  continuous_vs_static  `Scheduler` (continuous batching) against static batches of the same size
                        on a shuffled mixed-difficulty stream: puzzles/s ratio
  host_overhead         share of the runtime's solve wall time spent outside backend.step, batch 64
  step_efficiency       achieved FLOP/s of one step (FLOPs as `eqr info`) per backend and precision
                        at batch 1, 16, 64 / a float32 GEMM peak measured in the same run
  memory                peak RSS of a fresh process solving at batch 64 and 256

The reference loop below is a benchmark baseline, not product code: the style rule that only
`runtime/solve.py` loops over outer steps applies to the product, and this loop exists to be
compared against it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch

from eqr.errors import EqRError

log = logging.getLogger(__name__)

MEASUREMENTS = ("reference_vs_runtime", "adaptive_steps", "continuous_vs_static", "host_overhead",
                "step_efficiency", "memory")
FALLBACK_MODEL = "cpu-sudoku-4x4"  # a preset (fresh weights) used until bundled models exist
PAPER_MODEL = "paper-sudoku"
EFFICIENCY_BATCHES = (1, 16, 64)
MEMORY_BATCHES = (64, 256)
SIDE_BY_SIDE_ROUNDS = 4  # reference and runtime alternate over this many slices of the puzzle set
GEMM_SIZE = 1024
BLAS_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
# Goals from the project compass: (comparison, threshold).
GOALS: dict[str, tuple[str, float]] = {
    "reference_vs_runtime": (">=", 3.0), "adaptive_steps": ("<=", 0.4), "continuous_vs_static": (">=", 1.5),
    "host_overhead": ("<=", 0.05), "step_efficiency": (">=", 0.5),
}


@dataclass(frozen=True)
class BenchConfig:
    """One `eqr bench` run; every field is a flag."""

    model: str  # bundled name, checkpoint or preset
    puzzles: int = 192  # mixed-difficulty set for reference_vs_runtime, split evenly over the task's tiers
    breadth: int = 4  # K trajectories per puzzle (both sides)
    depth: int = 16  # D: the official protocol's fixed depth, and the runtime's max_steps
    batch_size: int = 64  # working batch (trajectories) of the runtime, the scheduler and static batches
    stream: int = 512  # puzzles in the continuous_vs_static stream (breadth 1)
    tol: float | None = None  # runtime tolerance; None: the export's per-precision value
    patience: int = 2
    window: int | None = 4  # stop when the answer is unchanged this many steps (None: off)
    threads: int = 1  # torch, ONNX Runtime and the GEMM peak all use this many threads
    seed: int = 0
    reference_noise: float | None = None  # path noise of the reference; None: the model's sigma (official)
    measurements: tuple[str, ...] = MEASUREMENTS
    precisions: tuple[str, ...] = ("fp32", "fp16", "int8")  # for step_efficiency
    export_dir: str | None = None  # reuse an export of the model instead of exporting to a temp dir
    paper: bool = False  # reference_vs_runtime only, on paper-sudoku with random weights

    def __post_init__(self) -> None:
        for name in ("puzzles", "breadth", "depth", "batch_size", "stream", "threads", "patience"):
            if getattr(self, name) < 1:
                raise EqRError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        unknown = sorted(set(self.measurements) - set(MEASUREMENTS))
        if unknown:
            raise EqRError(f"unknown measurement(s) {', '.join(unknown)}; choose from {', '.join(MEASUREMENTS)}")
        if self.batch_size < self.breadth:
            raise EqRError(f"--batch-size {self.batch_size} must hold one puzzle's --breadth {self.breadth} rows")


@dataclass
class Measurement:
    """One measured quantity, its table and its RESULT line."""

    name: str
    value: float
    fields: dict[str, Any]
    header: tuple[str, ...]
    rows: list[tuple[Any, ...]]
    note: str = ""
    goal_applies: bool = True  # False where the compass goal is not defined (e.g. --paper's random weights)

    @property
    def goal(self) -> tuple[str, float] | None:
        return GOALS.get(self.name) if self.goal_applies else None

    @property
    def met(self) -> bool | None:
        if self.goal is None:
            return None
        if not np.isfinite(self.value):  # e.g. the runtime lost accuracy: there is no equal-accuracy ratio
            return False
        op, threshold = self.goal
        return self.value >= threshold if op == ">=" else self.value <= threshold

    def result_line(self) -> str:
        pairs = {self.name: self.value}
        if self.goal is not None:
            pairs["goal_" + ("min" if self.goal[0] == ">=" else "max")] = self.goal[1]
            pairs["met"] = {True: 1, False: 0, None: "na"}[self.met]
        pairs |= self.fields
        return "RESULT " + " ".join(f"{k}={_fmt(v)}" for k, v in pairs.items())

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "goal": self.goal, "met": self.met, "fields": self.fields,
                "table": {"header": list(self.header), "rows": [list(r) for r in self.rows]}, "note": self.note}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if np.isfinite(value) else "nan"
    return str(value).replace(" ", "_")


def parse_result_line(line: str) -> tuple[str, dict[str, str]]:
    """`RESULT name=v k=v ...` -> (name, {name: v, k: v, ...}); ValueError if it is not one."""
    head, *pairs = line.split()
    if head != "RESULT" or not pairs:
        raise ValueError(f"not a RESULT line: {line!r}")
    parsed = dict(pair.split("=", 1) for pair in pairs)
    return pairs[0].split("=", 1)[0], parsed


# --------------------------------------------------------------------------- the setting


@dataclass
class PuzzleSet:
    inputs: np.ndarray  # int32 (P, L)
    labels: np.ndarray  # int32 (P, L)
    tiers: np.ndarray  # str (P,)


@dataclass
class Setting:
    """What every measurement shares: the model, its task's puzzles, its export, a reporter."""

    config: BenchConfig
    model: Any  # EqRModel
    task: Any  # eqr.tasks.Task
    export_dir: Path
    report: "Reporter"
    cache: dict[str, Any] = field(default_factory=dict)

    def once(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]


class Reporter:
    """Stage lines and bars on stderr; stdout carries only tables, RESULT lines or JSON."""

    def __init__(self, quiet: bool = False) -> None:
        self.started = time.perf_counter()
        self.quiet = quiet

    def stage(self, text: str) -> None:
        if not self.quiet:
            click.echo(f"[{time.perf_counter() - self.started:6.1f}s] {text}", err=True)

    @contextlib.contextmanager
    def bar(self, label: str, total: int) -> Iterator[Callable[[int], None]]:
        if self.quiet:
            yield lambda n: None
            return
        with click.progressbar(length=total, label=f"          {label}", file=sys.stderr, show_pos=True) as bar:
            yield bar.update


def model_task(model: Any) -> Any:
    """The task a model solves: its checkpoint metadata, its preset's recipe, or inferred from L and V."""
    from eqr.config import PRESETS
    from eqr.export.inputs import infer_task
    from eqr.tasks import get_task

    recorded = (model.metadata or {}).get("task") or {}
    if not recorded.get("name") and model.source is not None and model.source.location in PRESETS:
        recorded = PRESETS[model.source.location][1].extra.get("task") or {}
    if recorded.get("name"):
        return get_task(recorded["name"], recorded.get("size"))
    inferred = infer_task(model)
    if inferred.name is None:
        raise EqRError(f"{model.source.location if model.source else 'model'}: cannot tell its puzzle task "
                       f"(L {model.config.seq_len}, V {model.config.vocab_size}); "
                       "bench a bundled model or a checkpoint")
    return get_task(inferred.name, inferred.size)


def mixed_puzzles(task: Any, n: int, seed: int, tiers: bool = True) -> PuzzleSet:
    """n puzzles split evenly over the task's difficulty tiers (a tier that cannot be made is skipped)."""
    parts = []
    names = list(task.tiers) if tiers else [None]
    for i, tier in enumerate(names):
        count = n // len(names) + (1 if i < n % len(names) else 0)
        if count == 0:
            continue
        try:
            parts.append(task.generate(count, seed=seed + i, tier=tier))
        except EqRError as e:
            log.warning("skipping tier %s: %s", tier, e)
    if not parts:
        raise EqRError(f"could not generate any {task!r} puzzles; try another --seed")
    return PuzzleSet(np.concatenate([p.inputs for p in parts]).astype(np.int32),
                     np.concatenate([p.labels for p in parts]).astype(np.int32),
                     np.concatenate([p.tiers for p in parts]))


def exact_correct(preds: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """bool (P,): every non-PAD label matched (labels cover the givens too, spec 8.11)."""
    from eqr.tasks import PAD_ID

    return ((preds == labels) | (labels == PAD_ID)).all(axis=1)


# --------------------------------------------------------------------------- the official protocol


@dataclass
class ReferenceRun:
    """The official depth x breadth evaluation (spec 3.3b), with what every depth would have given.

    preds        uint8 (N, P*K, L)  argmax after every outer step, row p*K + k
    logit_delta  fp32  (N, P*K)     mean over positions of ||logits_t - logits_{t-1}||_2 (t = 1 uses
                                    the logits of the initial z_H, as the runtime's step graph does)
    seconds      wall time of the whole loop
    """

    preds: np.ndarray
    logit_delta: np.ndarray
    seconds: float
    breadth: int

    def answers(self, depth: int, aggregate: str, score_window: int = 3) -> np.ndarray:
        """int (P, L): the aggregated answer had the protocol stopped at `depth` (<= N)."""
        from eqr.runtime.aggregate import get_aggregator

        K = self.breadth
        preds = self.preds[depth - 1].astype(np.int32)  # (P*K, L)
        P = len(preds) // K
        score = self.logit_delta[max(0, depth - score_window):depth].mean(axis=0)  # (P*K,)
        by_puzzle = preds.reshape(P, K, -1)  # (P*K, L) -> (P, K, L)
        chosen = get_aggregator(aggregate)(by_puzzle, score.reshape(P, K), np.ones((P, K), bool))
        return np.take_along_axis(by_puzzle, chosen[:, None, None], axis=1)[:, 0]


@torch.inference_mode()
def reference_solve(model: Any, tokens: np.ndarray, depth: int, breadth: int, batch_size: int, seed: int,
                    noise: float, progress: Callable[[int], None] | None = None) -> ReferenceRun:
    """Spec 3.3b with torch eager: rows = each puzzle K times, random init, exactly D steps, noise on."""
    rows = torch.as_tensor(tokens).long().repeat_interleave(breadth, dim=0)  # (P*K, L)
    R, L = rows.shape
    preds = np.empty((depth, R, L), np.uint8)
    logit_delta = np.empty((depth, R), np.float32)
    generator = torch.Generator().manual_seed(seed)
    chunk = max(breadth, batch_size - batch_size % breadth)  # whole puzzles per batch
    started = time.perf_counter()
    for start in range(0, R, chunk):
        batch = rows[start:start + chunk]
        state = model.initial_state(len(batch), generator)
        previous = model.lm_head(state.z_H).float()  # (b, L, V)
        for t in range(depth):
            state, logits, _ = model.step(state, batch, noise=noise, generator=generator)
            logits = logits.float()
            preds[t, start:start + len(batch)] = logits.argmax(-1).numpy()
            logit_delta[t, start:start + len(batch)] = (logits - previous).norm(dim=-1).mean(-1).numpy()
            previous = logits
        if progress is not None:
            progress(len(batch))
    return ReferenceRun(preds, logit_delta, time.perf_counter() - started, breadth)


# --------------------------------------------------------------------------- measurements


def _solver(setting: Setting, precision: str = "fp32", batch_size: int | None = None) -> Any:
    from eqr.runtime import Solver

    solver = Solver.load(setting.export_dir, backend="onnxruntime", precision=precision,
                         batch_size=batch_size or setting.config.batch_size, threads=setting.config.threads)
    solver.backend.activate()
    return solver


def _gated(setting: Setting, solver: Any, max_steps: int) -> Any:
    c = setting.config
    return solver.config(max_steps=max_steps, tol=c.tol, patience=c.patience, window=c.window)


def _puzzle_set(setting: Setting) -> PuzzleSet:
    c = setting.config

    def make() -> PuzzleSet:
        ordered = mixed_puzzles(setting.task, c.puzzles, c.seed, tiers=not c.paper)
        order = np.random.default_rng(c.seed).permutation(len(ordered.inputs))  # every round mixes the tiers
        return PuzzleSet(ordered.inputs[order], ordered.labels[order], ordered.tiers[order])

    return setting.once("puzzles", make)


@dataclass
class RuntimeRun:
    """The runtime side of reference_vs_runtime, rounds joined. P puzzles, K breadth, L tokens.

    preds    int32 (P, L)  aggregated answers
    steps    int32 (P,)    outer steps per puzzle, summed over its K trajectories
    stats    SolveStats over the P*K trajectories (rounds concatenated)
    seconds  wall time of the solve calls
    """

    preds: np.ndarray
    steps: np.ndarray
    stats: Any
    seconds: float


def _side_by_side(setting: Setting) -> tuple[ReferenceRun, RuntimeRun]:
    """Reference and runtime on the same puzzles, alternating in rounds so load drift hits both."""
    return setting.once("side_by_side", lambda: _run_side_by_side(setting))


def _run_side_by_side(setting: Setting) -> tuple[ReferenceRun, RuntimeRun]:
    c = setting.config
    puzzles = _puzzle_set(setting)
    noise = setting.model.config.noise_scale if c.reference_noise is None else c.reference_noise
    solver = _solver(setting)
    cfg = _gated(setting, solver, c.depth)
    reference_solve(setting.model, puzzles.inputs[:1], 1, 1, 1, c.seed, noise)  # warm-ups, untimed
    solver.run(puzzles.inputs[:1], cfg.replace(fixed_depth=1), 1, "converged", c.seed)
    setting.report.stage(f"reference: torch eager, exactly D {c.depth} steps, noise {noise} | runtime: onnxruntime "
                         f"fp32, gated (tol {cfg.tol}, patience {cfg.patience}, window {cfg.window}), max {c.depth} "
                         f"steps | {len(puzzles.inputs)} puzzles x K {c.breadth}, batch {c.batch_size}, "
                         f"{SIDE_BY_SIDE_ROUNDS} alternating rounds")
    refs, runs = [], []
    rounds = np.array_split(np.arange(len(puzzles.inputs)), min(SIDE_BY_SIDE_ROUNDS, len(puzzles.inputs)))
    with setting.report.bar("reference + runtime", 2 * len(puzzles.inputs) * c.breadth) as update:
        for r, index in enumerate(rounds):
            tokens = puzzles.inputs[index]
            refs.append(reference_solve(setting.model, tokens, c.depth, c.breadth, c.batch_size, c.seed + r, noise,
                                        update))
            started = time.perf_counter()
            result = solver.run(tokens, cfg, c.breadth, "converged", c.seed + r, progress=update)
            runs.append(RuntimeRun(result.preds, result.steps, result.stats, time.perf_counter() - started))
    solver.close()
    return _join_reference(refs), _join_runtime(runs)


def _join_reference(parts: list[ReferenceRun]) -> ReferenceRun:
    return ReferenceRun(np.concatenate([p.preds for p in parts], axis=1),  # rows: (N, R, L) along R
                        np.concatenate([p.logit_delta for p in parts], axis=1), sum(p.seconds for p in parts),
                        parts[0].breadth)


def _join_runtime(parts: list[RuntimeRun]) -> RuntimeRun:
    from eqr.runtime.stats import SolveStats

    def joined(name: str) -> np.ndarray | None:
        values = [getattr(p.stats, name) for p in parts]
        return None if values[0] is None else np.concatenate(values)

    stats = SolveStats(**{f.name: joined(f.name) for f in dataclasses.fields(SolveStats)})
    return RuntimeRun(np.concatenate([p.preds for p in parts]), np.concatenate([p.steps for p in parts]), stats,
                      sum(p.seconds for p in parts))


def reference_vs_runtime(setting: Setting) -> Measurement:
    c = setting.config
    puzzles = _puzzle_set(setting)
    ref, rt = _side_by_side(setting)
    P = len(puzzles.inputs)
    ref_acc = float(exact_correct(ref.answers(c.depth, "converged"), puzzles.labels).mean())
    rt_acc = float(exact_correct(rt.preds, puzzles.labels).mean())
    ref_rate, rt_rate = P / ref.seconds, P / rt.seconds
    ref_steps, rt_steps = P * c.breadth * c.depth, rt.stats.total_steps
    ratio = rt_rate / ref_rate
    equal = rt_acc >= ref_acc
    flops = _flops(setting)
    rows = [("reference (torch eager, fixed D, noise)", f"{ref_rate:.2f}", f"{ref_acc:.3f}", ref_steps,
             f"{1e3 * ref.seconds / ref_steps:.3f}", f"{flops * ref_steps / ref.seconds / 1e9:.2f}"),
            ("runtime (onnxruntime, gated, compaction)", f"{rt_rate:.2f}", f"{rt_acc:.3f}", rt_steps,
             f"{1e3 * rt.seconds / max(rt_steps, 1):.3f}", f"{flops * rt_steps / rt.seconds / 1e9:.2f}")]
    note = "" if equal else (f"runtime accuracy {rt_acc:.3f} is below the reference's {ref_acc:.3f}: "
                             "the speed ratio is not at equal accuracy")
    fields: dict[str, Any] = {}
    if c.paper:
        peak = max(gemm_peak(c.threads).values())
        fields = {"gemm_peak_gflops": peak / 1e9, "runtime_of_gemm_peak": flops * rt_steps / rt.seconds / peak,
                  "reference_of_gemm_peak": flops * ref_steps / ref.seconds / peak}
        note = (f"{PAPER_MODEL} with random weights: nothing converges, so this is the per-step cost at paper "
                f"scale ({flops / 1e9:.2f} GFLOPs per sample-step; GEMM peak {peak / 1e9:.1f} GFLOP/s); "
                "the accuracy goal does not apply")
    return Measurement("reference_vs_runtime", ratio if equal else float("nan"),
                       {"ratio_any_accuracy": ratio, "reference_puzzles_per_s": ref_rate,
                        "runtime_puzzles_per_s": rt_rate, "reference_accuracy": ref_acc, "runtime_accuracy": rt_acc,
                        "puzzles": P, "breadth": c.breadth, "depth": c.depth,
                        "reference_ms_per_sample_step": 1e3 * ref.seconds / ref_steps,
                        "runtime_ms_per_sample_step": 1e3 * rt.seconds / max(rt_steps, 1), **fields},
                       ("side", "puzzles/s", "exact acc", "sample-steps", "ms/sample-step", "GFLOP/s"), rows, note,
                       goal_applies=not c.paper)


def adaptive_steps(setting: Setting) -> Measurement:
    c = setting.config
    puzzles = _puzzle_set(setting)
    ref, rt = _side_by_side(setting)
    gated_acc = float(exact_correct(rt.preds, puzzles.labels).mean())
    mean_steps = float(rt.stats.nstep.mean())
    curve = [float(exact_correct(ref.answers(d, "converged"), puzzles.labels).mean()) for d in range(1, c.depth + 1)]
    reached = [d for d, acc in enumerate(curve, start=1) if acc >= gated_acc]
    budget = reached[0] if reached else None
    # No fixed depth up to D matches gating: the budget is > D, so mean_steps / D is an upper bound.
    value = mean_steps / (budget or c.depth)
    reasons = rt.stats.summary()["stop_reasons"]
    rows = [(d, f"{acc:.3f}", "<- smallest fixed budget at the gated accuracy" if d == budget else "")
            for d, acc in enumerate(curve, start=1)]
    per_trajectory = rt.steps / c.breadth  # (P,) mean over the puzzle's K trajectories
    by_tier = ", ".join(f"{tier} {per_trajectory[puzzles.tiers == tier].mean():.2f}"
                        for tier in dict.fromkeys(puzzles.tiers.tolist()))
    note = (f"gated: {mean_steps:.2f} mean steps per trajectory at accuracy {gated_acc:.3f} "
            f"(by tier: {by_tier}; stop reasons {reasons}); fixed depths from the official-protocol run above")
    if budget is None:
        note += f"; no fixed depth <= {c.depth} reaches the gated accuracy, so the value is an upper bound"
    return Measurement("adaptive_steps", value,
                       {"gated_mean_steps": mean_steps, "fixed_budget": budget if budget else f">{c.depth}",
                        "gated_accuracy": gated_acc, "fixed_accuracy_at_budget": curve[budget - 1] if budget else "na"},
                       ("fixed depth", "official-protocol acc", ""), rows, note)


@dataclass
class StreamRun:
    seconds: float
    preds: np.ndarray  # int32 (P, L)
    row_steps: int | None  # batch rows stepped, settled ones included (static only)
    needed_steps: int | None  # outer steps the trajectories themselves took (static only)


def continuous_vs_static(setting: Setting) -> Measurement:
    c = setting.config
    stream = mixed_puzzles(setting.task, c.stream, c.seed + 100, tiers=not c.paper)
    order = np.random.default_rng(c.seed).permutation(len(stream.inputs))
    tokens, labels = stream.inputs[order], stream.labels[order]  # a shuffled mixed-difficulty stream
    solver = _solver(setting, batch_size=c.batch_size)
    cfg = _gated(setting, solver, c.depth)
    _warm_up(solver, cfg, tokens[:c.batch_size], c)
    runs = {"static": _static_run(setting, solver, cfg, tokens, "static", compaction=False),
            "static_compacted": _static_run(setting, solver, cfg, tokens, "static_compacted", compaction=True),
            "continuous": _continuous_run(setting, solver, cfg, tokens)}
    solver.close()
    rates = {name: len(tokens) / run.seconds for name, run in runs.items()}
    rows = [(name, f"{rates[name]:.2f}", f"{exact_correct(run.preds, labels).mean():.3f}",
             "" if run.row_steps is None else run.row_steps) for name, run in runs.items()]
    static = runs["static"]
    bound = static.row_steps / max(static.needed_steps, 1)
    return Measurement("continuous_vs_static", rates["continuous"] / rates["static"],
                       {"continuous_puzzles_per_s": rates["continuous"], "static_puzzles_per_s": rates["static"],
                        "static_compacted_puzzles_per_s": rates["static_compacted"],
                        "vs_static_compacted": rates["continuous"] / rates["static_compacted"],
                        "row_steps_static": static.row_steps, "row_steps_needed": static.needed_steps,
                        "bound": bound, "stream": len(tokens), "batch": c.batch_size},
                       ("batching", "puzzles/s", "exact acc", "row-steps run"), rows,
                       "static: fixed batches padded with settled rows until the last finishes; "
                       "static_compacted: the same batches with settled rows dropped; continuous batching can "
                       f"gain at most row-steps run / row-steps needed = {static.row_steps}/{static.needed_steps} "
                       f"= {bound:.2f}x over static")


def _static_run(setting: Setting, solver: Any, cfg: Any, tokens: np.ndarray, name: str, compaction: bool) -> StreamRun:
    """Batches of `batch_size` puzzles, each solved to its last row before the next starts."""
    c = setting.config
    setting.report.stage(f"{name}: {len(tokens)} puzzles in batches of {c.batch_size}, each run to its last row")
    static_cfg = cfg.replace(compaction=compaction)
    preds, row_steps, needed = [], 0, 0
    started = time.perf_counter()
    with setting.report.bar(name, len(tokens)) as update:
        for start in range(0, len(tokens), c.batch_size):
            result = solver.run(tokens[start:start + c.batch_size], static_cfg, 1, "converged", c.seed)
            preds.append(result.preds)
            row_steps += int(result.stats.batch_size.sum())
            needed += result.stats.total_steps
            update(len(result.preds))
    return StreamRun(time.perf_counter() - started, np.concatenate(preds), row_steps, needed)


def _continuous_run(setting: Setting, solver: Any, cfg: Any, tokens: np.ndarray) -> StreamRun:
    """Every puzzle submitted to a `Scheduler`, which refills its working batch as rows settle."""
    from eqr.runtime import Scheduler

    c = setting.config
    setting.report.stage(f"continuous: Scheduler, working batch {c.batch_size}")
    started = time.perf_counter()
    with Scheduler(solver, cfg, batch_size=c.batch_size, breadth=1, seed=c.seed, max_queue=len(tokens)) as scheduler:
        futures = [scheduler.submit(t) for t in tokens]
        preds = np.concatenate([f.result().preds for f in futures])
    return StreamRun(time.perf_counter() - started, preds, None, None)


def _warm_up(solver: Any, cfg: Any, tokens: np.ndarray, c: BenchConfig) -> None:
    """One static and one continuous pass, untimed: ONNX Runtime builds its gather/concat sessions."""
    from eqr.runtime import Scheduler

    solver.run(tokens, cfg.replace(max_steps=2), 1, "converged", c.seed)
    with Scheduler(solver, cfg.replace(max_steps=2), batch_size=max(1, len(tokens) // 2), breadth=1,
                   seed=c.seed) as scheduler:
        for future in [scheduler.submit(t) for t in tokens]:
            future.result()


def host_overhead(setting: Setting) -> Measurement:
    c = setting.config
    _, rt = _side_by_side(setting)
    stats = rt.stats
    backend_s = float(stats.step_time.sum())
    share = max(0.0, 1.0 - backend_s / rt.seconds)
    full = stats.batch_size >= c.batch_size
    rows = [("solve wall time", f"{rt.seconds:.3f}"), ("inside backend.step", f"{backend_s:.3f}"),
            ("outside (host loop, init states, aggregation)", f"{rt.seconds - backend_s:.3f}"),
            ("batched steps (full batch / all)", f"{int(full.sum())} / {len(full)}")]
    return Measurement("host_overhead", share, {"wall_s": rt.seconds, "backend_s": backend_s, "batch": c.batch_size},
                       ("where", "seconds"), rows, "from the runtime side of reference_vs_runtime")


def _flops(setting: Setting) -> int:
    from eqr.model import flops_per_step

    return flops_per_step(setting.model.config)


def gemm_peak(threads: int, size: int = GEMM_SIZE, repeats: int = 5) -> dict[str, float]:
    """Best float32 GEMM FLOP/s of torch (here) and of numpy (a child process, so its BLAS can be
    held to `threads` threads: the pool size is fixed when numpy loads)."""
    a, b = (torch.randn(size, size, generator=torch.Generator().manual_seed(i)) for i in range(2))
    torch.set_num_threads(threads)
    flops = 2.0 * size**3
    peaks = {"torch": flops / _best_time(lambda: torch.mm(a, b), repeats, min_seconds=0.5)}
    env = os.environ | {name: str(threads) for name in BLAS_THREAD_VARIABLES}
    code = "from eqr.bench import numpy_gemm_seconds; numpy_gemm_seconds()"
    done = subprocess.run([sys.executable, "-c", code, str(size), str(repeats)], env=env, capture_output=True,
                          text=True, check=False)
    if done.returncode == 0:
        peaks["numpy"] = flops / float(done.stdout.split()[-1])
    else:
        log.warning("numpy GEMM probe failed: %s", done.stderr.strip()[-200:])
    return peaks


def numpy_gemm_seconds() -> None:
    """Child process of `gemm_peak`: print the best time of one size x size float32 numpy matmul."""
    size, repeats = int(sys.argv[1]), int(sys.argv[2])
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((size, size), dtype=np.float32) for _ in range(2))
    print(_best_time(lambda: a @ b, repeats, min_seconds=0.5))


def _best_time(fn: Callable[[], Any], repeats: int, min_seconds: float = 0.0) -> float:
    fn()  # warm-up
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - started < min_seconds:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def _step_backends(setting: Setting) -> Iterator[tuple[str, Any]]:
    """(label, active backend) for torch fp32 and every exported ONNX Runtime precision."""
    from eqr.runtime.artifact import load_artifact
    from eqr.runtime.backends.ort_backend import OrtBackend
    from eqr.runtime.backends.torch_backend import TorchBackend

    artifact = load_artifact(setting.export_dir)
    backend = TorchBackend(setting.model)
    with backend:
        yield "torch fp32", backend
    for precision in setting.config.precisions:
        path = artifact.onnx.get(precision)
        if path is None:
            continue
        backend = OrtBackend(path, threads=setting.config.threads, precision=precision)
        with backend:
            yield f"onnxruntime {precision}", backend


def step_efficiency(setting: Setting) -> Measurement:
    c = setting.config
    setting.report.stage(f"GEMM peak: float32 {GEMM_SIZE}^3 matmul, torch and numpy, {c.threads} thread(s)")
    peaks = gemm_peak(c.threads)
    flops = _flops(setting)
    L, D = setting.model.config.seq_len, setting.model.config.hidden_size
    rng = np.random.default_rng(c.seed)
    timed: list[tuple[str, int, float]] = []
    for label, backend in _step_backends(setting):
        setting.report.stage(f"step timing: {label}, batch {', '.join(map(str, EFFICIENCY_BATCHES))}")
        for B in EFFICIENCY_BATCHES:
            tokens = rng.integers(1, setting.model.config.vocab_size, (B, L)).astype(np.int32)
            feeds = {"tokens": backend.upload(tokens),
                     "z_H": backend.upload(rng.standard_normal((B, L, D), dtype=np.float32)),
                     "z_L": backend.upload(rng.standard_normal((B, L, D), dtype=np.float32))}
            timed.append((label, B, _best_time(lambda: backend.step(feeds), repeats=3, min_seconds=0.3)))
    setting.report.stage("GEMM peak again (the peak is the best of before and after: the machine is shared)")
    peaks = {name: max(value, peaks.get(name, 0.0)) for name, value in gemm_peak(c.threads).items()}
    peak = max(peaks.values())
    rows, best_at_64 = [], {}
    for label, B, seconds in timed:
        achieved = flops * B / seconds
        rows.append((label, B, f"{1e3 * seconds:.2f}", f"{achieved / 1e9:.2f}", f"{achieved / peak:.3f}"))
        if B == 64:
            best_at_64[label] = achieved / peak
    fastest = max(best_at_64, key=best_at_64.get)
    fields: dict[str, Any] = {"fastest_backend": fastest, "gemm_peak_gflops": peak / 1e9,
                              **{f"{name}_gemm_gflops": value / 1e9 for name, value in peaks.items()},
                              "step_gflop_per_sample": flops / 1e9}
    fields |= {f"{label.replace(' ', '_')}_b64": value for label, value in best_at_64.items()}
    return Measurement("step_efficiency", best_at_64[fastest], fields,
                       ("backend", "batch", "ms/step", "GFLOP/s", "of GEMM peak"), rows,
                       f"GEMM peak {peak / 1e9:.1f} GFLOP/s, best of "
                       + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in peaks.items())
                       + f"; FLOPs per step as `eqr info` ({flops / 1e6:.1f} M/sample)")


def memory(setting: Setting) -> Measurement:
    c = setting.config
    rows, fields = [], {}
    puzzles = _puzzle_set(setting)
    with tempfile.TemporaryDirectory(prefix="eqr-bench-mem-") as tmp:
        for B in MEMORY_BATCHES:
            tokens = np.resize(puzzles.inputs, (B, puzzles.inputs.shape[1]))  # B trajectories, one working batch
            np.save(Path(tmp) / "tokens.npy", tokens)
            setting.report.stage(f"memory: fresh process, onnxruntime fp32 solve at batch {B}")
            probe = {"export_dir": str(setting.export_dir), "tokens": str(Path(tmp) / "tokens.npy"), "batch": B,
                     "steps": min(c.depth, 4), "threads": c.threads}
            done = subprocess.run([sys.executable, "-c", "from eqr.bench import memory_probe; memory_probe()",
                                   json.dumps(probe)], capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"memory probe at batch {B} failed: {done.stderr.strip().splitlines()[-1:]}")
            report = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append((B, f"{report['loaded_mib']:.1f}", f"{report['after_mib']:.1f}", f"{report['peak_mib']:.1f}"))
            fields[f"peak_rss_mib_b{B}"] = report["peak_mib"]
            fields[f"batch_rss_mib_b{B}"] = report["after_mib"] - report["loaded_mib"]
    return Measurement("memory", fields[f"peak_rss_mib_b{MEMORY_BATCHES[-1]}"], fields,
                       ("batch", "RSS loaded MiB", "RSS after solve MiB", "peak RSS MiB"), rows,
                       "a fresh Python process: imports, ONNX Runtime session and a 1-row warm-up solve (loaded), "
                       "then one solve of a full working batch; peak = ru_maxrss")


def memory_probe() -> None:
    """Child process of `memory`: load, solve one working batch, print RSS figures as JSON."""
    from eqr.runtime import Solver

    probe = json.loads(sys.argv[1])
    torch.set_num_threads(probe["threads"])
    tokens = np.load(probe["tokens"])
    solver = Solver.load(probe["export_dir"], backend="onnxruntime", batch_size=probe["batch"],
                         threads=probe["threads"])
    solver.backend.activate()
    solver.solve(tokens[:1], fixed_depth=1)  # warm-up: lazily loaded kernels count as "loaded", not as the batch
    loaded = _current_rss_mib()
    solver.solve(tokens, fixed_depth=probe["steps"])
    print(json.dumps({"loaded_mib": loaded, "after_mib": _current_rss_mib(), "peak_mib": _peak_rss_mib()}))


def _current_rss_mib() -> float:
    """Resident set size now (Linux /proc); the peak so far where /proc is missing."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0  # kB
    return _peak_rss_mib()


def _peak_rss_mib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 1024.0 if platform.system() != "Darwin" else kib / 2**20


MEASURE: dict[str, Callable[[Setting], Measurement]] = {
    "reference_vs_runtime": reference_vs_runtime, "adaptive_steps": adaptive_steps,
    "continuous_vs_static": continuous_vs_static, "host_overhead": host_overhead,
    "step_efficiency": step_efficiency, "memory": memory,
}


# --------------------------------------------------------------------------- running


def export_for_bench(model: Any, out_dir: Path, precisions: tuple[str, ...], paper: bool) -> list[str]:
    """Export fp32 (+ fp16, int8 where they pass the export checks) into out_dir; -> notes on skips."""
    from eqr.calibration.record import int8_calibration
    from eqr.export import ExportConfig, export_model
    from eqr.export.exporter import ExportError

    checks = {"check_batch": 1, "check_steps": 2} if paper else {"check_batch": 2, "check_steps": 8}
    wanted = tuple(p for p in precisions if p != "fp32")
    try:
        config = ExportConfig(precision=("fp32", *wanted), engine="never", force=True, **checks)
        export_model(model, out_dir, config, calibrate=int8_calibration(model, config))
        return []
    except ExportError as e:
        if not wanted:
            raise
        notes = [f"export of {', '.join(wanted)} failed its checks ({e}); fp32 only"]
    export_model(model, out_dir, ExportConfig(precision=("fp32",), engine="never", force=True, **checks))
    return notes


def check_export_matches(export_dir: Path, model: Any, name: str) -> None:
    """--export-dir must hold this model's architecture (weights are the user's word)."""
    from eqr.runtime.artifact import load_artifact

    artifact = load_artifact(export_dir)
    if artifact.kind != "export" or artifact.config != model.config:
        raise EqRError(f"--export-dir {export_dir}: not an export of {name}'s architecture; "
                       f"export it with `eqr export {name} --out DIR` or drop --export-dir")


def default_model() -> str:
    """The first bundled Sudoku model, else any bundled model, else the small CPU preset."""
    from eqr.load import bundled_dir, bundled_names

    names = bundled_names()
    for name in names:
        card = bundled_dir() / name / "card.json"
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            if json.loads(card.read_text())["task"]["name"] == "sudoku":
                return name
    return names[0] if names else FALLBACK_MODEL


def run_bench(config: BenchConfig, reporter: Reporter | None = None) -> tuple[list[Measurement], dict[str, Any]]:
    """Run the selected measurements -> (measurements, run description)."""
    from eqr.load import load_model

    from eqr.export.exporter import fp32_model

    reporter = reporter or Reporter()
    torch.set_num_threads(config.threads)
    # Both sides compute in float32: a bf16-configured checkpoint would make torch CPU ~6x slower
    # (deployment spec) and flatter the runtime, whose exported step is float32.
    model = fp32_model(load_model(config.model))
    task = model_task(model)
    info = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": config.model,
            "task": repr(task), "parameters": model.num_parameters(), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "load_avg": [round(x, 2) for x in os.getloadavg()],
            "torch": torch.__version__, "config": dataclasses.asdict(config), "notes": []}
    with contextlib.ExitStack() as stack:
        if config.export_dir:
            export_dir = Path(config.export_dir)
            check_export_matches(export_dir, model, config.model)
        else:
            export_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="eqr-bench-"))) / "export"
            reporter.stage(f"export {config.model} to ONNX ({', '.join(config.precisions)}) in {export_dir}")
            started = time.perf_counter()
            info["notes"] += export_for_bench(model, export_dir, config.precisions, config.paper)
            info["export_s"] = round(time.perf_counter() - started, 1)
        setting = Setting(config, model, task, export_dir, reporter)
        measurements = []
        for name in config.measurements:
            reporter.stage(f"== {name}")
            measurements.append(MEASURE[name](setting))
    info["wall_s"] = round(time.perf_counter() - reporter.started, 1)
    info["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    return measurements, info


def render(measurements: list[Measurement], info: dict[str, Any]) -> str:
    """Tables, then one RESULT line per measurement."""
    lines = [f"eqr bench  {info['date']}  model {info['model']} ({info['task']}, {info['parameters']:,} params)  "
             f"threads {info['config']['threads']}  load {info['load_avg']}  wall {info['wall_s']}s"]
    lines += [f"note: {n}" for n in info["notes"]]
    for m in measurements:
        verdict = {True: "met", False: "MISSED", None: "n/a"}[m.met]
        goal = "" if m.goal is None else f"  goal {m.goal[0]} {m.goal[1]:g}: {verdict}"
        lines += ["", f"## {m.name} = {_fmt(m.value)}{goal}", *_table(m.header, m.rows)]
        if m.note:
            lines.append(f"({m.note})")
    lines.append("")
    lines += [m.result_line() for m in measurements]
    return "\n".join(lines)


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> list[str]:
    cells = [tuple(str(x) for x in header)] + [tuple(str(x) for x in row) for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in cells]
    out.insert(1, "  ".join("-" * w for w in widths))
    return out


# --------------------------------------------------------------------------- the command


@click.command()
@click.option("--model", default=None, help="Bundled model, checkpoint or preset [default: the bundled Sudoku "
              f"model; {FALLBACK_MODEL} (fresh weights) while none is bundled].")
@click.option("--paper", is_flag=True, help=f"reference_vs_runtime only, on {PAPER_MODEL} (hidden 512) with "
              "random weights for a few steps: the per-step cost at paper scale.")
@click.option("--only", "only", multiple=True, type=click.Choice(MEASUREMENTS), help="Run only these (repeatable).")
@click.option("--puzzles", type=int, default=None,
              help="Mixed-difficulty puzzles for reference_vs_runtime [192; paper 4].")
@click.option("--breadth", type=int, default=None, help="K trajectories per puzzle [4; paper 1].")
@click.option("--depth", type=int, default=None,
              help="D: fixed depth of the reference, max steps of the runtime [16; paper 2].")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Working batch in trajectories.")
@click.option("--stream", type=int, default=512, show_default=True, help="Puzzles in the continuous_vs_static stream.")
@click.option("--tol", type=float, default=None, help="Runtime residual tolerance [default: the export's].")
@click.option("--window", type=click.IntRange(min=0), default=4, show_default=True,
              help="Runtime: stop when the answer is unchanged this many steps (0: off).")
@click.option("--patience", type=int, default=2, show_default=True,
              help="Runtime: steps the residual must stay below --tol.")
@click.option("--threads", type=int, default=1, show_default=True,
              help="CPU threads for torch, ONNX Runtime and the GEMM peak.")
@click.option("--precision", "precisions", multiple=True, type=click.Choice(["fp32", "fp16", "int8"]),
              default=("fp32", "fp16", "int8"), show_default=True, help="ONNX Runtime precisions in step_efficiency.")
@click.option("--reference-noise", type=float, default=None,
              help="Path noise of the reference [default: the model's sigma, as the official evaluation].")
@click.option("--export-dir", type=click.Path(exists=True, file_okay=False),
              help="An `eqr export` directory of the same model to reuse (skips exporting).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--check-goals", is_flag=True, help="Exit 1 when a measured goal is missed.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables and RESULT lines.")
def bench(model: str | None, paper: bool, only: tuple[str, ...], puzzles: int | None, breadth: int | None,
          depth: int | None, batch_size: int, stream: int, tol: float | None, window: int, patience: int, threads: int,
          precisions: tuple[str, ...], reference_noise: float | None, export_dir: str | None, seed: int,
          check_goals: bool, as_json: bool) -> None:
    """Measure the runtime against the official protocol, side by side, and print ratios.

    Prints a table per measurement, then one `RESULT name=value key=value ...` line each.
    Absolute numbers depend on the machine and its load; the ratios are measured in one run.

    \b
    Examples:
      eqr bench
      eqr bench --only reference_vs_runtime --only adaptive_steps --json
      eqr bench --model my-run/last.pt --breadth 8 --depth 32 --threads 2
      eqr bench --paper
      python scripts/bench.py --only step_efficiency
    """
    if paper and model is not None:
        raise EqRError(f"--paper runs {PAPER_MODEL}; drop --model (or drop --paper to bench {model})")
    config = BenchConfig(
        model=PAPER_MODEL if paper else (model or default_model()),
        puzzles=_given(puzzles, 4 if paper else 192), breadth=_given(breadth, 1 if paper else 4),
        depth=_given(depth, 2 if paper else 16),
        batch_size=min(batch_size, 4) if paper else batch_size, stream=stream, tol=tol, patience=patience,
        window=window or None, threads=threads, seed=seed, reference_noise=reference_noise,
        measurements=("reference_vs_runtime",) if paper else (tuple(dict.fromkeys(only)) or MEASUREMENTS),
        precisions=("fp32",) if paper else tuple(dict.fromkeys(("fp32", *precisions))), export_dir=export_dir,
        paper=paper)
    measurements, info = run_bench(config, Reporter())
    if as_json:
        payload = {"run": info, "measurements": [m.to_dict() for m in measurements]}
        click.echo(json.dumps(payload, indent=2, default=str))
    else:
        click.echo(render(measurements, info))
    if check_goals and any(m.met is False for m in measurements):
        sys.exit(1)


def _given(value: int | None, default: int) -> int:
    return default if value is None else value
