"""Benchmark: the indicators over 1,000,000 bars, against the same calls made directly on numpy arrays.

    .venv/bin/python tests/benchmarks/indicators.py [--bars 1000000] [--repeat 5]

Two sets, side by side in one run: the default set (`default_indicators()`) and the common set
(every registry kind but `pandas_ta`, each with its default parameters). For each set, the time
of `compute_indicators` (the pipeline's path: the registry's entries on the bars' arrays,
NaN-safe masking, one float64 column per output appended to the frame) and of the same work
written out here on numpy arrays, `raw_default` and `raw_common`: the TA-Lib calls with the
registry's default parameters, and numpy for what TA-Lib lacks (VWAP, the Keltner bands,
Donchian's middle), their outputs kept as compute_indicators keeps its columns. Each time is the
best of --repeat, the two timed alternately; the ratio is compute_indicators' time over the raw
one. Before timing, each raw function's outputs are checked against compute_indicators' columns
(same names; the same values, VWAP to rounding since its running sums are computed differently).
Printed as a Markdown table: set | kinds | columns | compute_indicators s | raw s | ratio.

The bars are a random walk of 1-minute UTC bars (`time` included, which VWAP reads). Then the
whole processing step, `process()`, with the default set on the same bars as one 24/7 series:
validation, the missing-value policy, bad ticks, adjusted prices, returns, indicators and the
session check; its ratio is to the default set's raw time. Last, for each set, the median time
`process()` takes for one new 1m bar after the stored lookback: real time's call every minute.
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from collections.abc import Callable, Sequence
from functools import partial

import numpy as np
import numpy.typing as npt
import pandas as pd
import talib

from configs.indicators import KINDS, Indicator, default_indicators
from configs.settings import QualitySettings
from tasks.bars import Instrument, conform, flag_missing
from tasks.processing.indicators import compute_indicators, lookback_bars
from tasks.processing.pipeline import process
from tasks.sources.base import Collected

Floats = npt.NDArray[np.float64]
SMA_TYPE = talib.MA_Type.SMA  # type: ignore[attr-defined]
NANOS_PER_DAY = 86_400 * 10**9

# The columns each raw function returns, in its order: the registry's default parameters, by its
# naming rule. A changed default or a new kind changes compute_indicators' columns, and the check fails.
DEFAULT_COLUMNS = (
    "sma_20", "ema_20", "rsi_14", "macd_12_26_9", "macd_signal_12_26_9", "macd_hist_12_26_9",
    "bb_lower_20_2", "bb_mid_20_2", "bb_upper_20_2", "atr_14", "obv",
)  # fmt: skip
COMMON_COLUMNS = (
    "sma_20", "wma_20", "ema_20", "dema_20", "tema_20", "rsi_14",
    "macd_12_26_9", "macd_signal_12_26_9", "macd_hist_12_26_9", "stoch_k_14_3_3", "stoch_d_14_3_3",
    "stochrsi_k_14_14_3", "stochrsi_d_14_14_3", "cci_20", "willr_14", "mfi_14", "roc_10", "mom_10",
    "adx_14", "plus_di_14", "minus_di_14", "aroon_down_14", "aroon_up_14",
    "bb_lower_20_2", "bb_mid_20_2", "bb_upper_20_2", "atr_14", "natr_14",
    "kc_lower_20_10_2", "kc_mid_20_10_2", "kc_upper_20_10_2", "dc_lower_20", "dc_mid_20", "dc_upper_20",
    "obv", "ad", "adosc_3_10", "vwap",
)  # fmt: skip
INEXACT = {"vwap"}  # running sums: pandas' grouped cumsum there, numpy's per day here
TOLERANCE = 1e-12  # relative
BAR_COLUMNS = ("time", "open", "high", "low", "close", "volume")


def synthetic_bars(n: int) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, n)))
    spread = np.abs(rng.normal(0, 0.005, n)) * close
    return pd.DataFrame(
        {
            "time": pd.date_range("2024-01-01", periods=n, freq="min", tz="UTC"),
            "open": close * (1 + rng.normal(0, 0.002, n)),
            "high": close + spread,
            "low": close - spread,
            "close": close,
            "volume": rng.integers(1_000, 1_000_000, n).astype(float),
        }
    )


def as_collected(bars: pd.DataFrame) -> Collected:
    """The synthetic bars as a source would deliver them: one crypto series of 1-minute bars."""
    frame = bars.assign(symbol="BTC-USD", interval="1m", source="bench", adj_close=bars["close"])
    frame["high"] = frame[["open", "high", "close"]].max(axis=1)
    frame["low"] = frame[["open", "low", "close"]].min(axis=1)
    return Collected(flag_missing(conform(frame)), instrument=Instrument(calendar="24/7"))


def common_indicators() -> list[Indicator]:
    """Every registry kind but pandas-ta, with its default parameters."""
    return [entry.model_validate({}) for kind, entry in KINDS.items() if kind != "pandas_ta"]


def arrays(bars: pd.DataFrame) -> tuple[Floats, Floats, Floats, Floats]:
    h, lo, c, v = (bars[k].to_numpy(dtype=np.float64) for k in ("high", "low", "close", "volume"))
    return h, lo, c, v


def raw_default(bars: pd.DataFrame) -> list[Floats]:
    """The default set's TA-Lib calls, in DEFAULT_COLUMNS' order."""
    h, lo, c, v = arrays(bars)
    macd, signal, hist = talib.MACD(c, 12, 26, 9)
    upper, mid, lower = talib.BBANDS(c, 20, 2.0, 2.0, SMA_TYPE)
    return [
        talib.SMA(c, 20), talib.EMA(c, 20), talib.RSI(c, 14), macd, signal, hist,
        lower, mid, upper, talib.ATR(h, lo, c, 14), talib.OBV(c, v),
    ]  # fmt: skip


def raw_common(bars: pd.DataFrame) -> list[Floats]:
    """The common set's TA-Lib calls and numpy arithmetic, in COMMON_COLUMNS' order."""
    h, lo, c, v = arrays(bars)
    macd, signal, hist = talib.MACD(c, 12, 26, 9)
    stoch_k, stoch_d = talib.STOCH(h, lo, c, 14, 3, SMA_TYPE, 3, SMA_TYPE)
    stochrsi_k, stochrsi_d = talib.STOCHRSI(c, 14, 14, 3, SMA_TYPE)
    aroon_down, aroon_up = talib.AROON(h, lo, 14)
    upper, mid, lower = talib.BBANDS(c, 20, 2.0, 2.0, SMA_TYPE)
    kc_mid = talib.EMA(c, 20)
    kc_width = 2.0 * talib.ATR(h, lo, c, 10)
    dc_lower, dc_upper = talib.MIN(lo, 20), talib.MAX(h, 20)
    return [
        talib.SMA(c, 20), talib.WMA(c, 20), talib.EMA(c, 20), talib.DEMA(c, 20), talib.TEMA(c, 20),
        talib.RSI(c, 14), macd, signal, hist, stoch_k, stoch_d, stochrsi_k, stochrsi_d,
        talib.CCI(h, lo, c, 20), talib.WILLR(h, lo, c, 14), talib.MFI(h, lo, c, v, 14),
        talib.ROC(c, 10), talib.MOM(c, 10), talib.ADX(h, lo, c, 14), talib.PLUS_DI(h, lo, c, 14),
        talib.MINUS_DI(h, lo, c, 14), aroon_down, aroon_up, lower, mid, upper,
        talib.ATR(h, lo, c, 14), talib.NATR(h, lo, c, 14),
        kc_mid - kc_width, kc_mid, kc_mid + kc_width, dc_lower, (dc_lower + dc_upper) / 2, dc_upper,
        talib.OBV(c, v), talib.AD(h, lo, c, v), talib.ADOSC(h, lo, c, v, 3, 10),
        raw_vwap(h, lo, c, v, bars["time"].to_numpy(dtype="datetime64[ns]").view(np.int64)),
    ]  # fmt: skip


def raw_vwap(h: Floats, lo: Floats, c: Floats, v: Floats, nanos: npt.NDArray[np.int64]) -> Floats:
    """Each UTC day's running sum of typical price x volume over its running volume (bars in time order)."""
    weighted = (h + lo + c) / 3 * v
    day = nanos // NANOS_PER_DAY
    bounds = [0, *(np.flatnonzero(np.diff(day)) + 1).tolist(), len(day)]
    summed, volume = np.empty_like(weighted), np.empty_like(v)
    for start, end in itertools.pairwise(bounds):
        np.cumsum(weighted[start:end], out=summed[start:end])
        np.cumsum(v[start:end], out=volume[start:end])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(volume > 0, summed / volume, np.nan)


