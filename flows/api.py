"""The seed's Python API, for notebooks and scripts: collect, process, store and query, without Prefect.

    from flows.api import DataCollector, DataProcessor, DataStorage, query

    bars = DataCollector().collect_data("AAPL", "yahoo_finance", "2024-01-01", "2024-06-30")
    clean = DataProcessor().process_data(bars)
    DataStorage().store_data(clean, "AAPL")
    query("AAPL", start="2024-06-01")

It is a thin layer over the code the flow runs, with the same settings (``config``, or
``MARKETPIPE_ENV`` and ``MARKETPIPE__...`` as for the CLI), the same validation and errors
(:class:`~tasks.errors.UsageError`, :class:`~tasks.errors.ConfigError`, the sources' errors) and
the same secrets handling: keys come from the environment or Prefect blocks and never appear in
a message. Requests are paced by the same host-wide limits as the runs on this machine. What it
does not do is what the flow adds around these steps: the run's summary, metrics, the spool's
replay, and the per-symbol bookkeeping of incremental runs (`marketpipe run` does those).
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pandas as pd

from blocks.spool import Written
from blocks.store import BARS, BarStore
from blocks.stores import store_from_settings
from configs.settings import load_settings
from tasks.bars import Instrument, parse_date, validate_interval, validate_symbol
from tasks.collect import check_source
from tasks.errors import UsageError
from tasks.job import resolve_credentials
from tasks.processing.pipeline import Processed, process
from tasks.sources.base import BarQuery, Collected, Source, load_source, pacer_for
from tasks.store import open_spool

# Where collect_data leaves what the source said of the symbol (its Instrument: currency, exchange)
# on the frame, for process_data: minor currency units and the exchange calendar depend on it.
INSTRUMENT = "marketpipe_instrument"

ConfigFile = str | Path | None


class DataCollector:
    """Bars from a source, as the flow's collect step fetches and parses them."""

    def __init__(self, config: ConfigFile = None) -> None:
        self.settings = load_settings(config)
        self._sources: dict[str, Source] = {}

    def collect_data(
        self,
        symbol: str,
        source: str = "yahoo_finance",
        start_date: date | str | None = None,
        end_date: date | str | None = None,
        interval: str = "1d",
    ) -> pd.DataFrame:
        """The standard bar frame for ``symbol`` from ``start_date`` to ``end_date`` (inclusive).

        Without dates: the ``collection.default_history_days`` up to today, as a first run collects.
        """
        checked = validate_symbol(symbol)
        validate_interval(interval)
        end = parse_date(end_date, "end_date") or datetime.now(UTC).date()
        start = parse_date(start_date, "start_date") or end - timedelta(
            days=self.settings.collection.default_history_days
        )
        if start > end:
            raise UsageError(f"start_date {start} is after end_date {end}: swap them")
        collected = self._source(source).collect(BarQuery(checked, interval, start, end))
        bars = collected.bars
        bars.attrs[INSTRUMENT] = collected.instrument
        return bars

    def _source(self, name: str) -> Source:
        if name not in self._sources:
            check_source(self.settings, name)
            settings = resolve_credentials(self.settings.source(name))
            pacer = pacer_for(name, settings, self.settings.collection.rate_limit_dir)
            self._sources[name] = load_source(name, settings, pacer)
        return self._sources[name]


class DataProcessor:
    """Validation, repairs, adjusted prices, returns and indicators, as the flow's process step."""

    def __init__(self, config: ConfigFile = None) -> None:
        self.settings = load_settings(config)
        self.last: Processed | None = None  # the last call's counts and quarantined bars

    def process_data(self, df: pd.DataFrame) -> pd.DataFrame:
        """The clean bars of one symbol's frame, with the configured indicators; bad bars are left
        out (see ``last.quarantined`` and ``last.rejected``), exactly as a run would store them."""
        symbol, interval = _one_series(df)
        instrument = df.attrs.get(INSTRUMENT)
        facts = instrument if isinstance(instrument, Instrument) else Instrument()
        collected = Collected(df.reset_index(drop=True), instrument=facts)
        self.last = process(collected, symbol, interval, self.settings.quality, self.settings.indicators)
        return self.last.bars


class DataStorage:
    """Writes to and reads from the configured store (``storage.backend``)."""

    def __init__(self, config: ConfigFile = None) -> None:
        self.settings = load_settings(config)
        self.store: BarStore = store_from_settings(self.settings.storage)

    def store_data(self, df: pd.DataFrame, symbol: str) -> Written:
        """Write processed bars of ``symbol``; what the store can't take now is spooled, as in a
        run, and `marketpipe replay` writes it later. Writing the same bars again changes nothing."""
        checked = validate_symbol(symbol)
        if "symbol" not in df.columns:
            df = df.assign(symbol=checked)
        others = sorted(set(df["symbol"].astype(str)) - {checked})
        if others:
            raise UsageError(f"store_data({checked!r}) was given bars of {', '.join(others)}: pass each symbol alone")
        return open_spool(self.settings).write(self.store, BARS.name, df)

    def query(
        self,
        symbol: str,
        interval: str = "1d",
        start: date | str | None = None,
        end: date | str | None = None,
        source: str | None = None,
        quarantine: bool = False,
    ) -> pd.DataFrame:
        """Stored bars (or with ``quarantine``, the bars validation set aside), oldest first."""
        checked, first, last = validate_symbol(symbol), parse_date(start, "start"), parse_date(end, "end")
        return read_stored(self.store, checked, validate_interval(interval), source, first, last, quarantine)


def query(
    symbol: str,
    interval: str = "1d",
    start: date | str | None = None,
    end: date | str | None = None,
    source: str | None = None,
    config: ConfigFile = None,
) -> pd.DataFrame:
    """Stored bars of ``symbol`` from ``start`` to ``end`` (inclusive), oldest first, every stored column."""
    return DataStorage(config).query(symbol, interval, start, end, source)


def read_stored(
    store: BarStore,
    symbol: str,
    interval: str,
    source: str | None,
    first: date | None,
    last: date | None,
    quarantine: bool = False,
) -> pd.DataFrame:
    """What `marketpipe query` prints and :func:`query` returns: the range's rows, oldest first."""
    lo = pd.Timestamp(first, tz="UTC").to_pydatetime() if first else None
    hi = (pd.Timestamp(last, tz="UTC") + pd.Timedelta(days=1)).to_pydatetime() if last else None
    read = store.read_quarantine if quarantine else store.read_bars
    frame = read(symbol, interval, source, lo, hi)
    return frame.sort_values(["time", "source"], kind="stable").reset_index(drop=True)


def _one_series(df: pd.DataFrame) -> tuple[str, str]:
    """The one symbol and interval a frame holds, or a UsageError saying what it holds instead."""
    missing = [c for c in ("symbol", "interval") if c not in df.columns]
    if missing:
        raise UsageError(
            f"process_data needs the bar frame's {' and '.join(missing)} column(s): see README, The bar frame"
        )
    found = {(str(s), str(i)) for s, i in df[["symbol", "interval"]].drop_duplicates().itertuples(index=False)}
    if len(found) != 1:
        shown = ", ".join(f"{s} {i}" for s, i in sorted(found)) or "no bars"
        raise UsageError(f"process_data takes one symbol's bars of one interval, got {shown}: split the frame")
    return found.pop()


__all__ = ["DataCollector", "DataProcessor", "DataStorage", "query"]
