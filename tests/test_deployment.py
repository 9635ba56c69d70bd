"""The deployments: prefect.yaml names real flows with valid parameters, and a real deploy -> worker ->
run cycle on a process work pool, including a retry of a failed run the way the UI does it."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.schedules import CronSchedule
from prefect.flows import Flow, load_flow_from_entrypoint
from prefect.states import AwaitingRetry

from blocks.duckdb_store import DuckDBStore
from blocks.spool import Spool
from tests.conftest import BIN, REPO, Sandbox, prefect, stop, wait_until_final
from tests.test_store_conformance import unavailable

DEPLOYMENT_FILES = ("prefect.yaml", "prefect.local.yaml")
DEPLOYMENTS = [
    "market-data-daily",
    "market-data-backfill",
    "maintenance",
    "monitor",
    "market-data-shard",
    "market-data-sharded",
]
FLOWS = {"maintenance": "maintenance", "monitor": "monitor", "market-data-sharded": "market-data-sharded"}


def deployments(file: str) -> dict[str, dict[str, Any]]:
    config = yaml.safe_load((REPO / file).read_text())
    return {d["name"]: d for d in config["deployments"]}


@pytest.mark.parametrize("file", DEPLOYMENT_FILES)
def test_every_deployment_names_a_real_flow_and_its_parameters_validate(file: str) -> None:
    found = deployments(file)
    assert list(found) == DEPLOYMENTS
    for name, deployment in found.items():
        flow: Flow[..., Any] = load_flow_from_entrypoint(str(REPO / deployment["entrypoint"]))
        flow.validate_parameters(deployment.get("parameters", {}))
        for schedule in deployment.get("schedules", []):
            CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])
        with pytest.raises(Exception, match="unknown_parameter"):
            flow.validate_parameters({"unknown_parameter": 1})
        assert deployment["work_pool"]["name"], name
    backfill: Flow[..., Any] = load_flow_from_entrypoint(str(REPO / found["market-data-backfill"]["entrypoint"]))
    given = {"symbols": ["AAPL"], "start": "2024-01-01", "end": "2024-03-29"}  # what `-p` passes
    assert str(backfill.validate_parameters({**found["market-data-backfill"]["parameters"], **given})["start"]) == (
        "2024-01-01"
    )


def test_the_daily_run_is_after_the_us_close_on_weekdays_in_new_york_time() -> None:
    (daily,) = deployments("prefect.yaml")["market-data-daily"]["schedules"]
    minute, hour, _, _, weekdays = daily["cron"].split()
    assert daily["timezone"] == "America/New_York"
    assert (int(hour), int(minute)) > (16, 0) and weekdays == "1-5"
    assert [s["timezone"] for s in deployments("prefect.yaml")["maintenance"]["schedules"]] == ["America/New_York"]


def test_a_deployed_backfill_runs_on_a_worker_and_a_retry_from_the_ui_completes_it(
    prefect_env: dict[str, str], sandbox: Sandbox, tmp_path: Path
) -> None:
    env = {
        **prefect_env,
        "MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__BASE_URL": sandbox.base_url,
        "MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__RATE_LIMIT": "36000",
        "MARKETPIPE__COLLECTION__RATE_LIMIT_DIR": str(tmp_path / "pacing"),
        "PREFECT_WORKER_QUERY_SECONDS": "1",
    }
    pool = prefect("work-pool", "create", "marketpipe-local", "--type", "process", "--overwrite", env=env)
    assert pool.returncode == 0, pool.stdout + pool.stderr
    deployed = prefect("--no-prompt", "deploy", "--all", "--prefect-file", "prefect.local.yaml", env=env)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    store = DuckDBStore(path=env["MARKETPIPE__STORAGE__DUCKDB__PATH"])
    worker_log = (tmp_path / "worker.log").open("w")
    worker = subprocess.Popen(
        [str(BIN / "prefect"), "worker", "start", "--pool", "marketpipe-local", "--type", "process"],
        env=env,
        cwd=REPO,
        stdout=worker_log,
        stderr=subprocess.STDOUT,
    )
    try:
        # The store is locked by another process for the whole first run: nothing can be written.
        with unavailable(store):
            started = prefect(
                "deployment", "run", "market-data/market-data-backfill",
                "-p", 'symbols=["AAPL", "MSFT"]', "-p", "start=2024-01-01", "-p", "end=2024-03-29", env=env,
            )  # fmt: skip
            assert started.returncode == 0, started.stdout + started.stderr
            run_id = UUID(re.search(r"UUID: ([0-9a-f-]{36})", started.stdout)[1])  # type: ignore[index]
            first = wait_until_final(run_id)
        assert first.state is not None and first.state.is_failed(), first.state
        # Nothing is fetched for a store that can't say what it holds: the retry collects it.
        assert "the store could not give the history" in (first.state.message or "")
        assert "nothing was fetched" in (first.state.message or "")

        # What the UI's Retry button does: the run goes back to AwaitingRetry and a worker runs it again.
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(run_id, AwaitingRetry(), force=True)
        retried = wait_until_final(run_id)
        assert retried.state is not None and retried.state.is_completed(), retried.state
        assert retried.run_count == 2
        for symbol in ("AAPL", "MSFT"):
            assert len(store.read_bars(symbol)) == 65  # weekdays of 2024-01-01..2024-03-29
        assert Spool(env["MARKETPIPE__STORAGE__SPOOL_DIR"]).points() == 0
    finally:
        stop(worker)
        worker_log.close()


def test_the_kubernetes_deployments_use_the_charts_work_pool_and_its_job_variables() -> None:
    chart = REPO / "helm" / "marketpipe"
    template = json.loads((chart / "files" / "base-job-template.json").read_text())
    pool = yaml.safe_load((chart / "values.yaml").read_text())["workPool"]["name"]
    for name, deployment in deployments("prefect.yaml").items():
        work_pool = deployment["work_pool"]
        assert work_pool["name"] == pool, name
        unknown = set(work_pool["job_variables"]) - set(template["variables"]["properties"])
        assert unknown == set(), f"{name}: job variables the chart's template does not define: {unknown}"


def test_prefect_deploy_all_registers_the_kubernetes_deployments_with_their_build_and_push(
    prefect_env: dict[str, str], tmp_path: Path
) -> None:
    """`prefect deploy --all` on prefect.yaml against a real server, whose kubernetes pool has the chart's
    template: the server checks the job variables against it. Docker is a stand-in that logs its calls."""
    calls = tmp_path / "docker-calls"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "docker").chmod(0o755)
    image = "registry.example.com/marketpipe:test"
    env = {**prefect_env, "PATH": f"{bin_dir}:{prefect_env['PATH']}", "MARKETPIPE_IMAGE": image}
    template = REPO / "helm" / "marketpipe" / "files" / "base-job-template.json"
    pool = prefect(
        "work-pool", "create", "marketpipe-k8s", "--type", "kubernetes", "--base-job-template", str(template),
        "--overwrite", env=env,
    )  # fmt: skip
    assert pool.returncode == 0, pool.stdout + pool.stderr
    deployed = prefect("--no-prompt", "deploy", "--all", env=env)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    assert calls.read_text().splitlines() == [f"build --tag {image} .", f"push {image}"] * len(DEPLOYMENTS)

    with get_client(sync_client=True) as client:
        for name in DEPLOYMENTS:
            flow = FLOWS.get(name, "market-data")
            deployment = client.read_deployment_by_name(f"{flow}/{name}")
            assert deployment.work_pool_name == "marketpipe-k8s"
            assert deployment.job_variables["image"] == image
            assert deployment.job_variables["env"]["MARKETPIPE_ENV"] == "production"
            assert deployment.pull_steps == [
                {"prefect.deployments.steps.set_working_directory": {"directory": "/opt/marketpipe"}}
            ]
        daily = client.read_deployment_by_name("market-data/market-data-daily")
        (schedule,) = daily.schedules
        assert (schedule.schedule.cron, schedule.schedule.timezone) == ("30 17 * * 1-5", "America/New_York")  # type: ignore[union-attr]
