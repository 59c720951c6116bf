# pyright: strict
"""The SQLite transaction journal: write-ahead records that survive a crash, group-committed.

Each record is one row of ``journal_records`` (its ``encode_record`` JSON, indexed by
transaction id); ``journal_transactions`` keeps one summary row per transaction, updated in
the same commit as the record, so ``summaries()`` reads a few columns instead of decoding
every record. The commit machinery is the dedup store's (``_sqlite_batch.GroupCommit``): a
worker thread at a time, WAL, ``BEGIN IMMEDIATE``, appends that arrive while a commit runs
sharing the next one, each in its own savepoint. With ``synchronous="normal"`` an append that
finds the file free commits inline on the event loop's thread instead, as the store's claims do
(``GroupCommit.try_inline``): a step's two appends were most of its cost as two round trips to
a worker thread.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Collection
from typing import Literal, final

import attrs
import msgspec

from ..errors import RMCPConfigError, RMCPStoreError
from ..transactions._model import TransactionState, TransactionSummary
from ..transactions.journal import (
    JournalRecord,
    StateChanged,
    StepIntent,
    TransactionBegun,
    decode_record,
    encode_record,
)
from ._sqlite_batch import GroupCommit, failure

__all__ = ["SQLiteJournal", "SQLiteJournalStatistics"]

#: The schema this code writes; a file with a newer one is refused rather than misread.
SCHEMA_VERSION = 1

# IF NOT EXISTS throughout: several processes may create the schema of a fresh file at once.
# The tables are prefixed so that the journal may share a file with the dedup store.
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS journal_schema (version INTEGER NOT NULL)",
    """CREATE TABLE IF NOT EXISTS journal_records (
        sequence INTEGER PRIMARY KEY AUTOINCREMENT,
        transaction_id TEXT NOT NULL,
        record BLOB NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS journal_records_by_transaction ON journal_records (transaction_id, sequence)",
    """CREATE TABLE IF NOT EXISTS journal_transactions (
        transaction_id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        state TEXT NOT NULL,
        started_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        steps INTEGER NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS journal_transactions_by_state ON journal_transactions (state, started_at)",
)

_SELECT_SUMMARIES = (
    "SELECT transaction_id, name, state, started_at, updated_at, steps FROM journal_transactions"
)


@final
@attrs.frozen
class SQLiteJournalStatistics:
    """A snapshot of a :class:`SQLiteJournal`'s group commit.

    Attributes:
        commits: Write transactions committed (or attempted) so far; one per flush.
        appends: Records carried by those transactions.
        largest_batch: The most records one transaction carried.
        queued: Records waiting for the next flush right now.
        inline_appends: Records committed on the event loop's thread, outside the queue (and
            outside ``commits`` and ``appends``).
    """

    commits: int
    appends: int
    largest_batch: int
    queued: int
    inline_appends: int = 0


@final
class SQLiteJournal:
    """A durable transaction journal in one SQLite file (WAL mode), safe to share between
    processes of a host.

    Implements :class:`~rmcp_actors.transactions.Journal`. ``append`` returns once its record
    is committed; records appended while a commit runs share the next one (group commit), so
    concurrent transactions pay one commit per batch, not one per record. With
    ``synchronous="normal"``, an append that finds the file free (no commit or read of this
    journal running, no other process writing) is committed at once on the event loop's thread,
    in a few tens of microseconds, never waiting for a lock.

    With ``synchronous="normal"`` a committed record is in the WAL file: it survives a crash
    (even a SIGKILL) of the process, not a power loss or an OS crash. ``"full"`` fsyncs each
    group commit, so records survive those too, at the disk's fsync latency per commit.

    Cancelling an ``append`` before its commit starts drops the record; once its commit has
    started, the record may be committed although the caller was cancelled (a transaction
    must treat a cancelled append of an intent as "the step may be sent"). A caller whose turn
    it is to commit others' records finishes that commit (shielded, bounded by
    ``busy_timeout_s``) before it sees its cancellation.

    Args:
        path: The journal file; created with its schema if absent, readable by its owner only
            (mode 0600, as its -wal and -shm files): records hold the tools' arguments.
        synchronous: ``"normal"`` or ``"full"`` (SQLite's ``PRAGMA synchronous``), as above.
        busy_timeout_s: How long a commit waits for another process's write lock.

    Failures of SQLite itself (a locked or unwritable file, a full disk) are raised as
    :class:`~rmcp_actors.RMCPStoreError` naming the operation, with the ``sqlite3`` error as
    ``__cause__``; calls after :meth:`aclose` raise :class:`~rmcp_actors.RMCPStoreClosedError`.

    Raises:
        RMCPConfigError: ``synchronous`` is not ``"normal"`` or ``"full"``, or
            ``busy_timeout_s`` is negative.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: Literal["normal", "full"] = "normal",
        busy_timeout_s: float = 10.0,
    ) -> None:
        if synchronous not in ("normal", "full"):
            raise RMCPConfigError(f'must be "normal" or "full", got {synchronous!r}', path="synchronous")
        if not busy_timeout_s >= 0:
            raise RMCPConfigError(
                f"must be zero or more seconds, got {busy_timeout_s!r}", path="busy_timeout_s"
            )
        self._path = os.fspath(path)
        self._sync = synchronous == "full"
        self._inline_appends = 0
        self._batch = GroupCommit(
            self._path,
            busy_timeout_s=busy_timeout_s,
            create_schema=self._create_schema,
            closed_message="this SQLiteJournal was closed: open a new one on the same file",
        )

    @property
    def durable(self) -> bool:
        """Always True: a record is in the file once ``append`` returns."""
        return True

    def statistics(self) -> SQLiteJournalStatistics:
        """Return a snapshot of the group commit counters."""
        return SQLiteJournalStatistics(
            commits=self._batch.commits,
            appends=self._batch.writes,
            largest_batch=self._batch.largest_batch,
            queued=self._batch.queued,
            inline_appends=self._inline_appends,
        )

    async def append(self, record: JournalRecord) -> None:
        """Add ``record``; committed once this returns, with the records appended meanwhile."""
        data = encode_record(record)
        transaction_id = record.transaction_id

        def apply(connection: sqlite3.Connection) -> None:
            connection.execute(
                "INSERT INTO journal_records (transaction_id, record) VALUES (?, ?)", (transaction_id, data)
            )
            _update_summary(connection, record)

        try:
            # An fsync ("full") must not block the event loop: those commits keep the worker.
            if not self._sync and self._batch.try_inline(apply) is not None:
                self._inline_appends += 1
                return
            await self._batch.write(apply, sync=self._sync)
        except (sqlite3.Error, OSError) as error:
            raise self._journal_error("append", error) from error

    async def read(self, transaction_id: str) -> list[JournalRecord]:
        """Every record of one transaction, in the order appended (empty when unknown)."""

        def query(connection: sqlite3.Connection) -> list[bytes]:
            return [
                row[0]
                for row in connection.execute(
                    "SELECT record FROM journal_records WHERE transaction_id = ? ORDER BY sequence",
                    (transaction_id,),
                )
            ]

        try:
            rows = await self._batch.read(query)
        except (sqlite3.Error, OSError) as error:
            raise self._journal_error("read", error) from error
        try:
            return [decode_record(row) for row in rows]
        except msgspec.DecodeError as error:
            raise RMCPStoreError(
                f"the SQLite journal {self._path} holds a record of transaction {transaction_id!r} "
                f"that this version cannot read ({error}); read it with the rmcp_actors version "
                "that wrote it",
                operation="read",
            ) from error

    async def summaries(self, states: Collection[TransactionState] | None = None) -> list[TransactionSummary]:
        """The transactions in ``states`` (all when ``None``), oldest first; read from the
        summary table, without decoding records."""
        wanted = None if states is None else [state.value for state in states]

        def query(connection: sqlite3.Connection) -> list[tuple[str, str, str, float, float, int]]:
            # rowid: transactions begun in the same instant stay in the order they began.
            order = " ORDER BY started_at, rowid"
            if wanted is None:
                return connection.execute(_SELECT_SUMMARIES + order).fetchall()
            if not wanted:
                return []
            placeholders = ", ".join("?" * len(wanted))
            statement = f"{_SELECT_SUMMARIES} WHERE state IN ({placeholders}){order}"
            return connection.execute(statement, wanted).fetchall()

        try:
            rows = await self._batch.read(query)
        except (sqlite3.Error, OSError) as error:
            raise self._journal_error("summaries", error) from error
        return [
            TransactionSummary(
                transaction_id=transaction_id,
                name=name,
                state=TransactionState(state),
                started_at=started_at,
                updated_at=updated_at,
                steps=steps,
            )
            for transaction_id, name, state, started_at, updated_at, steps in rows
        ]

    async def aclose(self) -> None:
        """Commit the records already queued, then close the file.

        Further calls raise :class:`~rmcp_actors.RMCPStoreClosedError`. Closing twice is harmless.
        """
        await self._batch.aclose()

    def _create_schema(self, connection: sqlite3.Connection) -> None:
        for statement in _SCHEMA:
            connection.execute(statement)
        row = connection.execute("SELECT MAX(version) FROM journal_schema").fetchone()
        if row[0] is None:
            connection.execute("INSERT INTO journal_schema (version) VALUES (?)", (SCHEMA_VERSION,))
        elif row[0] > SCHEMA_VERSION:
            raise RMCPStoreError(
                f"the SQLite journal {self._path} has schema version {row[0]}, newer than this "
                f"rmcp_actors understands ({SCHEMA_VERSION}): upgrade rmcp_actors, or use another file",
                operation="open",
            )

    def _journal_error(self, operation: str, error: Exception) -> RMCPStoreError:
        return failure(f"the SQLite journal {self._path}", operation, error)


