"""What the data-quality report shows, read from the store: coverage against the exchange calendar,
missing sessions, bars set aside, repaired or flagged by rule, and the pipeline's runs.

Read through the store interface only, so it works on every backend. Rendering is
tasks/monitoring/report_page.py; this module decides what the numbers are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime

import pandas as pd

from blocks.store import BarStore
from configs.settings import Settings
from tasks.bars import FLAG_MISSING, FLAG_OHLC_REPAIRED, Instrument
from tasks.calendars import SessionGaps, calendar_for, expected_sessions, missing_sessions
from tasks.errors import UsageError
from tasks.processing.missing import FLAG_FILLED
from tasks.processing.ticks import FLAG_SPIKE, FLAG_UNIT_REPAIRED, FLAG_ZERO_VOLUME

# Each flag column a stored bar may carry, as the summary counts it: (kind, name).
FLAG_COLUMNS: dict[str, tuple[str, str]] = {
    FLAG_UNIT_REPAIRED: ("repaired", "unit_error"),
    FLAG_OHLC_REPAIRED: ("repaired", "ohlc_repaired"),
    FLAG_FILLED: ("repaired", "missing_filled"),
    FLAG_MISSING: ("flagged", "missing"),
    FLAG_ZERO_VOLUME: ("flagged", "zero_volume"),
    FLAG_SPIKE: ("flagged", "spike"),
}
OUTCOMES = ("ok", "failed", "spooled", "deferred")


@dataclass
class SymbolQuality:
    """One series: its bars (time, close, flags), what was quarantined, and its coverage by month."""

    symbol: str
    calendar: str | None
    bars: pd.DataFrame
    quarantined: pd.DataFrame  # time, rule, reason, close
    monthly: pd.DataFrame  # month (YYYY-MM), stored, expected (NaN: no calendar)
    gaps: SessionGaps | None  # None: no calendar, or no bars
    last_run: str = ""

    @property
    def expected(self) -> int | None:
        return None if self.gaps is None else self.gaps.expected

    @property
    def coverage(self) -> float | None:
        """Stored sessions over expected ones, from the first bar to the last."""
        if self.gaps is None or not self.gaps.expected:
            return None
        return 1 - self.gaps.count / self.gaps.expected

    def by_rule(self) -> dict[str, int]:
        """``quarantined: rule`` / ``repaired: name`` / ``flagged: name`` -> bars, nothing zero."""
        counts = {f"quarantined: {rule}": int(n) for rule, n in self.quarantined["rule"].value_counts().items()}
        for column, (kind, name) in FLAG_COLUMNS.items():
            if column in self.bars and (n := int((self.bars[column] == 1).sum())):
                counts[f"{kind}: {name}"] = n
        return counts


@dataclass
class QualityReport:
    source: str
    interval: str
    start: date | None
    end: date | None
    generated: datetime
    symbols: list[SymbolQuality]
    runs: pd.DataFrame = field(default_factory=pd.DataFrame)  # pipeline_metrics of every symbol, oldest first


def build_report(
    store: BarStore,
    settings: Settings,
    symbols: list[str],
    source: str,
    interval: str = "1d",
    start: date | None = None,
    end: date | None = None,
) -> QualityReport:
    """Each symbol's bars and quarantine in the range, and its recorded runs; a UsageError if none has bars."""
    lo = pd.Timestamp(start, tz="UTC").to_pydatetime() if start else None
    hi = (pd.Timestamp(end, tz="UTC") + pd.Timedelta(days=1)).to_pydatetime() if end else None
    found, runs = [], []
    for symbol in symbols:
        bars = store.read_bars(symbol, interval, source, lo, hi)
        quarantined = store.read_quarantine(symbol, interval, source, lo, hi)
        metrics = store.read_metrics(symbol, source)
        if not metrics.empty:  # every run: a run's time is when it ran, not the bars' dates the range bounds
            metrics = metrics[metrics["interval"] == interval]
            runs.append(metrics)
        calendar = calendar_for(symbol, Instrument(), settings.quality.calendars.get(symbol.upper()))
        found.append(_symbol_quality(symbol, calendar, bars, quarantined, interval, metrics))
    if not any(len(s.bars) for s in found):
        raise UsageError(
            f"no stored {interval} {source} bars for {', '.join(symbols)}"
            + (f" between {start or 'the start'} and {end or 'now'}" if start or end else "")
            + f": run `marketpipe run --symbols {','.join(symbols)}` first, or pick symbols the store has"
        )
    frame = pd.concat(runs, ignore_index=True).sort_values("time", kind="stable") if runs else pd.DataFrame()
    return QualityReport(source, interval, start, end, datetime.now(UTC), found, frame)


