# pyright: strict
"""Group commit over one SQLite connection: the machinery the dedup store and the journal share.

Every sqlite call that may wait runs in a worker thread (``anyio.to_thread``), one at a time
on the main connection, so the event loop never blocks on the disk or on another process's
lock; it works under trio and asyncio alike.

Writes are group-committed: with many writes in flight, one fsync per write would cap
throughput at the disk's fsync rate. So a write that finds no flush running commits at once,
alone; writes submitted while that flush runs wait in a queue, and the next flush commits the
whole queue in one ``BEGIN IMMEDIATE ... COMMIT`` transaction, each write inside its own
SAVEPOINT so that one failing write does not fail the others. The flusher is always one of the
callers: it commits one batch, then hands the role to the oldest queued caller, so no caller
works for the others for long and no background task is needed.

One exception to the worker thread: a write may be committed inline (``try_inline``), on the
event loop's thread, when the database is free right now: a few tens of microseconds of
blocking cost less than two hops to a worker thread and back. It goes through a second
connection that never waits (another writer's lock sends the write to the queue instead) and
never checkpoints (a checkpoint fsyncs): the main connection checkpoints after its commits, so
after ``_INLINE_RUN`` inline commits in a row the next write goes through the queue, and the
WAL stays bounded even when every write could have been inline. A write that needs an fsync
(``sync=True``: ``synchronous=FULL``) blocks the loop for that fsync too (~90 µs on a local
SSD), so it is done inline only while the fsyncs of this file measure fast:
``fsync_s``, a moving average of the time the FULL commits (inline and in the worker thread)
took, is at most ``_INLINE_FSYNC_BUDGET_S``.

Several processes may open the same file: every write transaction starts with ``BEGIN
IMMEDIATE`` (the database's write lock, waited for up to ``busy_timeout_s``).
"""

from __future__ import annotations

import copy
import enum
import os
import sqlite3
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar, cast, final

import anyio
import anyio.to_thread
import attrs

from ..errors import RMCPStoreClosedError, RMCPStoreError

__all__ = ["Chore", "GroupCommit", "create_private", "failure", "is_busy"]

# How long to sleep between attempts to switch a new connection to WAL.
_WAL_RETRY_S = 0.005

_T = TypeVar("_T")

#: The statement that sets a connection's synchronous mode, by whether commits must fsync.
_SYNCHRONOUS = {True: "PRAGMA synchronous = FULL", False: "PRAGMA synchronous = NORMAL"}

#: Inline commits in a row after which a write is sent to the queue, so that the main
#: connection's commit checkpoints the WAL (SQLite's autocheckpoint, past 1,000 pages): an
#: inline commit adds a few pages and never checkpoints.
_INLINE_RUN = 64

#: The slowest moving average of FULL commit times (``GroupCommit.fsync_s``) at which a write
#: that must be fsynced is still committed on the event loop's thread: 2 ms, twenty times a
#: local SSD's fsync here (~90 µs). A slower disk (a network filesystem, a saturated device)
#: sends such writes to the worker thread, so the loop never stalls for longer; commits there
#: keep measuring, and inline ones resume once the disk is fast again.
_INLINE_FSYNC_BUDGET_S = 0.002
#: The weight of the newest measurement in ``fsync_s``.
_FSYNC_WEIGHT = 0.25

#: The clock that times FULL commits (a module global, so that tests can inject slow fsyncs).
_timer = time.perf_counter


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


@attrs.frozen
class Chore:
    """Extra work a flush does at the end of its transaction, in its own savepoint (the dedup
    store's opportunistic purge): a chore that fails is rolled back alone.

    Attributes:
        apply: The work, run in the worker thread.
        committed: Called on the event loop with ``apply``'s value (None when it failed) once
            the transaction committed.
    """

    apply: Callable[[sqlite3.Connection], object]
    committed: Callable[[object], None]


