"""The processing pipeline: quarantine, the missing-value policy, adjusted prices, returns and units."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from blocks.duckdb_store import DuckDBStore
from configs.indicators import default_indicators
from configs.settings import QualitySettings
from tasks.bars import conform, flag_missing
from tasks.process import describe_counts
from tasks.processing.adjust import add_adjusted_prices, add_returns
from tasks.processing.indicators import bounded_lookback, indicator_columns
from tasks.processing.missing import FLAG_FILLED, apply_missing_policy
from tasks.processing.pipeline import Processed, process
from tasks.processing.validation import RULES
from tasks.sources.base import Collected
from tasks.sources.yahoo_finance import parse_chart_result
from tasks.store import quarantine_rows
from tests.conftest import yahoo_json

pytestmark = pytest.mark.unit  # no server, no child process: `pytest -m unit`

NOW = datetime(2025, 1, 1, tzinfo=UTC)


def bars(n: int = 40, **overrides: object) -> pd.DataFrame:
    rng = np.random.default_rng(7)
    close = 100 * np.cumprod(1 + rng.normal(0, 0.01, n))
    data: dict[str, object] = {
        "time": pd.bdate_range("2024-01-02", periods=n, tz="UTC"),
        "symbol": "TEST",
        "interval": "1d",
        "source": "test",
        "open": close * 0.999,
        "high": close * 1.01,
        "low": close * 0.99,
        "close": close,
        "adj_close": close * 0.98,
        "volume": np.full(n, 1000.0),
    }
    data.update(overrides)
    return flag_missing(conform(pd.DataFrame(data)))


def run(frame: pd.DataFrame, history: pd.DataFrame | None = None, **quality: Any) -> Processed:
    return process(Collected(frame), "TEST", "1d", QualitySettings(**quality), default_indicators(), history, NOW)


def test_quarantined_bars_are_counted_kept_and_never_stored_as_clean() -> None:
    frame = bars()
    frame.loc[[3, 7], "low"] = 500.0
    processed = process(Collected(frame), "TEST", "1d", QualitySettings(), default_indicators(), now=NOW)
    assert processed.rejected == {"ohlc_inconsistent": 2}
    assert processed.collected == 40
    assert len(processed.bars) == 38
    assert set(processed.quarantined["time"]) == {frame["time"].iloc[3], frame["time"].iloc[7]}
    assert set(processed.quarantined["rule"]) == {"ohlc_inconsistent"}
    assert not set(processed.quarantined["time"]) & set(processed.bars["time"])
    assert (processed.bars["low"] <= processed.bars[["open", "close"]].min(axis=1)).all()


def missing_frame() -> pd.DataFrame:
    frame = bars(10)
    frame.loc[4, ["open", "high", "low", "close", "adj_close", "volume"]] = np.nan  # a Yahoo null row
    frame.loc[6, "open"] = np.nan  # a partly empty bar
    return flag_missing(frame)


def test_missing_policy_drop_drops_and_counts() -> None:
    frame, counts = apply_missing_policy(missing_frame(), "drop")
    assert counts == {"missing_dropped": 2}
    assert len(frame) == 8
    assert not frame[["open", "high", "low", "close"]].isna().any().any()


def test_missing_policy_ffill_carries_the_last_close_and_flags() -> None:
    source = missing_frame()
    frame, counts = apply_missing_policy(source, "ffill")
    assert counts == {"missing_filled": 2}
    assert len(frame) == 10
    carried = source["close"].iloc[3]
    empty = frame.iloc[4]
    assert [empty["open"], empty["high"], empty["low"], empty["close"]] == [carried] * 4
    assert empty["volume"] == 0.0
    # The adjustment factor of the bar before carries over.
    assert empty["adj_close"] == pytest.approx(carried * 0.98, rel=1e-12)
    partly = frame.iloc[6]
    assert partly["open"] == frame["close"].iloc[5]  # the previous close
    assert partly["close"] == source["close"].iloc[6]  # what the source sent is untouched
    assert partly["volume"] == 1000.0
    assert frame[FLAG_FILLED].tolist() == [1.0 if i in (4, 6) else 0.0 for i in range(10)]
    assert frame["flag_missing"].tolist() == [1.0 if i in (4, 6) else 0.0 for i in range(10)]


def test_missing_policy_ffill_cannot_fill_the_first_bar_ever_and_says_so() -> None:
    frame = bars(5)
    frame.loc[0, ["open", "high", "low", "close"]] = np.nan
    filled, counts = apply_missing_policy(frame, "ffill")
    assert counts == {"missing_dropped": 1}
    assert len(filled) == 4


def test_missing_policy_ffill_uses_stored_history_for_the_first_new_bar() -> None:
    frame = bars(6)
    frame.loc[3, ["open", "high", "low", "close"]] = np.nan
    filled, counts = apply_missing_policy(frame, "ffill", start=3)
    assert counts == {"missing_filled": 1}
    assert filled["close"].iloc[3] == frame["close"].iloc[2]


def test_missing_policy_keep_keeps_nan_and_indicators_skip_the_bar() -> None:
    source = missing_frame()
    processed = run(source, missing="keep")
    assert processed.dropped == {}
    out: pd.DataFrame = processed.bars
    assert len(out) == 10
    assert np.isnan(out["close"].iloc[4])
    assert np.isnan(out["sma_20"].iloc[4])
    assert processed.flagged == {"missing": 2}


def test_the_default_policy_drops_and_the_summary_counts() -> None:
    processed = run(missing_frame())
    assert processed.dropped == {"missing_dropped": 2}
    assert len(processed.bars) == 8


def test_adjusted_prices_share_the_close_factor() -> None:
    frame = add_adjusted_prices(bars(5))
    for column in ("open", "high", "low"):
        np.testing.assert_allclose(frame[f"adj_{column}"], frame[column] * 0.98, rtol=1e-15)


def test_adjusted_prices_are_nan_without_an_adj_close() -> None:
    frame = add_adjusted_prices(bars(5, adj_close=np.nan))
    assert frame[["adj_open", "adj_high", "adj_low"]].isna().all().all()


def test_returns_are_on_adj_close_and_the_first_bar_has_none() -> None:
    frame = add_returns(bars(5))
    adj = frame["adj_close"].to_numpy()
    assert np.isnan(frame["return_1"].iloc[0])
    assert np.isnan(frame["log_return_1"].iloc[0])
    np.testing.assert_allclose(frame["return_1"].iloc[1:], adj[1:] / adj[:-1] - 1, rtol=1e-12)
    np.testing.assert_allclose(frame["log_return_1"].iloc[1:], np.log(adj[1:] / adj[:-1]), rtol=1e-12)


def test_returns_fall_back_to_close_without_adj_close() -> None:
    frame = add_returns(bars(3, adj_close=np.nan))
    close = frame["close"].to_numpy()
    assert frame["return_1"].iloc[2] == pytest.approx(close[2] / close[1] - 1, rel=1e-12)


def test_incremental_returns_use_the_stored_previous_bar() -> None:
    whole = bars(30)
    full = run(whole)
    incremental = run(whole.iloc[25:].reset_index(drop=True), history=full.bars.iloc[:25])
    np.testing.assert_allclose(
        incremental.bars["return_1"],
        full.bars["return_1"].iloc[25:],
        rtol=1e-12,
    )


def test_an_incremental_run_past_the_lookback_equals_a_full_run_for_every_default_indicator() -> None:
    """The history read back is the last `lookback_bars` stored bars, far fewer than the series: the
    recursive indicators must have forgotten their seed, and OBV (a running sum) must carry on."""
    n = 1_500
    rng = np.random.default_rng(11)
    whole = bars(n, time=pd.bdate_range("2015-01-02", periods=n, tz="UTC"), volume=rng.uniform(5e5, 2e6, n).round())
    full = run(whole).bars
    lookback = bounded_lookback(default_indicators())
    assert lookback < n - 100  # the history given is a tail, not the whole series
    incremental = run(whole.iloc[n - 100 :].reset_index(drop=True), history=full.iloc[: n - 100].tail(lookback)).bars
    expected = full.iloc[n - 100 :].reset_index(drop=True)
    for column in indicator_columns(default_indicators()):
        np.testing.assert_allclose(incremental[column], expected[column], rtol=1e-9, atol=1e-9, err_msg=column)
    # Without the stored values to carry on from, OBV would restart at the lookback's first bar.
    assert abs(expected["obv"].iloc[0]) > 1e6


def test_pence_are_stored_as_pounds_and_the_summary_names_the_currency() -> None:
    result = yahoo_json("yahoo-finance2_chart_OCDO.L_2020_full_year_1d_London.json")["chart"]["result"][0]
    collected = parse_chart_result(result, "OCDO.L", "1d")
    processed = process(collected, "OCDO.L", "1d", QualitySettings(), default_indicators(), now=NOW)
    assert processed.currency == "GBP"
    raw = collected.bars.set_index("time")["close"]
    stored = processed.bars.set_index("time")["close"]
    np.testing.assert_allclose(stored, raw.loc[stored.index] / 100, rtol=1e-15)


def test_every_stored_column_is_float64_and_times_are_utc() -> None:
    out = run(bars()).bars
    assert str(out["time"].dtype) == "datetime64[ns, UTC]"
    values = out.drop(columns=["time", "symbol", "interval", "source"])
    assert set(values.dtypes.astype(str)) == {"float64"}
    for column in ("adj_open", "adj_high", "adj_low", "return_1", "log_return_1", "flag_missing", "flag_filled"):
        assert column in out


def with_bad_bar(rule: str) -> tuple[pd.DataFrame, pd.Timestamp]:
    """A clean series with one bar that breaks ``rule``; returns the frame and the bad bar's time."""
    frame = bars(30)
    bad = frame["time"].iloc[12]
    if rule == "invalid_value":
        frame = frame.astype({"volume": object})
        frame.loc[12, "volume"] = "1,000"
    elif rule == "duplicate_time":
        frame = pd.concat([frame, frame.iloc[[12]].assign(close=frame["close"].iloc[12] * 1.001)], ignore_index=True)
    elif rule == "off_grid":
        frame.loc[12, "time"] = bad = bad + pd.Timedelta(hours=13, minutes=30)
    elif rule == "future_time":
        frame.loc[29, "time"] = bad = pd.Timestamp(NOW) + pd.Timedelta(days=3)
    elif rule == "ohlc_inconsistent":
        frame.loc[12, "low"] = frame["high"].iloc[12] * 1.1
    elif rule == "non_positive_price":
        frame.loc[12, ["open", "low"]] = [0.0, 0.0]
    elif rule == "negative_volume":
        frame.loc[12, "volume"] = -100.0
    return frame, bad


