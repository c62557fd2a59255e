"""Training batches as pure functions of (seed, step): resuming at step t replays exactly.

Two sources share one interface, `batch(step, size, options) -> (inputs, labels)`, both
[B, L] int64 with ignored positions labelled -100:

* `ArraySource`: a fixed data set (docs/training.md#data-and-curricula): each epoch is a
  seeded permutation of the puzzle groups, one random member per group, batches filled in
  order, the short tail dropped.
* `GeneratedSource`: fresh puzzles from an `eqr.tasks` task, seeded by (seed, step), with the
  current curriculum stage's options (e.g. sudoku `blanks`, maze `path_len`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from eqr.contract.errors import EqRError
from eqr.training.losses import IGNORE_LABEL

IGNORE_LABEL_ID = 0  # label id that means "no label" in the HRM/EqR data layout (docs/formats.md#hrm)


class BatchSource(Protocol):
    seq_len: int
    vocab_size: int

    def batch(self, step: int, size: int, options: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]: ...


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """A 63-bit seed unique to (seed, step, stream), stable across runs and platforms."""
    mixed = np.random.SeedSequence([seed, step, stream]).generate_state(2, dtype=np.uint32)
    return int(mixed[0]) << 31 ^ int(mixed[1])


def to_training_labels(labels: np.ndarray | torch.Tensor) -> torch.Tensor:
    labels = torch.as_tensor(np.asarray(labels)).long()
    return torch.where(labels == IGNORE_LABEL_ID, IGNORE_LABEL, labels)


@dataclass
class ArraySource:
    """A fixed data set; `group_indices` [G+1] gives each group's row range (defaults to one row each)."""

    inputs: np.ndarray  # [N, L] uint8
    labels: np.ndarray  # [N, L] uint8
    vocab_size: int
    seed: int
    group_indices: np.ndarray | None = None  # [G+1] int

    def __post_init__(self) -> None:
        if self.group_indices is None:
            self.group_indices = np.arange(len(self.inputs) + 1)
        self.seq_len = int(self.inputs.shape[1])

    @property
    def num_groups(self) -> int:
        return len(self.group_indices) - 1

    def batch(self, step: int, size: int, options: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        per_epoch = self.num_groups // size
        if per_epoch == 0:
            raise EqRError(f"the training set has {self.num_groups} puzzle groups, fewer than the global batch "
                           f"{size}; lower --batch or generate more puzzles")
        epoch, index = divmod(step, per_epoch)
        rng = np.random.Generator(np.random.Philox(step_seed(self.seed, epoch)))
        groups = rng.permutation(self.num_groups)[index * size:(index + 1) * size]  # [B]
        starts, ends = self.group_indices[groups], self.group_indices[groups + 1]
        rows = starts + (rng.random(size) * (ends - starts)).astype(np.int64)  # one member per group
        return torch.as_tensor(self.inputs[rows]).long(), to_training_labels(self.labels[rows])


class GeneratedSource:
    """Fresh seeded puzzles from an `eqr.tasks` task every step (curriculum options per stage)."""

    def __init__(self, task: Any, seed: int) -> None:
        self.task = task
        self.seed = seed
        self.seq_len = int(task.seq_len)
        self.vocab_size = int(task.vocab_size)

    def batch(self, step: int, size: int, options: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
        puzzles = self.task.generate(size, seed=step_seed(self.seed, step), **kwargs)
        return torch.as_tensor(np.asarray(puzzles.inputs)).long(), to_training_labels(puzzles.labels)
