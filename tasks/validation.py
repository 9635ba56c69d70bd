"""Validation: every delivered bar is kept as clean or quarantined with the rule it broke.

Rules, in the order they are checked (a bar is quarantined under the first rule it breaks):

- ``invalid_value``: a time that is not a date, or a price or volume that is present but not a number.
- ``duplicate_time``: another bar with the same timestamp arrived later; the later one is kept.
- ``off_grid``: a daily or longer bar not stamped at 00:00 UTC, or an intraday bar not a whole
  number of intervals after the first bar of its UTC day (so 09:30, 10:30 ... for hourly bars).
- ``future_time``: a bar that starts after now (daily bars: after tomorrow 00:00 UTC, because a
  trading date east of UTC can be a day ahead of the UTC date).
- ``ohlc_inconsistent``: low > min(open, close), high < max(open, close) or low > high.
- ``non_positive_price``: a price <= 0.
- ``negative_volume``: volume < 0.

One repair is made here, and counted: bars delivered out of order are sorted (``out_of_order``
counts the bars that arrived earlier than a bar before them). Missing values are not a rule: the
missing-value policy decides what happens to them (see :mod:`tasks.missing`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import numpy.typing as npt
import pandas as pd

from tasks.bars import BAR_COLUMNS, INTERVALS, PRICE_COLUMNS, VALUE_COLUMNS, conform, is_conformed, is_daily_or_longer

# Sources round prices independently, so allow a relative slack of a few ulps-of-cents.
OHLC_TOLERANCE = 1e-9
DAY_NS = pd.Timedelta(days=1).value
INTERVAL_LENGTHS: dict[str, pd.Timedelta] = {
    i: pd.Timedelta(i.replace("m", "min")) for i in INTERVALS if not is_daily_or_longer(i)
}
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


def validate_bars(bars: pd.DataFrame, now: datetime | None = None) -> Validated:
    """Sort the bars and check each one; quarantined bars carry ``rule`` and ``reason`` columns."""
    missing = [c for c in BAR_COLUMNS if c not in bars.columns]
    if missing:
        raise MissingColumnsError(
            f"bars are missing required columns {', '.join(missing)}: the source must deliver {', '.join(BAR_COLUMNS)}"
        )
    unparseable: npt.NDArray[np.bool_]
    if is_conformed(bars):  # what every source delivers: no cast, no copy
        frame, unparseable = bars, bars["time"].isna().to_numpy()
    else:
        times = pd.to_datetime(bars["time"], utc=True, errors="coerce")
        unparseable = _unparseable(bars) | times.isna().to_numpy()
        frame = conform(bars.assign(time=times))
    nanos = _nanos(frame["time"])
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
    check(~_on_grid(nanos, interval), "off_grid")
    check(nanos > _future_limit(interval, now or datetime.now(UTC)).value, "future_time")
    o, h, lo, c = (frame[k].to_numpy() for k in ("open", "high", "low", "close"))
    slack = OHLC_TOLERANCE * np.nan_to_num(np.abs(h))
    with np.errstate(invalid="ignore"):
        check((lo > np.fmin(o, c) + slack) | (h < np.fmax(o, c) - slack) | (lo > h + slack), "ohlc_inconsistent")
        check(np.logical_or.reduce([frame[p].to_numpy() <= 0 for p in PRICE_COLUMNS]), "non_positive_price")
        check(frame["volume"].to_numpy() < 0, "negative_volume")

    bad = rule != 0
    if not bad.any():
        return Validated(frame, frame.iloc[:0].assign(rule="", reason=""), {}, out_of_order)
    names = np.asarray(RULE_NAMES, dtype=object)[rule[bad] - 1]
    quarantined = frame.loc[bad].assign(rule=names, reason=[RULES[r] for r in names])
    counts = {str(k): int(v) for k, v in quarantined["rule"].value_counts().items()}
    return Validated(frame.loc[~bad].reset_index(drop=True), quarantined.reset_index(drop=True), counts, out_of_order)


def _unparseable(bars: pd.DataFrame) -> npt.NDArray[np.bool_]:
    """Bars with a value that is present but would silently become NaN when cast to float."""
    bad = np.zeros(len(bars), dtype=bool)
    for column in VALUE_COLUMNS:
        values = bars[column]
        if not pd.api.types.is_numeric_dtype(values):
            bad |= (pd.to_numeric(values, errors="coerce").isna() & values.notna()).to_numpy()
    return bad


def _nanos(times: pd.Series) -> npt.NDArray[np.int64]:
    """Nanoseconds since the epoch (NaT as the smallest int64), for fast arithmetic."""
    return pd.DatetimeIndex(times).tz_convert(None).to_numpy().view(np.int64)


def _on_grid(nanos: npt.NDArray[np.int64], interval: str) -> npt.NDArray[np.bool_]:
    """``nanos`` sorted: each day's bars are a contiguous run starting at the day's first bar."""
    day = nanos - nanos % DAY_NS
    if is_daily_or_longer(interval):
        return np.asarray(nanos == day)
    starts = np.flatnonzero(np.r_[True, day[1:] != day[:-1]]) if len(nanos) else np.zeros(0, dtype=np.int64)
    day_open = np.repeat(nanos[starts], np.diff(np.r_[starts, len(nanos)]))
    return np.asarray((nanos - day_open) % INTERVAL_LENGTHS[interval].value == 0)


def _future_limit(interval: str, now: datetime) -> pd.Timestamp:
    limit = pd.Timestamp(now).tz_convert(UTC) if pd.Timestamp(now).tzinfo else pd.Timestamp(now, tz=UTC)
    return limit.floor("D") + pd.Timedelta(days=1) if is_daily_or_longer(interval) else limit
