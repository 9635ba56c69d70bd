"""The indicator registry, kind by kind: against TA-Lib called here, against plain numpy definitions
and published values, incremental runs against full ones, gaps, and pandas-ta by name.

The expectations are written here, independently of the registry's entries: an explicit table of
TA-Lib calls (keyword arguments, so a parameter passed in the wrong place shows), and numpy
definitions of what TA-Lib lacks (VWAP, Keltner's seeding, Donchian). Nothing here calls an
entry's own ``compute`` for an expectation.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pandas as pd
import pydantic
import pytest
import talib

from configs.indicators import DAY_BARS, KINDS, Floats, Indicator, IndicatorSpec
from configs.settings import QualitySettings
from tasks.bars import conform, flag_missing
from tasks.processing.indicators import compute_indicators, indicator_columns, lookback_bars
from tasks.processing.pipeline import process
from tasks.sources.base import Collected
from tests.conftest import FIXTURES

pytestmark = pytest.mark.unit  # no server, no child process: `pytest -m unit`

SPY = FIXTURES / "csv" / "pandas-ta_SPY_D_1999-11-01_2020-08-28.csv"
TSLA = FIXTURES / "yahoo" / "yahoo-finance2_chart_TSLA_period1-0_to_2023-08-12_1d_full_history_no_dividends.json"
REFERENCE = FIXTURES / "csv" / "indicator_reference"  # bukosabino/ta's cs-*.csv (MIT, see SOURCES.md)
NOW = datetime(2025, 1, 1, tzinfo=UTC)
SMA_TYPE = talib.MA_Type.SMA  # type: ignore[attr-defined]
RTOL = 1e-9
NEW_BARS = 100  # what an incremental run brings


# --- the bars ---------------------------------------------------------------------------------------


@cache
def spy_bars() -> pd.DataFrame:
    """SPY's daily bars with UTC day times (VWAP reads the day)."""
    frame = pd.read_csv(SPY, index_col=0)
    assert len(frame) == 5241
    return frame.assign(time=pd.to_datetime(frame["date"], utc=True))


@cache
def tsla_bars() -> pd.DataFrame:
    """Tesla's whole daily history from Yahoo's chart JSON, bars with a null dropped."""
    result = json.loads(TSLA.read_bytes())["chart"]["result"][0]
    quote = result["indicators"]["quote"][0]
    frame = pd.DataFrame(
        {
            "time": pd.to_datetime(result["timestamp"], unit="s", utc=True),
            **{k: pd.Series(quote[k], dtype="float64") for k in ("open", "high", "low", "close", "volume")},
        }
    ).dropna()
    assert len(frame) == 3303
    return frame.reset_index(drop=True)


HISTORIES: dict[str, Callable[[], pd.DataFrame]] = {"SPY": spy_bars, "TSLA": tsla_bars}


def random_bars(times: pd.DatetimeIndex, interval: str, step: float, seed: int) -> pd.DataFrame:
    """A conformed random walk whose bars are consistent (low <= open, close <= high) and vary in
    range and volume, so no validation rule sets any aside and every indicator has work to do."""
    rng = np.random.default_rng(seed)
    n = len(times)
    close = 100 * np.exp(np.cumsum(rng.normal(0, step, n)))
    open_ = np.r_[close[0], close[:-1]] * np.exp(rng.normal(0, step / 4, n))
    high = np.maximum(open_, close) * np.exp(np.abs(rng.normal(0, step / 2, n)))
    low = np.minimum(open_, close) * np.exp(-np.abs(rng.normal(0, step / 2, n)))
    frame = pd.DataFrame(
        {
            "time": times,
            "symbol": "TEST",
            "interval": interval,
            "source": "test",
            "open": open_,
            "high": high,
            "low": low,
            "close": close,
            "adj_close": close,
            "volume": rng.uniform(1e5, 1e6, n).round(),
        }
    )
    return flag_missing(conform(frame))


@cache
def daily_series() -> pd.DataFrame:
    """3,000 business days: long enough that every lookback is a tail of the history."""
    return random_bars(pd.bdate_range("2010-01-04", periods=3_000, tz="UTC"), "1d", 0.015, seed=11)


@cache
def minute_series() -> pd.DataFrame:
    """Five days and 50 minutes of 24/7 1m bars: the last 100 cross midnight, and the first of them
    is 1,390 minutes into its UTC day, so VWAP needs nearly a whole day of history."""
    times = pd.date_range("2024-03-04", periods=5 * DAY_BARS + 50, freq="min", tz="UTC")
    return random_bars(times, "1m", 0.0007, seed=5)