def _symbol_quality(
    symbol: str,
    calendar: str | None,
    bars: pd.DataFrame,
    quarantined: pd.DataFrame,
    interval: str,
    metrics: pd.DataFrame,
) -> SymbolQuality:
    keep = [c for c in ("time", "close", *FLAG_COLUMNS) if c in bars]
    gaps = missing_sessions(bars["time"], interval, calendar) if calendar and not bars.empty else None
    columns = [c for c in ("time", "rule", "reason", "close") if c in quarantined]
    return SymbolQuality(
        symbol,
        calendar,
        bars[keep].reset_index(drop=True),
        quarantined[columns].reset_index(drop=True) if columns else pd.DataFrame(columns=["time", "rule"]),
        monthly_coverage(bars["time"], calendar),
        gaps,
        _last_outcome(metrics),
    )


def monthly_coverage(times: pd.Series, calendar: str | None) -> pd.DataFrame:
    """Per month from the first bar's to the last's: the sessions with a bar and those the calendar expects.

    A bar on a day that is no session (a source serving a holiday) is not counted as covering one;
    without a calendar every bar's day counts.
    """
    if times.empty:
        return pd.DataFrame({"month": [], "stored": [], "expected": []})
    days = pd.DatetimeIndex(times).tz_convert("UTC").tz_localize(None).normalize().unique()
    months = pd.period_range(days.min().to_period("M"), days.max().to_period("M"), freq="M")
    expected = pd.Series(float("nan"), index=months)
    sessions = expected_sessions(calendar, days.min().date(), days.max().date()) if calendar else None
    if sessions is not None:
        expected = sessions.to_period("M").value_counts().reindex(months, fill_value=0).astype(float)
        days = days[days.isin(sessions)]
    stored = days.to_period("M").value_counts()
    return pd.DataFrame(
        {
            "month": [str(m) for m in months],
            "stored": stored.reindex(months, fill_value=0).to_numpy(),
            "expected": expected.to_numpy(),
        }
    )


def _last_outcome(metrics: pd.DataFrame) -> str:
    if metrics.empty:
        return ""
    latest = metrics.iloc[-1]
    outcome = next((o for o in OUTCOMES if o in latest and latest[o] == 1), "unknown")
    return f"{outcome} ({pd.Timestamp(latest['time']):%Y-%m-%d %H:%M} UTC)"


def run_health(runs: pd.DataFrame) -> pd.DataFrame:
    """Per run (its start time): symbols by outcome, and the stage seconds and source traffic summed."""
    if runs.empty:
        return pd.DataFrame()
    measures = [c for c in (*OUTCOMES, "collect_seconds", "process_seconds", "store_seconds") if c in runs]
    measures += [c for c in ("collect_retries", "collect_rate_limited", "rows_written", "spool_depth") if c in runs]
    summed = runs.groupby("time")[measures].sum(min_count=1)
    if "spool_depth" in summed:  # the same on every row of a run: its value, not a sum
        summed["spool_depth"] = runs.groupby("time")["spool_depth"].max()
    return summed.reset_index()
