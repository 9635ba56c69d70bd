"""The ``marketpipe`` command line. Exit codes: 0 all good, 1 some symbols failed, 2 usage or config error."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tasks.errors import UsageError

if TYPE_CHECKING:
    import httpx
    import pandas as pd


# The pipeline's modules (pandas, Prefect, the calendars) are imported by the commands that use
# them: they take seconds to load, and `--help`, a usage error or `sandbox` need none of them.

if TYPE_CHECKING:
    from blocks.spool import Replayed
    from flows.sandbox import SandboxConfig
    from flows.scoped_token import ScopedTokenTarget
    from tasks.monitoring.health import Status

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

app = typer.Typer(
    name="marketpipe",
    help="Collect OHLCV bars, validate them, compute indicators and store them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Piped output (logs, CI) gets a wide table instead of rich's 80-column default.
console = Console() if sys.stdout.isatty() else Console(width=240)


def _error(message: str) -> None:
    typer.echo(f"error: {message}", err=True)


def _note(message: str) -> None:
    """A progress line on stderr, so piped output stays data."""
    typer.echo(message, err=True)


ConfigOption = Annotated[
    Path | None, typer.Option("--config", help="YAML settings file (default: configs/$MARKETPIPE_ENV.yaml)")
]
T = TypeVar("T")


def _or_exit[T](step: Callable[[], T]) -> T:
    """Run a validation step; a usage or config problem prints one clear message and exits 2."""
    from configs.settings import ConfigError

    try:
        return step()
    except (ConfigError, UsageError) as exc:
        _error(str(exc))
        raise typer.Exit(EXIT_USAGE) from None


def _parse_instant(value: str | None, option: str) -> float | None:
    """An ISO 8601 instant as epoch seconds; a naive one is read as UTC."""
    if value is None:
        return None
    try:
        instant = datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(f"{option} {value!r} is not an instant: use e.g. 2024-03-13T21:30:00Z") from None
    return (instant if instant.tzinfo else instant.replace(tzinfo=UTC)).timestamp()


@app.command()
def run(
    symbols: Annotated[
        str | None, typer.Option(help="Comma-separated symbols (default: `symbols` in the config)")
    ] = None,
    source: Annotated[str, typer.Option(help="A key of data_sources in the config")] = "yahoo_finance",
    interval: Annotated[str, typer.Option(help="Bar interval, e.g. 1d")] = "1d",
    start: Annotated[
        str | None,
        typer.Option(help="First date, YYYY-MM-DD: an explicit backfill (default: resume after the last stored bar)"),
    ] = None,
    end: Annotated[str | None, typer.Option(help="Last date, YYYY-MM-DD, inclusive (default: today)")] = None,
    config: ConfigOption = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Prefect's per-task log lines")] = False,
) -> None:
    """Run the market-data flow locally and print a per-symbol summary."""
    from configs.settings import load_settings
    from tasks.bars import parse_date, validate_interval, validate_symbols
    from tasks.sources.base import check_sources

    settings = _or_exit(lambda: load_settings(config))
    _or_exit(lambda: check_sources(settings))  # each source's own keys, before anything starts
    wanted = symbols.split(",") if symbols else settings.symbols
    checked = _or_exit(lambda: validate_symbols(wanted))
    _or_exit(lambda: validate_interval(interval))
    first = _or_exit(lambda: parse_date(start, "--start"))
    last = _or_exit(lambda: parse_date(end, "--end"))

    if first and last and first > last:
        _or_exit(lambda: _raise(UsageError(f"--start {first} is after --end {last}: swap them")))
    import httpx

    from flows import progress
    from flows.local_prefect import started_early

    # The temporary Prefect server starts while the flow's modules import, on the other core.
    with started_early(_note) as server_ready:
        from tasks import process_pool

        # Processing workers (`collection.processes`) start now too, while the server starts and the flow imports.
        process_pool.start(settings.collection.processes)
        from flows.market_data import SymbolsFailedError, market_data
        from tasks.collect import check_source

        _or_exit(lambda: check_source(settings, source))
        _wait_for(server_ready)
        try:
            with progress.shown(console, verbose):  # left before _api_lost ends the process: the cursor comes back
                state = market_data(
                    symbols=checked,
                    source=source,
                    interval=interval,
                    start=first,
                    end=last,
                    config=str(config) if config else None,
                    return_state=True,
                )
        except httpx.TransportError as exc:  # the API went away and its client's retries ran out
            _api_lost(exc, settings.storage.spool_dir)
    outcome = state.result(raise_on_failure=False)
    if isinstance(outcome, SymbolsFailedError):
        _print_summary([r.row() for r in outcome.results], settings.storage.spool_dir)
        if outcome.metrics_error:
            from flows.market_data import describe_metrics_error

            console.print(
                f"[red]{escape(describe_metrics_error(outcome.metrics_error))}[/]", highlight=False, soft_wrap=True
            )
        raise typer.Exit(EXIT_FAILED)
    if isinstance(outcome, BaseException):
        _error(f"the flow failed: {outcome}")
        raise typer.Exit(EXIT_FAILED)
    _print_summary(outcome, settings.storage.spool_dir)


def _api_lost(error: httpx.TransportError, spool_dir: str) -> NoReturn:
    from prefect.settings import get_current_settings

    from flows.local_prefect import exit_without_api
    from tasks.redaction import redact_url

    _error(
        f"the Prefect API at {redact_url(str(get_current_settings().api.url))} became unreachable during the run "
        f"({type(error).__name__}: {error}): the bars written are stored and those spooled wait in {spool_dir}; "
        "run the same command again once the server is back: it collects again what this run did not store"
    )
    exit_without_api(EXIT_FAILED)


def _wait_for(server_ready: Callable[[], None]) -> None:
    """Wait for the temporary Prefect server; one that did not start exits 1 with its reason."""
    try:
        server_ready()
    except RuntimeError as exc:
        _error(str(exc))
        raise typer.Exit(EXIT_FAILED) from None


def _raise(error: Exception) -> None:
    raise error


# A run over more symbols lists only those that need a look: 5,000 rows would bury them.
SUMMARY_ROWS = 50


def _print_summary(rows: list[dict[str, Any]], spool_dir: str) -> None:
    listed = rows if len(rows) <= SUMMARY_ROWS else [r for r in rows if r["status"] != "ok"]
    if listed:
        console.print(_summary_table(listed))
    if len(listed) < len(rows):
        console.print(
            f"{len(rows) - len(listed)} of {len(rows)} symbols ok, not listed: every symbol's row is in the flow "
            "run's market-data-summary artifact and in pipeline_metrics",
            highlight=False,
            soft_wrap=True,
        )
    _print_retention(rows)
    for r in rows:
        if r.get("restated"):
            console.print(f"[yellow]{r['symbol']} restated:[/] {r['restated']}", highlight=False, soft_wrap=True)
    for r in rows:
        if r["live_bars_skipped"]:
            console.print(
                f"{r['symbol']}: {r['live_bars_skipped']} live bar(s) not stored: their session was still open; "
                "a run after the close stores them",
                highlight=False,
                soft_wrap=True,
            )
    for r in rows:
        if (r["missing_sessions"] or 0) - (r["uncovered_sessions"] or 0):  # gaps inside the series
            console.print(f"[yellow]{r['symbol']}:[/] {r['gaps']}", highlight=False, soft_wrap=True)
        if r["coverage"]:
            console.print(f"[yellow]{r['symbol']}:[/] {r['coverage']}", highlight=False, soft_wrap=True)
    for r in rows:
        if r["status"] != "ok":
            console.print(f"[red]{r['symbol']} {r['status']}:[/] {r['error']}", highlight=False, soft_wrap=True)
    _print_spool_notes(rows, spool_dir)


def _summary_table(rows: list[dict[str, Any]]) -> Table:
    from tasks.process import describe_counts
    from tasks.processing.pipeline import COUNTED

    table = Table(title="market-data run")
    columns = ("symbol", "status", "rows written", "spooled", "collected", *COUNTED, "missing sessions", "actions",
               "requests", "window", "history from")  # fmt: skip
    for column in columns:
        table.add_column(column)
    colours = {"ok": "green", "deferred": "yellow", "spooled": "yellow"}
    for r in rows:
        status = f"[{colours.get(r['status'], 'red')}]{r['status']}[/]"
        counts = [describe_counts(r[k]) or "0" for k in COUNTED]
        sessions = "n/a" if r["missing_sessions"] is None else str(r["missing_sessions"])
        table.add_row(
            r["symbol"], status, str(r["rows_written"]), str(r["spooled"]), str(r["bars_collected"]), *counts, sessions,
            str(r["actions_written"]), str(r["requests"]), r["window"], r["history_from"],
        )  # fmt: skip
    return table


def _print_spool_notes(rows: list[dict[str, Any]], spool_dir: str) -> None:
    """What waits in the spool after a run: points to replay, and batches the store refused."""
    spooled = sum(r["spooled"] for r in rows)
    if spooled:
        console.print(
            f"[yellow]{spooled} points are spooled in {spool_dir}:[/] run `marketpipe replay` once the store is "
            "back; the next run replays them too",
            highlight=False,
            soft_wrap=True,
        )
    if rows and rows[0].get("spool_rejected"):
        from flows.market_data import describe_rejected

        line = describe_rejected(rows[0]["spool_rejected"], spool_dir)
        console.print(f"[yellow]{escape(line)}[/]", highlight=False, soft_wrap=True)


def _print_retention(rows: list[dict[str, Any]]) -> None:
    """Windows cut to the store's retention (one line for the symbols sharing one), and points it dropped."""
    clamps: dict[str, list[str]] = {}
    for r in rows:
        if r.get("clamped"):
            clamps.setdefault(r["clamped"], []).append(r["symbol"])
    for clamp, symbols in clamps.items():
        console.print(f"[yellow]{', '.join(symbols)}:[/] {clamp}", highlight=False, soft_wrap=True)
    for r in rows:
        if r.get("dropped_by_retention"):
            console.print(
                f"{r['symbol']}: the store dropped {r['dropped_by_retention']} point(s) older than its retention; "
                "it keeps none that old, and the rest were written",
                highlight=False,
                soft_wrap=True,
            )


