"""Newline-delimited JSON-RPC framing for the stdio transports, linear in the bytes received.

The SDK's stdio client joins its whole pending text to every chunk it reads and splits the result
again (``(buffer + chunk).split("\\n")``): a line of n bytes arriving in 64 KiB chunks costs
O(n²). Here each chunk is searched once, from its own start, and a partial line waits as a list of
pieces joined once, when its newline arrives.
"""

from __future__ import annotations

from mcp.shared.message import SessionMessage

__all__ = ["LineSplitter", "serialize"]


class LineSplitter:
    """Cut a byte stream into lines: a line may span many chunks, and a chunk hold many lines."""

    def __init__(self) -> None:
        self._pieces: list[bytes] = []

    def feed(self, chunk: bytes) -> list[bytes]:
        """Return the lines that ``chunk`` completes, without their newlines."""
        lines: list[bytes] = []
        start = 0
        while (end := chunk.find(b"\n", start)) != -1:
            if self._pieces:
                self._pieces.append(chunk[start:end])
                lines.append(b"".join(self._pieces))
                self._pieces.clear()
            else:
                lines.append(chunk[start:end])
            start = end + 1
        if start < len(chunk):
            self._pieces.append(chunk[start:] if start else chunk)
        return lines

    def rest(self) -> bytes:
        """The unterminated tail, for when the stream has ended."""
        return b"".join(self._pieces)


def serialize(session_message: SessionMessage) -> bytes:
    """One message as a line of UTF-8 JSON, as the SDK writes it (by alias, unset fields left out)."""
    message = session_message.message
    # model_dump_json() is this call followed by a decode, which the pipe would encode again.
    return message.__pydantic_serializer__.to_json(message, by_alias=True, exclude_unset=True) + b"\n"
