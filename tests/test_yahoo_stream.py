"""Yahoo's price streamer: the frame codec on a real frame, and the client against the sandbox's
stand-in streamer, whose ticks are the simulated market's, so every tick received can be checked."""

from __future__ import annotations

import base64
import itertools
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2, json_format

from flows import sandbox_market
from flows.sandbox_stream import MALFORMED_FRAMES, StreamConfig, StreamServer, start_stream_server
from tasks.realtime.clock import SimulatedClock
from tasks.sources import yahoo_stream
from tasks.sources.yahoo_stream import (
    MalformedFrameError,
    PricingData,
    StreamClient,
    Tick,
    backoff_delay,
    decode_frame,
    encode_frame,
)

FRAME_FILE = Path(__file__).parent / "fixtures" / "yahoo-stream" / "yfinance_stream_BTC-USD_2025-01-10.json"
SPEED = 20.0
START = datetime(2025, 1, 8, 15, 0, tzinfo=UTC).timestamp()  # a Wednesday, NYSE open: AAPL trades, BTC-USD always
FAST = {"backoff_first": 0.05, "backoff_max": 0.2}


def recorded() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(FRAME_FILE.read_text())
    return data


# --- the codec --------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_the_real_frame_decodes_to_its_recorded_values() -> None:
    frame = recorded()["frame"]
    expected = Tick(
        symbol="BTC-USD",
        time=1736509140000,
        price=94745.08,
        day_volume=59712028672.0,
        price_hint=2,
        market_hours=1,
        exchange="CCC",
        currency="USD",
    )
    assert decode_frame(json.dumps(frame)) == expected
    assert decode_frame(json.dumps(frame).encode()) == expected


@pytest.mark.unit
def test_pricing_data_reads_every_field_of_the_real_frame() -> None:
    """All 20 fields the frame carries, through protobuf's JSON mapping: a wrong number or type shows here."""
    data = recorded()
    message = PricingData()
    message.ParseFromString(base64.b64decode(data["frame"]["message"]))
    assert json_format.MessageToDict(message, preserving_proto_field_name=True) == data["decoded"]


@pytest.mark.unit
def test_pricing_data_has_the_33_fields_of_the_wire_format() -> None:
    fields = PricingData.DESCRIPTOR.fields
    assert [f.number for f in fields] == list(range(1, 34))
    kinds = {f.name: f.type for f in fields}
    field = descriptor_pb2.FieldDescriptorProto
    assert kinds["price"] == kinds["bid"] == kinds["ask"] == field.TYPE_FLOAT
    assert kinds["time"] == kinds["day_volume"] == kinds["price_hint"] == kinds["ask_size"] == field.TYPE_SINT64
    assert kinds["quote_type"] == kinds["market_hours"] == field.TYPE_INT32
    assert kinds["circulating_supply"] == kinds["market_cap"] == field.TYPE_DOUBLE
    assert kinds["last_market"] == kinds["underlying_symbol"] == field.TYPE_STRING
    file = descriptor_pb2.FileDescriptorProto()
    PricingData.DESCRIPTOR.file.CopyToProto(file)
    assert file.syntax == "proto3"


@pytest.mark.unit
@pytest.mark.parametrize(
    ("symbol", "price", "day_volume", "hint", "exchange"),
    [
        ("BTC-USD", 94745.08, 59712028672.0, 2, "CCC"),
        ("AAPL", 187.23, 1250.0, 2, "NMS"),
        ("EURUSD=X", 1.0843, None, 4, "CCY"),
        ("PENNY", 0.01, 1.0, 2, "NMS"),
    ],
)
def test_encode_then_decode_gives_the_tick_back(
    symbol: str, price: float, day_volume: float | None, hint: int, exchange: str
) -> None:
    frame = encode_frame(symbol, 1736342400123, price, day_volume, price_hint=hint, exchange=exchange, quote_type=41)
    assert set(json.loads(frame)) == {"message"}
    assert decode_frame(frame) == Tick(symbol, 1736342400123, price, day_volume, hint, 1, exchange, "USD")


