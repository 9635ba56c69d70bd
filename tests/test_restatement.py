"""A split and a dividend between two runs: the stored series is restated, equal to one full run.

AAPL's real 2020 Yahoo payload (4-for-1 split on 2020-08-31, dividends on 2020-08-07 and
2020-11-06) is served as it is, and, for the first run, as it looked on 2020-08-05: cut there,
prices four times higher, volumes a quarter, and ``adjclose`` not yet adjusted for the later
dividends. The second run is incremental, as a daily schedule runs it.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from blocks.duckdb_store import DuckDBStore
from blocks.influxdb_v1_store import InfluxDBV1Store
from blocks.store import BarStore
from configs.indicators import default_indicators
from configs.settings import QualitySettings
from tasks.collect import read_stored
from tasks.processing.indicators import lookback_bars
from tasks.processing.pipeline import process
from tasks.restatement import restatement_reason
from tasks.sources.base import Collected
from tasks.sources.yahoo_finance import parse_chart_result
from tests.conftest import REPLAY_FILES, Sandbox, marketpipe, yahoo_json

CUTOFF = pd.Timestamp("2020-08-06", tz="UTC")  # the first run saw bars up to 2020-08-05
SPLIT = 4.0
SOURCE = "yahoo_finance"


def as_it_was_before(payload: dict[str, Any], cutoff: pd.Timestamp) -> dict[str, Any]:
    """The chart payload as Yahoo served it before ``cutoff``: no later bars, events or adjustments."""
    before = copy.deepcopy(payload)
    result = before["chart"]["result"][0]
    times = np.asarray(result["timestamp"])
    keep = times < cutoff.timestamp()
    quote = result["indicators"]["quote"][0]
    close = np.asarray(quote["close"], dtype=float)
    adjclose = np.asarray(result["indicators"]["adjclose"][0]["adjclose"], dtype=float)
    # Undo what later dividends did to adjclose: each scaled the bars before it by (1 - amount / prior close).
    for event in result["events"]["dividends"].values():
        if event["date"] >= cutoff.timestamp():
            prior = close[times < event["date"]][-1]
            adjclose[times < event["date"]] /= 1 - event["amount"] / prior
    result["timestamp"] = times[keep].tolist()
    for name in ("open", "high", "low", "close"):
        quote[name] = (np.asarray(quote[name], dtype=float)[keep] * SPLIT).tolist()
    quote["volume"] = (np.asarray(quote["volume"], dtype=float)[keep] / SPLIT).tolist()
    result["indicators"]["adjclose"][0]["adjclose"] = (adjclose[keep] * SPLIT).tolist()
    result["events"] = {
        kind: {k: e for k, e in events.items() if e["date"] < cutoff.timestamp()}
        for kind, events in result["events"].items()
        if kind != "splits"
    }
    return before


@pytest.fixture
def aapl_replay(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    directory = tmp_path / "replay"
    directory.mkdir()
    return directory, yahoo_json(REPLAY_FILES["AAPL"])


def serve(directory: Path, payload: dict[str, Any]) -> None:
    (directory / "AAPL.json").write_text(json.dumps(payload))


def two_runs_and_one(
    env: dict[str, str], replay: Path, real: dict[str, Any], with_store: Callable[[str], dict[str, str]]
) -> tuple[str, str]:
    """The first run before the split, the incremental run after it, and one full run into another store."""
    serve(replay, as_it_was_before(real, CUTOFF))
    first = marketpipe("run", "--symbols", "AAPL", "--start", "2020-01-01", "--end", "2020-08-05", env=with_store("a"))
    assert first.returncode == 0, first.stdout + first.stderr
    serve(replay, real)
    second = marketpipe("run", "--symbols", "AAPL", "--end", "2020-12-31", env=with_store("a"))
    assert second.returncode == 0, second.stdout + second.stderr
    full = marketpipe("run", "--symbols", "AAPL", "--start", "2020-01-01", "--end", "2020-12-31", env=with_store("b"))
    assert full.returncode == 0, full.stdout + full.stderr
    return second.stdout, full.stdout


def assert_same_series(restated: BarStore, full: BarStore) -> None:
    after, once = restated.read_bars("AAPL"), full.read_bars("AAPL")
    assert len(once) == 253
    assert list(after.columns) == list(once.columns)
    pd.testing.assert_frame_equal(after, once, check_exact=False, rtol=1e-9, atol=1e-9)
    seam = after.loc[after["time"] == pd.Timestamp("2020-08-06", tz="UTC")].iloc[0]
    assert abs(seam["return_1"]) < 0.1  # the first new bar: no -75% "return" from the old scale
    pd.testing.assert_frame_equal(
        restated.read_corporate_actions("AAPL"), full.read_corporate_actions("AAPL"), check_exact=False, rtol=1e-12
    )


def test_a_split_and_a_dividend_between_runs_restate_duckdb(
    prefect_env: dict[str, str], tmp_path: Path, aapl_replay: tuple[Path, dict[str, Any]]
) -> None:
    replay, real = aapl_replay
    server = Sandbox("--replay", str(replay), log=tmp_path / "replay.log")
    try:
        env = {**prefect_env, "MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__BASE_URL": server.base_url}

        def with_store(name: str) -> dict[str, str]:
            return {**env, "MARKETPIPE__STORAGE__DUCKDB__PATH": str(tmp_path / f"{name}.duckdb")}

        summary, _ = two_runs_and_one(env, replay, real, with_store)
    finally:
        server.stop()
    assert "AAPL restated:" in summary and "dividend of 0.205 on 2020-08-07" in summary
    assert "(restated)" in summary
    assert_same_series(DuckDBStore(path=str(tmp_path / "a.duckdb")), DuckDBStore(path=str(tmp_path / "b.duckdb")))
    metrics = DuckDBStore(path=str(tmp_path / "a.duckdb")).read_metrics("AAPL")
    assert metrics["restated"].tolist() == [0.0, 1.0]


def test_a_split_and_a_dividend_between_runs_restate_influxdb_v1(
    prefect_env: dict[str, str], tmp_path: Path, aapl_replay: tuple[Path, dict[str, Any]], influxdb_url: str
) -> None:
    replay, real = aapl_replay
    server = Sandbox("--replay", str(replay), log=tmp_path / "replay.log")
    try:
        env = {
            **prefect_env,
            "MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__BASE_URL": server.base_url,
            "MARKETPIPE__STORAGE__BACKEND": "influxdb_v1",
            "MARKETPIPE__STORAGE__INFLUXDB_V1__URL": influxdb_url,
        }

        def with_store(name: str) -> dict[str, str]:
            return {**env, "MARKETPIPE__STORAGE__INFLUXDB_V1__DATABASE": f"restate_{name}"}

        summary, _ = two_runs_and_one(env, replay, real, with_store)
    finally:
        server.stop()
    assert "AAPL restated:" in summary
    assert_same_series(
        InfluxDBV1Store(url=influxdb_url, database="restate_a"), InfluxDBV1Store(url=influxdb_url, database="restate_b")
    )


def test_incremental_processing_across_a_split_equals_a_full_run(
    aapl_replay: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    """The processing half: the re-collected series, processed as the store task does, is the full run's."""
    _, real = aapl_replay
    quality, indicators = QualitySettings(), default_indicators()
    full = parse_chart_result(real["chart"]["result"][0], "AAPL", "1d")
    before = parse_chart_result(as_it_was_before(real, CUTOFF)["chart"]["result"][0], "AAPL", "1d")
    store = DuckDBStore(path=str(tmp_path / "store.duckdb"))
    store.write_bars(process(before, "AAPL", "1d", quality, indicators).bars)
    stored = store.read_bars("AAPL")
    reason = restatement_reason(full.bars, full.actions, "USD", stored, before.actions, stored["time"].iloc[0])
    assert reason is not None and "dividend of 0.205 on 2020-08-07" in reason
    lookback = lookback_bars(indicators)
    # Without a restatement, the new bars processed on the old history jump at the seam.
    new = Collected(full.bars.loc[full.bars["time"] >= CUTOFF].reset_index(drop=True), full.actions)
    seamed = process(
        new, "AAPL", "1d", quality, indicators, read_stored(store, new, "AAPL", "1d", SOURCE, lookback).bars
    )
    assert seamed.bars["return_1"].iloc[0] < -0.7
    # Restated: re-collected from the first stored bar, so no old-scale bar is left to serve as history.
    history = read_stored(store, full, "AAPL", "1d", SOURCE, lookback).bars
    assert history is None
    incremental = process(full, "AAPL", "1d", quality, indicators, history).bars
    once = process(parse_chart_result(real["chart"]["result"][0], "AAPL", "1d"), "AAPL", "1d", quality, indicators)
    pd.testing.assert_frame_equal(incremental, once.bars, check_exact=True)


def test_re_rounded_overlap_is_no_restatement() -> None:
    times = pd.date_range("2024-01-02", periods=3, freq="D", tz="UTC")
    stored = pd.DataFrame({"time": times, "close": [10.0, 11.0, 12.0], "adj_close": [9.0, 10.0, 11.0]})
    rounded = stored.assign(close=stored["close"] * (1 + 1e-9))
    actions = pd.DataFrame(columns=["time", "kind", "ratio", "amount"])
    assert restatement_reason(rounded, actions, "USD", stored, actions, times[0]) is None
    moved = stored.assign(adj_close=[8.9, 10.0, 11.0])
    reason = restatement_reason(moved, actions, "USD", stored, actions, times[0])
    assert reason is not None and "adj_close of 2024-01-02 changed from 9 to 8.9" in reason
