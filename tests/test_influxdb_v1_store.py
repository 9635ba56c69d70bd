"""What only the InfluxDB v1 backend does: a server that is down, and the CLI reading from it."""

from __future__ import annotations

import os
import time
import uuid

import httpx
import numpy as np
import pandas as pd
import pytest

from blocks.influxdb_v1_store import InfluxDBV1Store
from blocks.store import StoreError
from tests.conftest import query_csv
from tests.servers import free_port
from tests.test_store_conformance import frame


def test_a_server_that_is_down_fails_the_write_loudly_after_retrying() -> None:
    store = InfluxDBV1Store(
        url=f"http://127.0.0.1:{free_port()}", database="x", password="s3cret-pass", username="u", write_attempts=2
    )
    started = time.monotonic()
    with pytest.raises(StoreError, match="unreachable") as caught:
        store.write_bars(frame(n=3))
    assert time.monotonic() - started < 30
    assert "s3cret-pass" not in str(caught.value)


def test_marketpipe_query_reads_from_influxdb_v1(influxdb_url: str) -> None:
    database = f"cli_{uuid.uuid4().hex[:12]}"
    written = frame("BRK-B", n=5)
    InfluxDBV1Store(url=influxdb_url, database=database).write_bars(written)
    env = {
        **os.environ,
        "MARKETPIPE__STORAGE__BACKEND": "influxdb_v1",
        "MARKETPIPE__STORAGE__INFLUXDB_V1__URL": influxdb_url,
        "MARKETPIPE__STORAGE__INFLUXDB_V1__DATABASE": database,
    }
    rows = query_csv(env, "BRK-B")
    assert list(rows["time"]) == [t.strftime("%Y-%m-%dT%H:%M:%SZ") for t in written["time"]]
    # CSV text and pandas' fast float parser may differ in the last ulp; exactness is the conformance suite's.
    np.testing.assert_allclose(rows["close"], written["close"], rtol=1e-15, atol=0)


def test_retention_sets_the_default_policy_and_a_second_run_changes_nothing(influxdb_url: str) -> None:
    database = f"rp_{uuid.uuid4().hex[:12]}"
    store = InfluxDBV1Store(url=influxdb_url, database=database)
    assert store.apply_retention("52w").startswith("updated: retention policy autogen")
    assert store.apply_retention("52w").startswith("unchanged")
    assert store.apply_retention("365d").startswith("updated")
    policies = httpx.get(f"{influxdb_url}/query", params={"q": f'SHOW RETENTION POLICIES ON "{database}"'}).json()[
        "results"
    ][0]["series"][0]
    autogen = dict(zip(policies["columns"], policies["values"][0], strict=True))
    assert (autogen["name"], autogen["duration"], autogen["default"]) == ("autogen", "8760h0m0s", True)


def test_retention_creates_a_named_policy_when_missing(influxdb_url: str) -> None:
    database = f"rp_{uuid.uuid4().hex[:12]}"
    store = InfluxDBV1Store(url=influxdb_url, database=database, retention_policy="bars_1y")
    assert store.apply_retention("365d").startswith("created: retention policy bars_1y")
    store.write_bars(frame(n=3, start=(pd.Timestamp.now(tz="UTC") - pd.Timedelta(days=3)).strftime("%Y-%m-%d")))
    assert len(store.read_bars("BRK-B")) == 3
