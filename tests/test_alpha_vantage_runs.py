"""Alpha Vantage runs end to end: `marketpipe run` against the sandbox into DuckDB, over several runs.

Weekly and monthly series across a period's end (the unfinished period is keyed by its latest
trading day, the final bar by another), and a compact first run whose 100 bars cover less than
the window it asked for.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path

import exchange_calendars as xc
import pandas as pd
import pytest

from blocks.duckdb_store import DuckDBStore
from flows.sandbox import synthetic_series
from tests.conftest import Sandbox, marketpipe, query_csv

SYMBOL = "IBM"


@pytest.fixture
def env(prefect_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    return {
        **prefect_env,
        "ALPHA_VANTAGE_API_KEY": "periods-test-key",
        "MARKETPIPE__COLLECTION__RATE_LIMIT_DIR": str(tmp_path / "rate-limits"),
        "MARKETPIPE__DATA_SOURCES__ALPHA_VANTAGE__RATE_LIMIT": "36000",
    }


@pytest.fixture
def sandboxes(tmp_path: Path) -> Iterator[list[Sandbox]]:
    started: list[Sandbox] = []
    yield started
    for server in started:
        server.stop()


def run_at(now: datetime | None, env: dict[str, str], tmp_path: Path, started: list[Sandbox], *args: str) -> str:
    """One `marketpipe run` against a sandbox whose clock says ``now`` (None: the real one); returns its stdout."""
    clock = ("--now", now.isoformat()) if now else ()
    server = Sandbox(*clock, log=tmp_path / f"sandbox-{len(started)}.log")
    started.append(server)
    try:
        url = {"MARKETPIPE__DATA_SOURCES__ALPHA_VANTAGE__BASE_URL": server.alpha_vantage_url}
        result = marketpipe("run", "--source", "alpha_vantage", "--symbols", SYMBOL, *args, env={**env, **url})
    finally:
        server.stop()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def after_close(day: date) -> datetime:
    """22:00 UTC: after New York's 16:00 close in winter and in summer."""
    return datetime.combine(day, time(22, 0), UTC)


def expected_period(first: date, last: date, done_by: datetime) -> dict[str, float]:
    """The sandbox's daily bars in [first, last] completed by ``done_by``, aggregated as a period's bar."""
    daily = synthetic_series(SYMBOL)
    days = daily[(daily["date"] >= first.isoformat()) & (daily["date"] <= last.isoformat())]
    days = days[days["closes_at"] <= done_by.timestamp()]
    return {
        "open": days["open"].iloc[0],
        "high": days["high"].max(),
        "low": days["low"].min(),
        "close": days["close"].iloc[-1],
        "volume": days["volume"].sum(),
    }


def this_monday() -> date:
    today = datetime.now(UTC).date()
    return today - timedelta(days=today.weekday())


