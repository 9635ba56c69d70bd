"""Pacing, backoff and redaction, on a simulated clock where timing matters."""

from __future__ import annotations

import functools
import heapq
import itertools
import json
import logging
import math
import os
import random
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import tenacity

from configs.settings import ConfigError
from tasks.errors import QuotaExhaustedError, RateLimitedError
from tasks.sources.base import RedactSecrets, full_jitter_backoff
from tasks.sources.pacing import POLL, Pacer, Rate, rates_for
from tests.conftest import REPO


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
        slots.append(pacer.acquire("").slot)
    assert [s - slots[0] for s in slots] == [0.0, 0.5, 1.0, 1.5]


def test_a_daily_quota_defers_and_resets_at_midnight_utc(tmp_path: Path) -> None:
    clock = FakeClock(start=1_764_028_700.0)  # 2025-11-24 23:58:20 UTC
    pacer = Pacer("av", [Rate(1.0)], tmp_path, per_day=3, clock=clock, sleep=clock.sleep)
    paced_times(pacer, clock, 3)
    with pytest.raises(QuotaExhaustedError, match="daily quota of 3"):
        pacer.acquire("IBM")
    clock.now += 120  # past midnight
    pacer.acquire("IBM")


def test_a_corrupt_state_file_does_not_block_a_source_without_a_quota(tmp_path: Path) -> None:
    (tmp_path / "src.json").write_text("{not json")
    clock = FakeClock()
    Pacer("src", [Rate(1.0)], tmp_path, clock=clock, sleep=clock.sleep).acquire()
    assert json.loads((tmp_path / "src.json").read_text())["count"] == 1  # the pace restarted


MIDNIGHT = 1_764_028_800.0  # 2025-11-25 00:00 UTC


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ('{"day": "2025-11-24", "count": 2, "tat": {', "not JSON"),  # torn mid-write
        ("", "empty"),  # what a crash can leave behind a rename that never reached the disk
        (b"\xff\xfe{}", "not JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"day": "2025-11-24", "count": "two"}', "count is malformed"),
        ('{"day": "2025-11-24", "count": 0, "spent": {"until": "soon"}}', "spent is malformed"),
    ],
)
def test_an_unreadable_state_file_counts_the_quota_as_used_up(
    tmp_path: Path, content: str | bytes, problem: str
) -> None:
    state = tmp_path / "av.json"
    state.write_bytes(content if isinstance(content, bytes) else content.encode())
    clock = FakeClock(start=MIDNIGHT - 3600)
    pacer = Pacer("av", [Rate(1.0)], tmp_path, per_day=25, clock=clock, sleep=clock.sleep)
    with pytest.raises(QuotaExhaustedError) as caught:
        pacer.acquire("IBM")
    message = str(caught.value)
    assert f"pacing state file {state} is unreadable" in message and problem in message
    assert f"delete {state} to reset the count" in message
    assert "deferred until 2025-11-25 00:00 UTC" in message
    # Kept, not forgotten: a new process (a new pod) defers too, until the quota resets.
    again = Pacer("av", [Rate(1.0)], tmp_path, per_day=25, clock=clock, sleep=clock.sleep)
    with pytest.raises(QuotaExhaustedError, match="is unreadable"):
        again.acquire("MSFT")
    clock.now = MIDNIGHT + 1
    again.acquire("MSFT")


def test_deleting_an_unreadable_state_file_resets_the_count(tmp_path: Path) -> None:
    (tmp_path / "av.json").write_text("{torn")
    clock = FakeClock()
    pacer = Pacer("av", [Rate(1.0)], tmp_path, per_day=25, clock=clock, sleep=clock.sleep)
    with pytest.raises(QuotaExhaustedError):
        pacer.acquire()
    (tmp_path / "av.json").unlink()
    pacer.acquire()


def test_a_quota_the_source_reports_spent_defers_every_pacer_until_midnight_utc(tmp_path: Path) -> None:
    clock = FakeClock(start=MIDNIGHT - 600)
    first = Pacer("av", [Rate(1.0)], tmp_path, clock=clock, sleep=clock.sleep)  # no per_day configured
    first.acquire("AAA")
    until = first.exhaust("Alpha Vantage said the daily quota is used up: 25 requests per day")
    assert until == MIDNIGHT
    other_process = Pacer("av", [Rate(1.0)], tmp_path, clock=clock, sleep=clock.sleep)
    for pacer in (first, other_process):
        with pytest.raises(QuotaExhaustedError) as caught:
            pacer.acquire("BBB")
        assert str(caught.value) == (
            "av BBB: Alpha Vantage said the daily quota is used up: 25 requests per day; "
            "deferred until 2025-11-25 00:00 UTC"
        )
    clock.now = MIDNIGHT
    other_process.acquire("BBB")
    first.acquire("CCC")


