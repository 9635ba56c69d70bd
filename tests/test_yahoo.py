"""The Yahoo parser against real captured v8 chart responses."""

from __future__ import annotations

from datetime import date
from zoneinfo import ZoneInfo

import httpx
import numpy as np
import pandas as pd
import pytest

from configs.settings import SourceSettings
from tasks.errors import PermanentSourceError, TransientSourceError
from tasks.sources.base import BarQuery, load_source, redact_url
from tasks.sources.yahoo_finance import YahooFinance
from tests.conftest import YAHOO, yahoo_json, yahoo_payload

SETTINGS = SourceSettings(base_url="http://127.0.0.1:9/v8/finance/chart/", rate_limit=2000, timeout=5)
WIDE = (date(1980, 1, 1), date(2030, 1, 1))


def parse(name: str, symbol: str, interval: str = "1d", status: int = 200, window: tuple[date, date] = WIDE):
    source = YahooFinance(SETTINGS)
    response = httpx.Response(status, content=yahoo_payload(name))
    return source.parse(BarQuery(symbol, interval, *window), response)


def payload_quote(name: str) -> tuple[list[int], dict[str, list[float | None]], list[float | None] | None]:
    result = yahoo_json(name)["chart"]["result"][0]
    adj = result["indicators"].get("adjclose")
    return result.get("timestamp", []), result["indicators"]["quote"][0], adj[0]["adjclose"] if adj else None


ALL_SUCCESS_PAYLOADS = sorted(p.name for p in YAHOO.glob("*.json") if "error" not in p.name)


@pytest.mark.parametrize("name", ALL_SUCCESS_PAYLOADS)
def test_every_captured_payload_parses_to_its_bars(name: str) -> None:
    result = yahoo_json(name)["chart"]["result"][0]
    meta = result["meta"]
    timestamps, quote, adj = payload_quote(name)
    collected = parse(name, meta["symbol"], meta["dataGranularity"])
    bars = collected.bars
    fields = ("open", "high", "low", "close", "volume")
    all_null = [all(quote.get(f, [None] * len(timestamps))[i] is None for f in fields) for i in range(len(timestamps))]
    assert collected.dropped_null_bars == sum(all_null)
    assert len(bars) == len(timestamps) - sum(all_null)
    kept = [i for i, null in enumerate(all_null) if not null]
    for field in fields:
        expected = np.array([quote[field][i] for i in kept], dtype=float)
        np.testing.assert_array_equal(bars[field].to_numpy(), expected)
    if adj is not None:
        np.testing.assert_array_equal(bars["adj_close"].to_numpy(), np.array([adj[i] for i in kept], dtype=float))
    assert (bars["symbol"] == meta["symbol"]).all()
    assert str(bars["time"].dtype) == "datetime64[ns, UTC]"


def test_daily_bars_are_stamped_at_midnight_utc_of_the_exchange_date() -> None:
    name = "yahoo-finance2_chart_AAPL_2020_full_year_1d_split_and_dividends.json"
    bars = parse(name, "AAPL").bars
    assert len(bars) == 253
    assert bars["time"].iloc[0] == pd.Timestamp("2020-01-02", tz="UTC")
    assert bars["time"].iloc[-1] == pd.Timestamp("2020-12-31", tz="UTC")
    assert (bars["time"] == bars["time"].dt.normalize()).all()
    assert bars["time"].is_unique
    assert bars["time"].is_monotonic_increasing


@pytest.mark.parametrize(
    ("name", "symbol", "zone"),
    [
        ("yahoo-finance2_chart_WSKT.JK_2020_full_year_1d_Jakarta_dividends.json", "WSKT.JK", "Asia/Jakarta"),
        ("yahoo-finance2_chart_OCDO.L_2020_full_year_1d_London.json", "OCDO.L", "Europe/London"),
        ("yfinance-rs_history_chart_GS2C.DE.json", "GS2C.DE", "Europe/Berlin"),
        ("yahoo-finance2_chart_BTC-USD_2020_full_year_1d_with_nulls.json", "BTC-USD", "UTC"),
    ],
)
def test_non_us_daily_bars_take_their_local_trading_date(name: str, symbol: str, zone: str) -> None:
    timestamps, quote, _ = payload_quote(name)
    bars = parse(name, symbol).bars
    expected = {
        pd.Timestamp(pd.Timestamp(ts, unit="s", tz="UTC").tz_convert(ZoneInfo(zone)).date(), tz="UTC")
        for ts, close in zip(timestamps, quote["close"], strict=True)
        if close is not None
    }
    assert set(bars["time"]) == expected


def test_all_null_bars_are_dropped_and_counted() -> None:
    collected = parse("yahoo-finance2_chart_BTC-USD_2020_full_year_1d_with_nulls.json", "BTC-USD")
    assert collected.dropped_null_bars == 4
    assert len(collected.bars) == 366
    assert pd.Timestamp("2020-04-17", tz="UTC") not in set(collected.bars["time"])
    assert not collected.bars[["open", "high", "low", "close"]].isna().any().any()


