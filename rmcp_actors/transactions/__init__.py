"""Transactions: sagas of tool calls with compensation, a write-ahead journal and recovery.

``async with sup.transaction(name) as tx:`` groups tool calls; each step carries the
transaction's id and its index, and its idempotency key derives from both, so a replayed step
never runs twice against an RMCP server. Leaving the block commits; an exception, a
cancellation or the timeout compensates the completed steps in reverse order.
"""

from ._engine import TransactionEvent as TransactionEvent
from ._model import TERMINAL_STATES as TERMINAL_STATES
from ._model import Compensation as Compensation
from ._model import TransactionState as TransactionState
from ._model import TransactionSummary as TransactionSummary
from .journal import Journal as Journal
from .journal import JournalRecord as JournalRecord
from .recovery import RecoveryReport as RecoveryReport
from .saga import CompensationFunction as CompensationFunction
from .saga import LockManagerHook as LockManagerHook
from .saga import StepHistory as StepHistory
from .saga import Transaction as Transaction
from .saga import TransactionHistory as TransactionHistory

__all__ = [
    "TERMINAL_STATES",
    "Compensation",
    "CompensationFunction",
    "Journal",
    "JournalRecord",
    "LockManagerHook",
    "RecoveryReport",
    "StepHistory",
    "Transaction",
    "TransactionEvent",
    "TransactionHistory",
    "TransactionState",
    "TransactionSummary",
]
