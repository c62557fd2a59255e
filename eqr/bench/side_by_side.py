"""Measurements on one side-by-side run of the official protocol and the runtime on one puzzle set:
reference_vs_runtime (puzzles/s ratio at equal accuracy), adaptive_steps (gated mean steps over
the smallest fixed depth reaching the gated accuracy) and host_overhead (time outside backend.step).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from eqr.bench.config import MAX_FIXED_DEPTH, PAPER_MODEL, SIDE_BY_SIDE_ROUNDS
from eqr.bench.efficiency import gemm_peaks
from eqr.bench.reference import ReferenceRun, reference_solve
from eqr.bench.result import Measurement
from eqr.bench.setting import Setting, exact_correct, flops, puzzle_set, rule_text, solver_for


@dataclass
class RuntimeRun:
    """The runtime side of reference_vs_runtime, rounds joined. P puzzles, K breadth, L tokens.

    preds    int32 (P, L)  aggregated answers
    steps    int32 (P,)    outer steps per puzzle, summed over its K trajectories
    stats    SolveStats over the P*K trajectories (rounds concatenated)
    seconds  wall time of the solve calls
    rule     the stopping rule it ran, in words
    """

    preds: np.ndarray
    steps: np.ndarray
    stats: Any
    seconds: float
    rule: str = ""


def _side_by_side(setting: Setting) -> tuple[ReferenceRun, RuntimeRun]:
    """Reference and runtime on the same puzzles, alternating in rounds so load drift hits both."""
    return setting.once("side_by_side", lambda: _run_side_by_side(setting))


def rounds(setting: Setting) -> list[np.ndarray]:
    """Slices of the puzzle set; round r's reference and runtime both use seed + r."""
    P = len(puzzle_set(setting).inputs)
    return np.array_split(np.arange(P), min(SIDE_BY_SIDE_ROUNDS, P))


def reference_noise(setting: Setting) -> float:
    c = setting.config
    return setting.model.config.noise_scale if c.reference_noise is None else c.reference_noise


def _run_side_by_side(setting: Setting) -> tuple[ReferenceRun, RuntimeRun]:
    c = setting.config
    puzzles = puzzle_set(setting)
    noise = reference_noise(setting)
    solver = solver_for(setting)
    cfg = solver.config()
    reference_solve(setting.model, puzzles.inputs[:1], 1, 1, 1, c.seed, noise)  # warm-ups, untimed
    solver.run(puzzles.inputs[:1], cfg.replace(fixed_depth=1), 1, "converged", c.seed)
    on = f" on {c.device}" if c.backend == "torch" else ""
    setting.report.stage(f"reference: torch eager{on}, exactly D {c.depth} steps, noise {noise} | runtime: "
                         f"{c.backend}{on} fp32, gated ({rule_text(cfg)}) "
                         f"| {len(puzzles.inputs)} puzzles x K {c.breadth}, batch {c.batch_size}, "
                         f"{SIDE_BY_SIDE_ROUNDS} alternating rounds")
    refs, runs = [], []
    with setting.report.bar("reference + runtime", 2 * len(puzzles.inputs) * c.breadth) as update:
        for r, index in enumerate(rounds(setting)):
            tokens = puzzles.inputs[index]
            refs.append(reference_solve(setting.model, tokens, c.depth, c.breadth, c.batch_size, c.seed + r, noise,
                                        update))
            started = time.perf_counter()
            result = solver.run(tokens, cfg, c.breadth, "converged", c.seed + r, progress=update)
            runs.append(RuntimeRun(result.preds, result.steps, result.stats, time.perf_counter() - started,
                                   rule_text(cfg)))
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
                      sum(p.seconds for p in parts), parts[0].rule)


