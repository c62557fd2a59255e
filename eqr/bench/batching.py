"""continuous_vs_static: the `Scheduler` (continuous batching) against static batches of the same
size on a shuffled mixed-difficulty stream, with the bound the stream allows."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from eqr.bench.config import BenchConfig
from eqr.bench.result import Measurement
from eqr.bench.setting import Setting, exact_correct, mixed_puzzles, rule_text, solver_for


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
    solver = solver_for(setting, batch_size=c.batch_size)
    cfg = solver.config()
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
                       f"gated ({rule_text(cfg)}); static: fixed batches padded with settled rows until the last finishes; "
                       "static_compacted: the same batches with settled rows dropped; continuous batching can "
                       f"gain at most row-steps run / row-steps needed = {static.row_steps}/{static.needed_steps} "
                       f"= {bound:.2f}x over static", bound=bound)


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
