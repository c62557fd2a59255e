"""Puzzle tasks: Sudoku (4x4, 6x6, 9x9) and Maze-Unique (9..30), their data sets and text I/O.

    from eqr.tasks import get_task
    task = get_task("sudoku", size=4)            # or get_task("maze", size=11)
    puzzles = task.generate(100, seed=0, tier="easy", blanks=(4, 8))   # maze: path_len=(lo, hi)
    ok = task.is_valid(puzzles.inputs, puzzles.labels)   # bool [N]; a verifier, never a selector
    task.tier_of(puzzles.inputs)                 # str [N], the grader generate() filtered with

    from eqr.tasks.dataset import save_dataset, load_dataset, check_split   # HRM/EqR directories
    from eqr.tasks.io import read_puzzles        # text / csv / hrm files -> (line, tokens or error)
    from eqr.tasks.sudoku import augment         # Sudoku isomorphs for any box shape

Token ids are the official ones: Sudoku 0 PAD, 1 blank, 2..n+1 digits; maze 0 PAD, "# SGo" 1..5.
"""
from __future__ import annotations

from eqr.contract.errors import EqRError
from eqr.tasks.base import PAD_ID, Puzzles, Task
from eqr.tasks.maze import MazeTask
from eqr.tasks.sudoku import SudokuTask

TASKS: dict[str, type[Task]] = {"sudoku": SudokuTask, "maze": MazeTask}
DEFAULT_SIZES = {"sudoku": 9, "maze": 30}  # the official data sets


def get_task(name: str, size: int | None = None) -> Task:
    """The task `name` at `size` (default: the official size); EqRError naming the valid choices."""
    if name not in TASKS:
        raise EqRError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)}")
    return TASKS[name](size=DEFAULT_SIZES[name] if size is None else int(size))


def task_from_spec(spec: str) -> Task:
    """'NAME[:SIZE]' (--task, a served model's task parameter) -> the task."""
    name, _, size = spec.partition(":")
    return get_task(name, int(size) if size.isdigit() else None)


__all__ = ["DEFAULT_SIZES", "PAD_ID", "TASKS", "MazeTask", "Puzzles", "SudokuTask", "Task", "get_task",
           "task_from_spec"]
