"""`marketpipe run` end to end over replayed Yahoo payloads: the day's final bar, lunch-break grids, FX bends.

Every case runs the way a user runs it: the `marketpipe` process against `marketpipe sandbox
--replay DIR` (which serves DIR/<SYMBOL>.json verbatim, whatever period is asked for; the parser
keeps the asked window), into a real DuckDB file, read back with `marketpipe query`.

The replay sandbox answers with a real ``Date`` header, which is when the payload counts as
served: a captured session long closed is final, and a payload whose ``currentTradingPeriod``
ends after the real clock has a live bar.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pandas as pd
import pytest

from blocks.duckdb_store import DuckDBStore
from tests.conftest import YAHOO, Sandbox, marketpipe, query_csv, yahoo_json

AAPL_AFTER_CLOSE = "yfinance-rs_history_chart_AAPL.json"


@pytest.fixture
def replay_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "replay"
    folder.mkdir()
    return folder


@pytest.fixture
def replay(replay_dir: Path, tmp_path: Path) -> Iterator[Sandbox]:
    server = Sandbox("--replay", str(replay_dir), log=tmp_path / "replay.log")
    yield server
    server.stop()


@pytest.fixture
def env(prefect_env: dict[str, str], replay: Sandbox) -> dict[str, str]:
    return {**prefect_env, "MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__BASE_URL": replay.base_url}


def summary_rows(stdout: str) -> dict[str, list[str]]:
    """The run's summary table, symbol -> its cells."""
    rows = [line.split("│")[1:-1] for line in stdout.splitlines() if line.count("│") > 5]
    return {cells[0].strip(): [c.strip() for c in cells] for cells in rows}


