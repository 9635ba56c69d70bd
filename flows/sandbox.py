"""A local simulator of the Yahoo v8 chart and Alpha Vantage APIs, for the demo, tests and benchmarks.

Synthetic mode serves deterministic prices per symbol (the same bar for the same date on every
request, completed sessions only), as Yahoo daily bars and as Alpha Vantage daily, weekly and
monthly series; ``now`` fixes the clock, so a test can serve a week before and after it ends.
Replay mode (``replay=DIR``) serves ``DIR/<SYMBOL>.json`` captured Yahoo responses verbatim, with
the status code their error body implies.

Faithful to the failure modes that matter: an enforced rate limit (Yahoo answers 429, Alpha
Vantage a 200 with a ``Note`` body), Alpha Vantage's daily quota (a 200 with its "N requests per
day" ``Information`` body once N calls were answered that UTC day), per-request latency, faults
injected by probability or per symbol (5xx, timeout, malformed JSON, HTML with status 200, and
Yahoo's 429 with Retry-After, which also comes when the client is not too fast by any count),
Yahoo's real 404 body for unknown symbols, and a JSON-lines request log with secrets redacted.
"""

from __future__ import annotations

import json
import random
import sys
import threading
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np
import pandas as pd

from flows import sandbox_market
from tasks.realtime.clock import Clock
from tasks.redaction import redact_params

CHART_PREFIX = "/v8/finance/chart/"
AV_PATH = "/query"
SERIES_START = "2000-01-03"
SERIES_END = "2035-12-31"
FAULT_KINDS = ("5xx", "timeout", "malformed", "html", "429")
FAULT_RETRY_AFTER = "1"  # seconds, the Retry-After of a "429" fault
NOT_FOUND_BODY = {
    "chart": {"result": None, "error": {"code": "Not Found", "description": "No data found, symbol may be delisted"}}
}
AV_NOTE = (
    "Thank you for using Alpha Vantage! Our standard API call frequency is 5 calls per minute and "
    "500 calls per day. Please visit https://www.alphavantage.co/premium/ if you would like to target "
    "a higher API call frequency."
)


def av_daily_quota_body(per_day: int) -> dict[str, str]:
    """What Alpha Vantage answers, with status 200, once the key's daily quota is spent."""
    return {
        "Information": f"Thank you for using Alpha Vantage! Our standard API rate limit is {per_day} requests per "
        "day. Please subscribe to any of the premium plans at https://www.alphavantage.co/premium/ to instantly "
        "remove all daily rate limits."
    }


@dataclass
class SandboxConfig:
    replay: Path | None = None
    not_found: set[str] = field(default_factory=set)
    latency: float = 0.0
    rate_limit: int | None = None  # requests accepted in any `rate_window` seconds
    rate_window: float = 1.0
    av_daily_quota: int | None = None  # Alpha Vantage calls answered per UTC day; later ones get the quota body
    fault_rate: float = 0.0
    fault_kinds: tuple[str, ...] = FAULT_KINDS
    symbol_faults: dict[str, str] = field(default_factory=dict)  # symbol -> fault kind, on every request
    timeout_delay: float = 5.0
    seed: int = 0
    request_log: Path | None = None
    access_log: bool = True
    now: float | None = None  # a fixed clock (epoch seconds): serve the sessions completed by then
    clock: Clock | None = None  # a running clock (e.g. a simulated, faster one); ``now`` wins over it
    publish_delay: float = 0.0  # intraday: a completed bar is served up to this many seconds after its close

    def time(self) -> float:
        """The sandbox's now: what it serves, and the ``Date`` of its answers."""
        if self.now is not None:
            return self.now
        return self.clock.time() if self.clock is not None else time.time()


