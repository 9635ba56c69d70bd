"""The missing-value policy (``quality.missing``): what happens to a bar the source left partly empty.

A bar is *missing* when any of open, high, low or close is absent (Yahoo's null rows, a vendor
file's blanks). Volume alone absent is normal for FX and some indices and is only flagged
(``flag_missing``). Nothing is fabricated silently:

- ``drop`` (default): missing bars are not stored; the summary counts them.
- ``ffill``: prices are carried from the previous bar's close: a missing close or open becomes
  it, a missing high/low becomes max/min(open, close), a missing adj_close keeps the previous
  bar's adjustment factor, and volume becomes 0 when it is missing too. ``flag_filled`` marks the
  bar. A missing bar with no earlier close (the first bar ever) can't be filled and is dropped.
- ``keep``: the bar is stored with NaN values; indicators skip it (see :mod:`tasks.processing.indicators`).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import numpy.typing as npt
import pandas as pd

from tasks.bars import flag_missing, missing_prices
from tasks.processing.step import Series, Stepped

MissingPolicy = Literal["drop", "ffill", "keep"]
FLAG_FILLED = "flag_filled"
Mask = npt.NDArray[np.bool_]


def mark_missing(frame: pd.DataFrame, series: Series) -> Stepped:
    """The step: ``flag_missing`` on every new bar lacking a price or its volume."""
    return Stepped(flag_missing(frame))


def missing_policy(frame: pd.DataFrame, series: Series) -> Stepped:
    """The step: ``quality.missing`` applied to the new bars; the stored ones ahead are only read."""
    frame, counts = apply_missing_policy(frame, series.quality.missing, start=series.stored)
    return Stepped(frame, counts)


def apply_missing_policy(
    frame: pd.DataFrame, policy: MissingPolicy, start: int = 0
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Apply ``policy`` to the bars from position ``start`` on; earlier rows are stored history.

    Returns the frame and the counts (``missing_dropped``, ``missing_filled``, ``missing_kept``),
    non-zero ones only.
    """
    missing = missing_prices(frame).copy()
    missing[:start] = False
    frame = frame.assign(**{FLAG_FILLED: 0.0})
    if not missing.any():
        return frame, {}
    if policy == "keep":
        return frame, {"missing_kept": int(missing.sum())}
    if policy == "ffill":
        frame, missing = _fill(frame, missing)
    dropped = int(missing.sum())
    counts = {"missing_filled": int(frame[FLAG_FILLED].sum()), "missing_dropped": dropped}
    return frame.loc[~missing].reset_index(drop=True), {k: v for k, v in counts.items() if v}


def _fill(frame: pd.DataFrame, missing: Mask) -> tuple[pd.DataFrame, Mask]:
    """Carry prices into the missing bars; returns the frame and the bars that could not be filled."""
    close = frame["close"].to_numpy()
    carried = pd.Series(close).ffill().shift(1).to_numpy()  # the last known close before each bar
    filled = frame.copy()
    new_close = np.where(missing & np.isnan(close), carried, close)
    fillable = missing & ~np.isnan(new_close)
    previous_close = pd.Series(new_close).shift(1).to_numpy()
    opens = filled["open"].to_numpy()
    new_open = np.where(
        fillable & np.isnan(opens), np.where(np.isnan(previous_close), new_close, previous_close), opens
    )
    high, low = filled["high"].to_numpy(), filled["low"].to_numpy()
    new_high = np.where(fillable & np.isnan(high), np.fmax(new_open, new_close), high)
    new_low = np.where(fillable & np.isnan(low), np.fmin(new_open, new_close), low)
    factor = pd.Series(filled["adj_close"].to_numpy() / close).ffill().shift(1).to_numpy()
    adj = filled["adj_close"].to_numpy()
    new_adj = np.where(fillable & np.isnan(adj), new_close * factor, adj)
    volume = filled["volume"].to_numpy()
    new_volume = np.where(fillable & np.isnan(volume), 0.0, volume)
    filled = filled.assign(
        open=np.where(fillable, new_open, opens),
        high=new_high,
        low=new_low,
        close=np.where(fillable, new_close, close),
        adj_close=new_adj,
        volume=new_volume,
        **{FLAG_FILLED: np.where(fillable, 1.0, 0.0)},
    )
    return filled, missing & ~fillable
