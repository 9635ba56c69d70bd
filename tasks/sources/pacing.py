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

The state lives in a small JSON file under ``fcntl.flock``, so every process that sees the
directory shares the pace: two ``marketpipe run`` processes on one machine, and pods that mount
the same volume. Across machines without one, the Prefect concurrency limit on the source's
collect tag bounds how many collect tasks run at once.

The same file keeps the daily quota: the count of today's requests, and a day the source itself
said was used up (Alpha Vantage's "25 requests per day" body), so every later request of that day
is deferred without being sent. The quota must outlive a run, and a pod's /tmp does not, so on
Kubernetes the chart puts the directory on the spool's persistent volume. A file there needs no
service that may be down (as the store may be), and unlike a Prefect concurrency limit with slot
decay it resets at 00:00 UTC and can hold "the source said it is spent" (see the README's "Rate
limits"). A file is replaced whole (written aside, then renamed), is never followed through a
symbolic link, and lives in a directory only this user can write: whoever can rewrite it can reset
the count. One that cannot be read (torn, empty, or not ours in shape) counts a configured quota
as used up until 00:00 UTC rather than starting from 0; the pace may restart.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import math
import os
import socket
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from configs.settings import ConfigError
from tasks.errors import QuotaExhaustedError

WINDOW = 1.0  # seconds: the window in which the server counts arrivals
# Arrival order is bounded by our own send and answer times, so no allowance for the network is
# needed; this only absorbs the difference between our clock and the one the server counts with.
WINDOW_MARGIN = 0.01
# A waiting taker looks at the state at least this often (seconds), so a quota the source reports
# used up defers the symbols waiting behind it at once rather than at their slots.
POLL = 1.0
SETTING = "collection.rate_limit_dir (MARKETPIPE__COLLECTION__RATE_LIMIT_DIR)"

logger = logging.getLogger("marketpipe.pacing")


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
        key: str | None = None,
    ) -> None:
        self.source = source
        self.key = key or source  # names the state file: pacers with different keys share nothing
        self.rates = rates
        self.per_day = per_day
        self.per_window = per_window
        self.stale_after = stale_after  # an unanswered request this old belongs to a process that died
        self.directory = Path(state_dir)
        self.path = self.directory / f"{self.key}.json"
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
                self._sleep(min(max(slot - self._clock() - self.horizon / 2, self.horizon / 4), POLL))
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
            requests: list[Any] = window["requests"]
            for index in range(len(requests) - 1, -1, -1):  # from the newest: it was taken moments ago
                entry = requests[index]
                if isinstance(entry, dict) and entry["id"] == ticket.id:
                    requests[index] = _answer_mark(now)  # answered: only its answer time matters from now on
                    break
            else:  # already written off as stale: still, nothing before now can arrive later
                window["floor"] = max(window["floor"], now)
            self._compact(window)

    def exhaust(self, reason: str) -> float:
        """The source said today's quota is used up: defer every later request until 00:00 UTC.

        Returns when the quota is taken to reset (epoch seconds). ``reason`` is kept in the state
        file and repeated to every symbol deferred by it, so it must hold no secret.
        """
        with self._locked_state() as state:
            until = max(_next_midnight(self._clock()), _spent_until(state))
            state["spent"] = {"until": until, "reason": reason}
        return until

    def check(self) -> None:
        """Raise ConfigError if the state can't be kept safely here, before any symbol is tried."""
        with self._locked_state():
            pass

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
            spent = state.get("spent")
            if spent is not None and now < spent["until"]:
                raise QuotaExhaustedError(
                    self.source, symbol, f"{spent['reason']}; deferred until {utc_text(spent['until'])}"
                )
            state.pop("spent", None)
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
                window["requests"].append({"id": ticket.id, "taken": now, "done": None, **_taker()})
            state["count"] += 1
            return slot, ticket

    def _window_opens(self, window: dict[str, Any], now: float) -> float | None:
        """When the next request may be sent: WINDOW after the last answer among all requests but the
        latest ``per_window - 1``; None while one of those is unanswered."""
        assert self.per_window is not None
        requests: list[Any] = window["requests"]
        for index, entry in enumerate(requests):
            in_flight = isinstance(entry, dict) and entry.get("done") is None
            if in_flight and (entry["taken"] + self.stale_after <= now or _taker_exited(entry)):
                requests[index] = _answer_mark(now)  # its process died: whatever it sent has arrived by now
        self._compact(window)
        older = [_answered(entry) for entry in requests[: max(len(requests) - (self.per_window - 1), 0)]]
        if any(answered is None for answered in older):
            return None
        return max([float(window["floor"]), *(a for a in older if a is not None)]) + WINDOW + WINDOW_MARGIN

    def _compact(self, window: dict[str, Any]) -> None:
        """Fold answered requests older than the latest ``per_window - 1`` into the floor."""
        assert self.per_window is not None
        requests: list[Any] = window["requests"]
        excess = 0
        while len(requests) - excess > self.per_window - 1 and (answered := _answered(requests[excess])) is not None:
            window["floor"] = max(window["floor"], answered)
            excess += 1
        del requests[:excess]

    @contextmanager
    def _locked_state(self) -> Iterator[dict[str, Any]]:
        """The state under an exclusive lock; it is saved when the body ends or defers a symbol."""
        with _thread_lock(self.path), _state_dir(self.directory) as directory:
            lock = _open_private(self.directory / f"{self.key}.lock", directory, os.O_RDWR | os.O_CREAT)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX)
                before = _read_private(self.path, directory)
                state = self._parse(before)
                try:
                    yield state
                except QuotaExhaustedError:  # a day's rollover or a fail-safe mark must still be kept
                    self._save(state, before, directory)
                    raise
                self._save(state, before, directory)
            finally:
                os.close(lock)  # releases the flock

    def _parse(self, raw: bytes | None) -> dict[str, Any]:
        """The stored state; an unreadable one restarts, but for a quota counts as used up today."""
        state, problem = _load(raw)
        if not isinstance(state.get("tat"), dict):
            state["tat"] = {}
        if problem is not None and self.per_day is not None:
            reason = (
                f"the pacing state file {self.path} is unreadable ({problem}), so today's request count "
                f"is unknown and the daily quota of {self.per_day} is counted as used up. If it is not, "
                f"delete {self.path} to reset the count"
            )
            logger.warning("%s", reason)
            state["spent"] = {"until": _next_midnight(self._clock()), "reason": reason}
        return state

    def _save(self, state: dict[str, Any], before: bytes | None, directory: int) -> None:
        """Replace the file whole, so a crash leaves the old state or the new, never half of one."""
        text = json.dumps(state).encode()
        if text == before:
            return
        temporary = self.directory / f".{self.key}.{uuid.uuid4().hex}.tmp"
        handle = _open_private(temporary, directory, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(text)
            os.replace(temporary.name, self.path.name, src_dir_fd=directory, dst_dir_fd=directory)
        except BaseException:
            with suppress(OSError):
                os.unlink(temporary.name, dir_fd=directory)
            raise


def _host() -> str:
    """This host and PID namespace: where a taker's process id means that process."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = 0
    return f"{socket.gethostname()}/{namespace}"


_HOST = _host()


def _taker() -> dict[str, Any]:
    return {"host": _HOST, "pid": os.getpid()}


def _taker_exited(entry: dict[str, Any]) -> bool:
    """Whether the request was taken by a process of this host that is gone, so it will never finish it.

    A `kill -9` leaves its request unanswered; without this, every run after it waited for
    ``stale_after`` (two minutes by default) before sending. Entries of other hosts, of older
    versions, or of a process that may still run keep waiting for ``stale_after``.
    """
    pid = entry.get("pid")
    if entry.get("host") != _HOST or not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # it runs, as another user
        return False
    return False


def _answer_mark(when: float) -> int:
    """An answered request's window entry: its answer time in whole milliseconds, rounded up.

    At a high limit the window holds a thousand entries, and the file is read and written twice
    per request: a bare integer costs a fifth of a float to write, and a tenth of the mapping that
    identifies a request in flight. Rounding up only ever makes an answer look later, which opens
    the window later, never sooner.
    """
    return math.ceil(when * 1000)


def _answered(entry: Any) -> float | None:
    """When a window entry's request was answered (epoch seconds); None while it is in flight.

    Mappings with ``done`` set are an older version's answered requests.
    """
    if isinstance(entry, dict):
        done = entry.get("done")
        return None if done is None else float(done)
    return float(entry) / 1000


def _key(rate: Rate) -> str:
    return f"every {rate.interval:.6g}s"


def _window(state: dict[str, Any]) -> dict[str, Any]:
    """The requests the window bound still needs, in the order their slots were taken."""
    window = state.get("window")
    if not (isinstance(window, dict) and isinstance(window.get("requests"), list) and "floor" in window):
        window = state["window"] = {"requests": [], "floor": 0.0}
    return window


def _load(raw: bytes | None) -> tuple[dict[str, Any], str | None]:
    """The state and, if the file can't be trusted, why: a missing file is a fresh start, an empty
    one is not (a crash can leave one; a write never does)."""
    if raw is None:
        return {}, None
    if not raw.strip():
        return {}, "it is empty"
    try:
        state = json.loads(raw.decode("utf-8"))
    except ValueError:  # invalid UTF-8 or JSON
        return {}, "it is not JSON: torn by a crash, or written by something else"
    if not isinstance(state, dict):
        return {}, "it is not a JSON object"
    malformed = [key for key, valid in _QUOTA_FIELDS.items() if key in state and not valid(state[key])]
    if malformed:
        return {}, f"its {', '.join(malformed)} {'is' if len(malformed) == 1 else 'are'} malformed"
    return state, None


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_spent(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and isinstance(value.get("until"), int | float)
        and not isinstance(value.get("until"), bool)
        and isinstance(value.get("reason"), str)
    )


# The fields the quota is decided by, and their valid shape; the pace's own fields may restart.
_QUOTA_FIELDS = {"day": lambda v: isinstance(v, str), "count": _is_count, "spent": _is_spent}


def _spent_until(state: dict[str, Any]) -> float:
    spent = state.get("spent")
    return float(spent["until"]) if spent is not None else 0.0


def _next_midnight(now: float) -> float:
    """00:00 UTC after ``now``: when a daily quota resets."""
    today = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return (today + timedelta(days=1)).timestamp()


def utc_text(when: float) -> str:
    """An instant for a message: 2025-11-25 00:00 UTC."""
    return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%d %H:%M UTC")


@contextmanager
def _state_dir(directory: Path) -> Iterator[int]:
    """The state directory, opened (created 0700 if missing) and checked that only we can write it."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        handle = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(
            f"cannot use {directory} for pacing and quota state: {exc.strerror}. Set {SETTING} "
            "to a directory this user can create and write"
        ) from None
    try:
        _check_private_dir(os.fstat(handle), directory)
        yield handle
    finally:
        os.close(handle)


