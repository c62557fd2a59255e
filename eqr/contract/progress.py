"""Progress: stage lines and bars on stderr, the one progress reporter of commands and library.

Library functions take `progress: Progress | None` and default to `Progress(quiet=True)`, which
prints nothing and only logs the stages; commands pass `Progress(quiet)`.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import click

log = logging.getLogger("eqr.progress")


class Progress:
    """Stage lines and bars on stderr, so stdout stays clean for --json.

    On a terminal a bar shows position and ETA; without one (a log, CI) each bar becomes one
    line when it ends ("solving: 200/200 in 2.9 s"); `quiet` prints nothing, and sends the stages
    and their results to the `eqr` logger instead (a library caller sees them with logging on).
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
        if self.quiet:
            log.info("%s", name)
        else:
            click.echo(f"[{time.perf_counter() - self.started:6.1f}s] {name}", file=self.file)

    def done(self, detail: str) -> None:
        if self.quiet:
            log.info("  %s", detail)
        else:
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
