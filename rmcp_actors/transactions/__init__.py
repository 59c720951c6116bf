"""Transactions: sagas of tool calls with compensation, a write-ahead journal and recovery.

``async with sup.transaction(name) as tx:`` groups tool calls; each step carries the
transaction's id and its index, and its idempotency key derives from both, so a replayed step
never runs twice against an RMCP server. Leaving the block commits; an exception, a
cancellation or the timeout compensates the completed steps in reverse order.
"""

from ._model import TERMINAL_STATES as TERMINAL_STATES
from ._model import Compensation as Compensation
from ._model import TransactionState as TransactionState
from ._model import TransactionSummary as TransactionSummary
from .journal import Journal as Journal
from .journal import JournalRecord as JournalRecord

__all__ = [
    "TERMINAL_STATES",
    "Compensation",
    "Journal",
    "JournalRecord",
    "TransactionState",
    "TransactionSummary",
]
