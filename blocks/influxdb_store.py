"""InfluxDB 2.x and InfluxDB Cloud through influxdb-client: an org, a bucket, a token, Flux.

Writes are synchronous (the client's default background batching would turn a failed batch into a
log line), gzip-compressed line protocol from the shared serializer, 5,000 lines per request,
precision seconds. tenacity is the one retry policy: the client's own urllib3 retries are off, so
attempts and waits are counted once and a failure surfaces as :class:`StoreUnavailableError` (it
passes: down, timed out, 5xx, 429, a token to fix) or :class:`StoreError` (the request itself is
wrong). Queries are Flux whose text is assembled from fixed pieces only: every symbol, date and
name travels as a Flux parameter. Deletes (`/api/v2/delete`) take no parameters, so their predicate
quotes every tag value as an InfluxQL identifier, escaped (see :func:`delete_predicate`). The token
travels in the Authorization header and is never part of an error message.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, ClassVar, TypeVar

import numpy as np
import pandas as pd
from influxdb_client.client.bucket_api import BucketsApi
from influxdb_client.client.exceptions import InfluxDBError
from influxdb_client.client.flux_csv_parser import FluxQueryException
from influxdb_client.client.flux_table import TableList
from influxdb_client.client.influxdb_client import InfluxDBClient
from influxdb_client.client.query_api import QueryApi
from influxdb_client.client.write_api import SYNCHRONOUS, WriteApi
from influxdb_client.domain.bucket_retention_rules import BucketRetentionRules
from influxdb_client.domain.write_precision import WritePrecision
from influxdb_client.rest import ApiException
from influxdb_client.service.ping_service import PingService
from prefect.blocks.core import Block
from pydantic import Field, SecretStr
from urllib3.exceptions import LocationValueError, MaxRetryError, ProtocolError
from urllib3.exceptions import TimeoutError as Urllib3TimeoutError

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

# InfluxDB's whole time range (MinNanoTime, MaxNanoTime): an open range must reach bars before 1970.
EARLIEST = pd.Timestamp("1677-09-21T00:12:43.145224194Z")
LATEST = pd.Timestamp("2262-04-11T23:47:16.854775806Z")
# Connection refused or reset, DNS failure, connect or read timeout: all of them pass.
TRANSIENT: tuple[type[BaseException], ...] = (Urllib3TimeoutError, ProtocolError, MaxRetryError, ConnectionError)
_NAME = re.compile(r"[a-z_]+")
_ORG_ID = re.compile(r"[0-9a-f]{16}")  # how InfluxDB tells an org ID from an org name

T = TypeVar("T")


@dataclass(frozen=True)
class FluxQuery:
    """Flux text made of fixed pieces, and the values it refers to as parameters."""

    text: str
    params: dict[str, str]


class InfluxDBStore(InfluxMeasurements, Block):
    """Bars in an InfluxDB 2.x / Cloud bucket: measurement `bars`, tags symbol/interval/source, float fields."""

    _block_type_name: ClassVar[str] = "marketpipe InfluxDB store"
    _description: ClassVar[str] = "InfluxDB 2.x or InfluxDB Cloud: URL, organization, bucket and API token."

    url: InfluxUrl = DEFAULT_URL
    org: str = Field(default="marketpipe", description="organization name (or ID) owning the bucket")
    bucket: str = Field(default="market_data", description="created on the first write when missing")
    token: SecretStr = Field(description="API token that may read and write the bucket (and create it)")
    timeout: RequestTimeout = 30.0
    write_attempts: WriteAttempts = 4

    _guard: ClassVar[threading.Lock] = threading.Lock()

    # --- writing -------------------------------------------------------------------------------

    @contextmanager
    def _sender(self) -> Iterator[Send]:
        with self._client() as client:
            writer = client.write_api(write_options=SYNCHRONOUS)
            yield lambda body: self._send(client, writer, body)

    def _send(self, client: InfluxDBClient, writer: WriteApi, body: bytes) -> int:
        """One batch, retried; a bucket that does not exist yet (404) is created once and the batch sent again.

        Returns the points a 422 partial write dropped as older than the bucket's retention: the
        server stored the rest.
        """

        def post() -> None:
            # WritePrecision's members are annotated as plain str, its own parameter as WritePrecision.
            precision: Any = WritePrecision.S
            writer.write(bucket=self.bucket, org=self.org, record=body, write_precision=precision)

        try:
            try:
                self._retrying(post)
            except ApiException as exc:
                if exc.status != 404:
                    raise
                self._ensure_bucket(client)
                self._retrying(post)
        except ApiException as exc:
            dropped = beyond_retention(str(exc.message or "")) if exc.status == 422 else None
            if dropped is None:
                raise self._failure("write", exc, self.write_attempts) from None
            return dropped
        except StoreError:
            raise
        except Exception as exc:
            raise self._failure("write", exc, self.write_attempts) from None
        return 0

    def _delete(self, measurement: str, spans: Sequence[SeriesSpan]) -> None:
        """One delete request per span, retried like a write; a bucket not created yet has nothing to delete.

        The server deletes points in [start, stop], both ends included (the storage engine's
        DeleteBucketRangePredicate), so ``stop`` is the span's last time itself.
        """
        if not spans:
            return
        with self._client() as client:
            deletes = client.delete_api()
            for span in spans:
                predicate = delete_predicate(measurement, span.tags)
                start, stop = _flux_time(span.first, EARLIEST), _flux_time(span.last, LATEST)

                def delete(start: str = start, stop: str = stop, predicate: str = predicate) -> None:
                    deletes.delete(start, stop, predicate, bucket=self.bucket, org=self.org)

                try:
                    self._retrying(delete)
                except ApiException as exc:
                    if exc.status == 404:  # no bucket yet; a wrong org fails the write that follows, clearly
                        return
                    raise self._failure("delete", exc, self.write_attempts) from None
                except Exception as exc:
                    raise self._failure("delete", exc, self.write_attempts) from None

    def _retrying(self, operation: Callable[[], T]) -> T:
        return retrying(self.write_attempts, _retryable)(operation)

    def _ensure_bucket(self, client: InfluxDBClient) -> None:
        """Create the bucket (no expiry) unless it exists; serialized, so concurrent writers create it once."""
        with self._guard:
            buckets = client.buckets_api()
            if self._call("look up the bucket", lambda: self._find_bucket(buckets)) is None:
                self._call("create the bucket", lambda: self._create_bucket(buckets, None))

    # --- reading -------------------------------------------------------------------------------

    def first_timestamp(self, symbol: str, interval: str, source: str) -> pd.Timestamp | None:
        return self._series_time(first_time_query, symbol, interval, source)

    def last_timestamp(self, symbol: str, interval: str, source: str) -> pd.Timestamp | None:
        return self._series_time(last_time_query, symbol, interval, source)

    def _series_time(
        self, build: Callable[[str, Mapping[str, str | None]], FluxQuery], symbol: str, interval: str, source: str
    ) -> pd.Timestamp | None:
        query = build(self.bucket, {"symbol": symbol, "interval": interval, "source": source})
        found = self._ask(lambda api: api.query(query.text, org=self.org, params=query.params), TableList())
        times = [row[0] for row in found.to_values(columns=["_time"])]
        return pd.Timestamp(pd.to_datetime(pd.Series(times), utc=True).iloc[0]) if times else None

    def _select(
        self, table: Table, filters: Filters, start: datetime | None = None, end: datetime | None = None
    ) -> pd.DataFrame:
        query = select_query(self.bucket, table.name, table.key, filters, start, end)
        result: pd.DataFrame | list[pd.DataFrame] = self._ask(
            lambda api: api.query_data_frame(query.text, org=self.org, params=query.params), []
        )
        # One frame per table schema; the query's group() leaves one table, an empty result none.
        frames: list[pd.DataFrame] = [f for f in (result if isinstance(result, list) else [result]) if not f.empty]
        if not frames:
            return pd.DataFrame(columns=list(table.key))
        rows = pd.concat(frames, ignore_index=True).drop(columns=["result", "table"], errors="ignore")
        return _shape(rows.rename(columns={"_time": "time"}), table)

    def _ask(self, read: Callable[[QueryApi], T], empty: T) -> T:
        """Run one query (not retried, like every read); a bucket nothing was written to yet reads as ``empty``."""
        try:
            with self._client() as client:
                return read(client.query_api())
        except (ApiException, FluxQueryException) as exc:
            if _missing_bucket(exc):
                return empty
            raise self._failure("query", exc) from None
        except Exception as exc:
            raise self._failure("query", exc) from None

    # --- administration ------------------------------------------------------------------------

    def retention(self) -> timedelta | None:
        """The bucket's expiry rule; None when it keeps data forever or does not exist yet."""
        with self._client() as client:
            bucket = self._call("look up the bucket", lambda: self._find_bucket(client.buckets_api()))
        every = None if bucket is None else _expiry(bucket)
        return None if every is None else timedelta(seconds=every)

    def apply_retention(self, duration: str | None) -> RetentionChange:
        """The bucket's expiry rule becomes ``duration``; a missing bucket is created with it.

        Running it again changes nothing. Without a duration an existing bucket is left as it is.
        """
        every = None if duration is None else int(duration_to_timedelta(duration).total_seconds())
        target = f"bucket {self.bucket} in org {self.org}"
        with self._client() as client:
            buckets = client.buckets_api()
            with self._guard:
                bucket = self._call("look up the bucket", lambda: self._find_bucket(buckets))
                if bucket is None:
                    self._call("create the bucket", lambda: self._create_bucket(buckets, every))
                    return RetentionChange("created", f"{target} = {duration or 'no expiry'}")
            if every is None:
                return RetentionChange("unchanged", f"no retention.duration, {target} is left as it is")
            if _expiry(bucket) == every:
                return RetentionChange("unchanged", f"{target} = {duration}")
            bucket.retention_rules = [_expire_after(every)]
            self._call("update the bucket's retention", lambda: buckets.update_bucket(bucket))
            return RetentionChange("updated", f"{target} = {duration}")

    def health(self) -> None:
        try:
            with self._client() as client:
                PingService(client.api_client).get_ping()  # type: ignore[no-untyped-call]
        except Exception as exc:
            raise StoreError(
                f"InfluxDB at {self.url} is not answering ({self._redact(exc)}): "
                "check storage.influxdb.url (INFLUXDB_URL) and that the server runs"
            ) from None

    def _find_bucket(self, buckets: BucketsApi) -> Any:
        org = {"org_id" if _ORG_ID.fullmatch(self.org) else "org": self.org}
        found = buckets.find_buckets(name=self.bucket, **org).buckets or []  # type: ignore[no-untyped-call]
        return next((b for b in found if b.name == self.bucket), None)

    def _create_bucket(self, buckets: BucketsApi, every: int | None) -> None:
        rules = [] if every is None else [_expire_after(every)]
        try:
            buckets.create_bucket(bucket_name=self.bucket, org=self.org, retention_rules=rules)
        except ApiException as exc:
            if exc.status not in (409, 422):  # another writer created it meanwhile
                raise

    # --- errors and the client -----------------------------------------------------------------

    def _call(self, action: str, operation: Callable[[], T], attempts: int = 1) -> T:
        """Run ``operation``, turning whatever it raises into a StoreError that says what to check."""
        try:
            return operation()
        except StoreError:
            raise
        except Exception as exc:
            raise self._failure(action, exc, attempts) from None

    def _failure(self, action: str, error: Exception, attempts: int = 1) -> StoreError:
        """The StoreError for ``error``: unavailable when it passes, plain when the request itself is wrong."""
        where = f"InfluxDB at {self.url}"
        tried = f" after {attempts} attempts" if attempts > 1 else ""
        if isinstance(error, ApiException):
            status = int(error.status or 0)
            # A response's message is in its body; a request that got none (TLS) says why in its reason.
            detail = f"{status}: {self._redact((error.message if status else None) or error.reason)}"
            if status in (401, 403):
                return StoreUnavailableError(
                    f"{where} refused to {action} ({detail}): check that the token (storage.influxdb.token or "
                    f"INFLUXDB_TOKEN) is valid and may read and write bucket {self.bucket} in org {self.org} "
                    "(and create it, unless it exists)"
                )
            if status >= 500 or status == 429:
                return StoreUnavailableError(
                    f"{where} could not {action}{tried} ({detail}): it is overloaded or failing, check its logs"
                )
            if status == 404:
                return StoreError(
                    f"{where} could not {action} ({detail}): check storage.influxdb.org ({self.org}) "
                    f"and storage.influxdb.bucket ({self.bucket})"
                )
            if status == 0:  # raised by the client itself, for a TLS failure
                return StoreError(f"{where} could not {action} ({detail}): check the URL's scheme and certificate")
            return StoreError(f"{where} refused to {action} ({detail})")
        if isinstance(error, TRANSIENT):
            return StoreUnavailableError(
                f"{where} is unreachable or timed out{tried} ({self._redact(error)}): "
                "check that it runs and that storage.influxdb.url (INFLUXDB_URL) points at it"
            )
        if isinstance(error, LocationValueError):
            return StoreError(f"{where}: the URL is not valid ({self._redact(error)}): fix storage.influxdb.url")
        if isinstance(error, FluxQueryException):
            return StoreError(f"{where}: the query failed: {self._redact(error.message)}")
        if isinstance(error, InfluxDBError):  # e.g. the org could not be resolved to its ID
            return StoreError(
                f"{where} could not {action} ({self._redact(error.message)}): check storage.influxdb.org "
                f"({self.org}) and that the token may read it"
            )
        return StoreError(f"{where} could not {action} ({type(error).__name__}: {self._redact(error)})")

    def _redact(self, text: object) -> str:
        """``text`` with the token blanked out, should a server or library ever echo it."""
        secret = self.token.get_secret_value()
        return str(text).replace(secret, "***") if secret else str(text)

    def _client(self) -> InfluxDBClient:
        # retries=False: urllib3 raises the first error itself and tenacity decides about another attempt.
        return InfluxDBClient(
            url=self.url,
            token=self.token.get_secret_value(),
            org=self.org,
            timeout=int(self.timeout * 1000),
            enable_gzip=True,
            retries=False,
        )


