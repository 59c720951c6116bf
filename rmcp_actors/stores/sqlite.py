"""The SQLite dedup store: durable across restarts, shared by the server processes of a host.

Every sqlite call that may wait runs in a worker thread (``anyio.to_thread``), one at a time
on the store's main connection, so the event loop never blocks on the disk or on another
process's lock; the store works under trio and asyncio alike. The one exception is a claim
that needs no fsync (see ``fsync_claims``) when the database is free right now: it commits on
the event loop's thread through a second connection that never waits (a busy database sends
it to the queue instead), because a few tens of microseconds of blocking cost less than two
hops to a worker thread and back.

Writes are group-committed. The server commits three times per tool call (``begin``,
``mark_entered``, then ``complete``); with many calls in flight, one fsync per write would cap
throughput at the disk's fsync rate. So a write that finds no flush running commits at once, alone; writes
submitted while that flush runs wait in a queue, and the next flush commits the whole queue
in one ``BEGIN IMMEDIATE ... COMMIT`` transaction, each write inside its own SAVEPOINT so
that one failing write does not fail the others. The flusher is always one of the callers:
it commits one batch, then hands the role to the oldest queued caller, so no caller works
for the others for long and no background task is needed.

Several processes may open the same file: every write transaction starts with ``BEGIN
IMMEDIATE`` (the database's write lock, waited for up to ``busy_timeout_s``), which makes
``begin()`` atomic across processes.
"""

from __future__ import annotations

import copy
import enum
import functools
import math
import os
import socket
import sqlite3
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar, cast, final

import anyio
import anyio.to_thread
import attrs

from ..errors import RMCPConfigError, RMCPStoreClosedError, RMCPStoreError, RMCPUnknownOwnerError
from ._base import BeginOutcome, DedupRecord, OwnerInfo, RecordState

__all__ = ["SQLiteStore", "SQLiteStoreStatistics"]

_T = TypeVar("_T")

#: How often a flush also deletes expired records, so the file does not grow without bound.
_PURGE_INTERVAL_S = 60.0
#: Most records one transaction deletes: a purge must not hold the write lock (and the
#: writes batched with it) for as long as a backlog of millions of records takes.
_PURGE_BATCH = 1_000

# IF NOT EXISTS throughout: several processes may create the schema of a fresh file at once.
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS records (
        key TEXT PRIMARY KEY,
        fingerprint TEXT NOT NULL,
        tool TEXT NOT NULL,
        state TEXT NOT NULL,
        owner TEXT NOT NULL,
        result BLOB,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        entered INTEGER NOT NULL DEFAULT 1
    )""",
    "CREATE INDEX IF NOT EXISTS records_by_expiry ON records (expires_at)",
    "CREATE INDEX IF NOT EXISTS records_by_owner ON records (owner)",
    """CREATE TABLE IF NOT EXISTS owners (
        instance_id TEXT PRIMARY KEY,
        pid INTEGER NOT NULL,
        host TEXT NOT NULL,
        lease_expires_at REAL NOT NULL,
        released INTEGER NOT NULL
    )""",
)

# Files created before the entered mark existed get the column; their records (and those
# written by older processes sharing the file, which do not set it) read as entered: in doubt
# if their owner is gone, never run again.
_ADD_ENTERED = "ALTER TABLE records ADD COLUMN entered INTEGER NOT NULL DEFAULT 1"

_SELECT_RECORD = """
    SELECT r.key, r.fingerprint, r.tool, r.state, r.owner, r.result, r.created_at, r.expires_at,
           r.entered, o.pid, o.host, o.lease_expires_at, o.released
    FROM records AS r LEFT JOIN owners AS o ON o.instance_id = r.owner
    WHERE r.key = ?
