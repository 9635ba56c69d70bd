"""`marketpipe status`: one health check of every part a run depends on, for people and probes.

The store answers; the Prefect API answers (when one is configured); the spool holds nothing older
than ``alerts.rules.spool_stale.older_than``; and each symbol is fresh against its SLA
(tasks/monitoring/freshness.py) and its last run did not fail. Anything else is unhealthy, and
says what to do.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import pandas as pd
from prefect.client.orchestration import get_client

from blocks.spool import Spool
from blocks.store import BarStore, StoreError
from configs.settings import Settings
from tasks.monitoring.freshness import STALE, check_freshness, duration_text

RUN_OUTCOMES = ("ok", "failed", "deferred", "spooled")  # pipeline_metrics' outcome columns
UNHEALTHY_OUTCOMES = frozenset({"failed", "spooled"})


@dataclass(frozen=True)
class Check:
    """One part: healthy or not, and in a line what was seen (or what to do)."""

    name: str
    healthy: bool
    detail: str


@dataclass(frozen=True)
class SymbolHealth:
    symbol: str
    last_bar: str  # ISO 8601 UTC, or "" when nothing is stored
    freshness: str  # fresh, stale, unchecked or unknown (the store did not answer)
    due: str  # the session whose bar is due by now
    last_run: str  # the last run's outcome for the symbol, and when, from pipeline_metrics
    healthy: bool
    detail: str


@dataclass(frozen=True)
class Status:
    checked_at: str
    checks: list[Check]
    symbols: list[SymbolHealth] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return all(c.healthy for c in self.checks) and all(s.healthy for s in self.symbols)

    def unhealthy(self) -> list[str]:
        """The parts and symbols that are not healthy, by name."""
        return [c.name for c in self.checks if not c.healthy] + [s.symbol for s in self.symbols if not s.healthy]

    def as_json(self) -> dict[str, Any]:
        return {"healthy": self.healthy, **asdict(self)}


def check_status(
    settings: Settings,
    store: BarStore,
    symbols: list[str],
    source: str,
    interval: str,
    now: datetime,
    api_url: str | None,
) -> Status:
    """Every check, then each symbol's (only when the store answered: otherwise each is unknown)."""
    stored = check_store(store, settings.storage.backend)
    checks = [stored, check_prefect(api_url), check_spool(settings, now)]
    per_symbol = unknown_symbols(symbols, "the store did not answer: see its check")
    if stored.healthy:
        try:
            per_symbol = symbol_health(store, settings, symbols, source, interval, now)
        except StoreError as exc:  # it went away since its check
            per_symbol = unknown_symbols(symbols, str(exc))
    return Status(_iso(pd.Timestamp(now)), checks, per_symbol)


def check_store(store: BarStore, backend: str) -> Check:
    try:
        store.health()
    except StoreError as exc:
        return Check(f"store ({backend})", False, str(exc))
    return Check(f"store ({backend})", True, "answers")


def check_prefect(api_url: str | None) -> Check:
    """The configured Prefect API's health endpoint; without one, runs use Prefect's ephemeral mode."""
    if not api_url:
        return Check("prefect api", True, "not configured: runs start a local ephemeral API")
    with get_client(sync_client=True) as client:
        error = client.api_healthcheck()
    if error is not None:
        return Check("prefect api", False, f"{api_url} does not answer ({type(error).__name__}): check that it runs")
    return Check("prefect api", True, f"{api_url} answers")


def check_spool(settings: Settings, now: datetime) -> Check:
    limit = settings.alerts.rules.spool_stale.older_than
    try:
        depth = Spool(settings.storage.spool_dir).depth()
    except StoreError as exc:
        return Check("spool", False, str(exc))
    if not depth.batches:
        return Check("spool", True, f"empty ({settings.storage.spool_dir})")
    age = depth.age_seconds(now)
    detail = f"{depth.batches} batch(es) waiting in {settings.storage.spool_dir}, the oldest for {age / 3600:.1f} h"
    if age > limit.total_seconds():
        return Check("spool", False, f"{detail} (over {duration_text(limit)}): run `marketpipe replay`")
    return Check("spool", True, detail)


def symbol_health(
    store: BarStore, settings: Settings, symbols: list[str], source: str, interval: str, now: datetime
) -> list[SymbolHealth]:
    """Each symbol's freshness and last run; the store must answer (see :func:`check_store`)."""
    found = []
    for fresh in check_freshness(store, settings, symbols, source, interval, now):
        outcome, when = last_run(store, fresh.symbol, source, interval)
        failed = outcome in UNHEALTHY_OUTCOMES
        detail = fresh.describe()
        if failed:
            detail = f"its last run ({when}) ended {outcome}: see that run's summary; " + detail
        found.append(
            SymbolHealth(
                fresh.symbol,
                _iso(fresh.last_bar),
                fresh.status,
                str(fresh.due or ""),
                f"{outcome} at {when}" if outcome else "none recorded",
                healthy=fresh.status != STALE and not failed,
                detail=detail,
            )
        )
    return found


def last_run(store: BarStore, symbol: str, source: str, interval: str) -> tuple[str, str]:
    """The outcome of the symbol's latest run and its start, or ("", "") when none was recorded."""
    metrics = store.read_metrics(symbol, source)
    if "interval" in metrics:
        metrics = metrics[metrics["interval"] == interval]
    if metrics.empty:
        return "", ""
    latest = metrics.sort_values("time").iloc[-1]
    outcome = next((o for o in RUN_OUTCOMES if o in latest and latest[o] == 1), "unknown")
    return outcome, _iso(latest["time"])


def unknown_symbols(symbols: list[str], why: str) -> list[SymbolHealth]:
    """Symbols that could not be checked because the store did not answer."""
    return [SymbolHealth(s, "", "unknown", "", "", False, why) for s in symbols]


def _iso(stamp: pd.Timestamp | None) -> str:
    return "" if stamp is None else pd.Timestamp(stamp).tz_convert("UTC").strftime("%Y-%m-%dT%H:%M:%SZ")
