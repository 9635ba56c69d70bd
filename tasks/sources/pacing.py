"""Request pacing shared by every thread and process on a host: GCRA over a locked state file.

GCRA (the generic cell rate algorithm, as in ATM networks and redis-cell) keeps one number per
limit, the theoretical arrival time (TAT). A caller takes the earliest slot that every limit allows
and moves each TAT one emission interval past it. Slots are therefore spaced evenly: at R requests
an hour no 1-second window holds more than ceil(R/3600) + burst requests, and a limit of 2,000 an
hour never turns into 2,000 in a minute.

A slot is only taken when it is due (within ``horizon`` seconds), so it is planned from what really
happened. Where a source allows at least one request a second, a second bound keeps the limit at
the server, which counts requests when they ARRIVE, whatever the scheduling: request k may only be
sent once every request at least ``per_window`` before it has been answered and ``WINDOW`` seconds
have passed since. A request arrives after it is sent and before it is answered, so no window of
arrivals can hold more than ``per_window``, however late a thread got the CPU between taking its
slot and writing to the socket, or how long a response took. It costs nothing while responses take
less than the slack between five slots and the window. Below one request a second, the next slot
is planned from the real send time instead, so a late sender cannot squeeze the ones after it.

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
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tasks.errors import QuotaExhaustedError

WINDOW = 1.0  # seconds: the window in which the server counts arrivals
# Arrival order is bounded by our own send and answer times, so no allowance for the network is
# needed; this only absorbs the difference between our clock and the one the server counts with.
WINDOW_MARGIN = 0.01


@dataclass(frozen=True)
class Rate:
    """One request every ``interval`` seconds on average, with up to ``burst`` back to back."""

    interval: float
    burst: int = 1


@dataclass(frozen=True)
class Ticket:
    """A taken slot: the caller sends at ``slot`` and reports back with :meth:`Pacer.finish`."""

    slot: float
    id: str


_thread_locks: dict[tuple[Path, str], threading.Lock] = {}
_thread_locks_guard = threading.Lock()


def _thread_lock(path: Path, role: str = "state") -> threading.Lock:
    """This process's lock on ``path`` for ``role``: the state file itself, or the right to take a slot."""
    with _thread_locks_guard:
        return _thread_locks.setdefault((path, role), threading.Lock())


