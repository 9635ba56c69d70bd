"""What the InfluxDB 2.x backend does without a 2.x server: its Flux, its requests, its errors.

A loopback HTTP server stands in for InfluxDB where the request itself is the subject (gzip body,
precision, retries, status codes); the conformance suite covers a real server when one is configured.
"""

from __future__ import annotations

import gzip
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pandas as pd
import pytest

from blocks import influx_measurements
from blocks.influxdb_store import InfluxDBStore, delete_predicate, first_time_query, last_time_query, select_query
from blocks.line_protocol import serialize
from blocks.store import BAR_KEY, QUARANTINE_KEY, StoreError, StoreUnavailableError, dropped_by_retention
from blocks.stores import store_from_settings
from configs.settings import ConfigError, InfluxDBSettings, StorageSettings
from tests.servers import free_port, serving_http
from tests.test_store_conformance import frame

pytestmark = pytest.mark.unit  # no server, no child process: `pytest -m unit`

TOKEN = "tok-s3cret-Zq9"
AWKWARD = 'A"B) |> drop()'
BAR_TAGS = ["symbol", "interval", "source"]


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(influx_measurements, "FIRST_WAIT", 0.01)


# --- a stand-in server -------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    delay: float = 0.0


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class FakeInflux:
    """Answers each (method, path) with its scripted replies in turn, the last one repeating; records requests."""

    routes: dict[tuple[str, str], list[Reply]]
    url: str = ""
    requests: list[Request] = field(default_factory=list)

    def reply(self, request: Request) -> Reply:
        self.requests.append(request)
        replies = self.routes.get((request.method, request.path))
        if not replies:
            return Reply(599, b'{"message": "no route in the test"}')
        return replies.pop(0) if len(replies) > 1 else replies[0]

    def sent(self, method: str, path: str) -> list[Request]:
        return [r for r in self.requests if (r.method, r.path) == (method, path)]


def json_reply(status: int, data: Any) -> Reply:
    return Reply(status, json.dumps(data).encode())


