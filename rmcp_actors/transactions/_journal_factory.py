# pyright: strict
"""The journal the ``[transactions]`` settings ask for.

Not imported by ``transactions/__init__``: the journals (``rmcp_actors.stores``) import the
records of ``transactions.journal``, so the package itself must not import them back.
"""

from __future__ import annotations

from ..config import TransactionSettings
from ..stores import MemoryJournal, SQLiteJournal
from .journal import Journal

__all__ = ["open_journal"]


def open_journal(settings: TransactionSettings) -> Journal:
    """A ``SQLiteJournal`` on ``settings.journal`` with ``settings.synchronous``, or a
    ``MemoryJournal`` when no path is configured. The file is opened on first use (in a
    worker thread), so this never blocks; the caller closes the journal with ``aclose()``."""
    if settings.journal is None:
        return MemoryJournal()
    return SQLiteJournal(settings.journal, synchronous=settings.synchronous)
