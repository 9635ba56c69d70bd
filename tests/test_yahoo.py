"""The Yahoo parser against real captured v8 chart responses."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import numpy as np
import pandas as pd
import pytest

from configs.settings import RetrySettings, SourceSettings
from flows.sandbox import SandboxConfig, read_request_log, start_sandbox
from tasks.errors import PermanentSourceError, RangeNotServedError, RateLimitedError, TransientSourceError
from tasks.sources.base import BarQuery, load_source, redact_url
from tasks.sources.yahoo_finance import YahooFinance, request_windows, served_at
from tests.conftest import YAHOO, yahoo_json, yahoo_payload

SETTINGS = SourceSettings(
    base_url="http://127.0.0.1:9/v8/finance/chart/",
    rate_limit=2000,
    timeout=5,
    retry=RetrySettings(max_attempts=2, initial_wait=0.01, max_wait=0.02),
)
WIDE = (date(1980, 1, 1), date(2030, 1, 1))


def parse(
    name: str,
    symbol: str,
    interval: str = "1d",
    status: int = 200,
    window: tuple[date, date] = WIDE,
    served: datetime | None = None,
):
    """Parse a captured payload as served at ``served`` (its Date header), or without one: served now."""
    source = YahooFinance(SETTINGS)
    headers = {"Date": format_datetime(served, usegmt=True)} if served else None
    response = httpx.Response(status, content=yahoo_payload(name), headers=headers)
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
    # Parsed now, long after every captured session closed: every bar is final and kept.
    assert collected.live_bars_skipped == 0
    kept = list(range(len(timestamps)))
    assert len(bars) == len(kept)
    assert bars["flag_missing"].sum() >= sum(all_null[i] for i in kept)
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
    timestamps, _, _ = payload_quote(name)
    bars = parse(name, symbol).bars
    expected = {
        pd.Timestamp(pd.Timestamp(ts, unit="s", tz="UTC").tz_convert(ZoneInfo(zone)).date(), tz="UTC")
        for ts in timestamps
    }
    assert set(bars["time"]) == expected


def test_all_null_bars_are_kept_and_flagged_for_the_missing_value_policy() -> None:
    bars = parse("yahoo-finance2_chart_BTC-USD_2020_full_year_1d_with_nulls.json", "BTC-USD").bars
    empty = bars[["open", "high", "low", "close", "volume"]].isna().all(axis=1)
    assert len(bars) == 370
    assert int(empty.sum()) == 4
    assert pd.Timestamp("2020-04-17", tz="UTC") in set(bars.loc[empty, "time"])
    assert bars["flag_missing"].tolist() == empty.astype(float).tolist()


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
    assert params["events"] == "div,splits,capitalGains"
    # A margin on both sides catches sessions that open on the previous UTC day.
    assert int(params["period1"]) < int(pd.Timestamp("2020-01-01", tz="UTC").timestamp())
    assert int(params["period2"]) > int(pd.Timestamp("2021-01-01", tz="UTC").timestamp())


def test_unreachable_server_is_transient_and_names_the_host_only() -> None:
    source = YahooFinance(SETTINGS)
    with pytest.raises(TransientSourceError, match=r"cannot reach http://127\.0\.0\.1:9") as caught:
        source.collect(BarQuery("AAPL", "1d", date(2024, 1, 1), date(2024, 1, 5)))
    assert "period1" not in str(caught.value)


def test_sources_load_by_config_key() -> None:
    assert isinstance(load_source("yahoo_finance", SETTINGS), YahooFinance)


def test_redact_url_hides_keys() -> None:
    url = redact_url("https://www.alphavantage.co/query?function=X&symbol=IBM&apikey=SECRET123")
    assert "SECRET123" not in url
    assert "apikey=***" in url
    assert "symbol=IBM" in url


GS2C_DURING_SESSION = "yfinance-rs_history_chart_GS2C.DE_with_nulls_fc023a4e.json"
AAPL_AFTER_CLOSE = "yfinance-rs_history_chart_AAPL.json"


def _stamp_of(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def test_the_live_last_bar_is_not_stored_as_a_final_bar() -> None:
    # Captured at 14:32 Berlin on 2025-10-01, inside currentTradingPeriod.regular (09:00-17:30).
    meta = yahoo_json(GS2C_DURING_SESSION)["chart"]["result"][0]["meta"]
    collected = parse(GS2C_DURING_SESSION, "GS2C.DE", served=_stamp_of(meta["regularMarketTime"] + 60))
    assert collected.live_bars_skipped == 1
    assert len(collected.bars) == 4
    assert pd.Timestamp("2025-10-01", tz="UTC") not in set(collected.bars["time"])
    # The same payload served after that session's close: the bar is final.
    after_close = parse(
        GS2C_DURING_SESSION, "GS2C.DE", served=_stamp_of(meta["currentTradingPeriod"]["regular"]["end"])
    )
    assert after_close.live_bars_skipped == 0
    assert after_close.bars["time"].iloc[-1] == pd.Timestamp("2025-10-01", tz="UTC")


def test_the_days_final_bar_after_the_close_is_stored() -> None:
    # regularMarketTime 16:00:01 New York = the last bar's stamp, after currentTradingPeriod.regular.end.
    meta = yahoo_json(AAPL_AFTER_CLOSE)["chart"]["result"][0]["meta"]
    regular = meta["currentTradingPeriod"]["regular"]
    assert meta["regularMarketTime"] >= regular["end"]
    at_1730_new_york = datetime(2025, 10, 29, 21, 30, tzinfo=UTC)
    collected = parse(AAPL_AFTER_CLOSE, "AAPL", served=at_1730_new_york)
    assert collected.live_bars_skipped == 0
    assert len(collected.bars) == 127
    last = collected.bars.iloc[-1]
    assert last["time"] == pd.Timestamp("2025-10-29", tz="UTC")
    assert last["close"] == pytest.approx(269.7, abs=0.005)
    # Served an hour before the close, the same bar was still forming.
    during = parse(AAPL_AFTER_CLOSE, "AAPL", served=_stamp_of(regular["end"] - 3600))
    assert during.live_bars_skipped == 1
    assert during.bars["time"].iloc[-1] == pd.Timestamp("2025-10-28", tz="UTC")


def test_a_bar_of_a_session_before_the_current_trading_period_is_final() -> None:
    # Stamped with regularMarketTime (17:35 Berlin, 2025-10-29) but served once Yahoo's current
    # trading period was already the next day's session: Xetra had closed, so the bar is final.
    name = "yfinance-rs_history_chart_GS2C.DE.json"
    meta = yahoo_json(name)["chart"]["result"][0]["meta"]
    served = _stamp_of(meta["currentTradingPeriod"]["pre"]["start"] - 3600)
    collected = parse(name, "GS2C.DE", served=served)
    assert collected.live_bars_skipped == 0
    assert collected.bars["time"].iloc[-1] == pd.Timestamp("2025-10-29", tz="UTC")


def test_the_date_header_not_the_parse_time_decides_what_was_live() -> None:
    regular = yahoo_json(AAPL_AFTER_CLOSE)["chart"]["result"][0]["meta"]["currentTradingPeriod"]["regular"]
    response = httpx.Response(200, headers={"Date": "Wed, 29 Oct 2025 19:00:00 GMT"})
    assert served_at(response) == datetime(2025, 10, 29, 19, tzinfo=UTC)
    assert regular["start"] < served_at(response).timestamp() < regular["end"]
    assert abs(served_at(httpx.Response(200)) - datetime.now(UTC)) < timedelta(minutes=1)
    assert abs(served_at(httpx.Response(200, headers={"Date": "garbage"})) - datetime.now(UTC)) < timedelta(minutes=1)


def test_partly_null_bars_are_kept_and_flagged() -> None:
    body = yahoo_json("yahoo-finance2_chart_AAPL_2020-08-31_2020-11-07_1d_split_and_dividend.json")
    quote = body["chart"]["result"][0]["indicators"]["quote"][0]
    quote["open"][3] = None
    quote["volume"][5] = None
    source = YahooFinance(SETTINGS)
    bars = source.parse(BarQuery("AAPL", "1d", *WIDE), httpx.Response(200, json=body)).bars
    assert len(bars) == 49
    assert bars["flag_missing"].tolist() == [1.0 if i in (3, 5) else 0.0 for i in range(49)]


def test_splits_and_dividends_become_corporate_actions() -> None:
    actions = parse("yahoo-finance2_chart_AAPL_2020_full_year_1d_split_and_dividends.json", "AAPL").actions
    splits = actions[actions["kind"] == "split"]
    assert splits["time"].tolist() == [pd.Timestamp("2020-08-31", tz="UTC")]
    assert splits["ratio"].tolist() == [4.0]
    dividends = actions[actions["kind"] == "dividend"]
    assert len(dividends) == 4
    assert dividends["amount"].notna().all()
    assert dividends["ratio"].isna().all()
    assert (dividends["symbol"] == "AAPL").all()
    assert (dividends["source"] == "yahoo_finance").all()


def test_capital_gains_are_collected() -> None:
    name = "yfinance-rs_history_chart_VFINX.json"
    gains = yahoo_json(name)["chart"]["result"][0]["events"]["capitalGains"]
    actions = parse(name, "VFINX", interval="3mo").actions
    collected_gains = actions[actions["kind"] == "capital_gain"]
    assert len(collected_gains) == len(gains) > 0
    assert sorted(collected_gains["amount"]) == sorted(float(g["amount"]) for g in gains.values())


def test_adj_close_comes_from_the_payload() -> None:
    name = "yahoo-finance2_chart_MSFT_2021-02-01_2022-01-31_1d_dividends.json"
    _, _quote, adj = payload_quote(name)
    bars = parse(name, "MSFT").bars
    assert adj is not None
    np.testing.assert_array_equal(bars["adj_close"].to_numpy(), np.array(adj, dtype=float))
    assert (bars["adj_close"] < bars["close"]).iloc[0]  # dividends after the first bar adjust it down


NOW = datetime(2026, 11, 25, 15, 0, tzinfo=UTC)


def test_1m_ranges_are_split_into_7_day_requests() -> None:
    windows = request_windows(BarQuery("AAPL", "1m", date(2026, 11, 1), date(2026, 11, 24)), NOW)
    assert len(windows) == 4
    assert all(b - a <= timedelta(days=7) for a, b in windows)
    assert all(windows[i][1] == windows[i + 1][0] for i in range(len(windows) - 1))
    assert windows[-1][1] == NOW


@pytest.mark.parametrize(("interval", "days_back"), [("1m", 30), ("5m", 60), ("90m", 60), ("1h", 730)])
def test_ranges_yahoo_cannot_serve_are_refused(interval: str, days_back: int) -> None:
    old = (NOW - timedelta(days=days_back + 2)).date()
    with pytest.raises(RangeNotServedError, match=f"last {days_back} days"):
        request_windows(BarQuery("AAPL", interval, old, NOW.date()), NOW)
    assert request_windows(BarQuery("AAPL", interval, (NOW - timedelta(days=days_back - 2)).date(), NOW.date()), NOW)


def test_long_daily_ranges_are_one_request_and_unknown_intervals_refused() -> None:
    assert len(request_windows(BarQuery("AAPL", "1d", date(1990, 1, 1), date(2026, 11, 24)), NOW)) == 1
    with pytest.raises(RangeNotServedError, match="no '4h' bars"):
        request_windows(BarQuery("AAPL", "4h", date(2026, 11, 1), date(2026, 11, 2)), NOW)


def test_1h_is_requested_as_60m() -> None:
    (request,) = YahooFinance(SETTINGS).build_requests(BarQuery("AAPL", "1h", date(2026, 11, 20), date(2026, 11, 24)))
    assert request.url.params["interval"] == "60m"


def test_429_is_a_rate_limit_honouring_retry_after() -> None:
    response = httpx.Response(429, content=b"Too Many Requests", headers={"Retry-After": "7"})
    with pytest.raises(RateLimitedError) as caught:
        YahooFinance(SETTINGS).parse(BarQuery("AAPL", "1d", *WIDE), response)
    assert caught.value.retry_after == 7.0


def test_the_sandboxs_429_fault_is_retried_no_sooner_than_its_retry_after(tmp_path: Path) -> None:
    """The sandbox's `429` fault answers as Yahoo does; the source waits its Retry-After, then gets the bars."""
    log = tmp_path / "requests.jsonl"
    config = SandboxConfig(fault_rate=0.5, fault_kinds=("429",), seed=4, symbol_faults={"ALWAYS": "429"})
    config.request_log, config.access_log = log, False
    server = start_sandbox(0, config)  # seed 4: one fault, then none
    try:
        settings = SETTINGS.model_copy(
            update={"base_url": server.base_url, "retry": RetrySettings(max_attempts=3, initial_wait=0.01, max_wait=5)}
        )
        collected = YahooFinance(settings).collect(BarQuery("AAPL", "1d", date(2024, 1, 1), date(2024, 1, 31)))
        with pytest.raises(RateLimitedError) as caught:
            YahooFinance(SETTINGS.model_copy(update={"base_url": server.base_url})).collect(
                BarQuery("ALWAYS", "1d", date(2024, 1, 1), date(2024, 1, 31))
            )
    finally:
        server.shutdown()
        server.server_close()
    assert len(collected.bars) == 23 and collected.requests == 2
    first, second = (e for e in read_request_log(log) if e["symbol"] == "AAPL")
    assert (first["status"], first["fault"], second["status"], second.get("fault")) == (429, "429", 200, None)
    assert second["t"] - first["t"] >= 1.0  # Retry-After: 1
    assert caught.value.retry_after == 1.0 and "rate limited by Yahoo (HTTP 429)" in str(caught.value)