@dataclass(frozen=True)
class Bars:
    """The bar values an expectation reads, as float64 arrays; ``day`` labels each bar's UTC day."""

    high: Floats
    low: Floats
    close: Floats
    volume: Floats
    day: npt.NDArray[np.int64]

    @classmethod
    def of(cls, frame: pd.DataFrame) -> Bars:
        def values(column: str) -> Floats:
            return frame[column].to_numpy(dtype=np.float64, na_value=np.nan)

        stamps = pd.to_datetime(frame["time"], utc=True).dt.tz_localize(None).to_numpy(dtype="datetime64[ns]")
        day = stamps.astype("datetime64[D]").astype(np.int64)  # days since 1970-01-01
        return cls(high=values("high"), low=values("low"), close=values("close"), volume=values("volume"), day=day)


# --- what each kind should be ---------------------------------------------------------------------

Expectation = Callable[[Any, Bars], list[Floats]]  # (the configured entry, the bars) -> one array per column


def lower_mid_upper(upper: Floats, mid: Floats, lower: Floats) -> list[Floats]:
    """TA-Lib's bands come upper first; the registry's columns are lower, mid, upper."""
    return [lower, mid, upper]


def talib_keltner(s: Any, b: Bars) -> list[Floats]:
    """StockCharts' Keltner channels over TA-Lib's parts: EMA(length) ± scalar * ATR(atr_length)."""
    mid = talib.EMA(b.close, timeperiod=s.length)
    width = s.scalar * talib.ATR(b.high, b.low, b.close, timeperiod=s.atr_length)
    return [mid - width, mid, mid + width]


# Every common kind as TA-Lib computes it (TA-Lib has no VWAP: that one is the numpy definition below,
# which on daily bars is TA-Lib's typical price, checked in the VWAP tests).
EXPECTED: dict[str, Expectation] = {
    "sma": lambda s, b: [talib.SMA(b.close, timeperiod=s.length)],
    "wma": lambda s, b: [talib.WMA(b.close, timeperiod=s.length)],
    "ema": lambda s, b: [talib.EMA(b.close, timeperiod=s.length)],
    "dema": lambda s, b: [talib.DEMA(b.close, timeperiod=s.length)],
    "tema": lambda s, b: [talib.TEMA(b.close, timeperiod=s.length)],
    "rsi": lambda s, b: [talib.RSI(b.close, timeperiod=s.length)],
    "macd": lambda s, b: list(talib.MACD(b.close, fastperiod=s.fast, slowperiod=s.slow, signalperiod=s.signal)),
    "stoch": lambda s, b: list(
        talib.STOCH(
            b.high,
            b.low,
            b.close,
            fastk_period=s.k,
            slowk_period=s.smooth_k,
            slowk_matype=SMA_TYPE,
            slowd_period=s.d,
            slowd_matype=SMA_TYPE,
        )
    ),
    "stochrsi": lambda s, b: list(
        talib.STOCHRSI(b.close, timeperiod=s.length, fastk_period=s.k, fastd_period=s.d, fastd_matype=SMA_TYPE)
    ),
    "cci": lambda s, b: [talib.CCI(b.high, b.low, b.close, timeperiod=s.length)],
    "willr": lambda s, b: [talib.WILLR(b.high, b.low, b.close, timeperiod=s.length)],
    "mfi": lambda s, b: [talib.MFI(b.high, b.low, b.close, b.volume, timeperiod=s.length)],
    "roc": lambda s, b: [talib.ROC(b.close, timeperiod=s.length)],
    "mom": lambda s, b: [talib.MOM(b.close, timeperiod=s.length)],
    "adx": lambda s, b: [talib.ADX(b.high, b.low, b.close, timeperiod=s.length)],
    "plus_di": lambda s, b: [talib.PLUS_DI(b.high, b.low, b.close, timeperiod=s.length)],
    "minus_di": lambda s, b: [talib.MINUS_DI(b.high, b.low, b.close, timeperiod=s.length)],
    "aroon": lambda s, b: list(talib.AROON(b.high, b.low, timeperiod=s.length)),  # down, up
    "bbands": lambda s, b: lower_mid_upper(
        *talib.BBANDS(b.close, timeperiod=s.length, nbdevup=s.std, nbdevdn=s.std, matype=SMA_TYPE)
    ),
    "atr": lambda s, b: [talib.ATR(b.high, b.low, b.close, timeperiod=s.length)],
    "natr": lambda s, b: [talib.NATR(b.high, b.low, b.close, timeperiod=s.length)],
    "kc": talib_keltner,
    "donchian": lambda s, b: [
        talib.MIN(b.low, timeperiod=s.length),
        talib.MIDPRICE(b.high, b.low, timeperiod=s.length),
        talib.MAX(b.high, timeperiod=s.length),
    ],
    "obv": lambda s, b: [talib.OBV(b.close, b.volume)],
    "ad": lambda s, b: [talib.AD(b.high, b.low, b.close, b.volume)],
    "adosc": lambda s, b: [talib.ADOSC(b.high, b.low, b.close, b.volume, fastperiod=s.fast, slowperiod=s.slow)],
    "vwap": lambda s, b: [anchored_vwap(b)],
}


