"""Benchmark: what each step costs per symbol without Prefect, beside the naive loop's whole job.

    .venv/bin/python tests/benchmarks/steps.py [--symbols 200]

Against `marketpipe sandbox` in a process of its own (so its CPU is not counted here), synthetic
symbols of 2,609 daily bars each (2015-2024), one symbol after another, in this process:

1. the naive loop of tests/benchmarks/end_to_end.py (GET, json, pandas, pandas-ta, DuckDB insert);
2. marketpipe's collect (fetch, parse, the store's history reads), process and store (one
   symbol's write, as the per-symbol tasks do), each timed alone;
3. the same processed symbols written in batches of 50, as `collection.batch_size: 50` does.

It prints milliseconds per symbol, wall and CPU of this process, for each. The end-to-end
benchmark measures the whole job; this one says which step the time goes to.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import date
from pathlib import Path

from blocks.duckdb_store import DuckDBStore
from configs.settings import load_settings
from tasks.collect import collect
from tasks.job import Job
from tasks.processing.pipeline import Processed, process
from tasks.store import store_one, store_together
from tests.benchmarks.end_to_end import END, START, naive_loop
from tests.servers import free_port

REPO = Path(__file__).resolve().parents[2]
BATCH = 50


@contextmanager
def sandbox_process(port: int) -> Iterator[str]:
    """`marketpipe sandbox` on ``port``, stopped by PID; yields its Yahoo base URL."""
    command = [str(Path(sys.executable).parent / "marketpipe"), "sandbox", "--port", str(port)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith("sandbox listening on "):
                yield line.removeprefix("sandbox listening on ").strip()
                return
        raise RuntimeError("the sandbox exited before it listened")
    finally:
        process.terminate()
        process.wait(timeout=20)


class Clock:
    """Wall and CPU seconds of this process, summed over the timed blocks of one name."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextmanager
    def timing(self, name: str, counted: bool = True) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        if counted:
            self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - wall
            self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--symbols", type=int, default=200)
    n = parser.parse_args(argv).symbols
    names = [f"S{i:04d}" for i in range(n)]
    work = Path(tempfile.mkdtemp(prefix="marketpipe-steps-"))
    clock = Clock()
    with sandbox_process(free_port()) as base_url:
        os.environ |= {  # read by load_settings below
            "MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__BASE_URL": base_url,
            "MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__RATE_LIMIT": "3600000",
            "MARKETPIPE__STORAGE__DUCKDB__PATH": str(work / "bars.duckdb"),
            "MARKETPIPE__STORAGE__SPOOL_DIR": str(work / "spool"),
            "MARKETPIPE__COLLECTION__RATE_LIMIT_DIR": str(work / "pacing"),
        }
        naive_loop(base_url, str(work / "warm.duckdb"), START, END, names[0])  # imports, connections, caches
        with clock.timing("naive loop, the whole job"):
            naive_loop(base_url, str(work / "naive.duckdb"), START, END, ",".join(names))

        settings = load_settings(None)
        job = Job.build(settings, "yahoo_finance", "1d", date.fromisoformat(START), date.fromisoformat(END))
        batched = replace(job, store=DuckDBStore(path=str(work / "batched.duckdb")))
        processed: dict[str, Processed] = {}
        with job.store.session(), batched.store.session():
            for symbol in ["S9999", *names]:  # S9999 warms the calendars and the store's tables, untimed
                timed = symbol != "S9999"
                with clock.timing("collect", timed):
                    collected = collect(job, symbol)
                with clock.timing("process", timed):
                    result = process(
                        collected, symbol, "1d", settings.quality, settings.indicators, collected.history,
                        stored_from=collected.stored_from,
                    )  # fmt: skip
                with clock.timing("store, one symbol's write", timed):
                    store_one(result, job, symbol)
                if timed:
                    processed[symbol] = result
            items = list(processed.items())
            for i in range(0, len(items), BATCH):
                with clock.timing(f"store, batches of {BATCH}"):
                    store_together(dict(items[i : i + BATCH]), batched)
    print(f"Per symbol, {n} symbols of 2,609 daily bars, one after another, sandbox in its own process\n")
    print("| step | wall (ms/symbol) | CPU here (ms/symbol) |\n|---|---|---|")
    for name, wall in clock.wall.items():
        print(f"| {name} | {wall / n * 1000:.1f} | {clock.cpu[name] / n * 1000:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
