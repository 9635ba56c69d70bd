from __future__ import annotations

import math
import statistics

import numpy as np
import numpy.typing as npt
import pandas as pd
import pytest

from tasks.bars import PRICE_COLUMNS, conform, empty_bars
from tasks.processing.ticks import (
    FLAG_SPIKE,
    FLAG_UNIT_REPAIRED,
    FLAG_ZERO_VOLUME,
    MINOR_UNITS,
    TICK_FLAGS,
    check_ticks,
    flag_spikes,
    flag_zero_volume,
    repair_unit_errors,
    to_major_unit,
)
from tasks.sources.yahoo_finance import parse_chart_result
from tests.conftest import FIXTURES, yahoo_json

pytestmark = pytest.mark.unit  # no server, no child process: `pytest -m unit`

OCDO = "yahoo-finance2_chart_OCDO.L_2020_full_year_1d_London.json"
AAPL = "yahoo-finance2_chart_AAPL_2020_full_year_1d_split_and_dividends.json"
EURUSD = "yahoo-finance2_chart_EURUSD=X_2020_full_year_1d.json"
SPY = FIXTURES / "csv" / "pandas-ta_SPY_D_1999-11-01_2020-08-28.csv"

# 30 bars around 10.0 with small day-to-day moves: the "normal" scale for the unit-error cases.
BASE = 10.0 + 0.2 * np.sin(np.arange(30))


def yahoo_bars(name: str, symbol: str) -> tuple[pd.DataFrame, object]:
    collected = parse_chart_result(yahoo_json(name)["chart"]["result"][0], symbol, "1d")
    return collected.bars, collected.instrument.currency


def bars(close: npt.ArrayLike, volume: npt.ArrayLike | float = 1_000_000.0) -> pd.DataFrame:
    """A standard bar frame whose open/high/low/adj_close move with the close."""
    closes = np.asarray(close, dtype=np.float64)
    return conform(
        pd.DataFrame(
            {
                "time": pd.date_range("2024-01-01", periods=len(closes), freq="D", tz="UTC"),
                "symbol": "TEST",
                "interval": "1d",
                "source": "test",
                "open": closes * 0.99,
                "high": closes * 1.02,
                "low": closes * 0.98,
                "close": closes,
                "adj_close": closes * 0.95,
                "volume": np.broadcast_to(np.asarray(volume, dtype=np.float64), closes.shape).copy(),
            }
        )
    )


def flagged(frame: pd.DataFrame, flag: str) -> list[int]:
    return [int(i) for i in np.flatnonzero(frame[flag].to_numpy() == 1.0)]


def prices(frame: pd.DataFrame) -> npt.NDArray[np.float64]:
    return frame[list(PRICE_COLUMNS)].to_numpy(dtype=np.float64, copy=True)


def scale(frame: pd.DataFrame, rows: list[int], factor: float) -> None:
    """Put some bars' prices in another unit, as a source switching pence and pounds would."""
    for column in PRICE_COLUMNS:
        values = frame[column].to_numpy(dtype=np.float64, copy=True)
        values[rows] *= factor
        frame[column] = values


def set_prices(frame: pd.DataFrame, row: int, values: list[float]) -> None:
    for column, value in zip(PRICE_COLUMNS, values, strict=True):
        frame.loc[row, column] = value


# --- quote units ---------------------------------------------------------------------------------


def test_pence_are_converted_to_pounds_exactly() -> None:
    raw, currency = yahoo_bars(OCDO, "OCDO.L")
    assert currency == "GBp"
    before = raw.copy()
    out, major = to_major_unit(raw, "GBp")
    assert major == "GBP"
    for column in PRICE_COLUMNS:
        np.testing.assert_array_equal(out[column].to_numpy(), raw[column].to_numpy() / 100.0)
    np.testing.assert_array_equal(out["volume"].to_numpy(), raw["volume"].to_numpy())
    assert out["close"].iloc[0] == 12.595  # 1259.5 pence on 2020-01-02
    pd.testing.assert_frame_equal(raw, before)  # the input is not converted in place


