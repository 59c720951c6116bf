"""The SQLite dedup store: durable across restarts, shared by the server processes of a host.

Every sqlite call that may wait runs in a worker thread (``anyio.to_thread``), one at a time
on the store's main connection, so the event loop never blocks on the disk or on another
process's lock; the store works under trio and asyncio alike. The exception is the server's
hot path when the database is free right now (``ImmediateStore``: ``begin_now``,
``mark_entered_now``, ``complete_now``, which the async methods try first as well): a claim
that needs no fsync (see ``fsync_claims``), and a result when no other claim of this store is
in flight (nobody to share an fsync with) and this file's fsyncs measure fast, commit on the
event loop's thread through a second connection that never waits (a busy database sends the
write to the queue instead), because a few tens of microseconds of blocking cost less than two
hops to a worker thread and back (``GroupCommit.try_inline``, shared with the journal).

Writes are group-committed. The server commits three times per tool call (``begin``,
``mark_entered``, then ``complete``); with many calls in flight, one fsync per write would cap
throughput at the disk's fsync rate. So writes submitted while a flush runs share the next one,
each in its own SAVEPOINT; the machinery (``_sqlite_batch.GroupCommit``) is shared with the
transaction journal.

Several processes may open the same file: every write transaction starts with ``BEGIN
IMMEDIATE`` (the database's write lock, waited for up to ``busy_timeout_s``), which makes
``begin()`` atomic across processes.
"""

from __future__ import annotations

import functools
import math
import os
import socket
import sqlite3
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast, final

import attrs
import msgspec

from .._transfer import TransferHandle
from ..errors import RMCPConfigError, RMCPStoreError, RMCPUnknownOwnerError
from ._base import WOULD_WAIT as _WOULD_WAIT
from ._base import (
    BeginOutcome,
    DedupRecord,
    OwnerInfo,
    RecordState,
    TaskCreation,
    TaskRecord,
    TaskState,
    TransferConflict,
    WouldWait,
)
from ._blobs import (
    DEFAULT_MAX_BLOB_BYTES,
    DEFAULT_UPLOAD_TTL_S,
    blob_cap_error,
    check_blob_limits,
    same_layout,
    unknown_transfer,
)
from ._sqlite_batch import Chore, GroupCommit, failure

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
    """CREATE TABLE IF NOT EXISTS tasks (
        task_id TEXT PRIMARY KEY,
        key TEXT,
        scope TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        tool TEXT NOT NULL,
        state TEXT NOT NULL,
        owner TEXT NOT NULL,
        result BLOB,
        message TEXT,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        created_clock REAL NOT NULL,
        expires_at REAL NOT NULL,
        ttl_s REAL NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS tasks_by_key ON tasks (key)",
    "CREATE INDEX IF NOT EXISTS tasks_by_scope ON tasks (scope, created_clock)",
    "CREATE INDEX IF NOT EXISTS tasks_by_expiry ON tasks (expires_at)",
    """CREATE TABLE IF NOT EXISTS owners (
        instance_id TEXT PRIMARY KEY,
        pid INTEGER NOT NULL,
        host TEXT NOT NULL,
        lease_expires_at REAL NOT NULL,
        released INTEGER NOT NULL
    )""",
    # Transfers (BlobStore): a result's lives while its key has a record (key not NULL,
    # expires_at NULL), an upload's until expires_at. stored_bytes sums its chunks, so that the
    # size cap reads one row per transfer, not one per chunk.
    """CREATE TABLE IF NOT EXISTS transfers (
        id TEXT PRIMARY KEY,
        handle BLOB NOT NULL,
        key TEXT,
        scope TEXT NOT NULL,
        sealed INTEGER NOT NULL,
        created_at REAL NOT NULL,
        expires_at REAL,
        stored_bytes INTEGER NOT NULL DEFAULT 0
    )""",
    "CREATE INDEX IF NOT EXISTS transfers_by_key ON transfers (key)",
    "CREATE INDEX IF NOT EXISTS transfers_by_expiry ON transfers (expires_at)",
    # One row per chunk: a rowid table, since SQLite keeps a large value in overflow pages that
    # a WITHOUT ROWID table handles badly.
    """CREATE TABLE IF NOT EXISTS chunks (
        transfer_id TEXT NOT NULL,
        idx INTEGER NOT NULL,
        data BLOB NOT NULL,
        PRIMARY KEY (transfer_id, idx)
    )""",
)

#: ``PRAGMA secure_delete`` reads 0, 1 or 2 and is set by name (a plain ``2`` would mean ON).
_SECURE_DELETE = {0: "OFF", 1: "ON", 2: "FAST"}

_HANDLE_ENCODER = msgspec.msgpack.Encoder()
_HANDLE_DECODER = msgspec.msgpack.Decoder(TransferHandle)


# Files created before the entered mark existed get the column; their records (and those
# written by older processes sharing the file, which do not set it) read as entered: in doubt
# if their owner is gone, never run again.
_ADD_ENTERED = "ALTER TABLE records ADD COLUMN entered INTEGER NOT NULL DEFAULT 1"


def _create_schema(connection: sqlite3.Connection) -> None:
    for statement in _SCHEMA:
        connection.execute(statement)
    columns = {row[1] for row in connection.execute("PRAGMA table_info(records)")}
    if "entered" not in columns:
        connection.execute(_ADD_ENTERED)


_SELECT_RECORD = """
    SELECT r.key, r.fingerprint, r.tool, r.state, r.owner, r.result, r.created_at, r.expires_at,
           r.entered, o.pid, o.host, o.lease_expires_at, o.released
    FROM records AS r LEFT JOIN owners AS o ON o.instance_id = r.owner
    WHERE r.key = ?