def spec(kind: str, **params: object) -> Indicator:
    """A registry entry as a config names it."""
    return KINDS[kind].model_validate({"kind": kind, **params})


COMMON_KINDS = [kind for kind in KINDS if kind != "pandas_ta"]
DEFAULTS = [spec(kind) for kind in COMMON_KINDS]
NON_DEFAULTS = [
    spec("sma", length=50),
    spec("wma", length=9),
    spec("ema", length=9),
    spec("dema", length=9),
    spec("tema", length=9),
    spec("rsi", length=7),
    spec("macd", fast=5, slow=35, signal=5),
    spec("stoch", k=9, smooth_k=5, d=4),
    spec("stochrsi", length=9, k=5, d=2),
    spec("cci", length=14),
    spec("willr", length=21),
    spec("mfi", length=10),
    spec("roc", length=1),
    spec("mom", length=5),
    spec("adx", length=7),
    spec("plus_di", length=7),
    spec("minus_di", length=7),
    spec("aroon", length=25),
    spec("bbands", length=10, std=1.5),
    spec("atr", length=1),  # the smallest allowed: TA-Lib's ATR(1) is the true range, unsmoothed
    spec("natr", length=7),
    spec("kc", length=10, atr_length=14, scalar=1.5),
    spec("donchian", length=55),
    spec("adosc", fast=5, slow=20),
]
SPECS = DEFAULTS + NON_DEFAULTS
SQUEEZE = {"kind": "pandas_ta", "name": "squeeze"}
SQUEEZE_COLUMNS = ("sqz_20_2p0_20_1p5", "sqz_on", "sqz_off", "sqz_no")


def expected_values(frame: pd.DataFrame, specs: Sequence[Indicator] = DEFAULTS) -> dict[str, Floats]:
    """Each column of ``specs`` (every common kind with its defaults unless given) as the table above
    computes it over all of ``frame``'s bars."""
    bars = Bars.of(frame)
    expected: dict[str, Floats] = {}
    for entry in specs:
        expected.update(zip(entry.columns, EXPECTED[entry.kind](entry, bars), strict=True))
    return expected


# --- plain numpy definitions (no TA-Lib) ----------------------------------------------------------


def ema(x: Floats, length: int, seed: Literal["sma", "first"]) -> Floats:
    """EMA with alpha 2 / (length + 1), seeded with the first ``length`` values' mean (TA-Lib,
    StockCharts; the first value at bar length - 1) or with the first value (pandas' ewm(adjust=False))."""
    alpha = 2 / (length + 1)
    out = np.full(len(x), np.nan)
    start = length - 1 if seed == "sma" else 0
    out[start] = x[:length].mean() if seed == "sma" else x[0]
    for i in range(start + 1, len(x)):
        out[i] = out[i - 1] + alpha * (x[i] - out[i - 1])
    return out


def wilder_atr(b: Bars, length: int, first_range: Literal["none", "high_low"]) -> Floats:
    """Wilder's ATR: the first ``length`` true ranges' mean, then (prev * (length - 1) + TR) / length.

    The first bar has no previous close, so no true range (TA-Lib: the ATR starts at bar ``length``),
    or its high - low counts as one (the library ``ta``: the ATR starts at bar ``length - 1``)."""
    h, lo, c = b.high, b.low, b.close
    true_range = np.maximum.reduce([h[1:] - lo[1:], np.abs(h[1:] - c[:-1]), np.abs(lo[1:] - c[:-1])])
    offset = 1
    if first_range == "high_low":
        true_range, offset = np.r_[h[0] - lo[0], true_range], 0
    out = np.full(len(h), np.nan)
    start = offset + length - 1
    out[start] = true_range[:length].mean()
    for i in range(start + 1, len(h)):
        out[i] = (out[i - 1] * (length - 1) + true_range[i - offset]) / length
    return out


def keltner(
    b: Bars,
    length: int = 20,
    atr_length: int = 10,
    scalar: float = 2.0,
    seeding: Literal["talib", "ta"] = "talib",
) -> list[Floats]:
    """Keltner channels (StockCharts): lower, mid, upper = EMA(close) ∓ scalar * ATR. ``seeding``:
    TA-Lib's (SMA seeds, no true range on the first bar) or the library ``ta``'s (cs-kc.csv)."""
    mid = ema(b.close, length, "sma" if seeding == "talib" else "first")
    width = scalar * wilder_atr(b, atr_length, "none" if seeding == "talib" else "high_low")
    return [mid - width, mid, mid + width]


