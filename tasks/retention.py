"""Retention: how far back the store keeps bars, so a run never collects what it would drop.

Two answers count: `retention.duration` (what `marketpipe setup` applies, and DuckDB's maintenance
deletes by), and the store's own, where it can tell (an InfluxDB 1.x retention policy, a 2.x
bucket rule), which is what really drops points on write: a policy someone set by hand, or a setup
not run yet, differs from the settings. The shorter wins, since either removes older bars. A store
that cannot be asked leaves the settings' answer; its writes are spooled anyway.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

from blocks.store import BarStore, StoreError, describe_duration, duration_to_timedelta
from tasks.errors import UsageError
from tasks.sources.base import Window

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Retention:
    duration: timedelta
    origin: str  # where it comes from, as the summary names it

    def first_day(self, now: datetime) -> date:
        """The first date whose 00:00 UTC is still kept: daily bars are stamped there."""
        cutoff = now - self.duration
        day = cutoff.date()
        return day if datetime.combine(day, time(), UTC) >= cutoff else day + timedelta(days=1)

    def describe(self) -> str:
        return f"{self.origin} of {describe_duration(self.duration)}"


def retention_of(configured: str | None, store: BarStore) -> Retention | None:
    """The shorter of `retention.duration` and the store's own retention; None: both keep everything."""
    found = []
    if configured is not None:
        found.append(Retention(duration_to_timedelta(configured), "retention.duration"))
    try:
        own = store.retention()
    except StoreError as exc:
        logger.warning("could not read the store's retention (%s); going by retention.duration alone", exc)
        own = None
    if own is not None:
        found.append(Retention(own, "the store's retention"))
    return min(found, key=lambda r: r.duration) if found else None


def clamp(window: Window, retention: Retention, now: datetime) -> tuple[Window, str]:
    """The window from the retention's first day on, and a line saying so when that moved its start.

    A window wholly before that day would store nothing: a usage error naming what to change.
    """
    first = retention.first_day(now)
    if window.end < first:
        raise UsageError(
            f"the window {window.start} to {window.end} is older than {retention.describe()}, which keeps "
            f"bars from {first}: the store would drop every bar; choose dates from {first} on, or lengthen "
            "the retention"
        )
    clamped = window.not_before(first)
    if clamped.start == window.start:
        return clamped, ""
    if window.mode == "explicit":
        return clamped, f"--start {window.start} is before {retention.describe()}: collected from {first}"
    return clamped, f"window clamped to {retention.describe()}: from {first}"