@contextmanager
def fake_influx(routes: dict[tuple[str, str], list[Reply]]) -> Iterator[FakeInflux]:
    fake = FakeInflux(routes)

    def handle(http: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(http.path)
        body = http.rfile.read(int(http.headers.get("Content-Length") or 0))
        headers = {k.lower(): v for k, v in http.headers.items()}
        reply = fake.reply(Request(http.command, parts.path, parse_qs(parts.query), headers, body))
        time.sleep(reply.delay)
        try:
            http.send_response(reply.status)
            http.send_header("Content-Type", reply.content_type)
            http.send_header("Content-Length", str(len(reply.body)))
            http.end_headers()
            http.wfile.write(reply.body)
        except OSError:  # the client gave up waiting
            pass

    with serving_http(handle) as url:
        fake.url = url
        yield fake


def store_at(url: str, **options: Any) -> InfluxDBStore:
    return InfluxDBStore(
        url=url, org="marketpipe", bucket="market_data", token=TOKEN, **{"write_attempts": 2, **options}
    )


def lines_of(body: bytes) -> list[str]:
    return gzip.decompress(body).decode().splitlines(keepends=True)


# --- Flux: values only ever travel as parameters -----------------------------------------------


def test_flux_text_holds_no_user_value_and_the_params_carry_them() -> None:
    start, end = pd.Timestamp("1960-01-05", tz="UTC"), datetime(2024, 1, 10)
    filters = {"symbol": AWKWARD, "interval": "1d", "source": 'yahoo") or true //'}
    query = select_query('market"data', "bars", BAR_KEY, filters, start, end)
    for value in (AWKWARD, 'yahoo") or true //', 'market"data', "1960", "2024", "drop()"):
        assert value not in query.text
    assert query.params == {
        "p_bucket": 'market"data',
        "p_start": "1960-01-05T00:00:00Z",
        "p_stop": "2024-01-10T00:00:00Z",  # a naive datetime is UTC
        "p_measurement": "bars",
        "p_symbol": AWKWARD,
        "p_interval": "1d",
        "p_source": 'yahoo") or true //',
    }
    assert all(name in query.text for name in query.params)
    assert 'pivot(rowKey: ["_time", "symbol", "interval", "source"], columnKey: ["_field"]' in query.text


def test_an_optional_filter_left_out_changes_the_query_shape_not_its_values() -> None:
    query = select_query("b", "quarantine", QUARANTINE_KEY, {"symbol": AWKWARD, "interval": None, "source": None})
    assert "p_interval" not in query.text and "p_source" not in query.text
    assert set(query.params) == {"p_bucket", "p_start", "p_stop", "p_measurement", "p_symbol"}
    assert AWKWARD not in query.text
    assert '"rule"' in query.text  # quarantine rows are keyed by the rule too


def test_an_open_range_reaches_influxdbs_first_and_last_instant() -> None:
    params = select_query("b", "bars", BAR_KEY, {"symbol": "X"}).params
    start, stop = pd.Timestamp(params["p_start"]), pd.Timestamp(params["p_stop"])
    assert pd.Timestamp.min.tz_localize("UTC") < start < pd.Timestamp("1677-09-22", tz="UTC")  # and all after
    assert pd.Timestamp("2262-04-11", tz="UTC") < stop < pd.Timestamp.max.tz_localize("UTC")
    # Bounds outside InfluxDB's range are clamped into it rather than refused by the server.
    assert select_query("b", "bars", BAR_KEY, {}, pd.Timestamp.min).params["p_start"] == params["p_start"]


@pytest.mark.parametrize(("build", "edge"), [(last_time_query, "last()"), (first_time_query, "first()")])
def test_first_and_last_time_queries_keep_values_out_of_the_text(build: Any, edge: str) -> None:
    query = build("b", {"symbol": AWKWARD, "interval": "1d", "source": "files"})
    assert AWKWARD not in query.text and "files" not in query.text
    assert (query.params["p_symbol"], query.params["p_source"]) == (AWKWARD, "files")
    assert edge in query.text
    assert f"desc: {'true' if edge == 'last()' else 'false'}" in query.text


def test_a_delete_predicate_quotes_and_escapes_every_value() -> None:
    predicate = delete_predicate("bars", {"symbol": 'A"B\\C) OR 1=1', "interval": "1d", "source": "files"})
    assert predicate == '_measurement="bars" AND "symbol"="A\\"B\\\\C) OR 1=1" AND "interval"="1d" AND "source"="files"'
    with pytest.raises(StoreError, match="line break"):
        delete_predicate("bars", {"symbol": "A\nB"})


QUERY_CSV = (
    "#datatype,string,long,dateTime:RFC3339,string,string,string,double,double\r\n"
    "#group,false,false,false,false,false,false,false,false\r\n"
    "#default,_result,,,,,,,\r\n"
    ",result,table,_time,symbol,interval,source,open,close\r\n"
    f',,0,2024-01-02T00:00:00Z,"{AWKWARD.replace(chr(34), chr(34) * 2)}",1d,yahoo_finance,,0.1\r\n'
    f',,0,1965-03-01T00:00:00Z,"{AWKWARD.replace(chr(34), chr(34) * 2)}",1d,yahoo_finance,99.5,5e-324\r\n'
    "\r\n"
)


DELETES: dict[tuple[str, str], list[Reply]] = {("POST", "/api/v2/delete"): [Reply(204)]}


def flux_params(request: Request) -> dict[str, Any]:
    """The parameters of a /api/v2/query request: the `option` statements of its `extern` file."""
    return {s["assignment"]["id"]["name"]: s["assignment"]["init"]["value"] for s in request.json()["extern"]["body"]}


def test_a_read_sends_values_as_flux_params_and_shapes_the_frame_like_every_backend() -> None:
    routes = {("POST", "/api/v2/query"): [Reply(200, QUERY_CSV.encode(), "text/csv")]}
    with fake_influx(routes) as influx:
        read = store_at(influx.url).read_bars(AWKWARD, source="yahoo_finance")
    (request,) = influx.requests
    assert AWKWARD not in request.json()["query"] and TOKEN not in request.path
    assert flux_params(request)["p_symbol"] == AWKWARD
    assert request.query["org"] == ["marketpipe"]
    assert list(read.columns) == ["time", "symbol", "interval", "source", "close", "open"]
    assert str(read["time"].dtype) == "datetime64[ns, UTC]"
    assert list(read["time"]) == [pd.Timestamp("1965-03-01", tz="UTC"), pd.Timestamp("2024-01-02", tz="UTC")]
    assert read["close"].dtype == np.float64 and read["close"].tolist() == [5e-324, 0.1]
    assert np.isnan(read["open"].iloc[1]) and set(read["symbol"]) == {AWKWARD}


def test_a_bucket_not_created_yet_reads_as_empty() -> None:
    missing = json_reply(
        404, {"code": "not found", "message": 'failed to initialize execute state: could not find bucket "market_data"'}
    )
    with fake_influx({("POST", "/api/v2/query"): [missing]}) as influx:
        store = store_at(influx.url)
        assert list(store.read_bars("X").columns) == list(BAR_KEY)
        assert store.last_timestamp("X", "1d", "files") is None
        assert list(store.read_corporate_actions("X").columns) == [
            "time",
            "symbol",
            "source",
            "kind",
            "ratio",
            "amount",
        ]


# --- writing -----------------------------------------------------------------------------------


def test_a_server_that_is_down_fails_the_write_as_unavailable_without_the_token() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError, match="unreachable") as caught:
        store_at(url).write_bars(frame(n=3))
    assert time.monotonic() - started < 10
    assert url in str(caught.value) and "INFLUXDB_URL" in str(caught.value)
    assert TOKEN not in str(caught.value)


