"""The sandbox's simulated intraday market: one price per second per symbol, from which both the
polled minute bars and the streamer's ticks are cut, so the two disagree only as real ones do.

A session follows the symbol's calendar: crypto pairs (``BTC-USD``) trade around the clock on UTC
days, every other symbol on the NYSE's (holidays and early closes included, from
exchange_calendars). Each second has a price in cents and a traded volume, seeded by the symbol
and the session, so every request and every process sees the same market. A polled bar's open,
high, low and close are over every second of its interval; the streamer samples some seconds only,
so its bars can miss the true high and low, as Yahoo's do.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache

import exchange_calendars as xc
import numpy as np
import numpy.typing as npt
import pandas as pd

INTRADAY_MINUTES: dict[str, int] = {"1m": 1, "2m": 2, "5m": 5, "15m": 15, "30m": 30, "60m": 60, "90m": 90, "1h": 60}
TICK_SHARE = 0.6  # of the seconds, those the streamer sends a tick for
_DAY = 86_400


def is_crypto(symbol: str) -> bool:
    return symbol.upper().endswith(("-USD", "-USDT", "-EUR"))


@lru_cache(maxsize=1)
def _nyse() -> xc.ExchangeCalendar:
    return xc.get_calendar("XNYS", start="2020-01-01")


@dataclass(frozen=True)
class Session:
    """One session of one symbol: its bounds (epoch seconds, [open, close)) and every second's values."""

    symbol: str
    day: date
    open: int
    close: int
    price: npt.NDArray[np.float64]  # one per second from ``open``, in cents rounded to 2 decimals
    volume: npt.NDArray[np.float64]  # shares traded in each second
    day_volume: npt.NDArray[np.float64]  # the session's running volume after each second (Yahoo's day_volume)


def session_bounds(symbol: str, day: date) -> tuple[int, int] | None:
    """[open, close) in epoch seconds of the symbol's session on ``day``, or None on a closed day."""
    if is_crypto(symbol):
        start = int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp())
        return start, start + _DAY
    nyse = _nyse()
    label = pd.Timestamp(day)
    if not nyse.is_session(label):
        return None
    return int(nyse.session_open(label).timestamp()), int(nyse.session_close(label).timestamp())


@lru_cache(maxsize=256)
def session(symbol: str, day: date) -> Session | None:
    """The symbol's session on ``day``, generated once: a seeded random walk of cents."""
    bounds = session_bounds(symbol, day)
    if bounds is None:
        return None
    opened, closed = bounds
    seconds = closed - opened
    base = np.random.default_rng(zlib.crc32(symbol.encode())).uniform(20, 400)
    rng = np.random.default_rng(zlib.crc32(f"{symbol}:{day.isoformat()}".encode()))
    start = base * np.exp(rng.normal(0, 0.02))
    price = np.round(start * np.exp(np.cumsum(rng.normal(0, 0.00015, seconds))), 2)
    volume = np.round(rng.lognormal(3.0, 1.0, seconds))
    return Session(symbol, day, opened, closed, price, volume, np.cumsum(volume))


def sessions_between(symbol: str, first: float, last: float) -> list[Session]:
    """The symbol's sessions that overlap [first, last)."""
    day = datetime.fromtimestamp(first, UTC).date() - timedelta(days=1)
    end = datetime.fromtimestamp(last, UTC).date()
    found = []
    while day <= end:
        s = session(symbol, day)
        if s is not None and s.close > first and s.open < last:
            found.append(s)
        day += timedelta(days=1)
    return found


def current_session(symbol: str, now: float) -> Session | None:
    """The session open at ``now``, else the next one to open (within a week), for ``currentTradingPeriod``."""
    day = datetime.fromtimestamp(now, UTC).date() - timedelta(days=1)
    for _ in range(9):
        s = session(symbol, day)
        if s is not None and s.close > now:
            return s
        day += timedelta(days=1)
    return None


