"""Store: the tasks that write one symbol's results, and replay what earlier runs had to spool."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from blocks.spool import RejectedBatch, Replayed, ReplayStoppedError, Spool, Written
from blocks.store import BarStore, StoreError, dropped_by_retention
from blocks.stores import store_from_settings
from configs.settings import Settings
from tasks.bars import BAR_COLUMNS, conform
from tasks.indicators import lookback_bars
from tasks.processing import Processed, process, read_history
from tasks.sources.base import Collected
from tasks.validation import QUARANTINE_COLUMNS

COLLECTED = "collected"  # raw bars whose history the store could not give; processed on replay


@dataclass(frozen=True)
class Stored:
    bars: int
    actions: int
    quarantined: int
    spooled: int  # points the store could not take, kept in the spool for replay
    rejected: list[RejectedBatch] = field(default_factory=list)  # earlier spooled batches the store refused
    # Points the store dropped as older than its retention: nothing it would keep was lost.
    dropped_by_retention: int = 0
    # What the store refused for good, by kind (bars, quarantine, corporate_actions), and why: lost.
    refused: dict[str, str] = field(default_factory=dict)

    def describe_refused(self) -> str:
        """Which writes the store refused and why, and what it took anyway."""
        refused = [
            f"the store refused the {kind.replace('_', ' ')}, not stored: {why}" for kind, why in self.refused.items()
        ]
        counts = (("bars", self.bars), ("quarantined bars", self.quarantined), ("corporate actions", self.actions))
        took = [f"{n} {what}" for what, n in counts if n]
        return "; ".join(refused) + (f"; written: {', '.join(took)}" if took else "")


def open_spool(settings: Settings) -> Spool:
    """The spool of ``storage.spool_dir``, able to replay collected bars that still need processing."""
    return Spool(settings.storage.spool_dir, handlers={COLLECTED: partial(_process_and_write, settings)})


@task(name="store", task_run_name="store-{symbol}", cache_policy=NO_CACHE, persist_result=False)
def store_bars(processed: Processed, settings: Settings, symbol: str) -> Stored:
    """Write bars, then quarantined bars, then corporate actions; what the store can't take is spooled.

    Bars go first: their write replaces the collected range, quarantined copies included, and the
    quarantine write then takes this run's rejected bars out of bars. The spool replays in the same order.
    Each write is attempted whatever became of the one before: actions the store refused to pair
    with bars would never be fetched again, since the next incremental run starts after them.
    """
    store = store_from_settings(settings.storage)
    spool = open_spool(settings)
    postponed = 0
    if processed.unprocessed is not None and not processed.unprocessed.bars.empty:
        raw = processed.unprocessed
        meta = {"symbol": symbol, "meta": raw.meta}
        postponed = spool.keep(COLLECTED, raw.bars, "the store could not give the history to process them", meta)
    writes = {
        "bars": processed.bars,
        "quarantine": quarantine_rows(processed.quarantined),
        "corporate_actions": processed.actions,
    }
    outcomes: dict[str, Written] = {}
    refused: dict[str, str] = {}
    for kind, rows in writes.items():
        try:
            outcomes[kind] = spool.write(store, kind, rows)
        except StoreError as exc:  # refused for good, or neither the store nor the spool took it
            get_run_logger().error("%s: %d %s rows not stored: %s", symbol, len(rows), kind, exc)
            refused[kind] = str(exc)
            outcomes[kind] = Written(0, 0)
    return Stored(
        outcomes["bars"].written,
        outcomes["corporate_actions"].written,
        outcomes["quarantine"].written,
        spooled=postponed + sum(o.spooled for o in outcomes.values()),
        rejected=[batch for o in outcomes.values() for batch in o.rejected],
        dropped_by_retention=sum(dropped_by_retention(o.written) for o in outcomes.values()),
        refused=refused,
    )


@task(name="record-metrics", cache_policy=NO_CACHE, persist_result=False)
def record_metrics(metrics: pd.DataFrame, settings: Settings) -> Written:
    """The run's per-symbol counts into `pipeline_metrics`, spooled like bars when the store is away."""
    return open_spool(settings).write(store_from_settings(settings.storage), "pipeline_metrics", metrics)


@task(name="replay-spool", cache_policy=NO_CACHE, persist_result=False)
def replay_spool(settings: Settings) -> Replayed:
    """Write what earlier runs spooled before anything new; a store still down leaves it spooled.

    Batches the store refuses for good are set aside (see :meth:`Spool.replay`): the flow reports them.
    """
    spool = open_spool(settings)
    if not spool.pending():
        return Replayed(0, 0)
    try:
        replayed = spool.replay(store_from_settings(settings.storage))
    except ReplayStoppedError as exc:
        get_run_logger().warning("%d spooled points stay in %s: %s", spool.points(), spool.directory, exc)
        replayed = exc.replayed
    except StoreError as exc:  # the spool itself can't be used: this run's writes say so if they need it
        get_run_logger().warning("the spool was not replayed: %s", exc)
        return Replayed(0, 0)
    else:
        get_run_logger().info("replayed %d spooled points from %s", replayed.points, spool.directory)
    return replayed


def _process_and_write(settings: Settings, store: BarStore, rows: pd.DataFrame, meta: dict[str, Any]) -> int:
    """Process spooled collected bars against the history now in the store, and write the result."""
    collected = Collected(conform(rows), meta=meta.get("meta", {}))
    symbol = meta["symbol"]
    interval, source = (str(collected.bars[c].iloc[0]) for c in ("interval", "source"))
    history = read_history(store, collected, symbol, interval, source, lookback_bars(settings.indicators))
    processed = process(collected, symbol, interval, settings.quality, settings.indicators, history)
    written = store.write_bars(processed.bars)  # bars first, as in store_bars
    store.write_quarantine(quarantine_rows(processed.quarantined))
    return written


def quarantine_rows(quarantined: pd.DataFrame) -> pd.DataFrame:
    """The bar's key and values, the rule and the reason: flags and indicators are not computed for them."""
    if quarantined.empty:
        return quarantined
    rows = quarantined[[*BAR_COLUMNS, *QUARANTINE_COLUMNS]]
    return rows.loc[rows["time"].notna()]  # a bar without a valid time has no key; the summary counts it
