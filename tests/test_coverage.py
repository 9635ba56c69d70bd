"""Coverage: a series that starts after the window it should cover is reported, counted and explained."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import exchange_calendars as xc
import pandas as pd
import pytest

from configs.settings import CollectionSettings, QualitySettings
from tasks.bars import Instrument, conform, flag_missing
from tasks.calendars import sessions_before
from tasks.collect import plan_window
from tasks.processing.coverage import check_coverage
from tasks.processing.pipeline import process
from tasks.sources.alpha_vantage import av_instrument
from tasks.sources.base import Collected, Window
from tasks.sources.yahoo_finance import yahoo_instrument
from tests.conftest import YAHOO, Sandbox, marketpipe, query_csv


def xnys_sessions(first: str, last: str) -> int:
    """Independently of the code under test: NYSE sessions in [first, last]."""
    return len(xc.get_calendar("XNYS").sessions_in_range(first, last))


def utc(day: str) -> pd.Timestamp:
    return pd.Timestamp(day, tz="UTC")


def daily_bars(days: pd.DatetimeIndex, symbol: str = "IBM", source: str = "alpha_vantage") -> pd.DataFrame:
    frame = pd.DataFrame({"time": days, "symbol": symbol, "interval": "1d", "source": source})
    frame = frame.assign(open=10.0, high=11.0, low=9.0, close=10.5, adj_close=float("nan"), volume=1000.0)
    return flag_missing(conform(frame))


def test_sessions_before_counts_up_to_the_first_bars_session() -> None:
    assert sessions_before(date(2024, 1, 1), utc("2024-03-01"), "1d", "XNYS") == xnys_sessions(
        "2024-01-02", "2024-02-29"
    )
    assert sessions_before(date(2024, 3, 1), utc("2024-03-01"), "1d", "XNYS") == 0
    assert sessions_before(date(2024, 3, 2), utc("2024-03-04"), "1d", "XNYS") == 0  # a weekend only
    # An intraday bar belongs to its exchange-time session: 14:30 UTC on 2024-03-01 is that day.
    assert sessions_before(date(2024, 2, 28), utc("2024-03-01 14:30"), "60m", "XNYS") == 2
    assert sessions_before(date(2024, 1, 1), utc("2024-03-04"), "1wk", "XNYS") is None


def test_a_truncated_first_run_is_short_by_the_sessions_before_its_first_bar() -> None:
    window = Window(date(2024, 1, 1), date(2024, 12, 31), "initial")
    compact = av_instrument("IBM", {"6. Output Size": "Compact"})
    coverage = check_coverage(window, utc("2024-08-01"), "IBM", "alpha_vantage", "1d", "XNYS", compact)
    assert coverage.short and coverage.compact
    assert coverage.sessions == xnys_sessions("2024-01-02", "2024-07-31")
    text = coverage.describe()
    assert "the source's bars start 2024-08-01, after the window's start 2024-01-01: " in text
    assert f": {coverage.sessions} sessions have no bar." in text
    assert "data_sources.alpha_vantage.outputsize: full" in text
    assert "`marketpipe run --source alpha_vantage --symbols IBM --interval 1d --start 2024-01-01`" in text


def test_a_series_starting_on_its_windows_first_session_is_covered() -> None:
    window = Window(date(2023, 12, 30), date(2024, 12, 31), "initial")  # a Saturday, then a holiday
    coverage = check_coverage(window, utc("2024-01-02"), "IBM", "alpha_vantage", "1d", "XNYS", Instrument())
    assert not coverage.short and coverage.sessions == 0
    assert coverage.first_bar_text() == "2024-01-02"


def test_sessions_before_a_listing_are_not_missing() -> None:
    """Yahoo's meta.firstTradeDate is the listing: a series that starts there is complete."""
    listed = int(pd.Timestamp("2024-03-01 14:30", tz="UTC").timestamp())
    meta = yahoo_instrument({"firstTradeDate": listed, "exchangeTimezoneName": "America/New_York"})
    window = Window(date(2024, 1, 1), date(2024, 12, 31), "initial")
    on_listing = check_coverage(window, utc("2024-03-01"), "NEWCO", "yahoo_finance", "1d", "XNYS", meta)
    assert not on_listing.short and on_listing.sessions == 0 and on_listing.listed == date(2024, 3, 1)
    assert on_listing.first_bar_text() == "2024-03-01 (listed)"
    # Bars missing after the listing still count, from the listing on.
    late = check_coverage(window, utc("2024-03-08"), "NEWCO", "yahoo_finance", "1d", "XNYS", meta)
    assert late.short and late.sessions == xnys_sessions("2024-03-01", "2024-03-07") == 5
    said = late.describe()
    assert "the source's bars start 2024-03-08, after its listing on 2024-03-01: 5 sessions have no bar" in said
    # A listing before the window changes nothing.
    old = yahoo_instrument({"firstTradeDate": 345479400, "exchangeTimezoneName": "America/New_York"})  # AAPL, 1980
    assert check_coverage(window, utc("2024-03-08"), "AAPL", "yahoo_finance", "1d", "XNYS", old).listed is None


