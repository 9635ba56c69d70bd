"""Processing: the steps between a source's raw bars and the bars we store as clean.

In order: minor currency units to major (GBp -> GBP), validation (bad bars quarantined, see
:mod:`tasks.validation`), the missing-value policy (:mod:`tasks.missing`), bad ticks
(:mod:`tasks.ticks`), adjusted prices and returns (:mod:`tasks.adjust`), indicators, and the
calendar's missing sessions (:mod:`tasks.calendars`), including those before the series' first
bar that its window expected (:mod:`tasks.coverage`). Every step counts what it did; the counts go
into the run summary.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from configs.settings import IndicatorSpec, QualitySettings
from tasks import process_pool
from tasks.adjust import add_adjusted_prices, add_returns
from tasks.bars import BAR_COLUMNS, FLAG_MISSING, FLAG_OHLC_REPAIRED, flag_missing
from tasks.calendars import SessionGaps, calendar_for, missing_sessions
from tasks.coverage import Coverage, check_coverage
from tasks.indicators import compute_indicators
from tasks.job import Job, batch_run_name, each_alone
from tasks.missing import apply_missing_policy
from tasks.sources.base import Collected
from tasks.ticks import FLAG_SPIKE, FLAG_UNIT_REPAIRED, FLAG_ZERO_VOLUME, check_ticks, to_major_unit
from tasks.validation import validate_bars

# Summary names of the flags counted on stored bars.
FLAG_COUNTS: dict[str, str] = {FLAG_MISSING: "missing", FLAG_ZERO_VOLUME: "zero_volume", FLAG_SPIKE: "spike"}


@dataclass
class Processed:
    """New clean bars with indicators, the corporate actions and the quarantined bars, plus the counts."""

    bars: pd.DataFrame
    actions: pd.DataFrame
    quarantined: pd.DataFrame
    collected: int
    live_bars_skipped: int
    rejected: dict[str, int] = field(default_factory=dict)  # quarantined bars by rule
    repaired: dict[str, int] = field(default_factory=dict)  # out_of_order, unit_error, ohlc_repaired, missing_filled
    flagged: dict[str, int] = field(default_factory=dict)  # stored bars carrying a flag, by flag
    dropped: dict[str, int] = field(default_factory=dict)  # missing_dropped
    currency: str | None = None
    gaps: SessionGaps | None = None
    coverage: Coverage | None = None  # where the series starts against its window; None: not known

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
) -> Processed:
    """Check, repair and enrich the new bars as if over the whole series.

    ``history`` holds stored bars before the new ones; enough of it (see :func:`lookback_bars`)
    makes an incremental run's indicator values equal those of one full run, and lets the tick
    rules and returns see the new bars' predecessors. ``stored_from`` is the series' first stored
    bar, held with the new ones against the window's expected start.
    """
    bars, currency = to_major_unit(collected.bars, _text(collected.meta.get("currency")))
    calendar = calendar_for(symbol, collected.meta, quality.calendars.get(symbol.upper()))
    validated = validate_bars(bars, now, calendar=calendar, ohlc_tolerance=quality.ohlc_tolerance)
    clean = flag_missing(validated.clean)
    past = pd.DataFrame(columns=list(BAR_COLUMNS))
    if history is not None and not history.empty and not clean.empty:
        past = history.loc[history["time"] < clean["time"].iloc[0], list(BAR_COLUMNS)]
    combined = pd.concat([past, clean], ignore_index=True) if not past.empty else clean
    combined, missing_counts = apply_missing_policy(combined, quality.missing, start=len(past))
    check_ticks(combined, quality.spike_threshold)
    combined = compute_indicators(add_returns(add_adjusted_prices(combined)), indicators)
    new = combined.iloc[len(past) :].reset_index(drop=True)

    repaired = {
        "out_of_order": validated.out_of_order,
        "unit_error": int(new[FLAG_UNIT_REPAIRED].sum()),
        "ohlc_repaired": int(new[FLAG_OHLC_REPAIRED].sum()) if FLAG_OHLC_REPAIRED in new else 0,
        "missing_filled": missing_counts.get("missing_filled", 0),
    }
    flagged = {name: int(new[column].sum()) for column, name in FLAG_COUNTS.items() if column in new}
    dropped = {k: v for k, v in missing_counts.items() if k == "missing_dropped"}
    gaps = coverage = None
    if calendar is not None and not new.empty:
        since = past["time"].iloc[-1] if not past.empty else None
        gaps = missing_sessions(new["time"], interval, calendar, since=since)
    if collected.window is not None and not new.empty:
        first = new["time"].iloc[0] if stored_from is None else min(stored_from, new["time"].iloc[0])
        source = str(new["source"].iloc[0])
        coverage = check_coverage(collected.window, first, symbol, source, interval, calendar, collected.meta)
    return Processed(
        bars=new,
        actions=collected.actions,
        quarantined=validated.quarantined,
        collected=len(collected.bars),
        live_bars_skipped=collected.live_bars_skipped,
        rejected=validated.counts,
        repaired={k: v for k, v in repaired.items() if v},
        flagged={k: v for k, v in flagged.items() if v},
        dropped=dropped,
        currency=currency,
        gaps=gaps,
        coverage=coverage,
    )


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


# Processing holds the GIL for most of its time, so a flow's 16 worker threads processing at once
# gain nothing on a few cores and keep the threads that send paced requests waiting to run: their
# sends then go out late. At most one processing task per core runs at a time.
_cpu_slots = threading.BoundedSemaphore(os.cpu_count() or 1)


@task(name="process", task_run_name="process-{job.source}-{symbol}", cache_policy=NO_CACHE, persist_result=False)
def process_bars(collected: Collected, job: Job, symbol: str) -> Processed:
    return process_logged(collected, job, symbol)


@task(name="process-batch", task_run_name=batch_run_name("process"), cache_policy=NO_CACHE, persist_result=False)
def process_batch(collected: dict[str, Collected], job: Job) -> dict[str, Processed | Exception]:
    """Each symbol's bars in turn, for ``collection.batch_size``; an error fails only its symbol."""
    return each_alone(collected, process_logged, job)


def process_logged(collected: Collected, job: Job, symbol: str) -> Processed:
    """One symbol's collected bars through :func:`process`, with the stored history collect brought along."""
    quality = job.settings.quality
    args = (collected, symbol, job.interval, quality, job.settings.indicators, collected.history)
    if process_pool.running():
        processed = process_pool.run(process, *args, stored_from=collected.stored_from)
    else:
        with _cpu_slots:
            processed = process(*args, stored_from=collected.stored_from)
    logger = get_run_logger()
    if processed.rejected:
        logger.warning("%s: quarantined %s", symbol, describe_counts(processed.rejected))
    for what, counts in (("repaired", processed.repaired), ("flagged", processed.flagged)):
        if counts:
            logger.info("%s: %s %s", symbol, what, describe_counts(counts))
    if processed.dropped:
        logger.warning(
            "%s: dropped %s (quality.missing: %s)", symbol, describe_counts(processed.dropped), quality.missing
        )
    if processed.gaps is not None and processed.gaps.count:
        logger.warning("%s: %s", symbol, processed.gaps.describe())
    if processed.coverage is not None and processed.coverage.short:
        logger.warning("%s: %s", symbol, processed.coverage.describe())
    return processed


def describe_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{name}={count}" for name, count in counts.items())
