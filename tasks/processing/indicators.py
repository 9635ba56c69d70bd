"""Technical indicators, computed by pandas-ta on its TA-Lib backend, chosen explicitly.

pandas-ta silently switches implementation depending on whether TA-Lib is importable, and the two
disagree (RSI seeding, Bollinger ddof, OBV offset). We pin the choice: every call passes
``talib=True`` and this module refuses to load without TA-Lib, so a result can never depend on what
happens to be installed. TA-Lib follows the textbook definitions (Wilder's SMA-seeded RSI and ATR,
SMA-seeded EMA, population standard deviation for the bands), which is what the published references
in the test suite use too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt
import pandas as pd
import pandas_ta as ta

from configs.settings import ATR, EMA, MACD, OBV, RSI, SMA, BBands, IndicatorSpec
from tasks.processing.step import Series, Stepped

if not ta.Imports.get("talib"):
    raise ImportError(
        "TA-Lib is not importable, so pandas-ta would silently fall back to different formulas. "
        "Install the locked environment (uv sync) which includes the `ta-lib` package."
    )

Floats = npt.NDArray[np.float64]


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
        stored = stored_past.set_index("time")[column]
        computed = computed_past.set_index("time")[column].reindex(stored.index)
        both = stored.notna() & computed.notna()
        if both.any():
            last = both[both].index[-1]
            new[column] = new[column] + (float(stored[last]) - float(computed[last]))
    return new


def indicator_columns(specs: Sequence[IndicatorSpec]) -> list[str]:
    return [column for spec in specs for column in spec.columns]


def compute_indicators(bars: pd.DataFrame, specs: Sequence[IndicatorSpec]) -> pd.DataFrame:
    """Append one float64 column per indicator output; warm-up rows are NaN, never 0.

    ``bars`` holds one series (symbol, interval, source) in time order. Bars lacking a value an
    indicator reads are skipped for that indicator (TA-Lib would carry a NaN forward forever) and
    get NaN: so a missing volume (FX) blanks OBV only, never the price indicators.
    """
    subsets: dict[tuple[str, ...], tuple[pd.DataFrame, npt.NDArray[np.bool_] | None]] = {}
    columns: dict[str, Floats] = {}
    for spec in specs:
        needs = INPUTS.get(type(spec), ("close",))
        if needs not in subsets:
            complete = np.logical_and.reduce([bars[c].notna().to_numpy() for c in needs])
            whole = bool(complete.all())
            subsets[needs] = (bars, None) if whole else (bars.loc[complete, list(needs)], complete)
        usable, mask = subsets[needs]
        for column, values in zip(spec.columns, _COMPUTE[type(spec)](usable, spec), strict=True):
            if mask is None:
                columns[column] = values
            else:
                columns[column] = np.full(len(bars), np.nan)
                columns[column][mask] = values
    kept = bars.drop(columns=[c for c in columns if c in bars.columns])
    # One concat builds the float block once, instead of a reallocation per inserted column.
    return pd.concat([kept, pd.DataFrame(columns, index=bars.index)], axis=1)


def technical_indicators(frame: pd.DataFrame, series: Series) -> Stepped:
    """The step: the configured indicators over the whole series, stored history included."""
    return Stepped(compute_indicators(frame, series.indicators))


def _array(result: pd.Series | None, n: int) -> Floats:
    """pandas-ta returns None when the series is shorter than the window: all warm-up then."""
    if result is None:
        return np.full(n, np.nan)
    return result.to_numpy(dtype=np.float64, na_value=np.nan)


def _pick(frame: pd.DataFrame | None, prefix: str, n: int) -> Floats:
    if frame is None:
        return np.full(n, np.nan)
    matches = [c for c in frame.columns if c.startswith(prefix)]
    if len(matches) != 1:
        raise RuntimeError(f"pandas-ta output has no single column starting with {prefix!r}: {list(frame.columns)}")
    return _array(frame[matches[0]], n)


def _sma(b: pd.DataFrame, s: SMA) -> list[Floats]:
    return [_array(ta.sma(b["close"], length=s.length, talib=True), len(b))]


def _ema(b: pd.DataFrame, s: EMA) -> list[Floats]:
    return [_array(ta.ema(b["close"], length=s.length, talib=True), len(b))]


def _rsi(b: pd.DataFrame, s: RSI) -> list[Floats]:
    return [_array(ta.rsi(b["close"], length=s.length, talib=True), len(b))]


def _macd(b: pd.DataFrame, s: MACD) -> list[Floats]:
    frame = ta.macd(b["close"], fast=s.fast, slow=s.slow, signal=s.signal, talib=True)
    n = len(b)
    return [_pick(frame, "MACD_", n), _pick(frame, "MACDs_", n), _pick(frame, "MACDh_", n)]


def _bbands(b: pd.DataFrame, s: BBands) -> list[Floats]:
    frame = ta.bbands(b["close"], length=s.length, lower_std=s.std, upper_std=s.std, mamode="sma", talib=True)
    n = len(b)
    return [_pick(frame, "BBL_", n), _pick(frame, "BBM_", n), _pick(frame, "BBU_", n)]


def _atr(b: pd.DataFrame, s: ATR) -> list[Floats]:
    return [_array(ta.atr(b["high"], b["low"], b["close"], length=s.length, talib=True), len(b))]


def _obv(b: pd.DataFrame, s: OBV) -> list[Floats]:
    return [_array(ta.obv(b["close"], b["volume"], talib=True), len(b))]


# The bar values each kind reads; the rest read only the close.
INPUTS: dict[type, tuple[str, ...]] = {ATR: ("high", "low", "close"), OBV: ("close", "volume")}

_COMPUTE: dict[type, Callable[[pd.DataFrame, object], list[Floats]]] = {
    SMA: _sma,  # type: ignore[dict-item]
    EMA: _ema,  # type: ignore[dict-item]
    RSI: _rsi,  # type: ignore[dict-item]
    MACD: _macd,  # type: ignore[dict-item]
    BBands: _bbands,  # type: ignore[dict-item]
    ATR: _atr,  # type: ignore[dict-item]
    OBV: _obv,  # type: ignore[dict-item]
}