@pytest.mark.unit
def test_without_a_price_hint_the_price_is_the_shortest_decimal_of_its_float32() -> None:
    message = PricingData(id="X", time=1, price=94745.08)
    frame = json.dumps({"message": base64.b64encode(message.SerializeToString()).decode()})
    tick = decode_frame(frame)
    assert (tick.price, tick.price_hint, tick.day_volume, tick.exchange, tick.currency) == (
        94745.08,
        None,
        None,
        None,
        None,
    )


def _payload(message: Any) -> str:
    return json.dumps({"message": base64.b64encode(message.SerializeToString()).decode()})


@pytest.mark.unit
@pytest.mark.parametrize(
    ("frame", "says"),
    [
        ("<html>502 Bad Gateway</html>", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        ('{"type": "heartbeat"}', 'no "message" key'),
        ('["message"]', 'no "message" key'),
        ('{"message": 12}', "not a base64 string"),
        ('{"message": "not*base64!"}', "not valid base64"),
        (json.dumps({"message": base64.b64encode(b"\xff\xff\xff\xff\xff").decode()}), "not a PricingData"),
        (_payload(PricingData(time=1, price=1.5)), "without id"),
        (_payload(PricingData(id="AAPL", price=1.5)), "without time"),
        (_payload(PricingData()), "without id/time/price"),
    ],
)
def test_a_malformed_frame_says_what_is_wrong(frame: str | bytes, says: str) -> None:
    with pytest.raises(MalformedFrameError, match=re.escape(says)):
        decode_frame(frame)


@pytest.mark.unit
def test_the_simulators_malformed_frames_are_all_malformed_each_its_own_way() -> None:
    messages = set()
    for frame in MALFORMED_FRAMES:
        with pytest.raises(MalformedFrameError) as raised:
            decode_frame(frame)
        messages.add(str(raised.value).split(":")[0])
    assert len(messages) == len(MALFORMED_FRAMES) == 4


@pytest.mark.unit
def test_backoff_doubles_from_the_first_delay_up_to_the_cap_with_jitter() -> None:
    for failures, ceiling in [(0, 0.5), (1, 1.0), (2, 2.0), (5, 16.0), (6, 30.0), (200, 30.0)]:
        delays = [backoff_delay(failures, 0.5, 30.0) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert max(delays) - min(delays) > ceiling / 4  # jittered, not fixed


@pytest.mark.unit
def test_a_url_that_is_not_a_websocket_url_is_refused_at_once() -> None:
    with pytest.raises(ValueError, match="not a websocket URL"):
        StreamClient("https://streamer.finance.yahoo.com/?token=sekrit", ["AAPL"])


# --- the client against the stand-in streamer ------------------------------------------------------------


class Received:
    """The ticks a client handed to its callback, safe to read while it runs."""

    def __init__(self) -> None:
        self._ticks: list[Tick] = []
        self._lock = threading.Lock()

    def add(self, tick: Tick) -> None:
        with self._lock:
            self._ticks.append(tick)

    def all(self) -> list[Tick]:
        with self._lock:
            return list(self._ticks)

    def of(self, symbol: str) -> list[Tick]:
        return [t for t in self.all() if t.symbol == symbol]


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.02)


@contextmanager
def streaming(client: StreamClient) -> Iterator[Received]:
    """``client.run`` in a thread for the block; it must end within a second of being stopped."""
    received = Received()
    stop = threading.Event()
    failures: list[BaseException] = []

    def run() -> None:
        try:
            client.run(received.add, stop)
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield received
    finally:
        stop.set()
        stopping = time.monotonic()
        thread.join(5)
    took = time.monotonic() - stopping
    assert not thread.is_alive(), "the client did not stop"
    assert took < 1.0, f"the client took {took:.2f} s to stop"
    assert not failures, failures


def market(tick: Tick) -> tuple[str, int, float, float | None]:
    return tick.symbol, tick.time, tick.price, tick.day_volume


def expected_span(symbol: str, got: list[Tick]) -> list[tuple[str, int, float, float | None]]:
    """The market's ticks from the first received to the last received, every one of them."""
    first, last = got[0].time / 1000, got[-1].time / 1000 + 1
    return [(symbol, at, price, volume) for at, price, volume in sandbox_market.ticks(symbol, first, last)]


def assert_real_ticks(got: list[Tick]) -> None:
    """Each tick is the market's own for its second, none twice, in time order per symbol."""
    for symbol in {t.symbol for t in got}:
        mine = [t for t in got if t.symbol == symbol]
        times = [t.time for t in mine]
        assert times == sorted(set(times)), f"{symbol}: ticks repeated or out of order"
        market_ticks = {
            (symbol, at, p, v) for at, p, v in sandbox_market.ticks(symbol, times[0] / 1000, times[-1] / 1000 + 1)
        }
        assert {market(t) for t in mine} <= market_ticks


@pytest.fixture
def clock() -> SimulatedClock:
    return SimulatedClock(START, time.time(), SPEED)


@pytest.fixture
def servers(clock: SimulatedClock) -> Iterator[Callable[..., StreamServer]]:
    """Start stand-in streamers on free loopback ports; all are closed after the test."""
    started: list[StreamServer] = []

    def start(config: StreamConfig | None = None) -> StreamServer:
        server = start_stream_server(0, config, clock)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


@pytest.fixture
def server(servers: Callable[..., StreamServer]) -> StreamServer:
    return servers()


def test_each_client_receives_exactly_the_markets_ticks_of_its_own_symbols(server: StreamServer) -> None:
    both = StreamClient(server.url, ["BTC-USD", "AAPL"], **FAST)
    other = StreamClient(server.url, ["ETH-USD"], **FAST)
    with streaming(both) as got, streaming(other) as got_other:
        wait_until(lambda: min(len(got.of("BTC-USD")), len(got.of("AAPL"))) >= 20, "20 ticks of each symbol")
        wait_until(lambda: len(got_other.of("ETH-USD")) >= 20, "20 ETH-USD ticks")
    assert {t.symbol for t in got.all()} == {"BTC-USD", "AAPL"}
    assert {t.symbol for t in got_other.all()} == {"ETH-USD"}
    for received in (got, got_other):
        for symbol in {t.symbol for t in received.all()}:
            mine = received.of(symbol)
            assert [market(t) for t in mine] == expected_span(symbol, mine)
    btc, aapl = got.of("BTC-USD")[0], got.of("AAPL")[0]
    assert (btc.exchange, btc.currency, btc.price_hint, btc.market_hours) == ("CCC", "USD", 2, 1)
    assert (aapl.exchange, aapl.currency, aapl.price_hint, aapl.market_hours) == ("NMS", "USD", 2, 1)
    assert START * 1000 <= btc.time < (START + 10 * SPEED) * 1000  # the simulated clock's, not the wall's
    assert both.stats.ticks == len(got.all()) == both.stats.frames
    assert (both.stats.connects, both.stats.reconnects, both.stats.malformed) == (1, 0, 0)
    assert both.stats.last_frame_at is not None
    assert abs(both.stats.last_frame_at - time.time()) < 5
    assert [c.symbols for c in server.connections()] in (
        [("BTC-USD", "AAPL"), ("ETH-USD",)],
        [("ETH-USD",), ("BTC-USD", "AAPL")],
    )


def test_the_client_resends_its_subscription_without_repeating_ticks(server: StreamServer) -> None:
    client = StreamClient(server.url, ["BTC-USD"], resubscribe_seconds=0.3, **FAST)
    with streaming(client) as got:
        wait_until(lambda: client.stats.subscriptions_sent >= 5, "5 subscribe messages sent")
        wait_until(lambda: server.connections()[0].subscribe_messages >= 5, "5 subscribe messages received")
    wait_until(lambda: not server.connections()[0].open, "the server saw the connection close")
    (connection,) = server.connections()
    assert connection.subscribe_messages == client.stats.subscriptions_sent
    assert connection.symbols == ("BTC-USD",)
    mine = got.of("BTC-USD")
    assert [market(t) for t in mine] == expected_span("BTC-USD", mine)


def test_set_symbols_moves_the_subscription_while_running(server: StreamServer) -> None:
    client = StreamClient(server.url, ["BTC-USD", "AAPL"], **FAST)
    with streaming(client) as got:
        wait_until(lambda: len(got.of("AAPL")) >= 5, "AAPL ticks")
        client.set_symbols(["BTC-USD", "ETH-USD"])
        wait_until(lambda: server.connections()[0].symbols == ("BTC-USD", "ETH-USD"), "the server's new subscription")
        wait_until(lambda: len(got.of("ETH-USD")) >= 5, "ETH-USD ticks")
        aapl_after = len(got.of("AAPL"))
        bitcoin_after = len(got.of("BTC-USD"))
        time.sleep(0.4)
        assert len(got.of("AAPL")) == aapl_after  # no AAPL tick since
        assert len(got.of("BTC-USD")) > bitcoin_after  # kept
    (connection,) = server.connections()
    assert (connection.unsubscribe_messages, connection.subscribe_messages) == (1, 2)
    assert client.stats.connects == 1
    bitcoin = got.of("BTC-USD")
    assert [market(t) for t in bitcoin] == expected_span("BTC-USD", bitcoin)  # resubscribing lost none of it


def test_the_client_reconnects_after_a_dropped_connection(server: StreamServer) -> None:
    client = StreamClient(server.url, ["BTC-USD"], **FAST)
    with streaming(client) as got:
        wait_until(lambda: len(got.all()) >= 10, "ticks")
        server.drop_connections()
        dropped_at = len(got.all())
        wait_until(lambda: client.stats.connects == 2, "a second connection")
        wait_until(lambda: len(got.all()) >= dropped_at + 10, "ticks after the drop")
    assert server.accepted == 2
    assert client.stats.reconnects == 1
    assert "ConnectionClosed" in client.stats.last_error
    assert server.connections()[1].symbols == ("BTC-USD",)
    assert_real_ticks(got.all())


def test_a_silent_connection_is_replaced_and_the_silent_time_is_never_sent(server: StreamServer) -> None:
    client = StreamClient(server.url, ["BTC-USD"], silence_seconds=0.5, **FAST)
    with streaming(client) as got:
        wait_until(lambda: len(got.all()) >= 10, "ticks")
        server.silence(1.5)
        before = len(got.all())
        wait_until(lambda: client.stats.silences >= 1, "a silence noticed")
        assert len(got.all()) <= before + 5  # a batch already on its way at most
        wait_until(lambda: len(got.all()) >= before + 10, "ticks after the silence", timeout=6)
    assert client.stats.connects >= 2
    assert client.stats.reconnects >= client.stats.silences >= 1
    assert server.connections()[0].open is False
    times = [t.time for t in got.all()]
    gap = max(b - a for a, b in itertools.pairwise(times))
    assert gap >= 1.0 * SPEED * 1000  # about 1.5 s of real time, 30 s simulated, went unsent
    assert_real_ticks(got.all())


def test_malformed_frames_are_counted_and_skipped(server: StreamServer, caplog: pytest.LogCaptureFixture) -> None:
    client = StreamClient(server.url, ["BTC-USD"], **FAST)
    with caplog.at_level(logging.WARNING, logger=yahoo_stream.__name__), streaming(client) as got:
        wait_until(lambda: len(got.all()) >= 5, "ticks")
        server.send_malformed(8)
        wait_until(lambda: client.stats.malformed == 8, "8 malformed frames counted")
        after = len(got.all())
        wait_until(lambda: len(got.all()) >= after + 10, "ticks after the malformed frames")
    assert client.stats.connects == 1
    assert client.stats.frames == client.stats.ticks + 8
    warnings = [r for r in caplog.records if "malformed" in r.getMessage()]
    assert len(warnings) == 1  # one per 100 malformed frames
    mine = got.of("BTC-USD")
    assert [market(t) for t in mine] == expected_span("BTC-USD", mine)  # none lost: they came on top


def test_a_feed_with_malformed_frames_mixed_in_still_streams(servers: Callable[..., StreamServer]) -> None:
    server = servers(StreamConfig(malformed_rate=0.3, seed=7))
    client = StreamClient(server.url, ["BTC-USD", "AAPL"], **FAST)
    with streaming(client) as got:
        wait_until(lambda: client.stats.malformed >= 10 and client.stats.ticks >= 20, "ticks and malformed frames")
    assert client.stats.connects == 1
    assert client.stats.frames == client.stats.ticks + client.stats.malformed
    assert 0.1 < client.stats.malformed / client.stats.frames < 0.6
    assert_real_ticks(got.all())


def test_scheduled_drops_and_silences_are_survived(servers: Callable[..., StreamServer]) -> None:
    server = servers(StreamConfig(drop_every=0.6, silence_every=1.1, silence_for=0.6))
    client = StreamClient(server.url, ["BTC-USD"], silence_seconds=0.4, **FAST)
    with streaming(client) as got:
        wait_until(lambda: server.accepted >= 4, "4 connections", timeout=6)
        wait_until(lambda: client.stats.silences >= 1, "a silence noticed", timeout=6)
        before = len(got.all())
        wait_until(lambda: len(got.all()) > before, "ticks still coming", timeout=6)
    assert client.stats.connects >= 4
    assert client.stats.reconnects >= 3
    assert_real_ticks(got.all())


def test_backoff_grows_while_connects_fail_and_restarts_once_frames_flow(
    server: StreamServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[int] = []

    def recorded_backoff(failures: int, first: float, cap: float, rng: Any = None) -> float:
        asked.append(failures)
        return 0.02

    monkeypatch.setattr(yahoo_stream, "backoff_delay", recorded_backoff)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    refused = StreamClient(f"ws://127.0.0.1:{free}/?version=2", ["BTC-USD"])
    with streaming(refused):
        wait_until(lambda: len(asked) >= 4, "4 failed connects")
    assert asked[:4] == [0, 1, 2, 3]
    assert refused.stats.connects == 0
    assert refused.stats.last_error
    asked.clear()
    client = StreamClient(server.url, ["BTC-USD"])
    with streaming(client) as got:
        wait_until(lambda: len(got.all()) >= 3, "ticks")
        server.drop_connections()
        wait_until(lambda: len(asked) >= 1, "a reconnect")
    assert asked[0] == 0  # frames flowed on the dropped connection: back to the first delay


def test_the_client_stops_promptly_while_waiting_to_reconnect(server: StreamServer) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    client = StreamClient(f"ws://127.0.0.1:{free}/?version=2", ["BTC-USD"], backoff_first=20.0, backoff_max=60.0)
    with streaming(client):
        wait_until(lambda: bool(client.stats.last_error), "a failed connect")
    assert (client.stats.connects, client.stats.reconnects) == (0, 0)


def test_the_client_stops_promptly_during_a_handshake_that_never_ends() -> None:
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen()
        client = StreamClient(f"ws://127.0.0.1:{mute.getsockname()[1]}/?version=2", ["BTC-USD"], connect_timeout=30)
        with streaming(client):
            time.sleep(0.3)
        assert client.stats.connects == 0


def test_an_error_in_the_callback_ends_the_stream_and_reaches_the_caller(server: StreamServer) -> None:
    client = StreamClient(server.url, ["BTC-USD"], **FAST)

    def failing(tick: Tick) -> None:
        raise KeyError(tick.symbol)

    stop = threading.Event()
    started = time.monotonic()
    with pytest.raises(KeyError, match="BTC-USD"):
        client.run(failing, stop)
    assert time.monotonic() - started < 3
    assert client.stats.ticks == 1


def test_secret_query_parameters_never_reach_the_log(server: StreamServer, caplog: pytest.LogCaptureFixture) -> None:
    client = StreamClient(server.url + "&token=sekrit", ["BTC-USD"], **FAST)
    with caplog.at_level(logging.INFO, logger=yahoo_stream.__name__), streaming(client) as got:
        wait_until(lambda: len(got.all()) >= 3, "ticks")
        server.drop_connections()
        wait_until(lambda: client.stats.connects == 2, "a second connection")
    assert "token=***" in caplog.text
    assert "sekrit" not in caplog.text
    assert "sekrit" not in client.stats.last_error


def test_a_closed_server_frees_its_port_for_the_next_one(servers: Callable[..., StreamServer]) -> None:
    first = servers()
    client = StreamClient(first.url, ["BTC-USD"], **FAST)
    with streaming(client) as got:
        wait_until(lambda: len(got.all()) >= 3, "ticks")
        started = time.monotonic()
        first.close()
        assert time.monotonic() - started < 2
        wait_until(lambda: client.stats.reconnects >= 1, "the client trying again")
        second = start_stream_server(first.port, None, first.clock)
        try:
            before = len(got.all())
            wait_until(lambda: len(got.all()) >= before + 5, "ticks from the next server")
        finally:
            second.close()
    assert client.stats.connects == 2
    assert second.accepted == 1
    assert_real_ticks(got.all())
