"""The data-quality report as one self-contained HTML page, and its summary as markdown.

Charts are plotly: interactive (zoom into years of prices, hover a cell for its counts), and the
page embeds plotly.js once, so it opens from a file with no network. Every section has a stable
id (``coverage-heatmap``, ``missing-sessions``, ``bars-by-rule``, ``price-<symbol>``,
``pipeline-health``) for links and tests.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from tasks.monitoring.quality import FLAG_COLUMNS, OUTCOMES, QualityReport, SymbolQuality, run_health

MARKERS = {"quarantined": ("x", "#d62728"), "repaired": ("diamond", "#2ca02c"), "flagged": ("circle-open", "#ff7f0e")}
GL_POINTS = 20_000  # above this many bars a price line draws with WebGL
_STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px auto; max-width: 1400px; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 8px 0; font-size: 0.9em; }
td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: right; } th { background: #f4f4f4; }
td:first-child, th:first-child { text-align: left; } .note { color: #666; }
"""


def slug(symbol: str) -> str:
    """A symbol as an HTML id: ``^GSPC`` -> ``gspc``, ``EURUSD=X`` -> ``eurusd-x``."""
    return re.sub(r"[^a-z0-9]+", "-", symbol.lower()).strip("-") or "symbol"


def render_html(report: QualityReport) -> str:
    """The whole page; the first chart carries plotly.js inline, the others reuse it."""
    figures: list[tuple[str, str, go.Figure | None, str]] = [
        ("coverage-heatmap", "Coverage: stored sessions of those the calendar expects", coverage_figure(report), ""),
        ("missing-sessions", "Missing sessions", None, missing_table(report.symbols)),
        ("bars-by-rule", "Quarantined, repaired and flagged bars by rule", rules_figure(report), rules_table(report)),
    ]
    figures += [
        (
            f"price-{slug(s.symbol)}",
            f"{s.symbol}: close, with quarantined, repaired and flagged bars",
            price_figure(s),
            "",
        )
        for s in report.symbols
        if len(s.bars)
    ]
    health = health_figure(report)
    no_runs = "" if health else '<p class="note">no run metrics recorded for these symbols</p>'
    figures.append(("pipeline-health", "Pipeline health per run (pipeline_metrics)", health, no_runs))
    sections, first = [], True
    for section_id, title, figure, extra in figures:
        body = ""
        if figure is not None:
            body = figure.to_html(full_html=False, include_plotlyjs=first, div_id=f"{section_id}-chart")
            first = False
        sections.append(f'<section id="{section_id}"><h2>{html.escape(title)}</h2>{body}{extra}</section>')
    span = f"{report.start or 'first bar'} to {report.end or 'last bar'}"
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>marketpipe data quality: {html.escape(report.source)} {report.interval}</title>"
        f"<style>{_STYLE}</style></head><body>"
        f"<h1>marketpipe data quality</h1><p>{html.escape(report.source)}, {report.interval} bars, {span}; "
        f"generated {report.generated:%Y-%m-%d %H:%M} UTC.</p>"
        f"{summary_table(report)}{''.join(sections)}</body></html>"
    )


def coverage_figure(report: QualityReport) -> go.Figure:
    """Symbols x months; a cell is stored over expected sessions, hover says both."""
    months = sorted({m for s in report.symbols for m in s.monthly["month"]})
    z, text = [], []
    for s in report.symbols:
        by_month = s.monthly.set_index("month").reindex(months)
        ratio = (by_month["stored"] / by_month["expected"]).where(by_month["expected"] > 0)
        z.append(ratio.clip(upper=1).tolist())
        text.append(
            [
                f"{s.symbol} {m}: {_int(r.stored)} stored of {_int(r.expected)} expected"
                if pd.notna(r.expected)
                else f"{s.symbol} {m}: {_int(r.stored)} stored (no calendar known)"
                for m, r in by_month.iterrows()
            ]
        )
    figure = go.Figure(
        go.Heatmap(
            z=z,
            x=months,
            y=[s.symbol for s in report.symbols],
            text=text,
            hoverinfo="text",
            zmin=0,
            zmax=1,
            colorscale="RdYlGn",
            colorbar={"title": "coverage"},
        )
    )
    figure.update_layout(height=160 + 28 * len(report.symbols), margin={"t": 20}, yaxis={"autorange": "reversed"})
    return figure


def rules_figure(report: QualityReport) -> go.Figure:
    counts = {s.symbol: s.by_rule() for s in report.symbols}
    rules = sorted({rule for c in counts.values() for rule in c})
    figure = go.Figure([go.Bar(name=symbol, x=rules, y=[c.get(r, 0) for r in rules]) for symbol, c in counts.items()])
    figure.update_layout(barmode="group", height=380, margin={"t": 20}, yaxis={"title": "bars"})
    if not rules:
        figure.add_annotation(text="no bar was quarantined, repaired or flagged", showarrow=False)
    return figure


def price_figure(series: SymbolQuality) -> go.Figure:
    """The close, with a marker trace per rule; legend names say the kind and the rule."""
    line = go.Scattergl if len(series.bars) > GL_POINTS else go.Scatter
    figure = go.Figure(line(x=series.bars["time"], y=series.bars["close"], mode="lines", name="close"))
    for label, times, prices in _marked(series):
        symbol, color = MARKERS[label.split(":")[0]]
        figure.add_trace(
            go.Scatter(
                x=times, y=prices, mode="markers", name=label, marker={"symbol": symbol, "size": 9, "color": color}
            )
        )
    figure.update_layout(height=360, margin={"t": 20}, yaxis={"title": "close"}, legend={"orientation": "h"})
    return figure


