"""What only the InfluxDB v1 backend does: a server that is down or stops mid-run, and the CLI reading from it."""

from __future__ import annotations

import os
import subprocess
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

from blocks.influx_measurements import PRECISION
from blocks.influxdb_v1_store import InfluxDBV1Store
from blocks.spool import Spool
from blocks.store import BARS, SeriesSpan, StoreError, StoreUnavailableError, dropped_by_retention, series_spans
from tasks.bars import conform_actions
from tests.conftest import Sandbox, marketpipe, query_csv
from tests.servers import free_port, influxdb_process, influxdb_server
from tests.test_store_conformance import frame, quarantined


def test_a_server_that_is_down_fails_the_write_loudly_after_retrying() -> None:
    store = InfluxDBV1Store(
        url=f"http://127.0.0.1:{free_port()}", database="x", password="s3cret-pass", username="u", write_attempts=2
    )
    started = time.monotonic()
    with pytest.raises(StoreError, match="unreachable") as caught:
        store.write_bars(frame(n=3))
    assert time.monotonic() - started < 30
    assert "s3cret-pass" not in str(caught.value)


def test_marketpipe_query_reads_from_influxdb_v1(influxdb_url: str) -> None:
    database = f"cli_{uuid.uuid4().hex[:12]}"
    written = frame("BRK-B", n=5)
    InfluxDBV1Store(url=influxdb_url, database=database).write_bars(written)
    env = {
        **os.environ,
        "MARKETPIPE__STORAGE__BACKEND": "influxdb_v1",
        "MARKETPIPE__STORAGE__INFLUXDB_V1__URL": influxdb_url,
        "MARKETPIPE__STORAGE__INFLUXDB_V1__DATABASE": database,
    }
    rows = query_csv(env, "BRK-B")
    assert list(rows["time"]) == [t.strftime("%Y-%m-%dT%H:%M:%SZ") for t in written["time"]]
    # CSV text and pandas' fast float parser may differ in the last ulp; exactness is the conformance suite's.
    np.testing.assert_allclose(rows["close"], written["close"], rtol=1e-15, atol=0)


def test_retention_sets_the_default_policy_and_a_second_run_changes_nothing(influxdb_url: str) -> None:
    database = f"rp_{uuid.uuid4().hex[:12]}"
    store = InfluxDBV1Store(url=influxdb_url, database=database)
    assert str(store.apply_retention("52w")).startswith("updated: retention policy autogen")
    assert str(store.apply_retention("52w")).startswith("unchanged")
    assert str(store.apply_retention("365d")).startswith("updated")
    policies = httpx.get(f"{influxdb_url}/query", params={"q": f'SHOW RETENTION POLICIES ON "{database}"'}).json()[
        "results"
    ][0]["series"][0]
    autogen = dict(zip(policies["columns"], policies["values"][0], strict=True))
    assert (autogen["name"], autogen["duration"], autogen["default"]) == ("autogen", "8760h0m0s", True)


def test_retention_creates_a_named_policy_when_missing(influxdb_url: str) -> None:
    database = f"rp_{uuid.uuid4().hex[:12]}"
    store = InfluxDBV1Store(url=influxdb_url, database=database, retention_policy="bars_1y")
    assert str(store.apply_retention("365d")).startswith("created: retention policy bars_1y")
    store.write_bars(frame(n=3, start=(pd.Timestamp.now(tz="UTC") - pd.Timedelta(days=3)).strftime("%Y-%m-%d")))
    assert len(store.read_bars("BRK-B")) == 3


FAULT_SYMBOLS = ("AAPL", "MSFT", "GOOGL", "AMZN", "NVDA")


def test_influxd_stopped_mid_run_spools_and_replay_matches_a_run_without_the_fault(
    prefect_env: dict[str, str], sandbox: Sandbox, tmp_path: Path
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **prefect_env,
        "MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__BASE_URL": sandbox.base_url,
        "MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__RATE_LIMIT": "3600",  # one request a second: symbols land apart
        "MARKETPIPE__COLLECTION__RATE_LIMIT_DIR": str(tmp_path / "pacing"),
        "MARKETPIPE__STORAGE__BACKEND": "influxdb_v1",
        "MARKETPIPE__STORAGE__INFLUXDB_V1__URL": url,
    }
    run = ("run", "--symbols", ",".join(FAULT_SYMBOLS), "--start", "2024-01-01", "--end", "2024-06-28")
    faulted = {**env, "MARKETPIPE__STORAGE__INFLUXDB_V1__DATABASE": "faulted"}
    home = tmp_path / "influxd"

    with influxdb_process(home, port) as influxd:
        stopped = threading.Event()
        watcher = threading.Thread(target=_stop_once_bars_land, args=(influxd, url, "faulted", stopped))
        watcher.start()
        result = marketpipe(*run, env=faulted)
        watcher.join()
    assert stopped.is_set(), "influxd was never stopped: no bars landed"
    assert result.returncode == 1, result.stdout + result.stderr
    assert "points are spooled in" in result.stdout and "marketpipe replay" in result.stdout
    spooled = Spool(env["MARKETPIPE__STORAGE__SPOOL_DIR"])
    pending = spooled.points()
    assert pending > 0

    with influxdb_process(home, port):
        replayed = marketpipe("replay", env=faulted)
        assert replayed.returncode == 0, replayed.stdout + replayed.stderr
        assert f"replayed {pending} points" in replayed.stdout
        assert spooled.pending() == []
        assert marketpipe("replay", env=faulted).stdout.startswith("nothing spooled")

        clean = marketpipe(*run, env={**env, "MARKETPIPE__STORAGE__INFLUXDB_V1__DATABASE": "clean"})
        assert clean.returncode == 0, clean.stdout + clean.stderr
        for symbol in FAULT_SYMBOLS:
            after_fault = InfluxDBV1Store(url=url, database="faulted").read_bars(symbol)
            without_fault = InfluxDBV1Store(url=url, database="clean").read_bars(symbol)
            assert len(without_fault) == 130
            pd.testing.assert_frame_equal(after_fault, without_fault, check_exact=True)


