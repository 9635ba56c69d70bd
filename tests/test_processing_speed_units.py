"""The faster paths give exactly what the slower, plainer ones gave.

Indicators call TA-Lib directly where pandas-ta used to wrap it, OBV is carried on by position
where it was carried on by reindexing, steps add their columns without copying the frame, real
time builds its bars in one step and a small write finds its series' ranges by a loop: each is
checked here, bit for bit, against the plain form it replaced.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import pandas as pd
import pandas_ta as ta
import pytest

import blocks.store
from blocks.store import series_spans
from configs.indicators import ATR, EMA, MACD, OBV, RSI, SMA, BBands, IndicatorSpec, default_indicators
from tasks.bars import conform, flag_missing, series_bars
from tasks.processing.indicators import compute_indicators, continue_cumulative
from tasks.processing.step import extended
from tests.conftest import FIXTURES

pytestmark = pytest.mark.unit  # no server, no child process: `pytest -m unit`

SPY = FIXTURES / "csv" / "pandas-ta_SPY_D_1999-11-01_2020-08-28.csv"
SHORT_WINDOWS: list[IndicatorSpec] = [
    SMA(kind="sma", length=2),
    EMA(kind="ema", length=3),
    RSI(kind="rsi", length=2),
    MACD(kind="macd", fast=2, slow=3, signal=1),
    BBands(kind="bbands", length=5, std=1.5),
    ATR(kind="atr", length=1),
    OBV(kind="obv"),
]


def pandas_ta_values(bars: pd.DataFrame, spec: IndicatorSpec) -> list[npt.NDArray[np.float64]]:
    """What pandas-ta on its TA-Lib backend gives, NaN where it gives nothing (too few bars)."""
    n = len(bars)
    c = bars["close"]

    def array(result: pd.Series | None) -> npt.NDArray[np.float64]:
        return np.full(n, np.nan) if result is None else result.to_numpy(dtype=np.float64, na_value=np.nan)

    def pick(frame: pd.DataFrame | None, *prefixes: str) -> list[npt.NDArray[np.float64]]:
        if frame is None:
            return [np.full(n, np.nan) for _ in prefixes]
        return [array(frame[next(k for k in frame.columns if k.startswith(p))]) for p in prefixes]

    if isinstance(spec, SMA):
        return [array(ta.sma(c, length=spec.length, talib=True))]
    if isinstance(spec, EMA):
        return [array(ta.ema(c, length=spec.length, talib=True))]
    if isinstance(spec, RSI):
        return [array(ta.rsi(c, length=spec.length, talib=True))]
    if isinstance(spec, MACD):
        frame = ta.macd(c, fast=spec.fast, slow=spec.slow, signal=spec.signal, talib=True)
        return pick(frame, "MACD_", "MACDs_", "MACDh_")
    if isinstance(spec, BBands):
        frame = ta.bbands(c, length=spec.length, lower_std=spec.std, upper_std=spec.std, mamode="sma", talib=True)
        return pick(frame, "BBL_", "BBM_", "BBU_")
    if isinstance(spec, ATR):
        return [array(ta.atr(bars["high"], bars["low"], c, length=spec.length, talib=True))]
    return [array(ta.obv(c, bars["volume"], talib=True))]


def reference(bars: pd.DataFrame, specs: Sequence[IndicatorSpec]) -> dict[str, npt.NDArray[np.float64]]:
    """pandas-ta's values over the bars with every value an indicator reads, NaN on the others."""
    out: dict[str, npt.NDArray[np.float64]] = {}
    for spec in specs:
        needs = list(spec.reads)
        complete = bars[needs].notna().all(axis=1).to_numpy()
        for column, values in zip(spec.columns, pandas_ta_values(bars.loc[complete, needs], spec), strict=True):
            out[column] = np.full(len(bars), np.nan)
            out[column][complete] = values
    return out


def assert_identical(got: npt.ArrayLike, expected: npt.ArrayLike, what: str) -> None:
    a, b = np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert np.array_equal(np.isnan(a), np.isnan(b)), what
    assert np.array_equal(a[~np.isnan(a)].view(np.int64), b[~np.isnan(b)].view(np.int64)), what


def spy_with_gaps(rows: int) -> pd.DataFrame:
    frame = pd.read_csv(SPY, index_col=0).tail(rows).reset_index(drop=True)
    frame.loc[[10, 200, 201], "close"] = np.nan
    frame.loc[[5, 300], "volume"] = np.nan
    frame.loc[400, "high"] = np.nan
    return frame


