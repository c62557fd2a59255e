"""`SolveConfig`: every knob of the inference loop, in one frozen dataclass (saved as JSON).

The loop (`eqr.runtime.loop`) reads nothing else. Each field maps 1:1 to an `eqr solve` flag.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from eqr.contract.config import JsonConfig
from eqr.contract.errors import EqRError

STATS_LEVELS = ("none", "final", "trace")


@dataclass(frozen=True)
class SolveConfig(JsonConfig):
    """How long each trajectory runs and when it stops (per sample, never per batch)."""

    max_steps: int = 256  # outer-step cap per trajectory
    tol: float | None = None  # relative-residual tolerance; None disables residual gating
    patience: int = 2  # residual must stay below tol this many consecutive steps
    window: int | None = 16  # stop when preds are unchanged for this many steps; None disables
    q_halt: bool = False  # also stop when the q_halt logit stays > q_halt_threshold for `patience` steps
    q_halt_threshold: float = 0.0  # the q_halt logit above which a step counts as "halt"
    fixed_depth: int | None = None  # the paper's protocol: exactly D steps, no gating at all
    # stop a puzzle once this many of its trajectories converged to one answer; its trajectories
    # launch in waves until then (progressive breadth, docs/algorithm.md#progressive-breadth)
    agree: int | None = None
    # steps averaged in the `converged` score (mean logit_delta, docs/algorithm.md#breadth-and-aggregation)
    score_window: int = 3
    stats: str = "final"  # "trace" adds (B, N) residual/logit_delta traces; "none"/"final": O(B) finals only
    compaction: bool = True  # drop settled rows from the batch (dynamic-shape backends only)
    # Precision cascade (a backend with two stages, e.g. int8+fp32): a row leaves the low-precision
    # stage once its residual has made no new low for cascade_patience steps (its floor), or is below
    # cascade_tol; the stopping rules above apply only to the high-precision stage.
    cascade_patience: int = 2
    cascade_tol: float | None = None
    # Path noise: sigma * N(0, 1) added at every damped update (the official evaluation's 0.01); 0:
    # the noise-free step. Needs the noisy step graph (eqr export --noisy); draws: runtime/path_noise.py.
    noise: float = 0.0

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise EqRError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.tol is not None and not self.tol > 0:
            raise EqRError(f"tol must be > 0, got {self.tol}")
        if self.patience < 1 or self.score_window < 1 or self.cascade_patience < 1:
            raise EqRError("patience, score_window and cascade_patience must be >= 1")
        if self.cascade_tol is not None and not self.cascade_tol > 0:
            raise EqRError(f"cascade_tol must be > 0, got {self.cascade_tol}")
        if self.window is not None and self.window < 1:
            raise EqRError(f"window must be >= 1 (or None to disable), got {self.window}")
        if self.fixed_depth is not None and self.fixed_depth < 1:
            raise EqRError(f"fixed_depth must be >= 1, got {self.fixed_depth}")
        if self.agree is not None and self.agree < 1:
            raise EqRError(f"agree must be >= 1, got {self.agree}")
        if not 0 <= self.noise < float("inf"):
            raise EqRError(f"noise must be >= 0 (sigma of the path noise; 0: none), got {self.noise}")
        if self.stats not in STATS_LEVELS:
            raise EqRError(f"stats must be one of {', '.join(STATS_LEVELS)}, got {self.stats!r}")

    @property
    def step_cap(self) -> int:
        """Steps a trajectory may take: exactly `fixed_depth` when set, else `max_steps`."""
        return self.fixed_depth if self.fixed_depth is not None else self.max_steps

    @property
    def gated(self) -> bool:
        return self.fixed_depth is None

    @property
    def agreeing(self) -> int | None:
        """`agree` where the loop applies it (gated runs; a fixed depth runs every trajectory)."""
        return self.agree if self.gated else None

    def replace(self, **changes: Any) -> "SolveConfig":
        return dataclasses.replace(self, **changes)
