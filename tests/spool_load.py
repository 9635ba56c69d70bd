"""Concurrent load on one spool: threads appending tagged batches, replaying, and writing through it.

Used in-process by tests/test_spool.py, and as ``python -m tests.spool_load`` in several processes
at once against one spool directory and a real InfluxDB 1.x. Each replayed batch records its id and
a system-wide monotonic instant, so the test can check every batch was written once and in order.

Rows go through ``write_bars`` or ``write_metrics`` (``KINDS``): both replace what a key held. Against
InfluxDB 1.x the load uses metrics, which upsert without a DELETE: influxd 1.6 can drop points
written while a DELETE of another series runs, which is the store's concern, not the spool's.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd

from blocks.influxdb_v1_store import InfluxDBV1Store
from blocks.spool import Spool
from blocks.store import BarStore
from tests.test_store_conformance import frame

TAGGED = "tagged"
SYMBOLS = ("S0", "S1", "S2")  # few, so many batches share a key and their order matters
KINDS = {"bars": ("write_bars", "read_bars"), "pipeline_metrics": ("write_metrics", "read_metrics")}


@dataclass
class Load:
    """What one process's threads did to the spool."""

    appended: list[tuple[str, str, str, float]] = field(default_factory=list)  # (batch name, id, symbol, close)
    replayed: list[tuple[int, str]] = field(default_factory=list)  # (monotonic ns, id), as written back
    written: dict[str, float] = field(default_factory=dict)  # writer symbol -> the close it last wrote
    errors: list[str] = field(default_factory=list)


def tagged_spool(directory: Path, load: Load, kind: str = "bars") -> Spool:
    """A spool whose tagged batches are ``kind`` rows that note their id when the store takes them."""

    def write_back(store: BarStore, rows: pd.DataFrame, meta: dict[str, Any]) -> int:
        written: int = getattr(store, KINDS[kind][0])(rows)
        load.replayed.append((time.monotonic_ns(), str(meta["id"])))
        return written

    return Spool(directory, handlers={TAGGED: write_back})


def batch(symbol: str, close: float) -> pd.DataFrame:
    """Five daily bars of ``symbol`` whose close is ``close``: the last batch written decides it."""
    return frame(symbol, n=5).assign(close=close)


def closes(store: BarStore, symbol: str, kind: str = "bars") -> list[float]:
    """The closes stored for ``symbol``, oldest first; none for a symbol never stored."""
    stored: pd.DataFrame = getattr(store, KINDS[kind][1])(symbol)
    return stored["close"].tolist() if "close" in stored else []


def run(
    directory: Path, store: BarStore, worker: int, appenders: int, replayers: int, batches: int, kind: str = "bars"
) -> Load:
    """``appenders`` threads append ``batches`` each, ``replayers`` replay until they are done, and one
    thread writes through the spool (its own symbol), as store tasks do; all start together."""
    load = Load()
    start = threading.Barrier(appenders + replayers + 1)
    appending = threading.Event()
    appending.set()

    def guarded(step: Callable[[], None]) -> Callable[[], None]:
        def body() -> None:
            try:
                start.wait()
                step()
            except Exception as exc:  # every failure is reported, none ends the load early
                load.errors.append(f"{type(exc).__name__}: {exc}")

        return body

    def append(thread: int) -> None:
        spool = tagged_spool(directory, load, kind)
        for n in range(batches):
            symbol, ident = SYMBOLS[(thread + n) % len(SYMBOLS)], f"{worker}-{thread}-{n}"
            close = float(worker * 1_000_000 + thread * 1_000 + n + 1)  # tells which batch a stored bar is from
            spooled = spool.append(TAGGED, batch(symbol, close), {"id": ident})
            load.appended.append((spooled.path.name, ident, symbol, close))

    def replay() -> None:
        spool = tagged_spool(directory, load, kind)
        while appending.is_set() or spool.pending():
            spool.replay(store)
            spool.points()

    def write() -> None:
        spool, symbol = tagged_spool(directory, load, kind), f"W{worker}"
        n = 0
        while appending.is_set():
            n += 1
            outcome = spool.write(store, kind, batch(symbol, float(n)))
            if (outcome.written, outcome.spooled) != (5, 0):
                load.errors.append(f"write {n} of {symbol}: {outcome}")
            load.written[symbol] = float(n)

    threads = [threading.Thread(target=guarded(partial(append, t))) for t in range(appenders)]
    helpers = [threading.Thread(target=guarded(replay)) for _ in range(replayers)]
    helpers.append(threading.Thread(target=guarded(write)))
    for thread in (*threads, *helpers):
        thread.start()
    for thread in threads:
        thread.join()
    appending.clear()
    for thread in helpers:
        thread.join()
    return load


def main() -> None:
    parser = argparse.ArgumentParser()
    for option in ("--spool", "--url", "--database", "--go", "--kind"):
        parser.add_argument(option, required=True)
    for option in ("--worker", "--appenders", "--replayers", "--batches"):
        parser.add_argument(option, type=int, required=True)
    args = parser.parse_args()
    store = InfluxDBV1Store(url=args.url, database=args.database, write_attempts=1)
    print("ready", flush=True)
    go = Path(args.go)
    deadline = time.monotonic() + 60
    while not go.exists() and time.monotonic() < deadline:  # both processes start at once
        time.sleep(0.01)
    load = run(Path(args.spool), store, args.worker, args.appenders, args.replayers, args.batches, args.kind)
    json.dump(asdict(load), sys.stdout)


if __name__ == "__main__":
    main()
