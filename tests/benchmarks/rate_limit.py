"""Benchmark: does pacing hold a source's rate limit, alone and across two processes?

Starts the sandbox allowing 5 requests in any 1-second window, runs `marketpipe run` over 100
symbols with `rate_limit: 18000` (5/s), then two runs of 50 symbols at once sharing that limit,
each once on its own and once beside a CPU-bound process (a loaded machine). Prints
achieved/allowed, rejections and the busiest second as the server saw them.

    .venv/bin/python tests/benchmarks/rate_limit.py

It starts a local Prefect server (as a scheduled deployment would have) unless PREFECT_API_URL is set.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from flows.sandbox import SandboxConfig, read_request_log, start_sandbox
from tests.servers import prefect_server

ALLOWED = 5.0
BIN = Path(sys.executable).parent


def launch(symbols: list[str], workdir: Path, base_url: str, tag: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__BASE_URL": base_url,
        "MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__RATE_LIMIT": "18000",
        "MARKETPIPE__STORAGE__DUCKDB__PATH": str(workdir / f"{tag}.duckdb"),
        "MARKETPIPE__COLLECTION__RATE_LIMIT_DIR": str(workdir / "rate-limits"),
    }
    args = ["run", "--symbols", ",".join(symbols), "--start", "2024-01-01", "--end", "2024-02-29"]
    return subprocess.Popen(
        [str(BIN / "marketpipe"), *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def report(title: str, entries: list[dict[str, Any]]) -> None:
    accepted = sorted(e["t"] for e in entries if not e.get("rate_limited"))
    rejected = sum(1 for e in entries if e.get("rate_limited"))
    achieved = (len(accepted) - 1) / (accepted[-1] - accepted[0])
    busiest = max(sum(1 for t in accepted if s <= t < s + 1.0) for s in accepted)
    print(
        f"{title:<34} requests {len(entries):>4}  rejected {rejected:>2}  achieved {achieved:5.2f}/s  "
        f"achieved/allowed {achieved / ALLOWED:5.3f}  busiest second {busiest}"
    )


def scenario(title: str, groups: list[list[str]], busy: bool = False) -> None:
    title = f"{title}, beside a CPU hog" if busy else title
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        if busy:
            stack.enter_context(cpu_hog())
        workdir = Path(tmp)
        log = workdir / "requests.jsonl"
        server = start_sandbox(0, SandboxConfig(rate_limit=5, rate_window=1.0, request_log=log, access_log=False))
        try:
            started = time.perf_counter()
            runs = [launch(group, workdir, server.base_url, f"run{i}") for i, group in enumerate(groups)]
            for run in runs:
                _, stderr = run.communicate(timeout=900)
                if run.returncode != 0:
                    sys.stderr.write(stderr.decode()[-2000:])
            elapsed = time.perf_counter() - started
        finally:
            server.shutdown()
            server.server_close()
        report(title, read_request_log(log))
        print(f"{'':<34} wall time {elapsed:.1f}s (includes Prefect start-up)")


def main() -> None:
    symbols = [f"S{i:03d}" for i in range(100)]
    with ExitStack() as stack:
        if "PREFECT_API_URL" not in os.environ:
            home = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            os.environ["PREFECT_API_URL"] = stack.enter_context(prefect_server(home))
        for busy in (False, True):
            scenario("one process, 100 symbols", [symbols], busy)
            scenario("two processes, 50 symbols each", [symbols[:50], symbols[50:]], busy)


@contextmanager
def cpu_hog() -> Iterator[None]:
    """A process that keeps one core busy until the block ends, stopped by PID."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        hog.kill()
        hog.wait()


if __name__ == "__main__":
    main()