def month_start(day: date, months_back: int) -> date:
    index = day.year * 12 + day.month - 1 - months_back
    return date(index // 12, index % 12 + 1, 1)


WEEK = this_monday() - timedelta(weeks=2)
MONTH = month_start(datetime.now(UTC).date(), 2)
NEXT_MONTH = month_start(datetime.now(UTC).date(), 1)
# interval: the period that ends between the runs, its last day, the first run's and the second run's clock
DAY = timedelta(days=1)
CASES = {
    "1wk": (WEEK, WEEK + 4 * DAY, after_close(WEEK + 2 * DAY), after_close(WEEK + 7 * DAY)),
    "1mo": (MONTH, NEXT_MONTH - DAY, after_close(MONTH + 9 * DAY), after_close(NEXT_MONTH + 6 * DAY)),
}


@pytest.mark.parametrize("interval", sorted(CASES))
def test_a_period_run_twice_across_its_end_keeps_one_bar_the_final_one(
    interval: str, env: dict[str, str], tmp_path: Path, sandboxes: list[Sandbox]
) -> None:
    period, last_day, first_now, second_now = CASES[interval]
    run_at(first_now, env, tmp_path, sandboxes, "--interval", interval)
    partial = query_csv(env, SYMBOL, "--interval", interval)
    run_at(second_now, env, tmp_path, sandboxes, "--interval", interval)  # incremental: the overlap
    stored = query_csv(env, SYMBOL, "--interval", interval)

    periods = pd.DatetimeIndex(pd.to_datetime(stored["time"], utc=True)).tz_localize(None)
    period_of = periods.to_period("W-SUN" if interval == "1wk" else "M")
    twice = list(stored["time"][period_of.duplicated(keep=False)])
    assert period_of.is_unique, f"a period has more than one bar: {twice}"
    assert (periods == period_of.start_time).all()  # every bar at its period's first day
    stamp = f"{period.isoformat()}T00:00:00Z"
    assert partial["time"].iloc[-1] == stamp  # the first run's unfinished period, stamped at its first day
    assert partial["close"].iloc[-1] == pytest.approx(expected_period(period, last_day, first_now)["close"])
    assert stored["time"].is_monotonic_increasing
    final = stored.loc[stored["time"] == stamp].iloc[0]
    for column, value in expected_period(period, last_day, second_now).items():
        assert final[column] == pytest.approx(value, rel=1e-9), column
    # The next period has begun in the second run: it is the new unfinished bar.
    assert pd.Timestamp(stored["time"].iloc[-1]) > pd.Timestamp(stamp)


def summary(stdout: str, symbol: str) -> dict[str, str]:
    """The symbol's row of the printed summary table, by column name."""
    lines = stdout.splitlines()
    header = next(line.split("┃")[1:-1] for line in lines if line.count("┃") > 5)
    rows = [line.split("│")[1:-1] for line in lines if line.count("│") > 5]
    row = next(row for row in rows if row[0].strip() == symbol)
    return {name.strip(): cell.strip() for name, cell in zip(header, row, strict=True)}


def test_a_compact_first_run_reports_the_part_of_its_window_it_did_not_get(
    env: dict[str, str], tmp_path: Path, sandboxes: list[Sandbox]
) -> None:
    """outputsize compact sends 100 daily bars for a 730-day window; the hole is counted, and stays counted."""
    today = datetime.now(UTC).date()
    window_start = today - timedelta(days=730)
    first = run_at(None, env, tmp_path, sandboxes)
    stored = query_csv(env, SYMBOL)
    assert len(stored) == 100
    first_bar = date.fromisoformat(stored["time"].iloc[0][:10])
    # Independently: the NYSE sessions from the window's start to the day before the first bar.
    hole = len(xc.get_calendar("XNYS").sessions_in_range(window_start.isoformat(), first_bar - timedelta(days=1)))
    assert hole > 300

    row = summary(first, SYMBOL)
    assert row["missing sessions"] == str(hole), first
    assert row["history from"] == first_bar.isoformat()
    assert row["window"].startswith(f"{window_start} to {today} (initial)")
    said = " ".join(first.split())
    assert f"the source's bars start {first_bar}, after the window's start {window_start}: {hole} sessions" in said
    assert "with outputsize: compact; set data_sources.alpha_vantage.outputsize: full" in said
    assert f"--symbols {SYMBOL} --interval 1d --start {window_start}`" in said

    second = run_at(None, env, tmp_path, sandboxes)  # incremental: collects only the last days again
    row = summary(second, SYMBOL)
    assert "(incremental)" in row["window"]
    assert row["missing sessions"] == str(hole), second
    said = " ".join(second.split())
    assert f"stored history starts {first_bar}, after {window_start}" in said
    assert f"{hole} sessions have no bar" in said and f"--start {window_start}" in said

    metrics = DuckDBStore(path=env["MARKETPIPE__STORAGE__DUCKDB__PATH"]).read_metrics(SYMBOL, "alpha_vantage")
    assert len(metrics) == 2
    assert metrics["missing_sessions"].tolist() == [hole, hole]
    assert metrics["uncovered_sessions"].tolist() == [hole, hole]
