"""Yahoo Finance through the v8 chart API (``{base_url}{symbol}?period1=..&period2=..&interval=..``).

Yahoo's limits shape the requests: 1m bars come at most 7 days per request and 30 days back; the
other minute intervals 60 days back; 60m/1h 730 days back. A range outside them is refused with a
clear error before any request, never answered with an empty success.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from datetime import UTC, date, datetime, time, timedelta, timezone
from email.utils import parsedate_to_datetime
from types import MappingProxyType
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import httpx
import numpy as np
import numpy.typing as npt
import pandas as pd

from tasks.bars import (
    OHLCV,
    PRICE_COLUMNS,
    Instrument,
    conform,
    conform_actions,
    corporate_actions,
    empty_actions,
    empty_bars,
    flag_missing,
    is_daily_or_longer,
)
from tasks.calendars import CRYPTO, FX, calendar_for, live_bars
from tasks.errors import PermanentSourceError, RangeNotServedError
from tasks.sources.base import BarQuery, Collected, HttpSource, within

# Asian and Pacific sessions open on the previous UTC day, so ask for a margin and filter by date.
RANGE_MARGIN = timedelta(days=2)
# interval -> (days per request, days back from now)
INTRADAY_LIMITS: dict[str, tuple[int, int]] = {
    "1m": (7, 30),
    "2m": (60, 60),
    "5m": (60, 60),
    "15m": (60, 60),
    "30m": (60, 60),
    "90m": (60, 60),
    "60m": (730, 730),
    "1h": (730, 730),
}
YAHOO_INTERVALS = frozenset({*INTRADAY_LIMITS, "1d", "5d", "1wk", "1mo", "3mo"})
EVENT_KINDS = {"splits": "split", "dividends": "dividend", "capitalGains": "capital_gain"}

# Yahoo ``meta.instrumentType`` values whose markets never close for a holiday.
INSTRUMENT_CALENDARS: Mapping[str, str] = MappingProxyType({"CRYPTOCURRENCY": CRYPTO, "CURRENCY": FX})

# Yahoo ``meta.exchangeName`` codes to exchange_calendars names (ISO MICs where one exists).
# US index feeds (SNP, DJI, NIM, WCB) and OTC venues follow the NYSE holiday schedule.
YAHOO_EXCHANGES: Mapping[str, str] = MappingProxyType(
    {
        **dict.fromkeys(
            ("NMS", "NGM", "NCM", "NAS", "NIM", "NYQ", "NYS", "PCX", "ASE", "BTS", "PNK", "OQX", "OQB", "OEM"),
            "XNYS",
        ),
        **dict.fromkeys(("SNP", "DJI", "WCB"), "XNYS"),
        **dict.fromkeys(("CMX", "NYM", "CME", "CBT"), "CMES"),
        **dict.fromkeys(("TOR", "VAN"), "XTSE"),
        **dict.fromkeys(("LSE", "IOB", "FGI"), "XLON"),
        **dict.fromkeys(("KSC", "KOE"), "XKRX"),
        **dict.fromkeys(("JPX", "TYO"), "XTKS"),
        "GER": "XETR",  # Xetra, Deutsche Boerse's electronic venue
        "FRA": "XFRA",
        "DUS": "XDUS",
        "HAM": "XHAM",
        "STU": "XSTU",
        "PAR": "XPAR",
        "AMS": "XAMS",
        "BRU": "XBRU",
        "LIS": "XLIS",
        "ISE": "XDUB",
        "MCE": "XMAD",
        "MIL": "XMIL",
        "EBS": "XSWX",
        "VIE": "XWBO",
        "STO": "XSTO",
        "CPH": "XCSE",
        "HEL": "XHEL",
        "OSL": "XOSL",
        "ICE": "XICE",
        "ATH": "ASEX",
        "IST": "XIST",
        "WSE": "XWAR",
        "PRA": "XPRA",
        "BUD": "XBUD",
        "BVB": "XBSE",
        "TLV": "XTAE",
        "JNB": "XJSE",
        "SAO": "BVMF",
        "MEX": "XMEX",
        "BUE": "XBUE",
        "SGO": "XSGO",
        "HKG": "XHKG",
        "SHH": "XSHG",
        "TAI": "XTAI",
        "SES": "XSES",
        "KLS": "XKLS",
        "SET": "XBKK",
        "PHS": "XPHS",
        "JKT": "XIDX",
        "BSE": "XBOM",
        "ASX": "XASX",
        "NZE": "XNZE",
        "SAU": "XSAU",
        "CCC": CRYPTO,
        "CCY": FX,
    }
)


class YahooFinance(HttpSource):
    name = "yahoo_finance"
    vendor = "Yahoo"

    def build_requests(self, query: BarQuery) -> list[httpx.Request]:
        url = self.settings.base_url + quote(query.symbol, safe="")
        return [
            httpx.Request("GET", url, params=_params(query.interval, first, last))
            for first, last in request_windows(query, datetime.now(UTC))
        ]

    def earliest_start(self, interval: str, today: date) -> date | None:
        return earliest_servable(interval, today)

    def newest_requests(self, query: BarQuery, since: datetime, now: datetime) -> list[httpx.Request]:
        """From the last stored bar to now, in windows Yahoo serves; older than its limit is refused."""
        if query.interval not in INTRADAY_LIMITS:
            raise RangeNotServedError(self.name, query.symbol, f"{query.interval} is not an intraday interval")
        per_request, days_back = INTRADAY_LIMITS[query.interval]
        earliest = now - timedelta(days=days_back) + timedelta(minutes=1)
        if since < earliest:
            raise RangeNotServedError(
                self.name,
                query.symbol,
                f"Yahoo serves {query.interval} bars for the last {days_back} days only, "
                f"not from {since:%Y-%m-%d %H:%M} UTC",
            )
        url = self.settings.base_url + quote(query.symbol, safe="")
        windows = []
        while since < now:
            upto = min(since + timedelta(days=per_request), now)
            windows.append(httpx.Request("GET", url, params=_params(query.interval, since, upto)))
            since = upto
        return windows

    def parse(self, query: BarQuery, response: httpx.Response) -> Collected:
        self.check_status(query, response)
        payload = self.json_body(query, response, hint=" (usually a 'Too Many Requests' page)")
        result = _chart_result(self.name, query, response, payload)
        collected = parse_chart_result(result, query.symbol, query.interval, self.name, as_of=served_at(response))
        collected.bars = within(collected.bars, query)
        collected.actions = within(collected.actions, query)
        return collected


def served_at(response: httpx.Response) -> datetime:
    """When the response was served (its ``Date`` header), which decides what was live; the clock without one."""
    header = response.headers.get("date")
    if header:
        try:
            served = parsedate_to_datetime(header)
        except (TypeError, ValueError):
            served = None
        if served is not None and served.tzinfo is not None:
            return served.astimezone(UTC)
    return datetime.now(UTC)


def request_windows(query: BarQuery, now: datetime) -> list[tuple[datetime, datetime]]:
    """Split the query into [period1, period2) windows that Yahoo serves for its interval."""
    if query.interval not in YAHOO_INTERVALS:
        raise RangeNotServedError(
            "yahoo_finance", query.symbol, f"Yahoo has no {query.interval!r} bars: use one of {sorted(YAHOO_INTERVALS)}"
        )
    first = datetime.combine(query.start, time(), UTC) - RANGE_MARGIN
    last = min(datetime.combine(query.end, time(), UTC) + RANGE_MARGIN, now)
    if query.interval not in INTRADAY_LIMITS:
        return [(first, last)]
    per_request, days_back = INTRADAY_LIMITS[query.interval]
    earliest = now - timedelta(days=days_back)
    if datetime.combine(query.start, time(), UTC) < earliest.replace(hour=0, minute=0, second=0, microsecond=0):
        raise RangeNotServedError(
            "yahoo_finance",
            query.symbol,
            f"Yahoo serves {query.interval} bars for the last {days_back} days only: "
            f"start on {(earliest + timedelta(days=1)).date()} or later, or use a longer interval",
        )
    first = max(first, earliest + timedelta(minutes=1))
    windows = []
    while first < last:
        upto = min(first + timedelta(days=per_request), last)
        windows.append((first, upto))
        first = upto
    return windows


def _params(interval: str, first: datetime, last: datetime) -> dict[str, str]:
    return {
        "period1": str(int(first.timestamp())),
        "period2": str(int(last.timestamp())),
        "interval": "60m" if interval == "1h" else interval,
        "events": "div,splits,capitalGains",
        "includePrePost": "false",
    }


def _chart_result(source: str, query: BarQuery, response: httpx.Response, payload: Any) -> dict[str, Any]:
    chart = payload.get("chart") if isinstance(payload, dict) else None
    if not isinstance(chart, dict):
        raise PermanentSourceError(source, query.symbol, "malformed Yahoo response: no `chart` object in the body")
    error = chart.get("error")
    if error:
        code = error.get("code", "error") if isinstance(error, dict) else "error"
        description = error.get("description", "") if isinstance(error, dict) else str(error)
        raise PermanentSourceError(source, query.symbol, f"{code}: {description} (HTTP {response.status_code})")
    if response.status_code != 200:
        raise PermanentSourceError(
            source, query.symbol, f"Yahoo answered HTTP {response.status_code} without an error body"
        )
    results = chart.get("result")
    if not isinstance(results, list) or not results or not isinstance(results[0], dict):
        raise PermanentSourceError(source, query.symbol, "malformed Yahoo response: `chart.result` is empty")
    result: dict[str, Any] = results[0]
    return result


def parse_chart_result(
    result: dict[str, Any],
    symbol: str,
    interval: str,
    source: str = "yahoo_finance",
    as_of: datetime | None = None,
) -> Collected:
    """One ``chart.result[0]`` object to standard bars and corporate actions.

    No ``timestamp`` key means zero bars. Null rows and partly null bars are kept and flagged
    (``flag_missing``); the missing-value policy decides what to do with them. A bar still
    forming at ``as_of`` (when Yahoo served it; default now) is skipped and counted, the next run's
    overlap collects it once final. Yahoo stamps the day's last bar with ``regularMarketTime``
    during the session and after the close alike, so the stamp says nothing: the session does
    (``meta.currentTradingPeriod.regular``, then the exchange calendar, see :func:`live_bars`).
    """
    meta = result.get("meta") or {}
    zone = _exchange_zone(meta)
    instrument = yahoo_instrument(meta)
    actions = _corporate_actions(result.get("events") or {}, symbol, interval, source, zone)
    timestamps = result.get("timestamp") or []
    if not timestamps:
        return Collected(empty_bars(), actions=actions, instrument=instrument)
    n = len(timestamps)
    indicators = result.get("indicators") or {}
    quote_block = (indicators.get("quote") or [{}])[0] or {}
    adj_block = (indicators.get("adjclose") or [{}])[0] or {}

    columns: dict[str, npt.NDArray[np.float64]] = {}
    for name in OHLCV:
        columns[name] = _float_array(quote_block.get(name), n, f"indicators.quote[0].{name}", symbol)
    columns["adj_close"] = _float_array(adj_block.get("adjclose"), n, "indicators.adjclose[0]", symbol)

    raw = np.asarray(timestamps, dtype="int64")
    frame = pd.DataFrame(
        {
            "time": _stamp(pd.to_datetime(raw, unit="s", utc=True), interval, zone),
            "symbol": symbol,
            "interval": interval,
            "source": source,
            **{c: columns[c] for c in (*PRICE_COLUMNS, "volume")},
        }
    )
    live = live_bars(
        frame["time"],
        interval,
        as_of or datetime.now(UTC),
        calendar=calendar_for(symbol, instrument),
        zone=zone,
        current_session=_regular_session(meta),
    )
    return Collected(
        conform(flag_missing(frame.loc[~live].reset_index(drop=True))),
        actions=actions,
        live_bars_skipped=int(live.sum()),
        instrument=instrument,
    )


def _corporate_actions(events: dict[str, Any], symbol: str, interval: str, source: str, zone: Any) -> pd.DataFrame:
    found = []
    for key, kind in EVENT_KINDS.items():
        dated = [e for e in (events.get(key) or {}).values() if isinstance(e, dict) and "date" in e]
        if not dated:
            continue
        if kind == "split":  # a split without both of its terms says nothing: its ratio stays empty
            terms = [(e.get("numerator"), e.get("denominator")) for e in dated]
            ratio = [float(n) / float(d) if n and d else np.nan for n, d in terms]
            values: dict[str, Any] = {"ratio": ratio}
        else:
            values = {"amount": [float(e.get("amount", np.nan)) for e in dated]}
        # Events are dated by the trading day they take effect, like daily bars.
        time = _stamp(pd.DatetimeIndex(pd.to_datetime([int(e["date"]) for e in dated], unit="s", utc=True)), "1d", zone)
        found.append(corporate_actions(symbol, source, kind, time, **values))
    return conform_actions(pd.concat(found, ignore_index=True)) if found else empty_actions()


def _float_array(values: Any, n: int, where: str, symbol: str) -> npt.NDArray[np.float64]:
    if values is None:
        return np.full(n, np.nan)
    if not isinstance(values, list) or len(values) != n:
        size = len(values) if isinstance(values, list) else type(values).__name__
        raise PermanentSourceError(
            "yahoo_finance", symbol, f"malformed Yahoo response: {where} has {size} values for {n} timestamps"
        )
    try:
        return np.array(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise PermanentSourceError(
            "yahoo_finance", symbol, f"malformed Yahoo response: {where} holds non-numeric values"
        ) from None


_DAY_NS = 86_400 * 10**9


def _stamp(instants: pd.DatetimeIndex, interval: str, zone: Any) -> pd.DatetimeIndex:
    """Daily and longer bars: 00:00 UTC of the trading date in the exchange's time zone."""
    if not is_daily_or_longer(interval):
        return instants
    # By name, pandas converts with the zone's transition table in one pass; a ZoneInfo object costs
    # a Python call per stamp (2,609 for ten years of days).
    local = instants.tz_convert(zone.key if isinstance(zone, ZoneInfo) else zone)
    wall = local.tz_localize(None).to_numpy().astype(np.int64)
    return pd.DatetimeIndex(wall - wall % _DAY_NS, tz="UTC")


