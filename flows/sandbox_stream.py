"""The sandbox's stand-in for Yahoo's price streamer (``wss://streamer.finance.yahoo.com/?version=2``):
a websocket server on loopback that sends the simulated market's ticks as the streamer's frames.

It runs on an asyncio loop of its own in a daemon thread, so a test or the sandbox starts it
beside anything else. The ticks are those of :func:`flows.sandbox_market.ticks`, so a client's
stream can be checked against the market second by second. The faults a real streamer shows
(dropped sockets, silent sockets, frames that do not decode) come from :class:`StreamConfig` on a
schedule, or from the control methods when a test wants one at a chosen moment.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from flows.sandbox_market import is_crypto, ticks
from tasks.realtime.clock import Clock
from tasks.sources.yahoo_stream import encode_frame

logger = logging.getLogger(__name__)

SEND_EVERY = 0.1  # real seconds between two sends to a connection; each send catches up on every second since
_CLOSE_TIMEOUT = 1.0
# One of each kind a client must survive: not JSON, no "message", bad base64, base64 of a non-PricingData.
MALFORMED_FRAMES = (
    "<html>502 Bad Gateway</html>",
    json.dumps({"type": "heartbeat"}),
    json.dumps({"message": "not*base64!"}),
    json.dumps({"message": base64.b64encode(b"\xff\xff\xff\xff\xff").decode("ascii")}),
)


@dataclass(frozen=True)
class StreamConfig:
    """Scheduled faults, in real seconds. ``malformed_rate`` is the chance each frame is replaced by
    a malformed one (the tick it stood for is lost); ``seed`` makes those choices repeatable."""

    drop_every: float | None = None
    malformed_rate: float = 0.0
    silence_every: float | None = None
    silence_for: float = 0.0
    seed: int = 0


@dataclass(frozen=True)
class StreamConnection:
    """What the server knows of one connection it accepted (a snapshot)."""

    number: int  # 1 for the first connection accepted
    symbols: tuple[str, ...]
    subscribe_messages: int
    unsubscribe_messages: int
    frames_sent: int
    open: bool


@dataclass
class _Connection:
    number: int
    websocket: ServerConnection
    rng: random.Random
    cursors: dict[str, int] = field(default_factory=dict)  # symbol -> first simulated second not yet sent
    subscribe_messages: int = 0
    unsubscribe_messages: int = 0
    frames_sent: int = 0
    malformed_due: int = 0
    open: bool = True

    def snapshot(self) -> StreamConnection:
        return StreamConnection(
            self.number,
            tuple(self.cursors),
            self.subscribe_messages,
            self.unsubscribe_messages,
            self.frames_sent,
            self.open,
        )


class StreamServer:
    """The running server; :func:`start_stream_server` makes one."""

    def __init__(self, port: int, config: StreamConfig, clock: Clock, host: str) -> None:
        self.config = config
        self.clock = clock
        self.host = host
        self.port = 0
        self._connections: list[_Connection] = []
        self._silent_until = 0.0  # time.monotonic()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._failed: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, args=(port,), name="sandbox-stream", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._failed is not None:
            raise self._failed
        if not self.port:
            raise RuntimeError("the stream server did not start within 10 s")

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}/?version=2"

    @property
    def accepted(self) -> int:
        """Connections accepted since the server started."""
        return len(self._connections)

    def connections(self) -> list[StreamConnection]:
        """Every connection accepted so far, in order, open or not."""
        if not self._thread.is_alive():
            return self._snapshots()
        return self._call(self._snapshots)

    def drop_connections(self) -> None:
        """Abort every open connection, without a close handshake, as a network failure would."""
        self._call(self._drop)

    def silence(self, seconds: float) -> None:
        """Send nothing for ``seconds`` (real), keeping the sockets open; the ticks of that time are never sent."""
        self._call(self._silence, seconds)

    def send_malformed(self, n: int) -> None:
        """Send ``n`` malformed frames to every open connection, cycling through the kinds, before any other frame."""
        self._call(self._queue_malformed, n)

    def close(self) -> None:
        """Stop the server and free its port."""
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None and self._thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop closed in the meantime
                loop.call_soon_threadsafe(stopping.set)
        self._thread.join(5)

    def _call[T](self, function: Callable[..., T], *args: float) -> T:
        """``function(*args)`` run on the server's loop, which owns the connections' state."""
        if self._loop is None or not self._thread.is_alive():
            raise RuntimeError("the stream server is not running")

        async def call() -> T:
            return function(*args)

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(timeout=5)

    def _snapshots(self) -> list[StreamConnection]:
        return [connection.snapshot() for connection in self._connections]

    def _serve(self, port: int) -> None:
        try:
            asyncio.run(self._main(port))
        except BaseException as exc:  # reported to the starting thread, or logged once it is gone
            if self._ready.is_set():
                logger.exception("the sandbox stream server failed")
            else:
                self._failed = exc
        finally:
            self._ready.set()

    async def _main(self, port: int) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        async with serve(self._handle, self.host, port, close_timeout=_CLOSE_TIMEOUT) as server:
            self.port = server.sockets[0].getsockname()[1]
            self._ready.set()
            scheduled = [asyncio.create_task(self._scheduled_faults())]
            await self._stopping.wait()
            for task in scheduled:
                task.cancel()
            await self._shut(server)

    async def _shut(self, server: Server) -> None:
        server.close()
        try:
            await asyncio.wait_for(server.wait_closed(), _CLOSE_TIMEOUT * 2)
        except TimeoutError:
            self._drop()

    async def _scheduled_faults(self) -> None:
        started = time.monotonic()
        next_drop = started + (self.config.drop_every or math.inf)
        next_silence = started + (self.config.silence_every or math.inf)
        while True:
            await asyncio.sleep(min(SEND_EVERY, max(0.0, min(next_drop, next_silence) - time.monotonic())))
            now = time.monotonic()
            if now >= next_drop:
                self._drop()
                next_drop += self.config.drop_every or math.inf
            if now >= next_silence:
                self._silence(self.config.silence_for)
                next_silence += self.config.silence_every or math.inf

    def _drop(self) -> None:
        for connection in self._connections:
            if connection.open:
                connection.open = False
                connection.websocket.transport.abort()

    def _silence(self, seconds: float) -> None:
        self._silent_until = max(self._silent_until, time.monotonic() + seconds)

    def _queue_malformed(self, n: float) -> None:
        for connection in self._connections:
            if connection.open:
                connection.malformed_due += int(n)

    async def _handle(self, websocket: ServerConnection) -> None:
        number = len(self._connections) + 1
        connection = _Connection(number, websocket, random.Random(f"{self.config.seed}:{number}"))
        self._connections.append(connection)
        sending = asyncio.create_task(self._send(connection))
        try:
            async for message in websocket:
                self._received(connection, message)
        except ConnectionClosed:
            pass
        finally:
            connection.open = False
            sending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sending

    def _received(self, connection: _Connection, message: str | bytes) -> None:
        """Apply a subscribe or unsubscribe message; the real streamer ignores anything else, so does this."""
        try:
            request = json.loads(message)
        except ValueError:
            return
        if not isinstance(request, dict):
            return
        subscribe, unsubscribe = request.get("subscribe"), request.get("unsubscribe")
        if isinstance(subscribe, list):
            connection.subscribe_messages += 1
            start = math.floor(self.clock.time()) + 1
            for symbol in subscribe:
                if isinstance(symbol, str):
                    connection.cursors.setdefault(symbol, start)
        if isinstance(unsubscribe, list):
            connection.unsubscribe_messages += 1
            for symbol in unsubscribe:
                connection.cursors.pop(symbol, None)

    async def _send(self, connection: _Connection) -> None:
        """Every SEND_EVERY, the ticks of the connection's symbols for the simulated seconds since the last send."""
        websocket = connection.websocket
        with contextlib.suppress(ConnectionClosed):
            while connection.open:
                await asyncio.sleep(SEND_EVERY)
                while connection.malformed_due and time.monotonic() >= self._silent_until:
                    connection.malformed_due -= 1
                    await websocket.send(MALFORMED_FRAMES[connection.malformed_due % len(MALFORMED_FRAMES)])
                    connection.frames_sent += 1
                for frame in self._frames(connection):
                    await websocket.send(frame)
                    connection.frames_sent += 1

    def _frames(self, connection: _Connection) -> list[str]:
        """The frames due on ``connection``, oldest first, with every cursor moved past them."""
        until = (
            math.floor(self.clock.time()) + 1
        )  # the second now in progress is sent: its tick is stamped at its start
        silent = time.monotonic() < self._silent_until
        due: list[tuple[int, str, float, float]] = []
        for symbol, cursor in list(connection.cursors.items()):
            if cursor >= until:
                continue
            connection.cursors[symbol] = until
            if not silent:
                due.extend((at, symbol, price, volume) for at, price, volume in ticks(symbol, cursor, until))
        due.sort()
        frames = []
        for at, symbol, price, volume in due:
            if self.config.malformed_rate and connection.rng.random() < self.config.malformed_rate:
                frames.append(MALFORMED_FRAMES[connection.rng.randrange(len(MALFORMED_FRAMES))])
                continue
            crypto = is_crypto(symbol)
            frames.append(
                encode_frame(
                    symbol,
                    at,
                    price,
                    volume,
                    price_hint=2,
                    exchange="CCC" if crypto else "NMS",
                    quote_type=41 if crypto else 8,
                    market_hours=1,
                )
            )
        return frames


def start_stream_server(
    port: int = 0, config: StreamConfig | None = None, clock: Clock | None = None, host: str = "127.0.0.1"
) -> StreamServer:
    """Start the stand-in streamer on ``host:port`` (0: a free port) and return once it listens."""
    return StreamServer(port, config or StreamConfig(), clock or Clock(), host)
