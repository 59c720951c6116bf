"""The stdio client transport: the SDK's process handling with linear framing.

The SDK's ``mcp.client.stdio.stdio_client`` frames in time quadratic in a line's size (see
``rmcp_actors/_framing.py``): a 20 MiB result takes seconds where the pipe needs a tenth of that.
This transport keeps everything else of the SDK's, by calling the SDK's own functions: the same
spawn (default environment merged under ``env``, ``cwd``, stderr to ``errlog``, a new session so
the whole process group can be signalled), the same shutdown (close stdin, wait, SIGTERM the
group, wait, SIGKILL; same timeouts), the same drain of a server still writing. Only the two pipe
tasks differ: the reader looks for newlines in the newly arrived chunk only and parses bytes, the
writer serializes straight to bytes.

Two failures stay where they belong. A message that cannot be serialized (text no UTF-8 can
hold) fails that request alone, with an error answer written back to the session; the transport
goes on. A line from the server that is not UTF-8 is corruption of the byte stream: the answer
it carried belongs to a request nobody can name, so the transport ends (every call in flight
learns at once that its answer is lost) instead of leaving one call to wait out its timeout.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncGenerator, Callable
from contextlib import asynccontextmanager, suppress
from contextvars import ContextVar
from typing import TextIO

import anyio
import anyio.lowlevel
import mcp_types
from mcp.client import stdio as sdk_stdio
from mcp.client.stdio import StdioServerParameters, get_default_environment
from mcp.shared._stream_protocols import ReadStream, WriteStream
from mcp.shared.message import SessionMessage

from .._framing import LineSplitter, serialize

__all__ = ["spawned", "stdio_client"]

logger = logging.getLogger(__name__)

TransportStreams = tuple[ReadStream[SessionMessage | Exception], WriteStream[SessionMessage]]

# What one read asks of the pipe: the pipe's own capacity on Linux, as the SDK reads.
_READ_SIZE = 65536

# The SDK's private helpers this transport reuses, so that process handling stays the SDK's;
# if an SDK release renames one, importing this module fails at once (mcp is pinned to a minor).
_get_executable_command = sdk_stdio._get_executable_command  # pyright: ignore[reportPrivateUsage]
_create_process = sdk_stdio._create_platform_compatible_process  # pyright: ignore[reportPrivateUsage]
_stop_server_process = sdk_stdio._stop_server_process  # pyright: ignore[reportPrivateUsage]
_drain_stdout = sdk_stdio._drain_stdout  # pyright: ignore[reportPrivateUsage]
_WRITER_FLUSH_TIMEOUT = sdk_stdio._WRITER_FLUSH_TIMEOUT  # pyright: ignore[reportPrivateUsage]


# Told the pid of each server process spawned while it is set: how the fault injector
# (rmcp_actors.testing.faults) finds the process its ``kill`` fault kills.
spawned: ContextVar[Callable[[int], None] | None] = ContextVar("rmcp_stdio_spawned", default=None)


class UnreadableLineError(ValueError):
    """A line from the server is not UTF-8: the byte stream is corrupt."""


def parse_line(line: bytes | bytearray) -> SessionMessage | Exception:
    """Parse one line of JSON-RPC, returning a parse error as a value for the session to surface."""
    try:
        message = mcp_types.jsonrpc_message_adapter.validate_json(line, by_name=False)
    except ValueError as exc:
        try:
            # Only on the failure path: a valid message is never decoded twice.
            bytes(line).decode("utf-8")
        except UnicodeDecodeError as not_utf8:
            return UnreadableLineError(
                f"a line of {len(line):,} bytes from the MCP server is not UTF-8: {not_utf8}"
            )
        logger.warning("Failed to parse a JSON-RPC message from the MCP server: %s", exc)
        return exc
    return SessionMessage(message)


def _unsendable_answer(session_message: SessionMessage, error: Exception) -> SessionMessage | None:
    """The error answer that fails a request whose message cannot be serialized (None if it is
    not a request: a notification or an answer to the server is dropped, and logged)."""
    message = session_message.message
    if not isinstance(message, mcp_types.JSONRPCRequest):
        return None
    data = mcp_types.ErrorData(
        code=mcp_types.INVALID_PARAMS,
        message=f"the request cannot be serialized, so nothing was sent: {type(error).__name__}: {error}",
    )
    return SessionMessage(mcp_types.JSONRPCError(jsonrpc="2.0", id=message.id, error=data))


@asynccontextmanager
async def stdio_client(
    server: StdioServerParameters, errlog: TextIO = sys.stderr
) -> AsyncGenerator[TransportStreams]:
    """Spawn an MCP server subprocess and connect to it over its stdin and stdout.

    A drop-in for ``mcp.client.stdio.stdio_client`` (same arguments, same streams, same process
    handling) whose framing is linear in the message size. Messages are UTF-8: ``encoding`` and
    ``encoding_error_handler`` of ``server`` are not used; a line that is not valid UTF-8 JSON-RPC
    is passed on as an exception item, like any other unparsable line.

    Raises:
        OSError: The server process cannot be spawned.
        ValueError: The spawn parameters are invalid (embedded NUL bytes).
    """
    command = await _get_executable_command(server.command)
    process = await _create_process(
        command=command,
        args=server.args,
        env=get_default_environment() | (server.env or {}),
        errlog=errlog,
        cwd=server.cwd,
    )
    if (observer := spawned.get()) is not None:
        observer(process.pid)

    # As in the SDK: no await between the spawn and the task group, or a cancellation in the
    # gap would leak the live process.
    read_stream_writer, read_stream = anyio.create_memory_object_stream[SessionMessage | Exception](0)
    write_stream, write_stream_reader = anyio.create_memory_object_stream[SessionMessage](0)

    shutting_down = False
    writer_done = anyio.Event()

    async def stdout_reader() -> None:
        assert process.stdout, "the server process is spawned with pipes"
        splitter = LineSplitter()
        try:
            async with read_stream_writer:
                try:
                    # One chunk at a time: no read-ahead while a delivery is blocked.
                    while True:
                        try:
                            chunk = await process.stdout.receive(_READ_SIZE)
                        except anyio.EndOfStream:
                            return
                        for line in splitter.feed(chunk):
                            item = parse_line(line)
                            if isinstance(item, UnreadableLineError):
                                logger.error("Ending the session with the MCP server: %s", item)
                                # Closed before the drain, which lasts until the process exits.
                                await read_stream_writer.aclose()
                                return
                            try:
                                await read_stream_writer.send(item)
                            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                                return  # the session is gone; only the drain below remains
                finally:
                    await _drain_stdout(process)
        except anyio.ClosedResourceError:
            pass  # our own shutdown closed the stdout stream under the read
        except (anyio.BrokenResourceError, ConnectionError):
            if not shutting_down:
                logger.exception("Reading from the MCP server's stdout failed mid-session")

    async def fail_unsendable(session_message: SessionMessage, error: Exception) -> None:
        answer = _unsendable_answer(session_message, error)
        if answer is None:
            logger.error("Dropped a message to the MCP server that cannot be serialized: %r", error)
            return
        # A closed read side means the session is gone, and its callers with it.
        with suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
            await read_stream_writer.send(answer)

    async def stdin_writer() -> None:
        assert process.stdin, "the server process is spawned with pipes"
        try:
            async with write_stream_reader:
                async for session_message in write_stream_reader:
                    try:
                        line = serialize(session_message)
                    except Exception as error:  # whatever it is, it is that message's alone
                        await fail_unsendable(session_message, error)
                        continue
                    await process.stdin.send(line)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, OSError):
            # The server may still be alive: end the read side so that the session sees the
            # connection end instead of a request waiting forever.
            await read_stream_writer.aclose()
        finally:
            writer_done.set()

    async def shutdown() -> None:
        # The SDK's order: unblock the reader into its drain (a server stuck writing cannot read
        # its stdin), let the writer flush what it accepted, then stop the process.
        read_stream.close()
        write_stream.close()
        with anyio.move_on_after(_WRITER_FLUSH_TIMEOUT):
            await writer_done.wait()
        await _stop_server_process(process)
        for stream in (read_stream, write_stream, read_stream_writer, write_stream_reader):
            await stream.aclose()
        await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as task_group:
        task_group.start_soon(stdout_reader)
        task_group.start_soon(stdin_writer)
        try:
            yield read_stream, write_stream
        finally:
            shutting_down = True
            # Every wait inside is bounded; shielded so that a cancelled caller cannot leak
            # the server process.
            with anyio.CancelScope(shield=True):
                await shutdown()
            task_group.cancel_scope.cancel()
