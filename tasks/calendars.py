"""Calendar-aware gap detection: which trading sessions have no bar at all.

A bare "no bar for two days" check cries wolf every weekend and holiday, so expected sessions come
from ``exchange_calendars``: the calendar the source names for the symbol's exchange (see
:class:`tasks.bars.Instrument`), crypto trades on "24/7" and FX on "24/5", and a config override
beats both. Holidays are
never written down here; the calendar library owns them.

Session dates: a daily bar's UTC date is its session (bars are stamped 00:00 UTC of the trading
date); an intraday bar belongs to the date of its instant in the calendar's time zone, so a
19:30 New York post-market bar (23:30 UTC) stays on that day's session.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from datetime import date, datetime, tzinfo
from functools import lru_cache
from typing import Any

import exchange_calendars as xc
import numpy as np
import numpy.typing as npt
import pandas as pd

from configs.settings import trading_calendar_name
from tasks.bars import Instrument, intraday_length, is_daily_or_longer
from tasks.errors import UsageError

# Bars spanning several sessions can't miss a single one; checking them would only mislead.
UNCHECKED_INTERVALS: frozenset[str] = frozenset({"5d", "1wk", "1mo", "3mo"})

CRYPTO = "24/7"
FX = "24/5"

# A US ticker: letters only, at most one share-class letter (BRK-B, BRK.B). The one-letter market
# suffixes of London (.L), Frankfurt (.F), TSX Venture (.V) and Tokyo (.T) look the same and are refused.
US_TICKER = re.compile(r"^[A-Z]{1,5}(?:[.-][A-Z])?$")
ONE_LETTER_MARKETS: frozenset[str] = frozenset({".L", ".F", ".V", ".T"})

DESCRIBED_RUNS = 10  # a log line listing hundreds of gaps helps nobody


def calendar_for(symbol: str, instrument: Instrument, override: str | None = None) -> str | None:
    """The exchange_calendars name for a symbol, or None when it can't be known (gap detection is then skipped).

    A config override wins, then the calendar the source named. A source that named an exchange
    without a known calendar gets none; one that named nothing gets a guess from the symbol.
    """
    if override is not None:
        return _checked_override(override)
    if instrument.calendar is not None or instrument.exchange:
        return instrument.calendar
    return _calendar_from_symbol(symbol.strip().upper())


def _checked_override(override: str) -> str:
    try:
        return trading_calendar_name(override)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _calendar_from_symbol(symbol: str) -> str | None:
    """Guess from the symbol's shape when the source named no exchange: an FX pair (EURUSD=X) or a US ticker."""
    if symbol.endswith("=X"):
        return FX
    if US_TICKER.fullmatch(symbol) and symbol[-2:] not in ONE_LETTER_MARKETS:
        return "XNYS"
    return None


@dataclass(frozen=True)
class SessionGaps:
    """Missing sessions of one series, as runs so a week-long outage reads as one line."""

    calendar: str
    expected: int  # sessions the calendar has in the checked span
    missing: tuple[tuple[date, date], ...]  # runs of consecutive missing sessions, first..last (inclusive)
    # Sessions in each run; a Fri..Mon run is 2 sessions but 4 calendar days. Derived from the
    # calendar when not given.
    run_sessions: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        if len(self.run_sessions) == len(self.missing):
            return
        if self.run_sessions:
            raise ValueError(f"{len(self.run_sessions)} session counts given for {len(self.missing)} runs")
        object.__setattr__(self, "run_sessions", tuple(_sessions_between(self.calendar, a, b) for a, b in self.missing))

    @property
    def count(self) -> int:
        return sum(self.run_sessions)

    def describe(self) -> str:
        """One log line: how many sessions are missing, and where."""
        of = f"of {self.expected} {self.calendar} sessions"
        if not self.missing:
            return f"none missing {of}"
        shown = ", ".join(_run_text(first, last) for first, last in self.missing[:DESCRIBED_RUNS])
        hidden = len(self.missing) - DESCRIBED_RUNS
        more = f", and {hidden} more runs" if hidden > 0 else ""
        return f"{self.count} missing {of}: {shown}{more}"


def _run_text(first: date, last: date) -> str:
    return first.isoformat() if first == last else f"{first.isoformat()}..{last.isoformat()}"


