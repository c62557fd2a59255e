"""The HRM/EqR data set directory (docs/formats.md#hrm): write, read, check.

    <root>/identifiers.json                      ["<blank>"]
    <root>/<split>/dataset.json                  metadata (+ "eqr_task": which task made it)
    <root>/<split>/all__inputs.npy               uint8 [N, L]
    <root>/<split>/all__labels.npy               uint8 [N, L]
    <root>/<split>/all__puzzle_identifiers.npy   int32 [N], all 0
    <root>/<split>/all__puzzle_indices.npy       int32 [N + 1], 0..N (one example per puzzle)
    <root>/<split>/all__group_indices.npy        int32 [G + 1], puzzle offsets of each group

Official directories (no "eqr_task") are read too: the task is inferred from vocab and seq_len.
Every file is written atomically and dataset.json last, so a split without it is incomplete.
"""
from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from eqr.contract.errors import EqRError
from eqr.contract.io import atomic_open, atomic_write_text
from eqr.tasks import TASKS, Task, get_task
from eqr.tasks.base import ProgressFn, Puzzles

SET_NAME = "all"
ARRAYS = ("inputs", "labels", "puzzle_identifiers", "puzzle_indices", "group_indices")
CHECK_CHUNK = 4096  # rows per progress update in check_split


@dataclass(frozen=True)
class Dataset:
    """One split. inputs, labels uint8 [N, L]; group_indices int32 [G + 1]."""

    inputs: np.ndarray
    labels: np.ndarray
    metadata: dict[str, Any]
    task: Task | None
    group_indices: np.ndarray
    path: Path

    def __len__(self) -> int:
        return len(self.inputs)


def _array_path(split_dir: Path, name: str) -> Path:
    return split_dir / f"{SET_NAME}__{name}.npy"


def save_dataset(root: str | Path, split: str, inputs: np.ndarray, labels: np.ndarray, task: Task | None = None,
                 groups: np.ndarray | None = None, generate_args: dict[str, Any] | None = None,
                 overwrite: bool = False) -> Path:
    """Write one split under `root`; returns the split directory.

    groups: group offsets int [G + 1] into the rows (an original puzzle and its augmentations
    form one group); None puts every row in its own group. generate_args: how the rows were
    made, recorded under "eqr_task". Refuses to replace an existing split unless `overwrite`.
    """
    inputs, labels = np.asarray(inputs), np.asarray(labels)
    if inputs.ndim != 2 or inputs.shape != labels.shape:
        raise EqRError(f"inputs and labels must both be [N, L], got {list(inputs.shape)} and {list(labels.shape)}")
    rows, seq_len = inputs.shape
    if task is not None and seq_len != task.seq_len:
        raise EqRError(f"rows have {seq_len} tokens but {task!r} has seq_len {task.seq_len}")
    vocab_size = task.vocab_size if task is not None else int(max(inputs.max(initial=0), labels.max(initial=0))) + 1
    for what, array in (("inputs", inputs), ("labels", labels)):
        if array.size and (array.min() < 0 or array.max() >= vocab_size):
            raise EqRError(f"{what} hold tokens outside 0..{vocab_size - 1}")
    group_indices = _check_groups(groups, rows)

    root = Path(root)
    split_dir = root / split
    if (split_dir / "dataset.json").exists() and not overwrite:
        raise EqRError(f"{split_dir} already holds a data set; pass --force (overwrite=True) to replace it")
    split_dir.mkdir(parents=True, exist_ok=True)
    arrays = {
        "inputs": inputs.astype(np.uint8),
        "labels": labels.astype(np.uint8),
        "puzzle_identifiers": np.zeros(rows, dtype=np.int32),
        "puzzle_indices": np.arange(rows + 1, dtype=np.int32),
        "group_indices": group_indices,
    }
    for name, array in arrays.items():
        with atomic_open(_array_path(split_dir, name)) as f:
            np.save(f, array, allow_pickle=False)
    metadata: dict[str, Any] = {
        "pad_id": 0, "ignore_label_id": 0, "blank_identifier_id": 0,
        "vocab_size": vocab_size, "seq_len": seq_len, "num_puzzle_identifiers": 1,
        "total_groups": len(group_indices) - 1, "mean_puzzle_examples": 1, "total_samples": rows,
        "sets": [SET_NAME],
    }
    if task is not None:
        metadata["eqr_task"] = task.describe() | {"generate_args": generate_args or {}}
    if not (root / "identifiers.json").exists():
        atomic_write_text(root / "identifiers.json", json.dumps(["<blank>"]))
    atomic_write_text(split_dir / "dataset.json", json.dumps(metadata, indent=2))
    return split_dir


