"""InfluxDB through the v1 HTTP API (InfluxDB 1.x, and 3.x's v1 compatibility): `/write` and `/query`.

Writes are synchronous, gzip-compressed line protocol in batches of 5,000 points, precision
seconds, retried with backoff on connection errors and 5xx; a batch that still fails raises
:class:`StoreError`, so no point is dropped silently. The one partial write that is no failure,
``400 partial write: points beyond retention policy dropped=N``, returns N: the server stored the
points its retention policy keeps. Queries, DELETE included, are InfluxQL with
bound parameters (`params`, honoured by DELETE too: checked on influxd 1.6), so no symbol or date
is ever interpolated into query text. Credentials travel in the Authorization header, never in a URL.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any, ClassVar

import httpx
import numpy as np
import pandas as pd
from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from blocks.influx_measurements import (
    DEFAULT_URL,
    InfluxMeasurements,
    InfluxUrl,
    RequestTimeout,
    Send,
    WriteAttempts,
    beyond_retention,
    retrying,
)
from blocks.store import (
    BARS,
    Filters,
    RetentionChange,
    SeriesSpan,
    StoreError,
    StoreUnavailableError,
    Table,
    duration_to_timedelta,
)

# DELETE statements sent in one /query request: a quarantine write deletes one instant per bar.
DELETES_PER_REQUEST = 200
# Rows per chunk of a streamed SELECT: large enough to keep the chunks few, small enough to stay
# under any max-row-limit a server is likely to set.
CHUNK_ROWS = 5_000
# Series one query reads before a write (their tags are bound parameters, so the URL stays short).
SERIES_PER_READ = 50
# A Go duration as SHOW RETENTION POLICIES prints it: 8760h0m0s, 30m0s, 0s (forever).
_GO_DURATION = re.compile(r"(?:([0-9]+)h)?(?:([0-9]+)m)?(?:([0-9.]+)s)?")

# One client per process, server and credentials (see InfluxDBV1Store._client); httpx's are thread-safe.
_clients: dict[tuple[int, str, float, str | None, str | None], httpx.Client] = {}
_clients_guard = threading.Lock()


def _retryable(error: BaseException) -> bool:
    if isinstance(error, httpx.HTTPStatusError):
        return error.response.status_code >= 500
    return isinstance(error, httpx.TransportError)


class InfluxDBV1Store(InfluxMeasurements, Block):
    """Bars in InfluxDB over the v1 API: measurement `bars`, tags symbol/interval/source, float fields."""

    _block_type_name: ClassVar[str] = "marketpipe InfluxDB v1 store"
    _description: ClassVar[str] = "InfluxDB 1.x (or 3.x's v1 API): database, retention policy, user, password."
    _reads_before_deleting: ClassVar[bool] = True  # influxd 1.6 hides series rewritten after a DELETE

    url: InfluxUrl = DEFAULT_URL
    database: str = "market_data"
    retention_policy: str = Field(default="", description="empty: the database's default policy")
    username: str | None = None
    password: SecretStr | None = None
    timeout: RequestTimeout = 30.0
    write_attempts: WriteAttempts = 4

    _guard: ClassVar[threading.Lock] = threading.Lock()
    _ready: ClassVar[set[tuple[str, str]]] = set()

    # --- writing -------------------------------------------------------------------------------

    @contextmanager
    def _sender(self) -> Iterator[Send]:
        self._ensure_database()
        params = {
            "db": self.database,
            "precision": "s",
            **({"rp": self.retention_policy} if self.retention_policy else {}),
        }
        client = self._client()
        yield lambda body: self._post(client, "/write", params, gzip.compress(body, compresslevel=1))

    def _post(self, client: httpx.Client, path: str, params: dict[str, str], body: bytes) -> int:
        """Send one batch; returns the points the server dropped as older than its retention policy."""
        headers = {"Content-Encoding": "gzip", "Content-Type": "text/plain; charset=utf-8"}
        dropped: int | None = None
        try:
            for attempt in retrying(self.write_attempts, _retryable):
                with attempt:
                    response = client.post(path, params=params, content=body, headers=headers)
                    dropped = beyond_retention(response.text) if response.status_code == 400 else None
                    if dropped is None:
                        response.raise_for_status()
            return dropped or 0
        except httpx.HTTPStatusError as exc:
            status = exc.response.status_code
            # 5xx passes, and a fixed credential makes a replay succeed; a 4xx about the data never would.
            error = StoreUnavailableError if status >= 500 or status in (401, 403) else StoreError
            raise error(f"InfluxDB at {self.url} refused a write ({status}): {exc.response.text.strip()}") from None
        except httpx.TransportError as exc:
            raise StoreUnavailableError(
                f"InfluxDB at {self.url} is unreachable after {self.write_attempts} attempts ({exc}): "
                "check that it runs and that storage.influxdb_v1.url points at it"
            ) from None

    def _ensure_database(self) -> None:
        """CREATE DATABASE is idempotent in InfluxDB 1.x; done once per process and database."""
        marker = (self.url, self.database)
        with self._guard:
            if marker in self._ready:
                return
            self._query(f"CREATE DATABASE {_identifier(self.database)}", {}, method="POST")
            self._ready.add(marker)

    def _delete(self, measurement: str, spans: Sequence[SeriesSpan]) -> None:
        """One DELETE per span, many to a request, every value a bound parameter.

        InfluxQL's DELETE takes no retention policy: it deletes from every policy of the database.
        The database is made first: statements after one on a missing database say only "not executed".
        """
        if spans:
            self._ensure_database()
        for start in range(0, len(spans), DELETES_PER_REQUEST):
            statements, params = [], {}
            for n, span in enumerate(spans[start : start + DELETES_PER_REQUEST]):
                tags = " AND ".join(f"{_identifier(tag)} = ${tag}{n}" for tag in span.tags)
                statements.append(
                    f"DELETE FROM {_identifier(measurement)} WHERE {tags} AND time >= $first{n} AND time <= $last{n}"
                )
                params.update({f"{tag}{n}": value for tag, value in span.tags.items()})
                params.update({f"first{n}": _rfc3339(span.first), f"last{n}": _rfc3339(span.last)})
            self._query("; ".join(statements), params, method="POST")

    # --- reading -------------------------------------------------------------------------------

    def first_timestamp(self, symbol: str, interval: str, source: str) -> pd.Timestamp | None:
        return self._series_time("ASC", symbol, interval, source)

    def last_timestamp(self, symbol: str, interval: str, source: str) -> pd.Timestamp | None:
        return self._series_time("DESC", symbol, interval, source)

    def _series_time(self, order: str, symbol: str, interval: str, source: str) -> pd.Timestamp | None:
        """The time of a series' first point in ``order``; None for an empty series."""
        filters = {"symbol": symbol, "interval": interval, "source": source}
        where, params = _where(filters, None, None)
        query = f"SELECT * FROM {self._source(BARS.name)} WHERE {where} ORDER BY time {order} LIMIT 1"
        rows = self._rows(query, params)
        return None if rows.empty else pd.Timestamp(rows["time"].iloc[0])

    def retention(self) -> timedelta | None:
        """The duration of the policy writes go to: the configured one, else the database's default.

        None when it keeps points forever (``0s``), or when the database or policy does not exist
        yet (the first write creates the database, with autogen: forever).
        """
        result = self._query(f"SHOW RETENTION POLICIES ON {_identifier(self.database)}", {})
        policies = [dict(zip(s["columns"], row, strict=True)) for s in result.get("series", []) for row in s["values"]]
        for policy in policies:
            chosen = policy["name"] == self.retention_policy if self.retention_policy else policy["default"] is True
            if chosen:
                return _go_duration(str(policy["duration"]))
        return None

    def apply_retention(self, duration: str | None) -> RetentionChange:
        """The configured retention policy (autogen unless set) gets ``duration`` and stays the default.

        ALTER when it exists, CREATE when not: running it again changes nothing. Without a
        duration the policy is left as it is.
        """
        if duration is None:
            return RetentionChange("unchanged", "no retention.duration, the retention policy is left as it is")
        duration_to_timedelta(duration)  # the grammar is checked before it goes into DDL text
        policy = self.retention_policy or "autogen"
        self._ensure_database()
        result = self._query(f"SHOW RETENTION POLICIES ON {_identifier(self.database)}", {})
        current = {row[0]: row for s in result.get("series", []) for row in s["values"]}
        target = f"{policy!s} on {self.database} = {duration}"
        hours = duration_to_timedelta(duration).total_seconds() / 3600
        if policy in current and current[policy][1] == _influx_duration(hours) and current[policy][-1] is True:
            return RetentionChange("unchanged", f"retention policy {target}")
        verb = "ALTER" if policy in current else "CREATE"
        replication = "" if policy in current else " REPLICATION 1"
        self._query(
            f"{verb} RETENTION POLICY {_identifier(policy)} ON {_identifier(self.database)} "
            f"DURATION {duration}{replication} DEFAULT",
            {},
            method="POST",
        )
        return RetentionChange("updated" if verb == "ALTER" else "created", f"retention policy {target}")

    def health(self) -> None:
        try:
            self._client().get("/ping").raise_for_status()
        except httpx.HTTPError as exc:
            raise StoreError(
                f"InfluxDB at {self.url} is not answering ({exc}): check storage.influxdb_v1.url and that it runs"
            ) from None

    def _select(
        self, table: Table, filters: Filters, start: datetime | None = None, end: datetime | None = None
    ) -> pd.DataFrame:
        where, params = _where(filters, start, end)
        return _shaped(table, self._rows(f"SELECT * FROM {self._source(table.name)} WHERE {where}", params))

    def _stored_spans(self, table: Table, spans: Sequence[SeriesSpan]) -> list[pd.DataFrame]:
        """One query for the spans of many series over the same range (real time writes a minute of every
        symbol at once): a query per series cost more than the write itself."""
        found: dict[SeriesSpan, pd.DataFrame] = {}
        alike: dict[tuple[pd.Timestamp, pd.Timestamp], list[SeriesSpan]] = {}
        for span in spans:
            alike.setdefault((span.first, span.last), []).append(span)
        for (first, last), group in alike.items():
            for at in range(0, len(group), SERIES_PER_READ):
                found |= self._read_spans(table, group[at : at + SERIES_PER_READ], first, last)
        return [found[span] for span in spans]

    def _read_spans(
        self, table: Table, spans: Sequence[SeriesSpan], first: pd.Timestamp, last: pd.Timestamp
    ) -> dict[SeriesSpan, pd.DataFrame]:
        if len(spans) == 1:
            return {spans[0]: self._stored(table, spans[0])}
        end = last + pd.Timedelta(seconds=1)  # the next instant at the precision written
        where, params = _where({}, first.to_pydatetime(), end.to_pydatetime())
        series = []
        for n, span in enumerate(spans):
            series.append(" AND ".join(f"{_identifier(tag)} = ${tag}{n}" for tag in span.tags))
            params |= {f"{tag}{n}": value for tag, value in span.tags.items()}
        query = f"SELECT * FROM {self._source(table.name)} WHERE {where} AND (({') OR ('.join(series)}))"
        rows = _shaped(table, self._rows(query, params))
        if rows.empty:
            return dict.fromkeys(spans, rows)
        groups = dict(tuple(rows.groupby(["symbol", "interval", "source"], sort=False)))
        empty = rows.iloc[:0]
        return {
            span: groups.get((span.symbol, span.interval, span.source), empty).reset_index(drop=True) for span in spans
        }

    def _rows(self, query: str, params: dict[str, str]) -> pd.DataFrame:
        """Every row a SELECT matches, read in chunks: a whole answer is cut at the server's `max-row-limit`."""
        frames = [pd.DataFrame(s["values"], columns=s["columns"]) for s in self._chunked_series(query, params)]
        if not frames:
            return pd.DataFrame()
        rows = pd.concat(frames, ignore_index=True)
        rows["time"] = pd.to_datetime(rows["time"], unit="s", utc=True).astype("datetime64[ns, UTC]")
        return rows

    def _chunked_series(self, query: str, params: dict[str, str]) -> list[dict[str, Any]]:
        """The series of one statement, streamed as JSON lines of at most CHUNK_ROWS rows each.

        InfluxDB 1.x caps a non-chunked answer at `max-row-limit` (10,000 by default) and marks it
        ``partial``; chunked answers are not capped. Each chunk but the last is ``partial`` too, so an
        answer whose last chunk still says ``partial`` was cut: that is an error, never a short result.
        """
        request = {**self._request(query, params), "chunked": "true", "chunk_size": str(CHUNK_ROWS)}
        series: list[dict[str, Any]] = []
        partial = False
        try:
            with self._client().stream("GET", "/query", params=request) as response:
                if response.is_error:
                    response.read()
                    response.raise_for_status()
                for line in response.iter_lines():
                    if not line.strip():
                        continue
                    for result in json.loads(line).get("results", []):
                        if "error" in result and "database not found" in result["error"]:
                            return []
                        if "error" in result:
                            raise StoreError(f"InfluxDB query failed: {result['error']}")
                        series.extend(result.get("series", []))
                        partial = _partial(result)
        except httpx.HTTPStatusError as exc:
            raise self._refused(exc.response.status_code) from None
        except httpx.TransportError as exc:
            raise StoreUnavailableError(f"InfluxDB at {self.url} is unreachable ({exc}): check that it runs") from None
        except json.JSONDecodeError:
            raise StoreUnavailableError(f"InfluxDB at {self.url} sent an answer that is no JSON: try again") from None
        if partial:
            raise StoreUnavailableError(
                f"InfluxDB at {self.url} cut a read short (its last chunk is partial): try again, "
                "and check the server's log and its max-row-limit / max-select-point settings"
            )
        return series

    def _query(self, query: str, params: dict[str, str], method: str = "GET") -> dict[str, Any]:
        """The first statement's result of a statement that answers with little: SHOW, CREATE, DELETE."""
        request = self._request(query, params)
        try:
            client = self._client()
            # A POST carries its statements in the body: a batch of DELETEs outgrows a URL.
            if method == "POST":
                response = client.post("/query", data=request)
            else:
                response = client.request(method, "/query", params=request)
            response.raise_for_status()
        except httpx.HTTPStatusError as exc:
            raise self._refused(exc.response.status_code) from None
        except httpx.TransportError as exc:
            raise StoreUnavailableError(f"InfluxDB at {self.url} is unreachable ({exc}): check that it runs") from None
        results: list[dict[str, Any]] = response.json()["results"]
        for result in results:  # one per statement; any error fails the query
            if "error" in result and "database not found" in result["error"]:
                return {}
            if "error" in result:
                raise StoreError(f"InfluxDB query failed: {result['error']}")
            if _partial(result):
                raise StoreError(f"InfluxDB at {self.url} cut an answer at its max-row-limit: raise the limit")
        return results[0]

    def _request(self, query: str, params: dict[str, str]) -> dict[str, str]:
        return {"db": self.database, "q": query, "epoch": "s", "params": json.dumps(params)}

    def _refused(self, status: int) -> StoreError:
        error = StoreUnavailableError if status >= 500 or status in (401, 403) else StoreError
        return error(f"InfluxDB at {self.url} refused a query ({status})")

    def _source(self, measurement: str) -> str:
        """The measurement, qualified by the configured retention policy when one is set."""
        if not self.retention_policy:
            return _identifier(measurement)
        return f"{_identifier(self.retention_policy)}.{_identifier(measurement)}"

    def _client(self) -> httpx.Client:
        """This process's client for the server and credentials, kept for every request.

        A new httpx.Client costs about 50 ms (it loads the CA bundle), ten times the query it would
        send: a store write reads two small ranges per series first, so a fresh client per request
        made a 50-symbol write of one bar each take seconds. Its connections are not kept alive,
        though: in the influxd-restart drill, writes over a connection kept across the restart lost
        a symbol's points (129 of 6,450) that fresh connections never lost. A new connection costs a
        fraction of a millisecond on loopback (over https a handshake, as it always did).
        """
        password = self.password.get_secret_value() if self.password else None
        key = (os.getpid(), self.url, self.timeout, self.username, password)
        with _clients_guard:
            client = _clients.get(key)
            if client is None:
                auth = (self.username, password) if self.username and password else None
                client = _clients[key] = httpx.Client(
                    base_url=self.url, timeout=self.timeout, auth=auth, limits=httpx.Limits(max_keepalive_connections=0)
                )
            return client


