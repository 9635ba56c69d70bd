"""One conformance suite for every store backend: a real DuckDB file and real InfluxDB 1.x and 2.x servers.

Each test gets an empty store: a fresh DuckDB file, a fresh database on the session's `influxd`, or a
fresh bucket on the InfluxDB 2.x server that INFLUXDB_URL and INFLUXDB_TOKEN name (skipped without them).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import pytest
from influxdb_client.client.influxdb_client import InfluxDBClient

from blocks.duckdb_store import DuckDBStore
from blocks.influxdb_store import InfluxDBStore
from blocks.influxdb_v1_store import InfluxDBV1Store
from blocks.spool import Replayed, Spool, Written
from blocks.store import BarStore, StoreError
from tasks.bars import conform, conform_actions
from tests.servers import free_port


def frame(symbol: str = "BRK-B", n: int = 30, source: str = "yahoo_finance", start: str = "2024-01-01") -> pd.DataFrame:
    rng = np.random.default_rng(7)
    close = 100 + rng.normal(0, 1, n).cumsum()
    data = conform(
        pd.DataFrame(
            {
                "time": pd.date_range(start, periods=n, freq="D", tz="UTC"),
                "symbol": symbol,
                "interval": "1d",
                "source": source,
                "open": close - 0.5,
                "high": close + 1,
                "low": close - 1,
                "close": close,
                "adj_close": close * 0.99,
                "volume": rng.integers(1, 10**9, n).astype(float),
            }
        )
    )
    warmup = min(14, n)
    data["rsi_14"] = np.r_[np.full(warmup, np.nan), rng.uniform(0, 100, n - warmup)]
    return data


@pytest.fixture(params=["duckdb", "influxdb_v1", "influxdb"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BarStore]:
    if request.param == "duckdb":
        yield DuckDBStore(path=str(tmp_path / "sub" / "bars.duckdb"))
    elif request.param == "influxdb_v1":
        url: str = request.getfixturevalue("influxdb_url")
        yield InfluxDBV1Store(url=url, database=f"test_{uuid.uuid4().hex[:12]}")
    else:
        v2 = influxdb_v2_store()
        yield v2
        bucket = influxdb_v2_bucket(v2)
        if bucket is not None:
            with influxdb_v2_client(v2) as client:
                client.buckets_api().delete_bucket(bucket)


def influxdb_v2_store() -> InfluxDBStore:
    url, token = os.environ.get("INFLUXDB_URL"), os.environ.get("INFLUXDB_TOKEN")
    if not (url and token):
        pytest.skip("InfluxDB 2.x conformance needs INFLUXDB_URL and INFLUXDB_TOKEN of a real server")
    org = os.environ.get("INFLUXDB_ORG", "marketpipe")
    return InfluxDBStore(url=url, token=token, org=org, bucket=f"test_{uuid.uuid4().hex[:12]}")


def influxdb_v2_client(store: InfluxDBStore) -> InfluxDBClient:
    return InfluxDBClient(url=store.url, token=store.token.get_secret_value(), org=store.org)


def influxdb_v2_bucket(store: InfluxDBStore) -> Any:
    """The store's bucket as the server describes it; None until something created it."""
    with influxdb_v2_client(store) as client:
        return client.buckets_api().find_bucket_by_name(store.bucket)


def test_it_is_a_bar_store(store: BarStore) -> None:
    assert isinstance(store, BarStore)


def test_round_trip_keeps_every_column_and_value(store: BarStore) -> None:
    written = frame()
    assert store.write_bars(written) == 30
    read = store.read_bars("BRK-B", "1d")
    assert sorted(read.columns) == sorted(written.columns)
    assert list(read.columns[:4]) == ["time", "symbol", "interval", "source"]
    pd.testing.assert_frame_equal(read[list(written.columns)], written, check_exact=True)


def test_nan_is_stored_as_null_not_zero(store: BarStore) -> None:
    store.write_bars(frame())
    read = store.read_bars("BRK-B")
    assert read["rsi_14"].iloc[:14].isna().all()
    assert (read["rsi_14"].iloc[14:] > 0).all()


