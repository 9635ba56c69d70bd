"""Indicators against TA-Lib called directly, and against published reference values."""

from __future__ import annotations

import json
from datetime import date

import httpx
import numpy as np
import numpy.typing as npt
import pandas as pd
import pytest
import talib

from configs.indicators import MACD, RSI, SMA, BBands, IndicatorSpec, default_indicators
from configs.settings import SourceSettings
from tasks.processing.indicators import compute_indicators, indicator_columns
from tasks.sources.alpha_vantage import AlphaVantage, parse_technical
from tasks.sources.base import BarQuery
from tests.conftest import FIXTURES

pytestmark = pytest.mark.unit  # no server, no child process: `pytest -m unit`

SPY = FIXTURES / "csv" / "pandas-ta_SPY_D_1999-11-01_2020-08-28.csv"


@pytest.fixture(scope="module")
def spy() -> pd.DataFrame:
    frame = pd.read_csv(SPY, index_col=0)
    assert len(frame) == 5241
    return frame


def talib_reference(frame: pd.DataFrame) -> dict[str, npt.NDArray[np.float64]]:
    _o, h, lo, c, v = (frame[k].to_numpy(dtype=float) for k in ("open", "high", "low", "close", "volume"))
    macd, signal, hist = talib.MACD(c, 12, 26, 9)
    upper, mid, lower = talib.BBANDS(c, 20, 2.0, 2.0, talib.MA_Type.SMA)  # type: ignore[attr-defined]
    return {
        "sma_20": talib.SMA(c, 20),
        "ema_20": talib.EMA(c, 20),
        "rsi_14": talib.RSI(c, 14),
        "macd_12_26_9": macd,
        "macd_signal_12_26_9": signal,
        "macd_hist_12_26_9": hist,
        "bb_lower_20_2": lower,
        "bb_mid_20_2": mid,
        "bb_upper_20_2": upper,
        "atr_14": talib.ATR(h, lo, c, 14),
        "obv": talib.OBV(c, v),
    }


def test_default_set_matches_talib_on_spy(spy: pd.DataFrame) -> None:
    out = compute_indicators(spy, default_indicators())
    reference = talib_reference(spy)
    assert indicator_columns(default_indicators()) == list(reference)
    for column, expected in reference.items():
        got = out[column].to_numpy()
        # Warm-up rows are NaN (never 0) exactly where TA-Lib has them.
        np.testing.assert_array_equal(np.isnan(got), np.isnan(expected), err_msg=column)
        np.testing.assert_allclose(got, expected, rtol=1e-9, atol=0, equal_nan=True, err_msg=column)


@pytest.mark.parametrize(
    ("column", "warmup"),
    [("sma_20", 19), ("ema_20", 19), ("rsi_14", 14), ("macd_12_26_9", 33), ("macd_signal_12_26_9", 33),
     ("bb_upper_20_2", 19), ("atr_14", 14), ("obv", 0)],
)  # fmt: skip
def test_warmup_rows_are_nan_and_only_those(spy: pd.DataFrame, column: str, warmup: int) -> None:
    values = compute_indicators(spy.head(300), default_indicators())[column].to_numpy()
    assert np.isnan(values[:warmup]).all()
    assert not np.isnan(values[warmup:]).any()


def test_a_series_shorter_than_the_window_is_all_warmup(spy: pd.DataFrame) -> None:
    out = compute_indicators(spy.head(10), default_indicators())
    assert out["sma_20"].isna().all()
    assert out["macd_12_26_9"].isna().all()
    assert not out["obv"].isna().any()


def test_incomplete_bars_are_skipped_not_poisoning_what_follows(spy: pd.DataFrame) -> None:
    frame = spy.head(200).copy()
    frame.loc[frame.index[100], "close"] = np.nan
    out = compute_indicators(frame, default_indicators())
    assert np.isnan(out["ema_20"].iloc[100])
    assert not out["ema_20"].iloc[101:].isna().any()
    complete = frame.drop(index=frame.index[100])
    np.testing.assert_allclose(
        out["ema_20"].drop(index=out.index[100]).to_numpy(), talib.EMA(complete["close"].to_numpy(), 20), rtol=1e-12
    )


