"""The flag vocabulary every `eqr` command shares, its exit codes and its progress output.

One spelling per idea (docs/formats.md lists the exit codes); the progress lines are
`eqr.contract.progress.Progress`, which every command and library function shares:

    @click.command()
    @precision_option(default=("fp32",))          # --precision fp16 --precision INT8, or fp16,int8
    @backend_option(multiple=True)                 # --backend onnxruntime,torch
    @device_option()                               # --device cuda:1 (torch, tensorrt)
    @calib_data_option(help="...")                 # --calib-data FILE
    @batch_option(default=256, help="...")         # --batch N
    @output_options                                # --json, -q/--quiet, -v/--verbose
    @force_option(help="...")                      # --force
    @out_option(help="...")                        # --out DIR
    def cmd(precision, backend, calib_data, batch, as_json, quiet, verbose, force, out): ...
        progress = Progress(quiet)                 # stage lines, bars with ETA on a terminal

Exit codes: 0 ok, 1 a check or a puzzle failed, 2 usage or input error, 130 interrupted.
`run_command` maps EqRError, Ctrl-C and click's own errors to them for a command run on its own
(`python -m eqr.commands.train`); the `eqr` group does the same for every subcommand.
"""
from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

import click

from eqr.contract.errors import EqRError, missing_extra

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a process ended by Ctrl-C


# --------------------------------------------------------------------------- list-valued flags


class NameList(click.ParamType):
    """A comma list of names from `choices`, case-insensitive: 'FP16,int8' -> ('fp16', 'int8')."""

    name = "list"

    def __init__(self, choices: Sequence[str]) -> None:
        self.choices = tuple(choices)

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "[" + "|".join(self.choices) + "]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[str, ...]:
        if isinstance(value, tuple):
            return value
        names = tuple(part.strip().lower() for part in str(value).split(",") if part.strip())
        unknown = [n for n in names if n not in self.choices]
        if unknown or not names:
            self.fail(f"{value!r}: choose from {', '.join(self.choices)} (repeat the flag or use a comma list)",
                      param, ctx)
        return names


def flatten(groups: Sequence[Sequence[str]] | Sequence[str] | None) -> tuple[str, ...]:
    """Values of a repeatable list flag, in order, without duplicates."""
    names: list[str] = []
    for group in groups or ():
        for name in ((group,) if isinstance(group, str) else group):
            if name not in names:
                names.append(name)
    return tuple(names)


def _list_option(flag: str, dest: str, choices: Sequence[str], default: Sequence[str] | None,
                 help: str) -> Callable[[Callable], Callable]:
    """--FLAG a --FLAG b,c -> dest=('a', 'b', 'c'); `default` when not given."""
    def apply_default(ctx: click.Context, param: click.Parameter, value: Any) -> tuple[str, ...]:
        return flatten(value) or tuple(default or ())

    def decorator(f: Callable) -> Callable:
        shown = f"  [default: {','.join(default)}]" if default else ""
        return click.option(flag, dest, type=NameList(choices), multiple=True, callback=apply_default,
                            help=help + shown)(f)

    return decorator


class CaseInsensitiveChoice(click.Choice):
    def __init__(self, choices: Sequence[str]) -> None:
        super().__init__(list(choices), case_sensitive=False)


# --------------------------------------------------------------------------- the vocabulary


def precision_option(default: Sequence[str] | str = ("fp32",), choices: Sequence[str] = ("fp32", "fp16", "int8"),
                     multiple: bool = True, help: str = "Precision(s); repeat the flag or give a comma list.") -> Callable[[Callable], Callable]:
    """--precision: a tuple of names (multiple) or one name, case-insensitive."""
    if multiple:
        return _list_option("--precision", "precision", choices, tuple(default), help)
    return click.option("--precision", type=CaseInsensitiveChoice(choices), default=default, show_default=True,
                        help=help)


def backend_option(choices: Sequence[str], default: Sequence[str] | str = "auto", multiple: bool = False,
                   help: str = "Backend that runs the step.") -> Callable[[Callable], Callable]:
    """--backend: one name, or (multiple) a tuple of names."""
    if multiple:
        return _list_option("--backend", "backend", choices, tuple(default), help)
    return click.option("--backend", type=CaseInsensitiveChoice(choices), default=default, show_default=True,
                        help=help)


