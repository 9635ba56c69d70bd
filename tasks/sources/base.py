"""The source interface: build requests -> fetch -> parse to the standard bar frame.

A source is one module in ``tasks/sources/`` named after its config key (``data_sources.<name>``)
that exposes ``SOURCE``, a :class:`Source` subclass. Nothing else needs to change to add one.
HTTP sources subclass :class:`HttpSource` and get pacing, retries and secret-safe errors for free.
"""

from __future__ import annotations

import importlib
import json
import logging
import random
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pandas as pd
import tenacity
from pydantic import ValidationError

from configs.settings import ConfigError, Settings, SourceSettings, describe
from tasks.bars import Instrument, conform, conform_actions, empty_actions, empty_bars
from tasks.errors import (
    QuotaExhaustedError,
    RangeNotServedError,
    RateLimitedError,
    SourceError,
    TransientSourceError,
)
from tasks.monitoring.metrics import Operation, Traffic, metered
from tasks.redaction import redact_text, redact_url
from tasks.shards import Shard, shard_limits, shard_window
from tasks.sources.pacing import Pacer, rates_for, sends_per_second, utc_text

USER_AGENT = "Mozilla/5.0 (X11; Linux x86_64) marketpipe/0.1"

logger = logging.getLogger("marketpipe.sources")


@dataclass(frozen=True)
class BarQuery:
    """What to collect: one symbol, one interval, an inclusive range of dates (UTC)."""

    symbol: str
    interval: str
    start: date
    end: date


def within(frame: pd.DataFrame, query: BarQuery) -> pd.DataFrame:
    """The rows stamped in the query's dates, [start 00:00 UTC, end + 1 day 00:00 UTC), indexed from 0.

    Sources answer with more than was asked (Yahoo's margins, Alpha Vantage's whole series, a
    vendor file's years); every source cuts its answer here, the same way.
    """
    if frame.empty:
        return frame
    lo = pd.Timestamp(query.start, tz="UTC")
    hi = pd.Timestamp(query.end, tz="UTC") + pd.Timedelta(days=1)
    keep = ((frame["time"] >= lo) & (frame["time"] < hi)).to_numpy()
    if keep.all():  # the usual answer: nothing outside the window, nothing to copy
        return frame.reset_index(drop=True)
    return frame.loc[keep].reset_index(drop=True)


@dataclass(frozen=True)
class Window:
    """The dates collected and why: an explicit backfill, an incremental top-up or a first history.

    ``history_from`` is where the stored series should start once the run is done: the window's own
    start, or for an incremental run the start a first run would have today, so a series that a
    first run left short (a truncated response) is still reported short by later runs.
    """

    start: date
    end: date
    mode: str  # "explicit", "incremental", "initial", or "restated" (the whole stored series again)
    history_from: date | None = None  # None: the window's start

    @property
    def covers_from(self) -> date:
        return self.history_from or self.start

    def not_before(self, first: date, *, collect: bool = True) -> Window:
        """The window limited to dates from ``first`` on (the collected range too, unless ``collect`` is false)."""
        start = max(self.start, first) if collect else self.start
        return Window(start, self.end, self.mode, max(self.covers_from, first))


@dataclass
class Collected:
    """Bars and corporate actions from one source for one query, plus what was noticed on the way."""

    bars: pd.DataFrame
    actions: pd.DataFrame = field(default_factory=empty_actions)
    live_bars_skipped: int = 0
    requests: int = 0
    instrument: Instrument = field(default_factory=Instrument)  # what the source says of the symbol
    window: Window | None = None
    restated: str = ""  # why the whole stored series was re-collected (see tasks/restatement.py), if it was
    clamped: str = ""  # how the window was cut to the store's retention (see tasks/retention.py), if it was
    # Filled by the collect step from the store, for processing: the stored bars the indicators
    # need before the new ones, and the stored series' first bar (None: nothing stored).
    history: pd.DataFrame | None = None
    stored_from: pd.Timestamp | None = None
    operation: Operation | None = None  # the collect stage's time and traffic, set by the collect task

    @staticmethod
    def merge(parts: list[Collected]) -> Collected:
        """One result from several requests' results; later parts win on a repeated bar."""
        frames = [p.bars for p in parts if not p.bars.empty]
        bars = empty_bars()
        if len(frames) == 1 and frames[0]["time"].is_monotonic_increasing and frames[0]["time"].is_unique:
            bars = frames[0]  # one response in order, as most are: already conformed by its parse
        elif frames:
            bars = pd.concat(frames, ignore_index=True).drop_duplicates(subset=["time"], keep="last")
            bars = conform(bars.sort_values("time", kind="stable"))
        actions = [p.actions for p in parts if not p.actions.empty]
        merged_actions = empty_actions()
        if actions:
            merged_actions = conform_actions(
                pd.concat(actions, ignore_index=True).drop_duplicates(subset=["time", "kind"], keep="last")
            )
        instrument = Instrument()
        for part in parts:
            instrument = instrument.updated(part.instrument)
        return Collected(
            bars,
            merged_actions,
            sum(p.live_bars_skipped for p in parts),
            sum(p.requests for p in parts),
            instrument,
        )


