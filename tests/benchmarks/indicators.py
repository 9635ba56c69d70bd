"""Benchmark: the default indicator set over 1,000,000 bars, against raw TA-Lib on the same arrays.

    .venv/bin/python tests/benchmarks/indicators.py [--bars 1000000] [--repeat 5]

Prints bars/s for `compute_indicators` (the pipeline's path: pandas-ta on its TA-Lib backend,
NaN-safe masking, one float64 column per output) and the ratio of its time to the same TA-Lib calls
made directly on numpy arrays, measured side by side, best of --repeat.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import pandas as pd
import talib

from configs.settings import default_indicators
from tasks.indicators import compute_indicators


def synthetic_bars(n: int) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, n)))
    spread = np.abs(rng.normal(0, 0.005, n)) * close
    return pd.DataFrame(
        {
            "open": close * (1 + rng.normal(0, 0.002, n)),
            "high": close + spread,
            "low": close - spread,
            "close": close,
            "volume": rng.integers(1_000, 1_000_000, n).astype(float),
        }
    )


def raw_talib(bars: pd.DataFrame) -> None:
    h, lo, c, v = (bars[k].to_numpy() for k in ("high", "low", "close", "volume"))
    talib.SMA(c, 20)
    talib.EMA(c, 20)
    talib.RSI(c, 14)
    talib.MACD(c, 12, 26, 9)
    talib.BBANDS(c, 20, 2.0, 2.0, talib.MA_Type.SMA)  # type: ignore[attr-defined]
    talib.ATR(h, lo, c, 14)
    talib.OBV(c, v)


def best_of(repeat: int, work: Callable[[], object]) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bars", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    bars = synthetic_bars(args.bars)
    specs = default_indicators()
    compute_indicators(bars.head(1000), specs)  # warm caches and imports
    pipeline = best_of(args.repeat, lambda: compute_indicators(bars, specs))
    direct = best_of(args.repeat, lambda: raw_talib(bars))
    print(f"bars                      {args.bars:>12,}")
    print(f"compute_indicators        {args.bars / pipeline:>12,.0f} bars/s  ({pipeline * 1000:.1f} ms)")
    print(f"raw TA-Lib, same calls    {args.bars / direct:>12,.0f} bars/s  ({direct * 1000:.1f} ms)")
    print(f"ratio pipeline / raw      {pipeline / direct:>12.2f}")


if __name__ == "__main__":
    main()
