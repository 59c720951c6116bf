"""Chunked transfer on the client: result items read in chunks, string arguments uploaded.

docs/protocol.md section 9 is the wire; :mod:`rmcp_actors._transfer` its Structs. Only a server
advertising the ``"transfer"`` feature is sent ``_meta.rmcp.transfer`` (and uploads), so a plain
server, and a call without large payloads, never reaches anything here but one check.

Results: after the answer (outside the attempt loop: the tool ran, and a chunk read is safe to
repeat), each ``resource_link`` standing for a transferred item is read chunk by chunk, each
chunk checked against ``handle.chunks[i]`` and read again when it does not match. Verified
chunks are taken in order: decoded one by one onto the rebuilt content item's value, which grows
in place (reassembly: at most ``parallel`` chunks held besides), or handed to the caller's sink
(streaming: at most ``2 * parallel`` chunks held). A lost connection waits for the connection
actor's reconnect and resumes with the chunks not yet verified.

Arguments: a string argument larger than ``threshold`` is uploaded before the ``tools/call``
(open, then write the chunks the server lacks), and the call carries ``""`` in its place and
``_meta.rmcp.uploads``. Uploads are content-addressed, so a retried call re-sends only what the
server does not hold.
"""

from __future__ import annotations

import base64
import codecs
import hashlib
import logging
import math
import os
from collections.abc import Awaitable, Callable, Generator, Sequence
from typing import IO, Any, Final, Protocol, cast

import anyio
import attrs
import msgspec
from mcp import MCPError
from mcp_types import INTERNAL_ERROR, CallToolResult, ContentBlock, Request, RequestParams
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from .._protocol import META_KEY, ServerSettings
from .._transfer import (
    CHUNK_INVALID_CODE,
    FEATURE_TRANSFER,
    METHOD_OPEN,
    METHOD_READ,
    METHOD_WRITE,
    MIN_CHUNK_SIZE,
    STRUCTURED_META_KEY,
    TRANSFER_NOT_FOUND_CODE,
    TRANSFER_URI_PREFIX,
    Encoding,
    OpenResult,
    TransferAccept,
    TransferHandle,
    TransferredContent,
    TransferredStructured,
    Upload,
    decode_chunk,
    encode_chunk,
    handle_for,
    upload_id,
)
from ..errors import RMCPArgumentError, RMCPError, RMCPResultValidationError, RMCPTransferError
from ..lifecycle import RequestState
from ..result import CallResult, TransferStatistics
from ._failures import Attempt, Evidence, classify
from ._http_evidence import current_evidence
from .connection import Connection

__all__ = [
    "CallTransfer",
    "ResultSink",
    "TransferProgressCallback",
    "UploadPlan",
    "accept_for",
    "carries_transfers",
    "check_output",
    "check_sink",
    "chunk_size_for",
    "fetch_results",
    "fetch_structured",
    "plan_uploads",
    "transfers_on",
    "upload_arguments",
]

_logger = logging.getLogger("rmcp_actors")

ResultSink = str | os.PathLike[str] | IO[bytes] | Callable[[bytes], Awaitable[object]]
"""Where ``sup.call(result_sink=...)`` streams transferred result payloads: a file path
(created or truncated), a binary file object (written with ``write``, in a worker thread), or
an async callable awaited with each verified piece in order (``send`` of a memory object
stream makes it an async iterator for another task)."""

TransferProgressCallback = Callable[[int, int], None]
"""``(done_bytes, total_bytes)`` of the payloads moving in chunks: the uploads first, then the
result items. Called synchronously after each verified chunk; it must not block."""

Recorder = Callable[[RequestState, str], None]


class TransferPolicy(Protocol):
    """The keys of ``transfer`` the client reads (``TransferPolicy`` in config)."""

    @property
    def chunk_size(self) -> int: ...
    @property
    def parallel(self) -> int: ...
    @property
    def threshold(self) -> int: ...
    @property
    def max_bytes_per_s(self) -> int: ...


# A chunk that arrives corrupt (or is refused as corrupt) this many times in a row stops the
# transfer: a link that corrupts every copy will not deliver the next one either.
_MAX_TRIES_PER_CHUNK: Final = 8
# Rounds of open-then-write of one upload when the server loses it between the two (-32030).
_MAX_UPLOAD_ROUNDS: Final = 3
# Bytes of an SSE event that are not the chunk's base64: the JSON-RPC envelope and event framing.
_SSE_OVERHEAD: Final = 4096
# Room before the caller's deadline, so the SDK's own timeout fires first (as in call.py).
_SDK_TIMEOUT_MARGIN_S: Final = 0.02


