"""influxd stopped and started again, several times, during one run of 50 symbols into influxdb_v1.

The run is paced so that it lasts through the stops: each time more of its symbols are stored,
the server is stopped for a few seconds and started again on the same port and data. What the run
could not write waits in the spool; the run may end 1 because of it. `marketpipe replay` (with the
server up) writes the rest, and every bar must then be stored exactly once, equal to what a run
without the stops stored.
"""

from __future__ import annotations

import time
from pathlib import Path

from tests.conftest import Sandbox, marketpipe
from tests.drills.conftest import Drill
from tests.drills.figures import compare
from tests.drills.harness import (
    Run,
    drill_env,
    influxdb_v1_env,
    run_args,
    run_to_end,
    spooled_points,
    stored_bars,
    symbols,
)
from tests.servers import free_port, influxdb_process

SYMBOLS = symbols(50, "R")
START, END = "2024-01-02", "2024-06-28"
SESSIONS = 129  # the sandbox's sessions from START to END
STOP_AFTER = (3, 14, 26, 38)  # symbols stored when influxd is stopped
DOWN = 3.0  # seconds each stop lasts, after the server has exited
# One request a second. The flow queues every collect first, so stores begin once the last 16
# collects are left; paced so, they land over the run's last 16 s or more, not all at once.
PACE = 3600


def test_influxd_restarted_during_a_run(
    drill: Drill, prefect_env: dict[str, str], sandbox: Sandbox, tmp_path: Path
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = drill_env(prefect_env, sandbox, tmp_path, PACE)
    faulted = influxdb_v1_env(env, url, "restarted", tmp_path / "spool")
    home = tmp_path / "influxd"
    args = run_args(SYMBOLS, START, END)

    run = Run(args, faulted, tmp_path / "run.log")
    for point in STOP_AFTER:
        with influxdb_process(home, port):
            run.wait_until(lambda: run.symbols_stored() >= point, 240, f"{point} symbols stored")  # noqa: B023
        drill.inject()  # influxd has exited: the run's writes find nothing listening
        time.sleep(DOWN)

    with influxdb_process(home, port):
        code = run.wait()
        output = run.output()
        spooled = spooled_points(faulted)
        replayed = marketpipe("replay", env=faulted)
        said = replayed.stdout.strip().splitlines()[:1] or ["no output"]
        drill.notes.append(f"run exit {code}, {spooled} points spooled; replay exit {replayed.returncode}: {said[0]}")
        clean = influxdb_v1_env(env, url, "clean", tmp_path / "spool-clean")
        # The pace changes no bar: the run without stops may go faster.
        clean |= {"MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__RATE_LIMIT": str(PACE * 4)}
        clean_code, clean_output = run_to_end(args, clean, tmp_path / "clean.log")
        assert clean_code == 0, clean_output
        expected = stored_bars(clean, SYMBOLS)
        assert len(expected) == len(SYMBOLS) * SESSIONS
        result = compare(expected, stored_bars(faulted, SYMBOLS))
        left = spooled_points(faulted)

    whole = (result.lost, result.twice, result.differing, left, replayed.returncode) == (0, 0, 0, 0, 0)
    drill.survived(len(STOP_AFTER) if whole else 0)
    drill.finish(result.expected, result.stored, result.lost, result.twice, result.differing)
    assert (result.lost, result.twice, result.differing) == (0, 0, 0)
    assert code in (0, 1), output
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert left == 0
