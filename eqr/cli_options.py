"""The flag vocabulary every `eqr` command shares, its exit codes and its progress output.

One spelling per idea (docs/formats.md lists the exit codes):

    @click.command()
    @precision_option(default=("fp32",))          # --precision fp16 --precision INT8, or fp16,int8
    @backend_option(multiple=True)                 # --backend onnxruntime,torch
    @calib_data_option(help="...")                 # --calib-data FILE
    @batch_option(default=256, help="...")         # --batch N
    @output_options                                # --json, -q/--quiet, -v/--verbose
    @force_option(help="...")                      # --force
    @out_option(help="...")                        # --out DIR
    def cmd(precision, backend, calib_data, batch, as_json, quiet, verbose, force, out): ...
        progress = Progress(quiet)                 # stage lines, bars with ETA on a terminal

Old spellings (`--precisions`, `--backends`, `--data`, `--calib`, `--batch-size`) still work for
one release: `deprecated_alias` merges them into the new flag and says so in one line on stderr.

Exit codes: 0 ok, 1 a check or a puzzle failed, 2 usage or input error, 130 interrupted.
`run_command` maps EqRError, Ctrl-C and click's own errors to them for a command run on its own
(`python -m eqr.train`); the `eqr` group does the same for every subcommand.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import click
from click.core import ParameterSource

from eqr.contract.errors import EqRError

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


def deprecated_alias(old: str, new: str, dest: str, **option: Any) -> Callable[[Callable], Callable]:
    """A hidden `old` flag whose value goes to parameter `dest` (the `new` flag), with a one-line notice.

    Given together, list values are merged; for a single value that is a usage error.
    """
    hidden_name = f"deprecated_{old.lstrip('-').replace('-', '_')}"

    def decorator(f: Callable) -> Callable:
        @functools.wraps(f)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            value = kwargs.pop(hidden_name)
            if value is None or value == ():
                return f(*args, **kwargs)
            click.echo(f"eqr: {old} is deprecated and goes in the next release; use {new}", err=True)
            ctx = click.get_current_context()
            given = ctx.get_parameter_source(dest) not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)
            if option.get("multiple"):
                kwargs[dest] = flatten([kwargs[dest], *value]) if given else flatten(value)
            elif given:
                raise click.UsageError(f"{old} is the old spelling of {new}; pass only {new}", ctx)
            else:
                kwargs[dest] = value
            return f(*args, **kwargs)

        return click.option(old, hidden_name, hidden=True, default=None, **option)(wrapper)

    return decorator


def _list_option(flag: str, dest: str, choices: Sequence[str], default: Sequence[str] | None, help: str,
                 old: str | None) -> Callable[[Callable], Callable]:
    """--FLAG a --FLAG b,c -> dest=('a', 'b', 'c'); `default` when not given; `old` as a deprecated alias."""
    def apply_default(ctx: click.Context, param: click.Parameter, value: Any) -> tuple[str, ...]:
        return flatten(value) or tuple(default or ())

    def decorator(f: Callable) -> Callable:
        if old:
            f = deprecated_alias(old, flag, dest, type=NameList(choices), multiple=True)(f)
        shown = f"  [default: {','.join(default)}]" if default else ""
        return click.option(flag, dest, type=NameList(choices), multiple=True, callback=apply_default,
                            help=help + shown)(f)

    return decorator


class CaseInsensitiveChoice(click.Choice):
    def __init__(self, choices: Sequence[str]) -> None:
        super().__init__(list(choices), case_sensitive=False)


# --------------------------------------------------------------------------- the vocabulary


def precision_option(default: Sequence[str] | str = ("fp32",), choices: Sequence[str] = ("fp32", "fp16", "int8"),
                     multiple: bool = True, help: str = "Precision(s); repeat the flag or give a comma list.",
                     old: str | None = None) -> Callable[[Callable], Callable]:
    """--precision: a tuple of names (multiple) or one name, case-insensitive; `old` e.g. '--precisions'."""
    if multiple:
        return _list_option("--precision", "precision", choices, tuple(default), help, old)
    return click.option("--precision", type=CaseInsensitiveChoice(choices), default=default, show_default=True,
                        help=help)


def backend_option(choices: Sequence[str], default: Sequence[str] | str = "auto", multiple: bool = False,
                   help: str = "Backend that runs the step.", old: str | None = None) -> Callable[[Callable], Callable]:
    """--backend: one name, or (multiple) a tuple of names; `old` e.g. '--backends'."""
    if multiple:
        return _list_option("--backend", "backend", choices, tuple(default), help, old)
    return click.option("--backend", type=CaseInsensitiveChoice(choices), default=default, show_default=True,
                        help=help)


def calib_data_option(help: str, old: Sequence[str] = (), **option: Any) -> Callable[[Callable], Callable]:
    """--calib-data FILE|DIR; each of `old` (e.g. '--data', '--calib') as a deprecated alias."""
    def decorator(f: Callable) -> Callable:
        for name in old:
            f = deprecated_alias(name, "--calib-data", "calib_data", **option)(f)
        return click.option("--calib-data", "calib_data", default=None, help=help, **option)(f)

    return decorator


def batch_option(default: Any, help: str, old: str | None = None, **option: Any) -> Callable[[Callable], Callable]:
    """--batch; `old` (e.g. '--batch-size') as a deprecated alias."""
    def decorator(f: Callable) -> Callable:
        if old:
            f = deprecated_alias(old, "--batch", "batch", **option)(f)
        return click.option("--batch", "batch", default=default, show_default=default is not None, help=help,
                            **option)(f)

    return decorator


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


# --------------------------------------------------------------------------- progress


class Progress:
    """Stage lines and bars on stderr, so stdout stays clean for --json.

    On a terminal a bar shows position and ETA; without one (a log, CI) each bar becomes one
    line when it ends ("solving: 200/200 in 2.9 s"); `quiet` prints nothing at all.
    """

    def __init__(self, quiet: bool = False, stream: Any = None) -> None:
        self.quiet = quiet
        self.stream = stream
        self.started = time.perf_counter()

    @property
    def file(self) -> Any:
        return self.stream or sys.stderr

    @property
    def interactive(self) -> bool:
        return bool(getattr(self.file, "isatty", lambda: False)())

    def stage(self, name: str) -> None:
        if not self.quiet:
            click.echo(f"[{time.perf_counter() - self.started:6.1f}s] {name}", file=self.file)

    def done(self, detail: str) -> None:
        if not self.quiet:
            click.echo(f"          {detail}", file=self.file)

    def note(self, line: str) -> None:
        """A line the user should see even in a log (a summary, a hint); not shown with -q."""
        if not self.quiet:
            click.echo(line, file=self.file)

    @contextlib.contextmanager
    def bar(self, label: str, total: int) -> Iterator[Callable[[int], None]]:
        """Yields `advance(n)`."""
        if self.quiet:
            yield lambda n: None
            return
        if self.interactive:
            with click.progressbar(length=max(total, 1), label=label, file=self.file, show_pos=True,
                                   show_eta=True) as bar:
                yield bar.update
            return
        count, start = [0], time.perf_counter()

        def advance(n: int) -> None:
            count[0] += n

        yield advance
        click.echo(f"{label}: {count[0]}/{total} in {time.perf_counter() - start:.1f} s", file=self.file)


# --------------------------------------------------------------------------- exit codes


def run_reporting_errors(ctx: click.Context, fn: Callable[[], Any]) -> Any:
    """Run `fn`: EqRError -> its one line and exit code (2 input, 1 a check); Ctrl-C -> 130."""
    try:
        return fn()
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
