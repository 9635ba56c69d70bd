"""Benchmark: how soon after its close a bar is readable from the store, in real time.

    .venv/bin/python tests/benchmarks/realtime.py [--symbols 50] [--minutes 4] [--publish-delay 8]

Against the sandbox's simulated market (`marketpipe sandbox` in its own process, on a clock running
at the wall's pace, set inside the last full NYSE session) and a real InfluxDB 1.x (`influxd`,
started on a free loopback port), it runs `Realtime` three ways, one after another, for ``--minutes`` of bars each:

- polling with ``poll_seconds`` 5, then 15: the sandbox publishes each completed bar 0 to
  ``--publish-delay`` seconds after its close (Yahoo's bars arrive late too), so the poll interval
  decides how long a bar waits to be seen;
- streaming: Yahoo's price streamer simulated over a loopback websocket, a provisional bar per
  minute, then the polls replacing it.

A bar is readable once the store acknowledged its write (InfluxDB answers a query with a point as
soon as the write returned; the run checks that every bar it counted is there). It prints p50 / p95
/ p99 seconds from the bar's close, and from the poll that first saw it, as a markdown table.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import exchange_calendars as xc
import pandas as pd
from websockets.sync.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from blocks.influxdb_v1_store import InfluxDBV1Store
from configs.settings import load_settings
from tasks.realtime.clock import SimulatedClock
from tasks.realtime.engine import POLL, STREAM, Realtime, RealtimeOptions, Summary
from tests.servers import BIN, free_port, influxdb_server

RUNS = ((POLL, 5), (POLL, 15), (STREAM, 5))  # the mode, and how often a bar not served yet is polled again


def session_instant() -> float:
    """An hour after the open of the latest NYSE session that closed before today."""
    today = pd.Timestamp(time.strftime("%Y-%m-%d", time.gmtime()))
    nyse = xc.get_calendar("XNYS", start=today - pd.Timedelta(days=60))
    last = nyse.sessions_in_range(today - pd.Timedelta(days=10), today - pd.Timedelta(days=1))[-1]
    return float(nyse.session_open(last).timestamp()) + 3600


def run_once(
    mode: str, poll_seconds: float, symbols: list[str], minutes: float, publish_delay: float, url: str, home: Path
) -> tuple[Summary, int]:
    clock = SimulatedClock(session_instant(), time.time(), 1.0)
    port, stream_port = free_port(), free_port()
    args = ["--port", str(port), "--clock", clock.spec, "--publish-delay", str(publish_delay)]
    if mode == STREAM:
        args += ["--stream-port", str(stream_port)]
    # Its own process, as the real services are: the loop measured does not share a GIL with them.
    sandbox = subprocess.Popen([str(BIN / "marketpipe"), "sandbox", *args], stdout=subprocess.DEVNULL)
    wait_for_port(port)
    stream_url = f"ws://127.0.0.1:{stream_port}/?version=2" if mode == STREAM else None
    if stream_url is not None:
        wait_for_websocket(stream_url)
    database = f"bench_{mode}_{int(poll_seconds)}"
    os.environ |= {
        "MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__BASE_URL": f"http://127.0.0.1:{port}/v8/finance/chart/",
        "MARKETPIPE__STORAGE__BACKEND": "influxdb_v1",
        "MARKETPIPE__STORAGE__INFLUXDB_V1__URL": url,
        "MARKETPIPE__STORAGE__INFLUXDB_V1__DATABASE": database,
        "MARKETPIPE__STORAGE__SPOOL_DIR": str(home / f"spool-{database}"),
        "MARKETPIPE__COLLECTION__RATE_LIMIT_DIR": str(home / f"pace-{database}"),
        "MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__RATE_LIMIT": "360000",
    }
    store = InfluxDBV1Store(url=url, database=database)
    options = RealtimeOptions(symbols, mode=mode, poll_seconds=poll_seconds, poll_delay=1.0, stream_url=stream_url)
    loop = Realtime(load_settings(None), options, store, clock)
    try:
        loop.restore()
        loop.backfill()  # the history first, so the measured minutes are the live ones only
        loop.summary = Summary()
        summary = loop.run(threading.Event(), duration=minutes * 60)
    finally:
        sandbox.terminate()
        sandbox.wait(timeout=10)
    missing = 0
    for symbol in symbols:
        stored = set(store.read_bars(symbol, "1m", "yahoo_finance")["time"].astype("int64") // 10**9)
        missing += sum(1 for s in summary.latencies if s.symbol == symbol and int(s.start) not in stored)
    return summary, missing


def wait_for_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"the sandbox did not listen on {port} within {timeout:g} s")


def wait_for_websocket(url: str, timeout: float = 60) -> None:
    """A real handshake: a bare TCP probe would make the server log a failed one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with connect(url, open_timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"the sandbox's streamer did not answer at {url} within {timeout:g} s")


def row(label: str, figures: dict[str, float]) -> str:
    if not figures:
        return f"| {label} | - | - | - | 0 |"
    return f"| {label} | {figures['p50']:.2f} | {figures['p95']:.2f} | {figures['p99']:.2f} | {figures['bars']:.0f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--symbols", type=int, default=50)
    parser.add_argument("--minutes", type=float, default=4.0)
    parser.add_argument("--publish-delay", type=float, default=8.0)
    parser.add_argument("--runs", default="poll5,poll15,stream5", help="which of poll5, poll15, stream5 to run")
    args = parser.parse_args()
    runs = [(mode, float(every)) for mode, every in RUNS if f"{mode}{every}" in args.runs.split(",")]
    symbols = [f"RT{i:03d}" for i in range(args.symbols)]
    lines = [
        f"{args.symbols} symbols, {args.minutes:g} minutes of 1m bars each, bars published 0-{args.publish_delay:g} s "
        "after their close, into influxd:",
        "",
        "| what | p50 s | p95 s | p99 s | bars |",
        "|---|---:|---:|---:|---:|",
    ]
    with tempfile.TemporaryDirectory() as tmp, influxdb_server(Path(tmp) / "influxdb") as url:
        home = Path(tmp)
        for mode, every in runs:
            started = time.perf_counter()
            summary, missing = run_once(mode, every, symbols, args.minutes, args.publish_delay, url, home)
            print(f"{mode} every {every:g} s: {time.perf_counter() - started:.0f} s, {summary.polls} polls, "
                  f"{missing} counted bars not readable", flush=True)  # fmt: skip
            if mode == POLL:
                lines.append(row(f"polling every {every:g} s, from the close", summary.percentiles(False)))
                lines.append(row(f"polling every {every:g} s, from the poll that saw it",
                                 summary.percentiles(False, since="seen")))  # fmt: skip
            else:
                lines.append(row("streaming, provisional, from the close", summary.percentiles(True)))
                lines.append(row("streaming, then polled every 5 s, from the close", summary.percentiles(False)))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
