"""Each validation rule against a crafted bad frame: the bad bar is quarantined, named and counted."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest

from tasks.bars import conform
from tasks.processing.validation import RULES, MissingColumnsError, validate_bars
from tasks.sources.yahoo_finance import parse_chart_result
from tests.conftest import yahoo_json

pytestmark = pytest.mark.unit  # no server, no child process: `pytest -m unit`

NOW = datetime(2024, 3, 1, 15, 0, tzinfo=UTC)


def bars(n: int = 5, **overrides: object) -> pd.DataFrame:
    data: dict[str, object] = {
        "time": pd.date_range("2024-01-01", periods=n, freq="D", tz="UTC"),
        "symbol": "TEST",
        "interval": "1d",
        "source": "test",
        "open": [10.0] * n,
        "high": [11.0] * n,
        "low": [9.0] * n,
        "close": [10.5] * n,
        "adj_close": [10.5] * n,
        "volume": [1000.0] * n,
    }
    data.update(overrides)
    return conform(pd.DataFrame(data))


def intraday(times: list[str], interval: str) -> pd.DataFrame:
    frame = bars(len(times), time=pd.to_datetime(times, utc=True))
    return frame.assign(interval=interval)


def test_clean_bars_pass_untouched() -> None:
    result = validate_bars(bars(), NOW)
    assert len(result.clean) == 5
    assert result.quarantined.empty
    assert result.counts == {}
    assert result.out_of_order == 0


@pytest.mark.parametrize(
    ("column", "value", "rule"),
    [
        ("low", 10.2, "ohlc_inconsistent"),  # low above open
        ("high", 10.4, "ohlc_inconsistent"),  # high below close
        ("open", 12.0, "ohlc_inconsistent"),  # open above high
        ("close", 8.0, "ohlc_inconsistent"),  # close below low
        ("open", -1.0, "non_positive_price"),  # checked after consistency: low is above it
        ("adj_close", 0.0, "non_positive_price"),
        ("volume", -5.0, "negative_volume"),
    ],
)
def test_each_value_rule_quarantines_the_bad_bar_only(column: str, value: float, rule: str) -> None:
    frame = bars()
    frame.loc[2, column] = value
    if rule == "non_positive_price" and column == "open":
        frame.loc[2, "low"] = -2.0
    result = validate_bars(frame, NOW)
    assert result.counts == {rule: 1}
    assert len(result.clean) == 4
    assert frame["time"].iloc[2] not in set(result.clean["time"])
    quarantined = result.quarantined.iloc[0]
    assert quarantined["rule"] == rule
    assert quarantined["reason"] == RULES[rule]
    assert quarantined["time"] == frame["time"].iloc[2]
    assert quarantined[column] == value


def test_inverted_high_low_is_quarantined() -> None:
    frame = bars(low=[9, 9, 12, 9, 9], high=[11, 11, 8, 11, 11], open=[10] * 5, close=[10] * 5)
    assert validate_bars(frame, NOW).counts == {"ohlc_inconsistent": 1}


def test_duplicates_keep_the_last_bar_received() -> None:
    frame = bars(3)
    later = frame.iloc[[1]].assign(close=10.75)
    result = validate_bars(pd.concat([frame, later], ignore_index=True), NOW)
    assert result.counts == {"duplicate_time": 1}
    assert result.clean["close"].tolist() == [10.5, 10.75, 10.5]
    assert result.quarantined["close"].tolist() == [10.5]


def test_out_of_order_bars_are_sorted_and_counted() -> None:
    frame = bars(6).iloc[[3, 0, 5, 1, 4, 2]]
    result = validate_bars(frame, NOW)
    assert result.clean["time"].is_monotonic_increasing
    assert result.clean["time"].is_unique
    assert len(result.clean) == 6
    assert result.out_of_order == 3
    assert result.counts == {}


def test_a_value_that_is_not_a_number_is_quarantined_not_read_as_missing() -> None:
    frame = bars().astype({"close": object})
    frame.loc[1, "close"] = "10.5O"  # a letter O typed for a zero
    frame.loc[3, "close"] = None  # missing is not invalid: the missing-value policy handles it
    result = validate_bars(frame, NOW)
    assert result.counts == {"invalid_value": 1}
    assert result.quarantined["time"].tolist() == [frame["time"].iloc[1]]
    assert len(result.clean) == 4
    assert np.isnan(result.clean["close"].iloc[2])


def test_an_unparseable_time_is_quarantined() -> None:
    frame = bars(3).astype({"time": object})
    frame.loc[1, "time"] = "yesterday-ish"
    result = validate_bars(frame, NOW)
    assert result.counts == {"invalid_value": 1}
    assert len(result.clean) == 2


def test_required_columns_are_checked_before_any_bar() -> None:
    with pytest.raises(MissingColumnsError, match="adj_close"):
        validate_bars(bars().drop(columns=["adj_close"]), NOW)


def test_daily_bars_off_midnight_are_off_grid() -> None:
    frame = bars()
    frame.loc[2, "time"] = frame["time"].iloc[2] + pd.Timedelta(hours=14, minutes=30)
    result = validate_bars(frame, NOW)
    assert result.counts == {"off_grid": 1}
    assert result.quarantined["time"].tolist() == [frame["time"].iloc[2]]


def test_intraday_bars_must_be_whole_intervals_after_the_days_first_bar() -> None:
    times = ["2024-01-02 14:30", "2024-01-02 15:30", "2024-01-02 16:31", "2024-01-02 17:30", "2024-01-03 14:30"]
    result = validate_bars(intraday(times, "1h"), NOW)
    assert result.counts == {"off_grid": 1}
    assert result.quarantined["time"].tolist() == [pd.Timestamp("2024-01-02 16:31", tz="UTC")]


def test_hourly_bars_at_the_half_hour_are_on_grid() -> None:
    times = ["2024-01-02 14:30", "2024-01-02 15:30", "2024-01-02 20:30", "2024-01-03 14:30"]
    assert validate_bars(intraday(times, "1h"), NOW).counts == {}


def test_bars_in_the_future_are_quarantined() -> None:
    frame = bars(time=pd.to_datetime(["2024-02-28", "2024-02-29", "2024-03-01", "2024-03-02", "2024-03-04"], utc=True))
    result = validate_bars(frame, NOW)
    # Today's trading date (and tomorrow's, east of UTC) may exist; the days after may not.
    assert result.counts == {"future_time": 1}
    assert result.quarantined["time"].tolist() == [pd.Timestamp("2024-03-04", tz="UTC")]


def test_an_intraday_bar_starting_after_now_is_in_the_future() -> None:
    frame = intraday(["2024-03-01 14:30", "2024-03-01 14:45", "2024-03-01 15:00", "2024-03-01 15:15"], "15m")
    result = validate_bars(frame, NOW)
    assert result.counts == {"future_time": 1}
    assert result.quarantined["time"].tolist() == [pd.Timestamp("2024-03-01 15:15", tz="UTC")]


def test_a_bar_breaking_several_rules_is_quarantined_once_under_the_first() -> None:
    frame = bars()
    frame.loc[1, ["low", "volume"]] = [12.0, -1.0]
    result = validate_bars(frame, NOW)
    assert result.counts == {"ohlc_inconsistent": 1}
    assert len(result.quarantined) == 1


def test_partly_missing_bars_are_not_quarantined_by_the_value_rules() -> None:
    frame = bars()
    frame.loc[1, ["open", "high"]] = np.nan
    assert validate_bars(frame, NOW).counts == {}


# -- A bend of open/close just outside low..high is repaired within the tolerance ------------------

BEND = 0.002  # the default quality.ohlc_tolerance


@pytest.mark.parametrize(
    ("column", "value", "high", "low"),
    [
        ("close", 11.011, 11.011, 9.0),  # 10 bp above the high: high widened to the close
        ("open", 8.991, 11.0, 8.991),  # 10 bp below the low: low widened to the open
    ],
)
def test_a_small_bend_is_repaired_flagged_and_counted(column: str, value: float, high: float, low: float) -> None:
    frame = bars()
    frame.loc[2, column] = value
    result = validate_bars(frame, NOW, ohlc_tolerance=BEND)
    assert result.counts == {}
    assert result.ohlc_repaired == 1
    assert result.clean["flag_ohlc_repaired"].tolist() == [0.0, 0.0, 1.0, 0.0, 0.0]
    repaired = result.clean.iloc[2]
    assert (repaired["high"], repaired["low"], repaired[column]) == (high, low, value)
    assert result.clean.drop(index=2)[["high", "low"]].eq([11.0, 9.0]).all().all()


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"close": 11.55}, "a close 5% above the high"),
        ({"open": 8.97}, "an open 33 bp below the low"),
        ({"high": 9.0, "low": 11.0, "open": 10.0, "close": 10.0}, "a high below the low"),
        ({"high": 10.49, "low": 10.5, "open": 10.5, "close": 10.5}, "a high a little below the low"),
    ],
)
def test_a_real_inconsistency_is_still_quarantined(changes: dict[str, float], why: str) -> None:
    frame = bars()
    for column, value in changes.items():
        frame.loc[2, column] = value
    result = validate_bars(frame, NOW, ohlc_tolerance=BEND)
    assert result.counts == {"ohlc_inconsistent": 1}, why
    assert result.ohlc_repaired == 0
    assert "flag_ohlc_repaired" not in result.quarantined
    for column, value in changes.items():
        assert result.quarantined.iloc[0][column] == value  # quarantined as delivered


def test_no_tolerance_repairs_nothing() -> None:
    frame = bars()
    frame.loc[2, "close"] = 11.011
    result = validate_bars(frame, NOW)
    assert result.counts == {"ohlc_inconsistent": 1}
    assert result.clean["flag_ohlc_repaired"].sum() == 0


def test_yahoos_eurusd_2020_bends_are_all_repaired_by_the_default() -> None:
    result = yahoo_json("yahoo-finance2_chart_EURUSD=X_2020_full_year_1d.json")["chart"]["result"][0]
    parsed = parse_chart_result(result, "EURUSD=X", "1d").bars
    strict = validate_bars(parsed, NOW.replace(year=2021))
    assert strict.counts == {"ohlc_inconsistent": 13}
    repaired = validate_bars(parsed, NOW.replace(year=2021), ohlc_tolerance=BEND)
    assert (len(repaired.clean), repaired.counts, repaired.ohlc_repaired) == (264, {}, 13)
    clean = repaired.clean
    assert (
        (clean["low"] <= clean[["open", "close"]].min(axis=1)) & (clean[["open", "close"]].max(axis=1) <= clean["high"])
    ).all()


# -- Sessions with a lunch break: the grid restarts at each segment's open ---------------------------


def local_intraday(times: list[str], interval: str, zone: str) -> pd.DataFrame:
    stamps = pd.DatetimeIndex(pd.to_datetime(times)).tz_localize(zone).tz_convert("UTC")
    return intraday([str(t) for t in stamps], interval)


# Yahoo's 60m bars start at each segment's open (real shapes; Tokyo closes 15:30 since 2024-11-05).
LUNCH_BREAK_DAYS = {
    "XHKG": ("Asia/Hong_Kong", "2026-11-02", ["09:30", "10:30", "11:30", "13:00", "14:00", "15:00"]),
    "XTKS": ("Asia/Tokyo", "2026-11-02", ["09:00", "10:00", "11:00", "12:30", "13:30", "14:30"]),
    "XSHG": ("Asia/Shanghai", "2026-11-02", ["09:30", "10:30", "13:00", "14:00"]),
}


@pytest.mark.parametrize("calendar", sorted(LUNCH_BREAK_DAYS))
def test_hourly_bars_after_a_lunch_break_are_on_grid(calendar: str) -> None:
    zone, day, clock = LUNCH_BREAK_DAYS[calendar]
    frame = local_intraday([f"{day} {t}" for t in clock], "60m", zone)
    now = datetime(2026, 12, 1, tzinfo=UTC)
    assert validate_bars(frame, now, calendar=calendar).counts == {}
    # Without the calendar, measured from the day's first bar, the afternoon is off the grid.
    assert validate_bars(frame, now).counts.get("off_grid", 0) > 0


def test_a_bar_off_its_segments_grid_is_still_off_grid() -> None:
    zone, day, clock = LUNCH_BREAK_DAYS["XHKG"]
    frame = local_intraday([f"{day} {t}" for t in [*clock[:4], "13:20", *clock[4:]]], "60m", zone)
    result = validate_bars(frame, datetime(2026, 12, 1, tzinfo=UTC), calendar="XHKG")
    assert result.counts == {"off_grid": 1}
    assert result.quarantined["time"].tolist() == [pd.Timestamp(f"{day} 13:20", tz=zone).tz_convert("UTC")]


def test_bars_on_the_clocks_grid_inside_a_segment_are_on_grid() -> None:
    # Hourly bars on the hour (a clock grid) inside the 09:30-16:00 New York session.
    frame = local_intraday([f"2026-11-02 {h:02d}:00" for h in range(10, 16)], "60m", "America/New_York")
    assert validate_bars(frame, datetime(2026, 12, 1, tzinfo=UTC), calendar="XNYS").counts == {}
