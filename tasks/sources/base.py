"""The source interface: build requests -> fetch -> parse to the standard bar frame.

A source is one module in ``tasks/sources/`` named after its config key (``data_sources.<name>``)
that exposes ``SOURCE``, a :class:`Source` subclass. Nothing else needs to change to add one.
"""

from __future__ import annotations

import importlib
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import date
from typing import ClassVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx
import pandas as pd

from configs.settings import ConfigError, SourceSettings
from tasks.bars import conform, empty_bars
from tasks.errors import SourceError, TransientSourceError

USER_AGENT = "Mozilla/5.0 (X11; Linux x86_64) marketpipe/0.1"
SECRET_PARAMS = frozenset({"apikey", "api_key", "token", "password", "key"})


@dataclass(frozen=True)
class BarQuery:
    """What to collect: one symbol, one interval, an inclusive range of dates (UTC)."""

    symbol: str
    interval: str
    start: date
    end: date


@dataclass
class Collected:
    """Bars from one source for one query, plus what was noticed on the way."""

    bars: pd.DataFrame
    dropped_null_bars: int = 0
    meta: dict[str, object] = field(default_factory=dict)


class Source(ABC):
    """One data provider. Subclasses implement :meth:`build_requests` and :meth:`parse`."""

    name: ClassVar[str]

    def __init__(self, settings: SourceSettings) -> None:
        self.settings = settings

    @abstractmethod
    def build_requests(self, query: BarQuery) -> list[httpx.Request]:
        """The HTTP requests that together cover ``query``."""

    @abstractmethod
    def parse(self, query: BarQuery, response: httpx.Response) -> Collected:
        """Turn one response into standard bars, or raise a :class:`SourceError`."""

    def client(self) -> httpx.Client:
        return httpx.Client(
            timeout=self.settings.timeout,
            headers={"User-Agent": USER_AGENT, "Accept": "application/json"},
            follow_redirects=True,
        )

    def fetch(self, query: BarQuery, client: httpx.Client | None = None) -> Collected:
        """Send every request for ``query`` and merge the parsed parts."""
        own_client = client is None
        http = client or self.client()
        try:
            parts = [self.parse(query, self._send(http, query, r)) for r in self.build_requests(query)]
        finally:
            if own_client:
                http.close()
        frames = [p.bars for p in parts if not p.bars.empty]
        bars = conform(pd.concat(frames, ignore_index=True)) if frames else empty_bars()
        meta: dict[str, object] = {}
        for part in parts:
            meta.update(part.meta)
        return Collected(bars, sum(p.dropped_null_bars for p in parts), meta)

    def _send(self, http: httpx.Client, query: BarQuery, request: httpx.Request) -> httpx.Response:
        try:
            return http.send(request)
        except httpx.TimeoutException:
            raise TransientSourceError(self.name, query.symbol, f"timed out after {self.settings.timeout:g}s") from None
        except httpx.TransportError as exc:
            raise TransientSourceError(
                self.name,
                query.symbol,
                f"cannot reach {request.url.scheme}://{request.url.netloc.decode()}: {type(exc).__name__}: {exc}",
            ) from None


def redact_url(url: str) -> str:
    """The URL with secret query parameters replaced, for logs and error messages."""
    parts = urlsplit(url)
    query = [(k, "***" if k.lower() in SECRET_PARAMS else v) for k, v in parse_qsl(parts.query, keep_blank_values=True)]
    return urlunsplit(parts._replace(query=urlencode(query, safe="*")))


_SOURCE_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def load_source(name: str, settings: SourceSettings) -> Source:
    """Instantiate the source whose module is ``tasks.sources.<name>``."""
    if not _SOURCE_NAME.fullmatch(name):
        raise ConfigError(f"invalid source name {name!r}: use the lowercase config key, e.g. yahoo_finance")
    try:
        module = importlib.import_module(f"tasks.sources.{name}")
    except ModuleNotFoundError:
        raise ConfigError(f"source {name!r} has a config entry but no module tasks/sources/{name}.py") from None
    source_class: type[Source] = module.SOURCE
    return source_class(settings)


__all__ = [
    "BarQuery",
    "Collected",
    "Source",
    "SourceError",
    "load_source",
    "redact_url",
]
