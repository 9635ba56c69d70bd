"""Collect: one symbol's bars from one source, incrementally unless a range is given."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pandas as pd
from prefect import Task, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State, TaskRun

from blocks.store import BarStore, StoreError, StoreUnavailableError
from configs.settings import CollectionSettings, Settings
from tasks.bars import empty_bars, intraday_length, is_daily_or_longer
from tasks.errors import HistoryUnavailableError, MarketpipeError, TransientSourceError
from tasks.job import Job, batch_run_name, failed
from tasks.monitoring.metrics import operation
from tasks.restatement import restatement_reason
from tasks.retention import clamp
from tasks.shards import Shard
from tasks.sources.base import (
    BarQuery,
    Collected,
    HttpSource,
    Source,
    Window,
    check_sources,
    load_source,
    pacer_for,
)


def plan_window(
    last_stored: pd.Timestamp | None,
    start: date | None,
    end: date | None,
    collection: CollectionSettings,
    today: date,
) -> Window:
    """``--start`` means an explicit backfill; otherwise resume from the last stored bar minus the overlap.

    Every window says where the stored history should start (``history_from``): an incremental run
    still expects `collection.default_history_days` behind its end, so a hole a first run left stays
    reported until it is backfilled.
    """
    last = end or today
    if start is not None:
        return Window(start, last, "explicit")
    history = last - timedelta(days=collection.default_history_days)
    if last_stored is None:
        return Window(history, last, "initial")
    resume = (last_stored - pd.Timedelta(days=collection.overlap_days)).date()
    return Window(min(resume, last), last, "incremental", history_from=history)


def check_source(settings: Settings, source: str, shard: Shard | None = None) -> None:
    """Fail a run once, before any symbol: the source's settings, and the directory its pace and
    daily quota are kept in (created if missing, and only this user may write it); for a shard,
    also that each limit splits into its share."""
    check_sources(settings)
    source_settings = settings.source(source)
    provider = load_source(source, source_settings)
    provider.check_config()
    if isinstance(provider, HttpSource):
        pacer_for(source, source_settings, settings.collection.rate_limit_dir, shard).check()


def collect(job: Job, symbol: str) -> Collected:
    """Fetch and parse, with the stored bars processing needs; raises a SourceError (permanent,
    transient or quota) or :class:`HistoryUnavailableError` naming what went wrong.

    The store is read here, once, and what processing needs travels on with the bars: the last
    ``job.lookback`` stored bars before the new ones and where the stored series starts. A store
    that can't be read fails the symbol before anything is fetched, or before its bars go on: the
    next run collects them again (intraday bars only while the source still serves them).

    An incremental run that finds the source has restated the past (a new split or dividend, or
    changed overlap bars) re-collects the whole stored series, so the run can rewrite it whole.
    Every planned window, ``--start`` included, begins no earlier than the store keeps bars (see
    :mod:`tasks.retention`): older ones would only be dropped. A restatement rewrites what is
    stored as it is; points the store has since aged out are dropped by it and counted.
    """
    settings, store, provider, interval = job.settings, job.store, job.provider, job.interval
    now = datetime.now(UTC)
    today = now.date()
    try:  # before anything is fetched: a store that can't answer costs no request (nor quota)
        first_stored = job.outage.read(lambda: store.first_timestamp(symbol, interval, job.source))
        last_stored = None
        if job.start is None and first_stored is not None:
            last_stored = job.outage.read(lambda: store.last_timestamp(symbol, interval, job.source))
    except StoreUnavailableError as exc:
        raise HistoryUnavailableError(symbol, exc, fetched=False) from None
    window = _servable(
        plan_window(last_stored, job.start, job.end, settings.collection, today), provider, interval, today
    )
    clamped = ""
    if job.retention is not None:
        window, clamped = clamp(window, job.retention, now)
    collected = provider.collect(BarQuery(symbol, interval, window.start, window.end))
    collected.window = window
    try:
        stored = job.outage.read(
            lambda: stored_before(
                store, collected, symbol, interval, job.source, job.lookback, first_stored, last_stored is not None
            )
        )
        if stored.first is not None and last_stored is not None:
            actions = job.outage.read(lambda: store.read_corporate_actions(symbol, provider.name))
            collected = _restated_if_needed(collected, stored, actions, provider, symbol, interval, today)
    except StoreUnavailableError as exc:
        raise HistoryUnavailableError(symbol, exc, fetched=True) from None
    if not collected.restated:
        collected.history = stored.bars
    collected.stored_from = stored.first
    collected.clamped = clamped
    return collected


def _servable(window: Window, provider: Source, interval: str, today: date) -> Window:
    """A planned window no earlier than the source still serves (an explicit backfill is refused there instead)."""
    earliest = provider.earliest_start(interval, today)
    if window.mode != "explicit" and earliest is not None:
        return window.not_before(earliest)
    return window


def _restated_if_needed(
    collected: Collected,
    stored: StoredHistory,
    stored_actions: pd.DataFrame,
    provider: Source,
    symbol: str,
    interval: str,
    today: date,
) -> Collected:
    if stored.first is None or collected.window is None:
        return collected
    reason = restatement_reason(
        collected.bars,
        collected.actions,
        collected.instrument.currency,
        stored.overlap if stored.overlap is not None else empty_bars(),
        stored_actions,
        stored.first,
    )
    if reason is None:
        return collected
    window = _servable(Window(stored.first.date(), collected.window.end, "restated"), provider, interval, today)
    again = provider.collect(BarQuery(symbol, interval, window.start, window.end))
    again.window, again.restated, again.requests = window, reason, again.requests + collected.requests
    return again


@dataclass(frozen=True)
class StoredHistory:
    bars: pd.DataFrame | None  # the last stored bars before the first collected one
    first: pd.Timestamp | None  # the series' first stored bar
    overlap: pd.DataFrame | None = None  # stored bars from the window's start on, when asked for


def read_stored(
    store: BarStore, collected: Collected, symbol: str, interval: str, source: str, bars: int | None
) -> StoredHistory:
    """The last ``bars`` stored bars before the first collected one (None: all), and where the stored
    series starts."""
    first = None if collected.bars.empty else store.first_timestamp(symbol, interval, source)
    return stored_before(store, collected, symbol, interval, source, bars, first)


def stored_before(
    store: BarStore,
    collected: Collected,
    symbol: str,
    interval: str,
    source: str,
    bars: int | None,
    first: pd.Timestamp | None,
    overlap: bool = False,
) -> StoredHistory:
    """:func:`read_stored` for a series known to start at ``first``; with ``overlap``, also the stored
    bars from the window's start on, which a restatement check compares, in the same read.

    Reads only a window that should hold ``bars`` bars, widened until it does or reaches the
    series' start, so a run never reads years of history for a lookback of a few hundred bars.
    ``bars=None`` reads the whole stored series before the new bars.
    """
    window = collected.window
    if not collected.bars.empty:
        first_new = pd.Timestamp(collected.bars["time"].min())
    elif overlap and window is not None:  # no new bar, but new corporate actions may restate the stored ones
        first_new = pd.Timestamp(window.start, tz="UTC")
    else:
        return StoredHistory(None, None)
    if first is None:
        return StoredHistory(None, None)
    if first >= first_new and not overlap:
        return StoredHistory(None, None)
    window_start = first_new
    if overlap and window is not None:
        window_start = min(first_new, pd.Timestamp(window.start, tz="UTC"))
    span = _span_holding(bars, interval) if bars is not None else first_new - first  # None: from the start
    while True:
        start = max(first, min(window_start, first_new - span))
        end = None if overlap else first_new.to_pydatetime()
        rows = store.read_bars(symbol, interval, source, start=start.to_pydatetime(), end=end)
        before = rows.loc[rows["time"] < first_new] if overlap else rows
        if start <= first or len(before) >= (bars or 0):
            history = (before.tail(bars) if bars is not None else before) if not before.empty else None
            stored_overlap = rows.loc[rows["time"] >= window_start].reset_index(drop=True) if overlap else None
            return StoredHistory(history, first, stored_overlap)
        span *= 4


def _span_holding(bars: int, interval: str) -> pd.Timedelta:
    """A stretch of calendar time likely to hold ``bars`` bars: trading days are about 5/7 of all
    days less holidays, and an intraday session a fraction of its day."""
    if is_daily_or_longer(interval):
        length = {"1wk": 7, "5d": 7, "1mo": 31, "3mo": 92}.get(interval, 1)
        return pd.Timedelta(days=int(bars * length * 1.6) + 10)
    return intraday_length(interval) * bars * 8 + pd.Timedelta(days=4)


def transient_only(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Retry a collect task only when another try could succeed: not for an unknown symbol or a spent quota."""
    return isinstance(state.result(raise_on_failure=False), TransientSourceError)