@attrs.define(eq=False)
class CallTransfer:
    """What one call carries for chunked transfer (made only when it needs any of it).

    Attributes:
        sink: Where transferred result payloads go; ``None`` reassembles them into ``content``.
        on_progress: The caller's ``(done_bytes, total_bytes)`` callback.
        uploads: The call's upload plan, once its arguments were scanned (``None`` before, or
            when none is large enough).
        scanned: The arguments were scanned (a ``None`` plan then means "nothing to upload").
        statistics: The uploads' statistics, as of the latest attempt.
        counts: Each upload's counts (by id), kept over the call's attempts.
    """

    sink: ResultSink | None = None
    on_progress: TransferProgressCallback | None = None
    uploads: UploadPlan | None = None
    scanned: bool = False
    statistics: list[TransferStatistics] = attrs.Factory(list[TransferStatistics])
    counts: dict[str, _Counts] = attrs.Factory(dict[str, "_Counts"])
    structured: bool = False
    """The answered attempt accepted a transferred ``structuredContent``: the output schema is
    checked after the payloads are read (:func:`fetch_structured`)."""
    # One upload at a time: a hedge sent while the first attempt still uploads waits for it
    # and then finds every chunk held, instead of sending the same chunks beside it. Made at
    # the first upload (a pending call without one holds no lock: "Memory per pending call").
    uploading: anyio.Lock | None = None


def check_sink(sink: object, server: str, tool: str) -> None:
    """Raise unless ``sink`` is a :data:`ResultSink`.

    Raises:
        RMCPArgumentError: It is none of a path, a binary file object or a callable; nothing
            was sent.
    """
    if isinstance(sink, str | os.PathLike) or callable(sink) or callable(getattr(sink, "write", None)):
        return
    raise RMCPArgumentError(
        f"result_sink must be a file path, a binary file object or an async callable taking bytes, "
        f"got {type(sink).__name__}; nothing was sent",
        server=server,
        tool=tool,
    )


def transfers_on(settings: ServerSettings | None) -> bool:
    """Whether the server advertises chunked transfer."""
    return settings is not None and FEATURE_TRANSFER in settings.features


def accept_for(policy: TransferPolicy, connection: Connection, *, structured: bool = False) -> TransferAccept:
    """``_meta.rmcp.transfer`` of a call to ``connection``'s server; ``structured``: the call
    takes a transferred ``structuredContent`` (its validation then deferred, see
    :data:`~rmcp_actors.client._validation.validation_deferred`)."""
    sse_limit = connection.policy.max_sse_event_bytes if connection.spec.transport == "http" else None
    return TransferAccept(
        threshold=policy.threshold,
        chunk_size=chunk_size_for(policy.chunk_size, sse_limit),
        structured=structured,
    )


