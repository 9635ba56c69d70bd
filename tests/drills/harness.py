"""What the drills of this directory share: `marketpipe run` as a child that can be killed, its
progress read from its own log, and the stores read back whole once the child is gone."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from pathlib import Path

import pandas as pd

from blocks.duckdb_store import DuckDBStore
from blocks.influxdb_v1_store import InfluxDBV1Store
from blocks.spool import Spool
from blocks.store import BarStore
from tests.conftest import BIN, REPO, Sandbox
from tests.drills.figures import BAR_KEY

# Prefect's console line for a store task that finished: that symbol's bars are in the store (or spooled).
_STORED = re.compile(r"Task run 'store-[^']+' - Finished in state Completed")


def symbols(count: int, prefix: str = "D") -> list[str]:
    """Synthetic tickers the sandbox serves a deterministic series for: D00, D01, ..."""
    return [f"{prefix}{n:02d}" for n in range(count)]


def run_args(names: Sequence[str], start: str, end: str) -> list[str]:
    return ["run", "--verbose", "--symbols", ",".join(names), "--start", start, "--end", end]  # stores counted by log


def drill_env(prefect_env: dict[str, str], sandbox: Sandbox, tmp_path: Path, requests_per_hour: int) -> dict[str, str]:
    """The environment of a drill's runs: the sandbox as Yahoo at a pace, the session's Prefect server."""
    return {
        **prefect_env,
        "MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__BASE_URL": sandbox.base_url,
        "MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__RATE_LIMIT": str(requests_per_hour),
        "MARKETPIPE__COLLECTION__RATE_LIMIT_DIR": str(tmp_path / "pacing"),
        # numba compiles the indicators once for every run of the session, not once per run
        "NUMBA_CACHE_DIR": str(Path(tempfile.gettempdir()) / "marketpipe-drills-numba"),
    }


def duckdb_env(env: dict[str, str], path: Path, spool: Path) -> dict[str, str]:
    return {
        **env,
        "MARKETPIPE__STORAGE__BACKEND": "duckdb",
        "MARKETPIPE__STORAGE__DUCKDB__PATH": str(path),
        "MARKETPIPE__STORAGE__SPOOL_DIR": str(spool),
    }


def influxdb_v1_env(env: dict[str, str], url: str, database: str, spool: Path) -> dict[str, str]:
    return {
        **env,
        "MARKETPIPE__STORAGE__BACKEND": "influxdb_v1",
        "MARKETPIPE__STORAGE__INFLUXDB_V1__URL": url,
        "MARKETPIPE__STORAGE__INFLUXDB_V1__DATABASE": database,
        "MARKETPIPE__STORAGE__SPOOL_DIR": str(spool),
    }


class Run:
    """`marketpipe ...` in its own process group, its stdout and stderr in one log file."""

    def __init__(self, args: Sequence[str], env: dict[str, str], log: Path) -> None:
        self.log_path = log
        self._log = log.open("w")
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            [str(BIN / "marketpipe"), *args],
            env=env,
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: a SIGKILL reaches whatever it started too
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def symbols_stored(self) -> int:
        """Store tasks this run finished, by its own log: bars of that many symbols were written."""
        return len(_STORED.findall(self.output()))

    def wait_until(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll ``ready`` while the run goes on; fails if the run ends or ``timeout`` passes first."""
        deadline = time.monotonic() + timeout
        while not ready():
            if self.process.poll() is not None:
                raise AssertionError(f"the run ended ({self.process.returncode}) before {what}:\n{self.output()}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"no {what} within {timeout:.0f} s:\n{self.output()}")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL to the whole group, as `kill -9 -PGID` does: no handler, no flush, no cleanup."""
        with suppress(ProcessLookupError):  # the group is gone already
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        self._log.close()

    def wait(self, timeout: float = 300) -> int:
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the run did not end within {timeout:.0f} s:\n{self.output()}") from None
        self._log.close()
        return code


def run_to_end(args: Sequence[str], env: dict[str, str], log: Path, timeout: float = 300) -> tuple[int, str]:
    """Run to completion; the exit code and everything it printed."""
    run = Run(args, env, log)
    code = run.wait(timeout)
    return code, run.output()


def store_of(env: dict[str, str]) -> BarStore:
    """The store the environment's runs write to, for reading it back in this process."""
    if env["MARKETPIPE__STORAGE__BACKEND"] == "duckdb":
        return DuckDBStore(path=env["MARKETPIPE__STORAGE__DUCKDB__PATH"])
    return InfluxDBV1Store(
        url=env["MARKETPIPE__STORAGE__INFLUXDB_V1__URL"], database=env["MARKETPIPE__STORAGE__INFLUXDB_V1__DATABASE"]
    )


def stored_bars(env: dict[str, str], names: Sequence[str]) -> pd.DataFrame:
    """Every stored 1d bar of ``names``, one frame; read only once no run writes to the store."""
    store = store_of(env)
    frames = [frame for frame in (store.read_bars(name) for name in names) if not frame.empty]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(BAR_KEY))


def spooled_points(env: dict[str, str]) -> int:
    return Spool(env["MARKETPIPE__STORAGE__SPOOL_DIR"]).points()