def missing_sessions(
    times: pd.Series, interval: str, calendar: str, since: pd.Timestamp | None = None
) -> SessionGaps | None:
    """Expected sessions with no bar, from the first bar's session (or ``since``'s, if earlier) to the last's.

    ``since`` is the last stored bar's time: it counts as present, so the seam between stored and
    new bars is checked too. Returns None for intervals longer than a day, for no bars, and when
    the span lies outside the years the calendar can provide (e.g. XBOM only records holidays
    through 2026): an unknowable answer is better skipped than guessed.
    """
    if interval in UNCHECKED_INTERVALS:
        return None
    stamps = _utc(pd.DatetimeIndex(times.dropna()))
    if stamps.empty:
        return None
    name = str(xc.resolve_alias(calendar))
    zone = "UTC" if is_daily_or_longer(interval) else _calendar_zone(name)
    present = _session_dates(stamps, zone)
    last = present.max()
    if since is not None:
        present = pd.DatetimeIndex(present.append(_session_dates(_utc(pd.DatetimeIndex([since])), zone)))
    first = present.min()
    cal = _calendar_covering(name, first, last)
    if cal is None:
        return None
    # A bar on a day that is no session (a holiday the source still served) may lie before the
    # calendar's first session or after its last: clamp, the bar itself is simply not expected.
    sessions = _sessions_in(cal, max(first, cal.first_session), min(last, cal.last_session))
    runs = _missing_runs(sessions, present)
    return SessionGaps(
        calendar=name,
        expected=len(sessions),
        missing=tuple((sessions[a].date(), sessions[b].date()) for a, b in runs),
        run_sessions=tuple(b - a + 1 for a, b in runs),
    )


def sessions_before(first: date, bar_time: pd.Timestamp, interval: str, calendar: str) -> int | None:
    """Expected sessions from ``first`` up to, not including, the session of the bar at ``bar_time``.

    What a series starting with that bar lacks of a history meant to start at ``first``. None where
    :func:`missing_sessions` can't tell either: bars longer than a day, years the calendar lacks.
    """
    if interval in UNCHECKED_INTERVALS:
        return None
    name = str(xc.resolve_alias(calendar))
    zone = "UTC" if is_daily_or_longer(interval) else _calendar_zone(name)
    session = _session_dates(_utc(pd.DatetimeIndex([bar_time])), zone)[0]
    start = pd.Timestamp(first)
    if start >= session:
        return 0
    cal = _calendar_covering(name, start, session)
    if cal is None:
        return None
    lo, hi = max(start, cal.first_session), min(session - pd.Timedelta(days=1), cal.last_session)
    return len(cal.sessions_in_range(lo, hi)) if lo <= hi else 0


def expected_sessions(calendar: str, first: date, last: date) -> pd.DatetimeIndex | None:
    """The calendar's sessions from ``first`` to ``last`` inclusive (naive midnights); None where it can't tell."""
    name = str(xc.resolve_alias(calendar))
    lo, hi = pd.Timestamp(first), pd.Timestamp(last)
    cal = _calendar_covering(name, lo, hi)
    if cal is None:
        return None
    lo, hi = max(lo, cal.first_session), min(hi, cal.last_session)
    return pd.DatetimeIndex(cal.sessions_in_range(lo, hi)) if lo <= hi else pd.DatetimeIndex([])


def due_session(calendar: str, cutoff: pd.Timestamp) -> date | None:
    """The latest session whose close is at or before ``cutoff``: the one a fresh series must hold by then.

    The freshness SLA asks this with ``now - deadline``; weekends and holidays have no close, so they
    never make a bar due. None when the calendar can't reach the date.
    """
    name = str(xc.resolve_alias(calendar))
    cutoff = _utc(pd.DatetimeIndex([cutoff]))[0]
    first = (cutoff - pd.Timedelta(days=15)).tz_localize(None)  # covers any holiday run
    cal = _calendar_covering(name, first.normalize(), cutoff.tz_localize(None).normalize())
    if cal is None:
        return None
    sessions = cal.sessions_in_range(
        max(first.normalize(), cal.first_session), min(cutoff.tz_localize(None).normalize(), cal.last_session)
    )
    closes = cal.closes.reindex(sessions)
    closed = sessions[(closes <= cutoff).to_numpy()]
    return closed[-1].date() if len(closed) else None


