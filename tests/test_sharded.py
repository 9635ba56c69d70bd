"""Shards: the partition and the split of the source's limits, the single-writer refusal, and a real
sharded run: a Prefect server, a process work pool with two workers, the sandbox and a real influxd."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterName
from prefect.client.schemas.objects import FlowRun

from configs.settings import ConfigError, SourceSettings, load_settings
from flows.market_data import market_data
from flows.sharded import market_data_sharded, parse_counts, result_from_row
from tasks.errors import UsageError
from tasks.shards import Shard, partition, shard_limits, shard_window
from tasks.sources.base import pacer_for
from tasks.sources.pacing import sends_per_second
from tests.conftest import BIN, REPO, Sandbox, prefect, stop, wait_until_final

SHARDS = 4
LIMIT_PER_SECOND = 20  # the sandbox's, and the configured pace: 72,000 requests an hour


def test_partition_is_contiguous_balanced_and_deterministic() -> None:
    symbols = [f"S{i:03d}" for i in range(10)]
    parts = partition(symbols, 4)
    assert [len(p) for p in parts] == [3, 3, 2, 2]
    assert [s for p in parts for s in p] == symbols
    assert partition(symbols, 4) == parts
    assert partition(symbols[:2], 4) == [["S000"], ["S001"]]  # never an empty shard
    with pytest.raises(UsageError, match="at least 1"):
        partition(symbols, 0)


def test_a_shard_parses_from_its_name_and_keys_its_own_state() -> None:
    assert Shard.parse("2-of-4") == Shard(2, 4)
    assert str(Shard(2, 4)) == "2-of-4"
    assert Shard(2, 4).state_key("yahoo_finance") != Shard(3, 4).state_key("yahoo_finance")
    for bad in ("2/4", "0-of-4", "5-of-4"):
        with pytest.raises(UsageError):
            Shard.parse(bad)


def test_every_limit_is_split_so_n_shards_never_exceed_it(tmp_path: Path) -> None:
    settings = SourceSettings(rate_limit=72_000, requests_per_minute=1_000, requests_per_day=25, burst=3)
    for count in (1, 2, 3, 4, 7):
        shares = [shard_limits("yahoo_finance", settings, Shard(k, count)) for k in range(1, count + 1)]
        assert sum(s.rate_limit for s in shares) <= settings.rate_limit
        assert sum(s.requests_per_minute or 0 for s in shares) <= 1_000
        assert sum(s.requests_per_day or 0 for s in shares) <= 25
        windows = [shard_window(sends_per_second(settings.rate_limit), Shard(k, count)) for k in range(1, count + 1)]
        assert sum(w or 0 for w in windows) <= LIMIT_PER_SECOND
    pacer = pacer_for("yahoo_finance", settings, str(tmp_path), Shard(1, 4))
    assert pacer.per_window == 5 and pacer.per_day == 6
    assert pacer.rates[0].interval == pytest.approx(3600 / (18_000 * (1 - settings.headroom)))
    assert pacer.path.name == "yahoo_finance.shard-1-of-4.json"
    assert pacer_for("yahoo_finance", settings, str(tmp_path)).path.name == "yahoo_finance.json"
    with pytest.raises(ConfigError, match=r"data_sources.yahoo_finance.requests_per_day is 25.*at most 25"):
        shard_limits("yahoo_finance", settings, Shard(1, 26))


def test_summary_rows_read_back_as_results() -> None:
    assert parse_counts("spike=2, ohlc_repaired=1") == {"spike": 2, "ohlc_repaired": 1}
    assert parse_counts("") == {}
    row = {"symbol": "AAPL", "status": "ok", "rows_written": 65, "quarantined": "ohlc=1", "spool_rejected": 0}
    result = result_from_row(row)
    assert (result.rows_written, result.counts["quarantined"], result.spool_rejected) == (65, {"ohlc": 1}, [])


def test_a_sharded_run_on_duckdb_fails_at_once_naming_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MARKETPIPE__STORAGE__BACKEND", "duckdb")
    assert load_settings().storage.backend == "duckdb"
    expected = r"storage.backend is 'duckdb', which admits one writer.*set storage.backend to influxdb"
    with pytest.raises(ConfigError, match=expected):
        market_data_sharded.fn(symbols=["AAPL"], shards=2)
    with pytest.raises(ConfigError, match=expected):  # a shard started on its own refuses it too
        market_data.fn(symbols=["AAPL"], shard="1-of-2")


@pytest.fixture
def paced_sandbox(tmp_path: Path) -> Iterator[Sandbox]:
    """The sandbox answering 429 past 20 requests in any second, as the source's own limit."""
    server = Sandbox("--rate-limit", str(LIMIT_PER_SECOND), log=tmp_path / "sandbox.log")
    yield server
    server.stop()


def most_in_a_second(times: list[float]) -> int:
    """The largest number of ``times`` in any 1-second window."""
    ordered = sorted(times)
    most, first = 0, 0
    for last, t in enumerate(ordered):
        while ordered[first] <= t - 1.0:
            first += 1
        most = max(most, last - first + 1)
    return most


def flow_run_named(name: str) -> FlowRun | None:
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))
    return runs[0] if runs else None


def bar_counts(influxdb_url: str, database: str) -> dict[str, int]:
    """Stored bars per symbol, counted by influxd itself."""
    query = 'SELECT count("close") FROM "bars" GROUP BY "symbol"'
    answer = httpx.get(f"{influxdb_url}/query", params={"db": database, "q": query}, timeout=30).json()
    series = answer["results"][0].get("series", [])
    return {s["tags"]["symbol"]: int(s["values"][0][1]) for s in series}


