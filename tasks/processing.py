"""Validation: every bar is either kept as clean or rejected with the rule it broke.

Rules (named, counted in the run summary):
- ``duplicate_time``: a second bar with the same timestamp; the last one received wins.
- ``ohlc_inconsistent``: low > min(open, close), high < max(open, close) or low > high.
- ``non_positive_price``: a price <= 0.
- ``negative_volume``: volume < 0.
Bars are sorted by time first, so the clean output is strictly increasing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from configs.settings import IndicatorSpec
from tasks.bars import conform
from tasks.indicators import compute_indicators
from tasks.sources.base import Collected

# Sources round prices independently, so allow a relative slack of a few ulps-of-cents.
OHLC_TOLERANCE = 1e-9


@dataclass
class Validated:
    clean: pd.DataFrame
    rejected: pd.DataFrame
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def rejected_count(self) -> int:
        return len(self.rejected)


def validate_bars(bars: pd.DataFrame) -> Validated:
    """Sort, de-duplicate and check each bar; rejected bars carry ``rule`` and ``reason`` columns."""
    frame = conform(bars).sort_values("time", kind="stable").reset_index(drop=True)
    rule = pd.Series("", index=frame.index, dtype=object)
    reason = pd.Series("", index=frame.index, dtype=object)

    def reject(mask: npt.ArrayLike, name: str, why: str) -> None:
        fresh = np.asarray(mask, dtype=bool) & (rule == "").to_numpy()
        rule[fresh] = name
        reason[fresh] = why

    duplicate = frame.duplicated(subset=["time"], keep="last").to_numpy()
    reject(duplicate, "duplicate_time", "another bar with the same timestamp arrived later")

    o, h, lo, c = (frame[k].to_numpy() for k in ("open", "high", "low", "close"))
    slack = OHLC_TOLERANCE * np.nan_to_num(np.abs(h))
    with np.errstate(invalid="ignore"):
        bad_low = lo > np.fmin(o, c) + slack
        bad_high = h < np.fmax(o, c) - slack
        inverted = lo > h + slack
        reject(bad_low | bad_high | inverted, "ohlc_inconsistent", "low/high do not bracket open and close")
        prices = frame[["open", "high", "low", "close", "adj_close"]].to_numpy()
        reject((prices <= 0).any(axis=1), "non_positive_price", "a price is zero or negative")
        reject(frame["volume"].to_numpy() < 0, "negative_volume", "volume is negative")

    bad = (rule != "").to_numpy()
    rejected = frame.loc[bad].assign(rule=rule[bad], reason=reason[bad]).reset_index(drop=True)
    counts = {str(k): int(v) for k, v in rejected["rule"].value_counts().items()}
    return Validated(frame.loc[~bad].reset_index(drop=True), rejected, counts)


@dataclass
class Processed:
    """Clean bars with indicators, ready to store, and what validation rejected."""

    bars: pd.DataFrame
    collected: int
    dropped_null_bars: int
    rejected: dict[str, int]


def process(collected: Collected, indicators: Sequence[IndicatorSpec]) -> Processed:
    validated = validate_bars(collected.bars)
    bars = compute_indicators(validated.clean, indicators)
    return Processed(bars, len(collected.bars), collected.dropped_null_bars, validated.counts)


@task(name="process", task_run_name="process-{symbol}", cache_policy=NO_CACHE, persist_result=False)
def process_bars(collected: Collected, indicators: Sequence[IndicatorSpec], symbol: str) -> Processed:
    processed = process(collected, indicators)
    if processed.rejected:
        rules = ", ".join(f"{rule}={count}" for rule, count in processed.rejected.items())
        get_run_logger().warning("%s: rejected %s", symbol, rules)
    if processed.dropped_null_bars:
        get_run_logger().info("%s: dropped %d all-null bar(s)", symbol, processed.dropped_null_bars)
    return processed