@pytest.mark.parametrize(("first", "short"), [("2024-01-08", False), ("2024-02-05", True)])
def test_weekly_bars_are_short_only_past_their_first_period(first: str, short: bool) -> None:
    window = Window(date(2024, 1, 3), date(2024, 12, 31), "initial")  # a Wednesday: the first whole week is the 8th
    coverage = check_coverage(window, utc(first), "IBM", "alpha_vantage", "1wk", "XNYS", Instrument())
    assert coverage.sessions is None
    assert coverage.short is short


def test_an_incremental_run_still_expects_the_default_history() -> None:
    collection = CollectionSettings(overlap_days=5, default_history_days=730)
    window = plan_window(utc("2026-11-27"), None, None, collection, date(2026, 12, 1))
    assert (window.start, window.mode, window.covers_from) == (date(2026, 11, 22), "incremental", date(2024, 12, 1))
    assert plan_window(None, None, None, collection, date(2026, 12, 1)).covers_from == date(2024, 12, 1)
    assert plan_window(None, date(2026, 1, 5), None, collection, date(2026, 12, 1)).covers_from == date(2026, 1, 5)
    # A source's or the store's limit moves the expectation (and, for a source, the collected range).
    assert window.not_before(date(2025, 6, 1), collect=False) == Window(
        date(2026, 11, 22), date(2026, 12, 1), "incremental", date(2025, 6, 1)
    )

    coverage = check_coverage(window, utc("2026-07-15"), "IBM", "alpha_vantage", "1d", "XNYS", Instrument())
    assert coverage.short
    text = coverage.describe()
    assert "stored history starts 2026-07-15, after 2024-12-01" in text
    assert "collection.default_history_days before 2026-12-01" in text
    assert "Backfill with `marketpipe run --source alpha_vantage --symbols IBM --interval 1d --start 2024-12-01`" in (
        text
    )


def test_process_counts_the_hole_before_the_stored_series_with_the_gaps_inside_it() -> None:
    """An incremental run: stored bars from 2024-08-01, new ones from 2024-12-02 with one session missing."""
    days = pd.DatetimeIndex(xc.get_calendar("XNYS").sessions_in_range("2024-12-02", "2024-12-13"), tz="UTC")
    new = daily_bars(days.delete(3))  # 2024-12-05 missing
    window = Window(date(2024, 11, 27), date(2024, 12, 13), "incremental", history_from=date(2024, 1, 1))
    history = daily_bars(pd.DatetimeIndex([utc("2024-11-29")]))
    collected = Collected(new, window=window)
    processed = process(collected, "IBM", "1d", QualitySettings(), [], history, stored_from=utc("2024-08-01"))
    hole = xnys_sessions("2024-01-02", "2024-07-31")
    assert processed.uncovered_sessions == hole
    assert processed.gaps is not None and processed.gaps.count == 1
    assert processed.missing_sessions == hole + 1


# --- end to end: a real Yahoo payload that covers less than the window ----------------------------

PAYLOAD = "yfinance-rs_history_chart_AAPL.json"  # 2025-04-30 .. 2025-10-29, AAPL listed 1980


@pytest.fixture
def short_replay(tmp_path: Path) -> Sandbox:
    """AAPL as captured, and NEWCO: the same bars with meta.firstTradeDate moved to their first day."""
    replay = tmp_path / "replay"
    replay.mkdir()
    payload = json.loads((YAHOO / PAYLOAD).read_text())
    (replay / "AAPL.json").write_text(json.dumps(payload))
    result = payload["chart"]["result"][0]
    result["meta"] |= {"symbol": "NEWCO", "firstTradeDate": result["timestamp"][0]}
    (replay / "NEWCO.json").write_text(json.dumps(payload))
    return Sandbox("--replay", str(replay), log=tmp_path / "replay.log")


def test_a_yahoo_series_shorter_than_its_window_is_counted_unless_it_starts_at_its_listing(
    prefect_env: dict[str, str], short_replay: Sandbox
) -> None:
    env = {**prefect_env, "MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__BASE_URL": short_replay.base_url}
    try:
        result = marketpipe("run", "--symbols", "AAPL,NEWCO", "--start", "2025-01-02", "--end", "2025-10-29", env=env)
    finally:
        short_replay.stop()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert query_csv(env, "AAPL")["time"].iloc[0] == "2025-04-30T00:00:00Z"
    hole = xnys_sessions("2025-01-02", "2025-04-29")
    said = " ".join(result.stdout.split())
    assert f"AAPL: the source's bars start 2025-04-30, after the window's start 2025-01-02: {hole} sessions" in said
    assert "NEWCO: the source's bars start" not in said
    lines = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if line.count("│") > 5}
    assert "2025-04-30 (listed)" in lines["NEWCO"]

    from blocks.duckdb_store import DuckDBStore

    store = DuckDBStore(path=env["MARKETPIPE__STORAGE__DUCKDB__PATH"])
    assert store.read_metrics("AAPL", "yahoo_finance")["uncovered_sessions"].tolist() == [hole]
    assert store.read_metrics("NEWCO", "yahoo_finance")["uncovered_sessions"].tolist() == [0]
