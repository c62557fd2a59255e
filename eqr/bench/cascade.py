"""cascade_vs_fp32: puzzles/s of a precision cascade (int8+fp32: cheap steps to the floor, FP32
steps to land) over FP32 alone, both under FP32's stopping rule, at equal accuracy."""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from eqr.bench.result import Measurement
from eqr.bench.setting import Setting, exact_correct, puzzle_set, rule_text, solver_for
from eqr.bench.side_by_side import rounds


def cascade_vs_fp32(setting: Setting) -> Measurement:
    c = setting.config
    puzzles = puzzle_set(setting)
    low = c.cascade.split("+")[0]
    if low not in c.precisions:
        return Measurement("cascade_vs_fp32", float("nan"), {"cascade": c.cascade}, ("run", "puzzles/s"), [],
                           f"{low} was not exported (--precision {low}); nothing to cascade")
    solvers = {name: solver_for(setting, name) for name in ("fp32", c.cascade)}
    cfg = {name: solver.config() for name, solver in solvers.items()}
    for name, solver in solvers.items():  # warm-up, untimed
        solver.run(puzzles.inputs[:4], cfg[name].replace(max_steps=2), 1, "converged", c.seed)
    setting.report.stage(f"cascade_vs_fp32: {c.cascade} vs fp32, gated ({rule_text(cfg['fp32'])}), "
                         f"{len(puzzles.inputs)} puzzles in {len(rounds(setting))} alternating rounds")
    seconds = dict.fromkeys(solvers, 0.0)
    preds: dict[str, list[np.ndarray]] = {name: [] for name in solvers}
    stats: dict[str, list[Any]] = {name: [] for name in solvers}
    for r, index in enumerate(rounds(setting)):  # alternate so load drift hits both
        for name, solver in solvers.items():
            started = time.perf_counter()
            result = solver.run(puzzles.inputs[index], cfg[name], 1, "converged", c.seed + r)
            seconds[name] += time.perf_counter() - started
            preds[name].append(result.preds)
            stats[name].append(result.stats)
    for solver in solvers.values():
        solver.close()
    P = len(puzzles.inputs)
    acc = {name: float(exact_correct(np.concatenate(p), puzzles.labels).mean()) for name, p in preds.items()}
    rate = {name: P / s for name, s in seconds.items()}
    steps = {name: float(np.mean(np.concatenate([s.nstep for s in st]))) for name, st in stats.items()}
    low_steps = float(np.mean(np.concatenate([s.low_steps for s in stats[c.cascade]])))
    ratio = rate[c.cascade] / rate["fp32"]
    equal = acc[c.cascade] >= acc["fp32"] - 1.0 / P - 1e-12  # within one puzzle
    rows = [(name, f"{rate[name]:.2f}", f"{acc[name]:.3f}", f"{steps[name]:.2f}",
             f"{low_steps:.2f}" if name == c.cascade else "") for name in solvers]
    note = (f"both under FP32's stopping rule ({rule_text(cfg['fp32'])}); the cascade leaves {low} when that "
            f"rule fires, its residual makes no new low for {cfg[c.cascade].cascade_patience} steps or falls below "
            f"{cfg[c.cascade].cascade_tol:g}, and FP32's rule then stops it afresh; equal accuracy = within one puzzle")
    if not equal:
        note += f"; the cascade's accuracy {acc[c.cascade]:.3f} is below FP32's {acc['fp32']:.3f}: no ratio"
    return Measurement("cascade_vs_fp32", ratio if equal else float("nan"),
                       {"ratio_any_accuracy": ratio, "cascade": c.cascade, "cascade_puzzles_per_s": rate[c.cascade],
                        "fp32_puzzles_per_s": rate["fp32"], "cascade_accuracy": acc[c.cascade],
                        "fp32_accuracy": acc["fp32"], "cascade_mean_steps": steps[c.cascade],
                        "cascade_low_steps": low_steps, "fp32_mean_steps": steps["fp32"]},
                       ("run", "puzzles/s", "exact acc", "mean steps", f"{low} steps"), rows, note)
