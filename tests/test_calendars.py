from __future__ import annotations

from datetime import date, datetime

import exchange_calendars as xc
import pandas as pd
import pytest

from tasks.calendars import SessionGaps, calendar_for, live_bars, missing_sessions, session_segments
from tasks.errors import UsageError
from tasks.sources.alpha_vantage import av_instrument
from tasks.sources.base import Collected
from tasks.sources.yahoo_finance import parse_chart_result, yahoo_instrument
from tests.conftest import yahoo_json

pytestmark = pytest.mark.unit  # no server, no child process: `pytest -m unit`

AAPL_2020 = "yahoo-finance2_chart_AAPL_2020_full_year_1d_split_and_dividends.json"
BTC_2020 = "yahoo-finance2_chart_BTC-USD_2020_full_year_1d_with_nulls.json"
EURUSD_2020 = "yahoo-finance2_chart_EURUSD=X_2020_full_year_1d.json"
OCDO_2020 = "yahoo-finance2_chart_OCDO.L_2020_full_year_1d_London.json"
WSKT_2020 = "yahoo-finance2_chart_WSKT.JK_2020_full_year_1d_Jakarta_dividends.json"
TSLA_30M = "yahoo-finance2_chart_TSLA_2021-11-22_30m_includePrePost.json"


def parsed(name: str, symbol: str, interval: str = "1d") -> Collected:
    return parse_chart_result(yahoo_json(name)["chart"]["result"][0], symbol, interval)


def utc(*stamps: str) -> pd.Series:
    return pd.Series(pd.to_datetime(list(stamps), utc=True))


def without(times: pd.Series, *days: str) -> pd.Series:
    return times[~times.isin(pd.to_datetime(list(days), utc=True))]


def gaps(times: pd.Series, interval: str, calendar: str, since: pd.Timestamp | None = None) -> SessionGaps:
    found = missing_sessions(times, interval, calendar, since=since)
    assert found is not None
    return found


# --- calendar_for -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("symbol", "name", "expected"),
    [("AAPL", AAPL_2020, "XNYS"), ("OCDO.L", OCDO_2020, "XLON"), ("WSKT.JK", WSKT_2020, "XIDX")],
)
def test_yahoo_exchange_names_map_to_their_calendar(symbol: str, name: str, expected: str) -> None:
    assert calendar_for(symbol, parsed(name, symbol).instrument) == expected


def test_crypto_and_fx_payloads_trade_around_the_clock() -> None:
    assert calendar_for("BTC-USD", parsed(BTC_2020, "BTC-USD").instrument) == "24/7"
    assert calendar_for("EURUSD=X", parsed(EURUSD_2020, "EURUSD=X").instrument) == "24/5"
    assert calendar_for("BTC-USD", yahoo_instrument({"exchangeName": "CCC"})) == "24/7"
    assert calendar_for("EURUSD=X", yahoo_instrument({"exchangeName": "CCY"})) == "24/5"
    assert (
        calendar_for("XYZ-USD", yahoo_instrument({"instrumentType": "CRYPTOCURRENCY", "exchangeName": "NMS"})) == "24/7"
    )


@pytest.mark.parametrize(
    ("exchange", "expected"),
    [("NYQ", "XNYS"), ("PCX", "XNYS"), ("GER", "XETR"), ("FRA", "XFRA"), ("CMX", "CMES"), ("TOR", "XTSE")],
)
def test_more_exchange_codes(exchange: str, expected: str) -> None:
    assert calendar_for("X", yahoo_instrument({"exchangeName": exchange})) == expected


def test_every_mapped_calendar_exists() -> None:
    from tasks.sources.yahoo_finance import YAHOO_EXCHANGES

    assert set(YAHOO_EXCHANGES.values()) <= set(xc.get_calendar_names(include_aliases=False))


