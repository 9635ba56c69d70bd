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
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

from filelock import FileLock
from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, get_current_settings, temporary_settings

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


def exit_without_api(code: int) -> NoReturn:
    """End the process when the Prefect API has gone: at exit, Prefect's queues would otherwise try
    each event they hold in turn (about 7 s each against a refused connection), for minutes.

    What the run wrote is written by then: only the API's record of the run is incomplete.
    """
    from prefect.events.worker import EventsWorker  # noqa: PLC0415 (only on this path)
    from prefect.logging.handlers import APILogWorker  # noqa: PLC0415

    for worker in (EventsWorker, APILogWorker):
        worker.drain_all(timeout=UNREACHABLE_API_GRACE)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