def reference_vs_runtime(setting: Setting) -> Measurement:
    c = setting.config
    puzzles = puzzle_set(setting)
    ref, rt = _side_by_side(setting)
    P = len(puzzles.inputs)
    ref_acc = float(exact_correct(ref.answers(c.depth, "converged"), puzzles.labels).mean())
    rt_acc = float(exact_correct(rt.preds, puzzles.labels).mean())
    ref_rate, rt_rate = P / ref.seconds, P / rt.seconds
    ref_steps, rt_steps = P * c.breadth * c.depth, rt.stats.total_steps
    ratio = rt_rate / ref_rate
    equal = rt_acc >= ref_acc
    step_flops = flops(setting)
    rows = [("reference (torch eager, fixed D, noise)", f"{ref_rate:.2f}", f"{ref_acc:.3f}", ref_steps,
             f"{1e3 * ref.seconds / ref_steps:.3f}", f"{step_flops * ref_steps / ref.seconds / 1e9:.2f}"),
            (f"runtime ({setting.config.backend}, gated, compaction)", f"{rt_rate:.2f}", f"{rt_acc:.3f}", rt_steps,
             f"{1e3 * rt.seconds / max(rt_steps, 1):.3f}", f"{step_flops * rt_steps / rt.seconds / 1e9:.2f}")]
    note = "" if equal else (f"runtime accuracy {rt_acc:.3f} is below the reference's {ref_acc:.3f}: "
                             "the speed ratio is not at equal accuracy")
    fields: dict[str, Any] = {}
    if c.paper and c.device != "cpu":  # the CPU GEMM peaks say nothing about a GPU's step
        note = (f"{PAPER_MODEL} with random weights on {c.device}: nothing converges, so this is the per-step cost "
                f"at paper scale ({step_flops / 1e9:.2f} GFLOPs per sample-step); the accuracy goal does not apply")
    elif c.paper:
        peak = max(gemm_peaks(c.threads).values())
        fields = {"gemm_peak_gflops": peak / 1e9, "runtime_of_gemm_peak": step_flops * rt_steps / rt.seconds / peak,
                  "reference_of_gemm_peak": step_flops * ref_steps / ref.seconds / peak}
        note = (f"{PAPER_MODEL} with random weights: nothing converges, so this is the per-step cost at paper "
                f"scale ({step_flops / 1e9:.2f} GFLOPs per sample-step; GEMM peak {peak / 1e9:.1f} GFLOP/s); "
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
    puzzles = puzzle_set(setting)
    ref, rt = _side_by_side(setting)
    gated_acc = float(exact_correct(rt.preds, puzzles.labels).mean())
    mean_steps = float(rt.stats.nstep.mean())
    accuracy = lambda run, d: float(exact_correct(run.answers(d, "converged"), puzzles.labels).mean())  # noqa: E731
    curve = [accuracy(ref, d) for d in range(1, c.depth + 1)]
    depth = c.depth
    while max(curve) < gated_acc and depth < MAX_FIXED_DEPTH:
        # No depth so far reaches the gated accuracy: run the official protocol twice as deep (untimed).
        depth = min(2 * depth, MAX_FIXED_DEPTH)
        setting.report.stage(f"adaptive_steps: reference fixed depths {len(curve) + 1}..{depth}")
        deeper = _reference_to(setting, depth)
        curve += [accuracy(deeper, d) for d in range(len(curve) + 1, depth + 1)]
    reached = [d for d, acc in enumerate(curve, start=1) if acc >= gated_acc]
    budget = reached[0] if reached else None
    # Still none (up to MAX_FIXED_DEPTH): mean_steps / that depth is an upper bound.
    value = mean_steps / (budget or len(curve))
    reasons = rt.stats.summary()["stop_reasons"]
    rows = [(d, f"{acc:.3f}", "<- smallest fixed budget at the gated accuracy" if d == budget else "")
            for d, acc in enumerate(curve, start=1) if d <= 16 or d == budget or d % 8 == 0]
    per_trajectory = rt.steps / c.breadth  # (P,) mean over the puzzle's K trajectories
    by_tier = ", ".join(f"{tier} {per_trajectory[puzzles.tiers == tier].mean():.2f}"
                        for tier in dict.fromkeys(puzzles.tiers.tolist()))
    note = (f"gated ({rt.rule}): {mean_steps:.2f} mean steps per trajectory at "
            f"accuracy {gated_acc:.3f} (by tier: {by_tier}; stop reasons {reasons}); fixed depths from the "
            "official-protocol run")
    if budget is None:
        note += f"; no fixed depth <= {len(curve)} reaches the gated accuracy, so the value is an upper bound"
    return Measurement("adaptive_steps", value,
                       {"gated_mean_steps": mean_steps, "fixed_budget": budget if budget else f">{len(curve)}",
                        "gated_accuracy": gated_acc, "fixed_accuracy_at_budget": curve[budget - 1] if budget else "na",
                        "fixed_depths_run": len(curve)},
                       ("fixed depth", "official-protocol acc", ""), rows, note)


def _reference_to(setting: Setting, depth: int) -> ReferenceRun:
    """The official protocol to `depth` on the same rounds and seeds as the timed run."""
    c = setting.config
    puzzles = puzzle_set(setting)
    parts = [reference_solve(setting.model, puzzles.inputs[index], depth, c.breadth, c.batch_size, c.seed + r,
                             reference_noise(setting)) for r, index in enumerate(rounds(setting))]
    return _join_reference(parts)


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
