"""Real time end to end: the sandbox's simulated market on a fast clock, the loop, a real store.

An hour of a 1m session for 20 symbols is replayed at 30x (two minutes of the wall), then checked
against the market the sandbox simulates (every completed minute once, with its complete values)
and against a batch `marketpipe run` over the same bars (the indicators, to 1e-9).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import exchange_calendars as xc
import httpx
import numpy as np
import pandas as pd
import pytest

from blocks.duckdb_store import DuckDBStore
from configs.settings import load_settings
from flows import sandbox_market
from tasks.processing.indicators import indicator_columns
from tasks.realtime.clock import SimulatedClock
from tasks.realtime.engine import FIRST_DAYS, Realtime, RealtimeOptions
from tasks.realtime.sessions import TradingHours
from tests.conftest import BIN, REPO, Sandbox, marketpipe
from tests.servers import free_port

SYMBOLS_20 = [f"RT{chr(65 + i)}" for i in range(20)]
SPEED = 30.0


def nyse() -> xc.ExchangeCalendar:
    return xc.get_calendar("XNYS", start=pd.Timestamp(datetime.now(UTC).date()) - pd.Timedelta(days=60))


def last_full_session() -> pd.Timestamp:
    """The latest NYSE session that closed before today: the sandbox's market replays it."""
    today = pd.Timestamp(datetime.now(UTC).date())
    return pd.Timestamp(nyse().sessions_in_range(today - pd.Timedelta(days=10), today - pd.Timedelta(days=1))[-1])