def test_writing_again_overwrites_instead_of_duplicating(store: BarStore) -> None:
    first = frame()
    store.write_bars(first)
    second = first.copy()
    second.loc[5:, "close"] += 1.0
    store.write_bars(second)
    store.write_bars(second)
    read = store.read_bars("BRK-B")
    assert len(read) == 30
    np.testing.assert_array_equal(read["close"].to_numpy(), second["close"].to_numpy())


def test_series_are_kept_apart_by_symbol_interval_and_source(store: BarStore) -> None:
    store.write_bars(frame("AAPL"))
    store.write_bars(frame("AAPL", source="files"))
    store.write_bars(frame("MSFT", n=20))
    assert len(store.read_bars("AAPL")) == 60
    assert len(store.read_bars("AAPL", source="files")) == 30
    assert len(store.read_bars("MSFT")) == 20
    assert store.read_bars("AAPL", "1h").empty


def test_read_range_is_start_inclusive_end_exclusive(store: BarStore) -> None:
    store.write_bars(frame())
    read = store.read_bars(
        "BRK-B", start=pd.Timestamp("2024-01-05", tz="UTC"), end=pd.Timestamp("2024-01-10", tz="UTC")
    )
    assert list(read["time"].dt.day) == [5, 6, 7, 8, 9]


def test_last_timestamp(store: BarStore) -> None:
    assert store.last_timestamp("BRK-B", "1d", "yahoo_finance") is None
    store.write_bars(frame())
    assert store.last_timestamp("BRK-B", "1d", "yahoo_finance") == pd.Timestamp("2024-01-30", tz="UTC")
    assert store.last_timestamp("BRK-B", "1d", "files") is None


def test_first_timestamp(store: BarStore) -> None:
    assert store.first_timestamp("BRK-B", "1d", "yahoo_finance") is None
    store.write_bars(frame(n=5, start="2024-03-01"))
    store.write_bars(frame(n=5, start="2024-01-01"))
    assert store.first_timestamp("BRK-B", "1d", "yahoo_finance") == pd.Timestamp("2024-01-01", tz="UTC")
    assert store.first_timestamp("BRK-B", "1d", "files") is None
    assert store.first_timestamp("BRK-B", "1h", "yahoo_finance") is None


# --- a rewrite replaces: every backend stores exactly what the latest write of a bar says ------


def one_bar(close: float, adj_close: float, sma_20: float, symbol: str = "BRK-B") -> pd.DataFrame:
    bar = frame(symbol, n=1, start="2024-01-10").drop(columns=["rsi_14"])
    return bar.assign(close=close, adj_close=adj_close, sma_20=sma_20)


def quarantined(bars: pd.DataFrame, rule: str = "ohlc_inconsistent") -> pd.DataFrame:
    return bars.assign(rule=rule, reason=f"broke {rule}")


def test_a_rewrite_with_fewer_fields_reads_back_exactly_the_rewrite(store: BarStore) -> None:
    store.write_bars(one_bar(100.0, 99.0, 97.5))
    store.write_bars(one_bar(101.0, np.nan, np.nan))
    read = store.read_bars("BRK-B")
    assert len(read) == 1
    assert read["close"].iloc[0] == 101.0
    assert read["adj_close"].isna().all() and read["sma_20"].isna().all()


