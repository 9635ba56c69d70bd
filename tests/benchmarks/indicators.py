"""Benchmark: the default indicator set over 1,000,000 bars, against raw TA-Lib on the same arrays.

    .venv/bin/python tests/benchmarks/indicators.py [--bars 1000000] [--repeat 5]

Prints bars/s for `compute_indicators` (the pipeline's path: TA-Lib on the bars' arrays,
NaN-safe masking, one float64 column per output) and the ratio of its time to the same TA-Lib calls
made directly on numpy arrays, measured side by side, best of --repeat. Then the whole processing
step, `process()`, on the same bars as one 24/7 series of 1-minute bars: validation, the
missing-value policy, bad ticks, adjusted prices, returns, indicators and the session check.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import pandas as pd
import talib

from configs.indicators import default_indicators
from configs.settings import QualitySettings
from tasks.bars import Instrument, conform, flag_missing
from tasks.processing.indicators import compute_indicators
from tasks.processing.pipeline import process
from tasks.sources.base import Collected


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


def as_collected(bars: pd.DataFrame) -> Collected:
    """The synthetic bars as a source would deliver them: one crypto series of 1-minute bars."""
    frame = bars.assign(
        time=pd.date_range("2024-01-01", periods=len(bars), freq="min", tz="UTC"),
        symbol="BTC-USD",
        interval="1m",
        source="bench",
        adj_close=bars["close"],
    )
    frame["high"] = frame[["open", "high", "close"]].max(axis=1)
    frame["low"] = frame[["open", "low", "close"]].min(axis=1)
    return Collected(flag_missing(conform(frame)), instrument=Instrument(calendar="24/7"))


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

    collected, quality = as_collected(bars), QualitySettings()
    processed = process(collected, "BTC-USD", "1m", quality, specs)  # warm the calendar cache
    assert len(processed.bars) == args.bars and processed.gaps is not None and processed.gaps.count == 0
    whole = best_of(args.repeat, lambda: process(collected, "BTC-USD", "1m", quality, specs))
    print(f"process(), every step     {args.bars / whole:>12,.0f} bars/s  ({whole * 1000:.1f} ms)")
    print(f"ratio process() / raw     {whole / direct:>12.2f}")


if __name__ == "__main__":
    main()