def test_override_wins_and_is_resolved() -> None:
    nasdaq = yahoo_instrument({"exchangeName": "NMS", "instrumentType": "EQUITY"})
    assert calendar_for("AAPL", nasdaq, override="XLON") == "XLON"
    assert calendar_for("AAPL", nasdaq, override="NYSE") == "XNYS"
    assert calendar_for("AAPL", nasdaq, override="xnys") == "XNYS"


def test_unknown_override_is_a_usage_error_naming_it() -> None:
    with pytest.raises(UsageError, match="'XNYZ'") as caught:
        calendar_for("AAPL", yahoo_instrument({"exchangeName": "NMS"}), override="XNYZ")
    assert "XNYS" in str(caught.value)


@pytest.mark.parametrize(
    ("symbol", "expected"),
    [
        ("TSCO.LON", "XLON"),
        ("SHOP.TRT", "XTSE"),
        ("SAP.DEX", "XETR"),
        ("IBM", "XNYS"),
        ("BRK-B", "XNYS"),
        ("brk.b", "XNYS"),
        ("EURUSD=X", "24/5"),
        ("0700.HK", None),
        ("OCDO.L", None),
        ("^GSPC", None),
        ("GC=F", None),
    ],
)
def test_symbol_shape_decides_when_meta_is_silent(symbol: str, expected: str | None) -> None:
    assert calendar_for(symbol, av_instrument(symbol, {})) == expected  # a source that names no exchange


def test_an_unknown_exchange_is_not_guessed_from_the_symbol() -> None:
    assert calendar_for("ABC", yahoo_instrument({"exchangeName": "XYZ", "instrumentType": "EQUITY"})) is None


# --- missing_sessions on real payloads ---------------------------------------------------------


def test_aapl_2020_is_complete() -> None:
    times = parsed(AAPL_2020, "AAPL").bars["time"]
    found = gaps(times, "1d", "XNYS")
    assert (found.expected, found.count, found.missing) == (253, 0, ())
    assert found.expected == len(times)


def test_deleted_aapl_sessions_are_reported_as_runs() -> None:
    times = without(parsed(AAPL_2020, "AAPL").bars["time"], "2020-03-02", "2020-03-03", "2020-07-15")
    found = gaps(times, "1d", "XNYS")
    assert found.expected == 253
    assert found.count == 3
    assert found.missing == ((date(2020, 3, 2), date(2020, 3, 3)), (date(2020, 7, 15), date(2020, 7, 15)))
    assert found.describe() == "3 missing of 253 XNYS sessions: 2020-03-02..2020-03-03, 2020-07-15"


def test_a_friday_and_the_next_monday_are_one_run_of_two_sessions() -> None:
    times = without(parsed(AAPL_2020, "AAPL").bars["time"], "2020-03-06", "2020-03-09")
    found = gaps(times, "1d", "XNYS")
    assert found.missing == ((date(2020, 3, 6), date(2020, 3, 9)),)
    assert found.count == 2


def test_a_run_across_a_holiday_weekend_counts_sessions_only() -> None:
    # Thu 2020-07-02, then the observed Independence Day (Fri 07-03) and the weekend, then Mon 07-06.
    times = without(parsed(AAPL_2020, "AAPL").bars["time"], "2020-07-02", "2020-07-06")
    found = gaps(times, "1d", "XNYS")
    assert found.missing == ((date(2020, 7, 2), date(2020, 7, 6)),)
    assert found.count == 2


def test_btc_2020_payload_covers_every_day_but_has_null_rows() -> None:
    bars = parsed(BTC_2020, "BTC-USD").bars
    # Yahoo sent 2020-01-01..2021-01-04; four of those days carry no prices at all.
    assert gaps(bars["time"], "1d", "24/7").describe() == "none missing of 370 24/7 sessions"
    in_2020 = bars["time"][bars["time"] < pd.Timestamp("2021-01-01", tz="UTC")]
    assert gaps(in_2020, "1d", "24/7").expected == 366
    priced = gaps(bars["time"][bars["close"].notna()], "1d", "24/7")
    assert priced.count == 4
    assert priced.missing == (
        (date(2020, 4, 17), date(2020, 4, 17)),
        (date(2020, 10, 9), date(2020, 10, 9)),
        (date(2020, 10, 12), date(2020, 10, 13)),
    )


