"""The freshness SLA: each symbol holds the bar of every session its exchange has closed, by a deadline.

A session's bar is due ``alerts.rules.freshness.deadline`` after the session's close on the
symbol's exchange calendar. Weekends and holidays close no session, so they are never a breach.
A symbol whose calendar can't be known (no config override, nothing to guess from the symbol) is
reported as unchecked, with the key that makes it checkable.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta

import pandas as pd

from blocks.store import BarStore
from configs.settings import Settings
from tasks.bars import Instrument
from tasks.calendars import calendar_for, due_session, session_of

FRESH, STALE, UNCHECKED = "fresh", "stale", "unchecked"


@dataclass(frozen=True)
class Freshness:
    """Where one series stands against its SLA at ``as_of``."""

    symbol: str
    interval: str
    source: str
    as_of: datetime
    calendar: str | None
    last_bar: pd.Timestamp | None  # None: nothing stored
    last_session: date | None  # the session of the last bar
    due: date | None  # the latest session whose bar is due by now
    status: str  # FRESH, STALE or UNCHECKED

    @property
    def breached(self) -> bool:
        return self.status == STALE

    def describe(self) -> str:
        """One line for a table, an alert or a log: what is wrong and what to do."""
        if self.calendar is None:
            return f"no exchange calendar known: set quality.calendars.{self.symbol} to check its freshness"
        if self.status == FRESH:
            return f"holds the {self.due} session" if self.due else "no session due yet"
        held = f"its last bar is from the {self.last_session} session" if self.last_bar is not None else "none stored"
        return (
            f"the {self.due} session's bar was due and is missing ({held}): check the last market-data run "
            f"for {self.symbol}, then run `marketpipe run --symbols {self.symbol}`"
        )


def check_freshness(
    store: BarStore, settings: Settings, symbols: list[str], source: str, interval: str, as_of: datetime
) -> list[Freshness]:
    """Each symbol's freshness at ``as_of``, from its last stored bar and its exchange calendar."""
    deadline: timedelta = settings.alerts.rules.freshness.deadline
    cutoff = pd.Timestamp(as_of) - deadline
    checked = []
    for symbol in symbols:
        calendar = calendar_for(symbol, Instrument(), settings.quality.calendars.get(symbol.upper()))
        last = store.last_timestamp(symbol, interval, source)
        last_session = session_of(last, interval, calendar) if last is not None and calendar else None
        due = due_session(calendar, cutoff) if calendar else None
        if calendar is None:
            status = UNCHECKED
        elif due is None or (last_session is not None and last_session >= due):
            status = FRESH
        else:
            status = STALE
        checked.append(Freshness(symbol, interval, source, as_of, calendar, last, last_session, due, status))
    return checked


def duration_text(span: timedelta) -> str:
    """``2h``, ``90m``, ``1d``: a deadline as the config writes it."""
    seconds = int(span.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
