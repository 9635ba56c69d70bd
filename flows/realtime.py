"""The `realtime` flow: intraday bars stored seconds after they close, for as long as it runs.

It is one long flow run, not a schedule: a Kubernetes Deployment (the chart's `realtime`) or
`marketpipe realtime` keeps it going, and SIGTERM ends it gracefully: the loop stops, the minutes
the ticks completed are stored, and the run publishes its summary. No task run is made per bar
(a session of 1m bars for 50 symbols would be 19,500 of them); the loop logs through the flow run
instead. `GET /healthz` on ``health_port`` answers 200 while the loop beats, 503 once it stalls.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from blocks.stores import store_from_settings
from configs.settings import load_settings
from tasks.bars import validate_symbols
from tasks.errors import UsageError
from tasks.realtime.clock import clock_from
from tasks.realtime.engine import MODES, STREAM, Realtime, RealtimeOptions, Summary
from tasks.realtime.sessions import REALTIME_INTERVALS

SUMMARY_KEY = "realtime-summary"
STOP = threading.Event()  # set by SIGTERM or SIGINT: the loop ends after its current step


class Heartbeat:
    """When the loop last went round; the health endpoint compares it with ``stall_seconds``."""

    def __init__(self, stall_seconds: float) -> None:
        self.stall_seconds = stall_seconds
        self.last = time.monotonic()

    def beat(self) -> None:
        self.last = time.monotonic()

    def state(self) -> tuple[bool, dict[str, Any]]:
        quiet = time.monotonic() - self.last
        return quiet <= self.stall_seconds, {"loop_quiet_seconds": round(quiet, 1), "stall_seconds": self.stall_seconds}


def serve_health(heartbeat: Heartbeat, host: str, port: int) -> ThreadingHTTPServer:
    """``GET /healthz`` for the kubelet's probes; started on its own thread."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?")[0] != "/healthz":
                self.send_error(404)
                return
            healthy, facts = heartbeat.state()
            body = json.dumps({"status": "ok" if healthy else "stalled", **facts}).encode()
            self.send_response(200 if healthy else 503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
            return  # a probe every few seconds is no news

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="marketpipe-health", daemon=True).start()
    return server


def stop_on_signals() -> None:
    """SIGTERM (Kubernetes, a worker cancelling the run) and SIGINT stop the loop gracefully."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: STOP.set())


@flow(name="realtime", log_prints=True)
def realtime(
    symbols: list[str] | None = None,
    source: str = "yahoo_finance",
    interval: str = "1m",
    mode: str = "poll",
    poll_seconds: float | None = None,
    config: str | None = None,
    duration: float | None = None,
    health_port: int = 0,
    health_host: str = "0.0.0.0",  # the pod's probes come from the node
    clock: str | None = None,
) -> dict[str, Any]:
    """Poll (and with ``mode="stream"`` stream) intraday bars until stopped or ``duration`` seconds pass."""
    settings = load_settings(config)
    checked = validate_symbols(symbols or settings.symbols)
    if interval not in REALTIME_INTERVALS:
        raise UsageError(f"invalid interval {interval!r} for real time: use one of {', '.join(REALTIME_INTERVALS)}")
    if mode not in MODES:
        raise UsageError(f"invalid mode {mode!r}: use one of {', '.join(MODES)}")
    options = RealtimeOptions(
        checked,
        source,
        interval,
        mode,
        poll_seconds or settings.realtime.poll_seconds,
        settings.realtime.poll_delay,
        settings.realtime.stream_url if mode == STREAM else None,
    )
    heartbeat = Heartbeat(settings.realtime.stall_seconds)
    health = serve_health(heartbeat, health_host, health_port) if health_port else None
    stop_on_signals()
    loop = Realtime(
        settings, options, store_from_settings(settings.storage), clock_from(clock), heartbeat=heartbeat.beat
    )
    try:
        summary = loop.run(STOP, duration)
    finally:
        if health is not None:
            health.shutdown()
            health.server_close()
    described = describe(summary, loop)
    logger = get_run_logger()
    for hole in summary.holes:
        logger.warning(hole)
    logger.info("%s", json.dumps(described))
    create_markdown_artifact(key=SUMMARY_KEY, markdown=markdown(described), description="real-time run")
    return described


def describe(summary: Summary, loop: Realtime) -> dict[str, Any]:
    """The run's counts, latencies and reconciliation, as plain values."""
    reconciled = [s.reconciled for s in loop.series.values()]
    stream = loop.stream_stats
    return {
        "final_bars": summary.final,
        "provisional_bars": summary.provisional,
        "polls": summary.polls,
        "poll_errors": summary.poll_errors,
        "spooled_points": summary.spooled,
        "holes": summary.holes,
        "errors": summary.errors,
        "latency_final_from_close": summary.percentiles(provisional=False),
        "latency_final_from_poll": summary.percentiles(provisional=False, since="seen"),
        "latency_provisional_from_close": summary.percentiles(provisional=True),
        "reconciled": {
            "replaced": sum(r.replaced for r in reconciled),
            "differing": sum(r.differing for r in reconciled),
            "high_low_missed": sum(r.high_low_missed for r in reconciled),
            "largest_bps": max((r.largest_bps for r in reconciled), default=0.0),
        },
        "stream": None if stream is None else {k: v for k, v in vars(stream).items() if not k.startswith("_")},
        "pacing": loop.pacing_note(),
    }


def markdown(described: dict[str, Any]) -> str:
    rows = "\n".join(f"| {k} | {json.dumps(v)} |" for k, v in described.items())
    return f"# Real-time run\n\n| what | value |\n|---|---|\n{rows}\n"