def _check_groups(groups: np.ndarray | None, rows: int) -> np.ndarray:
    if groups is None:
        return np.arange(rows + 1, dtype=np.int32)
    offsets = np.asarray(groups, dtype=np.int64)
    if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != rows or (np.diff(offsets) <= 0).any():
        raise EqRError(f"groups must be increasing offsets from 0 to {rows} (int [G + 1])")
    return offsets.astype(np.int32)


def split_dirs(path: str | Path) -> list[Path]:
    """The split directories at `path`: itself if it holds dataset.json, else its children that do."""
    path = Path(path)
    if not path.is_dir():
        raise EqRError(f"{path} is not a directory; expected a data set root or split directory")
    if (path / "dataset.json").exists():
        return [path]
    found = sorted(child for child in path.iterdir() if (child / "dataset.json").is_file())
    if not found:
        raise EqRError(f"{path} has no dataset.json in it or in any sub-directory; is it an HRM/EqR data set?")
    return found


def resolve_split(root: str | Path, split: str) -> Path:
    root = Path(root)
    if (root / split / "dataset.json").is_file():
        return root / split
    if (root / "dataset.json").is_file():
        return root
    raise EqRError(f"no split {split!r} at {root} (expected {root / split / 'dataset.json'})")


def read_metadata(split_dir: Path) -> dict[str, Any]:
    path = split_dir / "dataset.json"
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EqRError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EqRError(f"{path} is not valid JSON ({e}); regenerate the split") from None
    if not isinstance(metadata, dict):
        raise EqRError(f"{path} must hold a JSON object")
    return metadata


def task_from_metadata(metadata: dict[str, Any]) -> Task | None:
    """The task recorded in "eqr_task", or inferred from vocab/seq_len of official data sets."""
    recorded = metadata.get("eqr_task")
    if isinstance(recorded, dict) and recorded.get("name") in TASKS:
        return get_task(recorded["name"], recorded.get("size"))
    vocab, seq_len = metadata.get("vocab_size"), metadata.get("seq_len")
    if not isinstance(vocab, int) or not isinstance(seq_len, int):
        return None
    side = int(round(seq_len ** 0.5))
    if side * side != seq_len:
        return None
    candidates = [("sudoku", side)] if vocab == side + 2 else []
    candidates += [("maze", side)] if vocab == 6 else []
    for name, size in candidates:
        try:
            return get_task(name, size)
        except EqRError:
            continue
    return None


def _load_array(split_dir: Path, name: str) -> np.ndarray:
    path = _array_path(split_dir, name)
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise EqRError(f"{path} is missing") from None
    except (ValueError, OSError, EOFError) as e:
        raise EqRError(f"{path} is not a readable .npy array ({e})") from None