def _update_summary(connection: sqlite3.Connection, record: JournalRecord) -> None:
    """Keep ``journal_transactions`` as ``summarize()`` would compute it from the records."""
    if isinstance(record, TransactionBegun):
        # A transaction's first TransactionBegun names it (as in summarize()).
        connection.execute(
            """INSERT INTO journal_transactions (transaction_id, name, state, started_at, updated_at, steps)
            VALUES (?, ?, ?, ?, ?, 0)
            ON CONFLICT (transaction_id) DO UPDATE SET updated_at = excluded.updated_at""",
            (record.transaction_id, record.name, TransactionState.INITIATED.value, record.at, record.at),
        )
    elif isinstance(record, StateChanged):
        connection.execute(
            "UPDATE journal_transactions SET state = ?, updated_at = ? WHERE transaction_id = ?",
            (record.state, record.at, record.transaction_id),
        )
    elif isinstance(record, StepIntent):
        connection.execute(
            "UPDATE journal_transactions SET steps = MAX(steps, ?), updated_at = ? WHERE transaction_id = ?",
            (record.step + 1, record.at, record.transaction_id),
        )
    else:
        connection.execute(
            "UPDATE journal_transactions SET updated_at = ? WHERE transaction_id = ?",
            (record.at, record.transaction_id),
        )