def test_a_503_is_retried_and_the_body_is_gzip_line_protocol_at_precision_s() -> None:
    written = frame(n=3)
    routes = {("POST", "/api/v2/write"): [Reply(503, b'{"message": "busy"}'), Reply(204)], **DELETES}
    with fake_influx(routes) as influx:
        assert store_at(influx.url).write_bars(written) == 3
    first, second = influx.sent("POST", "/api/v2/write")
    assert lines_of(first.body) == lines_of(second.body)  # the same lines; gzip stamps each attempt's second
    assert second.query == {"org": ["marketpipe"], "bucket": ["market_data"], "precision": ["s"]}
    assert second.headers["content-encoding"] == "gzip"
    assert second.headers["authorization"] == f"Token {TOKEN}"
    assert lines_of(second.body) == serialize(written, "bars", BAR_TAGS, ("reason",)).to_pylist()


def test_a_server_failing_every_attempt_is_unavailable_after_write_attempts() -> None:
    with (
        fake_influx({("POST", "/api/v2/write"): [json_reply(500, {"message": "internal error"})], **DELETES}) as influx,
        pytest.raises(StoreUnavailableError, match="after 2 attempts") as caught,
    ):
        store_at(influx.url).write_bars(frame(n=3))
    assert "internal error" in str(caught.value) and influx.url in str(caught.value)
    assert len(influx.sent("POST", "/api/v2/write")) == 2


def test_a_write_is_sent_in_requests_of_5000_lines() -> None:
    written = frame(n=12_000, start="1950-01-01")
    with fake_influx({("POST", "/api/v2/write"): [Reply(204)], **DELETES}) as influx:
        assert store_at(influx.url).write_bars(written) == 12_000
    sizes = [len(lines_of(r.body)) for r in influx.sent("POST", "/api/v2/write")]
    assert sizes == [5000, 5000, 2000]


def test_a_401_is_unavailable_not_retried_and_the_message_never_holds_the_token() -> None:
    echo = json_reply(401, {"code": "unauthorized", "message": f"unauthorized access with {TOKEN}"})
    with (
        fake_influx({("POST", "/api/v2/write"): [echo], **DELETES}) as influx,
        pytest.raises(StoreUnavailableError, match="INFLUXDB_TOKEN") as caught,
    ):
        store_at(influx.url).write_bars(frame(n=3))
    assert TOKEN not in str(caught.value)
    assert influx.url in str(caught.value) and "401" in str(caught.value)
    assert len(influx.sent("POST", "/api/v2/write")) == 1


def test_a_400_is_a_plain_store_error_and_not_retried() -> None:
    bad = json_reply(400, {"code": "invalid", "message": "unable to parse 'bars x': bad timestamp"})
    with (
        fake_influx({("POST", "/api/v2/write"): [bad], **DELETES}) as influx,
        pytest.raises(StoreError, match="unable to parse") as caught,
    ):
        store_at(influx.url).write_bars(frame(n=3))
    assert not isinstance(caught.value, StoreUnavailableError)
    assert len(influx.sent("POST", "/api/v2/write")) == 1


def test_a_server_that_never_answers_in_time_is_unavailable() -> None:
    with (
        fake_influx({("POST", "/api/v2/write"): [Reply(204, delay=1.0)], **DELETES}) as influx,
        pytest.raises(StoreUnavailableError, match="timed out"),
    ):
        store_at(influx.url, timeout=0.2).write_bars(frame(n=3))
    assert len(influx.sent("POST", "/api/v2/write")) == 2  # write_attempts


