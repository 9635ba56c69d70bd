"""A progress bar for `marketpipe run`, in place of Prefect's per-task INFO lines on the terminal.

Over thousands of symbols Prefect prints three lines per symbol, which bury the warnings and say
nothing about how far the run is. The flow reports each finished symbol here (`expect`, `report`);
the CLI shows the count on a bar (`shown`) and keeps Prefect's per-run INFO records off the terminal
while still sending them to the API, so the UI keeps every line.
"""

from __future__ import annotations

import io
import logging
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import timedelta
from typing import IO, cast

from prefect.logging.configuration import ensure_logging_setup
from prefect.logging.handlers import PrefectConsoleHandler
from rich.ansi import AnsiDecoder
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

STATUSES = ("ok", "failed", "deferred", "spooled")
# Prefect's loggers for records about one flow or task run: the engine's state lines and the flow's own.
RUN_LOGGERS = ("prefect.task_runs", "prefect.flow_runs")
# The engine's per-run lines, whatever logger a Prefect version sends them from.
ENGINE_LINES = ("Created task run", "Finished in state")


class _Display:
    """The counts of one shown run and the bar they drive; `report` may come from any thread."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.counts: dict[str, int] = dict.fromkeys(STATUSES, 0)
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self.task: TaskID = progress.add_task("symbols", total=None, outcome=self._outcome())

    def expect(self, total: int) -> None:
        self.progress.update(self.task, total=total)

    def report(self, status: str) -> None:
        with self._lock:
            self.counts[status] = self.counts.get(status, 0) + 1
            outcome = self._outcome()
        self.progress.update(self.task, advance=1, outcome=outcome)

    def _outcome(self, markup: bool = True) -> str:
        """The failed count always (it is what people watch for), then any other status that occurred."""
        failed = self.counts["failed"]
        parts = [f"[red]{failed} failed[/]" if failed and markup else f"{failed} failed"]
        for status, count in self.counts.items():
            if status not in {"ok", "failed"} and count:
                parts.append(f"[yellow]{count} {status}[/]" if markup else f"{count} {status}")
        return ", ".join(parts)

    def summary(self) -> str | None:
        """One plain line for output that gets no live bar: counts, rate and time taken; None if nothing was told."""
        task = self.progress.tasks[0]
        done = int(task.completed)
        if task.total is None and not done:  # a flow that reports nothing: a line of zeros would mislead
            return None
        elapsed = time.monotonic() - self.started
        of = f"{done}/{int(task.total)}" if task.total is not None else str(done)
        noun = "symbol" if (task.total if task.total is not None else done) == 1 else "symbols"
        rate = done / elapsed if elapsed > 0 else 0.0
        took = timedelta(seconds=round(elapsed))
        # Only the statuses that occurred: "0 failed" in a log would match a search for failures.
        counts = ", ".join(f"{n} {status}" for status, n in self.counts.items() if n) or "nothing finished"
        return f"{of} {noun} done: {counts}; {rate:.1f} symbols/s, {took}"


class _RateColumn(ProgressColumn):
    """Symbols per second over rich's recent window, the figure its ETA is computed from."""

    def render(self, task: Task) -> Text:
        speed = task.speed
        return Text(f"{speed:.1f} symbols/s" if speed is not None else "- symbols/s", style="blue")


class _QuietRuns(logging.Filter):
    """Drops Prefect's per-flow-run and per-task-run records below WARNING; the rest passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        if any(record.name == name or record.name.startswith(f"{name}.") for name in RUN_LOGGERS):
            return False
        return not (record.name.startswith("prefect") and str(record.msg).startswith(ENGINE_LINES))


_active: _Display | None = None
_activation = threading.Lock()


def expect(total: int) -> None:
    """Set how many symbols the run will report; a no-op when no bar is shown."""
    display = _active
    if display is not None:
        display.expect(total)


def report(status: str) -> None:
    """Count one finished symbol with its status ("ok", "failed", "deferred", "spooled"); no-op without a bar."""
    display = _active
    if display is not None:
        display.report(status)


def _all_handlers() -> list[logging.Handler]:
    """Every handler on a logger, and the one named `console` even if no logger holds it (yet)."""
    loggers = [logging.getLogger()]
    loggers += [lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    found = {id(h): h for logger in loggers for h in logger.handlers}
    named = logging.getHandlerByName("console")
    if named is not None:
        found[id(named)] = named
    return list(found.values())


def console_handlers() -> list[logging.Handler]:
    """Prefect's terminal handlers: the one logging.yml names `console`, and any other PrefectConsoleHandler."""
    named = logging.getHandlerByName("console")
    return [h for h in _all_handlers() if isinstance(h, PrefectConsoleHandler) or h is named]


