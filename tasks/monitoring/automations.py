"""The alert rules as Prefect automations, and the channels as notification blocks.

`marketpipe setup` saves one notification block per channel of ``alerts.channels`` and one
automation per rule of ``alerts.rules``, comparing each with what the server has: a second setup
changes nothing. The automations' templates put the level, the message and the details of an
alert event (tasks/monitoring/alerts.py) into the notification; the run-failed rule reads
Prefect's own flow-run events, except for runs that failed only for their symbols, which their
symbols' alerts already tell.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID

from prefect.automations import Automation
from prefect.blocks.core import Block
from prefect.blocks.notifications import CustomWebhookNotificationBlock, SlackWebhook
from prefect.events.actions import SendNotification
from prefect.events.schemas.automations import EventTrigger, Posture
from pydantic import SecretStr

from configs.settings import AlertChannel, AlertRule, AlertSettings
from tasks.monitoring.alerts import FRESHNESS_BREACHED, SPOOL_STALE, SYMBOL_FAILED, SYMBOL_SPOOLED

BLOCK_PREFIX = "marketpipe-alerts-"
AUTOMATION_PREFIX = "marketpipe: "
# A market-data run whose symbols failed ends with this state message; each symbol alerts on its own.
SYMBOLS_FAILED_MESSAGE = "Flow run encountered an exception: SymbolsFailedError*"

_EVENT_SUBJECT = "marketpipe {{ event.payload.level }}: {{ event.payload.message }}"
_EVENT_BODY = """{{ event.payload.message }}
level: {{ event.payload.level }}
{% for name, value in event.payload.details.items() %}{{ name }}: {{ value }}
{% endfor %}"""
_RUN_SUBJECT = "marketpipe {level}: flow run {{{{ flow.name }}}}/{{{{ flow_run.name }}}} {{{{ flow_run.state.name }}}}"
_RUN_BODY = """Flow run {{{{ flow.name }}}}/{{{{ flow_run.name }}}} ended {{{{ flow_run.state.name }}}}: \
{{{{ flow_run.state.message }}}}
level: {level}
run: {{{{ flow_run.id }}}}
what to do: read the run's logs in the Prefect UI, fix the cause, then retry the run from the UI \
or with `prefect deployment run`"""


@dataclass(frozen=True)
class Rule:
    """One automation: which rule of the config, what it is called, and the events it reacts to."""

    key: str  # the field of AlertRules
    title: str
    events: tuple[str, ...]


RULES = (
    Rule("run_failed", "flow run failed or crashed", ("prefect.flow-run.Failed", "prefect.flow-run.Crashed")),
    Rule("symbol_failed", "symbol failed or spooled", (SYMBOL_FAILED, SYMBOL_SPOOLED)),
    Rule("spool_stale", "spool holds old batches", (SPOOL_STALE,)),
    Rule("freshness", "freshness SLA missed", (FRESHNESS_BREACHED,)),
)


def block_name(channel: str) -> str:
    return BLOCK_PREFIX + channel.replace("_", "-").lower()


def notification_block(name: str, channel: AlertChannel) -> Block:
    """The Prefect notification block for one channel; a webhook's URL is kept as a secret value."""
    if channel.kind == "slack":
        return SlackWebhook(url=channel.url)
    return CustomWebhookNotificationBlock(
        name=name,
        url="{{webhook_url}}",
        json_data={"title": "{{subject}}", "text": "{{body}}", "source": "marketpipe"},
        headers=channel.headers or None,
        secrets={"webhook_url": channel.url.get_secret_value()},
    )


def trigger(rule: Rule, alerts: AlertSettings) -> EventTrigger:
    """Fires once per matching event: every alert event is one thing that happened."""
    if rule.key == "run_failed":
        return EventTrigger(
            expect=set(rule.events),
            match={"prefect.resource.id": "prefect.flow-run.*", "prefect.state-message": f"!{SYMBOLS_FAILED_MESSAGE}"},
            match_related={"prefect.resource.role": "flow", "prefect.resource.name": list(alerts.flows)},
            posture=Posture.Reactive,
            threshold=1,
            within=0,
        )
    return EventTrigger(
        expect=set(rule.events),
        match={"prefect.resource.id": "marketpipe.*"},
        posture=Posture.Reactive,
        threshold=1,
        within=0,
    )


def actions(rule: Rule, settings: AlertRule, blocks: dict[str, UUID]) -> list[SendNotification]:
    """One notification per channel the rule names (every channel when it names none)."""
    channels = settings.channels or sorted(blocks)
    if rule.key == "run_failed":
        subject, body = _RUN_SUBJECT.format(level=settings.level), _RUN_BODY.format(level=settings.level)
    else:
        subject, body = _EVENT_SUBJECT, _EVENT_BODY
    return [SendNotification(block_document_id=blocks[c], subject=subject, body=body) for c in channels]


def automation(rule: Rule, alerts: AlertSettings, blocks: dict[str, UUID]) -> Automation:
    settings: AlertRule = getattr(alerts.rules, rule.key)
    return Automation(
        name=AUTOMATION_PREFIX + rule.title,
        description=f"alerts.rules.{rule.key} of the marketpipe config; made by `marketpipe setup`",
        enabled=settings.enabled,
        trigger=trigger(rule, alerts),
        actions=actions(rule, settings, blocks),
    )


def comparable(automation: Automation) -> dict[str, Any]:
    """What setup compares of an automation: everything but the server's own ids.

    Python values, not JSON: a trigger's ``expect`` is a set, and JSON makes it a list in the set's
    iteration order, which can differ between the server's copy and the same events set up again.
    """
    return automation.model_dump(exclude={"id", "created", "updated", "tags", "owner_resource"})


def block_values(block: Block) -> dict[str, Any]:
    """A block's field values with secrets revealed, to compare a saved block with a fresh one."""
    values = {name: getattr(block, name) for name in type(block).model_fields}
    return {k: _revealed(v) for k, v in values.items()}


def _revealed(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    reveal = getattr(value, "get_secret_value", None)
    return reveal() if callable(reveal) else value
