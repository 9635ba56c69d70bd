"""The local spool: writes the store could not take wait here, in order, until they are replayed.

A write that fails with :class:`StoreUnavailableError` after the store's own retries becomes one
Parquet file in the spool directory. Files are only ever added, each written whole under a
temporary name and renamed into place, so a crash leaves either the whole batch or none of it.
Replaying writes the files oldest first and removes each only after the store accepted it. While
anything is spooled, new writes queue behind it: an older spooled value never overwrites a newer
stored one. A batch replays through the same store verb it failed in, with the same semantics: a
bars batch whose range the store had already deleted before the write failed replaces that range
again, so nothing the delete took is lost.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock

from blocks.store import BarStore, StoreError, StoreUnavailableError

logger = logging.getLogger(__name__)

# What a spooled file holds, and the store method that writes it.
WRITERS: dict[str, str] = {
    "bars": "write_bars",
    "corporate_actions": "write_corporate_actions",
    "quarantine": "write_quarantine",
    "pipeline_metrics": "write_metrics",
}
SUFFIX = ".parquet"
META_KEY = b"marketpipe"

# Replays a kind that needs more than a store write (collected bars still to be processed):
# called with the store, the rows and the metadata spooled with them; returns the points written.
Handler = Callable[[BarStore, pd.DataFrame, dict[str, Any]], int]


@dataclass(frozen=True)
class SpooledBatch:
    path: Path
    kind: str  # a key of WRITERS
    points: int


@dataclass(frozen=True)
class Replayed:
    batches: int
    points: int


@dataclass(frozen=True)
class Written:
    """The outcome of one write: points the store took, and points spooled for later."""

    written: int
    spooled: int


class Spool:
    """An append-only directory of Parquet batches, replayed oldest first."""

    def __init__(self, directory: str | Path, handlers: Mapping[str, Handler] | None = None) -> None:
        self.directory = Path(directory)
        self.handlers: Mapping[str, Handler] = handlers or {}

    def _kinds(self) -> set[str]:
        return {*WRITERS, *self.handlers}

    def append(self, kind: str, rows: pd.DataFrame, meta: Mapping[str, Any] | None = None) -> SpooledBatch:
        """Keep ``rows`` (and ``meta``, JSON) durably; raises OSError when the directory can't take them."""
        if kind not in self._kinds():
            raise ValueError(f"cannot spool {kind!r}: one of {', '.join(sorted(self._kinds()))}")
        self.directory.mkdir(parents=True, exist_ok=True)
        # Names sort in write order: nanoseconds, then a random part for writers in the same instant.
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}.{kind}{SUFFIX}"
        staging = self.directory / f".{name}.partial"
        table = pa.Table.from_pandas(rows, preserve_index=False)
        if meta:
            table = table.replace_schema_metadata(
                {**table.schema.metadata, META_KEY: json.dumps(dict(meta), default=str)}
            )
        with staging.open("wb") as handle:
            pq.write_table(table, handle, compression="zstd")
            handle.flush()
            os.fsync(handle.fileno())
        final = self.directory / name
        staging.rename(final)
        _fsync_directory(self.directory)
        return SpooledBatch(final, kind, table.num_rows)

    def pending(self) -> list[SpooledBatch]:
        """Spooled batches, oldest first."""
        if not self.directory.is_dir():
            return []
        found = []
        for path in sorted(self.directory.glob(f"[0-9]*{SUFFIX}")):
            kind = path.name.removesuffix(SUFFIX).rsplit(".", 1)[-1]
            found.append(SpooledBatch(path, kind, pq.read_metadata(path).num_rows))
        return found

    def points(self) -> int:
        return sum(batch.points for batch in self.pending())

    def replay(self, store: BarStore) -> Replayed:
        """Write every spooled batch, oldest first; the first failure stops it and keeps the rest.

        A batch the store refuses for good (not :class:`StoreUnavailableError`) raises a StoreError
        naming its file, so it is never silently skipped.
        """
        batches = points = 0
        with self._lock():
            for batch in self.pending():
                try:
                    self._write_back(store, batch)
                except StoreUnavailableError:
                    raise
                except StoreError as exc:
                    raise StoreError(
                        f"the store refuses spooled batch {batch.path} ({exc}): fix the cause and run "
                        "`marketpipe replay`, or move the file out of the spool to give it up"
                    ) from None
                batch.path.unlink()
                batches, points = batches + 1, points + batch.points
        return Replayed(batches, points)

    def _write_back(self, store: BarStore, batch: SpooledBatch) -> None:
        table = pq.read_table(batch.path)
        rows = table.to_pandas()
        if batch.kind in WRITERS:
            getattr(store, WRITERS[batch.kind])(rows)
        elif batch.kind not in self.handlers:
            raise StoreError(f"nothing here can replay {batch.kind!r} batches")
        else:
            meta = json.loads((table.schema.metadata or {}).get(META_KEY, b"{}"))
            self.handlers[batch.kind](store, rows, meta)

    def write(self, store: BarStore, kind: str, rows: pd.DataFrame) -> Written:
        """Write through the store, or spool when it is unavailable; fails loudly if neither works."""
        if rows.empty:
            return Written(0, 0)
        if self.pending():
            try:
                self.replay(store)  # older values go first, so they never land on top of these
            except StoreUnavailableError as exc:
                return Written(0, self.keep(kind, rows, str(exc)))
        try:
            written: int = getattr(store, WRITERS[kind])(rows)
        except StoreUnavailableError as exc:
            return Written(0, self.keep(kind, rows, str(exc)))
        return Written(written, 0)

    def keep(self, kind: str, rows: pd.DataFrame, cause: str, meta: Mapping[str, Any] | None = None) -> int:
        """Spool what the store could not take; a spool that can't take it either fails loudly."""
        try:
            batch = self.append(kind, rows, meta)
        except OSError as exc:
            raise StoreError(
                f"{cause}; and {len(rows)} {kind} rows could not be spooled to {self.directory} ({exc}): "
                "they are lost unless the run is repeated once the store or the spool directory is fixed"
            ) from None
        logger.warning("%s; spooled %d %s rows to %s", cause, batch.points, kind, batch.path)
        return batch.points

    def _lock(self) -> FileLock:
        """One replay at a time, across threads and processes (a flow and `marketpipe replay`)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        return FileLock(self.directory / ".replay.lock")


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