class Source(ABC):
    """One data provider: turns a :class:`BarQuery` into a :class:`Collected`."""

    name: ClassVar[str]
    # The source's keys: the common ones, plus any of its own in a subclass declared beside it.
    settings_model: ClassVar[type[SourceSettings]] = SourceSettings

    def __init__(self, settings: SourceSettings, pacer: Pacer | None = None) -> None:
        self.settings = own_settings(self.name, self.settings_model, settings)
        self.pacer = pacer

    @abstractmethod
    def collect(self, query: BarQuery) -> Collected:
        """Everything the source holds for ``query``, or a :class:`SourceError`."""

    def check_config(self) -> None:  # noqa: B027 (optional hook; most sources need no check)
        """Raise ConfigError if the source can't work as configured, before any symbol is tried."""

    def earliest_start(self, interval: str, today: date) -> date | None:
        """The oldest date this source still serves for ``interval`` (None: no limit)."""
        return None

    def poll(self, symbol: str, interval: str, since: datetime, now: datetime) -> Collected:
        """The newest intraday bars, from ``since`` on, as served at ``now``: what real time asks for."""
        raise RangeNotServedError(self.name, symbol, f"{self.name} serves no intraday bars to poll: use yahoo_finance")


class HttpSource(Source):
    """A source behind an HTTP API. Subclasses implement :meth:`build_requests` and :meth:`parse`."""

    vendor: ClassVar[str]  # the service's name in messages: "Yahoo", "Alpha Vantage"

    @abstractmethod
    def build_requests(self, query: BarQuery) -> list[httpx.Request]:
        """The HTTP requests that together cover ``query``."""

    @abstractmethod
    def parse(self, query: BarQuery, response: httpx.Response) -> Collected:
        """Turn one response into standard bars, or raise a :class:`SourceError`."""

    def check_status(self, query: BarQuery, response: httpx.Response) -> None:
        """What 429 and 5xx mean at every HTTP API: rate limited (for its Retry-After), or try again later."""
        status = response.status_code
        if status == 429:
            raise RateLimitedError(
                self.name, query.symbol, f"rate limited by {self.vendor} (HTTP 429)", retry_after_seconds(response)
            )
        if status >= 500:
            raise TransientSourceError(self.name, query.symbol, f"{self.vendor} server error (HTTP {status})")

    def json_body(self, query: BarQuery, response: httpx.Response, hint: str = "") -> Any:
        """The body as JSON, a UTF-8 byte-order mark allowed (Alpha Vantage sends one). Anything else,
        an HTML error page with status 200 or a cut-off body, is transient; ``hint`` says what it usually is."""
        try:
            return json.loads(response.content.decode("utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            kind = response.headers.get("content-type", "unknown content type")
            # Yahoo's throttling page comes with status 200: it is a rate-limit answer all the same.
            error = (
                RateLimitedError if b"too many requests" in response.content[:4096].lower() else TransientSourceError
            )
            raise error(
                self.name,
                query.symbol,
                f"{self.vendor} answered HTTP {response.status_code} with non-JSON ({kind}) instead of JSON{hint}: "
                "retry later",
            ) from None

    def client(self) -> httpx.Client:
        """The process's client for this source: kept-alive connections, shared by every task thread."""
        return _shared_client(self.name, self.settings.timeout)

    def collect(self, query: BarQuery) -> Collected:
        http = self.client()
        return Collected.merge([self._fetch(http, query, request) for request in self.build_requests(query)])

    def newest_requests(self, query: BarQuery, since: datetime, now: datetime) -> list[httpx.Request]:
        """The requests for the bars from ``since`` to ``now`` only; sources with intraday bars override it."""
        raise RangeNotServedError(self.name, query.symbol, f"{self.vendor} serves no intraday bars to poll")

    def poll(self, symbol: str, interval: str, since: datetime, now: datetime) -> Collected:
        query = BarQuery(symbol, interval, since.date(), now.date())
        http = self.client()
        return Collected.merge([self._fetch(http, query, r) for r in self.newest_requests(query, since, now)])

    def _fetch(self, http: httpx.Client, query: BarQuery, request: httpx.Request) -> Collected:
        """One request: paced, sent, parsed; transient failures retried with backoff."""
        retry = self.settings.retry
        attempts = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(TransientSourceError),
            stop=tenacity.stop_after_attempt(retry.max_attempts) | tenacity.stop_before_delay(retry.max_total),
            wait=full_jitter_backoff(retry.initial_wait, retry.max_wait),
            before_sleep=self._log_retry,
            reraise=True,
        )
        traffic = metered() or Traffic()
        for attempt in attempts:
            with attempt:
                traffic.requests += 1
                traffic.retries += attempt.retry_state.attempt_number > 1
                try:
                    response = self._paced_send(http, query, request)
                    traffic.bytes += len(response.content)
                    part = self._parse(query, response)
                except (RateLimitedError, QuotaExhaustedError):  # a 429, or a `Note` saying so
                    traffic.rate_limited += 1
                    raise
                part.requests = attempt.retry_state.attempt_number
                return part
        raise AssertionError("unreachable: tenacity re-raises the last error")  # pragma: no cover

    def _parse(self, query: BarQuery, response: httpx.Response) -> Collected:
        """Parse; a source saying its daily quota is spent is told to the pacer, which then defers
        every later request of the day in every process sharing its state, without sending it."""
        try:
            return self.parse(query, response)
        except QuotaExhaustedError as exc:
            if self.pacer is None:
                raise
            until = self.pacer.exhaust(exc.message)
            raise QuotaExhaustedError(
                self.name, query.symbol, f"{exc.message}; deferred until {utc_text(until)}"
            ) from None

    def _log_retry(self, state: tenacity.RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        _run_logger().warning(
            "%s (attempt %d of %d); retrying in %.2fs",
            error,
            state.attempt_number,
            self.settings.retry.max_attempts,
            wait,
        )

    def _paced_send(self, http: httpx.Client, query: BarQuery, request: httpx.Request) -> httpx.Response:
        """Send once the pacer allows; the pacer learns when the attempt ended, answered or not."""
        if self.pacer is None:
            return self._send(http, query, request)
        with self.pacer.request(query.symbol):
            return self._send(http, query, request)

    def _send(self, http: httpx.Client, query: BarQuery, request: httpx.Request) -> httpx.Response:
        _run_logger().debug("GET %s", redact_url(str(request.url)))
        try:
            return http.send(request)
        except httpx.TimeoutException:
            raise TransientSourceError(self.name, query.symbol, f"timed out after {self.settings.timeout:g}s") from None
        except httpx.TransportError as exc:
            raise TransientSourceError(
                self.name,
                query.symbol,
                f"cannot reach {request.url.scheme}://{request.url.netloc.decode()}: {type(exc).__name__}",
            ) from None


_clients: dict[tuple[str, float], httpx.Client] = {}
_clients_guard = threading.Lock()


def _shared_client(source: str, timeout: float) -> httpx.Client:
    # httpx.Client is thread-safe; reusing it keeps connections open, so a paced request goes out
    # when its slot comes instead of after a fresh TCP handshake (which also blurs the pacing).
    with _clients_guard:
        key = (source, timeout)
        if key not in _clients:
            _clients[key] = httpx.Client(
                timeout=timeout,
                headers={"User-Agent": USER_AGENT, "Accept": "application/json"},
                follow_redirects=True,
                limits=httpx.Limits(max_connections=32, max_keepalive_connections=16),
            )
        return _clients[key]


def full_jitter_backoff(initial: float, cap: float) -> Callable[[tenacity.RetryCallState], float]:
    """Sleep a uniform random time in [0, min(cap, initial * 2**n)], but never less than Retry-After."""

    def wait(state: tenacity.RetryCallState) -> float:
        ceiling = min(cap, initial * 2 ** (state.attempt_number - 1))
        jittered = random.uniform(0, ceiling)
        error = state.outcome.exception() if state.outcome else None
        retry_after = getattr(error, "retry_after", None) or 0.0
        return max(jittered, min(retry_after, cap))

    return wait


def retry_after_seconds(response: httpx.Response) -> float | None:
    """The ``Retry-After`` header in seconds (only the delta-seconds form is used)."""
    value = response.headers.get("retry-after", "").strip()
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


def _run_logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    # Prefect is imported once a source logs, not with the module: `marketpipe run` checks the
    # sources' settings before it starts anything, and Prefect takes seconds to import.
    from prefect.exceptions import MissingContextError  # noqa: PLC0415
    from prefect.logging import get_run_logger  # noqa: PLC0415

    try:
        return get_run_logger()
    except MissingContextError:
        return logger


class RedactSecrets(logging.Filter):
    """Rewrites URLs in log records so an API key in a query string never reaches a log line.

    httpx logs every request URL at INFO; Alpha Vantage's key travels in the query string.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "://" in message:
            record.msg = redact_text(message)
            record.args = None
        return True


for _name in ("httpx", "httpcore"):
    logging.getLogger(_name).addFilter(RedactSecrets())


_SOURCE_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def source_class(name: str) -> type[Source]:
    """The source whose module is ``tasks.sources.<name>``."""
    if not _SOURCE_NAME.fullmatch(name):
        raise ConfigError(f"invalid source name {name!r}: use the lowercase config key, e.g. yahoo_finance")
    try:
        module = importlib.import_module(f"tasks.sources.{name}")
    except ModuleNotFoundError:
        raise ConfigError(f"source {name!r} has a config entry but no module tasks/sources/{name}.py") from None
    found: type[Source] = module.SOURCE
    return found


def load_source(name: str, settings: SourceSettings, pacer: Pacer | None = None) -> Source:
    """Instantiate the source whose module is ``tasks.sources.<name>``."""
    return source_class(name)(settings, pacer)


def own_settings[S: SourceSettings](
    name: str, model: type[S], settings: SourceSettings, config_file: Path | None = None
) -> S:
    """``settings`` as the source's own model: its keys checked, a key it does not know refused."""
    if type(settings) is model:
        return settings
    try:
        return model.model_validate(settings.model_dump(exclude_unset=True))
    except ValidationError as exc:
        raise ConfigError(describe(exc, config_file, ("data_sources", name))) from None


def check_sources(settings: Settings) -> None:
    """Every configured source's section against the keys its source declares, before a run: a key
    misspelt in any of them is a config error, whichever source the run uses."""
    for name, entry in settings.data_sources.items():
        own_settings(name, source_class(name).settings_model, entry, settings.config_file)


def pacer_for(name: str, settings: SourceSettings, state_dir: str, shard: Shard | None = None) -> Pacer:
    """The host-wide pacer for one source, from its rate settings.

    A shard's pacer paces at its share of every limit, in a state file of its own (see tasks/shards.py):
    shards on other nodes can't see its state, so each must stay within its part of the whole.
    """
    per_window = sends_per_second(settings.rate_limit)
    if shard is not None:
        settings = shard_limits(name, settings, shard)
        per_window = shard_window(per_window, shard)
    rates = rates_for(settings.rate_limit, settings.requests_per_minute, settings.burst, settings.headroom)
    # httpx applies `timeout` to each of waiting for a connection, connecting, writing and reading, so
    # an attempt still unanswered after all four (and a margin) belongs to a process that died.
    stale_after = 4 * settings.timeout + 5
    return Pacer(
        name,
        rates,
        state_dir,
        per_day=settings.requests_per_day,
        per_window=per_window,
        stale_after=stale_after,
        key=shard.state_key(name) if shard is not None else None,
    )


__all__ = [
    "BarQuery",
    "Collected",
    "HttpSource",
    "Source",
    "SourceError",
    "load_source",
    "pacer_for",
    "redact_url",
]