@pytest.mark.parametrize("currency", ["USD", None])
def test_major_or_unknown_units_are_left_alone(currency: str | None) -> None:
    raw, _ = yahoo_bars(AAPL, "AAPL")
    out, code = to_major_unit(raw, currency)
    assert out is raw
    assert code == currency


def test_the_minor_units_and_their_major_units() -> None:
    assert dict(MINOR_UNITS) == {
        "GBp": ("GBP", 100.0),
        "GBX": ("GBP", 100.0),
        "ZAc": ("ZAR", 100.0),
        "ZAC": ("ZAR", 100.0),
        "ILA": ("ILS", 100.0),
    }
    out, code = to_major_unit(bars([1000.0, 8.75]), "ZAc")
    assert code == "ZAR"
    assert out["close"].tolist() == [10.0, 0.0875]  # a true division: 8.75 * 0.01 is 0.08750000000000001


# --- unit errors ---------------------------------------------------------------------------------


def test_a_bar_in_pounds_among_pence_is_scaled_back() -> None:
    frame = bars(BASE)
    set_prices(frame, 12, [1040.0, 1060.0, 1030.0, 1050.0, 1050.0])
    expected = prices(bars(BASE))
    expected[12] = [10.4, 10.6, 10.3, 10.5, 10.5]
    assert repair_unit_errors(frame) == 1
    np.testing.assert_array_equal(prices(frame), expected)
    assert flagged(frame, FLAG_UNIT_REPAIRED) == [12]
    assert frame["volume"].tolist() == [1_000_000.0] * 30


def test_a_bar_a_hundred_times_too_low_is_multiplied_back() -> None:
    frame = bars(BASE)
    set_prices(frame, 20, [0.09375, 0.1015625, 0.08984375, 0.09765625, 0.09765625])
    assert repair_unit_errors(frame) == 1
    assert prices(frame)[20].tolist() == [9.375, 10.15625, 8.984375, 9.765625, 9.765625]
    assert flagged(frame, FLAG_UNIT_REPAIRED) == [20]


@pytest.mark.parametrize(
    ("close", "repaired"),
    [(1490.0, 14.9), (680.0, 6.8), (1510.0, 1510.0), (660.0, 660.0), (0.0672, 6.72), (0.148, 14.8), (0.0664, 0.0664)],
)
def test_the_band_is_a_factor_of_one_and_a_half_around_a_hundred(close: float, repaired: float) -> None:
    frame = bars(np.full(11, 10.0))
    frame.loc[5, "close"] = close
    repair_unit_errors(frame)
    assert frame.loc[5, "close"] == pytest.approx(repaired, rel=1e-12)
    assert flagged(frame, FLAG_UNIT_REPAIRED) == ([5] if repaired != close else [])


@pytest.mark.parametrize("run", [2, 3, 5])
def test_a_short_run_is_repaired_whole(run: int) -> None:
    clean = bars(BASE)
    frame = bars(BASE)
    rows = list(range(10, 10 + run))
    scale(frame, rows, 100.0)
    assert repair_unit_errors(frame) == run
    assert flagged(frame, FLAG_UNIT_REPAIRED) == rows
    np.testing.assert_allclose(prices(frame), prices(clean), rtol=1e-15)


def test_a_run_of_more_than_half_the_window_is_not_repaired() -> None:
    frame = bars(BASE)
    scale(frame, list(range(10, 16)), 100.0)  # six bars: every window is balanced or off-scale
    shifted = prices(frame)
    assert repair_unit_errors(frame) == 0
    np.testing.assert_array_equal(prices(frame), shifted)
    assert flagged(frame, FLAG_UNIT_REPAIRED) == []


def test_a_permanent_hundredfold_level_shift_is_never_repaired() -> None:
    # At the shift the window is half old, half new; its median sits between the two levels.
    close = np.concatenate([BASE[:15], BASE[15:] * 100.0])
    frame = bars(close)
    assert repair_unit_errors(frame) == 0
    np.testing.assert_array_equal(frame["close"].to_numpy(), close)
    assert flagged(frame, FLAG_UNIT_REPAIRED) == []


