# pyright: strict
"""A transaction journal in memory: for tests and for programs that need no crash recovery."""

from __future__ import annotations

from collections.abc import Collection

import anyio.lowlevel

from ..errors import RMCPStoreClosedError
from ..transactions._model import TransactionState, TransactionSummary
from ..transactions.journal import JournalRecord, summarize

__all__ = ["MemoryJournal"]


class MemoryJournal:
    """Keeps every transaction's records in a dict; nothing survives the process.

    Implements :class:`~rmcp_actors.transactions.Journal`.
    """

    def __init__(self) -> None:
        self._records: dict[str, list[JournalRecord]] = {}
        self._closed = False

    @property
    def durable(self) -> bool:
        """Always ``False``: the records live in this process."""
        return False

    async def append(self, record: JournalRecord) -> None:
        """Add ``record`` (a checkpoint, like a real journal's write)."""
        self._check_open()
        await anyio.lowlevel.checkpoint()
        self._records.setdefault(record.transaction_id, []).append(record)

    async def read(self, transaction_id: str) -> list[JournalRecord]:
        """Every record of one transaction, in the order appended."""
        self._check_open()
        await anyio.lowlevel.checkpoint()
        return list(self._records.get(transaction_id, ()))

    async def summaries(self, states: Collection[TransactionState] | None = None) -> list[TransactionSummary]:
        """The transactions in ``states`` (all when ``None``), oldest first."""
        self._check_open()
        await anyio.lowlevel.checkpoint()
        found = [summarize(records) for records in self._records.values()]
        if states is not None:
            found = [summary for summary in found if summary.state in states]
        return sorted(found, key=lambda summary: summary.started_at)

    async def aclose(self) -> None:
        """Drop every record; further calls raise ``RMCPStoreClosedError``."""
        self._closed = True
        self._records.clear()
        await anyio.lowlevel.checkpoint()

    def _check_open(self) -> None:
        if self._closed:
            raise RMCPStoreClosedError("the journal is closed; open a new one")