@final
class GroupCommit:
    """One SQLite file's main connection and its group-commit queue.

    Raises the ``sqlite3`` (or ``OSError``, when the file cannot be created) errors as they
    are: its owner maps them to :class:`~rmcp_actors.RMCPStoreError` naming the operation.

    Args:
        path: The database file; created if absent, readable by its owner only.
        busy_timeout_s: How long a transaction waits for another process's write lock.
        create_schema: Run in the first write transaction of the connection (``IF NOT
            EXISTS`` throughout: several processes may create the schema of a fresh file).
        closed_message: The message of the ``RMCPStoreClosedError`` raised after ``aclose``.
        chore: Asked at the start of each flush for extra work to do in its transaction.
    """

    def __init__(
        self,
        path: str,
        *,
        busy_timeout_s: float,
        create_schema: Callable[[sqlite3.Connection], None],
        closed_message: str,
        chore: Callable[[], Chore | None] | None = None,
    ) -> None:
        self._path = path
        self._busy_timeout_s = busy_timeout_s
        self._create_schema = create_schema
        self._closed_message = closed_message
        self._chore = chore
        # Opened lazily, in a worker thread: opening may wait for another process's lock.
        self._connection: sqlite3.Connection | None = None
        self._synchronous: bool | None = None
        # Set by aclose(): new calls are refused, and the connection is not (re)opened.
        self._closing = False
        self._connection_closed = False
        # The connection is used by one worker thread at a time.
        self._lock = anyio.Lock()
        self._queue: list[_Write[Any]] = []
        self._flushing = False
        # The connection of inline commits, opened on first use on the event loop's thread.
        self._inline: sqlite3.Connection | None = None
        # Its synchronous setting (opened NORMAL): switched only when the next commit needs
        # the other one (a PRAGMA costs ~2.5 µs).
        self._inline_sync = False
        self._inline_run = 0
        self._fsync_s: float | None = None
        self.commits = 0
        self.writes = 0
        self.largest_batch = 0

    @property
    def queued(self) -> int:
        """Writes waiting for the next flush."""
        return len(self._queue)

    @property
    def fsync_s(self) -> float | None:
        """The moving average of how long a FULL commit (its fsync) took on this file, in
        seconds; None before the first."""
        return self._fsync_s

    @property
    def idle(self) -> bool:
        """Open, not closing, and neither flushing nor reading right now."""
        return not (self._connection is None or self._flushing or self._lock.locked() or self._closing)

    def check_open(self) -> None:
        """Raise ``RMCPStoreClosedError`` once ``aclose`` was called."""
        if self._closing:
            raise RMCPStoreClosedError(self._closed_message)

    async def write(self, apply: Callable[[sqlite3.Connection], _T], *, sync: bool = True) -> _T:
        """Run ``apply`` in the next group commit; return its value or raise its error.

        ``sync``: whether the commit must reach the disk (``synchronous=FULL``) before this
        returns, rather than the WAL only (``NORMAL``: survives a crash of the process).
        """
        self.check_open()
        return await self._submit(_Write(apply, sync=sync))

    def try_inline(
        self, apply: Callable[[sqlite3.Connection], _T], *, sync: bool = False
    ) -> tuple[_T] | None:
        """Commit ``apply`` here and now if nothing would wait: the main connection is idle and
        no other connection holds the write lock (see the module docstring). None means "not
        done": ``write`` it. A 1-tuple tells a None answer from that.

        ``sync``: commit with ``synchronous=FULL`` (fsynced when this returns), and only while
        ``fsync_s`` is within ``_INLINE_FSYNC_BUDGET_S``; else ``NORMAL``.
        """
        if not self.idle or self._inline_run >= _INLINE_RUN:
            # Not open yet (the schema may not exist), busy (the queue batches with it), or
            # time for the main connection to checkpoint.
            return None
        if sync and self._fsync_s is not None and self._fsync_s > _INLINE_FSYNC_BUDGET_S:
            return None
        connection = self._inline or self._open_inline()
        if sync is not self._inline_sync:
            # Only outside a transaction; it applies to the commits that follow.
            connection.execute(_SYNCHRONOUS[sync])
            self._inline_sync = sync
        try:
            connection.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if is_busy(exc):
                return None
            raise
        try:
            value = apply(connection)
            if sync:
                started = _timer()
                connection.execute("COMMIT")
                self._measured(_timer() - started)
            else:
                connection.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise
        self._inline_run += 1
        return (value,)

    def try_read_inline(self, query: Callable[[sqlite3.Connection], _T]) -> tuple[_T] | None:
        """Run ``query`` here and now on the inline connection, outside any transaction (a
        reader in WAL mode waits for no writer); None when that is not possible: the file is
        not open yet (its schema may not exist), the store is closing, or SQLite reports the
        database busy (it may, briefly, during another connection's WAL recovery). ``query``
        must exhaust its statements, so that no read transaction stays open."""
        if self._connection is None or self._closing:
            return None
        connection = self._inline or self._open_inline()
        try:
            return (query(connection),)
        except sqlite3.OperationalError as exc:
            if is_busy(exc):
                return None
            raise

    def _measured(self, seconds: float) -> None:
        """Fold the time one FULL commit took into ``fsync_s``."""
        previous = self._fsync_s
        self._fsync_s = seconds if previous is None else previous + _FSYNC_WEIGHT * (seconds - previous)

    async def read(self, query: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``query`` on the connection in a worker thread, outside any write."""
        self.check_open()
        async with self._lock:
            return await anyio.to_thread.run_sync(lambda: query(self._open_connection()))

    async def aclose(self) -> None:
        """Commit the writes already queued, then close the connections. Closing twice is
        harmless."""
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
            chore = None if self._chore is None else self._chore()
            self._inline_run = 0
            self.commits += 1
            self.writes += len(batch)
            self.largest_batch = max(self.largest_batch, len(batch))
            try:
                async with self._lock:
                    answers, chore_value, fsync_s = await anyio.to_thread.run_sync(
                        self._commit_batch, batch, chore
                    )
                if fsync_s is not None:
                    self._measured(fsync_s)
                if chore is not None:
                    chore.committed(chore_value)
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
        self, batch: list[_Write[Any]], chore: Chore | None
    ) -> tuple[list[tuple[object, Exception | None]], object, float | None]:
        """Run in a worker thread: apply every write in one transaction, each in a savepoint;
        return their answers, the chore's value and, for a FULL commit, how long it took."""
        connection = self._open_connection()
        sync = any(write.sync for write in batch)
        if sync is not self._synchronous:
            # Only outside a transaction; it applies to the commits that follow.
            connection.execute(_SYNCHRONOUS[sync])
            self._synchronous = sync
        connection.execute("BEGIN IMMEDIATE")
        chore_value: object = None
        fsync_s = None
        try:
            if len(batch) == 1 and chore is None:
                # Nothing to keep from a failure: its own rollback is the transaction's
                # (two statements fewer than a savepoint).
                answers = [_apply_alone(connection, batch[0].apply)]
                if answers[0][1] is not None:
                    return answers, None, None
            else:
                answers = [_apply_in_savepoint(connection, write.apply) for write in batch]
            if chore is not None:
                chore_value, _error = _apply_in_savepoint(connection, chore.apply)
            if sync:
                started = _timer()
                connection.execute("COMMIT")
                fsync_s = _timer() - started
            else:
                connection.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise
        return answers, chore_value, fsync_s

    def _open_connection(self) -> sqlite3.Connection:
        """Run in a worker thread: the connection, opened and the schema created on first use."""
        if self._connection_closed:
            raise RMCPStoreClosedError(self._closed_message)
        if self._connection is not None:
            return self._connection
        create_private(self._path)
        connection = sqlite3.connect(
            self._path,
            timeout=self._busy_timeout_s,
            # Autocommit mode: transactions are only the explicit BEGIN IMMEDIATE ones.
            isolation_level=None,
            check_same_thread=False,
        )
        try:
            self._enter_wal(connection)
            connection.execute(_SYNCHRONOUS[True])
            self._synchronous = True
            connection.execute("BEGIN IMMEDIATE")
            self._create_schema(connection)
            connection.execute("COMMIT")
        except BaseException:
            connection.close()
            raise
        self._connection = connection
        return connection

    def _enter_wal(self, connection: sqlite3.Connection) -> None:
        """Switch ``connection`` to WAL, waiting up to ``busy_timeout_s`` for other connections.

        SQLite does not call the busy handler for this switch while another connection of a
        fresh file is creating it (``database is locked`` at once, about one race in seven in
        tests/test_stores.py), so the wait is done here; this runs in a worker thread."""
        give_up_at = time.monotonic() + self._busy_timeout_s
        while True:
            try:
                connection.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as exc:
                if not is_busy(exc) or time.monotonic() >= give_up_at:
                    raise
            time.sleep(_WAL_RETRY_S)

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


def _apply_alone(
    connection: sqlite3.Connection, apply: Callable[[sqlite3.Connection], object]
) -> tuple[object, Exception | None]:
    """Apply the one write of a transaction; on error roll the transaction back and return
    the error."""
    try:
        return apply(connection), None
    except Exception as exc:
        if not connection.in_transaction:
            # SQLite rolled the transaction back itself (disk full, I/O error): raised as the
            # failure of the batch, as in a savepoint.
            raise
        connection.execute("ROLLBACK")
        return None, exc


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


def create_private(path: str) -> None:
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


def failure(what: str, operation: str, error: Exception) -> RMCPStoreError:
    """The ``RMCPStoreError`` for a ``sqlite3`` (or ``OSError``) ``error`` of ``what`` (``"the
    SQLite store /path"``) in ``operation``, saying what to check."""
    return RMCPStoreError(
        f"{what} failed in {operation} ({type(error).__name__}: {error}); "
        "check that the file is writable, its disk not full, and no process holds its lock for long",
        operation=operation,
    )


def is_busy(error: sqlite3.Error) -> bool:
    """Whether SQLite refused because another connection holds a lock. The primary result
    code is the low byte: extended codes (``SQLITE_BUSY_SNAPSHOT`` = 517, ...) keep it."""
    return error.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _fresh_copy(exc: Exception) -> Exception:
    """A copy of ``exc`` for one waiter: one exception object raised in several tasks would
    collect all their tracebacks."""
    fresh = copy.copy(exc)
    fresh.__cause__ = exc
    return fresh
