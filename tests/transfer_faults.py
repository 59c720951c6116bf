"""Faults at the chunk methods of the transfer test server, for the client's tests: corrupt
answers to ``rmcp/transfer/read``, corrupt ``rmcp/transfer/write`` params (the server then
answers -32031), writes answered but not stored (the call is then NACKed
``transfer_incomplete``), and a server process that dies at a chunk. The server is the real one
(``transfer_server.py``); only its registered handlers are wrapped.

Run as a stdio server: ``python transfer_faults.py --sqlite PATH --die-at N --marker PATH``
dies (``os._exit``) when chunk N is first read while ``PATH`` does not exist, creating it, so
the restarted process serves every chunk (``--die-at-write N``: when chunk N of an upload is
first written).
"""

from __future__ import annotations

import argparse
import hashlib
import os
from pathlib import Path
from typing import Any, cast

from mcp.server.mcpserver import MCPServer
from transfer_server import build_transfer_server

from rmcp_actors._transfer import METHOD_READ, METHOD_WRITE

__all__ = ["inject"]


def _flip(data: str) -> str:
    """The base64 of other bytes of the same length (the first character changed)."""
    return ("B" if data[0] == "A" else "A") + data[1:]


def inject(
    app: MCPServer,
    *,
    corrupt_reads: dict[int, int] | None = None,
    corrupt_writes: dict[int, int] | None = None,
    drop_writes: dict[int, int] | None = None,
    die_at: int | None = None,
    die_at_write: int | None = None,
    marker: Path | None = None,
) -> dict[str, int]:
    """Wrap the app's read and write handlers; return the counts of faults injected."""
    lowlevel = app._lowlevel_server  # pyright: ignore[reportPrivateUsage]
    injected = {"reads": 0, "writes": 0, "dropped": 0}
    reads = dict(corrupt_reads or {})
    writes = dict(corrupt_writes or {})
    drops = dict(drop_writes or {})
    read_entry = lowlevel.get_request_handler(METHOD_READ)
    write_entry = lowlevel.get_request_handler(METHOD_WRITE)
    assert read_entry is not None
    assert write_entry is not None

    async def read(ctx: Any, params: Any) -> Any:
        if die_at is not None and params.index == die_at and marker is not None and not marker.exists():
            marker.touch()
            os._exit(17)
        answer = cast("dict[str, Any]", await read_entry.handler(ctx, params))  # the service's dict
        if reads.get(params.index, 0) > 0:
            reads[params.index] -= 1
            injected["reads"] += 1
            answer = {**answer, "data": _flip(answer["data"])}
        return answer

    async def write(ctx: Any, params: Any) -> Any:
        if (
            die_at_write is not None
            and params.index == die_at_write
            and marker is not None
            and not marker.exists()
        ):
            marker.touch()
            os._exit(17)
        if drops.get(params.index, 0) > 0:
            # Answered as stored, never stored: the call finds the upload incomplete.
            drops[params.index] -= 1
            injected["dropped"] += 1
            return {"id": params.id, "index": params.index}
        if writes.get(params.index, 0) > 0:
            writes[params.index] -= 1
            injected["writes"] += 1
            params = params.model_copy(update={"data": _flip(params.data)})
        return await write_entry.handler(ctx, params)

    lowlevel.add_request_handler(METHOD_READ, read_entry.params_type, read)
    lowlevel.add_request_handler(METHOD_WRITE, write_entry.params_type, write)
    return injected


def plain_server() -> MCPServer:
    """What replaces the transfer server after a restart with ``--plain-after-restart``: a
    plain MCP server with the same ``digest`` tool."""
    plain = MCPServer("plain")

    @plain.tool()
    def digest(text: str, label: str = "") -> dict[str, Any]:
        """The length and SHA-256 of ``text``."""
        return {"length": len(text), "sha256": hashlib.sha256(text.encode()).hexdigest(), "label": label}

    return plain


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sqlite")
    parser.add_argument("--die-at", type=int)
    parser.add_argument("--die-at-write", type=int)
    parser.add_argument("--marker")
    parser.add_argument("--plain-after-restart", action="store_true")
    options = parser.parse_args()
    if options.plain_after_restart and options.marker and Path(options.marker).exists():
        plain_server().run()
        return
    store = None
    if options.sqlite:
        from rmcp_actors.stores import SQLiteStore

        store = SQLiteStore(options.sqlite)
    app = build_transfer_server(store)
    marker = Path(options.marker) if options.marker else None
    inject(app, die_at=options.die_at, die_at_write=options.die_at_write, marker=marker)
    app.run()


if __name__ == "__main__":
    main()