# --- Flux --------------------------------------------------------------------------------------


def select_query(
    bucket: str,
    measurement: str,
    key: tuple[str, ...],
    filters: Mapping[str, str | None],
    start: datetime | None = None,
    end: datetime | None = None,
) -> FluxQuery:
    """Rows of ``measurement`` with one column per field; ``end`` is exclusive, like Flux's ``stop``."""
    head = _head(bucket, measurement, filters, start, end)
    row_key = ", ".join(f'"{_name(c)}"' for c in ("_time", *key) if c != "time")
    text = (
        f"{head.text}\n"
        f'  |> pivot(rowKey: [{row_key}], columnKey: ["_field"], valueColumn: "_value")\n'
        '  |> drop(columns: ["_start", "_stop", "_measurement"])\n'
        "  |> group()"
    )
    return FluxQuery(text, head.params)


def last_time_query(bucket: str, filters: Mapping[str, str | None]) -> FluxQuery:
    """The newest ``_time`` of a bars series: the last point of each field, then the latest of those."""
    return _edge_time_query(bucket, filters, "last", desc=True)


def first_time_query(bucket: str, filters: Mapping[str, str | None]) -> FluxQuery:
    """The oldest ``_time`` of a bars series: the first point of each field, then the earliest of those."""
    return _edge_time_query(bucket, filters, "first", desc=False)


