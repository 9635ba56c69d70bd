"""The store interface every backend block implements: DuckDB, InfluxDB 1.x (v1 API) and 2.x.

A few plain verbs, so incremental collection and the CLI need nothing backend-specific:
write a frame, read a range, the first and last timestamp of a series, health. Bars that fail
validation are kept apart, in quarantine, with the rule they broke; a bar is in exactly one place.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol, runtime_checkable

import pandas as pd

# The identity of a bar in every backend: writing the same key again overwrites it.
SERIES_TAGS: tuple[str, ...] = ("symbol", "interval", "source")
BAR_KEY: tuple[str, ...] = ("time", *SERIES_TAGS)
# Corporate actions are their own series: one per symbol, source and kind (split, dividend, capital_gain).
ACTION_KEY: tuple[str, ...] = ("time", "symbol", "source", "kind")
ACTION_FIELDS: tuple[str, ...] = ("ratio", "amount")
# Quarantined bars: the bar's series and time plus the rule it broke; ``reason`` is the one text field.
QUARANTINE_KEY: tuple[str, ...] = (*BAR_KEY, "rule")
# A quarantined copy under this rule is the earlier of two bars with one key: the later one is the
# clean bar, so a quarantine write leaves it in bars (the rule's name is validation's).
SUPERSEDED_RULES: frozenset[str] = frozenset({"duplicate_time"})
# Run metrics (`pipeline_metrics`): one row per run and series, at the run's start; float fields only.
METRICS_KEY: tuple[str, ...] = BAR_KEY

# How a write first clears a table of what it replaces: each incoming series' whole closed range,
# or each incoming bar's key (one instant of one series).
RANGES, BARS_OF = "ranges", "bars_of"


@dataclass(frozen=True)
class Table:
    """One kind of row every store keeps, declared once: a DuckDB table and an InfluxDB measurement.

    Backends know tables only through this, so a new table is one declaration here (and in
    ``TABLES``): the backends' generic ``write`` and ``read``, and the spool, then take it.
    """

    name: str
    key: tuple[str, ...]  # time and the tags; writing a key again replaces its row
    order: tuple[str, ...]  # a read's order: a total one over the key, oldest first within a series
    fields: tuple[str, ...] = ()  # fields every read has, as NaN where none was stored; the rest are the frame's
    text_fields: frozenset[str] = frozenset()  # every other field is a float
    clears: tuple[tuple[str, str], ...] = ()  # (table, RANGES or BARS_OF) a write first clears, in this order

    @property
    def tags(self) -> tuple[str, ...]:
        return tuple(c for c in self.key if c != "time")


def _order(*first: str, key: tuple[str, ...]) -> tuple[str, ...]:
    return (*first, *(c for c in key if c not in first))


BARS = Table("bars", BAR_KEY, _order("source", "time", key=BAR_KEY), clears=(("bars", RANGES), ("quarantine", RANGES)))
QUARANTINE = Table(
    "quarantine",
    QUARANTINE_KEY,
    _order("source", "time", "rule", key=QUARANTINE_KEY),
    text_fields=frozenset({"reason"}),
    clears=(("quarantine", BARS_OF), ("bars", BARS_OF)),  # its superseded duplicates leave bars alone
)
CORPORATE_ACTIONS = Table(
    "corporate_actions", ACTION_KEY, _order("source", "time", "kind", key=ACTION_KEY), fields=ACTION_FIELDS
)
PIPELINE_METRICS = Table("pipeline_metrics", METRICS_KEY, _order("source", "time", key=METRICS_KEY))
TABLES: dict[str, Table] = {t.name: t for t in (BARS, QUARANTINE, CORPORATE_ACTIONS, PIPELINE_METRICS)}


class StoreError(Exception):
    """The store refused or failed an operation; the message says what to check."""


class Accepted(int):
    """The points a write stored, plus ``dropped``: points older than the store's retention, dropped by it.

    InfluxDB answers a write holding such points with a partial write (1.x: 400, 2.x: 422) and
    stores the rest. Nothing the store would keep is lost, so the write succeeded; the count says
    what it would not keep. An ``int``, so every caller that counts points still works.
    """

    dropped: int

    def __new__(cls, written: int, dropped: int = 0) -> Accepted:
        accepted = super().__new__(cls, written)
        accepted.dropped = dropped
        return accepted


def dropped_by_retention(written: int) -> int:
    """How many points a write's store dropped as older than its retention (0 for a plain count)."""
    return written.dropped if isinstance(written, Accepted) else 0


@dataclass(frozen=True)
class RetentionChange:
    """What :meth:`BarStore.apply_retention` did, and to what; printed as ``updated: retention policy autogen``."""

    outcome: Literal["created", "updated", "unchanged"]
    detail: str

    def __str__(self) -> str:
        return f"{self.outcome}: {self.detail}"


