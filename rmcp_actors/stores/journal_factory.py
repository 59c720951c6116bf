# pyright: strict
"""The journal a runtime's transactions write to, chosen by the ``[transactions]`` settings."""

from __future__ import annotations

from ..config import TransactionSettings
from ..transactions.journal import Journal
from .memory_journal import MemoryJournal
from .sqlite_journal import SQLiteJournal

__all__ = ["journal_from_settings"]


def journal_from_settings(settings: TransactionSettings) -> Journal:
    """The journal ``settings`` names: a ``SQLiteJournal`` on ``journal`` with its
    ``synchronous`` setting, or a ``MemoryJournal`` when unset.

    The SQLite file is opened on first use, in a worker thread, so this never blocks; the
    caller closes the journal with ``aclose()``.
    """
    if settings.journal is None:
        return MemoryJournal()
    return SQLiteJournal(settings.journal, synchronous=settings.synchronous)
