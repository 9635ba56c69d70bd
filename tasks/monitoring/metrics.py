"""Operation metrics: how long each stage of a symbol took and what it cost at the source.

The seed's ``start_operation`` / ``end_operation`` pair is the :func:`operation` context manager:
it times one stage of one symbol and collects the HTTP traffic sent inside it (requests, retries,
rate-limit answers, bytes). A stage that fails still reports what it cost: its exception carries
the operation (:func:`operation_of`), so a symbol throttled to failure shows its 429s.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

STAGES = ("collect", "process", "store")


@dataclass
class Traffic:
    """What a stage sent to a source: every attempt is a request, every attempt after a first a retry."""

    requests: int = 0
    retries: int = 0
    rate_limited: int = 0  # answers saying we were too fast: HTTP 429, Alpha Vantage's `Note`
    bytes: int = 0  # response bodies received

    def add(self, other: Traffic) -> None:
        self.requests += other.requests
        self.retries += other.retries
        self.rate_limited += other.rate_limited
        self.bytes += other.bytes


@dataclass
class Operation:
    """One stage of one symbol: its wall time and its traffic."""

    stage: str
    seconds: float = 0.0
    traffic: Traffic = field(default_factory=Traffic)


_current: ContextVar[Operation | None] = ContextVar("marketpipe_operation", default=None)
_ATTRIBUTE = "marketpipe_operation"


@contextmanager
def operation(stage: str) -> Iterator[Operation]:
    """Time ``stage`` and meter its traffic; an exception leaving it carries the operation."""
    done = Operation(stage)
    token = _current.set(done)
    started = time.perf_counter()
    try:
        yield done
    except Exception as exc:
        setattr(exc, _ATTRIBUTE, done)
        raise
    finally:
        done.seconds = time.perf_counter() - started
        _current.reset(token)


def metered() -> Traffic | None:
    """The traffic of the operation running in this context, if one is: where a source counts its sends."""
    running = _current.get()
    return running.traffic if running is not None else None


def operation_of(error: object) -> Operation | None:
    """The operation a failed stage's exception carries, if it went through :func:`operation`."""
    found = getattr(error, _ATTRIBUTE, None)
    return found if isinstance(found, Operation) else None
