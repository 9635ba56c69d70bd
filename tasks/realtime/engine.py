"""The real-time loop: each completed bar stored seconds after its close, never a forming one.

On start it backfills every symbol from its last final stored bar, as far back as the source
still serves, and reports the bars it can't get back. Then, while a symbol's exchange trades, it
polls the source right after each bar closes (plus ``poll_delay``) and again every
``poll_seconds`` until the source serves that bar; a bar is final only once its interval has ended
by the source's clock (its ``Date``) and by ours. With the streamer, the ticks of each minute
become a provisional bar as soon as the minute closes, which the polled bar then replaces.

The loop itself only keeps time: polls run on a pool of threads and never hold it up, the ticks'
bars are processed on a thread of their own (a slow source never delays them), and one writer
thread stores what both queue, in the order queued, each write taking everything that waits. A
symbol's bars are processed and queued under its own lock, so a provisional bar can never land
after the final bar of its minute. Writes go through the spool, so an unavailable store loses
nothing: its batches wait and are replayed before the next write.
"""

from __future__ import annotations

import gc
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd

from blocks.spool import Spool
from blocks.store import BARS, QUARANTINE, BarStore, StoreError
from configs.settings import Settings
from tasks.bars import Instrument
from tasks.calendars import calendar_for
from tasks.errors import RangeNotServedError, SourceError
from tasks.processing.indicators import bounded_lookback
from tasks.processing.pipeline import Processed
from tasks.realtime.clock import Clock
from tasks.realtime.series import SymbolSeries, start_seconds
from tasks.realtime.sessions import TradingHours, bar_seconds, stamp
from tasks.realtime.tick_bars import TickBar, TickBars
from tasks.sources.base import Collected, Source, load_source, pacer_for
from tasks.store import quarantine_rows

logger = logging.getLogger("marketpipe.realtime")

POLL, STREAM = "poll", "stream"
MODES = (POLL, STREAM)
STREAM_GRACE = 0.15  # seconds after a minute's close for its last ticks to arrive
FIRST_DAYS = 4  # nothing stored yet: the bars of the last days (from 00:00 UTC), not the source's whole reach


@dataclass(frozen=True)
class RealtimeOptions:
    symbols: list[str]
    source: str = "yahoo_finance"
    interval: str = "1m"
    mode: str = POLL
    poll_seconds: float = 5.0
    poll_delay: float = 1.0  # after a bar's close, before its first poll: sources publish a moment later
    stream_url: str | None = None


@dataclass(frozen=True)
class Stored:
    """One bar as it became readable in the store: for the latency figures."""

    symbol: str
    start: float
    close: float  # when the bar's interval ended
    seen: float  # when the symbol's poll that returned it started, or when its minute's ticks were handed over
    written: float  # when the store acknowledged it
    provisional: bool


@dataclass
class Summary:
    """What a real-time run did, for its log, its artifact and the benchmark."""

    final: int = 0
    provisional: int = 0
    polls: int = 0
    poll_errors: int = 0
    spooled: int = 0
    holes: list[str] = field(default_factory=list)  # bars that could not be filled, per symbol
    errors: dict[str, str] = field(default_factory=dict)  # the last error per symbol
    latencies: deque[Stored] = field(default_factory=lambda: deque(maxlen=200_000))

    def percentiles(self, provisional: bool, since: str = "close") -> dict[str, float]:
        """p50/p95/p99 of seconds from the bar's close (or the poll that saw it) to readable."""
        values = [s.written - getattr(s, since) for s in self.latencies if s.provisional == provisional]
        if not values:
            return {}
        found = np.percentile(values, [50, 95, 99])
        return {"p50": float(found[0]), "p95": float(found[1]), "p99": float(found[2]), "bars": float(len(values))}


