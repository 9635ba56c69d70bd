"""`make demo`: the whole pipeline offline, from the sandbox API to the embedded store.

Starts the sandbox on a free loopback port, runs the market-data flow (Prefect's ephemeral mode,
no server to set up) for a handful of symbols over two years of daily bars into
``data/demo.duckdb``, then prints a few stored rows with their indicators and writes the data-quality report
``data/demo-report.html``.
"""

from __future__ import annotations

import os
import sys

import pandas as pd

from flows.sandbox import SandboxConfig, start_sandbox

SYMBOLS = "AAPL,MSFT,BRK-B,^GSPC,EURUSD=X"
START, END = "2023-01-01", "2024-12-31"
STORE = "data/demo.duckdb"
REPORT = "data/demo-report.html"  # the data-quality page over what the demo stored
SHOWN = ["time", "symbol", "close", "sma_20", "ema_20", "rsi_14", "macd_12_26_9", "bb_upper_20_2", "atr_14", "obv"]


def main() -> int:
    server = start_sandbox(port=0, config=SandboxConfig(access_log=False))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ["MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__BASE_URL"] = server.base_url
    os.environ["MARKETPIPE__STORAGE__BACKEND"] = "duckdb"
    os.environ["MARKETPIPE__STORAGE__DUCKDB__PATH"] = STORE
    print(f"sandbox API on {server.base_url}; store {STORE}", flush=True)

    from flows.cli import app

    try:
        app(["run", "--symbols", SYMBOLS, "--start", START, "--end", END], standalone_mode=False)
    except SystemExit as exit_:  # typer.Exit surfaces as click's exit code
        if exit_.code:
            return int(exit_.code)
    finally:
        server.shutdown()

    from blocks.duckdb_store import DuckDBStore

    store = DuckDBStore(path=STORE)
    rows = pd.concat([store.read_bars(s).tail(3) for s in ("AAPL", "^GSPC")], ignore_index=True)
    rows["time"] = rows["time"].dt.strftime("%Y-%m-%d")
    with pd.option_context("display.width", 200, "display.max_columns", None, "display.float_format", "{:,.2f}".format):
        print("\nLast stored bars with their indicators:")
        print(rows[SHOWN].to_string(index=False))
    print(f"\nQuery more with: MARKETPIPE__STORAGE__DUCKDB__PATH={STORE} marketpipe query --symbol MSFT --format csv")
    try:
        app(["report", "--symbols", SYMBOLS, "--out", REPORT], standalone_mode=False)
    except SystemExit as exit_:
        if exit_.code:
            return int(exit_.code)
    print(f"Open {REPORT} in a browser for the data-quality report (it needs no network).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
