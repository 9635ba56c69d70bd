"""What both InfluxDB backends share: the measurements, and writing a frame as line protocol.

A backend supplies three things: a sender that takes one gzip-ready batch of lines, a delete of
series ranges from one measurement, and a select of one measurement's rows. Everything else (what
a write of each table replaces, key checks, chunking, overlapping serialization with sending) lives
here once; each table is a measurement, declared in :mod:`blocks.store`.

InfluxDB keeps the fields a rewrite does not send, and NaN fields are not sent; so a bars write
first deletes its series' ranges (the BarStore contract), and only then writes. The two steps are
not atomic: a failure of either raises, and the caller spools the whole frame for a replay that
does both again.

Points older than the retention policy (1.x) or bucket rule (2.x) are dropped by the server, which
stores the rest and answers with a partial write. That write succeeded: a sender returns the count
dropped, and a write returns an :class:`~blocks.store.Accepted` count carrying it.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import replace
from datetime import datetime
from typing import Annotated, ClassVar

import pandas as pd
from pydantic import Field
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from blocks.line_protocol import batches, serialize
from blocks.store import (
    BARS,
    BARS_OF,
    RANGES,
    TABLES,
    Accepted,
    Filters,
    SeriesSpan,
    StoreError,
    Table,
    TableVerbs,
    bar_points,
    series_spans,
)

# Both backends' one retry policy for a write or delete: seconds before the first retry, then the
# wait doubles (plus as much jitter) up to MAX_WAIT.
# The connection fields both InfluxDB store blocks have, declared once (each block keeps its own
# field order, so the block schemas `marketpipe setup` registers are unchanged).
InfluxUrl = Annotated[str, Field(description="base URL of the InfluxDB HTTP API")]
RequestTimeout = Annotated[float, Field(gt=0, description="seconds per request")]
WriteAttempts = Annotated[int, Field(ge=1, description="attempts per batch before the write fails")]
DEFAULT_URL = "http://localhost:8086"

FIRST_WAIT = 0.5
MAX_WAIT = 10.0
ROWS_PER_CHUNK = 50_000
WRITERS = 2
PRECISION = "s"  # points are written in whole seconds, so deleted ranges are floored to seconds too

# One batch of lines to the server; returns the points it dropped as older than its retention.
Send = Callable[[bytes], int]

# The partial write of points older than the retention: 1.x `partial write: points beyond retention
# policy dropped=N` (400), 2.x the same inside its 422 message, or since 2.7.11 `partial write:
# dropped N points outside retention policy of duration ... dropped=N`. Other partial writes (a field
# type conflict) lost points the store would keep, and stay errors.
_BEYOND_RETENTION = re.compile(
    r"partial write: (?:points beyond retention policy|dropped [0-9]+ points outside retention policy)"
    r".*?dropped=([0-9]+)",
    re.DOTALL,
)


def retrying(attempts: int, retryable: Callable[[BaseException], bool]) -> Retrying:
    """Up to ``attempts`` tries while ``retryable`` says the error passes; the last error is raised."""
    return Retrying(
        retry=retry_if_exception(retryable),
        stop=stop_after_attempt(attempts),
        wait=wait_exponential_jitter(multiplier=FIRST_WAIT, max=MAX_WAIT, jitter=FIRST_WAIT),
        reraise=True,
    )


def beyond_retention(message: str) -> int | None:
    """The points a partial write dropped as older than the retention, or None for any other answer."""
    match = _BEYOND_RETENTION.search(message)
    return int(match[1]) if match else None


class DeletesApart:
    """Writes share; a DELETE runs alone, in this process.

    influxd 1.6 loses points written while a DELETE of other series of the same database runs: with
    two threads each rewriting their own symbols (delete, then write), a symbol read back empty.
    The flow's store tasks do exactly that in threads, so a DELETE here waits for the writes in
    flight and holds new ones back until it is done. Processes on other hosts are not covered.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._writers = 0
        self._deleting = False
        self._waiting = 0  # DELETEs waiting: new writes queue behind them, so a DELETE is never starved

    @contextmanager
    def writing(self) -> Iterator[None]:
        with self._changed:
            self._changed.wait_for(lambda: not self._deleting and self._waiting == 0)
            self._writers += 1
        try:
            yield
        finally:
            with self._changed:
                self._writers -= 1
                self._changed.notify_all()

    @contextmanager
    def deleting(self) -> Iterator[None]:
        with self._changed:
            self._waiting += 1
            self._changed.wait_for(lambda: not self._deleting and self._writers == 0)
            self._waiting -= 1
            self._deleting = True
        try:
            yield
        finally:
            with self._changed:
                self._deleting = False
                self._changed.notify_all()


