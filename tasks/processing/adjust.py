"""Adjusted prices and returns, derived from the stored bars' own columns.

``open``..``close`` are as each source documents them (both sources' are split-adjusted; see the
README). ``adj_close`` comes from the source, adjusted for splits and dividends; ``adj_open``,
``adj_high`` and ``adj_low`` apply the same factor, ``adj_close / close``, so the four adjusted
prices stay consistent with each other. A source with no ``adj_close`` leaves them NaN.

``return_1`` (simple) and ``log_return_1`` are one-bar total returns: computed on ``adj_close``
when the series has one, so a dividend or split is not a loss, else on ``close``. The first bar
of a series has none.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from tasks.bars import ADJUSTED_COLUMNS
from tasks.processing.step import Series, Stepped, extended


def add_adjusted_prices(frame: pd.DataFrame) -> pd.DataFrame:
    factor = frame["adj_close"].to_numpy() / frame["close"].to_numpy()
    prices = {adjusted: frame[adjusted.removeprefix("adj_")].to_numpy() * factor for adjusted in ADJUSTED_COLUMNS}
    return extended(frame, prices)


def add_returns(frame: pd.DataFrame) -> pd.DataFrame:
    adjusted = frame["adj_close"].to_numpy()
    prices = adjusted if pd.notna(adjusted).any() else frame["close"].to_numpy()
    ratio = np.full(len(prices), np.nan)
    ratio[1:] = prices[1:] / prices[:-1]
    return extended(frame, {"return_1": ratio - 1.0, "log_return_1": np.log(ratio)})


def adjusted_prices(frame: pd.DataFrame, series: Series) -> Stepped:
    """The step: ``adj_open``, ``adj_high`` and ``adj_low`` beside the source's ``adj_close``."""
    return Stepped(add_adjusted_prices(frame))


def returns(frame: pd.DataFrame, series: Series) -> Stepped:
    """The step: ``return_1`` and ``log_return_1``."""
    return Stepped(add_returns(frame))
