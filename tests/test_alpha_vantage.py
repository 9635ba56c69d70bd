"""The Alpha Vantage source against real captured bodies: values, stamping, error classes, no key leaks."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs
from zoneinfo import ZoneInfo

import httpx
import numpy as np
import pandas as pd
import pytest
from pydantic import SecretStr

from configs.settings import ConfigError, SourceSettings
from flows.sandbox import SandboxConfig, av_daily_quota_body, read_request_log, start_sandbox
from tasks.bars import BAR_COLUMNS, FLAG_MISSING, Instrument
from tasks.errors import (
    PermanentSourceError,
    QuotaExhaustedError,
    RangeNotServedError,
    RateLimitedError,
    SourceError,
    TransientSourceError,
)
from tasks.sources.alpha_vantage import (
    SOURCE,
    AlphaVantage,
    AlphaVantageSettings,
    months_touched,
    parse_technical,
    stamp_keys,
)
from tasks.sources.base import BarQuery, Collected, load_source, pacer_for, redact_url

AV = Path(__file__).parent / "fixtures" / "alphavantage"
KEY = "TESTKEY-do-not-leak"
SETTINGS = AlphaVantageSettings(base_url="http://127.0.0.1:9/query", api_key=KEY, timeout=5)
WIDE = (date(1990, 1, 1), date(2030, 1, 1))
EASTERN = ZoneInfo("US/Eastern")

# The intraday-extended CSV belongs to the vendor-files source; only JSON bodies are parsed here.
FIXTURES = sorted(p.name for p in AV.glob("*.json"))

DAILY = "threefourteen_TIME_SERIES_DAILY_MSFT_compact_2018-08-16.json"
DAILY_ADJUSTED = "threefourteen_TIME_SERIES_DAILY_ADJUSTED_MSFT_compact_2018-08-20.json"
INTRADAY_15 = "threefourteen_TIME_SERIES_INTRADAY_MSFT_15min_2018-04-11.json"
INTRADAY_1 = "romeltorres_TIME_SERIES_INTRADAY_MSFT_1min_compact_2017-12-18.json"
WEEKLY = "threefourteen_TIME_SERIES_WEEKLY_MSFT_full.json"
FX = "threefourteen_FX_DAILY_EUR_USD_compact.json"
RSI_WEEKLY = "threefourteen_RSI_MSFT_weekly_period10_open.json"
SMA_WEEKLY = "threefourteen_SMA_MSFT_weekly_period10_open.json"
SMA_15 = "romeltorres_SMA_MSFT_15min_period10_close_2017-12-20.json"

# Every fixture's documented outcome: the interval its bars parse at (with row count), or the error class.
SERIES: dict[str, tuple[str, str, int]] = {
    "crazzyghost_daily_IBM_2020-05-08_truncated2rows.json": ("IBM", "1d", 2),
    "crazzyghost_dailyadjusted_IBM_2020-05-08_truncated2rows.json": ("IBM", "1d", 2),
    "crazzyghost_intraday_IBM_2020-05-08_truncated2rows.json": ("IBM", "5m", 2),
    INTRADAY_1: ("MSFT", "1m", 100),
    FX: ("EURUSD=X", "1d", 101),
    DAILY_ADJUSTED: ("MSFT", "1d", 100),
    DAILY: ("MSFT", "1d", 100),
    INTRADAY_15: ("MSFT", "15m", 39),
    WEEKLY: ("MSFT", "1wk", 1232),
}
ERRORS: dict[str, type[SourceError]] = {
    "romeltorres_GLOBAL_QUOTE.json": PermanentSourceError,
    SMA_15: PermanentSourceError,
    RSI_WEEKLY: PermanentSourceError,
    SMA_WEEKLY: PermanentSourceError,
    "threefourteen_error_Error_Message_invalid_API_call_CMO.json": PermanentSourceError,
    "threefourteen_error_Information_premium_higher_call_volume.json": RateLimitedError,
    "threefourteen_error_Note_rate_limit_5perMin_500perDay.json": RateLimitedError,
}


def body(name: str) -> bytes:
    return (AV / name).read_bytes()


def payload(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(body(name).decode("utf-8-sig"))
    return data


def parse(
    content: bytes,
    symbol: str = "MSFT",
    interval: str = "1d",
    window: tuple[date, date] = WIDE,
    status: int = 200,
    headers: dict[str, str] | None = None,
) -> Collected:
    response = httpx.Response(status, content=content, headers=headers)
    return AlphaVantage(SETTINGS).parse(BarQuery(symbol, interval, *window), response)


def parse_fixture(name: str, symbol: str = "MSFT", interval: str = "1d", window: tuple[date, date] = WIDE) -> Collected:
    return parse(body(name), symbol, interval, window)


def expected_bars(name: str, interval: str) -> pd.DataFrame:
    """The file's rows read independently of the parser: oldest first, intraday keys moved to bar start."""
    data = payload(name)
    series = next(v for k, v in data.items() if "Time Series" in k)
    step = {"1m": 1, "5m": 5, "15m": 15}.get(interval)
    records = []
    for key, fields in series.items():
        named = {field.split(". ", 1)[1]: float(value) for field, value in fields.items()}
        if step is None:
            time = datetime.strptime(key, "%Y-%m-%d").replace(tzinfo=UTC)
            if interval == "1wk":  # AV names the week's last trading day; bars are stamped at its Monday
                time -= timedelta(days=time.weekday())
        else:
            end = datetime.strptime(key, "%Y-%m-%d %H:%M:%S").replace(tzinfo=EASTERN)
            time = end.astimezone(UTC) - timedelta(minutes=step)
        records.append({"time": pd.Timestamp(time), **named})
    return pd.DataFrame(records).sort_values("time").reset_index(drop=True)