def load_dataset(root: str | Path, split: str = "test") -> Dataset:
    """Read one split (`root` may also be the split directory itself)."""
    split_dir = resolve_split(root, split)
    metadata = read_metadata(split_dir)
    inputs, labels = _load_array(split_dir, "inputs"), _load_array(split_dir, "labels")
    if inputs.ndim != 2 or inputs.shape != labels.shape:
        raise EqRError(f"{split_dir}: inputs {list(inputs.shape)} and labels {list(labels.shape)} must both be [N, L]")
    if metadata.get("seq_len", inputs.shape[1]) != inputs.shape[1]:
        raise EqRError(f"{split_dir}: dataset.json says seq_len {metadata['seq_len']}, arrays have {inputs.shape[1]}")
    group_path = _array_path(split_dir, "group_indices")
    groups = _load_array(split_dir, "group_indices") if group_path.exists() else np.arange(len(inputs) + 1)
    return Dataset(inputs=inputs.astype(np.uint8, copy=False), labels=labels.astype(np.uint8, copy=False),
                   metadata=metadata, task=task_from_metadata(metadata), group_indices=groups, path=split_dir)


# --------------------------------------------------------------------------------------------
# Checking


@dataclass
class SplitReport:
    """What `check_split` found. `problems` lists (row index, message); `errors` are file-level."""

    split: str
    path: str
    task: str | None
    rows: int = 0
    errors: list[str] = field(default_factory=list)
    problems: list[tuple[int, str]] = field(default_factory=list)
    tiers: dict[str, int] = field(default_factory=dict)
    duplicate_inputs: int = 0

    @property
    def ok(self) -> bool:
        return not self.errors and not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"split": self.split, "path": self.path, "task": self.task, "rows": self.rows, "ok": self.ok,
                "errors": self.errors, "bad_rows": len(self.problems),
                "problems": [{"row": row, "problem": message} for row, message in self.problems],
                "tiers": self.tiers, "duplicate_inputs": self.duplicate_inputs}


def check_split(split_dir: str | Path, task: Task | None = None, deep: bool = False,
                progress: Callable[[int], None] | None = None) -> SplitReport:
    """Check files, metadata and every row of one split. deep: also grade each puzzle (tier
    counts) and, for Sudoku, require a unique solution. progress(rows) is called as rows finish."""
    split_dir = Path(split_dir)
    report = SplitReport(split=split_dir.name, path=str(split_dir), task=None)
    try:
        data = load_dataset(split_dir)
    except EqRError as e:
        report.errors.append(str(e))
        return report
    task = task or data.task
    report.rows = len(data)
    report.task = repr(task) if task else None
    report.errors += _file_errors(data, task)
    if task is None:
        report.errors.append("cannot tell the task: dataset.json has no eqr_task and vocab_size/seq_len match no task")
        return report
    if report.errors:
        return report
    tiers: dict[str, int] = {}
    for start in range(0, len(data), CHECK_CHUNK):
        chunk = slice(start, start + CHECK_CHUNK)
        inputs, labels = data.inputs[chunk], data.labels[chunk]
        report.problems += [(start + row, message) for row, message in task.problems(inputs, labels)]
        if deep:
            report.problems += [(start + row, message) for row, message in _deep_problems(task, inputs)]
            for tier in task.tier_of(inputs).tolist():
                tiers[tier] = tiers.get(tier, 0) + 1
        if progress:
            progress(len(inputs))
    report.problems.sort()
    report.tiers = tiers
    report.duplicate_inputs = len(data) - len(np.unique(data.inputs, axis=0)) if len(data) else 0
    return report


def _deep_problems(task: Task, inputs: np.ndarray) -> list[tuple[int, str]]:
    counts = getattr(task, "solution_counts", None)
    if counts is None:
        return []  # a perfect maze has one simple path between any two squares
    return [(int(row), "puzzle has no solution" if count == 0 else "puzzle has more than one solution")
            for row, count in enumerate(counts(inputs)) if count != 1]


