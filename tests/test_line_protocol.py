"""The line-protocol serializer: escaping, NaN handling and exact floats, checked by a real InfluxDB 1.x."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import httpx
import numpy as np
import pandas as pd
import pytest

from blocks.line_protocol import LineProtocolError, batches, escape_key, serialize

TAGS = ("symbol", "interval", "source")


def frame(symbols: list[str], **fields: list[float]) -> pd.DataFrame:
    n = len(symbols)
    return pd.DataFrame(
        {
            "time": pd.date_range("2024-01-02", periods=n, freq="D", tz="UTC"),
            "symbol": symbols,
            "interval": "1d",
            "source": "files",
            **fields,
        }
    )


def body(data: pd.DataFrame, measurement: str = "bars", text: tuple[str, ...] = ()) -> bytes:
    return b"".join(batches(serialize(data, measurement, TAGS, text)))


@pytest.fixture
def database(influxdb_url: str) -> Iterator[str]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    httpx.post(f"{influxdb_url}/query", params={"q": f'CREATE DATABASE "{name}"'}).raise_for_status()
    yield name
    httpx.post(f"{influxdb_url}/query", params={"q": f'DROP DATABASE "{name}"'})


def write(url: str, db: str, payload: bytes) -> None:
    response = httpx.post(f"{url}/write", params={"db": db, "precision": "s"}, content=payload)
    assert response.status_code == 204, response.text


def read(url: str, db: str, measurement: str = "bars", symbol: str | None = None) -> pd.DataFrame:
    query = f'SELECT * FROM "{measurement}"' + (" WHERE symbol = $symbol" if symbol is not None else "")
    params = {"db": db, "q": query, "epoch": "s", "params": json.dumps({"symbol": symbol})}
    result = httpx.get(f"{url}/query", params=params).json()["results"][0]
    series = result.get("series", [])
    if not series:
        return pd.DataFrame()
    return pd.DataFrame(series[0]["values"], columns=series[0]["columns"])


def test_a_line_has_sorted_tags_float_fields_and_seconds() -> None:
    lines = body(frame(["AAPL"], close=[189.5], volume=[1000.0]))
    assert lines == b"bars,interval=1d,source=files,symbol=AAPL close=189.5,volume=1000 1704153600\n"


def test_nan_fields_are_omitted_and_an_all_nan_row_is_not_written() -> None:
    data = frame(["A", "A", "A"], close=[1.0, np.nan, np.nan], sma_20=[np.nan, 2.0, np.nan])
    lines = body(data).decode().splitlines()
    assert sorted(line.split(" ")[1] for line in lines) == ["close=1", "sma_20=2"]
    assert "nan" not in body(data).decode().lower()


@pytest.mark.parametrize(
    ("raw", "escaped"),
    [("BRK-B", "BRK-B"), ("^GSPC", "^GSPC"), ("EURUSD=X", "EURUSD\\=X"), ("A B", "A\\ B"), ("A,B", "A\\,B")],
)
def test_tag_values_are_escaped(raw: str, escaped: str) -> None:
    assert escape_key(raw) == escaped
    assert f"symbol={escaped} ".encode() in body(frame([raw], close=[1.0]))


@pytest.mark.parametrize("bad", ["A\nB", "A\rB"])
def test_a_line_break_in_a_tag_or_text_field_is_refused(bad: str) -> None:
    with pytest.raises(LineProtocolError, match="line break"):
        body(frame([bad], close=[1.0]))
    with pytest.raises(LineProtocolError, match="line break"):
        body(frame(["A"], close=[1.0]).assign(reason=[bad]), text=("reason",))


def test_infinite_values_are_refused_naming_the_field() -> None:
    with pytest.raises(LineProtocolError, match="'close'"):
        body(frame(["A"], close=[np.inf]))


def test_batches_split_on_line_boundaries() -> None:
    data = frame(["A"] * 12, close=list(np.arange(12.0)))
    parts = list(batches(serialize(data, "bars", TAGS), size=5))
    assert [p.count(b"\n") for p in parts] == [5, 5, 2]
    assert b"".join(parts) == body(data)


def test_every_value_and_awkward_symbol_round_trips_exactly_through_influxdb(influxdb_url: str, database: str) -> None:
    rng = np.random.default_rng(3)
    symbols = ["BRK-B", "^GSPC", "EURUSD=X", "A B", "A,B", "back\\slash"]
    values = {
        "close": [0.1, 1e20, 1 / 3, 5e-324, -0.0, 123456789.123456789],
        "volume": list(rng.integers(0, 2**53, 6).astype(float)),
        "rsi_14": list(rng.uniform(0, 100, 6)),
    }
    data = frame(symbols, **values).assign(reason=['say "hi"', "a\\b", "x", "y", "z", "w"])
    write(influxdb_url, database, body(data, text=("reason",)))
    for i, symbol in enumerate(symbols):
        got = read(influxdb_url, database, symbol=symbol)
        assert len(got) == 1, symbol
        assert got["time"].iloc[0] == data["time"].iloc[i].timestamp()
        for column in values:
            assert float(got[column].iloc[0]) == values[column][i], (symbol, column)
        assert got["reason"].iloc[0] == data["reason"].iloc[i]


def test_an_injection_attempt_stays_one_point(influxdb_url: str, database: str) -> None:
    sneaky = "X close=0 0\nbars,symbol=Y"
    with pytest.raises(LineProtocolError):
        body(frame([sneaky], close=[1.0]))
    comma = "X,interval=1h close=0"  # escaped: one odd symbol, not a second tag set
    write(influxdb_url, database, body(frame([comma], close=[1.0])))
    got = read(influxdb_url, database, symbol=comma)
    assert got[["symbol", "interval", "close"]].values.tolist() == [[comma, "1d", 1.0]]


@pytest.mark.parametrize("bad", ["ends\\", "a\\,b", "a\\ b", "a\\=b"])
def test_a_backslash_that_would_escape_the_next_character_is_refused(bad: str) -> None:
    with pytest.raises(LineProtocolError, match="backslash"):
        escape_key(bad)
