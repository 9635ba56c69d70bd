"""`market-data-sharded`: one run's symbols split into N shards, each its own flow run on the work pool.

On Kubernetes each shard's flow run is one Job made from the work pool's job template, so a run
scales past one machine. A shard is the `market-data` flow (deployment `market-data/market-data-shard`)
with ``shard=K-of-N``: it paces at 1/N of the source's limits in pacing state of its own (see
tasks/shards.py), so the shards together keep the configured pace without sharing a file across
nodes, and its collect tasks still take slots of the Prefect concurrency limit on `collect:<source>`,
which bounds them across every worker. The parent starts the shards at once and waits for them, runs
again only the shards whose flow run did not complete (with only the symbols their summary did not
report done, or all of theirs when they ended without one, as a killed pod does), and publishes one
summary over all symbols. Writes are idempotent, so a symbol collected twice is still stored once.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, fields
from datetime import date
from typing import Any, cast
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
from prefect.client.schemas.objects import FlowRun
from prefect.client.schemas.sorting import ArtifactSort
from prefect.deployments import run_deployment

from blocks.stores import check_concurrent_writes
from configs.settings import load_settings
from flows.market_data import FAILED, SPOOLED, SUMMARY_KEY, SymbolResult, SymbolsFailedError, publish_summary
from tasks.bars import validate_interval, validate_symbols
from tasks.collect import check_source
from tasks.errors import UsageError
from tasks.processing.pipeline import COUNTED
from tasks.shards import Shard, partition

SHARD_DEPLOYMENT = "market-data/market-data-shard"
RETRIED = (FAILED, SPOOLED)  # deferred symbols wait for the quota's reset, not for a retry


@dataclass(frozen=True)
class ShardRun:
    """One attempt of one shard: the flow run made for it and the symbols it was given."""

    shard: Shard
    symbols: list[str]
    flow_run_id: UUID
    name: str


@flow(name="market-data-sharded", log_prints=True)
def market_data_sharded(
    symbols: list[str] | None = None,
    shards: int = 4,
    source: str = "yahoo_finance",
    interval: str = "1d",
    start: date | None = None,
    end: date | None = None,
    config: str | None = None,
    shard_retries: int = 1,
    shard_deployment: str = SHARD_DEPLOYMENT,
    timeout: float = 6 * 3600,
    poll_interval: float = 5.0,
) -> list[dict[str, object]]:
    """Run the symbols as ``shards`` flow runs of ``shard_deployment``; one summary row per symbol.

    ``shard_retries`` is how many more times a shard whose flow run did not complete is run;
    ``timeout`` (seconds) bounds the whole wait, after which shards still running fail their symbols.
    """
    settings = load_settings(config)
    check_concurrent_writes(settings.storage, "the shards of a run write at once, from several pods")
    checked = validate_symbols(symbols or settings.symbols)
    validate_interval(interval)
    if start is not None and end is not None and start > end:
        raise UsageError(f"start {start} is after end {end}: swap them or widen the range")
    parts = partition(checked, shards)
    check_source(settings, source, Shard(1, len(parts)))  # every limit splits into N shares, before any Job
    logger = get_run_logger()
    logger.info("%d symbol(s) from %s in %d shard(s) of %s", len(checked), source, len(parts), shard_deployment)

    given: dict[str, Any] = {
        "source": source,
        "interval": interval,
        "start": start.isoformat() if start else None,
        "end": end.isoformat() if end else None,
        "config": config,
    }
    deadline = time.monotonic() + timeout
    rows: dict[str, SymbolResult] = {}
    to_run = {Shard(number, len(parts)): part for number, part in enumerate(parts, 1)}
    for attempt in range(shard_retries + 1):
        runs = [_launch(shard_deployment, shard, part, given, attempt) for shard, part in to_run.items()]
        with get_client(sync_client=True) as client:
            ended = _wait(client, runs, deadline, poll_interval)
            to_run = {}
            for run in runs:
                done = _summary(client, run.flow_run_id)
                rows.update(done)
                final = ended.get(run.flow_run_id)
                if final is not None and final.state is not None and final.state.is_completed():
                    continue
                why = _why(run, final, timeout)
                for symbol in run.symbols:
                    if symbol not in done:
                        rows[symbol] = SymbolResult(symbol, FAILED, error=why)
                unfinished = [s for s in run.symbols if rows[s].status in RETRIED]
                # Not run again: a shard past the deadline, or one somebody cancelled.
                if final is not None and final.state is not None and not final.state.is_cancelled() and unfinished:
                    to_run[run.shard] = unfinished
                logger.warning("%s; %d of its symbols unfinished", why, len(unfinished))
        if not to_run:
            break
        if attempt < shard_retries:
            logger.info("running shard(s) %s again", ", ".join(str(s) for s in to_run))

    results = [rows[symbol] for symbol in checked]
    publish_summary(results, source, interval)
    if any(r.status in RETRIED for r in results):
        raise SymbolsFailedError(results, settings.storage.spool_dir)
    return [r.row() for r in results]


def _launch(deployment: str, shard: Shard, symbols: list[str], given: dict[str, Any], attempt: int) -> ShardRun:
    """A flow run of the shard deployment for ``symbols``, linked to this run, not waited for."""
    name = f"market-data-{given['source']}-{given['interval']}-shard-{shard}"
    name += f"-retry-{attempt}" if attempt else ""
    created = cast(
        FlowRun,
        run_deployment(
            deployment,
            parameters={**given, "symbols": symbols, "shard": str(shard)},
            flow_run_name=name,
            timeout=0,  # return at once: the shards run side by side, and _wait watches them all
            as_subflow=True,
        ),
    )
    get_run_logger().info("shard %s: %d symbol(s) in flow run %s", shard, len(symbols), name)
    return ShardRun(shard, symbols, created.id, name)


def _wait(client: SyncPrefectClient, runs: list[ShardRun], deadline: float, poll: float) -> dict[UUID, FlowRun]:
    """The runs that reached a final state by ``deadline``, by flow run id."""
    ended: dict[UUID, FlowRun] = {}
    while True:
        for run in runs:
            if run.flow_run_id in ended:
                continue
            current = client.read_flow_run(run.flow_run_id)
            if current.state is not None and current.state.is_final():
                ended[run.flow_run_id] = current
                get_run_logger().info("shard %s (%s) ended %s", run.shard, run.name, current.state.name)
        if len(ended) == len(runs) or time.monotonic() >= deadline:
            return ended
        time.sleep(poll)


def _why(run: ShardRun, final: FlowRun | None, timeout: float) -> str:
    if final is None or final.state is None:
        return f"shard {run.shard} ({run.name}) had not finished after {timeout:g} s"
    message = f": {final.state.message}" if final.state.message else ""
    return f"shard {run.shard} ({run.name}) ended {final.state.name}{message}"


def _summary(client: SyncPrefectClient, flow_run_id: UUID) -> dict[str, SymbolResult]:
    """The rows of the summary a shard's flow run published (none if it ended before it could)."""
    artifacts = client.read_artifacts(
        artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[SUMMARY_KEY]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])
        ),
        sort=ArtifactSort.CREATED_DESC,
        limit=1,
    )
    if not artifacts:
        return {}
    data = artifacts[0].data
    table: list[dict[str, Any]] = json.loads(data) if isinstance(data, str) else cast(list[dict[str, Any]], data)
    return {result.symbol: result for result in map(result_from_row, table)}


def result_from_row(row: dict[str, Any]) -> SymbolResult:
    """A summary table row back as a SymbolResult.

    The table keeps counts as ``rule=n`` text and the spool's refused batches as a number: the
    shard's own summary names those batches, so here they are left out.
    """
    known = {f.name for f in fields(SymbolResult)}
    values = {key: value for key, value in row.items() if key in known}
    values["counts"] = {kind: parse_counts(str(row.get(kind) or "")) for kind in COUNTED}
    values["spool_rejected"] = []
    return SymbolResult(**values)


def parse_counts(text: str) -> dict[str, int]:
    """``spike=2, ohlc=1`` (as tasks.process.describe_counts writes it) -> {"spike": 2, "ohlc": 1}."""
    counts: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, count = item.rpartition("=")
        counts[name] = int(count)
    return counts