def test_every_json_fixture_has_a_documented_outcome() -> None:
    assert sorted([*SERIES, *ERRORS]) == FIXTURES
    assert len(FIXTURES) == 16


@pytest.mark.parametrize("name", sorted(SERIES))
def test_every_series_fixture_parses_to_the_files_values(name: str) -> None:
    symbol, interval, rows = SERIES[name]
    bars = parse_fixture(name, symbol, interval).bars
    expected = expected_bars(name, interval)

    assert len(bars) == rows == len(expected)
    assert list(bars.columns) == [*BAR_COLUMNS, FLAG_MISSING]
    assert str(bars["time"].dtype) == "datetime64[ns, UTC]"
    assert bars["time"].is_monotonic_increasing
    assert list(bars["time"]) == list(expected["time"])
    assert set(bars["symbol"]) == {symbol}
    assert set(bars["interval"]) == {interval}
    assert set(bars["source"]) == {"alpha_vantage"}
    for column in ("open", "high", "low", "close"):
        np.testing.assert_array_equal(bars[column].to_numpy(), expected[column].to_numpy())
    expected_volume = expected["volume"] if "volume" in expected else np.full(rows, np.nan)
    np.testing.assert_array_equal(bars["volume"].to_numpy(), np.asarray(expected_volume, dtype=np.float64))
    expected_adj = expected["adjusted close"] if "adjusted close" in expected else np.full(rows, np.nan)
    np.testing.assert_array_equal(bars["adj_close"].to_numpy(), np.asarray(expected_adj, dtype=np.float64))


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_every_non_series_fixture_raises_its_documented_error(name: str) -> None:
    with pytest.raises(SourceError) as caught:
        parse_fixture(name)
    assert type(caught.value) is ERRORS[name]
    assert caught.value.source == "alpha_vantage"
    assert caught.value.symbol == "MSFT"
    assert caught.value.transient is (ERRORS[name] is RateLimitedError)


def test_daily_compact_first_and_last_bar() -> None:
    collected = parse_fixture(DAILY)
    bars = collected.bars
    assert len(bars) == 100
    first, last = bars.iloc[0], bars.iloc[-1]
    assert first["time"] == pd.Timestamp("2018-03-27", tz="UTC")
    assert (first["open"], first["high"], first["low"], first["close"]) == (94.94, 95.139, 88.51, 89.47)
    assert first["volume"] == 53704562.0
    assert last["time"] == pd.Timestamp("2018-08-16", tz="UTC")
    assert (last["open"], last["close"], last["volume"]) == (108.3, 107.64, 20687122.0)
    assert bars["adj_close"].isna().all()
    assert (bars[FLAG_MISSING] == 0.0).all()
    assert collected.actions.empty
    assert collected.instrument == Instrument(time_zone="US/Eastern", compact=True)


def test_daily_adjusted_close_and_dividends() -> None:
    collected = parse_fixture(DAILY_ADJUSTED)
    bars = collected.bars.set_index("time")
    assert len(bars) == 100
    assert bars.loc[pd.Timestamp("2018-03-29", tz="UTC"), "close"] == 91.27
    assert bars.loc[pd.Timestamp("2018-03-29", tz="UTC"), "adj_close"] == 90.524
    assert bars.loc[pd.Timestamp("2018-08-20", tz="UTC"), "adj_close"] == 106.87
    assert bars.loc[pd.Timestamp("2018-08-20", tz="UTC"), "volume"] == 17326964.0

    actions = collected.actions
    assert list(actions.columns) == ["time", "symbol", "source", "kind", "ratio", "amount"]
    assert list(actions["time"]) == [pd.Timestamp("2018-05-16", tz="UTC"), pd.Timestamp("2018-08-15", tz="UTC")]
    assert list(actions["kind"]) == ["dividend", "dividend"]
    assert list(actions["amount"]) == [0.42, 0.42]
    assert actions["ratio"].isna().all()
    assert set(actions["symbol"]) == {"MSFT"}
    assert set(actions["source"]) == {"alpha_vantage"}