def session_of(bar_time: pd.Timestamp, interval: str, calendar: str) -> date:
    """The session a bar belongs to (see the module's note on session dates)."""
    zone = "UTC" if is_daily_or_longer(interval) else _calendar_zone(str(xc.resolve_alias(calendar)))
    return _session_dates(_utc(pd.DatetimeIndex([bar_time])), zone)[0].date()


def _utc(stamps: pd.DatetimeIndex) -> pd.DatetimeIndex:
    """Bar times are UTC by contract; a naive stamp is read as UTC rather than refused."""
    return stamps.tz_localize("UTC") if stamps.tz is None else stamps.tz_convert("UTC")


def _session_dates(stamps: pd.DatetimeIndex, zone: str) -> pd.DatetimeIndex:
    """Naive midnights, the form exchange_calendars uses for session labels."""
    return stamps.tz_convert(zone).tz_localize(None).normalize().unique()


def _missing_runs(sessions: pd.DatetimeIndex, present: pd.DatetimeIndex) -> list[tuple[int, int]]:
    """(first, last) positions in ``sessions`` of each run of consecutive sessions with no bar."""
    gaps = np.flatnonzero(~sessions.isin(present))
    if gaps.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(gaps) != 1)
    starts = np.concatenate(([gaps[0]], gaps[breaks + 1]))
    ends = np.concatenate((gaps[breaks], [gaps[-1]]))
    return [(int(a), int(b)) for a, b in zip(starts, ends, strict=True)]


@lru_cache(maxsize=1024)
def _sessions_in(cal: Any, first: pd.Timestamp, last: pd.Timestamp) -> pd.DatetimeIndex:
    """The calendar's sessions in ``first..last``: the same few days for every symbol of a real-time minute."""
    return pd.DatetimeIndex(cal.sessions_in_range(first, last))


def _sessions_between(calendar: str, first: date, last: date) -> int:
    cal = _calendar_covering(calendar, pd.Timestamp(first), pd.Timestamp(last))
    if cal is None:
        raise ValueError(f"calendar {calendar} can't provide sessions for {first}..{last}")
    return len(cal.sessions_in_range(pd.Timestamp(first), pd.Timestamp(last)))


def _calendar_covering(name: str, first: pd.Timestamp, last: pd.Timestamp) -> Any:
    """A calendar spanning whole years around [first, last], or None if the library can't reach them."""
    lowest, highest = _bounds(name)
    if (lowest is not None and first < lowest) or (highest is not None and last > highest):
        return None
    return _calendar(name, first.year, last.year)


# Worker threads asking for the same calendar at once would each build it: one builds, the others wait.
_building = threading.RLock()


def _calendar(name: str, first_year: int, last_year: int) -> Any:
    """Whole years, so runs over the same years share one construction (the slow part)."""
    with _building:
        return _built_calendar(name, first_year, last_year)


@lru_cache(maxsize=64)
def _built_calendar(name: str, first_year: int, last_year: int) -> Any:
    lowest, highest = _bounds(name)
    start = pd.Timestamp(first_year, 1, 1)
    end = pd.Timestamp(last_year, 12, 31)
    if lowest is not None:
        start = max(start, lowest)
    if highest is not None:
        end = min(end, highest)
    return xc.get_calendar(name, start=start, end=end)


def _bounds(name: str) -> tuple[pd.Timestamp | None, pd.Timestamp | None]:
    """The earliest and latest dates the calendar class can be built for (None: unbounded)."""
    with _building:
        return _class_bounds(name)


@lru_cache(maxsize=64)
def _class_bounds(name: str) -> tuple[pd.Timestamp | None, pd.Timestamp | None]:
    cls = type(xc.get_calendar(name))
    return cls.bound_min(), cls.bound_max()


@lru_cache(maxsize=64)
def _calendar_zone(name: str) -> str:
    return str(xc.get_calendar(name).tz)


# Session segments and the live-bar rule. Both look at the calendar's trading hours, not only its dates.

Segments = tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]


