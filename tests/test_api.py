"""The seed's Python API (flows/api.py), used only through its facade, against the sandbox and DuckDB,
with a Prefect API that nothing answers: a notebook needs no server."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flows.api import DataCollector, DataProcessor, DataStorage, query
from tasks.errors import PermanentSourceError, UsageError
from tests.conftest import REPO, Sandbox
from tests.servers import free_port


@pytest.fixture
def notebook(sandbox: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A notebook's environment: the development config, pointed at the sandbox and a fresh DuckDB file."""
    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{free_port()}/api")  # nothing listens there
    monkeypatch.setenv("MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__BASE_URL", sandbox.base_url)
    monkeypatch.setenv("MARKETPIPE__STORAGE__DUCKDB__PATH", str(tmp_path / "notebook.duckdb"))
    monkeypatch.setenv("MARKETPIPE__STORAGE__SPOOL_DIR", str(tmp_path / "spool"))
    monkeypatch.setenv("MARKETPIPE__COLLECTION__RATE_LIMIT_DIR", str(tmp_path / "pacing"))
    return tmp_path


def test_collect_process_store_and_query_give_back_the_bars_with_their_indicators(notebook: Path) -> None:
    bars = DataCollector().collect_data("aapl", "yahoo_finance", "2024-01-01", "2024-06-30")
    # Every weekday of the first half of 2024 is a sandbox session: 130 of them.
    assert len(bars) == 130
    assert bars["time"].min() == pd.Timestamp("2024-01-01", tz="UTC")
    assert bars["time"].max() == pd.Timestamp("2024-06-28", tz="UTC")
    assert set(bars["symbol"]) == {"AAPL"}

    processor = DataProcessor()
    clean = processor.process_data(bars)
    assert processor.last is not None and processor.last.collected == 130
    assert len(clean) == 130 and processor.last.rejected == {}
    assert processor.last.gaps is not None and processor.last.gaps.calendar == "XNYS"  # the source's exchange
    close = clean["close"].to_numpy()
    sma = np.convolve(close, np.ones(20) / 20, mode="valid")
    np.testing.assert_allclose(clean["sma_20"].to_numpy()[19:], sma, rtol=0, atol=1e-9)
    assert clean["sma_20"].iloc[:19].isna().all()

    storage = DataStorage()
    first = storage.store_data(clean, "AAPL")
    again = storage.store_data(clean, "AAPL")
    assert (first.written, first.spooled) == (len(clean), 0)
    assert (again.written, again.spooled) == (len(clean), 0)

    stored = query("AAPL")
    assert len(stored) == len(clean)  # the second write replaced the first
    pd.testing.assert_frame_equal(
        stored[["time", "close", "sma_20", "rsi_14"]], clean[["time", "close", "sma_20", "rsi_14"]], check_dtype=False
    )
    june = query("AAPL", start="2024-06-01", end="2024-06-30")
    assert june["time"].dt.month.unique().tolist() == [6]


def test_bad_input_raises_the_clis_errors_and_nothing_is_written(notebook: Path) -> None:
    collector = DataCollector()
    with pytest.raises(UsageError, match="invalid symbol"):
        collector.collect_data("not a symbol!")
    with pytest.raises(UsageError, match="start_date 2024-06-30 is after end_date 2024-01-01"):
        collector.collect_data("AAPL", start_date="2024-06-30", end_date="2024-01-01")
    with pytest.raises(UsageError, match="'2024-13-01' is not a date"):
        collector.collect_data("AAPL", start_date="2024-13-01")
    with pytest.raises(PermanentSourceError, match="DELISTED"):
        collector.collect_data("DELISTED", start_date="2024-01-01", end_date="2024-01-31")

    msft = collector.collect_data("MSFT", start_date="2024-01-01", end_date="2024-01-31")
    aapl = collector.collect_data("AAPL", start_date="2024-01-01", end_date="2024-01-31")
    with pytest.raises(UsageError, match="one symbol's bars of one interval, got AAPL 1d, MSFT 1d"):
        DataProcessor().process_data(pd.concat([aapl, msft]))
    with pytest.raises(UsageError, match="store_data\\('AAPL'\\) was given bars of MSFT"):
        DataStorage().store_data(DataProcessor().process_data(msft), "AAPL")
    assert query("AAPL").empty and query("MSFT").empty


def test_the_readmes_example_runs_as_written(notebook: Path) -> None:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## The Python API") :]
    example = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert example is not None, "README: no python example under The Python API"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(example.group(1), "README.md", "exec"), {})  # the README's own example, as a reader runs it
    lines = printed.getvalue().splitlines()
    assert lines[0].split() == ["time", "close", "sma_20", "rsi_14"]
    assert len(lines) == 6 and all("2024-06-" in line for line in lines[1:])
