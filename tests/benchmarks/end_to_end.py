"""Benchmark: the whole job, measured side by side in one run, against the targets it must meet.

    .venv/bin/python tests/benchmarks/end_to_end.py [--quick] [--influx] [--keep] [--sizes SMALL,LARGE]

Against the sandbox (Yahoo's v8 chart API, synthetic symbols S0000, S0001 ..., 2015-01-01..2024-12-31,
about 2,609 daily bars each) it times:

1. a naive loop a user might write (httpx, pandas, pandas-ta on TA-Lib, DuckDB; one symbol after another);
2. `marketpipe run` over the same 500 symbols into DuckDB, and again with `collection.batch_size: 50`;
3. the same 500 symbols into a real InfluxDB 1.x (`influxd`, as the suite starts it);
4. 5,000 symbols into DuckDB: wall time against ten times the symbols, peak memory;
5. the most task runs any flow run made, read from the ephemeral Prefect server's SQLite database;
6. the pace held against a sandbox allowing 5 requests in any second, in ephemeral mode.

Every `marketpipe run` is a child process in Prefect's ephemeral mode (no PREFECT_API_URL) whose
PREFECT_HOME a 1-symbol warm-up run created first, timed from its start to its exit, its memory the
peak of the summed RSS of its process tree, sampled every 0.2 s. `--quick` runs 50 and 500 symbols
instead of 500 and 5,000, without InfluxDB (unless `--influx`). The sandbox answers from a thread of
this process (about 12 ms of CPU per 2,609-bar answer); the naive loop and marketpipe share that cost.

Progress goes to stderr, the markdown table to stdout. Exit 0: every target passed; 1: a target
failed; 2: a run failed (its exit code and the tail of its output are printed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

from flows.sandbox import SandboxConfig, SandboxServer, read_request_log, start_sandbox, synthetic_series
from tests.servers import influxdb_server

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
START, END = "2015-01-01", "2024-12-31"
FAST = 3_600_000  # requests per hour: no pacing to speak of, the job's own speed is measured
INFLUX_DATABASE = "bench"
BATCH_SIZE = 50
ARGV_LIMIT = 100_000  # characters of --symbols; Linux takes 128 KiB in one argument

WALL_TARGET = 30.0  # seconds, 500 symbols into DuckDB
SCALE_TARGET = 10.5  # ten times the symbols may take at most this many times as long
RSS_TARGET = 1024**3  # bytes, the 5,000-symbol run's peak
TASK_RUNS_TARGET = 1000  # per flow run
PACE_ALLOWED = 5  # requests the sandbox accepts in any PACE_WINDOW
PACE_WINDOW = 1.0
PACE_RATE_LIMIT = 18_000  # requests per hour, the same 5/s as configured
PACE_SYMBOLS = 60
PACE_START, PACE_END = "2024-01-01", "2024-02-29"
PACE_TARGET = 0.9


# Prefect's console lines of a flow run: "14:58:21.457 | INFO    | Flow run 'gigantic-coati' - ..."
FLOW_LOG = re.compile(r"^(\d\d:\d\d:\d\d\.\d+) \| \w+ +\| Flow run '", re.MULTILINE)


def _seconds_of_day(stamp: str) -> float:
    hours, minutes, seconds = stamp.split(":")
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


class RunFailedError(Exception):
    """A measured run did not do its job: the benchmark's figures would mean nothing."""


@dataclass
class Measured:
    """One child process: how long from start to exit, its tree's peak RSS, its exit code and output."""

    wall: float
    peak_rss: int
    code: int
    stdout: Path
    stderr: Path

    def flow_span(self) -> float | None:
        """Seconds from the flow run's first log line to its last, from Prefect's console log: what
        of the wall time the flow itself took, the rest being start-up and shut-down."""
        stamps = [m.group(1) for m in FLOW_LOG.finditer(self.stderr.read_text(errors="replace"))]
        if len(stamps) < 2:
            return None
        first, last = (_seconds_of_day(stamp) for stamp in (stamps[0], stamps[-1]))
        return (last - first) % 86_400

    def tail(self, chars: int = 3000) -> str:
        out = self.stdout.read_text(errors="replace")[-chars:]
        err = self.stderr.read_text(errors="replace")[-chars:]
        return f"--- stdout (tail) ---\n{out}\n--- stderr (tail) ---\n{err}"