def test_split_coefficient_becomes_a_split_action() -> None:
    data = payload(DAILY_ADJUSTED)
    data["Time Series (Daily)"]["2018-08-17"]["8. split coefficient"] = "2.0000"
    actions = parse(json.dumps(data).encode()).actions
    split = actions.loc[actions["kind"] == "split"]
    assert list(split["time"]) == [pd.Timestamp("2018-08-17", tz="UTC")]
    assert list(split["ratio"]) == [2.0]
    assert split["amount"].isna().all()
    assert (actions["kind"] == "dividend").sum() == 2


def test_adjusted_series_prices_are_restated_in_post_split_shares_like_yahoo() -> None:
    data = payload(DAILY_ADJUSTED)
    series = data["Time Series (Daily)"]
    series["2018-08-17"]["8. split coefficient"] = "2.0000"
    raw = parse(json.dumps(payload(DAILY_ADJUSTED)).encode()).bars.set_index("time")
    split = parse(json.dumps(data).encode()).bars.set_index("time")
    before = split.index < pd.Timestamp("2018-08-17", tz="UTC")
    for column in ("open", "high", "low", "close"):
        np.testing.assert_array_equal(split.loc[before, column], raw.loc[before, column] / 2)
        np.testing.assert_array_equal(split.loc[~before, column], raw.loc[~before, column])
    np.testing.assert_array_equal(split.loc[before, "volume"], raw.loc[before, "volume"] * 2)
    np.testing.assert_array_equal(split["adj_close"], raw["adj_close"])  # AV's own, already adjusted


def test_a_split_after_the_window_still_restates_the_windows_bars() -> None:
    data = payload(DAILY_ADJUSTED)
    data["Time Series (Daily)"]["2018-08-17"]["8. split coefficient"] = "4.0000"
    window = (date(2018, 6, 1), date(2018, 6, 29))
    bars = parse(json.dumps(data).encode(), window=window).bars
    unsplit = parse(json.dumps(payload(DAILY_ADJUSTED)).encode(), window=window).bars
    np.testing.assert_array_equal(bars["close"], unsplit["close"] / 4)


def test_actions_outside_the_window_are_dropped_with_their_bars() -> None:
    collected = parse_fixture(DAILY_ADJUSTED, window=(date(2018, 6, 1), date(2018, 8, 20)))
    assert list(collected.actions["time"]) == [pd.Timestamp("2018-08-15", tz="UTC")]
    assert collected.bars["time"].min() == pd.Timestamp("2018-06-01", tz="UTC")


def test_intraday_bars_are_stamped_at_their_start_in_utc() -> None:
    bars = parse_fixture(INTRADAY_15, interval="15m").bars
    times = list(bars["time"])
    # "2018-04-11 15:30:00" US/Eastern (EDT, UTC-4) labels the bar ending then: it started 19:15 UTC.
    assert times[-1] == pd.Timestamp("2018-04-11 19:15", tz="UTC")
    assert bars.iloc[-1]["open"] == 91.84
    assert bars.iloc[-1]["close"] == 91.6
    assert bars.iloc[-1]["volume"] == 852917.0
    assert times[0] == pd.Timestamp("2018-04-10 16:30", tz="UTC")
    # The session's last bar is labelled 16:00, so it is the 15:45-16:00 bar.
    closing = bars.loc[bars["volume"] == 4799854.0, "time"]
    assert list(closing) == [pd.Timestamp("2018-04-10 19:45", tz="UTC")]
    same_day = bars.loc[bars["time"].dt.date == date(2018, 4, 11), "time"]
    assert (same_day.diff().dropna() == pd.Timedelta(minutes=15)).all()


def test_intraday_in_winter_uses_eastern_standard_time() -> None:
    bars = parse_fixture(INTRADAY_1, interval="1m").bars
    # "2017-12-18 14:56:00" EST (UTC-5) ends the last bar; it started at 19:55 UTC.
    assert bars["time"].iloc[-1] == pd.Timestamp("2017-12-18 19:55", tz="UTC")
    assert bars["time"].iloc[0] == pd.Timestamp("2017-12-18 18:16", tz="UTC")
    assert bars["close"].iloc[-1] == 86.5
    assert (bars["time"].diff().dropna() == pd.Timedelta(minutes=1)).all()


def test_intraday_honours_a_fixed_offset_time_zone() -> None:
    data = payload(INTRADAY_15)
    data["Meta Data"]["6. Time Zone"] = "GMT+8"
    bars = parse(json.dumps(data).encode(), interval="15m").bars
    assert bars["time"].iloc[-1] == pd.Timestamp("2018-04-11 07:15", tz="UTC")


def test_intraday_with_an_unknown_time_zone_is_refused() -> None:
    data = payload(INTRADAY_15)
    data["Meta Data"]["6. Time Zone"] = "Mars/Olympus"
    with pytest.raises(PermanentSourceError, match="Mars/Olympus"):
        parse(json.dumps(data).encode(), interval="15m")


def test_intraday_without_a_time_zone_defaults_to_us_eastern() -> None:
    data = payload(INTRADAY_15)
    del data["Meta Data"]["6. Time Zone"]
    bars = parse(json.dumps(data).encode(), interval="15m").bars
    assert bars["time"].iloc[-1] == pd.Timestamp("2018-04-11 19:15", tz="UTC")