def test_one_write_of_many_series_over_one_range_clears_each_as_it_needs(store: BarStore) -> None:
    """Real time writes the same minute of every symbol at once: a store may check them together."""
    store.write_bars(one_bar(100.0, 99.0, 97.5, "AAA"))  # a field the rewrite leaves out must go
    store.write_bars(one_bar(100.0, 99.0, 97.5, "BBB"))  # rewritten whole: nothing to clear
    store.write_quarantine(quarantined(one_bar(100.0, 99.0, 97.5, "CCC")))  # the clean bar supersedes it
    store.write_bars(one_bar(100.0, 99.0, 97.5, "EEE"))  # not in the write: untouched
    store.write_bars(
        pd.concat(
            [
                one_bar(101.0, np.nan, 98.0, "AAA"),
                one_bar(102.0, 98.0, 96.0, "BBB"),
                one_bar(103.0, 97.0, 95.0, "CCC"),
                one_bar(104.0, 96.0, 94.0, "DDD"),  # nothing stored yet
            ],
            ignore_index=True,
        )
    )
    read = {symbol: store.read_bars(symbol) for symbol in ("AAA", "BBB", "CCC", "DDD", "EEE")}
    assert [len(bars) for bars in read.values()] == [1, 1, 1, 1, 1]
    assert read["AAA"]["adj_close"].isna().all() and read["AAA"]["sma_20"].tolist() == [98.0]
    assert [read[s]["close"].iloc[0] for s in read] == [101.0, 102.0, 103.0, 104.0, 100.0]
    assert read["BBB"]["adj_close"].tolist() == [98.0]
    assert store.read_quarantine("CCC").empty


def test_a_bar_quarantined_on_a_later_write_leaves_bars(store: BarStore) -> None:
    first = frame(n=10)
    store.write_bars(first)
    later = first.drop(index=4).reset_index(drop=True)
    store.write_bars(later)
    store.write_quarantine(quarantined(first.iloc[[4]].drop(columns=["rsi_14"])))
    assert pd.Timestamp("2024-01-05", tz="UTC") not in set(store.read_bars("BRK-B")["time"])
    assert len(store.read_bars("BRK-B")) == 9
    assert store.read_quarantine("BRK-B")["time"].tolist() == [pd.Timestamp("2024-01-05", tz="UTC")]


def test_a_quarantined_bar_outside_the_bars_range_leaves_bars_too(store: BarStore) -> None:
    first = frame(n=10)
    store.write_bars(first)
    store.write_bars(first.iloc[:9])  # the last bar is quarantined by this run: outside its bars' range
    store.write_quarantine(quarantined(first.iloc[[9]].drop(columns=["rsi_14"])))
    assert store.read_bars("BRK-B")["time"].max() == pd.Timestamp("2024-01-09", tz="UTC")
    assert len(store.read_quarantine("BRK-B")) == 1


def test_a_bar_absent_inside_a_later_writes_range_is_gone(store: BarStore) -> None:
    first = frame(n=10)
    store.write_bars(first)
    store.write_bars(first.drop(index=[3, 6]))  # dropped by the run's missing-bar policy, say
    assert list(store.read_bars("BRK-B")["time"].dt.day) == [1, 2, 3, 5, 6, 8, 9, 10]


def test_a_quarantined_bar_written_clean_later_leaves_quarantine(store: BarStore) -> None:
    bars = frame(n=20)
    store.write_bars(bars.drop(index=4))
    store.write_quarantine(quarantined(bars.iloc[[4]].drop(columns=["rsi_14"])))
    store.write_bars(bars)  # the source corrected it
    assert store.read_quarantine("BRK-B").empty
    pd.testing.assert_frame_equal(store.read_bars("BRK-B")[list(bars.columns)], bars, check_exact=True)


def test_a_bar_quarantined_again_keeps_only_the_latest_rules(store: BarStore) -> None:
    bar = frame(n=1).drop(columns=["rsi_14"])
    store.write_quarantine(quarantined(bar, "ohlc_inconsistent"))
    store.write_quarantine(quarantined(bar, "negative_volume"))
    assert store.read_quarantine("BRK-B")["rule"].tolist() == ["negative_volume"]


def test_a_superseded_duplicate_in_quarantine_leaves_its_clean_bar_in_bars(store: BarStore) -> None:
    bars = frame(n=3).drop(columns=["rsi_14"])
    store.write_bars(bars)
    earlier = bars.iloc[[1]].assign(close=bars["close"].iloc[1] * 1.001)  # the copy that arrived first
    store.write_quarantine(quarantined(earlier, "duplicate_time"))
    assert store.read_bars("BRK-B")["close"].tolist() == bars["close"].tolist()
    assert store.read_quarantine("BRK-B")["close"].tolist() == earlier["close"].tolist()