@lru_cache(maxsize=1)
def _sessions() -> pd.DataFrame:
    """Every weekday's date, open and close (epoch seconds), shared by all symbols: building it takes
    ~0.2 s of CPU, which per symbol would make the first answer for each one that slow."""
    days = pd.bdate_range(SERIES_START, SERIES_END)
    local = days.tz_localize("America/New_York")
    epoch = pd.Timestamp(0, tz="UTC")
    return pd.DataFrame(
        {
            "date": days.strftime("%Y-%m-%d"),
            "timestamp": (local + pd.Timedelta(hours=9, minutes=30) - epoch) // pd.Timedelta(seconds=1),
            "closes_at": (local + pd.Timedelta(hours=16) - epoch) // pd.Timedelta(seconds=1),
        }
    )


@lru_cache(maxsize=512)
def synthetic_series(symbol: str) -> pd.DataFrame:
    """A seeded random walk over weekdays; identical for a symbol on every call and machine."""
    rng = np.random.default_rng(zlib.crc32(symbol.encode()))
    sessions = _sessions()
    n = len(sessions)
    close = rng.uniform(20, 400) * np.exp(np.cumsum(rng.normal(0.0003, 0.015, n)))
    open_ = np.r_[close[0], close[:-1]] * np.exp(rng.normal(0, 0.004, n))
    high = np.maximum(open_, close) * (1 + np.abs(rng.normal(0, 0.006, n)))
    low = np.minimum(open_, close) * (1 - np.abs(rng.normal(0, 0.006, n)))
    volume = np.round(rng.lognormal(15.5, 0.4, n))
    return sessions.assign(
        open=open_.round(4), high=high.round(4), low=low.round(4), close=close.round(4), volume=volume
    )


def completed_sessions(symbol: str, now: float) -> pd.DataFrame:
    series = synthetic_series(symbol)
    return series[series["closes_at"] <= now]


def synthetic_chart(
    symbol: str, period1: int, period2: int, interval: str, now: float, publish_delay: float = 0.0
) -> tuple[int, dict[str, Any]]:
    if interval in sandbox_market.INTRADAY_MINUTES:
        return 200, sandbox_market.chart_payload(symbol, interval, period1, period2, now, publish_delay)
    if interval != "1d":
        error = {"code": "Bad Request", "description": f"Invalid input - interval={interval} is not simulated"}
        return 400, {"chart": {"result": None, "error": error}}
    done = completed_sessions(symbol, now)
    rows = done[(done["timestamp"] >= period1) & (done["timestamp"] < period2)]
    meta: dict[str, Any] = {
        "currency": "USD",
        "symbol": symbol,
        "exchangeName": "NMS",
        "instrumentType": "EQUITY",
        "gmtoffset": -18000,
        "timezone": "EST",
        "exchangeTimezoneName": "America/New_York",
        "dataGranularity": interval,
        "regularMarketTime": int(done["closes_at"].iloc[-1]) if len(done) else int(now),
    }
    result: dict[str, Any] = {"meta": meta, "indicators": {"quote": [{}]}}
    if len(rows):
        quote = {k: rows[k].tolist() for k in ("open", "high", "low", "close", "volume")}
        result["timestamp"] = rows["timestamp"].tolist()
        result["indicators"] = {"quote": [quote], "adjclose": [{"adjclose": quote["close"]}]}
    return 200, {"chart": {"result": [result], "error": None}}


# AV's functions by period: series key, Meta Data description, and the pandas period that groups days.
AV_PERIODS: dict[str, tuple[str, str, str | None]] = {
    "DAILY": ("Time Series (Daily)", "Daily Prices", None),
    "WEEKLY": ("Weekly Time Series", "Weekly Prices", "W-SUN"),
    "MONTHLY": ("Monthly Time Series", "Monthly Prices", "M"),
}


