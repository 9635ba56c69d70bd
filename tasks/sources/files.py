"""Vendor dump files as a source, for backfills: ``data_sources.files.path`` names a directory.

Layout: one symbol per file, matched case-insensitively by name. ``<SYMBOL>.csv``, ``<SYMBOL>.csv.gz``
and ``<SYMBOL>.parquet``, or tagged ``<SYMBOL>.<tag>.<suffix>`` such as ``AAPL.2019.csv`` or
``MSFT.dividends.csv`` (a tag holds no dot). Symbols may hold dots, ``=`` and ``^`` (``0700.HK.csv``,
``EURUSD=X.csv``, ``^GSPC.csv``), so ``0700.HK.csv`` is also read as a tagged file of a symbol ``0700``:
keep such pairs in separate directories. Every matching file is read; on a repeated bar the file later
by name wins. Files are never searched for other symbols' rows, but a file with a ``symbol`` column
gives only its rows for the queried symbol, and one with an ``interval`` column only the queried interval.

Formats, told apart by the header (case, blanks around names and spaces vs underscores are ignored):

* bars: ``time`` or ``date``, ``open high low close volume``, optional ``adj_close``, ``symbol`` and
  ``interval``; other columns are ignored. Covers Yahoo's download CSV (``Date,...,Adj Close,Volume``),
  the standard frame's own columns in CSV or Parquet, and Alpha Vantage's intraday-extended CSV.
* dividends: ``Date,Dividends``, Yahoo's dividend download.
* splits: ``Date,Stock Splits`` holding ``4:1`` (or a plain ratio), Yahoo's split download.

Times: naive times are taken as UTC. Alpha Vantage's extended CSV is US/Eastern in truth; there is no
way to tell from the file, so convert such dumps or write the offset. Daily and longer bars, and every
corporate action, are stamped at 00:00 UTC of the date as written (in the timestamp's own offset).
Only rows in the query's dates are kept. Values: empty or ``null`` is missing; anything else that is not
a number is an error, never a silent NaN, because a backfill must not store holes it did not see.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import Field

from configs.settings import ConfigError, SourceSettings
from tasks.bars import (
    OHLCV,
    VALUE_COLUMNS,
    conform,
    corporate_actions,
    empty_bars,
    flag_missing,
    is_daily_or_longer,
)
from tasks.errors import PermanentSourceError
from tasks.sources.base import BarQuery, Collected, Source, within

SUFFIXES = (".csv", ".csv.gz", ".parquet")
NULL_TOKENS = ["", "null"]
ACCEPTED = (
    "bars (time or date, open, high, low, close, volume; optional adj_close, symbol, interval), "
    "dividends (Date, Dividends) or splits (Date, Stock Splits)"
)


class BadFileError(ValueError):
    """A file's content can't be used; :meth:`VendorFiles.parse` adds the file name and symbol."""


class VendorFilesSettings(SourceSettings):
    """``data_sources.files``: the common keys, and where the vendor files are."""

    path: str | None = Field(None, description="directory of vendor files: SYMBOL.csv, SYMBOL.parquet ...")


class VendorFiles(Source):
    name = "files"
    settings_model = VendorFilesSettings
    settings: VendorFilesSettings

    def collect(self, query: BarQuery) -> Collected:
        parts = [self.parse(query, path, self.fetch(query, path)) for path in self.build_requests(query)]
        return Collected.merge(parts)

    def check_config(self) -> None:
        self.directory()

    def directory(self) -> Path:
        """The configured directory; missing or wrong is a config problem, not a source failure."""
        path = Path(self.settings.path) if self.settings.path else None
        if path is None or not path.is_dir():
            where = f"{path} is not a directory" if path else "no directory is configured"
            raise ConfigError(f"source files: {where}: set `data_sources.files.path` to the folder of vendor files")
        return path

    def build_requests(self, query: BarQuery) -> list[Path]:
        """The files in the directory that hold ``query.symbol``, sorted by name."""
        directory = self.directory()
        paths = sorted(p for p in directory.iterdir() if holds_symbol(p.name, query.symbol) and p.is_file())
        if not paths:
            raise PermanentSourceError(
                self.name,
                query.symbol,
                f"no file for {query.symbol} in {directory} (expected {query.symbol}.csv or {query.symbol}.parquet)",
            )
        return paths

    def fetch(self, query: BarQuery, path: Path) -> bytes:
        try:
            return path.read_bytes()
        except OSError as exc:
            raise PermanentSourceError(self.name, query.symbol, f"cannot read {path.name}: {exc.strerror}") from None

    def parse(self, query: BarQuery, path: Path, content: bytes) -> Collected:
        """One file's bytes to standard bars or corporate actions, or a PermanentSourceError naming it."""
        try:
            part = parse_frame(query, read_table(path.name, content), self.name)
        except BadFileError as exc:
            raise PermanentSourceError(self.name, query.symbol, f"{path.name}: {exc}") from None
        part.requests = 1
        return part


