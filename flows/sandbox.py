"""A local stand-in for the Yahoo v8 chart API, so the demo and the tests need no network.

Two modes: synthetic (deterministic prices per symbol, the same bar for the same date on every
request) and replay (``--replay DIR`` serves ``DIR/<SYMBOL>.json`` captured responses verbatim, with
the status code their error body implies). Symbols listed as not found get Yahoo's real 404 body.
"""

from __future__ import annotations

import json
import sys
import threading
import zlib
from datetime import UTC, datetime
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np
import pandas as pd

CHART_PREFIX = "/v8/finance/chart/"
SERIES_START = "2000-01-03"
SERIES_END = "2035-12-31"
NOT_FOUND_BODY = {
    "chart": {"result": None, "error": {"code": "Not Found", "description": "No data found, symbol may be delisted"}}
}


@lru_cache(maxsize=256)
def synthetic_series(symbol: str) -> pd.DataFrame:
    """A seeded random walk over NYSE weekdays; identical for a symbol on every call and machine."""
    rng = np.random.default_rng(zlib.crc32(symbol.encode()))
    days = pd.bdate_range(SERIES_START, SERIES_END)
    n = len(days)
    close = rng.uniform(20, 400) * np.exp(np.cumsum(rng.normal(0.0003, 0.015, n)))
    open_ = np.r_[close[0], close[:-1]] * np.exp(rng.normal(0, 0.004, n))
    high = np.maximum(open_, close) * (1 + np.abs(rng.normal(0, 0.006, n)))
    low = np.minimum(open_, close) * (1 - np.abs(rng.normal(0, 0.006, n)))
    volume = np.round(rng.lognormal(15.5, 0.4, n))
    opens_at = (days + pd.Timedelta(hours=9, minutes=30)).tz_localize("America/New_York")
    return pd.DataFrame(
        {
            "timestamp": (opens_at - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1),
            "open": open_.round(4),
            "high": high.round(4),
            "low": low.round(4),
            "close": close.round(4),
            "volume": volume,
        }
    )


def synthetic_chart(symbol: str, period1: int, period2: int, interval: str) -> tuple[int, dict[str, Any]]:
    if interval != "1d":
        error = {
            "code": "Bad Request",
            "description": f"Invalid input - interval={interval} is not supported by the sandbox",
        }
        return 400, {"chart": {"result": None, "error": error}}
    series = synthetic_series(symbol)
    now = int(datetime.now(UTC).timestamp())
    rows = series[(series["timestamp"] >= period1) & (series["timestamp"] < min(period2, now))]
    meta = {
        "currency": "USD",
        "symbol": symbol,
        "exchangeName": "NMS",
        "instrumentType": "EQUITY",
        "gmtoffset": -18000,
        "timezone": "EST",
        "exchangeTimezoneName": "America/New_York",
        "dataGranularity": interval,
    }
    result: dict[str, Any] = {"meta": meta, "indicators": {"quote": [{}]}}
    if len(rows):
        meta["regularMarketTime"] = int(rows["timestamp"].iloc[-1])
        quote = {k: rows[k].tolist() for k in ("open", "high", "low", "close", "volume")}
        result["timestamp"] = rows["timestamp"].tolist()
        result["indicators"] = {"quote": [quote], "adjclose": [{"adjclose": quote["close"]}]}
    return 200, {"chart": {"result": [result], "error": None}}


def replay_chart(directory: Path, symbol: str) -> tuple[int, bytes]:
    path = directory / f"{symbol}.json"
    if not path.is_file():
        return 404, json.dumps(NOT_FOUND_BODY).encode()
    body = path.read_bytes()
    error = (json.loads(body).get("chart") or {}).get("error")
    if not error:
        return 200, body
    return (404 if error.get("code") == "Not Found" else 400), body


class SandboxServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], replay: Path | None, not_found: set[str], access_log: bool = True
    ) -> None:
        super().__init__(address, _Handler)
        self.replay = replay
        self.not_found = not_found
        self.access_log = access_log

    @property
    def base_url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}{CHART_PREFIX}"


class _Handler(BaseHTTPRequestHandler):
    server: SandboxServer

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if not url.path.startswith(CHART_PREFIX):
            return self._send(404, b'{"error": "not found: the sandbox serves /v8/finance/chart/<symbol>"}')
        symbol = unquote(url.path[len(CHART_PREFIX) :])
        params = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if symbol in self.server.not_found:
            return self._send(404, json.dumps(NOT_FOUND_BODY).encode())
        if self.server.replay is not None:
            return self._send(*replay_chart(self.server.replay, symbol))
        try:
            period1, period2 = int(params["period1"]), int(params["period2"])
        except (KeyError, ValueError):
            body = {
                "chart": {
                    "result": None,
                    "error": {"code": "Bad Request", "description": "period1 and period2 are required integers"},
                }
            }
            return self._send(400, json.dumps(body).encode())
        status, payload = synthetic_chart(symbol, period1, period2, params.get("interval", "1d"))
        self._send(status, json.dumps(payload).encode())

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json;charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
        if not self.server.access_log:
            return
        sys.stdout.write(f"sandbox: {self.command} {urlsplit(self.path).path} {args[1] if len(args) > 1 else ''}\n")
        sys.stdout.flush()


def start_sandbox(
    port: int = 0,
    replay: Path | None = None,
    not_found: set[str] | None = None,
    host: str = "127.0.0.1",
    access_log: bool = True,
) -> SandboxServer:
    """Start serving in a background thread; ``port=0`` picks a free port (see ``base_url``)."""
    server = SandboxServer((host, port), replay, not_found or set(), access_log)
    threading.Thread(target=server.serve_forever, name="marketpipe-sandbox", daemon=True).start()
    return server