class Realtime:
    """The loop for one source and interval; :meth:`run` returns when ``stop`` is set."""

    def __init__(
        self,
        settings: Settings,
        options: RealtimeOptions,
        store: BarStore,
        clock: Clock | None = None,
        source: Source | None = None,
        heartbeat: Callable[[], None] | None = None,
    ) -> None:
        self.settings, self.options, self.store = settings, options, store
        self.clock = clock or Clock()
        source_settings = settings.source(options.source)
        self.source = source or load_source(
            options.source,
            source_settings,
            pacer_for(options.source, source_settings, settings.collection.rate_limit_dir),
        )
        self.spool = Spool(settings.storage.spool_dir)
        self.heartbeat = heartbeat or (lambda: None)
        self.summary = Summary()
        lookback = bounded_lookback(settings.indicators, options.interval)
        self.series = {
            s: SymbolSeries(s, options.interval, options.source, TradingHours(self._calendar(s, None)), lookback)
            for s in options.symbols
        }
        self.next_poll: dict[str, float] = {}
        self.polling: set[str] = set()  # symbols whose poll is in flight
        self.locks = {s: threading.Lock() for s in options.symbols}  # a symbol's series and what it queues
        self.guard = threading.Lock()  # next_poll, polling and the summary's counts
        self.wake = threading.Event()  # a poll finished: the loop looks at the schedule again
        self.ticks_first = TicksFirst()
        self.tick_bars = TickBars(options.interval, {s: x.hours for s, x in self.series.items()})
        self.pool = ThreadPoolExecutor(max(1, settings.collection.workers), thread_name_prefix="marketpipe-poll")
        self.ticks_pool = ThreadPoolExecutor(1, thread_name_prefix="marketpipe-ticks")
        self.writer = Writer(self._write)
        self.stream_thread: threading.Thread | None = None
        self.stream_stats: Any = None

    def _calendar(self, symbol: str, instrument: Instrument | None) -> str | None:
        """The config's calendar for the symbol, else the source's (once known), else a guess from the symbol."""
        override = self.settings.quality.calendars.get(symbol.upper())
        return calendar_for(symbol, instrument or Instrument(), override)

    # The pace a round of polls needs, and the latency it allows.

    def pacing_note(self) -> str:
        """Whether one poll of every symbol per bar fits the source's rate limit, and the latency that allows."""
        source_settings = self.settings.source(self.options.source)
        per_second = source_settings.rate_limit / 3600
        n = len(self.options.symbols)
        round_seconds = n / per_second if per_second else math.inf
        step = bar_seconds(self.options.interval)
        note = (
            f"{n} symbol(s) at {source_settings.rate_limit:g} requests/hour: one poll of each takes "
            f"{round_seconds:.1f} s, so a bar is stored within about {self.options.poll_delay + round_seconds:.1f} s "
            f"of its close"
        )
        if round_seconds > step:
            note += (
                f"; that is longer than a {self.options.interval} bar, so polls fall behind: raise "
                f"data_sources.{self.options.source}.rate_limit (if the source allows it) or poll fewer symbols"
            )
        return note

    # The loop.

    def run(self, stop: threading.Event, duration: float | None = None) -> Summary:
        started = time.monotonic()
        logger.info("real time for %d symbol(s), %s bars, %s mode: %s", len(self.series), self.options.interval,
                    self.options.mode, self.pacing_note())  # fmt: skip
        self.restore()
        self.backfill()
        settle_garbage()
        if self.options.mode == STREAM:
            self._start_stream(stop)
        try:
            while not stop.is_set():
                self.heartbeat()
                if duration is not None and time.monotonic() - started >= duration:
                    break
                self.wake.clear()  # before reading the schedule: a poll finishing after this wakes the wait
                now = self.clock.time()
                if self.options.mode == STREAM:
                    self.store_provisional(now)
                self._poll_due(now)
                self.clock.wait_until(self._next_event(self.clock.time()), stop, self.wake)
        finally:
            stop.set()
            if self.stream_thread is not None:
                self.stream_thread.join(timeout=5)
            self.store_provisional(self.clock.time())  # what the ticks completed before the stop
            self.pool.shutdown(wait=True, cancel_futures=False)
            self.ticks_pool.shutdown(wait=True, cancel_futures=False)
            self.writer.close()
            gc.unfreeze()  # what settle_garbage froze is the collector's again
        return self.summary

    def _schedule(self, symbol: str, now: float) -> None:
        """The symbol's next poll: soon if a closed bar is still missing, else after its next bar's close.

        A bar still missing ``patience`` after its close (no trades, or a source that skipped it) is
        not asked for again and again: polls go back to the bar grid, and the next one asks for it too.
        """
        interval = self.options.interval
        series, step = self.series[symbol], bar_seconds(interval)
        after = series.last_final if series.last_final is not None else now - step
        if after >= now - patience(interval) and series.hours.closed_bars(interval, after, now):
            self.next_poll[symbol] = now + self.options.poll_seconds
            return
        end = next_bar_end(series.hours, interval, max(after, now - step))
        self.next_poll[symbol] = (end if end is not None else now + 3600) + self.options.poll_delay

    def _next_event(self, now: float) -> float:
        with self.guard:
            upcoming = [at for symbol, at in self.next_poll.items() if symbol not in self.polling]
        if self.options.mode == STREAM:
            upcoming.append(next_handover(now, self.options.interval))
        # Wake at least every second of the wall, to beat the heartbeat.
        return min([*upcoming, now + self.clock.speed])

    # Start: what the store holds, then everything since.

    def restore(self) -> None:
        """Each symbol's stored tail: its last final bar, the history the indicators need, provisional bars."""
        now = self.clock.now()
        for symbol, series in self.series.items():
            try:
                last = self.store.last_timestamp(symbol, self.options.interval, self.options.source)
                if last is None:
                    continue
                span = timedelta(seconds=bar_seconds(self.options.interval) * series.lookback * 4) + timedelta(days=4)
                start = max(last.to_pydatetime() - span, now - timedelta(days=60))
                stored = self.store.read_bars(symbol, self.options.interval, self.options.source, start=start)
                series.restore(stored)
            except StoreError as exc:
                self.summary.errors[symbol] = f"the store could not be read: {exc}"
                logger.warning("%s: the store could not be read, starting without its history: %s", symbol, exc)

    def backfill(self) -> None:
        """Poll every symbol from its last final bar, and store it all: the bars a restart or an outage missed."""
        wait([self._submit_poll(symbol, backfill=True) for symbol in self.series])
        self.writer.flush()

    # Polls.

    def _poll_due(self, now: float) -> None:
        """Start the polls whose time has come; a symbol still being polled is left to finish first."""
        with self.guard:
            due = [s for s, at in self.next_poll.items() if at <= now and s not in self.polling]
        for symbol in due:
            self._submit_poll(symbol)

    def _submit_poll(self, symbol: str, backfill: bool = False) -> Future[None]:
        with self.guard:
            self.polling.add(symbol)
        return self.pool.submit(self._poll, symbol, backfill)

    def _poll(self, symbol: str, backfill: bool) -> None:
        """One symbol's poll, on a pool thread: fetch, process, queue the write, schedule the next poll."""
        try:
            self.ticks_first.wait()
            started = self.clock.time()
            collected = self._fetch(symbol, started, backfill)
            if collected is not None:
                self.ticks_first.wait()  # a minute's ticks that closed during the fetch come first too
                with self.locks[symbol]:
                    processed = self.series[symbol].final_bars(
                        collected, self.settings.quality, self.settings.indicators, self._moment(started)
                    )
                    if processed is not None:
                        self.writer.put(Pending(processed, started, provisional=False, timed=not backfill))
        except Exception as exc:  # a loop that runs for days logs a bug and goes on with the other symbols
            logger.exception("%s: the poll failed unexpectedly", symbol)
            with self.guard:
                self.summary.errors[symbol] = f"{type(exc).__name__}: {exc}"
        finally:
            with self.guard:
                self.polling.discard(symbol)
                self._schedule(symbol, self.clock.time())
            self.wake.set()

    @staticmethod
    def _moment(seconds: float) -> datetime:
        return datetime.fromtimestamp(seconds, UTC)

    def _fetch(self, symbol: str, started: float, backfill: bool) -> Collected | None:
        """The source's newest bars for the symbol, only those whose interval has ended; None when it failed."""
        series = self.series[symbol]
        now = self._moment(started)
        since = self._since(series, now)
        with self.guard:
            self.summary.polls += 1
        try:
            try:
                collected = self.source.poll(symbol, self.options.interval, since, now)
            except RangeNotServedError as exc:  # down for longer than the source reaches back
                reach = self.source.earliest_start(self.options.interval, now.date())
                if reach is None:
                    raise
                self._hole(series, since, str(exc))
                since = datetime.combine(reach + timedelta(days=1), datetime.min.time(), UTC)
                collected = self.source.poll(symbol, self.options.interval, since, now)
        except SourceError as exc:
            with self.guard:
                self.summary.poll_errors += 1
                self.summary.errors[symbol] = str(exc)
            logger.warning("%s: poll failed, trying again in %.0f s: %s", symbol, self.options.poll_seconds, exc)
            return None
        if series.hours.calendar is None:
            calendar = self._calendar(symbol, collected.instrument)
            if calendar is not None:
                series.hours.use(calendar)  # the tick bars share these hours
        # Our own clock too: a bar whose interval had not ended when the poll began is never final,
        # whatever was served; checked against the end of the poll instead, a bar that was forming
        # while the source answered and ended before the answer arrived would pass.
        bars = collected.bars
        if not bars.empty:
            ends = [series.hours.bar_end(self.options.interval, t.timestamp()) for t in bars["time"]]
            bars = bars.loc[np.asarray(ends) <= started].reset_index(drop=True)
        collected.bars = bars
        if backfill:
            self._report_holes(series, bars, since, now)
        return collected

    def _since(self, series: SymbolSeries, now: datetime) -> datetime:
        """The newest bars only: from the last final bar on (it comes back, and is dropped)."""
        if series.last_final is not None:
            return datetime.fromtimestamp(series.last_final, UTC)
        return datetime.combine(now.date() - timedelta(days=FIRST_DAYS), datetime.min.time(), UTC)

    def _report_holes(self, series: SymbolSeries, bars: pd.DataFrame, since: datetime, now: datetime) -> None:
        """Bars the backfill should have found between the last stored one and now but did not."""
        if series.last_final is None or series.hours.calendar is None:
            return
        # The newest bars may not be published yet: they are the next polls' to fetch, not a hole.
        settled = now.timestamp() - patience(self.options.interval)
        expected = series.hours.closed_bars(self.options.interval, series.last_final, settled)
        got = {t.timestamp() for t in bars["time"]} if not bars.empty else set()
        missing = [t for t in expected if t not in got]
        if missing:
            self._hole(series, since, f"{len(missing)} bar(s) not served", missing)

    def _hole(self, series: SymbolSeries, since: datetime, why: str, missing: list[float] | None = None) -> None:
        where = f"{stamp(missing[0])} .. {stamp(missing[-1])}" if missing else f"from {since:%Y-%m-%d %H:%M} UTC"
        text = f"{series.symbol}: a hole in the stored {self.options.interval} bars {where}: {why}"
        with self.guard:
            self.summary.holes.append(text)
        logger.warning("%s; fill what the source still serves with `marketpipe run --interval %s --start ...`",
                       text, self.options.interval)  # fmt: skip

    # The streamer.

    def _start_stream(self, stop: threading.Event) -> None:
        from tasks.sources.yahoo_stream import StreamClient  # noqa: PLC0415 (websockets only when streaming)

        if not self.options.stream_url:
            raise ValueError("stream mode needs the streamer's URL")
        tuning = self.settings.realtime
        client = StreamClient(
            self.options.stream_url,
            list(self.series),
            resubscribe_seconds=tuning.resubscribe_seconds,
            silence_seconds=tuning.silence_seconds,
        )
        self.stream_stats = client.stats

        def on_tick(tick: Any) -> None:
            if tick.symbol in self.series:
                self.tick_bars.add(tick.symbol, tick.time, tick.price, tick.day_volume)

        self.stream_thread = threading.Thread(
            target=client.run, args=(on_tick, stop), name="marketpipe-stream", daemon=True
        )
        self.stream_thread.start()

    def store_provisional(self, now: float) -> None:
        """Hand the minutes the ticks completed to the ticks' thread, which stores them marked provisional
        until their polled bars come."""
        closed = self.tick_bars.closed(now - STREAM_GRACE)
        if not closed:
            return
        by_symbol: dict[str, list[TickBar]] = {}
        for symbol, bar in closed:
            by_symbol.setdefault(symbol, []).append(bar)
        self.ticks_first.begin()
        try:
            self.ticks_pool.submit(self._provisional, by_symbol, now)
        except RuntimeError:  # the pool is shut down: nothing to wait for
            self.ticks_first.end()
            raise

    def _provisional(self, by_symbol: dict[str, list[TickBar]], seen: float) -> None:
        quality, indicators = self.settings.quality, self.settings.indicators
        moment = self.clock.now()
        try:
            with collecting_later():
                for symbol, built in by_symbol.items():
                    try:
                        with self.locks[symbol]:
                            processed = self.series[symbol].provisional_bars(built, quality, indicators, moment)
                            if processed is not None:
                                self.writer.put(Pending(processed, seen, provisional=True))
                    except Exception as exc:
                        logger.exception("%s: the streamed bars could not be processed", symbol)
                        with self.guard:
                            self.summary.errors[symbol] = f"{type(exc).__name__}: {exc}"
        finally:
            self.ticks_first.end()

    # Writes.

    def _write(self, batch: list[Pending]) -> None:
        """One write of whatever was queued; ``timed`` bars count in the latency figures (a backfill's do not)."""
        bars = [p.processed.bars for p in batch if not p.processed.bars.empty]
        if not bars:
            return
        frame = pd.concat(bars, ignore_index=True)
        quarantined = [quarantine_rows(p.processed.quarantined) for p in batch if not p.processed.quarantined.empty]
        symbols = {str(p.processed.bars["symbol"].iloc[0]) for p in batch if not p.processed.bars.empty}
        try:
            written = self.spool.write(self.store, BARS.name, frame)
            if quarantined:
                self.spool.write(self.store, QUARANTINE.name, pd.concat(quarantined, ignore_index=True))
        except StoreError as exc:
            logger.error("the bars of %d symbol(s) were neither stored nor spooled: %s", len(symbols), exc)
            with self.guard:
                self.summary.errors |= dict.fromkeys(symbols, str(exc))
            return
        acknowledged = self.clock.time()
        stored = []
        for pending in batch:
            if not pending.timed:
                continue
            written_bars = pending.processed.bars
            starts = start_seconds(written_bars)
            for symbol, start in zip(written_bars["symbol"].astype(str), starts, strict=True):
                close = self.series[symbol].hours.bar_end(self.options.interval, start)
                stored.append(Stored(symbol, start, close, pending.seen, acknowledged, pending.provisional))
        with self.guard:
            self.summary.spooled += written.spooled
            self.summary.latencies.extend(stored)
            self.summary.provisional += sum(len(p.processed.bars) for p in batch if p.provisional)
            self.summary.final += sum(len(p.processed.bars) for p in batch if not p.provisional)


