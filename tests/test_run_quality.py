"""`marketpipe run` end to end over replayed Yahoo payloads: the day's final bar, lunch-break grids, FX bends.

Every case runs the way a user runs it: the `marketpipe` process against `marketpipe sandbox
--replay DIR` (which serves DIR/<SYMBOL>.json verbatim, whatever period is asked for; the parser
keeps the asked window), into a real DuckDB file, read back with `marketpipe query`.

The replay sandbox answers with a real ``Date`` header, which is when the payload counts as
served: a captured session long closed is final, and a payload whose ``currentTradingPeriod``
ends after the real clock has a live bar.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pandas as pd
import pytest

from blocks.duckdb_store import DuckDBStore
from tests.conftest import YAHOO, Sandbox, marketpipe, query_csv, yahoo_json

AAPL_AFTER_CLOSE = "yfinance-rs_history_chart_AAPL.json"


@pytest.fixture
def replay_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "replay"
    folder.mkdir()
    return folder


@pytest.fixture
def replay(replay_dir: Path, tmp_path: Path) -> Iterator[Sandbox]:
    server = Sandbox("--replay", str(replay_dir), log=tmp_path / "replay.log")
    yield server
    server.stop()


@pytest.fixture
def env(prefect_env: dict[str, str], replay: Sandbox) -> dict[str, str]:
    return {**prefect_env, "MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__BASE_URL": replay.base_url}


def summary_rows(stdout: str) -> dict[str, list[str]]:
    """The run's summary table, symbol -> its cells."""
    rows = [line.split("│")[1:-1] for line in stdout.splitlines() if line.count("│") > 5]
    return {cells[0].strip(): [c.strip() for c in cells] for cells in rows}


def run(env: dict[str, str], *args: str) -> str:
    result = marketpipe("run", *args, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


# -- Item 2: the day's final bar ---------------------------------------------------------------


def test_the_days_final_bar_after_the_close_is_stored(env: dict[str, str], replay_dir: Path) -> None:
    # Captured after the 2025-10-29 close: the last bar is stamped regularMarketTime (16:00:01 New York).
    shutil.copy(YAHOO / AAPL_AFTER_CLOSE, replay_dir / "AAPL.json")
    stdout = run(env, "--symbols", "AAPL", "--start", "2025-05-01", "--end", "2025-10-29")
    rows = query_csv(env, "AAPL")
    assert rows["time"].iloc[-1] == "2025-10-29T00:00:00Z"
    assert rows["close"].iloc[-1] == pytest.approx(269.7, abs=0.005)
    assert len(rows) == 126  # every bar from 2025-05-01 on
    assert "live bar" not in stdout
    metrics = DuckDBStore(path=env["MARKETPIPE__STORAGE__DUCKDB__PATH"]).read_metrics("AAPL")
    assert metrics["live_bars_skipped"].iloc[-1] == 0


def _session_open_now(zone: ZoneInfo) -> tuple[int, int, int]:
    """(bar time, session start, session end) in epoch seconds: a session open at the real clock, on today's local date."""
    now = datetime.now(UTC)
    local = now.astimezone(zone)
    midnight = datetime.combine(local.date(), datetime.min.time(), zone)
    start = max(midnight + timedelta(seconds=1), now - timedelta(hours=3))
    end = min(midnight + timedelta(days=1) - timedelta(seconds=1), now + timedelta(hours=3))
    bar = max(start, now - timedelta(seconds=60))
    return int(bar.timestamp()), int(start.timestamp()), int(end.timestamp())


def test_a_bar_whose_session_is_still_open_is_not_stored(env: dict[str, str], replay_dir: Path) -> None:
    body = yahoo_json(AAPL_AFTER_CLOSE)
    result = body["chart"]["result"][0]
    bar, start, end = _session_open_now(ZoneInfo(result["meta"]["exchangeTimezoneName"]))
    result["timestamp"].append(bar)
    for series in (result["indicators"]["quote"][0], result["indicators"]["adjclose"][0]):
        for values in series.values():
            values.append(values[-1])
    result["meta"]["regularMarketTime"] = bar
    result["meta"]["currentTradingPeriod"]["regular"].update(start=start, end=end)
    (replay_dir / "AAPL.json").write_text(json.dumps(body))
    today = datetime.now(UTC).date()
    stdout = run(env, "--symbols", "AAPL", "--start", "2025-05-01", "--end", today.isoformat())
    rows = query_csv(env, "AAPL")
    assert rows["time"].iloc[-1] == "2025-10-29T00:00:00Z"  # the earlier sessions' bars are final
    assert len(rows) == 126
    assert "AAPL: 1 live bar(s) not stored" in stdout
    metrics = DuckDBStore(path=env["MARKETPIPE__STORAGE__DUCKDB__PATH"]).read_metrics("AAPL")
    assert metrics["live_bars_skipped"].iloc[-1] == 1
