"""The clock real time runs on: the system's, or a simulated one that starts at a chosen instant and
may run faster, so an hour of session can be replayed in minutes against the sandbox.

Every process that shares a simulated clock (the sandbox and `marketpipe realtime`) is given the
same spec, which pins the simulated instant to a wall-clock instant: they agree to the millisecond
without talking to each other.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from tasks.errors import UsageError


class Clock:
    """The system clock; subclasses only change what ``time()`` returns and how fast time passes."""

    speed = 1.0

    def time(self) -> float:
        """Epoch seconds."""
        return time.time()

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.time(), UTC)

    def wait_until(self, instant: float, stop: threading.Event, wake: threading.Event | None = None) -> bool:
        """Sleep until the clock reads ``instant``, ``wake`` is set, or ``stop`` is (seen within a
        second of the wall when waiting on ``wake``); True if it was stopped."""
        event = wake or stop
        while not stop.is_set():
            left = (instant - self.time()) / self.speed
            if left <= 0 or (wake is not None and wake.is_set()):
                return False
            event.wait(min(left, 1.0))
        return True

    def real_seconds(self, seconds: float) -> float:
        """How long ``seconds`` of this clock last on the wall."""
        return seconds / self.speed


@dataclass(frozen=True)
class SimulatedClock(Clock):
    """Reads ``start`` at the wall-clock instant ``anchor`` and runs ``speed`` times as fast."""

    start: float
    anchor: float
    speed: float = 1.0

    def time(self) -> float:
        return self.start + (time.time() - self.anchor) * self.speed

    @property
    def spec(self) -> str:
        start = datetime.fromtimestamp(self.start, UTC)
        return f"{start:%Y-%m-%dT%H:%M:%S.%fZ},speed={self.speed:g},anchor={self.anchor:.6f}"

    @classmethod
    def parse(cls, spec: str) -> SimulatedClock:
        """``2024-03-13T14:30:00Z[,speed=20][,anchor=EPOCH]``; without an anchor, the clock starts now."""
        first, *options = [part.strip() for part in spec.split(",")]
        try:
            start = datetime.fromisoformat(first.replace("Z", "+00:00"))
            if start.tzinfo is None:
                start = start.replace(tzinfo=UTC)
            values = dict(option.split("=", 1) for option in options)
            unknown = set(values) - {"speed", "anchor"}
            if unknown:
                raise ValueError(f"unknown part {sorted(unknown)[0]!r}")
            speed = float(values.get("speed", 1.0))
            anchor = float(values.get("anchor", time.time()))
        except ValueError as exc:
            raise UsageError(
                f"invalid clock {spec!r} ({exc}): expected INSTANT[,speed=X][,anchor=EPOCH_SECONDS], "
                "e.g. 2024-03-13T14:30:00Z,speed=20"
            ) from None
        if speed <= 0:
            raise UsageError(f"invalid clock {spec!r}: speed must be above 0")
        return cls(start.timestamp(), anchor, speed)


def clock_from(spec: str | None) -> Clock:
    return Clock() if not spec else SimulatedClock.parse(spec)
