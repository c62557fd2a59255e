"""What every measurement shares: the model, its task's puzzles, its export, the stopping rule, a reporter."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from eqr.bench.config import BenchConfig
from eqr.contract.errors import EqRError
from eqr.contract.progress import Progress
from eqr.runtime.stopping_rules import describe_rule, rule_of

log = logging.getLogger(__name__)


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
    export_dir: Path | None  # None: --backend torch on side-by-side measurements only (nothing exported)
    report: Progress  # stage lines and bars on stderr (stdout carries only tables, RESULT lines or JSON)
    rule: dict[str, Any] = field(default_factory=dict)  # the runtime's stopping rule (SolveConfig fields)
    cache: dict[str, Any] = field(default_factory=dict)

    def once(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]


def model_task(model: Any) -> Any:
    """The task a model solves: its checkpoint metadata, its preset's recipe, or inferred from L and V."""
    from eqr.contract.config import PRESETS
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
    """The bench's puzzles: n // 2 of the task's own draw (`generate` without a tier: minimal Sudoku
    puzzles, random mazes), the rest split evenly over its difficulty tiers (a tier that cannot be
    made is skipped); tiers=False: all n of the task's own draw. Ordered: the tiers, then the own draw."""
    names = list(task.tiers) if tiers else []
    own = n // 2 if names else n
    tiered = n - own
    plan = [(tier, tiered // len(names) + (1 if i < tiered % len(names) else 0)) for i, tier in enumerate(names)]
    parts = []
    for i, (tier, count) in enumerate([*plan, (None, own)]):
        if count == 0:
            continue
        try:
            parts.append(task.generate(count, seed=seed + i, tier=tier))
        except EqRError as e:
            log.warning("skipping %s: %s", f"tier {tier}" if tier else "the task's own draw", e)
    if not parts:
        raise EqRError(f"could not generate any {task!r} puzzles; try another --seed")
    return PuzzleSet(np.concatenate([p.inputs for p in parts]).astype(np.int32),
                     np.concatenate([p.labels for p in parts]).astype(np.int32),
                     np.concatenate([p.tiers for p in parts]))


def exact_correct(preds: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """bool (P,): every non-PAD label matched (labels cover the givens too, docs/training.md#losses)."""
    from eqr.tasks import PAD_ID

    return ((preds == labels) | (labels == PAD_ID)).all(axis=1)




def solver_for(setting: Setting, precision: str = "fp32", batch_size: int | None = None) -> Any:
    """An active `Solver` (the bench's --backend) of the export whose default rule is the bench's rule;
    --backend torch runs the bench's own model on --device (the reference's model: one copy)."""
    from eqr.runtime import Solver

    c = setting.config
    if c.backend == "torch":
        solver = Solver.from_model(setting.model, batch_size=batch_size or c.batch_size, device=c.device,
                                   precision=precision)
    else:
        solver = Solver.load(setting.export_dir, backend=c.backend, precision=precision,
                             batch_size=batch_size or c.batch_size, threads=c.threads)
    solver.rule.update(setting.rule)  # a cascade keeps its cascade_tol
    solver.backend.activate()
    return solver


def puzzle_set(setting: Setting) -> PuzzleSet:
    """The shared mixed-difficulty set, shuffled so every round mixes the tiers."""
    c = setting.config

    def make() -> PuzzleSet:
        ordered = mixed_puzzles(setting.task, c.puzzles, c.seed, tiers=not c.paper)
        order = np.random.default_rng(c.seed).permutation(len(ordered.inputs))
        return PuzzleSet(ordered.inputs[order], ordered.labels[order], ordered.tiers[order])

    return setting.once("puzzles", make)


def rule_text(cfg: Any) -> str:
    """The gating of a SolveConfig in a few words."""
    return describe_rule(rule_of(cfg))


def flops(setting: Setting) -> int:
    from eqr.model.network import flops_per_step

    return flops_per_step(setting.model.config)


def best_time(fn: Callable[[], Any], repeats: int, min_seconds: float = 0.0) -> float:
    fn()  # warm-up
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - started < min_seconds:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)