def publish_lag(symbol: str, bar_start: float, most: float) -> float:
    """How long after its close the source has a completed bar: 0 to ``most`` seconds, fixed per bar."""
    return zlib.crc32(f"lag:{symbol}:{int(bar_start)}".encode()) / 2**32 * most


def bars(symbol: str, interval: str, first: float, last: float, now: float, publish_delay: float = 0.0) -> pd.DataFrame:
    """Intraday bars starting in [first, last) as served at ``now``: the bar still forming holds the
    seconds up to ``now`` only, as Yahoo's last 1m bar does; later ones are not served. With
    ``publish_delay``, a completed bar is served only some time after its close (see :func:`publish_lag`),
    and nothing after it until then."""
    minutes = INTRADAY_MINUTES[interval]
    step = minutes * 60
    rows: list[tuple[int, float, float, float, float, float]] = []
    for s in sessions_between(symbol, first, min(last, now + 1)):
        grid = np.arange(s.open, s.close, step)
        for bar_start in grid[(grid >= first) & (grid < last) & (grid <= now)].tolist():
            lo = int(bar_start) - s.open
            hi = min(int(bar_start) + step, s.close, int(now) + 1) - s.open
            if hi <= lo:
                continue
            closes = min(int(bar_start) + step, s.close)
            if publish_delay and closes <= now < closes + publish_lag(symbol, bar_start, publish_delay):
                break  # not published yet: the answer ends before it
            prices = s.price[lo:hi]
            rows.append(
                (int(bar_start), prices[0], prices.max(), prices.min(), prices[-1], float(s.volume[lo:hi].sum()))
            )
    return pd.DataFrame(rows, columns=["timestamp", "open", "high", "low", "close", "volume"])


def ticks(symbol: str, first: float, last: float) -> list[tuple[int, float, float]]:
    """The streamer's ticks in [first, last): (epoch ms, price, day volume), for a sample of the seconds."""
    found: list[tuple[int, float, float]] = []
    for s in sessions_between(symbol, first, last):
        lo, hi = max(int(first), s.open), min(int(np.ceil(last)), s.close)
        for second in range(lo, hi):
            if _sampled(symbol, second):
                i = second - s.open
                found.append((second * 1000, float(s.price[i]), float(s.day_volume[i])))
    return found


def _sampled(symbol: str, second: int) -> bool:
    return zlib.crc32(f"{symbol}:{second}".encode()) / 2**32 < TICK_SHARE


def chart_payload(
    symbol: str, interval: str, period1: int, period2: int, now: float, publish_delay: float = 0.0
) -> dict[str, object]:
    """A Yahoo v8 chart answer with intraday bars, shaped like a captured one (no adjclose, priceHint 2)."""
    served = bars(symbol, interval, period1, period2, now, publish_delay)
    crypto = is_crypto(symbol)
    current = current_session(symbol, now)
    meta: dict[str, object] = {
        "currency": "USD",
        "symbol": symbol,
        "exchangeName": "CCC" if crypto else "NMS",
        "instrumentType": "CRYPTOCURRENCY" if crypto else "EQUITY",
        "gmtoffset": 0 if crypto else -18000,
        "timezone": "UTC" if crypto else "EST",
        "exchangeTimezoneName": "UTC" if crypto else "America/New_York",
        "regularMarketTime": int(now),
        "priceHint": 2,
        "dataGranularity": interval,
    }
    if current is not None:
        meta["currentTradingPeriod"] = {"regular": {"start": current.open, "end": current.close}}
    result: dict[str, object] = {"meta": meta, "indicators": {"quote": [{}]}}
    if len(served):
        result["timestamp"] = served["timestamp"].tolist()
        result["indicators"] = {"quote": [{k: served[k].tolist() for k in ("open", "high", "low", "close", "volume")}]}
    return {"chart": {"result": [result], "error": None}}
