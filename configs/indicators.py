"""The indicator registry: every kind a config can name, each in one entry.

An entry is one class: the bar values it reads, its parameters (pydantic fields, checked, with
defaults), the columns it writes, how far back it looks, and how it is computed. Adding a kind is
adding an entry and decorating it with :func:`register`; nothing else names the kinds.

Columns follow one rule: the kind (or its ``prefix``), the output's name, then the parameters in
field order, lowercase, a float's ``.`` written ``p``: ``stoch_k_14_3_3``, ``bb_upper_20_2``,
``adx_14``, ``vwap``.

Values are TA-Lib's, called directly on the float64 arrays. pandas-ta silently switches
implementation depending on whether TA-Lib is importable, and the two disagree (RSI seeding,
Bollinger ddof, OBV offset), so we call TA-Lib itself with the same arguments pandas-ta's
``talib=True`` path passes. What TA-Lib lacks (VWAP, Keltner channels, Donchian's middle) is
written here over TA-Lib's parts or numpy. Any other pandas-ta indicator is :class:`PandasTA`.

How far back: an incremental run reads ``lookback`` stored bars before its new ones, so its values
equal a run over the whole series. A window needs its length. A recursive average never forgets
its seed, but the seed's weight decays as (1 - alpha)^k: the lookback covers that decay down to
:data:`SEED_WEIGHT` (:func:`decay_bars`). A running sum (OBV, A/D) never forgets its start: it is
``cumulative``, and carried on from the stored values instead.
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Iterable, Mapping
from functools import cache
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Union

import numpy as np
import numpy.typing as npt
import pandas as pd
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)

try:
    import talib
except ImportError as error:
    raise ImportError(
        "TA-Lib is not importable, and the indicators are TA-Lib's: there is no fallback with different "
        "formulas. Install the locked environment (uv sync) which includes the `ta-lib` package."
    ) from error

Floats = npt.NDArray[np.float64]
Inputs = Mapping[str, Floats]  # the bar values an indicator reads, by column ("day": the UTC day number)

SEED_WEIGHT = 1e-13  # what a recursive average's seed may still weigh at the first new bar
DAY_BARS = 1440  # the most bars one UTC day holds (1m): how far back a daily anchor can be
SMA_TYPE = talib.MA_Type.SMA  # type: ignore[attr-defined]  # TA-Lib's default for every smoothing here

KINDS: dict[str, type[Indicator]] = {}


def decay_bars(alpha: float, depth: int = 1) -> int:
    """Bars after which a recursive average's seed weighs less than :data:`SEED_WEIGHT`.

    One average forgets as (1 - alpha)^k; an average of ``depth`` chained averages (DEMA, ADX,
    MACD's signal) as k^(depth-1) (1 - alpha)^k, so it needs some more.
    """
    k = math.ceil(math.log(SEED_WEIGHT) / math.log1p(-alpha))
    while k ** (depth - 1) * (1 - alpha) ** k > SEED_WEIGHT:
        k += max(1, k // 100)
    return k


def ema_alpha(length: int) -> float:
    return 2 / (length + 1)


def wilder_alpha(length: int) -> float:
    """Wilder's smoothing (RSI, ATR, ADX): an average with alpha 1/length."""
    return 1 / length


def ema_lookback(length: int) -> int:
    """An EMA's: the window its seed averages, then the seed's decay."""
    return length + decay_bars(ema_alpha(length))


def true_range_lookback(length: int) -> int:
    """Wilder's smoothing of what each bar moved from the one before (true range, directional
    moves): that bar too, the window, then the seed's decay. Length 1 smooths nothing."""
    return length + 1 + decay_bars(wilder_alpha(max(length, 2)))


def _suffix(value: object) -> str:
    return f"{value:g}".replace(".", "p") if isinstance(value, float) else str(value).lower()


class Indicator(BaseModel):
    """One configured indicator: its kind and parameters. Subclasses are the registry's entries."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str
    reads: ClassVar[tuple[str, ...]] = ("close",)
    outputs: ClassVar[tuple[str, ...]] = ("",)  # each column's name between the prefix and the parameters
    prefix: ClassVar[str] = ""  # the columns' first word; the kind when empty
    cumulative: ClassVar[bool] = False  # a running sum from the series' start (carried on, see the module)
    daily_anchor: ClassVar[bool] = False  # looks back to its UTC day's first bar: `lookback` is a day's bars

    @property
    def columns(self) -> tuple[str, ...]:
        """Output column names, by the naming rule (module docstring)."""
        params = [_suffix(getattr(self, name)) for name in type(self).model_fields if name != "kind"]
        return tuple("_".join([self.prefix or self.kind, *([out] if out else []), *params]) for out in self.outputs)

    @property
    def lookback(self) -> int | None:
        """Bars before a value that it depends on (to :data:`SEED_WEIGHT`); None: all of them."""
        raise NotImplementedError

    def compute(self, v: Inputs) -> list[Floats]:
        """One array per column, as long as the inputs; NaN where the indicator has no value yet."""
        raise NotImplementedError


def register[K: type[Indicator]](entry: K) -> K:
    """Add an entry to the registry under its ``kind`` literal."""
    KINDS[entry.__pydantic_fields__["kind"].default] = entry
    return entry


def nearest(name: str, names: Iterable[str]) -> str:
    """A hint naming the valid names closest to a misspelt ``name``, or all of them."""
    known = sorted(names)
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    if close:
        return f"did you mean {' or '.join(close)}?"
    return f"valid: {', '.join(known)}"


# --- averages -------------------------------------------------------------------------------------


@register
class SMA(Indicator):
    """Simple moving average of the close."""

    kind: Literal["sma"] = "sma"
    length: int = Field(20, ge=2)

    @property
    def lookback(self) -> int:
        return self.length

    def compute(self, v: Inputs) -> list[Floats]:
        return [talib.SMA(v["close"], self.length)]


@register
class WMA(Indicator):
    """Linearly weighted moving average of the close."""

    kind: Literal["wma"] = "wma"
    length: int = Field(20, ge=2)

    @property
    def lookback(self) -> int:
        return self.length

    def compute(self, v: Inputs) -> list[Floats]:
        return [talib.WMA(v["close"], self.length)]


@register
class EMA(Indicator):
    """Exponential moving average of the close, seeded with the first window's mean (recursive)."""

    kind: Literal["ema"] = "ema"
    length: int = Field(20, ge=2)

    @property
    def lookback(self) -> int:
        return ema_lookback(self.length)

    def compute(self, v: Inputs) -> list[Floats]:
        return [talib.EMA(v["close"], self.length)]


@register
class DEMA(Indicator):
    """Double EMA: 2 EMA - EMA(EMA) (recursive, two averages deep)."""

    kind: Literal["dema"] = "dema"
    length: int = Field(20, ge=2)

    @property
    def lookback(self) -> int:
        return 2 * self.length + decay_bars(ema_alpha(self.length), depth=2)

    def compute(self, v: Inputs) -> list[Floats]:
        return [talib.DEMA(v["close"], self.length)]


@register
class TEMA(Indicator):
    """Triple EMA: 3 EMA - 3 EMA(EMA) + EMA(EMA(EMA)) (recursive, three averages deep)."""

    kind: Literal["tema"] = "tema"
    length: int = Field(20, ge=2)

    @property
    def lookback(self) -> int:
        return 3 * self.length + decay_bars(ema_alpha(self.length), depth=3)

    def compute(self, v: Inputs) -> list[Floats]:
        return [talib.TEMA(v["close"], self.length)]


# --- momentum -------------------------------------------------------------------------------------


@register
class RSI(Indicator):
    """Wilder's relative strength index: his smoothing, seeded with the first window's means."""

    kind: Literal["rsi"] = "rsi"
    length: int = Field(14, ge=2)

    @property
    def lookback(self) -> int:
        return self.length + decay_bars(wilder_alpha(self.length))

    def compute(self, v: Inputs) -> list[Floats]:
        return [talib.RSI(v["close"], self.length)]


@register
class MACD(Indicator):
    """EMA(fast) - EMA(slow), its signal line (an EMA of it) and the histogram between them."""

    kind: Literal["macd"] = "macd"
    fast: int = Field(12, ge=2)
    slow: int = Field(26, ge=2)
    signal: int = Field(9, ge=1)
    outputs: ClassVar[tuple[str, ...]] = ("", "signal", "hist")

    @model_validator(mode="after")
    def _fast_below_slow(self) -> MACD:
        if self.fast >= self.slow:
            raise ValueError(f"fast ({self.fast}) must be smaller than slow ({self.slow})")
        return self

    @property
    def lookback(self) -> int:
        return self.slow + self.signal + decay_bars(ema_alpha(self.slow), depth=2)

    def compute(self, v: Inputs) -> list[Floats]:
        macd, signal, histogram = talib.MACD(v["close"], self.fast, self.slow, self.signal)
        return [macd, signal, histogram]


@register
class Stoch(Indicator):
    """The slow stochastic: %K over ``k`` bars smoothed over ``smooth_k``, and %D its ``d``-bar mean."""

    kind: Literal["stoch"] = "stoch"
    k: int = Field(14, ge=1)
    smooth_k: int = Field(3, ge=1)
    d: int = Field(3, ge=1)
    reads: ClassVar[tuple[str, ...]] = ("high", "low", "close")
    outputs: ClassVar[tuple[str, ...]] = ("k", "d")

    @property
    def lookback(self) -> int:
        return self.k + self.smooth_k + self.d

    def compute(self, v: Inputs) -> list[Floats]:
        k, d = talib.STOCH(v["high"], v["low"], v["close"], self.k, self.smooth_k, SMA_TYPE, self.d, SMA_TYPE)
        return [k, d]


@register
class StochRSI(Indicator):
    """The fast stochastic of RSI(``length``) over ``k`` bars, and its ``d``-bar mean (recursive: RSI)."""

    kind: Literal["stochrsi"] = "stochrsi"
    length: int = Field(14, ge=2)
    k: int = Field(14, ge=1)
    d: int = Field(3, ge=1)
    outputs: ClassVar[tuple[str, ...]] = ("k", "d")

    @property
    def lookback(self) -> int:
        return self.length + self.k + self.d + decay_bars(wilder_alpha(self.length))

    def compute(self, v: Inputs) -> list[Floats]:
        k, d = talib.STOCHRSI(v["close"], self.length, self.k, self.d, SMA_TYPE)
        return [k, d]


@register
class CCI(Indicator):
    """Commodity channel index: (typical price - its mean) / (0.015 x its mean deviation)."""

    kind: Literal["cci"] = "cci"
    length: int = Field(20, ge=2)
    reads: ClassVar[tuple[str, ...]] = ("high", "low", "close")

    @property
    def lookback(self) -> int:
        return self.length

    def compute(self, v: Inputs) -> list[Floats]:
        return [talib.CCI(v["high"], v["low"], v["close"], self.length)]


@register
class WillR(Indicator):
    """Williams %R: the close within the ``length``-bar range, from -100 (low) to 0 (high)."""

    kind: Literal["willr"] = "willr"
    length: int = Field(14, ge=2)
    reads: ClassVar[tuple[str, ...]] = ("high", "low", "close")

    @property
    def lookback(self) -> int:
        return self.length

    def compute(self, v: Inputs) -> list[Floats]:
        return [talib.WILLR(v["high"], v["low"], v["close"], self.length)]


@register
class MFI(Indicator):
    """Money flow index: RSI's formula over money flow (typical price x volume), summed over the window."""

    kind: Literal["mfi"] = "mfi"
    length: int = Field(14, ge=2)
    reads: ClassVar[tuple[str, ...]] = ("high", "low", "close", "volume")

    @property
    def lookback(self) -> int:
        return self.length + 1

    def compute(self, v: Inputs) -> list[Floats]:
        return [talib.MFI(v["high"], v["low"], v["close"], v["volume"], self.length)]


@register
class ROC(Indicator):
    """Rate of change, in percent: 100 (close / close ``length`` bars ago - 1)."""

    kind: Literal["roc"] = "roc"
    length: int = Field(10, ge=1)

    @property
    def lookback(self) -> int:
        return self.length + 1

    def compute(self, v: Inputs) -> list[Floats]:
        return [talib.ROC(v["close"], self.length)]


@register
class MOM(Indicator):
    """Momentum: close - close ``length`` bars ago."""

    kind: Literal["mom"] = "mom"
    length: int = Field(10, ge=1)

    @property
    def lookback(self) -> int:
        return self.length + 1

    def compute(self, v: Inputs) -> list[Floats]:
        return [talib.MOM(v["close"], self.length)]


# --- trend ----------------------------------------------------------------------------------------


@register
class ADX(Indicator):
    """Wilder's average directional index (recursive: his smoothing of DX, itself of smoothed moves)."""

    kind: Literal["adx"] = "adx"
    length: int = Field(14, ge=2)
    reads: ClassVar[tuple[str, ...]] = ("high", "low", "close")

    @property
    def lookback(self) -> int:
        return 2 * self.length + decay_bars(wilder_alpha(self.length), depth=2)

    def compute(self, v: Inputs) -> list[Floats]:
        return [talib.ADX(v["high"], v["low"], v["close"], self.length)]


@register
class PlusDI(Indicator):
    """Wilder's +DI: smoothed upward moves over the smoothed true range, in percent (recursive)."""

    kind: Literal["plus_di"] = "plus_di"
    length: int = Field(14, ge=2)
    reads: ClassVar[tuple[str, ...]] = ("high", "low", "close")

    @property
    def lookback(self) -> int:
        return true_range_lookback(self.length)

    def compute(self, v: Inputs) -> list[Floats]:
        return [talib.PLUS_DI(v["high"], v["low"], v["close"], self.length)]


@register
class MinusDI(Indicator):
    """Wilder's -DI: smoothed downward moves over the smoothed true range, in percent (recursive)."""

    kind: Literal["minus_di"] = "minus_di"
    length: int = Field(14, ge=2)
    reads: ClassVar[tuple[str, ...]] = ("high", "low", "close")

    @property
    def lookback(self) -> int:
        return true_range_lookback(self.length)

    def compute(self, v: Inputs) -> list[Floats]:
        return [talib.MINUS_DI(v["high"], v["low"], v["close"], self.length)]


@register
class Aroon(Indicator):
    """Aroon down and up: how recent the ``length``-bar low and high are, from 0 to 100."""

    kind: Literal["aroon"] = "aroon"
    length: int = Field(14, ge=2)
    reads: ClassVar[tuple[str, ...]] = ("high", "low")
    outputs: ClassVar[tuple[str, ...]] = ("down", "up")

    @property
    def lookback(self) -> int:
        return self.length + 1

    def compute(self, v: Inputs) -> list[Floats]:
        down, up = talib.AROON(v["high"], v["low"], self.length)
        return [down, up]


# --- volatility -----------------------------------------------------------------------------------


@register
class BBands(Indicator):
    """Bollinger bands: the SMA, and ``std`` population standard deviations either side of it."""

    kind: Literal["bbands"] = "bbands"
    length: int = Field(20, ge=2)
    std: float = Field(2.0, gt=0)
    prefix: ClassVar[str] = "bb"
    outputs: ClassVar[tuple[str, ...]] = ("lower", "mid", "upper")

    @property
    def lookback(self) -> int:
        return self.length

    def compute(self, v: Inputs) -> list[Floats]:
        upper, mid, lower = talib.BBANDS(v["close"], self.length, self.std, self.std, SMA_TYPE)
        return [lower, mid, upper]


@register
class ATR(Indicator):
    """Wilder's average true range (recursive)."""

    kind: Literal["atr"] = "atr"
    length: int = Field(14, ge=1)
    reads: ClassVar[tuple[str, ...]] = ("high", "low", "close")

    @property
    def lookback(self) -> int:
        return true_range_lookback(self.length)

    def compute(self, v: Inputs) -> list[Floats]:
        return [talib.ATR(v["high"], v["low"], v["close"], self.length)]


@register
class NATR(Indicator):
    """ATR as a percentage of the close (recursive)."""

    kind: Literal["natr"] = "natr"
    length: int = Field(14, ge=1)
    reads: ClassVar[tuple[str, ...]] = ("high", "low", "close")

    @property
    def lookback(self) -> int:
        return true_range_lookback(self.length)

    def compute(self, v: Inputs) -> list[Floats]:
        return [talib.NATR(v["high"], v["low"], v["close"], self.length)]


@register
class KC(Indicator):
    """Keltner channels as StockCharts defines them: EMA(``length``) of the close, and ``scalar``
    times Wilder's ATR(``atr_length``) either side of it (recursive: both)."""

    kind: Literal["kc"] = "kc"
    length: int = Field(20, ge=2)
    atr_length: int = Field(10, ge=1)
    scalar: float = Field(2.0, gt=0)
    reads: ClassVar[tuple[str, ...]] = ("high", "low", "close")
    outputs: ClassVar[tuple[str, ...]] = ("lower", "mid", "upper")

    @property
    def lookback(self) -> int:
        return max(ema_lookback(self.length), true_range_lookback(self.atr_length))

    def compute(self, v: Inputs) -> list[Floats]:
        mid = talib.EMA(v["close"], self.length)
        width = self.scalar * talib.ATR(v["high"], v["low"], v["close"], self.atr_length)
        return [mid - width, mid, mid + width]


@register
class Donchian(Indicator):
    """Donchian channels: the ``length``-bar lowest low, highest high, and the middle between them."""

    kind: Literal["donchian"] = "donchian"
    length: int = Field(20, ge=2)
    prefix: ClassVar[str] = "dc"
    reads: ClassVar[tuple[str, ...]] = ("high", "low")
    outputs: ClassVar[tuple[str, ...]] = ("lower", "mid", "upper")

    @property
    def lookback(self) -> int:
        return self.length

    def compute(self, v: Inputs) -> list[Floats]:
        lower, upper = talib.MIN(v["low"], self.length), talib.MAX(v["high"], self.length)
        return [lower, (lower + upper) / 2, upper]


# --- volume ---------------------------------------------------------------------------------------


@register
class OBV(Indicator):
    """On-balance volume: the running sum of volume signed by the close's move (cumulative)."""

    kind: Literal["obv"] = "obv"
    reads: ClassVar[tuple[str, ...]] = ("close", "volume")
    cumulative: ClassVar[bool] = True

    @property
    def lookback(self) -> int:
        return 2

    def compute(self, v: Inputs) -> list[Floats]:
        return [talib.OBV(v["close"], v["volume"])]


@register
class AD(Indicator):
    """Chaikin's accumulation/distribution line: the running sum of volume weighted by where the
    close sits in the bar's range (cumulative)."""

    kind: Literal["ad"] = "ad"
    reads: ClassVar[tuple[str, ...]] = ("high", "low", "close", "volume")
    cumulative: ClassVar[bool] = True

    @property
    def lookback(self) -> int:
        return 1

    def compute(self, v: Inputs) -> list[Floats]:
        return [talib.AD(v["high"], v["low"], v["close"], v["volume"])]


@register
class ADOSC(Indicator):
    """Chaikin's oscillator: EMA(``fast``) - EMA(``slow``) of the A/D line. The line's start cancels
    out of the difference, so this one is recursive, not cumulative."""

    kind: Literal["adosc"] = "adosc"
    fast: int = Field(3, ge=2)
    slow: int = Field(10, ge=2)
    reads: ClassVar[tuple[str, ...]] = ("high", "low", "close", "volume")

    @model_validator(mode="after")
    def _fast_below_slow(self) -> ADOSC:
        if self.fast >= self.slow:
            raise ValueError(f"fast ({self.fast}) must be smaller than slow ({self.slow})")
        return self

    @property
    def lookback(self) -> int:
        return ema_lookback(self.slow)

    def compute(self, v: Inputs) -> list[Floats]:
        return [talib.ADOSC(v["high"], v["low"], v["close"], v["volume"], self.fast, self.slow)]


@register
class VWAP(Indicator):
    """Volume-weighted average typical price (high + low + close) / 3, anchored at each UTC day's
    first bar: an intraday bar's VWAP is its day's so far; a daily bar's is its own typical price.
    Without volume so far (FX quotes 0), there is nothing to weigh: NaN."""

    kind: Literal["vwap"] = "vwap"
    reads: ClassVar[tuple[str, ...]] = ("high", "low", "close", "volume", "day")
    daily_anchor: ClassVar[bool] = True

    @property
    def lookback(self) -> int:
        return DAY_BARS  # at any interval; the step counts a day's bars at the series' own

    def compute(self, v: Inputs) -> list[Floats]:
        typical = (v["high"] + v["low"] + v["close"]) / 3
        day = v["day"]
        if len(day) and (len(day) == 1 or bool((np.diff(day) != 0).all())):
            return [np.where(v["volume"] > 0, typical, np.nan)]  # one bar a day: the anchor is the bar itself
        sums = pd.DataFrame({"weighted": typical * v["volume"], "volume": v["volume"]}).groupby(day, sort=False)
        running = sums.cumsum()  # summed within each day, so no rounding of other days' sums comes in
        weighted, volume = running["weighted"].to_numpy(), running["volume"].to_numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            return [np.where(volume > 0, weighted / volume, np.nan)]


# --- anything pandas-ta has -----------------------------------------------------------------------

# pandas-ta's names for the bar values its functions take.
PANDAS_TA_INPUTS = {"open_": "open", "high": "high", "low": "low", "close": "close", "volume": "volume"}
# Parameters a config may not set: we choose the backend, and a shift would put later bars' values
# on earlier ones.
PANDAS_TA_FIXED = {"talib": "the TA-Lib backend is always used", "offset": "shifted values would look ahead"}
SYNTHETIC_BARS = 400  # what a pandas-ta indicator is tried on when the config is read


@register
class PandasTA(Indicator):
    """Any pandas-ta indicator by name, on its TA-Lib backend where it has one. Its columns are
    pandas-ta's own names in our case (``SQZ_20_2.0_20_1.5`` is ``sqz_20_2p0_20_1p5``). Without a
    configured ``lookback`` an incremental run recomputes it over the whole stored series."""

    kind: Literal["pandas_ta"] = "pandas_ta"
    name: str
    params: dict[str, int | float | bool | str] = Field(default_factory=dict)
    declared_lookback: int | None = Field(None, ge=1, alias="lookback", description="bars it looks back over")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in pandas_ta_names():
            raise ValueError(f"pandas-ta has no indicator {name!r}: {nearest(name, pandas_ta_names())}")
        return name

    @field_validator("params")
    @classmethod
    def _parameters(cls, params: dict[str, int | float | bool | str], info: ValidationInfo) -> dict[str, Any]:
        name = info.data.get("name")
        if name is None:
            return params  # the name is wrong already, and said so
        accepted = _pandas_ta_parameters(name)
        for key, value in params.items():
            if key in PANDAS_TA_FIXED or key in PANDAS_TA_INPUTS:
                why = PANDAS_TA_FIXED.get(key, "it is a bar value, not a parameter")
                raise ValueError(f"{key!r} can't be set for pandas-ta's {name}: {why}")
            if key not in accepted:
                raise ValueError(f"pandas-ta's {name} has no parameter {key!r}: {nearest(key, list(accepted))}")
            expected = accepted[key]
            if expected is not None and not _fits(key, value, expected):
                raise ValueError(f"{key!r} of pandas-ta's {name} must be {_wanted(key, expected)}, got {value!r}")
        return params

    @model_validator(mode="after")
    def _gives_values(self) -> PandasTA:
        try:
            columns = self.columns
        except Exception as exc:  # whatever pandas-ta raises is this entry's config error
            raise ValueError(f"pandas-ta's {self.name} failed with params {self.params}: {exc}") from None
        if not columns:
            raise ValueError(f"pandas-ta's {self.name} gave no values with params {self.params}")
        return self

    @property
    def reads(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(PANDAS_TA_INPUTS[p] for p in _pandas_ta_signature(self.name) if p in PANDAS_TA_INPUTS)

    @property
    def columns(self) -> tuple[str, ...]:
        return _pandas_ta_columns(self.name, tuple(sorted(self.params.items())))

    @property
    def lookback(self) -> int | None:
        return self.declared_lookback

    def compute(self, v: Inputs) -> list[Floats]:
        frame = _pandas_ta_frame(self.name, self.params, v)
        rows = len(v["close"] if "close" in v else next(iter(v.values())))
        return [  # pandas-ta gives nothing at all for fewer bars than it needs: all warm-up, then
            frame[c].to_numpy(dtype=np.float64, na_value=np.nan) if c in frame else np.full(rows, np.nan)
            for c in self.columns
        ]


def _pandas_ta_frame(name: str, params: Mapping[str, object], v: Inputs) -> pd.DataFrame:
    """pandas-ta's ``name`` over the bar values ``v``, its columns named by our rule."""
    import pandas_ta  # noqa: PLC0415 (about 0.5 s, only when a config names one)

    signature = _pandas_ta_signature(name)
    arguments: dict[str, object] = {p: pd.Series(v[PANDAS_TA_INPUTS[p]]) for p in signature if p in PANDAS_TA_INPUTS}
    if "talib" in signature:
        arguments["talib"] = True
    result = getattr(pandas_ta, name)(**arguments, **params)
    if result is None:  # pandas-ta's answer to too few bars or an unusable parameter
        return pd.DataFrame()
    frame = result.to_frame() if isinstance(result, pd.Series) else result
    return frame.set_axis([_snake(str(c)) for c in frame.columns], axis=1)


def _counts_bars(key: str) -> bool:
    """A pandas-ta parameter that is a number of bars: pandas-ta quietly takes its default for one
    that is not positive."""
    return "length" in key or "period" in key or key in {"fast", "slow", "signal", "k", "d", "smooth_k"}


def _fits(key: str, value: object, expected: type) -> bool:
    if isinstance(value, bool) and expected is not bool:
        return False
    if expected is float:
        return isinstance(value, int | float)
    if expected is int:
        return isinstance(value, int) and value >= (1 if _counts_bars(key) else 0)
    return isinstance(value, expected)


def _wanted(key: str, expected: type) -> str:
    if expected is int:
        return "a positive int" if _counts_bars(key) else "an int, 0 or more"
    return {float: "a number", bool: "true or false", str: "a string"}.get(expected, expected.__name__)


def _snake(name: str) -> str:
    return "".join(c if c.isalnum() else "p" if c == "." else "_" for c in name.lower()).strip("_")


@cache
def pandas_ta_names() -> frozenset[str]:
    """Every indicator pandas-ta lists in its categories."""
    import pandas_ta  # noqa: PLC0415 (about 0.5 s, only when a config names one)

    return frozenset(name for names in pandas_ta.Category.values() for name in names)


@cache
def _pandas_ta_signature(name: str) -> Mapping[str, inspect.Parameter]:
    import pandas_ta  # noqa: PLC0415 (about 0.5 s, only when a config names one)

    return inspect.signature(getattr(pandas_ta, name)).parameters


@cache
def _pandas_ta_parameters(name: str) -> dict[str, type | None]:
    """The parameters a pandas-ta function takes besides its bar values, with the Python type its
    annotation asks for (None: any)."""
    accepted: dict[str, type | None] = {}
    for parameter in _pandas_ta_signature(name).values():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD or parameter.name in PANDAS_TA_INPUTS:
            continue
        text = str(parameter.annotation)
        accepted[parameter.name] = (
            bool if "bool" in text else float if "float" in text else int if "int" in text else str if "str" in text
            else None
        )  # fmt: skip
    return accepted


@cache
def _pandas_ta_columns(name: str, params: tuple[tuple[str, object], ...]) -> tuple[str, ...]:
    """The columns ``spec`` writes: pandas-ta names them as it computes, so it computes once on
    synthetic bars (a random walk) when the config is read, which also tries its parameters."""
    rng = np.random.default_rng(0)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, SYNTHETIC_BARS)))
    bars = {
        "open": close * (1 + rng.normal(0, 0.002, SYNTHETIC_BARS)),
        "high": close * 1.01,
        "low": close * 0.99,
        "close": close,
        "volume": rng.uniform(1e5, 1e6, SYNTHETIC_BARS),
    }
    return tuple(_pandas_ta_frame(name, dict(params), bars).columns)


def _tag(value: Any) -> str | None:
    kind = value.get("kind") if isinstance(value, dict) else getattr(value, "kind", None)
    return kind if isinstance(kind, str) and kind in KINDS else None


UNKNOWN_KIND = "unknown_indicator_kind"

if TYPE_CHECKING:
    IndicatorSpec = Indicator
else:
    # Validates a config entry as the registry's entry for its `kind`; an unknown kind is the error
    # UNKNOWN_KIND, which the settings' error message completes with the nearest kinds.
    IndicatorSpec = Annotated[
        Union[tuple(Annotated[entry, Tag(kind)] for kind, entry in KINDS.items())],  # noqa: UP007
        Discriminator(_tag, custom_error_type=UNKNOWN_KIND, custom_error_message="unknown indicator kind"),
    ]


def default_indicators() -> list[Indicator]:
    """What a config without ``indicators`` computes."""
    return [SMA(), EMA(), RSI(), MACD(), BBands(), ATR(), OBV()]