def _check_private_dir(info: os.stat_result, directory: Path) -> None:
    if info.st_uid != os.geteuid():
        raise ConfigError(
            f"the pacing state directory {directory} is owned by uid {info.st_uid}, not by this process "
            f"(uid {os.geteuid()}), so someone else could reset the quota count in it. Set {SETTING} to "
            "a directory of this user's, or remove it so it is created afresh"
        )
    writable = [who for who, bit in (("its group", stat.S_IWGRP), ("others", stat.S_IWOTH)) if info.st_mode & bit]
    if writable:
        raise ConfigError(
            f"the pacing state directory {directory} is writable by {' and '.join(writable)} "
            f"(mode {stat.S_IMODE(info.st_mode):04o}), so they could reset the quota count in it. Run "
            f"`chmod 700 {directory}`, or set {SETTING} to a directory only this user can write "
            "(on Kubernetes, fsGroupChangePolicy: OnRootMismatch keeps kubelet from opening it to the fsGroup)"
        )


def _open_private(path: Path, directory: int, flags: int) -> int:
    """A regular file of ours in the open ``directory``, opened without following a symbolic link."""
    try:
        handle = os.open(path.name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600, dir_fd=directory)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigError(f"{path} is a symbolic link; pacing state is never read through one: remove it") from None
        raise
    info = os.fstat(handle)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
        os.close(handle)
        raise ConfigError(f"{path} is not a regular file owned by this user (uid {os.geteuid()}): remove it")
    return handle


def _read_private(path: Path, directory: int) -> bytes | None:
    """The file's bytes, or None when it does not exist yet."""
    try:
        handle = _open_private(path, directory, os.O_RDONLY)
    except FileNotFoundError:
        return None
    with os.fdopen(handle, "rb") as source:
        return source.read()


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