def _marked(series: SymbolQuality) -> Iterable[tuple[str, pd.Series, pd.Series]]:
    for rule, rows in series.quarantined.groupby("rule") if len(series.quarantined) else ():
        yield f"quarantined: {rule}", rows["time"], rows.get("close", pd.Series(dtype=float))
    for column, (kind, name) in FLAG_COLUMNS.items():
        if column in series.bars:
            marked = series.bars[series.bars[column] == 1]
            if len(marked):
                yield f"{kind}: {name}", marked["time"], marked["close"]


def health_figure(report: QualityReport) -> go.Figure | None:
    per_run = run_health(report.runs)
    if per_run.empty:
        return None
    figure = make_subplots(
        rows=3, cols=1, shared_xaxes=True, subplot_titles=("symbols by outcome", "stage seconds", "source traffic")
    )
    for outcome in OUTCOMES:
        if outcome in per_run:
            figure.add_trace(go.Bar(x=per_run["time"], y=per_run[outcome], name=outcome), row=1, col=1)
    for stage in ("collect_seconds", "process_seconds", "store_seconds"):
        if stage in per_run:
            figure.add_trace(go.Scatter(x=per_run["time"], y=per_run[stage], name=stage, mode="lines+markers"), 2, 1)
    for measure in ("collect_retries", "collect_rate_limited", "spool_depth"):
        if measure in per_run:
            figure.add_trace(
                go.Scatter(x=per_run["time"], y=per_run[measure], name=measure, mode="lines+markers"), 3, 1
            )
    figure.update_layout(barmode="stack", height=640, margin={"t": 40})
    return figure


def summary_table(report: QualityReport) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(cells[0])}</td>{''.join(f'<td>{html.escape(c)}</td>' for c in cells[1:])}</tr>"
        for cells in _summary_rows(report)
    )
    head = "".join(f"<th>{h}</th>" for h in SUMMARY_COLUMNS)
    return f'<section id="summary"><table><tr>{head}</tr>{rows}</table></section>'


SUMMARY_COLUMNS = (
    "symbol",
    "bars",
    "expected sessions",
    "coverage",
    "missing sessions",
    "quarantined",
    "repaired",
    "flagged",
    "last run",
)


def _summary_rows(report: QualityReport) -> list[list[str]]:
    rows = []
    for s in report.symbols:
        by_rule = s.by_rule()
        kinds = {k: sum(n for rule, n in by_rule.items() if rule.startswith(k)) for k in MARKERS}
        rows.append(
            [
                s.symbol,
                str(len(s.bars)),
                "" if s.expected is None else str(s.expected),
                "" if s.coverage is None else f"{s.coverage:.1%}",
                "" if s.gaps is None else str(s.gaps.count),
                *(str(kinds[k]) for k in MARKERS),
                s.last_run or "none recorded",
            ]
        )
    return rows


def missing_table(symbols: list[SymbolQuality]) -> str:
    """Each symbol's runs of missing sessions, first to last, longest listing first."""
    parts = []
    for s in symbols:
        if s.gaps is None:
            why = "no exchange calendar known" if s.calendar is None else "no bars"
            parts.append(f'<p class="note">{html.escape(s.symbol)}: not checked ({why})</p>')
        elif not s.gaps.count:
            parts.append(f"<p>{html.escape(s.symbol)}: none of {s.gaps.expected} sessions ({s.gaps.calendar})</p>")
        else:
            rows = "".join(
                f"<tr><td>{first}</td><td>{last}</td><td>{n}</td></tr>"
                for (first, last), n in zip(s.gaps.missing, s.gaps.run_sessions, strict=True)
            )
            parts.append(
                f"<h3>{html.escape(s.symbol)}: {s.gaps.count} of {s.gaps.expected} sessions ({s.gaps.calendar})</h3>"
                f"<table><tr><th>first</th><th>last</th><th>sessions</th></tr>{rows}</table>"
            )
    return "".join(parts)


def rules_table(report: QualityReport) -> str:
    counts = {s.symbol: s.by_rule() for s in report.symbols}
    rules = sorted({rule for c in counts.values() for rule in c})
    if not rules:
        return ""
    head = "".join(f"<th>{html.escape(s)}</th>" for s in counts)
    rows = "".join(
        f"<tr><td>{html.escape(r)}</td>{''.join(f'<td>{c.get(r, 0)}</td>' for c in counts.values())}</tr>"
        for r in rules
    )
    return f"<table><tr><th>rule</th>{head}</tr>{rows}</table>"


def render_markdown(report: QualityReport) -> str:
    """The summary as a markdown table, for the maintenance flow's Prefect artifact."""
    lines = [
        f"# Data quality: {report.source} {report.interval}",
        "",
        "| " + " | ".join(SUMMARY_COLUMNS) + " |",
        "|" + "---|" * len(SUMMARY_COLUMNS),
    ]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in _summary_rows(report)]
    gaps = [(s.symbol, s.gaps) for s in report.symbols if s.gaps is not None and s.gaps.count]
    if gaps:
        lines += ["", "Missing sessions:", ""]
        lines += [f"- {symbol}: {g.describe()}" for symbol, g in gaps]
    return "\n".join(lines) + "\n"


def _int(value: float) -> str:
    return "0" if pd.isna(value) else str(int(value))
