"""Yahoo Finance's price streamer (``wss://streamer.finance.yahoo.com/?version=2``): the frame codec and
a client that keeps one subscription alive for as long as it runs.

Each server frame is JSON text ``{"message": "<base64>"}`` whose base64 decodes to one protobuf
``PricingData`` message. The message type is built here from its field table with the protobuf
runtime, so the wire format is protobuf's own parser and not ours, and no ``.proto`` compilation
step sits in the build.

The streamer gives no guarantees: sockets drop, go quiet (Yahoo closes those that stay quiet, so
clients resend their subscription), and a frame can be anything. The client counts and skips what it
cannot decode, reconnects with backoff, and never ends the stream on its own.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import random
import re
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidURI, WebSocketException
from websockets.uri import parse_uri

from tasks.redaction import redact_url

logger = logging.getLogger(__name__)

YAHOO_STREAM_URL = "wss://streamer.finance.yahoo.com/?version=2"
MALFORMED_LOG_EVERY = 100  # frames: one warning per this many malformed ones, so a bad feed cannot flood the log
_POLL = 0.1  # real seconds: how often the client looks at its subscription between frames
_CLOSE_TIMEOUT = 0.5  # real seconds: a stop must not wait on a server that never answers the close

_F = descriptor_pb2.FieldDescriptorProto
# PricingData's fields as the streamer sends them: (name, number, type).
PRICING_FIELDS: tuple[tuple[str, int, int], ...] = (
    ("id", 1, _F.TYPE_STRING),
    ("price", 2, _F.TYPE_FLOAT),
    ("time", 3, _F.TYPE_SINT64),
    ("currency", 4, _F.TYPE_STRING),
    ("exchange", 5, _F.TYPE_STRING),
    ("quote_type", 6, _F.TYPE_INT32),
    ("market_hours", 7, _F.TYPE_INT32),
    ("change_percent", 8, _F.TYPE_FLOAT),
    ("day_volume", 9, _F.TYPE_SINT64),
    ("day_high", 10, _F.TYPE_FLOAT),
    ("day_low", 11, _F.TYPE_FLOAT),
    ("change", 12, _F.TYPE_FLOAT),
    ("short_name", 13, _F.TYPE_STRING),
    ("expire_date", 14, _F.TYPE_SINT64),
    ("open_price", 15, _F.TYPE_FLOAT),
    ("previous_close", 16, _F.TYPE_FLOAT),
    ("strike_price", 17, _F.TYPE_FLOAT),
    ("underlying_symbol", 18, _F.TYPE_STRING),
    ("open_interest", 19, _F.TYPE_SINT64),
    ("options_type", 20, _F.TYPE_SINT64),
    ("mini_option", 21, _F.TYPE_SINT64),
    ("last_size", 22, _F.TYPE_SINT64),
    ("bid", 23, _F.TYPE_FLOAT),
    ("bid_size", 24, _F.TYPE_SINT64),
    ("ask", 25, _F.TYPE_FLOAT),
    ("ask_size", 26, _F.TYPE_SINT64),
    ("price_hint", 27, _F.TYPE_SINT64),
    ("vol_24hr", 28, _F.TYPE_SINT64),
    ("vol_all_currencies", 29, _F.TYPE_SINT64),
    ("from_currency", 30, _F.TYPE_STRING),
    ("last_market", 31, _F.TYPE_STRING),
    ("circulating_supply", 32, _F.TYPE_DOUBLE),
    ("market_cap", 33, _F.TYPE_DOUBLE),
)


def _pricing_data_class() -> Any:
    """The ``PricingData`` message class, from a file descriptor built in code.

    It lives in a pool of its own, so it cannot clash with another ``PricingData`` that some other
    library registers in protobuf's default pool.
    """
    proto = descriptor_pb2.FileDescriptorProto(
        name="marketpipe/yahoo_stream/pricing_data.proto", package="marketpipe.yahoo_stream", syntax="proto3"
    )
    message = proto.message_type.add(name="PricingData")
    for name, number, kind in PRICING_FIELDS:
        message.field.add(name=name, number=number, type=kind, label=_F.LABEL_OPTIONAL, json_name=_camel(name))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("marketpipe.yahoo_stream.PricingData"))


def _camel(name: str) -> str:
    first, *rest = name.split("_")
    return first + "".join(part.capitalize() for part in rest)


PricingData: Any = _pricing_data_class()


class MalformedFrameError(ValueError):
    """A frame that is not a decodable ``PricingData`` tick; the message says what was wrong with it."""


@dataclass(frozen=True)
class Tick:
    """One price update. ``time`` is epoch milliseconds.

    proto3 does not tell a zero from an absent field, so a zero or empty value comes out as None
    (for ``market_hours`` too, whose meaning per value is not documented by Yahoo).
    """

    symbol: str
    time: int
    price: float
    day_volume: float | None
    price_hint: int | None
    market_hours: int | None
    exchange: str | None
    currency: str | None


def decode_frame(text: str | bytes) -> Tick:
    """The tick in one server frame, or MalformedFrameError saying why there is none."""
    try:
        raw = text.decode() if isinstance(text, bytes) else text
        envelope = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise MalformedFrameError(f"frame is not JSON text: {_preview(text)}") from None
    if not isinstance(envelope, dict) or "message" not in envelope:
        raise MalformedFrameError(f'frame has no "message" key: {_preview(text)}')
    encoded = envelope["message"]
    if not isinstance(encoded, str):
        raise MalformedFrameError(f'frame\'s "message" is not a base64 string: {_preview(text)}')
    try:
        payload = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise MalformedFrameError(f'frame\'s "message" is not valid base64: {_preview(encoded)}') from None
    message = PricingData()
    try:
        message.ParseFromString(payload)
    except DecodeError:
        raise MalformedFrameError(f"frame's payload is not a PricingData message ({len(payload)} bytes)") from None
    missing = [name for name in ("id", "time", "price") if not getattr(message, name)]
    if missing:
        raise MalformedFrameError(f"PricingData without {'/'.join(missing)}: {_preview(encoded)}")
    hint = int(message.price_hint) or None
    return Tick(
        symbol=message.id,
        time=int(message.time),
        price=_price(message.price, hint),
        day_volume=float(message.day_volume) or None,
        price_hint=hint,
        market_hours=int(message.market_hours) or None,
        exchange=message.exchange or None,
        currency=message.currency or None,
    )


def encode_frame(
    symbol: str,
    time_ms: int,
    price: float,
    day_volume: float | None,
    *,
    price_hint: int = 2,
    exchange: str = "NMS",
    currency: str = "USD",
    quote_type: int = 8,
    market_hours: int = 1,
) -> str:
    """The frame the streamer would send for this tick: JSON text ``{"message": "<base64>"}``.

    ``quote_type`` 8 is what Yahoo sends for an equity, 41 for a cryptocurrency.
    """
    message = PricingData(
        id=symbol,
        price=price,
        time=time_ms,
        currency=currency,
        exchange=exchange,
        quote_type=quote_type,
        market_hours=market_hours,
        day_volume=round(day_volume or 0),
        price_hint=price_hint,
    )
    return json.dumps({"message": base64.b64encode(message.SerializeToString()).decode("ascii")})


def _price(value: float, hint: int | None) -> float:
    """The decimal price a float32 stands for: rounded to the hint's decimals, else to the fewest
    significant digits that read back as the same float32 (94745.078125 is 94745.08)."""
    if hint is not None:
        return round(value, hint)
    wire = struct.pack("<f", value)
    for digits in range(1, 10):
        shortest = float(f"{value:.{digits}g}")
        if struct.pack("<f", shortest) == wire:
            return shortest
    return value


def _preview(text: str | bytes, limit: int = 80) -> str:
    shown = repr(text[:limit])
    return shown + ("..." if len(text) > limit else "")


@dataclass
class StreamStats:
    """What the client has seen since it started, for monitoring and tests.

    ``reconnects`` counts every attempt to connect after the first one (after a drop, a failed
    connect or a silence); ``silences`` those connections the client closed because nothing came.
    """

    connects: int = 0
    reconnects: int = 0
    frames: int = 0
    ticks: int = 0
    malformed: int = 0
    silences: int = 0
    subscriptions_sent: int = 0
    last_frame_at: float | None = None
    last_error: str = ""


def backoff_delay(failures: int, first: float, cap: float, rng: random.Random | None = None) -> float:
    """Seconds to wait before the next connect after ``failures`` failed ones in a row: the ceiling
    doubles from ``first`` up to ``cap``, and the wait is jittered in [ceiling/2, ceiling] so that
    many clients dropped at once do not come back in step."""
    ceiling = min(cap, first * 2 ** min(failures, 62))
    return (rng or random).uniform(ceiling / 2, ceiling)


class _HandlerError(Exception):
    """Carries an exception raised by ``on_tick`` out of the reconnect loop, which must not retry it."""


class StreamClient:
    """Keeps a subscription to the streamer alive and hands every tick to a callback.

    ``run`` blocks until ``stop`` is set, so callers run it in a thread of their own. All timing is
    in real (wall-clock) seconds, whatever clock the ticks' market runs on.
    """

    def __init__(
        self,
        url: str,
        symbols: Iterable[str],
        *,
        resubscribe_seconds: float = 15.0,
        silence_seconds: float = 30.0,
        backoff_first: float = 0.5,
        backoff_max: float = 30.0,
        connect_timeout: float = 10.0,
    ) -> None:
        try:
            parse_uri(url)
        except InvalidURI as exc:
            raise ValueError(f"not a websocket URL: {redact_url(url)!r} ({_redacted(str(exc), url)})") from None
        self.url = url
        self.resubscribe_seconds = resubscribe_seconds
        self.silence_seconds = silence_seconds
        self.backoff_first = backoff_first
        self.backoff_max = backoff_max
        self.connect_timeout = connect_timeout
        self.stats = StreamStats()
        self._lock = threading.Lock()
        self._symbols = _unique(symbols)
        self._failures = 0  # failed connections since frames last flowed

    @property
    def symbols(self) -> tuple[str, ...]:
        with self._lock:
            return self._symbols

    def set_symbols(self, symbols: Iterable[str]) -> None:
        """Change the subscription; a running client applies it within a tenth of a second."""
        with self._lock:
            self._symbols = _unique(symbols)

    def run(self, on_tick: Callable[[Tick], None], stop: threading.Event) -> None:
        """Stream until ``stop`` is set, calling ``on_tick`` for every tick in the order received.

        Connection trouble never ends it; an exception raised by ``on_tick`` does, and is re-raised here.
        """
        try:
            asyncio.run(self._run(on_tick, stop))
        except _HandlerError as exc:
            raise exc.__cause__ or exc from None

    async def _run(self, on_tick: Callable[[Tick], None], stop: threading.Event) -> None:
        streaming = asyncio.create_task(self._reconnecting(on_tick))
        watching = asyncio.create_task(_wait_for(stop))
        await asyncio.wait({streaming, watching}, return_when=asyncio.FIRST_COMPLETED)
        for task in (streaming, watching):
            task.cancel()
        await asyncio.gather(watching, return_exceptions=True)
        with contextlib.suppress(asyncio.CancelledError):
            await streaming

    async def _reconnecting(self, on_tick: Callable[[Tick], None]) -> None:
        """Connect, stream, and connect again, for ever: the caller cancels it.

        A silence backs off like a failure: outside its symbols' sessions the streamer has nothing to
        send, and a closed market must not turn into a reconnect every ``silence_seconds``.
        """
        shown = redact_url(self.url)
        attempts = 0
        while True:
            if attempts:
                self.stats.reconnects += 1
            attempts += 1
            try:
                async with connect(
                    self.url, open_timeout=self.connect_timeout, close_timeout=_CLOSE_TIMEOUT
                ) as websocket:
                    self.stats.connects += 1
                    logger.info("streamer connected: %s (%d symbols)", shown, len(self.symbols))
                    await self._stream(websocket, on_tick)
                    self.stats.silences += 1
                    logger.warning("streamer silent for %.1f s, reconnecting: %s", self.silence_seconds, shown)
                    self._failures += 1
            except (OSError, TimeoutError, WebSocketException) as exc:
                self.stats.last_error = _redacted(f"{type(exc).__name__}: {exc}", self.url)
                logger.warning("streamer connection lost, reconnecting: %s", self.stats.last_error)
                self._failures += 1
            await asyncio.sleep(backoff_delay(self._failures - 1, self.backoff_first, self.backoff_max))

    async def _stream(self, websocket: ClientConnection, on_tick: Callable[[Tick], None]) -> None:
        """Receive until nothing came for ``silence_seconds``; a dropped socket raises."""
        subscribed = self.symbols
        await self._subscribe(websocket, subscribed)
        resubscribe_at = time.monotonic() + self.resubscribe_seconds
        last_frame = time.monotonic()
        while True:
            wanted = self.symbols
            now = time.monotonic()
            if wanted != subscribed:
                removed = [symbol for symbol in subscribed if symbol not in wanted]
                if removed:
                    await websocket.send(json.dumps({"unsubscribe": removed}))
                subscribed = wanted
                await self._subscribe(websocket, subscribed)
                resubscribe_at = now + self.resubscribe_seconds
            elif now >= resubscribe_at:
                await self._subscribe(websocket, subscribed)
                resubscribe_at = now + self.resubscribe_seconds
            if now - last_frame >= self.silence_seconds:
                return
            wait = min(_POLL, resubscribe_at - now, last_frame + self.silence_seconds - now)
            try:
                frame = await asyncio.wait_for(websocket.recv(), max(wait, 0.001))
            except TimeoutError:
                continue
            last_frame = time.monotonic()
            self._received(frame, on_tick)

    def _received(self, frame: str | bytes, on_tick: Callable[[Tick], None]) -> None:
        self.stats.frames += 1
        self.stats.last_frame_at = time.time()
        self._failures = 0
        try:
            tick = decode_frame(frame)
        except MalformedFrameError as exc:
            self.stats.malformed += 1
            if (self.stats.malformed - 1) % MALFORMED_LOG_EVERY == 0:
                logger.warning("skipped a malformed streamer frame (%d so far): %s", self.stats.malformed, exc)
            return
        self.stats.ticks += 1
        try:
            on_tick(tick)
        except Exception as exc:
            raise _HandlerError from exc

    async def _subscribe(self, websocket: ClientConnection, symbols: Sequence[str]) -> None:
        if symbols:
            await websocket.send(json.dumps({"subscribe": list(symbols)}))
            self.stats.subscriptions_sent += 1


async def _wait_for(stop: threading.Event) -> None:
    while not stop.is_set():
        await asyncio.sleep(0.05)


def _unique(symbols: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(symbols))


_WS_URL = re.compile(r"wss?://\S+")


def _redacted(text: str, url: str) -> str:
    """``text`` with the client's URL, and any other websocket URL in it, redacted."""
    return _WS_URL.sub(lambda m: redact_url(m.group(0)), text.replace(url, redact_url(url)))
