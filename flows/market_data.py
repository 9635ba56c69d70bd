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

from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger, tags
from prefect.artifacts import create_table_artifact
from prefect.futures import PrefectFuture
from prefect.task_runners import ThreadPoolTaskRunner

from blocks.spool import REJECTED
from blocks.store import StoreError
from configs.settings import load_settings
from tasks.bars import validate_interval, validate_symbols
from tasks.collect import check_source, collect_bars
from tasks.errors import QuotaExhaustedError, UsageError
from tasks.processing import Processed, describe_counts, process_bars
from tasks.sources.base import Collected
from tasks.store import Stored, record_metrics, replay_spool, store_bars

OK, FAILED, DEFERRED, SPOOLED = "ok", "failed", "deferred", "spooled"


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
    quarantined: dict[str, int] = field(default_factory=dict)  # by rule; kept in the store's quarantine
    repaired: dict[str, int] = field(default_factory=dict)
    flagged: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
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


@flow(name="market-data", log_prints=True, task_runner=ThreadPoolTaskRunner[Any](max_workers=16))  # type: ignore[arg-type]
def market_data(
    symbols: list[str] | None = None,
    source: str = "yahoo_finance",
    interval: str = "1d",
    start: date | None = None,
    end: date | None = None,
    config: str | None = None,
) -> list[dict[str, object]]:
    """Collect, validate, enrich and store bars for each symbol; returns one summary row per symbol."""
    started = datetime.now(UTC).replace(microsecond=0)
    settings = load_settings(config)
    checked = validate_symbols(symbols or settings.symbols)
    validate_interval(interval)
    check_source(settings, source)  # fail the run once, not every symbol
    if start is not None and end is not None and start > end:
        raise UsageError(f"start {start} is after end {end}: swap them or widen the range")
    mode = f"{start} to {end or 'today'}" if start else "incremental"
    get_run_logger().info("%d symbol(s) from %s, %s bars, %s", len(checked), source, interval, mode)
    replayed = replay_spool(settings)

    stages: dict[str, tuple[PrefectFuture[Any], PrefectFuture[Any], PrefectFuture[Any]]] = {}
    policy = settings.collection  # collect tasks retry transient source errors this often
    collect = collect_bars.with_options(retries=policy.task_retries, retry_delay_seconds=policy.task_retry_delay)
    # Every collect is queued before any process or store task. A task whose argument is an upstream
    # future waits for it inside a worker thread, so queued per symbol in turn, two of every three
    # workers would sit waiting and the pace would be set by how fast the few collects start.
    collects: dict[str, PrefectFuture[Any]] = {}
    for symbol in checked:
        with tags(collect_tag(source)):
            collects[symbol] = collect.submit(settings, source, symbol, interval, start, end)
    for symbol, collected in collects.items():
        # Prefect resolves a future passed as an argument into its result, which mypy can't see.
        processed = process_bars.submit(collected, settings, source, symbol, interval)  # type: ignore[call-overload]
        stored = store_bars.submit(processed, settings, symbol)
        stages[symbol] = (collected, processed, stored)

    results = [_summarise(symbol, *futures) for symbol, futures in stages.items()]
    rejected = [b.name for b in replayed.rejected] + [
        b.name for _, _, stored in stages.values() if stored.state.is_completed() for b in stored.result().rejected
    ]
    if rejected:
        get_run_logger().warning(describe_rejected(rejected, settings.storage.spool_dir))
    for result in results:
        result.spool_rejected = rejected
    _publish(results, source, interval)
    metrics_error = ""
    try:  # neither store nor spool taking the metrics must not hide which symbols' bars they lost
        record_metrics(run_metrics(results, source, interval, started), settings)
    except StoreError as exc:
        metrics_error = str(exc)
    if metrics_error or any(r.status in (FAILED, SPOOLED) for r in results):
        raise SymbolsFailedError(results, settings.storage.spool_dir, metrics_error)
    return [asdict(r) for r in results]


def _summarise(
    symbol: str, collected: PrefectFuture[Any], processed: PrefectFuture[Any], stored: PrefectFuture[Any]
) -> SymbolResult:
    for stage in (collected, processed, stored):
        stage.wait()
        if not stage.state.is_completed():
            error = stage.state.result(raise_on_failure=False)
            status = DEFERRED if isinstance(error, QuotaExhaustedError) else FAILED
            message = str(error) if isinstance(error, BaseException) else (stage.state.message or "")
            return SymbolResult(symbol, status, error=message or f"{stage.state.name}")
    raw: Collected = collected.result()
    outcome: Processed = processed.result()
    written: Stored = stored.result()
    window = f"{raw.window.start} to {raw.window.end} ({raw.window.mode})" if raw.window else ""
    coverage = outcome.coverage
    if written.refused:
        status, error = FAILED, written.describe_refused()
    elif written.spooled:
        status, error = SPOOLED, "the store was unavailable, so its points wait in the spool"
    else:
        status, error = OK, ""
    return SymbolResult(
        symbol,
        status,
        rows_written=written.bars,
        spooled=written.spooled,
        dropped_by_retention=written.dropped_by_retention,
        bars_collected=outcome.collected,
        live_bars_skipped=outcome.live_bars_skipped,
        actions_written=written.actions,
        requests=raw.requests,
        quarantined=outcome.rejected,
        repaired=outcome.repaired,
        flagged=outcome.flagged,
        dropped=outcome.dropped,
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
    )


def run_metrics(results: list[SymbolResult], source: str, interval: str, started: datetime) -> pd.DataFrame:
    """One `pipeline_metrics` row per symbol at the run's start: its outcome and counts, as floats."""
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
            **{
                kind: float(sum(getattr(r, kind).values()))
                for kind in ("quarantined", "repaired", "flagged", "dropped")
            },
            "missing_sessions": _count(r.missing_sessions),
            "uncovered_sessions": _count(r.uncovered_sessions),
        }
        for r in results
    ]
    metrics = pd.DataFrame(rows)
    if not metrics.empty:
        metrics["time"] = pd.to_datetime(metrics["time"], utc=True).astype("datetime64[ns, UTC]")
    return metrics


def _count(value: int | None) -> float:
    return float("nan") if value is None else float(value)


def _publish(results: list[SymbolResult], source: str, interval: str) -> None:
    counted = ("quarantined", "repaired", "flagged", "dropped")
    rows = [
        {**asdict(r), **{k: describe_counts(getattr(r, k)) for k in counted}, "spool_rejected": len(r.spool_rejected)}
        for r in results
    ]
    create_table_artifact(key="market-data-summary", table=rows, description=f"{source} {interval} bars")