def rolling(x: Floats, length: int, reduce: Callable[..., Floats]) -> Floats:
    """``reduce`` over each window of ``length`` bars ending at the bar; NaN before the first full one."""
    out = np.full(len(x), np.nan)
    out[length - 1 :] = reduce(np.lib.stride_tricks.sliding_window_view(x, length), axis=1)
    return out


def donchian(b: Bars, length: int = 20) -> list[Floats]:
    """Donchian channels: the lowest low, the middle, the highest high over ``length`` bars."""
    lower, upper = rolling(b.low, length, np.min), rolling(b.high, length, np.max)
    return [lower, (lower + upper) / 2, upper]


def anchored_vwap(b: Bars) -> Floats:
    """VWAP anchored at each UTC day's first bar: Σ typical * volume / Σ volume over the day so far,
    typical = (high + low + close) / 3."""
    typical = (b.high + b.low + b.close) / 3
    out = np.full(len(typical), np.nan)
    starts = np.flatnonzero(np.r_[True, b.day[1:] != b.day[:-1]])
    for start, stop in zip(starts, [*starts[1:], len(typical)], strict=True):
        volume = np.cumsum(b.volume[start:stop])
        out[start:stop] = np.cumsum(typical[start:stop] * b.volume[start:stop]) / volume
    return out


# --- comparing --------------------------------------------------------------------------------------


def scale(values: Floats) -> float:
    finite = np.abs(values[~np.isnan(values)])
    return float(finite.max()) if finite.size else 1.0


def assert_equal_values(got: Floats, want: Floats, name: str, atol: float) -> None:
    """NaN (warm-up) exactly where expected, the values within rtol 1e-9 and ``atol``."""
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"{name}: NaN rows")
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=atol, equal_nan=True, err_msg=name)


def zero_crossing_atol(want: Floats) -> float:
    """0 for a column of one sign; 1e-9 * its scale for one crossing zero.

    A column crossing zero is a difference of like-sized terms (MACD, momentum, OBV, A/D, ADOSC):
    near a crossing, the operands' last-bit rounding is large against the tiny value, so a relative
    tolerance alone would demand bit-identical arithmetic rather than the same indicator."""
    return 1e-9 * scale(want) if np.nanmin(want) < 0 < np.nanmax(want) else 0.0


def excess(got: Floats, want: Floats) -> float:
    """The largest difference in units of the incremental tolerance (rtol 1e-9, atol 1e-9 * scale),
    NaN on either side counted as a full miss unless both are: above 1 fails."""
    both = np.isnan(got) & np.isnan(want)
    tolerance = RTOL * np.abs(want) + 1e-9 * scale(want)
    ratio = np.where(both, 0.0, np.abs(got - want) / tolerance)
    return float(np.nan_to_num(ratio, nan=np.inf).max())


# --- 1. the common set against TA-Lib ---------------------------------------------------------------


def test_the_checks_cover_every_kind_of_the_registry() -> None:
    """A new kind without a TA-Lib expectation, or a parameterised kind tried only with its defaults,
    fails here."""
    assert set(EXPECTED) == set(COMMON_KINDS)
    parameterised = {kind for kind in COMMON_KINDS if set(KINDS[kind].model_fields) - {"kind"}}
    assert {s.kind for s in NON_DEFAULTS} == parameterised
    for entry in NON_DEFAULTS:
        assert entry != spec(entry.kind), f"{entry.kind}: the non-default set is the default one"
    columns = indicator_columns(SPECS)
    assert len(columns) == len(set(columns)), "two specs write the same column"


def test_columns_are_named_by_the_rule() -> None:
    """Kind (or prefix), output, parameters in field order; a float's point written p, 2.0 as 2."""
    names = set(indicator_columns(SPECS))
    assert {"stoch_k_14_3_3", "stoch_d_14_3_3", "adx_14", "vwap", "bb_lower_20_2", "bb_upper_10_1p5",
            "kc_upper_20_10_2", "kc_lower_10_14_1p5", "dc_mid_20", "macd_hist_12_26_9", "stochrsi_k_14_14_3",
            "aroon_up_14", "adosc_3_10", "obv", "ad", "sma_50"} <= names  # fmt: skip


