"""Which block serves ``storage.backend``."""

from __future__ import annotations

from blocks.duckdb_store import DuckDBStore
from blocks.store import BarStore
from configs.settings import ConfigError, StorageSettings


def store_from_settings(storage: StorageSettings) -> BarStore:
    """The block for ``storage.backend``, configured from its section of the settings."""
    if storage.backend == "duckdb":
        return DuckDBStore(path=storage.duckdb.path)
    raise ConfigError(f"storage.backend {storage.backend!r} is not available in this version: use duckdb")