def _stop_once_bars_land(influxd: subprocess.Popen[bytes], url: str, database: str, stopped: threading.Event) -> None:
    """Stop the server as soon as the first symbol's bars are stored: the rest of the run finds it gone."""
    query = {"db": database, "q": "SELECT count(close) FROM bars"}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/query", params=query, timeout=2).json()["results"][0].get("series"):
                influxd.terminate()
                influxd.wait(timeout=20)
                stopped.set()
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)


def test_rewrites_in_threads_lose_nothing(influxdb_url: str) -> None:
    """influxd 1.6 drops points written while a DELETE of other series runs; the store keeps them apart.

    Without that, S0 read back empty here: its write overlapped W0's or W1's delete.
    """
    store = InfluxDBV1Store(url=influxdb_url, database=f"apart_{uuid.uuid4().hex[:8]}", write_attempts=1)
    done = threading.Event()
    errors: list[BaseException] = []

    def rewrite_until_done(symbol: str) -> None:
        n = 0
        try:
            while not done.is_set():
                n += 1
                store.write_bars(frame(symbol, n=5).assign(close=float(n)))
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    others = [threading.Thread(target=rewrite_until_done, args=(f"W{k}",)) for k in range(2)]
    for thread in others:
        thread.start()
    try:
        for i in range(60):
            store.write_bars(frame(f"S{i % 3}", n=5).assign(close=float(i)))
    finally:
        done.set()
        for thread in others:
            thread.join()
    assert errors == []
    for k in range(3):
        last = max(i for i in range(60) if i % 3 == k)
        assert store.read_bars(f"S{k}")["close"].tolist() == [float(last)] * 5, f"S{k}"


def _database_keeping(influxdb_url: str, duration: str) -> InfluxDBV1Store:
    store = InfluxDBV1Store(url=influxdb_url, database=f"rp_{uuid.uuid4().hex[:12]}")
    store.apply_retention(duration)
    return store


def test_a_write_partly_beyond_the_retention_policy_stores_the_rest_and_counts_the_dropped(influxdb_url: str) -> None:
    store = _database_keeping(influxdb_url, "365d")
    today = pd.Timestamp.now(tz="UTC").normalize()
    bars = frame(n=730, start=(today - pd.Timedelta(days=729)).strftime("%Y-%m-%d"))
    cutoff = pd.Timestamp.now(tz="UTC") - pd.Timedelta(days=365)
    written = store.write_bars(bars)
    dropped = dropped_by_retention(written)
    # influxd drops what is older than now - 365d unless a shard group made for the same write
    # (7 days here) reaches back over it: every bar inside is kept, and a few just outside.
    assert written + dropped == len(bars)
    assert len(bars.loc[bars["time"] < cutoff]) - 7 <= dropped <= len(bars.loc[bars["time"] < cutoff])
    assert list(store.read_bars("BRK-B")["time"]) == list(bars["time"].iloc[dropped:])

    actions = conform_actions(
        pd.DataFrame(
            {
                "time": [today - pd.Timedelta(days=400), today - pd.Timedelta(days=30)],
                "symbol": "BRK-B",
                "source": "yahoo_finance",
                "kind": "dividend",
                "ratio": float("nan"),
                "amount": [0.5, 0.6],
            }
        )
    )
    kept = store.write_corporate_actions(actions)
    assert (kept, dropped_by_retention(kept)) == (1, 1)
    assert list(store.read_corporate_actions("BRK-B")["amount"]) == [0.6]


