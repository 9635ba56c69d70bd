"""The embedded store against a real DuckDB file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from blocks.duckdb_store import DuckDBStore
from blocks.store import BarStore, StoreError
from tasks.bars import conform, conform_actions


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


@pytest.fixture
def store(tmp_path: Path) -> DuckDBStore:
    return DuckDBStore(path=str(tmp_path / "sub" / "bars.duckdb"))


def test_it_is_a_bar_store(store: DuckDBStore) -> None:
    assert isinstance(store, BarStore)


def test_round_trip_keeps_every_column_and_value(store: DuckDBStore) -> None:
    written = frame()
    assert store.write_bars(written) == 30
    read = store.read_bars("BRK-B", "1d")
    assert list(read.columns) == list(written.columns)
    pd.testing.assert_frame_equal(read, written, check_exact=True)


def test_nan_is_stored_as_null_not_zero(store: DuckDBStore) -> None:
    store.write_bars(frame())
    read = store.read_bars("BRK-B")
    assert read["rsi_14"].iloc[:14].isna().all()
    assert (read["rsi_14"].iloc[14:] > 0).all()


def test_writing_again_overwrites_instead_of_duplicating(store: DuckDBStore) -> None:
    first = frame()
    store.write_bars(first)
    second = first.copy()
    second.loc[5:, "close"] += 1.0
    store.write_bars(second)
    store.write_bars(second)
    read = store.read_bars("BRK-B")
    assert len(read) == 30
    np.testing.assert_array_equal(read["close"].to_numpy(), second["close"].to_numpy())


def test_series_are_kept_apart_by_symbol_interval_and_source(store: DuckDBStore) -> None:
    store.write_bars(frame("AAPL"))
    store.write_bars(frame("AAPL", source="files"))
    store.write_bars(frame("MSFT", n=20))
    assert len(store.read_bars("AAPL")) == 60
    assert len(store.read_bars("AAPL", source="files")) == 30
    assert len(store.read_bars("MSFT")) == 20
    assert store.read_bars("AAPL", "1h").empty


def test_read_range_is_start_inclusive_end_exclusive(store: DuckDBStore) -> None:
    store.write_bars(frame())
    read = store.read_bars(
        "BRK-B", start=pd.Timestamp("2024-01-05", tz="UTC"), end=pd.Timestamp("2024-01-10", tz="UTC")
    )
    assert list(read["time"].dt.day) == [5, 6, 7, 8, 9]


def test_last_timestamp(store: DuckDBStore) -> None:
    assert store.last_timestamp("BRK-B", "1d", "yahoo_finance") is None
    store.write_bars(frame())
    assert store.last_timestamp("BRK-B", "1d", "yahoo_finance") == pd.Timestamp("2024-01-30", tz="UTC")
    assert store.last_timestamp("BRK-B", "1d", "files") is None


def test_new_indicator_columns_are_added_and_old_rows_read_empty(store: DuckDBStore) -> None:
    store.write_bars(frame(n=20))
    later = frame(n=10, start="2024-02-01").assign(sma_5=1.5)
    store.write_bars(later)
    read = store.read_bars("BRK-B")
    assert "sma_5" in read.columns
    assert read["sma_5"].iloc[:20].isna().all()
    assert (read["sma_5"].iloc[20:] == 1.5).all()


def test_symbol_values_cannot_inject_sql(store: DuckDBStore) -> None:
    store.write_bars(frame())
    assert store.read_bars("BRK-B' OR '1'='1").empty
    assert len(store.read_bars("BRK-B")) == 30


def test_unsafe_column_names_are_refused(store: DuckDBStore) -> None:
    with pytest.raises(StoreError, match="snake_case"):
        store.write_bars(frame().assign(**{'x"; DROP TABLE bars; --': 1.0}))


def test_a_missing_store_reads_empty(tmp_path: Path) -> None:
    store = DuckDBStore(path=str(tmp_path / "none.duckdb"))
    assert store.read_bars("AAPL").empty
    assert store.read_corporate_actions("AAPL").empty
    assert store.last_timestamp("AAPL", "1d", "yahoo_finance") is None
    assert not (tmp_path / "none.duckdb").exists()


def test_corporate_actions_round_trip_and_upsert(store: DuckDBStore) -> None:
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


def test_quarantine_keeps_each_rule_apart_with_its_reason_and_upserts(store: DuckDBStore) -> None:
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


def test_health(store: DuckDBStore) -> None:
    store.health()
    assert Path(store.path).exists()