def alpha_vantage_series(params: dict[str, str], now: float) -> dict[str, Any]:
    """TIME_SERIES_DAILY, WEEKLY, MONTHLY and their _ADJUSTED forms over the completed sessions at ``now``.

    Like AV, a week or month is keyed by its latest trading day, so the unfinished period is keyed
    by today's date and its final bar, later, by another; ``compact`` (the default) returns the
    latest 100 daily bars, and the weekly and monthly series are always full.
    """
    function = params.get("function", "")
    symbol = params.get("symbol", "")
    if not params.get("apikey"):
        return {"Error Message": "the parameter apikey is invalid or missing. Please claim your free API key."}
    if function == "TIME_SERIES_INTRADAY":
        return alpha_vantage_intraday(params, now)
    adjusted = function.endswith("_ADJUSTED")
    period = function.removeprefix("TIME_SERIES_").removesuffix("_ADJUSTED")
    if not function.startswith("TIME_SERIES_") or period not in AV_PERIODS or not symbol:
        return {"Error Message": f"Invalid API call. Please retry or visit the documentation for {function}."}
    series_key, information, freq = AV_PERIODS[period]
    done = completed_sessions(symbol, now)
    compact = params.get("outputsize", "compact") != "full"
    if freq is None and compact:
        done = done.tail(100)
    bars = done if freq is None else _periods(done, freq)
    series: dict[str, dict[str, str]] = {}
    for row in bars.iloc[::-1].itertuples(index=False):
        values = {"1. open": f"{row.open:.4f}", "2. high": f"{row.high:.4f}", "3. low": f"{row.low:.4f}",
                  "4. close": f"{row.close:.4f}"}  # fmt: skip
        if adjusted:
            values |= {"5. adjusted close": f"{row.close:.4f}", "6. volume": f"{row.volume:.0f}",
                       "7. dividend amount": "0.0000"}  # fmt: skip
            if freq is None:
                values["8. split coefficient"] = "1.0"
        else:
            values["5. volume"] = f"{row.volume:.0f}"
        series[str(row.date)] = values
    meta = {
        "1. Information": f"{information}{' with Splits and Dividend Events' if adjusted else ''}",
        "2. Symbol": symbol,
        "3. Last Refreshed": str(done["date"].iloc[-1]) if len(done) else "",
    }
    if freq is None:
        meta["4. Output Size"] = "Compact" if compact else "Full size"
    meta[f"{len(meta) + 1}. Time Zone"] = "US/Eastern"
    key = f"{period.title()} Adjusted Time Series" if adjusted and freq is not None else series_key
    return {"Meta Data": meta, key: series}


AV_INTRADAY = {"1min": "1m", "5min": "5m", "15min": "15m", "30min": "30m", "60min": "60m"}


def alpha_vantage_intraday(params: dict[str, str], now: float) -> dict[str, Any]:
    """TIME_SERIES_INTRADAY from the simulated market: completed bars only, each labelled by its end
    in US/Eastern as AV does, newest first; ``month`` (YYYY-MM) or else the latest days, and
    ``compact`` (the default) keeps the latest 100 bars."""
    symbol, av_interval = params.get("symbol", ""), params.get("interval", "")
    if av_interval not in AV_INTRADAY:
        return {"Error Message": "Invalid API call. Please retry or visit the documentation for TIME_SERIES_INTRADAY."}
    interval = AV_INTRADAY[av_interval]
    step = sandbox_market.INTRADAY_MINUTES[interval] * 60
    if month := params.get("month"):
        first = pd.Timestamp(f"{month}-01", tz="UTC")
        window = (first.timestamp(), (first + pd.offsets.MonthBegin(1)).timestamp())
    else:
        window = (now - 5 * 86_400, now)
    served = sandbox_market.bars(symbol, interval, window[0], window[1], now)
    served = served[served["timestamp"] + step <= now]  # AV serves completed bars only
    if params.get("outputsize", "compact") != "full":
        served = served.tail(100)
    ends = pd.to_datetime(served["timestamp"] + step, unit="s", utc=True).dt.tz_convert("US/Eastern")
    series = {
        f"{end:%Y-%m-%d %H:%M:%S}": {
            "1. open": f"{row.open:.4f}",
            "2. high": f"{row.high:.4f}",
            "3. low": f"{row.low:.4f}",
            "4. close": f"{row.close:.4f}",
            "5. volume": f"{row.volume:.0f}",
        }
        for end, row in zip(ends.iloc[::-1], served.iloc[::-1].itertuples(index=False), strict=True)
    }
    meta = {
        "1. Information": f"Intraday ({av_interval}) open, high, low, close prices and volume",
        "2. Symbol": symbol,
        "3. Last Refreshed": next(iter(series), ""),
        "4. Interval": av_interval,
        "5. Output Size": "Compact" if params.get("outputsize", "compact") != "full" else "Full size",
        "6. Time Zone": "US/Eastern",
    }
    return {"Meta Data": meta, f"Time Series ({av_interval})": series}