class StoreUnavailableError(StoreError):
    """The store could not take the operation for a reason that passes: down, timed out, 5xx, locked.

    A write that fails this way is spooled and replayed later; any other StoreError would fail
    again on replay, so it fails the task instead.
    """


@dataclass(frozen=True)
class SeriesSpan:
    """One series' closed time range [first, last] in a written frame: what a bars write replaces."""

    symbol: str
    interval: str
    source: str
    first: pd.Timestamp
    last: pd.Timestamp

    @property
    def tags(self) -> dict[str, str]:
        return {"symbol": self.symbol, "interval": self.interval, "source": self.source}


FEW_ROWS = 2_000  # up to here, series_spans loops over the rows rather than grouping them


def series_spans(rows: pd.DataFrame, unit: str = "us") -> list[SeriesSpan]:
    """Each series' first and last time in ``rows``, floored to ``unit`` (the store's time precision)."""
    if rows.empty:
        return []
    times = pd.DatetimeIndex(rows["time"]).floor(unit)
    if len(rows) > FEW_ROWS:
        grouped = rows.assign(time=times).groupby(list(SERIES_TAGS), sort=True)["time"].agg(["min", "max"])
        ranges: Iterable[tuple[Any, Any, Any]] = zip(grouped.index, grouped["min"], grouped["max"], strict=True)
    else:  # a real-time write's bar or two per series: a groupby's setup costs five times this loop
        found: dict[tuple[str, ...], tuple[pd.Timestamp, pd.Timestamp]] = {}
        tags = zip(*(rows[tag].astype(str).tolist() for tag in SERIES_TAGS), strict=True)
        for key, time in zip(tags, times, strict=True):
            first, last = found.get(key, (time, time))
            found[key] = (min(first, time), max(last, time))
        ranges = ((key, first, last) for key, (first, last) in sorted(found.items()))
    return [
        SeriesSpan(str(symbol), str(interval), str(source), pd.Timestamp(first), pd.Timestamp(last))
        for (symbol, interval, source), first, last in ranges
    ]


def bar_points(rows: pd.DataFrame, unit: str = "us", skip_superseded: bool = False) -> list[SeriesSpan]:
    """Each distinct bar key of ``rows`` as a span of one instant: what a quarantine write replaces.

    ``skip_superseded`` leaves out rows under SUPERSEDED_RULES, whose clean bar stays.
    """
    if skip_superseded and "rule" in rows.columns:
        rows = rows.loc[~rows["rule"].isin(SUPERSEDED_RULES)]
    if rows.empty:
        return []
    keys = rows.assign(time=pd.DatetimeIndex(rows["time"]).floor(unit))[list(BAR_KEY)].drop_duplicates()
    return [
        SeriesSpan(str(symbol), str(interval), str(source), pd.Timestamp(time), pd.Timestamp(time))
        for time, symbol, interval, source in keys.itertuples(index=False, name=None)
    ]


