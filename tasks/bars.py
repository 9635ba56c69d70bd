"""The standard bar frame: the one shape every source produces and every store accepts.

Columns, in order: ``time`` (tz-aware UTC), ``symbol``, ``interval``, ``source``, the float64 prices
``open high low close adj_close`` and ``volume`` (float64 too, so no source can cause an int/float
conflict downstream), then flag and indicator columns. Daily bars are stamped at 00:00 UTC of their
trading date, weekly and longer bars at 00:00 UTC of their period's first day (:func:`period_start`),
intraday bars at their start instant.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from datetime import UTC, date
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from blocks.store import BAR_KEY, SERIES_TAGS
from tasks.errors import InvalidSymbolError, UsageError

TIME = "time"
UTC_TIME = "datetime64[ns, UTC]"
KEY_COLUMNS: tuple[str, ...] = BAR_KEY
TAG_COLUMNS: tuple[str, ...] = SERIES_TAGS
PRICE_COLUMNS: tuple[str, ...] = ("open", "high", "low", "close", "adj_close")
VALUE_COLUMNS: tuple[str, ...] = (*PRICE_COLUMNS, "volume")
# The values a source reports for a bar; a bar with none of them is no bar at all.
OHLC: tuple[str, ...] = ("open", "high", "low", "close")
OHLCV: tuple[str, ...] = (*OHLC, "volume")
BAR_COLUMNS: tuple[str, ...] = (*KEY_COLUMNS, *VALUE_COLUMNS)

DAILY_OR_LONGER: frozenset[str] = frozenset({"1d", "5d", "1wk", "1mo", "3mo"})
INTERVALS: tuple[str, ...] = (
    "1m", "2m", "5m", "15m", "30m", "60m", "90m", "1h", "1d", "5d", "1wk", "1mo", "3mo",
)  # fmt: skip

# Ticker grammar, documented in the README. One to five dot-, dash- or equals-joined parts of
# letters and digits, optionally prefixed by ``^`` (indices). It admits AAPL, BRK-B, ^GSPC,
# EURUSD=X, BTC-USD, 0700.HK and GC=F, and refuses anything that could smuggle a path, a query
# string, whitespace or a quote into a request or a query.
SYMBOL_PATTERN = re.compile(r"^\^?[A-Z0-9]{1,12}(?:[.\-=][A-Z0-9]{1,12}){0,4}$")


def validate_symbol(symbol: str) -> str:
    """Return the symbol upper-cased, or refuse it before any request is built."""
    candidate = symbol.strip().upper()
    if not SYMBOL_PATTERN.fullmatch(candidate):
        raise InvalidSymbolError(
            f"invalid symbol {symbol!r}: expected a ticker such as AAPL, BRK-B, ^GSPC, EURUSD=X, "
            "BTC-USD, 0700.HK or GC=F (letters and digits joined by '.', '-' or '=', "
            "optionally starting with '^')"
        )
    return candidate


def validate_symbols(symbols: Iterable[str]) -> list[str]:
    """Validate every symbol and drop repeats, keeping the caller's order."""
    checked = [validate_symbol(s) for s in symbols if s.strip()]
    if not checked:
        raise UsageError("no symbols given: pass --symbols AAPL,MSFT or set `symbols` in the config")
    return list(dict.fromkeys(checked))


def validate_interval(interval: str) -> str:
    if interval not in INTERVALS:
        raise UsageError(f"invalid interval {interval!r}: expected one of {', '.join(INTERVALS)}")
    return interval


def parse_date(value: date | str | None, name: str) -> date | None:
    """A date given as YYYY-MM-DD (or already a date), or a UsageError naming ``name``."""
    if value is None or isinstance(value, date):
        return value
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise UsageError(f"{name} {value!r} is not a date: use YYYY-MM-DD") from None


def epoch_nanos(times: pd.Series) -> npt.NDArray[np.int64]:
    """Nanoseconds since the epoch of a time column (NaT as the smallest int64), for fast arithmetic."""
    return times.to_numpy(dtype="datetime64[ns]").view(np.int64)


def intraday_length(interval: str) -> pd.Timedelta:
    """An intraday interval's length (``1m``, ``15m``, ``1h`` ...): pandas reads ``m`` as months."""
    return pd.Timedelta(interval.replace("m", "min"))


def is_daily_or_longer(interval: str) -> bool:
    return interval in DAILY_OR_LONGER


# Calendar periods, as pandas period frequencies ("W-SUN": weeks ending Sunday, i.e. starting Monday).
PERIOD_FREQUENCIES: dict[str, str] = {"1wk": "W-SUN", "1mo": "M", "3mo": "Q"}


