from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tasks.bars import BAR_COLUMNS, FLAG_MISSING, conform, empty_bars, validate_symbol, validate_symbols
from tasks.errors import InvalidSymbolError, UsageError

pytestmark = pytest.mark.unit  # no server, no child process: `pytest -m unit`


@pytest.mark.parametrize("symbol", ["AAPL", "BRK-B", "^GSPC", "EURUSD=X", "BTC-USD", "0700.HK", "GC=F", "brk-b"])
def test_documented_symbols_are_admitted(symbol: str) -> None:
    assert validate_symbol(symbol) == symbol.upper()


@pytest.mark.parametrize(
    "symbol",
    ["AAPL;DROP", "AAPL DROP", "../etc", "AAPL/X", "A'B", 'A"B', "A?x=1", "", "^", "A..B", "-AAPL", "A\nB", "A&B"],
)
def test_everything_else_is_refused(symbol: str) -> None:
    with pytest.raises(InvalidSymbolError, match="invalid symbol"):
        validate_symbol(symbol)


def test_symbol_lists_are_checked_whole_and_deduplicated() -> None:
    assert validate_symbols(["AAPL", "msft", "AAPL", " "]) == ["AAPL", "MSFT"]
    with pytest.raises(UsageError):
        validate_symbols([""])
    with pytest.raises(InvalidSymbolError):
        validate_symbols(["AAPL", "AAPL;DROP"])


def test_conform_sets_the_standard_dtypes_and_order() -> None:
    frame = pd.DataFrame(
        {
            "rsi_14": [1.0],
            "volume": [100],
            "close": ["10.5"],
            "time": ["2024-01-02"],
            "symbol": ["AAPL"],
            "interval": ["1d"],
            "source": ["yahoo_finance"],
            "open": [10],
            "high": [11],
            "low": [9],
            "adj_close": [None],
        }
    )
    out = conform(frame)
    assert list(out.columns) == [*BAR_COLUMNS, "rsi_14"]
    assert str(out["time"].dtype) == "datetime64[ns, UTC]"
    for column in ("open", "high", "low", "close", "adj_close", "volume"):
        assert out[column].dtype == np.float64
    assert np.isnan(out["adj_close"].iloc[0])
    assert list(empty_bars().columns) == [*BAR_COLUMNS, FLAG_MISSING]  # as a source delivers them


def test_conform_refuses_a_frame_without_required_columns() -> None:
    with pytest.raises(ValueError, match="close"):
        conform(pd.DataFrame({"time": [], "symbol": []}))