def _periods(days: pd.DataFrame, freq: str) -> pd.DataFrame:
    """Daily bars aggregated per calendar period, each keyed by its latest day."""
    groups = days.groupby(pd.DatetimeIndex(days["date"]).to_period(freq), sort=True)
    return groups.agg(
        date=("date", "last"), open=("open", "first"), high=("high", "max"), low=("low", "min"),
        close=("close", "last"), volume=("volume", "sum"),
    ).reset_index(drop=True)  # fmt: skip


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

    def __init__(self, address: tuple[str, int], config: SandboxConfig) -> None:
        super().__init__(address, _Handler)
        self.config = config
        self.random = random.Random(config.seed)
        self.accepted: deque[float] = deque()
        self.av_calls: dict[str, int] = {}  # UTC day -> Alpha Vantage calls answered
        self.lock = threading.Lock()
        self.log_handle = config.request_log.open("a", encoding="utf-8") if config.request_log else None

    @property
    def base_url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}{CHART_PREFIX}"

    @property
    def alpha_vantage_url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}{AV_PATH}"

    def admit(self) -> bool:
        """Sliding-window rate limit: at most `rate_limit` accepted requests in any `rate_window`."""
        limit = self.config.rate_limit
        if limit is None:
            return True
        with self.lock:
            now = time.monotonic()
            while self.accepted and self.accepted[0] <= now - self.config.rate_window:
                self.accepted.popleft()
            if len(self.accepted) >= limit:
                return False
            self.accepted.append(now)
            return True

    def av_quota_left(self) -> bool:
        """Count one Alpha Vantage call against today's quota (UTC); False once it is spent."""
        per_day = self.config.av_daily_quota
        if per_day is None:
            return True
        day = time.strftime("%Y-%m-%d", time.gmtime())
        with self.lock:
            if self.av_calls.get(day, 0) >= per_day:
                return False
            self.av_calls[day] = self.av_calls.get(day, 0) + 1
            return True

    def fault_for(self, symbol: str) -> str | None:
        if symbol in self.config.symbol_faults:
            return self.config.symbol_faults[symbol]
        with self.lock:
            if self.config.fault_rate and self.random.random() < self.config.fault_rate:
                return self.random.choice(self.config.fault_kinds)
        return None

    def record(self, entry: dict[str, Any]) -> None:
        if self.log_handle is None:
            return
        with self.lock:
            self.log_handle.write(json.dumps(entry) + "\n")
            self.log_handle.flush()

    def server_close(self) -> None:
        super().server_close()
        if self.log_handle is not None:
            self.log_handle.close()


