"""The lifecycle of one logical call, as the client sees it.

A call is ``queued`` (waiting for admission), then each attempt is ``sent``; an RMCP server
answers with an ACK (``acked``: the tool ran, or an early ACK: it started) or a NACK
(``nacked``: it did not run). A plain MCP server's answer is ``answered``. A call ends
``failed`` (an error with nothing run) or ``unknown`` (the tool may have run and the
outcome could not be learnt).
"""

from __future__ import annotations

import enum
from collections.abc import Callable

import attrs

__all__ = ["LifecycleCallback", "LifecycleEvent", "RequestState"]


class RequestState(enum.Enum):
    """One step of a call's lifecycle."""

    QUEUED = "queued"
    SENT = "sent"
    ACKED = "acked"
    NACKED = "nacked"
    ANSWERED = "answered"
    FAILED = "failed"
    UNKNOWN = "unknown"
    #: The call runs as a task on the server: created (detail ``created <task id>``), resumed
    #: from the task store (``resumed <task id>``), or a new status (``working: <message>``).
    TASK = "task"
    #: A payload moving in chunks (docs/protocol.md section 9): an argument uploaded before the
    #: call is sent, or a result item read after the answer (detail: which payload, its size,
    #: then how it ended or that it resumes after a reconnect).
    TRANSFER = "transfer"


@attrs.frozen
class LifecycleEvent:
    """A step of a call's lifecycle.

    Attributes:
        state: The step.
        attempt: The attempt it belongs to (0 before the first attempt is sent).
        at: When it happened, in seconds of the event loop's clock.
        detail: A NACK code, an early ACK, or why the call ended, when there is one.
    """

    state: RequestState
    attempt: int
    at: float
    detail: str | None = None


LifecycleCallback = Callable[[LifecycleEvent], None]
"""Called synchronously at each step of a call; it must not block. An exception it raises is
logged to the ``rmcp_actors`` logger and changes nothing about the call."""
