"""`marketpipe` end to end: real processes, the sandbox, a real Prefect server and DuckDB."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import talib

from blocks.duckdb_store import DuckDBStore
from tests.conftest import REPLAY_FILES, REPO, Sandbox, marketpipe, query_csv, yahoo_json


@pytest.fixture
def env(prefect_env: dict[str, str], sandbox: Sandbox) -> dict[str, str]:
    return {**prefect_env, "MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__BASE_URL": sandbox.base_url}


def test_running_twice_leaves_exactly_the_same_rows(env: dict[str, str]) -> None:
    args = ("run", "--symbols", "AAPL,MSFT", "--start", "2023-01-01", "--end", "2024-12-31")
    first = marketpipe(*args, env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "AAPL" in first.stdout
    assert "ok" in first.stdout
    before = {s: query_csv(env, s) for s in ("AAPL", "MSFT")}
    second = marketpipe(*args, env=env)
    assert second.returncode == 0, second.stdout + second.stderr
    for symbol, rows in before.items():
        after = query_csv(env, symbol)
        assert len(after) == len(rows) == 522  # weekdays in 2023-2024
        assert after["time"].is_unique
        pd.testing.assert_frame_equal(after, rows)


def test_query_prints_every_stored_column_oldest_first(env: dict[str, str]) -> None:
    assert (
        marketpipe("run", "--symbols", "BTC-USD", "--start", "2024-01-01", "--end", "2024-03-29", env=env).returncode
        == 0
    )
    rows = query_csv(env, "BTC-USD", "--start", "2024-02-01", "--end", "2024-02-29")
    assert list(rows.columns[:10]) == [
        "time", "symbol", "interval", "source", "open", "high", "low", "close", "adj_close", "volume",
    ]  # fmt: skip
    assert {"sma_20", "rsi_14", "macd_signal_12_26_9", "bb_upper_20_2", "atr_14", "obv"} <= set(rows.columns)
    assert rows["time"].iloc[0] == "2024-02-01T00:00:00Z"
    assert rows["time"].iloc[-1] == "2024-02-29T00:00:00Z"
    assert rows["time"].is_monotonic_increasing

    as_json = json.loads(marketpipe("query", "--symbol", "BTC-USD", "--format", "json", env=env).stdout)
    assert as_json[0]["time"] == "2024-01-01T00:00:00Z"
    assert as_json[0]["sma_20"] is None
    table = marketpipe("query", "--symbol", "BTC-USD", "--start", "2024-03-01", env=env)
    assert table.returncode == 0
    assert "21 row(s)" in table.stdout


@pytest.fixture
def replay_env(prefect_env: dict[str, str], replay_sandbox: Sandbox) -> dict[str, str]:
    return {**prefect_env, "MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__BASE_URL": replay_sandbox.base_url}


def test_real_yahoo_responses_round_trip_through_run_and_query(replay_env: dict[str, str]) -> None:
    result = marketpipe(
        "run", "--symbols", "AAPL,BTC-USD,QQQ", "--start", "2020-01-01", "--end", "2020-12-31", env=replay_env
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for symbol in ("AAPL", "BTC-USD", "QQQ"):
        chart = yahoo_json(REPLAY_FILES[symbol])["chart"]["result"][0]
        payload = pd.DataFrame({"ts": chart["timestamp"], "close": chart["indicators"]["quote"][0]["close"]}).dropna()
        zone = chart["meta"]["exchangeTimezoneName"]
        payload["date"] = pd.to_datetime(payload["ts"], unit="s", utc=True).dt.tz_convert(zone).dt.strftime("%Y-%m-%d")
        payload = payload[payload["date"] <= "2020-12-31"]

        rows = query_csv(replay_env, symbol)
        assert rows["time"].is_unique, "one row per trading date"
        assert list(rows["time"].str[:10]) == list(payload["date"])
        np.testing.assert_allclose(rows["close"], payload["close"].astype(float), rtol=1e-9, atol=0)

        closes = rows["close"].to_numpy()
        macd, _, _ = talib.MACD(closes, 12, 26, 9)
        for column, expected, warmup in (
            ("rsi_14", talib.RSI(closes, 14), 14),
            ("sma_20", talib.SMA(closes, 20), 19),
            ("macd_12_26_9", macd, 33),
        ):
            assert rows[column].iloc[:warmup].isna().all(), f"{symbol} {column} warm-up must be empty"
            np.testing.assert_allclose(rows[column].iloc[warmup:], expected[warmup:], rtol=1e-6, atol=0)


def test_splits_and_dividends_are_stored_as_corporate_actions(replay_env: dict[str, str]) -> None:
    result = marketpipe("run", "--symbols", "AAPL", "--start", "2020-01-01", "--end", "2020-12-31", env=replay_env)
    assert result.returncode == 0, result.stdout + result.stderr
    actions = DuckDBStore(path=replay_env["MARKETPIPE__STORAGE__DUCKDB__PATH"]).read_corporate_actions("AAPL")
    events = yahoo_json(REPLAY_FILES["AAPL"])["chart"]["result"][0]["events"]
    assert len(actions) == len(events["dividends"]) + len(events["splits"]) == 5
    assert actions.loc[actions["kind"] == "split", "ratio"].tolist() == [4.0]
    assert sorted(actions.loc[actions["kind"] == "dividend", "amount"]) == sorted(
        d["amount"] for d in events["dividends"].values()
    )


def test_data_quality_shows_in_the_summary_and_bad_bars_wait_in_quarantine(replay_env: dict[str, str]) -> None:
    symbols = "AAPL,BTC-USD,EURUSD=X,OCDO.L"
    # With no tolerance for bent OHLC (the default repairs these, see tests/test_run_quality.py).
    strict = {**replay_env, "MARKETPIPE__QUALITY__OHLC_TOLERANCE": "0"}
    result = marketpipe("run", "--symbols", symbols, "--start", "2020-01-01", "--end", "2020-12-31", env=strict)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if line.count("│") > 5}
    # Yahoo's own EURUSD=X 2020 bars: 13 closes outside their high-low range.
    assert "ohlc_inconsistent=13" in summary["EURUSD=X"]
    store = DuckDBStore(path=replay_env["MARKETPIPE__STORAGE__DUCKDB__PATH"])
    quarantined = store.read_quarantine("EURUSD=X")
    assert len(quarantined) == 13
    assert set(quarantined["rule"]) == {"ohlc_inconsistent"}
    assert not set(quarantined["time"]) & set(store.read_bars("EURUSD=X")["time"])
    shown = marketpipe("query", "--symbol", "EURUSD=X", "--quarantine", "--format", "csv", env=replay_env)
    assert shown.returncode == 0, shown.stderr
    rows = pd.read_csv(io.StringIO(shown.stdout))
    assert len(rows) == 13
    assert set(rows["reason"]) == {"low/high do not bracket open and close"}
    # BTC-USD's 4 null rows are dropped (quality.missing: drop) and so are missing sessions of 24/7 trading.
    assert "missing_dropped=4" in summary["BTC-USD"]
    assert "BTC-USD: 4 missing of" in result.stdout
    # Every 2020 NYSE session is in the AAPL payload.
    assert "AAPL: " not in result.stdout.replace("AAPL: 0", "")
    assert summary["AAPL"].split("│")[9].strip() == "0"
    # OCDO.L is quoted in pence and stored in pounds.
    raw = yahoo_json(REPLAY_FILES["OCDO.L"])["chart"]["result"][0]["indicators"]["quote"][0]["close"]
    stored = query_csv(replay_env, "OCDO.L")
    assert stored["close"].iloc[0] == pytest.approx(next(c for c in raw if c is not None) / 100, rel=1e-12)


def test_not_found_symbol_fails_alone_with_yahoos_message(replay_env: dict[str, str]) -> None:
    result = marketpipe("run", "--symbols", "AAPL,SI", "--start", "2020-01-01", "--end", "2020-12-31", env=replay_env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "No data found, symbol may be delisted" in result.stdout
    assert "SI failed" in result.stdout
    assert len(query_csv(replay_env, "AAPL")) == 253
    assert query_csv(replay_env, "SI").empty


def test_invalid_symbol_is_refused_before_any_request(env: dict[str, str], sandbox: Sandbox) -> None:
    result = marketpipe("run", "--symbols", "AAPL,AAPL;DROP", env=env)
    assert result.returncode == 2
    assert "invalid symbol 'AAPL;DROP'" in result.stderr
    assert sandbox.requests() == []


def test_invalid_config_exits_2_naming_the_key(env: dict[str, str], sandbox: Sandbox, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        (REPO / "configs" / "development.yaml").read_text().replace("timeout: 30          # seconds", "timeout: never")
    )
    result = marketpipe("run", "--symbols", "AAPL", "--config", str(bad), env=env)
    assert result.returncode == 2
    assert "data_sources.yahoo_finance.timeout" in result.stderr
    env_error = marketpipe("run", "--symbols", "AAPL", env={**env, "MARKETPIPE__STORAGE__BACKEND": "mongodb"})
    assert env_error.returncode == 2
    assert "storage.backend" in env_error.stderr
    # A source's own key, misspelt in a section the run does not use, is refused before anything
    # starts: on a new machine no local Prefect database is made first.
    home = tmp_path / "new-machine"
    bare = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    bare |= {"PREFECT_HOME": str(home), "MARKETPIPE__DATA_SOURCES__ALPHA_VANTAGE__OUTPUTSIZ": "full"}
    typo = marketpipe("run", "--symbols", "AAPL", env=bare)
    assert typo.returncode == 2
    assert "data_sources.alpha_vantage.outputsiz: unknown key" in typo.stderr
    assert "MARKETPIPE__DATA_SOURCES__ALPHA_VANTAGE__OUTPUTSIZ" in typo.stderr
    assert not list(home.rglob("*.db")), "a config error must come before the first run's database"
    assert sandbox.requests() == []


@pytest.mark.parametrize(
    "args",
    [
        ("run", "--symbols", "AAPL", "--start", "2024-13-01"),
        ("run", "--symbols", "AAPL", "--start", "2024-02-01", "--end", "2024-01-01"),
        ("run", "--symbols", "AAPL", "--interval", "7d"),
        ("run", "--symbols", "AAPL", "--source", "polygon"),
        ("run", "--bogus"),
        ("query", "--symbol", "AAPL", "--format", "xml"),
    ],
)
def test_usage_errors_exit_2(env: dict[str, str], args: tuple[str, ...]) -> None:
    result = marketpipe(*args, env=env)
    assert result.returncode == 2, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("source", "message"),
    [("alpha_vantage", "ALPHA_VANTAGE_API_KEY"), ("files", "data_sources.files.path")],
)
def test_a_source_that_cannot_work_as_configured_exits_2(
    env: dict[str, str], sandbox: Sandbox, tmp_path: Path, source: str, message: str
) -> None:
    bare = {k: v for k, v in env.items() if k != "ALPHA_VANTAGE_API_KEY"}
    bare["MARKETPIPE__DATA_SOURCES__FILES__PATH"] = str(tmp_path / "missing")
    result = marketpipe("run", "--source", source, "--symbols", "IBM", env=bare)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr


def test_a_quota_state_directory_others_can_write_exits_2(
    env: dict[str, str], sandbox: Sandbox, tmp_path: Path
) -> None:
    shared = tmp_path / "shared-rate-limits"
    shared.mkdir()
    shared.chmod(0o777)
    result = marketpipe("run", "--symbols", "AAPL", env={**env, "MARKETPIPE__COLLECTION__RATE_LIMIT_DIR": str(shared)})
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"pacing state directory {shared} is writable by its group and others" in result.stderr
    assert f"chmod 700 {shared}" in result.stderr
    assert sandbox.requests() == [] and list(shared.iterdir()) == []
