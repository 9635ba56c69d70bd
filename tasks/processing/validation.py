"""Validation: every delivered bar is kept as clean or quarantined with the rule it broke.

Rules, in the order they are checked (a bar is quarantined under the first rule it breaks):

- ``invalid_value``: a time that is not a date, or a price or volume that is present but not a number.
- ``duplicate_time``: another bar with the same timestamp arrived later; the later one is kept.
- ``off_grid``: a daily or longer bar not stamped at 00:00 UTC, or an intraday bar off its grid.
  With the exchange calendar known, a bar inside a session segment (a lunch break splits a
  session in two: HKEX 09:30-12:00 and 13:00-16:00) must be a whole number of intervals after that
  segment's open, or after the segment's first bar (for sources whose bars keep the clock's grid
  rather than the open's). Other bars (no calendar, outside trading hours) must be a whole number
  of intervals after the first bar of their UTC day (so 09:30, 10:30 ... for hourly bars).
- ``future_time``: a bar that starts after now (daily bars: after tomorrow 00:00 UTC, because a
  trading date east of UTC can be a day ahead of the UTC date).
- ``ohlc_inconsistent``: low > high, or open or close outside low..high by more than the
  tolerance (relative to the price, ``quality.ohlc_tolerance``).
- ``non_positive_price``: a price <= 0.
- ``negative_volume``: volume < 0.

Two repairs are made here, and counted. Bars delivered out of order are sorted (``out_of_order``
counts the bars that arrived earlier than a bar before them). A bar whose open or close lies
outside low..high by no more than the tolerance (FX and index feeds bend OHLC by a few basis
points) has high and low widened to take them in and ``flag_ohlc_repaired`` set
(``ohlc_repaired`` counts them). Missing values are not a rule: the missing-value policy decides
what happens to them (see :mod:`tasks.processing.missing`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import numpy.typing as npt
import pandas as pd

from tasks.bars import (
    BAR_COLUMNS,
    FLAG_OHLC_REPAIRED,
    INTERVALS,
    OHLC,
    PRICE_COLUMNS,
    VALUE_COLUMNS,
    conform,
    epoch_nanos,
    intraday_length,
    is_conformed,
    is_daily_or_longer,
)
from tasks.calendars import Segments, segment_of, session_segments
from tasks.processing.step import Series, Stepped

# Sources round prices independently: a bend this small (relative) is rounding, neither repaired nor flagged.
OHLC_TOLERANCE = 1e-9
DAY_NS = pd.Timedelta(days=1).value
NAT = np.iinfo(np.int64).min  # NaT, in nanoseconds since the epoch
INTERVAL_LENGTHS: dict[str, pd.Timedelta] = {i: intraday_length(i) for i in INTERVALS if not is_daily_or_longer(i)}
RULES: dict[str, str] = {
    "invalid_value": "a time or value is present but not a date or number",
    "duplicate_time": "another bar with the same timestamp arrived later",
    "off_grid": "the timestamp is not on the interval's grid",
    "future_time": "the bar starts in the future",
    "ohlc_inconsistent": "low/high do not bracket open and close",
    "non_positive_price": "a price is zero or negative",
    "negative_volume": "volume is negative",
}
RULE_NAMES: tuple[str, ...] = tuple(RULES)
RULE_CODES: dict[str, int] = {name: code for code, name in enumerate(RULE_NAMES, start=1)}
# The columns a quarantined bar keeps besides its values: why it was set aside.
QUARANTINE_COLUMNS: tuple[str, ...] = ("rule", "reason")


class MissingColumnsError(ValueError):
    """A frame without the standard columns can't be validated bar by bar: the whole batch is refused."""


@dataclass
class Validated:
    clean: pd.DataFrame
    quarantined: pd.DataFrame
    counts: dict[str, int] = field(default_factory=dict)
    out_of_order: int = 0
    ohlc_repaired: int = 0