def test_configured_parameters_name_the_columns(spy: pd.DataFrame) -> None:
    specs: list[IndicatorSpec] = [
        SMA(kind="sma", length=50),
        RSI(kind="rsi", length=7),
        MACD(kind="macd", fast=5, slow=35, signal=5),
        BBands(kind="bbands", length=10, std=1.5),
    ]
    out = compute_indicators(spy, specs)
    assert {"sma_50", "rsi_7", "macd_5_35_5", "macd_signal_5_35_5", "macd_hist_5_35_5",
            "bb_lower_10_1p5", "bb_mid_10_1p5", "bb_upper_10_1p5"} <= set(out.columns)  # fmt: skip
    c = spy["close"].to_numpy()
    np.testing.assert_allclose(out["rsi_7"], talib.RSI(c, 7), rtol=1e-9, equal_nan=True)
    np.testing.assert_allclose(out["bb_upper_10_1p5"], talib.BBANDS(c, 10, 1.5, 1.5)[0], rtol=1e-9, equal_nan=True)


def test_sma_and_bands_match_a_plain_numpy_definition(spy: pd.DataFrame) -> None:
    """Independent of TA-Lib: the textbook formulas (population standard deviation for the bands)."""
    out = compute_indicators(spy, [SMA(kind="sma", length=20), BBands(kind="bbands", length=20, std=2)])
    windows = np.lib.stride_tricks.sliding_window_view(spy["close"].to_numpy(), 20)
    mean, std = windows.mean(axis=1), windows.std(axis=1, ddof=0)
    np.testing.assert_allclose(out["sma_20"].to_numpy()[19:], mean, rtol=1e-9)
    np.testing.assert_allclose(out["bb_upper_20_2"].to_numpy()[19:], mean + 2 * std, rtol=1e-9)


def test_rsi_uses_wilders_sma_seed(spy: pd.DataFrame) -> None:
    """Wilder's RSI: seed with the simple mean of the first n gains and losses, then (prev*(n-1)+x)/n."""
    close = spy["close"].to_numpy()[:400]
    n = 14
    delta = np.diff(close)
    gain, loss = np.clip(delta, 0, None), np.clip(-delta, 0, None)
    avg_gain, avg_loss = gain[:n].mean(), loss[:n].mean()
    expected = [100 - 100 / (1 + avg_gain / avg_loss)]
    for g, loss_value in zip(gain[n:], loss[n:], strict=True):
        avg_gain = (avg_gain * (n - 1) + g) / n
        avg_loss = (avg_loss * (n - 1) + loss_value) / n
        expected.append(100 - 100 / (1 + avg_gain / avg_loss))
    got = compute_indicators(spy.head(400), [RSI(kind="rsi", length=n)])["rsi_14"].to_numpy()[n:]
    np.testing.assert_allclose(got, expected, rtol=1e-9)


def test_rsi_matches_alpha_vantages_published_values() -> None:
    """Alpha Vantage's RSI(10) on MSFT weekly opens, published to 4 decimals, against ours."""
    folder = FIXTURES / "alphavantage"
    weekly = AlphaVantage(SourceSettings(base_url="http://127.0.0.1:9/query", api_key="unused")).parse(
        BarQuery("MSFT", "1wk", date(1990, 1, 1), date(2030, 1, 1)),
        httpx.Response(200, content=(folder / "threefourteen_TIME_SERIES_WEEKLY_MSFT_full.json").read_bytes()),
    )
    reference = parse_technical(
        json.loads((folder / "threefourteen_RSI_MSFT_weekly_period10_open.json").read_bytes().decode("utf-8-sig"))
    )
    opens = weekly.bars.assign(close=weekly.bars["open"])  # AV computed it with series_type=open
    ours = compute_indicators(opens, [RSI(kind="rsi", length=10)])[["time", "rsi_10"]]
    joined = reference.merge(ours, on="time", how="inner")
    assert len(joined) >= 1220  # every published week but the in-progress ones
    np.testing.assert_allclose(joined["rsi_10"], joined["rsi"], atol=0.5e-4 + 1e-9, rtol=0)
    assert joined["rsi"].iloc[0] == 75.0 and joined["time"].iloc[0] == pd.Timestamp("1995-03-20", tz="UTC")