def test_eurusd_weekends_are_never_missing() -> None:
    times = parsed(EURUSD_2020, "EURUSD=X").bars["time"]
    assert gaps(times, "1d", "24/5").describe() == "none missing of 264 24/5 sessions"
    # Dropping a whole week, Saturday and Sunday included, costs exactly its five weekdays.
    week = pd.date_range("2020-06-13", "2020-06-21", tz="UTC")
    found = gaps(times[~times.isin(week)], "1d", "24/5")
    assert found.missing == ((date(2020, 6, 15), date(2020, 6, 19)),)
    assert found.count == 5


def test_other_exchanges_use_their_own_holidays() -> None:
    assert gaps(parsed(OCDO_2020, "OCDO.L").bars["time"], "1d", "XLON").expected == 254
    assert gaps(parsed(WSKT_2020, "WSKT.JK").bars["time"], "1d", "XIDX").expected == 242


# --- the seam with stored bars -----------------------------------------------------------------


def test_since_checks_the_seam_between_stored_and_new_bars() -> None:
    stored = pd.Timestamp("2020-03-02", tz="UTC")  # Monday; Tue and Wed never arrived
    new = utc("2020-03-05", "2020-03-06")
    found = gaps(new, "1d", "XNYS", since=stored)
    assert found.missing == ((date(2020, 3, 3), date(2020, 3, 4)),)
    assert (found.count, found.expected) == (2, 5)
    assert gaps(new, "1d", "XNYS").describe() == "none missing of 2 XNYS sessions"


def test_a_later_since_does_not_move_the_span() -> None:
    # Stored bars past the new ones are not this batch's business: the span still ends at its last bar.
    found = gaps(utc("2020-03-02", "2020-03-04"), "1d", "XNYS", since=pd.Timestamp("2020-03-10", tz="UTC"))
    assert found.describe() == "1 missing of 3 XNYS sessions: 2020-03-03"


# --- intraday ----------------------------------------------------------------------------------


def test_tsla_30m_sessions_are_new_york_dates() -> None:
    times = parsed(TSLA_30M, "TSLA", "30m").bars["time"]
    assert len(times) == 30
    assert gaps(times, "30m", "XNYS").describe() == "none missing of 1 XNYS sessions"
    # Friday's last post-market bar starts at 19:30 New York, already Saturday in UTC.
    friday_evening = pd.Timestamp("2021-11-20 00:30", tz="UTC")
    found = gaps(times, "30m", "XNYS", since=friday_evening)
    assert (found.expected, found.count) == (2, 0)


def test_late_utc_bars_belong_to_the_new_york_day() -> None:
    # Mon 2024-06-03: 23:30 UTC is 19:30 and Tue 00:30 UTC is 20:30 in New York, both Monday.
    times = utc("2024-06-03 23:30", "2024-06-04 00:30", "2024-06-05 13:30")
    found = gaps(times, "30m", "XNYS")
    assert found.missing == ((date(2024, 6, 4), date(2024, 6, 4)),)
    # The same stamps as daily bars are read as UTC dates, so Tuesday is there.
    assert gaps(times, "1d", "XNYS").count == 0


def test_early_utc_bars_belong_to_the_tokyo_day() -> None:
    # Sun 23:00 UTC is Mon 08:00 in Tokyo.
    found = gaps(utc("2024-06-02 23:00", "2024-06-04 00:00"), "1h", "XTKS")
    assert (found.expected, found.count) == (2, 0)


def test_24_hour_calendars_use_utc_dates_intraday() -> None:
    found = gaps(utc("2024-06-03 23:00", "2024-06-05 01:00"), "1h", "24/7")
    assert found.missing == ((date(2024, 6, 4), date(2024, 6, 4)),)


