"""Collect: one symbol's bars from one source, as a Prefect task."""

from __future__ import annotations

from datetime import date

from prefect import task
from prefect.cache_policies import NO_CACHE

from configs.settings import Settings
from tasks.sources.base import BarQuery, Collected, load_source


def collect(settings: Settings, source: str, symbol: str, interval: str, start: date, end: date) -> Collected:
    """Fetch and parse; raises a SourceError (permanent or transient) naming what went wrong."""
    provider = load_source(source, settings.source(source))
    return provider.fetch(BarQuery(symbol=symbol, interval=interval, start=start, end=end))


@task(
    name="collect",
    task_run_name="collect-{source}-{symbol}-{interval}",
    cache_policy=NO_CACHE,
    persist_result=False,
    tags=["marketpipe", "collect"],
)
def collect_bars(settings: Settings, source: str, symbol: str, interval: str, start: date, end: date) -> Collected:
    return collect(settings, source, symbol, interval, start, end)