@pytest.mark.serial
def test_200_symbols_in_4_shards_keep_the_pace_and_a_killed_shard_is_retried_alone(
    prefect_env: dict[str, str], influxdb_url: str, paced_sandbox: Sandbox, tmp_path: Path
) -> None:
    began = time.monotonic()
    symbols = [f"SH{i:03d}" for i in range(200)]
    shards = partition(symbols, SHARDS)
    shard_of = {symbol: number for number, part in enumerate(shards, 1) for symbol in part}
    pacing = tmp_path / "pacing"
    database = "sharded"
    env = {
        **prefect_env,
        "MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__BASE_URL": paced_sandbox.base_url,
        "MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__RATE_LIMIT": str(LIMIT_PER_SECOND * 3600),
        "MARKETPIPE__COLLECTION__RATE_LIMIT_DIR": str(pacing),
        "MARKETPIPE__STORAGE__BACKEND": "influxdb_v1",
        "MARKETPIPE__STORAGE__INFLUXDB_V1__URL": influxdb_url,
        "MARKETPIPE__STORAGE__INFLUXDB_V1__DATABASE": database,
        "PREFECT_WORKER_QUERY_SECONDS": "1",
    }
    pool = prefect("work-pool", "create", "marketpipe-local", "--type", "process", "--overwrite", env=env)
    assert pool.returncode == 0, pool.stdout + pool.stderr
    deployed = prefect("--no-prompt", "deploy", "--all", "--prefect-file", "prefect.local.yaml", env=env)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    logs = [(tmp_path / f"worker-{n}.log").open("w") for n in (1, 2)]
    workers = [
        subprocess.Popen(
            [str(BIN / "prefect"), "worker", "start", "--pool", "marketpipe-local", "--type", "process"],
            env=env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        for log in logs
    ]
    try:
        started = prefect(
            "deployment", "run", "market-data-sharded/market-data-sharded",
            "-p", f"symbols={json.dumps(symbols)}", "-p", f"shards={SHARDS}", "-p", "start=2024-01-01",
            "-p", "end=2024-03-29", "-p", "poll_interval=1", env=env,
        )  # fmt: skip
        assert started.returncode == 0, started.stdout + started.stderr
        parent_id = UUID(re.search(r"UUID: ([0-9a-f-]{36})", started.stdout)[1])  # type: ignore[index]

        # Kill shard 2's flow-run process (what losing its pod does) once it has sent some requests.
        victim = "market-data-yahoo_finance-1d-shard-2-of-4"
        deadline = time.monotonic() + 150
        while True:
            assert time.monotonic() < deadline, "shard 2 never got going"
            sent = sum(1 for r in paced_sandbox.requests() if shard_of.get(r["symbol"]) == 2)
            run = flow_run_named(victim)
            if sent >= 15 and run is not None and run.infrastructure_pid:
                assert sent < len(shards[1]), "shard 2 finished before it could be killed"
                os.kill(int(run.infrastructure_pid), signal.SIGKILL)
                break
            time.sleep(0.2)
        killed = wait_until_final(run.id, timeout=60)
        assert killed.state is not None and killed.state.is_crashed(), killed.state

        parent = wait_until_final(parent_id, timeout=150)
        assert parent.state is not None and parent.state.is_completed(), parent.state
    finally:
        for worker in workers:
            stop(worker)
        for log in logs:
            log.close()

    # Only the killed shard ran again, and its retry completed.
    retried = flow_run_named(f"{victim}-retry-1")
    assert retried is not None and retried.state is not None and retried.state.is_completed(), retried
    for number in (1, 3, 4):
        assert flow_run_named(f"market-data-yahoo_finance-1d-shard-{number}-of-4-retry-1") is None

    # One summary over all 200 symbols, every one stored, each weekday's bar exactly once.
    with get_client(sync_client=True) as client:
        (summary,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[parent_id]))
        )
    rows: list[dict[str, Any]] = json.loads(str(summary.data))
    assert sorted(r["symbol"] for r in rows) == symbols
    assert {r["status"] for r in rows} == {"ok"}
    assert all(r["rows_written"] == 65 for r in rows)  # weekdays of 2024-01-01..2024-03-29
    assert bar_counts(influxdb_url, database) == dict.fromkeys(symbols, 65)

    # The pace held across all shards together, and each shard kept to its share in its own state.
    requests = paced_sandbox.requests()
    assert not [r for r in requests if r.get("rate_limited")], "the sandbox refused requests as too fast"
    assert {r["symbol"] for r in requests} == set(symbols)
    together = most_in_a_second([r["t"] for r in requests])
    assert together <= LIMIT_PER_SECOND
    assert together > LIMIT_PER_SECOND // SHARDS, "the shards did not run side by side"
    for number in range(1, SHARDS + 1):
        own = [r["t"] for r in requests if shard_of[r["symbol"]] == number]
        assert most_in_a_second(own) <= LIMIT_PER_SECOND // SHARDS, number
        state = json.loads((pacing / f"yahoo_finance.shard-{number}-of-4.json").read_text())
        # Every request the shard sent was counted in its own file; a slot the killed process took
        # but never sent is counted too.
        assert 0 <= state["count"] - len(own) <= 8, (number, state["count"], len(own))
    assert sorted(p.name for p in pacing.glob("*.json")) == [f"yahoo_finance.shard-{n}-of-4.json" for n in (1, 2, 3, 4)]
    assert time.monotonic() - began < 240
