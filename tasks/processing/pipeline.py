"""Processing: the ordered steps between a source's raw bars and the bars we store as clean.

Every step keeps one contract (:mod:`tasks.processing.step`): the frame and its series in, the
frame and its counts out. :func:`process` runs them in three stages: on the new bars alone, then
over the whole series with the stored history ahead of them (their rules and indicators look
back), then on the new bars once cut from it. What the series still lacks, sessions without a bar
(:mod:`tasks.calendars`) and history before its first bar (:mod:`tasks.processing.coverage`), is
reported, not changed. Every count goes into the run summary, under the kind ``COUNT_KINDS`` says.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime

import numpy as np
import pandas as pd

from configs.indicators import IndicatorSpec
from configs.settings import QualitySettings
from tasks.bars import BAR_COLUMNS, FLAG_MISSING, FLAG_OHLC_REPAIRED
from tasks.calendars import SessionGaps, calendar_for, missing_sessions
from tasks.monitoring.metrics import Operation
from tasks.processing.adjust import adjusted_prices, returns
from tasks.processing.coverage import Coverage, check_coverage
from tasks.processing.indicators import continue_cumulative, technical_indicators
from tasks.processing.missing import mark_missing, missing_policy
from tasks.processing.step import Counts, Series, Step, Stepped
from tasks.processing.ticks import (
    FLAG_SPIKE,
    FLAG_UNIT_REPAIRED,
    FLAG_ZERO_VOLUME,
    bad_ticks,
    in_major_unit,
    major_unit,
)
from tasks.processing.validation import RULE_CODES, validate
from tasks.sources.base import Collected

# The counts of each flag on the bars stored, by their names in the summary.
FLAG_COUNTS: dict[str, str] = {
    FLAG_MISSING: "missing",
    FLAG_ZERO_VOLUME: "zero_volume",
    FLAG_SPIKE: "spike",
    FLAG_UNIT_REPAIRED: "unit_error",
    FLAG_OHLC_REPAIRED: "ohlc_repaired",
}


def count_flags(frame: pd.DataFrame, series: Series) -> Stepped:
    """The step: how many of the bars to be stored carry each flag."""
    flags = {name: frame[column].to_numpy(dtype=np.float64) for column, name in FLAG_COUNTS.items() if column in frame}
    return Stepped(frame, {name: int(np.nansum(values)) for name, values in flags.items()})


# On the new bars alone.
NEW_BARS: tuple[Step, ...] = (
    in_major_unit,  # first: the rules' tolerances and the history ahead are in the major unit
    validate,  # before anything reads a value: sorted, and bad bars set aside
    mark_missing,  # on what validation kept: the policy below decides the fate of these bars
)
# Over the whole series, the stored history ahead of the new bars: the rules and indicators look back.
WHOLE_SERIES: tuple[Step, ...] = (
    missing_policy,  # first: a fill carries the last close forward, the stored one included
    bad_ticks,  # before anything derives from prices: a repaired unit error must reach all of it
    adjusted_prices,
    returns,  # after the adjusted prices: a return is on adj_close, so a dividend is no loss
    technical_indicators,  # last: they read the repaired prices
)
# On the new bars once cut from the history: what the store will hold.
STORED: tuple[Step, ...] = (count_flags,)

# The summary's kind of each count a step makes, its names in the summary's order. Quarantined
# bars are counted by validation rule, most frequent first as validation counts them; the policy's
# ``missing_kept`` shows as the ``missing`` flag.
COUNT_KINDS: dict[str, tuple[str, ...]] = {
    "quarantined": tuple(RULE_CODES),
    "repaired": ("out_of_order", "unit_error", "ohlc_repaired", "missing_filled"),
    "flagged": ("missing", "zero_volume", "spike"),
    "dropped": ("missing_dropped",),
}
COUNTED = tuple(COUNT_KINDS)  # the kinds, as the summary, its table and pipeline_metrics name them
KindCounts = dict[str, dict[str, int]]  # kind -> name -> count, nothing zero


def by_kind(counts: Counts) -> KindCounts:
    """The steps' counts under their kinds, each kind in the summary's order."""
    quarantined = {name: count for name, count in counts.items() if name in RULE_CODES and count}
    kinds = {kind: {n: counts[n] for n in names if counts.get(n)} for kind, names in COUNT_KINDS.items()}
    return {**kinds, "quarantined": quarantined}


@dataclass
class Processed:
    """New clean bars with indicators, the corporate actions and the quarantined bars, plus the counts."""

    bars: pd.DataFrame
    actions: pd.DataFrame
    quarantined: pd.DataFrame
    collected: int
    live_bars_skipped: int
    counts: KindCounts = field(default_factory=dict)  # by kind of COUNT_KINDS, then by rule or flag
    currency: str | None = None
    gaps: SessionGaps | None = None
    coverage: Coverage | None = None  # where the series starts against its window; None: not known
    operation: Operation | None = None  # the process stage's time, set by the process task

    @property
    def rejected(self) -> dict[str, int]:
        """Quarantined bars by validation rule."""
        return self.counts.get("quarantined", {})

    @property
    def repaired(self) -> dict[str, int]:
        return self.counts.get("repaired", {})

    @property
    def flagged(self) -> dict[str, int]:
        """Stored bars carrying a flag, by flag."""
        return self.counts.get("flagged", {})

    @property
    def dropped(self) -> dict[str, int]:
        return self.counts.get("dropped", {})

    @property
    def missing_sessions(self) -> int | None:
        """Sessions without a bar: gaps inside the series and those before its first bar; None: unknown."""
        counts = [c for c in (self.gaps.count if self.gaps else None, self.uncovered_sessions) if c is not None]
        return sum(counts) if counts else None

    @property
    def uncovered_sessions(self) -> int | None:
        coverage = self.coverage
        return None if coverage is None or coverage.sessions is None else coverage.sessions


def process(
    collected: Collected,
    symbol: str,
    interval: str,
    quality: QualitySettings,
    indicators: Sequence[IndicatorSpec],
    history: pd.DataFrame | None = None,
    now: datetime | None = None,
    stored_from: pd.Timestamp | None = None,
    session_gaps: bool = True,
) -> Processed:
    """Check, repair and enrich the new bars as if over the whole series.

    ``history`` holds stored bars before the new ones; enough of it (see :func:`lookback_bars`)
    makes an incremental run's indicator values equal those of one full run, and lets the tick
    rules and returns see the new bars' predecessors. ``stored_from`` is the series' first stored
    bar, held with the new ones against the window's expected start. ``session_gaps=False`` skips
    the sessions-without-a-bar report, for callers that read no summary (real time, every minute).
    """
    currency = collected.instrument.currency
    calendar = calendar_for(symbol, collected.instrument, quality.calendars.get(symbol.upper()))
    series = Series(symbol, interval, quality, indicators, calendar, currency, now)
    counts: Counts = {}
    quarantined: list[pd.DataFrame] = []
    new = _run(NEW_BARS, collected.bars, series, counts, quarantined)
    stored_past = _stored_before(history, new)
    past = stored_past[list(BAR_COLUMNS)] if stored_past is not None else None
    whole = pd.concat([past, new], ignore_index=True) if past is not None else new
    stored = len(past) if past is not None else 0
    whole = _run(WHOLE_SERIES, whole, replace(series, stored=stored), counts, quarantined)
    fresh = whole.iloc[stored:].reset_index(drop=True)
    if stored:
        fresh = continue_cumulative(fresh, whole.iloc[:stored], stored_past, indicators)
    new = _run(STORED, fresh, series, counts, quarantined)

    gaps = coverage = None
    if session_gaps and calendar is not None and not new.empty:
        since = past["time"].iloc[-1] if past is not None else None
        gaps = missing_sessions(new["time"], interval, calendar, since=since)
    if collected.window is not None and not new.empty:
        first = new["time"].iloc[0] if stored_from is None else min(stored_from, new["time"].iloc[0])
        source = str(new["source"].iloc[0])
        coverage = check_coverage(collected.window, first, symbol, source, interval, calendar, collected.instrument)
    return Processed(
        bars=new,
        actions=collected.actions,
        quarantined=pd.concat(quarantined, ignore_index=True) if len(quarantined) > 1 else quarantined[0],
        collected=len(collected.bars),
        live_bars_skipped=collected.live_bars_skipped,
        counts=by_kind(counts),
        currency=major_unit(currency),
        gaps=gaps,
        coverage=coverage,
    )


def _stored_before(history: pd.DataFrame | None, new: pd.DataFrame) -> pd.DataFrame | None:
    """The stored bars before the first new one, None when there are none; usually the whole history,
    then taken as it is rather than copied."""
    if history is None or history.empty or new.empty:
        return None
    before = history["time"].array < new["time"].iloc[0]
    if not before.any():
        return None
    return history if before.all() else history.loc[before]


def _run(
    steps: Sequence[Step], frame: pd.DataFrame, series: Series, counts: Counts, aside: list[pd.DataFrame]
) -> pd.DataFrame:
    """The steps in order; their counts added to ``counts``, the bars they set aside to ``aside``."""
    for step in steps:
        done = step(frame, series)
        frame = done.frame
        for name, count in done.counts.items():
            counts[name] = counts.get(name, 0) + count
        if done.aside is not None:
            aside.append(done.aside)
    return frame
