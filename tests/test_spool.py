"""The spool itself: durable files in write order, replay that stops at the first failure, and loud
failure when nothing can keep the rows. Each backend's spool-and-replay is in the conformance suite."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from blocks.duckdb_store import DuckDBStore
from blocks.spool import Spool, Written
from blocks.store import StoreError
from configs.settings import Settings, load_settings
from tasks.processing import process
from tasks.sources.base import Collected
from tasks.store import COLLECTED, open_spool
from tests.test_store_conformance import frame, unavailable


@pytest.fixture
def store(tmp_path: Path) -> DuckDBStore:
    return DuckDBStore(path=str(tmp_path / "bars.duckdb"))


def test_batches_are_listed_in_write_order_and_a_half_written_file_is_not(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    first = spool.append("bars", frame("A", n=3))
    second = spool.append("quarantine", frame("B", n=2).assign(rule="off_grid", reason="x"))
    (tmp_path / f".{first.path.name}.partial").write_bytes(b"torn")
    assert [(b.path, b.kind, b.points) for b in spool.pending()] == [
        (first.path, "bars", 3),
        (second.path, "quarantine", 2),
    ]
    assert spool.points() == 5


def test_a_batch_the_store_refuses_for_good_stops_replay_and_stays(tmp_path: Path, store: DuckDBStore) -> None:
    spool = Spool(tmp_path / "spool")
    kept = spool.append("bars", frame(n=3).drop(columns=["source"]))  # no key: no store can take it
    spool.append("bars", frame("MSFT", n=3))
    with pytest.raises(StoreError, match=kept.path.name) as refused:
        spool.replay(store)
    assert "marketpipe replay" in str(refused.value)
    assert spool.pending()[0].path == kept.path
    assert store.read_bars("MSFT").empty  # order holds: nothing newer was written past the refused batch


def test_rows_neither_store_nor_spool_can_take_fail_loudly(tmp_path: Path, store: DuckDBStore) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    spool = Spool(blocker / "spool")
    with unavailable(store) as down, pytest.raises(StoreError, match="could not be spooled") as failed:
        spool.write(down, "bars", frame(n=3))
    assert "Conflicting lock" in str(failed.value)


def test_an_empty_frame_touches_neither_store_nor_spool(tmp_path: Path, store: DuckDBStore) -> None:
    spool = Spool(tmp_path / "spool")
    with unavailable(store) as down:
        assert spool.write(down, "bars", frame(n=0)) == Written(0, 0)
    assert not (tmp_path / "spool").exists()


def test_collected_bars_spooled_before_processing_are_processed_on_replay(tmp_path: Path, store: DuckDBStore) -> None:
    """History in the store, new raw bars spooled: replay computes what an uninterrupted run computes."""
    settings = test_settings(tmp_path)
    bars = frame(n=120).drop(columns=["rsi_14"])
    history, new = bars.iloc[:100], bars.iloc[100:].reset_index(drop=True)
    expected = process(Collected(bars), "BRK-B", "1d", settings.quality, settings.indicators).bars.iloc[100:]
    store.write_bars(process(Collected(history), "BRK-B", "1d", settings.quality, settings.indicators).bars)

    spool = open_spool(settings)
    spool.keep(COLLECTED, new, "the store could not give the history", {"symbol": "BRK-B", "meta": {}})
    spool.replay(store)

    stored = store.read_bars("BRK-B").iloc[100:].reset_index(drop=True)
    assert len(stored) == 20 and spool.pending() == []
    for column in expected.columns.drop(["time", "symbol", "interval", "source"]):
        np.testing.assert_allclose(stored[column], expected[column], rtol=1e-9, atol=1e-12, err_msg=column)


def test_settings(tmp_path: Path) -> Settings:
    settings = load_settings(None)
    storage = settings.storage.model_copy(update={"spool_dir": str(tmp_path / "spool")})
    return settings.model_copy(update={"storage": storage})


test_settings.__test__ = False  # type: ignore[attr-defined]
