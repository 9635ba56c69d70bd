"""Alpha Vantage's TIME_SERIES_* endpoints (``{base_url}?function=..&symbol=..&apikey=..``).

Alpha Vantage carries the API key in the query string, so no message built here contains a request URL
unredacted. It reports most failures inside an HTTP 200 body (``Error Message``, ``Note``,
``Information``), so every body is classified before it is read as a time series.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, date, datetime, timedelta, timezone, tzinfo
from types import MappingProxyType
from typing import Any, Literal, NoReturn
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import httpx
import numpy as np
import pandas as pd
from pydantic import Field

from configs.settings import ConfigError, SourceSettings
from tasks.bars import (
    OHLCV,
    Instrument,
    conform,
    conform_actions,
    corporate_actions,
    empty_bars,
    flag_missing,
    is_daily_or_longer,
    period_start,
)
from tasks.errors import (
    PermanentSourceError,
    QuotaExhaustedError,
    RangeNotServedError,
    RateLimitedError,
)
from tasks.sources.base import BarQuery, Collected, HttpSource, within

PERIODIC_FUNCTIONS: dict[str, str] = {
    "1d": "TIME_SERIES_DAILY",
    "1wk": "TIME_SERIES_WEEKLY",
    "1mo": "TIME_SERIES_MONTHLY",
}
INTRADAY_INTERVALS: dict[str, str] = {
    "1m": "1min",
    "5m": "5min",
    "15m": "15min",
    "30m": "30min",
    "60m": "60min",
    "1h": "60min",
}
SUPPORTED_INTERVALS = (*PERIODIC_FUNCTIONS, *INTRADAY_INTERVALS)

# Alpha Vantage's throttling texts have changed wording over the years; these phrases cover them all.
RATE_LIMIT_PHRASES = ("call frequency", "call volume", "rate limit", "requests per day", "per minute")
# A text naming only a daily limit ("Our standard API rate limit is 25 requests per day") means the
# day's quota is spent: retrying before it resets only spends requests. One naming a per-minute or
# burst limit too (2018's "5 calls per minute and 500 calls per day") is a rate limit.
DAILY_QUOTA = re.compile(r"\b(?:requests|calls)\s+(?:per|a)\s+day\b|\bdaily\s+(?:rate\s+)?limit", re.IGNORECASE)
SHORT_LIMIT = re.compile(r"per\s+(?:minute|second)|burst|call\s+frequency", re.IGNORECASE)
DEFAULT_ZONE = "US/Eastern"

# Field names after the "N. " prefix, mapped to bar columns (dividend/split feed corporate actions).
FIELD_COLUMNS: dict[str, str] = {
    "open": "open",
    "high": "high",
    "low": "low",
    "close": "close",
    "adjusted close": "adj_close",
    "volume": "volume",
    "dividend amount": "dividend",
    "split coefficient": "split",
}

_FIELD_PREFIX = re.compile(r"^\s*\d+[a-z]?\s*[.:]\s*")
_GMT_OFFSET = re.compile(r"^(?:GMT|UTC)\s*([+-])(\d{1,2})(?::?(\d{2}))?$", re.IGNORECASE)
_TECHNICAL_PREFIX = "Technical Analysis:"


class AlphaVantageSettings(SourceSettings):
    """``data_sources.alpha_vantage``: the common keys, and which of AV's series and how much of it."""

    outputsize: Literal["compact", "full"] = Field(
        "compact", description="compact: the latest 100 daily bars; full: the whole history (a premium key)"
    )
    adjusted: bool = Field(False, description="the _ADJUSTED series, with adjusted close and corporate actions")