@dataclass
class Line:
    """One line of the table: a figure, the target it is held to (if any) and whether it met it."""

    measurement: str
    figure: str
    target: str = "—"
    passed: bool | None = None
    wall: float | None = None
    peak_rss: int | None = None
    code: int | None = None
    verdict: str = ""

    def cells(self) -> list[str]:
        verdict = self.verdict or {True: "PASS", False: "FAIL", None: "—"}[self.passed]
        return [
            self.measurement,
            f"{self.wall:.1f}" if self.wall is not None else "",
            f"{self.peak_rss / 2**20:.0f}" if self.peak_rss is not None else "",
            str(self.code) if self.code is not None else "",
            self.figure,
            self.target,
            verdict,
        ]


@dataclass
class Report:
    lines: list[Line] = field(default_factory=list)

    def add(self, line: Line) -> None:
        self.lines.append(line)
        say(f"{line.measurement}: {line.figure} (target {line.target}) {line.cells()[-1]}")

    def table(self) -> str:
        header = ["measurement", "wall (s)", "peak RSS (MiB)", "exit", "figure", "target", "result"]
        rows = [header, ["---"] * len(header), *(line.cells() for line in self.lines)]
        return "\n".join("| " + " | ".join(row) + " |" for row in rows)

    def all_passed(self) -> bool:
        return all(line.passed is not False for line in self.lines)


_started = time.monotonic()


def say(message: str) -> None:
    sys.stderr.write(f"[{time.monotonic() - _started:7.1f}s] {message}\n")
    sys.stderr.flush()


def symbols(count: int) -> list[str]:
    return [f"S{n:04d}" for n in range(count)]


# --- the naive baseline -------------------------------------------------------------------------


def naive_loop(base_url: str, database: str, start: str, end: str, names: str) -> None:
    """The job as a user might write it without marketpipe: fetch, frame, indicators, insert, one
    symbol after another. The indicators are the default config's, on pandas-ta's TA-Lib backend."""
    import duckdb
    import numpy as np
    import pandas as pd
    import pandas_ta as ta

    period1 = int(pd.Timestamp(start, tz="UTC").timestamp())
    period2 = int((pd.Timestamp(end, tz="UTC") + pd.Timedelta(days=1)).timestamp())
    con = duckdb.connect(database)
    with httpx.Client(timeout=30) as client:
        for symbol in names.split(","):
            params: dict[str, str | int] = {"period1": period1, "period2": period2, "interval": "1d"}
            response = client.get(f"{base_url}{symbol}", params=params)
            response.raise_for_status()
            result = json.loads(response.content)["chart"]["result"][0]
            quote = result["indicators"]["quote"][0]
            frame = pd.DataFrame(
                {
                    "time": pd.to_datetime(result["timestamp"], unit="s", utc=True).normalize(),
                    "symbol": symbol,
                    **{k: np.asarray(quote[k], dtype=np.float64) for k in ("open", "high", "low", "close", "volume")},
                    "adj_close": np.asarray(result["indicators"]["adjclose"][0]["adjclose"], dtype=np.float64),
                }
            )
            close = frame["close"]
            frame["sma_20"] = ta.sma(close, length=20, talib=True)
            frame["ema_20"] = ta.ema(close, length=20, talib=True)
            frame["rsi_14"] = ta.rsi(close, length=14, talib=True)
            macd = ta.macd(close, fast=12, slow=26, signal=9, talib=True)
            frame["macd_12_26_9"] = macd["MACD_12_26_9"]
            frame["macd_signal_12_26_9"] = macd["MACDs_12_26_9"]
            frame["macd_hist_12_26_9"] = macd["MACDh_12_26_9"]
            bands = ta.bbands(close, length=20, lower_std=2.0, upper_std=2.0, mamode="sma", talib=True)
            frame["bb_lower_20_2"] = bands.iloc[:, 0]
            frame["bb_mid_20_2"] = bands.iloc[:, 1]
            frame["bb_upper_20_2"] = bands.iloc[:, 2]
            frame["atr_14"] = ta.atr(frame["high"], frame["low"], close, length=14, talib=True)
            frame["obv"] = ta.obv(close, frame["volume"], talib=True)
            con.register("frame", frame)
            con.execute("CREATE TABLE IF NOT EXISTS bars AS SELECT * FROM frame LIMIT 0")
            con.execute("INSERT INTO bars SELECT * FROM frame")
            con.unregister("frame")
    con.close()


