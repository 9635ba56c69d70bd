"""Benchmark: writing bars through the stores, and our line-protocol serializer.

    .venv/bin/python tests/benchmarks/store_writes.py [--bars 1000000] [--fields 15]

Starts a real InfluxDB 1.x (`influxd`) on a free loopback port and, side by side in one run:
- writes the bars through `InfluxDBV1Store.write_bars` and prints points/s, then POSTs the same
  pre-serialized line protocol (same batches, same gzip) with a plain httpx client into a fresh
  database, and prints the ratio of the two rates;
- times `serialize` against influxdb-client's `DataframeSerializer` on the same frame;
- writes the bars into a fresh DuckDB file, best of 3, and prints bars/s; then writes them again
  over what each file holds (a rewrite), best of 3.
"""

from __future__ import annotations

import argparse
import gzip
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
from influxdb_client.client.write.dataframe_serializer import DataframeSerializer
from influxdb_client.client.write_api import PointSettings
from influxdb_client.domain.write_precision import WritePrecision

from blocks.duckdb_store import DuckDBStore
from blocks.influxdb_v1_store import InfluxDBV1Store
from blocks.line_protocol import batches, serialize
from tests.servers import influxdb_server

TAGS = ["symbol", "interval", "source"]


def synthetic(n: int, fields: int) -> pd.DataFrame:
    """Minute bars over 100 symbols, with float fields of realistic magnitude and a few NaN."""
    rng = np.random.default_rng(5)
    per = n // 100
    frame = pd.DataFrame(
        {
            "time": np.tile(pd.date_range("2015-01-01", periods=per, freq="min", tz="UTC"), 100),
            "symbol": np.repeat([f"S{i:03d}" for i in range(100)], per),
            "interval": "1m",
            "source": "bench",
        }
    )
    for i in range(fields):
        frame[f"f{i:02d}"] = 100 * np.exp(rng.normal(0, 0.3, len(frame)))
    frame.loc[frame.index[::97], "f00"] = np.nan
    return frame


def timed(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bars", type=int, default=1_000_000)
    parser.add_argument("--fields", type=int, default=15)
    args = parser.parse_args()
    bars = synthetic(args.bars, args.fields)
    n = len(bars)

    sample = bars.iloc[:100_000]
    ours = timed(lambda: b"".join(batches(serialize(sample, "bars", TAGS))))
    theirs = timed(
        lambda: DataframeSerializer(
            sample.set_index("time"),
            PointSettings(),
            precision=WritePrecision.S,
            data_frame_measurement_name="bars",
            data_frame_tag_columns=TAGS,
        ).serialize()
    )
    print(f"rows, fields              {n:>12,} x {args.fields}")
    print(f"serialize (ours)          {len(sample) / ours:>12,.0f} rows/s")
    print(f"DataframeSerializer       {len(sample) / theirs:>12,.0f} rows/s")
    print(f"ratio ours / theirs       {theirs / ours:>12.2f}x faster")

    with tempfile.TemporaryDirectory() as home, influxdb_server(Path(home) / "influxdb") as url:
        store = InfluxDBV1Store(url=url, database="through_store")
        store_time = timed(lambda: store.write_bars(bars))
        bodies = [gzip.compress(b, compresslevel=1) for b in batches(serialize(bars, "bars", TAGS))]
        with httpx.Client(base_url=url, timeout=60) as client:
            client.post("/query", params={"q": "CREATE DATABASE plain"}).raise_for_status()
            headers = {"Content-Encoding": "gzip"}

            def post_all() -> None:
                for body in bodies:
                    client.post("/write", params={"db": "plain", "precision": "s"}, content=body, headers=headers)

            plain_time = timed(post_all)
        print(f"InfluxDB 1.x, store       {n / store_time:>12,.0f} points/s")
        print(f"InfluxDB 1.x, plain POST  {n / plain_time:>12,.0f} points/s (pre-serialized, pre-gzipped)")
        print(f"ratio store / plain       {plain_time / store_time:>12.2f}")

    with tempfile.TemporaryDirectory() as folder:
        ducks = [DuckDBStore(path=str(Path(folder) / f"bench{i}.duckdb")) for i in range(3)]
        duck_time = min(timed(partial(duck.write_bars, bars)) for duck in ducks)
        print(f"DuckDB, best of 3         {n / duck_time:>12,.0f} bars/s (a fresh file each)")
        # A rewrite replaces what the file holds: the case of every incremental run's overlap.
        rewrite_time = min(timed(partial(duck.write_bars, bars)) for duck in ducks)
        print(f"DuckDB rewrite, best of 3 {n / rewrite_time:>12,.0f} bars/s (the same bars again)")


if __name__ == "__main__":
    main()
