"""The run's progress bar: drawn on a real terminal, a plain line when piped, and Prefect's per-run
INFO lines off the terminal but still sent to the API."""

from __future__ import annotations

import fcntl
import io
import logging
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import threading
import time
import uuid
from pathlib import Path

import pytest
from rich.console import Console

from flows import progress
from tests.conftest import REPO

# A flow of three symbols, one failing with a warning, each reported from its task's worker thread.
CHILD = """
import sys

from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run
from rich.console import Console

from flows import progress


@task
def collect(symbol: str) -> None:
    status = "failed" if symbol == "BAD" else "ok"
    if status == "failed":
        get_run_logger().warning("BAD has no data")
    progress.report(status)


@flow(name="progress-check")
def check(symbols: list[str]) -> str:
    progress.expect(len(symbols))
    for future in [collect.submit(s) for s in symbols]:
        future.wait()
    return str(flow_run.id)


with progress.shown(Console(), verbose=sys.argv[1] == "verbose"):
    run_id = check(["AAA", "BAD", "CCC"])
print(f"flow run id {run_id}", flush=True)
"""

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
HIDE_CURSOR = "\x1b[?25l"  # what rich's live display writes first
ERASE_LINE = "\x1b[2K"
RUN_ID = re.compile(r"flow run id ([0-9a-f-]{36})")
LOG_LINE = re.compile(r"\d\d:\d\d:\d\d\.\d{3} \| ")  # the start of Prefect's console format


def _child_env(prefect_env: dict[str, str]) -> dict[str, str]:
    quiet = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    env = {**prefect_env, **quiet, "PYTHONPATH": str(REPO), "TERM": "xterm"}
    for name in ("NO_COLOR", "FORCE_COLOR", "COLUMNS", "LINES", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "CI"):
        env.pop(name, None)
    return env


def _script(tmp_path: Path) -> str:
    path = tmp_path / "progress_child.py"
    path.write_text(CHILD)
    return str(path)


def _on_terminal(tmp_path: Path, env: dict[str, str], mode: str, timeout: float = 180) -> tuple[int, str]:
    """Run the child with a pseudo-terminal (200 columns) as stdin, stdout and stderr; its exit code and output."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 200, 0, 0))
    child = subprocess.Popen(
        [sys.executable, _script(tmp_path), mode], stdin=slave, stdout=slave, stderr=slave, env=env, cwd=REPO
    )
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1)
            if not ready:
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed its side of the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        else:
            child.kill()
            pytest.fail(f"the child did not finish in {timeout} s:\n{b''.join(chunks).decode(errors='replace')}")
        code = child.wait(timeout=30)
    finally:
        os.close(master)
        if child.poll() is None:
            child.kill()
    return code, b"".join(chunks).decode(errors="replace")


def _plain(output: str) -> str:
    return ANSI.sub("", output).replace("\r", "")


def _torn_lines(output: str) -> list[str]:
    """Log lines written onto the bar's line instead of above it: what precedes each one is not a new line."""
    colours = re.compile(r"\x1b\[[0-9;]*m")
    torn = []
    for line in LOG_LINE.finditer(output):
        before = colours.sub("", output[: line.start()])
        if not before.endswith((ERASE_LINE, "\n")):  # rich erases the bar's line before printing above it
            torn.append(_plain(before[-120:] + output[line.start() : line.end() + 60]))
    return torn


def _api_messages(output: str) -> list[str]:
    """What the API holds of the child's flow run's log: the records the UI shows."""
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    match = RUN_ID.search(_plain(output))
    assert match, output
    run_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[uuid.UUID(match.group(1))]))
    with get_client(sync_client=True) as client:
        deadline = time.monotonic() + 30
        while True:  # the child sent them before exiting; give the server time to have them stored
            messages = [log.message for log in client.read_logs(log_filter=run_filter)]
            if sum("Finished in state" in m for m in messages) >= 4 or time.monotonic() > deadline:
                return messages
            time.sleep(0.5)


