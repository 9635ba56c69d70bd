from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from configs.settings import CONFIG_DIR, ConfigError, load_settings

pytestmark = pytest.mark.unit  # no server, no child process: `pytest -m unit`


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("MARKETPIPE") or name.startswith("INFLUXDB_") or name == "ALPHA_VANTAGE_API_KEY":
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_development_is_the_default_and_matches_the_seed_shape() -> None:
    settings = load_settings()
    assert settings.environment == "development"
    assert settings.storage.backend == "duckdb"
    yahoo = settings.source("yahoo_finance")
    assert yahoo.base_url.endswith("/v8/finance/chart/")
    assert yahoo.rate_limit > 0
    assert yahoo.timeout > 0
    assert "alpha_vantage" in settings.data_sources
    columns = [c for spec in settings.indicators for c in spec.columns]
    assert columns == [
        "sma_20", "ema_20", "rsi_14", "macd_12_26_9", "macd_signal_12_26_9", "macd_hist_12_26_9",
        "bb_lower_20_2", "bb_mid_20_2", "bb_upper_20_2", "atr_14", "obv",
    ]  # fmt: skip


def test_marketpipe_env_selects_the_environment_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MARKETPIPE_ENV", "production")
    settings = load_settings()
    assert settings.environment == "production"
    assert settings.storage.backend == "influxdb"


def test_unknown_environment_names_the_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MARKETPIPE_ENV", "staging")
    with pytest.raises(ConfigError, match="development, production"):
        load_settings()


def test_nested_env_overrides_any_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__BASE_URL", "http://127.0.0.1:1/chart/")
    monkeypatch.setenv("MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__RATE_LIMIT", "60")
    monkeypatch.setenv("MARKETPIPE__STORAGE__DUCKDB__PATH", "/tmp/x.duckdb")
    monkeypatch.setenv("MARKETPIPE__DEBUG", "false")
    settings = load_settings()
    yahoo = settings.source("yahoo_finance")
    assert yahoo.base_url == "http://127.0.0.1:1/chart/"
    assert yahoo.rate_limit == 60
    assert yahoo.timeout == 30  # untouched keys keep the file's value
    assert settings.storage.duckdb.path == "/tmp/x.duckdb"
    assert settings.debug is False


def test_seed_variable_names_still_work(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALPHA_VANTAGE_API_KEY", "av-secret")
    monkeypatch.setenv("INFLUXDB_URL", "http://influx:8086")
    monkeypatch.setenv("INFLUXDB_TOKEN", "influx-secret")
    monkeypatch.setenv("INFLUXDB_ORG", "acme")
    monkeypatch.setenv("INFLUXDB_BUCKET", "bars")
    settings = load_settings()
    influx = settings.storage.influxdb
    assert (influx.url, influx.org, influx.bucket) == ("http://influx:8086", "acme", "bars")
    assert influx.token is not None
    assert influx.token.get_secret_value() == "influx-secret"
    key = settings.source("alpha_vantage").api_key
    assert key is not None
    assert key.get_secret_value() == "av-secret"
    assert "secret" not in repr(settings)
    assert "secret" not in str(settings)


def test_prefixed_variable_beats_seed_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFLUXDB_URL", "http://seed:8086")
    monkeypatch.setenv("MARKETPIPE__STORAGE__INFLUXDB__URL", "http://prefixed:8086")
    assert load_settings().storage.influxdb.url == "http://prefixed:8086"


def test_config_file_option(tmp_path: Path) -> None:
    text = (CONFIG_DIR / "development.yaml").read_text().replace("environment: development", "environment: lab")
    assert load_settings(write(tmp_path, text)).environment == "lab"


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (("rate_limit: 2000", "rate_limit: lots"), "data_sources.yahoo_finance.rate_limit"),
        (("timeout: 30          # seconds", "timeout: -1"), "data_sources.yahoo_finance.timeout"),
        (("backend: duckdb", "backend: mongodb"), "storage.backend"),
        (("{kind: rsi, length: 14}", "{kind: rsi, length: 1}"), "indicators[2].length"),
        (
            ("{kind: obv}", "{kind: stoch_k}"),
            "indicators[6].kind: unknown kind 'stoch_k': did you mean stoch or stochrsi?",
        ),
        (("{kind: obv}", "{kind: pandas_ta, name: squeez}"), "indicators[6].name: pandas-ta has no indicator 'squeez'"),
        (("{kind: obv}", "{kind: ema, length: 20}"), "indicators[1] and indicators[6] both write column 'ema_20'"),
        (("debug: true", "debug: true\nsymbol: [AAPL]"), "symbol"),
    ],
)
def test_invalid_config_names_the_key(tmp_path: Path, edit: tuple[str, str], key: str) -> None:
    text = (CONFIG_DIR / "development.yaml").read_text()
    assert edit[0] in text
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, text.replace(*edit)))
    assert key in str(caught.value)


