"""Bars from the streamer's ticks: provisional, because ticks are samples.

Yahoo's streamer sends a price now and then and the day's running volume, not trades. A bar's
open, high, low and close are those of the ticks inside it (they can miss the true high and low),
and its volume is how far ``day_volume`` moved since the previous bar's last tick. A session
starts the count again: ``day_volume`` falling, or a tick of a new session, resets the baseline.
With no earlier tick to count from (the first bar after a connect), the volume is unknown and
left empty; the polled bar that reconciles it brings the true one.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from tasks.realtime.sessions import TradingHours, bar_seconds


@dataclass
class TickBar:
    """The bar being built for one symbol and start (epoch seconds)."""

    start: float
    open: float
    high: float
    low: float
    close: float
    volume: float | None  # None: no baseline to count from
    ticks: int = 1


@dataclass
class _Series:
    building: TickBar | None = None
    baseline: float | None = None  # day_volume before the building bar's first tick
    last_day_volume: float | None = None
    session_open: float | None = None
    handed_over: float = float("-inf")  # the start of the newest bar handed over: its ticks come too late


@dataclass
class TickBars:
    """Per symbol, the bar its ticks are building; :meth:`closed` hands over those whose time is up."""

    interval: str
    hours: dict[str, TradingHours]
    _series: dict[str, _Series] = field(default_factory=dict)
    _done: list[tuple[str, TickBar]] = field(default_factory=list)
    _guard: threading.Lock = field(default_factory=threading.Lock)

    def add(self, symbol: str, time_ms: int, price: float, day_volume: float | None) -> None:
        """One tick; a tick of a later bar closes the one being built."""
        instant = time_ms / 1000
        hours = self.hours.get(symbol) or TradingHours(None)
        segment = hours.open_at(instant)
        if segment is None:
            return  # outside trading hours: pre- and post-market ticks make no regular bar
        starts = hours.bar_starts(self.interval, max(segment.open, instant - bar_seconds(self.interval)), instant + 1)
        start = max(t for t in starts if t <= instant)
        with self._guard:
            series = self._series.setdefault(symbol, _Series())
            new_session = series.session_open is not None and series.session_open != segment.open
            series.session_open = segment.open
            bar = series.building
            if start <= series.handed_over:
                return  # a late tick of a bar already handed over: the polled bar will have it
            if bar is not None and start > bar.start:
                self._done.append((symbol, bar))
                series.handed_over = bar.start
                series.baseline, bar = series.last_day_volume, None
            if bar is None:
                bar = series.building = TickBar(start, price, price, price, price, None)
            else:
                bar.high, bar.low, bar.close = max(bar.high, price), min(bar.low, price), price
                bar.ticks += 1
            if day_volume is None:
                return
            if series.last_day_volume is not None and day_volume < series.last_day_volume:
                # The count started again at a new session; otherwise it is a rolling window (crypto's
                # 24 h volume), whose changes are no bar's volume: unknown until a later baseline.
                series.baseline = 0.0 if new_session else None
                bar.volume = None
            series.last_day_volume = day_volume
            if series.baseline is not None:
                bar.volume = max(0.0, day_volume - series.baseline)

    def closed(self, now: float) -> list[tuple[str, TickBar]]:
        """The bars whose interval ended by ``now``, or that a later tick closed; each handed over once."""
        with self._guard:
            done, self._done = self._done, []
            for symbol, series in self._series.items():
                bar = series.building
                hours = self.hours.get(symbol) or TradingHours(None)
                if bar is not None and hours.bar_end(self.interval, bar.start) <= now:
                    done.append((symbol, bar))
                    series.handed_over = bar.start
                    series.building = None
                    series.baseline = series.last_day_volume
            return done
