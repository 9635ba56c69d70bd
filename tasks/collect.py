"""Collect: one symbol's bars from one source, incrementally unless a range is given."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any, cast

import pandas as pd
from prefect import Task, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State, TaskRun

from blocks.credentials import SourceCredentials
from blocks.store import BarStore
from blocks.stores import store_from_settings
from configs.settings import CollectionSettings, Settings, SourceSettings
from tasks.errors import TransientSourceError
from tasks.restatement import restatement_reason
from tasks.retention import clamp, retention_of
from tasks.sources.base import BarQuery, Collected, HttpSource, Source, Window, load_source, pacer_for


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


def check_source(settings: Settings, source: str) -> None:
    """Fail a run once, before any symbol: the source's settings, and the directory its pace and
    daily quota are kept in (created if missing, and only this user may write it)."""
    source_settings = settings.source(source)
    provider = load_source(source, source_settings)
    provider.check_config()
    if isinstance(provider, HttpSource):
        pacer_for(source, source_settings, settings.collection.rate_limit_dir).check()


def resolve_credentials(settings: SourceSettings) -> SourceSettings:
    """Fill ``api_key`` from the named Prefect block when the environment did not set it."""
    if settings.api_key is not None or not settings.api_key_block:
        return settings
    block = cast(SourceCredentials, SourceCredentials.load(settings.api_key_block))
    return settings.model_copy(update={"api_key": block.api_key})


def collect(
    settings: Settings,
    source: str,
    symbol: str,
    interval: str,
    start: date | None = None,
    end: date | None = None,
    store: BarStore | None = None,
) -> Collected:
    """Fetch and parse; raises a SourceError (permanent, transient or quota) naming what went wrong.

    An incremental run that finds the source has restated the past (a new split or dividend, or
    changed overlap bars) re-collects the whole stored series, so the run can rewrite it whole.
    Every planned window, ``--start`` included, begins no earlier than the store keeps bars (see
    :mod:`tasks.retention`): older ones would only be dropped. A restatement rewrites what is
    stored as it is; points the store has since aged out are dropped by it and counted.
    """
    source_settings = resolve_credentials(settings.source(source))
    pacer = pacer_for(source, source_settings, settings.collection.rate_limit_dir)
    provider = load_source(source, source_settings, pacer)
    store = store or store_from_settings(settings.storage)
    last_stored = store.last_timestamp(symbol, interval, source) if start is None else None
    now = datetime.now(UTC)
    today = now.date()
    window = _servable(plan_window(last_stored, start, end, settings.collection, today), provider, interval, today)
    clamped = ""
    retention = retention_of(settings.retention.duration, store)
    if retention is not None:
        window, clamped = clamp(window, retention, now)
    collected = provider.collect(BarQuery(symbol, interval, window.start, window.end))
    collected.window = window
    if last_stored is not None:
        collected = _restated_if_needed(collected, store, provider, symbol, interval, today)
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
    store: BarStore,
    provider: Source,
    symbol: str,
    interval: str,
    today: date,
) -> Collected:
    first_stored = store.first_timestamp(symbol, interval, provider.name)
    if first_stored is None or collected.window is None:
        return collected
    overlap = store.read_bars(symbol, interval, provider.name, start=pd.Timestamp(collected.window.start, tz="UTC"))
    currency = collected.meta.get("currency")
    reason = restatement_reason(
        collected.bars,
        collected.actions,
        currency if isinstance(currency, str) else None,
        overlap,
        store.read_corporate_actions(symbol, provider.name),
        first_stored,
    )
    if reason is None:
        return collected
    window = _servable(Window(first_stored.date(), collected.window.end, "restated"), provider, interval, today)
    again = provider.collect(BarQuery(symbol, interval, window.start, window.end))
    again.window, again.restated, again.requests = window, reason, again.requests + collected.requests
    return again


def transient_only(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Retry a collect task only when another try could succeed: not for an unknown symbol or a spent quota."""
    return isinstance(state.result(raise_on_failure=False), TransientSourceError)


@task(
    name="collect",
    task_run_name="collect-{source}-{symbol}-{interval}",
    cache_policy=NO_CACHE,
    persist_result=False,
    retry_condition_fn=transient_only,
)
def collect_bars(
    settings: Settings, source: str, symbol: str, interval: str, start: date | None, end: date | None
) -> Collected:
    collected = collect(settings, source, symbol, interval, start, end)
    if collected.clamped:
        get_run_logger().info("%s: %s", symbol, collected.clamped)
    if collected.restated and collected.window is not None:
        get_run_logger().warning("%s: %s; re-collected from %s", symbol, collected.restated, collected.window.start)
    return collected
