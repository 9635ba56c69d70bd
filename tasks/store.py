"""Store: the task that writes one symbol's processed bars and corporate actions."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from blocks.stores import store_from_settings
from configs.settings import Settings
from tasks.processing import Processed


@task(name="store", task_run_name="store-{symbol}", cache_policy=NO_CACHE, persist_result=False)
def store_bars(processed: Processed, settings: Settings, symbol: str) -> tuple[int, int]:
    """Write bars, then corporate actions; returns how many of each were written."""
    store = store_from_settings(settings.storage)
    return store.write_bars(processed.bars), store.write_corporate_actions(processed.actions)
