"""The embedded default store: one DuckDB file; a bars write replaces its series' ranges in one transaction."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import ClassVar

import duckdb
import pandas as pd
import pyarrow as pa
from prefect.blocks.core import Block
from pydantic import Field

from blocks.store import (
    BARS,
    QUARANTINE,
    RANGES,
    SERIES_TAGS,
    SUPERSEDED_RULES,
    Filters,
    RetentionChange,
    StoreError,
    StoreUnavailableError,
    Table,
    TableVerbs,
    duration_to_timedelta,
)

# Value columns become SQL identifiers, so they must be plain snake_case names.
COLUMN_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


class _SharedConnections:
    """One DuckDB connection per file per process, shared by threads through cursors.

    DuckDB refuses a second connection to a file with a different configuration (read-only next
    to read-write) in the same process, and tasks run in threads. The connection closes when its
    last user is done, so no file stays locked against other processes between operations.
    """

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._open: dict[str, tuple[duckdb.DuckDBPyConnection, int]] = {}
        self._write_locks: dict[str, threading.Lock] = {}
        # Per open connection, what its tables hold: the process holds the file's only writable
        # connection, so nothing else changes them until it closes, and a write need not ask again.
        self._schemas: dict[str, dict[str, _Schema]] = {}
        self._found: dict[str, dict[str, bool]] = {}  # and whether it has a table, once asked

    @contextmanager
    def cursor(self, path: Path) -> Iterator[duckdb.DuckDBPyConnection]:
        key = str(path.resolve())
        with self._guard:
            if key in self._open:
                connection, users = self._open[key]
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                try:
                    connection, users = duckdb.connect(key), 0
                except duckdb.IOException as exc:  # the file is locked by another process, most likely
                    raise StoreUnavailableError(
                        f"cannot open DuckDB store {path}: {exc} (another process may be writing to it)"
                    ) from None
                except duckdb.Error as exc:
                    raise StoreError(f"cannot open DuckDB store {path}: {exc}") from None
            self._open[key] = (connection, users + 1)
        cursor = connection.cursor()
        try:
            yield cursor
        finally:
            cursor.close()
            with self._guard:
                connection, users = self._open[key]
                if users == 1:
                    del self._open[key]
                    self._schemas.pop(key, None)
                    self._found.pop(key, None)
                    connection.close()
                else:
                    self._open[key] = (connection, users - 1)

    def write_lock(self, path: Path) -> threading.Lock:
        with self._guard:
            return self._write_locks.setdefault(str(path.resolve()), threading.Lock())

    def schemas(self, path: Path) -> dict[str, _Schema]:
        """The known tables of the file's open connection (call with a cursor open, under the write lock)."""
        with self._guard:
            return self._schemas.setdefault(str(path.resolve()), {})

    def record(self, path: Path, table: str, schema: _Schema) -> None:
        """A table as a committed write left it (call with a cursor open)."""
        key = str(path.resolve())
        with self._guard:
            self._schemas.setdefault(key, {})[table] = schema
            self._found.setdefault(key, {})[table] = True

    def known(self, path: Path, table: str) -> bool | None:
        """Whether the file's open connection has ``table``, if that is known without asking it."""
        key = str(path.resolve())
        with self._guard:
            return self._found.get(key, {}).get(table)

    def found(self, path: Path, table: str, exists: bool) -> None:
        """What the file said of ``table``, unless a write created it meanwhile (call with a cursor open).

        Tables are only ever added, and only by this process while its connection is open.
        """
        key = str(path.resolve())
        with self._guard:
            if table not in self._schemas.get(key, {}):
                self._found.setdefault(key, {})[table] = exists


@dataclass(frozen=True)
class _Schema:
    columns: frozenset[str]
    keyed: bool  # a table of an older version, with a PRIMARY KEY


_connections = _SharedConnections()