class InfluxMeasurements(TableVerbs):
    """The BarStore verbs over InfluxDB measurements; mixed into a backend's Block class."""

    _apart: ClassVar[DeletesApart] = DeletesApart()
    _reads_before_deleting: ClassVar[bool] = False  # see write_bars

    def session(self) -> AbstractContextManager[object]:
        """Nothing to keep: the HTTP client's connections are pooled already."""
        return nullcontext()

    def _sender(self) -> AbstractContextManager[Send]:
        """A callable sending one batch of lines (retried, raising StoreError), open for one write."""
        raise NotImplementedError

    def _delete(self, measurement: str, spans: Sequence[SeriesSpan]) -> None:
        """Delete every point of each span's series in its closed range [first, last] (raising StoreError)."""
        raise NotImplementedError

    def _select(
        self, table: Table, filters: Filters, start: datetime | None = None, end: datetime | None = None
    ) -> pd.DataFrame:
        """Rows of ``table`` matching every non-None filter: key columns, then sorted fields, in its order."""
        raise NotImplementedError

    # --- writing -------------------------------------------------------------------------------

    def write(self, table: Table, rows: pd.DataFrame) -> int:
        """Delete what ``table.clears`` says, then write (the BarStore contract).

        With ``_reads_before_deleting`` (InfluxDB 1.x), a range that the write overwrites exactly
        (every stored point in it is rewritten, with every field it stores) needs no DELETE, nor a
        range of another table that holds nothing, nor a bar's key (BARS_OF) it does not hold, so
        reruns, replays and first writes send none: influxd 1.6 can hide rewritten series from
        queries until it restarts when a DELETE came before their write (influxdb#9431), which a
        rerun after a `kill -9` met on every try; and once in CI, a first run's quarantine write,
        deleting the key of a bar its bars write had just left out, left five daily bars (a week:
        one 7-day shard) unreadable. Two reads per series buy that.
        """
        self._check_key(table, rows)
        spans = series_spans(rows, PRECISION) if any(how == RANGES for _, how in table.clears) else []
        cleared = {name: self._to_clear(table, TABLES[name], how, rows, spans) for name, how in table.clears}
        if any(cleared.values()):
            with self._apart.deleting():
                for name, spans in cleared.items():
                    if spans:
                        self._delete(name, spans)
        return self._write(table, rows)

    def _to_clear(
        self, table: Table, other: Table, how: str, rows: pd.DataFrame, spans: list[SeriesSpan]
    ) -> list[SeriesSpan]:
        """What of ``other`` a write of ``rows`` (each series' ``spans``) to ``table`` must delete first."""
        if how == BARS_OF:  # a superseded duplicate's clean bar stays in bars (SUPERSEDED_RULES)
            points = bar_points(rows, PRECISION, skip_superseded=other is BARS)
            return self._held(other, points) if self._reads_before_deleting else points
        if not self._reads_before_deleting:
            return spans
        stored = self._stored_spans(other, spans)
        if other is table:
            return [
                span for span, held in zip(spans, stored, strict=True) if not self._overwrites(held, span, rows, table)
            ]
        return [span for span, held in zip(spans, stored, strict=True) if not held.empty]

    def _held(self, table: Table, points: list[SeriesSpan]) -> list[SeriesSpan]:
        """The bar ``points`` that ``table`` holds, read with one range per series: a first write
        into an empty store then sends no DELETE at all (see :meth:`write`)."""
        ranges: dict[tuple[str, str, str], SeriesSpan] = {}
        for point in points:
            key = (point.symbol, point.interval, point.source)
            seen = ranges.get(key, point)
            ranges[key] = replace(seen, first=min(seen.first, point.first), last=max(seen.last, point.last))
        held: set[tuple[str, str, str, pd.Timestamp]] = set()
        for key, stored in zip(ranges, self._stored_spans(table, list(ranges.values())), strict=True):
            held.update((*key, time) for time in pd.DatetimeIndex(stored["time"]).floor(PRECISION))
        return [p for p in points if (p.symbol, p.interval, p.source, p.first) in held]

    def _stored_spans(self, table: Table, spans: Sequence[SeriesSpan]) -> list[pd.DataFrame]:
        """What ``table`` holds of each span's series in its closed range; a backend may read them together."""
        return [self._stored(table, span) for span in spans]

    def _stored(self, table: Table, span: SeriesSpan) -> pd.DataFrame:
        """What ``table`` holds of the span's series in its closed range."""
        end = span.last + pd.Timedelta(seconds=1)  # the next instant at PRECISION
        return self._select(table, span.tags, span.first.to_pydatetime(), end.to_pydatetime())

    @staticmethod
    def _overwrites(stored: pd.DataFrame, span: SeriesSpan, rows: pd.DataFrame, table: Table) -> bool:
        """Whether writing ``rows`` replaces every point and field ``stored`` holds in the span, with no DELETE."""
        if stored.empty:
            return True
        mine = (rows["symbol"] == span.symbol) & (rows["interval"] == span.interval) & (rows["source"] == span.source)
        new = rows.loc[mine].assign(time=pd.DatetimeIndex(rows.loc[mine, "time"]).floor(PRECISION))
        new = new.drop_duplicates("time", keep="last").set_index("time").reindex(stored["time"])
        for field in (c for c in stored.columns if c not in table.key):
            kept = stored[field].notna().to_numpy()
            given = new[field].notna().to_numpy() if field in new.columns else False
            if (kept & ~given).any():  # also true for a stored point the write does not have
                return False
        return True

    def _write(self, table: Table, rows: pd.DataFrame) -> Accepted:
        """Write every row that has a value; returns the points stored (all-NaN rows have none) and dropped."""
        if rows.empty:
            return Accepted(0)
        rows = rows.drop_duplicates(subset=list(table.key), keep="last")
        chunks = [rows.iloc[i : i + ROWS_PER_CHUNK] for i in range(0, len(rows), ROWS_PER_CHUNK)]
        with self._apart.writing(), self._sender() as send:

            def write_chunk(chunk: pd.DataFrame) -> tuple[int, int]:
                lines = serialize(chunk, table.name, list(table.tags), tuple(table.text_fields))
                dropped = sum(send(body) for body in batches(lines))
                return len(lines), dropped

            if len(chunks) == 1:  # most writes (real time's every one): no pool to start and join
                sent, dropped = write_chunk(chunks[0])
                return Accepted(sent - dropped, dropped)
            # Serializing one chunk overlaps sending another; any failed chunk fails the write.
            with ThreadPoolExecutor(WRITERS) as pool:
                sent, dropped = (sum(counts) for counts in zip(*pool.map(write_chunk, chunks), strict=True))
            return Accepted(sent - dropped, dropped)

    @staticmethod
    def _check_key(table: Table, rows: pd.DataFrame) -> None:
        missing = [c for c in table.key if c not in rows.columns]
        if missing and not rows.empty:
            raise StoreError(f"cannot store {table.name} without key columns: {', '.join(missing)}")