def test_invalid_env_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__TIMEOUT", "soon")
    with pytest.raises(ConfigError, match="MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__TIMEOUT"):
        load_settings()


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(write(tmp_path, "data_sources: [unclosed"))


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (("  files:\n    path: data/vendor", "  files:\n    paht: data/vendor"), "data_sources.files.paht"),
        (("    timeout: 30\n", "    timeout: 30\n    outputsiz: full\n"), "data_sources.alpha_vantage.outputsiz"),
        (("    rate_limit: 2000", "    rate_limit: 2000\n    adjusted: true"), "data_sources.yahoo_finance.adjusted"),
    ],
)
def test_a_key_its_source_does_not_declare_is_refused_before_a_run(
    tmp_path: Path, edit: tuple[str, str], key: str
) -> None:
    """A source's own keys are declared beside it; whichever source a run uses, every section is checked."""
    from tasks.sources.base import check_sources

    text = (CONFIG_DIR / "development.yaml").read_text()
    assert edit[0] in text
    path = write(tmp_path, text.replace(*edit))
    with pytest.raises(ConfigError) as caught:
        check_sources(load_settings(path))
    message = str(caught.value)
    env = "MARKETPIPE__" + key.replace(".", "__").upper()
    assert f"{key}: unknown key: remove it or fix its spelling [file {path} or env {env}]" in message, message


def test_a_sources_own_keys_reach_it_typed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks.sources.alpha_vantage import AlphaVantageSettings
    from tasks.sources.base import check_sources, load_source

    monkeypatch.setenv("MARKETPIPE__DATA_SOURCES__ALPHA_VANTAGE__OUTPUTSIZE", "full")
    settings = load_settings()
    check_sources(settings)
    source = load_source("alpha_vantage", settings.source("alpha_vantage"))
    assert isinstance(source.settings, AlphaVantageSettings)
    assert (source.settings.outputsize, source.settings.adjusted, source.settings.rate_limit) == ("full", False, 25)
    monkeypatch.setenv("MARKETPIPE__DATA_SOURCES__ALPHA_VANTAGE__OUTPUTSIZE", "most")
    with pytest.raises(ConfigError, match=r"data_sources\.alpha_vantage\.outputsize: Input should be 'compact' or"):
        load_source("alpha_vantage", load_settings().source("alpha_vantage"))


def test_unknown_source_says_how_to_add_it() -> None:
    with pytest.raises(ConfigError, match=r"data_sources\.polygon"):
        load_settings().source("polygon")


def test_a_calendar_override_is_checked_and_resolved_when_the_config_is_read(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("data_sources: {}\nquality:\n  calendars: {sap.de: xetr, spy: NYSE}\n")
    assert load_settings(str(good)).quality.calendars == {"SAP.DE": "XETR", "SPY": "XNYS"}
    bad = tmp_path / "bad.yaml"
    bad.write_text("data_sources: {}\nquality:\n  calendars: {SPY: NYSEE}\n")
    with pytest.raises(ConfigError, match=r"quality\.calendars.*NYSEE"):
        load_settings(str(bad))


@pytest.mark.parametrize("file", ["development.yaml", "production.yaml"])
def test_the_commented_alerts_example_is_a_valid_config(
    file: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = (CONFIG_DIR / file).read_text()
    example = text[text.index("# alerts:") :].split("\n\n")[0]
    uncommented = "\n".join(line[2:] for line in example.splitlines())
    config = tmp_path / "alerts.yaml"
    config.write_text(text + "\n" + uncommented + "\n")
    monkeypatch.setenv("MARKETPIPE__ALERTS__CHANNELS__OPS__URL", "https://hooks.example/T0/B0/secret")
    monkeypatch.setenv("MARKETPIPE__ALERTS__CHANNELS__PAGER__URL", "https://pager.example/hook")
    alerts = load_settings(config).alerts
    assert sorted(alerts.channels) == ["ops", "pager"]
    assert alerts.rules.freshness.deadline == timedelta(hours=2)
    assert alerts.rules.spool_stale.older_than == timedelta(hours=6)


def test_an_alert_rule_naming_an_unknown_channel_is_a_config_error_that_hides_the_urls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MARKETPIPE__ALERTS__CHANNELS__OPS__KIND", "webhook")
    monkeypatch.setenv("MARKETPIPE__ALERTS__CHANNELS__OPS__URL", "https://hooks.example/?token=s3cret")
    monkeypatch.setenv("MARKETPIPE__ALERTS__RULES__FRESHNESS__CHANNELS", '["opz"]')
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert "alerts.rules.freshness.channels names opz" in message and "(ops)" in message
    assert "s3cret" not in message