def period_start(days: pd.DatetimeIndex, interval: str) -> pd.DatetimeIndex:
    """Weekly, monthly and quarterly bars' dates moved to their period's first day (Monday, the 1st).

    Yahoo stamps these bars so already. Alpha Vantage labels each period with its latest trading day,
    so an unfinished week and its final bar would get different dates and both stay stored; stamped
    by period, the final bar overwrites the partial one. Other intervals are returned unchanged.
    """
    freq = PERIOD_FREQUENCIES.get(interval)
    if freq is None or days.empty:
        return days
    naive = days.tz_localize(None) if days.tz is not None else days
    starts = pd.DatetimeIndex(naive.to_period(freq).start_time)
    return starts.tz_localize(days.tz) if days.tz is not None else starts


@dataclass(frozen=True)
class Instrument:
    """What a source says of a symbol, in our terms: each source fills it from its own vendor's
    fields (Yahoo's ``meta``, Alpha Vantage's ``Meta Data``), so processing and the calendars
    never read a vendor's names."""

    currency: str | None = None  # as the source quotes prices: GBp for pence
    exchange: str | None = None  # the source's own name for the exchange (NMS, LSE), for messages
    calendar: str | None = None  # its exchange_calendars name (XNYS, 24/7 ...); None: not known
    time_zone: str | None = None  # the exchange's IANA zone
    listed: date | None = None  # its first trading day, where the source says
    compact: bool = False  # the answer holds only the latest bars, whatever window was asked

    def updated(self, later: Instrument) -> Instrument:
        """These facts, with those a later answer gives replacing them."""
        given = {f.name: getattr(later, f.name) for f in fields(later) if getattr(later, f.name) not in (None, False)}
        return Instrument(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **given})


def empty_bars() -> pd.DataFrame:
    """A zero-row frame with the standard columns and dtypes, as a source delivers it."""
    return _EMPTY_BARS.copy()


def is_conformed(frame: pd.DataFrame) -> bool:
    """Already in the standard column order and dtypes, as :func:`conform` leaves a frame."""
    if tuple(frame.columns[: len(BAR_COLUMNS)]) != BAR_COLUMNS:
        return False
    # All dtypes at once: each column looked up on its own costs a Series.
    dtypes = dict(zip(BAR_COLUMNS, frame.dtypes.iloc[: len(BAR_COLUMNS)], strict=True))
    return (
        str(dtypes[TIME]) == UTC_TIME
        and all(dtypes[c] == np.float64 for c in VALUE_COLUMNS)
        and all(dtypes[c] == np.dtype(object) for c in TAG_COLUMNS)
    )


def conform(frame: pd.DataFrame) -> pd.DataFrame:
    """Cast a frame to the standard dtypes and column order; extra columns keep their place after."""
    missing = [c for c in BAR_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"bar frame is missing required columns: {', '.join(missing)}")
    # Each column is cast only when it is not in shape already: a source's frame mostly is, and a
    # collect conforms every response, so needless casts cost more than the parse.
    columns: dict[str, object] = {}
    time = frame[TIME]
    if str(time.dtype) != UTC_TIME:
        time = pd.to_datetime(time, utc=True).astype("datetime64[ns, UTC]")
    columns[TIME] = time.array
    for column in TAG_COLUMNS:
        tags = frame[column]
        is_text = tags.dtype == object and pd.api.types.infer_dtype(tags, skipna=False) == "string"
        columns[column] = (tags if is_text else tags.astype(str)).to_numpy()
    for column in VALUE_COLUMNS:
        values = frame[column]
        if values.dtype != np.float64:
            values = pd.to_numeric(values, errors="coerce").astype(np.float64)
        columns[column] = values.to_numpy()
    columns |= {c: frame[c].array for c in frame.columns if c not in BAR_COLUMNS}
    return pd.DataFrame(columns, index=pd.RangeIndex(len(frame)), copy=True)


# Corporate actions: one row per event. ``ratio`` for splits (new shares per old share),
# ``amount`` (per share, in the listing currency) for dividends and capital gains.
ACTION_KINDS: tuple[str, ...] = ("split", "dividend", "capital_gain")
ACTION_COLUMNS: tuple[str, ...] = ("time", "symbol", "source", "kind", "ratio", "amount")
# Flag columns are float fields like every other value: 1.0 set, 0.0 clear.
# ``flag_missing``: the source left some of open/high/low/close/volume empty (see the missing-value policy).
FLAG_MISSING = "flag_missing"
# ``flag_ohlc_repaired``: open or close lay a little outside low..high (within ``quality.ohlc_tolerance``),
# so high and low were widened to take them in (see :mod:`tasks.processing.validation`).
FLAG_OHLC_REPAIRED = "flag_ohlc_repaired"
# Split- and dividend-adjusted prices, all from one factor: adj_close / close.
ADJUSTED_COLUMNS: tuple[str, ...] = ("adj_open", "adj_high", "adj_low")


