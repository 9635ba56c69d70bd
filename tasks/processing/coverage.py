"""Coverage: does the series reach back as far as the run's window asked?

The gap check (:func:`tasks.calendars.missing_sessions`) starts at the first bar it is given, so a
source that answers with less than the window (Alpha Vantage's ``compact`` sends the latest 100
bars whatever the window; Yahoo starts at a listing) would leave a silent hole before it. Here the
series' first bar, stored or new, is held against where its history should start
(:attr:`tasks.sources.base.Window.covers_from`); the sessions in between count as missing, and
the summary says what to do. Sessions before the symbol's listing, where the source gives it
(:attr:`tasks.bars.Instrument.listed`), are not missing: the symbol did not trade then.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, timedelta

import pandas as pd

from tasks.bars import Instrument, is_daily_or_longer
from tasks.calendars import sessions_before
from tasks.sources.base import Window

# Without a session count (no calendar, or bars longer than a day), a first bar this many days after
# the expected start is still on time: a long weekend, or the first period that starts in the window.
SLACK_DAYS: Mapping[str, int] = {"5d": 7, "1wk": 7, "1mo": 31, "3mo": 92}
DEFAULT_SLACK_DAYS = 4


@dataclass(frozen=True)
class Coverage:
    """Where the series starts against where it should, and the sessions between them."""

    symbol: str
    source: str
    interval: str
    window: Window
    first_bar: date  # the series' first bar once this run is stored
    listed: date | None = None  # the source's first trade date, when it is after the window's start
    sessions: int | None = None  # expected sessions with no bar before the first one; None: can't be counted
    short: bool = False  # the series starts after its expected start (and after any listing)
    compact: bool = False  # the source said it sent a truncated series (Alpha Vantage outputsize compact)

    @property
    def expected_from(self) -> date:
        """The window's start, or the listing when the symbol started trading later."""
        return max(self.window.covers_from, self.listed) if self.listed else self.window.covers_from

    def first_bar_text(self) -> str:
        """The summary's `history from` cell."""
        listed = " (listed)" if self.listed is not None and not self.short else ""
        return f"{self.first_bar.isoformat()}{listed}"

    def describe(self) -> str:
        """One line for a short series: what is missing, and what to do about it."""
        counted = f"{self.sessions} sessions have no bar" if self.sessions is not None else "bars are missing"
        expected = self.expected_from.isoformat()
        if self.listed is not None:
            since = f"its listing on {expected}"
        elif self.window.mode == "incremental":
            since = (
                f"{expected}, where collection.default_history_days before {self.window.end.isoformat()} puts its start"
            )
        else:
            since = f"the window's start {expected}"
        first = self.first_bar.isoformat()
        if self.window.mode == "incremental":
            where = f"stored history starts {first}, after {since}"
        else:
            where = f"the source's bars start {first}, after {since}"
        backfill = (
            f"`marketpipe run --source {self.source} --symbols {self.symbol} --interval {self.interval} "
            f"--start {self.expected_from.isoformat()}`"
        )
        if self.compact:
            todo = (
                f"{self.source} sends only its latest 100 bars with outputsize: compact; set "
                f"data_sources.{self.source}.outputsize: full and backfill with {backfill}"
            )
        elif self.window.mode == "incremental":
            todo = f"Backfill with {backfill}, or lower collection.default_history_days if that history is not wanted"
        else:
            todo = "The source sent nothing older"
        return f"{where}: {counted}. {todo}."


def check_coverage(
    window: Window,
    first_bar: pd.Timestamp,
    symbol: str,
    source: str,
    interval: str,
    calendar: str | None,
    instrument: Instrument,
) -> Coverage:
    """Hold the series' first bar (stored or new) against the window's expected start."""
    listed = instrument.listed
    listed = listed if listed is not None and listed > window.covers_from else None
    start = max(window.covers_from, listed) if listed else window.covers_from
    first = _bar_date(first_bar, interval)
    sessions = sessions_before(start, first_bar, interval, calendar) if calendar is not None else None
    if sessions is not None:
        short = sessions > 0
    else:
        short = first - start > timedelta(days=SLACK_DAYS.get(interval, DEFAULT_SLACK_DAYS))
    return Coverage(
        symbol=symbol,
        source=source,
        interval=interval,
        window=window,
        first_bar=first,
        listed=listed,
        sessions=sessions,
        short=short,
        compact=instrument.compact,
    )


def _bar_date(time: pd.Timestamp, interval: str) -> date:
    stamp = pd.Timestamp(time)
    stamp = stamp.tz_localize(UTC) if stamp.tzinfo is None else stamp.tz_convert(UTC)
    return stamp.date() if is_daily_or_longer(interval) else stamp.floor("D").date()