NAIVE_COMMAND = "import sys; from tests.benchmarks.end_to_end import naive_loop; naive_loop(*sys.argv[1:])"


# --- measuring a child process -------------------------------------------------------------------


def _process_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, session id), from /proc."""
    table: dict[int, tuple[int, int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue  # it exited meanwhile
        fields = stat.rsplit(")", 1)[1].split()  # the name, in parentheses, may hold spaces
        table[int(entry.name)] = (int(fields[1]), int(fields[3]))
    return table


def tree_rss(root: int) -> int:
    """Summed RSS (bytes) of ``root`` and its descendants, and of whatever still runs in its session
    (a grandchild whose parent exited is adopted by init but was started by the run)."""
    table = _process_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    members = {pid for pid, (_, session) in table.items() if session == root}
    seen: set[int] = set()
    stack = [root]
    while stack:
        pid = stack.pop()
        if pid not in seen:
            seen.add(pid)
            stack.extend(children.get(pid, []))
    members |= seen
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    for pid in members:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page  # resident pages: VmRSS
        except (OSError, IndexError, ValueError):
            continue
    return total


def measure(command: Sequence[str], env: dict[str, str], logs: Path, timeout: float) -> Measured:
    """Run ``command`` in its own session; wall time from start to exit, peak RSS of its tree."""
    logs.mkdir(parents=True, exist_ok=True)
    stdout, stderr = logs / "stdout.log", logs / "stderr.log"
    peak = 0
    done = threading.Event()
    with stdout.open("wb") as out, stderr.open("wb") as err:
        started = time.perf_counter()
        process = subprocess.Popen(command, env=env, cwd=REPO, stdout=out, stderr=err, start_new_session=True)

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, tree_rss(process.pid))
                done.wait(0.2)

        sampler = threading.Thread(target=sample, name="rss-sampler", daemon=True)
        sampler.start()
        try:
            code = process.wait(timeout=timeout)
            wall = time.perf_counter() - started
        except subprocess.TimeoutExpired:
            code, wall = -1, time.perf_counter() - started
        finally:
            done.set()
            sampler.join()
            _stop_session(process)
    measured = Measured(wall, peak, code, stdout, stderr)
    if code == -1:
        raise RunFailedError(f"{command[0]} still running after {timeout:.0f} s: stopped\n{measured.tail()}")
    return Measured(wall, peak, code, stdout, stderr)


def _stop_session(process: subprocess.Popen[bytes]) -> None:
    """Kill what is left of a run's own session: the run if it outlived its timeout, and whatever
    it started and left behind (a temporary server), which would skew the next run's figures."""
    finished = process.poll() is not None
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # nothing left: the usual case
    else:
        if finished:
            say(f"pid {process.pid} left processes behind in its session: stopped")
    process.wait()


# --- the runs ------------------------------------------------------------------------------------


