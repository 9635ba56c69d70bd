"""Prefect's ephemeral mode on a first run: create its database up front, and say so.

With no ``PREFECT_API_URL``, Prefect starts a temporary API server for the run and waits
``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`` (20 s by default) for it to answer. On a fresh
``PREFECT_HOME`` that server first creates its SQLite database, which alone can take longer than
that on two busy cores, so a user's very first ``marketpipe run`` (and ``make demo``) timed out.
Here the database is created before the server starts, with a line telling the user why they
wait, and the server gets a start-up timeout that allows for a loaded machine. A timeout the user
set (environment, profile or ``.env``) always wins.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar, NoReturn

import httpx
from filelock import FileLock
from prefect.settings import (
    PREFECT_API_URL,
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
    get_current_settings,
    temporary_settings,
)

# Seconds the temporary server may take to answer: its imports and its own start-up checks on two
# loaded cores, once the database exists. Far above what it needs; an unreachable server still fails.
EPHEMERAL_STARTUP_TIMEOUT = 180
SQLITE_PREFIX = "sqlite+aiosqlite:///"


def ephemeral_database() -> Path | None:
    """The SQLite file the temporary server will use, or None when a server (or another database) is configured."""
    settings = get_current_settings()
    if settings.api.url or not settings.server.ephemeral.enabled:
        return None
    secret = settings.server.database.connection_url
    url = secret.get_secret_value() if secret is not None else ""
    if not url.startswith(SQLITE_PREFIX) or url.endswith(":memory:"):
        return None
    return Path(url.removeprefix(SQLITE_PREFIX))


def create_database(path: Path, say: Callable[[str], None]) -> bool:
    """Create and migrate the ephemeral server's database if it does not exist yet; whether it did."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}.marketpipe.lock"):  # two first runs at once create it once
        if path.exists():
            return False
        say(f"preparing the local Prefect database in {path.parent}, first run only (about 30 s)")
        from prefect.server.database import provide_database_interface  # noqa: PLC0415 (heavy; first run only)

        asyncio.run(provide_database_interface().create_db())
        return True


@contextmanager
def local_prefect(say: Callable[[str], None]) -> Iterator[None]:
    """Around anything that talks to Prefect: ready the ephemeral server's database and give it time to start."""
    database = ephemeral_database()
    if database is None:
        yield
        return
    create_database(database, say)
    if "startup_timeout_seconds" in get_current_settings().server.ephemeral.model_fields_set:
        yield  # the user's own timeout wins
        return
    with temporary_settings({PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: EPHEMERAL_STARTUP_TIMEOUT}):
        yield


# Seconds Prefect's event and log queues get to send what they hold once the API is unreachable.
UNREACHABLE_API_GRACE = 5
# Seconds they get to send what they hold before the temporary server stops.
API_DRAIN_TIMEOUT = 30


def _drain_to_api(timeout: float) -> None:
    from prefect.events.worker import EventsWorker  # noqa: PLC0415 (only once a run is done)
    from prefect.logging.handlers import APILogWorker  # noqa: PLC0415

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=timeout)


def exit_without_api(code: int) -> NoReturn:
    """End the process when the Prefect API has gone: at exit, Prefect's queues would otherwise try
    each event they hold in turn (about 7 s each against a refused connection), for minutes.

    What the run wrote is written by then: only the API's record of the run is incomplete.
    """
    _drain_to_api(UNREACHABLE_API_GRACE)
    for server in list(_TemporaryServer.running):  # os._exit skips the context that would stop it
        server.stop()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@contextmanager
def started_early(say: Callable[[str], None]) -> Iterator[Callable[[], None]]:
    """Start the run's temporary API server now and yield a wait for it to answer.

    Prefect would start the same server on the flow's first API call, and wait for it: its imports
    and start-up take about ten seconds, as long as importing the flow. Started here, before the
    caller imports the flow, the two overlap on separate cores. With a server configured this only
    yields a wait that returns at once.
    """
    database = ephemeral_database()
    if database is None:
        yield lambda: None
        return
    create_database(database, say)
    settings = get_current_settings()
    timeout = EPHEMERAL_STARTUP_TIMEOUT
    if "startup_timeout_seconds" in settings.server.ephemeral.model_fields_set:
        timeout = settings.server.ephemeral.startup_timeout_seconds
    server = _TemporaryServer(settings.to_environment_variables(exclude_unset=True))
    try:
        with _api_url(server.api_url):
            yield lambda: server.wait(timeout)
            _drain_to_api(API_DRAIN_TIMEOUT)  # the run's last logs and events, while the server still takes them
    finally:
        server.stop()


class _TemporaryServer:
    """Prefect's own ephemeral server (the command its `SubprocessASGIServer` runs), started without
    importing the server into this process."""

    running: ClassVar[set[_TemporaryServer]] = set()

    def __init__(self, prefect_env: dict[str, str]) -> None:
        self.port = _free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        spec = importlib.util.find_spec("prefect")
        assert spec is not None and spec.origin is not None
        env = {**os.environ, **prefect_env, "PREFECT_UI_ENABLED": "0"}
        env |= {"PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline, its lookup only delays start-up
        self.process = subprocess.Popen(
            [
                *(sys.executable, "-m", "uvicorn", "--app-dir", str(Path(spec.origin).parent.parent)),
                *("--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1"),
                *("--port", str(self.port), "--log-level", "error", "--lifespan", "on"),
            ],
            env=env,
        )
        self.running.add(self)

    def wait(self, timeout: float) -> None:
        """Until the server answers its health check; a server that exits or never answers is an error."""
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"the temporary Prefect server exited with code {self.process.returncode}")
                try:
                    if client.get(f"{self.api_url}/health").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
        raise RuntimeError(
            f"the temporary Prefect server did not answer within {timeout:g} s: set "
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS higher, or PREFECT_API_URL to a running server"
        )

    def stop(self) -> None:
        self.running.discard(self)
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextmanager
def _api_url(url: str) -> Iterator[None]:
    """Point every Prefect client at ``url``: the environment too, since Prefect's own background
    threads (logs, events) read their settings from it, not from this thread's context."""
    from prefect.context import refresh_global_settings_context  # noqa: PLC0415 (with the server only)

    before = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = url
    refresh_global_settings_context()
    try:
        with temporary_settings({PREFECT_API_URL: url}):
            yield
    finally:
        if before is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = before
        refresh_global_settings_context()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
