"""Bad-tick checks: quote-unit normalisation, unit-error repair, zero-volume and spike flags.

Users trade on these prices, so every change to a price is visible in a flag column and nothing
is repaired unless the right value is unambiguous. Flags are float64 fields (1.0 set, 0.0 clear).
Frames are one series (symbol, interval, source) sorted by time. "Valid close" below means a finite
close > 0; a bar without one is never flagged or repaired, and is never used as a neighbour.

Quote unit (:func:`to_major_unit`): a series quoted in a minor currency unit (see ``MINOR_UNITS``:
GBp/GBX pence, ZAc/ZAC South African cents, ILA Israeli agorot) has open, high, low, close and
adj_close divided by 100 and is reported in the major unit (GBP, ZAR, ILS). Volume is a share count
and is unchanged. Apply it to freshly collected bars only: stored bars are already in the major unit.

Rules, in the order :func:`check_ticks` runs them:

1. ``flag_unit_repaired`` (repaired). A source that switches between pence and pounds for a few
   bars puts them 100x off. A bar's neighbours are the valid closes among the ``window // 2`` bars
   before it and the ``window // 2`` bars after it (default ``window`` 11: up to five each side,
   fewer at the frame's ends), the bar itself excluded. With ``m`` their median (the mean of the
   two middle values for an even count) and ``r = close / m``, a bar with a valid close is
   repaired when both hold:

   - band: ``|log10(r) - 2| < log10(1.5)`` (r strictly between 66.7 and 150): its open, high, low,
     close and adj_close are divided by 100; or ``|log10(r) + 2| < log10(1.5)`` (r strictly between
     1/150 and 1/66.7): they are multiplied by 100. Volume is never scaled;
   - enclosed: at least one neighbour before it and one after it are in that same band from the
     bar (``close / neighbour`` near 100, or near 1/100, by the same test). So at least two valid
     neighbours, and a return to the other scale on both sides.

   What that means in practice. The median excludes the bar, so it is at the normal scale only
   while off-scale bars are fewer than half the valid neighbours: with no missing closes a run of
   up to ``window // 2`` (5) consecutive off-scale bars is repaired whole, and a longer run is left
   whole (its windows are balanced, with the median between the two scales, or off-scale).
   Missing closes shrink the windows they fall in, so next to them part of such a run can be
   repaired and the rest left; each bar's flag says which. A run touching either end of the frame
   is never repaired (not enclosed): whether the newest bars are a unit error or the start of a
   lasting 100x change cannot be told until a later bar returns to the old scale. A permanent 100x
   level shift is therefore never repaired, at its start or anywhere after it.

   The flag is sticky: a bar already flagged 1.0 (repaired in an earlier run, so its prices are
   already the repaired ones) keeps 1.0. The count is the bars repaired by this call.

2. ``flag_zero_volume`` (flagged only). Volume exactly 0 in a series that trades, i.e. whose median
   non-NaN volume in the frame is > 0. FX pairs, indices and funds report 0 on every bar (and
   pre/post-market bars often do), so a series whose median volume is 0 gets no flags. NaN volume is
   missing, not zero, and is never flagged. Recomputed for the whole frame on every call.

3. ``flag_spike`` (flagged only: which value is right is ambiguous, so nothing is changed). With
   ``c`` the closes, bar i is a spike when ``|c[i]/c[i-1] - 1| > threshold`` and
   ``|c[i]/c[i+1] - 1| > threshold`` while its neighbours agree: ``|c[i+1]/c[i-1] - 1| <= threshold``.
   Agreement implies both moves go the same way (both up or both down): opposite moves each beyond
   the threshold would put the neighbours more than the threshold apart. The neighbours are the
   adjacent bars themselves, so a neighbour without a valid close means no flag, and the first and
   last bars are never flagged. ``threshold`` must be > 0. A bar repaired by rule 1 is judged on its
   repaired prices (flagged only if it is still a spike after the repair). Recomputed for the
   whole frame on every call.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType

import numpy as np
import numpy.typing as npt
import pandas as pd

from tasks.bars import PRICE_COLUMNS
from tasks.processing.step import Series, Stepped, extended

FLAG_UNIT_REPAIRED = "flag_unit_repaired"
FLAG_ZERO_VOLUME = "flag_zero_volume"
FLAG_SPIKE = "flag_spike"
TICK_FLAGS: tuple[str, ...] = (FLAG_UNIT_REPAIRED, FLAG_ZERO_VOLUME, FLAG_SPIKE)

# Minor currency unit -> (major unit, minor units per major unit), as Yahoo's ``meta.currency`` reports them.
MINOR_UNITS: Mapping[str, tuple[str, float]] = MappingProxyType(
    {
        "GBp": ("GBP", 100.0),
        "GBX": ("GBP", 100.0),
        "ZAc": ("ZAR", 100.0),
        "ZAC": ("ZAR", 100.0),
        "ILA": ("ILS", 100.0),
    }
)

UNIT_FACTOR = 100.0
UNIT_WINDOW = 11  # bars around each one whose closes are its neighbours, itself included
UNIT_DECADES = math.log10(UNIT_FACTOR)
# Half-width of the 100x band in log10: a ratio within a factor 1.5 of 100 (or of 1/100).
UNIT_TOLERANCE = math.log10(1.5)

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.intp]


def major_unit(currency: str | None) -> str | None:
    """The currency prices are stored in: the major unit of a minor one (GBp -> GBP), else the same."""
    return MINOR_UNITS[currency][0] if currency is not None and currency in MINOR_UNITS else currency


def to_major_unit(frame: pd.DataFrame, currency: str | None) -> tuple[pd.DataFrame, str | None]:
    """Prices quoted in a minor unit (GBp: pence) divided into the major unit (GBP); volume untouched.

    Returns (frame, major currency code): a new frame when converted, the same frame and currency
    otherwise. Stored prices in one unit per series keep pence and pounds from mixing.
    """
    if currency is None or currency not in MINOR_UNITS:
        return frame, currency
    major, per_major = MINOR_UNITS[currency]
    out = frame.copy()
    for column in PRICE_COLUMNS:
        out[column] = out[column].to_numpy(dtype=np.float64) / per_major
    return out, major


def in_major_unit(frame: pd.DataFrame, series: Series) -> Stepped:
    """The step: the new bars' prices in the major unit of the currency the source quotes."""
    return Stepped(to_major_unit(frame, series.currency)[0])