def test_a_waiting_request_is_deferred_as_soon_as_the_quota_is_reported_spent(tmp_path: Path) -> None:
    clock = FakeClock()
    reporter = Pacer("av", [Rate(100.0)], tmp_path, clock=clock, sleep=clock.sleep)
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        clock.sleep(seconds)
        if len(sleeps) == 1:  # another symbol's request got the quota body while this one waited
            reporter.exhaust("spent")

    waiting = Pacer("av", [Rate(100.0)], tmp_path, clock=clock, sleep=sleep)
    waiting.acquire("AAA")
    start = clock.now
    with pytest.raises(QuotaExhaustedError, match="spent; deferred"):
        waiting.acquire("BBB")  # its slot is 100 s away
    assert clock.now - start <= POLL


def test_the_state_directory_is_created_private(tmp_path: Path) -> None:
    directory = tmp_path / "a" / "rate-limits"
    clock = FakeClock()
    pacer = Pacer("src", [Rate(0.01)], directory, per_day=1000, clock=clock, sleep=clock.sleep)
    for _ in range(20):
        pacer.acquire()
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert sorted(p.name for p in directory.iterdir()) == ["src.json", "src.lock"]  # no temporary file is left
    assert stat.S_IMODE((directory / "src.json").stat().st_mode) == 0o600
    assert json.loads((directory / "src.json").read_text())["count"] == 20


@pytest.mark.parametrize(("mode", "who"), [(0o770, "its group"), (0o703, "others"), (0o777, "its group and others")])
def test_a_state_directory_others_can_write_is_refused(tmp_path: Path, mode: int, who: str) -> None:
    directory = tmp_path / "shared"
    directory.mkdir()
    directory.chmod(mode)
    pacer = Pacer("src", [Rate(1.0)], directory, per_day=5)
    with pytest.raises(ConfigError) as caught:
        pacer.acquire()
    message = str(caught.value)
    assert f"{directory} is writable by {who} (mode {mode:04o})" in message
    assert f"chmod 700 {directory}" in message and "MARKETPIPE__COLLECTION__RATE_LIMIT_DIR" in message
    assert list(directory.iterdir()) == []  # nothing was written there


def test_a_state_directory_owned_by_someone_else_is_refused(tmp_path: Path) -> None:
    if os.geteuid() == 0:  # root can give a directory away; anyone else finds one owned by root
        directory = tmp_path / "theirs"
        directory.mkdir(mode=0o700)
        os.chown(directory, 54321, -1)
        owner = 54321
    else:
        directory, owner = Path("/"), 0
    with pytest.raises(ConfigError, match=f"{directory} is owned by uid {owner}, not by this process"):
        Pacer("src", [Rate(1.0)], directory).check()


