"""`kill -9` of `marketpipe run` while it writes, for each backend; a rerun must make the store whole.

A run of 24 symbols is killed once a few of them are stored; the same command (an explicit
backfill: same --start and --end) is run again over what the kill left, and killed in turn once
about half are stored, and again at most of them. The last rerun runs to its end, then `marketpipe
replay` writes whatever is still spooled. Every bar must be stored exactly once, equal to what a run
without a kill stored. The DuckDB file is never opened between a kill and the next run: that run
must open whatever the kill left, a write-ahead log among it. The runs of one chain share a store,
so the three kills are survived together or not at all.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.conftest import Sandbox, marketpipe
from tests.drills.conftest import Drill
from tests.drills.figures import compare
from tests.drills.harness import (
    Run,
    drill_env,
    duckdb_env,
    influxdb_v1_env,
    run_args,
    run_to_end,
    spooled_points,
    stored_bars,
    symbols,
)
from tests.servers import free_port, influxdb_process

SYMBOLS = symbols(24, "K")
START, END = "2023-07-03", "2024-06-28"
SESSIONS = 260  # the sandbox's sessions from START to END
KILL_AFTER = (2, 10, 18)  # symbols stored when the run is killed
PACE = 3600 * 3  # requests an hour: the collects take 8 s, so the stores land apart


@pytest.mark.parametrize("backend", ["duckdb", "influxdb_v1"])
def test_kill_9_mid_write(
    backend: str, drill: Drill, prefect_env: dict[str, str], sandbox: Sandbox, tmp_path: Path
) -> None:
    env = drill_env(prefect_env, sandbox, tmp_path, PACE)
    port = free_port()  # a server of the drill's own, to restart if points go missing
    url, home = f"http://127.0.0.1:{port}", tmp_path / "influxd"

    def target(name: str) -> dict[str, str]:
        spool = tmp_path / f"spool-{name}"
        if backend == "duckdb":
            return duckdb_env(env, tmp_path / f"{name}.duckdb", spool)
        return influxdb_v1_env(env, url, name, spool)

    args = run_args(SYMBOLS, START, END)
    clean, faulted = target("clean"), target("killed")
    with ExitStack() as influxd:
        if backend == "influxdb_v1":
            influxd.enter_context(influxdb_process(home, port))
        code, output = run_to_end(args, clean, tmp_path / "clean.log")
        assert code == 0, output
        expected = stored_bars(clean, SYMBOLS)
        assert len(expected) == len(SYMBOLS) * SESSIONS

        for n, point in enumerate(KILL_AFTER):
            run = Run(args, faulted, tmp_path / f"run-{n}.log")
            run.wait_until(lambda: run.symbols_stored() >= point, 240, f"{point} symbols stored")  # noqa: B023
            run.kill()
            drill.inject()
            drill.notes.append(f"kill {n + 1} after {point} symbols stored ({_what_the_kill_left(faulted, backend)})")
        code, output = run_to_end(args, faulted, tmp_path / "rerun.log")
        exits = [code]
        spooled = spooled_points(faulted)
        if spooled:
            exits.append(marketpipe("replay", env=faulted).returncode)
            drill.notes.append(f"{spooled} spooled points replayed")
        result = compare(expected, stored_bars(faulted, SYMBOLS))
    if backend == "influxdb_v1" and result.lost:
        with influxdb_process(home, port):  # are they gone, or only out of the queries' sight?
            hidden = result.lost - compare(expected, stored_bars(faulted, SYMBOLS)).lost
        drill.notes.append(f"{hidden} of the {result.lost} bars no query found were back once influxd restarted")

    whole = exits == [0] * len(exits) and (result.lost, result.twice, result.differing) == (0, 0, 0)
    drill.survived(len(KILL_AFTER) if whole else 0)
    drill.finish(result.expected, result.stored, result.lost, result.twice, result.differing)
    assert (result.lost, result.twice, result.differing) == (0, 0, 0)
    assert code == 0, output
    assert exits == [0] * len(exits)


def _what_the_kill_left(env: dict[str, str], backend: str) -> str:
    """A note of the store's state after the kill, without opening a DuckDB file (the rerun must)."""
    if backend == "duckdb":
        path = Path(env["MARKETPIPE__STORAGE__DUCKDB__PATH"])
        wal = path.with_name(path.name + ".wal")
        return "a write-ahead log left" if wal.exists() and wal.stat().st_size else "no write-ahead log"
    bars = stored_bars(env, SYMBOLS)
    return f"{len(bars)} bars of {bars['symbol'].nunique() if len(bars) else 0} symbols in the store"