@pytest.mark.parametrize("rule", list(RULES))
def test_each_rule_is_counted_by_name_quarantined_with_its_reason_and_never_stored_as_clean(
    rule: str, tmp_path: Path
) -> None:
    frame, bad = with_bad_bar(rule)
    processed = run(frame)
    assert processed.rejected == {rule: 1}
    assert f"{rule}=1" == describe_counts(processed.rejected)  # the summary's `quarantined` text

    store = DuckDBStore(path=str(tmp_path / "bars.duckdb"))
    store.write_bars(processed.bars)
    store.write_quarantine(quarantine_rows(processed.quarantined))
    stored = store.read_bars("TEST", source="test")
    quarantined = store.read_quarantine("TEST")
    assert len(quarantined) == 1
    assert (quarantined["rule"].iloc[0], quarantined["reason"].iloc[0]) == (rule, RULES[rule])
    if rule == "duplicate_time":  # the later bar is kept, the earlier one quarantined
        assert quarantined["close"].iloc[0] == frame["close"].iloc[12]
        assert stored.loc[stored["time"] == bad, "close"].tolist() == [frame["close"].iloc[30]]
    else:
        assert bad not in set(stored["time"])
        assert quarantined["time"].iloc[0] == bad
    assert len(stored) == 30 - (rule != "duplicate_time")
