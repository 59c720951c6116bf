# pyright: strict
"""The public vocabulary of transactions: states, compensations, summaries."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

import attrs

__all__ = ["TERMINAL_STATES", "Compensation", "TransactionState", "TransactionSummary"]


class TransactionState(enum.Enum):
    """Where a transaction stands.

    ``initiated -> in_progress -> committed``, or ``-> compensating -> compensated |
    compensation_failed``; ``in_doubt`` when a step marked ``compensate_unknown=False`` has an
    unknown outcome and an operator must say whether it ran.
    """

    INITIATED = "initiated"
    IN_PROGRESS = "in_progress"
    COMMITTED = "committed"
    COMPENSATING = "compensating"
    COMPENSATED = "compensated"
    COMPENSATION_FAILED = "compensation_failed"
    IN_DOUBT = "in_doubt"


#: States a transaction never leaves by itself (``recover()`` leaves them alone).
TERMINAL_STATES = frozenset(
    {TransactionState.COMMITTED, TransactionState.COMPENSATED, TransactionState.COMPENSATION_FAILED}
)


@attrs.frozen
class Compensation:
    """The tool call that undoes a step: run, in reverse order, when the transaction aborts.

    A compensation must tolerate a step that did not happen (a step whose outcome is unknown
    is compensated too): e.g. ``cancel_order`` of an order that does not exist succeeds.

    Attributes:
        server: The server to call.
        tool: The tool that undoes the step.
        arguments: Its arguments (JSON values: they are journaled).
    """

    server: str
    tool: str
    arguments: Mapping[str, Any] | None = None


@attrs.frozen(kw_only=True)
class TransactionSummary:
    """One transaction as the journal knows it (``sup.transactions()``).

    Attributes:
        transaction_id: Its id.
        name: The name it was started with.
        state: Where it stands.
        started_at: When it began (Unix time, seconds).
        updated_at: When its journal last changed (Unix time, seconds).
        steps: How many steps it started.
    """

    transaction_id: str
    name: str
    state: TransactionState
    started_at: float
    updated_at: float
    steps: int