@pytest.mark.parametrize("rows", [[29], [27, 28, 29], [0], [0, 1]])
def test_off_scale_bars_at_either_end_are_ambiguous_and_left_alone(rows: list[int]) -> None:
    # The newest bars may be the start of a lasting 100x change: no later bar tells them apart yet.
    frame = bars(BASE)
    scale(frame, rows, 100.0)
    before = prices(frame)
    assert repair_unit_errors(frame) == 0
    np.testing.assert_array_equal(prices(frame), before)
    assert flagged(frame, FLAG_UNIT_REPAIRED) == []


def test_an_ordinary_big_move_is_not_a_unit_error() -> None:
    close = BASE.copy()
    close[15:] *= 1.08
    close[7] *= 1.5
    frame = bars(close)
    assert repair_unit_errors(frame) == 0
    np.testing.assert_array_equal(frame["close"].to_numpy(), close)
    assert flagged(frame, FLAG_UNIT_REPAIRED) == []


def test_nan_closes_are_left_alone_and_trigger_nothing() -> None:
    frame = bars(BASE)
    frame.loc[[8, 9], "close"] = np.nan
    frame.loc[9, ["open", "high", "low", "adj_close"]] = 5000.0  # only the close is judged
    before = prices(frame)
    assert repair_unit_errors(frame) == 0
    np.testing.assert_array_equal(prices(frame), before)
    assert flagged(frame, FLAG_UNIT_REPAIRED) == []


def test_a_unit_error_next_to_missing_closes_is_still_repaired() -> None:
    frame = bars(BASE)
    frame.loc[[11, 13], "close"] = np.nan
    scale(frame, [12], 100.0)
    assert repair_unit_errors(frame) == 1
    assert flagged(frame, FLAG_UNIT_REPAIRED) == [12]
    assert frame.loc[12, "close"] == pytest.approx(BASE[12], rel=1e-15)
    assert np.isnan(frame.loc[[11, 13], "close"]).all()


def test_missing_closes_beside_a_run_can_leave_part_of_it_unrepaired() -> None:
    # Bars 5-7 have no close, so bars 10 and 11 see more off-scale than normal neighbours.
    frame = bars(BASE)
    frame.loc[[5, 6, 7], "close"] = np.nan
    scale(frame, list(range(10, 15)), 100.0)
    assert repair_unit_errors(frame) == 3
    assert flagged(frame, FLAG_UNIT_REPAIRED) == [12, 13, 14]
    np.testing.assert_allclose(frame["close"].to_numpy()[10:15], BASE[10:15] * [100, 100, 1, 1, 1], rtol=1e-15)


def test_a_repair_stays_flagged_when_the_repaired_bars_are_checked_again() -> None:
    frame = bars(BASE)
    scale(frame, [12], 100.0)
    assert repair_unit_errors(frame) == 1
    repaired = prices(frame)
    assert repair_unit_errors(frame) == 0  # nothing left to repair...
    assert flagged(frame, FLAG_UNIT_REPAIRED) == [12]  # ...but the earlier repair stays visible
    np.testing.assert_array_equal(prices(frame), repaired)


def reference_repairs(close: npt.NDArray[np.float64], window: int) -> dict[int, float]:
    """The unit-error rule bar by bar, as the module docstring states it: {bar: factor applied}."""
    half, band = window // 2, math.log10(1.5)
    valid = [bool(np.isfinite(c) and c > 0) for c in close]
    repairs: dict[int, float] = {}
    for i, c in enumerate(close):
        if not valid[i]:
            continue
        before = [close[j] for j in range(max(0, i - half), i) if valid[j]]
        after = [close[j] for j in range(i + 1, min(len(close), i + half + 1)) if valid[j]]
        if len(before) + len(after) < 2:
            continue
        offset = math.log10(c / statistics.median(before + after))
        for target, factor in ((2.0, 0.01), (-2.0, 100.0)):
            near = [any(abs(math.log10(c / other) - target) < band for other in side) for side in (before, after)]
            if abs(offset - target) < band and all(near):
                repairs[i] = factor
    return repairs


