"""The indicator step: the configured indicators over a series' bars, and how far back they look.

What each kind reads, writes and computes is its entry in :mod:`configs.indicators` (TA-Lib
called directly on the bars' float64 values). Here: which bars each one sees (a bar lacking a
value it reads is skipped for it, not for the others), how many stored bars an incremental run
needs, and carrying running sums on from their stored values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import pandas as pd

from configs.indicators import DAY_BARS, Floats, IndicatorSpec, Inputs
from configs.settings import ConfigError
from tasks.bars import epoch_nanos, intraday_length, is_daily_or_longer
from tasks.processing.step import Series, Stepped, extended

MIN_LOOKBACK = 500  # stored bars read at least, however short the windows
NANOS_PER_DAY = 86_400 * 10**9


def lookback_bars(specs: Sequence[IndicatorSpec], interval: str | None = None) -> int | None:
    """Stored bars to read back before new ones so incremental values equal a full recompute, for
    bars of ``interval`` (None: any); None: all of them (an indicator that can't say how far back
    it looks)."""
    needs = [_bars_a_day(interval) if spec.daily_anchor else spec.lookback for spec in specs]
    if any(need is None for need in needs):
        return None
    return max([MIN_LOOKBACK, *(need for need in needs if need is not None)])


def _bars_a_day(interval: str | None) -> int:
    """The most bars of ``interval`` one UTC day holds."""
    if interval is None:
        return DAY_BARS
    if is_daily_or_longer(interval):
        return 1
    return math.ceil(pd.Timedelta(days=1) / intraday_length(interval))


def bounded_lookback(specs: Sequence[IndicatorSpec], interval: str | None = None) -> int:
    """:func:`lookback_bars`, for real time: it recomputes every minute over what it holds in memory,
    so an indicator without a lookback is a config error there."""
    lookback = lookback_bars(specs, interval)
    if lookback is None:
        unbounded = ", ".join(f"indicators[{i}]" for i, spec in enumerate(specs) if spec.lookback is None)
        raise ConfigError(
            f"{unbounded}: real time needs to know how far back each indicator looks; "
            "give it `lookback: BARS` in the config"
        )
    return lookback


def continue_cumulative(
    new: pd.DataFrame, computed_past: pd.DataFrame, stored_past: pd.DataFrame | None, specs: Sequence[IndicatorSpec]
) -> pd.DataFrame:
    """Carry cumulative indicators (OBV, A/D) on from their stored values.

    A cumulative sum never forgets its start, so recomputed over the lookback alone it is off by
    a constant from the stored series: the difference at the last bar both have. Adding it back
    makes an incremental run's values those of one run over the whole series.
    """
    if stored_past is None or stored_past.empty or computed_past.empty:
        return new
    for spec in specs:
        if not spec.cumulative:
            continue
        (column,) = spec.columns
        if column not in stored_past or column not in computed_past:
            continue
        stored = stored_past[column].to_numpy(dtype=np.float64)
        computed = _at_times(computed_past, stored_past, column)
        both = np.flatnonzero(~np.isnan(stored) & ~np.isnan(computed))
        if both.size:
            last = both[-1]
            new[column] = new[column].to_numpy() + (float(stored[last]) - float(computed[last]))
    return new


def _at_times(frame: pd.DataFrame, times: pd.DataFrame, column: str) -> Floats:
    """``frame[column]`` at each of ``times``' times (NaN where ``frame`` has no bar then)."""
    have, wanted = pd.Index(frame["time"]), pd.Index(times["time"])
    values = frame[column].to_numpy(dtype=np.float64)
    if have.equals(wanted):
        return values  # the usual case: the same bars, recomputed
    position = have.get_indexer(wanted)
    return np.where(position >= 0, values[position], np.nan)


def indicator_columns(specs: Sequence[IndicatorSpec]) -> list[str]:
    return [column for spec in specs for column in spec.columns]


def compute_indicators(bars: pd.DataFrame, specs: Sequence[IndicatorSpec]) -> pd.DataFrame:
    """Append one float64 column per indicator output; warm-up rows are NaN, never 0.

    ``bars`` holds one series (symbol, interval, source) in time order. Bars lacking a value an
    indicator reads are skipped for that indicator (TA-Lib would carry a NaN forward forever) and
    get NaN: so a missing volume (FX) blanks the volume indicators only, never the price ones.
    """
    values: dict[str, Floats] = {}
    subsets: dict[tuple[str, ...], tuple[Inputs, npt.NDArray[np.bool_] | None]] = {}
    columns: dict[str, Floats] = {}
    for spec in specs:
        needs = spec.reads
        if needs not in subsets:
            for c in needs:
                if c not in values:
                    values[c] = _values(bars, c)
            complete = np.logical_and.reduce([~np.isnan(values[c]) for c in needs])
            whole = bool(complete.all())
            subsets[needs] = (values, None) if whole else ({c: values[c][complete] for c in needs}, complete)
        usable, mask = subsets[needs]
        for column, result in zip(spec.columns, spec.compute(usable), strict=True):
            if mask is None:
                columns[column] = result
            else:
                columns[column] = np.full(len(bars), np.nan)
                columns[column][mask] = result
    replaced = [c for c in columns if c in bars.columns]
    kept = bars.drop(columns=replaced) if replaced else bars
    return extended(kept, columns)  # recomputed columns go to the end, with the new ones


def _values(bars: pd.DataFrame, column: str) -> Floats:
    """A bar value as float64 (NaN where missing); ``day``: the bar's UTC day, counted from 1970."""
    if column == "day":
        return (epoch_nanos(bars["time"]) // NANOS_PER_DAY).astype(np.float64)
    return bars[column].to_numpy(dtype=np.float64, na_value=np.nan)


def technical_indicators(frame: pd.DataFrame, series: Series) -> Stepped:
    """The step: the configured indicators over the whole series, stored history included."""
    return Stepped(compute_indicators(frame, series.indicators))