@dataclass
class Bench:
    work: Path
    sandbox_url: str

    def base_env(self) -> dict[str, str]:
        """This machine's environment without a Prefect API or marketpipe settings of the user's own."""
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL" and not k.startswith("MARKETPIPE")}
        return env | {
            "PREFECT_HOME": str(self.work / "prefect"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "NUMBA_CACHE_DIR": str(self.work / "numba"),
        }

    def marketpipe_env(self, tag: str, rate_limit: int, base_url: str | None = None) -> dict[str, str]:
        run = self.work / tag
        return self.base_env() | {
            "MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__BASE_URL": base_url or self.sandbox_url,
            "MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__RATE_LIMIT": str(rate_limit),
            "MARKETPIPE__STORAGE__DUCKDB__PATH": str(run / "bars.duckdb"),
            "MARKETPIPE__STORAGE__SPOOL_DIR": str(run / "spool"),
            "MARKETPIPE__COLLECTION__RATE_LIMIT_DIR": str(run / "pacing"),
        }

    def run(self, tag: str, names: Sequence[str], env: dict[str, str], start: str = START, end: str = END) -> Measured:
        """`marketpipe run` over ``names``: a config file holds them once argv would be too long."""
        args = ["run", "--start", start, "--end", end]
        joined = ",".join(names)
        if len(joined) < ARGV_LIMIT:
            args += ["--symbols", joined]
        else:
            config = symbols_config(self.work / tag / "symbols.yaml", names)
            args += ["--config", str(config)]
        timeout = 300 + 1.0 * len(names)
        say(f"{tag}: marketpipe run, {len(names)} symbols, {start}..{end} (timeout {timeout:.0f} s)")
        measured = measure([str(BIN / "marketpipe"), *args], env, self.work / tag / "logs", timeout)
        say(f"{tag}: exit {measured.code} after {measured.wall:.1f} s, peak RSS {measured.peak_rss / 2**20:.0f} MiB")
        return measured

    def naive(self, names: Sequence[str]) -> Measured:
        database = self.work / "naive" / "bars.duckdb"
        database.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-c", NAIVE_COMMAND, self.sandbox_url, str(database), START, END, ",".join(names)]
        say(f"naive: sequential loop, {len(names)} symbols")
        measured = measure(command, self.base_env(), self.work / "naive" / "logs", 300 + 2.0 * len(names))
        say(f"naive: exit {measured.code} after {measured.wall:.1f} s, peak RSS {measured.peak_rss / 2**20:.0f} MiB")
        require_success("naive loop", measured)
        return measured


def symbols_config(path: Path, names: Sequence[str]) -> Path:
    """The development config with ``names`` as its symbols, for a list too long for one argument."""
    path.parent.mkdir(parents=True, exist_ok=True)
    settings = yaml.safe_load((REPO / "configs" / "development.yaml").read_text())
    path.write_text(yaml.safe_dump({**settings, "symbols": list(names)}))
    return path


def require_success(what: str, measured: Measured) -> None:
    if measured.code != 0:
        raise RunFailedError(f"{what} exited {measured.code}\n{measured.tail()}")


def duckdb_stored(path: Path) -> tuple[int, int]:
    """(symbols, bars) in a DuckDB file's `bars` table."""
    import duckdb

    con = duckdb.connect(str(path), read_only=True)
    try:
        row = con.execute("SELECT count(DISTINCT symbol), count(*) FROM bars").fetchone()
    finally:
        con.close()
    return (int(row[0]), int(row[1])) if row else (0, 0)


def influx_symbols(url: str, database: str) -> int:
    query = 'SHOW TAG VALUES FROM "bars" WITH KEY = "symbol"'
    answer = httpx.get(f"{url}/query", params={"db": database, "q": query}, timeout=120).json()
    series = answer["results"][0].get("series") or [{"values": []}]
    return len(series[0]["values"])


def check_stored(what: str, measured: Measured, stored: int, wanted: int) -> None:
    if stored != wanted:
        raise RunFailedError(f"{what}: {stored} of {wanted} symbols stored\n{measured.tail()}")


def most_task_runs(prefect_home: Path) -> tuple[int, str]:
    """The most task runs any flow run in the ephemeral server's database made, and that flow run's name."""
    database = prefect_home / "prefect.db"
    if not database.exists():
        raise RunFailedError(f"no Prefect database at {database}: was the run in ephemeral mode?")
    con = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        row = con.execute(
            "SELECT count(task_run.id), flow_run.name FROM task_run"
            " JOIN flow_run ON flow_run.id = task_run.flow_run_id"
            " GROUP BY task_run.flow_run_id ORDER BY count(task_run.id) DESC LIMIT 1"
        ).fetchone()
    finally:
        con.close()
    if row is None:
        raise RunFailedError(f"{database} holds no task runs")
    return int(row[0]), str(row[1])


@contextmanager
def serving(config: SandboxConfig) -> Iterator[SandboxServer]:
    server = start_sandbox(0, config)
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


# --- the benchmark -------------------------------------------------------------------------------


def run_line(name: str, measured: Measured, figure: str, target: str = "—", passed: bool | None = None) -> Line:
    return Line(name, figure, target, passed, measured.wall, measured.peak_rss, measured.code)


def small_runs(bench: Bench, report: Report, names: list[str], naive: Measured) -> Measured:
    """marketpipe over the same symbols as the naive loop, plain and with the opt-in batches."""
    n = len(names)
    env = bench.marketpipe_env("duckdb", FAST)
    plain = bench.run("duckdb", names, env)
    require_success(f"marketpipe run, {n} symbols, DuckDB", plain)
    check_stored("DuckDB run", plain, duckdb_stored(bench.work / "duckdb" / "bars.duckdb")[0], n)
    compare_to_naive(report, f"marketpipe, {n} symbols, DuckDB", plain, naive)

    env = bench.marketpipe_env("duckdb-batched", FAST) | {"MARKETPIPE__COLLECTION__BATCH_SIZE": str(BATCH_SIZE)}
    batched = bench.run("duckdb-batched", names, env)
    title = f"marketpipe, {n} symbols, DuckDB, batch_size {BATCH_SIZE}"
    if batched.code == 2 and "batch_size" in batched.stdout.read_text() + batched.stderr.read_text():
        say(f"{title}: collection.batch_size is not a known setting yet")
        report.add(Line(title, "collection.batch_size unknown", verdict="n/a (not available)", code=batched.code))
    else:
        require_success(title, batched)
        check_stored("batched DuckDB run", batched, duckdb_stored(bench.work / "duckdb-batched" / "bars.duckdb")[0], n)
        compare_to_naive(report, title, batched, naive)
    return plain


def wall_figure(measured: Measured) -> str:
    span = measured.flow_span()
    return f"{measured.wall:.1f} s" + (f" (flow run {span:.1f} s)" if span is not None else "")


def compare_to_naive(report: Report, title: str, measured: Measured, naive: Measured) -> None:
    passed = measured.wall <= WALL_TARGET
    report.add(run_line(title, measured, wall_figure(measured), f"<= {WALL_TARGET:.0f} s", passed))
    ratio = measured.wall / naive.wall
    report.add(Line(f"{title}: vs naive", f"marketpipe/naive {ratio:.2f}", "< 1", ratio < 1))


def influx_run(bench: Bench, report: Report, names: list[str], naive: Measured) -> None:
    n = len(names)
    with influxdb_server(bench.work / "influxd") as url:
        say(f"influxd on {url}")
        env = bench.marketpipe_env("influx", FAST) | {
            "MARKETPIPE__STORAGE__BACKEND": "influxdb_v1",
            "MARKETPIPE__STORAGE__INFLUXDB_V1__URL": url,
            "MARKETPIPE__STORAGE__INFLUXDB_V1__DATABASE": INFLUX_DATABASE,
        }
        measured = bench.run("influx", names, env)
        require_success(f"marketpipe run, {n} symbols, InfluxDB 1.x", measured)
        check_stored("InfluxDB run", measured, influx_symbols(url, INFLUX_DATABASE), n)
    ratio = measured.wall / naive.wall
    report.add(
        run_line(f"marketpipe, {n} symbols, InfluxDB 1.x", measured, f"{wall_figure(measured)}, {ratio:.2f}x naive")
    )


def large_run(bench: Bench, report: Report, names: list[str], small: Measured, small_n: int) -> None:
    n = len(names)
    measured = bench.run("duckdb-large", names, bench.marketpipe_env("duckdb-large", FAST))
    require_success(f"marketpipe run, {n} symbols, DuckDB", measured)
    check_stored("large DuckDB run", measured, duckdb_stored(bench.work / "duckdb-large" / "bars.duckdb")[0], n)
    scale = measured.wall / small.wall
    title = f"marketpipe, {n} symbols, DuckDB"
    report.add(
        run_line(
            title,
            measured,
            f"{wall_figure(measured)}: {scale:.2f}x the {small_n}-symbol wall",
            f"<= {SCALE_TARGET:g}x",
            scale <= SCALE_TARGET,
        )
    )
    rss_mib = measured.peak_rss / 2**20
    report.add(Line(f"{title}: memory", f"peak RSS {rss_mib:.0f} MiB", "<= 1 GiB", measured.peak_rss <= RSS_TARGET))
    most, flow_run = most_task_runs(bench.work / "prefect")
    report.add(
        Line("task runs per flow run (max)", f"{most} ({flow_run})", f"<= {TASK_RUNS_TARGET}", most <= TASK_RUNS_TARGET)
    )


def pacing_run(bench: Bench, report: Report) -> None:
    """Ephemeral mode against a sandbox that rejects a sixth request in any second."""
    log = bench.work / "pacing" / "requests.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)
    config = SandboxConfig(rate_limit=PACE_ALLOWED, rate_window=PACE_WINDOW, request_log=log, access_log=False)
    names = symbols(PACE_SYMBOLS)
    with serving(config) as server:
        env = bench.marketpipe_env("pacing", PACE_RATE_LIMIT, server.base_url)
        measured = bench.run("pacing", names, env, PACE_START, PACE_END)
    require_success(f"marketpipe run, {PACE_SYMBOLS} symbols at {PACE_ALLOWED}/s", measured)
    entries = read_request_log(log)
    accepted = sorted(float(e["t"]) for e in entries if not e.get("rate_limited"))
    rejected = sum(1 for e in entries if e.get("rate_limited"))
    if len(accepted) < 2:
        raise RunFailedError(f"the paced run made {len(accepted)} accepted requests\n{measured.tail()}")
    achieved = (len(accepted) - 1) / (accepted[-1] - accepted[0])
    ratio = achieved / PACE_ALLOWED
    title = f"ephemeral pacing, {PACE_SYMBOLS} symbols at {PACE_ALLOWED}/s"
    figure = f"achieved/allowed {ratio:.3f} ({achieved:.2f}/s over {len(accepted)} requests)"
    report.add(run_line(title, measured, figure, f">= {PACE_TARGET}", ratio >= PACE_TARGET))
    report.add(Line(f"{title}: rejections", f"{rejected} answered 429", "0", rejected == 0))


def benchmark(work: Path, small_n: int, large_n: int, influx: bool, report: Report) -> None:
    small, large = symbols(small_n), symbols(large_n)
    with serving(SandboxConfig(access_log=False)) as server:
        bench = Bench(work, server.base_url)
        warm = bench.run("warm-up", ["S9999"], bench.marketpipe_env("warm-up", FAST), "2024-01-01", "2024-01-31")
        require_success("warm-up run (creates the Prefect database)", warm)
        for name in small:  # the sandbox's series cache, warm for the naive loop as for marketpipe
            synthetic_series(name)
        naive = bench.naive(small)
        naive_symbols, naive_bars = duckdb_stored(work / "naive" / "bars.duckdb")
        check_stored("naive loop", naive, naive_symbols, small_n)
        report.add(
            run_line(f"naive loop, {small_n} symbols, DuckDB", naive, f"{naive.wall:.1f} s, {naive_bars:,} bars")
        )
        plain = small_runs(bench, report, small, naive)
        if influx:
            influx_run(bench, report, small, naive)
        large_run(bench, report, large, plain, small_n)
    pacing_run(bench, report)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="50/500 symbols instead of 500/5000, no InfluxDB")
    parser.add_argument("--influx", action="store_true", help="run the InfluxDB 1.x row in --quick too")
    parser.add_argument("--keep", action="store_true", help="keep the working directory (logs, stores)")
    parser.add_argument("--sizes", metavar="SMALL,LARGE", help="other symbol counts, to try the script out")
    options = parser.parse_args(argv)
    small_n, large_n = (50, 500) if options.quick else (500, 5000)
    if options.sizes:
        small_n, large_n = (int(n) for n in options.sizes.split(","))
    report = Report()
    work = Path(tempfile.mkdtemp(prefix="marketpipe-e2e-"))
    say(f"working in {work}")
    code = 0
    try:
        benchmark(work, small_n, large_n, options.influx or not options.quick, report)
    except RunFailedError as exc:
        say(f"RUN FAILED: {exc}")
        code = 2
    finally:
        _cleanup(work, options.keep or code == 2)
    mode = "quick" if options.quick else "full"
    print(f"End to end, {mode}: {small_n:,} and {large_n:,} symbols, {START}..{END}\n")
    print(report.table())
    return code or (0 if report.all_passed() else 1)


def _cleanup(work: Path, keep: bool) -> None:
    if keep:
        say(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
