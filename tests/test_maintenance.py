"""The maintenance flow on a real Prefect server: it replays the spool and publishes the data-quality summary."""

from __future__ import annotations

from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
from prefect.client.schemas.objects import Artifact

from flows.maintenance import QUALITY_KEY, maintenance
from tests.conftest import Sandbox, marketpipe


def _artifact(flow_run_id: object) -> Artifact:
    with get_client(sync_client=True) as client:
        (found,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[QUALITY_KEY]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])
            )
        )
    return found


@pytest.mark.integration
def test_maintenance_publishes_the_data_quality_summary(
    prefect_env: dict[str, str], sandbox: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {**prefect_env, "MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__BASE_URL": sandbox.base_url}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MARKETPIPE__SYMBOLS", '["AAPL", "MSFT"]')
    empty = maintenance(return_state=True)
    assert empty.is_completed()
    assert "no stored 1d yahoo_finance bars for AAPL, MSFT" in str(_artifact(empty.state_details.flow_run_id).data)

    run = marketpipe("run", "--symbols", "AAPL,MSFT", "--start", "2024-01-01", "--end", "2024-03-28", env=dict(env))
    assert run.returncode == 0, run.stdout + run.stderr
    state = maintenance(return_state=True)
    assert state.is_completed()
    summary = str(_artifact(state.state_details.flow_run_id).data)
    # 64 weekdays served, three of them NYSE holidays (New Year, Martin Luther King, Presidents Day)
    assert "| AAPL | 64 | 61 | 100.0% | 0 | 0 | 0 | 0 | ok (" in summary
    assert "| MSFT | 64 | 61 |" in summary
