"""What both InfluxDB backends share: the measurements, and writing a frame as line protocol.

A backend supplies three things: a sender that takes one gzip-ready batch of lines, a delete of
series ranges from one measurement, and a select of one measurement's rows. Everything else (which
measurement and tags each kind of row uses, what a write replaces, key checks, chunking,
overlapping serialization with sending, the read verbs) lives here once.

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
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import datetime
from typing import ClassVar

import pandas as pd

from blocks.line_protocol import batches, serialize
from blocks.store import (
    ACTION_FIELDS,
    ACTION_KEY,
    BAR_KEY,
    METRICS_KEY,
    QUARANTINE_KEY,
    Accepted,
    SeriesSpan,
    StoreError,
    bar_points,
    series_spans,
)

BARS, ACTIONS, QUARANTINE, METRICS = "bars", "corporate_actions", "quarantine", "pipeline_metrics"
TEXT_FIELDS = ("reason",)  # the one text field (quarantine's); every other field is a float
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


class InfluxMeasurements:
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
        self,
        measurement: str,
        key: tuple[str, ...],
        filters: Mapping[str, str | None],
        start: datetime | None = None,
        end: datetime | None = None,
    ) -> pd.DataFrame:
        """Rows of ``measurement`` matching every non-None filter: key columns, then sorted fields."""
        raise NotImplementedError

    # --- writing -------------------------------------------------------------------------------

    def write_bars(self, bars: pd.DataFrame) -> int:
        """Delete each series' range from bars and quarantine, then write (the BarStore contract).

        With ``_reads_before_deleting`` (InfluxDB 1.x), a range that the write overwrites exactly
        (every stored bar in it is rewritten, with every field it stores) needs no DELETE, so reruns,
        replays and first writes send none: influxd 1.6 can hide rewritten series from queries until
        it restarts when a DELETE came before their write (influxdb#9431), which a rerun after a
        `kill -9` met on every try. Two reads per series buy that.
        """
        self._check_key(BARS, bars, BAR_KEY)
        spans = series_spans(bars, PRECISION)
        clear = {BARS: spans, QUARANTINE: spans}
        if self._reads_before_deleting:
            clear = {
                BARS: [span for span in spans if not self._overwrites_exactly(span, bars)],
                QUARANTINE: [span for span in spans if not self._stored(QUARANTINE, QUARANTINE_KEY, span).empty],
            }
        if clear[BARS] or clear[QUARANTINE]:
            with self._apart.deleting():
                for measurement, cleared in clear.items():
                    if cleared:
                        self._delete(measurement, cleared)
        return self._write(BARS, bars, BAR_KEY)

    def _stored(self, measurement: str, key: tuple[str, ...], span: SeriesSpan) -> pd.DataFrame:
        """What ``measurement`` holds of the span's series in its closed range."""
        end = span.last + pd.Timedelta(seconds=1)  # the next instant at PRECISION
        return self._select(measurement, key, span.tags, span.first.to_pydatetime(), end.to_pydatetime())

    def _overwrites_exactly(self, span: SeriesSpan, bars: pd.DataFrame) -> bool:
        """Whether writing ``bars`` replaces every point and field stored in the span, with no DELETE."""
        stored = self._stored(BARS, BAR_KEY, span)
        if stored.empty:
            return True
        mine = (bars["symbol"] == span.symbol) & (bars["interval"] == span.interval) & (bars["source"] == span.source)
        new = bars.loc[mine].assign(time=pd.DatetimeIndex(bars.loc[mine, "time"]).floor(PRECISION))
        new = new.drop_duplicates("time", keep="last").set_index("time").reindex(stored["time"])
        for field in (c for c in stored.columns if c not in BAR_KEY):
            kept = stored[field].notna().to_numpy()
            given = new[field].notna().to_numpy() if field in new.columns else False
            if (kept & ~given).any():  # also true for a stored bar the write does not have
                return False
        return True

    def write_corporate_actions(self, actions: pd.DataFrame) -> int:
        return self._write(ACTIONS, actions, ACTION_KEY)

    def write_quarantine(self, bars: pd.DataFrame) -> int:
        """Delete each bar's quarantine rows and clean copy (one instant each: they are few), then write.

        A superseded duplicate (SUPERSEDED_RULES) leaves its clean bar alone.
        """
        self._check_key(QUARANTINE, bars, QUARANTINE_KEY)
        with self._apart.deleting():
            self._delete(QUARANTINE, bar_points(bars, PRECISION))
            self._delete(BARS, bar_points(bars, PRECISION, skip_superseded=True))
        return self._write(QUARANTINE, bars, QUARANTINE_KEY)

    def write_metrics(self, rows: pd.DataFrame) -> int:
        return self._write(METRICS, rows, METRICS_KEY)

    def _write(self, measurement: str, rows: pd.DataFrame, key: tuple[str, ...]) -> Accepted:
        """Write every row that has a value; returns the points stored (all-NaN rows have none) and dropped."""
        if rows.empty:
            return Accepted(0)
        self._check_key(measurement, rows, key)
        rows = rows.drop_duplicates(subset=list(key), keep="last")
        tags = [c for c in key if c != "time"]
        chunks = [rows.iloc[i : i + ROWS_PER_CHUNK] for i in range(0, len(rows), ROWS_PER_CHUNK)]
        with self._apart.writing(), self._sender() as send, ThreadPoolExecutor(WRITERS) as pool:

            def write_chunk(chunk: pd.DataFrame) -> tuple[int, int]:
                lines = serialize(chunk, measurement, tags, TEXT_FIELDS)
                dropped = sum(send(body) for body in batches(lines))
                return len(lines), dropped

            # Serializing one chunk overlaps sending another; any failed chunk fails the write.
            sent, dropped = (sum(counts) for counts in zip(*pool.map(write_chunk, chunks), strict=True))
            return Accepted(sent - dropped, dropped)

    @staticmethod
    def _check_key(measurement: str, rows: pd.DataFrame, key: tuple[str, ...]) -> None:
        missing = [c for c in key if c not in rows.columns]
        if missing and not rows.empty:
            raise StoreError(f"cannot store {measurement} without key columns: {', '.join(missing)}")

    # --- reading -------------------------------------------------------------------------------

    def read_bars(
        self,
        symbol: str,
        interval: str = "1d",
        source: str | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
    ) -> pd.DataFrame:
        filters = {"symbol": symbol, "interval": interval, "source": source}
        return self._select(BARS, BAR_KEY, filters, start, end)

    def read_corporate_actions(self, symbol: str, source: str | None = None) -> pd.DataFrame:
        actions = self._select(ACTIONS, ACTION_KEY, {"symbol": symbol, "source": source})
        # A field never written (no dividend yet, say) is no column in InfluxDB; every reader expects both.
        return actions.reindex(columns=[*ACTION_KEY, *ACTION_FIELDS])

    def read_metrics(self, symbol: str, source: str | None = None) -> pd.DataFrame:
        return self._select(METRICS, METRICS_KEY, {"symbol": symbol, "source": source})

    def read_quarantine(
        self,
        symbol: str,
        interval: str | None = None,
        source: str | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
    ) -> pd.DataFrame:
        filters = {"symbol": symbol, "interval": interval, "source": source}
        return self._select(QUARANTINE, QUARANTINE_KEY, filters, start, end)