@app.command()
def query(
    symbol: Annotated[str, typer.Option(help="The symbol to read")],
    interval: Annotated[str, typer.Option()] = "1d",
    source: Annotated[str | None, typer.Option(help="Only this source (default: all)")] = None,
    start: Annotated[str | None, typer.Option(help="First date, YYYY-MM-DD")] = None,
    end: Annotated[str | None, typer.Option(help="Last date, YYYY-MM-DD, inclusive")] = None,
    format: Annotated[Literal["csv", "json", "table"], typer.Option("--format")] = "table",  # noqa: A002
    quarantine: Annotated[
        bool, typer.Option("--quarantine", help="Show the bars set aside by validation, with rule and reason")
    ] = False,
    config: ConfigOption = None,
) -> None:
    """Print stored bars oldest first, with every stored column and time in ISO-8601 UTC."""
    from blocks.store import StoreError
    from blocks.stores import store_from_settings
    from configs.settings import load_settings
    from flows.api import read_stored
    from tasks.bars import parse_date, validate_interval, validate_symbol

    settings = _or_exit(lambda: load_settings(config))
    checked = _or_exit(lambda: validate_symbol(symbol))
    _or_exit(lambda: validate_interval(interval))
    first = _or_exit(lambda: parse_date(start, "--start"))
    last = _or_exit(lambda: parse_date(end, "--end"))
    store = _or_exit(lambda: store_from_settings(settings.storage))
    try:
        frame = read_stored(store, checked, interval, source, first, last, quarantine)
    except StoreError as exc:
        _error(str(exc))
        raise typer.Exit(EXIT_FAILED) from None
    if frame.empty and quarantine:
        _error(f"no quarantined {interval} bars for {checked}")
    elif frame.empty:
        _error(f"no stored {interval} bars for {checked}: run `marketpipe run --symbols {checked}` first")
    _emit(frame, format)


