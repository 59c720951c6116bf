# pyright: strict
"""Transaction ids and the idempotency keys derived from them.

A step's key depends only on (transaction id, step index), so whoever sends the step again (the
same process after a lost answer, or ``recover()`` in another process after a crash) sends the
same key, and an RMCP server replays the first run instead of running the tool twice. A
compensation has a key of its own, derived the same way.
"""

from __future__ import annotations

import secrets

__all__ = ["compensation_key", "new_transaction_id", "step_key"]


def new_transaction_id() -> str:
    """A fresh transaction id: 128 random bits as 32 hex digits."""
    return secrets.token_hex(16)


def step_key(transaction_id: str, step: int) -> str:
    """The idempotency key of step ``step`` of a transaction."""
    return f"{transaction_id}:{step}"


def compensation_key(transaction_id: str, step: int, retry: int = 0) -> str:
    """The idempotency key of the compensation of step ``step`` of a transaction.

    ``retry`` counts the earlier runs of this compensation that the tool reported failed
    (journaled): an RMCP server stores such a run's result under its key and would replay it,
    so trying again after one (``recover(retry_failed=True)``) takes the next key. A run cut
    short (its outcome unknown) does not count: its key is sent again, and the server
    replays (or waits for) that run instead of undoing twice.
    """
    base = f"{transaction_id}:{step}:compensate"
    return base if retry == 0 else f"{base}:{retry}"
