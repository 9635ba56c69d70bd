"""End to end: a config naming every kind of the registry runs `marketpipe run` into a real store.

Into DuckDB and the real InfluxDB 1.x, each: Tesla's real daily history (replayed) stores every
kind's columns, and each equals TA-Lib called directly over the stored bars (or the test's own
definition, for what TA-Lib lacks) within 1e-9; and a run of the sandbox's newest weeks on top of
an earlier one (reading back the stored lookback) stores what one run over the whole span stores.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pandas_ta
import pytest
import yaml
from pydantic import TypeAdapter

from configs.indicators import KINDS, IndicatorSpec
from tests.conftest import Sandbox, marketpipe, query_csv, yahoo_json
from tests.test_indicator_registry import (
    SQUEEZE,
    SQUEEZE_COLUMNS,
    assert_equal_values,
    expected_values,
    zero_crossing_atol,
)

TSLA = "yahoo-finance2_chart_TSLA_period1-0_to_2023-08-12_1d_full_history_no_dividends.json"
EVERY_KIND = [{"kind": kind} for kind in KINDS if kind != "pandas_ta"] + [SQUEEZE]


@pytest.fixture(params=["duckdb", "influxdb_v1"])
def backend(request: pytest.FixtureRequest) -> dict[str, str]:
    """The storage section's settings for one backend (its database or file chosen by :func:`config`)."""
    if request.param == "duckdb":
        return {"backend": "duckdb"}
    return {"backend": "influxdb_v1", "url": request.getfixturevalue("influxdb_url")}


def config(tmp_path: Path, name: str, backend: dict[str, str], base_url: str) -> Path:
    """A config file naming every kind, writing into a store of its own."""
    storage: dict[str, object] = {"backend": backend["backend"], "spool_dir": str(tmp_path / f"{name}-spool")}
    if backend["backend"] == "duckdb":
        storage["duckdb"] = {"path": str(tmp_path / f"{name}.duckdb")}
    else:
        storage["influxdb_v1"] = {"url": backend["url"], "database": f"{name}_{uuid.uuid4().hex[:8]}"}
    settings = {
        "data_sources": {"yahoo_finance": {"base_url": base_url, "rate_limit": 100_000}},
        "storage": storage,
        "indicators": EVERY_KIND,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


@pytest.fixture
def replay(tmp_path: Path) -> Iterator[Sandbox]:
    directory = tmp_path / "replay"
    directory.mkdir()
    (directory / "TSLA.json").write_text(json.dumps(yahoo_json(TSLA)))
    server = Sandbox("--replay", str(directory), log=tmp_path / "replay.log")
    yield server
    server.stop()


@pytest.fixture
def synthetic(tmp_path: Path) -> Iterator[Sandbox]:
    server = Sandbox(log=tmp_path / "sandbox.log")
    yield server
    server.stop()


def run(env: dict[str, str], path: Path, *args: str) -> None:
    result = marketpipe("run", "--config", str(path), *args, env=env)
    assert result.returncode == 0, result.stdout + result.stderr


def indicator_columns(frame: pd.DataFrame) -> list[str]:

    specs = TypeAdapter(list[IndicatorSpec]).validate_python(EVERY_KIND)
    columns = [column for spec in specs for column in spec.columns]
    assert set(columns) <= set(frame.columns), sorted(set(columns) - set(frame.columns))
    return columns


def test_every_kind_is_stored_as_talib_computes_it_from_the_stored_bars(
    prefect_env: dict[str, str], backend: dict[str, str], replay: Sandbox, tmp_path: Path
) -> None:
    path = config(tmp_path, "tsla", backend, replay.base_url)
    run(prefect_env, path, "--symbols", "TSLA", "--start", "2010-06-01", "--end", "2023-08-12")
    stored = query_csv(prefect_env, "TSLA", "--config", str(path))
    assert len(stored) > 3000
    columns = indicator_columns(stored)
    bars = stored.assign(time=pd.to_datetime(stored["time"], utc=True))
    expected = expected_values(bars)
    for column in columns:
        if column in SQUEEZE_COLUMNS:
            continue  # pandas-ta's own output: compared with pandas-ta below
        want = expected[column]
        assert_equal_values(bars[column].to_numpy(dtype=np.float64), want, column, zero_crossing_atol(want))
    on_talib: dict[str, Any] = {"talib": True}  # pandas-ta types its **kwargs as one dict
    squeeze = pandas_ta.squeeze(bars["high"], bars["low"], bars["close"], **on_talib)
    for ours, theirs in zip(SQUEEZE_COLUMNS, squeeze.columns, strict=True):
        np.testing.assert_allclose(bars[ours], squeeze[theirs].astype(float), rtol=1e-9, equal_nan=True, err_msg=ours)


def test_a_run_on_top_of_stored_bars_stores_what_one_run_over_the_whole_span_stores(
    prefect_env: dict[str, str], backend: dict[str, str], synthetic: Sandbox, tmp_path: Path
) -> None:
    whole, twice = (
        config(tmp_path, "whole", backend, synthetic.base_url),
        config(tmp_path, "twice", backend, synthetic.base_url),
    )
    run(prefect_env, whole, "--symbols", "SPY", "--start", "2016-01-01", "--end", "2024-06-28")
    run(prefect_env, twice, "--symbols", "SPY", "--start", "2016-01-01", "--end", "2024-05-31")
    run(prefect_env, twice, "--symbols", "SPY", "--start", "2024-06-01", "--end", "2024-06-28")
    once = query_csv(prefect_env, "SPY", "--config", str(whole), "--start", "2024-06-01")
    then = query_csv(prefect_env, "SPY", "--config", str(twice), "--start", "2024-06-01")
    assert len(once) == len(then) >= 18
    for column in indicator_columns(once):
        assert then[column].notna().all(), column
        np.testing.assert_allclose(then[column], once[column], rtol=1e-9, atol=0, err_msg=column)


def test_a_misspelt_kind_exits_2_naming_the_entry_and_the_nearest_kinds(
    prefect_env: dict[str, str], tmp_path: Path
) -> None:
    settings = {"data_sources": {"yahoo_finance": {}}, "indicators": [{"kind": "sma"}, {"kind": "stochastic"}]}
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(settings))
    result = marketpipe("run", "--config", str(path), "--symbols", "SPY", env=prefect_env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "indicators[1].kind: unknown kind 'stochastic': did you mean stochrsi or stoch?" in result.stderr