class AlphaVantage(HttpSource):
    name = "alpha_vantage"
    vendor = "Alpha Vantage"
    settings_model = AlphaVantageSettings
    settings: AlphaVantageSettings

    def build_requests(self, query: BarQuery) -> list[httpx.Request]:
        """Intraday history is served one calendar month per call, so intraday queries fan out by month."""
        apikey = self._api_key()
        function, av_interval = self._function(query)
        params = {"function": function, "symbol": query.symbol, "datatype": "json"}
        if av_interval is None:
            return [self._request({**params, "outputsize": self.settings.outputsize, "apikey": apikey})]
        intraday = {
            **params,
            "interval": av_interval,
            "outputsize": "full",
            # AV adjusts intraday bars unless told not to; keep them as raw as the daily series.
            "adjusted": "true" if self.settings.adjusted else "false",
            # Regular session only, like the other sources' intraday bars.
            "extended_hours": "false",
        }
        return [
            self._request({**intraday, "month": month, "apikey": apikey})
            for month in months_touched(query.start, query.end)
        ]

    def newest_requests(self, query: BarQuery, since: datetime, now: datetime) -> list[httpx.Request]:
        """The latest 100 bars (``compact``) when they reach back to ``since``, else whole months."""
        function, av_interval = self._function(query)
        if av_interval is None:
            raise RangeNotServedError(self.name, query.symbol, f"{query.interval} is not an intraday interval")
        if now - since > _interval_length(query.interval) * 90:
            return self.build_requests(query)
        params = {
            "function": function,
            "symbol": query.symbol,
            "datatype": "json",
            "interval": av_interval,
            "outputsize": "compact",
            "adjusted": "true" if self.settings.adjusted else "false",
            "extended_hours": "false",
            "apikey": self._api_key(),
        }
        return [self._request(params)]

    def parse(self, query: BarQuery, response: httpx.Response) -> Collected:
        self.check_status(query, response)
        payload = self.json_body(query, response)
        if not isinstance(payload, dict):
            self._fail(query, f"not a time-series response: the body is a JSON {type(payload).__name__}")
        self._check_messages(query, payload)
        series_key = _series_key(payload)
        if series_key is None:
            if response.status_code != 200:
                self._fail(query, f"Alpha Vantage answered HTTP {response.status_code} without a time series")
            found = ", ".join(repr(k) for k in payload) or "none"
            self._fail(query, f"not a time-series response: top-level keys {found}")
        meta = payload.get("Meta Data")
        meta = meta if isinstance(meta, dict) else {}
        rows = payload[series_key]
        if not isinstance(rows, dict):
            self._fail(query, f"malformed Alpha Vantage response: {series_key!r} is not an object")
        return self._collect(query, rows, meta)

    def _collect(self, query: BarQuery, rows: dict[str, Any], meta: dict[str, Any]) -> Collected:
        instrument = av_instrument(query.symbol, meta)
        if not rows:
            return Collected(empty_bars(), instrument=instrument)
        values = self._values(query, rows).sort_index(kind="stable")  # ISO keys: oldest first
        times = self._stamp(query, values.index, meta)
        frame = values.reset_index(drop=True).assign(
            time=times, symbol=query.symbol, interval=query.interval, source=self.name
        )
        frame = frame.sort_values("time", kind="stable").drop_duplicates(subset=["time"], keep="last")
        frame = _split_adjusted(frame.reset_index(drop=True))
        frame = within(frame, query)
        bars = flag_missing(frame[["time", "symbol", "interval", "source", *OHLCV, "adj_close"]])
        return Collected(
            conform(bars),
            actions=_actions(frame, query.symbol, self.name),
            instrument=instrument,
        )

    def _values(self, query: BarQuery, rows: dict[str, Any]) -> pd.DataFrame:
        """The series' fields by name, as float64, indexed by AV's timestamp keys."""
        if not all(isinstance(fields, dict) for fields in rows.values()):
            self._fail(query, "malformed Alpha Vantage response: a time-series entry is not an object")
        raw = pd.DataFrame.from_dict(rows, orient="index")
        names = {column: FIELD_COLUMNS.get(_field_name(column)) for column in raw.columns}
        if "close" not in names.values():
            fields = ", ".join(repr(c) for c in raw.columns)
            self._fail(query, f"malformed Alpha Vantage response: no close field among {fields}")
        known = raw[[c for c, name in names.items() if name]].rename(columns=names)
        return _floats(known).reindex(columns=[*OHLCV, "adj_close", "dividend", "split"])

    def _stamp(self, query: BarQuery, keys: pd.Index, meta: dict[str, Any]) -> pd.DatetimeIndex:
        try:
            return stamp_keys(keys, query.interval, _time_zone(meta))
        except (ValueError, TypeError) as exc:
            self._fail(query, f"malformed Alpha Vantage response: {exc}")

    def check_config(self) -> None:
        if not self.settings.api_key_block:  # a block is resolved at run time, on the worker
            self._api_key()

    def _api_key(self) -> str:
        secret = self.settings.api_key
        value = secret.get_secret_value().strip() if secret is not None else ""
        if value:
            return value
        block = self.settings.api_key_block
        hint = f" (the credentials block {block!r} was not resolved into a key)" if block else ""
        raise ConfigError(
            f"data_sources.alpha_vantage has no API key{hint}: set ALPHA_VANTAGE_API_KEY in the environment "
            "or `data_sources.alpha_vantage.api_key_block` to the name of a saved credentials block"
        )

    def _function(self, query: BarQuery) -> tuple[str, str | None]:
        """The AV function and, for intraday, AV's interval name."""
        if query.interval in INTRADAY_INTERVALS:
            return "TIME_SERIES_INTRADAY", INTRADAY_INTERVALS[query.interval]
        if query.interval in PERIODIC_FUNCTIONS:
            function = PERIODIC_FUNCTIONS[query.interval]
            return (f"{function}_ADJUSTED" if self.settings.adjusted else function), None
        raise RangeNotServedError(
            self.name,
            query.symbol,
            f"interval {query.interval!r} is not served by Alpha Vantage: use one of {', '.join(SUPPORTED_INTERVALS)}",
        )

    def _request(self, params: dict[str, str]) -> httpx.Request:
        return httpx.Request("GET", self.settings.base_url, params=params)

    def _check_messages(self, query: BarQuery, payload: dict[str, Any]) -> None:
        """AV's in-body refusals: a bad call, the day's quota spent, throttling, or a premium-only endpoint."""
        error = payload.get("Error Message")
        if error is not None:
            self._fail(query, f"Alpha Vantage rejected the call: {self._scrub(str(error))}")
        for key in ("Note", "Information"):
            text = payload.get(key)
            if text is None or _series_key(payload) is not None:
                continue
            quoted = self._scrub(str(text))
            lowered = quoted.lower()
            if DAILY_QUOTA.search(quoted) and not SHORT_LIMIT.search(quoted):
                raise QuotaExhaustedError(
                    self.name, query.symbol, f"Alpha Vantage said the daily quota is used up: {quoted}"
                )
            if any(phrase in lowered for phrase in RATE_LIMIT_PHRASES):
                raise RateLimitedError(self.name, query.symbol, f"Alpha Vantage throttled us: {quoted}")
            if "premium" in lowered:
                self._fail(
                    query, f"premium endpoint: this key's plan does not include it. Alpha Vantage said: {quoted}"
                )
            self._fail(query, f"Alpha Vantage refused the request ({key}): {quoted}")

    def _fail(self, query: BarQuery, message: str) -> NoReturn:
        raise PermanentSourceError(self.name, query.symbol, self._scrub(message))

    def _scrub(self, text: str) -> str:
        """Never repeat the key, even if AV's own text echoes it back."""
        secret = self.settings.api_key
        key = secret.get_secret_value().strip() if secret is not None else ""
        return text.replace(key, "***") if key else text


