"""End to end: a second `marketpipe run` over a source that changed its mind leaves exactly its truth.

Two runs over the replay sandbox into the real store (DuckDB, and the real InfluxDB 1.x): the second
run's payload, Yahoo's real QQQ 2020 series, makes one bar invalid (quarantined) and empties one
bar's adjclose. `marketpipe query` and `query --quarantine` must then show what one run of the
second payload into an empty store shows: no stale clean copy, no stale adj_close.
"""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from tests.conftest import REPLAY_FILES, Sandbox, marketpipe, query_csv, yahoo_json

RUN = ("run", "--symbols", "QQQ", "--start", "2020-01-01", "--end", "2020-12-31")
BROKEN, UNADJUSTED = 100, 150  # positions in the payload: a bar the second run quarantines, one it can't adjust


def second_payload(first: dict[str, Any]) -> dict[str, Any]:
    """The first payload as the source restates it: one bar's high below its low, one adjclose null."""
    payload = copy.deepcopy(first)
    chart = payload["chart"]["result"][0]
    quote = chart["indicators"]["quote"][0]
    quote["high"][BROKEN] = quote["low"][BROKEN] - 1.0
    chart["indicators"]["adjclose"][0]["adjclose"][UNADJUSTED] = None
    return payload


@pytest.fixture(params=["duckdb", "influxdb_v1"])
def store_env(request: pytest.FixtureRequest, prefect_env: dict[str, str]) -> dict[str, str]:
    """The run's environment for one backend; ``database`` is chosen per store by :func:`into`."""
    if request.param == "duckdb":
        return {**prefect_env, "MARKETPIPE__STORAGE__BACKEND": "duckdb"}
    url: str = request.getfixturevalue("influxdb_url")
    return {**prefect_env, "MARKETPIPE__STORAGE__BACKEND": "influxdb_v1", "MARKETPIPE__STORAGE__INFLUXDB_V1__URL": url}


def into(env: dict[str, str], tmp_path: Path, name: str) -> dict[str, str]:
    """``env`` writing into a store of its own: a DuckDB file or an InfluxDB database, and its spool."""
    return {
        **env,
        "MARKETPIPE__STORAGE__DUCKDB__PATH": str(tmp_path / f"{name}.duckdb"),
        "MARKETPIPE__STORAGE__INFLUXDB_V1__DATABASE": f"{name}_{uuid.uuid4().hex[:8]}",
        "MARKETPIPE__STORAGE__SPOOL_DIR": str(tmp_path / f"{name}-spool"),
    }


@pytest.fixture
def replay(tmp_path: Path) -> Iterator[tuple[Path, Sandbox]]:
    directory = tmp_path / "replay"
    directory.mkdir()
    server = Sandbox("--replay", str(directory), log=tmp_path / "replay.log")
    yield directory, server
    server.stop()


def run(env: dict[str, str], sandbox: Sandbox) -> None:
    result = marketpipe(*RUN, env={**env, "MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__BASE_URL": sandbox.base_url})
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_second_run_leaves_exactly_its_own_truth_in_bars_and_quarantine(
    store_env: dict[str, str], replay: tuple[Path, Sandbox], tmp_path: Path
) -> None:
    directory, sandbox = replay
    first = yahoo_json(REPLAY_FILES["QQQ"])
    served = directory / "QQQ.json"
    twice, once = into(store_env, tmp_path, "twice"), into(store_env, tmp_path, "once")

    served.write_text(json.dumps(first))
    run(twice, sandbox)
    before = query_csv(twice, "QQQ")
    assert len(before) == len(first["chart"]["result"][0]["timestamp"])  # so a payload position is a row
    assert query_csv(twice, "QQQ", "--quarantine").empty

    served.write_text(json.dumps(second_payload(first)))
    run(twice, sandbox)
    run(once, sandbox)

    bars, quarantine = query_csv(twice, "QQQ"), query_csv(twice, "QQQ", "--quarantine")
    broken, unadjusted = before["time"].iloc[BROKEN], before["time"].iloc[UNADJUSTED]
    assert broken not in set(bars["time"]), "the bar quarantined by the second run keeps no clean copy"
    assert quarantine["time"].tolist() == [broken] and quarantine["rule"].tolist() == ["ohlc_inconsistent"]
    assert len(bars) == len(before) - 1
    row = bars.loc[bars["time"] == unadjusted].iloc[0]
    assert not pd.isna(before.loc[before["time"] == unadjusted, "adj_close"].iloc[0])
    assert pd.isna(row["adj_close"]) and pd.isna(row["adj_open"]), "an emptied adjclose reads back empty"
    # Exactly what one run of the second payload into an empty store leaves, every column.
    pd.testing.assert_frame_equal(bars, query_csv(once, "QQQ"), check_exact=True)
    pd.testing.assert_frame_equal(quarantine, query_csv(once, "QQQ", "--quarantine"), check_exact=True)