def test_bars_outside_the_range_and_other_series_are_untouched(store: BarStore) -> None:
    bars = frame(n=20)
    others = [frame("MSFT", n=20), frame(n=20, source="files"), frame(n=20).assign(interval="1h")]
    for written in (bars, *others):
        store.write_bars(written)
    store.write_quarantine(quarantined(frame("MSFT", n=20).iloc[[7]].drop(columns=["rsi_14"])))
    rewrite = bars.iloc[[5, 9]].assign(close=1.0)  # range 2024-01-06 .. 2024-01-10, three bars absent
    store.write_bars(rewrite)
    read = store.read_bars("BRK-B", source="yahoo_finance")
    assert list(read["time"].dt.day) == [1, 2, 3, 4, 5, 6, 10, *range(11, 21)]
    kept = read.loc[~read["time"].isin(rewrite["time"])].reset_index(drop=True)
    expected = bars.loc[~bars["time"].between(rewrite["time"].min(), rewrite["time"].max())].reset_index(drop=True)
    pd.testing.assert_frame_equal(kept[list(bars.columns)], expected, check_exact=True)
    assert len(store.read_bars("MSFT")) == 19 and len(store.read_quarantine("MSFT")) == 1
    assert len(store.read_bars("BRK-B", source="files")) == 20
    assert len(store.read_bars("BRK-B", "1h")) == 20


def test_a_rewrite_the_store_cannot_take_is_spooled_and_replayed_with_the_same_semantics(
    store: BarStore, tmp_path: Path
) -> None:
    spool = Spool(tmp_path / "spool")
    first = frame(n=10)
    store.write_bars(first)
    store.write_bars(first.iloc[[0]].assign(adj_close=98.0))
    later = first.drop(index=[2, 5]).assign(adj_close=np.nan)
    with unavailable(store) as down:
        assert spool.write(down, "bars", later) == Written(0, 8)
        assert spool.write(down, "quarantine", quarantined(first.iloc[[5]].drop(columns=["rsi_14"]))) == Written(0, 1)
    assert spool.replay(store) == Replayed(batches=2, points=9)
    read = store.read_bars("BRK-B")
    assert list(read["time"].dt.day) == [1, 2, 4, 5, 7, 8, 9, 10]
    assert read["adj_close"].isna().all()
    assert store.read_quarantine("BRK-B")["time"].dt.day.tolist() == [6]


def test_new_indicator_columns_are_added_and_old_rows_read_empty(store: BarStore) -> None:
    store.write_bars(frame(n=20))
    later = frame(n=10, start="2024-02-01").assign(sma_5=1.5)
    store.write_bars(later)
    read = store.read_bars("BRK-B")
    assert "sma_5" in read.columns
    assert read["sma_5"].iloc[:20].isna().all()
    assert (read["sma_5"].iloc[20:] == 1.5).all()


def test_symbol_values_cannot_inject_sql(store: BarStore) -> None:
    store.write_bars(frame())
    assert store.read_bars("BRK-B' OR '1'='1").empty
    assert len(store.read_bars("BRK-B")) == 30


def test_corporate_actions_round_trip_and_upsert(store: BarStore) -> None:
    actions = conform_actions(
        pd.DataFrame(
            {
                "time": pd.to_datetime(["2020-08-31", "2020-08-07"], utc=True),
                "symbol": "AAPL",
                "source": "yahoo_finance",
                "kind": ["split", "dividend"],
                "ratio": [4.0, np.nan],
                "amount": [np.nan, 0.82],
            }
        )
    )
    assert store.write_corporate_actions(actions) == 2
    assert store.write_corporate_actions(actions) == 2
    read = store.read_corporate_actions("AAPL")
    assert list(read["kind"]) == ["dividend", "split"]
    assert read["amount"].iloc[0] == 0.82 and np.isnan(read["amount"].iloc[1])
    assert read["ratio"].iloc[1] == 4.0
    assert store.read_corporate_actions("AAPL", source="files").empty