def test_a_state_file_is_never_followed_through_a_symbolic_link(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text("keep me")
    directory = tmp_path / "state"
    directory.mkdir(mode=0o700)
    (directory / "av.json").symlink_to(elsewhere)
    with pytest.raises(ConfigError, match=r"av\.json is a symbolic link; pacing state is never read through one"):
        Pacer("av", [Rate(1.0)], directory, per_day=25).acquire()
    assert elsewhere.read_text() == "keep me"


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


class EventClock(FakeClock):
    """A simulated clock that runs scheduled events (responses coming back) as time passes."""

    def __init__(self, oversleep: float = 0.0) -> None:
        super().__init__()
        self.oversleep = oversleep  # a loaded machine wakes a sleeping thread this late
        self.events: list[tuple[float, int, Callable[[], None]]] = []
        self.count = itertools.count()

    def at(self, when: float, event: Callable[[], None]) -> None:
        heapq.heappush(self.events, (when, next(self.count), event))

    def sleep(self, seconds: float) -> None:
        target = self.now + seconds + self.oversleep
        while self.events and self.events[0][0] <= target:
            when, _, event = heapq.heappop(self.events)
            self.now = max(self.now, when)
            event()
        self.now = target


def arrivals(pacers: list[Pacer], clock: EventClock, delays: list[float], latencies: list[float]) -> list[float]:
    """When the server sees each request, with as many threads as needed: request i reaches the server
    ``delays[i]`` after its slot (a descheduled thread, the network) and is answered ``latencies[i]`` later."""
    seen = []
    for i, (delay, latency) in enumerate(zip(delays, latencies, strict=True)):
        pacer = pacers[i % len(pacers)]  # processes sharing the state file take turns
        ticket = pacer.acquire()
        seen.append(clock.now + delay)
        clock.at(clock.now + delay + latency, functools.partial(pacer.finish, ticket))
    clock.oversleep = 0.0
    clock.sleep(3600)
    return seen


def window_pacer(tmp_path: Path, clock: EventClock, headroom: float = 0.0) -> Pacer:
    rates = rates_for(18000, None, 1, headroom)
    return Pacer("src", rates, tmp_path, per_window=5, clock=clock, sleep=clock.sleep)


def test_late_arrivals_never_put_more_than_the_limit_in_a_window(tmp_path: Path) -> None:
    # The server counts arrivals. A thread descheduled between its slot and the socket write, or a
    # slow network, makes a request arrive late while the next ones arrive on time; a pacer that only
    # knows send times (the old one did) lets a sixth arrival into that request's second.
    clock = EventClock()
    rng = random.Random(7)
    n = 300
    delays = [rng.choice([0.0, 0.0, 0.0, rng.uniform(0, 0.4)]) for _ in range(n)]
    latencies = [rng.uniform(0.001, 0.3) for _ in range(n)]
    seen = arrivals([window_pacer(tmp_path, clock), window_pacer(tmp_path, clock)], clock, delays, latencies)
    assert max_in_any_window(seen) <= 5


def test_one_late_arrival_holds_back_the_request_a_window_after_it(tmp_path: Path) -> None:
    clock = EventClock()
    delays = [0.3 if i == 0 else 0.0 for i in range(12)]  # the first reaches the server 300 ms late
    seen = arrivals([window_pacer(tmp_path, clock)], clock, delays, [0.01] * 12)
    assert seen[5] - seen[0] >= 1.0 + 0.01  # the sixth waits for the first's answer, not its slot
    assert max_in_any_window(seen) <= 5


def test_late_senders_do_not_slow_the_pace(tmp_path: Path) -> None:
    # Every sleeping thread wakes 60 ms late (a loaded machine), 35 ms past its slot: the pace stays
    # the planned 4.65/s instead of losing the lateness on every request (1 / (0.215 + 0.035) = 4.0/s).
    clock = EventClock(oversleep=0.06)
    n = 100
    seen = arrivals([window_pacer(tmp_path, clock, headroom=0.07)], clock, [0.0] * n, [0.02] * n)
    assert (n - 1) / (seen[-1] - seen[0]) == pytest.approx(4.65, rel=0.01)
    assert max_in_any_window(seen) <= 5


def test_an_unanswered_request_blocks_the_window_until_its_process_is_taken_for_dead(tmp_path: Path) -> None:
    clock = FakeClock()
    pacer = Pacer("src", [Rate(0.25)], tmp_path, per_window=2, stale_after=30.0, clock=clock, sleep=clock.sleep)
    lost = pacer.acquire()  # its process died before finishing it
    pacer.finish(pacer.acquire())
    start = clock.now
    pacer.acquire()
    assert clock.now - lost.slot >= 30.0  # waited for the lost request to be written off
    assert clock.now - start < 31.0


def test_a_request_left_unanswered_by_a_killed_process_holds_no_one_back(tmp_path: Path) -> None:
    """A run after a `kill -9` sent nothing for two minutes: it waited for the dead process's answer."""
    child = (
        "import os, sys; from tasks.sources.pacing import Pacer, Rate; "
        "Pacer('src', [Rate(0.25)], sys.argv[1], per_window=1, stale_after=120.0).acquire(); os._exit(0)"
    )
    subprocess.run([sys.executable, "-c", child, str(tmp_path)], check=True, cwd=REPO, timeout=60)
    state = json.loads((tmp_path / "src.json").read_text())
    assert [entry["done"] for entry in state["window"]["requests"]] == [None]  # it never finished its request
    started = time.monotonic()
    Pacer("src", [Rate(0.25)], tmp_path, per_window=1, stale_after=120.0).acquire()
    assert time.monotonic() - started < 5  # not the 120 s a process on another host gets


def test_answered_requests_are_kept_as_bare_times_and_an_older_files_mappings_still_count(tmp_path: Path) -> None:
    """At a thousand requests a second the window holds a thousand entries, read and written twice per
    request: answered ones are whole milliseconds, and an older version's mappings keep their meaning."""
    clock = FakeClock()
    pacer = Pacer("src", [Rate(0.25)], tmp_path, per_window=3, clock=clock, sleep=clock.sleep)
    first = pacer.acquire()
    clock.now += 0.0004  # answered within the millisecond: kept as the next one
    pacer.finish(first)
    answered = clock.now
    in_flight = pacer.acquire()
    requests = json.loads((tmp_path / "src.json").read_text())["window"]["requests"]
    assert requests[0] == math.ceil(answered * 1000) and isinstance(requests[0], int)
    assert isinstance(requests[1], dict) and requests[1]["id"] == in_flight.id and requests[1]["done"] is None
    pacer.finish(in_flight)

    # An older version's file: the latest three requests answered late, as mappings. The next one
    # must wait until one second after the first of them was answered.
    state = json.loads((tmp_path / "src.json").read_text())
    answered_at = clock.now + 10.0
    state["window"] = {"floor": 0.0, "requests": [{"id": "a", "taken": clock.now, "done": answered_at}] * 3}
    (tmp_path / "src.json").write_text(json.dumps(state))
    pacer.acquire()
    assert clock.now >= answered_at + 1.0
