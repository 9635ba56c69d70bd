"""The main batch flow: collect -> process -> store, fanned out per symbol.

Without ``start`` each symbol resumes from its last stored bar (minus an overlap); with it, the
range is an explicit backfill. One symbol's failure never stops the others. A symbol whose source
quota ran out is deferred, not failed: the next run picks it up. The run ends Failed when any
symbol failed, or when the store could not take a symbol's bars: those wait in the local spool
for `marketpipe replay` or the next run, which writes them before anything new. Spooled batches the
store refuses for good are set aside in the spool's `rejected/` and counted, never in the way. A
write the store refused for good fails its symbol, but its other writes (corporate actions,
quarantine) are still made. Points the store drops as older than its retention fail nothing: they
are counted. The per-symbol summary is published as a table artifact either way.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from contextvars import copy_context
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, date, datetime
from typing import Any

import httpx
import pandas as pd
from prefect import Task, flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.client.schemas.objects import State
from prefect.runtime import flow_run

from blocks.spool import REJECTED, SpoolDepth
from blocks.store import StoreError
from blocks.stores import check_concurrent_writes
from configs.settings import AlertRules, load_settings
from flows import progress
from tasks import process_pool
from tasks.bars import empty_actions, empty_bars, validate_interval, validate_symbols
from tasks.collect import check_source, collect_bars, collect_batch
from tasks.errors import QuotaExhaustedError, UsageError
from tasks.job import Job
from tasks.monitoring.alerts import SYMBOL_FAILED, SYMBOL_SPOOLED, Alert, send_alerts, symbol_resource
from tasks.monitoring.metrics import Operation, Traffic, operation_of
from tasks.process import describe_counts, process_bars, process_batch
from tasks.processing.pipeline import COUNTED, KindCounts, Processed
from tasks.shards import Shard
from tasks.sources.base import Collected
from tasks.store import Stored, open_spool, record_metrics, replay_spool, store_bars, store_batch

OK, FAILED, DEFERRED, SPOOLED = "ok", "failed", "deferred", "spooled"
SUMMARY_KEY = "market-data-summary"  # the table artifact every run publishes
_NO_BARS, _NO_ACTIONS = empty_bars(), empty_actions()


@dataclass
class SymbolResult:
    symbol: str
    status: str  # ok, failed, deferred, or spooled (kept locally until the store takes it)
    rows_written: int = 0
    spooled: int = 0
    dropped_by_retention: int = 0  # points the store dropped as older than its retention (it keeps none such)
    bars_collected: int = 0
    live_bars_skipped: int = 0
    actions_written: int = 0
    requests: int = 0
    counts: KindCounts = field(default_factory=dict)  # processing's, by kind (COUNTED) then rule or flag
    currency: str = ""
    missing_sessions: int | None = None  # None: no calendar known for the symbol, or bars longer than a day
    gaps: str = ""
    window: str = ""
    clamped: str = ""  # how the window was cut to the store's retention, if it was
    restated: str = ""  # why the stored series was re-collected and rewritten whole this run, if it was
    history_from: str = ""  # the series' first bar once stored, to read next to the window
    uncovered_sessions: int | None = None  # of missing_sessions, those before the first bar the window expected
    coverage: str = ""  # set when the series starts after its window's start: what is missing, what to do
    error: str = ""
    spool_rejected: list[str] = field(default_factory=list)  # the run's, on every row: batches the store refused
    # Each stage's cost (tasks/monitoring/metrics.py): a failed stage's too, as far as it went.
    collect_seconds: float = 0.0
    process_seconds: float = 0.0
    store_seconds: float = 0.0
    retries: int = 0
    rate_limited: int = 0  # answers saying we were too fast: HTTP 429, Alpha Vantage's `Note`
    bytes_received: int = 0
    bars_processed: int = 0  # the clean bars processing handed to the store

    def row(self) -> dict[str, Any]:
        """The summary row a run returns: each kind of count is a column of its own."""
        row = asdict(self)
        counts = row.pop("counts")
        return {**row, **{kind: counts.get(kind, {}) for kind in COUNTED}}


class SymbolsFailedError(Exception):
    """Some symbols failed or were spooled, or the run's metrics could not be kept; the others were
    stored. Carries the whole summary."""

    def __init__(self, results: list[SymbolResult], spool_dir: str = "", metrics_error: str = "") -> None:
        self.results = results
        self.metrics_error = metrics_error
        failed = [r for r in results if r.status == FAILED]
        spooled = sum(r.spooled for r in results)
        parts = [f"{len(failed)} of {len(results)} symbol(s) failed"] if failed else []
        parts += [f"{r.symbol}: {r.error}" for r in failed]
        if spooled:
            parts.append(
                f"{spooled} points the store could not take are spooled in {spool_dir}: "
                "run `marketpipe replay` once it is back (the next run replays them too)"
            )
        if results and results[0].spool_rejected:
            parts.append(describe_rejected(results[0].spool_rejected, spool_dir))
        if metrics_error:
            parts.append(describe_metrics_error(metrics_error))
        super().__init__("; ".join(parts))


def describe_metrics_error(error: str) -> str:
    return f"the run's pipeline_metrics were not recorded: {error}"


def describe_rejected(names: list[str], spool_dir: str) -> str:
    """The summary line for spooled batches the store refused for good, which wait aside."""
    return (
        f"{len(names)} spooled batch(es) refused by the store were set aside in {spool_dir}/{REJECTED}: "
        f"{', '.join(names)}; fix the cause and move them back to replay"
    )


def collect_tag(source: str) -> str:
    """The tag whose Prefect concurrency limit bounds a source's collect tasks across workers."""
    return f"collect:{source}"


