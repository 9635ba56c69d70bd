"""Store: the task that writes one symbol's processed bars, corporate actions and quarantined bars."""

from __future__ import annotations

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from blocks.stores import store_from_settings
from configs.settings import Settings
from tasks.bars import BAR_COLUMNS
from tasks.processing import Processed
from tasks.validation import QUARANTINE_COLUMNS


@task(name="store", task_run_name="store-{symbol}", cache_policy=NO_CACHE, persist_result=False)
def store_bars(processed: Processed, settings: Settings, symbol: str) -> tuple[int, int, int]:
    """Write bars, corporate actions and quarantined bars; returns how many of each were written."""
    store = store_from_settings(settings.storage)
    quarantined = store.write_quarantine(quarantine_rows(processed.quarantined))
    return store.write_bars(processed.bars), store.write_corporate_actions(processed.actions), quarantined


def quarantine_rows(quarantined: pd.DataFrame) -> pd.DataFrame:
    """The bar's key and values, the rule and the reason: flags and indicators are not computed for them."""
    rows = quarantined[[*BAR_COLUMNS, *QUARANTINE_COLUMNS]]
    return rows.loc[rows["time"].notna()]  # a bar without a valid time has no key; the summary counts it
