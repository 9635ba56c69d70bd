"""Every captured response in ../shared/reference-data/{yahoo,alphavantage} meets its parser.

Each file either parses into the documented frame or raises the documented error class. The
files are read where they lie (some may not be copied into the project); in CI their absence is a
failure, elsewhere a visible skip.
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import pytest

from configs.settings import SourceSettings
from tasks.errors import PermanentSourceError, RateLimitedError, SourceError
from tasks.sources.alpha_vantage import AlphaVantage, parse_technical
from tasks.sources.base import BarQuery, Collected
from tasks.sources.files import VendorFiles, VendorFilesSettings
from tasks.sources.yahoo_finance import YahooFinance
from tests.conftest import REPO

pytestmark = pytest.mark.unit  # no server, no child process: `pytest -m unit`

REFERENCE = REPO.parent / "shared" / "reference-data"
WIDE = (date(1980, 1, 1), date(2030, 1, 1))
SETTINGS = SourceSettings(base_url="http://127.0.0.1:9/", timeout=5, api_key="REFERENCE-TEST-KEY")

if not REFERENCE.is_dir():
    if os.environ.get("CI"):
        raise RuntimeError(f"CI needs the reference data beside the clone: {REFERENCE} is missing")
    pytest.skip(f"reference data not found at {REFERENCE}", allow_module_level=True)


def files(folder: str) -> list[Path]:
    return sorted(p for p in (REFERENCE / folder).rglob("*") if p.is_file())


def unwrap(path: Path) -> tuple[int, bytes]:
    """(HTTP status, body) of a captured response; recorded wrappers hold the real status."""
    raw = path.read_bytes()
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        return 200, raw  # a CSV body as served
    if isinstance(data, dict) and "request" in data and "response" in data:
        response = data["response"]
        body = response.get("bodyJson")
        return response["status"], json.dumps(body).encode() if body is not None else response["body"].encode()
    error = (data.get("chart") or {}).get("error") if isinstance(data, dict) else None
    return (404 if error.get("code") == "Not Found" else 400) if error else 200, raw


def expect_bars_or_documented_error(parse: Any, expected_error: type[SourceError] | None) -> Collected | None:
    if expected_error is not None:
        with pytest.raises(expected_error):
            parse()
        return None
    collected: Collected = parse()
    assert list(collected.bars.columns[:10]) == [
        "time", "symbol", "interval", "source", "open", "high", "low", "close", "adj_close", "volume",
    ]  # fmt: skip
    assert str(collected.bars["time"].dtype) == "datetime64[ns, UTC]"
    return collected


@pytest.mark.parametrize("path", files("yahoo"), ids=lambda p: p.name)
def test_every_yahoo_file(path: Path, tmp_path: Path) -> None:
    status, body = unwrap(path)
    if body.startswith(b"Date,"):  # Yahoo's retired CSV download: a vendor dump now
        assert status == 200
        return csv_through_the_files_source(body, tmp_path)
    chart = json.loads(body)["chart"]
    result = (chart.get("result") or [{}])[0]
    meta = result.get("meta") or {}
    symbol, interval = meta.get("symbol", "X"), meta.get("dataGranularity", "1d")
    expected = PermanentSourceError if status in (400, 404) else None
    source = YahooFinance(SETTINGS)
    collected = expect_bars_or_documented_error(
        lambda: source.parse(BarQuery(symbol, interval, *WIDE), httpx.Response(status, content=body)), expected
    )
    if collected is not None:
        closes = (result.get("indicators", {}).get("quote") or [{}])[0].get("close") or []
        assert len(collected.bars) == len(result.get("timestamp") or []) - collected.live_bars_skipped
        assert collected.bars["close"].notna().sum() == sum(c is not None for c in closes) - collected.live_bars_skipped


def csv_through_the_files_source(body: bytes, folder: Path) -> None:
    header = body.decode().splitlines()[0]
    name = "ANY.csv" if header.startswith("Date,Open") else "ANY.events.csv"
    (folder / name).write_bytes(body)
    collected = VendorFiles(VendorFilesSettings(path=str(folder))).collect(BarQuery("ANY", "1d", *WIDE))
    rows = len(body.decode().strip().splitlines()) - 1
    if "Dividends" in header:
        assert collected.bars.empty and set(collected.actions["kind"]) == {"dividend"}
        assert len(collected.actions) == rows
    elif "Stock Splits" in header:
        assert collected.actions["ratio"].tolist() == [4.0]
    else:
        assert len(collected.bars) == rows
        assert collected.bars["flag_missing"].sum() > 0


AV_ERRORS: dict[str, type[SourceError]] = {
    "Error_Message": PermanentSourceError,
    "Note_rate_limit": RateLimitedError,
    "Information_premium_higher_call_volume": RateLimitedError,
    "GLOBAL_QUOTE": PermanentSourceError,
}


@pytest.mark.parametrize("path", files("alphavantage"), ids=lambda p: p.name)
def test_every_alpha_vantage_file(path: Path, tmp_path: Path) -> None:
    if path.suffix == ".csv":  # the intraday-extended CSV: a vendor dump
        shutil.copy(path, tmp_path / "MSFT.csv")
        collected = VendorFiles(VendorFilesSettings(path=str(tmp_path))).collect(BarQuery("MSFT", "1m", *WIDE))
        assert len(collected.bars) == len(path.read_text().splitlines()) - 1
        return
    if "_SMA_" in path.name or "_RSI_" in path.name:
        values = parse_technical(json.loads(path.read_bytes().decode("utf-8-sig")))
        assert len(values) > 0 and values["time"].is_monotonic_increasing
        return
    expected = next((error for key, error in AV_ERRORS.items() if key in path.name), None)
    interval = (
        "15m" if "15min" in path.name else "1m" if "1min" in path.name else "5m" if "intraday" in path.name else "1d"
    )
    interval = "1wk" if "WEEKLY" in path.name else interval
    source = AlphaVantage(SETTINGS)
    expect_bars_or_documented_error(
        lambda: source.parse(BarQuery("MSFT", interval, *WIDE), httpx.Response(200, content=path.read_bytes())),
        expected,
    )


GSPC_DURING_SESSION = "openbb_chart_^GSPC_range-1d_interval-1d_2024-02-29_index.json"


@pytest.mark.parametrize(
    ("served", "live"),
    [
        ("Thu, 29 Feb 2024 18:46:40 GMT", 1),  # 13:46 New York: the index's day is still forming
        ("Thu, 29 Feb 2024 21:00:00 GMT", 0),  # the close: currentTradingPeriod.regular.end
        ("Fri, 01 Mar 2024 12:00:00 GMT", 0),
    ],
)
def test_an_index_bar_is_live_only_while_its_session_is_open(served: str, live: int) -> None:
    body = (REFERENCE / "yahoo" / GSPC_DURING_SESSION).read_bytes()
    response = httpx.Response(200, content=body, headers={"Date": served})
    collected = YahooFinance(SETTINGS).parse(BarQuery("^GSPC", "1d", *WIDE), response)
    assert collected.live_bars_skipped == live
    assert len(collected.bars) == 1 - live


def test_the_recorded_date_header_decides_the_live_bar() -> None:
    """node-yahoo-finance2 kept the real response headers: served before the next session opened."""
    wrapper = json.loads(
        (
            REFERENCE / "yahoo" / "yahoo-finance2_fixtures_raw"
            / "chart-AAPL-2024-10-02-to-2024-10-03-includePrePost-false-interval-1m.json"
        ).read_bytes()
    )  # fmt: skip
    response = wrapper["response"]
    headers = {"Date": response["headers"]["date"][0]}
    served = httpx.Response(response["status"], content=response["body"].encode(), headers=headers)
    collected = YahooFinance(SETTINGS).parse(BarQuery("AAPL", "1m", *WIDE), served)
    assert collected.live_bars_skipped == 0
    assert len(collected.bars) == len(json.loads(response["body"])["chart"]["result"][0]["timestamp"])
    # Its last bar is the minute from 16:00 New York on 2024-10-03: live while that minute runs.
    within = {"Date": "Thu, 03 Oct 2024 20:00:30 GMT"}
    early = httpx.Response(response["status"], content=response["body"].encode(), headers=within)
    assert YahooFinance(SETTINGS).parse(BarQuery("AAPL", "1m", *WIDE), early).live_bars_skipped == 1
