"""Request pacing shared by every thread and process on a host: GCRA over a locked state file.

GCRA (the generic cell rate algorithm, as in ATM networks and redis-cell) keeps one number per
limit, the theoretical arrival time (TAT). A caller reserves the earliest slot that every limit
allows, moves each TAT one emission interval past it, then sleeps until its slot outside the lock.
Slots are therefore spaced evenly: at R requests an hour no 1-second window holds more than
ceil(R/3600) + burst requests, and a limit of 2,000 an hour never turns into 2,000 in a minute.

The state lives in a small JSON file under ``fcntl.flock``, so two ``marketpipe run`` processes on
one machine share the pace. Across machines (pods), the Prefect concurrency limit on the source's
collect tag bounds how many collect tasks run at once.
"""

from __future__ import annotations

import fcntl
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tasks.errors import QuotaExhaustedError


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
    """Paces one source's requests; ``acquire()`` blocks until the caller may send one."""

    def __init__(
        self,
        source: str,
        rates: list[Rate],
        state_dir: str | Path,
        per_day: int | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.source = source
        self.rates = rates
        self.per_day = per_day
        self.path = Path(state_dir) / f"{source}.json"
        self._clock = clock
        self._sleep = sleep

    def acquire(self, symbol: str = "") -> float:
        """Reserve the next slot and wait for it; returns the seconds waited.

        Raises :class:`QuotaExhaustedError` without waiting when today's quota is used up.
        """
        slot = self._reserve(symbol)
        wait = slot - self._clock()
        if wait > 0:
            self._sleep(wait)
        return max(wait, 0.0)

    def _reserve(self, symbol: str) -> float:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _thread_lock(self.path), self.path.open("a+", encoding="utf-8") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                handle.seek(0)
                state = _load(handle.read())
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
                slot = now
                for rate in self.rates:
                    tat = max(tats.get(_key(rate), now), now)
                    slot = max(slot, tat - (rate.burst - 1) * rate.interval)
                for rate in self.rates:
                    tat = max(tats.get(_key(rate), now), slot)
                    tats[_key(rate)] = tat + rate.interval
                state["count"] += 1
                handle.seek(0)
                handle.truncate()
                handle.write(json.dumps(state))
                handle.flush()
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        return slot


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