@pytest.mark.parametrize(("seed", "window"), [(1, 11), (2, 11), (3, 5), (5, 7), (6, 3)])
def test_unit_repairs_match_the_rule_applied_bar_by_bar(seed: int, window: int) -> None:
    rng = np.random.default_rng(seed)
    close = 10.0 * np.exp(np.cumsum(rng.normal(0.0, 0.1, 400)))
    for start in rng.integers(0, 400, 40):  # runs of 1-7 bars at 100x or 1/100x
        close[start : start + rng.integers(1, 8)] *= rng.choice([100.0, 0.01]) * rng.uniform(0.6, 1.6)
    close[rng.integers(0, 400, 60)] = np.nan
    close[rng.integers(0, 400, 5)] = 0.0
    expected = reference_repairs(close, window)
    assert set(expected.values()) == {0.01, 100.0}  # the case exercises both directions
    frame = bars(close)
    assert repair_unit_errors(frame, window=window) == len(expected)
    assert flagged(frame, FLAG_UNIT_REPAIRED) == sorted(expected)
    repaired = frame["close"].to_numpy()
    for i, factor in expected.items():
        assert repaired[i] == pytest.approx(close[i] * factor, rel=1e-12)
    untouched = np.ones(len(close), dtype=bool)
    untouched[list(expected)] = False
    np.testing.assert_array_equal(repaired[untouched], close[untouched])


@pytest.mark.parametrize("window", [0, 2, 10])
def test_the_unit_window_must_be_odd_and_at_least_three(window: int) -> None:
    with pytest.raises(ValueError, match="odd number of bars >= 3"):
        repair_unit_errors(bars(BASE), window=window)


# --- zero volume ---------------------------------------------------------------------------------


def test_zero_volume_is_flagged_in_a_traded_series() -> None:
    volume = np.full(30, 5000.0)
    volume[[3, 17]] = 0.0
    volume[[5, 6]] = np.nan
    frame = bars(BASE, volume)
    assert flag_zero_volume(frame) == 2
    assert flagged(frame, FLAG_ZERO_VOLUME) == [3, 17]


def test_fx_bars_with_no_volume_at_all_are_not_flagged() -> None:
    frame, _ = yahoo_bars(EURUSD, "EURUSD=X")
    assert len(frame) == 264
    assert (frame["volume"] == 0).all()
    assert flag_zero_volume(frame) == 0
    assert flagged(frame, FLAG_ZERO_VOLUME) == []


def test_a_series_mostly_without_volume_is_not_flagged() -> None:
    volume = np.zeros(30)
    volume[:10] = 100.0
    frame = bars(BASE, volume)
    assert flag_zero_volume(frame) == 0
    assert flagged(frame, FLAG_ZERO_VOLUME) == []


# --- spikes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("factor", [1.4, 0.6])
def test_a_one_bar_spike_is_flagged_and_not_changed(factor: float) -> None:
    close = np.full(10, 10.0)
    close[4] = 10.0 * factor
    frame = bars(close)
    assert flag_spikes(frame, 0.25) == 1
    assert flagged(frame, FLAG_SPIKE) == [4]
    np.testing.assert_array_equal(frame["close"].to_numpy(), close)