def test_twenty_thousand_minute_bars_with_a_missing_session() -> None:
    cal = xc.get_calendar("XNYS", start="2024-01-02", end="2024-03-28")
    minutes = cal.sessions_minutes("2024-01-02", "2024-03-28")
    times = pd.Series(minutes[minutes.tz_convert("America/New_York").date != date(2024, 2, 14)])
    assert len(times) > 20_000
    found = gaps(times, "1m", "XNYS")
    assert found.describe() == "1 missing of 61 XNYS sessions: 2024-02-14"


# --- spans, bounds and edge cases --------------------------------------------------------------


def test_long_daily_history_back_to_the_nineties() -> None:
    sessions = xc.get_calendar("XNYS", start="1999-01-04", end="2019-12-31").sessions
    times = pd.Series(sessions.tz_localize("UTC"))
    assert len(times) > 5_000
    holes = pd.to_datetime(["2001-09-10", "2008-10-10", "2008-10-13"], utc=True)
    found = gaps(times[~times.isin(holes)], "1d", "XNYS")
    # 2001-09-11..14 were closures, so the 10th and the 17th are neighbours in the session sequence.
    assert found.missing == ((date(2001, 9, 10), date(2001, 9, 10)), (date(2008, 10, 10), date(2008, 10, 13)))
    assert (found.count, found.expected) == (3, len(sessions))


def test_spans_the_calendar_cannot_provide_are_skipped() -> None:
    # The Saudi calendar starts in 2021.
    assert missing_sessions(utc("2019-06-03", "2019-06-05"), "1d", "XSAU") is None


@pytest.mark.parametrize("interval", ["5d", "1wk", "1mo", "3mo"])
def test_longer_than_daily_bars_are_not_checked(interval: str) -> None:
    assert missing_sessions(utc("2020-01-06", "2020-03-02"), interval, "XNYS") is None


def test_no_bars_no_answer() -> None:
    assert missing_sessions(pd.Series(pd.DatetimeIndex([], tz="UTC")), "1d", "XNYS") is None


# --- SessionGaps -------------------------------------------------------------------------------


def test_describe_when_clean() -> None:
    assert SessionGaps("XNYS", 253, ()).describe() == "none missing of 253 XNYS sessions"


def test_session_counts_come_from_the_calendar_when_not_given() -> None:
    found = SessionGaps("XNYS", 253, ((date(2020, 3, 6), date(2020, 3, 9)), (date(2020, 7, 2), date(2020, 7, 6))))
    assert found.run_sessions == (2, 2)
    assert found.describe() == "4 missing of 253 XNYS sessions: 2020-03-06..2020-03-09, 2020-07-02..2020-07-06"


def test_describe_lists_only_the_first_runs() -> None:
    days = [date(2020, 1, d) for d in range(2, 31, 2)]
    found = SessionGaps("24/7", 30, tuple((d, d) for d in days), run_sessions=(1,) * len(days))
    text = found.describe()
    assert text.startswith("15 missing of 30 24/7 sessions: 2020-01-02, 2020-01-04, ")
    assert text.endswith("2020-01-20, and 5 more runs")


def test_mismatched_run_sessions_are_refused() -> None:
    with pytest.raises(ValueError, match="2 session counts given for 1 runs"):
        SessionGaps("XNYS", 5, ((date(2020, 3, 3), date(2020, 3, 3)),), run_sessions=(1, 1))


def test_bars_on_holidays_at_the_edges_of_the_span_are_not_expected_and_break_nothing() -> None:
    # Sources sometimes serve a bar on a holiday; 2023-01-02 and 2023-12-25 were NYSE holidays.
    times = pd.Series(pd.bdate_range("2023-01-02", "2023-12-25", tz="UTC"))
    gaps = missing_sessions(times, "1d", "XNYS")
    assert gaps is not None
    assert gaps.count == 0
    assert gaps.expected == 246  # 250 sessions in 2023, less Dec 26-29


def at(stamp: str) -> datetime:
    return pd.Timestamp(stamp, tz="UTC").to_pydatetime()


