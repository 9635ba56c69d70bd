"""Real time's parts that need no server: trading hours on the bar grid, bars from ticks, the clock."""

from __future__ import annotations

import gc
import threading
import time
from datetime import UTC, datetime

import pytest

from configs.settings import load_settings
from flows import sandbox_market
from tasks.bars import empty_actions, empty_bars
from tasks.errors import UsageError
from tasks.processing.pipeline import Processed
from tasks.realtime.clock import Clock, SimulatedClock
from tasks.realtime.engine import (
    STREAM_GRACE,
    Pending,
    Realtime,
    RealtimeOptions,
    Writer,
    collecting_later,
    next_bar_end,
    next_handover,
)
from tasks.realtime.sessions import TradingHours, stamp
from tasks.realtime.tick_bars import TickBars

pytestmark = pytest.mark.unit


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def test_the_day_after_thanksgiving_closes_at_1300_and_its_last_bar_ends_there() -> None:
    hours = TradingHours("XNYS")
    segment = hours.open_at(at("2026-11-27T17:59:30"))
    assert segment is not None and stamp(segment.close) == stamp(at("2026-11-27T18:00:00"))
    assert hours.open_at(at("2026-11-27T18:00:00")) is None
    closed = hours.closed_bars("15m", at("2026-11-27T17:00:00"), at("2026-11-27T19:00:00"))
    assert [str(stamp(t).time()) for t in closed] == ["17:15:00", "17:30:00", "17:45:00"]


def test_a_holiday_and_a_weekend_are_idle_until_the_next_open() -> None:
    hours = TradingHours("XNYS")
    thanksgiving = at("2026-11-26T15:00:00")
    assert hours.open_at(thanksgiving) is None
    assert stamp(hours.next_open(thanksgiving) or 0) == stamp(at("2026-11-27T14:30:00"))
    saturday = at("2026-11-28T15:00:00")
    assert stamp(hours.next_open(saturday) or 0) == stamp(at("2026-11-30T14:30:00"))
    # The next bar to close after Friday's early close is Monday's first.
    assert stamp(next_bar_end(hours, "1m", at("2026-11-27T17:59:00")) or 0) == stamp(at("2026-11-30T14:31:00"))


def test_the_grid_restarts_after_hong_kongs_lunch_break() -> None:
    hours = TradingHours("XHKG")
    starts = hours.bar_starts("15m", at("2026-12-02T03:30:00"), at("2026-12-02T05:30:00"))
    assert [str(stamp(t).time()) for t in starts] == ["03:30:00", "03:45:00", "05:00:00", "05:15:00"]


def test_crypto_trades_through_the_weekend_and_an_unknown_calendar_is_always_open() -> None:
    saturday = at("2026-11-28T03:07:10")
    assert TradingHours("24/7").open_at(saturday) is not None
    assert stamp(next_bar_end(TradingHours("24/7"), "5m", saturday - 300) or 0) == stamp(at("2026-11-28T03:10:00"))
    assert TradingHours(None).open_at(saturday) is not None


def test_bars_from_ticks_take_volume_from_the_running_day_volume_and_start_again_each_session() -> None:
    hours = {"AAPL": TradingHours("XNYS")}
    bars = TickBars("1m", hours)
    first = at("2026-12-02T20:57:00")  # the last minutes of a session
    for ms, price, volume in sandbox_market.ticks("AAPL", first, first + 180):
        bars.add("AAPL", ms, price, volume)
    opened = at("2026-12-03T14:30:00")  # the next session, whose day volume starts again from 0
    for ms, price, volume in sandbox_market.ticks("AAPL", opened, opened + 120):
        bars.add("AAPL", ms, price, volume)
    built = {stamp(b.start): b for _, b in bars.closed(opened + 121)}
    assert len(built) == 5
    truth = sandbox_market.bars("AAPL", "1m", first, opened + 120, now=opened + 3600).set_index("timestamp")
    volumes = dict(zip(truth.index.tolist(), truth["volume"].tolist(), strict=True))
    minutes = sorted(built)
    assert built[minutes[0]].volume is None  # nothing to count the first bar from
    for minute in minutes[1:3]:
        assert built[minute].volume == pytest.approx(truth.loc[int(minute.timestamp()), "volume"], rel=0.2)
    # The new session's first bar counts from 0, not from yesterday's running total.
    first_of_day = built[stamp(opened)]
    assert first_of_day.volume is not None
    assert 0 < first_of_day.volume <= volumes[int(opened)]
    for minute, bar in built.items():
        row = truth.loc[int(minute.timestamp())]
        assert row["low"] <= bar.low <= bar.high <= row["high"]  # samples lie inside the true range