def describe_duration(duration: timedelta) -> str:
    """A duration in the retention.duration grammar where it fits (``365d``, ``720h``), else as Python prints it."""
    seconds = int(duration.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return str(duration)


def duration_to_timedelta(duration: str) -> timedelta:
    """``365d``, ``52w`` or ``720h`` (the retention.duration grammar) as a timedelta."""
    match = re.fullmatch(r"([1-9][0-9]*)([hdw])", duration)
    if not match:
        raise StoreError(f"retention duration {duration!r} is not like 365d, 52w or 720h")
    unit = {"h": "hours", "d": "days", "w": "weeks"}[match[2]]
    return timedelta(**{unit: int(match[1])})


Filters = Mapping[str, str | None]  # tag -> value a read matches; None matches any


@runtime_checkable
class BarStore(Protocol):
    def write(self, table: Table, rows: pd.DataFrame) -> int:
        """Upsert ``rows`` on the table's key, first clearing what ``table.clears`` says; returns the points written."""
        ...

    def read(
        self, table: Table, filters: Filters, start: datetime | None = None, end: datetime | None = None
    ) -> pd.DataFrame:
        """Rows matching every non-None filter, in ``table.order``: key columns first; ``end`` is exclusive."""
        ...

    def write_bars(self, bars: pd.DataFrame) -> int:
        """Replace, per series, everything stored in the frame's range by the frame; returns the bars written.

        For each series (symbol, interval, source) in ``bars``, every bar stored in the closed range
        [its first time, its last time] in the frame, in bars AND in quarantine, is replaced by the
        frame's rows: a bar is stored exactly as this write says (a NaN field reads back NaN, never
        an older value), and a stored bar inside the range that the frame lacks is gone (a run
        quarantined or dropped it). Every bars write in the pipeline is "all the clean bars of a
        collected range as the source says now", so nothing outside that contract is lost. Bars
        outside the range and other series are untouched.

        DuckDB does this in one transaction. InfluxDB deletes the ranges, then writes: not atomic.
        Either step failing with :class:`StoreUnavailableError` spools the whole frame, and its
        replay does both again; a crash between the two leaves the range empty until the spooled
        (or the next run's) write fills it.
        """
        ...

    def write_corporate_actions(self, actions: pd.DataFrame) -> int:
        """Upsert on (symbol, source, kind, time); fields ``ratio`` and ``amount``."""
        ...

    def read_corporate_actions(self, symbol: str, source: str | None = None) -> pd.DataFrame:
        """Stored corporate actions of a symbol, oldest first."""
        ...

    def write_quarantine(self, bars: pd.DataFrame) -> int:
        """Store rejected bars on (symbol, interval, source, time, rule), with their values and ``reason``.

        A bar's quarantine rows become exactly the frame's rows for it (rules from an older write of
        the same bar go), and its clean copy leaves bars, unless the row is a superseded duplicate
        (SUPERSEDED_RULES: the bar with its key that arrived later is the clean one). Written after
        the bars of the same run.
        """
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

    def first_timestamp(self, symbol: str, interval: str, source: str) -> pd.Timestamp | None:
        """The oldest stored bar's time, or None for an empty series (to re-collect a whole series)."""
        ...

    def last_timestamp(self, symbol: str, interval: str, source: str) -> pd.Timestamp | None:
        """The newest stored bar's time, or None for an empty series."""
        ...

    def retention(self) -> timedelta | None:
        """How long the store itself keeps points (an InfluxDB retention policy or bucket rule); None: forever.

        A write of points older than this is partly dropped by the store, so collection does not ask
        for them. A store that enforces no age itself (DuckDB: `retention.duration` is applied by
        `marketpipe setup` and the maintenance flow) answers None.
        """
        ...

    def apply_retention(self, duration: str | None) -> RetentionChange:
        """Keep bars for ``duration`` (``365d``, ``52w``, ``720h``; None: forever); idempotent. Says what it did."""
        ...

    def health(self) -> None:
        """Raise :class:`StoreError` with a fix if the store can't be used."""
        ...

    def session(self) -> AbstractContextManager[object]:
        """Around many writes (a run): keeps open what they share; a no-op where nothing is worth keeping."""
        ...


class TableVerbs:
    """BarStore's per-table verbs as thin typed wrappers over a backend's generic ones, mixed into its block.

    A backend supplies ``write`` and ``_select``; ``read`` gives every table its declared fields.
    """

    def write(self, table: Table, rows: pd.DataFrame) -> int:
        raise NotImplementedError

    def _select(
        self, table: Table, filters: Filters, start: datetime | None = None, end: datetime | None = None
    ) -> pd.DataFrame:
        """What the store holds of ``table`` matching the filters, in ``table.order``."""
        raise NotImplementedError

    def read(
        self, table: Table, filters: Filters, start: datetime | None = None, end: datetime | None = None
    ) -> pd.DataFrame:
        rows = self._select(table, filters, start, end)
        # A field never written (no dividend yet, say) is no column in the store; every reader expects them.
        return rows.reindex(columns=[*table.key, *table.fields]) if table.fields else rows

    def write_bars(self, bars: pd.DataFrame) -> int:
        return self.write(BARS, bars)

    def write_quarantine(self, bars: pd.DataFrame) -> int:
        return self.write(QUARANTINE, bars)

    def write_corporate_actions(self, actions: pd.DataFrame) -> int:
        return self.write(CORPORATE_ACTIONS, actions)

    def write_metrics(self, rows: pd.DataFrame) -> int:
        return self.write(PIPELINE_METRICS, rows)

    def read_bars(
        self,
        symbol: str,
        interval: str = "1d",
        source: str | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
    ) -> pd.DataFrame:
        return self.read(BARS, {"symbol": symbol, "interval": interval, "source": source}, start, end)

    def read_quarantine(
        self,
        symbol: str,
        interval: str | None = None,
        source: str | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
    ) -> pd.DataFrame:
        return self.read(QUARANTINE, {"symbol": symbol, "interval": interval, "source": source}, start, end)

    def read_corporate_actions(self, symbol: str, source: str | None = None) -> pd.DataFrame:
        return self.read(CORPORATE_ACTIONS, {"symbol": symbol, "source": source})

    def read_metrics(self, symbol: str, source: str | None = None) -> pd.DataFrame:
        return self.read(PIPELINE_METRICS, {"symbol": symbol, "source": source})