def check(name: str, computed: pd.DataFrame, columns: Sequence[str], raw: list[Floats]) -> None:
    """The raw function computes what compute_indicators does: same columns, same values."""
    added = [c for c in computed.columns if c not in BAR_COLUMNS]
    if added != list(columns):
        raise SystemExit(f"{name}: compute_indicators writes {added}, the raw function {list(columns)}")
    for column, values in zip(columns, raw, strict=True):
        ours = computed[column].to_numpy()
        if column in INEXACT:
            np.testing.assert_allclose(values, ours, rtol=TOLERANCE, equal_nan=True, err_msg=f"{name}: {column}")
        elif not np.array_equal(values, ours, equal_nan=True):
            raise SystemExit(f"{name}: {column} differs between compute_indicators and the raw calls")


def best_of_each(repeat: int, works: Sequence[Callable[[], object]]) -> list[float]:
    """Each work's best time of ``repeat``, the works timed in turn (so both see the same noise)."""
    best = [math.inf] * len(works)
    for _ in range(repeat):
        for i, work in enumerate(works):
            started = time.perf_counter()
            work()
            best[i] = min(best[i], time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bars", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    bars = synthetic_bars(args.bars)
    sets: list[tuple[str, list[Indicator], Callable[[pd.DataFrame], list[Floats]], tuple[str, ...]]] = [
        ("default", default_indicators(), raw_default, DEFAULT_COLUMNS),
        ("common", common_indicators(), raw_common, COMMON_COLUMNS),
    ]
    print(f"{args.bars:,} bars, best of {args.repeat}\n")
    print("| set | kinds | columns | compute_indicators s | raw s | ratio |\n|---|---|---|---|---|---|")
    direct = {}
    for name, specs, raw, columns in sets:
        check(name, compute_indicators(bars, specs), columns, raw(bars))  # also warms caches and imports
        timed: list[Callable[[], object]] = [partial(compute_indicators, bars, specs), partial(raw, bars)]
        ours, raw_s = best_of_each(args.repeat, timed)
        direct[name] = raw_s
        print(f"| {name} | {len(specs)} | {len(columns)} | {ours:.3f} | {raw_s:.3f} | {ours / raw_s:.2f} |")

    specs = default_indicators()
    collected, quality = as_collected(bars), QualitySettings()
    processed = process(collected, "BTC-USD", "1m", quality, specs)  # warm the calendar cache
    assert len(processed.bars) == args.bars and processed.gaps is not None and processed.gaps.count == 0
    (whole,) = best_of_each(args.repeat, [lambda: process(collected, "BTC-USD", "1m", quality, specs)])
    print(f"\nprocess(), every step, default set  {args.bars / whole:>12,.0f} bars/s  ({whole * 1000:.1f} ms)")
    print(f"ratio process() / raw default       {whole / direct['default']:>12.2f}")

    print("\nOne new 1m bar after its stored lookback, as real time processes each minute (median of 50):")
    for name, specs, _, _ in sets:
        lookback, one_bar = one_new_bar(bars, specs)
        print(f"  {name:8} {lookback:>5} stored bars  {one_bar * 1000:6.1f} ms")


def one_new_bar(bars: pd.DataFrame, specs: list[Indicator]) -> tuple[int, float]:
    """The lookback of ``specs`` at 1m, and the median time `process()` takes for one new bar after it."""
    lookback = lookback_bars(specs, "1m") or 0
    whole = as_collected(bars.head(lookback + 1))
    quality = QualitySettings()
    history = process(Collected(whole.bars.iloc[:lookback]), "BTC-USD", "1m", quality, specs).bars
    new = Collected(whole.bars.iloc[lookback:].reset_index(drop=True), instrument=whole.instrument)
    times = []
    for _ in range(50):
        started = time.perf_counter()
        process(new, "BTC-USD", "1m", quality, specs, history, session_gaps=False)
        times.append(time.perf_counter() - started)
    return lookback, float(np.median(times))


if __name__ == "__main__":
    main()