def empty_actions() -> pd.DataFrame:
    return _EMPTY_ACTIONS.copy()


def conform_actions(frame: pd.DataFrame) -> pd.DataFrame:
    """Cast a corporate-actions frame to its standard dtypes and column order."""
    out = frame.reindex(columns=list(ACTION_COLUMNS)).copy()
    out["time"] = pd.to_datetime(out["time"], utc=True).astype("datetime64[ns, UTC]")
    for column in ("symbol", "source", "kind"):
        out[column] = out[column].astype(str)
    unknown = set(out["kind"]) - set(ACTION_KINDS)
    if unknown:
        raise ValueError(f"unknown corporate action kind(s) {sorted(unknown)}: expected {', '.join(ACTION_KINDS)}")
    for column in ("ratio", "amount"):
        out[column] = pd.to_numeric(out[column], errors="coerce").astype(np.float64)
    return out.sort_values(["time", "kind"], kind="stable").reset_index(drop=True)


def corporate_actions(
    symbol: str, source: str, kind: str, time: Any, ratio: Any = np.nan, amount: Any = np.nan
) -> pd.DataFrame:
    """One kind of action in the standard frame, from its times and values (arrays or scalars).

    Events without their value (a split's ``ratio``, a payout's ``amount``) are no action, and skipped.
    """
    frame = pd.DataFrame({"time": time, "kind": kind, "ratio": ratio, "amount": amount})
    value = frame["ratio"] if kind == "split" else frame["amount"]
    return conform_actions(frame.loc[value.notna().to_numpy()].assign(symbol=symbol, source=source))


def series_bars(
    times: Iterable[float], symbol: str, interval: str, source: str, values: Mapping[str, Iterable[float]]
) -> pd.DataFrame:
    """One series' bars from their start instants (epoch seconds) and values, conformed and flagged
    as ``conform(flag_missing(...))`` leaves them, built in one step: real time builds a frame of a
    bar or two per symbol each minute, where those two cost more than processing the bar.
    ``values`` holds any of VALUE_COLUMNS (NaN for a missing value); the others are NaN."""
    seconds = np.fromiter(times, dtype=np.float64)
    n = len(seconds)
    instants = pd.DatetimeIndex((seconds * 1e3).round().astype(np.int64) * 10**6, tz=UTC).array  # as stamp() rounds
    columns: dict[str, Any] = {TIME: instants}
    tags = zip(TAG_COLUMNS, (symbol, interval, source), strict=True)
    columns |= {tag: np.full(n, value, dtype=object) for tag, value in tags}
    for column in VALUE_COLUMNS:
        given = values.get(column)
        columns[column] = np.full(n, np.nan) if given is None else np.fromiter(given, dtype=np.float64, count=n)
    columns[FLAG_MISSING] = np.logical_or.reduce([np.isnan(columns[c]) for c in OHLCV]).astype(np.float64)
    return pd.DataFrame(columns, index=pd.RangeIndex(n), copy=False)


def flag_missing(frame: pd.DataFrame) -> pd.DataFrame:
    """Mark bars with any of open/high/low/close/volume missing; the missing-value policy decides their fate."""
    return frame.assign(**{FLAG_MISSING: _lacking(frame, OHLCV).astype(np.float64)})


def missing_prices(frame: pd.DataFrame) -> npt.NDArray[np.bool_]:
    """Bars lacking any of open/high/low/close (volume alone missing is normal for FX and some indices)."""
    return _lacking(frame, OHLC)


def _lacking(frame: pd.DataFrame, columns: Iterable[str]) -> npt.NDArray[np.bool_]:
    """Bars with no value (NaN, None, NA) in any of ``columns``, column by column: a frame-wide
    ``isna`` costs more than the check itself on a real-time run's few bars."""
    lacking: npt.NDArray[np.bool_] = np.logical_or.reduce([pd.isna(frame[c].to_numpy()) for c in columns])
    return lacking


# Built once: every response without bars or events needs one, and building them costs more than copying.
_EMPTY_BARS = conform(pd.DataFrame({column: [] for column in BAR_COLUMNS})).assign(**{FLAG_MISSING: np.float64()})
_EMPTY_ACTIONS = conform_actions(pd.DataFrame({column: [] for column in ACTION_COLUMNS}))