def _regular_session(meta: dict[str, Any]) -> tuple[datetime, datetime] | None:
    """``meta.currentTradingPeriod.regular`` as [start, end): the session Yahoo called current when it answered."""
    period = ((meta.get("currentTradingPeriod") or {}).get("regular")) or {}
    start, end = period.get("start"), period.get("end")
    if not isinstance(start, int) or not isinstance(end, int) or end <= start:
        return None
    return datetime.fromtimestamp(start, UTC), datetime.fromtimestamp(end, UTC)


def _exchange_zone(meta: dict[str, Any]) -> Any:
    name = meta.get("exchangeTimezoneName")
    if isinstance(name, str):
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            pass
    offset = meta.get("gmtoffset")
    return timezone(timedelta(seconds=offset)) if isinstance(offset, int) else "UTC"


def yahoo_instrument(meta: Mapping[str, Any]) -> Instrument:
    """What ``chart.result[0].meta`` says of the symbol: its currency, exchange, calendar, zone and listing."""
    exchange = meta.get("exchangeName")
    kind = meta.get("instrumentType")
    calendar = INSTRUMENT_CALENDARS.get(kind) if isinstance(kind, str) else None
    if calendar is None and isinstance(exchange, str):
        calendar = YAHOO_EXCHANGES.get(exchange)
    zone = meta.get("exchangeTimezoneName")
    return Instrument(
        currency=_text(meta.get("currency")),
        exchange=_text(exchange),
        calendar=calendar,
        time_zone=_text(zone),
        listed=_listing(meta.get("firstTradeDate"), zone),
    )


def _listing(seconds: object, zone_name: object) -> date | None:
    """``firstTradeDate`` (epoch seconds) as a date in the exchange's time zone."""
    if not isinstance(seconds, int | float) or isinstance(seconds, bool):
        return None
    instant = pd.Timestamp(int(seconds), unit="s", tz=UTC)
    if isinstance(zone_name, str):
        with contextlib.suppress(ZoneInfoNotFoundError, ValueError):
            instant = instant.tz_convert(ZoneInfo(zone_name))
    return instant.date()


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def earliest_servable(interval: str, today: date) -> date | None:
    """The first date Yahoo still serves for an intraday interval (None: no limit)."""
    if interval not in INTRADAY_LIMITS:
        return None
    return today - timedelta(days=INTRADAY_LIMITS[interval][1] - 1)


SOURCE = YahooFinance
