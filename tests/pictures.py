"""The README's pictures, made from real runs: ``python -m tests.pictures docs/images``.

The captured 2020 Yahoo responses are replayed by the sandbox into a real influxd and a DuckDB file.
``report.png`` is `marketpipe report` over the DuckDB store in headless Chromium. ``dashboard.png``
is a preview of the Grafana dashboard: each of its queries run on influxd exactly as the dashboard
test runs them, drawn with plotly panel by panel (Grafana itself does not run here).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from tests.browser import render
from tests.conftest import REPLAY_FILES, YAHOO, Sandbox, marketpipe
from tests.grafana import influxql, interpolate, panels
from tests.servers import influxdb_server
from tests.test_quality_report import CALENDARS

SYMBOLS = ["AAPL", "BTC-USD", "EURUSD=X", "QQQ", "OCDO.L"]
SHOWN = "AAPL"
START = datetime(2020, 1, 1, tzinfo=UTC)
PREVIEW = (  # the dashboard's panels drawn in the preview, by title
    "Price",
    "Close with SMA 20, EMA 20 and Bollinger bands 20/2",
    "RSI 14",
    "MACD 12/26/9",
    "Run outcomes",
    "Seconds per stage",
    "Source traffic",
    "Data quality per run",
)


def main(out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch_dir, influxdb_server(Path(scratch_dir) / "influxd") as url:
        scratch = Path(scratch_dir)
        replay = scratch / "replay"
        replay.mkdir()
        for symbol in SYMBOLS:
            shutil.copy(YAHOO / REPLAY_FILES[symbol], replay / f"{symbol}.json")
        sandbox = Sandbox("--replay", str(replay), log=scratch / "sandbox.log")
        database = f"pictures_{uuid.uuid4().hex[:8]}"
        env = {
            "PREFECT_HOME": str(scratch / "prefect"),
            "MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__BASE_URL": sandbox.base_url,
            "MARKETPIPE__STORAGE__SPOOL_DIR": str(scratch / "spool"),
            "MARKETPIPE__QUALITY__CALENDARS": CALENDARS,
        }
        duckdb = {**env, "MARKETPIPE__STORAGE__DUCKDB__PATH": str(scratch / "real.duckdb")}
        influx = {
            **env,
            "MARKETPIPE__STORAGE__BACKEND": "influxdb_v1",
            "MARKETPIPE__STORAGE__INFLUXDB_V1__URL": url,
            "MARKETPIPE__STORAGE__INFLUXDB_V1__DATABASE": database,
        }
        try:
            span = ("--start", "2020-01-01", "--end", "2020-12-31")
            _run(duckdb, "run", "--symbols", ",".join(SYMBOLS), *span)
            for months in ("2020-03-31", "2020-06-30", "2020-09-30", "2020-12-31"):  # runs for the health panels
                _run(influx, "run", "--symbols", ",".join(SYMBOLS), "--start", "2020-01-01", "--end", months)
            page = scratch / "report.html"
            _run(duckdb, "report", "--symbols", ",".join(SYMBOLS), *span, "--out", str(page))
            _screenshot(page, out / "report.png", height=2300)
            preview = scratch / "dashboard.html"
            preview.write_text(dashboard_preview(url, database))
            _screenshot(preview, out / "dashboard.png", height=1420)
        finally:
            sandbox.stop()
    print(f"wrote {out / 'report.png'} and {out / 'dashboard.png'}")
    return 0


def dashboard_preview(url: str, database: str) -> str:
    """A page of the dashboard's panels: their queries' answers from influxd, one subplot each."""
    chosen = {p["title"]: p for p in panels()}
    grid = make_subplots(rows=4, cols=2, subplot_titles=PREVIEW, vertical_spacing=0.07, horizontal_spacing=0.06)
    end = datetime.now(UTC) + timedelta(minutes=5)
    variables = {"symbol": SHOWN, "source": "yahoo_finance", "bar_interval": "1d"}
    for n, title in enumerate(PREVIEW):
        row, col = n // 2 + 1, n % 2 + 1
        bucket = "5s" if row > 2 else "1d"  # the runs are seconds apart: one bucket each
        for target in chosen[title]["targets"]:
            query = interpolate(target["query"], variables, START, end, bucket)
            frames = [pd.DataFrame(s["values"], columns=s["columns"]) for s in influxql(url, database, query)]
            frame = pd.concat(frames) if frames else pd.DataFrame(columns=["time"])
            time = pd.to_datetime(frame["time"], unit="ms", utc=True)
            if title == "Price":
                candles = go.Candlestick(
                    x=time,
                    open=frame["open"],
                    high=frame["high"],
                    low=frame["low"],
                    close=frame["close"],
                    name=SHOWN,
                    showlegend=False,
                )
                grid.add_trace(candles, row=row, col=col)
                grid.update_xaxes(rangeslider_visible=False, row=row, col=col)
                continue
            for column in frame.columns.drop("time"):
                bars = chosen[title].get("fieldConfig", {}).get("defaults", {}).get("custom", {}).get("drawStyle")
                trace = go.Bar if bars == "bars" else go.Scatter
                grid.add_trace(trace(x=time, y=frame[column], name=f"{column}", legendgroup=title), row=row, col=col)
    grid.update_layout(
        barmode="stack",
        height=1400,
        width=1380,
        template="plotly_dark",
        title=(
            f"marketpipe dashboard preview ({SHOWN}, 1d, yahoo_finance): the Grafana dashboard's queries on influxd,"
            " drawn with plotly"
        ),
        legend={"orientation": "h", "y": -0.04},
        margin={"t": 80, "l": 50, "r": 20, "b": 40},
    )
    page: str = grid.to_html(full_html=True, include_plotlyjs=True, config={"displayModeBar": False})
    return page


def _run(env: dict[str, str], *args: str) -> None:
    done = marketpipe(*args, env=env)
    if done.returncode != 0:
        raise SystemExit(f"marketpipe {' '.join(args)} exited {done.returncode}:\n{done.stdout}{done.stderr}")


def _screenshot(page: Path, target: Path, height: int) -> None:
    rendered = render(page, width=1400, height=height)
    rendered.screenshot.convert("RGB").save(target, optimize=True)


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/images")))
