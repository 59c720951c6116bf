# pyright: strict
"""The journal a runtime's transactions write to, chosen by the ``[transactions]`` settings."""

from __future__ import annotations

from ..config import TransactionSettings
from ..errors import RMCPConfigError
from ..transactions.journal import Journal
from .memory_journal import MemoryJournal

__all__ = ["journal_from_settings"]


def journal_from_settings(settings: TransactionSettings) -> Journal:
    """Open the journal ``settings`` names: SQLite at ``journal``, or in memory when unset.

    Raises:
        RMCPConfigError: The journal cannot be opened.
    """
    if settings.journal is None:
        return MemoryJournal()
    raise RMCPConfigError(
        "the SQLite transaction journal is not available in this build; leave [transactions] journal "
        "unset (in memory) or pass a journal to RMCPSupervisor.open(journal=...)",
        path="transactions.journal",
    )