def _edge_time_query(bucket: str, filters: Mapping[str, str | None], edge: str, desc: bool) -> FluxQuery:
    head = _head(bucket, BARS.name, filters, None, None)
    text = (
        f"{head.text}\n"
        f"  |> {edge}()\n"
        "  |> group()\n"
        f'  |> sort(columns: ["_time"], desc: {"true" if desc else "false"})\n'
        "  |> limit(n: 1)\n"
        '  |> keep(columns: ["_time"])'
    )
    return FluxQuery(text, head.params)


def delete_predicate(measurement: str, tags: Mapping[str, str]) -> str:
    """A /api/v2/delete predicate matching one series of ``measurement`` exactly.

    The predicate grammar has no parameters. Its values are InfluxQL tokens, and a double-quoted
    identifier takes any text with ``\\`` and ``"`` escaped, so that is how every value is sent; a
    newline, which the grammar cannot hold, is refused (no point could carry one either).
    """
    terms = [f"_measurement={_quoted(measurement)}"]
    terms += [f"{_quoted(_name(tag))}={_quoted(value)}" for tag, value in tags.items()]
    return " AND ".join(terms)


def _quoted(value: str) -> str:
    if "\n" in value or "\r" in value:
        raise StoreError(f"{value!r} holds a line break, which InfluxDB cannot match in a delete")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _head(
    bucket: str,
    measurement: str,
    filters: Mapping[str, str | None],
    start: datetime | None,
    end: datetime | None,
) -> FluxQuery:
    """``from |> range |> filter`` over parameters; a filter whose value is None is left out."""
    params = {
        "p_bucket": bucket,
        "p_start": _flux_time(start, EARLIEST),
        "p_stop": _flux_time(end, LATEST),
        "p_measurement": measurement,
    }
    conditions = ["r._measurement == p_measurement"]
    for tag, value in filters.items():
        if value is not None:
            conditions.append(f'r["{_name(tag)}"] == p_{_name(tag)}')
            params[f"p_{tag}"] = value
    text = (
        "from(bucket: p_bucket)\n"
        "  |> range(start: time(v: p_start), stop: time(v: p_stop))\n"
        f"  |> filter(fn: (r) => {' and '.join(conditions)})"
    )
    return FluxQuery(text, params)


