"""Request pacing shared by every thread and process on a host: GCRA over a locked state file.

GCRA (the generic cell rate algorithm, as in ATM networks and redis-cell) keeps one number per
limit, the theoretical arrival time (TAT). A caller takes the earliest slot that every limit allows
and moves each TAT one emission interval past it. Slots are therefore spaced evenly: at R requests
an hour no 1-second window holds more than ceil(R/3600) + burst requests, and a limit of 2,000 an
hour never turns into 2,000 in a minute.

Two refinements keep that true at the server, not just on paper. A slot is only taken when it is
due (within ``horizon`` seconds), so it is planned from what really happened; and every request's
actual send time is recorded, so no second of real sends holds more than ceil(R/3600) even when a
thread got the CPU late and the next ones did not.

The state lives in a small JSON file under ``fcntl.flock``, so two ``marketpipe run`` processes on
one machine share the pace. Across machines (pods), the Prefect concurrency limit on the source's
collect tag bounds how many collect tasks run at once.
"""

from __future__ import annotations

import fcntl
import json
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tasks.errors import QuotaExhaustedError

WINDOW = 1.0  # seconds: the window in which real sends are counted
WINDOW_MARGIN = 0.05  # seconds added to it, for the network between us and the server


@dataclass(frozen=True)
class Rate:
    """One request every ``interval`` seconds on average, with up to ``burst`` back to back."""

    interval: float
    burst: int = 1


_thread_locks: dict[Path, threading.Lock] = {}
_thread_locks_guard = threading.Lock()


def _thread_lock(path: Path) -> threading.Lock:
    with _thread_locks_guard:
        return _thread_locks.setdefault(path, threading.Lock())


class Pacer:
    """Paces one source's requests: ``acquire()`` blocks until the caller may send, then
    ``mark_sent(slot)`` records when it really did."""

    def __init__(
        self,
        source: str,
        rates: list[Rate],
        state_dir: str | Path,
        per_day: int | None = None,
        per_window: int | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.source = source
        self.rates = rates
        self.per_day = per_day
        self.per_window = per_window
        self.path = Path(state_dir) / f"{source}.json"
        self.horizon = min(0.05, min((r.interval for r in rates), default=1.0) / 4)
        self._clock = clock
        self._sleep = sleep

    def acquire(self, symbol: str = "") -> float:
        """Wait for and take the next slot; returns it (epoch seconds).

        Raises :class:`QuotaExhaustedError` without waiting when today's quota is used up.
        """
        while True:
            slot, taken = self._take(symbol)
            wait = slot - self._clock()
            if taken:
                if wait > 0:
                    self._sleep(wait)
                return slot
            self._sleep(max(wait - self.horizon / 2, self.horizon / 4))

    def mark_sent(self, slot: float) -> None:
        """Replace the slot by the real send time, so later slots are planned from it."""
        with self._locked_state() as state:
            now = self._clock()
            recent: list[float] = state.setdefault("recent", [])
            if slot in recent:
                recent[recent.index(slot)] = max(slot, now)
            for rate in self.rates:
                key = _key(rate)
                state["tat"][key] = max(state["tat"].get(key, now), now + rate.interval * (2 - rate.burst))

    def _take(self, symbol: str) -> tuple[float, bool]:
        """The next slot, taken only if it is due within the horizon."""
        with self._locked_state() as state:
            now = self._clock()
            today = datetime.fromtimestamp(now, UTC).date().isoformat()
            if state.get("day") != today:
                state["day"], state["count"] = today, 0
            if self.per_day is not None and state["count"] >= self.per_day:
                raise QuotaExhaustedError(
                    self.source,
                    symbol,
                    f"daily quota of {self.per_day} requests is used up (resets 00:00 UTC); deferred",
                )
            tats: dict[str, float] = state.setdefault("tat", {})
            recent: list[float] = state.setdefault("recent", [])
            slot = now
            for rate in self.rates:
                slot = max(slot, tats.get(_key(rate), now) - (rate.burst - 1) * rate.interval)
            if self.per_window is not None and len(recent) >= self.per_window:
                slot = max(slot, sorted(recent)[-self.per_window] + WINDOW + WINDOW_MARGIN)
            if slot - now > self.horizon:
                return slot, False
            for rate in self.rates:
                tats[_key(rate)] = max(tats.get(_key(rate), now), slot) + rate.interval
            if self.per_window is not None:
                state["recent"] = sorted([*recent, slot])[-self.per_window :]
            state["count"] += 1
            return slot, True

    @contextmanager
    def _locked_state(self) -> Iterator[dict[str, Any]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _thread_lock(self.path), self.path.open("a+", encoding="utf-8") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                handle.seek(0)
                state = _load(handle.read())
                state.setdefault("tat", {})
                yield state
                handle.seek(0)
                handle.truncate()
                handle.write(json.dumps(state))
                handle.flush()
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _key(rate: Rate) -> str:
    return f"every {rate.interval:.6g}s"


def _load(text: str) -> dict[str, Any]:
    try:
        state = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError:
        state = {}  # a torn or foreign file: start afresh rather than block collection
    return state if isinstance(state, dict) else {}


def rates_for(per_hour: int, per_minute: int | None, burst: int, headroom: float) -> list[Rate]:
    """The limits to pace by, each lowered by ``headroom`` so network jitter can't breach them."""
    factor = 1 - headroom
    rates = [Rate(3600 / (per_hour * factor), burst)]
    if per_minute is not None:
        rates.append(Rate(60 / (per_minute * factor), burst))
    return rates


def sends_per_second(per_hour: int) -> int | None:
    """How many real sends one second may hold: the hourly rate's share, or no extra bound below 1/s."""
    per_second = per_hour / 3600
    return math.ceil(per_second) if per_second >= 1 else None
