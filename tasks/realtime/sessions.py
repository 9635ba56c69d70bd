"""When a symbol's intraday bars close: its exchange's trading segments on the bar grid.

The grid restarts at each segment's open, as exchanges do after a lunch break (HKEX, TSE), and a
segment's last bar ends at its close, so an early close (13:00 on the day after Thanksgiving) ends
the day early with no bar missing. Crypto's "24/7" calendar trades through UTC days, and a symbol
without a known calendar is treated as always open: polled around the clock, never idle.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd

from tasks.calendars import session_segments

BAR_MINUTES: dict[str, int] = {"1m": 1, "2m": 2, "5m": 5, "15m": 15}
REALTIME_INTERVALS = tuple(BAR_MINUTES)
_NS = 1_000_000_000
_LOOK = timedelta(days=8)  # the segments read around an instant: the next open is never further away


def bar_seconds(interval: str) -> int:
    return BAR_MINUTES[interval] * 60


@dataclass(frozen=True)
class Segment:
    """One stretch of continuous trading, [open, close) in epoch seconds."""

    open: float
    close: float


class TradingHours:
    """A calendar's segments around now, read once per week of instants and cached."""

    def __init__(self, calendar: str | None) -> None:
        self.calendar = calendar
        self._cached: tuple[float, float, list[Segment]] | None = None

    def use(self, calendar: str) -> None:
        """The calendar the source named, once known: every holder of these hours follows it."""
        self.calendar, self._cached = calendar, None

    def segments(self, first: float, last: float) -> list[Segment]:
        """Segments overlapping [first, last)."""
        if self.calendar is None:
            return [Segment(first, last)]
        if self._cached is None or first < self._cached[0] or last > self._cached[1]:
            lo = datetime.fromtimestamp(first, UTC) - timedelta(days=2)
            hi = datetime.fromtimestamp(last, UTC) + _LOOK + timedelta(days=2)
            found = session_segments(self.calendar, lo.date(), hi.date())
            opens, closes = found if found is not None else (np.zeros(0, np.int64), np.zeros(0, np.int64))
            segments = [Segment(o / _NS, c / _NS) for o, c in zip(opens.tolist(), closes.tolist(), strict=True)]
            # Sessions are listed by date, so only instants a day inside the dates read are surely covered.
            self._cached = (lo.timestamp() + 86_400, hi.timestamp() - 86_400, segments)
        return [s for s in self._cached[2] if s.close > first and s.open < last]

    def open_at(self, instant: float) -> Segment | None:
        """The segment trading at ``instant``, if one is."""
        return next((s for s in self.segments(instant, instant + 1) if s.open <= instant < s.close), None)

    def next_open(self, instant: float) -> float | None:
        """When trading next starts at or after ``instant`` (None: not within a week)."""
        upcoming = [s.open for s in self.segments(instant, instant + _LOOK.total_seconds()) if s.open >= instant]
        return min(upcoming) if upcoming else None

    def bar_starts(self, interval: str, first: float, last: float) -> list[float]:
        """Every bar's start in [first, last) on the grid of each segment; ``last`` excludes bars ending after it."""
        step = bar_seconds(interval)
        starts: list[float] = []
        for s in self.segments(first, last):
            grid = s.open if self.calendar is not None else (s.open // step) * step
            k = max(0, int(np.ceil((first - grid) / step)))
            start = grid + k * step
            while start < s.close and start < last:
                starts.append(start)
                start += step
        return starts

    def bar_end(self, interval: str, start: float) -> float:
        """When the bar starting at ``start`` closes: a step later, or at its segment's close."""
        segment = self.open_at(start)
        end = start + bar_seconds(interval)
        return min(end, segment.close) if segment is not None else end

    def closed_bars(self, interval: str, first: float, now: float) -> list[float]:
        """Starts of the bars after ``first`` (exclusive) whose interval has ended by ``now``."""
        return [t for t in self.bar_starts(interval, first, now) if t > first and self.bar_end(interval, t) <= now]


def stamp(seconds: float) -> pd.Timestamp:
    return pd.Timestamp(round(seconds * 1000), unit="ms", tz="UTC")