def test_a_bars_write_deletes_each_series_range_from_bars_and_quarantine_before_writing() -> None:
    written = pd.concat([frame(AWKWARD, n=3), frame("MSFT", n=5, start="2024-02-01")], ignore_index=True)
    # Points are stored in whole seconds, so a range is floored to seconds too.
    written["time"] = written["time"].where(written.index > 0, written["time"] + pd.Timedelta(milliseconds=700))
    routes = {("POST", "/api/v2/write"): [Reply(204)], **DELETES}
    with fake_influx(routes) as influx:
        assert store_at(influx.url).write_bars(written) == 8
    assert [r.path for r in influx.requests] == ["/api/v2/delete"] * 4 + ["/api/v2/write"]
    deletes = [
        (r.json()["predicate"], r.json()["start"], r.json()["stop"]) for r in influx.sent("POST", "/api/v2/delete")
    ]
    series = [
        (AWKWARD, "2024-01-01T00:00:00Z", "2024-01-03T00:00:00Z"),
        ("MSFT", "2024-02-01T00:00:00Z", "2024-02-05T00:00:00Z"),
    ]
    assert deletes == [
        (delete_predicate(measurement, {"symbol": symbol, "interval": "1d", "source": "yahoo_finance"}), start, stop)
        for measurement in ("bars", "quarantine")
        for symbol, start, stop in series
    ]  # fmt: skip
    assert influx.sent("POST", "/api/v2/delete")[0].query == {"org": ["marketpipe"], "bucket": ["market_data"]}


def test_a_quarantine_write_deletes_each_bars_instant_from_quarantine_and_bars() -> None:
    rows = frame(n=2).drop(columns=["rsi_14"]).assign(rule="ohlc_inconsistent", reason="r")
    rows = pd.concat([rows, rows.iloc[[0]].assign(rule="negative_volume")], ignore_index=True)
    with fake_influx({("POST", "/api/v2/write"): [Reply(204)], **DELETES}) as influx:
        assert store_at(influx.url).write_quarantine(rows) == 3
    sent = [
        (r.json()["predicate"].split(" AND ")[0], r.json()["start"], r.json()["stop"])
        for r in influx.sent("POST", "/api/v2/delete")
    ]
    days = ["2024-01-01T00:00:00Z", "2024-01-02T00:00:00Z"]
    assert sent == [(f'_measurement="{m}"', day, day) for m in ("quarantine", "bars") for day in days]


def test_a_delete_the_server_keeps_failing_is_unavailable_and_nothing_is_written() -> None:
    failing = {
        ("POST", "/api/v2/delete"): [json_reply(503, {"message": "busy"})],
        ("POST", "/api/v2/write"): [Reply(204)],
    }
    with (
        fake_influx(failing) as influx,
        pytest.raises(StoreUnavailableError, match="could not delete after 2 attempts"),
    ):
        store_at(influx.url).write_bars(frame(n=3))
    assert len(influx.sent("POST", "/api/v2/delete")) == 2 and influx.sent("POST", "/api/v2/write") == []


ORG = {"id": "0123456789abcdef", "name": "marketpipe"}
B1 = "00000000000000b1"


def bucket(every: int) -> dict[str, Any]:
    return {"id": B1, "name": "market_data", "orgID": ORG["id"],
            "retentionRules": [{"type": "expire", "everySeconds": every}]}  # fmt: skip


def test_a_write_to_a_missing_bucket_creates_it_without_expiry_and_sends_again() -> None:
    missing = json_reply(404, {"code": "not found", "message": 'bucket "market_data" not found'})
    routes = {
        ("POST", "/api/v2/write"): [missing, Reply(204)],
        ("POST", "/api/v2/delete"): [missing],  # nothing to delete from a bucket that does not exist
        ("GET", "/api/v2/buckets"): [json_reply(200, {"buckets": []})],
        ("GET", "/api/v2/orgs"): [json_reply(200, {"orgs": [ORG]})],
        ("POST", "/api/v2/buckets"): [json_reply(201, bucket(0))],
    }  # fmt: skip
    with fake_influx(routes) as influx:
        assert store_at(influx.url).write_bars(frame(n=3)) == 3
    (created,) = influx.sent("POST", "/api/v2/buckets")
    sent = created.json()
    assert (sent["name"], sent["orgID"], sent["retentionRules"]) == ("market_data", ORG["id"], [])
    assert influx.sent("GET", "/api/v2/buckets")[0].query["org"] == ["marketpipe"]
    assert len(influx.sent("POST", "/api/v2/write")) == 2


