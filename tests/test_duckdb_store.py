"""What only the embedded DuckDB store does; the shared behaviour is in test_store_conformance."""

from __future__ import annotations

from pathlib import Path

import pytest

from blocks.duckdb_store import DuckDBStore
from blocks.store import StoreError
from tests.test_store_conformance import frame


def test_unsafe_column_names_are_refused(tmp_path: Path) -> None:
    store = DuckDBStore(path=str(tmp_path / "bars.duckdb"))
    with pytest.raises(StoreError, match="snake_case"):
        store.write_bars(frame().assign(**{'x"; DROP TABLE bars; --': 1.0}))


def test_a_missing_store_reads_empty(tmp_path: Path) -> None:
    store = DuckDBStore(path=str(tmp_path / "none.duckdb"))
    assert store.read_bars("AAPL").empty
    assert store.read_corporate_actions("AAPL").empty
    assert store.last_timestamp("AAPL", "1d", "yahoo_finance") is None
    assert not (tmp_path / "none.duckdb").exists()
