"""Which block serves ``storage.backend``: a saved block when ``storage.block`` names one, else one
built from the backend's section of the settings (and the environment)."""

from __future__ import annotations

from functools import lru_cache
from typing import cast

from prefect.blocks.core import Block

from blocks.duckdb_store import DuckDBStore
from blocks.influxdb_store import InfluxDBStore
from blocks.influxdb_v1_store import InfluxDBV1Store
from blocks.store import BarStore
from configs.settings import ConfigError, InfluxDBSettings, StorageSettings

BLOCK_TYPES: dict[str, type[Block]] = {"duckdb": DuckDBStore, "influxdb": InfluxDBStore, "influxdb_v1": InfluxDBV1Store}
# Backends that admit one writing process at a time: DuckDB locks its file for the process that opens it.
SINGLE_WRITER = frozenset({"duckdb"})


def check_concurrent_writes(storage: StorageSettings, why: str) -> None:
    """Raise ConfigError when ``storage.backend`` can't take writes from several processes at once."""
    if storage.backend in SINGLE_WRITER:
        raise ConfigError(
            f"storage.backend is {storage.backend!r}, which admits one writer at a time, but {why}: set "
            "storage.backend to influxdb (InfluxDB 2.x) or influxdb_v1 (InfluxDB 1.x and 3.x), e.g. "
            "MARKETPIPE__STORAGE__BACKEND=influxdb, or run the unsharded market-data flow"
        )


def store_from_settings(storage: StorageSettings) -> BarStore:
    """The store for ``storage.backend``: the saved block ``storage.block``, or one built from the settings."""
    if storage.block:
        return saved_store(storage.backend, storage.block)
    return store_block(storage)


def store_block(storage: StorageSettings) -> BarStore:
    """The block for ``storage.backend``, configured from its section of the settings."""
    if storage.backend == "duckdb":
        return DuckDBStore(path=storage.duckdb.path)
    if storage.backend == "influxdb":
        return _influxdb(storage.influxdb)
    if storage.backend == "influxdb_v1":
        v1 = storage.influxdb_v1
        return InfluxDBV1Store(
            url=v1.url,
            database=v1.database,
            retention_policy="" if v1.retention_policy == "autogen" else v1.retention_policy,
            username=v1.username,
            password=v1.password,
        )
    raise ConfigError(f"storage.backend {storage.backend!r} is not available: use duckdb, influxdb or influxdb_v1")


@lru_cache(maxsize=8)
def saved_store(backend: str, name: str) -> BarStore:
    """A store block saved in Prefect, loaded once per process (every task asks for it)."""
    kind = BLOCK_TYPES[backend]
    try:
        block = kind.load(name)
    except ValueError:
        raise ConfigError(
            f"storage.block {name!r}: no saved {kind.get_block_type_slug()} block of that name; run `marketpipe "
            "setup` to save it from the settings and environment, or unset storage.block"
        ) from None
    return cast(BarStore, block)


def _influxdb(v2: InfluxDBSettings) -> InfluxDBStore:
    """InfluxDB 2.x / Cloud needs a token for every request, so a missing one fails here, before any I/O."""
    if v2.token is None or not v2.token.get_secret_value():
        raise ConfigError(
            "storage.backend influxdb needs an API token: set INFLUXDB_TOKEN (or MARKETPIPE__STORAGE__INFLUXDB__TOKEN) "
            f"to a token that may read and write bucket {v2.bucket} in org {v2.org}"
        )
    return InfluxDBStore(url=v2.url, org=v2.org, bucket=v2.bucket, token=v2.token)