def device_option(help: str = "Device that runs the step: auto, cpu, cuda, cuda:N or N (the torch backend; "
                  "tensorrt takes a CUDA index; with --backend auto only backends that run there are tried) "
                  "[default: the backend's own: torch cpu, tensorrt cuda:0].") -> Callable[[Callable], Callable]:
    """--device SPEC: parsed by eqr.runtime.backends.registry.parse_device when the backend is made."""
    return click.option("--device", "device", default=None, metavar="DEVICE", help=help)


def calib_data_option(help: str, **option: Any) -> Callable[[Callable], Callable]:
    """--calib-data FILE|DIR: the states or puzzles a precision is calibrated on."""
    return click.option("--calib-data", "calib_data", default=None, help=help, **option)


def batch_option(default: Any, help: str, **option: Any) -> Callable[[Callable], Callable]:
    """--batch N."""
    return click.option("--batch", "batch", default=default, show_default=default is not None, help=help, **option)


def force_option(help: str = "Replace this command's own existing output.") -> Callable[[Callable], Callable]:
    return click.option("--force", is_flag=True, help=help)


def out_option(help: str, **option: Any) -> Callable[[Callable], Callable]:
    return click.option("--out", "out", default=None, help=help, **option)


def json_option(help: str = "Print machine-readable JSON on stdout.") -> Callable[[Callable], Callable]:
    return click.option("--json", "as_json", is_flag=True, help=help)


def output_options(f: Callable) -> Callable:
    """--json, -q/--quiet and -v/--verbose (repeatable: -vv is debug); -v sets up eqr's logging."""
    def set_logging(ctx: click.Context, param: click.Parameter, value: int) -> int:
        if value:
            logging.basicConfig(format="%(name)s: %(message)s", stream=sys.stderr)
            logging.getLogger("eqr").setLevel(logging.DEBUG if value > 1 else logging.INFO)
        return value

    f = click.option("-v", "--verbose", count=True, callback=set_logging, expose_value=True,
                     help="Log what each stage does on stderr (-vv: debug).")(f)
    f = click.option("-q", "--quiet", is_flag=True, help="No progress or summary on stderr; errors only.")(f)
    return json_option()(f)


# --------------------------------------------------------------------------- exit codes


# command -> {extra of a missing package: the command's extra to name instead}, where the command's
# extra includes that one (pyproject.toml); any other package names its own extra
# (eqr.contract.errors.EXTRAS). `pip install eqr` is the runtime alone; `eqr calibrate` and `eqr
# report` need eqr[calibrate] (no torch) and an ONNX Runtime (eqr[cpu]).
COMMAND_EXTRAS: dict[str, dict[str, str]] = {
    "train": {"export": "train"},  # torch
    "export": {"calibrate": "export"},
    "bench": {"export": "all", "calibrate": "all", "cpu": "all"},
}


def run_reporting_errors(ctx: click.Context, fn: Callable[[], Any]) -> Any:
    """Run `fn`: EqRError -> its one line and exit code (2 input, 1 a check); a missing optional
    package -> the extra that brings it (exit 2); Ctrl-C -> 130."""
    try:
        try:
            return fn()
        except ImportError as e:
            command = ctx.invoked_subcommand or ctx.command.name or ""
            missing = missing_extra(e, f"eqr {command}", COMMAND_EXTRAS.get(command))
            if missing is None:
                raise
            raise missing from None
    except EqRError as e:
        click.echo(f"error: {e}", err=True)
        ctx.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        ctx.exit(EXIT_INTERRUPTED)


def run_command(command: click.Command, prog_name: str, args: Sequence[str] | None = None) -> None:
    """A command run on its own (not under `eqr`), with the same exit codes; exits the process."""
    try:
        with command.make_context(prog_name, list(sys.argv[1:] if args is None else args)) as ctx:
            run_reporting_errors(ctx, lambda: command.invoke(ctx))
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except (KeyboardInterrupt, click.exceptions.Abort):
        click.echo("interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(0)
