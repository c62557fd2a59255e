"""Task inputs and latent trajectories for the export checks and the INT8 calibration run.

The checks feed the step what it sees in deployment: puzzles of the model's task (generated
by `eqr.tasks`: Sudoku grids with blanks, mazes with a start and a goal) and latent states recorded along noise-free
FP32 trajectories from random initial states, at every depth (docs/formats.md#precision-graphs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from eqr.contract.errors import EqRError
from eqr.model.network import EqRModel, LatentState

SUDOKU_TOKENS = {"pad": 0, "blank": 1, "digit_offset": 1}  # token = digit + 1, digits 1..size
MAZE_TOKENS = {"pad": 0, "wall": 1, "open": 2, "start": 3, "goal": 4, "path": 5}  # "# SGo" -> 1..5


@dataclass(frozen=True)
class TaskInfo:
    """The task a model solves, as far as the export can tell (manifest "task")."""

    name: str | None  # "sudoku", "maze" or None (unknown: uniform random tokens are used)
    size: int | None  # Sudoku side (9) or maze side (30)
    token_ids: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "token_ids": dict(self.token_ids)}


def infer_task(model: EqRModel) -> TaskInfo:
    """The checkpoint's recorded task, else Sudoku (V 11, L 81) or maze (V 6, square L), else unknown."""
    from eqr.tasks import get_task

    config = model.config
    recorded = (model.metadata or {}).get("task") or {}
    candidates = []
    if recorded.get("name") in ("sudoku", "maze") and recorded.get("size"):
        candidates.append((recorded["name"], int(recorded["size"])))
    side = math.isqrt(config.seq_len)
    if config.vocab_size == 11 and config.seq_len == 81:
        candidates.append(("sudoku", 9))
    if config.vocab_size == 6 and side * side == config.seq_len:
        candidates.append(("maze", side))
    for name, size in candidates:
        try:
            task = get_task(name, size)
        except EqRError:
            continue
        if (task.seq_len, task.vocab_size) == (config.seq_len, config.vocab_size):
            return TaskInfo(name, size, SUDOKU_TOKENS if name == "sudoku" else MAZE_TOKENS)
    return TaskInfo(None, None, {})


def task_inputs(task: TaskInfo, model: EqRModel, n: int, seed: int) -> torch.Tensor:
    """[n, L] int32 puzzles of the model's task (eqr.tasks); uniform non-PAD tokens when unknown."""
    from eqr.tasks import get_task

    if task.name is not None:
        puzzles = get_task(task.name, task.size).generate(n, seed=seed)
        return torch.from_numpy(puzzles.inputs.astype("int32"))
    config = model.config
    low = 1 if config.vocab_size > 1 else 0
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, config.vocab_size, (n, config.seq_len), generator=g, dtype=torch.int32)


# --------------------------------------------------------------------------- trajectories


@dataclass(frozen=True)
class Trajectory:
    """Noise-free FP32 states along `steps` outer steps from random initial states.

    tokens  int32 [B, L]
    z_H     float32 [N+1, B, L, D]  z_H[0] is the initial state, z_H[k] the state after k steps
    z_L     float32 [N+1, B, L, D]
    preds   int32 [B, L]            argmax answer after N steps
    """

    tokens: torch.Tensor
    z_H: torch.Tensor
    z_L: torch.Tensor
    preds: torch.Tensor

    @property
    def steps(self) -> int:
        return self.z_H.shape[0] - 1


def initial_states(model: EqRModel, batch: int, g: torch.Generator) -> LatentState:
    state = model.initial_state(batch, generator=g)
    return LatentState(state.z_H.float(), state.z_L.float())
