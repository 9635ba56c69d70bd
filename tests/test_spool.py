"""The spool itself: durable files in append order, replay that sets aside what the store refuses for
good and stops when the store is away, loud failure when nothing can keep the rows, and all of it
under threads and processes sharing one spool. Each backend's spool-and-replay is in the conformance suite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pandas as pd
import pytest

from blocks.duckdb_store import DuckDBStore
from blocks.influxdb_v1_store import InfluxDBV1Store
from blocks.spool import Spool, Written
from blocks.store import BarStore, StoreError
from configs.settings import Settings, load_settings
from tests import spool_load
from tests.conftest import REPO, Sandbox, marketpipe
from tests.test_store_conformance import frame, unavailable


@pytest.fixture
def store(tmp_path: Path) -> DuckDBStore:
    return DuckDBStore(path=str(tmp_path / "bars.duckdb"))


def test_batches_are_listed_in_write_order_and_a_half_written_file_is_not(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    first = spool.append("bars", frame("A", n=3))
    second = spool.append("quarantine", frame("B", n=2).assign(rule="off_grid", reason="x"))
    (tmp_path / f".{first.path.name}.partial").write_bytes(b"torn")
    assert [(b.path, b.kind, b.points) for b in spool.pending()] == [
        (first.path, "bars", 3),
        (second.path, "quarantine", 2),
    ]
    assert spool.points() == 5


def test_a_batch_the_store_refuses_for_good_is_set_aside_and_the_rest_replay(
    tmp_path: Path, store: DuckDBStore
) -> None:
    spool = Spool(tmp_path / "spool")
    refused = spool.append("bars", frame(n=3).drop(columns=["source"]))  # no key: no store can take it
    spool.append("bars", frame("MSFT", n=4))
    replayed = spool.replay(store)

    (aside,) = replayed.rejected
    assert (replayed.batches, replayed.points) == (1, 4)
    assert (aside.name, aside.kind, aside.points) == (refused.path.name, "bars", 3)
    assert "without key columns: source" in aside.reason
    assert spool.pending() == [] and len(store.read_bars("MSFT")) == 4
    kept = spool.rejected_directory / refused.path.name
    pd.testing.assert_frame_equal(pd.read_parquet(kept), frame(n=3).drop(columns=["source"]))
    assert aside.reason in (spool.rejected_directory / f"{refused.path.name}.reason.txt").read_text()
    # It blocks nothing: the next write goes to the store, and a new refused batch joins the first aside.
    assert spool.write(store, "bars", frame("AAPL", n=5)) == Written(5, 0)
    spool.append("bars", frame(n=2).rename(columns={"close": "Close"}))
    written = spool.write(store, "bars", frame("AAPL", n=6))
    assert (written.written, written.spooled, [b.points for b in written.rejected]) == (6, 0, [2])
    assert "snake_case" in written.rejected[0].reason
    assert len(list(spool.rejected_directory.glob("*.parquet"))) == 2


def test_a_refused_batch_waits_aside_and_one_beyond_retention_replays_on_a_real_influxd(
    influxdb_url: str, tmp_path: Path
) -> None:
    """A field type conflict (`400 partial write: field type conflict`) would fail every replay, so
    that batch waits aside and the next is written. Points older than the retention policy are no
    refusal: InfluxDB 1.x drops them with a partial write, and their batch replays like any other."""
    database = f"rp_{uuid.uuid4().hex[:12]}"
    statements = (
        f"CREATE DATABASE {database}; CREATE RETENTION POLICY year ON {database} DURATION 365d REPLICATION 1 DEFAULT"
    )
    httpx.post(f"{influxdb_url}/query", data={"q": statements}).raise_for_status()
    store = InfluxDBV1Store(url=influxdb_url, database=database)
    # InfluxDB 1.x cuts a 365d policy into 7-day shards that start on Mondays (Go truncates time from
    # 0001-01-01, a Monday): from a Monday, the conflict and the three NVDA days share one shard.
    days_ago = (pd.Timestamp.now(tz="UTC") - pd.Timedelta(days=100)).normalize()
    days_ago -= pd.Timedelta(days=days_ago.dayofweek)
    conflict = f'bars,symbol=OTHER,interval=1d,source=x close="text" {int(days_ago.timestamp())}'
    httpx.post(f"{influxdb_url}/write", params={"db": database, "precision": "s"}, content=conflict).raise_for_status()
    spool = Spool(tmp_path / "spool")
    spool.append("bars", frame("AAPL", n=10))  # 2024: long past the year the policy keeps
    refused = spool.append("bars", frame("NVDA", n=3, start=days_ago.strftime("%Y-%m-%d")))  # same shard as OTHER
    recent = recent_bars("MSFT")
    spool.append("bars", recent)

    replayed = spool.replay(store)
    assert (replayed.batches, replayed.points) == (2, 13)
    assert [(b.name, b.points) for b in replayed.rejected] == [(refused.path.name, 3)]
    assert "field type conflict" in replayed.rejected[0].reason
    assert (spool.rejected_directory / refused.path.name).exists() and spool.pending() == []
    assert store.read_bars("AAPL").empty and store.read_bars("NVDA").empty
    assert store.read_bars("MSFT")["close"].tolist() == recent["close"].tolist()
    later = recent.assign(close=recent["close"] + 1)
    assert spool.write(store, "bars", later) == Written(3, 0)
    assert store.read_bars("MSFT")["close"].tolist() == later["close"].tolist()


def recent_bars(symbol: str) -> pd.DataFrame:
    """Three bars of the last half hour, inside any retention policy."""
    now = pd.Timestamp.now(tz="UTC").floor("s")
    times = pd.DatetimeIndex([now - pd.Timedelta(minutes=m) for m in (30, 20, 10)]).astype("datetime64[ns, UTC]")
    return frame(symbol, n=3).assign(time=times)


def test_a_file_that_is_no_parquet_is_set_aside_too(tmp_path: Path, store: DuckDBStore) -> None:
    spool = Spool(tmp_path / "spool")
    spool.append("bars", frame("MSFT", n=2))
    torn = spool.directory / "00000000000000000000-0123456789ab.bars.parquet"  # sorts first
    torn.write_bytes(b"not parquet")
    assert [b.points for b in spool.pending()] == [0, 2]
    replayed = spool.replay(store)
    assert [b.name for b in replayed.rejected] == [torn.name]
    assert "cannot be read" in replayed.rejected[0].reason
    assert replayed.points == 2 and len(store.read_bars("MSFT")) == 2


def test_marketpipe_replay_names_each_batch_it_set_aside_and_exits_1(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "MARKETPIPE__STORAGE__DUCKDB__PATH": str(tmp_path / "store.duckdb"),
        "MARKETPIPE__STORAGE__SPOOL_DIR": str(tmp_path / "spool"),
    }
    spool = Spool(tmp_path / "spool")
    refused = spool.append("bars", frame(n=3).drop(columns=["source"]))
    spool.append("bars", frame("MSFT", n=4))
    replayed = marketpipe("replay", env=env)
    assert replayed.returncode == 1, replayed.stdout + replayed.stderr
    assert "replayed 4 points in 1 batch(es)" in replayed.stdout
    reason = "cannot store bars without key columns: source"
    assert f"set aside {refused.path.name} (3 bars rows): {reason}" in replayed.stdout
    assert f"were set aside in {spool.rejected_directory}" in replayed.stdout
    again = marketpipe("replay", env=env)  # what is set aside is not in the way, nor replayed again
    assert (again.returncode, again.stdout.startswith("nothing spooled")) == (0, True)
    assert len(DuckDBStore(path=env["MARKETPIPE__STORAGE__DUCKDB__PATH"]).read_bars("MSFT")) == 4


def test_a_run_sets_a_refused_batch_aside_reports_and_counts_it_and_stores_the_rest(
    prefect_env: dict[str, str], sandbox: Sandbox
) -> None:
    env = {**prefect_env, "MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__BASE_URL": sandbox.base_url}
    spool = Spool(env["MARKETPIPE__STORAGE__SPOOL_DIR"])
    refused = spool.append("bars", frame("MSFT", n=3).drop(columns=["source"]))
    spool.append("bars", frame("BRK-B", n=5))
    result = marketpipe("run", "--symbols", "AAPL", "--start", "2024-01-01", "--end", "2024-01-31", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    line = f"1 spooled batch(es) refused by the store were set aside in {spool.directory}/rejected: {refused.path.name}"
    assert line in result.stdout
    store = DuckDBStore(path=env["MARKETPIPE__STORAGE__DUCKDB__PATH"])
    assert len(store.read_bars("BRK-B")) == 5 and len(store.read_bars("AAPL")) == 23
    assert store.read_metrics("AAPL")["spool_rejected"].tolist() == [1.0]
    assert spool.pending() == [] and (spool.rejected_directory / refused.path.name).exists()

    again = marketpipe("run", "--symbols", "AAPL", "--start", "2024-01-01", "--end", "2024-01-31", env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "refused by the store" not in again.stdout
    assert store.read_metrics("AAPL")["spool_rejected"].tolist() == [1.0, 0.0]


def test_names_follow_the_spools_own_sequence_not_a_clock(tmp_path: Path) -> None:
    """Two hosts' clocks may disagree; the order is the order batches were appended to this spool.
    A batch named by an older version (nanoseconds) or a lost counter never sorts after a new one."""
    legacy = tmp_path / f"{1_700_000_000_000_000_000:020d}-0123456789ab.bars.parquet"
    Spool(tmp_path).append("bars", frame(n=1)).path.rename(legacy)
    first = Spool(tmp_path).append("bars", frame(n=2))
    second = Spool(tmp_path).append("bars", frame(n=3))  # another instance: another host, say
    (tmp_path / ".sequence").unlink()
    third = Spool(tmp_path).append("bars", frame(n=4))
    assert [b.path for b in Spool(tmp_path).pending()] == [legacy, first.path, second.path, third.path]
    assert first.path.name.startswith(f"{1_700_000_000_000_000_001:020d}-")


def test_threads_appending_replaying_and_writing_at_once_write_each_batch_once_in_order(tmp_path: Path) -> None:
    """16 threads on one spool and one DuckDB file: 8 append, 7 replay, 1 writes through the spool."""
    store = DuckDBStore(path=str(tmp_path / "bars.duckdb"))
    load = spool_load.run(tmp_path / "spool", store, worker=0, appenders=8, replayers=7, batches=10)
    assert load.errors == []
    assert_replayed_once_in_order(tmp_path / "spool", store, [load])


def test_two_processes_of_threads_share_one_spool_on_a_real_influxd(influxdb_url: str, tmp_path: Path) -> None:
    """Two processes, 8 threads each (4 append, 3 replay, 1 writes through the spool), one spool
    directory, one InfluxDB: every batch lands once, in the order it was appended."""
    database, go = f"spool_{uuid.uuid4().hex[:12]}", tmp_path / "go"
    args = ["--spool", str(tmp_path / "spool"), "--url", influxdb_url, "--database", database, "--go", str(go)]
    args += ["--kind", "pipeline_metrics", "--appenders", "4", "--replayers", "3", "--batches", "10"]
    command = [sys.executable, "-m", "tests.spool_load", *args]
    workers = [
        subprocess.Popen(
            [*command, "--worker", str(n)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for n in (1, 2)
    ]
    for worker in workers:
        assert worker.stdout is not None and worker.stdout.readline().strip() == "ready"
    go.touch()
    loads = []
    for worker in workers:
        out, err = worker.communicate(timeout=90)
        assert worker.returncode == 0, err
        loads.append(spool_load.Load(**json.loads(out)))
    assert [e for load in loads for e in load.errors] == []
    store = InfluxDBV1Store(url=influxdb_url, database=database)
    assert_replayed_once_in_order(tmp_path / "spool", store, loads, "pipeline_metrics")


def assert_replayed_once_in_order(
    directory: Path, store: BarStore, loads: list[spool_load.Load], kind: str = "bars"
) -> None:
    """Every appended batch was written back exactly once, in append order, and for each symbol the
    store holds the last appended batch; the writers' own writes are there too."""
    appended = sorted(a for load in loads for a in load.appended)  # names sort in append order
    final = spool_load.Load()
    leftover = spool_load.tagged_spool(directory, final, kind).replay(store)
    assert leftover.batches == 0  # the replayers left nothing behind
    assert not (directory / "rejected").exists()
    replayed = [ident for _, ident in sorted(r for load in loads for r in load.replayed)]
    assert sorted(replayed) == sorted(ident for _, ident, _, _ in appended)
    assert len(set(replayed)) == len(replayed), "a batch was written twice"
    assert replayed == [ident for _, ident, _, _ in appended], "batches were written out of append order"
    for symbol in spool_load.SYMBOLS:
        last = [close for _, _, s, close in appended if s == symbol][-1]
        assert spool_load.closes(store, symbol, kind) == [last] * 5, symbol
    for load in loads:
        for symbol, close in load.written.items():
            assert spool_load.closes(store, symbol, kind) == [close] * 5, symbol


def test_rows_neither_store_nor_spool_can_take_fail_loudly(tmp_path: Path, store: DuckDBStore) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    spool = Spool(blocker / "spool")
    with unavailable(store) as down, pytest.raises(StoreError, match="could not be spooled") as failed:
        spool.write(down, "bars", frame(n=3))
    assert "Conflicting lock" in str(failed.value)


def test_an_empty_frame_touches_neither_store_nor_spool(tmp_path: Path, store: DuckDBStore) -> None:
    spool = Spool(tmp_path / "spool")
    with unavailable(store) as down:
        assert spool.write(down, "bars", frame(n=0)) == Written(0, 0)
    assert not (tmp_path / "spool").exists()


def test_settings(tmp_path: Path) -> Settings:
    settings = load_settings(None)
    storage = settings.storage.model_copy(update={"spool_dir": str(tmp_path / "spool")})
    return settings.model_copy(update={"storage": storage})


test_settings.__test__ = False  # type: ignore[attr-defined]