class DuckDBStore(TableVerbs, Block):
    """Bars in a local DuckDB file: no server, for development, the demo and single-node use."""

    _block_type_name: ClassVar[str] = "marketpipe DuckDB store"
    _description: ClassVar[str] = "Embedded DuckDB file holding the standard bar frame."

    path: str = Field(default="data/marketpipe.duckdb", description="DuckDB database file")

    def _connect(self) -> AbstractContextManager[duckdb.DuckDBPyConnection]:
        return _connections.cursor(Path(self.path))

    @contextmanager
    def session(self) -> Iterator[None]:
        """The file's connection, kept open across a run's writes: opening it replays the file's log
        and closing it checkpoints, which cost more than a symbol's write. A file that can't be
        opened (another process holds it) is not held: each read and write then says why."""
        with ExitStack() as held:
            with suppress(StoreError):
                held.enter_context(self._connect())
            yield

    def _ensure_table(self, con: duckdb.DuckDBPyConnection, declared: Table, value_columns: list[str]) -> _Schema:
        """Create the table or add the new value columns; whether it has a PRIMARY KEY (files of older versions)."""
        table = declared.name
        known = _connections.schemas(Path(self.path)).get(table)
        if known is not None and known.columns.issuperset(value_columns):
            return known
        key_sql = ", ".join(
            f"{column} TIMESTAMPTZ NOT NULL" if column == "time" else f"{column} VARCHAR NOT NULL"
            for column in declared.key
        )
        # No PRIMARY KEY: maintaining its index doubled the cost of a write; _upsert deletes then inserts instead.
        # Tables in files of older versions keep theirs, and _upsert replaces into those.
        con.execute(f"CREATE TABLE IF NOT EXISTS {table} ({key_sql})")
        existing = {row[0] for row in con.execute(f"DESCRIBE {table}").fetchall()}
        for column in value_columns:
            if column not in existing:
                kind = "VARCHAR" if column in declared.text_fields else "DOUBLE"
                con.execute(f'ALTER TABLE {table} ADD COLUMN "{column}" {kind}')
        primary = con.execute(
            "SELECT 1 FROM duckdb_constraints() WHERE table_name = ? AND constraint_type = 'PRIMARY KEY'", [table]
        ).fetchall()
        return _Schema(frozenset(existing) | frozenset(value_columns), bool(primary))

    def write(self, declared: Table, rows: pd.DataFrame) -> int:
        """Replace the rows whose key is in ``rows`` and add the rest, keeping the last of repeated keys.

        ``declared.clears`` first deletes, in the same transaction, from each (table, how): with RANGES
        every row in the closed range of each incoming series, with BARS_OF every row with an incoming
        bar key. A write is one transaction.
        """
        table, key, clears = declared.name, declared.key, declared.clears
        if rows.empty:
            return 0
        missing = [c for c in key if c not in rows.columns]
        if missing:
            raise StoreError(f"cannot store {table} without key columns: {', '.join(missing)}")
        value_columns = [c for c in rows.columns if c not in key]
        bad = [c for c in value_columns if not COLUMN_NAME.fullmatch(str(c))]
        if bad:
            raise StoreError(f"column names must be lowercase snake_case to be stored: {bad}")
        frame = rows[[*key, *value_columns]]
        # Cast only what is not a float already: at a million rows every needless copy shows.
        casts = {c: "float64" for c in value_columns if c not in declared.text_fields and frame[c].dtype != "float64"}
        if casts:
            frame = frame.astype(casts)
        repeated = frame.duplicated(subset=list(key), keep="last")
        if repeated.any():
            frame = frame[~repeated]
        # DuckDB scans Arrow faster than pandas object columns, by more than the conversion costs.
        incoming = pa.Table.from_pandas(frame, preserve_index=False)
        names = ", ".join(f'"{c}"' for c in frame.columns)
        # Each key compared as stored: the insert truncates nanosecond times to the column's microseconds.
        stored = {c: "TIMESTAMPTZ" if c == "time" else "VARCHAR" for c in key}
        same_key = " AND ".join(f'{table}."{c}" = incoming."{c}"::{kind}' for c, kind in stored.items())
        span = [frame["time"].min(), frame["time"].max()]
        with _connections.write_lock(Path(self.path)), self._connect() as con:
            con.begin()
            schema = self._ensure_table(con, declared, value_columns)
            con.register("incoming", incoming)
            for cleared, how in clears:
                # The table written is there: just made, uncommitted, so not asked about (and remembered).
                if cleared == table or self._has_table(con, cleared):
                    self._clear(con, cleared, how, span)
            if schema.keyed:  # deleting then inserting under the old index is several times slower than replacing
                con.execute(f"INSERT OR REPLACE INTO {table} ({names}) SELECT {names} FROM incoming")
            else:
                if (table, RANGES) not in clears:  # a cleared range holds none of the incoming keys any more
                    # The time range lets DuckDB skip, by zonemap, the row groups no incoming row can match.
                    con.execute(
                        f"DELETE FROM {table} USING incoming WHERE {same_key} AND {table}.time BETWEEN ? AND ?", span
                    )
                con.execute(f"INSERT INTO {table} ({names}) SELECT {names} FROM incoming")
            con.unregister("incoming")
            con.commit()
            _connections.record(Path(self.path), table, schema)  # only once it is committed
        return len(frame)

    @staticmethod
    def _clear(con: duckdb.DuckDBPyConnection, table: str, how: str, span: list[object]) -> None:
        """Delete what the incoming rows replace from ``table`` (see :meth:`_upsert`)."""
        if how == RANGES:  # each series' range, computed where the rows already are (as stored: microseconds)
            spans = con.execute(
                "SELECT symbol, interval, source, min(time)::TIMESTAMPTZ, max(time)::TIMESTAMPTZ "
                "FROM incoming GROUP BY symbol, interval, source"
            ).fetchall()
            # One delete per series, its key as constants: DuckDB can then skip, by zonemap, the row
            # groups of other symbols (a run writes each symbol's rows together); a join scans them all.
            series = " AND ".join(f'"{c}" = ?' for c in SERIES_TAGS)
            con.executemany(f"DELETE FROM {table} WHERE {series} AND time BETWEEN ? AND ?", spans)
        else:  # the time range lets DuckDB skip, by zonemap, the row groups no incoming row can match
            # A superseded duplicate's clean bar stays in bars (SUPERSEDED_RULES).
            kept = f"AND incoming.rule NOT IN ({', '.join('?' * len(SUPERSEDED_RULES))}) " if table == BARS.name else ""
            tags = " AND ".join(f'{table}."{c}" = incoming."{c}"' for c in SERIES_TAGS)
            con.execute(
                f"DELETE FROM {table} USING incoming WHERE {tags} {kept}"
                f"AND {table}.time = incoming.time::TIMESTAMPTZ AND {table}.time BETWEEN ? AND ?",
                [*(sorted(SUPERSEDED_RULES) if kept else []), *span],
            )

    def _select(
        self, declared: Table, filters: Filters, start: datetime | None = None, end: datetime | None = None
    ) -> pd.DataFrame:
        """Rows matching every non-None filter (bound parameters, never interpolated), in the table's order."""
        conditions = [f"{column} = ?" for column, value in filters.items() if value is not None]
        params: list[object] = [value for value in filters.values() if value is not None]
        for clause, bound in (("time >= ?", start), ("time < ?", end)):
            if bound is not None:
                conditions.append(clause)
                params.append(bound)
        empty = pd.DataFrame(columns=list(declared.key))
        if not Path(self.path).exists():
            return empty
        with self._connect() as con:
            if not self._has_table(con, declared.name):
                return empty
            where, order = " AND ".join(conditions), ", ".join(declared.order)
            frame = con.execute(f"SELECT * FROM {declared.name} WHERE {where} ORDER BY {order}", params).df()
        frame["time"] = pd.to_datetime(frame["time"], utc=True).astype("datetime64[ns, UTC]")
        return frame

    def first_timestamp(self, symbol: str, interval: str, source: str) -> pd.Timestamp | None:
        return self._series_time("min", symbol, interval, source)

    def last_timestamp(self, symbol: str, interval: str, source: str) -> pd.Timestamp | None:
        return self._series_time("max", symbol, interval, source)

    def _series_time(self, aggregate: str, symbol: str, interval: str, source: str) -> pd.Timestamp | None:
        """min or max of a series' bar times; None for an empty series."""
        if not Path(self.path).exists():
            return None
        with self._connect() as con:
            if not self._has_table(con, BARS.name):
                return None
            row = con.execute(
                f"SELECT {aggregate}(time) FROM {BARS.name} WHERE symbol = ? AND interval = ? AND source = ?",
                [symbol, interval, source],
            ).fetchone()
        return None if row is None or row[0] is None else pd.Timestamp(row[0]).tz_convert("UTC")

    def retention(self) -> timedelta | None:
        """None: DuckDB keeps what it is given; `retention.duration` is applied by deleting (apply_retention)."""
        return None

    def apply_retention(self, duration: str | None) -> RetentionChange:
        """Delete bars and quarantined bars older than ``duration`` now; corporate actions are kept."""
        if duration is None:
            return RetentionChange("unchanged", "no retention.duration, everything is kept")
        cutoff = pd.Timestamp.now(tz="UTC") - pd.Timedelta(duration_to_timedelta(duration))
        deleted = 0
        with _connections.write_lock(Path(self.path)), self._connect() as con:
            for table in (BARS.name, QUARANTINE.name):
                if self._has_table(con, table):
                    row = con.execute(f"DELETE FROM {table} WHERE time < ? RETURNING 1", [cutoff]).fetchall()
                    deleted += len(row)
        if deleted:
            return RetentionChange("updated", f"deleted {deleted} row(s) older than {duration} from {self.path}")
        return RetentionChange("unchanged", f"nothing older than {duration} in {self.path}")

    def health(self) -> None:
        with self._connect() as con:
            con.execute("SELECT 1").fetchone()

    def _has_table(self, con: duckdb.DuckDBPyConnection, table: str) -> bool:
        """Asked of the file once per connection: a run that never quarantines a bar asks at every write."""
        known = _connections.known(Path(self.path), table)
        if known is not None:
            return known
        rows = con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [table]).fetchall()
        exists = bool(rows and rows[0][0])
        _connections.found(Path(self.path), table, exists)
        return exists


__all__ = ["SERIES_TAGS", "DuckDBStore"]