def test_fx_series_has_no_volume() -> None:
    bars = parse_fixture(FX, "EURUSD=X").bars
    assert len(bars) == 101
    assert bars["volume"].isna().all()
    assert bars["close"].iloc[-1] == 1.1571
    assert bars["time"].iloc[-1] == pd.Timestamp("2018-08-22", tz="UTC")
    # Volume is one of the checked fields, so every FX bar is flagged as partly null.
    assert (bars[FLAG_MISSING] == 1.0).all()


def test_weekly_full_history() -> None:
    bars = parse_fixture(WEEKLY, interval="1wk").bars
    assert len(bars) == 1232
    # Keyed 1995-01-13, a Friday: stamped at the week's Monday, like Yahoo's weekly bars.
    assert bars["time"].iloc[0] == pd.Timestamp("1995-01-09", tz="UTC")
    assert bars["close"].iloc[0] == 62.75
    # The unfinished week is keyed by its latest trading day, 2018-08-13, itself a Monday.
    assert bars["time"].iloc[-1] == pd.Timestamp("2018-08-13", tz="UTC")
    assert bars["close"].iloc[-1] == 108.21
    assert bars["volume"].iloc[-1] == 18469724.0


def test_only_bars_inside_the_query_window_are_kept() -> None:
    bars = parse_fixture(DAILY, window=(date(2018, 8, 1), date(2018, 8, 10))).bars
    assert [t.date() for t in bars["time"]] == [date(2018, 8, d) for d in (1, 2, 3, 6, 7, 8, 9, 10)]

    intraday = parse_fixture(INTRADAY_15, interval="15m", window=(date(2018, 4, 11), date(2018, 4, 11))).bars
    assert len(intraday) == 25
    assert intraday["time"].iloc[0] == pd.Timestamp("2018-04-11 13:15", tz="UTC")


def test_a_series_with_no_rows_is_zero_bars_not_an_error() -> None:
    data = payload(DAILY)
    data["Time Series (Daily)"] = {}
    collected = parse(json.dumps(data).encode())
    assert collected.bars.empty
    assert list(collected.bars.columns)[: len(BAR_COLUMNS)] == list(BAR_COLUMNS)
    assert collected.actions.empty


def test_unparsable_values_are_flagged_as_missing() -> None:
    data = payload(DAILY)
    series = data["Time Series (Daily)"]
    series["2018-08-16"] = {"1. open": "", "2. high": "-", "3. low": "", "4. close": "", "5. volume": ""}
    series["2018-08-15"]["5. volume"] = "n/a"
    collected = parse(json.dumps(data).encode())
    assert len(collected.bars) == 100
    empty = collected.bars.iloc[-1]
    assert empty["time"] == pd.Timestamp("2018-08-16", tz="UTC")
    assert empty[["open", "high", "low", "close", "volume"]].isna().all()
    assert empty[FLAG_MISSING] == 1.0
    last = collected.bars.iloc[-2]
    assert last["time"] == pd.Timestamp("2018-08-15", tz="UTC")
    assert np.isnan(last["volume"])
    assert last[FLAG_MISSING] == 1.0


def test_series_key_variants_are_recognised() -> None:
    data = payload(DAILY_ADJUSTED)
    rows = data.pop("Time Series (Daily)")
    for key in ("Weekly Adjusted Time Series", "Monthly Adjusted Time Series"):
        # Daily rows under a weekly or monthly key: parsed as daily, or they would merge into months.
        collected = parse(json.dumps({**data, key: rows}).encode(), interval="1d")
        assert len(collected.bars) == 100
        assert collected.bars["adj_close"].iloc[0] == 90.524


def test_a_series_without_a_close_field_is_malformed() -> None:
    data = payload(DAILY)
    data["Time Series (Daily)"] = {"2018-08-16": {"1. open": "1.0", "2. price": "2.0"}}
    with pytest.raises(PermanentSourceError, match="no close field"):
        parse(json.dumps(data).encode())


def test_error_message_is_permanent_and_quotes_alpha_vantage() -> None:
    with pytest.raises(PermanentSourceError) as caught:
        parse_fixture("threefourteen_error_Error_Message_invalid_API_call_CMO.json")
    assert not isinstance(caught.value, TransientSourceError)
    assert "Invalid API call" in str(caught.value)


def test_note_about_call_frequency_is_a_rate_limit() -> None:
    with pytest.raises(RateLimitedError) as caught:
        parse_fixture("threefourteen_error_Note_rate_limit_5perMin_500perDay.json")
    assert caught.value.transient
    assert "throttled" in str(caught.value)
    assert "5 calls per minute and 500 calls per day" in str(caught.value)


def test_information_asking_for_higher_call_volume_is_a_rate_limit_not_premium() -> None:
    with pytest.raises(RateLimitedError) as caught:
        parse_fixture("threefourteen_error_Information_premium_higher_call_volume.json")
    assert "higher API call volume" in str(caught.value)