@pytest.mark.parametrize("specs", [default_indicators(), SHORT_WINDOWS], ids=["default", "short windows"])
@pytest.mark.parametrize("rows", [0, 1, 2, 3, 25, 34, 35, 700])
def test_indicators_equal_pandas_ta_on_its_talib_backend_bit_for_bit(specs: list[IndicatorSpec], rows: int) -> None:
    frame = spy_with_gaps(700).head(rows)
    out = compute_indicators(frame, specs)
    for column, expected in reference(frame, specs).items():
        assert out[column].dtype == np.float64
        assert_identical(out[column], expected, column)


def test_obv_carries_on_from_the_stored_value_at_the_last_time_both_have() -> None:
    """Recomputed bars at other times than the stored ones are matched by time, as a reindex would."""
    times = pd.date_range("2024-01-02", periods=6, freq="D", tz="UTC")
    stored = pd.DataFrame({"time": times[:5], "obv": [np.nan, 10.0, 20.0, 30.0, np.nan]})
    computed = pd.DataFrame({"time": times[[1, 2, 4, 5]], "obv": [1.0, 2.0, 5.0, 7.0]})
    by_reindex = computed.set_index("time")["obv"].reindex(stored["time"]).to_numpy()
    both = ~np.isnan(stored["obv"].to_numpy()) & ~np.isnan(by_reindex)
    last = np.flatnonzero(both)[-1]
    new = pd.DataFrame({"time": times[5:], "obv": [7.0]})
    out = continue_cumulative(new, computed, stored, [OBV(kind="obv")])
    assert out["obv"].tolist() == [7.0 + stored["obv"].iloc[last] - by_reindex[last]] == [25.0]


def test_extended_sets_columns_as_assign_does_and_leaves_the_frame_alone() -> None:
    frame = pd.DataFrame({"time": pd.date_range("2024-01-02", periods=3, tz="UTC"), "a": [1.0, 2.0, 3.0], "b": "x"})
    columns = {"c": np.array([4.0, 5.0, 6.0]), "a": np.array([7.0, 8.0, 9.0]), "d": np.zeros(3)}
    before = frame.copy()
    out = extended(frame, columns)
    expected = frame.assign(**columns)
    pd.testing.assert_frame_equal(out, expected, check_exact=True)
    pd.testing.assert_frame_equal(frame, before, check_exact=True)


def test_series_bars_builds_what_conform_and_flag_missing_make_of_the_same_columns() -> None:
    starts = [1_764_601_200.0, 1_764_601_260.0, 1_764_601_320.0]
    values = {"open": [1.0, 2.0, np.nan], "high": [2.0, np.nan, 3.0], "low": [0.5, 1.0, 2.5], "close": [1.5, 1.2, 2.9]}
    built = series_bars(starts, "BRK-B", "1m", "yahoo_finance", {**values, "volume": [np.nan, 3.0, 4.0]})
    plain = pd.DataFrame(
        {
            "time": pd.to_datetime(starts, unit="s", utc=True),
            "symbol": "BRK-B",
            "interval": "1m",
            "source": "yahoo_finance",
            **values,
            "adj_close": np.nan,
            "volume": [np.nan, 3.0, 4.0],
        }
    )
    pd.testing.assert_frame_equal(built, conform(flag_missing(plain)), check_exact=True)
    assert built["flag_missing"].tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("repeats", [1, 3])
def test_series_spans_of_few_rows_equal_those_grouped(monkeypatch: pytest.MonkeyPatch, repeats: int) -> None:
    """Several series, out of order and repeated, at instants between whole seconds."""
    rng = np.random.default_rng(3)
    starts = rng.integers(1_700_000_000, 1_700_100_000, 40) + rng.random(40)
    frames = [
        series_bars(starts[n::4], symbol, interval, "yahoo_finance", {})
        for n, (symbol, interval) in enumerate([("AAPL", "1m"), ("AAPL", "5m"), ("MSFT", "1m"), ("^GSPC", "1m")])
    ]
    rows = pd.concat(frames * repeats, ignore_index=True).sample(frac=1.0, random_state=1)
    looped = series_spans(rows, "us")
    monkeypatch.setattr(blocks.store, "FEW_ROWS", 0)
    assert looped == series_spans(rows, "us")
    assert len(looped) == 4 and looped[0].first < looped[0].last