def _flux_time(bound: datetime | None, default: pd.Timestamp) -> str:
    """RFC 3339 in UTC, kept inside InfluxDB's time range; naive datetimes are taken as UTC."""
    stamp = default if bound is None else pd.Timestamp(bound)
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
    stamp = min(max(stamp, EARLIEST), LATEST)
    return stamp.tz_localize(None).isoformat() + "Z"


def _name(name: str) -> str:
    """Column and tag names enter the query text; they are marketpipe's own constants, checked anyway."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"{name!r} is not a plain column name")
    return name


# --- results -----------------------------------------------------------------------------------


def _shape(rows: pd.DataFrame, table: Table) -> pd.DataFrame:
    """Like every backend's read: key columns first, then the fields sorted; float64 fields; in the table's order."""
    key = table.key
    values = sorted(c for c in rows.columns if c not in key)
    rows["time"] = pd.to_datetime(rows["time"], utc=True).astype("datetime64[ns, UTC]")
    for tag in table.tags:
        rows[tag] = rows[tag].astype(str)
    for column in values:
        if column not in table.text_fields:
            rows[column] = pd.to_numeric(rows[column]).astype(np.float64)
    rows = rows[[*key, *values]]
    # A total order: rows from one pivot come in no fixed order.
    return rows.sort_values(list(table.order), kind="stable").reset_index(drop=True)


def _expire_after(seconds: int) -> Any:
    """A retention rule deleting data older than ``seconds``; the server derives the shard duration from it."""
    return BucketRetentionRules(type="expire", every_seconds=seconds)  # type: ignore[no-untyped-call]


def _expiry(bucket: Any) -> int | None:
    """The bucket's expiry in seconds; None when it keeps data forever (no rule, or 0)."""
    for rule in bucket.retention_rules or []:
        if rule.type == "expire" and rule.every_seconds:
            return int(rule.every_seconds)
    return None


def _retryable(error: BaseException) -> bool:
    if isinstance(error, ApiException):
        return int(error.status or 0) >= 500 or error.status == 429
    return isinstance(error, TRANSIENT)


def _missing_bucket(error: InfluxDBError | FluxQueryException) -> bool:
    """A query of a bucket that does not exist yet: nothing was written, so nothing is there."""
    if isinstance(error, ApiException) and error.status != 404:
        return False
    text = str(error.message).lower()
    return "bucket" in text and ("not found" in text or "could not find" in text)


__all__ = ["FluxQuery", "InfluxDBStore", "delete_predicate", "first_time_query", "last_time_query", "select_query"]
