"""The `eqr` command line: the top floor. Each subcommand is one module here, a thin layer of
flags over a library call, imported only when it runs, so `eqr --help` stays fast and works
without optional backends. Errors caused by input print one line, exit 2 (docs/README.md).
"""
from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from eqr import __version__
from eqr.commands.options import COMMAND_EXTRAS, run_reporting_errors
from eqr.contract.errors import EqRError, missing_extra

# name -> "module:attribute" of a click command; imported only when that command runs.
# `pip install eqr` is the runtime alone: a command whose packages are missing names its extra.
SUBCOMMANDS: dict[str, str] = {
    "bench": "eqr.commands.bench:bench",
    "calibrate": "eqr.commands.calibrate:calibrate",
    "data": "eqr.commands.data:data",
    "engine": "eqr.commands.engine:engine",
    "export": "eqr.commands.export:export",
    "info": "eqr.commands.info:info",
    "report": "eqr.commands.calibrate:report",
    "serve": "eqr.commands.serve:serve",
    "solve": "eqr.commands.solve:solve",
    "train": "eqr.commands.train:train",
    "triton": "eqr.commands.serve:triton",
    "models": "eqr.commands.models:models",
}


class EqRGroup(click.Group):
    """A group whose subcommands are imported on use and whose EqRErrors print as one line."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = SUBCOMMANDS.get(name)
        if target is None:
            return None
        module, _, attr = target.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except ImportError as e:
            missing = missing_extra(e, f"eqr {name}", COMMAND_EXTRAS.get(name))
            if missing is None:
                raise
            return _unavailable(name, missing)

    def invoke(self, ctx: click.Context) -> Any:
        return run_reporting_errors(ctx, lambda: super(EqRGroup, self).invoke(ctx))


def _unavailable(name: str, missing: EqRError) -> click.Command:
    """Stands in for a command whose packages are not installed: listed in --help, and running
    it (or its --help) says which extra to install."""
    def fail(**_: Any) -> None:
        raise missing

    return click.Command(name, callback=fail, add_help_option=False, context_settings={"ignore_unknown_options": True},
                         params=[click.Argument(["args"], nargs=-1, type=click.UNPROCESSED)],
                         short_help=f"({missing.extra_hint})", help=str(missing))


@click.group(cls=EqRGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="eqr")
def cli() -> None:
    """Equilibrium Reasoners, exported and deployed.

    Every command shares one vocabulary: --precision (repeatable, or a comma list), --backend,
    --calib-data, --batch, --out, --force, --json, -q/--quiet, -v/--verbose.

    \b
    Examples:
      eqr info paper-sudoku
      eqr-export --precision fp16 sudoku-small
      eqr solve sudoku-small-eqr -i puzzles.txt --json

    \b
    Exit status (every command):
      0    ok
      1    a check or a puzzle failed (export parity, report regression, a bad input line)
      2    usage or input error (a flag, a path, a file, a missing backend or provider)
      130  interrupted (Ctrl-C); nothing half-written is left behind
    """


def main() -> None:
    cli(prog_name="eqr")


def export_alias() -> None:
    """`eqr-export ...` is `eqr export ...`."""
    sys.argv[1:1] = ["export"]
    cli(prog_name="eqr")