def test_a_lunch_break_splits_a_session_into_two_segments() -> None:
    segments = session_segments("XHKG", date(2026, 11, 2), date(2026, 11, 2))
    assert segments is not None
    opens, closes = (pd.to_datetime(s, utc=True).tz_convert("Asia/Hong_Kong").strftime("%H:%M") for s in segments)
    assert list(zip(opens, closes, strict=True)) == [("09:30", "12:00"), ("13:00", "16:00")]
    nyse = session_segments("XNYS", date(2026, 11, 2), date(2026, 11, 3))
    assert nyse is not None and len(nyse[0]) == 2  # one segment a day


def test_a_daily_bar_is_live_until_its_session_closes() -> None:
    day = utc("2026-11-30", "2026-12-01")
    session = (at("2026-12-01 14:30"), at("2026-12-01 21:00"))
    assert live_bars(day, "1d", at("2026-12-01 20:59"), current_session=session).tolist() == [False, True]
    assert live_bars(day, "1d", at("2026-12-01 21:00"), current_session=session).tolist() == [False, False]
    # Without the source's session: the calendar's close, then the end of the day in the exchange's zone.
    assert live_bars(day, "1d", at("2026-12-01 20:59"), calendar="XNYS").tolist() == [False, True]
    assert live_bars(day, "1d", at("2026-12-01 21:00"), calendar="XNYS").tolist() == [False, False]
    assert live_bars(day, "1d", at("2026-12-01 21:00"), zone="America/New_York").tolist() == [False, True]
    assert live_bars(day, "1d", at("2026-12-02 05:00"), zone="America/New_York").tolist() == [False, False]


def test_a_session_before_the_current_one_has_closed() -> None:
    # Served at night: Yahoo's current trading period is already the next day's session.
    next_session = (at("2026-12-02 08:00"), at("2026-12-02 16:30"))
    bars = utc("2026-12-01")
    assert live_bars(
        bars, "1d", at("2026-12-01 23:00"), zone="Europe/Berlin", current_session=next_session
    ).tolist() == [False]


def test_an_intraday_bar_is_live_until_its_interval_ends_or_its_session_segment_closes() -> None:
    # 0700.HK 60m bars at 10:30 and 11:30 HKT; the 11:30 bar ends at the 12:00 lunch break.
    bars = utc("2026-11-02 02:30", "2026-11-02 03:30")
    assert live_bars(bars, "60m", at("2026-11-02 03:45"), calendar="XHKG").tolist() == [False, True]
    assert live_bars(bars, "60m", at("2026-11-02 04:00"), calendar="XHKG").tolist() == [False, False]
    # Without a calendar the bar's own interval decides: it ends at 12:30.
    assert live_bars(bars, "60m", at("2026-11-02 04:00")).tolist() == [False, True]
    # Yahoo's current session caps the day's last bar at the close (NYSE 15:30 bar, close 16:00 New York).
    us = utc("2026-12-01 20:30")
    regular = (at("2026-12-01 14:30"), at("2026-12-01 21:00"))
    assert live_bars(us, "1h", at("2026-12-01 20:59"), current_session=regular).tolist() == [True]
    assert live_bars(us, "1h", at("2026-12-01 21:00"), current_session=regular).tolist() == [False]


def test_a_weekly_or_monthly_bar_is_live_until_its_periods_last_session_closes() -> None:
    week = utc("2026-11-30")  # Monday
    assert live_bars(week, "1wk", at("2026-12-04 20:59"), calendar="XNYS").tolist() == [True]
    assert live_bars(week, "1wk", at("2026-12-04 21:00"), calendar="XNYS").tolist() == [False]
    month = utc("2026-11-02")
    assert live_bars(month, "1mo", at("2026-11-30 20:59"), calendar="XNYS").tolist() == [True]
    assert live_bars(month, "1mo", at("2026-11-30 21:00"), calendar="XNYS").tolist() == [False]
    assert live_bars(utc("2026-10-01"), "3mo", at("2026-12-01 12:00"), zone="America/New_York").tolist() == [True]
