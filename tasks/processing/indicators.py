"""Technical indicators, computed by TA-Lib, called directly on the bars' float64 values.

pandas-ta silently switches implementation depending on whether TA-Lib is importable, and the two
disagree (RSI seeding, Bollinger ddof, OBV offset). We call TA-Lib itself, the functions pandas-ta's
``talib=True`` path wraps, with the same arguments: the values are those, and this module refuses
to load without TA-Lib, so a result can never depend on what happens to be installed. Going
straight to the arrays also skips pandas-ta's per-call wrapping, which costs far more than the
arithmetic on a real-time run's few hundred bars. TA-Lib follows the textbook definitions (Wilder's
SMA-seeded RSI and ATR, SMA-seeded EMA, population standard deviation for the bands), which is what
the published references in the test suite use too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from configs.settings import ATR, EMA, MACD, OBV, RSI, SMA, BBands, IndicatorSpec
from tasks.processing.step import Series, Stepped, extended

try:
    import talib
except ImportError as error:
    raise ImportError(
        "TA-Lib is not importable, and every indicator here is TA-Lib's: there is no fallback with "
        "different formulas. Install the locked environment (uv sync) which includes the `ta-lib` package."
    ) from error

Floats = npt.NDArray[np.float64]
# Bollinger's middle band is the simple moving average, and the bands are around it.
BANDS_AVERAGE = talib.MA_Type.SMA  # type: ignore[attr-defined]
Inputs = Mapping[str, Floats]  # the bar values an indicator reads, by column


def longest_period(spec: IndicatorSpec) -> int:
    """Bars an indicator looks back over, counting chained smoothing (MACD's signal line)."""
    if isinstance(spec, MACD):
        return spec.slow + spec.signal
    if isinstance(spec, OBV):
        return 1
    return spec.length


def lookback_bars(specs: Sequence[IndicatorSpec]) -> int:
    """Stored bars to read back before new ones so incremental values equal a full recompute.

    Recursive indicators (EMA, Wilder's RSI and ATR) forget their seed geometrically; twenty of their
    periods shrink its weight below 1e-12 for the default set. At least 500 bars are read.
    """
    return max(500, 20 * max((longest_period(s) for s in specs), default=1))


def continue_cumulative(
    new: pd.DataFrame, computed_past: pd.DataFrame, stored_past: pd.DataFrame | None, specs: Sequence[IndicatorSpec]
) -> pd.DataFrame:
    """Carry cumulative indicators (OBV) on from their stored values.

    A cumulative sum never forgets its start, so recomputed over the lookback alone it is off by
    a constant from the stored series: the difference at the last bar both have. Adding it back
    makes an incremental run's values those of one run over the whole series.
    """
    if stored_past is None or stored_past.empty or computed_past.empty:
        return new
    for spec in specs:
        if not isinstance(spec, OBV):
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
    get NaN: so a missing volume (FX) blanks OBV only, never the price indicators.
    """
    values: dict[str, Floats] = {}
    subsets: dict[tuple[str, ...], tuple[Inputs, npt.NDArray[np.bool_] | None]] = {}
    columns: dict[str, Floats] = {}
    for spec in specs:
        needs = INPUTS.get(type(spec), ("close",))
        if needs not in subsets:
            for c in needs:
                if c not in values:
                    values[c] = bars[c].to_numpy(dtype=np.float64, na_value=np.nan)
            complete = np.logical_and.reduce([~np.isnan(values[c]) for c in needs])
            whole = bool(complete.all())
            subsets[needs] = (values, None) if whole else ({c: values[c][complete] for c in needs}, complete)
        usable, mask = subsets[needs]
        for column, result in zip(spec.columns, _COMPUTE[type(spec)](usable, spec), strict=True):
            if mask is None:
                columns[column] = result
            else:
                columns[column] = np.full(len(bars), np.nan)
                columns[column][mask] = result
    replaced = [c for c in columns if c in bars.columns]
    kept = bars.drop(columns=replaced) if replaced else bars
    return extended(kept, columns)  # recomputed columns go to the end, with the new ones


def technical_indicators(frame: pd.DataFrame, series: Series) -> Stepped:
    """The step: the configured indicators over the whole series, stored history included."""
    return Stepped(compute_indicators(frame, series.indicators))


def _sma(v: Inputs, s: SMA) -> list[Floats]:
    return [talib.SMA(v["close"], s.length)]


def _ema(v: Inputs, s: EMA) -> list[Floats]:
    return [talib.EMA(v["close"], s.length)]


def _rsi(v: Inputs, s: RSI) -> list[Floats]:
    return [talib.RSI(v["close"], s.length)]


def _macd(v: Inputs, s: MACD) -> list[Floats]:
    macd, signal, histogram = talib.MACD(v["close"], s.fast, s.slow, s.signal)
    return [macd, signal, histogram]


def _bbands(v: Inputs, s: BBands) -> list[Floats]:
    upper, mid, lower = talib.BBANDS(v["close"], s.length, s.std, s.std, BANDS_AVERAGE)
    return [lower, mid, upper]


def _atr(v: Inputs, s: ATR) -> list[Floats]:
    return [talib.ATR(v["high"], v["low"], v["close"], s.length)]


def _obv(v: Inputs, s: OBV) -> list[Floats]:
    return [talib.OBV(v["close"], v["volume"])]


# The bar values each kind reads; the rest read only the close.
INPUTS: dict[type, tuple[str, ...]] = {ATR: ("high", "low", "close"), OBV: ("close", "volume")}

_COMPUTE: dict[type, Callable[[Inputs, Any], list[Floats]]] = {
    SMA: _sma,
    EMA: _ema,
    RSI: _rsi,
    MACD: _macd,
    BBands: _bbands,
    ATR: _atr,
    OBV: _obv,
}