def test_a_partial_write_for_another_reason_stays_an_error(influxdb_url: str) -> None:
    store = _database_keeping(influxdb_url, "365d")
    start = (pd.Timestamp.now(tz="UTC") - pd.Timedelta(days=3)).strftime("%Y-%m-%d")
    bars = frame(n=3, start=start)
    conflict = f'bars,symbol=OTHER,interval=1d,source=x close="text" {int(bars["time"].iloc[0].timestamp())}'
    httpx.post(f"{influxdb_url}/write", params={"db": store.database, "precision": "s"}, content=conflict)
    with pytest.raises(StoreError, match="field type conflict") as caught:
        store.write_bars(bars)
    assert not isinstance(caught.value, StoreUnavailableError)


def test_retention_reads_the_policy_writes_go_to(influxdb_url: str) -> None:
    database = f"rp_{uuid.uuid4().hex[:12]}"
    assert InfluxDBV1Store(url=influxdb_url, database=database).retention() is None  # no database yet
    InfluxDBV1Store(url=influxdb_url, database=database).write_bars(frame(n=1))
    assert InfluxDBV1Store(url=influxdb_url, database=database).retention() is None  # autogen keeps everything
    InfluxDBV1Store(url=influxdb_url, database=database, retention_policy="short").apply_retention("720h")
    assert InfluxDBV1Store(url=influxdb_url, database=database).retention() == timedelta(hours=720)  # the default
    named = InfluxDBV1Store(url=influxdb_url, database=database, retention_policy="autogen")
    assert named.retention() is None  # a policy named in the settings is the one written to


def test_reads_are_whole_against_a_max_row_limit_of_100(tmp_path: Path) -> None:
    """influxd cuts a plain answer at `max-row-limit` and marks it partial; reads stream in chunks instead."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with influxdb_process(tmp_path / "influxd", port, max_row_limit=100):
        store = InfluxDBV1Store(url=url, database="capped")
        bars = frame(n=300)
        assert store.write_bars(bars) == 300
        plain = httpx.get(f"{url}/query", params={"db": "capped", "q": "SELECT * FROM bars"}).json()["results"][0]
        plain = plain["series"][0]
        assert (len(plain["values"]), plain.get("partial")) == (100, True)  # what a plain read gets

        read = store.read_bars("BRK-B")
        assert list(read["time"]) == list(bars["time"])
        env = {
            **os.environ,
            "MARKETPIPE__STORAGE__BACKEND": "influxdb_v1",
            "MARKETPIPE__STORAGE__INFLUXDB_V1__URL": url,
            "MARKETPIPE__STORAGE__INFLUXDB_V1__DATABASE": "capped",
        }
        printed = query_csv(env, "BRK-B")
        assert list(pd.to_datetime(printed["time"], utc=True)) == list(bars["time"])


def test_a_rerun_after_series_were_emptied_reads_back_whole(tmp_path: Path) -> None:
    """What a rerun after a `kill -9` between a write's DELETE and its points meets: influxd 1.6 hid
    series rewritten with DELETE-then-write a few seconds after other series were emptied, until it
    restarted (influxdb#9431). A rewrite of the same bars now sends no DELETE."""
    with influxdb_server(tmp_path / "influxd") as url:
        store = InfluxDBV1Store(url=url, database="rerun")
        series = [frame(f"S{k:02d}", n=260) for k in range(24)]
        for bars in series:
            store.write_bars(bars)
        store._delete(BARS.name, series_spans(pd.concat(series[:4]), PRECISION))  # what the killed run left
        time.sleep(3)
        for bars in series:
            store.write_bars(bars)
        for bars in series:
            assert list(store.read_bars(bars["symbol"].iloc[0])["time"]) == list(bars["time"]), bars["symbol"].iloc[0]


def test_a_quarantine_write_deletes_only_bars_the_store_holds(
    influxdb_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first run writes its clean bars, then the ones validation set aside, whose keys it takes out
    of bars. Into an empty store that DELETE has nothing to take, and sending it anyway once left a
    week of the clean bars unreadable in CI: it is not sent. A rerun whose bars write still holds
    the bar sends it, and the bar leaves bars."""
    sent: list[tuple[str, int]] = []
    delete = InfluxDBV1Store._delete

    def counted(store: InfluxDBV1Store, measurement: str, spans: list[SeriesSpan]) -> None:
        sent.append((measurement, len(spans)))
        delete(store, measurement, spans)

    monkeypatch.setattr(InfluxDBV1Store, "_delete", counted)
    store = InfluxDBV1Store(url=influxdb_url, database=f"aside_{uuid.uuid4().hex[:8]}")
    bars = frame("QQQ", n=253)
    aside = quarantined(bars.iloc[[100]])
    store.write_bars(bars.drop(index=100))
    store.write_quarantine(aside)
    assert sent == []
    assert len(store.read_bars("QQQ")) == 252 and len(store.read_quarantine("QQQ")) == 1

    store.write_bars(bars.iloc[95:105])  # a source that served the bar clean again ...
    store.write_quarantine(aside)  # ... and a validation that sets it aside once more
    assert ("bars", 1) in sent
    assert list(store.read_bars("QQQ")["time"]) == list(bars.drop(index=100)["time"])
