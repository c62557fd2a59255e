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
REPORT_EVERY_S = 30.0  # a bar without a terminal reports its position and ETA this often
LONG_ESTIMATE_S = 120.0  # a bar whose estimated remaining time exceeds this gives its `long_note`


def eta_text(seconds: float) -> str:
    """90 -> "1m30s", 3725 -> "1h02m", 12 -> "12s"."""
    seconds = max(0, int(round(seconds)))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """Stage lines and bars on stderr, so stdout stays clean for --json.

    On a terminal a bar shows position and ETA; without one (a log, CI) a bar reports its position
    and ETA every `every_s` seconds and one line when it ends ("solving: 200/200 in 2.9 s");
    `quiet` prints nothing, and sends the stages, those lines and their results to the `eqr`
    logger instead (a library caller sees them with logging on).
    """

    def __init__(self, quiet: bool = False, stream: Any = None, clock: Callable[[], float] = time.perf_counter,
                 every_s: float = REPORT_EVERY_S) -> None:
        """clock: seconds (injectable for tests); every_s: how often a bar without a terminal (a log,
        or -q's logger) reports its position and ETA."""
        self.quiet = quiet
        self.stream = stream
        self.clock = clock
        self.every_s = every_s
        self.started = clock()

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
            click.echo(f"[{self.clock() - self.started:6.1f}s] {name}", file=self.file)

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
    def bar(self, label: str, total: int, long_note: Callable[[float], str] | None = None,
            long_after_s: float = LONG_ESTIMATE_S) -> Iterator[Callable[[int], None]]:
        """Yields `advance(n)`. With a terminal: a bar with position and ETA; without one (or with
        `quiet`, to the logger): a line with the position and ETA every `every_s` seconds, and one
        when it ends. `long_note(eta_s)`: a line given once (a warning in the log with `quiet`) when,
        after the first advance, the estimated remaining time exceeds `long_after_s`."""
        count, start = [0], self.clock()
        state = {"last": start, "noted": False}

        def track(n: int) -> None:
            count[0] += n
            now = self.clock()
            elapsed = now - start
            if count[0] <= 0 or elapsed <= 0:
                return
            remaining = elapsed / count[0] * max(total - count[0], 0)
            if long_note is not None and not state["noted"] and remaining > long_after_s:
                state["noted"] = True
                line = long_note(remaining)
                if self.quiet:
                    log.warning("%s", line)
                else:
                    click.echo(line, file=self.file)
            if not self.interactive and now - state["last"] >= self.every_s and count[0] < total:
                state["last"] = now
                line = f"{label}: {count[0]}/{total}, {eta_text(elapsed)} so far, ETA {eta_text(remaining)}"
                if self.quiet:
                    log.info("%s", line)
                else:
                    click.echo(line, file=self.file)

        if self.interactive and not self.quiet:
            with click.progressbar(length=max(total, 1), label=label, file=self.file, show_pos=True,
                                   show_eta=True) as bar:
                def advance(n: int) -> None:
                    bar.update(n)
                    track(n)

                yield advance
            return
        yield track
        line = f"{label}: {count[0]}/{total} in {self.clock() - start:.1f} s"
        if self.quiet:
            log.info("%s", line)
        else:
            click.echo(line, file=self.file)