class _AboveBar(io.TextIOBase):
    """A stream whose lines the bar's console prints above the live bar, their colours kept.

    Not rich's FileProxy: a rich Console given a FileProxy as its file unwraps it and writes to the
    terminal underneath, which is how Prefect's console handler writes.
    """

    def __init__(self, console: Console, terminal: IO[str]) -> None:
        self._console = console
        self._terminal = terminal
        self._partial = ""
        self._decoder = AnsiDecoder()

    def write(self, text: str) -> int:
        *lines, self._partial = (self._partial + text).split("\n")
        if lines:
            self._console.print(Text("\n").join(self._decoder.decode_line(line) for line in lines))
        return len(text)

    def isatty(self) -> bool:
        return self._terminal.isatty()

    def fileno(self) -> int:
        return self._terminal.fileno()


def _is_terminal(stream: object) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty()) if callable(isatty) else False


@contextmanager
def _through(console: Console, handler: logging.Handler) -> Iterator[None]:
    """While the bar is live, a handler writing to a terminal prints through the bar's console, above the bar.

    A line written straight to the terminal would land on the bar's line and leave a torn copy of
    the bar behind. Rich's own redirection covers `sys.stderr`, not a stream a handler already holds.
    """
    rich_console = getattr(handler, "console", None)  # PrefectConsoleHandler writes through its own
    if isinstance(rich_console, Console) and _is_terminal(rich_console.file):
        original = rich_console.file
        rich_console.file = cast(IO[str], _AboveBar(console, original))  # a text stream, as rich casts its own
        try:
            yield
        finally:
            rich_console.file = original
    elif isinstance(handler, logging.StreamHandler) and _is_terminal(handler.stream):
        stream = handler.stream
        handler.setStream(_AboveBar(console, stream))
        try:
            yield
        finally:
            handler.setStream(stream)
    else:
        yield


@contextmanager
def shown(console: Console, verbose: bool) -> Iterator[None]:
    """Show a bar of the symbols done on ``console`` while the block runs; ``verbose`` keeps Prefect's INFO lines.

    On a terminal the bar is live; otherwise (piped output) nothing is drawn and one line with the
    counts is printed at the end. Without ``verbose``, Prefect's per-run INFO records are filtered
    from its console handlers only, so they still reach the API; the filter goes when the block ends.
    """
    global _active  # noqa: PLW0603 (the flow reports to whichever bar the CLI shows)
    ensure_logging_setup()  # Prefect's handlers exist before a filter is put on them
    live = console.is_terminal and not console.is_dumb_terminal
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[outcome]}"),
        _RateColumn(),
        TextColumn("elapsed"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=not live,
        redirect_stderr=_is_terminal(sys.stderr),  # `2>file` keeps what is written to stderr in the file
    )
    quiet = _QuietRuns()
    handlers = console_handlers()
    with _activation:
        if _active is not None:
            raise RuntimeError("a progress bar is already shown")
        _active = display = _Display(progress)
    try:
        with ExitStack() as stack:
            if not verbose:
                for handler in handlers:
                    handler.addFilter(quiet)
                    stack.callback(handler.removeFilter, quiet)
            if live:  # any handler writing to a terminal, e.g. Prefect's internal debug one, too
                for handler in _all_handlers():
                    stack.enter_context(_through(console, handler))
            with progress:
                yield
    finally:
        with _activation:
            _active = None
        line = None if live else display.summary()  # also when the run ends in an error: what was done by then
        if line is not None:
            console.print(line, highlight=False, markup=False, soft_wrap=True)
