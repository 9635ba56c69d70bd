"""Real servers for tests and benchmarks, on free loopback ports, stopped by PID; and the loopback
HTTP server that stands in for the external APIs no test can reach."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def _serving(
    name: str, command: list[str], log_path: Path, ready: str, status: int, timeout: float, env: dict[str, str] | None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``command`` logging to ``log_path``; return once GET ``ready`` answers ``status``, stop it by PID after."""
    with log_path.open("a") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + timeout
            # One client for the whole wait: each new one loads the CA bundle, CPU the starting server needs.
            with httpx.Client(timeout=2) as client:
                while True:
                    try:
                        if client.get(ready).status_code == status:
                            break
                    except httpx.TransportError:
                        pass
                    if process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"{name} did not start:\n{log_path.read_text()}")
                    time.sleep(0.1)
            yield process
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


def migrated_prefect_database(env: dict[str, str], timeout: float) -> Path:
    """A Prefect SQLite database at the schema's head, created once per machine and Prefect version.

    Migrating a new database costs about 30 s of CPU. Each pytest worker, the serial part of
    `make test` and the benchmarks start their own server; they copy this file instead.
    """
    from filelock import FileLock
    from prefect import __version__

    cache = Path(tempfile.gettempdir()) / f"marketpipe-test-prefect-{__version__}"
    database = cache / "prefect.db"
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(cache / ".lock"):
        if not database.exists():
            building = Path(tempfile.mkdtemp(dir=cache))
            command = [str(BIN / "prefect"), "server", "database", "upgrade", "-y"]
            subprocess.run(
                command, env={**env, "PREFECT_HOME": str(building)}, check=True, timeout=timeout, capture_output=True
            )
            (building / "prefect.db").rename(database)  # whole or not at all
            shutil.rmtree(building)
    return database


@contextmanager
def prefect_process(
    home: Path, port: int, timeout: float = 300, services: bool = False
) -> Iterator[subprocess.Popen[bytes]]:
    """`prefect server start` (SQLite under ``home``) on ``port``; the same ``home`` and ``port`` make
    a restart of the same server, its database kept. With ``services`` it also runs its background
    services (automations' triggers and actions among them), which most tests do without.

    The timeout allows for two servers starting at once on two cores that other work keeps busy.
    """
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "prefect.db").exists():
        shutil.copyfile(migrated_prefect_database(env, timeout), home / "prefect.db")
    command = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    if not services:
        command.append("--no-services")
    with _serving("Prefect server", command, home / "server.log", f"{url}/health", 200, timeout, env) as process:
        yield process


@contextmanager
def prefect_server(home: Path, timeout: float = 300, services: bool = False) -> Iterator[str]:
    """`prefect server start` (SQLite under ``home``) on a free port; yields its API URL."""
    port = free_port()
    with prefect_process(home, port, timeout, services):
        yield f"http://127.0.0.1:{port}/api"


INFLUXD_CONFIG = """\
reporting-disabled = true
bind-address = "127.0.0.1:{rpc_port}"
[meta]
  dir = "{home}/meta"
[data]
  dir = "{home}/data"
  wal-dir = "{home}/wal"
  query-log-enabled = false
[http]
  bind-address = "127.0.0.1:{port}"
  log-enabled = false
  max-row-limit = {max_row_limit}
[monitor]
  store-enabled = false
"""


def influxd_binary() -> str:
    """The `influxd` of Debian's `influxdb` package (a real 1.x server); .ci/run installs it."""
    for candidate in ("/usr/bin/influxd", "/usr/local/bin/influxd"):
        if Path(candidate).exists():
            return candidate
    raise RuntimeError("influxd is not installed: `apt-get install influxdb` (Debian's InfluxDB 1.x), or run .ci/run")


@contextmanager
def influxdb_process(
    home: Path, port: int | None = None, timeout: float = 60, max_row_limit: int = 0
) -> Iterator[subprocess.Popen[bytes]]:
    """A real InfluxDB 1.x on loopback with its data under ``home``; the same ``home`` and ``port``
    make a restart of the same server. ``max_row_limit`` caps its non-chunked answers (0: no cap)."""
    home.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    config = home / "influxdb.conf"
    config.write_text(INFLUXD_CONFIG.format(home=home, port=port, rpc_port=free_port(), max_row_limit=max_row_limit))
    command = [influxd_binary(), "-config", str(config)]
    with _serving("influxd", command, home / "influxd.log", f"http://127.0.0.1:{port}/ping", 204, timeout, None) as p:
        yield p


@contextmanager
def influxdb_server(home: Path, timeout: float = 60) -> Iterator[str]:
    """A real InfluxDB 1.x on free loopback ports with its data under ``home``; yields its URL."""
    port = free_port()
    with influxdb_process(home, port, timeout):
        yield f"http://127.0.0.1:{port}"


@contextmanager
def serving_http(handle: Callable[[BaseHTTPRequestHandler], None]) -> Iterator[str]:
    """A threaded HTTP server on a free loopback port passing every GET, POST, PATCH and DELETE to
    ``handle``; yields its URL. For the external APIs a test can't reach (InfluxDB 2.x, Kubernetes)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            handle(self)

        def do_POST(self) -> None:
            handle(self)

        def do_PATCH(self) -> None:
            handle(self)

        def do_DELETE(self) -> None:
            handle(self)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.block_on_close = False
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
