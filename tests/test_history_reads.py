"""History reads ask the store for the lookback they need, not the whole series."""

from __future__ import annotations

import threading
import time
from datetime import datetime
from pathlib import Path

import pandas as pd
import pytest

from blocks.duckdb_store import DuckDBStore
from blocks.influxdb_v1_store import InfluxDBV1Store
from blocks.store import StoreUnavailableError
from tasks.collect import read_stored
from tasks.job import StoreOutage
from tasks.sources.base import Collected
from tests.servers import free_port, influxdb_process
from tests.test_processing import bars

pytestmark = pytest.mark.unit  # no server, no child process: `pytest -m unit`


class ReadCounting:
    """A real DuckDB store that also counts the rows each history read returned."""

    def __init__(self, store: DuckDBStore) -> None:
        self.store = store
        self.rows_read: list[int] = []

    def first_timestamp(self, symbol: str, interval: str, source: str) -> pd.Timestamp | None:
        return self.store.first_timestamp(symbol, interval, source)

    def read_bars(
        self,
        symbol: str,
        interval: str = "1d",
        source: str | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
    ) -> pd.DataFrame:
        rows = self.store.read_bars(symbol, interval, source, start=start, end=end)
        self.rows_read.append(len(rows))
        return rows


def stored(tmp_path: Path, frame: pd.DataFrame) -> ReadCounting:
    store = DuckDBStore(path=str(tmp_path / "history.duckdb"))
    store.write_bars(frame)
    return ReadCounting(store)


def test_ten_years_stored_read_back_only_the_lookback(tmp_path: Path) -> None:
    series = bars(2_610)
    store = stored(tmp_path, series.iloc[:-10])
    new = Collected(series.iloc[-10:].reset_index(drop=True))
    history = read_stored(store, new, "TEST", "1d", "test", 500)  # type: ignore[arg-type]
    assert history.bars is not None
    assert list(history.bars["time"]) == list(series["time"].iloc[-510:-10])
    assert history.first == series["time"].iloc[0]
    assert store.rows_read == [pytest.approx(500, abs=300)]  # one read of about the lookback, not 2,600 rows


def test_a_hole_in_the_series_widens_the_read_until_the_lookback_is_whole(tmp_path: Path) -> None:
    series = bars(1_200)
    kept = pd.concat([series.iloc[:300], series.iloc[1_000:1_190]])  # three years missing in between
    store = stored(tmp_path, kept)
    new = Collected(series.iloc[1_190:].reset_index(drop=True))
    history = read_stored(store, new, "TEST", "1d", "test", 400)  # type: ignore[arg-type]
    assert history.bars is not None
    assert list(history.bars["time"]) == list(kept["time"].iloc[-400:])
    assert len(store.rows_read) > 1 and store.rows_read[-1] >= 400


def test_minute_bars_read_back_across_nights_and_weekends(tmp_path: Path) -> None:
    sessions = pd.bdate_range("2024-03-04", periods=10, tz="UTC")
    times = pd.DatetimeIndex([d + pd.Timedelta(hours=14, minutes=30 + m) for d in sessions for m in range(390)])
    series = bars(len(times), time=times, interval="1m")
    store = stored(tmp_path, series.iloc[:-5])
    new = Collected(series.iloc[-5:].reset_index(drop=True))
    history = read_stored(store, new, "TEST", "1m", "test", 1_000)  # type: ignore[arg-type]
    assert history.bars is not None
    assert list(history.bars["time"]) == list(series["time"].iloc[-1_005:-5])


def test_nothing_stored_before_the_new_bars_is_no_history(tmp_path: Path) -> None:
    series = bars(100)
    store = stored(tmp_path, series.iloc[50:])
    history = read_stored(store, Collected(series.iloc[:50]), "TEST", "1d", "test", 500)  # type: ignore[arg-type]
    assert (history.bars, history.first) == (None, None)
    assert store.rows_read == []


def test_a_store_restarted_within_the_runs_patience_fails_no_read(tmp_path: Path) -> None:
    """influxd down when the read begins and back a moment later: the read waits for it."""
    port = free_port()
    store = InfluxDBV1Store(url=f"http://127.0.0.1:{port}", database="patience")
    outage = StoreOutage(patience=60)
    answers: list[object] = []
    reader = threading.Thread(target=lambda: answers.append(outage.read(lambda: store.last_timestamp("A", "1d", "x"))))
    reader.start()
    time.sleep(1)
    assert reader.is_alive()  # nothing listens yet: still waiting
    with influxdb_process(tmp_path / "influxd", port):
        store.write_bars(bars(5).assign(symbol="A", interval="1d", source="x"))
        reader.join(timeout=30)
    assert not reader.is_alive() and len(answers) == 1


def test_a_store_that_stays_down_fails_the_runs_reads_at_once_after_its_patience() -> None:
    store = InfluxDBV1Store(url=f"http://127.0.0.1:{free_port()}", database="patience")
    outage = StoreOutage(patience=1)
    began = time.monotonic()
    with pytest.raises(StoreUnavailableError):
        outage.read(lambda: store.first_timestamp("A", "1d", "x"))
    assert 1 <= time.monotonic() - began < 10
    again = time.monotonic()
    with pytest.raises(StoreUnavailableError):  # the run's patience is spent: the next symbol does not wait
        outage.read(lambda: store.first_timestamp("B", "1d", "x"))
    assert time.monotonic() - again < 1
