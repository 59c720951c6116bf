# pyright: strict
"""The streams of a transport wrapped by a FaultInjector: where each fault happens.

Requests are decided as the client writes them (every draw happens there, in the order the
client sends, so that a seed replays the same faults); a fault on the answer (``drop_response``,
``corrupt``) is remembered by request id and applied when the answer arrives.

Cutting a connection is local: the read side ends (the client's dispatcher sees the transport
end, as when a peer goes away) and later writes fail. The wrapped transport itself is closed by
the client leaving it, as after any connection loss. No task is added: a cut cancels the read
that waits, instead of a pump task standing between the transport and the client.
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncGenerator
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import anyio
from mcp.shared._stream_protocols import ReadStream, WriteStream
from mcp.shared.message import SessionMessage
from mcp_types import JSONRPCError, JSONRPCRequest, JSONRPCResponse, jsonrpc_message_adapter

from ..client import _stdio
from ..errors import RMCPConfigError

if TYPE_CHECKING:
    from .faults import FaultInjector, FaultKind

__all__ = ["TransportStreams", "faulty_transport"]

TransportStreams = tuple[ReadStream[SessionMessage | Exception], WriteStream[SessionMessage]]


class _Connection:
    """One wrapped connection: its number, its fault-drawing requests so far, the answer faults
    waiting for their answers, the server process (stdio) and whether it was cut."""

    def __init__(self, injector: FaultInjector, number: int, pid: int | None) -> None:
        self.injector = injector
        self.number = number
        self.pid = pid
        self.ordinal = 0
        self.cut = False
        # request id -> (fault, method, ordinal) for faults applied to the answer
        self.answer_faults: dict[int | str, tuple[FaultKind, str, int]] = {}
        self.waiting_read: anyio.CancelScope | None = None

    def end(self) -> None:
        """Cut the connection: the waiting read ends now, every later read and write fails."""
        self.cut = True
        if self.waiting_read is not None:
            self.waiting_read.cancel()


class _FaultyReadStream:
    def __init__(self, inner: ReadStream[SessionMessage | Exception], connection: _Connection) -> None:
        self._inner = inner
        self._connection = connection

    async def receive(self) -> SessionMessage | Exception:
        connection = self._connection
        while True:
            if connection.cut:
                raise anyio.EndOfStream
            item = await self._receive_unless_cut()
            if not connection.answer_faults or not isinstance(item, SessionMessage):
                return item
            message = item.message
            if not isinstance(message, JSONRPCResponse | JSONRPCError) or message.id is None:
                return item
            fault = connection.answer_faults.pop(message.id, None)
            if fault is None:
                return item
            kind, method, ordinal = fault
            connection.injector.record(kind, method, message.id, connection.number, ordinal)
            if kind == "corrupt":
                return _garbled(item)
            if not connection.injector.plan.silent:
                connection.end()
            # drop_response: read on, as if the answer had never come

    async def _receive_unless_cut(self) -> SessionMessage | Exception:
        connection = self._connection
        with anyio.CancelScope() as scope:
            connection.waiting_read = scope
            try:
                return await self._inner.receive()
            finally:
                connection.waiting_read = None
        assert scope.cancelled_caught
        raise anyio.EndOfStream  # cut while waiting

    async def aclose(self) -> None:
        await self._inner.aclose()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> SessionMessage | Exception:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    @property
    def last_context(self) -> Any:
        return getattr(self._inner, "last_context", None)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class _FaultyWriteStream:
    def __init__(self, inner: WriteStream[SessionMessage], connection: _Connection) -> None:
        self._inner = inner
        self._connection = connection

    async def send(self, item: SessionMessage, /) -> None:
        connection = self._connection
        if connection.cut:
            raise anyio.BrokenResourceError
        message = item.message
        injector = connection.injector
        if not isinstance(message, JSONRPCRequest) or (
            injector.plan.methods is not None and message.method not in injector.plan.methods
        ):
            await self._inner.send(item)
            return
        connection.ordinal += 1
        ordinal = connection.ordinal
        decision = injector.decide(connection.number, ordinal)

        def record(kind: FaultKind, detail: str = "") -> None:
            injector.record(kind, message.method, message.id, connection.number, ordinal, detail)

        if decision.delay_s is not None:
            record("delay", f"{decision.delay_s:.6f} s")
            await anyio.sleep(decision.delay_s)
            if connection.cut:
                raise anyio.BrokenResourceError
        match decision.kind:
            case None:
                await self._inner.send(item)
            case "disconnect":
                record("disconnect")
                connection.end()
                raise anyio.BrokenResourceError
            case "drop_request":
                record("drop_request")
                if not injector.plan.silent:
                    connection.end()
            case "kill":
                await self._inner.send(item)
                assert connection.pid is not None  # checked when the connection was made
                record("kill", f"pid {connection.pid}")
                _kill(connection.pid)
            case "duplicate":
                await self._inner.send(item)
                record("duplicate")
                await self._inner.send(item)
            case "drop_response" | "corrupt":
                connection.answer_faults[message.id] = (decision.kind, message.method, ordinal)
                await self._inner.send(item)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def _garbled(item: SessionMessage) -> Exception:
    """What a transport passes on for a line that does not parse: this answer, cut in half."""
    line = item.message.model_dump_json(by_alias=True, exclude_unset=True).encode()
    try:
        jsonrpc_message_adapter.validate_json(line[: len(line) // 2], by_name=False)
    except ValueError as parse_error:
        return parse_error
    return ValueError("a corrupted message from the MCP server")  # pragma: no cover - half never parses


def _kill(pid: int) -> None:
    # The stdio transport starts the server in a session of its own: killing the group also
    # kills what a wrapper command (npx, uv run) started.
    try:
        if hasattr(os, "killpg"):
            os.killpg(pid, signal.SIGKILL)
        else:  # pragma: no cover - Windows: TerminateProcess
            os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass  # it died on its own meanwhile


@asynccontextmanager
async def faulty_transport(
    injector: FaultInjector, transport: AbstractAsyncContextManager[TransportStreams]
) -> AsyncGenerator[TransportStreams]:
    """``transport`` with ``injector``'s faults (see :meth:`FaultInjector.wrap`)."""
    number = injector.next_connection()
    pids: list[int] = []
    async with AsyncExitStack() as stack:
        token = _stdio.spawned.set(pids.append)
        try:
            read_stream, write_stream = await stack.enter_async_context(transport)
        finally:
            _stdio.spawned.reset(token)
        if injector.plan.kill > 0 and not pids:
            # Closed first: raised through the transport's task group, the error would reach the
            # user wrapped in an exception group.
            await stack.aclose()
            raise RMCPConfigError(
                "the kill fault needs a stdio server process it can see: wrap "
                "rmcp_actors.testing.stdio_client(params) (a drop-in for the SDK's stdio_client), "
                "or set kill=0 for this transport",
                path="kill",
            )
        connection = _Connection(injector, number, pids[-1] if pids else None)
        yield _FaultyReadStream(read_stream, connection), _FaultyWriteStream(write_stream, connection)
