"""The Prefect API goes away during a run started against a server.

Prefect 3 runs the flow's tasks in the `marketpipe run` process; the API records their states and
hands out the collect tag's concurrency slots. Its client retries a refused connection 5 times
(2 + 4 + ... + 32 s). A server back within that, here restarted on its port, costs the run time and
some UI events, nothing else: every bar is stored. A server gone for longer fails the run (tasks
waiting for a slot or for an upstream state get no answer); nothing half-written is left, and the
rerun against the server, back, stores every bar as a run without faults did.
"""

from __future__ import annotations

import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from blocks.duckdb_store import DuckDBStore
from tests.conftest import Sandbox
from tests.drills.conftest import Drill
from tests.drills.faults import PrefectServer, marketpipe, output, source_env, start_marketpipe, stored_bars
from tests.drills.figures import compare

BLIP, GONE = [f"B{i:02d}" for i in range(10)], [f"G{i:02d}" for i in range(6)]
WINDOW = ("--start", "2023-01-01", "--end", "2023-12-31")
# Two requests a second: the runs are still collecting when the server goes away.
PACE = {"MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__RATE_LIMIT": "7200"}


def run(symbols: list[str]) -> list[str]:
    return ["run", "--symbols", ",".join(symbols), *WINDOW]


def when_requested(sandbox: Sandbox, count: int, process: subprocess.Popen[str], timeout: float = 120) -> None:
    """Return once the sandbox has been asked ``count`` times."""
    deadline = time.monotonic() + timeout
    while len(sandbox.requests()) < count:
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before the outage"
        time.sleep(0.05)


def test_prefect_api_unreachable_mid_run(
    drill: Drill, prefect_env: dict[str, str], sandbox: Sandbox, tmp_path: Path
) -> None:
    base = {**source_env(prefect_env, sandbox, tmp_path / "rate-limits"), **PACE}
    clean = {**base, "MARKETPIPE__STORAGE__DUCKDB__PATH": str(tmp_path / "clean.duckdb")}
    server = PrefectServer(tmp_path / "prefect-home")
    env = {**base, "PREFECT_API_URL": server.url, "PREFECT_HOME": str(tmp_path / "prefect-client")}
    try:
        with ThreadPoolExecutor(1) as aside:  # the reference run, on the session's server, while this one starts
            reference = aside.submit(marketpipe, *run(BLIP + GONE), env=clean)
            server.start()
            assert reference.result().returncode == 0, output(reference.result())
        asked = len(sandbox.requests())

        # A blip: stopped by PID a few requests into the run, started again on its port.
        blip = start_marketpipe(*run(BLIP), env=env, log=tmp_path / "blip.log")
        when_requested(sandbox, asked + 3, blip)
        drill.inject()
        stopped = time.monotonic()
        server.stop()
        server.start()
        outage = time.monotonic() - stopped
        assert blip.wait(timeout=300) == 0, (tmp_path / "blip.log").read_text()[-5000:]
        drill.survived()
        drill.notes.append(f"an API outage of {outage:.0f} s rode on the client's retries")

        # Gone for longer than the client retries (cut to 1, so the drill ends in time).
        gone_env = {**env, "PREFECT_CLIENT_MAX_RETRIES": "1"}
        asked = len(sandbox.requests())
        gone = start_marketpipe(*run(GONE), env=gone_env, log=tmp_path / "gone.log")
        when_requested(sandbox, asked + 2, gone)
        drill.inject()
        server.stop()
        started = time.monotonic()
        returncode = gone.wait(timeout=300)
        failed = (tmp_path / "gone.log").read_text()
        assert returncode == 1, failed[-5000:]
        assert "became unreachable during the run (ConnectError: [Errno 111] Connection refused)" in failed, failed[
            -5000:
        ]
        drill.notes.append(f"with the API gone the run failed {time.monotonic() - started:.0f} s later")

        server.start()
        again = marketpipe(*run(GONE), env=env)
        assert again.returncode == 0, output(again)
        drill.survived()
    finally:
        server.stop()

    expected = stored_bars(DuckDBStore(path=clean["MARKETPIPE__STORAGE__DUCKDB__PATH"]), BLIP + GONE)
    store = DuckDBStore(path=env["MARKETPIPE__STORAGE__DUCKDB__PATH"])
    figures = compare(expected, stored_bars(store, BLIP + GONE))
    drill.finish(figures.expected, figures.stored, figures.lost, figures.twice, figures.differing)
    assert (figures.lost, figures.twice, figures.differing) == (0, 0, 0)
    assert figures.expected > 200 * len(BLIP + GONE)