def _file_errors(data: Dataset, task: Task | None) -> list[str]:
    errors = []
    meta, rows = data.metadata, len(data)
    where = data.path
    if task is not None:
        if data.inputs.shape[1] != task.seq_len:
            errors.append(f"{where}: rows have {data.inputs.shape[1]} tokens, {task!r} needs {task.seq_len}")
        if meta.get("vocab_size") != task.vocab_size:
            errors.append(f"{where}: dataset.json vocab_size {meta.get('vocab_size')} != {task.vocab_size} of {task!r}")
    for key in ("pad_id", "ignore_label_id", "vocab_size", "seq_len", "total_groups", "sets"):
        if key not in meta:
            errors.append(f"{where}/dataset.json lacks {key!r}")
    if "total_samples" in meta and meta["total_samples"] != rows:
        errors.append(f"{where}: dataset.json total_samples {meta['total_samples']} != {rows} rows")
    for name in ("puzzle_identifiers", "puzzle_indices"):
        path = _array_path(where, name)
        if not path.exists():
            errors.append(f"{path} is missing")
            continue
        array = np.load(path, allow_pickle=False)
        expected = rows if name == "puzzle_identifiers" else rows + 1
        if array.shape != (expected,):
            errors.append(f"{path} has shape {list(array.shape)}, expected [{expected}]")
        elif name == "puzzle_indices" and (array[0] != 0 or (np.diff(array) <= 0).any()):
            errors.append(f"{path} must increase from 0 to {rows}")
    groups = data.group_indices
    if groups.ndim != 1 or len(groups) < 1 or groups[0] != 0 or groups[-1] != rows or (np.diff(groups) <= 0).any():
        errors.append(f"{_array_path(where, 'group_indices')} must increase from 0 to {rows}")
    elif "total_groups" in meta and meta["total_groups"] != len(groups) - 1:
        errors.append(f"{where}: dataset.json total_groups {meta['total_groups']} != {len(groups) - 1} groups")
    return errors


__all__ = ["Dataset", "SplitReport", "check_split", "load_dataset", "save_dataset", "split_dirs",
           "task_from_metadata"]


def split_seed(seed: int, split: str) -> int:
    """Distinct puzzle streams per split from one --seed."""
    return int(np.random.SeedSequence([seed, zlib.crc32(split.encode())]).generate_state(1)[0])


def _other_split_inputs(out: Path, split: str, seq_len: int) -> np.ndarray | None:
    """Inputs of the other splits already in `out`, so a new split never repeats their puzzles."""
    found = []
    for child in sorted(out.iterdir()) if out.is_dir() else []:
        if child.name != split and (child / "dataset.json").is_file():
            data = load_dataset(child)
            if data.inputs.shape[1] == seq_len:
                found.append(data.inputs)
    return np.concatenate(found) if found else None


def generate_split(task: Task, count: int, seed: int, out: Path, split: str, tier: str | None = None,
                   augment: int = 0, force: bool = False, advance: ProgressFn | None = None,
                   **options: Any) -> tuple[Puzzles, np.ndarray]:
    """Generate `count` puzzles of `task` into OUT/SPLIT (`eqr data generate`), never repeating a
    puzzle of another split of OUT; `augment` random isomorphs follow each Sudoku puzzle.
    -> (the generated puzzles, the rows written: inputs with their augmentations)."""
    if (out / split / "dataset.json").exists() and not force:
        raise EqRError(f"{out / split} already holds a data set; pass --force to replace it")
    seed_used = split_seed(seed, split)
    exclude = _other_split_inputs(out, split, task.seq_len)
    puzzles = task.generate(count, seed_used, tier, progress=advance, exclude=exclude, **options)
    inputs, labels, groups = puzzles.inputs, puzzles.labels, None
    if augment:
        from eqr.tasks.sudoku import augment_groups

        inputs, labels, groups = augment_groups(inputs, labels, augment, np.random.default_rng([seed_used, 1]))
    args = puzzles.generate_args | {"seed": seed, "split": split, "split_seed": seed_used, "augment": augment}
    save_dataset(out, split, inputs, labels, task=task, groups=groups, generate_args=args, overwrite=force)
    return puzzles, inputs
