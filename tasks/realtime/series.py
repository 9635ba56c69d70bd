"""One symbol's stored series as real time extends it: its history, the last final bar, and the
provisional bars the streamer put ahead of it.

New bars go through the batch pipeline's own processing with the stored history before them, so
their indicators are those a batch run over the same bars computes. Final bars join the history;
provisional ones are processed on top of it and stored marked ``flag_provisional`` = 1 until the
polled bar of the same minute replaces them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import pandas as pd

from configs.indicators import IndicatorSpec
from configs.settings import QualitySettings
from tasks.bars import Instrument, empty_bars, epoch_nanos, series_bars
from tasks.processing.pipeline import Processed, process
from tasks.realtime.sessions import TradingHours, stamp
from tasks.realtime.tick_bars import TickBar
from tasks.sources.base import Collected

FLAG_PROVISIONAL = "flag_provisional"  # 1: built from the streamer's ticks, until the polled bar replaces it
PRICES = ("open", "high", "low", "close")


@dataclass
class Reconciled:
    """How the provisional bars compared with the polled bars that replaced them."""

    replaced: int = 0
    differing: int = 0  # any of open, high, low, close or volume differed
    high_low_missed: int = 0  # the ticks missed the true high or low
    largest_bps: float = 0.0  # the largest price difference, in basis points of the polled close

    def add(self, provisional: pd.Series, final: pd.Series) -> None:
        self.replaced += 1
        diffs = [abs(float(provisional[c]) - float(final[c])) for c in PRICES]
        volume_differs = not np.isclose(provisional["volume"], final["volume"], equal_nan=True)
        if max(diffs) > 1e-9 or volume_differs:
            self.differing += 1
        if final["high"] > provisional["high"] + 1e-9 or final["low"] < provisional["low"] - 1e-9:
            self.high_low_missed += 1
        close = float(final["close"])
        if close:
            self.largest_bps = max(self.largest_bps, max(diffs) / abs(close) * 1e4)


@dataclass
class SymbolSeries:
    """What real time keeps in memory of one symbol: enough stored bars for the indicators' lookback."""

    symbol: str
    interval: str
    source: str
    hours: TradingHours
    lookback: int
    history: pd.DataFrame = field(default_factory=empty_bars)  # final bars, oldest first, at most `lookback`
    last_final: float | None = None  # the start of the newest final bar stored (epoch seconds)
    provisional: dict[float, pd.DataFrame] = field(default_factory=dict)  # stored, not yet replaced: one row each
    instrument: Instrument = field(default_factory=Instrument)
    reconciled: Reconciled = field(default_factory=Reconciled)

    def restore(self, stored: pd.DataFrame) -> None:
        """Pick up where the store is: its final bars are history, its provisional ones wait for polls."""
        if stored.empty:
            return
        provisional = stored[FLAG_PROVISIONAL].fillna(0.0) == 1 if FLAG_PROVISIONAL in stored else None
        final = stored.loc[~provisional] if provisional is not None else stored
        if provisional is not None:
            self._wait_for_polls(stored.loc[provisional].reset_index(drop=True))
        self._remember(final.reset_index(drop=True))

    def final_bars(
        self, collected: Collected, quality: QualitySettings, indicators: Sequence[IndicatorSpec], now: datetime
    ) -> Processed | None:
        """The polled bars newer than the last final one, processed; None when there are none."""
        self.instrument = self.instrument.updated(collected.instrument)
        bars = collected.bars
        if self.last_final is not None and not bars.empty:
            bars = bars.loc[bars["time"] > stamp(self.last_final)].reset_index(drop=True)
        if bars.empty:
            return None
        fresh = Collected(bars, instrument=self.instrument)
        processed = process(fresh, self.symbol, self.interval, quality, indicators, history=self.history, now=now,
                            session_gaps=False)  # fmt: skip
        if self.provisional:
            for n, start in enumerate(start_seconds(processed.bars)):
                earlier = self.provisional.pop(start, None)
                if earlier is not None:
                    self.reconciled.add(earlier.iloc[0], processed.bars.iloc[n])
        processed.bars[FLAG_PROVISIONAL] = 0.0
        self._remember(processed.bars)
        return processed

    def provisional_bars(
        self, built: list[TickBar], quality: QualitySettings, indicators: Sequence[IndicatorSpec], now: datetime
    ) -> Processed | None:
        """Bars from ticks, for minutes no final bar covers yet, processed after the stored ones."""
        fresh = [b for b in built if self.last_final is None or b.start > self.last_final]
        if not fresh:
            return None
        frame = series_bars(
            (b.start for b in fresh),
            self.symbol,
            self.interval,
            self.source,
            {
                "open": [b.open for b in fresh],
                "high": [b.high for b in fresh],
                "low": [b.low for b in fresh],
                "close": [b.close for b in fresh],
                "volume": [np.nan if b.volume is None else b.volume for b in fresh],
            },
        )
        # Earlier provisional bars go before these, as the polled ones will: the indicators chain.
        waiting = [bar for start, bar in sorted(self.provisional.items()) if start < fresh[0].start]
        history = self.history
        if waiting:
            history = pd.concat([history, *waiting], ignore_index=True).drop(columns=[FLAG_PROVISIONAL])
        processed = process(Collected(frame, instrument=self.instrument), self.symbol, self.interval, quality,
                            indicators, history=history, now=now, session_gaps=False)  # fmt: skip
        processed.bars[FLAG_PROVISIONAL] = 1.0
        self._wait_for_polls(processed.bars)
        return processed

    def _wait_for_polls(self, provisional: pd.DataFrame) -> None:
        """Keep stored provisional bars, a row each, until the polled bars of their minutes come."""
        starts = start_seconds(provisional)
        for n, start in enumerate(starts):
            self.provisional[start] = provisional if len(starts) == 1 else provisional.iloc[[n]]

    def _remember(self, final: pd.DataFrame) -> None:
        """Keep the newest final bars with their indicators: a running sum (OBV) carries on from them."""
        if final.empty:
            return
        kept = final.drop(columns=[FLAG_PROVISIONAL], errors="ignore")
        both = pd.concat([self.history, kept], ignore_index=True) if len(self.history) else kept
        self.history = both.tail(self.lookback).reset_index(drop=True)
        self.last_final = float(self.history["time"].iloc[-1].timestamp())


def start_seconds(bars: pd.DataFrame) -> list[float]:
    """The bars' start instants, in epoch seconds, as the series keys them."""
    starts: list[float] = (epoch_nanos(bars["time"]) / 1e9).tolist()
    return starts
