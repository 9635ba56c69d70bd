"""The market-data flow on a real Prefect server, against the sandbox, into a real DuckDB file."""

from __future__ import annotations

import asyncio
import shutil
import time
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from blocks.duckdb_store import DuckDBStore
from configs.settings import ConfigError
from flows.market_data import SymbolsFailedError, market_data
from tests.conftest import YAHOO, Sandbox
from tests.servers import free_port


@pytest.fixture
def configured(sandbox: Sandbox, prefect_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> DuckDBStore:
    monkeypatch.setenv("MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__BASE_URL", sandbox.base_url)
    path = prefect_env["MARKETPIPE__STORAGE__DUCKDB__PATH"]
    monkeypatch.setenv("MARKETPIPE__STORAGE__DUCKDB__PATH", path)
    return DuckDBStore(path=path)


def test_flow_stores_every_symbol_and_returns_the_summary(configured: DuckDBStore) -> None:
    summary = market_data(["AAPL", "BRK-B", "^GSPC"], start=date(2023, 1, 2), end=date(2023, 12, 29))
    assert [row["symbol"] for row in summary] == ["AAPL", "BRK-B", "^GSPC"]
    for row in summary:
        assert row["status"] == "ok"
        assert row["error"] == ""
        stored = configured.read_bars(str(row["symbol"]))
        assert len(stored) == row["rows_written"] == row["bars_collected"] == 260  # weekdays of 2023
        assert stored["rsi_14"].iloc[:14].isna().all()
        assert stored["rsi_14"].iloc[14:].notna().all()


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_one_failing_symbol_does_not_stop_the_others(
    configured: DuckDBStore, monkeypatch: pytest.MonkeyPatch, batch_size: int
) -> None:
    """With per-symbol tasks and with batches alike: DELISTED shares a batch with AAPL at 2, and AAPL
    and MSFT are written together at 3."""
    monkeypatch.setenv("MARKETPIPE__COLLECTION__BATCH_SIZE", str(batch_size))
    state = market_data(["AAPL", "DELISTED", "MSFT"], start=date(2024, 1, 1), end=date(2024, 3, 29), return_state=True)
    assert state.is_failed()
    outcome = state.result(raise_on_failure=False)
    assert isinstance(outcome, SymbolsFailedError)
    by_symbol = {r.symbol: r for r in outcome.results}
    assert by_symbol["DELISTED"].status == "failed"
    assert "No data found, symbol may be delisted" in by_symbol["DELISTED"].error
    assert "DELISTED" in str(outcome)
    for symbol in ("AAPL", "MSFT"):
        assert by_symbol[symbol].status == "ok"
        assert len(configured.read_bars(symbol)) == by_symbol[symbol].rows_written == 65
    # Each symbol's outcome is also a `pipeline_metrics` row, stored like bars.
    metrics = {s: configured.read_metrics(s).iloc[-1] for s in ("AAPL", "DELISTED", "MSFT")}
    assert (metrics["DELISTED"]["failed"], metrics["DELISTED"]["ok"], metrics["DELISTED"]["rows_written"]) == (1, 0, 0)
    assert (metrics["AAPL"]["ok"], metrics["AAPL"]["rows_written"], metrics["AAPL"]["requests"]) == (1, 65, 1)


def test_a_large_run_is_split_into_child_flow_runs_of_bounded_task_runs(
    configured: DuckDBStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MARKETPIPE__COLLECTION__SYMBOLS_PER_FLOW_RUN", "2")
    symbols = ["AAPL", "MSFT", "DELISTED", "NVDA", "AMZN"]
    state = market_data(symbols, start=date(2024, 1, 1), end=date(2024, 1, 31), return_state=True)
    outcome = state.result(raise_on_failure=False)
    assert isinstance(outcome, SymbolsFailedError)  # DELISTED, in the second part: the others are stored
    assert [(r.symbol, r.status) for r in outcome.results] == [
        (s, "failed" if s == "DELISTED" else "ok") for s in symbols
    ]
    assert all(len(configured.read_bars(s)) == 23 for s in symbols if s != "DELISTED")

    async def runs() -> tuple[list[Any], dict[str, int]]:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import (
            FlowRunFilter,
            FlowRunFilterParentFlowRunId,
            LogFilter,
            LogFilterFlowRunId,
        )

        async with get_client() as client:
            children = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[state.state_details.flow_run_id])
                )
            )
            counts = {}
            for child in children:  # the suite's server runs no services, so task runs are counted by their logs
                logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[child.id])))
                counts[str(child.name)] = len({log.task_run_id for log in logs if log.task_run_id is not None})
            return children, counts

    children, counts = asyncio.run(runs())
    for _ in range(60):  # the server records task runs from their events, a moment later
        if sum(counts.values()) >= 13:  # 3 + 4 + 6
            break
        time.sleep(0.5)
        children, counts = asyncio.run(runs())
    assert sorted(counts) == [f"market-data-yahoo_finance-1d-part-{n}-of-3" for n in (1, 2, 3)]
    assert sorted(counts.values()) == [3, 4, 6]  # collect, process and store per symbol; DELISTED stops at collect
    assert all(child.state is not None and child.state.is_completed() for child in children)