def bad_ticks(frame: pd.DataFrame, series: Series) -> Stepped:
    """The step: :func:`check_ticks` over the whole series, into a new frame. The flags are counted
    on the new bars with the others (see the pipeline)."""
    columns, _ = _tick_columns(frame, series.quality.spike_threshold)
    return Stepped(extended(frame, columns))


def repair_unit_errors(frame: pd.DataFrame, window: int = UNIT_WINDOW) -> int:
    """Bars whose prices are ~100x or ~1/100x their neighbours (a pence/pound switch) are scaled back; returns count.

    Sets ``flag_unit_repaired`` (sticky, see the module docstring) and mutates the prices in place.
    """
    columns, repaired = _unit_repair(frame, frame["close"].to_numpy(dtype=np.float64), window)
    _set_columns(frame, columns)
    return repaired


def flag_zero_volume(frame: pd.DataFrame) -> int:
    """Flag bars with volume exactly 0 in a series that otherwise trades; returns the count flagged."""
    zero = _zero_volume(frame)
    _set_flag(frame, FLAG_ZERO_VOLUME, zero)
    return int(zero.sum())


def flag_spikes(frame: pd.DataFrame, threshold: float) -> int:
    """Flag one-bar excursions away from two neighbours that agree; returns the count flagged."""
    _check_threshold(threshold)
    spike = _spikes(frame["close"].to_numpy(dtype=np.float64), threshold)
    _set_flag(frame, FLAG_SPIKE, spike)
    return int(spike.sum())


def check_ticks(frame: pd.DataFrame, spike_threshold: float) -> dict[str, int]:
    """Run the three rules in order (unit repair first so it can't also be called a spike).

    Adds all TICK_FLAGS columns (0.0 where clear) and returns counts by flag name, only non-zero ones:
    bars repaired by this call, and bars flagged anywhere in the frame for the two flag-only rules.
    """
    columns, counts = _tick_columns(frame, spike_threshold)
    _set_columns(frame, columns)
    return counts


def _tick_columns(frame: pd.DataFrame, spike_threshold: float) -> tuple[dict[str, FloatArray], dict[str, int]]:
    """What :func:`check_ticks` sets, without setting it: the repaired prices (when a bar is
    repaired) and the TICK_FLAGS columns, in that order, and the counts it returns."""
    _check_threshold(spike_threshold)  # before anything is computed
    close = frame["close"].to_numpy(dtype=np.float64)
    columns, repaired = _unit_repair(frame, close, UNIT_WINDOW)
    zero = _zero_volume(frame)
    spike = _spikes(columns.get("close", close), spike_threshold)  # on the repaired prices
    columns[FLAG_ZERO_VOLUME] = zero.astype(np.float64)
    columns[FLAG_SPIKE] = spike.astype(np.float64)
    counts = {FLAG_UNIT_REPAIRED: repaired, FLAG_ZERO_VOLUME: int(zero.sum()), FLAG_SPIKE: int(spike.sum())}
    return columns, {name: count for name, count in counts.items() if count}


