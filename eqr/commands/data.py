"""`eqr data generate` and `eqr data check`: make and verify HRM/EqR puzzle data sets."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click
import numpy as np

from eqr.commands.options import force_option, out_option, output_options
from eqr.contract.errors import EqRError
from eqr.contract.progress import Progress
from eqr.tasks import TASKS, get_task
from eqr.tasks.dataset import check_split, generate_split, split_dirs


def _range_option(value: str | None, flag: str) -> tuple[int, int] | None:
    if value is None:
        return None
    lo, sep, hi = value.partition(":")
    try:
        return (int(lo), int(hi)) if sep else (int(lo), int(lo))
    except ValueError:
        raise EqRError(f"{flag} takes LO:HI (e.g. 10:20) or one number, got {value!r}") from None


@click.group()
def data() -> None:
    """Generate and check puzzle data sets (HRM/EqR layout, docs/formats.md#hrm).

    \b
    Examples:
      eqr data generate --task sudoku --size 4 --n 2000 --seed 0 --out data/sudoku4
      eqr data generate --task sudoku --size 4 --n 200 --seed 0 --out data/sudoku4 --split test
      eqr data check data/sudoku4
    """


@data.command()
@click.option("--task", "task_name", type=click.Choice(sorted(TASKS)), required=True, help="Puzzle family.")
@click.option("--size", type=int, default=None,
              help="Board side: sudoku 4, 6 or 9; maze 9..30 (default: 9 / 30, the official sets).")
@click.option("--n", "count", type=click.IntRange(min=1), required=True, help="Puzzles to generate.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed (each split draws its own stream).")
@out_option(type=click.Path(file_okay=False, path_type=Path), required=True, help="Data set root directory.")
@click.option("--split", default="train", show_default=True, help="Split to write: <out>/<split>/.")
@click.option("--tier", default=None, help="Keep only this tier (sudoku: easy|medium|hard; maze: short|medium|long).")
@click.option("--blanks", default=None, metavar="LO:HI", help="Sudoku: blank cells per puzzle (default: minimal puzzles).")
@click.option("--path-len", default=None, metavar="LO:HI",
              help="Maze: S-G shortest path length in moves (default scaled from 100:140 at 30x30).")
@click.option("--augment", type=click.IntRange(min=0), default=0, show_default=True,
              help="Sudoku: add this many random isomorphs after each puzzle (train splits; "
                   "docs/training.md#data-and-curricula).")
@force_option(help="Replace an existing split.")
@output_options
def generate(task_name: str, size: int | None, count: int, seed: int, out: Path, split: str, tier: str | None,
             blanks: str | None, path_len: str | None, augment: int, force: bool, as_json: bool, quiet: bool,
             verbose: int) -> None:
    """Generate --n puzzles with their solutions into OUT/SPLIT.

    Sudoku puzzles have a unique solution and carry the tier their grader gives; mazes are
    perfect mazes with the S-G path marked in the label. Puzzles already in another split of
    OUT are never repeated.

    \b
    Examples:
      eqr data generate --task sudoku --size 9 --tier hard --n 1000 --seed 1 --out data/s9 --split test
      eqr data generate --task sudoku --size 6 --blanks 5:20 --augment 8 --n 500 --out data/s6
      eqr data generate --task maze --size 11 --path-len 8:16 --n 1000 --out data/maze11
    """
    task = get_task(task_name, size)
    options: dict[str, Any] = {}
    if task.name == "sudoku":
        options["blanks"] = _range_option(blanks, "--blanks")
    elif blanks is not None:
        raise EqRError("--blanks is for sudoku; mazes take --path-len")
    if task.name == "maze":
        options["path_len"] = _range_option(path_len, "--path-len")
        if augment:
            raise EqRError("--augment is for sudoku; mazes are not augmented")
    elif path_len is not None:
        raise EqRError("--path-len is for mazes; sudoku takes --blanks")
    started = time.perf_counter()
    with Progress(quiet).bar(f"generating {task.name} {task.size}x{task.size} {split}", count) as advance:
        puzzles, inputs = generate_split(task, count, seed, out, split, tier=tier, augment=augment, force=force,
                                         advance=advance, **options)
    tiers = dict(zip(*np.unique(puzzles.tiers, return_counts=True)))
    summary = {"out": str(out), "split": split, "task": task.describe(), "puzzles": count, "rows": len(inputs),
               "groups": count, "tiers": {str(k): int(v) for k, v in tiers.items()},
               "seconds": round(time.perf_counter() - started, 3)}
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    tier_text = ", ".join(f"{k} {v}" for k, v in summary["tiers"].items())
    click.echo(f"wrote {len(inputs)} rows ({count} puzzles; {tier_text}) to {out / split} "
               f"in {summary['seconds']:.1f} s")


@data.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--split", "only_split", default=None, help="Check only this split (default: every split found).")
@click.option("--deep", is_flag=True, help="Also grade every puzzle and require a unique sudoku solution (slower).")
@click.option("--max-errors", type=click.IntRange(min=0), default=20, show_default=True,
              help="Bad rows to list per split (all are counted).")
@output_options
def check(path: Path, only_split: str | None, deep: bool, max_errors: int, as_json: bool, quiet: bool,
          verbose: int) -> None:
    """Check a data set at PATH (root or split directory): files, metadata and every row.

    Rows must be valid puzzles with correct solutions: Sudoku labels obey the rules and keep the
    givens; maze labels mark a shortest simple S-G path. Exit 0 when all is well, 1 when a split
    has bad rows or files (each listed with its row index), 2 when PATH is not a data set.

    \b
    Examples:
      eqr data check data/sudoku4
      eqr data check data/sudoku9/test --deep --json
    """
    dirs = split_dirs(path)
    if only_split is not None:
        dirs = [d for d in dirs if d.name == only_split]
        if not dirs:
            raise EqRError(f"no split {only_split!r} under {path}")
    reports, progress = [], Progress(quiet)
    for split_dir in dirs:
        with progress.bar(f"checking {split_dir.name}", _row_count(split_dir)) as advance:
            reports.append(check_split(split_dir, deep=deep, progress=advance))
    if as_json:
        click.echo(json.dumps({"ok": all(r.ok for r in reports), "splits": [r.to_dict() for r in reports]}, indent=2))
    else:
        for report in reports:
            _print_report(report, max_errors)
    if not all(r.ok for r in reports):
        click.get_current_context().exit(1)


def _row_count(split_dir: Path) -> int:
    try:
        return int(json.loads((split_dir / "dataset.json").read_text()).get("total_samples", 0))
    except (OSError, ValueError, AttributeError):
        return 0


def _print_report(report: Any, max_errors: int) -> None:
    status = "ok" if report.ok else "FAILED"
    line = f"{report.split}: {status}, {report.rows} rows, task {report.task}"
    if report.tiers:
        line += ", tiers " + ", ".join(f"{k} {v}" for k, v in sorted(report.tiers.items()))
    if report.duplicate_inputs:
        line += f", {report.duplicate_inputs} duplicate inputs"
    click.echo(line)
    for error in report.errors:
        click.echo(f"  error: {error}")
    for row, message in report.problems[:max_errors]:
        click.echo(f"  {report.split} row {row}: {message}")
    if len(report.problems) > max_errors:
        click.echo(f"  ... {len(report.problems) - max_errors} more bad rows (--max-errors to list more)")
    if report.problems:
        click.echo(f"  {len(report.problems)} bad rows of {report.rows}")
