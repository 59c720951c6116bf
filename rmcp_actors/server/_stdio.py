"""The stdio server transport: the SDK's stream handling with linear framing and byte I/O.

``mcp.server.stdio.stdio_server`` reads lines through a text layer (decode, then parse the text)
and writes each message with two worker-thread hops (write, then flush). This transport claims
fds 0 and 1 with the SDK's own function (so handlers' stray prints and reads miss the wire, and
both fds are restored on exit), then reads raw chunks, frames them with
:class:`~rmcp_actors._framing.LineSplitter`, parses bytes, and writes each message with one hop.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncGenerator, Callable
from contextlib import asynccontextmanager
from typing import Any, BinaryIO

import anyio
import anyio.lowlevel
import anyio.to_thread
import mcp_types
from mcp.server import stdio as sdk_stdio
from mcp.server.lowlevel.server import Server
from mcp.server.mcpserver import MCPServer
from mcp.shared._context_streams import create_context_streams
from mcp.shared._stream_protocols import ReadStream, WriteStream
from mcp.shared.message import SessionMessage

from .._framing import LineSplitter, serialize

__all__ = ["run_stdio", "serve_stdio", "stdio_server"]

ServerStreams = tuple[ReadStream[SessionMessage | Exception], WriteStream[SessionMessage]]

# The pipe's capacity on Linux: one read takes what a writer could have put in it.
_READ_SIZE = 65536
# Most bytes one worker-thread hop gathers before handing them to the event loop.
_MAX_READ_AHEAD = 16 << 20

# The SDK's private fd claim, reused so that the fd handling stays the SDK's; if an SDK release
# renames these, importing this module fails at once (mcp is pinned to a minor).
_claim_fd = sdk_stdio._claim_fd  # pyright: ignore[reportPrivateUsage]
_open_stdin_diversion = sdk_stdio._open_stdin_diversion  # pyright: ignore[reportPrivateUsage]
_open_stdout_diversion = sdk_stdio._open_stdout_diversion  # pyright: ignore[reportPrivateUsage]


def _parse_request_line(line: bytes) -> SessionMessage | Exception:
    """Parse one line from the client; a parse error is returned for the session to answer."""
    try:
        return SessionMessage(mcp_types.jsonrpc_message_adapter.validate_json(line, by_name=False))
    except Exception as exc:  # the SDK passes on whatever validation raises
        error = exc
    # The SDK reads stdin with errors="replace": a message with invalid UTF-8 still goes through.
    try:
        line.decode()
    except UnicodeDecodeError:
        try:
            text = line.decode(errors="replace")
            return SessionMessage(mcp_types.jsonrpc_message_adapter.validate_json(text, by_name=False))
        except Exception as exc:
            return exc
    return error


def _write_all(stream: BinaryIO, data: bytes) -> None:
    stream.write(data)
    stream.flush()


def _read_chunk(stream: BinaryIO) -> bytes:
    """Read what has arrived; while no newline has, keep reading in this same worker thread.

    A line without its newline is incomplete, so waiting here for more costs no latency, and a
    large message then takes one thread hop instead of one per pipe-sized read (the SDK's
    ``readline`` also takes one).
    """
    read: Callable[[int], bytes] = getattr(stream, "read1", stream.read)
    pieces: list[bytes] = []
    received = 0
    while received < _MAX_READ_AHEAD and (chunk := read(_READ_SIZE)):
        pieces.append(chunk)
        received += len(chunk)
        if b"\n" in chunk:
            break
    return b"".join(pieces)


@asynccontextmanager
async def stdio_server(
    stdin: BinaryIO | None = None, stdout: BinaryIO | None = None
) -> AsyncGenerator[ServerStreams]:
    """Serve MCP over the process's stdin and stdout: a drop-in for the SDK's ``stdio_server``.

    While serving, fd 0 reads the null device and fd 1 goes to stderr (the SDK's claim), so that
    handlers and their children cannot corrupt the wire; both are restored on exit. Explicit
    binary ``stdin``/``stdout`` skip the claim.

    Raises:
        RuntimeError: Another stdio server in this process already claimed fd 0 or 1.
    """
    restore_stdin: Callable[[], None] | None = None
    restore_stdout: Callable[[], None] | None = None
    try:
        if stdin is None:
            stdin, restore_stdin = _claim_fd(0, sys.stdin, "rb", _open_stdin_diversion)
        if stdout is None:
            stdout, restore_stdout = _claim_fd(1, sys.stdout, "wb", _open_stdout_diversion)
        wire_in, wire_out = stdin, stdout

        read_stream_writer, read_stream = create_context_streams[SessionMessage | Exception](0)
        write_stream, write_stream_reader = create_context_streams[SessionMessage](0)

        async def stdin_reader() -> None:
            splitter = LineSplitter()
            try:
                async with read_stream_writer:
                    # abandon_on_cancel: the SDK's claim never closes the descriptor (closefd=False),
                    # so a read left blocked in its thread after shutdown cannot hit a reused fd.
                    while chunk := await anyio.to_thread.run_sync(
                        _read_chunk, wire_in, abandon_on_cancel=True
                    ):
                        for line in splitter.feed(chunk):
                            await read_stream_writer.send(_parse_request_line(line))
                    # As the SDK's readline does, a last line without its newline still counts.
                    if rest := splitter.rest():
                        await read_stream_writer.send(_parse_request_line(rest))
            except anyio.ClosedResourceError:
                await anyio.lowlevel.checkpoint()

        async def stdout_writer() -> None:
            try:
                async with write_stream_reader:
                    async for session_message in write_stream_reader:
                        await anyio.to_thread.run_sync(_write_all, wire_out, serialize(session_message))
            except anyio.ClosedResourceError:
                await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as task_group:
            task_group.start_soon(stdin_reader)
            task_group.start_soon(stdout_writer)
            yield read_stream, write_stream
    finally:
        if restore_stdout is not None:
            restore_stdout()
        if restore_stdin is not None:
            restore_stdin()


async def serve_stdio(server: MCPServer[Any] | Server[Any]) -> None:
    """Serve ``server`` over stdio until the client closes stdin (what ``run_stdio`` runs)."""
    lowlevel = server._lowlevel_server if isinstance(server, MCPServer) else server  # pyright: ignore[reportPrivateUsage]
    async with stdio_server() as (read_stream, write_stream):
        await lowlevel.run(read_stream, write_stream, lowlevel.create_initialization_options())


def run_stdio(server: MCPServer[Any] | Server[Any]) -> None:
    """Serve ``server`` (an ``MCPServer``, a ``FastRMCP`` or a low-level ``Server``) over stdio.

    The equivalent of ``MCPServer.run("stdio")`` (same event loop, same streams, same fd
    handling) with framing linear in the message size: a large argument costs what the pipe
    costs. ``FastRMCP.run()`` uses it already; call it for a server with :func:`install`.
    """
    anyio.run(serve_stdio, server)
