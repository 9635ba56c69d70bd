"""Alerts end to end: `marketpipe setup` makes the automations on a real Prefect server running its
services, the flows emit their events, and a loopback webhook receives exactly one alert per case."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx
import pytest
from prefect.automations import Automation
from prefect.events.actions import DoNothing
from prefect.events.schemas.automations import EventTrigger, Posture

from configs.settings import load_settings
from flows.market_data import SymbolsFailedError, market_data
from flows.monitor import monitor
from tasks.errors import InvalidSymbolError
from tasks.monitoring.automations import comparable
from tests.conftest import Sandbox, marketpipe
from tests.servers import prefect_server, serving_http

TOKEN = "s3cret-hook-token"  # in the channel's URL: it must reach nothing but the receiver


class Receiver:
    """A loopback webhook: keeps every JSON body POSTed to it."""

    def __init__(self) -> None:
        self.alerts: list[dict[str, Any]] = []
        self.urls: list[str] = []
        self.lock = threading.Lock()

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        body = request.rfile.read(int(request.headers.get("Content-Length") or 0))
        with self.lock:
            self.alerts.append(json.loads(body))
            self.urls.append(request.path)
        request.send_response(200)
        request.send_header("Content-Length", "0")
        request.end_headers()

    def wait_for(self, count: int, timeout: float = 120, quiet: float = 8) -> list[dict[str, Any]]:
        """The alerts once ``count`` have come and no more came for ``quiet`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(self.alerts) < count:
            time.sleep(0.2)
        time.sleep(quiet)  # a duplicate would come within this
        with self.lock:
            return list(self.alerts)

    def clear(self) -> None:
        with self.lock:
            self.alerts.clear()


@pytest.fixture(scope="module")
def alerting_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Prefect server running its services: the triggers and actions that turn events into alerts."""
    with prefect_server(tmp_path_factory.mktemp("prefect-alerts"), services=True) as url:
        yield url


@pytest.fixture(scope="module")
def receiver() -> Iterator[tuple[Receiver, str]]:
    hook = Receiver()
    with serving_http(hook.handle) as url:
        yield hook, url


@pytest.fixture
def alerting(
    alerting_api: str,
    receiver: tuple[Receiver, str],
    sandbox: Sandbox,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[Receiver, dict[str, str]]]:
    """Settings for a webhook channel, set up on the server, in this process and for `marketpipe`."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    hook, url = receiver
    values = {
        "PREFECT_API_URL": alerting_api,
        "PREFECT_HOME": str(tmp_path / "prefect-client"),
        "MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__BASE_URL": sandbox.base_url,
        "MARKETPIPE__STORAGE__DUCKDB__PATH": str(tmp_path / "store.duckdb"),
        "MARKETPIPE__STORAGE__SPOOL_DIR": str(tmp_path / "spool"),
        "MARKETPIPE__ALERTS__CHANNELS__HOOK__KIND": "webhook",
        "MARKETPIPE__ALERTS__CHANNELS__HOOK__URL": f"{url}/alerts?token={TOKEN}",
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    with temporary_settings({PREFECT_API_URL: alerting_api}):
        setup = marketpipe("setup", env=dict(os.environ))
        assert setup.returncode == 0, setup.stdout + setup.stderr
        assert TOKEN not in setup.stdout + setup.stderr
        hook.clear()
        yield hook, dict(os.environ)


@pytest.mark.integration
def test_a_second_setup_changes_no_block_or_automation(alerting: tuple[Receiver, dict[str, str]]) -> None:
    _, env = alerting
    again = marketpipe("setup", env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    alert_lines = [
        line for line in again.stdout.splitlines() if "marketpipe-alerts-hook" in line or "automation" in line
    ]
    assert len(alert_lines) == 5, again.stdout  # the channel's block and the four rules
    assert all(line.split()[0] == "unchanged" for line in alert_lines), again.stdout
    assert all(line.split()[0] == "unchanged" for line in again.stdout.splitlines() if line.strip()), again.stdout


@pytest.mark.integration
def test_a_failed_run_alerts_once(alerting: tuple[Receiver, dict[str, str]]) -> None:
    hook, _ = alerting
    state = market_data(["NOT A SYMBOL"], return_state=True)
    assert state.is_failed()
    assert isinstance(state.result(raise_on_failure=False), InvalidSymbolError)
    alerts = hook.wait_for(1)
    assert len(alerts) == 1, alerts
    (alert,) = alerts
    assert alert["title"].startswith("marketpipe error: flow run market-data/")
    assert "Failed" in alert["title"]
    assert "NOT A SYMBOL" in alert["text"] and "what to do: read the run's logs" in alert["text"]
    assert hook.urls[-1] == f"/alerts?token={TOKEN}"


@pytest.mark.integration
def test_a_spooled_symbol_alerts_once_naming_it_the_run_and_what_to_do(
    alerting: tuple[Receiver, dict[str, str]], influxdb_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """influxd answers reads but refuses writes as unavailable (a loopback proxy in front of it): the
    symbol's bars are spooled, and its run fails for it; the alert is the symbol's, not a second one
    for the run."""
    hook, _ = alerting
    with serving_http(_reads_only_proxy(influxdb_url)) as proxy:
        monkeypatch.setenv("MARKETPIPE__STORAGE__BACKEND", "influxdb_v1")
        monkeypatch.setenv("MARKETPIPE__STORAGE__INFLUXDB_V1__URL", proxy)
        monkeypatch.setenv("MARKETPIPE__STORAGE__INFLUXDB_V1__DATABASE", f"alerts_{os.getpid()}")
        state = market_data(["MSFT"], start=date(2024, 1, 2), end=date(2024, 1, 31), return_state=True)
    outcome = state.result(raise_on_failure=False)
    assert isinstance(outcome, SymbolsFailedError) and outcome.results[0].status == "spooled"
    alerts = hook.wait_for(1)
    assert len(alerts) == 1, alerts
    (alert,) = alerts
    assert alert["title"].startswith("marketpipe error: MSFT's bars were spooled in run market-data/")
    assert "symbol: MSFT" in alert["text"]
    assert "what to do: bring the store back, then `marketpipe replay`" in alert["text"]
    assert TOKEN not in json.dumps(alert["text"])


def _reads_only_proxy(influxdb: str) -> Any:
    def handle(request: BaseHTTPRequestHandler) -> None:
        if request.path.startswith("/write"):
            request.rfile.read(int(request.headers.get("Content-Length") or 0))
            request.send_response(503)
            request.send_header("Content-Length", "0")
            request.end_headers()
            return
        body = request.rfile.read(int(request.headers.get("Content-Length") or 0))
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("content-type", "authorization")}
        answer = httpx.request(request.command, influxdb + request.path, content=body, headers=headers, timeout=30)
        request.send_response(answer.status_code)
        request.send_header("Content-Type", answer.headers.get("content-type", "application/json"))
        request.send_header("Content-Length", str(len(answer.content)))
        request.end_headers()
        request.wfile.write(answer.content)

    return handle


@pytest.mark.integration
def test_a_missed_deadline_alerts_once_and_a_holiday_never(alerting: tuple[Receiver, dict[str, str]]) -> None:
    """Bars through Thursday 2024-03-28. Good Friday (the 29th) closes no session, so that evening
    nothing is due that is missing; on the Monday night the 1 April bar is due and missing."""
    hook, _ = alerting
    assert market_data(["AAPL"], start=date(2024, 3, 1), end=date(2024, 3, 28))[0]["status"] == "ok"
    holiday = monitor(["AAPL"], as_of=datetime(2024, 3, 29, 23, 30, tzinfo=UTC))
    weekend = monitor(["AAPL"], as_of=datetime(2024, 3, 31, 12, 0, tzinfo=UTC))
    assert (holiday["stale"], weekend["stale"]) == (0, 0)
    assert hook.wait_for(1, timeout=15, quiet=0) == []

    late = datetime(2024, 4, 1, 23, 30, tzinfo=UTC)  # the 1 April close (20:00 UTC) plus 2 h has passed
    assert monitor(["AAPL"], as_of=late) == {"symbols": 1, "stale": 1, "alerts_sent": 1}
    alerts = hook.wait_for(1)
    assert len(alerts) == 1, alerts
    (alert,) = alerts
    assert alert["title"] == "marketpipe warning: AAPL has no bar for the 2024-04-01 session, due 2h after its close"
    assert "last run: ok, started 20" in alert["text"]
    assert "calendar: XNYS" in alert["text"] and "marketpipe run --symbols AAPL" in alert["text"]
    # The next check finds the same breach: it is not told again.
    assert monitor(["AAPL"], as_of=late.replace(minute=45))["alerts_sent"] == 0
    assert len(hook.wait_for(2, timeout=10)) == 1


def test_the_spool_rule_alerts_past_its_threshold_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pandas as pd

    from blocks.spool import Spool
    from flows.monitor import spool_alerts

    monkeypatch.setenv("MARKETPIPE__STORAGE__SPOOL_DIR", str(tmp_path / "spool"))
    settings = load_settings()
    assert spool_alerts(settings, datetime.now(UTC)) == []
    batch = Spool(tmp_path / "spool").append("pipeline_metrics", pd.DataFrame({"x": [1.0]}))
    spooled = datetime.fromtimestamp(batch.path.stat().st_mtime, UTC)
    assert spool_alerts(settings, spooled + settings.alerts.rules.spool_stale.older_than) == []
    (alert,) = spool_alerts(settings, spooled + settings.alerts.rules.spool_stale.older_than * 2)
    assert alert.level == "warning" and alert.details["batches"] == "1"
    assert alert.key is not None and batch.path.name in alert.key


@pytest.mark.unit
def test_an_automation_whose_events_the_server_lists_in_another_order_is_unchanged() -> None:
    """A rule's events are a set; the server sends them back as a list in whatever order the setup
    that saved them iterated them, and a set built from it may iterate them the other way round
    (two names sharing a slot of the set's table go in insertion order). Such a pair, saved in
    either order, must compare equal, or every second setup "updates" the automation."""

    def saved(events: tuple[str, str]) -> Automation:
        trigger = EventTrigger(expect=set(events), posture=Posture.Reactive, threshold=1, within=0)
        return Automation(name="marketpipe: test", trigger=trigger, actions=[DoNothing()])

    names = [f"marketpipe.test.{i}" for i in range(200)]
    pairs = ((saved((a, b)), saved((b, a))) for a in names for b in names if a < b)
    one, other = next((x, y) for x, y in pairs if x.model_dump(mode="json") != y.model_dump(mode="json"))
    assert comparable(one) == comparable(other)