@pytest.mark.parametrize("history", HISTORIES)
def test_every_kind_equals_talib_called_directly(history: str) -> None:
    """Default and non-default parameters, over SPY's and Tesla's whole daily histories."""
    bars = HISTORIES[history]()
    out = compute_indicators(bars, SPECS)
    expected = expected_values(bars, SPECS)
    assert list(expected) == indicator_columns(SPECS)
    for column, want in expected.items():
        assert np.isfinite(want).sum() > len(bars) / 2, f"{column}: too few values to compare"
        assert_equal_values(out[column].to_numpy(), want, f"{history} {column}", zero_crossing_atol(want))


# --- 2. VWAP, Keltner, Donchian against their definitions and published values ---------------------


def minute_bars(days: int = 3) -> pd.DataFrame:
    times = pd.date_range("2024-03-04 00:00", periods=days * DAY_BARS, freq="min", tz="UTC")
    return random_bars(times, "1m", 0.0007, seed=3)


@pytest.mark.parametrize("series", ["SPY daily", "1m over three days"])
def test_vwap_keltner_and_donchian_equal_their_numpy_definitions(series: str) -> None:
    bars = spy_bars() if series == "SPY daily" else minute_bars()
    specs = [spec("vwap"), spec("kc"), spec("kc", length=10, atr_length=14, scalar=1.5), spec("donchian")]
    out = compute_indicators(bars, specs)
    b = Bars.of(bars)
    expected = {
        "vwap": anchored_vwap(b),
        **dict(zip(specs[1].columns, keltner(b), strict=True)),
        **dict(zip(specs[2].columns, keltner(b, 10, 14, 1.5), strict=True)),
        **dict(zip(specs[3].columns, donchian(b), strict=True)),
    }
    for column, want in expected.items():
        assert_equal_values(out[column].to_numpy(), want, f"{series} {column}", atol=0)
    if series == "SPY daily":  # one bar a day: each bar's VWAP is its own typical price
        np.testing.assert_allclose(out["vwap"], talib.TYPPRICE(b.high, b.low, b.close), rtol=1e-14)
    else:  # the anchor moved: each day starts over at its first bar's typical price
        first = np.flatnonzero(np.r_[True, np.diff(b.day) != 0])
        assert len(first) == 3
        np.testing.assert_allclose(out["vwap"].to_numpy()[first], ((b.high + b.low + b.close) / 3)[first], rtol=1e-14)


def test_vwap_equals_the_published_one_while_its_window_is_anchored_at_the_first_row() -> None:
    """cs-vwap.csv's VWAP is the library ``ta``'s 14-bar rolling one: its first 14 rows are a VWAP
    anchored at the first row. Given times within one UTC day (1m bars), ours anchors there too."""
    reference = pd.read_csv(REFERENCE / "cs-vwap.csv", index_col=0)
    frame = reference.rename(columns=str.lower).assign(
        time=pd.date_range("2010-12-03", periods=len(reference), freq="min", tz="UTC")
    )
    ours = compute_indicators(frame, [spec("vwap")])["vwap"].to_numpy()
    published = reference["vwap"].to_numpy()
    np.testing.assert_allclose(anchored_vwap(Bars.of(frame))[:14], published[:14], rtol=1e-12)
    np.testing.assert_allclose(ours[:14], published[:14], rtol=1e-12)
    assert abs(ours[14] / published[14] - 1) > 1e-3  # from row 14 on, the published window rolls


def cs_kc() -> tuple[pd.DataFrame, Bars]:
    reference = pd.read_csv(REFERENCE / "cs-kc.csv")
    frame = reference.rename(columns=str.lower).assign(
        time=pd.to_datetime(reference["date"], format="%d-%b-%y", utc=True), volume=1.0
    )
    return reference, Bars.of(frame)


def test_keltner_definition_reproduces_the_published_bands_with_their_seeding() -> None:
    """cs-kc.csv: EMA(20) seeded with the first close, ATR(10) whose first true range is high - low
    and seeded with the mean of the first 10, bands 2 ATR apart. Our definition with that seeding
    gives its bands (and its ATR) to the 15 significant digits it prints."""
    reference, b = cs_kc()
    lower, mid, upper = keltner(b, 20, 10, 2.0, seeding="ta")
    published = {"lower_band": lower, "middle_band": mid, "upper_band": upper, "atr": wilder_atr(b, 10, "high_low")}
    for column, ours in published.items():
        theirs = reference[column].to_numpy(dtype=np.float64, copy=True)
        if column == "atr":
            theirs[theirs == 0] = np.nan  # written 0 before its first value
        np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs), err_msg=column)
        np.testing.assert_allclose(ours, theirs, rtol=2e-14, equal_nan=True, err_msg=column)
    assert np.isnan(upper[8]) and not np.isnan(upper[9])


