"""Store: the configured backend block, and the task that writes one symbol's bars to it."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from blocks.duckdb_store import DuckDBStore
from blocks.store import BarStore
from configs.settings import ConfigError, Settings
from tasks.processing import Processed


def store_from_settings(settings: Settings) -> BarStore:
    """The block for ``storage.backend``, configured from its section of the settings."""
    storage = settings.storage
    if storage.backend == "duckdb":
        return DuckDBStore(path=storage.duckdb.path)
    raise ConfigError(f"storage.backend {storage.backend!r} is not available in this version: use duckdb")


@task(name="store", task_run_name="store-{symbol}", cache_policy=NO_CACHE, persist_result=False)
def store_bars(processed: Processed, settings: Settings, symbol: str) -> int:
    return store_from_settings(settings).write_bars(processed.bars)