def months_touched(start: date, end: date) -> list[str]:
    """Every ``YYYY-MM`` from ``start``'s month to ``end``'s, inclusive; none if the range is empty."""
    months: list[str] = []
    year, month = start.year, start.month
    while (year, month) <= (end.year, end.month) and start <= end:
        months.append(f"{year:04d}-{month:02d}")
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return months


def stamp_keys(keys: pd.Index, interval: str, zone: tzinfo) -> pd.DatetimeIndex:
    """AV's timestamp keys to bar times.

    Daily keys are dates: 00:00 UTC of that date (a live period's key may carry a time, which is
    dropped). Weekly and monthly keys name the period's latest trading day, which for the unfinished
    period is today's and later another day's: they are stamped at the period's first day instead
    (Monday, the 1st, as Yahoo's), so the final bar lands on the partial one. Intraday keys are local
    times that label a bar by its END; bars here are stamped at their start instant, so the interval
    is subtracted after converting to UTC.
    """
    text = pd.Index(keys.astype(str))
    if is_daily_or_longer(interval):
        days = pd.DatetimeIndex(pd.to_datetime(text.str.slice(0, 10), format="%Y-%m-%d")).tz_localize(UTC)
        return period_start(days, interval)
    local_end = pd.DatetimeIndex(pd.to_datetime(text, format="ISO8601"))
    # A fall-back hour appears once in a JSON object, so the earlier (summer-time) reading is as good as any.
    end = local_end.tz_localize(zone, ambiguous=np.ones(len(text), dtype=bool), nonexistent="shift_forward")
    return end.tz_convert(UTC) - _interval_length(interval)


def parse_technical(payload: dict[str, Any]) -> pd.DataFrame:
    """An AV technical-indicator body as a frame, to check our indicators against AV's published values.

    One float64 column per indicator field (lowercased, e.g. ``sma``, ``real_upper_band``) and a UTC
    ``time`` column stamped like the bars, oldest first.
    """
    key = next((k for k in payload if k.startswith(_TECHNICAL_PREFIX)), None)
    if key is None:
        raise ValueError(f"not a technical-indicator response: top-level keys {', '.join(map(repr, payload))}")
    meta = payload.get("Meta Data") or {}
    rows: dict[str, dict[str, Any]] = payload[key]
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.columns = [_snake(str(c)) for c in frame.columns]
    frame = _floats(frame)
    interval = _technical_interval(str(_meta_value(meta, "Interval") or "daily"))
    frame.insert(0, "time", stamp_keys(frame.index, interval, _time_zone(meta)))
    return frame.sort_values("time", kind="stable").reset_index(drop=True)


def _floats(frame: pd.DataFrame) -> pd.DataFrame:
    """AV sends every number as a string; anything unparsable becomes NaN."""
    columns = {column: pd.to_numeric(frame[column], errors="coerce") for column in frame.columns}
    return pd.DataFrame(columns, index=frame.index, dtype=np.float64)


