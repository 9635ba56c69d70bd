"""The `monitor` flow: every 15 minutes, the freshness SLA of each symbol and the spool's age.

It alerts through Prefect events (tasks/monitoring/alerts.py), once per breach: a symbol missing
the bar of a session its exchange closed more than ``alerts.rules.freshness.deadline`` ago, and a
spool whose oldest batch has waited longer than ``alerts.rules.spool_stale.older_than``. Each run
publishes the symbols' freshness as a table artifact.
"""

from __future__ import annotations

from datetime import UTC, datetime

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from blocks.store import BarStore
from blocks.stores import store_from_settings
from configs.settings import Settings, load_settings
from tasks.bars import validate_interval, validate_symbols
from tasks.monitoring.alerts import FRESHNESS_BREACHED, SPOOL_STALE, Alert, send_alerts, symbol_resource
from tasks.monitoring.freshness import Freshness, check_freshness, duration_text
from tasks.monitoring.health import last_run
from tasks.store import open_spool

FRESHNESS_KEY = "marketpipe-freshness"


@flow(name="monitor", log_prints=True)
def monitor(
    symbols: list[str] | None = None,
    source: str = "yahoo_finance",
    interval: str = "1d",
    config: str | None = None,
    as_of: datetime | None = None,
) -> dict[str, int]:
    """Check freshness and the spool now (or at ``as_of``); returns how many were stale and alerts sent."""
    settings = load_settings(config)
    checked_symbols = validate_symbols(symbols or settings.symbols)
    validate_interval(interval)
    now = as_of or datetime.now(UTC)
    store = store_from_settings(settings.storage)
    checked = check_freshness(store, settings, checked_symbols, source, interval, now)
    runs = {f.symbol: last_run_text(store, f) for f in checked if f.breached}
    alerts = freshness_alerts(checked, settings, runs) + spool_alerts(settings, now)
    sent = send_alerts(alerts)
    stale = [f for f in checked if f.breached]
    logger = get_run_logger()
    for f in stale:
        logger.warning("%s: %s", f.symbol, f.describe())
    logger.info("%d of %d symbol(s) stale; %d alert(s) sent", len(stale), len(checked), sent)
    create_table_artifact(
        key=FRESHNESS_KEY,
        table=[
            {"symbol": f.symbol, "status": f.status, "last_bar": str(f.last_bar or ""), "due": str(f.due or "")}
            for f in checked
        ],
        description=f"{source} {interval} freshness at {now:%Y-%m-%d %H:%M} UTC",
    )
    return {"symbols": len(checked), "stale": len(stale), "alerts_sent": sent}


def last_run_text(store: BarStore, fresh: Freshness) -> str:
    """The symbol's last market-data run, as its pipeline_metrics recorded it."""
    outcome, when = last_run(store, fresh.symbol, fresh.source, fresh.interval)
    return f"{outcome}, started {when}" if outcome else "none recorded"


def freshness_alerts(checked: list[Freshness], settings: Settings, runs: dict[str, str] | None = None) -> list[Alert]:
    """One alert per stale series and missing session: the next check finds it again, and alerts no more."""
    rule = settings.alerts.rules.freshness
    if not rule.enabled:
        return []
    return [
        Alert(
            FRESHNESS_BREACHED,
            rule.level,
            f"{f.symbol} has no bar for the {f.due} session, due {duration_text(rule.deadline)} after its close",
            symbol_resource(f.symbol, f.source, f.interval),
            {
                "symbol": f.symbol,
                "source": f.source,
                "interval": f.interval,
                "calendar": str(f.calendar),
                "last bar": str(f.last_bar) if f.last_bar is not None else "none stored",
                "last run": (runs or {}).get(f.symbol, "unknown"),
                "what to do": f.describe(),
            },
            key=f"freshness:{f.source}:{f.interval}:{f.symbol}:{f.due}",
        )
        for f in checked
        if f.breached
    ]


def spool_alerts(settings: Settings, now: datetime) -> list[Alert]:
    """One alert per oldest batch past the threshold: it goes once the batch is replayed."""
    rule = settings.alerts.rules.spool_stale
    depth = open_spool(settings).depth()
    age = depth.age_seconds(now)
    if not rule.enabled or not depth.batches or age <= rule.older_than.total_seconds():
        return []
    where = settings.storage.spool_dir
    return [
        Alert(
            SPOOL_STALE,
            rule.level,
            f"{depth.batches} batch(es) have waited in the spool for up to {age / 3600:.1f} h",
            {"prefect.resource.id": f"marketpipe.spool.{where}", "prefect.resource.name": where},
            {
                "spool": where,
                "batches": str(depth.batches),
                "oldest": f"{depth.oldest_batch} since {depth.oldest:%Y-%m-%d %H:%M} UTC" if depth.oldest else "",
                "what to do": "check that the store answers (`marketpipe status`), then `marketpipe replay`",
            },
            key=f"spool:{where}:{depth.oldest_batch}",
        )
    ]