def _unit_repair(frame: pd.DataFrame, close: FloatArray, window: int) -> tuple[dict[str, FloatArray], int]:
    """The prices scaled back (only when a bar is repaired) and the sticky flag; the count repaired."""
    if window < 3 or window % 2 == 0:
        raise ValueError(f"unit-error window must be an odd number of bars >= 3, got {window}")
    down, up = _unit_errors(_valid_closes(close), window // 2)
    repaired = down | up
    columns: dict[str, FloatArray] = {}
    if repaired.any():
        for column in PRICE_COLUMNS:
            prices = frame[column].to_numpy(dtype=np.float64, copy=True)
            prices[down] = prices[down] / UNIT_FACTOR
            prices[up] = prices[up] * UNIT_FACTOR
            columns[column] = prices
    columns[FLAG_UNIT_REPAIRED] = (repaired | _existing_flag(frame, FLAG_UNIT_REPAIRED)).astype(np.float64)
    return columns, int(repaired.sum())


def _zero_volume(frame: pd.DataFrame) -> BoolArray:
    volume = frame["volume"].to_numpy(dtype=np.float64)
    known = volume[~np.isnan(volume)]
    trades = known.size > 0 and float(np.median(known)) > 0
    return (volume == 0) if trades else np.zeros(len(volume), dtype=bool)


def _spikes(closes: FloatArray, threshold: float) -> BoolArray:
    close = _valid_closes(closes)
    spike = np.zeros(len(close), dtype=bool)
    if len(close) >= 3:
        prev, cur, nxt = close[:-2], close[1:-1], close[2:]
        with np.errstate(invalid="ignore"):
            away = (np.abs(cur / prev - 1.0) > threshold) & (np.abs(cur / nxt - 1.0) > threshold)
            spike[1:-1] = away & (np.abs(nxt / prev - 1.0) <= threshold)
    return spike


def _check_threshold(threshold: float) -> None:
    if not threshold > 0:
        raise ValueError(f"spike threshold must be > 0 (a relative change, e.g. 0.25 for 25%), got {threshold!r}")


def _valid_closes(close: FloatArray) -> FloatArray:
    """Closes with non-finite and non-positive values as NaN, so no rule can act on them."""
    return np.where(np.isfinite(close) & (close > 0), close, np.nan)


def _unit_errors(close: FloatArray, half: int) -> tuple[BoolArray, BoolArray]:
    """Masks of bars 100x too high (divide) and 100x too low (multiply)."""
    n = len(close)
    down = np.zeros(n, dtype=bool)
    up = np.zeros(n, dtype=bool)
    if n < 3:
        return down, up
    candidates = _candidates(close, half)
    if candidates.size == 0:
        return down, up
    # Rows of (window) closes centred on each candidate, NaN beyond the frame's ends.
    padded = np.concatenate([np.full(half, np.nan), close, np.full(half, np.nan)])
    rows = np.lib.stride_tricks.sliding_window_view(padded, 2 * half + 1)[candidates]
    centre = rows[:, half : half + 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        offset = np.log10(centre[:, 0] / _median(np.delete(rows, half, axis=1)))
        before = np.log10(centre / rows[:, :half])
        after = np.log10(centre / rows[:, half + 1 :])
    for target, mask in ((UNIT_DECADES, down), (-UNIT_DECADES, up)):
        in_band = np.abs(offset - target) < UNIT_TOLERANCE
        enclosed = _any_in_band(before, target) & _any_in_band(after, target)
        mask[candidates[in_band & enclosed]] = True
    return down, up


def _candidates(close: FloatArray, half: int) -> IntArray:
    """Bars with a valid neighbour in the window more than ~66x away from them in either direction.

    A bar ~100x off its neighbours' median is necessarily that far from at least one of them, so
    this cheap pre-filter (one pass per window offset, not per bar) keeps every bar the exact test
    could repair and leaves the median to a handful of bars.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        level = np.log10(close)
    reach = UNIT_DECADES - UNIT_TOLERANCE
    near = np.zeros(len(close), dtype=bool)
    for distance in range(1, half + 1):
        with np.errstate(invalid="ignore"):
            far = np.abs(level[distance:] - level[:-distance]) > reach
        near[distance:] |= far
        near[:-distance] |= far
    return np.flatnonzero(near)


def _median(neighbours: FloatArray) -> FloatArray:
    """Median of each row's valid closes (NaN for a row without any)."""
    closes = np.sort(neighbours, axis=1)  # NaN sorts last
    count = np.count_nonzero(~np.isnan(closes), axis=1)
    lo = np.maximum((count - 1) // 2, 0)[:, None]
    hi = (count // 2)[:, None]
    return (np.take_along_axis(closes, lo, axis=1) + np.take_along_axis(closes, hi, axis=1))[:, 0] / 2.0


def _any_in_band(offsets: FloatArray, target: float) -> BoolArray:
    """Whether some neighbour on this side sits ~100x from the bar in the same direction."""
    with np.errstate(invalid="ignore"):
        return np.asarray((np.abs(offsets - target) < UNIT_TOLERANCE).any(axis=1))


def _existing_flag(frame: pd.DataFrame, name: str) -> BoolArray:
    if name not in frame.columns:
        return np.zeros(len(frame), dtype=bool)
    return np.asarray(frame[name].to_numpy(dtype=np.float64) == 1.0)


def _set_flag(frame: pd.DataFrame, name: str, mask: BoolArray) -> None:
    frame[name] = mask.astype(np.float64)


def _set_columns(frame: pd.DataFrame, columns: dict[str, FloatArray]) -> None:
    for name, values in columns.items():
        frame[name] = values
