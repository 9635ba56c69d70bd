"""The local spool: writes the store could not take wait here, in order, until they are replayed.

A write that fails with :class:`StoreUnavailableError` after the store's own retries becomes one
Parquet file in the spool directory. Files are only ever added, each written whole under a
temporary name and renamed into place, so a crash leaves either the whole batch or none of it.
A batch's name starts with a sequence number taken under the spool's append lock, so batches sort
in the order they were appended to this spool, whichever host appended them and whatever its clock
says. Replaying writes the files in that order, one replayer at a time (a lock across threads and
processes), and removes each only after the store accepted it. While anything is spooled, new
writes queue behind it: an older spooled value never overwrites a newer stored one. A batch replays
through the same store verb it failed in, with the same semantics: a bars batch whose range the
store had already deleted before the write failed replaces that range again, so nothing the delete
took is lost. A batch the store refuses for good is moved to ``rejected/`` with its reason next to
it, so it never blocks the batches behind it, other writes or the next run.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock

from blocks.store import TABLES, BarStore, StoreError, StoreUnavailableError

logger = logging.getLogger(__name__)

SUFFIX = ".parquet"
META_KEY = b"marketpipe"
REJECTED = "rejected"  # the subdirectory of batches the store refused for good
REASON_SUFFIX = ".reason.txt"
SEQUENCE_DIGITS = 20  # names sort as numbers; legacy names (nanosecond clocks) have this width too

# Replays a kind that needs more than a store write (collected bars still to be processed):
# called with the store, the rows and the metadata spooled with them; returns the points written.
Handler = Callable[[BarStore, pd.DataFrame, dict[str, Any]], int]


@dataclass(frozen=True)
class SpooledBatch:
    path: Path
    kind: str  # a table's name (blocks.store.TABLES), or a handler's kind
    points: int


@dataclass(frozen=True)
class RejectedBatch:
    """A batch the store refused for good, now in ``rejected/`` next to ``<name>.reason.txt``."""

    name: str
    kind: str
    points: int
    reason: str


@dataclass(frozen=True)
class Replayed:
    batches: int
    points: int
    rejected: list[RejectedBatch] = field(default_factory=list)


@dataclass(frozen=True)
class Written:
    """The outcome of one write: points the store took, points spooled for later, and the
    spooled batches of earlier writes that the replay before it had to set aside."""

    written: int
    spooled: int
    rejected: list[RejectedBatch] = field(default_factory=list)


@dataclass(frozen=True)
class SpoolDepth:
    """How much waits in the spool: batches, and when the oldest of them was spooled (None: empty)."""

    batches: int
    oldest: datetime | None = None
    oldest_batch: str = ""  # its file name: what an alert about it is keyed on

    def age_seconds(self, now: datetime) -> float:
        """How long the oldest batch has waited; 0 for an empty spool."""
        return max(0.0, (now - self.oldest).total_seconds()) if self.oldest is not None else 0.0


class ReplayStoppedError(StoreUnavailableError):
    """The store went away during a replay; carries what the replay did before it stopped."""

    def __init__(self, message: str, replayed: Replayed) -> None:
        super().__init__(message)
        self.replayed = replayed


class Spool:
    """An append-only directory of Parquet batches, replayed in append order."""

    def __init__(self, directory: str | Path, handlers: Mapping[str, Handler] | None = None) -> None:
        self.directory = Path(directory)
        self.handlers: Mapping[str, Handler] = handlers or {}

    @property
    def rejected_directory(self) -> Path:
        return self.directory / REJECTED

    def _kinds(self) -> set[str]:
        return {*TABLES, *self.handlers}

    def append(self, kind: str, rows: pd.DataFrame, meta: Mapping[str, Any] | None = None) -> SpooledBatch:
        """Keep ``rows`` (and ``meta``, JSON) durably; raises StoreError when the directory can't take them.

        The file is written under a temporary name first; only the sequence number and the rename
        into place happen under the append lock, so appenders wait for each other briefly.
        """
        if kind not in self._kinds():
            raise ValueError(f"cannot spool {kind!r}: one of {', '.join(sorted(self._kinds()))}")
        table = pa.Table.from_pandas(rows, preserve_index=False)
        if meta:
            table = table.replace_schema_metadata(
                {**table.schema.metadata, META_KEY: json.dumps(dict(meta), default=str)}
            )
        tag = f"{uuid.uuid4().hex[:12]}.{kind}{SUFFIX}"
        staging = self.directory / f".{tag}.partial"
        with self._os_errors(f"cannot spool {table.num_rows} {kind} rows to {self.directory}"):
            self.directory.mkdir(parents=True, exist_ok=True)
            try:
                with staging.open("wb") as handle:
                    pq.write_table(table, handle, compression="zstd")
                    handle.flush()
                    os.fsync(handle.fileno())
                with self._locked(".append.lock"):
                    final = self.directory / f"{self._next_sequence():0{SEQUENCE_DIGITS}d}-{tag}"
                    staging.rename(final)
            finally:
                staging.unlink(missing_ok=True)
            _fsync_directory(self.directory)
        return SpooledBatch(final, kind, table.num_rows)

    def _next_sequence(self) -> int:
        """One past the counter file and the newest pending batch (called under the append lock):
        a lost or stale counter, or batches named by an older version, never sort after a new batch."""
        counter = self.directory / ".sequence"
        try:
            last = int(counter.read_text().strip())
        except (OSError, ValueError):
            last = 0
        last = max([last, *(_sequence(name) for name in self._pending_names())])
        staged = counter.with_name(".sequence.partial")
        staged.write_text(f"{last + 1}\n")
        staged.replace(counter)
        return last + 1

    def _pending_names(self) -> list[str]:
        """Names of the spooled batches, in append order; none while the directory does not exist."""
        try:
            names = os.listdir(self.directory)
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            raise StoreError(f"cannot list the spool {self.directory} ({exc}): check its permissions") from None
        return sorted(n for n in names if n[:1].isdigit() and n.endswith(SUFFIX))

    def pending(self) -> list[SpooledBatch]:
        """Spooled batches in append order; a batch another replayer takes meanwhile is left out.

        A file whose Parquet footer can't be read is listed with 0 points: its replay sets it aside.
        """
        found = []
        for name in self._pending_names():
            path = self.directory / name
            try:
                points = pq.read_metadata(path).num_rows
            except FileNotFoundError:
                continue  # replayed (or set aside) by another replayer since the listing
            except (OSError, pa.ArrowException):
                points = 0
            found.append(SpooledBatch(path, name.removesuffix(SUFFIX).rsplit(".", 1)[-1], points))
        return found

    def points(self) -> int:
        return sum(batch.points for batch in self.pending())

    def depth(self) -> SpoolDepth:
        """The batches waiting and the oldest one's age, from the listing alone: cheap enough for every run."""
        names = self._pending_names()
        for name in names:  # the oldest still there: a replayer may take batches meanwhile
            try:
                spooled = (self.directory / name).stat().st_mtime
            except FileNotFoundError:
                continue
            return SpoolDepth(len(names), datetime.fromtimestamp(spooled, UTC), name)
        return SpoolDepth(0)

    def replay(self, store: BarStore) -> Replayed:
        """Write every spooled batch in append order; the store becoming unavailable stops it.

        A batch the store refuses for good (a StoreError that is not :class:`StoreUnavailableError`,
        or a file nothing can read) is set aside in ``rejected/`` and the replay goes on with the next.
        Raises :class:`ReplayStoppedError`, with what was done so far, when the store is unavailable.
        """
        batches = points = 0
        rejected: list[RejectedBatch] = []
        with self._locked(".replay.lock"):
            for batch in self.pending():
                try:
                    table = self._read(batch)
                    if table is None:
                        continue  # moved away meanwhile, by hand or by a replayer that took no lock
                    self._write_back(store, batch, table)
                except StoreUnavailableError as exc:
                    raise ReplayStoppedError(str(exc), Replayed(batches, points, rejected)) from None
                except StoreError as exc:  # refused for good: kept aside, never in the way of the rest
                    rejected.append(self._set_aside(batch, exc))
                    continue
                batch.path.unlink(missing_ok=True)
                batches, points = batches + 1, points + batch.points
        return Replayed(batches, points, rejected)

    @staticmethod
    def _read(batch: SpooledBatch) -> pa.Table | None:
        """The batch's rows, or None when its file is gone; a file that is no Parquet is a StoreError."""
        try:
            return pq.read_table(batch.path)
        except FileNotFoundError:
            return None
        except (OSError, pa.ArrowException) as exc:
            raise StoreError(f"the spooled file cannot be read ({exc})") from None

    def _write_back(self, store: BarStore, batch: SpooledBatch, table: pa.Table) -> None:
        rows = table.to_pandas()
        if batch.kind in TABLES:
            store.write(TABLES[batch.kind], rows)
        elif batch.kind not in self.handlers:
            raise StoreError(f"nothing here can replay {batch.kind!r} batches")
        else:
            meta = json.loads((table.schema.metadata or {}).get(META_KEY, b"{}"))
            self.handlers[batch.kind](store, rows, meta)

    def _set_aside(self, batch: SpooledBatch, error: StoreError) -> RejectedBatch:
        """Move a refused batch to ``rejected/`` with its reason beside it (written first, so a
        batch there always has one); called under the replay lock."""
        name = batch.path.name
        reason = str(error)
        target = self.rejected_directory
        with self._os_errors(f"the store refuses spooled batch {batch.path} ({reason}), and it cannot be set aside"):
            target.mkdir(exist_ok=True)
            stamp = datetime.now(UTC).isoformat(timespec="seconds")
            (target / f"{name}{REASON_SUFFIX}").write_text(
                f"{reason}\n\nset aside {stamp}: {batch.points} {batch.kind} rows. Fix the cause, then move "
                f"{name} back to {self.directory} to replay it: it replays before anything spooled after it.\n"
            )
            batch.path.rename(target / name)
            _fsync_directory(target)
            _fsync_directory(self.directory)
        logger.warning(
            "the store refuses spooled batch %s (%d %s rows) for good: %s; set aside in %s",
            name, batch.points, batch.kind, reason, target,
        )  # fmt: skip
        return RejectedBatch(name, batch.kind, batch.points, reason)

    def write(self, store: BarStore, kind: str, rows: pd.DataFrame) -> Written:
        """Write through the store, or spool when it is unavailable; fails loudly if neither works."""
        if rows.empty:
            return Written(0, 0)
        rejected: list[RejectedBatch] = []
        if self._pending_names():
            try:  # older values go first, so they never land on top of these
                rejected = self.replay(store).rejected
            except ReplayStoppedError as exc:
                return Written(0, self.keep(kind, rows, str(exc)), exc.replayed.rejected)
        try:
            written = store.write(TABLES[kind], rows)
        except StoreUnavailableError as exc:
            return Written(0, self.keep(kind, rows, str(exc)), rejected)
        return Written(written, 0, rejected)

    def keep(self, kind: str, rows: pd.DataFrame, cause: str, meta: Mapping[str, Any] | None = None) -> int:
        """Spool what the store could not take; a spool that can't take it either fails loudly."""
        try:
            batch = self.append(kind, rows, meta)
        except StoreError as exc:
            raise StoreError(
                f"{cause}; and {len(rows)} {kind} rows could not be spooled ({exc}): they are lost unless the "
                "run is repeated once the store or the spool directory is fixed"
            ) from None
        logger.warning("%s; spooled %d %s rows to %s", cause, batch.points, kind, batch.path)
        return batch.points

    @contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        """One holder at a time of the spool's lock ``name``, across threads, processes and hosts
        sharing the directory: `.append.lock` (sequence numbers) and `.replay.lock` (one replayer)."""
        with self._os_errors(f"cannot lock the spool {self.directory}"):
            self.directory.mkdir(parents=True, exist_ok=True)
            lock = FileLock(self.directory / name)
            lock.acquire()
        try:
            yield
        finally:
            lock.release()

    @contextmanager
    def _os_errors(self, what: str) -> Iterator[None]:
        """An OSError of the spool's own files as a StoreError that says what failed and what to check."""
        try:
            yield
        except OSError as exc:
            raise StoreError(f"{what} ({exc}): check that the directory exists, is writable and has space") from None


def _sequence(name: str) -> int:
    """The number a batch's name starts with (its place in the spool)."""
    head = name.split("-", 1)[0]
    return int(head) if head.isdigit() else 0


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
