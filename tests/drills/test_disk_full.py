"""The spool's disk fills up while the store is down.

A real influxd is stopped, so runs spool; the spool's own small filesystem then fills up, so a run
can neither store nor spool. That run must fail naming both reasons, and lose nothing stored or
spooled before (by it or by earlier runs). Once there is space and the store is back, a replay and
the same run again store every bar exactly as a run without faults did.
"""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.parquet as pq

from blocks.spool import Spool
from tests.conftest import Sandbox
from tests.drills.conftest import Drill
from tests.drills.faults import (
    influxdb_env,
    influxdb_store,
    marketpipe,
    output,
    source_env,
    spool_disk,
    stored_bars,
)
from tests.drills.figures import compare
from tests.servers import free_port, influxdb_process

STORED, SPOOLED, FULL = ["D00", "D01", "D02"], ["D03", "D04", "D05"], [f"D{i:02d}" for i in range(6, 12)]
SYMBOLS = STORED + SPOOLED + FULL
WINDOW = ("--start", "2023-01-01", "--end", "2023-12-31")


def run(symbols: list[str]) -> list[str]:
    return ["run", "--symbols", ",".join(symbols), *WINDOW]


def test_spool_disk_full_while_the_store_is_down(
    drill: Drill, prefect_env: dict[str, str], sandbox: Sandbox, tmp_path: Path
) -> None:
    port = free_port()
    base = source_env(prefect_env, sandbox, tmp_path / "rate-limits")
    url = f"http://127.0.0.1:{port}"
    clean = influxdb_env({**base, "MARKETPIPE__STORAGE__SPOOL_DIR": str(tmp_path / "clean-spool")}, url, "clean")
    with spool_disk(tmp_path / "spool-disk", 2 * 1024 * 1024) as disk:
        drill.notes.append(f"spool on {disk.how}")
        env = influxdb_env({**base, "MARKETPIPE__STORAGE__SPOOL_DIR": str(disk.spool)}, url, f"d{uuid.uuid4().hex[:8]}")
        with influxdb_process(tmp_path / "influxdb", port), ThreadPoolExecutor(2) as both:
            reference, first = both.map(lambda a: marketpipe(*run(a[0]), env=a[1]), [(SYMBOLS, clean), (STORED, env)])
            assert reference.returncode == 0, output(reference)
            assert first.returncode == 0, output(first)

        drill.inject()  # the store goes away
        spooling = marketpipe(*run(SPOOLED), env=env)
        assert spooling.returncode == 1, output(spooling)
        spool = Spool(disk.spool)
        before = {b.path.name: b.points for b in spool.pending()}
        assert len(before) >= len(SPOOLED), output(spooling)

        # Room for about one more batch of collected bars: the run spools a symbol, then fills the disk.
        # A file size limit takes every batch or none: it lets none through.
        sizes = [b.path.stat().st_size for b in spool.pending()]
        disk.fill(leave=max(sizes) * 3 // 2 if disk.mounted else min(sizes) // 2)
        drill.inject()
        full = marketpipe(*run(FULL), env=env, preexec=disk.preexec())
        text = output(full)
        assert full.returncode == 1, text
        # The summary names every symbol: spooled, or failed with the store's reason and the spool's.
        lost = [s for s in FULL if f"{s} failed: the store could not give the history" in full.stdout]
        assert len(lost) + sum(f"{s} spooled:" in full.stdout for s in FULL) == len(FULL), text
        assert lost, "the spool took every batch: the disk was not full"
        no_space = ("No space left on device" if disk.mounted else "File too large") + ")"
        assert no_space in full.stdout.split(f"{lost[0]} failed:")[1].splitlines()[0], text
        assert "the run's pipeline_metrics were not recorded: InfluxDB at" in full.stdout, text
        assert "is unreachable" in full.stdout, text
        after = {b.path.name: b.points for b in spool.pending()}
        assert before.items() <= after.items(), "a batch spooled earlier is gone or changed"
        for batch in spool.pending():
            assert pq.read_table(batch.path).num_rows == batch.points > 0, batch.path  # whole, readable
        leftovers = [p.name for p in disk.spool.iterdir() if p.name.endswith(".partial") and "sequence" not in p.name]
        assert leftovers == [], "a torn staging file was left in the spool"
        drill.notes.append(f"{len(after) - len(before)} of {len(FULL)} symbols spooled before the disk filled")

        disk.free()
        with influxdb_process(tmp_path / "influxdb", port):
            store = influxdb_store(env)
            expected = stored_bars(influxdb_store(clean), SYMBOLS)
            kept = compare(expected[expected["symbol"].isin(STORED)], stored_bars(store, STORED))
            assert (kept.lost, kept.differing) == (0, 0), "bars stored before the outage were lost"

            asked = len(sandbox.requests())
            again = marketpipe(*run(FULL), env=env)  # replays the spool first, then collects FULL again
            assert again.returncode == 0, output(again)
            assert f"replayed {sum(after.values())} spooled points" in again.stdout + again.stderr
            assert spool.pending() == []
            figures = compare(expected, stored_bars(store, SYMBOLS))
    # SPOOLED was not collected again: its bars are the spooled ones.
    assert {e["symbol"] for e in sandbox.requests()[asked:]} == set(FULL)

    drill.survived(2)
    drill.finish(figures.expected, figures.stored, figures.lost, figures.twice, figures.differing)
    assert (figures.lost, figures.twice, figures.differing) == (0, 0, 0)
    assert figures.expected > 200 * len(SYMBOLS)  # a year of bars for each symbol
