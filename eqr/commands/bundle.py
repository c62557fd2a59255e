"""`python -m eqr.commands.bundle`: a finished training run -> a bundled model with its measured
card (eqr.bundling.card does the work). A maintainer's tool, not an `eqr` subcommand.

    python -m eqr.commands.bundle make RUN_DIR NAME --heldout "--task sudoku --size 4 --n 1000 --split test" \\
        --heldout-seed 1000
    python -m eqr.commands.bundle remeasure NAME     # after the evaluation gained a measure
"""
from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

import click

from eqr.bundling.card import make_bundle, remeasure, render_card
from eqr.commands.data import data
from eqr.commands.options import run_command
from eqr.tasks.dataset import load_dataset


def generate_heldout(args: Sequence[str], seed: int, out: Path) -> Any:
    """Run `eqr data generate ARGS --seed SEED --out OUT` and load the split it wrote."""
    data.main(["generate", *args, "--seed", str(seed), "--out", str(out), "--json"], standalone_mode=False)
    split = args[list(args).index("--split") + 1] if "--split" in args else "train"
    return load_dataset(out, split)


@click.group()
def main() -> None:
    """Bundle a training run as a model shipped inside the package, with a measured model card."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)


@main.command("make")
@click.argument("run_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.argument("name")
@click.option("--heldout", required=True, help="`eqr data generate` arguments of the held-out set, less --seed/--out.")
@click.option("--heldout-seed", type=int, required=True, help="Seed of the held-out set (not the training seed).")
@click.option("--depths", default="1,2,4,8,16,32,64", show_default=True, help="Depths to report.")
@click.option("--summary", default="", help="One paragraph for the card.")
@click.option("--note", "notes", multiple=True, help="A line for the card's Notes section (repeatable).")
@click.option("--noise", type=click.FloatRange(min=0.0), default=0.0, show_default=True,
              help="Path noise sigma of the accuracy-by-depth measurement (0: the noise-free map the runtime "
                   "iterates; the training noise_scale reproduces the official evaluation).")
@click.option("--force", is_flag=True, help="Replace an existing bundle.")
def make(run_dir: Path, name: str, heldout: str, heldout_seed: int, depths: str, summary: str, notes: tuple[str, ...],
         noise: float, force: bool) -> None:
    """Bundle RUN_DIR's EMA model as eqr/bundled/NAME with a measured model card.

    \b
    Example:
      python -m eqr.commands.bundle make runs/sudoku4 sudoku-small \\
          --heldout "--task sudoku --size 4 --blanks 4:16 --n 1000 --split test" --heldout-seed 1000
    """
    card = make_bundle(run_dir, name, generate_heldout, shlex.split(heldout), heldout_seed,
                       [int(d) for d in depths.split(",")], summary, notes, force, noise=noise)
    click.echo(render_card(card))


@main.command("remeasure")
@click.argument("name")
@click.option("--noise", type=click.FloatRange(min=0.0), default=None,
              help="Path noise sigma of the accuracy-by-depth measurement  [default: the card's]")
def remeasure_command(name: str, noise: float | None) -> None:
    """Re-measure bundled model NAME's card from its shipped weights (same held-out set, depths
    and path noise unless --noise is given).

    \b
    Example:
      python -m eqr.commands.bundle remeasure sudoku-small
      python -m eqr.commands.bundle remeasure sudoku-small --noise 0
    """
    click.echo(render_card(remeasure(name, generate_heldout, noise=noise)))


if __name__ == "__main__":
    run_command(main, "python -m eqr.commands.bundle")