class TicksFirst:
    """Polls wait while a minute's ticks are processed: parsing and processing hold the GIL, and a
    round of polls doing both at once left the provisional bars a tenth of it, seconds late. The
    polled bars only reconcile the provisional ones, so they can wait that second."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._pending = 0

    def begin(self) -> None:
        with self._changed:
            self._pending += 1

    def end(self) -> None:
        with self._changed:
            self._pending -= 1
            self._changed.notify_all()

    def wait(self) -> None:
        with self._changed:
            self._changed.wait_for(lambda: self._pending == 0)


@dataclass(frozen=True)
class Pending:
    """Processed bars waiting for the writer, and what their latency counts from."""

    processed: Processed
    seen: float
    provisional: bool
    timed: bool = True


class Writer:
    """One thread writes what the loop's threads queue, in the order queued, each write taking all that waits.

    A write costs a round trip or two whatever its size, so the bars that finish while one is under
    way share the next; no bar waits for a timer or for bars still being processed.
    """

    def __init__(self, write: Callable[[list[Pending]], None]) -> None:
        self._write = write
        self._queue: queue.SimpleQueue[Pending | threading.Event | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="marketpipe-writer", daemon=True)
        self._starting = threading.Lock()

    def put(self, pending: Pending) -> None:
        self._start()
        self._queue.put(pending)

    def flush(self) -> None:
        """Return once everything queued before this call is written."""
        self._start()
        done = threading.Event()
        self._queue.put(done)
        done.wait()

    def close(self) -> None:
        """Write what is queued, then stop the thread."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def _start(self) -> None:
        """On first use: a loop built only to be asked something (its pacing note) starts no thread."""
        with self._starting:
            if self._thread.ident is None:
                self._thread.start()

    def _run(self) -> None:
        closing = False
        while not closing:
            batch = [self._queue.get()]
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            pending = [item for item in batch if isinstance(item, Pending)]
            if pending:
                try:
                    self._write(pending)
                except Exception:  # the store's own errors are handled inside: this is a bug, logged
                    logger.exception("a write of %d symbol(s)' bars failed unexpectedly", len(pending))
            for item in batch:
                if isinstance(item, threading.Event):
                    item.set()
            closing = any(item is None for item in batch)


