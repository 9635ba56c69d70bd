"""The main batch flow: collect -> process -> store, fanned out per symbol.

One symbol's failure never stops the others. The run ends Failed when any symbol failed, so
schedules and the UI show it, and the per-symbol summary is published as a table artifact either way.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.futures import PrefectFuture

from configs.settings import load_settings
from tasks.bars import validate_interval, validate_symbols
from tasks.collect import collect_bars
from tasks.errors import UsageError
from tasks.processing import Processed, process_bars
from tasks.store import store_bars

DEFAULT_LOOKBACK = timedelta(days=730)


@dataclass
class SymbolResult:
    symbol: str
    status: str  # "ok" or "failed"
    rows_written: int = 0
    bars_collected: int = 0
    null_bars_dropped: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    error: str = ""


class SymbolsFailedError(Exception):
    """Some symbols failed; the others were stored. Carries the whole summary."""

    def __init__(self, results: list[SymbolResult]) -> None:
        self.results = results
        failed = [r for r in results if r.status != "ok"]
        detail = "; ".join(f"{r.symbol}: {r.error}" for r in failed)
        super().__init__(f"{len(failed)} of {len(results)} symbol(s) failed: {detail}")


def resolve_window(start: date | None, end: date | None) -> tuple[date, date]:
    last = end or datetime.now(UTC).date()
    first = start or last - DEFAULT_LOOKBACK
    if first > last:
        raise UsageError(f"start {first} is after end {last}: swap them or widen the range")
    return first, last


@flow(name="market-data", log_prints=True)
def market_data(
    symbols: list[str] | None = None,
    source: str = "yahoo_finance",
    interval: str = "1d",
    start: date | None = None,
    end: date | None = None,
    config: str | None = None,
) -> list[dict[str, object]]:
    """Collect, validate, enrich and store bars for each symbol; returns one summary row per symbol."""
    settings = load_settings(config)
    checked = validate_symbols(symbols or settings.symbols)
    validate_interval(interval)
    settings.source(source)
    first, last = resolve_window(start, end)
    logger = get_run_logger()
    logger.info("%d symbol(s) from %s, %s bars, %s to %s", len(checked), source, interval, first, last)

    stages: dict[str, tuple[PrefectFuture[Any], PrefectFuture[Any], PrefectFuture[Any]]] = {}
    for symbol in checked:
        collected = collect_bars.submit(settings, source, symbol, interval, first, last)
        # Prefect resolves a future passed as an argument into its result, which mypy can't see.
        processed = process_bars.submit(collected, settings.indicators, symbol)  # type: ignore[call-overload]
        stored = store_bars.submit(processed, settings, symbol)
        stages[symbol] = (collected, processed, stored)

    results = [_summarise(symbol, *futures) for symbol, futures in stages.items()]
    _publish(results, source, interval, first, last)
    if any(r.status != "ok" for r in results):
        raise SymbolsFailedError(results)
    return [asdict(r) for r in results]


def _summarise(
    symbol: str, collected: PrefectFuture[Any], processed: PrefectFuture[Any], stored: PrefectFuture[Any]
) -> SymbolResult:
    for stage in (collected, processed, stored):
        stage.wait()
        if not stage.state.is_completed():
            error = stage.state.result(raise_on_failure=False)
            message = str(error) if isinstance(error, BaseException) else (stage.state.message or "")
            return SymbolResult(symbol, "failed", error=message or f"{stage.state.name}")
    outcome: Processed = processed.result()
    return SymbolResult(
        symbol,
        "ok",
        rows_written=stored.result(),
        bars_collected=outcome.collected,
        null_bars_dropped=outcome.dropped_null_bars,
        rejected=outcome.rejected,
    )


def _publish(results: list[SymbolResult], source: str, interval: str, first: date, last: date) -> None:
    rows = [
        {
            "symbol": r.symbol,
            "status": r.status,
            "rows_written": r.rows_written,
            "bars_collected": r.bars_collected,
            "null_bars_dropped": r.null_bars_dropped,
            "rejected": ", ".join(f"{k}={v}" for k, v in r.rejected.items()),
            "error": r.error,
        }
        for r in results
    ]
    create_table_artifact(
        key="market-data-summary",
        table=rows,
        description=f"{source} {interval} bars, {first} to {last}",
    )