def validate_bars(
    bars: pd.DataFrame,
    now: datetime | None = None,
    *,
    calendar: str | None = None,
    ohlc_tolerance: float = 0.0,
) -> Validated:
    """Sort the bars and check each one; quarantined bars carry ``rule`` and ``reason`` columns.

    ``calendar`` (an exchange_calendars name) anchors the intraday grid on each session segment's
    open; ``ohlc_tolerance`` is the relative bend of open/close outside low..high that is repaired
    (0: none). Clean bars carry ``flag_ohlc_repaired``.
    """
    missing = [c for c in BAR_COLUMNS if c not in bars.columns]
    if missing:
        raise MissingColumnsError(
            f"bars are missing required columns {', '.join(missing)}: the source must deliver {', '.join(BAR_COLUMNS)}"
        )
    bad_values: npt.NDArray[np.bool_]
    if is_conformed(bars):  # what every source delivers: no cast, no copy
        frame, bad_values = bars, np.zeros(len(bars), dtype=bool)
    else:
        frame = conform(bars.assign(time=pd.to_datetime(bars["time"], utc=True, errors="coerce")))
        bad_values = _unparseable(bars)
    nanos = epoch_nanos(frame["time"])
    unparseable = bad_values | (nanos == NAT)  # a time that is not a date is NaT by now
    out_of_order = int((np.diff(nanos) < 0).sum())
    if out_of_order:
        order = np.argsort(nanos, kind="stable")
        frame, unparseable, nanos = frame.iloc[order].reset_index(drop=True), unparseable[order], nanos[order]

    rule = np.zeros(len(frame), dtype=np.int8)  # 0: clean, else 1 + the rule's position in RULES

    def check(mask: npt.ArrayLike, name: str) -> None:
        rule[np.asarray(mask, dtype=bool) & (rule == 0)] = RULE_CODES[name]

    check(unparseable, "invalid_value")
    earlier_duplicate = np.zeros(len(frame), dtype=bool)
    earlier_duplicate[:-1] = nanos[1:] == nanos[:-1]  # sorted, so the last of equal times is kept
    check(earlier_duplicate, "duplicate_time")
    interval = str(frame["interval"].iloc[0]) if len(frame) else "1d"
    segments = _segments(nanos, interval, calendar)
    check(~_on_grid(nanos, interval, segments), "off_grid")
    check(nanos > _future_limit(interval, now or datetime.now(UTC)).value, "future_time")
    values = {k: frame[k].to_numpy() for k in VALUE_COLUMNS}
    o, h, lo, c = (values[k] for k in OHLC)
    bend = _bend(o, h, lo, c)
    with np.errstate(invalid="ignore"):
        inverted = lo > h + OHLC_TOLERANCE * np.nan_to_num(np.abs(h))
        check(inverted | (bend > max(ohlc_tolerance, OHLC_TOLERANCE)), "ohlc_inconsistent")
        check(np.logical_or.reduce([values[p] <= 0 for p in PRICE_COLUMNS]), "non_positive_price")
        check(values["volume"] < 0, "negative_volume")
        bent = (rule == 0) & (bend > OHLC_TOLERANCE)
    frame = _widen(frame, bent, values)

    bad = rule != 0
    repaired = int(bent.sum())
    if not bad.any():
        none = frame.iloc[:0].reindex(columns=[*frame.columns, *QUARANTINE_COLUMNS], fill_value="")
        return Validated(frame, none, {}, out_of_order, repaired)
    names = np.asarray(RULE_NAMES, dtype=object)[rule[bad] - 1]
    quarantined = frame.loc[bad].drop(columns=FLAG_OHLC_REPAIRED).assign(rule=names, reason=[RULES[r] for r in names])
    counts = {str(k): int(v) for k, v in quarantined["rule"].value_counts().items()}
    clean = frame.loc[~bad].reset_index(drop=True)
    return Validated(clean, quarantined.reset_index(drop=True), counts, out_of_order, repaired)


def validate(frame: pd.DataFrame, series: Series) -> Stepped:
    """The step: the new bars sorted and checked against the rules, on the series' calendar;
    the bad ones go aside with their rule and reason, counted by rule."""
    checked = validate_bars(frame, series.now, calendar=series.calendar, ohlc_tolerance=series.quality.ohlc_tolerance)
    return Stepped(checked.clean, {**checked.counts, "out_of_order": checked.out_of_order}, aside=checked.quarantined)


