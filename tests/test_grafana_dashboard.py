"""The chart's Grafana dashboard: every query it sends, variables and macros filled in as Grafana
fills them, runs on the real influxd after a real run, and each returns the columns it charts."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest

from tests.conftest import Sandbox, marketpipe
from tests.grafana import Target, dashboard, influxql, interpolate, panels, targets, variable_queries
from tests.test_quality_report import CALENDARS

SYMBOLS = ["AAPL", "BTC-USD", "EURUSD=X", "QQQ"]  # real 2020 Yahoo payloads: a split, nulls, FX, dividends
START = datetime(2020, 1, 1, tzinfo=UTC)


@pytest.mark.unit
def test_every_panel_reads_the_chosen_data_source_and_series() -> None:
    board = dashboard()
    names = [v["name"] for v in board["templating"]["list"]]
    assert names == ["datasource", "source", "bar_interval", "symbol"]  # `interval` is Grafana's own
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    assert {p["title"] for p in panels()} >= {"Price", "RSI 14", "MACD 12/26/9", "Run outcomes", "Spool"}
    for panel in panels():
        assert panel["datasource"] == {"type": "influxdb", "uid": "${datasource}"}, panel["title"]
        assert all(t["datasource"] == panel["datasource"] and t["rawQuery"] for t in panel["targets"])
        box = panel["gridPos"]
        assert box["x"] + box["w"] <= 24, panel["title"]
    for target in targets():
        assert "$timeFilter" in target.query, target.panel
        table = re.search(r'FROM "(\w+)"', target.query)
        assert table is not None and table.group(1) in {"bars", "pipeline_metrics"}, target.panel
        assert "\"interval\" = '$bar_interval' AND \"source\" = '$source'" in target.query, target.panel
        assert (table.group(1) == "bars") == ("\"symbol\" = '$symbol'" in target.query), target.panel


def _frame(series: list[dict[str, object]]) -> pd.DataFrame:
    frames = [pd.DataFrame(s["values"], columns=s["columns"]) for s in series]  # type: ignore[call-overload]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


@pytest.mark.integration
def test_every_query_of_the_dashboard_runs_on_influxd_after_a_real_run(
    replay_sandbox: Sandbox, influxdb_url: str, tmp_path: str
) -> None:
    database = f"grafana_{uuid.uuid4().hex[:12]}"
    env = {
        "PREFECT_HOME": f"{tmp_path}/prefect",
        "MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__BASE_URL": replay_sandbox.base_url,
        "MARKETPIPE__STORAGE__BACKEND": "influxdb_v1",
        "MARKETPIPE__STORAGE__INFLUXDB_V1__URL": influxdb_url,
        "MARKETPIPE__STORAGE__INFLUXDB_V1__DATABASE": database,
        "MARKETPIPE__STORAGE__SPOOL_DIR": f"{tmp_path}/spool",
        "MARKETPIPE__QUALITY__CALENDARS": CALENDARS,
    }
    run = marketpipe("run", "--symbols", ",".join(SYMBOLS), "--start", "2020-01-01", "--end", "2020-12-31", env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    end = datetime.now(UTC) + timedelta(minutes=5)  # the run's pipeline_metrics are stamped at its start

    # The variables' own queries offer what was stored.
    offered = {"source": "yahoo_finance", "bar_interval": "1d"}
    for name, query in variable_queries().items():
        values = _frame(influxql(influxdb_url, database, interpolate(query, offered, START, end, "1d")))["value"]
        expected = set(SYMBOLS) if name == "symbol" else {offered[name]}
        assert set(values) == expected, name

    # Each target, for each symbol: no error, and every column it selects holds data for some symbol.
    charted: dict[Target, set[str]] = {}
    for symbol in SYMBOLS:
        variables = {**offered, "symbol": symbol}
        for target in targets():
            query = interpolate(target.query, variables, START, end, "1d")
            frame = _frame(influxql(influxdb_url, database, query))
            assert frame.empty or frame.columns[0] == "time", target.panel
            charted.setdefault(target, set()).update(c for c in frame.columns if frame[c].notna().any())
            if symbol == "AAPL" and target.panel != "Flagged bars":  # flags depend on the data
                assert len(frame) > 0, f"{target.panel} ({target.ref}) returned nothing: {query}"
    for target, columns in charted.items():
        selected = re.findall(r'(?:\(|SELECT |, )"(\w+)"(?:\) AS "([\w ]+)")?', target.query.split(" FROM ")[0])
        wanted = {alias or field for field, alias in selected}
        assert wanted and wanted <= columns, f"{target.panel}: {wanted - columns} never had a value"
    assert len(charted) == len(targets()) >= 15
