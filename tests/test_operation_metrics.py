"""Operation metrics: each run's cost per symbol and stage, in `pipeline_metrics` on DuckDB and the real influxd."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import pytest

from blocks.duckdb_store import DuckDBStore
from blocks.influxdb_v1_store import InfluxDBV1Store
from blocks.spool import Spool, SpoolDepth
from blocks.store import BarStore
from flows.market_data import SymbolsFailedError, market_data
from tests.conftest import Sandbox, marketpipe
from tests.servers import free_port

STAGE_FIELDS = (
    "collect_seconds",
    "collect_requests",
    "collect_retries",
    "collect_rate_limited",
    "collect_bytes",
    "collect_bars_out",
    "process_seconds",
    "process_bars_in",
    "process_bars_out",
    "store_seconds",
    "store_bars_in",
    "store_bars_out",
    "spool_depth",
    "spool_oldest_seconds",
)


@pytest.fixture
def throttled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Sandbox]:
    """A sandbox that answers every AAPL request with Yahoo's 429, and a source that retries quickly."""
    server = Sandbox("--fault", "AAPL=429", log=tmp_path / "sandbox.log")
    monkeypatch.setenv("MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__BASE_URL", server.base_url)
    monkeypatch.setenv("MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__RETRY__MAX_ATTEMPTS", "3")
    monkeypatch.setenv("MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__RETRY__INITIAL_WAIT", "0.01")
    monkeypatch.setenv("MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__RETRY__MAX_WAIT", "0.05")
    monkeypatch.setenv("MARKETPIPE__COLLECTION__TASK_RETRIES", "0")
    monkeypatch.setenv("MARKETPIPE__STORAGE__SPOOL_DIR", str(tmp_path / "spool"))
    yield server
    server.stop()


def _run_failing(symbols: list[str]) -> SymbolsFailedError:
    state = market_data(symbols, start=date(2024, 1, 1), end=date(2024, 3, 29), return_state=True)
    outcome = state.result(raise_on_failure=False)
    assert isinstance(outcome, SymbolsFailedError), outcome
    return outcome


def _check_stages(store: BarStore, served_bytes: dict[str, int]) -> None:
    ok, throttled = store.read_metrics("MSFT").iloc[-1], store.read_metrics("AAPL").iloc[-1]
    assert set(STAGE_FIELDS) <= set(ok.index)
    # A symbol that went through: each stage took time, its bars went in and out of each stage.
    assert min(ok["collect_seconds"], ok["process_seconds"], ok["store_seconds"]) > 0
    assert (ok["collect_requests"], ok["collect_retries"], ok["collect_rate_limited"]) == (1, 0, 0)
    assert ok["collect_bytes"] == served_bytes["MSFT"]
    assert ok["collect_bars_out"] == ok["process_bars_in"] == 65
    assert ok["process_bars_out"] == ok["store_bars_in"] == ok["store_bars_out"] == ok["rows_written"] == 65
    # A symbol throttled to failure still shows what it cost: every attempt answered 429.
    assert throttled["failed"] == 1
    assert (throttled["collect_requests"], throttled["collect_retries"], throttled["collect_rate_limited"]) == (3, 2, 3)
    assert throttled["collect_bytes"] == served_bytes["AAPL"]
    assert throttled["collect_seconds"] > 0
    assert (throttled["process_seconds"], throttled["store_seconds"], throttled["store_bars_out"]) == (0, 0, 0)
    assert (ok["spool_depth"], ok["spool_oldest_seconds"]) == (0, 0)


def _served_bytes(sandbox: Sandbox) -> dict[str, int]:
    """The response bytes the sandbox sent per symbol, from its request log."""
    sent: dict[str, int] = {}
    for request in sandbox.requests():
        sent[request["symbol"]] = sent.get(request["symbol"], 0) + int(request["bytes"])
    return sent


@pytest.mark.integration
@pytest.mark.parametrize("batch_size", [1, 2])
def test_every_stage_of_every_symbol_is_in_pipeline_metrics_on_duckdb(
    throttled: Sandbox, prefect_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, batch_size: int
) -> None:
    path = prefect_env["MARKETPIPE__STORAGE__DUCKDB__PATH"]
    monkeypatch.setenv("MARKETPIPE__STORAGE__DUCKDB__PATH", path)
    monkeypatch.setenv("MARKETPIPE__COLLECTION__BATCH_SIZE", str(batch_size))
    _run_failing(["AAPL", "MSFT"])
    _check_stages(DuckDBStore(path=path), _served_bytes(throttled))


@pytest.mark.integration
def test_every_stage_is_in_pipeline_metrics_on_influxd(
    throttled: Sandbox, prefect_env: dict[str, str], influxdb_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    database = f"metrics_{uuid.uuid4().hex[:12]}"
    monkeypatch.setenv("MARKETPIPE__STORAGE__BACKEND", "influxdb_v1")
    monkeypatch.setenv("MARKETPIPE__STORAGE__INFLUXDB_V1__URL", influxdb_url)
    monkeypatch.setenv("MARKETPIPE__STORAGE__INFLUXDB_V1__DATABASE", database)
    _run_failing(["AAPL", "MSFT"])
    _check_stages(InfluxDBV1Store(url=influxdb_url, database=database), _served_bytes(throttled))


@pytest.mark.integration
def test_the_spool_depth_runs_left_reaches_influxd_when_their_metrics_are_replayed(
    sandbox: Sandbox, influxdb_url: str, tmp_path: Path
) -> None:
    """influxd is away for two runs: each one's metrics wait in the spool, and the second's say that
    the first's batch had been waiting; `marketpipe replay` then takes both to influxd."""
    database = f"depth_{uuid.uuid4().hex[:12]}"
    spool = tmp_path / "spool"
    env = {
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__BASE_URL": sandbox.base_url,
        "MARKETPIPE__STORAGE__BACKEND": "influxdb_v1",
        "MARKETPIPE__STORAGE__INFLUXDB_V1__URL": f"http://127.0.0.1:{free_port()}",  # nobody listens
        "MARKETPIPE__STORAGE__INFLUXDB_V1__DATABASE": database,
        "MARKETPIPE__STORAGE__SPOOL_DIR": str(spool),
    }
    args = ("run", "--symbols", "MSFT", "--start", "2024-01-01", "--end", "2024-03-29")
    for _ in range(2):
        down = marketpipe(*args, env=env)
        assert down.returncode == 1, down.stdout + down.stderr
    assert Spool(spool).depth().batches == 2  # each run's metrics
    back = marketpipe("replay", env={**env, "MARKETPIPE__STORAGE__INFLUXDB_V1__URL": influxdb_url})
    assert back.returncode == 0, back.stdout + back.stderr
    first, second = InfluxDBV1Store(url=influxdb_url, database=database).read_metrics("MSFT").to_dict("records")
    assert (first["failed"], second["failed"]) == (1, 1)
    assert (first["spool_depth"], second["spool_depth"]) == (0, 1)
    assert first["spool_oldest_seconds"] == 0 < second["spool_oldest_seconds"]
    assert Spool(spool).depth() == SpoolDepth(0)
