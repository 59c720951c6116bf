# pyright: strict
"""The streams of a transport wrapped by a FaultInjector: where each fault happens.

Requests are decided as the client writes them (every draw happens there, in the order the
client sends, so that a seed replays the same faults); a fault on the answer (``drop_response``,
``corrupt``, ``corrupt_chunk`` of a request without a chunk) is remembered by request id and
applied when the answer arrives.

Cutting a connection is local: the read side ends (the client's dispatcher sees the transport
end, as when a peer goes away) and later writes fail. The wrapped transport itself is closed by
the client leaving it, as after any connection loss. No task is added: a cut cancels the read
that waits, instead of a pump task standing between the transport and the client.
"""

from __future__ import annotations

import os
import random
import signal
from collections.abc import AsyncGenerator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal, Self, cast

import anyio
import attrs
from mcp.shared._stream_protocols import ReadStream, WriteStream
from mcp.shared.message import SessionMessage
from mcp_types import JSONRPCError, JSONRPCRequest, JSONRPCResponse, jsonrpc_message_adapter

from ..client import _stdio
from ..errors import RMCPConfigError

if TYPE_CHECKING:
    from .faults import FaultKind, FaultPlan

__all__ = ["Decision", "Recorder", "TransportStreams", "decide", "faulty_transport"]

TransportStreams = tuple[ReadStream[SessionMessage | Exception], WriteStream[SessionMessage]]

# Records one fault: (kind, method, request id, connection, ordinal, detail).
Recorder = Callable[["FaultKind", str, int | str, int, int, str], None]

# The faults that decide a request's fate (``delay`` only holds it).
TerminalKind = Literal[
    "drop_request", "drop_response", "duplicate", "disconnect", "corrupt", "kill", "corrupt_chunk"
]

# When several faults are drawn for one request, the first of these happens (a request is lost
# only once); ``delay`` combines with any of them.
TERMINAL_ORDER: Final[tuple[TerminalKind, ...]] = (
    "disconnect",
    "drop_request",
    "kill",
    "duplicate",
    "drop_response",
    "corrupt",
    "corrupt_chunk",
)


@attrs.frozen
class Decision:
    """The faults drawn for one request."""

    delay_s: float | None
    kind: TerminalKind | None


def _draw(seed: int, kind: str, connection: int, ordinal: int) -> random.Random:
    # A string seed is hashed with SHA-512 by random.Random: stable across runs and processes
    # (unlike hash()), and independent per (kind, connection, request).
    return random.Random(f"{seed}/{kind}/{connection}/{ordinal}")


def decide(plan: FaultPlan, connection: int, ordinal: int) -> Decision:
    """The faults of the ``ordinal``-th fault-drawing request of ``connection``: a pure
    function of the plan, so that a seed replays the same faults."""
    delay_s = None
    if plan.delay > 0 and _draw(plan.seed, "delay", connection, ordinal).random() < plan.delay:
        delay_s = _draw(plan.seed, "delay_s", connection, ordinal).uniform(*plan.delay_s)
    for kind in TERMINAL_ORDER:
        probability = plan.probability(kind)
        if probability > 0 and _draw(plan.seed, kind, connection, ordinal).random() < probability:
            return Decision(delay_s, kind)
    return Decision(delay_s, None)


