"""The process step as Prefect tasks: each symbol's collected bars through :func:`process`, logged."""

from __future__ import annotations

import logging
import os
import threading

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks import process_pool
from tasks.job import Job, batch_run_name, each_alone
from tasks.monitoring.metrics import operation
from tasks.processing.pipeline import Processed, process
from tasks.sources.base import Collected

# Processing holds the GIL for most of its time, so a flow's 16 worker threads processing at once
# gain nothing on a few cores and keep the threads that send paced requests waiting to run: their
# sends then go out late. At most one processing task per core runs at a time.
_cpu_slots = threading.BoundedSemaphore(os.cpu_count() or 1)


@task(name="process", task_run_name="process-{job.source}-{symbol}", cache_policy=NO_CACHE, persist_result=False)
def process_bars(collected: Collected, job: Job, symbol: str) -> Processed:
    return process_logged(collected, job, symbol)


@task(name="process-batch", task_run_name=batch_run_name("process"), cache_policy=NO_CACHE, persist_result=False)
def process_batch(collected: dict[str, Collected], job: Job) -> dict[str, Processed | Exception]:
    """Each symbol's bars in turn, for ``collection.batch_size``; an error fails only its symbol."""
    return each_alone(collected, process_logged, job)


def process_logged(collected: Collected, job: Job, symbol: str) -> Processed:
    """One symbol's collected bars through :func:`process`, with the stored history collect brought along."""
    quality = job.settings.quality
    args = (collected, symbol, job.interval, quality, job.settings.indicators, collected.history)
    with operation("process") as cost:  # waiting for a core counts: it is part of what the stage takes
        if process_pool.running():
            processed = process_pool.run(process, *args, stored_from=collected.stored_from)
        else:
            with _cpu_slots:
                processed = process(*args, stored_from=collected.stored_from)
    processed.operation = cost
    logger = get_run_logger()
    for kind, counts in processed.counts.items():
        if counts:
            level = logging.INFO if kind in ("repaired", "flagged") else logging.WARNING
            why = f" (quality.missing: {quality.missing})" if kind == "dropped" else ""
            logger.log(level, "%s: %s %s%s", symbol, kind, describe_counts(counts), why)
    if processed.gaps is not None and processed.gaps.count:
        logger.warning("%s: %s", symbol, processed.gaps.describe())
    if processed.coverage is not None and processed.coverage.short:
        logger.warning("%s: %s", symbol, processed.coverage.describe())
    return processed


def describe_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{name}={count}" for name, count in counts.items())
