"""A first run on a fresh PREFECT_HOME: the ephemeral server's database is made first, its start-up given time.

`.ci/run` also runs `make demo` with an empty PREFECT_HOME, the whole first run as a user meets it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prefect.settings import (
    PREFECT_API_URL,
    PREFECT_HOME,
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
    get_current_settings,
    temporary_settings,
)

from flows.local_prefect import EPHEMERAL_STARTUP_TIMEOUT, create_database, ephemeral_database, local_prefect
from tests.conftest import REPO


def startup_timeout_inside(notes: list[str]) -> float:
    with local_prefect(notes.append):
        return float(get_current_settings().server.ephemeral.startup_timeout_seconds)


def test_the_ephemeral_server_gets_time_to_start(tmp_path: Path) -> None:
    (tmp_path / "prefect.db").touch()  # an existing database: nothing to prepare
    with temporary_settings(set_defaults={PREFECT_HOME: str(tmp_path)}, restore_defaults={PREFECT_API_URL}):
        assert ephemeral_database() == tmp_path / "prefect.db"
        notes: list[str] = []
        assert startup_timeout_inside(notes) == EPHEMERAL_STARTUP_TIMEOUT
        assert notes == []
        assert get_current_settings().server.ephemeral.startup_timeout_seconds == 20  # only around the run


def test_a_users_own_startup_timeout_wins(tmp_path: Path) -> None:
    (tmp_path / "prefect.db").touch()
    with temporary_settings(
        {PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 45},
        set_defaults={PREFECT_HOME: str(tmp_path)},
        restore_defaults={PREFECT_API_URL},
    ):
        assert startup_timeout_inside([]) == 45


def test_a_configured_server_is_left_alone(tmp_path: Path) -> None:
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api", PREFECT_HOME: str(tmp_path)}):
        assert ephemeral_database() is None
        assert startup_timeout_inside([]) == 20
    assert not (tmp_path / "prefect.db").exists()


def test_a_missing_database_is_created_once_and_said_so(tmp_path: Path) -> None:
    # In a child process: creating Prefect's database imports its server, which this process should not keep.
    code = (
        "import sys; from pathlib import Path; from flows.local_prefect import create_database; "
        "notes = []; path = Path(sys.argv[1]) / 'prefect.db'; "
        "print(create_database(path, notes.append), create_database(path, notes.append), notes)"
    )
    env = {**os.environ, "PREFECT_HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], env=env, cwd=REPO, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    created, again, notes = result.stdout.strip().split(" ", 2)
    assert (created, again) == ("True", "False")
    assert "preparing the local Prefect database" in notes and "first run only" in notes
    tables = subprocess.run(
        [sys.executable, "-c", f"import sqlite3; print(sqlite3.connect({str(tmp_path / 'prefect.db')!r}).execute("
         "\"select count(*) from sqlite_master where name in ('flow_run', 'alembic_version')\").fetchone()[0])"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert tables.stdout.strip() == "2"


def test_create_database_skips_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "prefect.db"
    path.write_bytes(b"")
    notes: list[str] = []
    assert create_database(path, notes.append) is False
    assert notes == []
