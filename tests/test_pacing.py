"""Pacing, backoff and redaction, on a simulated clock where timing matters."""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import tenacity

from tasks.errors import QuotaExhaustedError, RateLimitedError
from tasks.sources.base import RedactSecrets, full_jitter_backoff
from tasks.sources.pacing import Pacer, Rate, rates_for


class FakeClock:
    def __init__(self, start: float = 1_764_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def paced_times(pacer: Pacer, clock: FakeClock, n: int) -> list[float]:
    times = []
    for _ in range(n):
        pacer.acquire()
        times.append(clock.now)
    return times


def max_in_any_window(times: list[float], width: float = 1.0) -> int:
    return max(sum(1 for t in times if start <= t < start + width) for start in times)


@pytest.mark.parametrize(("per_hour", "burst"), [(2000, 1), (18000, 1), (18000, 3), (36000, 2)])
def test_no_second_holds_more_than_the_rate_plus_burst(tmp_path: Path, per_hour: int, burst: int) -> None:
    clock = FakeClock()
    pacer = Pacer("src", rates_for(per_hour, None, burst, 0.0), tmp_path, clock=clock, sleep=clock.sleep)
    times = paced_times(pacer, clock, 200)
    assert max_in_any_window(times) <= math.ceil(per_hour / 3600) + burst
    achieved = (len(times) - burst) / (times[-1] - times[0])
    assert achieved == pytest.approx(per_hour / 3600, rel=0.01)


def test_2000_an_hour_is_not_2000_in_the_first_minute(tmp_path: Path) -> None:
    clock = FakeClock()
    pacer = Pacer("src", rates_for(2000, None, 1, 0.0), tmp_path, clock=clock, sleep=clock.sleep)
    times = paced_times(pacer, clock, 100)
    assert sum(1 for t in times if t < times[0] + 60) == 34  # 2000/3600 a second, evenly


def test_headroom_paces_below_the_limit(tmp_path: Path) -> None:
    clock = FakeClock()
    pacer = Pacer("src", rates_for(18000, None, 1, 0.07), tmp_path, clock=clock, sleep=clock.sleep)
    times = paced_times(pacer, clock, 50)
    assert (len(times) - 1) / (times[-1] - times[0]) == pytest.approx(4.65)


def test_the_stricter_of_hour_and_minute_limits_wins(tmp_path: Path) -> None:
    clock = FakeClock()
    pacer = Pacer("src", rates_for(3600, 30, 1, 0.0), tmp_path, clock=clock, sleep=clock.sleep)
    times = paced_times(pacer, clock, 31)
    assert times[-1] - times[0] == pytest.approx(60.0)  # 30 a minute, not 60


def test_pacers_sharing_a_state_file_share_the_pace(tmp_path: Path) -> None:
    clock = FakeClock()
    first = Pacer("src", [Rate(0.5)], tmp_path, clock=clock, sleep=clock.sleep)
    second = Pacer("src", [Rate(0.5)], tmp_path, clock=clock, sleep=clock.sleep)
    slots = []
    for pacer in (first, second, first, second):
        slots.append(pacer.acquire(""))
    assert [s - slots[0] for s in slots] == [0.0, 0.5, 1.0, 1.5]


def test_a_daily_quota_defers_and_resets_at_midnight_utc(tmp_path: Path) -> None:
    clock = FakeClock(start=1_764_028_700.0)  # 2025-11-24 23:58:20 UTC
    pacer = Pacer("av", [Rate(1.0)], tmp_path, per_day=3, clock=clock, sleep=clock.sleep)
    paced_times(pacer, clock, 3)
    with pytest.raises(QuotaExhaustedError, match="daily quota of 3"):
        pacer.acquire("IBM")
    clock.now += 120  # past midnight
    pacer.acquire("IBM")


def test_a_corrupt_state_file_does_not_block_collection(tmp_path: Path) -> None:
    (tmp_path / "src.json").write_text("{not json")
    clock = FakeClock()
    Pacer("src", [Rate(1.0)], tmp_path, clock=clock, sleep=clock.sleep).acquire()


def retry_state(attempt: int, error: BaseException) -> tenacity.RetryCallState:
    state = tenacity.RetryCallState(tenacity.Retrying(), None, (), {})
    state.attempt_number = attempt
    state.set_exception((type(error), error, None))
    return state


def test_backoff_is_full_jitter_under_an_exponential_cap() -> None:
    wait = full_jitter_backoff(initial=1.0, cap=30.0)
    error = RuntimeError("boom")
    for attempt, ceiling in ((1, 1.0), (2, 2.0), (3, 4.0), (6, 30.0), (10, 30.0)):
        waits = [wait(retry_state(attempt, error)) for _ in range(300)]
        assert all(0 <= w <= ceiling for w in waits)
        assert max(waits) > 0.8 * ceiling and min(waits) < 0.2 * ceiling  # spread over the whole range


def test_backoff_honours_retry_after() -> None:
    wait = full_jitter_backoff(initial=0.1, cap=30.0)
    error = RateLimitedError("yahoo_finance", "AAPL", "429", retry_after=7.0)
    assert all(wait(retry_state(1, error)) >= 7.0 for _ in range(50))
    capped = full_jitter_backoff(initial=0.1, cap=5.0)
    assert capped(retry_state(1, error)) <= 5.0


@pytest.fixture
def captured() -> Iterator[list[str]]:
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Keep()
    log = logging.getLogger("httpx")
    log.addHandler(handler)
    old_level = log.level
    log.setLevel(logging.DEBUG)
    yield lines
    log.removeHandler(handler)
    log.setLevel(old_level)


def test_httpx_request_lines_lose_their_secrets(captured: list[str]) -> None:
    logging.getLogger("httpx").info(
        'HTTP Request: %s %s "%s %d %s"', "GET", "http://h/query?function=X&apikey=SUPERSECRET&symbol=IBM",
        "HTTP/1.1", 200, "OK",
    )  # fmt: skip
    assert captured == ['HTTP Request: GET http://h/query?function=X&apikey=***&symbol=IBM "HTTP/1.1 200 OK"']
    assert isinstance(logging.getLogger("httpx").filters[0], RedactSecrets)


def test_a_late_sender_pushes_the_next_slots_back(tmp_path: Path) -> None:
    clock = FakeClock()
    pacer = Pacer("src", rates_for(18000, None, 1, 0.0), tmp_path, per_window=5, clock=clock, sleep=clock.sleep)
    sent = []
    for i in range(12):
        slot = pacer.acquire()
        if i == 2:
            clock.now += 0.15  # this thread got the CPU 150 ms late
        pacer.mark_sent(slot)
        sent.append(clock.now)
    assert max_in_any_window(sent) <= 5
    assert all(b > a for a, b in itertools.pairwise(sent))