def next_handover(now: float, interval: str) -> float:
    """When the ticks' next bars are due: the first bar close, plus STREAM_GRACE, still ahead.

    A wake between a close and its grace (a poll finished) hands over only the bars a later tick
    closed; the rest are due at this close's grace, not the next bar's.
    """
    step = bar_seconds(interval)
    return ((now - STREAM_GRACE) // step + 1) * step + STREAM_GRACE


def settle_garbage() -> None:
    """Collect once, then freeze what survives (modules, settings, the restored history): the
    collector's full passes over them took 150 ms in the middle of a minute's ticks."""
    gc.collect()
    gc.freeze()


@contextmanager
def collecting_later() -> Iterator[None]:
    """No garbage collection while a minute's ticks become bars: the bars wait for nothing, and the
    collector runs once they are queued. Pandas allocates enough to trigger a pass every bar or so."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def patience(interval: str) -> float:
    """How long after its close a bar may still be published: until then, missing is not a hole."""
    return max(3.0 * bar_seconds(interval), 30.0)


def next_bar_end(hours: TradingHours, interval: str, after: float) -> float | None:
    """When the first bar starting after ``after`` closes (None: no trading within a week)."""
    step = bar_seconds(interval)
    for segment in hours.segments(after, after + 8 * 86_400):
        grid = segment.open if hours.calendar is not None else (segment.open // step) * step
        start = grid if after < grid else grid + (math.floor((after - grid) / step) + 1) * step
        if start < segment.close:
            return min(start + step, segment.close)
    return None