def test_quarantine_keeps_each_rule_apart_with_its_reason_and_upserts(store: BarStore) -> None:
    bad = frame(n=3).drop(columns=["rsi_14"])
    rows = pd.concat(
        [
            bad.assign(rule="ohlc_inconsistent", reason="low/high do not bracket open and close"),
            bad.iloc[[0]].assign(rule="negative_volume", reason="volume is negative"),
        ],
        ignore_index=True,
    )
    assert store.write_quarantine(rows) == 4
    assert store.write_quarantine(rows) == 4
    read = store.read_quarantine("BRK-B")
    assert len(read) == 4
    assert sorted(read["rule"].unique()) == ["negative_volume", "ohlc_inconsistent"]
    first = read.loc[read["rule"] == "negative_volume"].iloc[0]
    assert first["reason"] == "volume is negative"
    assert first["close"] == bad["close"].iloc[0]
    assert store.read_bars("BRK-B").empty  # quarantined bars are never bars
    assert store.read_quarantine("BRK-B", interval="1h").empty


def test_health(store: BarStore) -> None:
    store.health()


@pytest.mark.parametrize("symbol", ["BRK-B", "^GSPC", "EURUSD=X", "0700.HK", "A B", "A,B", "A=B", "X' OR '1'='1"])
def test_awkward_symbols_round_trip_exactly_and_stay_apart(store: BarStore, symbol: str) -> None:
    store.write_bars(frame(symbol, n=3))
    store.write_bars(frame("OTHER", n=4))
    read = store.read_bars(symbol)
    assert len(read) == 3
    assert set(read["symbol"]) == {symbol}
    assert store.last_timestamp(symbol, "1d", "yahoo_finance") == pd.Timestamp("2024-01-03", tz="UTC")


def test_every_float_reads_back_bit_for_bit(store: BarStore) -> None:
    written = frame(n=6)
    written["close"] = [0.1, 1e20, 1 / 3, 5e-324, 123456789.123456789, 2.0**53 + 2]
    store.write_bars(written)
    np.testing.assert_array_equal(store.read_bars("BRK-B")["close"].to_numpy(), written["close"].to_numpy())


def test_two_writers_at_once_lose_nothing(store: BarStore) -> None:
    errors: list[BaseException] = []

    def write(symbol: str) -> None:
        try:
            for month in range(1, 7):
                store.write_bars(frame(symbol, n=28, start=f"2024-{month:02d}-01"))
        except BaseException as exc:
            errors.append(exc)

    writers = [threading.Thread(target=write, args=(s,)) for s in ("AAPL", "MSFT")]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    assert errors == []
    assert len(store.read_bars("AAPL")) == len(store.read_bars("MSFT")) == 6 * 28


def test_retention_is_applied_once_and_then_changes_nothing(store: BarStore) -> None:
    recent = (pd.Timestamp.now(tz="UTC") - pd.Timedelta(days=40)).strftime("%Y-%m-%d")
    store.write_bars(frame(n=5, start="2020-01-01"))
    store.write_bars(frame(n=30, start=recent))
    assert str(store.apply_retention(None)).startswith("unchanged")
    assert str(store.apply_retention("365d")).startswith("updated")  # deletes old rows, or sets the policy
    assert str(store.apply_retention("365d")).startswith("unchanged")
    assert len(store.read_bars("BRK-B", start=pd.Timestamp(recent, tz="UTC"))) == 30  # nothing recent is touched
    if isinstance(store, InfluxDBStore):
        rules = influxdb_v2_bucket(store).retention_rules
        assert [(r.type, r.every_seconds) for r in rules] == [("expire", 365 * 86400)]


def test_a_retention_duration_outside_the_grammar_is_refused(store: BarStore) -> None:
    with pytest.raises(StoreError, match="365d"):
        store.apply_retention("1y; DROP DATABASE x")


