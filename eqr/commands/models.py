"""`eqr models`: the bundled demo models, their held-out data arguments and claimed accuracy."""
from __future__ import annotations

import json
import shlex
from typing import Any

import click

from eqr.commands.options import json_option
from eqr.contract.bundled import CARD_JSON, bundled_dir, bundled_names
from eqr.contract.errors import EqRError


def bundled_cards() -> list[dict[str, Any]]:
    """One entry per bundled model, read from its card.json."""
    entries = []
    for name in bundled_names():
        path = bundled_dir() / name / CARD_JSON
        if not path.is_file():
            raise EqRError(f"bundled model {name} has no {CARD_JSON} at {path}; reinstall eqr")
        card = json.loads(path.read_text(encoding="utf-8"))
        entries.append({
            "name": name,
            "task": card["task"]["name"],
            "size": card["task"]["size"],
            "parameters": card["model"]["parameters"],
            "heldout_generate_args": card["heldout"]["generate_args"],
            "claimed_exact": card["claim"]["exact"],
            "claimed_depth": card["claim"]["depth"],
            "training_wall_time_s": card["training"]["wall_time_s"],
            "card": str(bundled_dir() / name / "card.md"),
        })
    return entries


@click.command()
@json_option()
def models(as_json: bool) -> None:
    """List the bundled models: task, size, held-out data arguments and the accuracy their card claims.

    Each held-out set is `eqr data generate ARGS --seed S --out DIR` (the card names S); load a
    model by name anywhere a model is expected.

    \b
    Examples:
      eqr models
      eqr models --json
      eqr info sudoku-small
    """
    entries = bundled_cards()
    if as_json:
        click.echo(json.dumps(entries, indent=2))
        return
    if not entries:
        click.echo("no bundled models")
        return
    for e in entries:
        click.echo(f"{e['name']:<14}{e['task']} {e['size']}x{e['size']}, {e['parameters']:,} parameters, "
                   f"{100 * e['claimed_exact']:.1f}% exact at depth {e['claimed_depth']}")
        click.echo(f"{'':<14}held-out: eqr data generate {' '.join(map(shlex.quote, e['heldout_generate_args']))}")
