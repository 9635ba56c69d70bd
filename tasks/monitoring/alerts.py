"""Alerts as Prefect events: the seed's ``send_alert(level, message, details)``.

Marketpipe never talks to Slack or a pager itself. It emits an event naming what happened, and the
automations `marketpipe setup` creates (tasks/monitoring/automations.py) turn each event into one
notification through the configured channels. So users see every alert in Prefect's event feed,
and can route, mute or add channels in the UI without a release.

An alert about a state that lasts (a stale symbol, an old spool batch) gets an id derived from what
it is about, and is sent only if no event with that id exists yet: the check that finds it every
15 minutes alerts once, not every time.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from prefect.client.orchestration import get_client
from prefect.events import emit_event
from prefect.events.filters import EventFilter, EventIDFilter, EventOccurredFilter

from tasks.redaction import redact_text

SYMBOL_FAILED = "marketpipe.symbol.failed"
SYMBOL_SPOOLED = "marketpipe.symbol.spooled"
SPOOL_STALE = "marketpipe.spool.stale"
FRESHNESS_BREACHED = "marketpipe.freshness.breached"
ALERT_EVENTS = (SYMBOL_FAILED, SYMBOL_SPOOLED, SPOOL_STALE, FRESHNESS_BREACHED)
# How far back a lasting alert's id is looked for: longer than any state stays unresolved unnoticed.
REMEMBERED = timedelta(days=8)
_NAMESPACE = uuid.UUID("6d1f3f4e-8a1c-4b6e-9a55-3c0f2a7d9b10")


@dataclass(frozen=True)
class Alert:
    """What an alert says: how bad, in a line, and the facts (symbol, run, what to do)."""

    event: str  # one of ALERT_EVENTS
    level: str
    message: str
    resource: dict[str, str]  # what it is about: ``prefect.resource.id`` and labels
    details: dict[str, str] = field(default_factory=dict)
    key: str | None = None  # for a lasting state: alerted once per key
    related: list[dict[str, str]] = field(default_factory=list)  # e.g. the flow run it happened in

    @property
    def id(self) -> uuid.UUID:
        return uuid.uuid5(_NAMESPACE, self.key) if self.key else uuid.uuid4()


def symbol_resource(symbol: str, source: str, interval: str) -> dict[str, str]:
    return {
        "prefect.resource.id": f"marketpipe.symbol.{symbol}",
        "prefect.resource.name": symbol,
        "marketpipe.source": source,
        "marketpipe.interval": interval,
    }


def send_alert(
    level: str,
    message: str,
    details: Mapping[str, Any],
    *,
    event: str,
    resource: dict[str, str],
    key: str | None = None,
) -> bool:
    """Emit one alert event; True if sent, False if its key was alerted already (or no API takes events)."""
    return send_alerts([Alert(event, level, message, resource, {k: str(v) for k, v in details.items()}, key)]) == 1


def send_alerts(alerts: Iterable[Alert]) -> int:
    """Emit each alert not sent before (by key); returns how many were sent. Texts are redacted."""
    pending = list(alerts)
    known = already_sent([a.id for a in pending if a.key])
    sent = 0
    for alert in pending:
        if alert.key and alert.id in known:
            continue
        payload = {
            "level": alert.level,
            "message": redact_text(alert.message),
            "details": {k: redact_text(v) for k, v in alert.details.items()},
        }
        emitted = emit_event(alert.event, resource=alert.resource, related=alert.related, payload=payload, id=alert.id)
        if emitted is not None:
            sent += 1
    return sent


def already_sent(ids: list[uuid.UUID]) -> set[uuid.UUID]:
    """Which of ``ids`` the Prefect API has as events already."""
    if not ids:
        return set()
    since = datetime.now(UTC) - REMEMBERED
    found: set[uuid.UUID] = set()
    with get_client(sync_client=True) as client:
        for start in range(0, len(ids), 100):
            chunk = ids[start : start + 100]
            page = client.read_events(
                EventFilter(id=EventIDFilter(id=chunk), occurred=EventOccurredFilter(since=since)), limit=len(chunk)
            )
            found.update(event.id for event in page.events)
    return found