def test_keltner_equals_the_definition_with_talibs_seeding_on_the_published_bars() -> None:
    """The registry's KC on cs-kc.csv's bars is the same definition seeded as TA-Lib seeds (SMA of
    the first 20 closes; no true range on the first bar, so the ATR starts a bar later)."""
    _, b = cs_kc()
    frame = pd.DataFrame({"high": b.high, "low": b.low, "close": b.close})
    entry = spec("kc", length=20, atr_length=10, scalar=2)
    out = compute_indicators(frame, [entry])
    for column, want in zip(entry.columns, keltner(b, 20, 10, 2.0, seeding="talib"), strict=True):
        assert_equal_values(out[column].to_numpy(), want, column, atol=0)
    assert out[entry.columns[1]].notna().sum() == len(frame) - 19


def test_donchian_equals_the_published_channels() -> None:
    """cs-dc.csv: upper and lower exactly; the middle as published, rounded to 2 decimals. Its
    window is read from the data: the first row with a value is the window's last."""
    reference = pd.read_csv(REFERENCE / "cs-dc.csv")
    length = int(reference["upper_band"].first_valid_index()) + 1  # type: ignore[arg-type]
    assert length == 20
    entry = spec("donchian", length=length)
    out = compute_indicators(reference, [entry])
    lower, mid, upper = (out[column].to_numpy(dtype=np.float64) for column in entry.columns)
    np.testing.assert_array_equal(upper, reference["upper_band"].to_numpy())
    np.testing.assert_array_equal(lower, reference["lower_band"].to_numpy())
    published_mid = reference["middle_band"].to_numpy()
    np.testing.assert_array_equal(np.isnan(mid), np.isnan(published_mid))
    np.testing.assert_allclose(mid, published_mid, rtol=0, atol=0.005 + 1e-9, equal_nan=True)


# --- 3. incremental runs equal full runs ------------------------------------------------------------


def run(bars: pd.DataFrame, specs: Sequence[IndicatorSpec], history: pd.DataFrame | None = None) -> pd.DataFrame:
    interval = str(bars["interval"].iloc[0])
    processed = process(Collected(bars), "TEST", interval, QualitySettings(), specs, history, NOW, session_gaps=False)
    assert not processed.rejected
    return processed.bars


SERIES: dict[str, Callable[[], pd.DataFrame]] = {"1d": daily_series, "1m": minute_series}  # by interval
SQUEEZE_WITH_LOOKBACK = {**SQUEEZE, "lookback": 60}  # 20-bar bands and channels, then 12 + 6 bars of momentum
PSAR = {"kind": "pandas_ta", "name": "psar"}  # a state machine from the first bar: no lookback to give
BOUNDED = [*SPECS, pydantic.TypeAdapter(IndicatorSpec).validate_python(SQUEEZE_WITH_LOOKBACK)]


@cache
def full_run(series: str) -> pd.DataFrame:
    """One run over the whole series with every bounded spec and pandas-ta's PSAR."""
    specs = [*BOUNDED, pydantic.TypeAdapter(IndicatorSpec).validate_python(PSAR)]
    return run(SERIES[series](), specs)


def incremental_run(series: str, specs: Sequence[IndicatorSpec], history_bars: int | None) -> pd.DataFrame:
    """The last 100 bars run on top of the full run's earlier bars: their last ``history_bars``
    (all of them when None), as the store would hand them back."""
    whole, full = SERIES[series](), full_run(series)
    past = full.iloc[: len(whole) - NEW_BARS]
    history = past if history_bars is None else past.tail(history_bars)
    return run(whole.iloc[len(whole) - NEW_BARS :].reset_index(drop=True), specs, history)


def assert_incremental_equals_full(series: str, incremental: pd.DataFrame, specs: Sequence[IndicatorSpec]) -> None:
    expected = full_run(series).iloc[-NEW_BARS:].reset_index(drop=True)
    assert incremental["time"].equals(expected["time"])
    for column in indicator_columns(specs):
        want, got = expected[column].to_numpy(dtype=np.float64), incremental[column].to_numpy(dtype=np.float64)
        assert_equal_values(got, want, f"{series} {column}", atol=1e-9 * scale(want))


@pytest.mark.parametrize("series", SERIES)
def test_an_incremental_run_on_the_lookback_equals_a_full_run_for_every_kind(series: str) -> None:
    """Every kind at once, with a pandas-ta squeeze that names its lookback: the history read back
    is the last ``lookback_bars`` stored bars, a tail of the series. OBV and A/D carry on from their
    stored values; on 1m bars the new ones cross midnight, where VWAP starts over."""
    lookback = lookback_bars(BOUNDED, series)
    assert lookback is not None and lookback < len(SERIES[series]()) - NEW_BARS
    # VWAP needs a day's bars: 1,440 of 1m bars; one daily bar, so it does not set the daily lookback.
    assert (lookback == DAY_BARS) if series == "1m" else (lookback < DAY_BARS)
    incremental = incremental_run(series, BOUNDED, lookback)
    assert_incremental_equals_full(series, incremental, BOUNDED)
    expected = full_run(series).iloc[-NEW_BARS:]
    # Without carrying on, OBV and A/D would restart at the history's first bar: far off.
    assert abs(expected["obv"].iloc[0]) > 1e7 and abs(expected["ad"].iloc[0]) > 1e6
    if series == "1m":
        days = pd.DatetimeIndex(expected["time"]).floor("D")
        assert days.nunique() == 2