def _shaped(table: Table, rows: pd.DataFrame) -> pd.DataFrame:
    """A SELECT's rows as the BarStore reads return them: key columns, then sorted fields, in the table's order."""
    if rows.empty:
        return pd.DataFrame(columns=list(table.key))
    values = sorted(c for c in rows.columns if c not in table.key)
    rows = rows[[*table.key, *values]]
    for column in values:
        if column not in table.text_fields:
            rows[column] = pd.to_numeric(rows[column]).astype(np.float64)
    return rows.sort_values(list(table.order), kind="stable").reset_index(drop=True)


def _partial(result: Mapping[str, Any]) -> bool:
    """Whether a statement's result says more rows follow: on the result, or on its last series."""
    series = result.get("series") or [{}]
    return bool(result.get("partial") or series[-1].get("partial"))


def _where(
    filters: Mapping[str, str | None], start: datetime | None, end: datetime | None
) -> tuple[str, dict[str, str]]:
    """An InfluxQL condition over bound parameters; values never enter the query text."""
    conditions = [f"{_identifier(tag)} = ${tag}" for tag, value in filters.items() if value is not None]
    params = {tag: value for tag, value in filters.items() if value is not None}
    for name, bound, op in (("start", start, ">="), ("end", end, "<")):
        if bound is not None:
            conditions.append(f"time {op} ${name}")
            params[name] = _rfc3339(bound)
    return " AND ".join(conditions), params


def _rfc3339(bound: datetime) -> str:
    """A time as InfluxQL takes it, in UTC and whole seconds (the precision points are written in)."""
    stamp = pd.Timestamp(bound)
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
    return stamp.strftime("%Y-%m-%dT%H:%M:%SZ")


def _go_duration(text: str) -> timedelta | None:
    """``8760h0m0s`` as a timedelta; ``0s`` (forever) or anything unreadable as None."""
    match = _GO_DURATION.fullmatch(text)
    if not match or not text:
        return None
    hours, minutes, seconds = (float(part) if part else 0.0 for part in match.groups())
    duration = timedelta(hours=hours, minutes=minutes, seconds=seconds)
    return duration or None


def _influx_duration(hours: float) -> str:
    """How SHOW RETENTION POLICIES prints a duration: ``8760h0m0s``."""
    return f"{int(hours)}h0m0s"


def _identifier(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


__all__ = ["InfluxDBV1Store"]
