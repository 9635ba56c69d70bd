"""Run one symbol's processing on synthetic bars, so an image build pays the one-off costs.

`python -m flows.warmup` in the Dockerfile imports everything a flow run imports (compiling its
bytecode) and calls every processing step and indicator once, so a flow run's first symbol pays
no one-off cost; anything handed to numba is compiled into ``NUMBA_CACHE_DIR`` at build time.
"""

from __future__ import annotations

import importlib
import time

import numpy as np
import pandas as pd

from configs.indicators import default_indicators
from configs.settings import QualitySettings
from tasks.bars import conform
from tasks.processing.pipeline import process
from tasks.sources.base import Collected

SESSIONS = 600  # more than the longest default lookback, so every indicator produces values


def synthetic_bars(n: int = SESSIONS) -> pd.DataFrame:
    close = 100 * np.exp(np.cumsum(np.random.default_rng(0).normal(0, 0.01, n)))
    return conform(
        pd.DataFrame(
            {
                "time": pd.bdate_range("2020-01-01", periods=n, tz="UTC"),
                "symbol": "WARMUP",
                "interval": "1d",
                "source": "warmup",
                "open": close,
                "high": close * 1.01,
                "low": close * 0.99,
                "close": close,
                "adj_close": close,
                "volume": 1e6,
            }
        )
    )


def warm_up() -> float:
    """Process synthetic bars through every step; returns the seconds it took."""
    started = time.perf_counter()
    importlib.import_module("flows.maintenance")  # and through it every flow and task module
    processed = process(Collected(synthetic_bars()), "WARMUP", "1d", QualitySettings(), default_indicators())
    if processed.bars["rsi_14"].isna().all():
        raise RuntimeError("warm-up computed no indicator values: the image is broken")
    return time.perf_counter() - started


if __name__ == "__main__":
    print(f"warmed up in {warm_up():.2f} s")
