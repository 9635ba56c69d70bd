"""Each validation rule against a crafted bad frame: the bad bar is rejected, named and counted."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from configs.settings import default_indicators
from tasks.bars import conform
from tasks.processing import process, validate_bars
from tasks.sources.base import Collected


def bars(n: int = 5, **overrides: list[float]) -> pd.DataFrame:
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


def test_clean_bars_pass_untouched() -> None:
    result = validate_bars(bars())
    assert len(result.clean) == 5
    assert result.rejected.empty
    assert result.counts == {}


@pytest.mark.parametrize(
    ("column", "value", "rule"),
    [
        ("low", 10.2, "ohlc_inconsistent"),  # low above open
        ("high", 10.4, "ohlc_inconsistent"),  # high below close
        ("open", 12.0, "ohlc_inconsistent"),  # open above high
        ("close", 8.0, "ohlc_inconsistent"),  # close below low
        ("adj_close", 0.0, "non_positive_price"),
        ("volume", -5.0, "negative_volume"),
    ],
)
def test_each_rule_rejects_the_bad_bar_only(column: str, value: float, rule: str) -> None:
    frame = bars()
    frame.loc[2, column] = value
    result = validate_bars(frame)
    assert result.counts == {rule: 1}
    assert len(result.clean) == 4
    assert frame["time"].iloc[2] not in set(result.clean["time"])
    rejected = result.rejected.iloc[0]
    assert rejected["rule"] == rule
    assert rejected["reason"]
    assert rejected["time"] == frame["time"].iloc[2]


def test_inverted_high_low_is_rejected() -> None:
    frame = bars(low=[9, 9, 12, 9, 9], high=[11, 11, 8, 11, 11], open=[10] * 5, close=[10] * 5)
    assert validate_bars(frame).counts == {"ohlc_inconsistent": 1}


def test_duplicates_keep_the_last_bar_received() -> None:
    frame = bars(3)
    later = frame.iloc[[1]].assign(close=10.75)
    result = validate_bars(pd.concat([frame, later], ignore_index=True))
    assert result.counts == {"duplicate_time": 1}
    assert result.clean["close"].tolist() == [10.5, 10.75, 10.5]
    assert result.rejected["close"].tolist() == [10.5]


def test_out_of_order_bars_come_out_strictly_increasing() -> None:
    frame = bars(6).iloc[[3, 0, 5, 1, 4, 2]]
    clean = validate_bars(frame).clean
    assert clean["time"].is_monotonic_increasing
    assert clean["time"].is_unique
    assert len(clean) == 6


def test_partly_null_bars_are_not_rejected_by_consistency_checks() -> None:
    frame = bars()
    frame.loc[1, ["open", "high"]] = np.nan
    assert validate_bars(frame).counts == {}


def test_process_counts_rejections_and_stores_no_bad_bar() -> None:
    frame = bars(40)
    frame.loc[[3, 7], "low"] = 20.0
    processed = process(Collected(frame, dropped_null_bars=2), default_indicators())
    assert processed.rejected == {"ohlc_inconsistent": 2}
    assert processed.collected == 40
    assert processed.dropped_null_bars == 2
    assert len(processed.bars) == 38
    assert (processed.bars["low"] <= processed.bars[["open", "close"]].min(axis=1)).all()
    assert "rsi_14" in processed.bars
    assert "obv" in processed.bars