def session_segments(calendar: str, first: date, last: date) -> Segments | None:
    """The calendar's trading segments ``[open, close)`` for the sessions ``first..last``, as sorted UTC nanoseconds.

    A session with a lunch break (XHKG, XTKS, XSHG ...) has two segments, ``open..break_start`` and
    ``break_end..close``; every other session has one. None when the calendar can't cover the span.
    Kept per span, read-only: real time asks for the same few days for every symbol every minute.
    """
    return _segments_of(str(xc.resolve_alias(calendar)), first, last)


@lru_cache(maxsize=1024)
def _segments_of(name: str, first: date, last: date) -> Segments | None:
    found = _schedule_segments(name, first, last)
    if found is not None:
        for array in found:
            array.flags.writeable = False
    return found


def _schedule_segments(name: str, first: date, last: date) -> Segments | None:
    lo, hi = pd.Timestamp(first), pd.Timestamp(last)
    cal = _calendar_covering(name, lo, hi)
    if cal is None:
        return None
    schedule = cal.schedule.loc[max(lo, cal.first_session) : min(hi, cal.last_session)]
    if schedule.empty:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    opens, closes = _nanos(schedule["open"]), _nanos(schedule["close"])
    if "break_start" not in schedule:
        return opens, closes
    has_break = schedule["break_start"].notna().to_numpy() & schedule["break_end"].notna().to_numpy()
    if not has_break.any():
        return opens, closes
    breaks = _nanos(schedule["break_start"].fillna(schedule["close"]))
    resumes = _nanos(schedule["break_end"].fillna(schedule["close"]))
    seg_opens = np.concatenate([opens, resumes[has_break]])
    seg_closes = np.concatenate([np.where(has_break, breaks, closes), closes[has_break]])
    order = np.argsort(seg_opens, kind="stable")
    return seg_opens[order], seg_closes[order]


def _nanos(column: pd.Series) -> npt.NDArray[np.int64]:
    return (
        pd.DatetimeIndex(column).tz_convert("UTC").tz_localize(None).to_numpy().astype("datetime64[ns]").view(np.int64)
    )


def segment_of(nanos: npt.NDArray[np.int64], segments: Segments) -> npt.NDArray[np.int64]:
    """For each instant, the position of the segment it lies in, or -1 (outside trading hours)."""
    opens, closes = segments
    if opens.size == 0:
        return np.full(len(nanos), -1, dtype=np.int64)
    position = np.searchsorted(opens, nanos, side="right") - 1
    inside = (position >= 0) & (nanos < closes[np.clip(position, 0, None)])
    return np.where(inside, position, -1).astype(np.int64)


# How far past its start a bar can still be forming: bars older than this (plus a day's margin) are final.
_LONGEST_PERIOD: dict[str, pd.Timedelta] = {
    "1d": pd.Timedelta(days=1),
    "5d": pd.Timedelta(days=7),
    "1wk": pd.Timedelta(days=7),
    "1mo": pd.Timedelta(days=31),
    "3mo": pd.Timedelta(days=92),
}


def live_bars(
    times: pd.Series | pd.DatetimeIndex,
    interval: str,
    as_of: datetime,
    *,
    calendar: str | None = None,
    zone: str | tzinfo = "UTC",
    current_session: tuple[datetime, datetime] | None = None,
) -> npt.NDArray[np.bool_]:
    """Which bars were still forming at ``as_of``: their values can change, so they must not be stored as final.

    ``times`` are standard bar times (daily and longer: 00:00 UTC of the trading date; intraday: the
    start instant). ``as_of`` is when the source served the data (an HTTP ``Date`` header, else
    the clock), not when the bars are parsed. A bar is final once

    - intraday: its interval has ended, or the session it lies in has closed, whichever is first;
    - daily: its session has closed (the day's final bar after the close is final);
    - ``1wk``/``5d``, ``1mo``, ``3mo``: the last session of its calendar week, month or quarter has closed.

    Where a session closes, best source first: ``current_session``, the source's own statement of
    the regular session current at ``as_of`` (Yahoo's ``meta.currentTradingPeriod.regular``, as
    ``[start, end)``; any session before it has closed); the exchange ``calendar`` (an
    exchange_calendars name, lunch breaks included); otherwise the end of the trading date, week,
    month or quarter at midnight in ``zone``, the exchange's time zone.
    """
    stamps = pd.DatetimeIndex(times)
    stamps = stamps.tz_localize("UTC") if stamps.tz is None else stamps.tz_convert("UTC")
    live = np.zeros(len(stamps), dtype=bool)
    if stamps.empty:
        return live
    now = pd.Timestamp(as_of)
    now = now.tz_localize("UTC") if now.tzinfo is None else now.tz_convert("UTC")
    reach = _LONGEST_PERIOD.get(interval) or intraday_length(interval)
    recent = np.flatnonzero(np.asarray(stamps >= now - reach - pd.Timedelta(days=1)))
    if recent.size == 0:
        return live
    recent_stamps = stamps[recent]
    session = _session_bounds(current_session)
    if is_daily_or_longer(interval):
        final = _period_final(recent_stamps, interval, calendar, zone, session)
    else:
        final = _intraday_final(recent_stamps, reach, calendar, session)
    live[recent] = final > now.value
    return live


