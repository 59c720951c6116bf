"""A FastRMCP server with large results, for the chunked-transfer tests (in memory, and run as a
stdio subprocess: ``python transfer_server.py [--sqlite PATH]``).

Payloads are deterministic (:func:`payload`), so a test knows the bytes it must reassemble.
"""

from __future__ import annotations

import base64
import hashlib
import random
import sys
from collections.abc import AsyncIterator
from typing import Any

from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import (
    BlobResourceContents,
    EmbeddedResource,
    ImageContent,
    TextContent,
    TextResourceContents,
)

from rmcp_actors.server import FastRMCP, stream_resource, stream_result
from rmcp_actors.stores import DedupStore, MemoryStore

__all__ = ["binary", "build_transfer_server", "lazy_payload", "payload"]


def payload(size: int, seed: int = 0) -> str:
    """``size`` ASCII characters, different at every offset (a chunk out of place shows)."""
    raw = random.Random(seed).randbytes(size * 3 // 4 + 3)
    return base64.b64encode(raw).decode()[:size]


async def lazy_payload(size: int, piece: int) -> AsyncIterator[bytes]:
    """``size`` bytes as pieces of ``piece`` bytes, each made when asked for."""
    for start in range(0, size, piece):
        yield payload(min(piece, size - start), start).encode()


def binary(size: int, seed: int) -> bytes:
    """``size`` bytes of no encoding (every byte value occurs)."""
    return random.Random(seed).randbytes(size)


def build_transfer_server(store: DedupStore | None = None, **options: Any) -> FastRMCP:
    """The server; ``runs`` on the returned app counts each tool's runs."""
    app = FastRMCP("transfer", store=MemoryStore() if store is None else store, **options)
    runs: dict[str, int] = {}
    app.runs = runs  # type: ignore[attr-defined]

    def ran(tool: str) -> None:
        runs[tool] = runs.get(tool, 0) + 1

    @app.tool(structured_output=False)
    async def text(size: int, seed: int = 0) -> str:
        """A text result of ``size`` characters."""
        ran("text")
        return payload(size, seed)

    @app.tool()
    async def two(size: int) -> list[TextContent]:
        """Two text items: one small, one of ``size`` characters."""
        ran("two")
        return [TextContent(text="small"), TextContent(text=payload(size, 1))]

    @app.tool()
    async def image(size: int) -> ImageContent:
        """An image of ``size`` bytes (base64 on the wire)."""
        ran("image")
        data = base64.b64encode(payload(size, 2).encode()).decode()
        return ImageContent(data=data, mime_type="image/png")

    @app.tool()
    async def resources(size: int) -> list[EmbeddedResource]:
        """Two embedded resources of ``size`` bytes: one text, one blob."""
        ran("resources")
        text = TextResourceContents(uri="file:///report.txt", text=payload(size, 4), mime_type="text/plain")
        blob = BlobResourceContents(
            uri="file:///report.bin",
            blob=base64.b64encode(payload(size, 5).encode()).decode(),
            mime_type="application/octet-stream",
        )
        return [EmbeddedResource(resource=text), EmbeddedResource(resource=blob)]

    @app.tool()
    async def streamed(size: int, piece: int = 10_000) -> TextContent:
        """``payload(size, 3)`` streamed in pieces of ``piece`` bytes."""
        ran("streamed")
        whole = payload(size, 3).encode()

        async def pieces() -> AsyncIterator[bytes]:
            for start in range(0, size, piece):
                yield whole[start : start + piece]

        return await stream_result(pieces(), mime_type="text/csv")

    @app.tool()
    async def lazy(size: int, piece: int = 64 << 10) -> TextContent:
        """``lazy_payload(size, piece)`` streamed: never all of it in memory at once."""
        ran("lazy")
        return await stream_result(lazy_payload(size, piece))

    @app.tool()
    async def archive(size: int) -> EmbeddedResource:
        """``size`` bytes of binary, streamed as a blob resource."""
        ran("archive")

        async def pieces() -> AsyncIterator[bytes]:
            for start in range(0, size, 50_000):
                yield binary(min(50_000, size - start), start)

        return await stream_resource(pieces(), uri="file:///archive.zip", mime_type="application/zip")

    @app.tool()
    async def broken_stream(size: int) -> TextContent:
        """Streams ``size`` bytes, then fails."""
        ran("broken_stream")

        async def pieces() -> AsyncIterator[bytes]:
            for _ in range(0, size, 10_000):
                yield b"x" * 10_000
            raise ToolError("the export lost its database")

        return await stream_result(pieces())

    @app.tool()
    async def digest(text: str, label: str = "") -> dict[str, Any]:
        """The length and SHA-256 of ``text`` (an uploaded argument, typically)."""
        ran("digest")
        return {"length": len(text), "sha256": hashlib.sha256(text.encode()).hexdigest(), "label": label}

    return app


def main() -> None:
    store: DedupStore | None = None
    if len(sys.argv) > 2 and sys.argv[1] == "--sqlite":
        from rmcp_actors.stores import SQLiteStore

        store = SQLiteStore(sys.argv[2])
    build_transfer_server(store).run()


if __name__ == "__main__":
    main()
