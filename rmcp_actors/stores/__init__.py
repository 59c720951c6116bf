"""Dedup stores for the RMCP server side (the protocol, an in-memory store and a SQLite store),
and the transaction journals (in memory and SQLite).

The protocol lives in ``_base``, each store in its own module; everything public is
re-exported here, and users import from ``rmcp_actors.stores`` only.
"""

import attrs as _attrs

from ._base import WOULD_WAIT as WOULD_WAIT
from ._base import AbortingStore as AbortingStore
from ._base import BeginOutcome as BeginOutcome
from ._base import BlobStore as BlobStore
from ._base import DedupRecord as DedupRecord
from ._base import DedupStore as DedupStore
from ._base import ImmediateStore as ImmediateStore
from ._base import OwnerInfo as OwnerInfo
from ._base import RecordState as RecordState
from ._base import TaskCreation as TaskCreation
from ._base import TaskRecord as TaskRecord
from ._base import TaskState as TaskState
from ._base import TaskStore as TaskStore
from ._base import TransferConflict as TransferConflict
from ._base import WouldWait as WouldWait
from .memory import MemoryStore as MemoryStore
from .memory_journal import MemoryJournal as MemoryJournal
from .sqlite import SQLiteStore as SQLiteStore
from .sqlite import SQLiteStoreStatistics as SQLiteStoreStatistics
from .sqlite_journal import SQLiteJournal as SQLiteJournal
from .sqlite_journal import SQLiteJournalStatistics as SQLiteJournalStatistics

__all__ = [
    "AbortingStore",
    "BeginOutcome",
    "BlobStore",
    "DedupRecord",
    "DedupStore",
    "ImmediateStore",
    "MemoryJournal",
    "MemoryStore",
    "OwnerInfo",
    "RecordState",
    "SQLiteJournal",
    "SQLiteJournalStatistics",
    "SQLiteStore",
    "SQLiteStoreStatistics",
    "TaskCreation",
    "TaskRecord",
    "TaskState",
    "TaskStore",
    "TransferConflict",
    "WOULD_WAIT",
    "WouldWait",
]


def _show_public_module() -> None:
    """Make reprs and tracebacks say ``rmcp_actors.stores.MemoryStore``, the name users import."""
    for name in __all__:
        value = globals()[name]
        if _attrs.has(value):
            # String annotations resolve in the defining module: resolve them while it is known.
            _attrs.resolve_types(value)
        value.__module__ = __name__


_show_public_module()
