"""What the drills of the spool's disk, the Prefect API and the source share: `marketpipe` child
processes, stores to compare, a spool filesystem that can be filled, and a Prefect server that can
be stopped and started again on its port."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pandas as pd

from blocks.influxdb_v1_store import InfluxDBV1Store
from blocks.store import BarStore
from tests.conftest import BIN, REPO, Sandbox
from tests.conftest import marketpipe_process as run_marketpipe
from tests.servers import free_port, prefect_process

Preexec = Callable[[], None]


def marketpipe(*args: str, env: dict[str, str], preexec: Preexec | None = None) -> subprocess.CompletedProcess[str]:
    """`marketpipe ...` as a child process, with a drill's longer allowance for a faulted run."""
    return run_marketpipe(*args, env=env, timeout=240, preexec=preexec)


def start_marketpipe(*args: str, env: dict[str, str], log: Path) -> subprocess.Popen[str]:
    """`marketpipe ...` in the background, stdout and stderr into ``log``."""
    with log.open("w") as out:
        return subprocess.Popen(
            [str(BIN / "marketpipe"), *args], env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True
        )


def output(result: subprocess.CompletedProcess[str]) -> str:
    return result.stdout + result.stderr


def source_env(env: dict[str, str], sandbox: Sandbox, rate_limit_dir: Path) -> dict[str, str]:
    """The sandbox as Yahoo, paced at 10 requests a second, with short retry waits."""
    return {
        **env,
        "MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__BASE_URL": sandbox.base_url,
        "MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__RATE_LIMIT": "36000",
        "MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__RETRY__INITIAL_WAIT": "0.05",
        "MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__RETRY__MAX_WAIT": "0.5",
        "MARKETPIPE__COLLECTION__RATE_LIMIT_DIR": str(rate_limit_dir),
    }


def influxdb_env(env: dict[str, str], url: str, database: str) -> dict[str, str]:
    return {
        **env,
        "MARKETPIPE__STORAGE__BACKEND": "influxdb_v1",
        "MARKETPIPE__STORAGE__INFLUXDB_V1__URL": url,
        "MARKETPIPE__STORAGE__INFLUXDB_V1__DATABASE": database,
    }


def influxdb_store(env: dict[str, str]) -> InfluxDBV1Store:
    return InfluxDBV1Store(
        url=env["MARKETPIPE__STORAGE__INFLUXDB_V1__URL"], database=env["MARKETPIPE__STORAGE__INFLUXDB_V1__DATABASE"]
    )


def stored_bars(store: BarStore, symbols: list[str]) -> pd.DataFrame:
    """Every stored bar of ``symbols``, one frame, in a stable order."""
    frames = [store.read_bars(symbol) for symbol in symbols]
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame(columns=["symbol", "interval", "source", "time"])
    return pd.concat(frames, ignore_index=True).sort_values(["symbol", "time"], kind="stable", ignore_index=True)


def faults_in(entries: list[dict[str, object]]) -> list[str]:
    """The fault kinds the sandbox's request log says it injected, in order."""
    return [str(e["fault"]) for e in entries if e.get("fault")]


class SpoolDisk:
    """A small filesystem of its own for the spool, which a drill fills up and frees again.

    A tmpfs of ``size`` bytes mounted on ``root``: filled, a write fails with ENOSPC as on a full disk.
    Where nothing can be mounted (no privilege), the child process gets a file size limit
    (RLIMIT_FSIZE, SIGXFSZ ignored) instead, so a spool file larger than what is left fails with
    EFBIG: the same failure at the same place, an OSError from the spool's write.
    """

    def __init__(self, root: Path, size: int) -> None:
        self.root = root
        self.size = size
        self.spool = root / "spool"
        self._limit: int | None = None
        root.mkdir(parents=True, exist_ok=True)
        mount = ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(root)]
        self.mounted = subprocess.run(mount, capture_output=True, check=False).returncode == 0
        self.spool.mkdir(exist_ok=True)

    @property
    def how(self) -> str:
        return f"a {self.size // 1024} KB tmpfs" if self.mounted else "RLIMIT_FSIZE on the child process"

    def fill(self, leave: int) -> None:
        """Leave about ``leave`` bytes for the spool."""
        if not self.mounted:
            self._limit = leave
            return
        stats = os.statvfs(self.root)
        free = stats.f_bavail * stats.f_frsize
        with (self.root / "filler").open("ab") as filler:
            filler.write(b"\0" * max(0, free - leave))

    def free(self) -> None:
        (self.root / "filler").unlink(missing_ok=True)
        self._limit = None

    def available(self) -> int:
        if not self.mounted:
            return self._limit if self._limit is not None else self.size
        stats = os.statvfs(self.root)
        return int(stats.f_bavail * stats.f_frsize)

    def preexec(self) -> Preexec | None:
        """What a child process runs before it starts: the size limit where there is no small filesystem."""
        limit = self._limit
        if limit is None:
            return None

        def limited() -> None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        return limited

    def close(self) -> None:
        if self.mounted:
            subprocess.run(["umount", str(self.root)], capture_output=True, check=False)
        shutil.rmtree(self.root, ignore_errors=True)


@contextmanager
def spool_disk(root: Path, size: int) -> Iterator[SpoolDisk]:
    disk = SpoolDisk(root, size)
    try:
        yield disk
    finally:
        disk.close()


class PrefectServer:
    """A real `prefect server start` on a fixed port that can be stopped by PID and started again.

    Started again on the same home and port, it is the same server: its database keeps the runs.
    """

    def __init__(self, home: Path) -> None:
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.process: subprocess.Popen[bytes] | None = None
        self._running = ExitStack()

    def start(self) -> None:
        self.process = self._running.enter_context(prefect_process(self.home, self.port))

    def stop(self) -> None:
        """Terminate it by PID (then kill, after 20 s) and wait until it is gone."""
        self._running.close()
        self.process = None
