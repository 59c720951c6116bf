"""The transfer benchmark's server, over stdio or Streamable HTTP, with RMCP installed.

Usage::

    python benchmarks/_transfer_server.py [--store memory|PATH] [--http PORT]
                                          [--chunk-log PATH] [--kill-at read|write:N --kill-marker PATH]

``blob(size)`` returns a text of ``size`` characters (a large result), the same text for the
same size on every run and every process (:func:`payload`), so a restarted server serves the
same bytes; ``digest(text)`` returns the SHA-256 of its argument's UTF-8 (a large argument, a
small result). RMCP is installed with a ``MemoryStore`` (default) or a ``SQLiteStore`` at PATH;
a plain client (no ``_meta.rmcp``) gets the result inline, an RMCP client as a transfer. Over
stdio the server runs ``rmcp_actors.server.run_stdio`` (linear); with ``--http`` it serves
``app.streamable_http_app()`` with hypercorn on 127.0.0.1:PORT, its request body cap lifted.

For the resume figures (and tests/test_transfer_chaos.py): ``--chunk-log PATH`` appends a line
``read INDEX`` or ``write INDEX`` for each chunk the store hands out or takes in (a chunk served
twice across a restart shows up twice); ``--kill-at read:N`` (``write:N``) makes the server
SIGKILL itself as the store is asked to read (write) its N-th chunk, before serving (storing)
it, unless the file ``--kill-marker`` exists (the server creates it first: the restarted server
lives on). A result's chunks are written to the store as the tool's result is kept, then read
by the client; an upload's are written by the client, then read once by the call.
"""

from __future__ import annotations

import argparse
import base64
import functools
import hashlib
import os
import random
import signal
import sys
from pathlib import Path

import trio

if __name__ == "__main__":
    # Run as a script, import the rmcp_actors of this checkout: the SDK's default environment
    # drops PYTHONPATH, so the interpreter would otherwise find whichever copy is installed.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mcp.server.mcpserver import MCPServer

from rmcp_actors.server import install, run_stdio
from rmcp_actors.stores import DedupStore, MemoryStore, SQLiteStore


@functools.cache
def payload(size: int) -> str:
    """``size`` characters of base64 text from a seeded generator: not compressible, the same
    on every process (cached: the server's own memory is not measured)."""
    raw = random.Random(size).randbytes(size * 3 // 4 + 3)
    return base64.b64encode(raw).decode("ascii")[:size]


def chunk_watching(
    store_type: type[MemoryStore] | type[SQLiteStore],
    log: Path | None,
    kill_at: tuple[str, int] | None,
    marker: Path | None,
) -> type[MemoryStore] | type[SQLiteStore]:
    """``store_type`` that logs each chunk it reads or writes and dies at ``kill_at``
    (``("read", n)``: as it is asked for its n-th chunk read)."""
    seen = {"read": 0, "write": 0}

    def watch(operation: str, index: int) -> None:
        seen[operation] += 1
        if kill_at == (operation, seen[operation]) and marker is not None and not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        if log is not None:
            with log.open("a") as lines:
                lines.write(f"{operation} {index}\n")

    class Watched(store_type):  # type: ignore[misc,valid-type]
        async def read_chunk(self, transfer_id: str, index: int, *, scope: str) -> bytes | None:
            watch("read", index)
            return await super().read_chunk(transfer_id, index, scope=scope)

        async def write_chunk(self, transfer_id: str, index: int, data: bytes) -> None:
            watch("write", index)
            await super().write_chunk(transfer_id, index, data)

    return Watched


def build_server(store: DedupStore) -> MCPServer:
    app = MCPServer("transfer-bench")

    # Unstructured: MCPServer would also send a ``-> str`` result as ``structuredContent``
    # ``{"result": ...}``, which is always inline (docs/protocol.md 9.2): the payload twice, once
    # of them whole in one message.
    @app.tool(structured_output=False)
    async def blob(size: int) -> str:  # pyright: ignore[reportUnusedFunction]
        """A text of ``size`` characters."""
        return payload(size)

    @app.tool()
    async def digest(text: str) -> str:  # pyright: ignore[reportUnusedFunction]
        """The SHA-256 (hex) of ``text``'s UTF-8."""
        return hashlib.sha256(text.encode()).hexdigest()

    install(app, store=store)
    return app


async def serve_http(app: MCPServer, port: int) -> None:
    from hypercorn.config import Config
    from hypercorn.trio import serve

    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    # The SDK refuses request bodies over 4 MiB (413): lifted so that a raw client can send a
    # large argument inline at all (the chunked client's requests are one chunk each).
    asgi = app.streamable_http_app(max_request_body_size=1 << 30)
    await serve(asgi, config)  # pyright: ignore[reportArgumentType]


def _operation_count(text: str) -> tuple[str, int]:
    operation, _, count = text.partition(":")
    if operation not in ("read", "write") or not count.isdigit():
        raise argparse.ArgumentTypeError(f"expected read:N or write:N, got {text!r}")
    return operation, int(count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--store", default="memory", help="memory, or the path of a SQLite file")
    parser.add_argument("--http", type=int, metavar="PORT")
    parser.add_argument("--chunk-log", type=Path, metavar="PATH")
    parser.add_argument("--kill-at", type=_operation_count, metavar="read|write:N")
    parser.add_argument("--kill-marker", type=Path, metavar="PATH")
    options = parser.parse_args()
    if options.chunk_log is None and options.kill_at is None:
        store = MemoryStore() if options.store == "memory" else SQLiteStore(Path(options.store))
    else:
        store_type = MemoryStore if options.store == "memory" else SQLiteStore
        watched = chunk_watching(store_type, options.chunk_log, options.kill_at, options.kill_marker)
        store = watched() if options.store == "memory" else watched(Path(options.store))  # pyright: ignore[reportCallIssue]
    app = build_server(store)
    if options.http is None:
        run_stdio(app)
    else:
        trio.run(serve_http, app, options.http)


if __name__ == "__main__":
    main()