@pytest.mark.parametrize(
    "close",
    [
        [10.0, 10.0, 10.0, 10.0, 14.0, 14.0, 14.0, 14.0],  # a step that persists
        [10.0, 10.0, 10.0, 14.0, 14.0, 10.0, 10.0, 10.0],  # a two-bar excursion
        [14.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0, 14.0],  # first and last bars
        [10.0, 10.0, 10.0, 14.0, 13.0, 13.0, 13.0, 13.0],  # +40% then -7%: near the next bar
        [10.0, 10.0, 10.0, 20.0, 14.0, 14.0, 14.0, 14.0],  # +100% then -30%, but neighbours 40% apart
        [10.0, 10.0, 10.0, 13.5, 12.0, 12.0, 12.0, 12.0],  # +35% then -11%: neighbours agree, one side only
        [10.0, 10.0, 10.0, 12.0, 10.0, 10.0, 10.0, 10.0],  # +20% is under the threshold
        [10.0, 10.0, np.nan, 14.0, 10.0, 10.0, 10.0, 10.0],  # a missing neighbour
    ],
)
def test_anything_but_a_one_bar_excursion_is_not_a_spike(close: list[float]) -> None:
    frame = bars(close)
    assert flag_spikes(frame, 0.25) == 0
    assert flagged(frame, FLAG_SPIKE) == []


@pytest.mark.parametrize("threshold", [0.0, -0.25, float("nan")])
def test_the_spike_threshold_must_be_positive(threshold: float) -> None:
    frame = bars(BASE)
    with pytest.raises(ValueError, match="spike threshold must be > 0"):
        flag_spikes(frame, threshold)
    with pytest.raises(ValueError, match="spike threshold must be > 0"):
        check_ticks(frame, threshold)
    assert not set(TICK_FLAGS) & set(frame.columns)  # refused before anything changed


# --- all three -----------------------------------------------------------------------------------


def test_check_ticks_runs_every_rule_and_counts_only_what_it_found() -> None:
    close = BASE.copy()
    close[25] *= 1.4
    volume = np.full(30, 5000.0)
    volume[3] = 0.0
    frame = bars(close, volume)
    scale(frame, [12], 100.0)  # repaired first, so never called a spike
    assert check_ticks(frame, 0.25) == {FLAG_UNIT_REPAIRED: 1, FLAG_ZERO_VOLUME: 1, FLAG_SPIKE: 1}
    assert flagged(frame, FLAG_UNIT_REPAIRED) == [12]
    assert flagged(frame, FLAG_ZERO_VOLUME) == [3]
    assert flagged(frame, FLAG_SPIKE) == [25]
    for flag in TICK_FLAGS:
        assert frame[flag].dtype == np.float64
        assert set(frame[flag].unique()) == {0.0, 1.0}


def test_clean_bars_get_every_flag_column_cleared_and_stale_flags_are_recomputed() -> None:
    frame = bars(BASE)
    frame[FLAG_SPIKE] = 1.0
    frame[FLAG_ZERO_VOLUME] = np.nan
    assert check_ticks(frame, 0.25) == {}
    for flag in TICK_FLAGS:
        assert frame[flag].dtype == np.float64
        assert frame[flag].tolist() == [0.0] * 30


def test_an_empty_frame_gets_the_flag_columns() -> None:
    frame = empty_bars()
    assert check_ticks(frame, 0.25) == {}
    assert [frame[flag].dtype for flag in TICK_FLAGS] == [np.dtype(np.float64)] * 3


# --- real data -----------------------------------------------------------------------------------


def test_twenty_years_of_spy_have_no_unit_errors_and_no_spikes() -> None:
    raw = pd.read_csv(SPY, index_col=0)
    assert list(raw.columns) == ["date", "open", "high", "low", "close", "volume"]
    frame = conform(
        raw.rename(columns={"date": "time"}).assign(symbol="SPY", interval="1d", source="csv", adj_close=raw["close"])
    )
    assert len(frame) == 5241
    before = prices(frame)
    assert repair_unit_errors(frame) == 0
    assert flag_spikes(frame, 0.25) == 0
    assert check_ticks(frame, 0.25) == {}
    np.testing.assert_array_equal(prices(frame), before)


def test_a_real_year_of_aapl_with_a_split_has_no_unit_errors() -> None:
    frame, currency = yahoo_bars(AAPL, "AAPL")
    assert currency == "USD"
    before = prices(frame)
    assert repair_unit_errors(frame) == 0
    assert flagged(frame, FLAG_UNIT_REPAIRED) == []
    np.testing.assert_array_equal(prices(frame), before)