"""


class _Status(enum.Enum):
    QUEUED = enum.auto()
    #: Woken to flush the queue: the previous flusher handed the role on.
    PROMOTED = enum.auto()
    RUNNING = enum.auto()
    DONE = enum.auto()


@attrs.define(eq=False)
class _Write(Generic[_T]):
    """One queued write: the function to run in the transaction, and its answer."""

    apply: Callable[[sqlite3.Connection], _T]
    # Whether the write must be on disk when it returns (an fsync), not only in the WAL.
    sync: bool = True
    wake: anyio.Event = attrs.Factory(anyio.Event)
    status: _Status = _Status.QUEUED
    value: _T | None = None
    error: BaseException | None = None

    def settle(self, value: _T | None, error: BaseException | None) -> None:
        self.value, self.error = value, error
        self.status = _Status.DONE
        self.wake.set()

    def unwrap(self) -> _T:
        if self.error is not None:
            raise self.error
        return cast("_T", self.value)


@final
@attrs.frozen
class SQLiteStoreStatistics:
    """A snapshot of a :class:`SQLiteStore`'s group commit.

    Attributes:
        commits: Write transactions committed (or attempted) so far; one per flush.
        writes: Writes carried by those transactions.
        largest_batch: The most writes one transaction carried.
        queued: Writes waiting for the next flush right now.
        inline_claims: Claims and entered marks committed on the event loop's thread, outside
            the queue.
    """

    commits: int
    writes: int
    largest_batch: int
    queued: int
    inline_claims: int


@final
class SQLiteStore:
    """A durable dedup store in one SQLite file, safe to share between processes of a host.

    The file is in WAL mode. A result (``complete``), an in-doubt mark and owner changes are
    committed with ``synchronous=FULL``: on disk (fsynced) when the method returns, so they
    survive a power loss. A claim (``begin``) and its entered mark (``mark_entered``) are
    committed with ``synchronous=NORMAL`` unless ``fsync_claims``: they are in the WAL, which
    survives a crash of any process, and the next FULL commit makes them durable too; only a
    power loss or an OS crash during the run can lose them, and then a retry would run the
    tool again. Group commit pays the fsync once per batch
    of concurrent writes, not per write.

    A ``STARTED`` record reads ``owner_alive=True`` while its owner is registered, not
    released and within its lease. When the owner's host is this host, the owner's process
    must also still exist: the records of a crashed local server are in doubt at once, not
    only when its lease lapses. (A recycled pid can make a dead owner look alive until the
    lease lapses; the pid check runs on POSIX only.)

    Expired records are deleted by :meth:`purge_expired`, and at most once a minute as part
    of an ordinary write, in worker threads and in batches of at most 1,000 records per
    transaction.

    Cancelling a write (``begin``, ``complete``, ...) before it reaches the database drops
    it; once its transaction has started, it may be committed although the caller was
    cancelled. A caller whose turn it is to flush others' writes finishes that flush
    (shielded, bounded by ``busy_timeout_s``) before it sees its cancellation.

    Args:
        path: The database file; created with its schema if absent, readable by its owner
            only (mode 0600, as its -wal and -shm files).
        ttl_s: How long a record lives, counted from its creation.
        clock: The time source for expiries and leases, in seconds since the epoch;
            ``time.time`` by default, a wall clock because several processes share the file.
        busy_timeout_s: How long a transaction waits for another process's write lock.
        fsync_claims: Fsync every claim and entered mark as well (at-most-once across a power
            loss, at the price of two more fsyncs per call when calls are sequential).

    Failures of SQLite itself (a locked or unwritable file, a full disk) are raised as
    :class:`~rmcp_actors.RMCPStoreError`, with the ``sqlite3`` error as ``__cause__``.

    Raises:
        RMCPConfigError: When ``ttl_s`` is not positive or ``busy_timeout_s`` is negative.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        ttl_s: float = 86_400.0,
        clock: Callable[[], float] | None = None,
        busy_timeout_s: float = 10.0,
        fsync_claims: bool = False,
    ) -> None:
        if not ttl_s > 0:
            raise RMCPConfigError(f"must be a positive number of seconds, got {ttl_s!r}", path="ttl_s")
        if not busy_timeout_s >= 0:
            raise RMCPConfigError(
                f"must be zero or more seconds, got {busy_timeout_s!r}", path="busy_timeout_s"
            )
        self._path = os.fspath(path)
        self._ttl_s = ttl_s
        self._clock = clock or time.time
        self._busy_timeout_s = busy_timeout_s
        self._fsync_claims = fsync_claims
        self._synchronous: str | None = None
        self._host = socket.gethostname()
        # Opened lazily, in a worker thread: opening may wait for another process's lock.
        self._connection: sqlite3.Connection | None = None
        # Set by aclose(): new calls are refused, and the connection is not (re)opened.
        self._closing = False
        self._connection_closed = False
        # The connection is used by one worker thread at a time.
        self._lock = anyio.Lock()
        self._queue: list[_Write[Any]] = []
        self._flushing = False
        self._next_purge_at = -math.inf
        self._commits = 0
        self._writes = 0
        self._largest_batch = 0
        self._inline: sqlite3.Connection | None = None
        self._inline_claims = 0

    @property
    def durable(self) -> bool:
        """Always True: records are in the file, committed before a write returns."""
        return True

    def statistics(self) -> SQLiteStoreStatistics:
        """Return a snapshot of the group commit counters."""
        return SQLiteStoreStatistics(
            commits=self._commits,
            writes=self._writes,
            largest_batch=self._largest_batch,
            queued=len(self._queue),
            inline_claims=self._inline_claims,
        )

    async def register_owner(self, owner: OwnerInfo, lease_s: float) -> None:
        """Record ``owner`` as alive for ``lease_s`` seconds (again, if it was released)."""
        lease_expires_at = self._clock() + lease_s

        def apply(connection: sqlite3.Connection) -> None:
            connection.execute(
                """INSERT INTO owners (instance_id, pid, host, lease_expires_at, released)
                VALUES (?, ?, ?, ?, 0)
                ON CONFLICT (instance_id) DO UPDATE SET pid = excluded.pid, host = excluded.host,
                    lease_expires_at = excluded.lease_expires_at, released = 0""",
                (owner.instance_id, owner.pid, owner.host, lease_expires_at),
            )

        await self._write(apply, operation="register_owner")

    async def renew_owner(self, instance_id: str, lease_s: float) -> None:
        """Extend the lease of a registered owner by ``lease_s`` from now.

        A released owner stays released: renewing it does nothing.

        Raises:
            RMCPUnknownOwnerError: When the owner is not registered, or was purged because its
                lease lapsed more than ``ttl_s`` ago.
        """
        lease_expires_at = self._clock() + lease_s

        def apply(connection: sqlite3.Connection) -> None:
            row = connection.execute(
                "SELECT released FROM owners WHERE instance_id = ?", (instance_id,)
            ).fetchone()
            if row is None:
                raise RMCPUnknownOwnerError(
                    f"owner {instance_id!r} is not registered: call register_owner first",
                    operation="renew_owner",
                )
            if not row[0]:
                connection.execute(
                    "UPDATE owners SET lease_expires_at = ? WHERE instance_id = ?",
                    (lease_expires_at, instance_id),
                )

        await self._write(apply, operation="renew_owner")

    async def release_owner(self, instance_id: str) -> None:
        """Mark the owner as gone; its unfinished records read ``owner_alive=False``."""

        def apply(connection: sqlite3.Connection) -> None:
            connection.execute("UPDATE owners SET released = 1 WHERE instance_id = ?", (instance_id,))

        await self._write(apply, operation="release_owner")

    async def begin(self, key: str, *, fingerprint: str, tool: str, owner: str) -> BeginOutcome:
        """Claim ``key`` as ``STARTED`` by ``owner``, unless a live record exists.

        Atomic across processes: the check and the claim run in one write transaction.
        """
        now = self._clock()

        def apply(connection: sqlite3.Connection) -> BeginOutcome:
            row = connection.execute(_SELECT_RECORD, (key,)).fetchone()
            existing = None if row is None else self._live_record(row, now)
            if existing is not None and not (
                existing.state is RecordState.STARTED
                and not existing.entered
                and existing.fingerprint == fingerprint
                and (existing.owner == owner or not existing.owner_alive)
            ):
                return BeginOutcome(claimed=False, existing=existing)
            # The read above and this write are one transaction under the write lock: of two
            # processes taking over one abandoned claim, the second sees the first's.
            connection.execute(
                """INSERT OR REPLACE INTO records
                (key, fingerprint, tool, state, owner, result, created_at, expires_at, entered)
                VALUES (?, ?, ?, ?, ?, NULL, ?, ?, 0)""",
                (key, fingerprint, tool, RecordState.STARTED.value, owner, now, now + self._ttl_s),
            )
            return BeginOutcome(claimed=True, existing=None, taken_over=existing is not None)

        return await self._claim_write(apply, "begin")

    async def mark_entered(self, key: str, *, owner: str) -> bool:
        """Mark the claim of ``key`` by ``owner`` as entered; False when it is not ``STARTED``
        by ``owner`` (taken over): the tool must not be called then.

        Committed as a claim is (``fsync_claims``), inline when the database is free: a crash
        of any process keeps it.
        """

        def apply(connection: sqlite3.Connection) -> bool:
            return (
                connection.execute(
                    "UPDATE records SET entered = 1 WHERE key = ? AND owner = ? AND state = ?",
                    (key, owner, RecordState.STARTED.value),
                ).rowcount
                == 1
            )

        return await self._claim_write(apply, "mark_entered")

    async def resolve_in_doubt(self, key: str, *, owner: str, fingerprint: str, result: bytes | None) -> bool:
        """Settle an in-doubt ``key``: ``COMPLETED`` with ``result`` (committed to disk), or,
        with None, claimed anew by ``owner``. False, changing nothing, unless the record is in
        doubt (or an entered claim of ``owner`` itself) with this ``fingerprint``.

        Atomic across processes: the check and the change run in one write transaction.
        """
        now = self._clock()
        expires_at = now + self._ttl_s

        def apply(connection: sqlite3.Connection) -> bool:
            row = connection.execute(_SELECT_RECORD, (key,)).fetchone()
            record = None if row is None else self._live_record(row, now)
            if record is None or record.fingerprint != fingerprint:
                return False
            own_entered = record.state is RecordState.STARTED and record.entered and record.owner == owner
            if not (record.in_doubt or own_entered):
                return False
            if result is None:
                connection.execute(
                    """UPDATE records SET state = ?, owner = ?, entered = 0,
                    expires_at = MAX(expires_at, ?) WHERE key = ?""",
                    (RecordState.STARTED.value, owner, expires_at, key),
                )
            else:
                connection.execute(
                    """UPDATE records SET state = ?, owner = ?, result = ?,
                    expires_at = MAX(expires_at, ?) WHERE key = ?""",
                    (RecordState.COMPLETED.value, owner, result, expires_at, key),
                )
            return True

        return await self._write(apply, operation="resolve_in_doubt")

    async def _claim_write(self, apply: Callable[[sqlite3.Connection], _T], operation: str) -> _T:
        """Commit a claim's write: without an fsync unless ``fsync_claims``, inline when the
        database is free right now (see the module docstring), else in the queue."""
        try:
            done = None if self._fsync_claims else self._try_inline(apply)
        except sqlite3.Error as error:
            raise self._store_error(operation, error) from error
        if done is not None:
            self._inline_claims += 1
            return done[0]
        return await self._write(apply, operation=operation, sync=self._fsync_claims)

    async def complete(self, key: str, *, owner: str, result: bytes) -> None:
        """Store the result of the run ``owner`` started; committed to disk once this returns.

        Does nothing when ``key`` is no longer ``STARTED`` by ``owner`` (it expired and was
        claimed again, or was already finished).
        """
        # A run that outlived the TTL must not expire the moment it is recorded.
        expires_at = self._clock() + self._ttl_s
        await self._finish(
            "complete",
            """UPDATE records SET state = ?, result = ?, expires_at = MAX(expires_at, ?)
            WHERE key = ? AND owner = ? AND state = ?""",
            (RecordState.COMPLETED.value, result, expires_at, key, owner, RecordState.STARTED.value),
        )

    async def mark_in_doubt(self, key: str, *, owner: str) -> None:
        """Record that the run ``owner`` started was cut short; no-op unless it is ``STARTED``."""
        expires_at = self._clock() + self._ttl_s
        await self._finish(
            "mark_in_doubt",
            """UPDATE records SET state = ?, expires_at = MAX(expires_at, ?)
            WHERE key = ? AND owner = ? AND state = ?""",
            (RecordState.IN_DOUBT.value, expires_at, key, owner, RecordState.STARTED.value),
        )

    async def get(self, key: str) -> DedupRecord | None:
        """Return the live record of ``key``, or None when absent or expired."""
        self._check_open()
        now = self._clock()

        def read() -> DedupRecord | None:
            row = self._open_connection().execute(_SELECT_RECORD, (key,)).fetchone()
            return None if row is None else self._live_record(row, now)

        async with self._lock:
            try:
                return await anyio.to_thread.run_sync(read)
            except (sqlite3.Error, OSError) as error:
                raise self._store_error("get", error) from error

    async def purge_expired(self) -> int:
        """Delete expired records, and owners whose lease ended more than ``ttl_s`` ago and
        that have no records left; return how many records were deleted.

        One transaction per batch of records, so other writes interleave with a long purge.
        """
        now = self._clock()
        # This purge does the opportunistic one's work, and counts what it deletes.
        self._next_purge_at = now + _PURGE_INTERVAL_S
        deleted = 0
        while True:
            batch = await self._write(
                lambda connection: self._purge(connection, now), operation="purge_expired"
            )
            deleted += batch
            if batch < _PURGE_BATCH:
                return deleted

    async def aclose(self) -> None:
        """Commit the writes already queued, then close the connection.

        Further calls raise :class:`~rmcp_actors.RMCPStoreClosedError`. Closing twice is harmless.
        """
        if self._closing:
            return
        self._closing = True
        # Closing must finish even if the caller is cancelled, or the connection would leak.
        with anyio.CancelScope(shield=True):
            if self._flushing:
                # Writes queued before this one are committed with it or before it.
                await self._submit(_Write(lambda _connection: None))
            async with self._lock:
                await anyio.to_thread.run_sync(self._close_connection)

    async def _finish(self, operation: str, statement: str, parameters: tuple[object, ...]) -> None:
        def apply(connection: sqlite3.Connection) -> None:
            connection.execute(statement, parameters)

        await self._write(apply, operation=operation)

    async def _write(
        self, apply: Callable[[sqlite3.Connection], _T], *, operation: str, sync: bool = True
    ) -> _T:
        self._check_open()
        try:
            return await self._submit(_Write(apply, sync=sync))
        except (sqlite3.Error, OSError) as error:
            # OSError: the file could not be created (_create_private).
            raise self._store_error(operation, error) from error

    def _store_error(self, operation: str, error: Exception) -> RMCPStoreError:
        return RMCPStoreError(
            f"the SQLite store {self._path} failed in {operation} ({type(error).__name__}: {error}); "
            "check that the file is writable, its disk not full, and no process holds its lock for long",
            operation=operation,
        )

    async def _submit(self, write: _Write[_T]) -> _T:
        self._queue.append(write)
        if not self._flushing:
            self._flushing = True
            await self._flush()
            return write.unwrap()
        try:
            await write.wake.wait()
        except BaseException:
            if write.status is _Status.PROMOTED:
                # The queue now relies on this task: flush it even though the caller left.
                await self._flush()
            elif write.status is _Status.QUEUED:
                self._queue.remove(write)
            raise
        if write.status is _Status.PROMOTED:
            await self._flush()
        return write.unwrap()

    async def _flush(self) -> None:
        """Commit the whole queue in one transaction, then hand the flusher role on.

        Shielded: the queued writes of other tasks depend on this flush finishing.
        """
        with anyio.CancelScope(shield=True):
            batch, self._queue = self._queue, []
            for write in batch:
                write.status = _Status.RUNNING
            now = self._clock()
            purge_now = now if now >= self._next_purge_at else None
            if purge_now is not None:
                # Until the flush tells that the backlog is gone, the next one purges too.
                self._next_purge_at = now
            self._commits += 1
            self._writes += len(batch)
            self._largest_batch = max(self._largest_batch, len(batch))
            try:
                async with self._lock:
                    answers, purged = await anyio.to_thread.run_sync(self._commit_batch, batch, purge_now)
                if purge_now is not None and purged < _PURGE_BATCH:
                    self._next_purge_at = purge_now + _PURGE_INTERVAL_S
            except Exception as exc:
                for write in batch:
                    write.settle(None, _fresh_copy(exc))
            else:
                for write, (value, error) in zip(batch, answers, strict=True):
                    write.settle(value, error)
            finally:
                for write in batch:
                    if write.status is not _Status.DONE:
                        # Only a KeyboardInterrupt-like exception gets here.
                        write.settle(None, RMCPStoreError("the commit was interrupted; retry the write"))
                if self._queue:
                    successor = self._queue[0]
                    successor.status = _Status.PROMOTED
                    successor.wake.set()
                else:
                    self._flushing = False

    def _commit_batch(
        self, batch: list[_Write[Any]], purge_now: float | None
    ) -> tuple[list[tuple[object, Exception | None]], int]:
        """Run in a worker thread: apply every write in one transaction, each in a savepoint;
        return their answers and how many expired records the transaction deleted."""
        connection = self._open_connection()
        synchronous = "FULL" if any(write.sync for write in batch) else "NORMAL"
        if synchronous != self._synchronous:
            # Only outside a transaction; it applies to the commits that follow.
            connection.execute(f"PRAGMA synchronous = {synchronous}")
            self._synchronous = synchronous
        connection.execute("BEGIN IMMEDIATE")
        purged = 0
        try:
            answers = [_apply_in_savepoint(connection, write.apply) for write in batch]
            if purge_now is not None:
                # An opportunistic purge that fails is rolled back alone and retried next time.
                value, _error = _apply_in_savepoint(connection, functools.partial(self._purge, now=purge_now))
                purged = cast(int, value or 0)
            connection.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise
        return answers, purged

    def _purge(self, connection: sqlite3.Connection, now: float) -> int:
        """Delete one batch of expired records (at most ``_PURGE_BATCH``); return how many."""
        # A run whose owner still holds its lease is kept past its TTL (see _live_record).
        deleted = connection.execute(
            """DELETE FROM records WHERE rowid IN (SELECT rowid FROM records
            WHERE expires_at <= ? AND (state != ? OR owner NOT IN
            (SELECT instance_id FROM owners WHERE released = 0 AND lease_expires_at > ?))
            LIMIT ?)""",
            (now, RecordState.STARTED.value, now, _PURGE_BATCH),
        ).rowcount
        # An owner kept a while after its lease may still renew (a long pause, not a crash), and
        # a released one must stay known as released to a late renewal.
        connection.execute(
            """DELETE FROM owners
            WHERE lease_expires_at <= ?
            AND NOT EXISTS (SELECT 1 FROM records WHERE records.owner = owners.instance_id)""",
            (now - self._ttl_s,),
        )
        return deleted

    def _open_connection(self) -> sqlite3.Connection:
        """Run in a worker thread: the connection, opened and the schema created on first use."""
        if self._connection_closed:
            raise RMCPStoreClosedError("this SQLiteStore was closed: create a new store")
        if self._connection is not None:
            return self._connection
        _create_private(self._path)
        connection = sqlite3.connect(
            self._path,
            timeout=self._busy_timeout_s,
            # Autocommit mode: transactions are only the explicit BEGIN IMMEDIATE ones.
            isolation_level=None,
            check_same_thread=False,
        )
        try:
            connection.execute("PRAGMA journal_mode = WAL")
            connection.execute("PRAGMA synchronous = FULL")
            self._synchronous = "FULL"
            connection.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA:
                connection.execute(statement)
            columns = {row[1] for row in connection.execute("PRAGMA table_info(records)")}
            if "entered" not in columns:
                connection.execute(_ADD_ENTERED)
            connection.execute("COMMIT")
        except BaseException:
            connection.close()
            raise
        self._connection = connection
        return connection

    def _try_inline(self, apply: Callable[[sqlite3.Connection], _T]) -> tuple[_T] | None:
        """Commit ``apply`` (with ``synchronous=NORMAL``) here and now if nothing would wait:
        the main connection is idle and no other connection holds the write lock. None
        means "not done": queue it. A 1-tuple tells a None answer from that."""
        if self._connection is None or self._flushing or self._lock.locked() or self._closing:
            # Not open yet (the schema may not exist), or busy: the queue batches with it.
            return None
        if self._clock() >= self._next_purge_at:
            # The flush that carries it also purges expired records.
            return None
        connection = self._inline or self._open_inline()
        try:
            connection.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if _is_busy(exc):
                return None
            raise
        try:
            value = apply(connection)
            connection.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise
        return (value,)

    def _open_inline(self) -> sqlite3.Connection:
        # timeout=0: a locked database fails at once instead of blocking the event loop, and
        # no automatic checkpoint (an fsync of the database file) ever runs on this thread:
        # the main connection's commits do them.
        connection = sqlite3.connect(self._path, timeout=0, isolation_level=None, check_same_thread=False)
        connection.execute("PRAGMA synchronous = NORMAL")
        connection.execute("PRAGMA wal_autocheckpoint = 0")
        self._inline = connection
        return connection

    def _close_connection(self) -> None:
        self._connection_closed = True
        if self._inline is not None:
            self._inline.close()
            self._inline = None
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _check_open(self) -> None:
        if self._closing:
            raise RMCPStoreClosedError("this SQLiteStore was closed: create a new store")

    def _live_record(self, row: tuple[Any, ...], now: float) -> DedupRecord | None:
        """The record of ``row``, or None when it expired. A run whose owner is alive never
        expires: another caller claiming its key would run the tool a second time."""
        record = self._to_record(row, now)
        if record.expires_at > now or (record.state is RecordState.STARTED and record.owner_alive):
            return record
        return None

    def _to_record(self, row: tuple[Any, ...], now: float) -> DedupRecord:
        key, fingerprint, tool, state, owner, result, created_at, expires_at, entered = row[:9]
        pid, host, lease_expires_at, released = row[9:]
        owner_alive = (
            pid is not None
            and not released
            and lease_expires_at > now
            and (host != self._host or _process_exists(pid))
        )
        return DedupRecord(
            key=key,
            fingerprint=fingerprint,
            tool=tool,
            state=RecordState(state),
            owner=owner,
            owner_alive=owner_alive,
            result=result,
            created_at=created_at,
            expires_at=expires_at,
            entered=bool(entered),
        )


