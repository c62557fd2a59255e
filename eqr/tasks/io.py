"""Reading puzzle files for `eqr solve`: one puzzle per line, CSV, or an HRM/EqR data set.

`read_puzzles` never stops at a bad line: each entry is (line number, tokens) or (line number,
error message), so a caller reports the bad lines and still solves the others.

  text  one puzzle per line in the task's text format (see `eqr.tasks.sudoku` / `.maze`);
        empty lines, and for Sudoku '#' comments, are skipped. Numbers are 1-based lines.
  csv   `puzzle,solution[,...]`, Sudoku-Extreme style. A first row that names a known column, or
        has no field at least half a puzzle long, is a header; columns named puzzle/question/quizzes/q and solution/answer/
        solutions/a are used wherever they are. Otherwise the first field of the first data row
        that is puzzle-long is the puzzle column and the next such field the solution column
        (so `source,question,answer,rating` rows work with or without their header). Extra
        columns are ignored; lines are 1-based.
  hrm   a data set directory (root or split; split "test" if the root has several): every row,
        numbered by its 0-based row index as `eqr data check` reports it.
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import IO, Iterator, Union

import numpy as np

from eqr.contract.errors import EqRError
from eqr.tasks import Task, get_task

FORMATS = ("text", "csv", "hrm")
PUZZLE_COLUMNS = ("puzzle", "puzzles", "question", "questions", "quiz", "quizzes", "q", "input", "inputs")
SOLUTION_COLUMNS = ("solution", "solutions", "answer", "answers", "a", "label", "labels")

Source = Union[str, "os.PathLike[str]", IO[str]]
Entry = tuple[int, Union[np.ndarray, str]]  # (line, tokens uint8 [L] or error message)
LabelledEntry = tuple[int, Union[np.ndarray, str], Union[np.ndarray, None]]  # + solution tokens or None


def read_puzzles(source: Source, format: str = "text", task: Task | None = None,
                 with_solutions: bool = False) -> list[Entry] | list[LabelledEntry]:
    """Every puzzle of `source` (a path or an open text stream) as (line, tokens or error).

    task: how to parse a puzzle (default: 9x9 Sudoku). with_solutions: entries become
    (line, tokens or error, solution tokens or None); a malformed solution makes the entry an error.
    """
    if format not in FORMATS:
        raise EqRError(f"unknown puzzle format {format!r}; choose one of: {', '.join(FORMATS)}")
    task = task or get_task("sudoku", 9)
    if format == "hrm":
        entries = _read_hrm(source, task)
    else:
        with _open_text(source) as stream:
            entries = list(_read_text(stream, task) if format == "text" else _read_csv(stream, task))
    if with_solutions:
        return entries
    return [(line, tokens) for line, tokens, _ in entries]


class _open_text:
    """A context manager yielding a text stream: opens a path (BOM-tolerant), passes streams through."""

    def __init__(self, source: Source):
        self.source, self.opened = source, None

    def __enter__(self) -> IO[str]:
        if isinstance(self.source, (str, os.PathLike)):
            try:
                self.opened = open(self.source, encoding="utf-8-sig", newline="")
            except OSError as e:
                raise EqRError(f"cannot read {self.source}: {e.strerror}") from None
            return self.opened
        return self.source  # type: ignore[return-value]

    def __exit__(self, *exc: object) -> None:
        if self.opened is not None:
            self.opened.close()


def _skip_text_line(line: str, task: Task) -> bool:
    if task.name == "maze":
        return not line.strip()
    return not line.split("#", 1)[0].strip()


def _read_text(stream: IO[str], task: Task) -> Iterator[LabelledEntry]:
    kept = [(number, line) for number, line in enumerate(_lines(stream), start=1) if not _skip_text_line(line, task)]
    for (number, _), parsed in zip(kept, task.parse_each(line for _, line in kept)):
        yield number, parsed, None


def _lines(stream: IO[str]) -> Iterator[str]:
    """Lines split on \\n, \\r\\n or \\r whatever newline mode the stream was opened with."""
    text = stream.read()
    if text.startswith("\ufeff"):
        text = text[1:]
    return iter(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"))


def _looks_like_puzzle(field: str, task: Task) -> bool:
    """Long enough to be a puzzle, well-formed or not (header names and ids are short)."""
    return len(field.strip()) >= task.seq_len // 2


def _read_csv(stream: IO[str], task: Task) -> Iterator[LabelledEntry]:
    text = "\n".join(_lines(stream))
    reader = csv.reader(io.StringIO(text))
    puzzle_col: int | None = None
    solution_col: int | None = None
    first = True
    for row in reader:
        number = reader.line_num
        if not any(field.strip() for field in row):
            continue
        if first:
            first = False
            names = [field.strip().lower() for field in row]
            named = any(name in PUZZLE_COLUMNS or name in SOLUTION_COLUMNS for name in names)
            if named or not any(_looks_like_puzzle(field, task) for field in row):  # a header
                puzzle_col = next((names.index(n) for n in PUZZLE_COLUMNS if n in names), None)
                solution_col = next((names.index(n) for n in SOLUTION_COLUMNS if n in names), None)
                continue
        if puzzle_col is None:
            columns = [i for i, field in enumerate(row) if _looks_like_puzzle(field, task)]
            if not columns:
                yield number, f"no field is a {task.size}x{task.size} {task.name} puzzle ({len(row)} fields)", None
                continue
            puzzle_col = columns[0]
            if solution_col is None:
                solution_col = columns[1] if len(columns) > 1 else None
        yield _csv_entry(row, number, puzzle_col, solution_col, task)


def _csv_entry(row: list[str], number: int, puzzle_col: int, solution_col: int | None,
               task: Task) -> LabelledEntry:
    if puzzle_col >= len(row):
        return number, f"has {len(row)} fields, the puzzle is field {puzzle_col + 1}", None
    try:
        puzzle = task.parse_line(row[puzzle_col])
    except EqRError as e:
        return number, f"field {puzzle_col + 1}: {e}", None
    solution = None
    if solution_col is not None and solution_col < len(row) and row[solution_col].strip():
        try:
            solution = task.parse_line(row[solution_col])
        except EqRError as e:
            return number, f"solution (field {solution_col + 1}): {e}", None
    return number, puzzle, solution


def _read_hrm(source: Source, task: Task) -> list[LabelledEntry]:
    from eqr.tasks.dataset import load_dataset

    if not isinstance(source, (str, os.PathLike)):
        raise EqRError("the hrm format needs a data set directory path, not a stream")
    data = load_dataset(Path(source), split="test")
    if data.inputs.shape[1] != task.seq_len:
        raise EqRError(f"{data.path} holds {data.inputs.shape[1]}-token rows; {task!r} needs {task.seq_len}")
    return [(index, data.inputs[index], data.labels[index]) for index in range(len(data))]


__all__ = ["FORMATS", "read_puzzles"]
