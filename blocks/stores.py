"""Which block serves ``storage.backend``."""

from __future__ import annotations

from blocks.duckdb_store import DuckDBStore
from blocks.influxdb_store import InfluxDBStore
from blocks.influxdb_v1_store import InfluxDBV1Store
from blocks.store import BarStore
from configs.settings import ConfigError, InfluxDBSettings, StorageSettings


def store_from_settings(storage: StorageSettings) -> BarStore:
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


def _influxdb(v2: InfluxDBSettings) -> InfluxDBStore:
    """InfluxDB 2.x / Cloud needs a token for every request, so a missing one fails here, before any I/O."""
    if v2.token is None or not v2.token.get_secret_value():
        raise ConfigError(
            "storage.backend influxdb needs an API token: set INFLUXDB_TOKEN (or MARKETPIPE__STORAGE__INFLUXDB__TOKEN) "
            f"to a token that may read and write bucket {v2.bucket} in org {v2.org}"
        )
    return InfluxDBStore(url=v2.url, org=v2.org, bucket=v2.bucket, token=v2.token)
