"""The store interface every backend block implements (DuckDB now; InfluxDB v1/v2 next).

A few plain verbs, so incremental collection and the CLI need nothing backend-specific:
write a frame, read a range, the last timestamp of a series, health. Bars that fail validation
are kept apart, in quarantine, with the rule they broke.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Protocol, runtime_checkable

import pandas as pd

# The identity of a bar in every backend: writing the same key again overwrites it.
SERIES_TAGS: tuple[str, ...] = ("symbol", "interval", "source")
BAR_KEY: tuple[str, ...] = ("time", *SERIES_TAGS)
# Corporate actions are their own series: one per symbol, source and kind (split, dividend, capital_gain).
ACTION_KEY: tuple[str, ...] = ("time", "symbol", "source", "kind")
ACTION_FIELDS: tuple[str, ...] = ("ratio", "amount")
# Quarantined bars: the bar's series and time plus the rule it broke; ``reason`` is the one text field.
QUARANTINE_KEY: tuple[str, ...] = (*BAR_KEY, "rule")
# Run metrics (`pipeline_metrics`): one row per run and series, at the run's start; float fields only.
METRICS_KEY: tuple[str, ...] = BAR_KEY


class StoreError(Exception):
    """The store refused or failed an operation; the message says what to check."""


class StoreUnavailableError(StoreError):
    """The store could not take the operation for a reason that passes: down, timed out, 5xx, locked.

    A write that fails this way is spooled and replayed later; any other StoreError would fail
    again on replay, so it fails the task instead.
    """


def duration_to_timedelta(duration: str) -> timedelta:
    """``365d``, ``52w`` or ``720h`` (the retention.duration grammar) as a timedelta."""
    match = re.fullmatch(r"([1-9][0-9]*)([hdw])", duration)
    if not match:
        raise StoreError(f"retention duration {duration!r} is not like 365d, 52w or 720h")
    unit = {"h": "hours", "d": "days", "w": "weeks"}[match[2]]
    return timedelta(**{unit: int(match[1])})


@runtime_checkable
class BarStore(Protocol):
    def write_bars(self, bars: pd.DataFrame) -> int:
        """Upsert on (symbol, interval, source, time); returns the number of bars written."""
        ...

    def write_corporate_actions(self, actions: pd.DataFrame) -> int:
        """Upsert on (symbol, source, kind, time); fields ``ratio`` and ``amount``."""
        ...

    def read_corporate_actions(self, symbol: str, source: str | None = None) -> pd.DataFrame:
        """Stored corporate actions of a symbol, oldest first."""
        ...

    def write_quarantine(self, bars: pd.DataFrame) -> int:
        """Upsert rejected bars on (symbol, interval, source, time, rule), with their values and ``reason``."""
        ...

    def read_quarantine(
        self,
        symbol: str,
        interval: str | None = None,
        source: str | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
    ) -> pd.DataFrame:
        """Quarantined bars of a symbol, oldest first; ``end`` is exclusive."""
        ...

    def read_bars(
        self,
        symbol: str,
        interval: str = "1d",
        source: str | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
    ) -> pd.DataFrame:
        """Stored bars oldest first, every stored column; ``end`` is exclusive."""
        ...

    def write_metrics(self, rows: pd.DataFrame) -> int:
        """Upsert run metrics on (symbol, interval, source, time): counts per run, as float fields."""
        ...

    def read_metrics(self, symbol: str, source: str | None = None) -> pd.DataFrame:
        """A symbol's run metrics, oldest run first."""
        ...

    def last_timestamp(self, symbol: str, interval: str, source: str) -> pd.Timestamp | None:
        """The newest stored bar's time, or None for an empty series."""
        ...

    def apply_retention(self, duration: str | None) -> str:
        """Keep bars for ``duration`` (``365d``, ``52w``, ``720h``; None: forever); idempotent. Says what it did."""
        ...

    def health(self) -> None:
        """Raise :class:`StoreError` with a fix if the store can't be used."""
        ...
