"""Setup that every deployment needs once, and that is safe to repeat: `marketpipe setup`."""

from __future__ import annotations

from dataclasses import dataclass

from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound

from blocks.credentials import SourceCredentials
from blocks.duckdb_store import DuckDBStore
from blocks.influxdb_store import InfluxDBStore
from blocks.influxdb_v1_store import InfluxDBV1Store
from blocks.stores import store_from_settings
from configs.settings import Settings
from flows.market_data import collect_tag


@dataclass(frozen=True)
class Change:
    what: str
    outcome: str  # "created", "updated" or "unchanged"


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
    for block in (SourceCredentials, DuckDBStore, InfluxDBStore, InfluxDBV1Store):
        block.register_type_and_schema()
    return [Change("block types SourceCredentials, DuckDBStore, InfluxDBStore, InfluxDBV1Store", "registered")]


def apply_retention(settings: Settings) -> list[Change]:
    """``retention.duration`` on the configured store: a retention policy, or deleting older rows."""
    report = store_from_settings(settings.storage).apply_retention(settings.retention.duration)
    outcome, _, detail = report.partition(": ")
    return [Change(f"retention ({settings.storage.backend}): {detail}", outcome)]


def setup(settings: Settings) -> list[Change]:
    return [*ensure_concurrency_limits(settings), *register_blocks(), *apply_retention(settings)]