def _apply_in_savepoint(
    connection: sqlite3.Connection, apply: Callable[[sqlite3.Connection], object]
) -> tuple[object, Exception | None]:
    """Apply one write; on error undo only its own changes and return the error."""
    connection.execute("SAVEPOINT write")
    try:
        value = apply(connection)
    except Exception as exc:
        if not connection.in_transaction:
            # SQLite rolled the whole transaction back (disk full, I/O error): the batch fails.
            raise
        connection.execute("ROLLBACK TO write")
        connection.execute("RELEASE write")
        return None, exc
    connection.execute("RELEASE write")
    return value, None


def _create_private(path: str) -> None:
    """Create the database file, if absent, readable and writable by its owner only: it holds
    the tools' results. SQLite gives the -wal and -shm files the mode of the database file."""
    if path == ":memory:":
        return
    try:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        # An existing file keeps the mode its owner gave it.
        return
    os.close(descriptor)


def _is_busy(error: sqlite3.Error) -> bool:
    """Whether SQLite refused because another connection holds a lock. The primary result
    code is the low byte: extended codes (``SQLITE_BUSY_SNAPSHOT`` = 517, ...) keep it."""
    return error.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _process_exists(pid: int) -> bool:
    if os.name != "posix":
        # os.kill on Windows terminates the process instead of probing it: trust the lease.
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        # The process exists but belongs to another user.
        return True
    return True


def _fresh_copy(exc: Exception) -> Exception:
    """A copy of ``exc`` for one waiter: one exception object raised in several tasks would
    collect all their tracebacks."""
    fresh = copy.copy(exc)
    fresh.__cause__ = exc
    return fresh