def test_summary_is_published_as_a_table_artifact(configured: DuckDBStore) -> None:
    state = market_data(["AAPL", "DELISTED"], start=date(2024, 1, 1), end=date(2024, 1, 31), return_state=True)
    flow_run_id = state.state_details.flow_run_id

    async def artifacts() -> list[Any]:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
            )

    (artifact,) = [a for a in asyncio.run(artifacts()) if a.key == "market-data-summary"]
    assert artifact.type == "table"
    rows = artifact.data if isinstance(artifact.data, list) else __import__("json").loads(artifact.data)
    assert {r["symbol"]: r["status"] for r in rows} == {"AAPL": "ok", "DELISTED": "failed"}
    assert {r["symbol"]: r["rows_written"] for r in rows}["AAPL"] == 23


def test_rerunning_the_same_window_changes_nothing(configured: DuckDBStore, tmp_path: Path) -> None:
    market_data(["AAPL"], start=date(2024, 1, 1), end=date(2024, 6, 28))
    first = configured.read_bars("AAPL")
    market_data(["AAPL"], start=date(2024, 1, 1), end=date(2024, 6, 28))
    second = configured.read_bars("AAPL")
    assert len(first) == 130
    assert first.equals(second)


def test_vendor_files_flow_through_the_same_pipeline(
    prefect_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    shutil.copy(YAHOO / "yahoo-finance2_v7download_EURGBP=X_2019-09_1d_csv_with_null_rows.csv", dumps / "EURGBP=X.csv")
    shutil.copy(YAHOO / "yahoo-finance2_v7download_NVDA_splits_2021-02_2022-01.csv", dumps / "NVDA.splits.csv")
    monkeypatch.setenv("MARKETPIPE__DATA_SOURCES__FILES__PATH", str(dumps))
    monkeypatch.setenv("MARKETPIPE__STORAGE__DUCKDB__PATH", prefect_env["MARKETPIPE__STORAGE__DUCKDB__PATH"])
    summary = market_data(["EURGBP=X", "NVDA"], source="files", start=date(2019, 1, 1), end=date(2022, 12, 31))
    rows = {r["symbol"]: r for r in summary}
    assert rows["EURGBP=X"]["status"] == "ok" and rows["NVDA"]["status"] == "ok"
    store = DuckDBStore(path=prefect_env["MARKETPIPE__STORAGE__DUCKDB__PATH"])
    stored = store.read_bars("EURGBP=X", source="files")
    assert len(stored) == rows["EURGBP=X"]["rows_written"] == 5  # 25 rows, 20 of them `null`
    assert rows["EURGBP=X"]["dropped"] == {"missing_dropped": 20}
    (split,) = store.read_corporate_actions("NVDA").itertuples()
    assert (split.kind, split.ratio, split.time) == ("split", 4.0, pd.Timestamp("2021-07-20", tz="UTC"))


def test_an_explicit_window_of_five_new_days_stores_what_a_full_run_stores(
    configured: DuckDBStore, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    market_data(["AAPL"], start=date(2022, 1, 3), end=date(2023, 12, 29))
    market_data(["AAPL"], start=date(2024, 1, 1), end=date(2024, 1, 5))  # the next 5 trading days
    incremental = configured.read_bars("AAPL", start=pd.Timestamp("2024-01-01", tz="UTC").to_pydatetime())

    whole = tmp_path / "whole.duckdb"
    monkeypatch.setenv("MARKETPIPE__STORAGE__DUCKDB__PATH", str(whole))
    market_data(["AAPL"], start=date(2022, 1, 3), end=date(2024, 1, 5))
    full = DuckDBStore(path=str(whole)).read_bars("AAPL", start=pd.Timestamp("2024-01-01", tz="UTC").to_pydatetime())

    assert len(incremental) == len(full) == 5
    for column in (
        "sma_20",
        "ema_20",
        "rsi_14",
        "macd_12_26_9",
        "macd_signal_12_26_9",
        "bb_upper_20_2",
        "atr_14",
        "obv",
    ):
        assert incremental[column].notna().all()
    values = [c for c in full.columns if c not in ("time", "symbol", "interval", "source")]
    assert sorted(incremental.columns) == sorted(full.columns)
    assert {"return_1", "log_return_1", "adj_open", "flag_spike"} <= set(values)
    for column in values:  # indicators, returns, adjusted prices and flags alike
        np.testing.assert_allclose(incremental[column], full[column], rtol=1e-9, atol=0, err_msg=column)


def test_a_source_that_cannot_work_fails_the_run_before_any_symbol(
    configured: DuckDBStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ALPHA_VANTAGE_API_KEY", raising=False)
    state = market_data(["IBM", "MSFT"], source="alpha_vantage", return_state=True)
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, ConfigError)
    assert "ALPHA_VANTAGE_API_KEY" in str(error)


def test_a_store_and_spool_that_take_nothing_still_give_the_summary(
    configured: DuckDBStore, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The run's metrics fail like its bars; that must not hide which symbols lost their bars and why."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("MARKETPIPE__STORAGE__BACKEND", "influxdb_v1")
    monkeypatch.setenv("MARKETPIPE__STORAGE__INFLUXDB_V1__URL", f"http://127.0.0.1:{free_port()}")  # nothing there
    monkeypatch.setenv("MARKETPIPE__STORAGE__SPOOL_DIR", str(blocker / "spool"))
    state = market_data(["AAPL", "MSFT"], start=date(2024, 1, 1), end=date(2024, 1, 31), return_state=True)
    assert state.is_failed()
    outcome = state.result(raise_on_failure=False)
    assert isinstance(outcome, SymbolsFailedError), outcome
    for result in outcome.results:
        assert result.status == "failed"
        # Nothing was fetched for a store that can't say what it holds: the next run collects it.
        assert "the store could not give the history" in result.error and "nothing was fetched" in result.error
        assert "the next run collects" in result.error and result.requests == 0
    assert (
        "is unreachable" in outcome.metrics_error
        and "pipeline_metrics rows could not be spooled" in outcome.metrics_error
    )
    assert str(outcome).startswith("2 of 2 symbol(s) failed; AAPL: ")
    assert "the run's pipeline_metrics were not recorded" in str(outcome)


def test_a_batch_write_the_store_refuses_is_written_symbol_by_symbol(configured: DuckDBStore) -> None:
    """A batch's symbols are written together; one symbol's rows the store refuses fail only that symbol."""
    from prefect import flow

    from configs.settings import load_settings
    from tasks.bars import conform, empty_actions
    from tasks.job import Job
    from tasks.processing.pipeline import Processed
    from tasks.store import store_batch

    def processed(symbol: str, **extra: float) -> Processed:
        bars = conform(
            pd.DataFrame(
                {
                    "time": pd.date_range("2024-01-01", periods=5, freq="D", tz="UTC"),
                    "symbol": symbol,
                    "interval": "1d",
                    "source": "yahoo_finance",
                    **dict.fromkeys(("open", "high", "low", "close", "adj_close", "volume"), 1.0),
                    **extra,
                }
            )
        )
        return Processed(bars, empty_actions(), bars.iloc[:0], collected=5, live_bars_skipped=0)

    @flow(validate_parameters=False)
    def write(batch: dict[str, Processed]) -> dict[str, Any]:
        job = Job.build(load_settings(), "yahoo_finance", "1d", date(2024, 1, 1), date(2024, 1, 5))
        return store_batch(batch, job)

    together = write({"AAA": processed("AAA"), "BBB": processed("BBB")})
    assert {s: (r.bars, r.spooled, r.refused) for s, r in together.items()} == {"AAA": (5, 0, {}), "BBB": (5, 0, {})}

    alone = write({"CCC": processed("CCC"), "BAD": processed("BAD", **{"Not-Snake": 2.0}), "DDD": processed("DDD")})
    assert "lowercase snake_case" in alone["BAD"].refused["bars"] and alone["BAD"].bars == 0
    assert {s: (alone[s].bars, alone[s].refused) for s in ("CCC", "DDD")} == {"CCC": (5, {}), "DDD": (5, {})}
    assert {s: len(configured.read_bars(s)) for s in ("AAA", "BBB", "CCC", "DDD", "BAD")} == {
        "AAA": 5,
        "BBB": 5,
        "CCC": 5,
        "DDD": 5,
        "BAD": 0,
    }