def chunk_size_for(chunk_size: int, sse_limit: int | None) -> int:
    """The chunk size to ask for: ``chunk_size``, cut (to a multiple of 4 KiB) over streamable
    HTTP so that one chunk's base64 answer fits the SDK's ``sse_limit`` for an event."""
    if sse_limit is None:
        return chunk_size
    fitting = (sse_limit - _SSE_OVERHEAD) * 3 // 4
    return min(chunk_size, max(fitting // MIN_CHUNK_SIZE * MIN_CHUNK_SIZE, MIN_CHUNK_SIZE))


# -- the requests ---------------------------------------------------------------------------


class _Params(RequestParams):
    # The wire's own names (snake_case, as _transfer.py's Structs write them) ride as extras,
    # which the SDK's camelCase aliasing leaves alone.
    model_config = ConfigDict(extra="allow")


class _TransferRequest(Request[_Params, str]):
    method: str
    params: _Params


class _Answer(BaseModel):
    """Any JSON object: the fields are read with msgspec, by the wire's own names."""

    model_config = ConfigDict(extra="allow")


_CONTENT: Final = TypeAdapter[ContentBlock](ContentBlock)


class _Gone(Exception):
    """The server does not hold the transfer (-32030)."""


class _Refused(Exception):
    """The server answered a chunk request with an error that repeating will not change."""


@attrs.define(eq=False)
class _Counts:
    bytes_moved: int = 0
    refetched: int = 0
    resent: int = 0
    already_held: int = 0
    reconnects: int = 0
    # The chunks of an upload written so far, over every attempt: writing one again is a resend.
    sent: set[int] = attrs.Factory(set[int])
    # The chunks of an upload counted in the progress, over every attempt: a chunk the server
    # lost (restarted with a memory store) and is sent again does not count twice.
    reported: set[int] = attrs.Factory(set[int])


@attrs.define(eq=False)
class _Link:
    """Sends chunk requests on the connection's current session, waiting for a reconnect
    (``wait_session``, within the caller's deadline) when the session is lost: every chunk
    request is safe to repeat."""

    connection: Connection
    deadline: float
    record: Recorder
    # Sessions seen lost: the parallel requests that lose one session count one reconnect.
    lost: set[int] = attrs.Factory(set[int])

    async def send(self, method: str, params: dict[str, Any], counts: _Counts, kind: str) -> dict[str, Any]:
        """The answer's fields; a lost answer is asked for again (``kind`` says which count
        grows: ``"read"`` refetched, ``"write"`` resent).

        Raises:
            _Gone: -32030, the server does not hold the transfer.
            _Refused: Another error answer, or an answer that cannot be read.
            MCPError: -32031, a written chunk refused as corrupt.
            RMCPError: No session can be had (``when_disconnected = "fail"``, the connection
                closed, credentials refused).
        """
        request = _TransferRequest(method=method, params=_Params(**params))
        repeated = False
        internal_errors = lost_answers = 0
        while True:
            connection = self.connection
            session = connection.current_session() or await connection.wait_session()
            if not transfers_on(session.rmcp):
                raise _Refused("the server (reconnected) no longer advertises 'transfer'")
            client = session.client
            assert client is not None  # usable
            if repeated:
                if kind == "read":
                    counts.refetched += 1
                else:
                    counts.resent += 1
            repeated = True
            evidence = Evidence() if connection.spec.transport == "http" else None
            token = current_evidence.set(evidence) if evidence is not None else None
            try:
                remaining = self.deadline - anyio.current_time()
                answer = await client.session.send_request(
                    request,
                    _Answer,
                    request_read_timeout_seconds=max(remaining - _SDK_TIMEOUT_MARGIN_S, 0.001),
                )
                return answer.model_extra or {}
            except MCPError as error:
                if error.code == TRANSFER_NOT_FOUND_CODE:
                    raise _Gone(error.message) from error
                if error.code == CHUNK_INVALID_CODE:
                    raise
                if error.code == INTERNAL_ERROR and internal_errors < _MAX_TRIES_PER_CHUNK:
                    internal_errors += 1  # a store failure on the server (section 9.4): ask again
                    continue
                verdict = classify(
                    error, evidence, transport_closed=session.broken.is_set(), handed_over=True
                )
                if (
                    verdict is not None
                    and verdict.attempt is Attempt.TIMED_OUT
                    and self.deadline - anyio.current_time() < 2 * _SDK_TIMEOUT_MARGIN_S
                ):
                    # The SDK's timeout, set to the call's deadline less a margin: asking again
                    # could not be answered in time and would hide the timeout behind "lost
                    # answers". The caller's scope at the deadline ends the transfer as one.
                    await anyio.sleep_until(self.deadline)
                    raise _Refused(verdict.reason) from error
                if verdict is None or verdict.attempt in (
                    Attempt.ANSWERED,
                    Attempt.UNREADABLE,
                    Attempt.UNAUTHORIZED,
                ):
                    raise _Refused(verdict.reason if verdict is not None else str(error)) from error
                if verdict.session_lost or session.broken.is_set():
                    connection.report_broken(session)
                    if session.generation not in self.lost:
                        self.lost.add(session.generation)
                        counts.reconnects += 1
                        self.record(RequestState.TRANSFER, f"connection lost ({verdict.reason}): resuming")
                else:
                    # An answer lost on a session still up (an HTTP stream cut): ask again, a few
                    # times; the next session, when this one breaks, is waited for above.
                    lost_answers += 1
                    if lost_answers >= _MAX_TRIES_PER_CHUNK:
                        raise _Refused(
                            f"the answer was lost {lost_answers} times ({verdict.reason})"
                        ) from error
            except ValidationError as error:
                raise _Refused(f"the answer is not a transfer answer: {error}") from error
            finally:
                if token is not None:
                    current_evidence.reset(token)


@attrs.define(eq=False)
class _Pacer:
    """``max_bytes_per_s`` over all of a call's chunks: each chunk reserves its share of time."""

    rate: int
    free_at: float = -math.inf

    async def take(self, size: int) -> None:
        if not self.rate:
            return
        now = anyio.current_time()
        start = max(now, self.free_at)
        self.free_at = start + size / self.rate
        if start > now:
            await anyio.sleep_until(start)


@attrs.define(eq=False)
class _Meter:
    """Bytes verified so far against the total, reported to the caller's callback."""

    total: int
    callback: TransferProgressCallback | None
    done: int = 0

    def advance(self, size: int) -> None:
        self.done += size
        if self.callback is not None:
            try:
                self.callback(self.done, self.total)
            except Exception:
                # The user's callback: its bug must not cost the payload.
                _logger.exception("on_transfer_progress callback raised")


async def _run_workers(count: int, parallel: int, work: Callable[[int], Awaitable[None]]) -> None:
    """Run ``work(index)`` for every index in order of start, ``parallel`` at once; the first
    failure cancels the rest and is raised as itself (not in a group)."""
    next_index = 0
    failure: BaseException | None = None

    async def worker(scope: anyio.CancelScope) -> None:
        nonlocal next_index, failure
        while next_index < count:
            index = next_index
            next_index += 1
            try:
                await work(index)
            except Exception as error:
                if failure is None:
                    failure = error
                scope.cancel()
                return

    if parallel <= 1 or count <= 1:
        while next_index < count:
            index = next_index
            next_index += 1
            await work(index)
        return
    async with anyio.create_task_group() as group:
        for _ in range(min(parallel, count)):
            group.start_soon(worker, group.cancel_scope)
    if failure is not None:
        raise failure


# -- results --------------------------------------------------------------------------------


def _transferred(block: ContentBlock) -> TransferredContent | None:
    if block.type != "resource_link" or not block.uri.startswith(TRANSFER_URI_PREFIX):
        return None
    rmcp: object = (block.meta or {}).get(META_KEY)
    raw = cast("dict[str, object]", rmcp).get("transfer") if isinstance(rmcp, dict) else None
    if raw is None:
        return None
    try:
        item = msgspec.convert(raw, TransferredContent)
    except msgspec.ValidationError:
        return None
    handle = item.handle
    expected = max(1, -(-handle.size // handle.chunk_size)) if handle.chunk_size > 0 else -1
    return item if len(handle.chunks) == expected and handle.size >= 0 else None


def carries_transfers(result: CallToolResult) -> bool:
    """Whether an answer holds any transferred item (a ``resource_link`` to ``rmcp://transfer/``)."""
    return any(
        block.type == "resource_link" and block.uri.startswith(TRANSFER_URI_PREFIX)
        for block in result.content
    )


class _Ordered:
    """Hands verified chunks to a writer in order, holding at most ``window`` of them."""

    def __init__(self, write: Callable[[bytes], Awaitable[object]], window: int) -> None:
        self.write = write
        self.window = window
        self.next = 0
        self.pending: dict[int, bytes] = {}
        self.lock = anyio.Lock()
        self.advanced = anyio.Event()
        self.digest = hashlib.sha256()

    async def room_for(self, index: int) -> None:
        while index >= self.next + self.window:
            await self.advanced.wait()

    async def put(self, index: int, data: bytes) -> None:
        self.pending[index] = data
        async with self.lock:
            while (ready := self.pending.pop(self.next, None)) is not None:
                self.digest.update(ready)
                await self.write(ready)
                self.next += 1
                self.advanced.set()
                self.advanced = anyio.Event()


class _SinkFailed(Exception):
    """The caller's sink raised; the transfer stops."""


def _sink_writer(sink: ResultSink, opened: IO[bytes] | None) -> Callable[[bytes], Awaitable[object]]:
    target = opened if opened is not None else sink

    async def write(data: bytes) -> None:
        try:
            if callable(target):
                await target(data)
            elif opened is None:
                # The caller's file object may block for good (a pipe nobody reads): the
                # call's deadline or cancel leaves the thread to it rather than wait.
                await anyio.to_thread.run_sync(cast("IO[bytes]", target).write, data, abandon_on_cancel=True)
            else:
                await anyio.to_thread.run_sync(opened.write, data)
        except Exception as error:
            raise _SinkFailed(f"{type(error).__name__}: {error}") from error

    return write


async def _read_chunk(
    link: _Link, handle: TransferHandle, index: int, pacer: _Pacer, counts: _Counts
) -> bytes:
    length = handle.chunk_length(index)
    for _ in range(_MAX_TRIES_PER_CHUNK):
        await pacer.take(length)
        answer = await link.send(METHOD_READ, {"id": handle.id, "index": index}, counts, "read")
        data = answer.get("data")
        raw = decode_chunk(data, handle.chunks[index]) if isinstance(data, str) else None
        counts.bytes_moved += length
        if raw is not None:
            return raw
        counts.refetched += 1  # corrupt on the way: read it again
    raise _Refused(f"chunk {index} arrived corrupt {_MAX_TRIES_PER_CHUNK} times in a row")


async def _read_payload(
    link: _Link,
    handle: TransferHandle,
    parallel: int,
    pacer: _Pacer,
    counts: _Counts,
    meter: _Meter,
    ordered: _Ordered,
) -> None:
    """Read every chunk of ``handle`` through ``ordered``."""

    async def read(index: int) -> None:
        await ordered.room_for(index)
        raw = await _read_chunk(link, handle, index, pacer, counts)
        await ordered.put(index, raw)
        meter.advance(len(raw))

    await _run_workers(handle.chunk_count, parallel, read)
    if ordered.digest.hexdigest() != handle.sha256:
        raise _Refused("the chunks verify one by one but not as a whole (the handle is inconsistent)")


def _grow(encoding: Encoding) -> Generator[None, bytes | None, str]:
    """The value of a payload field, grown from the payload's chunks sent in order (``None``
    ends it): UTF-8 decoded, or base64 encoded (3 bytes carried over a chunk boundary).

    ``value`` is a local nothing else refers to, so CPython's ``+=`` resizes the string in place
    (a realloc, an mremap once it is large) instead of copying it: the payload is never held
    as bytes and as a string at once (docs/design.md, "Reassembly grows the string")."""
    value = ""
    if encoding == "base64":
        carry = b""
        while (data := (yield)) is not None:
            data = carry + data
            cut = len(data) - len(data) % 3
            carry = data[cut:]
            value += base64.b64encode(memoryview(data)[:cut]).decode("ascii")
        value += base64.b64encode(carry).decode("ascii")
    else:
        decoder = codecs.getincrementaldecoder("utf-8")()
        while (data := (yield)) is not None:
            value += decoder.decode(data)
        value += decoder.decode(b"", final=True)
    return value


class _Growing:
    """A writer for :class:`_Ordered` that grows a payload field's value (:func:`_grow`)."""

    def __init__(self, encoding: Encoding) -> None:
        self._steps = _grow(encoding)
        next(self._steps)

    async def write(self, data: bytes) -> None:
        self._steps.send(data)

    def finish(self) -> str:
        try:
            self._steps.send(None)
        except StopIteration as done:
            return cast("str", done.value)
        raise AssertionError("_grow returns once sent None")


def _rebuild(item: TransferredContent, value: str) -> ContentBlock:
    """The original content item, its payload field set to ``value``."""
    content = dict(item.content)
    *parents, name = item.field.split(".")
    inner = content
    for parent in parents:
        nested = dict(cast("dict[str, object]", inner.get(parent) or {}))
        inner[parent] = nested
        inner = nested
    inner[name] = value
    return _CONTENT.validate_python(content)


def _sink_path(sink: ResultSink | None) -> str | None:
    """The file a sink names, or None for a file object or a callable."""
    if isinstance(sink, str | os.PathLike):
        return os.fspath(cast("str | os.PathLike[str]", sink))
    return None


async def fetch_results(
    connection: Connection,
    policy: TransferPolicy,
    result: CallResult,
    deadline: float,
    transfer: CallTransfer | None,
    record: Recorder,
) -> CallResult:
    """Read the transferred items of ``result`` and return it with them rebuilt (or streamed
    to the sink, the handles then left in ``content``), with their statistics.

    Raises:
        RMCPTransferError: A payload could not be read; ``result`` on the error is the answer
            with the handles, its outcome the tool's.
    """
    sink = transfer.sink if transfer is not None else None
    # The uploads' statistics come first (they moved first).
    statistics: list[TransferStatistics] = list(transfer.statistics) if transfer is not None else []
    items = [(index, _transferred(block)) for index, block in enumerate(result.content)]
    wanted = [(index, item) for index, item in items if item is not None]
    if not wanted:
        return attrs.evolve(result, transfers=tuple(statistics)) if statistics else result
    link = _Link(connection, deadline, record)
    pacer = _Pacer(policy.max_bytes_per_s)
    meter = _Meter(sum(item.handle.size for _, item in wanted), transfer.on_progress if transfer else None)
    content = list(result.content)
    opened: IO[bytes] | None = None
    path = _sink_path(sink)
    described = path if path is not None or sink is None else repr(sink)
    where = ""
    counts = _Counts()
    try:
        with anyio.move_on_at(deadline) as scope:
            if path is not None:
                try:
                    opened = await anyio.to_thread.run_sync(_open_for_writing, path)
                except OSError as error:
                    raise _SinkFailed(f"{type(error).__name__}: {error}") from error
            for index, item in wanted:
                handle = item.handle
                where = f"content[{index}]"
                record(
                    RequestState.TRANSFER,
                    f"reading {where}: {handle.size} bytes in {handle.chunk_count} chunk(s)",
                )
                counts = _Counts()
                started = anyio.current_time()
                growing = None
                if sink is not None:
                    ordered = _Ordered(_sink_writer(sink, opened), max(2 * policy.parallel, 2))
                else:
                    # Reassembled: the chunks out of order wait, at most ``parallel`` of them.
                    growing = _Growing(handle.encoding)
                    ordered = _Ordered(growing.write, max(policy.parallel, 1))
                await _read_payload(link, handle, policy.parallel, pacer, counts, meter, ordered)
                if growing is not None:
                    content[index] = _rebuild(item, growing.finish())
                statistics.append(_result_statistics(handle, where, counts, started, described))
                record(
                    RequestState.TRANSFER,
                    f"{where} verified ({counts.refetched} chunk(s) read again, "
                    f"{counts.reconnects} reconnect(s))",
                )
    except (_Gone, _Refused, _SinkFailed, RMCPError) as error:
        raise _result_error(error, where, described, result, counts, record) from error
    finally:
        if opened is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(opened.close)
    if scope.cancelled_caught:
        raise _result_error(None, where, described, result, counts, record)
    return attrs.evolve(result, content=content, transfers=tuple(statistics))


async def fetch_structured(
    connection: Connection,
    policy: TransferPolicy,
    result: CallResult,
    deadline: float,
    record: Recorder,
) -> CallResult:
    """``result`` with its transferred ``structuredContent`` (``_meta["rmcp.structured"]``, read
    after :func:`fetch_results` rebuilt the content) put back; ``result`` itself when it has none.

    Raises:
        RMCPTransferError: The payload could not be read, or is not a JSON object; the tool ran.
    """
    raw = (result.meta or {}).get(STRUCTURED_META_KEY)
    if raw is None:
        return result
    where = "structuredContent"
    counts = _Counts()
    try:
        try:
            described = msgspec.convert(raw, TransferredStructured)
        except msgspec.ValidationError as error:
            raise _Refused(f"its description in _meta is malformed: {error}") from error
        if described.result_of is not None:
            index = described.result_of
            block = result.content[index] if 0 <= index < len(result.content) else None
            if block is None or block.type != "text":
                raise _Refused(f"it repeats content[{index}], which is not a text item")
            return attrs.evolve(result, structured_content={"result": block.text})
        handle = described.handle
        if handle is None or len(handle.chunks) != max(1, -(-handle.size // max(handle.chunk_size, 1))):
            raise _Refused("its description in _meta has neither a reference nor a valid handle")
        record(
            RequestState.TRANSFER, f"reading {where}: {handle.size} bytes in {handle.chunk_count} chunk(s)"
        )
        started = anyio.current_time()
        payload = bytearray()

        async def collect(data: bytes) -> None:
            payload.extend(data)

        with anyio.move_on_at(deadline) as scope:
            await _read_payload(
                _Link(connection, deadline, record),
                handle,
                policy.parallel,
                _Pacer(policy.max_bytes_per_s),
                counts,
                _Meter(handle.size, None),
                _Ordered(collect, max(policy.parallel, 1)),
            )
        if scope.cancelled_caught:
            raise _result_error(None, where, None, result, counts, record)
        try:
            structured: object = msgspec.json.decode(payload)
        except msgspec.DecodeError as error:
            raise _Refused(f"its payload is not JSON: {error}") from error
        if not isinstance(structured, dict):
            raise _Refused("its payload is not a JSON object")
    except (_Gone, _Refused, RMCPError) as error:
        if isinstance(error, RMCPTransferError):
            raise
        raise _result_error(error, where, None, result, counts, record) from error
    statistics = _result_statistics(handle, where, counts, started)
    return attrs.evolve(
        result,
        structured_content=cast("dict[str, Any]", structured),
        transfers=(*result.transfers, statistics),
    )


def _result_statistics(
    handle: TransferHandle, where: str, counts: _Counts, started: float, sink: str | None = None
) -> TransferStatistics:
    """What reading one result payload took, for ``CallResult.transfers``."""
    return TransferStatistics(
        direction="result",
        where=where,
        transfer_id=handle.id,
        size=handle.size,
        sha256=handle.sha256,
        chunks=handle.chunk_count,
        bytes_moved=counts.bytes_moved,
        refetched=counts.refetched,
        reconnects=counts.reconnects,
        elapsed_s=anyio.current_time() - started,
        sink=sink,
    )


async def check_output(connection: Connection, result: CallResult) -> None:
    """Check ``result`` against its tool's output schema, as the SDK's ``call_tool`` checks an
    answer (deferred for a call that accepted a transferred ``structuredContent``).

    Raises:
        RMCPResultValidationError: It breaks the schema; the tool ran.
    """
    session = connection.current_session()
    if result.is_error or session is None or session.client is None:
        return
    answer = CallToolResult(content=list(result.content))
    if result.structured_content is not None:
        answer.structured_content = result.structured_content
    try:
        await session.client.session.validate_tool_result(result.tool, answer)
    except RuntimeError as error:
        raise RMCPResultValidationError(
            f"the result breaks the tool's output schema: {error}; the tool ran",
            server=result.server,
            tool=result.tool,
            request_id=result.request_id,
            idempotency_key=result.idempotency_key,
            may_have_executed=True,
        ) from error
    except MCPError:
        return  # the tool listing could not be fetched again: the result is the server's


def _open_for_writing(path: str) -> IO[bytes]:
    return open(path, "wb")


def _result_error(
    error: BaseException | None,
    where: str,
    sink: str | None,
    result: CallResult,
    counts: _Counts,
    record: Recorder,
) -> RMCPTransferError:
    again = (
        "call again with the same idempotency_key (the server replays this answer without running "
        "the tool, while it keeps the key)"
    )
    if error is None:
        why = f"the call's timeout passed while reading {where}: raise timeout, or {again}"
    elif isinstance(error, _Gone):
        why = (
            f"the server no longer holds {where} (-32030: expired, or restarted without a durable "
            "store); the payload is lost with it: only a new run of the tool makes it again"
        )
    elif isinstance(error, _SinkFailed):
        why = f"the result sink {sink} failed ({error}): fix it and {again}"
    elif isinstance(error, RMCPError):
        why = f"the server cannot be reached ({error.message}): once it is back, {again}"
    else:
        why = f"reading {where} failed ({error}): {again}"
    record(RequestState.TRANSFER, f"{where} not read: {type(error).__name__ if error else 'timeout'}")
    error = RMCPTransferError(
        f"the tool ran and answered, but its payload {where} could not be read in full "
        f"({counts.refetched} chunk(s) read again, {counts.reconnects} reconnect(s)); {why}",
        server=result.server,
        tool=result.tool,
        request_id=result.request_id,
        idempotency_key=result.idempotency_key,
        may_have_executed=True,
    )
    error.result = result
    return error


# -- arguments ------------------------------------------------------------------------------


@attrs.frozen(eq=False)
class _UploadItem:
    path: tuple[str | int, ...]
    payload: bytes
    handle: TransferHandle

    @property
    def where(self) -> str:
        return "arguments" + "".join(f"[{part!r}]" for part in self.path)


@attrs.frozen(eq=False)
class UploadPlan:
    """The string arguments a call uploads, and the arguments it sends instead (``""`` at
    their places).

    Attributes:
        original: The caller's arguments.
        arguments: The arguments sent with the ``tools/call``.
        items: The payloads to upload.
        uploads: ``_meta.rmcp.uploads`` of the call.
    """

    original: dict[str, Any]
    arguments: dict[str, Any]
    items: tuple[_UploadItem, ...]
    uploads: list[Upload]


def plan_uploads(arguments: dict[str, Any] | None, policy: TransferPolicy) -> UploadPlan | None:
    """The uploads of ``arguments``: every string larger than ``threshold`` bytes of UTF-8,
    cut into ``chunk_size`` chunks; ``None`` when there is none."""
    if not arguments:
        return None
    found: list[tuple[tuple[str | int, ...], str]] = []
    threshold = policy.threshold
    _find_large(arguments, (), threshold, found)
    if not found:
        return None
    items: list[_UploadItem] = []
    blanked: dict[str, Any] = arguments
    for path, text in found:
        payload = text.encode("utf-8")
        handle = handle_for("", payload, policy.chunk_size)
        handle = msgspec.structs.replace(handle, id=upload_id(handle.sha256, policy.chunk_size))
        items.append(_UploadItem(path, payload, handle))
        blanked = _blank(blanked, path)
    return UploadPlan(
        original=arguments,
        arguments=blanked,
        items=tuple(items),
        uploads=[Upload(path=list(item.path), handle=item.handle) for item in items],
    )


def _find_large(
    value: object, path: tuple[str | int, ...], threshold: int, found: list[tuple[tuple[str | int, ...], str]]
) -> None:
    if isinstance(value, str):
        # A character is 1 to 4 bytes of UTF-8: encode only where the length cannot tell.
        if len(value) > threshold or (len(value) * 4 > threshold and len(value.encode("utf-8")) > threshold):
            found.append((path, value))
    elif isinstance(value, dict):
        for key, item in cast("dict[str, object]", value).items():
            _find_large(item, (*path, key), threshold, found)
    elif isinstance(value, list | tuple):
        for index, item in enumerate(cast("Sequence[object]", value)):
            _find_large(item, (*path, index), threshold, found)


def _blank(container: Any, path: tuple[str | int, ...]) -> Any:
    """A copy of the containers along ``path`` with ``""`` at its end (the caller's untouched)."""
    head, *rest = path
    copied: Any = dict(cast("dict[str, Any]", container)) if isinstance(container, dict) else list(container)
    copied[head] = "" if not rest else _blank(copied[head], tuple(rest))
    return copied


async def upload_arguments(
    connection: Connection,
    plan: UploadPlan,
    policy: TransferPolicy,
    deadline: float,
    transfer: CallTransfer,
    record: Recorder,
) -> None:
    """Upload every payload of ``plan`` (only the chunks the server lacks); the statistics go
    to ``transfer.statistics``.

    Raises:
        RMCPTransferError: The server refused the upload (the tool did not run).
        RMCPError: No session could be had (see :meth:`Connection.wait_session`).
    """
    if transfer.uploading is None:
        transfer.uploading = anyio.Lock()
    async with transfer.uploading:
        await _upload_arguments(connection, plan, policy, deadline, transfer, record)


async def _upload_arguments(
    connection: Connection,
    plan: UploadPlan,
    policy: TransferPolicy,
    deadline: float,
    transfer: CallTransfer,
    record: Recorder,
) -> None:
    link = _Link(connection, deadline, record)
    pacer = _Pacer(policy.max_bytes_per_s)
    meter = _Meter(sum(item.handle.size for item in plan.items), transfer.on_progress)
    # Progress goes on from the earlier attempts' (a retried call's upload does not restart at 0).
    for item in plan.items:
        if (earlier := transfer.counts.get(item.handle.id)) is not None:
            meter.done += sum(item.handle.chunk_length(index) for index in earlier.reported)
    # Set once every upload is done: an attempt cut meanwhile (a hedge that lost the race)
    # leaves the statistics of the one that completed.
    statistics: list[TransferStatistics] = []
    for item in plan.items:
        handle = item.handle
        first_attempt = handle.id not in transfer.counts
        counts = transfer.counts.setdefault(handle.id, _Counts())
        started = anyio.current_time()
        try:
            await _upload(link, item, policy.parallel, pacer, counts, meter, record, first_attempt)
        except (_Gone, _Refused, MCPError) as error:
            record(RequestState.TRANSFER, f"{item.where} not uploaded: {error}")
            raise RMCPTransferError(
                f"the upload of {item.where} ({handle.size} bytes) failed ({error}); the call was not "
                "sent and the tool did not run: call again (the chunks the server holds are not sent "
                "again), or pass a smaller argument",
            ) from error
        statistics.append(
            TransferStatistics(
                direction="argument",
                where=item.where,
                transfer_id=handle.id,
                size=handle.size,
                sha256=handle.sha256,
                chunks=handle.chunk_count,
                bytes_moved=counts.bytes_moved,
                resent=counts.resent,
                already_held=counts.already_held,
                reconnects=counts.reconnects,
                elapsed_s=anyio.current_time() - started,
            )
        )
    transfer.statistics = statistics


async def _upload(
    link: _Link,
    item: _UploadItem,
    parallel: int,
    pacer: _Pacer,
    counts: _Counts,
    meter: _Meter,
    record: Recorder,
    first_attempt: bool,
) -> None:
    handle = item.handle
    view = memoryview(item.payload)
    wire_handle = msgspec.to_builtins(handle)
    first = True

    def report(indices: Sequence[int] | set[int]) -> None:
        fresh = [index for index in indices if index < handle.chunk_count and index not in counts.reported]
        counts.reported.update(fresh)
        meter.advance(sum(handle.chunk_length(index) for index in fresh))

    for _ in range(_MAX_UPLOAD_ROUNDS):
        answer = await link.send(METHOD_OPEN, {"handle": wire_handle}, counts, "write")
        try:
            held = set(msgspec.convert(answer, OpenResult).have)
        except msgspec.ValidationError as error:
            raise _Refused(f"the answer to {METHOD_OPEN} is not an OpenResult: {error}") from error
        if first and first_attempt:
            counts.already_held = len(held)
        report(held)
        missing = [index for index in range(handle.chunk_count) if index not in held]
        record(
            RequestState.TRANSFER,
            f"uploading {item.where}: {len(missing)} of {handle.chunk_count} chunk(s) to send",
        )
        first = False
        if not missing:
            return

        async def write(position: int, missing: list[int] = missing) -> None:
            index = missing[position]
            await _write_chunk(link, handle, view, index, pacer, counts)
            report((index,))

        try:
            await _run_workers(len(missing), parallel, write)
        except _Gone:
            continue  # the server lost the upload between open and write: open it again
        return
    raise _Gone(f"the server lost the upload {_MAX_UPLOAD_ROUNDS} times in a row")


async def _write_chunk(
    link: _Link, handle: TransferHandle, view: memoryview, index: int, pacer: _Pacer, counts: _Counts
) -> None:
    start = index * handle.chunk_size
    piece = view[start : start + handle.chunk_length(index)]
    params = {"id": handle.id, "index": index, "data": encode_chunk(piece), "sha256": handle.chunks[index]}
    if index in counts.sent:
        counts.resent += 1  # written before, and the server lacks it: lost on its side
    counts.sent.add(index)
    for _ in range(_MAX_TRIES_PER_CHUNK):
        await pacer.take(len(piece))
        try:
            await link.send(METHOD_WRITE, params, counts, "write")
        except MCPError as error:
            if error.code != CHUNK_INVALID_CODE:
                raise
            counts.bytes_moved += len(piece)
            counts.resent += 1  # corrupt on the way: send it again
            continue
        counts.bytes_moved += len(piece)
        return
    raise _Refused(f"chunk {index} was refused as corrupt {_MAX_TRIES_PER_CHUNK} times in a row")
