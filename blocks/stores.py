"""Which block serves ``storage.backend``."""

from __future__ import annotations

from blocks.duckdb_store import DuckDBStore
from blocks.influxdb_v1_store import InfluxDBV1Store
from blocks.store import BarStore
from configs.settings import ConfigError, StorageSettings


def store_from_settings(storage: StorageSettings) -> BarStore:
    """The block for ``storage.backend``, configured from its section of the settings."""
    if storage.backend == "duckdb":
        return DuckDBStore(path=storage.duckdb.path)
    if storage.backend == "influxdb_v1":
        v1 = storage.influxdb_v1
        return InfluxDBV1Store(
            url=v1.url,
            database=v1.database,
            retention_policy="" if v1.retention_policy == "autogen" else v1.retention_policy,
            username=v1.username,
            password=v1.password,
        )
    raise ConfigError(
        f"storage.backend {storage.backend!r} is not available in this version: use duckdb or influxdb_v1"
    )