@pytest.mark.parametrize(
    "text",
    [
        "Burst pattern detected: please spread out your requests (max 5 requests PER MINUTE).",
        "We have detected your API key as ABC and our standard API rate limit is 5 calls per minute and "
        "25 calls per day.",
    ],
)
def test_current_throttling_texts_are_rate_limits(text: str) -> None:
    with pytest.raises(RateLimitedError):
        parse(json.dumps({"Information": text}).encode())


DAILY_QUOTA_TEXT = av_daily_quota_body(25)["Information"]


@pytest.mark.parametrize("key", ["Information", "Note"])
@pytest.mark.parametrize(
    "text",
    [
        DAILY_QUOTA_TEXT,  # the sandbox's, as Alpha Vantage words it
        "Thank you for using Alpha Vantage! Our standard API rate limit is 25 requests per day.",
        "You have reached the daily rate limit of this API key.",
    ],
)
def test_the_daily_quota_body_is_a_quota_not_a_rate_limit(key: str, text: str) -> None:
    with pytest.raises(QuotaExhaustedError) as caught:
        parse(json.dumps({key: text}).encode())
    assert not caught.value.transient and not isinstance(caught.value, TransientSourceError)
    assert f"Alpha Vantage said the daily quota is used up: {text}" in str(caught.value)


def test_the_daily_quota_body_stops_every_later_request_of_the_day(tmp_path: Path) -> None:
    """The sandbox answers 2 calls, then the quota body: the third symbol is tried once, not retried;
    the fourth is never sent, and neither is one from a new pacer (a new process) on the same state."""
    log = tmp_path / "requests.jsonl"
    server = start_sandbox(0, SandboxConfig(av_daily_quota=2, request_log=log, access_log=False))
    try:
        settings = SourceSettings(base_url=server.alpha_vantage_url, api_key=KEY, rate_limit=36000, timeout=5)
        source = AlphaVantage(settings, pacer_for("alpha_vantage", settings, str(tmp_path)))
        outcomes: dict[str, str] = {}
        for symbol in ("AAA", "BBB", "CCC", "DDD"):
            try:
                outcomes[symbol] = f"{len(source.collect(BarQuery(symbol, '1d', *WIDE)).bars)} bars"
            except QuotaExhaustedError as exc:
                outcomes[symbol] = str(exc)
        fresh = AlphaVantage(settings, pacer_for("alpha_vantage", settings, str(tmp_path)))
        with pytest.raises(QuotaExhaustedError, match="deferred until"):
            fresh.collect(BarQuery("EEE", "1d", *WIDE))
    finally:
        server.shutdown()
        server.server_close()
    assert outcomes["AAA"] == outcomes["BBB"] == "100 bars"
    assert "Alpha Vantage said the daily quota is used up" in outcomes["CCC"]
    assert "requests per day" in outcomes["CCC"] and "deferred until" in outcomes["CCC"]
    assert outcomes["DDD"] == outcomes["CCC"].replace("alpha_vantage CCC:", "alpha_vantage DDD:")
    sent = [(e["symbol"], bool(e.get("quota_exhausted"))) for e in read_request_log(log)]
    assert sent == [("AAA", False), ("BBB", False), ("CCC", True)]  # CCC once, not retried; none after it
    assert KEY not in (tmp_path / "alpha_vantage.json").read_text()


def test_information_about_a_premium_endpoint_is_permanent() -> None:
    text = "Thank you for using Alpha Vantage! This is a premium endpoint. Subscribe to unlock it."
    with pytest.raises(PermanentSourceError) as caught:
        parse(json.dumps({"Information": text}).encode())
    assert not isinstance(caught.value, TransientSourceError)
    assert "premium endpoint" in str(caught.value)
    assert "Subscribe to unlock it" in str(caught.value)


def test_other_information_is_permanent() -> None:
    text = "The **demo** API key is for demo purposes only."
    with pytest.raises(PermanentSourceError, match="demo purposes") as caught:
        parse(json.dumps({"Information": text}).encode())
    assert not isinstance(caught.value, TransientSourceError)


def test_http_429_is_a_rate_limit_with_retry_after() -> None:
    with pytest.raises(RateLimitedError) as caught:
        parse(b"Too Many Requests", status=429, headers={"Retry-After": "30"})
    assert caught.value.retry_after == 30.0


@pytest.mark.parametrize("status", [500, 502, 503])
def test_server_errors_are_transient(status: int) -> None:
    with pytest.raises(TransientSourceError) as caught:
        parse(body(DAILY), status=status)
    assert not isinstance(caught.value, RateLimitedError)
    assert f"HTTP {status}" in str(caught.value)


def test_non_json_body_is_transient() -> None:
    html = b"<html><body>Service temporarily unavailable</body></html>"
    with pytest.raises(TransientSourceError, match="non-JSON"):
        parse(html, headers={"Content-Type": "text/html"})