@pytest.mark.parametrize("series", SERIES)
def test_a_pandas_ta_indicator_without_lookback_is_recomputed_over_the_whole_history(series: str) -> None:
    """PSAR names no lookback, so the step reads back the whole stored series (``lookback_bars`` None)."""
    psar = pydantic.TypeAdapter(IndicatorSpec).validate_python(PSAR)
    assert psar.lookback is None and lookback_bars([*BOUNDED, psar], series) is None
    incremental = incremental_run(series, [psar], None)
    assert_incremental_equals_full(series, incremental, [psar])


def own_lookback(entry: IndicatorSpec, interval: str) -> int:
    """The bars ``entry`` itself says it needs (not the step's 500-bar minimum, which would hide a
    short one): VWAP, anchored at its UTC day's first bar, needs a day's bars, one at daily bars."""
    if entry.daily_anchor:
        return 1 if interval == "1d" else DAY_BARS
    assert entry.lookback is not None
    return entry.lookback


@pytest.mark.parametrize("series", SERIES)
@pytest.mark.parametrize("entry", BOUNDED, ids=lambda e: e.columns[0])
def test_each_kind_needs_no_more_history_than_its_own_lookback(series: str, entry: IndicatorSpec) -> None:
    """Each entry alone, on exactly its own lookback: a history that long gives the full run's values."""
    assert_incremental_equals_full(series, incremental_run(series, [entry], own_lookback(entry, series)), [entry])


# Kinds whose values depend on every earlier bar through a recursive average's seed.
RECURSIVE = [
    *("ema", "dema", "tema", "macd", "adosc"),  # EMAs
    *("rsi", "stochrsi", "adx", "plus_di", "minus_di", "atr", "natr"),  # Wilder's smoothing
    "kc",  # both
]


def five_lengths(entry: Indicator) -> int:
    """A history of 5 times the entry's longest period: plenty for a window, too little for a recursive
    average to forget its seed."""
    return 5 * max(v for v in entry.model_dump().values() if isinstance(v, int) and not isinstance(v, bool))


