"""What deployments need once (`marketpipe setup`) and every day (the `maintenance` flow).

Setup is safe to repeat: each step compares what the server has with what it should have and
says `created`, `updated` or `unchanged`, so a second run reports nothing but `unchanged`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, cast

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.automations import Automation
from prefect.blocks.core import Block
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.exceptions import ObjectNotFound
from pydantic import SecretStr

from blocks.credentials import SourceCredentials
from blocks.duckdb_store import DuckDBStore
from blocks.influxdb_store import InfluxDBStore
from blocks.influxdb_v1_store import InfluxDBV1Store
from blocks.store import StoreError
from blocks.stores import BLOCK_TYPES, store_block, store_from_settings
from configs.settings import ConfigError, Settings, load_settings
from flows.market_data import collect_tag
from flows.scoped_token import (
    SECRET_KEY,
    ScopedTokenTarget,
    authorization_description,
    ensure_scoped_authorization,
    read_secret_token,
    retire_authorizations,
    store_token_in_secret,
)
from tasks.bars import validate_symbols
from tasks.errors import UsageError
from tasks.monitoring.automations import RULES, automation, block_name, block_values, comparable, notification_block
from tasks.monitoring.quality import build_report
from tasks.monitoring.report_page import render_markdown
from tasks.store import open_spool, replay_spool

BLOCK_CLASSES: tuple[type[Block], ...] = (SourceCredentials, DuckDBStore, InfluxDBStore, InfluxDBV1Store)


@dataclass(frozen=True)
class Change:
    what: str
    outcome: str  # "created", "updated", "unchanged" or "skipped"


def ensure_concurrency_limits(settings: Settings) -> list[Change]:
    """One Prefect tag concurrency limit per source, bounding its collect tasks across all workers."""
    changes = []
    with get_client(sync_client=True) as client:
        for name, source in sorted(settings.data_sources.items()):
            tag = collect_tag(name)
            try:
                current: int | None = client.read_concurrency_limit_by_tag(tag).concurrency_limit
            except ObjectNotFound:
                current = None
            if current != source.concurrency:
                client.create_concurrency_limit(tag=tag, concurrency_limit=source.concurrency)  # an upsert
            outcome = "unchanged" if current == source.concurrency else "created" if current is None else "updated"
            changes.append(Change(f"concurrency limit {tag} = {source.concurrency}", outcome))
    return changes


def register_blocks() -> list[Change]:
    """Make marketpipe's block types known to the server, so the UI can create and edit them."""
    changes = []
    with get_client(sync_client=True) as client:
        for kind in BLOCK_CLASSES:
            outcome = _registration(client, kind)
            if outcome != "unchanged":
                kind.register_type_and_schema()
            changes.append(Change(f"block type {kind.get_block_type_slug()}", outcome))
    return changes


def _registration(client: SyncPrefectClient, kind: type[Block]) -> str:
    """What registering ``kind`` would do: create its type, update its schema, or nothing."""
    try:
        client.read_block_type_by_slug(kind.get_block_type_slug())
    except ObjectNotFound:
        return "created"
    try:
        client.read_block_schema_by_checksum(kind._calculate_schema_checksum(), kind.get_block_schema_version())
    except ObjectNotFound:
        return "updated"
    return "unchanged"


def save_blocks(settings: Settings) -> list[Change]:
    """Save the blocks the config names, from the settings and environment: the store, source API keys."""
    changes = []
    if settings.storage.block:
        kind = BLOCK_TYPES[settings.storage.backend]
        try:
            built: Block | None = cast(Block, store_block(settings.storage))
        except ConfigError:
            built = None  # e.g. no token in this environment: an existing block is kept as it is
        changes.append(_save(kind, settings.storage.block, built, f"storage.{settings.storage.backend} (its secret?)"))
    for name, source in sorted(settings.data_sources.items()):
        if source.api_key_block:
            key = SourceCredentials(api_key=source.api_key) if source.api_key else None
            changes.append(_save(SourceCredentials, source.api_key_block, key, f"data_sources.{name}.api_key"))
    return changes


def _save(kind: type[Block], name: str, block: Block | None, needs: str) -> Change:
    what = f"block {kind.get_block_type_slug()}/{name}"
    try:
        saved: Block | None = cast(Block, kind.load(name))
    except ValueError:
        saved = None
    if block is None:
        if saved is None:
            return Change(f"{what}: {needs} is not set in this environment, so there is nothing to save", "skipped")
        return Change(f"{what} (kept: nothing to save it from here)", "unchanged")
    if saved is not None and _values(saved) == _values(block):
        return Change(what, "unchanged")
    block.save(name, overwrite=True)
    return Change(what, "created" if saved is None else "updated")


def _values(block: Block) -> dict[str, Any]:
    return block_values(block)


def ensure_alerts(settings: Settings) -> list[Change]:
    """A notification block per ``alerts.channels`` entry, an automation per rule (tasks/monitoring/automations.py)."""
    alerts = settings.alerts
    if not alerts.channels:
        return [Change("alerts: no alerts.channels configured, so no notification blocks or automations", "skipped")]
    changes, ids = [], {}
    for channel, entry in sorted(alerts.channels.items()):
        name = block_name(channel)
        block = notification_block(name, entry)
        changes.append(_save(type(block), name, block, f"alerts.channels.{channel}.url"))
        saved = cast(Block, type(block).load(name))
        assert saved._block_document_id is not None  # a loaded block has its document
        ids[channel] = saved._block_document_id
    for rule in RULES:
        changes.append(_ensure_automation(automation(rule, alerts, ids)))
    return changes