def _iso(ts: datetime) -> str:
    import pandas as pd

    return pd.Timestamp(ts).tz_convert("UTC").strftime("%Y-%m-%dT%H:%M:%SZ")


def _emit(frame: pd.DataFrame, fmt: str) -> None:
    out = frame.copy()
    out["time"] = out["time"].map(_iso)
    if fmt == "csv":
        out.to_csv(sys.stdout, index=False, na_rep="")
    elif fmt == "json":
        records = [
            {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
            for row in out.to_dict(orient="records")
        ]
        sys.stdout.write(json.dumps(records, indent=1) + "\n")
    else:
        table = Table(show_lines=False)
        for column in out.columns:
            table.add_column(str(column), overflow="fold")
        for row in out.itertuples(index=False):
            table.add_row(
                *(
                    "" if isinstance(v, float) and math.isnan(v) else f"{v:.6g}" if isinstance(v, float) else str(v)
                    for v in row
                )
            )
        console.print(table)
        console.print(f"{len(out)} row(s)")


@app.command()
def sandbox(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1 (0 picks a free one)")] = 8765,
    replay: Annotated[Path | None, typer.Option(help="Serve captured Yahoo responses: DIR/<SYMBOL>.json")] = None,
    not_found: Annotated[
        str | None, typer.Option(help="Symbols answered with Yahoo's 404 body, comma-separated")
    ] = None,
    latency: Annotated[float, typer.Option(help="Seconds added to every response")] = 0.0,
    rate_limit: Annotated[int | None, typer.Option(help="Requests accepted in any --rate-window seconds")] = None,
    rate_window: Annotated[float, typer.Option(help="Seconds of the rate-limit window")] = 1.0,
    av_daily_quota: Annotated[
        int | None, typer.Option(help="Alpha Vantage calls answered per UTC day; later ones get its quota body")
    ] = None,
    fault_rate: Annotated[float, typer.Option(help="Probability that a request gets a fault")] = 0.0,
    fault_kinds: Annotated[
        str, typer.Option(help="Faults to draw from: 5xx,timeout,malformed,html,429")
    ] = "5xx,timeout,malformed,html",
    fault: Annotated[list[str] | None, typer.Option(help="SYMBOL=KIND: that symbol always gets that fault")] = None,
    timeout_delay: Annotated[float, typer.Option(help="Seconds a 'timeout' fault stalls before its 504")] = 5.0,
    seed: Annotated[int, typer.Option(help="Seed of the fault draws")] = 0,
    request_log: Annotated[
        Path | None, typer.Option(help="Append one JSON line per request (secrets redacted)")
    ] = None,
    now: Annotated[
        str | None, typer.Option(help="Serve as if it were this instant (ISO 8601, UTC unless an offset is given)")
    ] = None,
    clock: Annotated[
        str | None,
        typer.Option(help="A running simulated clock, INSTANT[,speed=X][,anchor=EPOCH]: intraday bars and ticks by it"),
    ] = None,
    stream_port: Annotated[
        int | None, typer.Option(help="Also serve Yahoo's price streamer (a websocket) on this port (0: a free one)")
    ] = None,
    publish_delay: Annotated[
        float, typer.Option(help="Intraday: serve each completed bar up to this many seconds after its close")
    ] = 0.0,
) -> None:
    """Simulate the Yahoo v8 chart and Alpha Vantage APIs (and the price streamer) on 127.0.0.1 until interrupted."""
    from flows.sandbox import start_sandbox

    config = sandbox_config(
        replay=replay,
        not_found=not_found,
        latency=latency,
        rate_limit=rate_limit,
        rate_window=rate_window,
        av_daily_quota=av_daily_quota,
        fault_rate=fault_rate,
        fault_kinds=fault_kinds,
        fault=fault,
        timeout_delay=timeout_delay,
        seed=seed,
        request_log=request_log,
        now=now,
        clock=clock,
        publish_delay=publish_delay,
    )
    server = start_sandbox(port, config)
    print(f"sandbox listening on {server.base_url}", flush=True)
    print(f"alpha vantage on {server.alpha_vantage_url}", flush=True)
    print(f"use it with: MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__BASE_URL={server.base_url}", flush=True)
    streamer = None
    if stream_port is not None:
        from flows.sandbox_stream import start_stream_server

        streamer = start_stream_server(stream_port, clock=config.clock)
        print(f"price streamer on {streamer.url}: MARKETPIPE__REALTIME__STREAM_URL={streamer.url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.shutdown()
        if streamer is not None:
            streamer.close()


def sandbox_config(
    replay: Path | None = None,
    not_found: str | None = None,
    latency: float = 0.0,
    rate_limit: int | None = None,
    rate_window: float = 1.0,
    av_daily_quota: int | None = None,
    fault_rate: float = 0.0,
    fault_kinds: str = "5xx,timeout,malformed,html",
    fault: list[str] | None = None,
    timeout_delay: float = 5.0,
    seed: int = 0,
    request_log: Path | None = None,
    now: str | None = None,
    clock: str | None = None,
    publish_delay: float = 0.0,
) -> SandboxConfig:
    """The sandbox's options as its config; exits 2 naming the option that is wrong.

    The tests start the sandbox in their own process from the same options (tests/conftest.py).
    """
    from flows.sandbox import FAULT_KINDS, SandboxConfig

    if replay is not None and not replay.is_dir():
        _error(f"--replay {replay} is not a directory")
        raise typer.Exit(EXIT_USAGE)
    kinds = tuple(k.strip() for k in fault_kinds.split(",") if k.strip())
    symbol_faults = dict(item.split("=", 1) for item in (fault or []) if "=" in item)
    unknown = (set(kinds) | set(symbol_faults.values())) - set(FAULT_KINDS)
    if unknown or not 0 <= fault_rate <= 1:
        _error(f"faults must be among {', '.join(FAULT_KINDS)} and --fault-rate within 0..1")
        raise typer.Exit(EXIT_USAGE)
    from tasks.realtime.clock import clock_from

    fixed = _or_exit(lambda: _parse_instant(now, "--now")) if now else None
    running = _or_exit(lambda: clock_from(clock)) if clock else None
    return SandboxConfig(
        now=fixed,
        clock=running,
        publish_delay=publish_delay,
        replay=replay,
        not_found=set(not_found.split(",")) if not_found else set(),
        latency=latency,
        rate_limit=rate_limit,
        rate_window=rate_window,
        av_daily_quota=av_daily_quota,
        fault_rate=fault_rate,
        fault_kinds=kinds,
        symbol_faults=symbol_faults,
        timeout_delay=timeout_delay,
        seed=seed,
        request_log=request_log,
    )


@app.command()
def realtime(
    symbols: Annotated[str | None, typer.Option(help="Comma-separated symbols (default: the config's)")] = None,
    source: Annotated[str, typer.Option(help="A key of data_sources with intraday bars")] = "yahoo_finance",
    interval: Annotated[str, typer.Option(help="1m, 2m, 5m or 15m")] = "1m",
    mode: Annotated[
        Literal["poll", "stream"],
        typer.Option(help="poll: final bars only; stream: also provisional bars from Yahoo's streamer"),
    ] = "poll",
    poll_seconds: Annotated[
        float | None, typer.Option(help="Ask again this often for a bar not served yet (default: the config's)")
    ] = None,
    health_port: Annotated[int, typer.Option(help="Serve GET /healthz on this port (0: off)")] = 0,
    health_host: Annotated[str, typer.Option(help="The address /healthz listens on")] = "0.0.0.0",
    duration: Annotated[
        float | None, typer.Option(help="Stop after this many seconds (default: run until stopped)")
    ] = None,
    clock: Annotated[str | None, typer.Option(hidden=True, help="A simulated clock, as the sandbox's")] = None,
    config: ConfigOption = None,
) -> None:
    """Store each intraday bar seconds after it closes, until SIGTERM or Ctrl-C; backfills first."""
    from configs.settings import load_settings
    from tasks.bars import validate_symbols
    from tasks.processing.indicators import bounded_lookback
    from tasks.realtime.clock import clock_from
    from tasks.realtime.sessions import REALTIME_INTERVALS

    settings = _or_exit(lambda: load_settings(config))
    checked = _or_exit(lambda: validate_symbols(symbols.split(",") if symbols else settings.symbols))
    if interval not in REALTIME_INTERVALS:
        _error(f"invalid --interval {interval!r} for real time: use one of {', '.join(REALTIME_INTERVALS)}")
        raise typer.Exit(EXIT_USAGE)
    _or_exit(lambda: settings.source(source))
    _or_exit(lambda: clock_from(clock))
    _or_exit(lambda: bounded_lookback(settings.indicators, interval))
    from flows.local_prefect import started_early

    with started_early(_note) as server_ready:
        from flows.realtime import realtime as realtime_flow
        from flows.realtime import stop_on_signals

        _wait_for(server_ready)
        stop_on_signals()
        state = realtime_flow(
            symbols=checked,
            source=source,
            interval=interval,
            mode=mode,
            poll_seconds=poll_seconds,
            config=str(config) if config else None,
            duration=duration,
            health_port=health_port,
            health_host=health_host,
            clock=clock,
            return_state=True,
        )
    outcome = state.result(raise_on_failure=False)
    if isinstance(outcome, BaseException):
        _error(f"the real-time flow failed: {outcome}")
        raise typer.Exit(EXIT_FAILED)
    console.print_json(json.dumps(outcome))


@app.command()
def replay(config: ConfigOption = None) -> None:
    """Write the batches the store could not take, oldest first.

    A batch the store refuses for good is set aside in the spool's rejected/ directory, named with
    its reason, and the rest go on. Exits 1 if any batch is left because the store is unavailable,
    or if this replay set any aside.
    """
    from blocks.spool import ReplayStoppedError
    from blocks.store import StoreError
    from blocks.stores import store_from_settings
    from configs.settings import load_settings
    from tasks.store import open_spool

    settings = _or_exit(lambda: load_settings(config))
    store = _or_exit(lambda: store_from_settings(settings.storage))
    spool = open_spool(settings)
    if not spool.pending():
        console.print(f"nothing spooled in {spool.directory}", highlight=False)
        return
    try:
        done = spool.replay(store)
    except ReplayStoppedError as exc:
        _print_rejected(exc.replayed, spool.rejected_directory)
        _error(f"{exc}; {spool.points()} points stay spooled in {spool.directory}")
        raise typer.Exit(EXIT_FAILED) from None
    except StoreError as exc:
        _error(f"{exc}; {spool.points()} points stay spooled in {spool.directory}")
        raise typer.Exit(EXIT_FAILED) from None
    console.print(
        f"replayed {done.points} points in {done.batches} batch(es) from {spool.directory} "
        f"into {settings.storage.backend}",
        highlight=False,
    )
    if done.rejected:
        _print_rejected(done, spool.rejected_directory)
        raise typer.Exit(EXIT_FAILED)


def _print_rejected(done: Replayed, directory: Path) -> None:
    """Each batch a replay set aside, with the store's reason, and what to do about them."""
    for batch in done.rejected:
        console.print(
            f"[red]set aside {escape(batch.name)}[/] ({batch.points} {batch.kind} rows): {escape(batch.reason)}",
            highlight=False,
            soft_wrap=True,
        )
    if done.rejected:
        console.print(
            f"{len(done.rejected)} batch(es) the store refused were set aside in {directory}, each with its "
            "reason in <name>.reason.txt: fix the cause and move them back to replay them",
            highlight=False,
            soft_wrap=True,
        )


@app.command()
def status(
    symbols: Annotated[str | None, typer.Option(help="Comma-separated symbols (default: the config's)")] = None,
    source: Annotated[str, typer.Option()] = "yahoo_finance",
    interval: Annotated[str, typer.Option()] = "1d",
    format: Annotated[Literal["table", "json"], typer.Option("--format")] = "table",  # noqa: A002
    config: ConfigOption = None,
) -> None:
    """Health of the store, the Prefect API, the spool and each symbol's freshness; exits 1 if anything is unhealthy."""
    from prefect.settings import PREFECT_API_URL

    from blocks.stores import store_from_settings
    from configs.settings import load_settings
    from tasks.bars import validate_interval, validate_symbols
    from tasks.monitoring.health import check_status

    settings = _or_exit(lambda: load_settings(config))
    checked = _or_exit(lambda: validate_symbols(symbols.split(",") if symbols else settings.symbols))
    _or_exit(lambda: validate_interval(interval))
    _or_exit(lambda: settings.source(source))
    store = _or_exit(lambda: store_from_settings(settings.storage))
    now = datetime.now(UTC)
    found = check_status(settings, store, checked, source, interval, now, PREFECT_API_URL.value())
    if format == "json":
        sys.stdout.write(json.dumps(found.as_json(), indent=1) + "\n")
    else:
        _print_status(found)
    if not found.healthy:
        _error(f"unhealthy: {', '.join(found.unhealthy())}")
        raise typer.Exit(EXIT_FAILED)


def _print_status(found: Status) -> None:
    """The checks, then one row per symbol; what is unhealthy in red, with what to do."""
    parts = Table(show_lines=False)
    for column in ("check", "state", "detail"):
        parts.add_column(column, overflow="fold")
    for check in found.checks:
        parts.add_row(check.name, "[green]ok[/]" if check.healthy else "[red]unhealthy[/]", escape(check.detail))
    console.print(parts)
    per_symbol = Table(show_lines=False)
    for column in ("symbol", "last bar", "freshness", "due session", "last run", "detail"):
        per_symbol.add_column(column, overflow="fold")
    for row in found.symbols:
        state = row.freshness if row.healthy else f"[red]{row.freshness}[/]"
        per_symbol.add_row(row.symbol, row.last_bar, state, row.due, escape(row.last_run), escape(row.detail))
    console.print(per_symbol)
    console.print("healthy" if found.healthy else "[red]unhealthy[/]", highlight=False)


@app.command()
def report(
    out: Annotated[Path, typer.Option("--out", help="The HTML file to write")],
    symbols: Annotated[str | None, typer.Option(help="Comma-separated symbols (default: the config's)")] = None,
    start: Annotated[str | None, typer.Option(help="First date, YYYY-MM-DD (default: the first bar)")] = None,
    end: Annotated[str | None, typer.Option(help="Last date, YYYY-MM-DD, inclusive (default: the last bar)")] = None,
    source: Annotated[str, typer.Option()] = "yahoo_finance",
    interval: Annotated[str, typer.Option()] = "1d",
    config: ConfigOption = None,
) -> None:
    """Write the data-quality report: one self-contained HTML page with its charts, viewable offline."""
    from blocks.store import StoreError
    from blocks.stores import store_from_settings
    from configs.settings import load_settings
    from tasks.bars import parse_date, validate_interval, validate_symbols
    from tasks.monitoring.quality import build_report
    from tasks.monitoring.report_page import render_html

    settings = _or_exit(lambda: load_settings(config))
    checked = _or_exit(lambda: validate_symbols(symbols.split(",") if symbols else settings.symbols))
    _or_exit(lambda: validate_interval(interval))
    first = _or_exit(lambda: parse_date(start, "--start"))
    last = _or_exit(lambda: parse_date(end, "--end"))
    if first and last and first > last:
        _or_exit(lambda: _raise(UsageError(f"--start {first} is after --end {last}: swap them")))
    store = _or_exit(lambda: store_from_settings(settings.storage))
    try:
        built = _or_exit(lambda: build_report(store, settings, checked, source, interval, first, last))
    except StoreError as exc:
        _error(str(exc))
        raise typer.Exit(EXIT_FAILED) from None
    page = render_html(built)
    try:
        out.write_text(page, encoding="utf-8")
    except OSError as exc:
        _error(f"cannot write {out}: {exc.strerror or exc}")
        raise typer.Exit(EXIT_USAGE) from None
    console.print(f"wrote {out} ({len(page.encode()) / 1e6:.1f} MB, {len(checked)} symbol(s))", highlight=False)


@app.command()
def setup(
    config: ConfigOption = None,
    scoped_token_secret: Annotated[
        str | None,
        typer.Option(
            "--scoped-token-secret",
            help="Kubernetes Secret to keep the flow runs' InfluxDB token in: a token setup creates with "
            "$INFLUXDB_OPERATOR_TOKEN that may only read and write the bucket, and saves in the store block",
        ),
    ] = None,
    scoped_token_namespace: Annotated[
        str | None,
        typer.Option("--scoped-token-namespace", help="the Secret's namespace (default: the pod's own)"),
    ] = None,
) -> None:
    """Create what deployments rely on, idempotently: per-source concurrency limits and block types."""
    # Checked first: a usage error here needs none of the pipeline's slow imports.
    scoped = _or_exit(lambda: _scoped_token_target(scoped_token_secret, scoped_token_namespace))
    from configs.settings import load_settings
    from flows.local_prefect import local_prefect
    from flows.maintenance import setup as run_setup
    from flows.scoped_token import ScopedTokenError

    settings = _or_exit(lambda: load_settings(config))
    with local_prefect(_note):
        try:
            changes = _or_exit(lambda: run_setup(settings, scoped))
        except ScopedTokenError as exc:
            _error(str(exc))
            raise typer.Exit(EXIT_FAILED) from None
    for change in changes:
        console.print(f"{change.outcome:>9}  {change.what}", highlight=False)


def _scoped_token_target(secret: str | None, namespace: str | None) -> ScopedTokenTarget | None:
    """Where setup keeps the flow runs' scoped token, or None when not asked to make one."""
    import os

    from pydantic import SecretStr

    from flows.scoped_token import OPERATOR_TOKEN_ENV, ScopedTokenTarget, current_namespace

    if secret is None:
        if namespace is not None:
            raise UsageError("--scoped-token-namespace needs --scoped-token-secret")
        return None
    operator = os.environ.get(OPERATOR_TOKEN_ENV, "")
    if not operator:
        raise UsageError(
            f"--scoped-token-secret needs the InfluxDB operator token in {OPERATOR_TOKEN_ENV}: it creates the "
            "flow runs' bucket-scoped token and is saved nowhere"
        )
    namespace = namespace or current_namespace()
    if not namespace:
        raise UsageError("--scoped-token-secret needs --scoped-token-namespace outside a Kubernetes pod")
    return ScopedTokenTarget(secret=secret, namespace=namespace, operator_token=SecretStr(operator))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
