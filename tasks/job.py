"""What one run does for each of its symbols, resolved once per run instead of once per task.

A run's tasks share the same settings, store, source, pace, retention and indicator lookback.
Built per task (a store block, a credentials block, a pacer, a query of the store's retention),
they cost more than the work itself over thousands of symbols, so the flow builds one :class:`Job`
and hands it to every task.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from typing import Any, cast

from prefect import get_run_logger
from prefect.tasks import TaskRunNameCallbackWithParameters

from blocks.credentials import SourceCredentials
from blocks.store import BarStore, StoreUnavailableError
from blocks.stores import store_from_settings
from configs.settings import Settings, SourceSettings, StorageSettings
from tasks.processing.indicators import lookback_bars
from tasks.retention import Retention, retention_of
from tasks.shards import Shard
from tasks.sources.base import Source, load_source, pacer_for

# Seconds a run waits out a store that stops answering reads: a restarted server or a rescheduled
# pod is back within them, and a store that is really down fails the run's symbols this late at most.
STORE_PATIENCE = 15.0


class StoreOutage:
    """One run's patience with a store that stops answering its reads, shared by the run's threads.

    A read that finds the store unavailable is tried again until the store has been unavailable for
    ``patience`` seconds, counted from the first such read of any thread. A restart of a few seconds
    then fails no symbol, and a store that stays down fails the rest at once, not each after a wait.
    """

    def __init__(self, patience: float = STORE_PATIENCE) -> None:
        self.patience = patience
        self._guard = threading.Lock()
        self._since: float | None = None  # when reads began to find the store unavailable

    def read[T](self, read: Callable[[], T]) -> T:
        while True:
            try:
                result = read()
            except StoreUnavailableError:
                now = time.monotonic()
                with self._guard:
                    self._since = now if self._since is None else self._since
                    left = self._since + self.patience - now
                if left <= 0:
                    raise
                time.sleep(min(0.5, left))
                continue
            with self._guard:
                self._since = None
            return result


@dataclass(frozen=True, repr=False)
class Job:
    """One run's shared state: what to collect, from where, and where it goes."""

    settings: Settings
    source: str
    interval: str
    start: date | None  # None: each symbol resumes after its last stored bar
    end: date | None
    store: BarStore
    provider: Source  # paced, with its credentials resolved
    retention: Retention | None  # how far back the store keeps bars; None: forever
    lookback: int | None  # stored bars the indicators need before the first new one; None: all
    outage: StoreOutage = field(default_factory=StoreOutage)

    @staticmethod
    def build(
        settings: Settings,
        source: str,
        interval: str,
        start: date | None,
        end: date | None,
        shard: Shard | None = None,
    ) -> Job:
        """The run's job; a shard's paces at its share of the source's limits (see tasks/shards.py)."""
        source_settings = resolve_credentials(settings.source(source))
        pacer = pacer_for(source, source_settings, settings.collection.rate_limit_dir, shard)
        store = store_for(settings.storage)
        return Job(
            settings,
            source,
            interval,
            start,
            end,
            store,
            load_source(source, source_settings, pacer),
            retention_of(settings.retention.duration, store),
            lookback_bars(settings.indicators, interval),
        )

    def __repr__(self) -> str:  # shown wherever a task's parameters are; never the settings' secrets
        return f"Job({self.source} {self.interval}, {self.start or 'incremental'} to {self.end or 'today'})"


def resolve_credentials(settings: SourceSettings) -> SourceSettings:
    """Fill ``api_key`` from the named Prefect block when the environment did not set it."""
    if settings.api_key is not None or not settings.api_key_block:
        return settings
    block = cast(SourceCredentials, SourceCredentials.load(settings.api_key_block))
    return settings.model_copy(update={"api_key": block.api_key})


_stores: dict[str, BarStore] = {}
_stores_guard = threading.Lock()


def store_for(storage: StorageSettings) -> BarStore:
    """The process's store for these settings: one block, its connections kept, for every run and task."""
    secrets = (s.get_secret_value() for s in (storage.influxdb.token, storage.influxdb_v1.password) if s is not None)
    key = hashlib.sha256("\0".join([storage.model_dump_json(), *secrets]).encode()).hexdigest()
    with _stores_guard:
        if key not in _stores:
            _stores[key] = store_from_settings(storage)
        return _stores[key]


def batch_run_name(stage: str) -> TaskRunNameCallbackWithParameters:
    """A batch task run's name, from its first and last symbol: ``collect-AAPL..MSFT``."""

    def name(parameters: dict[str, Any]) -> str:
        batch = next(iter(v for k, v in parameters.items() if k != "job"))
        symbols = list(batch)
        return f"{stage}-{symbols[0]}..{symbols[-1]}" if len(symbols) > 1 else f"{stage}-{symbols[0]}"

    return cast(TaskRunNameCallbackWithParameters, name)


def each_alone[In, Out](
    items: dict[str, In], step: Callable[[In, Job, str], Out], job: Job
) -> dict[str, Out | Exception]:
    """``step`` for each symbol of a batch in turn; what one symbol's step raises is its result, failing it alone."""
    done: dict[str, Out | Exception] = {}
    for symbol, item in items.items():
        try:
            done[symbol] = step(item, job, symbol)
        except Exception as exc:  # one symbol's failure, never the batch's
            done[symbol] = failed(symbol, exc)
    return done


def failed(symbol: str, error: Exception) -> Exception:
    """A symbol's error inside a batch task, logged as its own task would have been, and kept as its result."""
    get_run_logger().error("%s failed: %s", symbol, error)
    return error