def run(env: dict[str, str], *args: str) -> str:
    result = marketpipe("run", *args, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


# -- Item 2: the day's final bar ---------------------------------------------------------------


def test_the_days_final_bar_after_the_close_is_stored(env: dict[str, str], replay_dir: Path) -> None:
    # Captured after the 2025-10-29 close: the last bar is stamped regularMarketTime (16:00:01 New York).
    shutil.copy(YAHOO / AAPL_AFTER_CLOSE, replay_dir / "AAPL.json")
    stdout = run(env, "--symbols", "AAPL", "--start", "2025-05-01", "--end", "2025-10-29")
    rows = query_csv(env, "AAPL")
    assert rows["time"].iloc[-1] == "2025-10-29T00:00:00Z"
    assert rows["close"].iloc[-1] == pytest.approx(269.7, abs=0.005)
    assert len(rows) == 126  # every bar from 2025-05-01 on
    assert "live bar" not in stdout
    metrics = DuckDBStore(path=env["MARKETPIPE__STORAGE__DUCKDB__PATH"]).read_metrics("AAPL")
    assert metrics["live_bars_skipped"].iloc[-1] == 0


def _session_open_now(zone: ZoneInfo) -> tuple[int, int, int]:
    """(bar, session start, session end) in epoch seconds: a session open at the real clock, on its local date."""
    now = datetime.now(UTC)
    local = now.astimezone(zone)
    midnight = datetime.combine(local.date(), datetime.min.time(), zone)
    start = max(midnight + timedelta(seconds=1), now - timedelta(hours=3))
    end = min(midnight + timedelta(days=1) - timedelta(seconds=1), now + timedelta(hours=3))
    bar = max(start, now - timedelta(seconds=60))
    return int(bar.timestamp()), int(start.timestamp()), int(end.timestamp())


def test_a_bar_whose_session_is_still_open_is_not_stored(env: dict[str, str], replay_dir: Path) -> None:
    body = yahoo_json(AAPL_AFTER_CLOSE)
    result = body["chart"]["result"][0]
    bar, start, end = _session_open_now(ZoneInfo(result["meta"]["exchangeTimezoneName"]))
    result["timestamp"].append(bar)
    for series in (result["indicators"]["quote"][0], result["indicators"]["adjclose"][0]):
        for values in series.values():
            values.append(values[-1])
    result["meta"]["regularMarketTime"] = bar
    result["meta"]["currentTradingPeriod"]["regular"].update(start=start, end=end)
    (replay_dir / "AAPL.json").write_text(json.dumps(body))
    today = datetime.now(UTC).date()
    stdout = run(env, "--symbols", "AAPL", "--start", "2025-05-01", "--end", today.isoformat())
    rows = query_csv(env, "AAPL")
    assert rows["time"].iloc[-1] == "2025-10-29T00:00:00Z"  # the earlier sessions' bars are final
    assert len(rows) == 126
    assert "AAPL: 1 live bar(s) not stored" in stdout
    metrics = DuckDBStore(path=env["MARKETPIPE__STORAGE__DUCKDB__PATH"]).read_metrics("AAPL")
    assert metrics["live_bars_skipped"].iloc[-1] == 1


# -- Item 5: sessions with a lunch break --------------------------------------------------------

# Real session shapes, local time: (symbol, Yahoo exchangeName, calendar, zone, currency, segments).
LUNCH_BREAK_MARKETS: tuple[tuple[str, str, str, str, str, tuple[tuple[str, str], ...]], ...] = (
    ("0700.HK", "HKG", "XHKG", "Asia/Hong_Kong", "HKD", (("09:30", "12:00"), ("13:00", "16:00"))),
    ("7203.T", "JPX", "XTKS", "Asia/Tokyo", "JPY", (("09:00", "11:30"), ("12:30", "15:30"))),  # 15:30 since 2024-11-05
    ("600519.SS", "SHH", "XSHG", "Asia/Shanghai", "CNY", (("09:30", "11:30"), ("13:00", "15:00"))),
)
MINUTES = {"60m": 60, "90m": 90, "30m": 30, "15m": 15}


def common_full_session(today: date) -> date:
    """The latest weekday 3 to 40 days back that is a full session (with its lunch break) on all three exchanges."""
    import exchange_calendars as xc

    for back in range(3, 41):
        day = today - timedelta(days=back)
        if all(_calendar_hours(xc.get_calendar(m[2]), day, m[3]) == m[5] for m in LUNCH_BREAK_MARKETS):
            return day
    raise AssertionError("no common full session in the last 40 days")


def _calendar_hours(cal: Any, day: date, zone: str) -> tuple[tuple[str, str], ...] | None:
    """The calendar's segments that day, local "HH:MM" (None: no session), to check it knows the real shape."""
    label = pd.Timestamp(day)
    if not cal.is_session(label):
        return None
    row = cal.schedule.loc[label]
    if pd.isna(row["break_start"]):
        return ((_hhmm(row["open"], zone), _hhmm(row["close"], zone)),)
    return (
        (_hhmm(row["open"], zone), _hhmm(row["break_start"], zone)),
        (_hhmm(row["break_end"], zone), _hhmm(row["close"], zone)),
    )


def _hhmm(stamp: pd.Timestamp, zone: str) -> str:
    return str(stamp.tz_convert(zone).strftime("%H:%M"))


def yahoo_intraday_chart(
    symbol: str,
    exchange: str,
    zone: str,
    currency: str,
    day: date,
    segments: tuple[tuple[str, str], ...],
    interval: str,
) -> tuple[dict[str, Any], list[pd.Timestamp]]:
    """A Yahoo v8 chart body for one day shaped like Yahoo's: bars start at each segment's open, every interval."""
    tz = ZoneInfo(zone)
    step = pd.Timedelta(minutes=MINUTES[interval])
    stamps: list[pd.Timestamp] = []
    for opens, closes in segments:
        t, end = (pd.Timestamp(f"{day} {hhmm}", tz=tz) for hhmm in (opens, closes))
        while t < end:
            stamps.append(t)
            t += step
    epoch = [int(t.timestamp()) for t in stamps]
    n = len(epoch)
    prices = [100.0 + 0.1 * i for i in range(n)]
    session_start = int(pd.Timestamp(f"{day} {segments[0][0]}", tz=tz).timestamp())
    session_end = int(pd.Timestamp(f"{day} {segments[-1][1]}", tz=tz).timestamp())
    noon = pd.Timestamp(f"{day} 12:00", tz=tz)
    offset = int((noon.tz_localize(None) - noon.tz_convert(None)).total_seconds())
    period = {"timezone": stamps[0].tzname(), "start": session_start, "end": session_end, "gmtoffset": offset}
    meta = {
        "currency": currency,
        "symbol": symbol,
        "exchangeName": exchange,
        "instrumentType": "EQUITY",
        "firstTradeDate": 1000000000,
        "regularMarketTime": session_end,
        "gmtoffset": offset,
        "timezone": stamps[0].tzname(),
        "exchangeTimezoneName": zone,
        "regularMarketPrice": prices[-1],
        "chartPreviousClose": prices[0],
        "priceHint": 2,
        "currentTradingPeriod": {
            "pre": {**period, "start": session_start, "end": session_start},
            "regular": period,
            "post": {**period, "start": session_end, "end": session_end},
        },
        "dataGranularity": interval,
        "range": "",
        "validRanges": ["1d", "5d", "1mo", "3mo", "6mo", "1y", "2y", "5y", "10y", "ytd", "max"],
        "tradingPeriods": [[period]],
    }
    quote = {
        "open": prices,
        "high": [p + 0.2 for p in prices],
        "low": [p - 0.2 for p in prices],
        "close": [p + 0.05 for p in prices],
        "volume": [1000 + i for i in range(n)],
    }
    result = {"meta": meta, "timestamp": epoch, "indicators": {"quote": [quote]}}
    return {"chart": {"result": [result], "error": None}}, stamps


# 60m and 90m: the lunch break is no whole number of intervals (Hong Kong's 13:00 is 3.5 h after 09:30);
# 30m and 15m: it is, and they must stay whole too.
@pytest.mark.parametrize("interval", ["60m", "90m", "30m", "15m"])
def test_every_bar_of_a_hong_kong_tokyo_and_shanghai_day_is_stored(
    env: dict[str, str], replay_dir: Path, interval: str
) -> None:
    day = common_full_session(datetime.now(UTC).date())
    expected: dict[str, list[pd.Timestamp]] = {}
    for symbol, exchange, _, zone, currency, segments in LUNCH_BREAK_MARKETS:
        body, stamps = yahoo_intraday_chart(symbol, exchange, zone, currency, day, segments, interval)
        (replay_dir / f"{symbol}.json").write_text(json.dumps(body))
        expected[symbol] = stamps
    symbols = ",".join(expected)
    stdout = run(env, "--symbols", symbols, "--interval", interval, "--start", str(day), "--end", str(day))
    summary = summary_rows(stdout)
    store = DuckDBStore(path=env["MARKETPIPE__STORAGE__DUCKDB__PATH"])
    for symbol, stamps in expected.items():
        assert summary[symbol][5] == "0", f"{symbol}: {summary[symbol]}"  # nothing quarantined
        assert store.read_quarantine(symbol).empty
        rows = query_csv(env, symbol, "--interval", interval)
        assert list(rows["time"]) == [t.tz_convert("UTC").strftime("%Y-%m-%dT%H:%M:%SZ") for t in stamps]
    # The afternoon's first 60m bar in Hong Kong: 13:00, 90 minutes after the 11:30 bar.
    assert pd.Timestamp(f"{day} 13:00", tz="Asia/Hong_Kong") in expected["0700.HK"]


# -- Item 6: FX bends OHLC a little --------------------------------------------------------------

EURUSD_2020 = "yahoo-finance2_chart_EURUSD=X_2020_full_year_1d.json"


def test_yahoos_eurusd_2020_is_stored_whole_with_its_bends_repaired_and_flagged(
    env: dict[str, str], replay_dir: Path
) -> None:
    shutil.copy(YAHOO / EURUSD_2020, replay_dir / "EURUSD=X.json")
    stdout = run(env, "--symbols", "EURUSD=X", "--start", "2020-01-01", "--end", "2021-01-04")
    summary = summary_rows(stdout)["EURUSD=X"]
    assert summary[5] == "0"  # quarantined
    assert summary[6] == "ohlc_repaired=13"  # repaired
    rows = query_csv(env, "EURUSD=X")
    assert len(rows) == 264
    assert rows["flag_ohlc_repaired"].sum() == 13
    assert (rows["low"] <= rows[["open", "close"]].min(axis=1)).all()
    assert (rows[["open", "close"]].max(axis=1) <= rows["high"]).all()
    assert rows["sma_20"].notna().sum() == 264 - 19  # the windows span trading days, none missing
    metrics = DuckDBStore(path=env["MARKETPIPE__STORAGE__DUCKDB__PATH"]).read_metrics("EURUSD=X")
    assert metrics["repaired"].iloc[-1] == 13


def test_a_real_ohlc_inconsistency_is_still_quarantined(env: dict[str, str], replay_dir: Path) -> None:
    body = copy.deepcopy(yahoo_json(EURUSD_2020))
    quote = body["chart"]["result"][0]["indicators"]["quote"][0]
    bent = {
        i
        for i, (o, h, lo, c) in enumerate(zip(quote["open"], quote["high"], quote["low"], quote["close"], strict=True))
        if None not in (o, h, lo, c) and (max(o, c) > h or min(o, c) < lo)
    }
    assert len(bent) == 13
    quote["close"][100] = quote["high"][100] * 1.05  # a close 5% above the high
    quote["high"][200], quote["low"][200] = quote["low"][200], quote["high"][200]  # a high below the low
    (replay_dir / "EURUSD=X.json").write_text(json.dumps(body))
    stdout = run(env, "--symbols", "EURUSD=X", "--start", "2020-01-01", "--end", "2021-01-04")
    summary = summary_rows(stdout)["EURUSD=X"]
    assert summary[5] == "ohlc_inconsistent=2"
    quarantined = DuckDBStore(path=env["MARKETPIPE__STORAGE__DUCKDB__PATH"]).read_quarantine("EURUSD=X")
    assert len(quarantined) == 2
    rows = query_csv(env, "EURUSD=X")
    assert len(rows) == 262
    assert not set(rows["time"]) & {t.strftime("%Y-%m-%dT%H:%M:%SZ") for t in quarantined["time"]}
    assert rows["flag_ohlc_repaired"].sum() == len(bent - {100, 200})


def test_the_repair_flag_round_trips_through_influxdb_v1(
    env: dict[str, str], replay_dir: Path, influxdb_url: str
) -> None:
    shutil.copy(YAHOO / EURUSD_2020, replay_dir / "EURUSD=X.json")
    influx = {
        **env,
        "MARKETPIPE__STORAGE__BACKEND": "influxdb_v1",
        "MARKETPIPE__STORAGE__INFLUXDB_V1__URL": influxdb_url,
        "MARKETPIPE__STORAGE__INFLUXDB_V1__DATABASE": f"bends_{int(time.time() * 1000)}",
    }
    run(influx, "--symbols", "EURUSD=X", "--start", "2020-01-01", "--end", "2021-01-04")
    rows = query_csv(influx, "EURUSD=X")
    assert len(rows) == 264
    assert rows["flag_ohlc_repaired"].sum() == 13
