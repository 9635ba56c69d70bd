"""Collection against the simulator, end to end: rate limits across processes, faults, incremental
runs, quotas and secrets. The CLI's own commands (child processes where two must share a limit or
their log lines are searched), a real Prefect server, the sandbox and DuckDB."""

from __future__ import annotations

import asyncio
import stat
import subprocess
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pandas as pd
import pytest

from blocks.duckdb_store import DuckDBStore
from tests.conftest import BIN, REPO, Sandbox, marketpipe_process, server_home
from tests.conftest import marketpipe as run
from tests.conftest import query_csv as query

YAHOO_RATE = "MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__RATE_LIMIT"


def start(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(BIN / "marketpipe"), *args], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def sandbox_with(tmp_path: Path, *args: str) -> Sandbox:
    return Sandbox(*args, log=tmp_path / f"sandbox-{len(list(tmp_path.glob('sandbox-*.log')))}.log")


@pytest.fixture
def env(prefect_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    return {
        **prefect_env,
        "MARKETPIPE__COLLECTION__RATE_LIMIT_DIR": str(tmp_path / "rate-limits"),
        YAHOO_RATE: "36000",  # 10/s: the rate-limit tests set their own
        "MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__RETRY__INITIAL_WAIT": "0.05",
        "MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__RETRY__MAX_WAIT": "0.5",
    }


@pytest.fixture
def stopper() -> Iterator[list[Sandbox]]:
    servers: list[Sandbox] = []
    yield servers
    for server in servers:
        server.stop()


def rate(entries: list[dict[str, Any]]) -> float:
    times = sorted(e["t"] for e in entries)
    return float((len(times) - 1) / (times[-1] - times[0]))


def busiest_second(entries: list[dict[str, Any]]) -> int:
    times = sorted(e["t"] for e in entries if not e.get("rate_limited"))
    return max(sum(1 for t in times if s <= t < s + 1.0) for s in times)


SYMBOLS_100 = [f"S{i:03d}" for i in range(100)]


@pytest.mark.serial
def test_a_hundred_symbols_at_5_per_second_get_no_rejection(
    env: dict[str, str], tmp_path: Path, stopper: list[Sandbox]
) -> None:
    sandbox = sandbox_with(tmp_path, "--rate-limit", "5", "--rate-window", "1")
    stopper.append(sandbox)
    env = {**env, YAHOO_RATE: "18000", "MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__BASE_URL": sandbox.base_url}
    result = run("run", "--symbols", ",".join(SYMBOLS_100), "--start", "2024-01-01", "--end", "2024-02-29", env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # A hundred ok rows would bury what needs a look: the summary names only a count of them.
    assert "100 of 100 symbols ok, not listed" in result.stdout and "│ S0" not in result.stdout, result.stdout
    entries = sandbox.requests()
    assert len(entries) == 100
    assert [e for e in entries if e.get("rate_limited")] == []
    # The pacer aims at 4.65/s (7% headroom); on a loaded 2-core machine the flow's other work delays
    # a few sends, so the check is that it does not throttle far below the limit, not the exact pace.
    assert rate(entries) >= 4.25
    assert busiest_second(entries) <= 5


def test_two_processes_share_one_limit(env: dict[str, str], tmp_path: Path, stopper: list[Sandbox]) -> None:
    sandbox = sandbox_with(tmp_path, "--rate-limit", "5", "--rate-window", "1")
    stopper.append(sandbox)
    base = {**env, YAHOO_RATE: "18000", "MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__BASE_URL": sandbox.base_url}
    halves = (SYMBOLS_100[:40], SYMBOLS_100[40:80])
    processes = [
        start(
            "run",
            "--symbols",
            ",".join(half),
            "--start",
            "2024-01-01",
            "--end",
            "2024-01-31",
            env={**base, "MARKETPIPE__STORAGE__DUCKDB__PATH": str(tmp_path / f"store-{i}.duckdb")},
        )
        for i, half in enumerate(halves)
    ]
    outputs = [p.communicate(timeout=300) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    entries = sandbox.requests()
    assert len(entries) == 80
    assert [e for e in entries if e.get("rate_limited")] == []
    assert busiest_second(entries) <= 5


def test_with_20_percent_transient_faults_every_symbol_is_stored(
    env: dict[str, str], tmp_path: Path, stopper: list[Sandbox]
) -> None:
    sandbox = sandbox_with(
        tmp_path, "--fault-rate", "0.2", "--fault-kinds", "5xx,timeout,malformed,html", "--timeout-delay", "1.5",
        "--not-found", "GONE", "--seed", "7",
    )  # fmt: skip
    stopper.append(sandbox)
    env = {
        **env,
        "MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__BASE_URL": sandbox.base_url,
        "MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__TIMEOUT": "0.5",
        "MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__RETRY__MAX_ATTEMPTS": "12",
    }
    symbols = [f"F{i:02d}" for i in range(30)]
    result = run(
        "run", "--symbols", ",".join([*symbols, "GONE"]), "--start", "2024-03-01", "--end", "2024-03-29", env=env
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "GONE failed" in result.stdout and "No data found, symbol may be delisted" in result.stdout
    assert "F0" not in result.stdout.split("GONE failed")[1]
    faults = [e for e in sandbox.requests() if e.get("fault")]
    assert len(faults) >= 5
    assert {e["fault"] for e in faults} == {"5xx", "timeout", "malformed", "html"}
    gone = [e for e in sandbox.requests() if e["symbol"] == "GONE"]
    assert [e["status"] for e in gone if not e.get("fault")] == [404]  # retried past faults, never past the 404
    assert gone[-1]["status"] == 404
    store = DuckDBStore(path=env["MARKETPIPE__STORAGE__DUCKDB__PATH"])
    for symbol in symbols:
        assert len(store.read_bars(symbol)) == 21


def period1(entry: dict[str, Any]) -> date:
    return datetime.fromtimestamp(int(entry["params"]["period1"]), UTC).date()


def test_a_run_without_start_collects_only_the_overlap_and_the_new_range(
    env: dict[str, str], tmp_path: Path, stopper: list[Sandbox]
) -> None:
    sandbox = sandbox_with(tmp_path)
    stopper.append(sandbox)
    env = {**env, "MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__BASE_URL": sandbox.base_url}
    today = datetime.now(UTC).date()
    first, middle = today - timedelta(days=500), today - timedelta(days=60)
    split = {**env, "MARKETPIPE__STORAGE__DUCKDB__PATH": str(tmp_path / "split.duckdb")}
    whole = {**env, "MARKETPIPE__STORAGE__DUCKDB__PATH": str(tmp_path / "whole.duckdb")}

    assert run("run", "--symbols", "AAPL,MSFT", "--start", str(first), "--end", str(middle), env=split).returncode == 0
    stored_until = pd.Timestamp(query(split, "AAPL")["time"].iloc[-1]).date()
    before = len(sandbox.requests())
    resumed = run("run", "--symbols", "AAPL,MSFT", env=split)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "incremental" in resumed.stdout
    for entry in sandbox.requests()[before:]:
        # The overlap (5 days) plus the 2-day margin for exchanges east of UTC, nothing older.
        assert period1(entry) == stored_until - timedelta(days=5 + 2)

    assert run("run", "--symbols", "AAPL,MSFT", "--start", str(first), env=whole).returncode == 0
    for symbol in ("AAPL", "MSFT"):
        incremental, full = query(split, symbol), query(whole, symbol)
        assert len(full) > 300
        pd.testing.assert_frame_equal(incremental, full, check_exact=False, rtol=1e-9, atol=0)


def test_a_new_symbol_gets_the_default_history(env: dict[str, str], tmp_path: Path, stopper: list[Sandbox]) -> None:
    sandbox = sandbox_with(tmp_path)
    stopper.append(sandbox)
    env = {
        **env,
        "MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__BASE_URL": sandbox.base_url,
        "MARKETPIPE__COLLECTION__DEFAULT_HISTORY_DAYS": "90",
    }
    result = run("run", "--symbols", "NVDA", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    (entry,) = sandbox.requests()
    assert period1(entry) == datetime.now(UTC).date() - timedelta(days=90 + 2)
    assert "initial" in result.stdout


AV_KEY = "AVKEY-3f9c1e7a-5b2d-4c8e-9a61-d0b7e2f4a8c3-UNIQUE"


def test_alpha_vantage_key_leaves_no_trace(env: dict[str, str], tmp_path: Path, stopper: list[Sandbox]) -> None:
    sandbox = sandbox_with(tmp_path, "--fault", "ERR=5xx")
    stopper.append(sandbox)
    env = {
        **env,
        "ALPHA_VANTAGE_API_KEY": AV_KEY,
        "MARKETPIPE__DATA_SOURCES__ALPHA_VANTAGE__BASE_URL": sandbox.alpha_vantage_url,
        "MARKETPIPE__DATA_SOURCES__ALPHA_VANTAGE__RATE_LIMIT": "36000",
        "MARKETPIPE__DATA_SOURCES__ALPHA_VANTAGE__RETRY__MAX_ATTEMPTS": "2",
        "MARKETPIPE__DATA_SOURCES__ALPHA_VANTAGE__RETRY__INITIAL_WAIT": "0.05",
        "MARKETPIPE__DEBUG": "true",
        "PREFECT_LOGGING_LEVEL": "DEBUG",
        "PREFECT_LOGGING_ROOT_LEVEL": "INFO",  # httpx's request lines too
    }
    # A child process: Prefect's log lines, searched for the key below, go to its own stderr.
    args = ("run", "--source", "alpha_vantage", "--symbols", "IBM,MSFT,ERR", "--start", "2025-01-01")
    result = marketpipe_process(*args, env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "ERR failed" in result.stdout
    assert "apikey=***" in result.stderr  # debug logging did print the request URLs, redacted
    assert len(query(env, "IBM")) > 0

    async def artifacts() -> list[Any]:
        from prefect.client.orchestration import get_client

        async with get_client() as client:
            return await client.read_artifacts()

    places = {"stdout": result.stdout, "stderr": result.stderr}
    places["artifacts"] = repr([a.model_dump() for a in asyncio.run(artifacts())])
    homes = [Path(env["PREFECT_HOME"]), server_home(), tmp_path]  # client, server (database, logs), sandbox
    for home in homes:
        for path in home.rglob("*"):
            if path.is_file():
                places[str(path)] = path.read_bytes().decode("utf-8", errors="replace")
    assert any(where.endswith("prefect.db") for where in places), "the server's database must be searched"
    assert any(where.endswith(".requests.jsonl") for where in places), "the sandbox's request log too"
    leaks = [where for where, text in places.items() if AV_KEY in text or AV_KEY[:20] in text]
    assert leaks == []


def test_a_used_up_daily_quota_defers_symbols(env: dict[str, str], tmp_path: Path, stopper: list[Sandbox]) -> None:
    sandbox = sandbox_with(tmp_path)
    stopper.append(sandbox)
    env = {
        **env,
        "ALPHA_VANTAGE_API_KEY": "quota-test-key",
        "MARKETPIPE__DATA_SOURCES__ALPHA_VANTAGE__BASE_URL": sandbox.alpha_vantage_url,
        "MARKETPIPE__DATA_SOURCES__ALPHA_VANTAGE__RATE_LIMIT": "36000",
        "MARKETPIPE__DATA_SOURCES__ALPHA_VANTAGE__REQUESTS_PER_DAY": "2",
    }
    result = run("run", "--source", "alpha_vantage", "--symbols", "AAA,BBB,CCC,DDD", "--start", "2025-01-01", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(" ok ") + result.stdout.count("│ ok") >= 2
    assert result.stdout.count("deferred:") == 2
    assert "daily quota of 2 requests is used up" in result.stdout
    assert len(sandbox.requests()) == 2


def test_alpha_vantages_daily_quota_body_defers_the_rest_of_the_run_and_the_next_one(
    env: dict[str, str], tmp_path: Path, stopper: list[Sandbox]
) -> None:
    """The sandbox answers 2 calls a day, then AV's "requests per day" body. The symbol that gets it
    is deferred after that one request, the others without any; a second process with another /tmp
    (a new pod) but the same state directory (the persistent volume) defers at once."""
    sandbox = sandbox_with(tmp_path, "--av-daily-quota", "2")
    stopper.append(sandbox)
    state_dir = tmp_path / "volume" / "rate-limits"
    env = {
        **env,
        "ALPHA_VANTAGE_API_KEY": "daily-quota-test-key",
        "MARKETPIPE__DATA_SOURCES__ALPHA_VANTAGE__BASE_URL": sandbox.alpha_vantage_url,
        "MARKETPIPE__DATA_SOURCES__ALPHA_VANTAGE__RATE_LIMIT": "3600",  # one at a time: the count is exact
        "MARKETPIPE__DATA_SOURCES__ALPHA_VANTAGE__RETRY__INITIAL_WAIT": "0.05",
        "MARKETPIPE__COLLECTION__TASK_RETRIES": "2",
        "MARKETPIPE__COLLECTION__TASK_RETRY_DELAY": "0",
        "MARKETPIPE__COLLECTION__RATE_LIMIT_DIR": str(state_dir),
    }
    symbols = ["AAA", "BBB", "CCC", "DDD", "EEE", "FFF"]
    first_tmp = tmp_path / "pod-1-tmp"
    first_tmp.mkdir()
    first = run("run", "--source", "alpha_vantage", "--symbols", ",".join(symbols), "--start", "2025-01-01",
                env={**env, "TMPDIR": str(first_tmp)})  # fmt: skip
    assert first.returncode == 0, first.stdout + first.stderr  # deferred symbols don't fail the run
    requests = sandbox.requests()
    assert len(requests) == 3, requests
    assert max(Counter(e["symbol"] for e in requests).values()) == 1  # nothing was retried
    (spent,) = [e for e in requests if e.get("quota_exhausted")]
    assert first.stdout.count("│ ok") == 2 and first.stdout.count("deferred:") == 4, first.stdout
    assert (
        f"{spent['symbol']} deferred: alpha_vantage {spent['symbol']}: Alpha Vantage said the daily quota is used up"
        in first.stdout
    )
    assert "2 requests per day" in first.stdout and "deferred until" in first.stdout and " failed" not in first.stdout
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700

    second_tmp = tmp_path / "pod-2-tmp"
    second_tmp.mkdir()
    second = run("run", "--source", "alpha_vantage", "--symbols", "GGG,AAA", "--start", "2025-01-01",
                 env={**env, "TMPDIR": str(second_tmp)})  # fmt: skip
    assert second.returncode == 0, second.stdout + second.stderr
    assert second.stdout.count("deferred:") == 2 and "Alpha Vantage said the daily quota is used up" in second.stdout
    assert len(sandbox.requests()) == 3  # not one request more
    assert not list(second_tmp.glob("marketpipe-rate-limits*")) and not list(first_tmp.glob("marketpipe-rate-limits*"))


AV_BLOCK = "MARKETPIPE__DATA_SOURCES__ALPHA_VANTAGE__API_KEY_BLOCK"


def test_setup_twice_changes_nothing_the_second_time(env: dict[str, str], tmp_path: Path) -> None:
    """Concurrency limits, block types, blocks saved from the environment, retention: all idempotent."""
    store_path = str(tmp_path / "from-block.duckdb")
    env = {
        **env,
        "MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__CONCURRENCY": "3",
        "MARKETPIPE__RETENTION__DURATION": "365d",
        "MARKETPIPE__STORAGE__BLOCK": "setup-test-store",
        "MARKETPIPE__STORAGE__DUCKDB__PATH": store_path,
        AV_BLOCK: "setup-test-av",
        "ALPHA_VANTAGE_API_KEY": "first-key",
    }
    first = marketpipe_process("setup", env=env)  # a child: its log lines are searched for the key too
    assert first.returncode == 0, first.stderr
    assert "concurrency limit collect:yahoo_finance = 3" in first.stdout
    assert "created  block marketpipe-duckdb-store/setup-test-store" in first.stdout
    assert "created  block marketpipe-source-credentials/setup-test-av" in first.stdout
    assert "first-key" not in first.stdout + first.stderr

    second = run("setup", env=env)
    assert second.returncode == 0, second.stderr
    lines = [line.strip() for line in second.stdout.splitlines() if line.strip()]
    assert len(lines) >= 10 and all(line.startswith(("unchanged", "skipped")) for line in lines), second.stdout
    assert sum(line.startswith("unchanged") for line in lines) >= 10, second.stdout

    rotated = run("setup", env={**env, "ALPHA_VANTAGE_API_KEY": "second-key"})
    assert "updated  block marketpipe-source-credentials/setup-test-av" in rotated.stdout
    unset = run("setup", env={**env, "ALPHA_VANTAGE_API_KEY": ""})  # nothing to save it from: the saved one stays
    assert "unchanged  block marketpipe-source-credentials/setup-test-av (kept" in unset.stdout, unset.stdout
    never = run("setup", env={**env, "ALPHA_VANTAGE_API_KEY": "", AV_BLOCK: "never-saved-av"})
    assert never.returncode == 0 and "skipped  block marketpipe-source-credentials/never-saved-av" in never.stdout

    from prefect.client.orchestration import get_client

    from blocks.credentials import SourceCredentials
    from blocks.stores import saved_store

    assert cast(SourceCredentials, SourceCredentials.load("setup-test-av")).api_key.get_secret_value() == "second-key"
    # With storage.block set, the flow's store is the saved block, not the settings' path.
    assert cast(DuckDBStore, saved_store("duckdb", "setup-test-store")).path == store_path
    with get_client(sync_client=True) as client:
        assert client.read_concurrency_limit_by_tag("collect:yahoo_finance").concurrency_limit == 3
        for source in ("yahoo_finance", "alpha_vantage"):  # leave the session's server as it was
            client.delete_concurrency_limit_by_tag(f"collect:{source}")


def test_a_store_block_that_was_never_saved_is_a_config_error(env: dict[str, str]) -> None:
    result = run("query", "--symbol", "AAPL", env={**env, "MARKETPIPE__STORAGE__BLOCK": "never-saved"})
    assert result.returncode == 2
    assert "storage.block 'never-saved'" in result.stderr and "marketpipe setup" in result.stderr


def test_the_api_key_can_come_from_a_saved_block(prefect_env: dict[str, str]) -> None:
    from blocks.credentials import SourceCredentials
    from configs.settings import SourceSettings
    from tasks.job import resolve_credentials

    SourceCredentials(api_key="key-from-block").save("alpha-vantage-test", overwrite=True)
    resolved = resolve_credentials(SourceSettings(base_url="http://x/query", api_key_block="alpha-vantage-test"))
    assert resolved.api_key is not None and resolved.api_key.get_secret_value() == "key-from-block"
    from_env = SourceSettings(base_url="http://x/query", api_key="from-env", api_key_block="alpha-vantage-test")
    assert resolve_credentials(from_env).api_key.get_secret_value() == "from-env"  # type: ignore[union-attr]


def test_a_collect_task_is_retried_on_transient_errors_only(
    env: dict[str, str], tmp_path: Path, stopper: list[Sandbox]
) -> None:
    sandbox = sandbox_with(tmp_path, "--fault", "FLAKY=5xx", "--not-found", "GONE")
    stopper.append(sandbox)
    env = {
        **env,
        "MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__BASE_URL": sandbox.base_url,
        "MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__RETRY__MAX_ATTEMPTS": "2",
        "MARKETPIPE__COLLECTION__TASK_RETRIES": "2",
        "MARKETPIPE__COLLECTION__TASK_RETRY_DELAY": "0",
    }
    result = run("run", "--symbols", "AAPL,FLAKY,GONE", "--start", "2024-01-01", "--end", "2024-01-31", env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    requests = Counter(e["symbol"] for e in sandbox.requests())
    assert requests == {"AAPL": 1, "FLAKY": 2 * 3, "GONE": 1}  # 2 attempts a try, 3 tries; a 404 is tried once
