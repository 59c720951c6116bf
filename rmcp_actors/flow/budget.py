"""The retry budget: retries and hedges draw from a bucket that first attempts refill.

As gRPC's retry throttling and Finagle's/Envoy's retry budgets do, a server's retries are
bounded by a share of its traffic instead of by ``max_attempts`` per call: each first attempt
deposits ``ratio`` of a token, time deposits ``min_per_s`` tokens per second (so a server with
little traffic can still retry), and each retry or hedge withdraws one whole token or is not
made. Deposits fade with a time constant of :data:`MEMORY_S` (Finagle keeps them for ten
seconds), so hours of healthy traffic do not bank a retry storm for the first outage.

A new budget holds the reserve a quiet server settles at, ``min_per_s * MEMORY_S`` tokens (as
Finagle's does), so the first failures after a start can be retried. Nothing else is ever
added but those deposits, so under total failure the attempts sent are at most
``(1 + ratio) x first attempts + min_per_s x (elapsed time + MEMORY_S)``, whatever
``max_attempts`` says.

The budget is a synchronous gate (no actor, no task switch): time is read lazily from the
clock when the balance is touched, and a call deposits and withdraws by plain method calls.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import final

import anyio
import attrs

__all__ = ["MEMORY_S", "RetryBudget", "RetryBudgetStatistics"]

#: Seconds over which deposits fade (time constant of an exponential decay): the balance
#: reflects about the last ten seconds of traffic, and with no traffic settles at
#: ``min_per_s * MEMORY_S`` (the reserve a quiet server keeps for its next failure).
MEMORY_S = 10.0


@final
@attrs.frozen
class RetryBudgetStatistics:
    """A snapshot of one retry budget.

    Attributes:
        server: The server whose calls use the budget.
        tool: The tool, for a tool with a budget of its own; None for the server's.
        ratio: Tokens deposited per first attempt.
        min_per_s: Tokens deposited per second of time.
        balance: Tokens available now (a retry or hedge needs one).
        first_attempts: First attempts deposited so far.
        retries: Retries allowed so far.
        hedges: Hedges allowed so far.
        refused: Retries and hedges refused because the budget was empty.
    """

    server: str
    tool: str | None
    ratio: float
    min_per_s: float
    balance: float
    first_attempts: int
    retries: int
    hedges: int
    refused: int


@final
class RetryBudget:
    """One server's (or one tool's) retry budget.

    Args:
        ratio: Tokens each first attempt deposits (0.2: one retry per five calls).
        min_per_s: Tokens deposited per second regardless of traffic.
        server: The server's name (for statistics).
        tool: The tool's name, for a tool's own budget (for statistics).
        clock: The time source (seconds); the event loop's clock by default.
    """

    __slots__ = (
        "_balance",
        "_clock",
        "_first_attempts",
        "_hedges",
        "_refused",
        "_retries",
        "_updated",
        "min_per_s",
        "ratio",
        "server",
        "tool",
    )

    def __init__(
        self,
        ratio: float,
        min_per_s: float,
        *,
        server: str = "",
        tool: str | None = None,
        clock: Callable[[], float] = anyio.current_time,
    ) -> None:
        if ratio < 0 or min_per_s < 0:
            raise ValueError(f"ratio and min_per_s must not be negative, got {ratio} and {min_per_s}")
        self.ratio = ratio
        self.min_per_s = min_per_s
        self.server = server
        self.tool = tool
        self._clock = clock
        # The quiet reserve, not empty: a runtime's first failing call may retry at once.
        self._balance = min_per_s * MEMORY_S
        self._updated = clock()
        self._first_attempts = 0
        self._retries = 0
        self._hedges = 0
        self._refused = 0

    def deposit(self, now: float | None = None) -> None:
        """Count one first attempt: it deposits ``ratio`` of a token.

        Args:
            now: The clock's time, when the caller just read it (spares a read on the hot path).
        """
        self._first_attempts += 1
        self._refill(self._clock() if now is None else now)
        self._balance += self.ratio

    def withdraw_retry(self) -> bool:
        """Take one token for a retry; False (and nothing taken) when the budget is empty."""
        if self._take():
            self._retries += 1
            return True
        return False

    def withdraw_hedge(self) -> bool:
        """Take one token for a hedge; False (and nothing taken) when the budget is empty."""
        if self._take():
            self._hedges += 1
            return True
        return False

    def statistics(self) -> RetryBudgetStatistics:
        """Return a snapshot of the balance and the counters."""
        return RetryBudgetStatistics(
            server=self.server,
            tool=self.tool,
            ratio=self.ratio,
            min_per_s=self.min_per_s,
            balance=self._refill(self._clock()),
            first_attempts=self._first_attempts,
            retries=self._retries,
            hedges=self._hedges,
            refused=self._refused,
        )

    def _take(self) -> bool:
        if self._refill(self._clock()) >= 1.0:
            self._balance -= 1.0
            return True
        self._refused += 1
        return False

    def _refill(self, now: float) -> float:
        elapsed = now - self._updated
        if elapsed > 0:
            # The exact solution of d(balance)/dt = min_per_s - balance / MEMORY_S over the
            # elapsed time: time deposits min_per_s per second while everything fades.
            fade = math.exp(-elapsed / MEMORY_S)
            self._balance = self._balance * fade + self.min_per_s * MEMORY_S * (1.0 - fade)
            self._updated = now
        return self._balance
