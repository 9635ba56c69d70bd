"""Yahoo Finance through the v8 chart API (``{base_url}{symbol}?period1=..&period2=..&interval=..``)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, time, timedelta
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import httpx
import numpy as np
import numpy.typing as npt
import pandas as pd

from tasks.bars import PRICE_COLUMNS, conform, empty_bars, is_daily_or_longer
from tasks.errors import PermanentSourceError, TransientSourceError
from tasks.sources.base import BarQuery, Collected, Source

QUOTE_FIELDS = ("open", "high", "low", "close", "volume")
# Asian and Pacific sessions open on the previous UTC day, so ask for a margin and filter by date.
RANGE_MARGIN = timedelta(days=2)


class YahooFinance(Source):
    name = "yahoo_finance"

    def build_requests(self, query: BarQuery) -> list[httpx.Request]:
        period1 = datetime.combine(query.start, time(), UTC) - RANGE_MARGIN
        period2 = datetime.combine(query.end, time(), UTC) + RANGE_MARGIN
        params = {
            "period1": str(int(period1.timestamp())),
            "period2": str(int(period2.timestamp())),
            "interval": query.interval,
            "events": "div,splits",
            "includePrePost": "false",
        }
        url = self.settings.base_url + quote(query.symbol, safe="")
        return [httpx.Request("GET", url, params=params)]

    def parse(self, query: BarQuery, response: httpx.Response) -> Collected:
        payload = self._json_body(query, response)
        result = _chart_result(self, query, response, payload)
        collected = parse_chart_result(result, query.symbol, query.interval, self.name)
        if not collected.bars.empty:
            dates = collected.bars["time"].dt.tz_convert("UTC")
            lo = pd.Timestamp(query.start, tz="UTC")
            hi = pd.Timestamp(query.end, tz="UTC") + pd.Timedelta(days=1)
            keep = ((dates >= lo) & (dates < hi)).to_numpy()
            collected.bars = collected.bars.loc[keep].reset_index(drop=True)
        return collected

    def _json_body(self, query: BarQuery, response: httpx.Response) -> Any:
        if response.status_code == 429:
            raise TransientSourceError(self.name, query.symbol, "rate limited by Yahoo (HTTP 429)")
        if response.status_code >= 500:
            raise TransientSourceError(self.name, query.symbol, f"Yahoo server error (HTTP {response.status_code})")
        try:
            return response.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            kind = response.headers.get("content-type", "unknown content type")
            raise TransientSourceError(
                self.name,
                query.symbol,
                f"Yahoo answered HTTP {response.status_code} with {kind} instead of JSON "
                "(usually a 'Too Many Requests' page): retry later",
            ) from None


def _chart_result(source: Source, query: BarQuery, response: httpx.Response, payload: Any) -> dict[str, Any]:
    chart = payload.get("chart") if isinstance(payload, dict) else None
    if not isinstance(chart, dict):
        raise PermanentSourceError(source.name, query.symbol, "malformed Yahoo response: no `chart` object in the body")
    error = chart.get("error")
    if error:
        code = error.get("code", "error") if isinstance(error, dict) else "error"
        description = error.get("description", "") if isinstance(error, dict) else str(error)
        message = f"{code}: {description} (HTTP {response.status_code})"
        raise PermanentSourceError(source.name, query.symbol, message)
    if response.status_code != 200:
        raise PermanentSourceError(
            source.name, query.symbol, f"Yahoo answered HTTP {response.status_code} without an error body"
        )
    results = chart.get("result")
    if not isinstance(results, list) or not results or not isinstance(results[0], dict):
        raise PermanentSourceError(source.name, query.symbol, "malformed Yahoo response: `chart.result` is empty")
    result: dict[str, Any] = results[0]
    return result


def parse_chart_result(result: dict[str, Any], symbol: str, interval: str, source: str = "yahoo_finance") -> Collected:
    """One ``chart.result[0]`` object to standard bars. No ``timestamp`` key means zero bars."""
    meta = result.get("meta") or {}
    timestamps = result.get("timestamp") or []
    if not timestamps:
        return Collected(empty_bars(), 0, _public_meta(meta))
    n = len(timestamps)
    indicators = result.get("indicators") or {}
    quote_block = (indicators.get("quote") or [{}])[0] or {}
    adj_block = (indicators.get("adjclose") or [{}])[0] or {}

    columns: dict[str, npt.NDArray[np.float64]] = {}
    for name in QUOTE_FIELDS:
        columns[name] = _float_array(quote_block.get(name), n, f"indicators.quote[0].{name}", symbol)
    columns["adj_close"] = _float_array(adj_block.get("adjclose"), n, "indicators.adjclose[0]", symbol)

    instants = pd.to_datetime(np.asarray(timestamps, dtype="int64"), unit="s", utc=True)
    frame = pd.DataFrame(
        {
            "time": _stamp(instants, interval, meta),
            "symbol": symbol,
            "interval": interval,
            "source": source,
            **{c: columns[c] for c in (*PRICE_COLUMNS, "volume")},
        }
    )
    all_null = frame[list(QUOTE_FIELDS)].isna().all(axis=1).to_numpy()
    frame = frame.loc[~all_null]
    return Collected(conform(frame), int(all_null.sum()), _public_meta(meta))


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


def _stamp(instants: pd.DatetimeIndex, interval: str, meta: dict[str, Any]) -> pd.DatetimeIndex:
    """Daily and longer bars: 00:00 UTC of the trading date in the exchange's time zone."""
    if not is_daily_or_longer(interval):
        return instants
    local = instants.tz_convert(_exchange_zone(meta))
    return local.tz_localize(None).normalize().tz_localize("UTC")


def _exchange_zone(meta: dict[str, Any]) -> ZoneInfo | Any:
    name = meta.get("exchangeTimezoneName")
    if isinstance(name, str):
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            pass
    offset = meta.get("gmtoffset")
    return pd.Timedelta(seconds=int(offset)) if isinstance(offset, int) else "UTC"


def _public_meta(meta: dict[str, Any]) -> dict[str, object]:
    keys = ("currency", "exchangeName", "exchangeTimezoneName", "instrumentType", "regularMarketTime")
    return {k: meta[k] for k in keys if k in meta}


SOURCE = YahooFinance