def _bend(
    o: npt.NDArray[np.float64], h: npt.NDArray[np.float64], lo: npt.NDArray[np.float64], c: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """How far open or close lie outside low..high, relative to the bound they cross (0 inside, NaN-safe)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        above = (np.fmax(o, c) - h) / np.abs(h)
        below = (lo - np.fmin(o, c)) / np.abs(lo)
    bend: npt.NDArray[np.float64] = np.nan_to_num(np.fmax(np.fmax(above, below), 0.0), nan=0.0, posinf=np.inf)
    return bend


def _widen(
    frame: pd.DataFrame, bent: npt.NDArray[np.bool_], values: Mapping[str, npt.NDArray[np.float64]]
) -> pd.DataFrame:
    """High and low of the ``bent`` bars widened to take in open and close; every bar gets the flag column."""
    o, h, lo, c = (values[k] for k in OHLC)
    columns = {FLAG_OHLC_REPAIRED: bent.astype(np.float64)}
    if bent.any():
        columns["high"] = np.where(bent, np.fmax(h, np.fmax(o, c)), h)
        columns["low"] = np.where(bent, np.fmin(lo, np.fmin(o, c)), lo)
    return frame.assign(**columns)


def _unparseable(bars: pd.DataFrame) -> npt.NDArray[np.bool_]:
    """Bars with a value that is present but would silently become NaN when cast to float."""
    bad = np.zeros(len(bars), dtype=bool)
    for column in VALUE_COLUMNS:
        values = bars[column]
        if not pd.api.types.is_numeric_dtype(values):
            bad |= (pd.to_numeric(values, errors="coerce").isna() & values.notna()).to_numpy()
    return bad


def _segments(nanos: npt.NDArray[np.int64], interval: str, calendar: str | None) -> Segments | None:
    """The calendar's trading segments around intraday bars, or None (daily bars, no calendar, out of its years)."""
    valid = nanos[nanos != NAT]
    if calendar is None or is_daily_or_longer(interval) or valid.size == 0:
        return None
    first = pd.Timestamp(int(valid.min())) - pd.Timedelta(days=1)
    last = pd.Timestamp(int(valid.max())) + pd.Timedelta(days=1)
    return session_segments(calendar, first.date(), last.date())


def _on_grid(nanos: npt.NDArray[np.int64], interval: str, segments: Segments | None = None) -> npt.NDArray[np.bool_]:
    """``nanos`` sorted: each day's bars are a contiguous run starting at the day's first bar."""
    day = nanos - nanos % DAY_NS
    if is_daily_or_longer(interval):
        return np.asarray(nanos == day)
    length = INTERVAL_LENGTHS[interval].value
    on_grid = (nanos - _run_starts(nanos, day)) % length == 0
    if segments is None:
        return np.asarray(on_grid)
    position = segment_of(nanos, segments)
    inside = position >= 0
    opens = segments[0][np.clip(position, 0, None)] if segments[0].size else np.zeros(len(nanos), np.int64)
    from_open = (nanos - opens) % length == 0
    from_first = np.ones(len(nanos), dtype=bool)
    from_first[inside] = (nanos[inside] - _run_starts(nanos[inside], position[inside])) % length == 0
    return np.asarray(np.where(inside, from_open | from_first, on_grid))


def _run_starts(nanos: npt.NDArray[np.int64], key: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Each bar's first bar with the same ``key``; ``key`` is sorted along with ``nanos``."""
    if not len(nanos):
        return np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    return np.repeat(nanos[starts], np.diff(np.r_[starts, len(nanos)]))


def _future_limit(interval: str, now: datetime) -> pd.Timestamp:
    limit = pd.Timestamp(now).tz_convert(UTC) if pd.Timestamp(now).tzinfo else pd.Timestamp(now, tz=UTC)
    return limit.floor("D") + pd.Timedelta(days=1) if is_daily_or_longer(interval) else limit
