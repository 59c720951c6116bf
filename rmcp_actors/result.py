"""What a caller gets back from a tool call that ran and answered."""

from __future__ import annotations

from typing import Any, Literal, final

import attrs
from mcp_types import ContentBlock

from .errors import Outcome
from .lifecycle import LifecycleEvent

__all__ = ["CallResult", "TransferStatistics"]


@final
@attrs.frozen
class TransferStatistics:
    """How one payload of a call moved in chunks (docs/protocol.md section 9).

    Attributes:
        direction: ``"result"`` (a result item read from the server) or ``"argument"`` (a
            string argument uploaded before the call).
        where: Which payload: ``content[2]`` or an argument's path such as ``arguments['text']``.
        transfer_id: The transfer's id on the server.
        size: The payload's bytes.
        sha256: The payload's SHA-256 (hex), verified.
        chunks: How many chunks the payload has.
        bytes_moved: Payload bytes of the chunk requests the server answered, repeats
            included (a request lost with the connection is not counted).
        refetched: Chunks read again: corrupt on arrival, or lost with the connection.
        resent: Chunks written again: refused as corrupt by the server (-32031), or found
            missing when the call came (NACK ``transfer_incomplete``).
        already_held: Chunks of an upload the server already held (a resumed or repeated upload).
        reconnects: Times the transfer waited for a new connection and resumed.
        elapsed_s: Seconds from the first chunk request to the last verified chunk.
        sink: Where a streamed result went (a path or the sink's repr); ``None`` when the
            payload is in ``content``.
    """

    direction: Literal["result", "argument"]
    where: str
    transfer_id: str
    size: int
    sha256: str
    chunks: int
    bytes_moved: int = 0
    refetched: int = 0
    resent: int = 0
    already_held: int = 0
    reconnects: int = 0
    elapsed_s: float = 0.0
    sink: str | None = None


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
        transfers: The payloads that moved in chunks (uploaded arguments, then result items),
            with their counts of chunks, bytes and retransmissions; empty for a call without.
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
    transfers: tuple[TransferStatistics, ...] = ()

    @property
    def text(self) -> str:
        """The text of the result's text content blocks, joined by newlines."""
        return "\n".join(block.text for block in self.content if block.type == "text")
