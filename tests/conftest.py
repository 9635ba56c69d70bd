"""Shared fixtures: captured payloads, the sandbox, a real Prefect server and a real influxd."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any
from uuid import UUID

import pandas as pd
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun

from flows.sandbox import read_request_log, start_sandbox
from tests.servers import influxdb_server, prefect_server

FIXTURES = Path(__file__).parent / "fixtures"
YAHOO = FIXTURES / "yahoo"
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test a module does not mark ``unit`` is an integration test: `pytest -m "not unit"`."""
    for item in items:
        if item.get_closest_marker("unit") is None:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def own_pace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test paces its requests alone, at a rate the sandbox never refuses.

    The configured 2,000 Yahoo requests an hour space requests 1.9 s apart, and the default pace state
    in the system's temporary directory is shared by every process: both test workers and every test
    would queue behind one another's requests. A test about pacing sets its own rate and directory.
    """
    monkeypatch.setenv("MARKETPIPE__COLLECTION__RATE_LIMIT_DIR", str(tmp_path / "pace"))
    monkeypatch.setenv("MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__RATE_LIMIT", "360000")


def yahoo_payload(name: str) -> bytes:
    return (YAHOO / name).read_bytes()


def yahoo_json(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(yahoo_payload(name))
    return data


class Sandbox:
    """The sandbox that ``marketpipe sandbox ARGS`` starts, served from a thread of the test process,
    with its JSON-lines request log.

    In-process, it costs a test nothing to start: a child process spent a second or more importing
    the CLI before it answered, several times that on two loaded cores. The options are parsed by
    the CLI's own command, so a test's arguments mean exactly what they mean on the command line.
    """

    def __init__(self, *args: str, log: Path) -> None:
        from typer.main import get_command

        from flows.cli import app, sandbox_config

        self.request_log = log.with_suffix(".requests.jsonl")
        command = get_command(app).commands["sandbox"]  # type: ignore[attr-defined]
        options = command.make_context("sandbox", ["--request-log", str(self.request_log), *args]).params
        options.pop("port")
        stream_port = options.pop("stream_port")
        config = replace(sandbox_config(**options), access_log=False)
        self.server = start_sandbox(0, config)
        self.base_url = self.server.base_url
        self.alpha_vantage_url = self.server.alpha_vantage_url
        self.streamer = None
        if stream_port is not None:  # `--stream-port 0`: Yahoo's price streamer too, on a free port
            from flows.sandbox_stream import start_stream_server

            self.streamer = start_stream_server(0, clock=config.clock)

    def requests(self) -> list[dict[str, Any]]:
        return read_request_log(self.request_log)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        if self.streamer is not None:
            self.streamer.close()


def marketpipe(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`marketpipe ...` run by the CLI's own command in this process, with exactly ``env`` as its
    environment and Prefect's settings taken from it; its exit code and output as a child's would be.

    A child process spends 5-9 s importing the pipeline before it does anything, and the suite runs
    the command about a hundred times. What only a child shows stays with :func:`marketpipe_process`:
    Prefect's log lines (its handlers write to the process's own stderr), signals, a killed run, and
    the first run of a new machine.
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings
    from typer.testing import CliRunner

    from flows.cli import app

    changes: dict[str, str | None] = {name: None for name in os.environ if name not in env}
    changes |= {name: value for name, value in env.items() if os.environ.get(name) != value}
    updates: dict[Any, Any] = {PREFECT_HOME: env["PREFECT_HOME"]} if "PREFECT_HOME" in env else {}
    if "PREFECT_API_URL" in env:
        updates[PREFECT_API_URL] = env["PREFECT_API_URL"]
    restore = [] if "PREFECT_API_URL" in env else [PREFECT_API_URL]
    with temporary_settings(updates, restore_defaults=restore):
        result = CliRunner().invoke(app, list(args), env=changes)
    stderr = result.stderr
    if result.exc_info is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(*result.exc_info))  # as Python prints an uncaught error
    return subprocess.CompletedProcess(["marketpipe", *args], result.exit_code, result.stdout, stderr)


def marketpipe_process(
    *args: str, env: dict[str, str], timeout: float = 180, preexec: Callable[[], None] | None = None
) -> subprocess.CompletedProcess[str]:
    """`marketpipe ...` as a child process, optionally with ``preexec`` run in it before it starts."""
    return subprocess.run(
        [str(BIN / "marketpipe"), *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        preexec_fn=preexec,
    )


def query_csv(env: dict[str, str], symbol: str, *extra: str) -> pd.DataFrame:
    """`marketpipe query --format csv`, the command itself, run in this process with ``env``.

    A child process would spend seconds importing before it read a row; the tests read hundreds of times.
    `tests/test_cli.py` runs the query command as a child process too.
    """
    from typer.testing import CliRunner

    from flows.cli import app

    args = ["query", "--symbol", symbol, "--format", "csv", *extra]
    result = CliRunner().invoke(app, args, env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    return pd.read_csv(io.StringIO(result.stdout), keep_default_na=False, na_values=[""])


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it is still there after 60 s: a worker's graceful exit can take that long
    on two loaded cores, and how fast Prefect's worker shuts down is not what this test checks."""
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=30)