def holds_symbol(file_name: str, symbol: str) -> bool:
    """``<SYMBOL>.<suffix>`` or ``<SYMBOL>.<tag>.<suffix>``, any case; symbols may contain dots."""
    name, prefix = file_name.upper(), symbol.upper() + "."
    if not name.startswith(prefix):
        return False
    rest = name[len(prefix) - 1 :].lower()
    if rest in SUFFIXES:
        return True
    tag, _, suffix = rest[1:].partition(".")
    return bool(tag) and "." + suffix in SUFFIXES


def read_table(file_name: str, content: bytes) -> pd.DataFrame:
    """The file as a frame; CSV cells stay text so numbers are parsed exactly and garbage is caught."""
    lowered = file_name.lower()
    try:
        if lowered.endswith(".parquet"):
            return pd.read_parquet(io.BytesIO(content))
        return pd.read_csv(
            io.BytesIO(content),
            dtype=str,
            na_values=NULL_TOKENS,
            keep_default_na=False,
            compression="gzip" if lowered.endswith(".gz") else None,
            encoding="utf-8-sig",
        )
    except pd.errors.EmptyDataError:
        raise BadFileError("the file is empty") from None
    except (ValueError, OSError, EOFError) as exc:
        raise BadFileError(f"cannot read it: {exc}") from None


def parse_frame(query: BarQuery, frame: pd.DataFrame, source: str) -> Collected:
    """Pick the format from the columns and parse with it."""
    found = [str(c) for c in frame.columns]
    frame = frame.set_axis([_normalise(c) for c in found], axis=1)
    columns = set(frame.columns)
    if columns.issuperset(OHLCV) and columns & {"time", "date"}:
        return parse_bars(query, frame, source)
    if columns == {"date", "dividends"}:
        amounts = numbers(frame["dividends"], "Dividends")
        return Collected(empty_bars(), actions=actions(query, frame["date"], "dividend", source, amount=amounts))
    if columns == {"date", "stock_splits"}:
        ratios = frame["stock_splits"].map(split_ratio).astype(np.float64)
        return Collected(empty_bars(), actions=actions(query, frame["date"], "split", source, ratio=ratios))
    raise BadFileError(f"unrecognised columns {found}: expected {ACCEPTED}")


def parse_bars(query: BarQuery, frame: pd.DataFrame, source: str) -> Collected:
    """Standard bars for the query; bars with missing values are flagged for the missing-value policy."""
    frame = rows_for(query, frame)
    time_column = "time" if "time" in frame.columns else "date"
    bars = pd.DataFrame(
        {
            "time": times(frame[time_column], time_column, is_daily_or_longer(query.interval)),
            "symbol": query.symbol,
            "interval": query.interval,
            "source": source,
            **{c: numbers(frame[c], c) if c in frame.columns else np.nan for c in VALUE_COLUMNS},
        },
        index=frame.index,
    )
    bars = within(bars, query)
    bars = flag_missing(bars.sort_values("time", kind="stable").reset_index(drop=True))
    refuse_clashes(bars, query.interval)
    return Collected(conform(bars))


