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

from blocks.store import BarStore
from blocks.stores import store_from_settings
from configs.settings import IndicatorSpec, Settings
from tasks.bars import BAR_COLUMNS, conform
from tasks.indicators import compute_indicators, lookback_bars
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
    """New clean bars with indicators and the corporate actions, ready to store, plus the counts."""

    bars: pd.DataFrame
    actions: pd.DataFrame
    collected: int
    dropped_null_bars: int
    live_bars_skipped: int
    rejected: dict[str, int]


def process(
    collected: Collected, indicators: Sequence[IndicatorSpec], history: pd.DataFrame | None = None
) -> Processed:
    """Validate the new bars and compute indicators as if over the whole series.

    ``history`` holds stored bars before the new ones; enough of it (see :func:`lookback_bars`)
    makes an incremental run's indicator values equal those of one full run.
    """
    validated = validate_bars(collected.bars)
    clean = validated.clean
    if history is not None and not history.empty and not clean.empty:
        first_new = clean["time"].iloc[0]
        past = history.loc[history["time"] < first_new, list(BAR_COLUMNS)]
        enriched = compute_indicators(pd.concat([past, clean], ignore_index=True), indicators)
        bars = enriched.loc[enriched["time"] >= first_new].reset_index(drop=True)
    else:
        bars = compute_indicators(clean, indicators)
    return Processed(
        bars,
        collected.actions,
        len(collected.bars),
        collected.dropped_null_bars,
        collected.live_bars_skipped,
        validated.counts,
    )


def read_history(
    store: BarStore, collected: Collected, symbol: str, interval: str, source: str, bars: int
) -> pd.DataFrame | None:
    """The last ``bars`` stored bars before the first collected one."""
    if collected.bars.empty:
        return None
    first_new = collected.bars["time"].min()
    stored = store.read_bars(symbol, interval, source, end=first_new.to_pydatetime())
    return stored.tail(bars) if not stored.empty else None


@task(name="process", task_run_name="process-{source}-{symbol}", cache_policy=NO_CACHE, persist_result=False)
def process_bars(collected: Collected, settings: Settings, source: str, symbol: str, interval: str) -> Processed:
    store = store_from_settings(settings.storage)
    history = read_history(store, collected, symbol, interval, source, lookback_bars(settings.indicators))
    processed = process(collected, settings.indicators, history)
    logger = get_run_logger()
    if processed.rejected:
        rules = ", ".join(f"{rule}={count}" for rule, count in processed.rejected.items())
        logger.warning("%s: rejected %s", symbol, rules)
    if processed.dropped_null_bars:
        logger.info("%s: dropped %d all-null bar(s)", symbol, processed.dropped_null_bars)
    return processed