@task(
    name="collect",
    task_run_name="collect-{job.source}-{symbol}-{job.interval}",
    cache_policy=NO_CACHE,
    persist_result=False,
    retry_condition_fn=transient_only,
)
def collect_bars(job: Job, symbol: str) -> Collected:
    return collect_logged(job, symbol)


@task(name="collect-batch", task_run_name=batch_run_name("collect"), cache_policy=NO_CACHE, persist_result=False)
def collect_batch(job: Job, symbols: list[str]) -> dict[str, Collected | Exception]:
    """Each symbol's collect in turn, for ``collection.batch_size``: a symbol's error is its result,
    so it fails that symbol alone; a transient one is tried ``collection.task_retries`` more times."""
    return {symbol: _collect_alone(job, symbol) for symbol in symbols}


def collect_logged(job: Job, symbol: str) -> Collected:
    with operation("collect") as cost:
        collected = collect(job, symbol)
    collected.operation = cost
    if collected.clamped:
        get_run_logger().info("%s: %s", symbol, collected.clamped)
    if collected.restated and collected.window is not None:
        get_run_logger().warning("%s: %s; re-collected from %s", symbol, collected.restated, collected.window.start)
    return collected


def _collect_alone(job: Job, symbol: str) -> Collected | Exception:
    policy = job.settings.collection
    for attempt in range(policy.task_retries + 1):
        try:
            return collect_logged(job, symbol)
        except TransientSourceError as exc:
            if attempt == policy.task_retries:
                return failed(symbol, exc)
            get_run_logger().warning("%s: %s; collecting it again in %gs", symbol, exc, policy.task_retry_delay)
            time.sleep(policy.task_retry_delay)
        except (MarketpipeError, StoreError) as exc:
            return failed(symbol, exc)
    raise AssertionError("unreachable: the last attempt returns")  # pragma: no cover
