"""Retention against the history window: windows clamped to what the store keeps, and writes that survive it.

The end-to-end cases run `marketpipe run` against a real influxd whose database's default
retention policy (365d) is shorter than the 730 days of history a first run asks for, over a real
captured Yahoo payload (AAPL 2020: a 4:1 split and four dividends) moved forward by whole weeks so
that it ends two months ago: its first weeks are older than the retention, the rest inside it.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest

from blocks.duckdb_store import DuckDBStore
from blocks.influxdb_v1_store import InfluxDBV1Store
from blocks.store import describe_duration
from tasks.errors import UsageError
from tasks.retention import Retention, clamp, retention_of
from tasks.sources.base import Window
from tests.conftest import Sandbox, marketpipe, yahoo_json
from tests.servers import free_port

AAPL_2020 = "yahoo-finance2_chart_AAPL_2020_full_year_1d_split_and_dividends.json"
YEAR = Retention(timedelta(days=365), "the store's retention")
NOON = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


# --- the clamp ---------------------------------------------------------------------------------


def test_the_first_kept_day_is_the_first_whose_midnight_is_inside_the_retention() -> None:
    assert YEAR.first_day(NOON) == date(2025, 12, 3)  # 2025-12-02 00:00 is 12 h older than a year
    assert YEAR.first_day(datetime(2026, 12, 2, tzinfo=UTC)) == date(2025, 12, 2)
    assert describe_duration(timedelta(days=365)) == "365d" and describe_duration(timedelta(hours=30)) == "30h"


def test_an_initial_window_longer_than_the_retention_is_clamped_and_says_so() -> None:
    window, note = clamp(Window(date(2024, 12, 2), date(2026, 12, 2), "initial"), YEAR, NOON)
    assert (window.start, window.end, window.covers_from) == (date(2025, 12, 3), date(2026, 12, 2), date(2025, 12, 3))
    assert note == "window clamped to the store's retention of 365d: from 2025-12-03"


def test_an_explicit_start_before_the_retention_is_clamped_too() -> None:
    window, note = clamp(Window(date(2020, 1, 1), date(2026, 6, 30), "explicit"), YEAR, NOON)
    assert window.start == date(2025, 12, 3)
    assert note == "--start 2020-01-01 is before the store's retention of 365d: collected from 2025-12-03"


def test_a_window_inside_the_retention_is_left_alone_but_expects_no_history_before_it() -> None:
    incremental = Window(date(2026, 11, 25), date(2026, 12, 2), "incremental", history_from=date(2024, 12, 2))
    window, note = clamp(incremental, YEAR, NOON)
    assert (window.start, window.covers_from, note) == (date(2026, 11, 25), date(2025, 12, 3), "")


def test_a_window_wholly_before_the_retention_is_a_usage_error_naming_the_dates() -> None:
    with pytest.raises(UsageError, match=r"keeps bars from 2025-12-03: the store would drop every bar"):
        clamp(Window(date(2020, 1, 1), date(2020, 12, 31), "explicit"), YEAR, NOON)


def test_the_shorter_of_the_settings_and_the_stores_retention_wins(influxdb_url: str, tmp_path: Path) -> None:
    store = InfluxDBV1Store(url=influxdb_url, database=f"rp_{uuid.uuid4().hex[:12]}")
    assert retention_of(None, store) is None  # no database yet: nothing is dropped
    store.apply_retention("52w")
    assert retention_of(None, store) == Retention(timedelta(weeks=52), "the store's retention")
    assert retention_of("30d", store) == Retention(timedelta(days=30), "retention.duration")
    assert retention_of("400d", store) == Retention(timedelta(weeks=52), "the store's retention")
    assert retention_of("30d", DuckDBStore(path=str(tmp_path / "s.duckdb"))) == Retention(
        timedelta(days=30), "retention.duration"
    )


def test_a_store_that_cannot_be_asked_leaves_the_settings_retention() -> None:
    down = InfluxDBV1Store(url=f"http://127.0.0.1:{free_port()}", database="x")
    assert retention_of("365d", down) == Retention(timedelta(days=365), "retention.duration")


# --- end to end: marketpipe run against influxd with a 365d default policy ----------------------


def shifted_payload(ends: date) -> dict[str, Any]:
    """AAPL 2020 moved forward by whole weeks (weekdays stay weekdays) to end on or before ``ends``."""
    body = yahoo_json(AAPL_2020)
    result = body["chart"]["result"][0]
    last = datetime.fromtimestamp(result["timestamp"][-1], UTC).date()
    seconds = (ends - last).days // 7 * 7 * 86400
    result["timestamp"] = [t + seconds for t in result["timestamp"]]
    for kind in ("dividends", "splits"):
        result["events"][kind] = {
            str(int(k) + seconds): {**event, "date": event["date"] + seconds}
            for k, event in result["events"][kind].items()
        }
    # The session the payload was served in: the last bar's, long closed.
    close = result["timestamp"][-1] + 23400
    result["meta"]["regularMarketTime"] = close
    result["meta"]["currentTradingPeriod"]["regular"].update(start=result["timestamp"][-1], end=close)
    return body


def trading_dates(stamps: list[int]) -> list[date]:
    """Epoch seconds as New York dates: how daily bars and actions are stamped (00:00 UTC of that date)."""
    return [pd.Timestamp(t, unit="s", tz="UTC").tz_convert("America/New_York").date() for t in stamps]


@pytest.fixture
def payload(tmp_path: Path) -> dict[str, Any]:
    return shifted_payload(datetime.now(UTC).date() - timedelta(days=60))


@pytest.fixture
def replay(tmp_path: Path, payload: dict[str, Any]) -> Iterator[Sandbox]:
    folder = tmp_path / "replay"
    folder.mkdir()
    (folder / "AAPL.json").write_text(json.dumps(payload))
    server = Sandbox("--replay", str(folder), log=tmp_path / "replay.log")
    yield server
    server.stop()


@pytest.fixture
def database(influxdb_url: str) -> str:
    """A database whose default policy keeps 365 days: named `year`, so autogen (the config's) is not it."""
    name = f"ret_{uuid.uuid4().hex[:12]}"
    statement = f'CREATE DATABASE "{name}" WITH DURATION 365d REPLICATION 1 NAME "year"'
    httpx.post(f"{influxdb_url}/query", data={"q": statement}).raise_for_status()
    return name


@pytest.fixture
def env(prefect_env: dict[str, str], replay: Sandbox, influxdb_url: str, database: str) -> dict[str, str]:
    run_env = {
        **prefect_env,
        "MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__BASE_URL": replay.base_url,
        "MARKETPIPE__COLLECTION__DEFAULT_HISTORY_DAYS": "730",  # production's first history
        "MARKETPIPE__STORAGE__BACKEND": "influxdb_v1",
        "MARKETPIPE__STORAGE__INFLUXDB_V1__URL": influxdb_url,
        "MARKETPIPE__STORAGE__INFLUXDB_V1__DATABASE": database,
    }
    run_env.pop("MARKETPIPE__RETENTION__DURATION", None)  # only the store's own policy tells
    return run_env


def kept(stamps: list[int]) -> set[date]:
    first = YEAR.first_day(datetime.now(UTC))
    return {day for day in trading_dates(stamps) if day >= first}


def test_a_first_run_longer_than_the_stores_retention_stores_what_it_keeps_and_says_it_clamped(
    env: dict[str, str], payload: dict[str, Any], influxdb_url: str, database: str
) -> None:
    result = marketpipe("run", "--symbols", "AAPL", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    first = YEAR.first_day(datetime.now(UTC))
    assert f"AAPL: window clamped to the store's retention of 365d: from {first}" in result.stdout

    store = InfluxDBV1Store(url=influxdb_url, database=database)
    chart = payload["chart"]["result"][0]
    bars = store.read_bars("AAPL")
    expected_bars = kept(chart["timestamp"])
    assert len(expected_bars) < len(chart["timestamp"])  # some of the payload is older than the retention
    assert {t.date() for t in bars["time"]} == expected_bars
    actions = store.read_corporate_actions("AAPL")
    events = chart["events"]
    expected_actions = {(day, "dividend") for day in kept([int(e["date"]) for e in events["dividends"].values()])} | {
        (day, "split") for day in kept([int(e["date"]) for e in events["splits"].values()])
    }
    assert len(expected_actions) >= 3  # the split and at least two dividends fall inside
    assert {(t.date(), kind) for t, kind in zip(actions["time"], actions["kind"], strict=True)} == expected_actions

    metrics = store.read_metrics("AAPL").iloc[-1]
    assert (metrics["ok"], metrics["clamped"], metrics["dropped_by_retention"]) == (1.0, 1.0, 0.0)
    assert metrics["rows_written"] == len(expected_bars)


def test_a_bars_write_the_store_refuses_still_writes_the_corporate_actions(
    env: dict[str, str], payload: dict[str, Any], influxdb_url: str, database: str
) -> None:
    # Another series holds `close` as a string in every shard the run writes to: influxd refuses
    # every AAPL bar (a field type conflict) and takes the corporate actions, another measurement.
    # A decoy a day from just inside the retention on: every shard (7 days each) holding an AAPL bar has one.
    oldest = datetime.now(UTC) - timedelta(days=365) + timedelta(minutes=1)
    decoys = "\n".join(
        f'bars,symbol=DECOY,interval=1d,source=decoy close="text" {int((oldest + timedelta(days=n)).timestamp())}'
        for n in range(365)
    )
    written = httpx.post(f"{influxdb_url}/write", params={"db": database, "precision": "s"}, content=decoys)
    assert written.status_code == 204, written.text

    result = marketpipe("run", "--symbols", "AAPL", env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    out = " ".join(result.stdout.split())
    assert "AAPL failed: the store refused the bars, not stored:" in out
    assert "field type conflict" in out and "corporate actions" in out

    store = InfluxDBV1Store(url=influxdb_url, database=database)
    assert store.read_bars("AAPL").empty
    chart = payload["chart"]["result"][0]
    stored = {t.date() for t in store.read_corporate_actions("AAPL")["time"]}
    events = [int(e["date"]) for kind in ("dividends", "splits") for e in chart["events"][kind].values()]
    assert stored == kept(events) and stored
    metrics = store.read_metrics("AAPL").iloc[-1]
    assert (metrics["failed"], metrics["actions_written"]) == (1.0, len(stored))