class Pacer:
    """Paces one source's requests: ``with pacer.request(symbol):`` waits for a slot, then the body
    sends; leaving it records when the attempt ended (answered, failed or timed out)."""

    def __init__(
        self,
        source: str,
        rates: list[Rate],
        state_dir: str | Path,
        per_day: int | None = None,
        per_window: int | None = None,
        stale_after: float = 300.0,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.source = source
        self.rates = rates
        self.per_day = per_day
        self.per_window = per_window
        self.stale_after = stale_after  # an unanswered request this old belongs to a process that died
        self.path = Path(state_dir) / f"{source}.json"
        self.horizon = min(0.05, min((r.interval for r in rates), default=1.0) / 4)
        self._clock = clock
        self._sleep = sleep

    @contextmanager
    def request(self, symbol: str = "") -> Iterator[Ticket]:
        """Wait for a slot, run the body (the send), then record that the attempt is over."""
        ticket = self.acquire(symbol)
        try:
            yield ticket
        finally:
            self.finish(ticket)

    def acquire(self, symbol: str = "") -> Ticket:
        """Wait for and take the next slot; the caller must :meth:`finish` it once answered.

        Raises :class:`QuotaExhaustedError` without waiting when today's quota is used up.
        """
        with _thread_lock(self.path, "taker"):  # one thread of a process polls; the rest wait their turn
            slot, ticket = self._take(symbol)
            while ticket is None:
                self._sleep(max(slot - self._clock() - self.horizon / 2, self.horizon / 4))
                slot, ticket = self._take(symbol)
        wait = slot - self._clock()
        if wait > 0:
            self._sleep(wait)
        if self.per_window is None:
            self._plan_from_send()
        return ticket

    def finish(self, ticket: Ticket) -> None:
        """The request is answered, or its attempt ended: it has reached the server, if it ever will."""
        if self.per_window is None:
            return
        now = self._clock()  # before the lock: waiting for it must not make the answer look later
        with self._locked_state() as state:
            window = _window(state)
            for entry in window["requests"]:
                if entry["id"] == ticket.id:
                    entry["done"] = now
                    break
            else:  # already written off as stale: still, nothing before now can arrive later
                window["floor"] = max(window["floor"], now)
            self._compact(window)

    def _plan_from_send(self) -> None:
        """Plan the next slots from the real send time, so a late sender can't squeeze the next ones."""
        with self._locked_state() as state:
            now = self._clock()
            for rate in self.rates:
                key = _key(rate)
                state["tat"][key] = max(state["tat"].get(key, now), now + rate.interval * (2 - rate.burst))

    def _take(self, symbol: str) -> tuple[float, Ticket | None]:
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
            tats: dict[str, float] = state["tat"]
            window = _window(state) if self.per_window is not None else None
            slot = 0.0
            for rate in self.rates:
                # With the window bound keeping the server's count, a taker that comes up to one interval
                # late (a thread woken late) still gets the planned slot and sends at once, so the pace
                # is the plan's, not the scheduler's. Without it, a slot is never in the past.
                earliest = now - rate.interval if window is not None else now
                slot = max(slot, earliest, tats.get(_key(rate), now) - (rate.burst - 1) * rate.interval)
            if window is not None:
                answered = self._window_opens(window, now)
                if answered is None:  # a request that must be answered first is still in flight
                    return now + self.horizon, None
                slot = max(slot, answered)
            if slot - now > self.horizon:
                return slot, None
            for rate in self.rates:
                tats[_key(rate)] = max(tats.get(_key(rate), now), slot) + rate.interval
            ticket = Ticket(slot, uuid.uuid4().hex)
            if window is not None:
                window["requests"].append({"id": ticket.id, "taken": now, "done": None})
            state["count"] += 1
            return slot, ticket

    def _window_opens(self, window: dict[str, Any], now: float) -> float | None:
        """When the next request may be sent: WINDOW after the last answer among all requests but the
        latest ``per_window - 1``; None while one of those is unanswered."""
        assert self.per_window is not None
        requests: list[dict[str, Any]] = window["requests"]
        for entry in requests:
            if entry["done"] is None and entry["taken"] + self.stale_after <= now:
                entry["done"] = now  # its process died: whatever it sent has arrived by now
        self._compact(window)
        older = requests[: max(len(requests) - (self.per_window - 1), 0)]
        if any(entry["done"] is None for entry in older):
            return None
        last_answer = max([float(window["floor"]), *(float(entry["done"]) for entry in older)])
        return last_answer + WINDOW + WINDOW_MARGIN

    def _compact(self, window: dict[str, Any]) -> None:
        """Fold answered requests older than the latest ``per_window - 1`` into the floor."""
        assert self.per_window is not None
        requests: list[dict[str, Any]] = window["requests"]
        while len(requests) > self.per_window - 1 and requests[0]["done"] is not None:
            window["floor"] = max(window["floor"], requests.pop(0)["done"])

    @contextmanager
    def _locked_state(self) -> Iterator[dict[str, Any]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _thread_lock(self.path), self.path.open("a+", encoding="utf-8") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                handle.seek(0)
                state = _load(handle.read())
                if not isinstance(state.get("tat"), dict):
                    state["tat"] = {}
                yield state
                handle.seek(0)
                handle.truncate()
                handle.write(json.dumps(state))
                handle.flush()
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _key(rate: Rate) -> str:
    return f"every {rate.interval:.6g}s"


def _window(state: dict[str, Any]) -> dict[str, Any]:
    """The requests the window bound still needs, in the order their slots were taken."""
    window = state.get("window")
    if not (isinstance(window, dict) and isinstance(window.get("requests"), list) and "floor" in window):
        window = state["window"] = {"requests": [], "floor": 0.0}
    return window


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
    """How many arrivals one second may hold: the hourly rate's share, or no extra bound below 1/s."""
    per_second = per_hour / 3600
    return math.ceil(per_second) if per_second >= 1 else None