def test_a_json_array_is_not_a_time_series() -> None:
    with pytest.raises(PermanentSourceError, match="not a time-series response"):
        parse(b"[1, 2, 3]")


def test_global_quote_is_not_a_time_series() -> None:
    with pytest.raises(PermanentSourceError) as caught:
        parse_fixture("romeltorres_GLOBAL_QUOTE.json")
    assert "not a time-series response" in str(caught.value)
    assert "'Global Quote'" in str(caught.value)


def test_technical_indicator_body_is_not_a_time_series() -> None:
    with pytest.raises(PermanentSourceError, match="Technical Analysis: RSI"):
        parse_fixture(RSI_WEEKLY)


def test_bom_body_decodes_but_plain_body_does_too() -> None:
    assert body(DAILY).startswith(b"\xef\xbb\xbf")
    assert not body(INTRADAY_1).startswith(b"\xef\xbb\xbf")
    assert len(parse_fixture(DAILY).bars) == len(parse_fixture(INTRADAY_1, interval="1m").bars) == 100


# --- requests -----------------------------------------------------------------------------------


def params_of(request: httpx.Request) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(request.url.query.decode()).items()}


def test_intraday_requests_one_month_each() -> None:
    requests = AlphaVantage(SETTINGS).build_requests(BarQuery("MSFT", "5m", date(2024, 1, 15), date(2024, 3, 2)))
    assert len(requests) == 3
    params = [params_of(r) for r in requests]
    assert [p["month"] for p in params] == ["2024-01", "2024-02", "2024-03"]
    for p in params:
        assert p["function"] == "TIME_SERIES_INTRADAY"
        assert p["interval"] == "5min"
        assert p["outputsize"] == "full"
        assert p["symbol"] == "MSFT"
        assert p["datatype"] == "json"
        assert p["apikey"] == KEY
        assert p["adjusted"] == "false"
    assert all(r.method == "GET" and str(r.url).startswith("http://127.0.0.1:9/query?") for r in requests)


def test_months_touched_crosses_years_and_handles_empty_ranges() -> None:
    assert months_touched(date(2023, 11, 30), date(2024, 2, 1)) == ["2023-11", "2023-12", "2024-01", "2024-02"]
    assert months_touched(date(2024, 5, 3), date(2024, 5, 3)) == ["2024-05"]
    assert months_touched(date(2024, 5, 3), date(2024, 4, 3)) == []


@pytest.mark.parametrize(
    ("interval", "expected"),
    [("1m", "1min"), ("5m", "5min"), ("15m", "15min"), ("30m", "30min"), ("60m", "60min"), ("1h", "60min")],
)
def test_intraday_interval_names(interval: str, expected: str) -> None:
    (request,) = AlphaVantage(SETTINGS).build_requests(BarQuery("MSFT", interval, date(2024, 1, 2), date(2024, 1, 3)))
    assert params_of(request)["interval"] == expected


@pytest.mark.parametrize(
    ("interval", "adjusted", "function"),
    [
        ("1d", False, "TIME_SERIES_DAILY"),
        ("1d", True, "TIME_SERIES_DAILY_ADJUSTED"),
        ("1wk", False, "TIME_SERIES_WEEKLY"),
        ("1wk", True, "TIME_SERIES_WEEKLY_ADJUSTED"),
        ("1mo", False, "TIME_SERIES_MONTHLY"),
        ("1mo", True, "TIME_SERIES_MONTHLY_ADJUSTED"),
    ],
)
def test_periodic_functions(interval: str, adjusted: bool, function: str) -> None:
    settings = SETTINGS.model_copy(update={"adjusted": adjusted, "outputsize": "full"})
    requests = AlphaVantage(settings).build_requests(BarQuery("MSFT", interval, date(2000, 1, 1), date(2024, 1, 1)))
    assert len(requests) == 1
    params = params_of(requests[0])
    assert params == {
        "function": function,
        "symbol": "MSFT",
        "datatype": "json",
        "outputsize": "full",
        "apikey": KEY,
    }


def test_intraday_adjusted_follows_the_setting() -> None:
    settings = SETTINGS.model_copy(update={"adjusted": True})
    (request,) = AlphaVantage(settings).build_requests(BarQuery("MSFT", "1m", date(2024, 1, 2), date(2024, 1, 2)))
    assert params_of(request)["adjusted"] == "true"


def test_outputsize_defaults_to_compact() -> None:
    (request,) = AlphaVantage(SETTINGS).build_requests(BarQuery("MSFT", "1d", date(2024, 1, 2), date(2024, 1, 2)))
    assert params_of(request)["outputsize"] == "compact"


@pytest.mark.parametrize("interval", ["2m", "90m", "5d", "3mo"])
def test_unsupported_intervals_are_not_served(interval: str) -> None:
    with pytest.raises(RangeNotServedError) as caught:
        AlphaVantage(SETTINGS).build_requests(BarQuery("MSFT", interval, date(2024, 1, 2), date(2024, 1, 2)))
    message = str(caught.value)
    assert repr(interval) in message
    assert "1m, 5m, 15m, 30m, 60m, 1h" in message
    assert "1d" in message
    assert "1wk" in message
    assert "1mo" in message