@flow(name="market-data", log_prints=True)
def market_data(
    symbols: list[str] | None = None,
    source: str = "yahoo_finance",
    interval: str = "1d",
    start: date | None = None,
    end: date | None = None,
    config: str | None = None,
    shard: str | None = None,
) -> list[dict[str, object]]:
    """Collect, validate, enrich and store bars for each symbol; returns one summary row per symbol.

    ``shard`` (``2-of-4``) marks the run as one shard of a `market-data-sharded` run: it paces at its
    share of the source's limits, in pacing state of its own (see tasks/shards.py).
    """
    started = datetime.now(UTC).replace(microsecond=0)
    settings = load_settings(config)
    checked = validate_symbols(symbols or settings.symbols)
    validate_interval(interval)
    part_of = Shard.parse(shard) if shard else None
    if part_of is not None:
        check_concurrent_writes(settings.storage, "shards write at once")
    check_source(settings, source, part_of)  # fail the run once, not every symbol
    if start is not None and end is not None and start > end:
        raise UsageError(f"start {start} is after end {end}: swap them or widen the range")
    mode = f"{start} to {end or 'today'}" if start else "incremental"
    get_run_logger().info("%d symbol(s) from %s, %s bars, %s", len(checked), source, interval, mode)
    replayed = replay_spool(settings)
    progress.expect(len(checked))

    per_run = settings.collection.symbols_per_flow_run
    process_pool.start(settings.collection.processes)
    try:
        if len(checked) <= per_run:
            results = run_symbols(Job.build(settings, source, interval, start, end, part_of), checked)
        else:  # child flow runs, one after another, each with its own bounded number of task runs
            parts = [checked[i : i + per_run] for i in range(0, len(checked), per_run)]
            results = []
            for number, part in enumerate(parts, 1):
                results += _run_part(part, f"{number}-of-{len(parts)}", source, interval, start, end, config, shard)
    finally:
        process_pool.stop()
    rejected = [b.name for b in replayed.rejected] + [name for r in results for name in r.spool_rejected]
    if rejected:
        get_run_logger().warning(describe_rejected(rejected, settings.storage.spool_dir))
    for result in results:
        result.spool_rejected = rejected
    publish_summary(results, source, interval)
    send_alerts(symbol_alerts(results, source, interval, settings.storage.spool_dir, settings.alerts.rules))
    metrics_error = ""
    try:  # neither store nor spool taking the metrics must not hide which symbols' bars they lost
        depth = open_spool(settings).depth()
        record_metrics(run_metrics(results, source, interval, started, depth), settings)
    except StoreError as exc:
        metrics_error = str(exc)
    if metrics_error or any(r.status in (FAILED, SPOOLED) for r in results):
        raise SymbolsFailedError(results, settings.storage.spool_dir, metrics_error)
    return [r.row() for r in results]