# --- retention and health ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("found", "outcome", "sent"),
    [
        ([], "created: bucket market_data in org marketpipe = 365d", ("POST", "/api/v2/buckets")),
        ([bucket(0)], "updated: bucket market_data in org marketpipe = 365d", ("PATCH", f"/api/v2/buckets/{B1}")),
        ([bucket(365 * 86400)], "unchanged: bucket market_data in org marketpipe = 365d", None),
    ],
)  # fmt: skip
def test_retention_creates_updates_or_leaves_the_bucket(
    found: list[dict[str, Any]], outcome: str, sent: tuple[str, str] | None
) -> None:
    routes = {
        ("GET", "/api/v2/buckets"): [json_reply(200, {"buckets": found})],
        ("GET", "/api/v2/orgs"): [json_reply(200, {"orgs": [ORG]})],
        ("POST", "/api/v2/buckets"): [json_reply(201, bucket(365 * 86400))],
        ("PATCH", f"/api/v2/buckets/{B1}"): [json_reply(200, bucket(365 * 86400))],
    }
    with fake_influx(routes) as influx:
        assert str(store_at(influx.url).apply_retention("365d")) == outcome
    changes = [r for r in influx.requests if r.method in ("POST", "PATCH")]
    assert [(r.method, r.path) for r in changes] == ([sent] if sent else [])
    if sent:
        assert changes[0].json()["retentionRules"] == [{"type": "expire", "everySeconds": 365 * 86400}]


def test_retention_without_a_duration_leaves_an_existing_bucket_alone() -> None:
    with fake_influx({("GET", "/api/v2/buckets"): [json_reply(200, {"buckets": [bucket(0)]})]}) as influx:
        assert str(store_at(influx.url).apply_retention(None)).startswith("unchanged: ")
    assert [r.method for r in influx.requests] == ["GET"]


def test_health_names_the_url_when_nothing_answers() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(StoreError, match="INFLUXDB_URL") as caught:
        store_at(url).health()
    assert url in str(caught.value) and TOKEN not in str(caught.value)
    with fake_influx({("GET", "/ping"): [Reply(204)]}) as influx:
        store_at(influx.url).health()


# --- settings ----------------------------------------------------------------------------------


def test_settings_backend_influxdb_builds_the_v2_store() -> None:
    v2 = InfluxDBSettings(url="http://influx:8086", org="acme", bucket="bars", token=TOKEN)
    store = store_from_settings(StorageSettings(backend="influxdb", influxdb=v2))
    assert isinstance(store, InfluxDBStore)
    assert (store.url, store.org, store.bucket) == ("http://influx:8086", "acme", "bars")
    assert store.token.get_secret_value() == TOKEN


def test_settings_without_a_token_are_a_config_error() -> None:
    with pytest.raises(ConfigError, match="set INFLUXDB_TOKEN"):
        store_from_settings(StorageSettings(backend="influxdb"))


@pytest.mark.parametrize(
    "message",
    [
        "failure writing points to database: partial write: points beyond retention policy dropped=2",
        "failure writing points to database: partial write: dropped 2 points outside retention policy of duration "
        "8760h0m0s - oldest point bars,symbol=BRK-B at 2024-01-01T00:00:00Z dropped because it violates a "
        "Retention Policy Lower Bound dropped=2 for database: 91040e1bf6671dfd for retention policy: autogen",
    ],
)
def test_a_422_for_points_beyond_the_retention_is_a_write_with_those_points_dropped(message: str) -> None:
    beyond = json_reply(422, {"code": "unprocessable entity", "message": message})
    with fake_influx({("POST", "/api/v2/write"): [beyond], **DELETES}) as influx:
        written = store_at(influx.url).write_bars(frame(n=5))
    assert (written, dropped_by_retention(written)) == (3, 2)
    assert len(influx.sent("POST", "/api/v2/write")) == 1


def test_a_422_for_anything_else_is_a_plain_store_error() -> None:
    conflict = json_reply(
        422, {"code": "unprocessable entity", "message": "partial write: field type conflict dropped=5"}
    )
    with (
        fake_influx({("POST", "/api/v2/write"): [conflict], **DELETES}) as influx,
        pytest.raises(StoreError, match="field type conflict") as caught,
    ):
        store_at(influx.url).write_bars(frame(n=5))
    assert not isinstance(caught.value, StoreUnavailableError)


@pytest.mark.parametrize(
    ("found", "retention"),
    [([], None), ([bucket(0)], None), ([bucket(365 * 86400)], timedelta(days=365))],
)
def test_retention_is_the_buckets_expiry_rule(found: list[dict[str, Any]], retention: timedelta | None) -> None:
    with fake_influx({("GET", "/api/v2/buckets"): [json_reply(200, {"buckets": found})]}) as influx:
        assert store_at(influx.url).retention() == retention