def _ensure_automation(desired: Automation) -> Change:
    what = f"automation '{desired.name}'" + ("" if desired.enabled else " (disabled)")
    try:
        current: Automation | None = cast(Automation, Automation.read(name=desired.name))  # sync: no loop runs
    except ValueError:
        current = None
    if current is None:
        desired.create()
        return Change(what, "created")
    if comparable(current) == comparable(desired):
        return Change(what, "unchanged")
    desired.id = current.id
    desired.update()
    return Change(what, "updated")


def apply_retention(settings: Settings) -> list[Change]:
    """``retention.duration`` on the configured store: a bucket rule, a retention policy, or deleting older rows."""
    change = store_from_settings(settings.storage).apply_retention(settings.retention.duration)
    return [Change(f"retention ({settings.storage.backend}): {change.detail}", change.outcome)]


def provision_scoped_token(settings: Settings, target: ScopedTokenTarget) -> tuple[SecretStr, list[Change]]:
    """The bucket's read/write token, kept in the target Secret; older ones setup made are deleted."""
    v2 = settings.storage.influxdb
    where = f"secret {target.namespace}/{target.secret} key {SECRET_KEY}"
    current = read_secret_token(target.secret, target.namespace)
    auth = ensure_scoped_authorization(v2.url, v2.org, v2.bucket, target.operator_token, current)
    described = f"influxdb authorization '{authorization_description(v2.bucket)}'"
    changes = [Change(described, "created" if auth.created else "unchanged")]
    if auth.created:
        store_token_in_secret(target.secret, target.namespace, auth.token)
    changes.append(Change(where, "updated" if auth.created else "unchanged"))
    if auth.stale:
        retired = retire_authorizations(v2.url, v2.org, target.operator_token, auth.stale)
        changes.append(Change(f"influxdb authorizations replaced by the new token: {retired} deleted", "updated"))
    return auth.token, changes


def _with_token(settings: Settings, token: SecretStr, block: str | None) -> Settings:
    storage = settings.storage
    influxdb = storage.influxdb.model_copy(update={"token": token})
    return settings.model_copy(update={"storage": storage.model_copy(update={"influxdb": influxdb, "block": block})})


def setup(settings: Settings, scoped: ScopedTokenTarget | None = None) -> list[Change]:
    """Everything deployments need. With ``scoped``, the operator token only makes the bucket and the
    flow runs' token, and what setup saves holds that scoped token."""
    if scoped is None:
        return [
            *ensure_concurrency_limits(settings),
            *register_blocks(),
            *save_blocks(settings),
            *apply_retention(settings),
            *ensure_alerts(settings),
        ]
    if settings.storage.backend != "influxdb":
        raise ConfigError(
            f"a scoped token is made for InfluxDB 2.x only, but storage.backend is {settings.storage.backend!r}: "
            "drop --scoped-token-secret or use storage.backend influxdb"
        )
    # The bucket first (with the operator token, never saved): the authorization is made for its ID.
    changes = apply_retention(_with_token(settings, scoped.operator_token, block=None))
    token, made = provision_scoped_token(settings, scoped)
    flow_runs = _with_token(settings, token, block=settings.storage.block)
    return [
        *changes,
        *made,
        *ensure_concurrency_limits(flow_runs),
        *register_blocks(),
        *save_blocks(flow_runs),
        *ensure_alerts(flow_runs),
    ]


QUALITY_KEY = "data-quality"  # the markdown artifact of each maintenance run


def publish_quality(settings: Settings, source: str = "yahoo_finance", interval: str = "1d") -> str:
    """The data-quality summary of the configured symbols (`marketpipe report`'s table) as an artifact."""
    store = store_from_settings(settings.storage)
    try:
        summary = render_markdown(build_report(store, settings, validate_symbols(settings.symbols), source, interval))
    except UsageError as exc:  # nothing stored yet: say so, the maintenance itself is fine
        summary = f"# Data quality: {source} {interval}\n\n{exc}\n"
    create_markdown_artifact(key=QUALITY_KEY, markdown=summary, description=f"{source} {interval} data quality")
    return summary


@flow(name="maintenance", log_prints=True, retries=1, retry_delay_seconds=300)
def maintenance(config: str | None = None) -> list[dict[str, str]]:
    """Daily: the store answers, retention holds, nothing waits in the spool; and the data-quality summary."""
    settings = load_settings(config)
    logger = get_run_logger()
    store_from_settings(settings.storage).health()
    changes = apply_retention(settings)
    replayed = replay_spool(settings)
    changes.append(Change(f"spool: replayed {replayed.points} points", "updated" if replayed.points else "unchanged"))
    for change in changes:
        logger.info("%s: %s", change.outcome, change.what)
    publish_quality(settings)
    left = open_spool(settings).points()
    if left:
        raise StoreError(f"{left} points are still spooled in {settings.storage.spool_dir}: the store refuses them")
    return [asdict(c) for c in changes]
