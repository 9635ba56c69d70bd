"""`marketpipe status`: exit 0 when every part is healthy, 1 naming what is not; a table or JSON."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest

from tests.conftest import Sandbox, marketpipe
from tests.servers import free_port, influxdb_server

RECENT = ("--symbols", "AAPL,MSFT")  # incremental: the sandbox serves bars up to the last closed session


@pytest.fixture
def env(prefect_env: dict[str, str], sandbox: Sandbox) -> dict[str, str]:
    return {
        **prefect_env,
        "MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__BASE_URL": sandbox.base_url,
        "MARKETPIPE__COLLECTION__DEFAULT_HISTORY_DAYS": "30",
    }


def _status(env: dict[str, str], *args: str) -> tuple[int, dict[str, object], str]:
    shown = marketpipe("status", "--symbols", "AAPL,MSFT", *args, "--format", "json", env=env)
    return shown.returncode, json.loads(shown.stdout), shown.stderr


@pytest.mark.integration
def test_a_healthy_setup_exits_0_and_a_stale_symbol_exits_1_naming_it(env: dict[str, str], tmp_path: Path) -> None:
    run = marketpipe("run", *RECENT, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    code, found, _ = _status(env)
    assert code == 0, found
    assert found["healthy"] is True
    checks = {c["name"]: c for c in found["checks"]}  # type: ignore[attr-defined]
    assert checks["store (duckdb)"]["healthy"] and checks["spool"]["healthy"]
    assert checks["prefect api"]["detail"] == f"{env['PREFECT_API_URL']} answers"
    rows = {r["symbol"]: r for r in found["symbols"]}  # type: ignore[attr-defined]
    assert {r["freshness"] for r in rows.values()} == {"fresh"}
    assert all(r["last_run"].startswith("ok at ") for r in rows.values())

    # The table, for people: one line per check and per symbol.
    table = marketpipe("status", "--symbols", "AAPL,MSFT", env=env)
    assert table.returncode == 0 and "fresh" in table.stdout and table.stdout.rstrip().endswith("healthy")

    # AAPL stops a month back: its latest due session is missing.
    stale = {**env, "MARKETPIPE__STORAGE__DUCKDB__PATH": str(tmp_path / "stale.duckdb")}
    month_ago = (datetime.now(UTC) - timedelta(days=30)).date()
    old = ("--start", str(month_ago - timedelta(days=20)), "--end", str(month_ago))
    assert marketpipe("run", "--symbols", "AAPL", *old, env=stale).returncode == 0
    assert marketpipe("run", "--symbols", "MSFT", env=stale).returncode == 0
    code, found, stderr = _status(stale)
    assert code == 1
    assert stderr.strip() == "error: unhealthy: AAPL"
    rows = {r["symbol"]: r for r in found["symbols"]}  # type: ignore[attr-defined]
    assert (rows["AAPL"]["freshness"], rows["MSFT"]["freshness"]) == ("stale", "fresh")
    assert date.fromisoformat(rows["AAPL"]["last_bar"][:10]) <= month_ago
    assert "marketpipe run --symbols AAPL" in rows["AAPL"]["detail"]


@pytest.mark.integration
def test_influxd_stopped_makes_the_store_unhealthy(env: dict[str, str], tmp_path: Path) -> None:
    with influxdb_server(tmp_path / "influxd") as url:
        influx = {
            **env,
            "MARKETPIPE__STORAGE__BACKEND": "influxdb_v1",
            "MARKETPIPE__STORAGE__INFLUXDB_V1__URL": url,
        }
        assert marketpipe("run", *RECENT, env=influx).returncode == 0
        assert _status(influx)[0] == 0
    code, found, stderr = _status(influx)  # influxd stopped with the context
    assert code == 1
    assert stderr.startswith("error: unhealthy: store (influxdb_v1)")
    (store,) = [c for c in found["checks"] if c["name"] == "store (influxdb_v1)"]  # type: ignore[attr-defined]
    assert not store["healthy"] and url in store["detail"]
    assert {r["freshness"] for r in found["symbols"]} == {"unknown"}  # type: ignore[attr-defined]


@pytest.mark.integration
def test_a_prefect_api_that_does_not_answer_is_unhealthy(env: dict[str, str]) -> None:
    assert marketpipe("run", *RECENT, env=env).returncode == 0
    down = f"http://127.0.0.1:{free_port()}/api"
    code, found, stderr = _status({**env, "PREFECT_API_URL": down})
    assert code == 1 and "prefect api" in stderr
    (api,) = [c for c in found["checks"] if c["name"] == "prefect api"]  # type: ignore[attr-defined]
    assert not api["healthy"] and down in api["detail"]


def test_a_bad_symbol_is_a_usage_error() -> None:
    shown = marketpipe("status", "--symbols", "NOT A SYMBOL", env={"PATH": "/usr/bin"})
    assert shown.returncode == 2
    assert "NOT A SYMBOL" in shown.stderr