@pytest.mark.parametrize("api_key", [None, "", "   "])
def test_missing_api_key_is_a_config_error(api_key: str | None) -> None:
    settings = SETTINGS.model_copy(update={"api_key": None if api_key is None else SecretStr(api_key)})
    with pytest.raises(ConfigError) as caught:
        AlphaVantage(settings).build_requests(BarQuery("MSFT", "1d", date(2024, 1, 2), date(2024, 1, 2)))
    assert "ALPHA_VANTAGE_API_KEY" in str(caught.value)
    assert "data_sources.alpha_vantage.api_key_block" in str(caught.value)


def test_unresolved_credentials_block_is_named() -> None:
    settings = SETTINGS.model_copy(update={"api_key": None, "api_key_block": "av-prod"})
    with pytest.raises(ConfigError, match="'av-prod'"):
        AlphaVantage(settings).build_requests(BarQuery("MSFT", "1d", date(2024, 1, 2), date(2024, 1, 2)))


# --- the key never leaks ------------------------------------------------------------------------


def test_key_is_in_the_request_url_and_redacted_for_display() -> None:
    (request,) = AlphaVantage(SETTINGS).build_requests(BarQuery("MSFT", "1d", date(2024, 1, 2), date(2024, 1, 2)))
    assert f"apikey={KEY}" in str(request.url)
    assert KEY not in redact_url(str(request.url))
    assert KEY not in repr(AlphaVantage(SETTINGS).settings)


def raised(content: bytes, status: int = 200, interval: str = "1d") -> SourceError:
    with pytest.raises(SourceError) as caught:
        parse(content, interval=interval, status=status)
    return caught.value


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_key_never_appears_in_fixture_errors(name: str) -> None:
    error = raised(body(name))
    assert KEY not in str(error)
    assert KEY not in repr(error)
    assert KEY not in error.message


def test_key_never_appears_in_other_errors() -> None:
    errors: list[Exception] = [
        raised(b"<html>oops</html>"),
        raised(b"", status=429),
        raised(b"", status=503),
        raised(json.dumps({"Error Message": f"Invalid API call for apikey={KEY}"}).encode()),
        raised(json.dumps({"Information": f"The key {KEY} has hit its rate limit"}).encode()),
        raised(json.dumps({"Information": f"{KEY}: premium endpoint"}).encode()),
        raised(json.dumps({"Note": f"{KEY} ???"}).encode()),
        raised(json.dumps({"Whatever": KEY}).encode()),
    ]
    with pytest.raises(RangeNotServedError) as caught:
        AlphaVantage(SETTINGS).build_requests(BarQuery("MSFT", "2m", date(2024, 1, 2), date(2024, 1, 2)))
    errors.append(caught.value)
    for error in errors:
        assert KEY not in str(error), error
        assert KEY not in repr(error), error
    assert "***" in str(errors[3])


# --- technical indicators -----------------------------------------------------------------------


def test_parse_technical_weekly_rsi() -> None:
    frame = parse_technical(payload(RSI_WEEKLY))
    assert list(frame.columns) == ["time", "rsi"]
    assert len(frame) == 1224
    assert str(frame["time"].dtype) == "datetime64[ns, UTC]"
    assert frame["rsi"].dtype == np.float64
    assert frame["time"].is_monotonic_increasing
    assert frame["time"].iloc[0] == pd.Timestamp("1995-03-20", tz="UTC")  # keyed 1995-03-24, that week's Friday
    assert frame["rsi"].iloc[0] == 75.0
    assert frame["time"].iloc[-1] == pd.Timestamp("2018-08-27", tz="UTC")
    assert frame["rsi"].iloc[-1] == 73.2229


def test_parse_technical_weekly_sma_normalises_the_live_key() -> None:
    frame = parse_technical(payload(SMA_WEEKLY))
    assert list(frame.columns) == ["time", "sma"]
    assert len(frame) == 1225
    # The newest key is "2018-08-31 12:38:59", a week still in progress: stamped at its Monday like the others.
    assert frame["time"].iloc[-1] == pd.Timestamp("2018-08-27", tz="UTC")
    assert frame["sma"].iloc[-1] == 105.2775
    assert frame["time"].iloc[0] == pd.Timestamp("1995-03-13", tz="UTC")
    assert frame["sma"].iloc[0] == 62.114


def test_parse_technical_intraday_is_stamped_like_the_bars() -> None:
    frame = parse_technical(payload(SMA_15))
    assert len(frame) == 237
    # "2017-12-20 14:00" EST labels the bar 13:45-14:00 EST, which starts 18:45 UTC.
    assert frame["time"].iloc[-1] == pd.Timestamp("2017-12-20 18:45", tz="UTC")
    assert frame["sma"].iloc[-1] == 85.244
    assert frame["time"].iloc[0] == pd.Timestamp("2017-12-07 17:45", tz="UTC")
    assert frame["sma"].iloc[0] == 82.4258