def _series_key(payload: dict[str, Any]) -> str | None:
    return next((k for k in payload if k.startswith("Time Series") or k.endswith("Time Series")), None)


def _field_name(column: object) -> str:
    return _FIELD_PREFIX.sub("", str(column)).strip().lower()


def _snake(column: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", _field_name(column)).strip("_")


def _meta_value(meta: dict[str, Any], suffix: str) -> Any:
    """Meta keys are numbered differently per endpoint ("5. Time Zone", "7: Time Zone"): match the name."""
    return next((value for key, value in meta.items() if str(key).endswith(suffix)), None)


def _time_zone(meta: dict[str, Any]) -> tzinfo:
    name = str(_meta_value(meta, "Time Zone") or DEFAULT_ZONE).strip()
    offset = _GMT_OFFSET.fullmatch(name)
    if offset:
        sign = -1 if offset[1] == "-" else 1
        return timezone(sign * timedelta(hours=int(offset[2]), minutes=int(offset[3] or 0)))
    for candidate in (name, name.removesuffix(" Time")):
        try:
            return ZoneInfo(candidate)
        except (ZoneInfoNotFoundError, ValueError):
            continue
    raise ValueError(f"unknown time zone {name!r} in Meta Data")


def _interval_length(interval: str) -> pd.Timedelta:
    minutes = INTRADAY_INTERVALS.get(interval, interval).removesuffix("min")
    if not minutes.isdigit():
        raise ValueError(f"interval {interval!r} is not an Alpha Vantage intraday interval")
    return pd.Timedelta(minutes=int(minutes))


def _technical_interval(av_interval: str) -> str:
    """AV's ``4: Interval`` ("15min", "daily", "weekly") as one of our interval names."""
    periodic = {"daily": "1d", "weekly": "1wk", "monthly": "1mo"}
    if av_interval in periodic:
        return periodic[av_interval]
    by_av_name = {av: ours for ours, av in INTRADAY_INTERVALS.items()}
    if av_interval not in by_av_name:
        raise ValueError(f"unknown Alpha Vantage interval {av_interval!r}")
    return by_av_name[av_interval]


def _actions(frame: pd.DataFrame, symbol: str, source: str) -> pd.DataFrame:
    """Dividends and splits from an adjusted series, dated like the bar that carries them."""
    time = frame["time"].to_numpy()
    dividends = frame["dividend"].where(frame["dividend"] != 0).to_numpy()
    splits = frame["split"].where(frame["split"] != 1).to_numpy()
    both = (
        corporate_actions(symbol, source, "dividend", time, amount=dividends),
        corporate_actions(symbol, source, "split", time, ratio=splits),
    )
    return conform_actions(pd.concat(both, ignore_index=True))


def _split_adjusted(frame: pd.DataFrame) -> pd.DataFrame:
    """Raw OHLCV restated in today's shares, as Yahoo serves it, from the series' own split coefficients.

    An adjusted series reports raw prices plus a ``split coefficient`` on each split's date; every
    earlier bar's prices are divided by the product of the later coefficients and its volume
    multiplied by it. Series without coefficients (TIME_SERIES_DAILY) are left raw: AV gives no way
    to adjust them. Computed over the whole response, so a window's bars know about later splits.
    """
    splits = frame["split"].where(frame["split"] > 0).fillna(1.0).to_numpy()
    if (splits == 1.0).all():
        return frame
    later = np.append(np.cumprod(splits[::-1])[::-1][1:], 1.0)
    frame[["open", "high", "low", "close"]] = frame[["open", "high", "low", "close"]].div(later, axis=0)
    frame["volume"] = frame["volume"] * later
    return frame


# Alpha Vantage sends no exchange, only a market suffix on the symbol.
MARKET_SUFFIXES: Mapping[str, str] = MappingProxyType({".LON": "XLON", ".TRT": "XTSE", ".DEX": "XETR"})


def av_instrument(symbol: str, meta: dict[str, Any]) -> Instrument:
    """What ``Meta Data`` and the symbol's market suffix say: the zone, the calendar, a compact answer."""
    zone = _meta_value(meta, "Time Zone")
    suffix = next((s for s in MARKET_SUFFIXES if symbol.upper().endswith(s)), None)
    return Instrument(
        exchange=suffix.removeprefix(".") if suffix else None,
        calendar=MARKET_SUFFIXES[suffix] if suffix else None,
        time_zone=str(zone).strip() if zone else None,
        # "Compact": the latest 100 bars, whatever was asked
        compact=str(_meta_value(meta, "Output Size") or "").strip().lower() == "compact",
    )


SOURCE = AlphaVantage
