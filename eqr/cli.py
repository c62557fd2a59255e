"""The `eqr` command line. Subcommands live beside their code and load lazily, so `eqr --help`
stays fast and works without optional backends. Errors caused by input print one line, exit 2.
"""
from __future__ import annotations

import importlib
import json
import sys
from typing import Any

import click

from eqr import __version__
from eqr.cli_options import json_option, run_reporting_errors as report_errors
from eqr.contract.errors import EqRError, missing_extra

# name -> "module:attribute" of a click command; imported only when that command runs.
# `pip install eqr` is the runtime alone: a command whose packages are missing names its extra.
COMMAND_EXTRAS = {"train": "train", "bench": "all"}  # where the package's own extra is not the one to name
SUBCOMMANDS: dict[str, str] = {
    "bench": "eqr.bench.cli:bench",
    "calibrate": "eqr.calibration.cli:calibrate",
    "data": "eqr.tasks.cli:data",
    "export": "eqr.export.cli:export",
    "info": "eqr.cli:info",
    "report": "eqr.calibration.cli:report",
    "serve": "eqr.serving.cli:serve",
    "solve": "eqr.runtime.cli:solve",
    "train": "eqr.train:train",
    "triton": "eqr.serving.cli:triton",
    "models": "eqr.models_cli:models",
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


def run_reporting_errors(ctx: click.Context, fn: Any) -> Any:
    """The shared exit codes (eqr.cli_options), and a missing optional package names its extra."""
    def guarded() -> Any:
        try:
            return fn()
        except ImportError as e:  # an optional package used by the command is missing
            command = ctx.invoked_subcommand or ctx.info_name
            missing = missing_extra(e, f"eqr {command}", COMMAND_EXTRAS.get(command or ""))
            if missing is None:
                raise
            raise missing from None

    return report_errors(ctx, guarded)


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


@click.command()
@click.argument("model")
@click.option("--weights", type=click.Choice(["ema", "model"]), default="ema", show_default=True,
              help="Which weights to use when the checkpoint has both.")
@json_option()
def info(model: str, weights: str, as_json: bool) -> None:
    """Describe MODEL: architecture, config, parameters, FLOPs per outer step, provenance.

    MODEL is an eqr checkpoint, an official EqR checkpoint (.pth), a bundled model name or a
    preset (paper-sudoku, paper-maze: fresh initialisation).

    \b
    Examples:
      eqr info paper-sudoku
      eqr info downloaded_checkpoints/sudoku-extreme/eqr.pth --weights model
      eqr info my-run/last.pt --json
    """
    from eqr.model.load import load_model, model_summary

    summary = model_summary(load_model(model, weights=weights))
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    source = summary["source"]
    weights_line = source["weights"] + (f" ({source['note']})" if source["note"] else "")
    lines = [
        f"model         {summary['architecture']}",
        f"source        {source['description']}" + (f" sha256 {source['sha256'][:16]}" if source["sha256"] else ""),
        f"weights       {weights_line}",
        f"parameters    {summary['parameters']:,}",
        f"FLOPs/step    {summary['flops_per_outer_step_per_sample'] / 1e9:.3f} GFLOPs per sample "
        f"({summary['blocks_per_outer_step']} block applications)",
        "config",
    ]
    lines += [f"  {key:<22}{value}" for key, value in summary["config"].items()]
    click.echo("\n".join(lines))


def main() -> None:
    cli(prog_name="eqr")


def export_alias() -> None:
    """`eqr-export ...` is `eqr export ...`."""
    sys.argv[1:1] = ["export"]
    cli(prog_name="eqr")