class _Handler(BaseHTTPRequestHandler):
    server: SandboxServer
    protocol_version = "HTTP/1.1"
    body_bytes = 0  # the last answer's body, for the request log

    def do_GET(self) -> None:
        arrived = time.time()
        url = urlsplit(self.path)
        params = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if url.path.startswith(CHART_PREFIX):
            api, symbol = "yahoo", unquote(url.path[len(CHART_PREFIX) :])
        elif url.path == AV_PATH:
            api, symbol = "alpha_vantage", params.get("symbol", "")
        else:
            self._send(404, b'{"error": "the sandbox serves /v8/finance/chart/<symbol> and /query"}')
            return
        config = self.server.config
        if config.latency:
            time.sleep(config.latency)
        entry: dict[str, Any] = {"t": arrived, "api": api, "symbol": symbol, "params": redact_params(params)}
        self.body_bytes = 0
        status = self._answer(api, symbol, params, entry)
        entry["status"], entry["bytes"] = status, self.body_bytes
        self.server.record(entry)

    def _answer(self, api: str, symbol: str, params: dict[str, str], entry: dict[str, Any]) -> int:
        if not self.server.admit():
            entry["rate_limited"] = True
            if api == "yahoo":
                return self._send(429, b"Too Many Requests", "text/plain", {"Retry-After": "1"})
            return self._send(200, json.dumps({"Note": AV_NOTE}).encode())
        if api == "alpha_vantage" and not self.server.av_quota_left():
            entry["quota_exhausted"] = True
            return self._send(200, json.dumps(av_daily_quota_body(self.server.config.av_daily_quota or 0)).encode())
        fault = self.server.fault_for(symbol)
        if fault is not None:
            entry["fault"] = fault
            return self._fault(fault)
        now = self.server.config.time()
        if api == "alpha_vantage":
            return self._send(200, json.dumps(alpha_vantage_series(params, now)).encode())
        if symbol in self.server.config.not_found:
            return self._send(404, json.dumps(NOT_FOUND_BODY).encode())
        if self.server.config.replay is not None:
            return self._send(*replay_chart(self.server.config.replay, symbol))
        try:
            period1, period2 = int(params["period1"]), int(params["period2"])
        except (KeyError, ValueError):
            error = {"code": "Bad Request", "description": "period1 and period2 are required integers"}
            return self._send(400, json.dumps({"chart": {"result": None, "error": error}}).encode())
        interval = params.get("interval", "1d")
        status, payload = synthetic_chart(symbol, period1, period2, interval, now, self.server.config.publish_delay)
        return self._send(status, json.dumps(payload).encode())

    def _fault(self, kind: str) -> int:
        if kind == "5xx":
            return self._send(503, b"<html><body>Service Unavailable</body></html>", "text/html")
        if kind == "timeout":
            time.sleep(self.server.config.timeout_delay)
            return self._send(504, b"<html><body>Gateway Timeout</body></html>", "text/html")
        if kind == "malformed":
            return self._send(200, b'{"chart": {"result": [{"meta": ')
        if kind == "html":
            return self._send(200, b"<html><body>Too Many Requests</body></html>", "text/html")
        if kind == "429":
            return self._send(429, b"Too Many Requests\r\n", "text/plain", {"Retry-After": FAULT_RETRY_AFTER})
        raise ValueError(f"unknown fault kind {kind!r}: use one of {', '.join(FAULT_KINDS)}")

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/json;charset=utf-8",
        headers: dict[str, str] | None = None,
    ) -> int:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)
            self.body_bytes = len(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (its timeout): nothing to answer
        return status

    def date_time_string(self, timestamp: float | None = None) -> str:
        """The ``Date`` header by the sandbox's clock: sources read what was live from it."""
        return super().date_time_string(self.server.config.time() if timestamp is None else timestamp)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
        if not self.server.config.access_log:
            return
        status = args[1] if len(args) > 1 else ""
        sys.stdout.write(f"sandbox: {self.command} {urlsplit(self.path).path} {status}\n")
        sys.stdout.flush()


def start_sandbox(port: int = 0, config: SandboxConfig | None = None, host: str = "127.0.0.1") -> SandboxServer:
    """Start serving in a background thread; ``port=0`` picks a free port (see ``base_url``)."""
    server = SandboxServer((host, port), config or SandboxConfig())
    # Built before the first request, not by the first few at once: under load that took about a
    # second, which would read as a slow server and hold back a paced client's first window.
    _sessions()
    threading.Thread(target=server.serve_forever, name="marketpipe-sandbox", daemon=True).start()
    return server


def read_request_log(path: Path) -> list[dict[str, Any]]:
    """The request log's entries, oldest first."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