@pytest.mark.parametrize(
    ("series", "entry", "short"),
    [("1d", spec(kind), five_lengths(spec(kind))) for kind in RECURSIVE] + [("1m", spec("vwap"), DAY_BARS // 2)],
    ids=[*RECURSIVE, "vwap"],
)
def test_a_history_shorter_than_the_lookback_would_be_caught(series: str, entry: Indicator, short: int) -> None:
    """The check above can fail: had a recursive kind's lookback been 5 times its length (or VWAP's half a
    day), the incremental values would differ from the full run's by more than the tolerance."""
    assert short < own_lookback(entry, series)
    incremental = incremental_run(series, [entry], short)
    expected = full_run(series).iloc[-NEW_BARS:].reset_index(drop=True)
    worst = max(excess(incremental[c].to_numpy(), expected[c].to_numpy(dtype=np.float64)) for c in entry.columns)
    assert worst > 100, f"{entry.columns}: a {short}-bar history is within {worst:.3g} times the tolerance"


# --- 4. gaps blank only the indicators that read the missing value ---------------------------------

VOLUME_KINDS = {"obv", "ad", "adosc", "mfi", "vwap"}
HIGH_LOW_ONLY = {"aroon", "donchian"}


def test_the_kinds_read_what_the_gap_tests_assume() -> None:
    assert {k for k in COMMON_KINDS if "volume" in KINDS[k].reads} == VOLUME_KINDS
    assert {k for k in COMMON_KINDS if "close" not in KINDS[k].reads} == HIGH_LOW_ONLY


def test_bars_without_volume_blank_the_volume_kinds_only() -> None:
    """FX: no volume at all. Price kinds have their values, volume kinds none (never 0)."""
    spy = spy_bars()
    fx = spy.assign(volume=np.nan)
    out = compute_indicators(fx, SPECS)
    expected = expected_values(spy, SPECS)
    for entry in SPECS:
        for column in entry.columns:
            got = out[column].to_numpy()
            if entry.kind in VOLUME_KINDS:
                assert np.isnan(got).all(), column
            else:
                assert_equal_values(got, expected[column], column, zero_crossing_atol(expected[column]))


def test_a_missing_close_blanks_its_bar_for_the_kinds_reading_close_only() -> None:
    """As ``quality.missing: keep`` leaves them: closes missing at a few bars. Kinds reading the close
    are NaN on exactly those bars and TA-Lib over the other bars elsewhere; Aroon and Donchian read
    only high and low and are as if nothing were missing."""
    spy = spy_bars()
    gaps = np.zeros(len(spy), dtype=bool)
    gaps[[0, 5, 700, 701, 702, 2500, len(spy) - 1]] = True
    holed = spy.assign(close=spy["close"].where(~gaps))
    out = compute_indicators(holed, SPECS)
    over_the_rest = expected_values(spy.loc[~gaps], SPECS)
    unaffected = expected_values(spy, SPECS)
    for entry in SPECS:
        for column in entry.columns:
            got = out[column].to_numpy()
            if entry.kind in HIGH_LOW_ONLY:
                assert_equal_values(got, unaffected[column], column, atol=0)
                continue
            want = np.full(len(spy), np.nan)
            want[~gaps] = over_the_rest[column]
            assert np.isnan(got[gaps]).all(), column
            assert_equal_values(got, want, column, zero_crossing_atol(want))


# --- 5. any pandas-ta indicator by name -------------------------------------------------------------


def test_a_pandas_ta_squeeze_equals_pandas_ta_called_directly() -> None:
    import pandas_ta

    entry = pydantic.TypeAdapter(IndicatorSpec).validate_python(SQUEEZE)
    assert entry.columns == SQUEEZE_COLUMNS
    spy = spy_bars()
    out = compute_indicators(spy, [entry])
    backend: dict[str, Any] = {"talib": True}  # a keyword pandas-ta's signature types as its **kwargs: DictLike
    theirs = pandas_ta.squeeze(spy["high"], spy["low"], spy["close"], **backend)
    assert list(theirs.columns) == ["SQZ_20_2.0_20_1.5", "SQZ_ON", "SQZ_OFF", "SQZ_NO"]
    for ours, column in zip(SQUEEZE_COLUMNS, theirs.columns, strict=True):
        want = theirs[column].to_numpy(dtype=np.float64)
        assert_equal_values(out[ours].to_numpy(), want, ours, atol=1e-9 * scale(want))
    assert out["sqz_on"].sum() > 100 and out["sqz_off"].sum() > 100  # both states occur on SPY


@pytest.mark.parametrize(
    ("config", "hint"),
    [
        ({**SQUEEZE, "name": "sqeeze"}, "did you mean squeeze"),
        ({**SQUEEZE, "params": {"bb_lenght": 10}}, "did you mean bb_length"),
        ({**SQUEEZE, "params": {"kc_scalr": 1.0}}, "did you mean kc_scalar"),
    ],
)
def test_a_misspelt_pandas_ta_name_or_parameter_names_the_nearest(config: dict[str, object], hint: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=hint):
        pydantic.TypeAdapter(IndicatorSpec).validate_python(config)


@pytest.mark.parametrize(
    ("params", "refusal"),
    [
        ({"length": 0}, "'length' of pandas-ta's bbands must be a positive int, got 0"),
        ({"length": 2.5}, "'length' of pandas-ta's bbands must be a positive int, got 2.5"),
        ({"lower_std": "wide"}, "'lower_std' of pandas-ta's bbands must be a number, got 'wide'"),
        ({"offset": 1}, "'offset' can't be set for pandas-ta's bbands: shifted values would look ahead"),
        ({"talib": False}, "'talib' can't be set for pandas-ta's bbands: the TA-Lib backend is always used"),
        ({"close": 1}, "'close' can't be set for pandas-ta's bbands: it is a bar value, not a parameter"),
    ],
)
def test_a_pandas_ta_parameter_pandas_ta_would_quietly_replace_is_refused(
    params: dict[str, object], refusal: str
) -> None:
    """pandas-ta takes its default for a length it can't use, and names the columns after it: the
    config would say one thing and the store hold another."""
    with pytest.raises(pydantic.ValidationError, match=re.escape(refusal)):
        pydantic.TypeAdapter(IndicatorSpec).validate_python({"kind": "pandas_ta", "name": "bbands", "params": params})


def test_pandas_ta_parameters_it_can_use_are_taken_as_given() -> None:
    entry = pydantic.TypeAdapter(IndicatorSpec).validate_python(
        {"kind": "pandas_ta", "name": "bbands", "params": {"length": 10, "lower_std": 1.5, "upper_std": 1.5, "ddof": 0}}
    )
    assert entry.columns[0] == "bbl_10_1p5_1p5"