def rows_for(query: BarQuery, frame: pd.DataFrame) -> pd.DataFrame:
    """Only the queried symbol's and interval's rows, when the file says which rows are which."""
    if "symbol" in frame.columns:
        frame = frame.loc[frame["symbol"].astype(str).str.strip().str.upper() == query.symbol.upper()]
    if "interval" in frame.columns:
        frame = frame.loc[frame["interval"].astype(str).str.strip() == query.interval]
    return frame


def actions(
    query: BarQuery,
    dates: pd.Series[Any],
    kind: str,
    source: str,
    ratio: pd.Series[float] | float = np.nan,
    amount: pd.Series[float] | float = np.nan,
) -> pd.DataFrame:
    """Corporate actions in the query's dates; events with no value are skipped."""
    found = corporate_actions(query.symbol, source, kind, times(dates, "Date", daily=True), ratio, amount)
    return within(found, query)  # in the standard frame already; the cut keeps its order and dtypes


def times(values: pd.Series[Any], column: str, daily: bool) -> pd.Series[pd.Timestamp]:
    """UTC instants; naive means UTC. Daily: 00:00 UTC of the date as written."""
    if values.isna().any():
        raise BadFileError(f"column {column!r} has rows without a {column}")
    try:
        if daily:
            return pd.to_datetime(values.map(_day), utc=True)
        return pd.to_datetime(values, utc=True, format="ISO8601")
    except (ValueError, TypeError, OverflowError) as exc:
        raise BadFileError(f"column {column!r} holds a value that is not a date or time: {exc}") from None


def _day(value: object) -> pd.Timestamp:
    stamp = pd.Timestamp(value)  # type: ignore[arg-type]
    return pd.Timestamp(stamp.year, stamp.month, stamp.day, tz="UTC")


def numbers(values: pd.Series[Any], column: str) -> pd.Series[float]:
    """Floats, parsed exactly like ``float()``; missing stays NaN, anything else non-numeric is refused."""
    if pd.api.types.is_numeric_dtype(values):
        return values.astype(np.float64)
    out = np.full(len(values), np.nan)
    for i, value in enumerate(values):
        if value is None or (isinstance(value, float) and np.isnan(value)):
            continue
        try:
            out[i] = float(str(value).strip())
        except ValueError:
            raise BadFileError(f"column {column!r} holds {value!r}, which is not a number") from None
    return pd.Series(out, index=values.index, dtype=np.float64)


def split_ratio(value: object) -> float:
    """``4:1`` (or ``4/1``, or ``4``) to new shares per old share."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return np.nan
    text = str(value).strip().replace("/", ":")
    new, _, old = text.partition(":")
    try:
        ratio = float(new) / float(old or 1)
    except (ValueError, ZeroDivisionError):
        raise BadFileError(f"column 'Stock Splits' holds {value!r}, not a ratio such as 4:1") from None
    if not ratio > 0:
        raise BadFileError(f"column 'Stock Splits' holds {value!r}, not a positive ratio")
    return ratio


def refuse_clashes(bars: pd.DataFrame, interval: str) -> None:
    """Two different bars at one time mean the file is not what the query says (say, 1m bars read as 1d)."""
    distinct = bars.drop_duplicates()
    clashes = distinct.loc[distinct["time"].duplicated(), "time"]
    if not clashes.empty:
        raise BadFileError(
            f"{clashes.nunique()} time(s) have several different bars, first {clashes.iloc[0].isoformat()}: "
            f"does the file hold {interval} bars?"
        )


def _normalise(column: str) -> str:
    return column.strip().lower().replace(" ", "_")


SOURCE = VendorFiles