@flow(name="market-data-part", flow_run_name="market-data-{source}-{interval}-part-{part}", log_prints=True)
def market_data_part(
    symbols: list[str],
    part: str,
    source: str,
    interval: str,
    start: date | None,
    end: date | None,
    config: str | None,
    shard: str | None = None,
) -> list[SymbolResult]:
    """Some of a large run's symbols, in a child flow run of their own (see `collection.symbols_per_flow_run`)."""
    part_of = Shard.parse(shard) if shard else None
    return run_symbols(Job.build(load_settings(config), source, interval, start, end, part_of), symbols)


def _run_part(
    symbols: list[str],
    part: str,
    source: str,
    interval: str,
    start: date | None,
    end: date | None,
    config: str | None,
    shard: str | None,
) -> list[SymbolResult]:
    state = market_data_part(symbols, part, source, interval, start, end, config, shard, return_state=True)
    if state.is_completed():
        results: list[SymbolResult] = state.result()
        return results
    error = state.result(raise_on_failure=False)
    if isinstance(error, httpx.TransportError):
        raise error  # the API went away: the CLI says what was stored and what to do
    message = f"its part of the run ({part}) ended {state.name}: {error}"
    return [SymbolResult(symbol, FAILED, error=message) for symbol in symbols]


def run_symbols(job: Job, symbols: list[str]) -> list[SymbolResult]:
    """Each symbol through collect -> process -> store in turn, ``collection.workers`` at a time.

    A symbol's tasks (or a batch's, with ``collection.batch_size``) run one after another in one
    worker thread, so its frames are released as soon as its bars are written: memory holds
    ``workers`` symbols or batches, never the whole run. A symbol's failure ends only its own pipeline.
    """
    policy = job.settings.collection
    collect = collect_bars.with_options(
        retries=policy.task_retries, retry_delay_seconds=policy.task_retry_delay, tags=[collect_tag(job.source)]
    )
    collect_many = collect_batch.with_options(tags=[collect_tag(job.source)])  # retried per symbol inside
    # Batches no larger than keeps every worker thread busy: 300 symbols in batches of 50 would leave two idle.
    size = max(1, min(policy.batch_size, -(-len(symbols) // policy.workers)))
    units = [symbols[i : i + size] for i in range(0, len(symbols), size)]
    workers = min(policy.workers, len(units) or 1)
    with job.store.session(), ThreadPoolExecutor(max_workers=workers, thread_name_prefix="symbols") as pool:
        # Each thread runs in a copy of the flow run's context, so its task runs belong to this flow run.
        futures = {pool.submit(copy_context().run, _unit, job, collect, collect_many, unit): unit for unit in units}
        for done in as_completed(futures):
            error = done.exception()
            if isinstance(error, httpx.TransportError):
                pool.shutdown(cancel_futures=True)
                raise error
            statuses = [r.status for r in done.result()] if error is None else [FAILED] * len(futures[done])
            for status in statuses:
                progress.report(status)
    return [result for future, unit in futures.items() for result in _outcomes(unit, future)]


def _unit(
    job: Job,
    collect: Task[[Job, str], Collected],
    collect_many: Task[[Job, list[str]], dict[str, Collected | Exception]],
    symbols: list[str],
) -> list[SymbolResult]:
    if len(symbols) == 1 and job.settings.collection.batch_size == 1:
        return [_pipeline(job, collect, symbols[0])]
    return _batch_pipeline(job, collect_many, symbols)


def _outcomes(symbols: list[str], future: Future[list[SymbolResult]]) -> list[SymbolResult]:
    error = future.exception()
    if error is None:
        return future.result()
    return [SymbolResult(symbol, FAILED, error=f"{type(error).__name__}: {error}") for symbol in symbols]


def _pipeline(job: Job, collect: Task[[Job, str], Collected], symbol: str) -> SymbolResult:
    collected = collect(job, symbol, return_state=True)
    if not collected.is_completed():
        return _not_done(symbol, collected)
    raw = collected.result()
    processed = process_bars(raw, job, symbol, return_state=True)
    if not processed.is_completed():
        return _not_done(symbol, processed)
    outcome = processed.result()
    stored = store_bars(outcome, job, symbol, return_state=True)
    if not stored.is_completed():
        return _not_done(symbol, stored)
    return _summarise(symbol, raw, outcome, stored.result())


def _batch_pipeline(
    job: Job, collect_many: Task[[Job, list[str]], dict[str, Collected | Exception]], symbols: list[str]
) -> list[SymbolResult]:
    """A batch's symbols through one collect, one process and one store task; each symbol's error
    comes back as its own result, so a batch task fails as a whole only on something unforeseen."""
    ended: dict[str, SymbolResult] = {}
    collected = collect_many(job, symbols, return_state=True)
    if not collected.is_completed():
        return [_not_done(symbol, collected) for symbol in symbols]
    raw = _survivors(collected.result(), ended)
    processed = process_batch(raw, job, return_state=True) if raw else None
    if processed is not None and not processed.is_completed():
        return [ended.get(symbol) or _not_done(symbol, processed) for symbol in symbols]
    outcomes = _survivors(processed.result(), ended) if processed is not None else {}
    raw = {symbol: _counts_only(c) for symbol, c in raw.items()}  # the batch's raw frames go before the writes
    stored = store_batch(outcomes, job, return_state=True) if outcomes else None
    if stored is not None and not stored.is_completed():
        return [ended.get(symbol) or _not_done(symbol, stored) for symbol in symbols]
    for symbol, written in _survivors(stored.result(), ended).items() if stored is not None else ():
        ended[symbol] = _summarise(symbol, raw[symbol], outcomes[symbol], written)
    return [ended[symbol] for symbol in symbols]


def _counts_only(collected: Collected) -> Collected:
    """What the summary reads of a collect result, without its frames: a batch holds each stage's
    frames only while it needs them."""
    return replace(collected, bars=_NO_BARS, actions=_NO_ACTIONS, history=None)


def _survivors[T](results: dict[str, T | Exception], ended: dict[str, SymbolResult]) -> dict[str, T]:
    """The symbols a batch stage finished; those it failed go into ``ended``."""
    alive: dict[str, T] = {}
    for symbol, result in results.items():
        if isinstance(result, Exception):
            ended[symbol] = _failure(symbol, result, "")
        else:
            alive[symbol] = result
    return alive


def _not_done(symbol: str, state: State[Any]) -> SymbolResult:
    return _failure(symbol, state.result(raise_on_failure=False), state.message or state.name or "")


def _failure(symbol: str, error: object, fallback: str) -> SymbolResult:
    status = DEFERRED if isinstance(error, QuotaExhaustedError) else FAILED
    message = str(error) if isinstance(error, BaseException) else ""
    result = SymbolResult(symbol, status, error=message or fallback)
    cost = operation_of(error)
    if cost is not None:  # the failed stage's own time; a stage before it succeeded is not carried on
        setattr(result, f"{cost.stage}_seconds", cost.seconds)
        _add_traffic(result, cost.traffic)
    return result


def _add_traffic(result: SymbolResult, traffic: Traffic) -> None:
    result.requests = max(result.requests, traffic.requests)
    result.retries += traffic.retries
    result.rate_limited += traffic.rate_limited
    result.bytes_received += traffic.bytes


def _summarise(symbol: str, raw: Collected, outcome: Processed, written: Stored) -> SymbolResult:
    window = f"{raw.window.start} to {raw.window.end} ({raw.window.mode})" if raw.window else ""
    coverage = outcome.coverage
    if written.refused:
        status, error = FAILED, written.describe_refused()
    elif written.spooled:
        status, error = SPOOLED, "the store was unavailable, so its points wait in the spool"
    else:
        status, error = OK, ""
    result = SymbolResult(
        symbol,
        status,
        rows_written=written.bars,
        spooled=written.spooled,
        dropped_by_retention=written.dropped_by_retention,
        bars_collected=outcome.collected,
        live_bars_skipped=outcome.live_bars_skipped,
        actions_written=written.actions,
        requests=raw.requests,
        counts=outcome.counts,
        currency=outcome.currency or "",
        missing_sessions=outcome.missing_sessions,
        gaps=outcome.gaps.describe() if outcome.gaps else "",
        window=window,
        clamped=raw.clamped,
        restated=raw.restated,
        history_from=coverage.first_bar_text() if coverage else "",
        uncovered_sessions=outcome.uncovered_sessions,
        coverage=coverage.describe() if coverage and coverage.short else "",
        error=error,
        spool_rejected=[batch.name for batch in written.rejected],  # the flow puts the run's whole list here
        collect_seconds=_seconds(raw.operation),
        process_seconds=_seconds(outcome.operation),
        store_seconds=_seconds(written.operation),
        bars_processed=len(outcome.bars),
    )
    if raw.operation is not None:
        _add_traffic(result, raw.operation.traffic)
    return result


def _seconds(cost: Operation | None) -> float:
    return cost.seconds if cost is not None else 0.0


def run_metrics(
    results: list[SymbolResult], source: str, interval: str, started: datetime, spool: SpoolDepth | None = None
) -> pd.DataFrame:
    """One `pipeline_metrics` row per symbol at the run's start: its outcome, counts and each stage's
    cost, as floats; and the spool's depth at the run's end, the same on every row."""
    spool = spool or SpoolDepth(0)
    rows = [
        {
            "time": started,
            "symbol": r.symbol,
            "interval": interval,
            "source": source,
            **{status: float(r.status == status) for status in (OK, FAILED, DEFERRED, SPOOLED)},
            "spooled_points": float(r.spooled),
            "spool_rejected": float(len(r.spool_rejected)),  # batches of the run's spool the store refused
            "dropped_by_retention": float(r.dropped_by_retention),
            "clamped": float(bool(r.clamped)),
            "rows_written": float(r.rows_written),
            "bars_collected": float(r.bars_collected),
            "live_bars_skipped": float(r.live_bars_skipped),
            "actions_written": float(r.actions_written),
            "requests": float(r.requests),
            "restated": float(bool(r.restated)),
            **{kind: float(sum(r.counts.get(kind, {}).values())) for kind in COUNTED},
            "missing_sessions": _count(r.missing_sessions),
            "uncovered_sessions": _count(r.uncovered_sessions),
            **stage_metrics(r),
            "spool_depth": float(spool.batches),
            "spool_oldest_seconds": spool.age_seconds(started),
        }
        for r in results
    ]
    metrics = pd.DataFrame(rows)
    if not metrics.empty:
        metrics["time"] = pd.to_datetime(metrics["time"], utc=True).astype("datetime64[ns, UTC]")
    return metrics


def stage_metrics(r: SymbolResult) -> dict[str, float]:
    """Each stage's time, traffic and bars in and out, named ``<stage>_<what>`` for the dashboard."""
    return {
        "collect_seconds": r.collect_seconds,
        "collect_requests": float(r.requests),
        "collect_retries": float(r.retries),
        "collect_rate_limited": float(r.rate_limited),
        "collect_bytes": float(r.bytes_received),
        "collect_bars_out": float(r.bars_collected),
        "process_seconds": r.process_seconds,
        "process_bars_in": float(r.bars_collected),
        "process_bars_out": float(r.bars_processed),
        "store_seconds": r.store_seconds,
        "store_bars_in": float(r.bars_processed),
        "store_bars_out": float(r.rows_written),
    }


def _count(value: int | None) -> float:
    return float("nan") if value is None else float(value)


def symbol_alerts(
    results: list[SymbolResult], source: str, interval: str, spool_dir: str, rules: AlertRules
) -> list[Alert]:
    """One alert event per symbol that failed or was spooled, naming the run and what to do."""
    run = f"{flow_run.get_flow_name()}/{flow_run.get_name()}"
    related = [{"prefect.resource.id": f"prefect.flow-run.{flow_run.get_id()}", "prefect.resource.role": "flow-run"}]
    alerts = []
    for r in results:
        if r.status == FAILED:
            event, message = SYMBOL_FAILED, f"{r.symbol} failed in run {run}"
            todo = f"fix what the error names, then `marketpipe run --symbols {r.symbol}` or retry the run"
        elif r.status == SPOOLED:
            event, message = SYMBOL_SPOOLED, f"{r.symbol}'s bars were spooled in run {run}: the store did not take them"
            todo = f"bring the store back, then `marketpipe replay` (the next run replays {spool_dir} too)"
        else:
            continue
        details = {
            "symbol": r.symbol,
            "source": source,
            "interval": interval,
            "run": run,
            "error": r.error,
            "what to do": todo,
        }
        resource = symbol_resource(r.symbol, source, interval)
        alerts.append(Alert(event, rules.symbol_failed.level, message, resource, details, related=related))
    return alerts


def publish_summary(results: list[SymbolResult], source: str, interval: str) -> None:
    """The run's table artifact, one row per symbol (a sharded run reads its shards' back)."""
    rows = [
        {**row, **{k: describe_counts(row[k]) for k in COUNTED}, "spool_rejected": len(row["spool_rejected"])}
        for row in map(SymbolResult.row, results)
    ]
    create_table_artifact(key=SUMMARY_KEY, table=rows, description=f"{source} {interval} bars")
