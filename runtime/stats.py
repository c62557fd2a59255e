"""`SolveStats`: what one solve reports about every trajectory (TorchDEQ `SolverStat` style).

Shapes: B trajectories (rows, in the caller's order), N = the longest trajectory's steps,
T = steps the loop ran (one entry per batched backend call).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# Why a trajectory stopped. Codes index this tuple; `converged` means one of CONVERGED_REASONS.
# "failed": the backend's step raised (twice) while the row was in the working batch (a server
# with a fault handler keeps going; see `run_loop`). "not_launched": progressive breadth never ran
# the trajectory (its puzzle agreed first, docs/algorithm.md#progressive-breadth): 0 steps, no vote.
STOP_REASONS = ("max_steps", "fixed_depth", "tol", "stable", "q_halt", "agree", "diverged", "cancelled", "failed",
                "not_launched")
CONVERGED_REASONS = ("tol", "stable", "q_halt")
REASON_CODE = {name: code for code, name in enumerate(STOP_REASONS)}


@dataclass(frozen=True)
class SolveStats:
    """Per-trajectory results of `solve`; reports read nothing else.

    nstep        int32 (B,)    outer steps taken (the returned iterate is the one after the last step)
    reason       int8  (B,)    index into STOP_REASONS
    residual     fp32  (B,)    final relative state residual ||z_out - z_in|| / ||z_in||
    logit_delta  fp32  (B,)    final mean-over-positions ||logits_out - logits_in||_2
    score        fp32  (B,)    mean logit_delta over the last `score_window` steps (lower = more converged)
    q_halt       fp32  (B,)    final q_halt logit
    residual_trace     fp32 (B, N) or None   per-step residual, NaN after a row stopped (stats="trace")
    logit_delta_trace  fp32 (B, N) or None   per-step logit_delta, same layout
    batch_size   int32 (T,)    active rows in each batched step (shrinks with compaction)
    step_time    fp64  (T,)    seconds of each batched backend step (as timed by the backend)
    low_steps    int32 (B,) or None   steps in a precision cascade's low-precision stage (None: no cascade)
    """

    nstep: np.ndarray
    reason: np.ndarray
    residual: np.ndarray
    logit_delta: np.ndarray
    score: np.ndarray
    q_halt: np.ndarray
    residual_trace: np.ndarray | None
    logit_delta_trace: np.ndarray | None
    batch_size: np.ndarray
    step_time: np.ndarray
    low_steps: np.ndarray | None = None

    @property
    def converged(self) -> np.ndarray:
        """bool (B,): stopped by the residual, stable predictions or q_halt."""
        return np.isin(self.reason, [REASON_CODE[r] for r in CONVERGED_REASONS])

    @property
    def diverged(self) -> np.ndarray:
        """bool (B,): the state went non-finite (NaN/Inf); the row's preds are its last finite ones."""
        return self.reason == REASON_CODE["diverged"]

    @property
    def launched(self) -> np.ndarray:
        """bool (B,): the trajectory ran (False: progressive breadth never launched it)."""
        return self.reason != REASON_CODE["not_launched"]

    @property
    def voters(self) -> np.ndarray:
        """bool (B,): launched and not diverged, the trajectories whose answers count (aggregation, votes)."""
        return self.launched & ~self.diverged

    @property
    def total_steps(self) -> int:
        return int(self.nstep.sum())

    def reasons(self) -> list[str]:
        return [STOP_REASONS[code] for code in self.reason]

    def summary(self) -> dict[str, Any]:
        """JSON-able totals for reports and `--json` output."""
        counts = np.bincount(self.reason, minlength=len(STOP_REASONS))
        return {
            "trajectories": int(self.nstep.size),
            "total_steps": self.total_steps,
            "mean_steps": float(self.nstep[self.launched].mean()) if self.launched.any() else 0.0,
            "converged": int(self.converged.sum()),
            "diverged": int(self.diverged.sum()),
            "stop_reasons": {name: int(n) for name, n in zip(STOP_REASONS, counts) if n},
            "batched_steps": int(self.batch_size.size),
            "row_steps": int(self.batch_size.sum()),
            "step_time_s": float(self.step_time.sum()),
        } | ({} if self.low_steps is None else {"low_precision_steps": int(self.low_steps.sum())})
