"""What only the embedded DuckDB store does; the shared behaviour is in test_store_conformance."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from blocks.duckdb_store import DuckDBStore
from blocks.store import StoreError
from tasks.bars import conform_actions
from tests.test_store_conformance import frame

pytestmark = pytest.mark.unit  # no server, no child process: `pytest -m unit`


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


def test_retention_deletes_older_bars_and_quarantine_but_keeps_corporate_actions(tmp_path: Path) -> None:
    store = DuckDBStore(path=str(tmp_path / "bars.duckdb"))
    old = frame(n=10, start="2020-01-01")
    store.write_bars(old)
    rejected = frame(n=10, start="2020-02-01").drop(columns=["rsi_14"])  # a bar is in bars or quarantine, not both
    store.write_quarantine(rejected.assign(rule="ohlc_inconsistent", reason="r"))
    store.write_corporate_actions(
        conform_actions(
            pd.DataFrame({"time": [old["time"].iloc[0]], "symbol": "BRK-B", "source": "yahoo_finance",
                          "kind": "split", "ratio": [2.0], "amount": [float("nan")]})
        )
    )  # fmt: skip
    assert str(store.apply_retention("365d")).startswith("updated: deleted 20 row(s)")
    assert store.read_bars("BRK-B").empty
    assert store.read_quarantine("BRK-B").empty
    assert len(store.read_corporate_actions("BRK-B")) == 1