def _session_bounds(current: tuple[datetime, datetime] | None) -> tuple[pd.Timestamp, pd.Timestamp] | None:
    if current is None:
        return None
    start, end = (pd.Timestamp(t) for t in current)
    start = start.tz_localize("UTC") if start.tzinfo is None else start.tz_convert("UTC")
    end = end.tz_localize("UTC") if end.tzinfo is None else end.tz_convert("UTC")
    return (start, end) if end > start else None


def _intraday_final(
    stamps: pd.DatetimeIndex,
    length: pd.Timedelta,
    calendar: str | None,
    session: tuple[pd.Timestamp, pd.Timestamp] | None,
) -> npt.NDArray[np.int64]:
    nanos = _nanos(pd.Series(stamps))
    final = nanos + length.value
    in_current: npt.NDArray[np.bool_] = np.zeros(len(nanos), dtype=bool)
    if session is not None:
        start, end = session[0].value, session[1].value
        in_current = np.asarray((nanos >= start) & (nanos < end))
        final = np.where(in_current, np.minimum(final, end), final)
    if calendar is not None:
        days = stamps.tz_localize(None).normalize()
        segments = session_segments(
            calendar, (days.min() - pd.Timedelta(days=1)).date(), (days.max() + pd.Timedelta(days=1)).date()
        )
        if segments is not None:
            position = segment_of(nanos, segments)
            known = (position >= 0) & ~in_current
            closes = segments[1][np.clip(position, 0, None)] if segments[1].size else np.zeros(len(nanos), np.int64)
            final = np.where(known, np.minimum(final, closes), final)
    return final


def _period_final(
    stamps: pd.DatetimeIndex,
    interval: str,
    calendar: str | None,
    zone: str | tzinfo,
    session: tuple[pd.Timestamp, pd.Timestamp] | None,
) -> npt.NDArray[np.int64]:
    days = stamps.tz_localize(None).normalize()
    if interval == "1d":
        first, after = days, days + pd.Timedelta(days=1)
    elif interval in ("1wk", "5d"):
        first = days - pd.to_timedelta(days.weekday, unit="D")
        after = first + pd.Timedelta(days=7)
    else:
        periods = days.to_period("M" if interval == "1mo" else "Q")
        first = periods.start_time.normalize()
        after = periods.end_time.normalize() + pd.Timedelta(days=1)
    n = len(days)
    midnight = after.tz_localize(zone, ambiguous=np.ones(n, dtype=bool), nonexistent="shift_forward")
    final = _nanos(pd.Series(midnight))
    if calendar is not None:
        name = str(xc.resolve_alias(calendar))
        cal = _calendar_covering(name, first.min(), after.max())
        if cal is not None:
            sessions = pd.DatetimeIndex(cal.sessions)
            closes = _nanos(cal.schedule["close"])
            last = np.searchsorted(sessions.to_numpy(), after.to_numpy(), side="left") - 1
            valid = last >= 0
            valid &= sessions.to_numpy()[np.clip(last, 0, None)] >= first.to_numpy()
            final = np.where(valid, closes[np.clip(last, 0, None)], final)
    if session is not None:
        start, end = session
        current = (start + (end - start) / 2).tz_convert(zone).tz_localize(None).normalize()
        final = np.where(np.asarray(after <= current), np.iinfo(np.int64).min, final)
        if interval == "1d":
            final = np.where(np.asarray(days == current), end.value, final)
    return np.asarray(final, dtype=np.int64)