def test_corporate_actions_read_with_both_fields_even_when_one_was_never_written(store: BarStore) -> None:
    split = pd.DataFrame(
        {"time": pd.to_datetime(["2020-08-31"], utc=True), "symbol": "AAPL", "source": "yahoo_finance",
         "kind": ["split"], "ratio": [4.0], "amount": [np.nan]}
    )  # fmt: skip
    store.write_corporate_actions(conform_actions(split))
    read = store.read_corporate_actions("AAPL")
    assert list(read.columns) == ["time", "symbol", "source", "kind", "ratio", "amount"]
    assert read["ratio"].tolist() == [4.0]
    assert read["amount"].isna().all()


@contextmanager
def unavailable(store: BarStore) -> Iterator[BarStore]:
    """The same store, unreachable for real: a server store at a port nobody listens on, or a
    DuckDB file another process holds the lock of."""
    if isinstance(store, DuckDBStore):
        Path(store.path).parent.mkdir(parents=True, exist_ok=True)
        holder = subprocess.Popen(
            [
                sys.executable,
                "-c",
                f"import duckdb, sys; c = duckdb.connect({store.path!r}); print(1, flush=True); sys.stdin.read()",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "1"
            yield store
        finally:
            holder.kill()
            holder.wait()
        return
    yield cast(BarStore, store.model_copy(update={"url": f"http://127.0.0.1:{free_port()}", "write_attempts": 1}))  # type: ignore[attr-defined]


def test_writes_the_store_cannot_take_are_spooled_and_replayed_exactly(store: BarStore, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    bars, actions = frame(n=40), split_action()
    with unavailable(store) as down:
        assert spool.write(down, "bars", bars) == Written(0, 40)
        assert spool.write(down, "corporate_actions", actions) == Written(0, 1)
    assert store.read_bars("BRK-B").empty
    assert [(b.kind, b.points) for b in spool.pending()] == [("bars", 40), ("corporate_actions", 1)]

    assert spool.replay(store) == Replayed(batches=2, points=41)
    assert spool.pending() == []
    pd.testing.assert_frame_equal(store.read_bars("BRK-B")[list(bars.columns)], bars, check_exact=True)
    assert store.read_corporate_actions("AAPL")["ratio"].tolist() == [4.0]


def test_a_write_queues_behind_what_is_spooled_so_an_older_value_never_wins(store: BarStore, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    older = frame(n=10)
    newer = older.assign(close=older["close"] + 1.0)
    with unavailable(store) as down:
        spool.write(down, "bars", older)
    assert spool.write(store, "bars", newer) == Written(10, 0)  # replays `older` first, then writes this
    assert spool.pending() == []
    np.testing.assert_array_equal(store.read_bars("BRK-B")["close"].to_numpy(), newer["close"].to_numpy())


def split_action() -> pd.DataFrame:
    return conform_actions(
        pd.DataFrame(
            {
                "time": pd.to_datetime(["2020-08-31"], utc=True),
                "symbol": "AAPL",
                "source": "yahoo_finance",
                "kind": ["split"],
                "ratio": [4.0],
                "amount": [np.nan],
            }
        )
    )


def test_run_metrics_round_trip_and_upsert(store: BarStore) -> None:
    runs = pd.to_datetime(["2024-03-01T21:30:00Z", "2024-03-04T21:30:00Z"], utc=True).astype("datetime64[ns, UTC]")
    metrics = pd.DataFrame(
        {
            "time": runs,
            "symbol": "^GSPC",
            "interval": "1d",
            "source": "yahoo_finance",
            "ok": [1.0, 0.0],
            "rows_written": [5.0, 0.0],
            "missing_sessions": [np.nan, 2.0],
        }
    )
    assert store.write_metrics(metrics) == 2
    store.write_metrics(metrics.iloc[[1]].assign(ok=1.0))
    read = store.read_metrics("^GSPC")
    assert list(read.columns[:4]) == ["time", "symbol", "interval", "source"]
    assert read["time"].tolist() == list(runs)
    assert read["ok"].tolist() == [1.0, 1.0] and read["rows_written"].tolist() == [5.0, 0.0]
    assert np.isnan(read["missing_sessions"].iloc[0]) and read["missing_sessions"].iloc[1] == 2.0
    assert store.read_metrics("AAPL").empty
