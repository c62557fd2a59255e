"""The puzzles calibration and reports run on: a data set (--data) or the model's task (--generate N)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from eqr.contract.errors import EqRError
from eqr.contract.io import puzzle_key, read_npz


@dataclass(frozen=True)
class PuzzleSet:
    """inputs uint8 [P, L]; labels uint8 [P, L] (None when unknown: no accuracy, only agreement)."""

    inputs: np.ndarray
    labels: np.ndarray | None
    source: dict[str, Any]  # how the puzzles were made, for provenance

    def __len__(self) -> int:
        return len(self.inputs)


def load_puzzles(task: dict[str, Any] | None, seq_len: int, data: str | None, generate: int, seed: int) -> PuzzleSet:
    """`data` (a data set directory from `eqr data generate`, or an .npz with inputs/labels), else
    `generate` puzzles of the export's task with `seed`."""
    puzzles = _read_data(data) if data else _generate(task, generate, seed)
    if puzzles.inputs.ndim != 2 or puzzles.inputs.shape[1] != seq_len:
        where = data or "generated puzzles"
        raise EqRError(f"{where}: puzzles have shape {list(puzzles.inputs.shape)}, this model takes [P, {seq_len}]; "
                       "pass data of the model's task")
    if data and generate and generate < len(puzzles):
        return PuzzleSet(puzzles.inputs[:generate],
                         None if puzzles.labels is None else puzzles.labels[:generate],
                         puzzles.source | {"first": generate})
    return puzzles


def _generate(task: dict[str, Any] | None, n: int, seed: int) -> PuzzleSet:
    from eqr.tasks import TASKS, get_task

    name, size = (task or {}).get("name"), (task or {}).get("size")
    if name not in TASKS:
        raise EqRError(f"the export does not name a known task (manifest task: {task!r}); pass puzzles "
                       "with --data FILE (report) or --calib-data FILE (calibrate)")
    generated = get_task(name, size).generate(n, seed=seed)
    return PuzzleSet(generated.inputs, generated.labels, {"generated": {"task": name, "size": size, "n": n,
                                                                        "seed": seed}})


def _read_data(data: str) -> PuzzleSet:
    path = Path(data)
    if path.is_dir():
        from eqr.tasks.dataset import load_dataset

        dataset = load_dataset(path, "test")
        return PuzzleSet(dataset.inputs, dataset.labels, {"data": str(dataset.path)})
    if path.suffix == ".npz" and path.is_file():
        arrays = read_npz(path, data)
        key = puzzle_key(arrays)
        if key is None:
            raise EqRError(f"{data}: has {sorted(arrays)}; needs 'inputs' [P, L] (and 'labels' for accuracy)")
        inputs, labels = arrays[key], arrays.get("labels")
        if labels is not None and labels.shape != inputs.shape:
            raise EqRError(f"{data}: labels {list(labels.shape)} and inputs {list(inputs.shape)} differ")
        if inputs.ndim != 2 or inputs.dtype.kind not in "iu" or (inputs.size and inputs.min() < 0):
            raise EqRError(f"{data}: '{key}' must be non-negative integer token ids [P, L]")
        return PuzzleSet(inputs.astype(np.uint8), None if labels is None else labels.astype(np.uint8),
                         {"data": str(path)})
    if not path.exists():
        raise EqRError(f"{data}: no such file or directory")
    raise EqRError(f"{data}: not a data set directory (from `eqr data generate`) or an .npz file")