def test_av_weekly_sma_matches_the_weekly_series_it_was_computed_from() -> None:
    """AV's SMA(10) of weekly opens lines up, week for week, with a rolling mean of our parsed bars.

    The series was captured on Monday 2018-08-13 (that week keyed "2018-08-13"), the SMA later (the
    same week keyed "2018-08-17"): stamped by week, the two keys are one week, and its open agrees.
    """
    bars = parse_fixture(WEEKLY, interval="1wk").bars.set_index("time")
    ours = bars["open"].rolling(10).mean().rename("ours")
    theirs = parse_technical(payload(SMA_WEEKLY)).set_index("time")["sma"]
    joined = theirs.to_frame().join(ours, how="inner")
    assert len(joined) == 1223  # every week of the series from the 10th on
    assert joined.index[-1] == pd.Timestamp("2018-08-13", tz="UTC")
    assert joined["ours"].notna().all()
    np.testing.assert_allclose(joined["sma"], joined["ours"], atol=5e-5, rtol=0)


def test_parse_technical_multi_field_names() -> None:
    data = {
        "Meta Data": {"1: Symbol": "IBM", "4: Interval": "daily", "7: Time Zone": "US/Eastern Time"},
        "Technical Analysis: BBANDS": {
            "2024-01-03": {"Real Upper Band": "3.0", "Real Middle Band": "2.0", "Real Lower Band": "1.0"},
            "2024-01-02": {"Real Upper Band": "2.5", "Real Middle Band": "1.5", "Real Lower Band": "0.5"},
        },
    }
    frame = parse_technical(data)
    assert list(frame.columns) == ["time", "real_upper_band", "real_middle_band", "real_lower_band"]
    assert list(frame["time"]) == [pd.Timestamp("2024-01-02", tz="UTC"), pd.Timestamp("2024-01-03", tz="UTC")]
    assert list(frame["real_lower_band"]) == [0.5, 1.0]


def test_parse_technical_refuses_a_time_series() -> None:
    with pytest.raises(ValueError, match="not a technical-indicator response"):
        parse_technical(payload(DAILY))


# --- wiring -------------------------------------------------------------------------------------


def test_source_is_discoverable_by_its_config_key() -> None:
    assert SOURCE is AlphaVantage
    assert AlphaVantage.name == "alpha_vantage"
    source = load_source("alpha_vantage", SETTINGS)
    assert isinstance(source, AlphaVantage)


# --- weekly and monthly periods -----------------------------------------------------------------


def test_an_unfinished_week_and_its_final_bar_get_one_stamp() -> None:
    """The weekly series (captured Monday 2018-08-13) keys that week "2018-08-13"; AV's SMA, taken later,
    keys the same week "2018-08-17". Both are stamped at the week's Monday, so the final bar overwrites."""
    partial = parse_fixture(WEEKLY, interval="1wk").bars["time"].iloc[-1]
    final_key = pd.Index(["2018-08-17"])
    assert partial == stamp_keys(final_key, "1wk", EASTERN)[0] == pd.Timestamp("2018-08-13", tz="UTC")


@pytest.mark.parametrize(
    ("interval", "keys", "stamp"),
    [
        ("1wk", ["2018-08-13", "2018-08-15", "2018-08-17"], "2018-08-13"),  # Mon, Wed (live), Fri (final)
        ("1wk", ["2018-03-29"], "2018-03-26"),  # Good Friday: the week ends on Thursday
        ("1mo", ["2018-08-01", "2018-08-20", "2018-08-31 16:00:01"], "2018-08-01"),
        ("1d", ["2018-08-17"], "2018-08-17"),
    ],
)
def test_periods_are_stamped_at_their_first_day(interval: str, keys: list[str], stamp: str) -> None:
    assert set(stamp_keys(pd.Index(keys), interval, EASTERN)) == {pd.Timestamp(stamp, tz="UTC")}


def test_a_period_keyed_twice_in_one_body_keeps_the_latest_key() -> None:
    fields = {"1. open": "1", "2. high": "3", "3. low": "1", "4. close": "2", "5. volume": "10"}
    later = {**fields, "4. close": "2.5", "5. volume": "30"}
    body_ = {"Meta Data": {}, "Weekly Time Series": {"2018-08-17": later, "2018-08-15": fields}}
    bars = parse(json.dumps(body_).encode(), interval="1wk").bars
    assert list(bars["time"]) == [pd.Timestamp("2018-08-13", tz="UTC")]
    assert (bars["close"].iloc[0], bars["volume"].iloc[0]) == (2.5, 30.0)


def test_a_url_printed_in_an_error_keeps_no_password_and_no_key() -> None:
    printed = redact_url(f"https://user:{KEY}@prefect.example:4200/api?apikey={KEY}&function=X")
    assert KEY not in printed
    assert printed == "https://user:***@prefect.example:4200/api?apikey=***&function=X"
