"""Store: the tasks that write one symbol's results, and replay what earlier runs had to spool."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from blocks.spool import RejectedBatch, Replayed, ReplayStoppedError, Spool, Written
from blocks.store import BARS, CORPORATE_ACTIONS, PIPELINE_METRICS, QUARANTINE, StoreError, dropped_by_retention
from configs.settings import Settings
from tasks.bars import BAR_COLUMNS
from tasks.job import Job, batch_run_name, each_alone, store_for
from tasks.monitoring.metrics import Operation, operation
from tasks.processing.pipeline import Processed
from tasks.processing.validation import QUARANTINE_COLUMNS


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
    operation: Operation | None = None  # the store stage's time (a batch's, shared evenly by its symbols)

    def describe_refused(self) -> str:
        """Which writes the store refused and why, and what it took anyway."""
        refused = [
            f"the store refused the {kind.replace('_', ' ')}, not stored: {why}" for kind, why in self.refused.items()
        ]
        counts = (("bars", self.bars), ("quarantined bars", self.quarantined), ("corporate actions", self.actions))
        took = [f"{n} {what}" for what, n in counts if n]
        return "; ".join(refused) + (f"; written: {', '.join(took)}" if took else "")


def open_spool(settings: Settings) -> Spool:
    """The spool of ``storage.spool_dir``: writes the store could not take, replayed in order."""
    return Spool(settings.storage.spool_dir)


@task(name="store", task_run_name="store-{symbol}", cache_policy=NO_CACHE, persist_result=False)
def store_bars(processed: Processed, job: Job, symbol: str) -> Stored:
    return store_one(processed, job, symbol)


@task(name="store-batch", task_run_name=batch_run_name("store"), cache_policy=NO_CACHE, persist_result=False)
def store_batch(processed: dict[str, Processed], job: Job) -> dict[str, Stored | Exception]:
    """A batch's writes for ``collection.batch_size``: one write of each kind for all its symbols,
    since a write's transaction and round trip cost more than its rows. If the store refuses one,
    each symbol is written alone, so an error fails only its symbol (what the store and spool
    can't take is already in its Stored)."""
    with operation("store") as cost:
        together = store_together(processed, job)
    if together is None:
        return each_alone(processed, store_one, job)
    share = Operation("store", cost.seconds / max(1, len(together)))
    return {symbol: replace(s, operation=share) if isinstance(s, Stored) else s for symbol, s in together.items()}


def store_together(processed: dict[str, Processed], job: Job) -> dict[str, Stored | Exception] | None:
    """Each kind's rows of every symbol in one write, or None when each symbol must be written alone:
    the store refused a write, or its count is not the sum of the symbols' (it merged repeated keys,
    or dropped points older than its retention), so only each symbol's own write can say what it took."""
    rows = {symbol: writes_of(result) for symbol, result in processed.items()}
    spool = open_spool(job.settings)
    outcomes: dict[str, Written] = {}
    for kind in WRITE_ORDER:
        parts = [writes[kind] for writes in rows.values() if not writes[kind].empty]
        try:
            outcomes[kind] = (
                spool.write(job.store, kind, pd.concat(parts, ignore_index=True)) if parts else Written(0, 0)
            )
        except StoreError as exc:
            get_run_logger().warning(
                "the batch's %s were not written together (%s): each symbol is written alone", kind, exc
            )
            return None
        total = sum(len(part) for part in parts)
        if outcomes[kind].written + outcomes[kind].spooled != total or dropped_by_retention(outcomes[kind].written):
            return None
    stored: dict[str, Stored | Exception] = {}
    for index, (symbol, writes) in enumerate(rows.items()):
        share = {kind: _share(outcomes[kind], len(writes[kind])) for kind in WRITE_ORDER}
        stored[symbol] = Stored(
            share[BARS.name].written,
            share[CORPORATE_ACTIONS.name].written,
            share[QUARANTINE.name].written,
            spooled=sum(s.spooled for s in share.values()),
            # Earlier runs' spooled batches the replay set aside belong to no symbol: told once.
            rejected=[b for o in outcomes.values() for b in o.rejected] if index == 0 else [],
        )
    return stored


def _share(outcome: Written, rows: int) -> Written:
    """One symbol's part of a whole batch's write, which was either all written or all spooled."""
    return Written(rows, 0) if outcome.written else Written(0, rows if outcome.spooled else 0)


# Bars go first: their write replaces the collected range, quarantined copies included, and the
# quarantine write then takes this run's rejected bars out of bars. The spool replays in the same order.
WRITE_ORDER = (BARS.name, QUARANTINE.name, CORPORATE_ACTIONS.name)


def writes_of(processed: Processed) -> dict[str, pd.DataFrame]:
    """A symbol's rows for each kind of write, in WRITE_ORDER."""
    return {
        BARS.name: processed.bars,
        QUARANTINE.name: quarantine_rows(processed.quarantined),
        CORPORATE_ACTIONS.name: processed.actions,
    }


def store_one(processed: Processed, job: Job, symbol: str) -> Stored:
    """Write bars, then quarantined bars, then corporate actions (WRITE_ORDER); what the store can't
    take is spooled. Each write is attempted whatever became of the one before: actions the store
    refused to pair with bars would never be fetched again, since the next incremental run starts after them.
    """
    store, spool = job.store, open_spool(job.settings)
    writes = writes_of(processed)
    outcomes: dict[str, Written] = {}
    refused: dict[str, str] = {}
    with operation("store") as cost:
        for kind, rows in writes.items():
            try:
                outcomes[kind] = spool.write(store, kind, rows)
            except StoreError as exc:  # refused for good, or neither the store nor the spool took it
                get_run_logger().error("%s: %d %s rows not stored: %s", symbol, len(rows), kind, exc)
                refused[kind] = str(exc)
                outcomes[kind] = Written(0, 0)
    return Stored(
        outcomes[BARS.name].written,
        outcomes[CORPORATE_ACTIONS.name].written,
        outcomes[QUARANTINE.name].written,
        spooled=sum(o.spooled for o in outcomes.values()),
        rejected=[batch for o in outcomes.values() for batch in o.rejected],
        dropped_by_retention=sum(dropped_by_retention(o.written) for o in outcomes.values()),
        refused=refused,
        operation=cost,
    )


@task(name="record-metrics", cache_policy=NO_CACHE, persist_result=False)
def record_metrics(metrics: pd.DataFrame, settings: Settings) -> Written:
    """The run's per-symbol counts into `pipeline_metrics`, spooled like bars when the store is away."""
    return open_spool(settings).write(store_for(settings.storage), PIPELINE_METRICS.name, metrics)


@task(name="replay-spool", cache_policy=NO_CACHE, persist_result=False)
def replay_spool(settings: Settings) -> Replayed:
    """Write what earlier runs spooled before anything new; a store still down leaves it spooled.

    Batches the store refuses for good are set aside (see :meth:`Spool.replay`): the flow reports them.
    """
    spool = open_spool(settings)
    if not spool.pending():
        return Replayed(0, 0)
    try:
        replayed = spool.replay(store_for(settings.storage))
    except ReplayStoppedError as exc:
        get_run_logger().warning("%d spooled points stay in %s: %s", spool.points(), spool.directory, exc)
        replayed = exc.replayed
    except StoreError as exc:  # the spool itself can't be used: this run's writes say so if they need it
        get_run_logger().warning("the spool was not replayed: %s", exc)
        return Replayed(0, 0)
    else:
        get_run_logger().info("replayed %d spooled points from %s", replayed.points, spool.directory)
    return replayed


def quarantine_rows(quarantined: pd.DataFrame) -> pd.DataFrame:
    """The bar's key and values, the rule and the reason: flags and indicators are not computed for them."""
    if quarantined.empty:
        return quarantined
    rows = quarantined[[*BAR_COLUMNS, *QUARANTINE_COLUMNS]]
    return rows.loc[rows["time"].notna()]  # a bar without a valid time has no key; the summary counts it