class _Connection:
    """One wrapped connection: its number, its fault-drawing requests so far, the answer faults
    waiting for their answers, the server process (stdio) and whether it was cut."""

    def __init__(self, plan: FaultPlan, record: Recorder, number: int, pid: int | None) -> None:
        self.plan = plan
        self.record = record
        self.number = number
        self.pid = pid
        self.ordinal = 0
        self.cut = False
        # request id -> (fault, method, ordinal) for faults applied to the answer
        self.answer_faults: dict[int | str, tuple[FaultKind, str, int]] = {}
        # ids of the duplicates' copies, whose answers the client must not see
        self.swallowed: set[int | str] = set()
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
            if not (connection.answer_faults or connection.swallowed) or not isinstance(item, SessionMessage):
                return item
            message = item.message
            if not isinstance(message, JSONRPCResponse | JSONRPCError) or message.id is None:
                return item
            if message.id in connection.swallowed:
                connection.swallowed.discard(message.id)
                continue
            fault = connection.answer_faults.pop(message.id, None)
            if fault is None:
                return item
            kind, method, ordinal = fault
            if kind == "corrupt_chunk":
                damaged = _damaged_chunk(item, connection, ordinal, "result")
                if damaged is None:
                    return item  # an error, or no chunk in the answer: nothing to damage
                damaged_item, detail = damaged
                connection.record(kind, method, message.id, connection.number, ordinal, detail)
                return damaged_item
            connection.record(kind, method, message.id, connection.number, ordinal, "")
            if kind == "corrupt":
                return _garbled(item)
            if not connection.plan.silent:
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
        plan = connection.plan
        if not isinstance(message, JSONRPCRequest) or (
            plan.methods is not None and message.method not in plan.methods
        ):
            await self._inner.send(item)
            return
        connection.ordinal += 1
        ordinal = connection.ordinal
        decision = decide(plan, connection.number, ordinal)

        def record(kind: FaultKind, detail: str = "") -> None:
            connection.record(kind, message.method, message.id, connection.number, ordinal, detail)

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
                if not plan.silent:
                    connection.end()
            case "kill":
                await self._inner.send(item)
                assert connection.pid is not None  # checked when the connection was made
                record("kill", f"pid {connection.pid}")
                _kill(connection.pid)
            case "duplicate":
                await self._inner.send(item)
                record("duplicate")
                # The copy has an id of its own: transports and peers treat a reused id as the
                # same request (the SDK's HTTP client cancels the first POST), and the wrapper
                # swallows the copy's answer, which the client never asked for.
                copy_id = f"rmcp-duplicate-{connection.number}-{ordinal}"
                connection.swallowed.add(copy_id)
                await self._inner.send(
                    SessionMessage(message.model_copy(update={"id": copy_id}), item.metadata)
                )
            case "corrupt_chunk":
                damaged = _damaged_chunk(item, connection, ordinal, "params")
                if damaged is None:
                    # No chunk in the request (a read): the answer carries it.
                    connection.answer_faults[message.id] = ("corrupt_chunk", message.method, ordinal)
                    await self._inner.send(item)
                else:
                    damaged_item, detail = damaged
                    record("corrupt_chunk", detail)
                    await self._inner.send(damaged_item)
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


_BASE64_ALPHABET: Final = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_BASE64_SET: Final = frozenset(_BASE64_ALPHABET)


def _damaged_chunk(
    item: SessionMessage, connection: _Connection, ordinal: int, field: Literal["params", "result"]
) -> tuple[SessionMessage, str] | None:
    """``item`` with one character of its chunk's base64 ``data`` replaced by another, and a
    description, or None when the message carries no chunk.

    The message still parses and the data is still base64, so only the chunk's SHA-256 tells:
    the fault tests the verification of chunks, not the JSON parser. The character is one whose
    6 bits all count (any before the last group of 4, or that group's first: the others may
    hold the padding's unused bits), so the decoded bytes always differ.
    """
    message = item.message
    raw_body: object = getattr(message, field, None)
    if not isinstance(raw_body, dict):
        return None
    body = cast("dict[str, Any]", raw_body)
    data = body.get("data")
    if not isinstance(data, str) or len(data) < 4:
        return None
    rng = _draw(connection.plan.seed, "corrupt_chunk_at", connection.number, ordinal)
    position = rng.randrange(len(data) - 3)
    if data[position] not in _BASE64_SET:
        return None
    old = _BASE64_ALPHABET.index(data[position])
    new = _BASE64_ALPHABET[(old + rng.randrange(1, 64)) % 64]
    copy = message.model_copy(update={field: {**body, "data": data[:position] + new + data[position + 1 :]}})
    detail = f"chunk {body.get('index')}, character {position}"
    return SessionMessage(copy, item.metadata), detail


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
    plan: FaultPlan,
    transport: AbstractAsyncContextManager[TransportStreams],
    *,
    connect: Callable[[], int],
    record: Recorder,
) -> AsyncGenerator[TransportStreams]:
    """``transport`` with ``plan``'s faults (see :meth:`FaultInjector.wrap`); ``connect`` numbers
    the connection, ``record`` is told each fault."""
    number = connect()
    pids: list[int] = []
    async with AsyncExitStack() as stack:
        token = _stdio.spawned.set(pids.append)
        try:
            read_stream, write_stream = await stack.enter_async_context(transport)
        finally:
            _stdio.spawned.reset(token)
        if plan.kill > 0 and not pids:
            # Closed first: raised through the transport's task group, the error would reach the
            # user wrapped in an exception group.
            await stack.aclose()
            raise RMCPConfigError(
                "the kill fault needs a stdio server process it can see: wrap "
                "rmcp_actors.testing.stdio_client(params) (a drop-in for the SDK's stdio_client), "
                "or set kill=0 for this transport",
                path="kill",
            )
        connection = _Connection(plan, record, number, pids[-1] if pids else None)
        yield _FaultyReadStream(read_stream, connection), _FaultyWriteStream(write_stream, connection)