@pytest.mark.parametrize(
    "name",
    [
        "yahoo-finance2_chart_TSLA_2021-11-23_1h_empty_period1_eq_period2.json",
        "yahoo-finance2_chart_AAPL_2025-02-01_weekend_1m_empty_result.json",
    ],
)
def test_a_result_without_timestamps_is_zero_bars(name: str) -> None:
    collected = parse(name, "X", interval="1h")
    assert collected.bars.empty
    assert collected.dropped_null_bars == 0


def test_intraday_bars_keep_their_start_instant() -> None:
    name = "yahoo-finance2_chart_AAPL_2024-10-02_1m_regular_hours_with_nulls.json"
    bars = parse(name, "AAPL", interval="1m").bars
    assert bars["time"].iloc[0] == pd.Timestamp("2024-10-02 13:30", tz="UTC")


def test_bars_outside_the_requested_dates_are_not_returned() -> None:
    name = "yahoo-finance2_chart_AAPL_2020_full_year_1d_split_and_dividends.json"
    bars = parse(name, "AAPL", window=(date(2020, 3, 2), date(2020, 3, 6))).bars
    assert list(bars["time"].dt.strftime("%Y-%m-%d")) == [f"2020-03-0{d}" for d in range(2, 7)]


def test_404_not_found_is_permanent_with_yahoos_message() -> None:
    with pytest.raises(PermanentSourceError) as caught:
        parse("yahoo-finance2_chart_SI_404_not_found_delisted_error.json", "SI", status=404)
    assert "No data found, symbol may be delisted" in str(caught.value)
    assert caught.value.symbol == "SI"
    assert not caught.value.transient


def test_400_data_does_not_exist_is_permanent_with_yahoos_message() -> None:
    with pytest.raises(PermanentSourceError, match="Data doesn't exist for startDate = 1577836800"):
        parse("yahoo-finance2_chart_BEKE_400_bad_request_data_doesnt_exist_error.json", "BEKE", status=400)


@pytest.mark.parametrize(
    ("status", "body", "content_type", "match"),
    [
        (429, b"Too Many Requests", "text/plain", "HTTP 429"),
        (503, b"<html>unavailable</html>", "text/html", "HTTP 503"),
        (200, b"<html><body>Too Many Requests</body></html>", "text/html", "instead of JSON"),
        (200, b"", "application/json", "instead of JSON"),
    ],
)
def test_busy_or_garbled_answers_are_transient(status: int, body: bytes, content_type: str, match: str) -> None:
    source = YahooFinance(SETTINGS)
    response = httpx.Response(status, content=body, headers={"content-type": content_type})
    with pytest.raises(TransientSourceError, match=match):
        source.parse(BarQuery("AAPL", "1d", *WIDE), response)


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (
            b'{"chart": {"result": [{"meta": {}, "timestamp": [1, 2], "indicators": {"quote": [{"close": [1.0]}]}}]}}',
            "close has 1 values for 2",
        ),
        (b'{"chart": {"result": []}}', "chart.result"),
        (b'{"quoteResponse": {}}', "no `chart`"),
        (b'{"chart": {"result": [{"timestamp": [1], "indicators": {"quote": [{"close": ["x"]}]}}]}}', "non-numeric"),
    ],
)
def test_malformed_bodies_say_what_is_wrong(body: bytes, match: str) -> None:
    with pytest.raises(PermanentSourceError, match=match):
        YahooFinance(SETTINGS).parse(BarQuery("AAPL", "1d", *WIDE), httpx.Response(200, content=body))


def test_request_follows_the_v8_chart_shape() -> None:
    (request,) = YahooFinance(SETTINGS).build_requests(BarQuery("EURUSD=X", "1d", date(2020, 1, 1), date(2020, 12, 31)))
    assert str(request.url).startswith("http://127.0.0.1:9/v8/finance/chart/EURUSD%3DX?")
    params = dict(request.url.params)
    assert params["interval"] == "1d"
    assert params["events"] == "div,splits"
    # A margin on both sides catches sessions that open on the previous UTC day.
    assert int(params["period1"]) < int(pd.Timestamp("2020-01-01", tz="UTC").timestamp())
    assert int(params["period2"]) > int(pd.Timestamp("2021-01-01", tz="UTC").timestamp())


def test_unreachable_server_is_transient_and_names_the_host_only() -> None:
    source = YahooFinance(SETTINGS)
    with pytest.raises(TransientSourceError, match=r"cannot reach http://127\.0\.0\.1:9") as caught:
        source.fetch(BarQuery("AAPL", "1d", date(2024, 1, 1), date(2024, 1, 5)))
    assert "period1" not in str(caught.value)


def test_sources_load_by_config_key() -> None:
    assert isinstance(load_source("yahoo_finance", SETTINGS), YahooFinance)


def test_redact_url_hides_keys() -> None:
    url = redact_url("https://www.alphavantage.co/query?function=X&symbol=IBM&apikey=SECRET123")
    assert "SECRET123" not in url
    assert "apikey=***" in url
    assert "symbol=IBM" in url