def session_clock(minutes_after_open: float) -> SimulatedClock:
    opened = nyse().session_open(last_full_session()).timestamp()
    return SimulatedClock(opened + minutes_after_open * 60, time.time(), SPEED)


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    values = {
        "MARKETPIPE__STORAGE__BACKEND": "duckdb",
        "MARKETPIPE__STORAGE__DUCKDB__PATH": str(tmp_path / "realtime.duckdb"),
        "MARKETPIPE__STORAGE__SPOOL_DIR": str(tmp_path / "spool"),
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return {**os.environ, **values}


def complete_bars(symbol: str, first: float, last: float) -> pd.DataFrame:
    """The market's bars as they are once complete: what every stored final bar must equal."""
    frame = sandbox_market.bars(symbol, "1m", first, last, now=last + 86_400)
    frame["time"] = pd.to_datetime(frame["timestamp"], unit="s", utc=True)
    return frame.set_index("time")


def test_an_hour_of_session_for_20_symbols_stores_each_completed_minute_once_as_a_batch_run_would(
    env: dict[str, str], tmp_path: Path, prefect_env: dict[str, str]
) -> None:
    clock = session_clock(minutes_after_open=60)
    sandbox = Sandbox("--clock", clock.spec, log=tmp_path / "sandbox.log")
    try:
        os.environ["MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__BASE_URL"] = sandbox.base_url
        settings = load_settings(None)
        store = DuckDBStore(path=env["MARKETPIPE__STORAGE__DUCKDB__PATH"])
        loop = Realtime(settings, RealtimeOptions(SYMBOLS_20, poll_seconds=5, poll_delay=1), store, clock)
        started_at = clock.time()
        summary = loop.run(threading.Event(), duration=3600 / SPEED)
        ended_at = clock.time()
        assert ended_at - started_at >= 3600
        assert not summary.errors and not summary.holes and summary.poll_errors == 0

        first_day = datetime.fromtimestamp(started_at, UTC).date() - timedelta(days=FIRST_DAYS)
        first = datetime.combine(first_day, datetime.min.time(), UTC).timestamp()
        hours = TradingHours("XNYS")
        # Bars that closed at least a poll's delay and one retry before the end must all be there.
        expected = [t for t in hours.bar_starts("1m", first, ended_at) if t + 60 + 6 <= ended_at]
        for symbol in SYMBOLS_20:
            stored = store.read_bars(symbol, "1m", "yahoo_finance").set_index("time")
            assert stored.index.is_unique
            times = stored.index.astype("int64") // 10**9
            assert set(times) >= set(expected), f"{symbol}: minutes missing"
            assert times.max() + 60 <= ended_at, f"{symbol}: a bar stored before its minute ended"
            truth = complete_bars(symbol, first, ended_at).loc[stored.index]
            for column in ("open", "high", "low", "close", "volume"):
                np.testing.assert_array_equal(stored[column], truth[column], err_msg=f"{symbol} {column}")
            assert (stored["flag_provisional"] == 0).all()

        # Each bar of the hour was written once, right after its minute closed, never before.
        live = [(s.symbol, s.start) for s in summary.latencies]
        assert len(live) == len(set(live)) >= 20 * 55
        assert all(s.written >= s.close for s in summary.latencies)
        assert summary.polls <= 20 * (1 + 62 + 5)  # one poll per symbol and minute, and a few retries

        # A batch run over the same bars computes the same indicators.
        batch_env = {**prefect_env, **{k: v for k, v in env.items() if k.startswith("MARKETPIPE__")}}
        batch_env["MARKETPIPE__STORAGE__DUCKDB__PATH"] = str(tmp_path / "batch.duckdb")
        batch_env["MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__BASE_URL"] = sandbox.base_url
        result = marketpipe(
            "run", "--symbols", ",".join(SYMBOLS_20), "--interval", "1m", "--start", str(first_day), env=batch_env
        )
        assert result.returncode == 0, result.stdout + result.stderr
    finally:
        sandbox.stop()
        os.environ.pop("MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__BASE_URL", None)
    batch = DuckDBStore(path=batch_env["MARKETPIPE__STORAGE__DUCKDB__PATH"])
    columns = indicator_columns(settings.indicators)
    for symbol in SYMBOLS_20:
        ours = store.read_bars(symbol, "1m", "yahoo_finance").set_index("time")
        theirs = batch.read_bars(symbol, "1m", "yahoo_finance").set_index("time")
        common = ours.index.intersection(theirs.index)
        assert len(common) >= len(ours) - 2
        for column in columns:
            np.testing.assert_allclose(
                ours.loc[common, column], theirs.loc[common, column], rtol=1e-9, atol=1e-9, err_msg=f"{symbol} {column}"
            )


def realtime_child(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(BIN / "marketpipe"), "realtime", *args],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_killed_and_started_again_it_leaves_no_gap_and_sigterm_stops_it_gracefully(
    env: dict[str, str], tmp_path: Path, prefect_env: dict[str, str]
) -> None:
    clock = session_clock(minutes_after_open=120)
    sandbox = Sandbox("--clock", clock.spec, log=tmp_path / "sandbox.log")
    child_env = {**prefect_env, **{k: v for k, v in env.items() if k.startswith("MARKETPIPE__")}}
    child_env["MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__BASE_URL"] = sandbox.base_url
    symbols = "AAPL,MSFT,SPY"
    try:
        first = realtime_child(child_env, "--symbols", symbols, "--clock", clock.spec)
        time.sleep(25)  # the import, the flow run, the backfill, then some minutes of session
        first.kill()
        first.wait(timeout=10)
        killed_at = clock.time()
        time.sleep(6)  # three minutes of the session pass with nothing running
        port = free_port()
        second = realtime_child(
            child_env, "--symbols", symbols, "--clock", clock.spec, "--health-port", str(port), "--health-host",
            "127.0.0.1",
        )  # fmt: skip
        health = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and health is None:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
            except httpx.TransportError:
                time.sleep(0.5)
        assert health is not None and health.status_code == 200, "no /healthz from the running loop"
        assert health.json()["status"] == "ok"
        time.sleep(8)
        ended_at = clock.time()  # what closed after this is the next start's to backfill
        second.send_signal(signal.SIGTERM)
        out, err = second.communicate(timeout=30)
        assert second.returncode == 0, out + err
    finally:
        sandbox.stop()
    summary = json.loads(out[out.index("{") :])
    assert summary["final_bars"] > 0 and not summary["holes"]
    store = DuckDBStore(path=env["MARKETPIPE__STORAGE__DUCKDB__PATH"])
    hours = TradingHours("XNYS")
    for symbol in symbols.split(","):
        stored = store.read_bars(symbol, "1m", "yahoo_finance")
        times = set((stored["time"].astype("int64") // 10**9).tolist())
        expected = [t for t in hours.bar_starts("1m", min(times), ended_at) if t + 60 + 6 <= ended_at]
        missing = sorted(set(expected) - times)
        assert not missing, (
            f"{symbol}: {len(missing)} minute(s) missing, from {pd.Timestamp(missing[0], unit='s')}; "
            f"killed at {pd.Timestamp(killed_at, unit='s')}, stopped at {pd.Timestamp(ended_at, unit='s')}"
        )
        assert max(times) > killed_at, "the second run stored nothing after the kill"


def test_streamed_bars_are_provisional_until_the_polled_ones_replace_them_through_drops_silence_and_garbage(
    env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = session_clock(minutes_after_open=200)
    sandbox = Sandbox("--clock", clock.spec, "--stream-port", "0", log=tmp_path / "sandbox.log")
    assert sandbox.streamer is not None
    monkeypatch.setenv("MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__BASE_URL", sandbox.base_url)
    monkeypatch.setenv("MARKETPIPE__REALTIME__SILENCE_SECONDS", "1.5")
    symbols = ["AAPL", "MSFT", "NVDA"]
    settings = load_settings(None)
    store = DuckDBStore(path=env["MARKETPIPE__STORAGE__DUCKDB__PATH"])
    options = RealtimeOptions(symbols, mode="stream", poll_seconds=5, poll_delay=1, stream_url=sandbox.streamer.url)
    loop = Realtime(settings, options, store, clock)
    stop = threading.Event()
    runner = threading.Thread(target=lambda: loop.run(stop, duration=40))
    try:
        runner.start()
        time.sleep(12)
        sandbox.streamer.drop_connections()
        time.sleep(5)
        sandbox.streamer.silence(3)
        time.sleep(6)
        sandbox.streamer.send_malformed(5)
        runner.join(timeout=60)
        assert not runner.is_alive()
    finally:
        stop.set()
        sandbox.stop()
    summary, stats = loop.summary, loop.stream_stats
    assert stats.reconnects >= 2 and stats.silences >= 1 and stats.malformed >= 5, stats
    assert summary.provisional >= 3 * 10, "the streamer's bars were not stored"
    reconciled = [s.reconciled for s in loop.series.values()]
    replaced = sum(r.replaced for r in reconciled)
    assert replaced >= summary.provisional - 3 * 2  # all but the last minute or two were replaced by polls
    assert sum(r.differing for r in reconciled) > 0  # sampled ticks miss highs, lows and volume
    latencies = summary.percentiles(provisional=True)
    assert latencies["p95"] <= 1.5 * SPEED, latencies  # within 1.5 s of the wall after the minute's close
    for symbol in symbols:
        stored = store.read_bars(symbol, "1m", "yahoo_finance").set_index("time")
        final = stored[stored["flag_provisional"] == 0]
        truth = complete_bars(symbol, stored.index[0].timestamp(), clock.time()).loc[final.index]
        for column in ("open", "high", "low", "close", "volume"):
            np.testing.assert_array_equal(final[column], truth[column], err_msg=f"{symbol} {column}")
        assert (stored["flag_provisional"] == 1).sum() <= 2  # only the newest minutes still wait for a poll


def test_alpha_vantage_intraday_is_polled_too(
    env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = SimulatedClock(session_clock(minutes_after_open=90).start, time.time(), 60.0)
    sandbox = Sandbox("--clock", clock.spec, log=tmp_path / "sandbox.log")
    monkeypatch.setenv("MARKETPIPE__DATA_SOURCES__ALPHA_VANTAGE__BASE_URL", sandbox.alpha_vantage_url)
    monkeypatch.setenv("ALPHA_VANTAGE_API_KEY", "sandbox-key")
    monkeypatch.setenv("MARKETPIPE__DATA_SOURCES__ALPHA_VANTAGE__RATE_LIMIT", "360000")
    monkeypatch.setenv("MARKETPIPE__DATA_SOURCES__ALPHA_VANTAGE__REQUESTS_PER_MINUTE", "6000")
    monkeypatch.setenv("MARKETPIPE__DATA_SOURCES__ALPHA_VANTAGE__REQUESTS_PER_DAY", "100000")
    store = DuckDBStore(path=env["MARKETPIPE__STORAGE__DUCKDB__PATH"])
    options = RealtimeOptions(["IBM"], source="alpha_vantage", interval="5m", poll_seconds=5, poll_delay=1)
    loop = Realtime(load_settings(None), options, store, clock)
    started_at = clock.time()
    try:
        summary = loop.run(threading.Event(), duration=20)
    finally:
        sandbox.stop()
    assert not summary.errors and summary.final > 0
    stored = store.read_bars("IBM", "5m", "alpha_vantage").set_index("time")
    live = list(summary.latencies)
    assert len(live) >= 3 and all(s.start >= started_at - 300 for s in live)  # the bars of the run only
    frame = sandbox_market.bars("IBM", "5m", stored.index[0].timestamp(), clock.time(), now=clock.time() + 86_400)
    truth = frame.set_index(pd.to_datetime(frame["timestamp"], unit="s", utc=True)).loc[stored.index]
    for column in ("open", "high", "low", "close", "volume"):
        np.testing.assert_allclose(stored[column], truth[column], rtol=1e-12, err_msg=column)
    requests = [r for r in sandbox.requests() if r["params"].get("function") == "TIME_SERIES_INTRADAY"]
    backfill = [r for r in requests if "month" in r["params"]]  # the days before: whole months
    polls = [r for r in requests if "month" not in r["params"]]
    assert backfill and len(polls) >= 3
    assert all(r["params"].get("outputsize") == "compact" for r in polls)  # then only the newest 100 bars