def test_a_late_tick_of_a_handed_over_minute_is_dropped() -> None:
    bars = TickBars("1m", {"BTC-USD": TradingHours("24/7")})
    start = at("2026-12-03T10:00:00")
    bars.add("BTC-USD", int(start * 1000) + 500, 100.0, 1_000.0)
    assert [b.close for _, b in bars.closed(start + 61)] == [100.0]
    bars.add("BTC-USD", int(start * 1000) + 59_000, 101.0, 1_001.0)  # arrives after the hand-over
    assert bars.closed(start + 200) == []


def test_a_simulated_clock_runs_at_its_speed_from_its_anchor() -> None:
    anchor = time.time()
    clock = SimulatedClock.parse(f"2024-03-13T14:30:00Z,speed=60,anchor={anchor}")
    elapsed = time.time() - anchor
    assert clock.time() - at("2024-03-13T14:30:00") == pytest.approx(60 * elapsed, abs=1.0)
    assert SimulatedClock.parse(clock.spec).start == pytest.approx(clock.start)
    for bad in ("yesterday", "2024-03-13T14:30:00Z,speed=0", "2024-03-13T14:30:00Z,pace=2"):
        with pytest.raises(UsageError, match="invalid clock"):
            SimulatedClock.parse(bad)


def test_the_pacing_note_says_when_a_round_of_polls_outlasts_the_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    from blocks.duckdb_store import DuckDBStore

    monkeypatch.setenv("MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__RATE_LIMIT", "2000")
    symbols = [f"S{i}" for i in range(50)]
    loop = Realtime(load_settings(None), RealtimeOptions(symbols), DuckDBStore(path=":memory:"))
    note = loop.pacing_note()
    assert "50 symbol(s) at 2000 requests/hour: one poll of each takes 90.0 s" in note
    assert "longer than a 1m bar" in note and "rate_limit" in note
    monkeypatch.setenv("MARKETPIPE__DATA_SOURCES__YAHOO_FINANCE__RATE_LIMIT", "72000")
    fast = Realtime(load_settings(None), RealtimeOptions(symbols), DuckDBStore(path=":memory:")).pacing_note()
    assert "takes 2.5 s" in fast and "longer than" not in fast


def pending(n: int) -> Pending:
    return Pending(Processed(empty_bars(), empty_actions(), empty_bars(), 0, 0), seen=float(n), provisional=False)


def test_the_writer_writes_in_the_order_queued_and_what_waits_shares_a_write() -> None:
    batches: list[list[float]] = []

    def write(batch: list[Pending]) -> None:
        batches.append([p.seen for p in batch])
        time.sleep(0.2 if len(batches) == 1 else 0)  # a slow first write: the rest queue behind it

    writer = Writer(write)
    for n in range(10):
        writer.put(pending(n))
    writer.flush()
    assert [n for batch in batches for n in batch] == list(range(10))
    assert len(batches) <= 3  # not a write per bar
    writer.put(pending(10))
    writer.close()  # writes what is queued before it stops
    assert batches[-1] == [10.0]
    Writer(write).close()  # a writer never used has no thread to stop


def test_the_loop_waits_for_its_next_event_a_finished_poll_or_the_stop() -> None:
    clock, stop, wake = Clock(), threading.Event(), threading.Event()
    threading.Timer(0.1, wake.set).start()
    began = time.monotonic()
    assert clock.wait_until(clock.time() + 30, stop, wake) is False
    assert time.monotonic() - began < 0.9  # woken, not at the deadline
    wake.clear()
    threading.Timer(0.1, stop.set).start()
    began = time.monotonic()
    assert clock.wait_until(clock.time() + 30, stop, wake) is True
    assert time.monotonic() - began < 1.5  # a stop is seen within a second


@pytest.mark.parametrize(("interval", "woken", "due"), [
    ("1m", "14:30:59", "14:31:00"),  # before the close
    ("1m", "14:31:00", "14:31:00"),  # at it
    ("1m", "14:31:00.05", "14:31:00"),  # a poll woke the loop after the close, before its grace: still this close's
    ("1m", "14:31:00.15", "14:32:00"),  # handed over: the next close
    ("1m", "14:31:30", "14:32:00"),
    ("5m", "14:35:00.10", "14:35:00"),
])  # fmt: skip
def test_the_ticks_of_a_bar_are_handed_over_at_its_close_plus_grace_whenever_the_loop_woke(
    interval: str, woken: str, due: str
) -> None:
    handover = next_handover(at(f"2026-12-01T{woken}"), interval)
    assert handover == pytest.approx(at(f"2026-12-01T{due}") + STREAM_GRACE, abs=1e-6)


def test_no_garbage_is_collected_while_ticks_become_bars_and_the_collector_runs_again_after() -> None:
    assert gc.isenabled()
    with collecting_later():
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with collecting_later():
            pass
        assert not gc.isenabled()  # switched off by someone else: left so
    finally:
        gc.enable()
