"""What a caller gets back from a tool call that ran and answered."""

from __future__ import annotations

from typing import Any, final

import attrs
from mcp_types import ContentBlock

from .errors import Outcome
from .lifecycle import LifecycleEvent

__all__ = ["CallResult"]


@final
@attrs.frozen
class CallResult:
    """The answer of a tool that ran: returned by ``RMCPSupervisor.call``.

    Attributes:
        outcome: ``Outcome.SUCCEEDED``, or ``Outcome.FAILED`` when the tool reported an error.
        content: The content blocks of the tool's result, as the SDK parsed them.
        structured_content: The structured result, when the tool returns one.
        is_error: True when the tool reported an error (the ``isError`` of MCP).
        attempts: How many times the request was sent (1 when no retry was needed).
        duplicate: True when the server answered from its deduplication store.
        request_id: The logical call's id, shared by all its attempts.
        idempotency_key: The key every attempt carried.
        server: The server that answered.
        tool: The tool that ran.
        queued_s: Seconds spent waiting for admission (all attempts).
        elapsed_s: Seconds from the call to its answer, retries and backoff included.
        meta: The ``_meta`` of the result, as the server sent it.
        lifecycle: The steps of the call, from ``queued`` to ``acked`` or ``answered``.
    """

    outcome: Outcome
    content: list[ContentBlock]
    structured_content: dict[str, Any] | None
    is_error: bool
    attempts: int
    duplicate: bool
    request_id: str
    idempotency_key: str
    server: str
    tool: str
    queued_s: float
    elapsed_s: float
    meta: dict[str, Any] | None = None
    lifecycle: tuple[LifecycleEvent, ...] = ()

    @property
    def text(self) -> str:
        """The text of the result's text content blocks, joined by newlines."""
        return "\n".join(block.text for block in self.content if block.type == "text")