"""

_STARTED = RecordState.STARTED.value
_COMPLETED = RecordState.COMPLETED.value

_INSERT_CLAIM = """INSERT OR REPLACE INTO records
    (key, fingerprint, tool, state, owner, result, created_at, expires_at, entered)
    VALUES (?, ?, ?, ?, ?, NULL, ?, ?, ?)"""

_CLAIM_FRESH = """INSERT INTO records
    (key, fingerprint, tool, state, owner, result, created_at, expires_at, entered)
    VALUES (?, ?, ?, ?, ?, NULL, ?, ?, 0) ON CONFLICT (key) DO NOTHING"""

_CLAIM_FRESH_ENTERED = """INSERT INTO records
    (key, fingerprint, tool, state, owner, result, created_at, expires_at, entered)
    SELECT ?, ?, ?, ?, ?, NULL, ?, ?, 1 WHERE EXISTS (SELECT 1 FROM owners WHERE instance_id = ?
    AND released = 0 AND lease_expires_at > ?) ON CONFLICT (key) DO NOTHING"""

_MARK_ENTERED = """UPDATE records SET entered = 1 WHERE key = ? AND owner = ? AND state = ?
    AND EXISTS (SELECT 1 FROM owners WHERE instance_id = ? AND released = 0 AND lease_expires_at > ?)"""

# The result of a run no claim preceded (``record``): a fresh key is written by this one
# statement; a key with a record is read and judged.
_RECORD_FRESH = """INSERT INTO records
    (key, fingerprint, tool, state, owner, result, created_at, expires_at, entered)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1) ON CONFLICT (key) DO NOTHING"""

_RECORD_OVER = """INSERT OR REPLACE INTO records
    (key, fingerprint, tool, state, owner, result, created_at, expires_at, entered)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1)"""

# A run that outlived the TTL must not expire the moment it is recorded.
_COMPLETE = """UPDATE records SET state = ?, result = ?, expires_at = MAX(expires_at, ?)
    WHERE key = ? AND owner = ? AND state = ?"""

# The answers of a claim that wrote, or did not (immutable: shared by every call).
_CLAIMED = BeginOutcome(claimed=True, existing=None)
_CLAIMED_OVER = BeginOutcome(claimed=True, existing=None, taken_over=True)
_NOT_ENTERED = BeginOutcome(claimed=False, existing=None)

_TASK_COLUMNS = """t.task_id, t.key, t.scope, t.fingerprint, t.tool, t.state, t.owner, t.result, t.message,
    t.created_at, t.updated_at, t.created_clock, t.expires_at, t.ttl_s,
    o.pid, o.host, o.lease_expires_at, o.released"""
_SELECT_TASK = (
    f"SELECT {_TASK_COLUMNS} FROM tasks AS t LEFT JOIN owners AS o ON o.instance_id = t.owner WHERE "
)


@final
@attrs.frozen
class SQLiteStoreStatistics:
    """A snapshot of a :class:`SQLiteStore`'s group commit.

    Attributes:
        commits: Write transactions committed (or attempted) so far; one per flush.
        writes: Writes carried by those transactions.
        largest_batch: The most writes one transaction carried.
        queued: Writes waiting for the next flush right now.
        inline_claims: Claims, entered marks and releases committed on the event loop's thread,
            outside the queue.
        inline_results: Results committed (fsynced) on the event loop's thread, outside the
            queue (see :meth:`SQLiteStore.complete_now`).
    """

    commits: int
    writes: int
    largest_batch: int
    queued: int
    inline_claims: int
    inline_results: int = 0


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
    of concurrent writes, not per write. A result committed on the event loop's thread
    (:meth:`complete_now`) is fsynced (``FULL``) just the same before it returns.

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

    Transfers (:class:`~rmcp_actors.stores.BlobStore`) live in two tables: ``transfers``, one
    row per transfer, and ``chunks``, one row per chunk with its bytes. A chunk, an open and a
    seal are committed as a claim is (see ``fsync_claims``): in the WAL when the method returns,
    so a crash of any process keeps them, and fsynced by the next FULL commit, such as the
    ``complete`` whose result names the chunks. An upload chunk that a power loss took is
    missing, never wrong: the server answers ``transfer_incomplete`` and the client sends it
    again.

    Args:
        path: The database file; created with its schema if absent, readable by its owner
            only (mode 0600, as its -wal and -shm files).
        ttl_s: How long a record lives, counted from its creation.
        clock: The time source for expiries and leases, in seconds since the epoch;
            ``time.time`` by default, a wall clock because several processes share the file.
            Also read in the store's worker threads.
        busy_timeout_s: How long a transaction waits for another process's write lock.
        fsync_claims: Fsync every claim and entered mark as well (at-most-once across a power
            loss, at the price of two more fsyncs per call when calls are sequential), and
            every transfer chunk.
        max_blob_bytes: The most bytes of transfer chunks the file holds at once, counted
            over every process sharing it; 1 GiB by default.
        upload_ttl_s: How long an upload (a transfer without a key) lives after it was last
            opened; an hour by default.

    Failures of SQLite itself (a locked or unwritable file, a full disk) are raised as
    :class:`~rmcp_actors.RMCPStoreError`, with the ``sqlite3`` error as ``__cause__``.

    Raises:
        RMCPConfigError: When ``ttl_s``, ``max_blob_bytes`` or ``upload_ttl_s`` is not
            positive, or ``busy_timeout_s`` is negative.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        ttl_s: float = 86_400.0,
        clock: Callable[[], float] | None = None,
        busy_timeout_s: float = 10.0,
        fsync_claims: bool = False,
        max_blob_bytes: int = DEFAULT_MAX_BLOB_BYTES,
        upload_ttl_s: float = DEFAULT_UPLOAD_TTL_S,
    ) -> None:
        if not ttl_s > 0:
            raise RMCPConfigError(f"must be a positive number of seconds, got {ttl_s!r}", path="ttl_s")
        if not busy_timeout_s >= 0:
            raise RMCPConfigError(
                f"must be zero or more seconds, got {busy_timeout_s!r}", path="busy_timeout_s"
            )
        check_blob_limits(max_blob_bytes, upload_ttl_s)
        self._max_blob_bytes = max_blob_bytes
        self._upload_ttl_s = upload_ttl_s
        self._path = os.fspath(path)
        self._ttl_s = ttl_s
        self._clock = clock or time.time
        self._busy_timeout_s = busy_timeout_s
        self._fsync_claims = fsync_claims
        self._host = socket.gethostname()
        self._batch = GroupCommit(
            self._path,
            busy_timeout_s=busy_timeout_s,
            create_schema=_create_schema,
            closed_message="this SQLiteStore was closed: create a new store",
            chore=self._purge_chore,
        )
        self._next_purge_at = -math.inf
        self._inline_claims = 0
        self._inline_results = 0
        # The keys this store claimed in this process whose run has not recorded an outcome
        # yet: while another is in flight, a result waits for a group commit to share.
        self._claims: set[str] = set()

    @property
    def durable(self) -> bool:
        """Always True: records are in the file, committed before a write returns."""
        return True

    @property
    def ttl_s(self) -> float:
        """How long a record lives, counted from its creation."""
        return self._ttl_s

    def statistics(self) -> SQLiteStoreStatistics:
        """Return a snapshot of the group commit counters."""
        return SQLiteStoreStatistics(
            commits=self._batch.commits,
            writes=self._batch.writes,
            largest_batch=self._batch.largest_batch,
            queued=self._batch.queued,
            inline_claims=self._inline_claims,
            inline_results=self._inline_results,
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

    async def begin(
        self, key: str, *, fingerprint: str, tool: str, owner: str, entered: bool = False
    ) -> BeginOutcome:
        """Claim ``key`` as ``STARTED`` by ``owner``, unless a live record exists; with
        ``entered``, claimed already entered, unless ``owner``'s lease lapsed (or it was
        released): then nothing is written and ``existing`` is None.

        Atomic across processes: the check and the claim run in one write transaction.
        Committed as ``fsync_claims`` says, inline when the database is free right now.
        """
        outcome = self.begin_now(key, fingerprint=fingerprint, tool=tool, owner=owner, entered=entered)
        if outcome is None:
            apply = functools.partial(self._begin, key, fingerprint, tool, owner, entered, None)
            try:
                outcome = await self._write(apply, operation="begin", sync=self._fsync_claims)
            except BaseException:
                # A claim that failed to commit, or whose caller left, is not in flight here.
                self._claims.discard(key)
                raise
        return outcome

    def begin_now(
        self, key: str, *, fingerprint: str, tool: str, owner: str, entered: bool = False
    ) -> BeginOutcome | None:
        """:meth:`begin`, committed here and now on the event loop's thread (in the WAL, as a
        claim always is); None, changing nothing, when that would wait: the database is busy
        (a flush of this store, another connection's write lock), ``fsync_claims`` is set, or
        a purge is due (the queued write carries it)."""
        if self._fsync_claims:
            return None
        now = self._clock()
        if now >= self._next_purge_at:
            return None
        try:
            done = self._batch.try_inline(
                lambda connection: self._begin(key, fingerprint, tool, owner, entered, now, connection)
            )
        except sqlite3.Error as error:
            self._claims.discard(key)
            raise self._store_error("begin", error) from error
        if done is None:
            return None
        self._inline_claims += 1
        return done[0]

    def _begin(
        self,
        key: str,
        fingerprint: str,
        tool: str,
        owner: str,
        entered: bool,
        now: float | None,
        connection: sqlite3.Connection,
    ) -> BeginOutcome:
        """The write of :meth:`begin`; ``now`` None reads the clock under the write lock (a
        queued claim must not judge a lease by when it was queued)."""
        if now is None:
            now = self._clock()
        expires_at = now + self._ttl_s
        # A fresh key, the common case, is claimed by one statement (entered, only while the
        # owner's lease holds); a key with a record, or a refused mark, is read and judged.
        claim = (key, fingerprint, tool, _STARTED, owner, now, expires_at)
        if entered:
            fresh = connection.execute(_CLAIM_FRESH_ENTERED, (*claim, owner, now))
        else:
            fresh = connection.execute(_CLAIM_FRESH, claim)
        if fresh.rowcount == 1:
            # Counted here, under the write lock, rather than when the caller resumes: the
            # claims of one batch all count before the first of their runs records its result.
            self._claims.add(key)
            return _CLAIMED
        row = connection.execute(_SELECT_RECORD, (key,)).fetchone()
        existing = None if row is None else self._live_record(row, now)
        if existing is not None and not _claimable(existing, fingerprint, owner):
            return BeginOutcome(claimed=False, existing=existing)
        if entered and not _lease_held(connection, owner, now):
            return _NOT_ENTERED
        # The read above and this write are one transaction under the write lock: of two
        # processes taking over one abandoned claim, the second sees the first's.
        connection.execute(_INSERT_CLAIM, (key, fingerprint, tool, _STARTED, owner, now, expires_at, entered))
        self._claims.add(key)
        return _CLAIMED_OVER if existing is not None else _CLAIMED

    async def abort(
        self,
        key: str,
        *,
        fingerprint: str,
        tool: str,
        owner: str,
        in_doubt: bool = False,
        doubted_owner: str | None = None,
    ) -> BeginOutcome:
        """Record ``key`` as ``ABORTED`` (never run, never to run) where :meth:`begin` would
        claim it, or, with ``in_doubt``, over an in-doubt record of this ``fingerprint``.

        Atomic across processes, and committed to disk (fsynced) before it returns: a tombstone
        that a crash lost would let a late original run a step its transaction already undid.
        """
        now = self._clock()

        def apply(connection: sqlite3.Connection) -> BeginOutcome:
            row = connection.execute(_SELECT_RECORD, (key,)).fetchone()
            existing = None if row is None else self._live_record(row, now)
            if existing is not None and not (
                existing.fingerprint == fingerprint
                and (
                    (
                        existing.state is RecordState.STARTED
                        and not existing.entered
                        and (existing.owner == owner or not existing.owner_alive)
                    )
                    or (
                        in_doubt
                        and doubted_owner in (None, existing.owner)
                        and (
                            existing.in_doubt
                            or (
                                existing.state is RecordState.STARTED
                                and existing.entered
                                and existing.owner == owner
                            )
                        )
                    )
                )
            ):
                return BeginOutcome(claimed=False, existing=existing)
            connection.execute(
                """INSERT OR REPLACE INTO records
                (key, fingerprint, tool, state, owner, result, created_at, expires_at, entered)
                VALUES (?, ?, ?, ?, ?, NULL, ?, ?, 0)""",
                (key, fingerprint, tool, RecordState.ABORTED.value, owner, now, now + self._ttl_s),
            )
            return BeginOutcome(claimed=True, existing=None, taken_over=existing is not None)

        return await self._write(apply, operation="abort")

    async def record(
        self, key: str, *, fingerprint: str, tool: str, owner: str, result: bytes
    ) -> DedupRecord | None:
        """Write ``key`` as ``COMPLETED`` with ``result``, unclaimed, where :meth:`begin` would
        claim it (None); else return the live record, changing nothing.

        One write transaction, atomic across processes, committed to disk (``FULL``) once this
        returns: inline when :meth:`record_now` can, else in a group commit.
        """
        found = self.record_now(key, fingerprint=fingerprint, tool=tool, owner=owner, result=result)
        if found is not _WOULD_WAIT:
            return found
        apply = functools.partial(self._record, key, fingerprint, tool, owner, result, None)
        return await self._write(apply, operation="record")

    def record_now(
        self, key: str, *, fingerprint: str, tool: str, owner: str, result: bytes
    ) -> DedupRecord | WouldWait | None:
        """:meth:`record`, committed (fsynced) here and now on the event loop's thread, when
        :meth:`complete_now` would commit a result so (and no claim of this store is in flight
        in this process, whose result could share a group commit); else ``WOULD_WAIT``, changing
        nothing."""
        if self._claims:
            return _WOULD_WAIT
        now = self._clock()
        if now >= self._next_purge_at:
            return _WOULD_WAIT
        apply = functools.partial(self._record, key, fingerprint, tool, owner, result, now)
        try:
            done = self._batch.try_inline(apply, sync=True)
        except sqlite3.Error as error:
            raise self._store_error("record", error) from error
        if done is None:
            return _WOULD_WAIT
        self._inline_results += 1
        return done[0]

    def _record(
        self,
        key: str,
        fingerprint: str,
        tool: str,
        owner: str,
        result: bytes,
        now: float | None,
        connection: sqlite3.Connection,
    ) -> DedupRecord | None:
        """The write of :meth:`record`; ``now`` None reads the clock under the write lock."""
        if now is None:
            now = self._clock()
        written = (key, fingerprint, tool, _COMPLETED, owner, result, now, now + self._ttl_s)
        if connection.execute(_RECORD_FRESH, written).rowcount == 1:
            return None
        row = connection.execute(_SELECT_RECORD, (key,)).fetchone()
        existing = None if row is None else self._live_record(row, now)
        if existing is not None and not _claimable(existing, fingerprint, owner):
            return existing
        connection.execute(_RECORD_OVER, written)
        return None

    async def mark_entered(self, key: str, *, owner: str) -> bool:
        """Mark the claim of ``key`` by ``owner`` as entered; False when it is not ``STARTED``
        by ``owner`` (taken over) or ``owner``'s lease lapsed: the tool must not be called then.

        Committed as a claim is (``fsync_claims``), inline when the database is free: a crash
        of any process keeps it.
        """
        entered = self.mark_entered_now(key, owner=owner)
        if entered is None:
            apply = functools.partial(self._mark_entered, key, owner)
            try:
                entered = await self._write(apply, operation="mark_entered", sync=self._fsync_claims)
            except BaseException:
                # The server runs no claim whose entered mark failed: not in flight.
                self._claims.discard(key)
                raise
            if not entered:
                self._claims.discard(key)
        return entered

    def mark_entered_now(self, key: str, *, owner: str) -> bool | None:
        """:meth:`mark_entered`, committed here and now (see :meth:`begin_now`); None when
        that would wait."""
        if self._fsync_claims or self._clock() >= self._next_purge_at:
            return None
        try:
            done = self._batch.try_inline(functools.partial(self._mark_entered, key, owner))
        except sqlite3.Error as error:
            self._claims.discard(key)
            raise self._store_error("mark_entered", error) from error
        if done is None:
            return None
        self._inline_claims += 1
        if not done[0]:
            self._claims.discard(key)
        return done[0]

    def _mark_entered(self, key: str, owner: str, connection: sqlite3.Connection) -> bool:
        # An owner past its lease reads as gone: entered now, its claim would be in doubt at
        # once, and a reconciler finding no effect yet would let another claimant run it too.
        # The time is read under the write lock: a mark that waited for it (behind the
        # owner's renewals, maybe) must not judge the lease by when it was queued.
        now = self._clock()
        return connection.execute(_MARK_ENTERED, (key, owner, _STARTED, owner, now)).rowcount == 1

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

        settled = await self._write(apply, operation="resolve_in_doubt")
        if settled and result is None:
            self._claims.add(key)
        return settled

    async def create_task(self, task: TaskRecord, *, ttl_s: float) -> TaskCreation:
        """Write ``task`` unless its key is held by a live task, which is returned instead.

        Atomic across processes, and committed to disk before it returns: the handle a client
        receives must resolve on every instance sharing the file, after any crash.
        """
        now = self._clock()

        def apply(connection: sqlite3.Connection) -> TaskCreation:
            if task.key is not None:
                for row in connection.execute(_SELECT_TASK + "t.key = ?", (task.key,)).fetchall():
                    existing = self._live_task(row, now)
                    if existing is not None:
                        return TaskCreation(created=False, task=existing)
                # Expired holders of the key go now: the key's live task must be unique.
                connection.execute("DELETE FROM tasks WHERE key = ?", (task.key,))
            connection.execute(
                """INSERT INTO tasks (task_id, key, scope, fingerprint, tool, state, owner, result, message,
                created_at, updated_at, created_clock, expires_at, ttl_s)
                VALUES (?, ?, ?, ?, ?, ?, ?, NULL, NULL, ?, ?, ?, ?, ?)""",
                (
                    task.task_id,
                    task.key,
                    task.scope,
                    task.fingerprint,
                    task.tool,
                    TaskState.WORKING.value,
                    task.owner,
                    task.created_at,
                    task.updated_at,
                    now,
                    now + ttl_s,
                    ttl_s,
                ),
            )
            row = connection.execute(_SELECT_TASK + "t.task_id = ?", (task.task_id,)).fetchone()
            return TaskCreation(created=True, task=self._task(row, now))

        return await self._write(apply, operation="create_task")

    async def get_task(self, task_id: str) -> TaskRecord | None:
        """Return the live task ``task_id``, or None. A read: changes nothing."""
        now = self._clock()

        def read(connection: sqlite3.Connection) -> TaskRecord | None:
            row = connection.execute(_SELECT_TASK + "t.task_id = ?", (task_id,)).fetchone()
            return None if row is None else self._live_task(row, now)

        try:
            return await self._batch.read(read)
        except (sqlite3.Error, OSError) as error:
            raise self._store_error("get_task", error) from error

    async def finish_task(
        self,
        task_id: str,
        *,
        owner: str,
        state: TaskState,
        result: bytes | None,
        message: str | None,
        updated_at: str,
    ) -> bool:
        """Record the end of ``owner``'s run of a ``WORKING`` task (committed to disk); False
        when it is no longer ``WORKING`` (cancelled) or not ``owner``'s."""
        now = self._clock()

        def apply(connection: sqlite3.Connection) -> bool:
            return (
                connection.execute(
                    """UPDATE tasks SET state = ?2, result = ?3, message = ?4, updated_at = ?5,
                    expires_at = CASE WHEN expires_at > ?1 THEN expires_at ELSE ?1 + ttl_s END
                    WHERE task_id = ?6 AND owner = ?7 AND state = ?8""",
                    (now, state.value, result, message, updated_at, task_id, owner, TaskState.WORKING.value),
                ).rowcount
                == 1
            )

        return await self._write(apply, operation="finish_task")

    async def cancel_task(self, task_id: str, *, message: str, updated_at: str) -> TaskRecord | None:
        """Mark a ``WORKING`` task ``CANCELLED`` (committed to disk); return it as it stands."""
        now = self._clock()

        def apply(connection: sqlite3.Connection) -> TaskRecord | None:
            row = connection.execute(_SELECT_TASK + "t.task_id = ?", (task_id,)).fetchone()
            task = None if row is None else self._live_task(row, now)
            if task is None or task.state is not TaskState.WORKING:
                return task
            connection.execute(
                "UPDATE tasks SET state = ?, message = ?, updated_at = ? WHERE task_id = ?",
                (TaskState.CANCELLED.value, message, updated_at, task_id),
            )
            return attrs.evolve(task, state=TaskState.CANCELLED, message=message, updated_at=updated_at)

        return await self._write(apply, operation="cancel_task")

    async def list_tasks(self, scope: str, *, offset: int, limit: int) -> list[TaskRecord]:
        """The live tasks of ``scope``, oldest first, from ``offset``, at most ``limit``."""
        now = self._clock()

        def read(connection: sqlite3.Connection) -> list[TaskRecord]:
            rows = connection.execute(
                _SELECT_TASK + "t.scope = ? ORDER BY t.created_clock, t.task_id", (scope,)
            ).fetchall()
            live = [task for task in (self._live_task(row, now) for row in rows) if task is not None]
            return live[offset : offset + limit]

        try:
            return await self._batch.read(read)
        except (sqlite3.Error, OSError) as error:
            raise self._store_error("list_tasks", error) from error

    def _live_task(self, row: tuple[Any, ...], now: float) -> TaskRecord | None:
        """The task of ``row``, or None when it expired (a run whose owner is alive never does)."""
        task = self._task(row, now)
        if task.expires_at > now or (task.state is TaskState.WORKING and task.owner_alive):
            return task
        return None

    def _task(self, row: tuple[Any, ...], now: float) -> TaskRecord:
        (task_id, key, scope, fingerprint, tool, state, owner, result, message) = row[:9]
        created_at, updated_at, created_clock, expires_at, ttl_s = row[9:14]
        return TaskRecord(
            task_id=task_id,
            key=key,
            scope=scope,
            fingerprint=fingerprint,
            tool=tool,
            state=TaskState(state),
            owner=owner,
            result=result,
            message=message,
            created_at=created_at,
            updated_at=updated_at,
            created_clock=created_clock,
            expires_at=expires_at,
            ttl_s=ttl_s,
            owner_alive=self._owner_alive(*row[14:], now=now),
        )

    def _owner_alive(
        self,
        pid: int | None,
        host: str | None,
        lease_expires_at: float | None,
        released: int | None,
        *,
        now: float,
    ) -> bool:
        return (
            pid is not None
            and not released
            and lease_expires_at is not None
            and lease_expires_at > now
            and (host != self._host or _process_exists(pid))
        )

    async def complete(self, key: str, *, owner: str, result: bytes) -> None:
        """Store the result of the run ``owner`` started; committed to disk once this returns.

        Does nothing when ``key`` is no longer ``STARTED`` by ``owner`` (it expired and was
        claimed again, or was already finished).
        """
        if self.complete_now(key, owner=owner, result=result):
            return
        self._claims.discard(key)
        # A run that outlived the TTL must not expire the moment it is recorded.
        parameters = (_COMPLETED, result, self._clock() + self._ttl_s, key, owner, _STARTED)
        await self._write(functools.partial(_execute, _COMPLETE, parameters), operation="complete")

    def complete_now(self, key: str, *, owner: str, result: bytes) -> bool:
        """:meth:`complete`, committed (fsynced) here and now on the event loop's thread; False,
        changing nothing, unless that is both possible at once and cheaper than the worker
        thread.

        Possible: the database is free (no flush of this store, no other connection's write
        lock), no purge is due, and this file's fsyncs measure fast (see
        ``_sqlite_batch._INLINE_FSYNC_BUDGET_S``: the loop blocks for the fsync). Cheaper: no
        other claim of this store is in flight in this process, so no other write is likely
        to share the fsync of a group commit; with others in flight, the group commit pays one
        fsync and one thread hop for the lot.
        """
        claims = self._claims
        if len(claims) > 1 or (claims and key not in claims):
            return False
        now = self._clock()
        if now >= self._next_purge_at:
            return False
        parameters = (_COMPLETED, result, now + self._ttl_s, key, owner, _STARTED)
        try:
            done = self._batch.try_inline(functools.partial(_execute, _COMPLETE, parameters), sync=True)
        except sqlite3.Error as error:
            raise self._store_error("complete", error) from error
        if done is None:
            return False
        self._inline_results += 1
        claims.discard(key)
        return True

    async def mark_in_doubt(self, key: str, *, owner: str) -> None:
        """Record that the run ``owner`` started was cut short; no-op unless it is ``STARTED``."""
        self._claims.discard(key)
        expires_at = self._clock() + self._ttl_s
        await self._finish(
            "mark_in_doubt",
            """UPDATE records SET state = ?, expires_at = MAX(expires_at, ?)
            WHERE key = ? AND owner = ? AND state = ?""",
            (RecordState.IN_DOUBT.value, expires_at, key, owner, RecordState.STARTED.value),
        )

    async def release(self, key: str, *, owner: str) -> bool:
        """Delete the ``STARTED`` record of ``key`` claimed by ``owner`` (its tool refused and
        did nothing); False, changing nothing, unless it is ``STARTED`` by ``owner``.

        One statement, atomic across processes. Committed as the claim it undoes was (see
        ``fsync_claims``): a release lost in a crash leaves the entered claim of a gone owner,
        which reads in doubt, never as run.
        """

        self._claims.discard(key)

        def apply(connection: sqlite3.Connection) -> bool:
            deleted = connection.execute(
                "DELETE FROM records WHERE key = ? AND owner = ? AND state = ?",
                (key, owner, RecordState.STARTED.value),
            )
            return deleted.rowcount == 1

        done = None
        if not self._fsync_claims and self._clock() < self._next_purge_at:
            try:
                done = self._batch.try_inline(apply)
            except sqlite3.Error as error:
                raise self._store_error("release", error) from error
        if done is not None:
            self._inline_claims += 1
            return done[0]
        return await self._write(apply, operation="release", sync=self._fsync_claims)

    async def get(self, key: str) -> DedupRecord | None:
        """Return the live record of ``key``, or None when absent or expired."""
        now = self._clock()

        def read(connection: sqlite3.Connection) -> DedupRecord | None:
            row = connection.execute(_SELECT_RECORD, (key,)).fetchone()
            return None if row is None else self._live_record(row, now)

        try:
            return await self._batch.read(read)
        except (sqlite3.Error, OSError) as error:
            raise self._store_error("get", error) from error

    def get_now(self, key: str) -> DedupRecord | WouldWait | None:
        """:meth:`get`, read here and now on the event loop's thread (a read never waits for
        a writer in WAL mode); ``WOULD_WAIT`` before the store's first write opened the file,
        or when SQLite reports it busy."""
        now = self._clock()

        def read(connection: sqlite3.Connection) -> DedupRecord | None:
            rows = connection.execute(_SELECT_RECORD, (key,)).fetchall()
            return self._live_record(rows[0], now) if rows else None

        try:
            done = self._batch.try_read_inline(read)
        except sqlite3.Error as error:
            raise self._store_error("get", error) from error
        return _WOULD_WAIT if done is None else done[0]

    async def purge_expired(self) -> int:
        """Delete expired records and tasks, transfers past their lifetime (a result's once its
        key has no record or task, an upload's ``upload_ttl_s`` after it was last opened) with their
        chunks, and owners whose lease ended more than ``ttl_s`` ago and that have no records
        left; return how many records, tasks and transfers were deleted.

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
        await self._batch.aclose()

    async def open_transfer(
        self, handle: TransferHandle, *, key: str | None, scope: str, sealed: bool
    ) -> list[int]:
        """Create transfer ``handle.id``, or find it, and return the indices of its chunks held.

        Opening a sealed transfer again with the same layout resumes it (an upload's lifetime
        starts over). An unsealed one is the output of a run cut short: opening it again starts
        it over, without its chunks, since a new run may produce other bytes. Atomic across
        processes.

        Raises:
            TransferConflict: The id is held, sealed, with another layout, or by another scope.
            RMCPStoreError: A sealed ``handle`` alone is larger than ``max_blob_bytes``.
        """
        now = self._clock()
        expires_at = now + self._upload_ttl_s if key is None else None

        def apply(connection: sqlite3.Connection) -> list[int]:
            row = connection.execute(
                "SELECT handle, scope, sealed, key, expires_at FROM transfers WHERE id = ?", (handle.id,)
            ).fetchone()
            if row is not None and _upload_expired(row[3], row[4], now):
                _delete_transfer(connection, handle.id)
                row = None
            if row is not None:
                held, held_scope, held_sealed = _HANDLE_DECODER.decode(row[0]), row[1], row[2]
                if held_scope != scope:
                    raise TransferConflict(f"transfer {handle.id!r} belongs to another scope")
                if held_sealed:
                    if not same_layout(held, handle):
                        raise TransferConflict(f"transfer {handle.id!r} is held with another layout")
                    if row[3] is None:
                        connection.execute(
                            "UPDATE transfers SET expires_at = ? WHERE id = ?", (expires_at, handle.id)
                        )
                    return [
                        index
                        for (index,) in connection.execute(
                            "SELECT idx FROM chunks WHERE transfer_id = ? ORDER BY idx", (handle.id,)
                        )
                    ]
                _delete_transfer(connection, handle.id)
            if sealed and handle.size > self._max_blob_bytes:
                raise blob_cap_error(
                    "open_transfer", _blob_bytes(connection), handle.size, self._max_blob_bytes
                )
            connection.execute(
                """INSERT INTO transfers (id, handle, key, scope, sealed, created_at, expires_at)
                VALUES (?, ?, ?, ?, ?, ?, ?)""",
                (handle.id, _HANDLE_ENCODER.encode(handle), key, scope, sealed, now, expires_at),
            )
            return []

        return await self._write(apply, operation="open_transfer", sync=self._fsync_claims)

    async def write_chunk(self, transfer_id: str, index: int, data: bytes) -> None:
        """Store chunk ``index`` as its own row; the first bytes written for an index stay (the
        caller verified them against the handle, so a second write carries the same ones).
        In the WAL when this returns (see the class docstring).

        Raises:
            TransferConflict: The store does not hold the transfer (never opened, expired).
            RMCPStoreError: The chunk would take the file past ``max_blob_bytes``.
        """
        now = self._clock()

        def apply(connection: sqlite3.Connection) -> None:
            row = connection.execute(
                "SELECT key, expires_at FROM transfers WHERE id = ?", (transfer_id,)
            ).fetchone()
            if row is None or _upload_expired(row[0], row[1], now):
                raise unknown_transfer(transfer_id)
            if connection.execute(
                "SELECT 1 FROM chunks WHERE transfer_id = ? AND idx = ?", (transfer_id, index)
            ).fetchone():
                return
            held = _blob_bytes(connection)
            if held + len(data) > self._max_blob_bytes and _purge_transfers(connection, now):
                # Room held by dead transfers is not a reason to refuse (the error below would
                # roll this purge back with the write: the next one redoes it).
                held = _blob_bytes(connection)
            if held + len(data) > self._max_blob_bytes:
                raise blob_cap_error("write_chunk", held, len(data), self._max_blob_bytes)
            connection.execute(
                "INSERT INTO chunks (transfer_id, idx, data) VALUES (?, ?, ?)", (transfer_id, index, data)
            )
            connection.execute(
                "UPDATE transfers SET stored_bytes = stored_bytes + ? WHERE id = ?", (len(data), transfer_id)
            )

        await self._write(apply, operation="write_chunk", sync=self._fsync_claims)

    async def seal_transfer(self, handle: TransferHandle) -> None:
        """Record the final layout of a result transfer; sealing it again with the same layout
        does nothing.

        Raises:
            TransferConflict: The store does not hold the transfer, or holds it sealed with
                another layout.
        """
        now = self._clock()

        def apply(connection: sqlite3.Connection) -> None:
            row = connection.execute(
                "SELECT handle, sealed, key, expires_at FROM transfers WHERE id = ?", (handle.id,)
            ).fetchone()
            if row is None or _upload_expired(row[2], row[3], now):
                raise unknown_transfer(handle.id)
            if row[1] and not same_layout(_HANDLE_DECODER.decode(row[0]), handle):
                raise TransferConflict(f"transfer {handle.id!r} is sealed with another layout")
            connection.execute(
                "UPDATE transfers SET handle = ?, sealed = 1 WHERE id = ?",
                (_HANDLE_ENCODER.encode(handle), handle.id),
            )

        await self._write(apply, operation="seal_transfer", sync=self._fsync_claims)

    async def get_transfer(self, transfer_id: str, *, scope: str) -> TransferHandle | None:
        """The sealed handle of a transfer of ``scope``, or None. A read: changes nothing."""
        now = self._clock()

        def read(connection: sqlite3.Connection) -> bytes | None:
            row = connection.execute(
                """SELECT handle FROM transfers WHERE id = ? AND scope = ? AND sealed = 1
                AND (expires_at IS NULL OR expires_at > ?)""",
                (transfer_id, scope, now),
            ).fetchone()
            return None if row is None else row[0]

        encoded = await self._read(read, "get_transfer")
        return None if encoded is None else _HANDLE_DECODER.decode(encoded)

    async def read_chunk(self, transfer_id: str, index: int, *, scope: str) -> bytes | None:
        """Chunk ``index`` of a transfer of ``scope``, or None when not held. Read in a worker
        thread: the event loop never waits for the disk."""
        if not 0 <= index < 1 << 63:
            # Past SQLite's integers: no chunk has it (binding it would raise OverflowError).
            return None
        now = self._clock()

        def read(connection: sqlite3.Connection) -> bytes | None:
            row = connection.execute(
                """SELECT c.data FROM chunks AS c JOIN transfers AS t ON t.id = c.transfer_id
                WHERE c.transfer_id = ? AND c.idx = ? AND t.scope = ?
                AND (t.expires_at IS NULL OR t.expires_at > ?)""",
                (transfer_id, index, scope, now),
            ).fetchone()
            return None if row is None else row[0]

        return await self._read(read, "read_chunk")

    async def delete_transfer(self, transfer_id: str) -> None:
        """Forget a transfer and its chunks, freeing their bytes; an unknown id is no error."""
        await self._write(
            lambda connection: _delete_transfer(connection, transfer_id),
            operation="delete_transfer",
            sync=self._fsync_claims,
        )

    async def _read(self, query: Callable[[sqlite3.Connection], _T], operation: str) -> _T:
        try:
            return await self._batch.read(query)
        except (sqlite3.Error, OSError) as error:
            raise self._store_error(operation, error) from error

    async def _finish(self, operation: str, statement: str, parameters: tuple[object, ...]) -> None:
        def apply(connection: sqlite3.Connection) -> None:
            connection.execute(statement, parameters)

        await self._write(apply, operation=operation)

    async def _write(
        self, apply: Callable[[sqlite3.Connection], _T], *, operation: str, sync: bool = True
    ) -> _T:
        try:
            return await self._batch.write(apply, sync=sync)
        except (sqlite3.Error, OSError) as error:
            # OSError: the file could not be created.
            raise self._store_error(operation, error) from error

    def _store_error(self, operation: str, error: Exception) -> RMCPStoreError:
        return failure(f"the SQLite store {self._path}", operation, error)

    def _purge_chore(self) -> Chore | None:
        """The purge a flush carries, at most once a minute, while expired records remain."""
        now = self._clock()
        if now < self._next_purge_at:
            return None
        # Until the flush tells that the backlog is gone, the next one purges too.
        self._next_purge_at = now

        def committed(purged: object) -> None:
            # A purge that failed (None) was rolled back alone: retried a minute later.
            if cast(int, purged or 0) < _PURGE_BATCH:
                self._next_purge_at = now + _PURGE_INTERVAL_S

        return Chore(functools.partial(self._purge, now=now), committed)

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
        deleted += connection.execute(
            """DELETE FROM tasks WHERE rowid IN (SELECT rowid FROM tasks
            WHERE expires_at <= ? AND (state != ? OR owner NOT IN
            (SELECT instance_id FROM owners WHERE released = 0 AND lease_expires_at > ?))
            LIMIT ?)""",
            (now, TaskState.WORKING.value, now, _PURGE_BATCH),
        ).rowcount
        # After the records and tasks, which the transfers of results outlive.
        deleted += _purge_transfers(connection, now)
        # An owner kept a while after its lease may still renew (a long pause, not a crash), and
        # a released one must stay known as released to a late renewal.
        connection.execute(
            """DELETE FROM owners
            WHERE lease_expires_at <= ?
            AND NOT EXISTS (SELECT 1 FROM records WHERE records.owner = owners.instance_id)
            AND NOT EXISTS (SELECT 1 FROM tasks WHERE tasks.owner = owners.instance_id)""",
            (now - self._ttl_s,),
        )
        return deleted

    def _live_record(self, row: tuple[Any, ...], now: float) -> DedupRecord | None:
        """The record of ``row``, or None when it expired. A run whose owner is alive never
        expires: another caller claiming its key would run the tool a second time."""
        record = self._to_record(row, now)
        if record.expires_at > now or (record.state is RecordState.STARTED and record.owner_alive):
            return record
        return None

    def _to_record(self, row: tuple[Any, ...], now: float) -> DedupRecord:
        key, fingerprint, tool, state, owner, result, created_at, expires_at, entered = row[:9]
        return DedupRecord(
            key=key,
            fingerprint=fingerprint,
            tool=tool,
            state=RecordState(state),
            owner=owner,
            owner_alive=self._owner_alive(*row[9:], now=now),
            result=result,
            created_at=created_at,
            expires_at=expires_at,
            entered=bool(entered),
        )


def _claimable(existing: DedupRecord, fingerprint: str, owner: str) -> bool:
    """Whether a claim (or an unclaimed record) of ``owner`` may replace the live ``existing``:
    a claim of the same call that never entered its tool, by ``owner`` itself or by an owner
    that is gone."""
    return (
        existing.state is RecordState.STARTED
        and not existing.entered
        and existing.fingerprint == fingerprint
        and (existing.owner == owner or not existing.owner_alive)
    )


def _execute(statement: str, parameters: tuple[object, ...], connection: sqlite3.Connection) -> None:
    connection.execute(statement, parameters)


def _upload_expired(key: str | None, expires_at: float | None, now: float) -> bool:
    """Whether a transfer row is an upload past its lifetime (a result has no expiry of its own)."""
    return key is None and expires_at is not None and expires_at <= now


def _blob_bytes(connection: sqlite3.Connection) -> int:
    """The bytes of chunks the file holds, over every transfer (expired ones until purged)."""
    return connection.execute("SELECT COALESCE(SUM(stored_bytes), 0) FROM transfers").fetchone()[0]


def _purge_transfers(connection: sqlite3.Connection, now: float) -> int:
    """Delete one batch of transfers past their lifetime: uploads past their expiry, results
    whose key has neither a record nor a task (an unsealed one left by a crashed run goes with
    the record that run left, in doubt or released); return how many."""
    gone = [
        row[0]
        for row in connection.execute(
            """SELECT id FROM transfers WHERE (key IS NULL AND expires_at <= ?) OR (key IS NOT NULL
            AND NOT EXISTS (SELECT 1 FROM records WHERE records.key = transfers.key)
            AND NOT EXISTS (SELECT 1 FROM tasks WHERE tasks.task_id = transfers.key)) LIMIT ?""",
            (now, _PURGE_BATCH),
        )
    ]
    for transfer_id in gone:
        _delete_transfer(connection, transfer_id)
    return len(gone)


def _delete_transfer(connection: sqlite3.Connection, transfer_id: str) -> None:
    # secure_delete FAST for chunks: the b-tree cells are still zeroed, but not a megabyte of
    # overflow pages per chunk (SQLite builds that turn secure_delete on, such as Debian's,
    # would write the whole payload again as zeros: 0.45 s for 50 MiB, against 0.02 s).
    (previous,) = connection.execute("PRAGMA secure_delete").fetchone()
    connection.execute("PRAGMA secure_delete = FAST")
    try:
        connection.execute("DELETE FROM chunks WHERE transfer_id = ?", (transfer_id,))
    finally:
        connection.execute(f"PRAGMA secure_delete = {_SECURE_DELETE[previous]}")
    connection.execute("DELETE FROM transfers WHERE id = ?", (transfer_id,))


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


def _lease_held(connection: sqlite3.Connection, owner: str, now: float) -> bool:
    """Whether ``owner`` holds a lease that has not lapsed and was not released: the check
    :meth:`SQLiteStore.mark_entered` makes, read under the same write lock as the claim."""
    row = connection.execute(
        "SELECT 1 FROM owners WHERE instance_id = ? AND released = 0 AND lease_expires_at > ?",
        (owner, now),
    ).fetchone()
    return row is not None