def test_on_a_terminal_the_bar_replaces_prefects_info_lines(prefect_env: dict[str, str], tmp_path: Path) -> None:
    code, output = _on_terminal(tmp_path, _child_env(prefect_env), "quiet")
    plain = _plain(output)
    assert code == 0, output
    assert HIDE_CURSOR in output, output  # a live display was drawn
    assert "3/3" in plain, plain
    assert "1 failed" in plain, plain
    assert "BAD has no data" in plain, plain  # warnings still print
    assert "Finished in state" not in plain, plain
    assert "Beginning flow run" not in plain, plain
    assert not _torn_lines(output), _torn_lines(output)
    # Kept off the terminal only: the API got every task's and the flow's state line.
    messages = _api_messages(output)
    assert sum("Finished in state" in m for m in messages) == 4, messages
    assert "BAD has no data" in messages


def test_verbose_keeps_prefects_info_lines(prefect_env: dict[str, str], tmp_path: Path) -> None:
    code, output = _on_terminal(tmp_path, _child_env(prefect_env), "verbose")
    plain = _plain(output)
    assert code == 0, output
    assert "3/3" in plain, plain
    assert plain.count("Finished in state") == 4, plain  # three tasks and the flow
    assert "Beginning flow run" in plain, plain
    assert not _torn_lines(output), _torn_lines(output)  # each printed above the bar


def test_piped_output_gets_one_line_of_counts_and_no_live_display(prefect_env: dict[str, str], tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, _script(tmp_path), "quiet"],
        env=_child_env(prefect_env),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "\x1b" not in result.stdout + result.stderr, repr(result.stdout + result.stderr)
    assert "3/3 symbols done: 2 ok, 1 failed;" in result.stdout.splitlines()[0], result.stdout
    assert "BAD has no data" in result.stderr, result.stderr
    assert "Finished in state" not in result.stderr, result.stderr


def test_without_a_bar_report_and_expect_do_nothing() -> None:
    progress.expect(10)
    for status in progress.STATUSES:
        progress.report(status)
    out = io.StringIO()
    with progress.shown(Console(file=out, width=200), verbose=False):  # what came before is not counted
        progress.report("ok")
    progress.report("failed")
    assert out.getvalue().startswith("1 symbol done: 1 ok;"), out.getvalue()


def test_a_flow_that_reports_nothing_gets_no_line_of_zeros() -> None:
    out = io.StringIO()
    with progress.shown(Console(file=out), verbose=False):
        pass
    assert out.getvalue() == ""


def test_reports_from_many_threads_are_all_counted() -> None:
    out = io.StringIO()

    def finish(n: int) -> None:
        for i in range(500):
            progress.report("spooled" if i % 100 == 0 else "ok")

    with progress.shown(Console(file=out, width=200), verbose=True):
        progress.expect(4000)
        threads = [threading.Thread(target=finish, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert out.getvalue().startswith("4000/4000 symbols done: 3960 ok, 40 spooled;"), out.getvalue()


def test_the_filter_is_on_prefects_console_handlers_only_while_shown() -> None:
    from prefect.logging.configuration import ensure_logging_setup

    ensure_logging_setup()
    handlers = progress.console_handlers()
    assert handlers
    api = [h for h in logging.getLogger("prefect.task_runs").handlers if type(h).__name__ == "APILogHandler"]
    assert api

    def record(name: str, level: int, msg: str = "Finished in state Completed()") -> logging.LogRecord:
        return logging.LogRecord(name, level, __file__, 1, msg, None, None)

    info, warning = record("prefect.task_runs", logging.INFO), record("prefect.task_runs", logging.WARNING)
    other = record("prefect.client", logging.INFO, "something else")
    with progress.shown(Console(file=io.StringIO()), verbose=False):
        assert not any(h.filter(info) for h in handlers)
        assert all(h.filter(warning) and h.filter(other) for h in handlers)
        assert all(h.filter(info) for h in api)  # the UI still gets it
    assert all(h.filter(info) for h in handlers)
    with progress.shown(Console(file=io.StringIO()), verbose=True):
        assert all(h.filter(info) for h in handlers)


def test_a_second_bar_at_once_is_refused() -> None:
    with progress.shown(Console(file=io.StringIO()), verbose=True):
        second = progress.shown(Console(file=io.StringIO()), verbose=True)
        with pytest.raises(RuntimeError, match="already"):
            second.__enter__()
    with progress.shown(Console(file=io.StringIO()), verbose=True):  # the first one's exit freed it
        pass