def prefect(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "prefect"), *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=300, check=False
    )


def wait_until_final(run_id: UUID, timeout: float = 240) -> FlowRun:
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            run = client.read_flow_run(run_id)
            if run.state is not None and run.state.is_final():
                return run
            time.sleep(0.5)
    raise AssertionError(f"flow run {run_id} did not finish within {timeout} s: {run.state}")


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Sandbox]:
    server = Sandbox("--not-found", "DELISTED", log=tmp_path / "sandbox.log")
    yield server
    server.stop()


@pytest.fixture
def replay_sandbox(tmp_path: Path) -> Iterator[Sandbox]:
    """Serves real captured Yahoo responses, one file per symbol."""
    replay = tmp_path / "replay"
    replay.mkdir()
    for symbol, name in REPLAY_FILES.items():
        shutil.copy(YAHOO / name, replay / f"{symbol}.json")
    server = Sandbox("--replay", str(replay), log=tmp_path / "replay.log")
    yield server
    server.stop()


REPLAY_FILES = {
    "AAPL": "yahoo-finance2_chart_AAPL_2020_full_year_1d_split_and_dividends.json",
    "BTC-USD": "yahoo-finance2_chart_BTC-USD_2020_full_year_1d_with_nulls.json",
    "EURUSD=X": "yahoo-finance2_chart_EURUSD=X_2020_full_year_1d.json",
    "OCDO.L": "yahoo-finance2_chart_OCDO.L_2020_full_year_1d_London.json",
    "QQQ": "yahoo-finance2_chart_QQQ_2020_full_year_1d_dividends.json",
    "SI": "yahoo-finance2_chart_SI_404_not_found_delisted_error.json",
}


_server_home: list[Path] = []


def server_home() -> Path:
    """PREFECT_HOME of the session's Prefect server (its database and logs)."""
    return _server_home[0]


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prefect server (SQLite) on a free loopback port, stopped by PID at the end."""
    home = tmp_path_factory.mktemp("prefect-home")
    _server_home.append(home)
    with prefect_server(home) as url:
        yield url


@pytest.fixture
def prefect_env(prefect_api: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    """Environment for child processes and in-process flows: talk to the test server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_api,
        "PREFECT_HOME": str(tmp_path / "prefect-client"),
        "MARKETPIPE__STORAGE__DUCKDB__PATH": str(tmp_path / "store.duckdb"),
        "MARKETPIPE__STORAGE__SPOOL_DIR": str(tmp_path / "spool"),
    }
    with temporary_settings({PREFECT_API_URL: prefect_api}):
        yield env
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=5)  # send queued logs before the session's server stops


@pytest.fixture(scope="session")
def influxdb_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real InfluxDB 1.x (`influxd` from Debian's package) on free loopback ports, stopped by PID.

    Missing `influxd` is an error, not a skip: .ci/run installs it.
    """
    with influxdb_server(tmp_path_factory.mktemp("influxdb")) as url:
        yield url
