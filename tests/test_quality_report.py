"""`marketpipe report`: the data-quality page over the demo's data and over real captured Yahoo
responses, rendered in real headless Chromium from its file with the network off."""

from __future__ import annotations

import re
from datetime import date
from pathlib import Path

import exchange_calendars as xc
import pandas as pd
import pytest

from blocks.duckdb_store import DuckDBStore
from configs.settings import load_settings
from flows.demo import END, START
from tasks.monitoring.quality import FLAG_COLUMNS, build_report, monthly_coverage
from tasks.monitoring.report_page import render_markdown, slug
from tests.browser import render
from tests.conftest import Sandbox, marketpipe

SECTIONS = ("coverage-heatmap", "missing-sessions", "bars-by-rule", "pipeline-health")
REAL = ["AAPL", "BTC-USD", "EURUSD=X", "OCDO.L", "QQQ"]  # 2020 from Yahoo: a split, nulls, London, dividends
CALENDARS = '{"OCDO.L": "XLON", "BTC-USD": "24/7"}'


def sections(dom: str) -> dict[str, str]:
    return dict(re.findall(r'<section id="([^"]+)">(.*?)</section>', dom, flags=re.S))


def _report(env: dict[str, str], out: Path, *args: str) -> None:
    done = marketpipe("report", "--out", str(out), *args, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith(f"wrote {out} (")


def _check_page(page: Path, symbols: list[str]) -> str:
    """The page renders offline: a non-blank screenshot, and a drawn chart in each chart's section."""
    text = page.read_text()
    assert not re.search(r"<script[^>]+src=|<link[^>]+href=[\"']?https?:", text), "the page must not load anything"
    rendered = render(page)
    assert rendered.distinct_colors() > 200
    found = sections(rendered.dom)
    for section in (*SECTIONS[:1], SECTIONS[2], *(f"price-{slug(s)}" for s in symbols)):
        assert 'class="main-svg"' in found[section], f"{section} has no drawn chart"
    return rendered.dom


@pytest.mark.integration
def test_the_report_over_the_demo_data_renders_offline(sandbox: Sandbox, tmp_path: Path) -> None:
    env = {
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__BASE_URL": sandbox.base_url,
        "MARKETPIPE__STORAGE__DUCKDB__PATH": str(tmp_path / "demo.duckdb"),
        "MARKETPIPE__STORAGE__SPOOL_DIR": str(tmp_path / "spool"),
    }
    symbols = ["AAPL", "MSFT", "EURUSD=X"]
    run = marketpipe("run", "--symbols", ",".join(symbols), "--start", START, "--end", END, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    page = tmp_path / "report.html"
    _report(env, page, "--symbols", ",".join(symbols))
    dom = _check_page(page, symbols)
    assert 'class="main-svg"' in sections(dom)["pipeline-health"]  # the run's metrics, per run
    assert "AAPL: none of 502 sessions (XNYS)" in dom  # 2023 and 2024 on the NYSE calendar


@pytest.mark.integration
def test_the_report_over_real_yahoo_payloads_marks_what_processing_found(
    replay_sandbox: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__BASE_URL": replay_sandbox.base_url,
        "MARKETPIPE__STORAGE__DUCKDB__PATH": str(tmp_path / "real.duckdb"),
        "MARKETPIPE__STORAGE__SPOOL_DIR": str(tmp_path / "spool"),
        "MARKETPIPE__QUALITY__CALENDARS": CALENDARS,
    }
    run = marketpipe("run", "--symbols", ",".join(REAL), "--start", "2020-01-01", "--end", "2020-12-31", env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    page = tmp_path / "report.html"
    _report(env, page, "--symbols", ",".join(REAL), "--start", "2020-01-01", "--end", "2020-12-31")
    dom = _check_page(page, REAL)
    # The range bounds the bars (2020); the runs that stored them ran today and are charted all the same.
    assert 'class="main-svg"' in sections(dom)["pipeline-health"]
    assert "none recorded" not in sections(dom).get("summary", dom.split("<section")[0])

    store = DuckDBStore(path=env["MARKETPIPE__STORAGE__DUCKDB__PATH"])
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    report = build_report(store, load_settings(), REAL, "yahoo_finance", "1d", date(2020, 1, 1), date(2020, 12, 31))
    marked = 0
    for quality in report.symbols:
        bars = store.read_bars(quality.symbol)
        assert len(quality.bars) == len(bars)
        # Every flagged bar and quarantined rule the store holds is a marker trace of the symbol's chart.
        price = sections(dom)[f"price-{slug(quality.symbol)}"]
        for column, (kind, name) in FLAG_COLUMNS.items():
            if column in bars and (bars[column] == 1).any():
                assert f"{kind}: {name}" in price, (quality.symbol, column)
                marked += 1
        for rule in store.read_quarantine(quality.symbol)["rule"].unique():
            assert f"quarantined: {rule}" in price
            marked += 1
    assert marked > 0, "the real 2020 payloads hold flagged or quarantined bars"
    # Expected sessions are the calendar's, from the first stored bar to the last.
    aapl = report.symbols[0]
    first, last = aapl.bars["time"].min(), aapl.bars["time"].max()
    nyse = xc.get_calendar("XNYS").sessions_in_range(first.tz_localize(None), last.tz_localize(None))
    assert aapl.expected == len(nyse) == 253
    summary = render_markdown(report)
    assert f"| AAPL | {len(aapl.bars)} | 253 |" in summary
    assert summary.count("\n| ") == len(REAL) + 1  # the header and one row per symbol


def test_monthly_coverage_counts_sessions_not_weekdays() -> None:
    """December 2024 on the NYSE: 22 weekdays, 21 sessions (Christmas); a bar on each session is full."""
    sessions = xc.get_calendar("XNYS").sessions_in_range("2024-12-01", "2024-12-31")
    times = pd.Series(pd.DatetimeIndex(sessions).tz_localize("UTC"))
    coverage = monthly_coverage(times, "XNYS")
    assert coverage.to_dict("records") == [{"month": "2024-12", "stored": 21, "expected": 21.0}]
    without_christmas_eve = times[times != pd.Timestamp("2024-12-24", tz="UTC")]
    assert monthly_coverage(without_christmas_eve, "XNYS")["stored"].tolist() == [20]


@pytest.mark.integration
def test_an_empty_store_is_a_usage_error(tmp_path: Path) -> None:
    env = {"PREFECT_HOME": str(tmp_path / "p"), "MARKETPIPE__STORAGE__DUCKDB__PATH": str(tmp_path / "empty.duckdb")}
    done = marketpipe("report", "--symbols", "AAPL", "--out", str(tmp_path / "r.html"), env=env)
    assert done.returncode == 2
    assert "no stored 1d yahoo_finance bars for AAPL" in done.stderr and "marketpipe run --symbols AAPL" in done.stderr
    assert not (tmp_path / "r.html").exists()
