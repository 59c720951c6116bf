"""Chunked transfer on the RMCP server (feature ``"transfer"``, ``docs/protocol.md`` section 9).

Three parts, each used by :class:`~rmcp_actors.server.RMCPServerSide` only for a ``tools/call``
that asks for it (``_meta.rmcp.transfer`` or ``_meta.rmcp.uploads``), so a plain call never
reaches this module:

- results: a large content item of a tool's result is written to the blob store as chunks and
  replaced by a ``resource_link`` handle before the result is stored for the key (a replay
  answers the same handle);
- uploads: a large argument uploaded before the call is put back in its place before anything
  else sees the arguments;
- the methods ``rmcp/transfer/read``, ``rmcp/transfer/open`` and ``rmcp/transfer/write``.

A tool streams its result with :func:`stream_result` (text) or :func:`stream_resource` (bytes).
"""

from __future__ import annotations

import base64
import contextvars
import hashlib
import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterable, Awaitable, Callable, Iterator, Mapping
from typing import Any, Protocol, TypeVar, cast

import anyio
import attrs
import msgspec
from mcp import MCPError
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.extension import MethodBinding, RequestHandler
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import INTERNAL_ERROR, INVALID_PARAMS, EmbeddedResource, RequestParams, TextContent
from mcp_types.methods import serialize_server_result

from .._protocol import META_KEY
from .._transfer import (
    CHUNK_INVALID_CODE,
    MAX_CHUNK_SIZE,
    METHOD_OPEN,
    METHOD_READ,
    METHOD_WRITE,
    MIN_CHUNK_SIZE,
    STRUCTURED_META_KEY,
    TRANSFER_NOT_FOUND_CODE,
    TRANSFER_URI_PREFIX,
    ChunkData,
    Encoding,
    OpenResult,
    TransferAccept,
    TransferHandle,
    TransferredContent,
    TransferredStructured,
    Upload,
    WriteResult,
    decode_chunk,
    encode_chunk,
    sha256_hex,
    upload_id,
)
from ..errors import RMCPStoreError
from ..stores import BlobStore, TransferConflict
from ._wire import to_wire
from .tasks import principal_scope_of

__all__ = [
    "DEFAULT_MAX_UPLOAD_BYTES",
    "DEFAULT_MIN_THRESHOLD",
    "DEFAULT_SERVER_MAX_CHUNK_SIZE",
    "TransferService",
    "TransferStatistics",
    "UploadRefusal",
    "stream_resource",
    "stream_result",
]

_T = TypeVar("_T")

logger = logging.getLogger(__name__)

DEFAULT_MIN_THRESHOLD = 64 << 10
"""The least threshold the server honours: below it a chunk's round trip costs more than the
bytes it saves, so smaller items stay inline whatever the client asks."""
DEFAULT_SERVER_MAX_CHUNK_SIZE = 4 << 20
"""The largest chunk the server cuts or accepts: bounds the memory of one chunk message."""
DEFAULT_MAX_UPLOAD_BYTES = 1 << 30
"""The largest argument the server accepts as an upload."""

_STREAM_KEY = "stream"

# Set by the middleware around the tool of a call that accepts transferred results: the
# streams its tool handed to stream_result() or stream_resource(), by marker id. A dict mutated
# in place: a tool running in a copy of the context (a task the SDK starts) registers into it too.
_streams: contextvars.ContextVar[dict[str, _Stream] | None] = contextvars.ContextVar(
    "rmcp_transfer_streams", default=None
)


class _StoreCall(Protocol):
    """``RMCPServerSide._store_call``: one store call, bounded, failures as RMCPStoreError."""

    def __call__(self, operation: str, call: Callable[[], Awaitable[_T]], /) -> Awaitable[_T]: ...


@attrs.frozen
class _Stream:
    """A streamed result item: its bytes, and the item they complete (``shape`` lacking its
    ``field``)."""

    chunks: AsyncIterable[bytes | str]
    shape: dict[str, Any]
    field: str
    encoding: Encoding
    media_type: str

    def item(self, payload: bytes | bytearray) -> dict[str, Any]:
        """The inline item holding ``payload``."""
        value = payload.decode() if self.encoding == "utf-8" else base64.b64encode(payload).decode()
        return _with_field(self.shape, self.field, value)


@attrs.frozen(kw_only=True)
class _Target:
    """Where a call's large result items go: the tool, the client's and server's bounds,
    the dedup key the transfers are tied to and the caller's scope."""

    tool: str
    threshold: int
    chunk_size: int
    key: str | None
    scope: str
    structured: bool = False


@attrs.frozen
class UploadRefusal:
    """Why a call's uploads cannot be put in place: the NACK to answer (nothing ran)."""

    incomplete: bool
    """True: the server lacks a chunk (``transfer_incomplete``); False: the meta is wrong
    (``invalid_meta``)."""
    detail: str


@attrs.frozen(kw_only=True)
class TransferStatistics:
    """Counters of one server's transfers since it was created."""

    results: int
    """Result items sent as handles."""
    chunks_read: int
    """Chunks served by ``rmcp/transfer/read``."""
    chunks_written: int
    """Upload chunks received and stored."""
    chunks_refused: int
    """Upload chunks refused for a hash mismatch or an index out of range (``-32031``)."""
    uploads_substituted: int
    """Uploaded arguments put in place of their ``""``."""


class _ReadRequest(RequestParams):
    id: str
    index: int


class _OpenRequest(RequestParams):
    handle: dict[str, Any]


class _WriteRequest(RequestParams):
    id: str
    index: int
    data: str
    sha256: str


async def stream_result(chunks: AsyncIterable[bytes | str], *, mime_type: str | None = None) -> TextContent:
    """Return a tool's text result from ``chunks`` (UTF-8 bytes or strings) without building
    it in memory, when the client accepts transferred results.

    Use it as the tool's return value (or one item of a returned list)::

        @app.tool()
        async def export(table: str) -> TextContent:
            return await stream_result(rows_as_csv(table), mime_type="text/csv")

    Called for a ``tools/call`` whose client accepts transferred results
    (``_meta.rmcp.transfer``), it returns a placeholder item: once the tool has returned, the
    RMCP middleware reads ``chunks`` one by one into the blob store and answers a transfer
    handle, or the text itself when the whole is no larger than the client's threshold. For
    any other call (a plain client, an RMCP client that does not accept transfers, a task) it
    reads ``chunks`` here into one string, and the result is ordinary inline text.

    Args:
        chunks: The result's bytes (UTF-8; a chunk boundary may split a character) or text.
        mime_type: The handle's ``media_type`` (``text/plain`` when not given).
    """
    stream = _Stream(
        chunks=chunks,
        shape={"type": "text"},
        field="text",
        encoding="utf-8",
        media_type=mime_type or "text/plain",
    )
    return TextContent.model_validate(await _streamed_or_read(stream))


async def stream_resource(
    chunks: AsyncIterable[bytes], *, uri: str, mime_type: str = "application/octet-stream"
) -> EmbeddedResource:
    """Return a tool's binary result from ``chunks`` without building it in memory, as an
    embedded blob resource: :func:`stream_result` for bytes that are not text (a file, an
    archive).

    For a client that accepts transferred results the bytes go to the blob store chunk by
    chunk, and the client rebuilds the resource with its ``blob``; any other call reads them
    here and gets the resource inline (base64, as MCP carries blobs).

    Args:
        chunks: The resource's bytes.
        uri: The resource's URI.
        mime_type: The resource's MIME type.
    """
    stream = _Stream(
        chunks=chunks,
        shape={"type": "resource", "resource": {"uri": uri, "mimeType": mime_type}},
        field="resource.blob",
        encoding="base64",
        media_type=mime_type,
    )
    return EmbeddedResource.model_validate(await _streamed_or_read(stream))


async def _streamed_or_read(stream: _Stream) -> dict[str, Any]:
    """The placeholder item of a stream the middleware will read, or (no middleware reading
    streams for this call) the item with all of its bytes."""
    streams = _streams.get()
    if streams is None:
        # One growing buffer: the payload is held as bytes, then as the item's str, never also
        # as a list of pieces and their join.
        payload = bytearray()
        async for piece in stream.chunks:
            payload += piece.encode() if isinstance(piece, str) else piece
        return stream.item(payload)
    marker = uuid.uuid4().hex
    streams[marker] = stream
    placeholder = stream.item(b"")
    placeholder["_meta"] = {META_KEY: {_STREAM_KEY: marker}}
    return placeholder


def _stream_marker(item: Mapping[str, Any]) -> str | None:
    meta = item.get("_meta")
    if not isinstance(meta, Mapping):
        return None
    rmcp = cast(Mapping[str, Any], meta).get(META_KEY)
    if not isinstance(rmcp, Mapping):
        return None
    marker = cast(Mapping[str, Any], rmcp).get(_STREAM_KEY)
    return marker if isinstance(marker, str) else None


def _payload_field(item: Mapping[str, Any]) -> tuple[str, Encoding, str] | None:
    """The dotted name, encoding and value of ``item``'s payload field, or None."""
    kind = item.get("type")
    if kind == "text":
        value, field, encoding = item.get("text"), "text", "utf-8"
    elif kind in ("image", "audio"):
        value, field, encoding = item.get("data"), "data", "base64"
    elif kind == "resource" and isinstance(resource := item.get("resource"), Mapping):
        resource = cast(Mapping[str, Any], resource)
        if isinstance(resource.get("text"), str):
            value, field, encoding = resource.get("text"), "resource.text", "utf-8"
        else:
            value, field, encoding = resource.get("blob"), "resource.blob", "base64"
    else:
        return None
    return (field, encoding, value) if isinstance(value, str) else None


def _without_field(item: Mapping[str, Any], field: str) -> dict[str, Any]:
    if field.startswith("resource."):
        resource = dict(cast(Mapping[str, Any], item["resource"]))
        del resource[field.removeprefix("resource.")]
        return {**item, "resource": resource}
    return {key: value for key, value in item.items() if key != field}


def _with_field(shape: Mapping[str, Any], field: str, value: str) -> dict[str, Any]:
    if field.startswith("resource."):
        resource = {**cast(Mapping[str, Any], shape["resource"]), field.removeprefix("resource."): value}
        return {**shape, "resource": resource}
    return {**shape, field: value}


def _media_type(item: Mapping[str, Any], field: str) -> str | None:
    if field == "text":
        return "text/plain"
    source = cast(Mapping[str, Any], item["resource"]) if field.startswith("resource.") else item
    mime = source.get("mimeType")
    return mime if isinstance(mime, str) else None


def _link(
    tool: str, index: int, handle: TransferHandle, content: dict[str, Any], field: str
) -> dict[str, Any]:
    transferred = TransferredContent(handle=handle, content=content, field=field)
    link: dict[str, Any] = {
        "type": "resource_link",
        "uri": TRANSFER_URI_PREFIX + handle.id,
        "name": f"{tool} result {index}",
        "size": handle.size,
        "_meta": {META_KEY: {"transfer": msgspec.to_builtins(transferred)}},
    }
    if handle.media_type is not None:
        link["mimeType"] = handle.media_type
    return link


def _payload_pieces(value: str, encoding: Encoding, threshold: int, step: int) -> Iterator[bytes] | None:
    """The payload of a field's ``value`` in pieces of about ``step`` bytes, each encoded (or
    decoded) only when asked for, so that the payload is never held whole beside the string;
    None when it is ``threshold`` bytes or less, or is not base64.

    Raises:
        ValueError: Here or from a piece: ``value`` has a lone surrogate, or is not base64.
    """
    if encoding == "utf-8":
        if len(value) <= threshold:
            # At most `threshold` characters: encoded whole to tell its size, which is small.
            payload = value.encode()
            return None if len(payload) <= threshold else iter((payload,))
        # Slicing a str never splits a character: the pieces' UTF-8 is the whole's.
        return (value[start : start + step].encode() for start in range(0, len(value), step))
    # What base64.b64decode(validate=True) accepts whole: padded, "=" only at the end.
    if len(value) % 4 or value.find("=", 0, len(value) - 2) != -1:
        return None
    size = len(value) // 4 * 3 - value.endswith("=") - value.endswith("==")
    if size <= threshold:
        return None
    quads = max(4, step // 3 * 4)
    return (
        base64.b64decode(value[start : start + quads], validate=True) for start in range(0, len(value), quads)
    )


def _chunk_count(size: int, chunk_size: int) -> int:
    return max(1, -(-size // chunk_size))


@attrs.define(eq=False)
class _ChunkWriter:
    """Cuts bytes arriving in pieces of any size into the chunks of one result transfer,
    writing each to the store as it fills: memory holds at most one chunk and one piece."""

    service: TransferService
    transfer_id: str
    chunk_size: int
    buffer: bytearray = attrs.Factory(bytearray)
    digest: Any = attrs.Factory(hashlib.sha256)
    chunks: list[str] = attrs.Factory(list[str])
    size: int = 0

    async def add(self, data: bytes | bytearray | memoryview) -> None:
        if not self.buffer and len(data) == self.chunk_size:
            await self._write(bytes(data))
            return
        self.buffer += data
        while len(self.buffer) >= self.chunk_size:
            chunk = bytes(self.buffer[: self.chunk_size])
            del self.buffer[: self.chunk_size]
            await self._write(chunk)

    async def finish(self, *, encoding: Encoding, media_type: str | None) -> TransferHandle:
        if self.buffer or not self.chunks:
            await self._write(bytes(self.buffer))
            self.buffer.clear()
        handle = TransferHandle(
            id=self.transfer_id,
            size=self.size,
            chunk_size=self.chunk_size,
            sha256=cast(str, self.digest.hexdigest()),
            chunks=self.chunks,
            encoding=encoding,
            media_type=media_type,
        )
        await self.service.store_call("seal_transfer", lambda: self.service.store.seal_transfer(handle))
        return handle

    async def _write(self, chunk: bytes) -> None:
        index = len(self.chunks)
        await self.service.store_call(
            "write_chunk", lambda: self.service.store.write_chunk(self.transfer_id, index, chunk)
        )
        self.digest.update(chunk)
        self.chunks.append(sha256_hex(chunk))
        self.size += len(chunk)


@attrs.define(eq=False, on_setattr=attrs.setters.NO_OP)
class TransferService:
    """The transfers of one installed RMCP server: result handles, uploads and the methods.

    Created by :func:`~rmcp_actors.server.install` when the store is a
    :class:`~rmcp_actors.stores.BlobStore` and ``transfer`` is on.
    """

    store: BlobStore
    store_call: _StoreCall
    min_threshold: int = DEFAULT_MIN_THRESHOLD
    max_chunk_size: int = DEFAULT_SERVER_MAX_CHUNK_SIZE
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    _results: int = attrs.field(default=0, init=False)
    _chunks_read: int = attrs.field(default=0, init=False)
    _chunks_written: int = attrs.field(default=0, init=False)
    _chunks_refused: int = attrs.field(default=0, init=False)
    _uploads_substituted: int = attrs.field(default=0, init=False)

    def statistics(self) -> TransferStatistics:
        """Counters since creation."""
        return TransferStatistics(
            results=self._results,
            chunks_read=self._chunks_read,
            chunks_written=self._chunks_written,
            chunks_refused=self._chunks_refused,
            uploads_substituted=self._uploads_substituted,
        )

    def methods(self) -> list[MethodBinding]:
        """The three request methods, to register on the low-level server."""
        return [
            MethodBinding(METHOD_READ, _ReadRequest, cast(RequestHandler, self.read)),
            MethodBinding(METHOD_OPEN, _OpenRequest, cast(RequestHandler, self.open)),
            MethodBinding(METHOD_WRITE, _WriteRequest, cast(RequestHandler, self.write)),
        ]

    # -- results ---------------------------------------------------------------------------

    def accept_check(self, accept: TransferAccept) -> str | None:
        """Why ``_meta.rmcp.transfer`` is malformed, or None."""
        if accept.threshold < 0:
            return f"transfer.threshold must not be negative, got {accept.threshold}"
        if not MIN_CHUNK_SIZE <= accept.chunk_size <= MAX_CHUNK_SIZE:
            return (
                f"transfer.chunk_size must be between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE}, "
                f"got {accept.chunk_size}"
            )
        return None

    def results_as_handles(
        self, call_next: CallNext, accept: TransferAccept, *, tool: str, key: str | None, scope: str
    ) -> CallNext:
        """``call_next`` whose result has its large content items replaced by transfer handles
        (written to the store, tied to ``key``), and whose tool may stream its result."""
        target = _Target(
            tool=tool,
            threshold=max(accept.threshold, self.min_threshold),
            chunk_size=min(accept.chunk_size, self.max_chunk_size),
            key=key,
            scope=scope,
            structured=accept.structured,
        )

        async def run(ctx: ServerRequestContext[Any, Any]) -> HandlerResult:
            streams: dict[str, _Stream] = {}
            token = _streams.set(streams)
            try:
                result = await call_next(ctx)
            finally:
                _streams.reset(token)
            try:
                return await self._rewritten(ctx, to_wire(result), streams, target)
            finally:
                for stream in streams.values():
                    # Handed to stream_result() but not returned by the tool: never read.
                    await _close(stream.chunks)

        return run

    async def _rewritten(
        self,
        ctx: ServerRequestContext[Any, Any],
        wire: dict[str, Any],
        streams: dict[str, _Stream],
        target: _Target,
    ) -> dict[str, Any]:
        content = wire.get("content")
        if not isinstance(content, list):
            return wire
        items: list[Any] = []
        # The transfers of the items done so far: forgotten unless the result naming them is
        # returned (a run cut short by max_execution_s, a later stream failing), or they would
        # hold their bytes against the size cap for as long as the key's record lives.
        written: list[str] = []
        # The texts sent as handles, by index: a structuredContent {"result": text} refers to one.
        texts: dict[int, str] = {}
        try:
            for index, item in enumerate(cast(list[Any], content)):
                if isinstance(item, Mapping):
                    item = cast(Mapping[str, Any], item)
                    marker = _stream_marker(item)
                    stream = None if marker is None else streams.pop(marker, None)
                    if stream is None:
                        original = item
                        item = await self._item(item, index, target, written)
                        if item is not original and original.get("type") == "text":
                            texts[index] = original["text"]
                    else:
                        try:
                            item = await self._streamed(stream, index, target, written)
                        except MCPError:
                            raise
                        except Exception as error:
                            await self._forget_all(written)
                            return _stream_failed(ctx, target.tool, error)
                items.append(item)
            rewritten = {**wire, "content": items}
            if target.structured and isinstance(structured := wire.get("structuredContent"), Mapping):
                return await self._structured(
                    rewritten, cast(Mapping[str, Any], structured), texts, target, written
                )
        except BaseException:
            await self._forget_all(written)
            raise
        return rewritten

    async def _structured(
        self,
        wire: dict[str, Any],
        structured: Mapping[str, Any],
        texts: dict[int, str],
        target: _Target,
        written: list[str],
    ) -> dict[str, Any]:
        """``wire`` with a ``structuredContent`` larger than the threshold left out and described
        in ``_meta`` (docs/protocol.md 9.2): a reference to the text item it repeats, or its JSON
        as a transfer of its own."""
        reference: TransferredStructured | None = None
        if len(structured) == 1 and isinstance(text := structured.get("result"), str):
            # MCPServer's shape for a tool returning str: the text item's payload, again.
            found = next((index for index, sent in texts.items() if sent is text or sent == text), None)
            if found is not None:
                reference = TransferredStructured(result_of=found)
        if reference is None:
            payload = msgspec.json.encode(structured)
            if len(payload) <= target.threshold:
                return wire
            writer = _ChunkWriter(self, _result_id(), target.chunk_size)
            written.append(writer.transfer_id)
            try:
                await self._open_result(writer.transfer_id, target)
                view = memoryview(payload)
                for start in range(0, len(payload), target.chunk_size):
                    await writer.add(view[start : start + target.chunk_size])
                handle = await writer.finish(encoding="utf-8", media_type="application/json")
            except RMCPStoreError:
                logger.warning(
                    "RMCP: the blob store could not hold the structured result of tool %r; sent inline",
                    target.tool,
                    exc_info=True,
                )
                written.remove(writer.transfer_id)
                await self._forget(writer.transfer_id)
                return wire
            self._results += 1
            reference = TransferredStructured(handle=handle)
        existing = wire.get("_meta")
        meta: dict[str, Any] = (
            dict(cast(Mapping[str, Any], existing)) if isinstance(existing, Mapping) else {}
        )
        meta[STRUCTURED_META_KEY] = msgspec.to_builtins(reference)
        answer = {key: value for key, value in wire.items() if key != "structuredContent"}
        answer["_meta"] = meta
        return answer

    async def _item(
        self, item: Mapping[str, Any], index: int, target: _Target, written: list[str]
    ) -> Mapping[str, Any]:
        found = _payload_field(item)
        if found is None:
            return item
        field, encoding, value = found
        # A string's UTF-8 is at most 4 bytes a character, base64 decodes to 3/4 of its length:
        # most items are told small without encoding them.
        if len(value) * (4 if encoding == "utf-8" else 1) <= target.threshold:
            return item
        try:
            pieces = _payload_pieces(value, encoding, target.threshold, target.chunk_size)
        except ValueError:
            return item
        if pieces is None:
            return item
        writer = _ChunkWriter(self, _result_id(), target.chunk_size)
        try:
            await self._open_result(writer.transfer_id, target)
            for piece in pieces:
                await writer.add(piece)
            handle = await writer.finish(encoding=encoding, media_type=_media_type(item, field))
        except ValueError:
            # Not base64 after all, or a lone surrogate: sent as the tool gave it.
            await self._forget(writer.transfer_id)
            return item
        except RMCPStoreError:
            # The tool ran: its result must reach the client, inline is always acceptable.
            logger.warning(
                "RMCP: the blob store could not hold result item %d of tool %r; sent inline",
                index,
                target.tool,
                exc_info=True,
            )
            await self._forget(writer.transfer_id)
            return item
        except BaseException:
            # Cut short (max_execution_s): the chunks written so far would never be read.
            await self._forget_all([writer.transfer_id])
            raise
        written.append(handle.id)
        self._results += 1
        return _link(target.tool, index, handle, _without_field(item, field), field)

    async def _streamed(
        self, stream: _Stream, index: int, target: _Target, written: list[str]
    ) -> Mapping[str, Any]:
        """Read a streamed result into the store chunk by chunk, or inline when it ends
        within the threshold. A store failure fails the run (its bytes are gone)."""
        head = bytearray()
        writer: _ChunkWriter | None = None
        try:
            async for piece in stream.chunks:
                data = piece.encode() if isinstance(piece, str) else piece
                if writer is None:
                    head += data
                    if len(head) <= target.threshold:
                        continue
                    writer = _ChunkWriter(self, _result_id(), target.chunk_size)
                    await self._open_result(writer.transfer_id, target)
                    data, head = bytes(head), bytearray()
                await writer.add(data)
            if writer is None:
                return stream.item(bytes(head))
            handle = await writer.finish(encoding=stream.encoding, media_type=stream.media_type)
        except BaseException:
            # The store failed or the run was cut short with the stream suspended at a yield:
            # its cleanup (a cursor, a file) runs now, not whenever the collector finds it.
            try:
                await _close(stream.chunks)
            finally:
                # Even when the stream's own cleanup fails.
                if writer is not None:
                    await self._forget_all([writer.transfer_id])
            raise
        written.append(handle.id)
        self._results += 1
        return _link(target.tool, index, handle, stream.shape, stream.field)

    async def _open_result(self, transfer_id: str, target: _Target) -> None:
        # Its layout is known once the payload is written: sealed then (seal_transfer).
        provisional = TransferHandle(
            id=transfer_id, size=0, chunk_size=target.chunk_size, sha256="", chunks=[]
        )
        await self.store_call(
            "open_transfer",
            lambda: self.store.open_transfer(provisional, key=target.key, scope=target.scope, sealed=False),
        )

    async def _forget_all(self, transfer_ids: list[str]) -> None:
        # Shielded: called on the way out of a cancelled run; each store call is bounded.
        with anyio.CancelScope(shield=True):
            for transfer_id in transfer_ids:
                await self._forget(transfer_id)

    async def _forget(self, transfer_id: str) -> None:
        try:
            await self.store_call("delete_transfer", lambda: self.store.delete_transfer(transfer_id))
        except RMCPStoreError:
            # Left to the store's TTL.
            logger.warning("RMCP: could not delete the unfinished transfer %s", transfer_id, exc_info=True)

    # -- uploads ---------------------------------------------------------------------------

    async def substitute(
        self, arguments: Mapping[str, Any], uploads: list[Upload], scope: str
    ) -> dict[str, Any] | UploadRefusal:
        """``arguments`` with each upload's payload at its path, or why that cannot be done.

        Raises:
            RMCPStoreError: The store failed (the caller answers ``unavailable``).
        """
        result: dict[str, Any] = dict(arguments)
        for upload in uploads:
            if not upload.path:
                return UploadRefusal(False, "an upload's path must not be empty")
            payload = await self._uploaded(upload.handle, scope)
            if payload is None:
                return UploadRefusal(
                    True, f"the server does not hold every chunk of upload {upload.handle.id!r}"
                )
            try:
                text = payload.decode()
            except UnicodeDecodeError:
                return UploadRefusal(False, f"upload {upload.handle.id!r} is not UTF-8 text")
            placed = _place(result, upload.path, text)
            if placed is not None:
                return UploadRefusal(False, placed)
            self._uploads_substituted += 1
        return result

    async def _uploaded(self, handle: TransferHandle, scope: str) -> bytearray | None:
        """The payload of a complete upload matching ``handle``, or None."""
        stored_id = _upload_store_id(handle.id, scope)
        held = await self.store_call("get_transfer", lambda: self.store.get_transfer(stored_id, scope=scope))
        if held is None or not _same_layout(held, handle):
            return None
        # One buffer of the final size, decoded in place: the payload is held once, then as str.
        payload = bytearray(held.size)
        for index in range(held.chunk_count):
            chunk = await self.store_call(
                "read_chunk", lambda index=index: self.store.read_chunk(stored_id, index, scope=scope)
            )
            if chunk is None or len(chunk) != held.chunk_length(index):
                return None
            start = index * held.chunk_size
            payload[start : start + len(chunk)] = chunk
        return payload if sha256_hex(payload) == handle.sha256 else None

    # -- the methods -----------------------------------------------------------------------

    async def read(self, ctx: ServerRequestContext[Any, Any], params: _ReadRequest) -> HandlerResult:
        """``rmcp/transfer/read``: one chunk of a result transfer of the caller's scope."""
        scope = principal_scope_of(ctx)
        data = await self._method_store_call(
            "read_chunk", lambda: self.store.read_chunk(params.id, params.index, scope=scope)
        )
        if data is None:
            # Only now the handle: one store call per chunk served, two per refusal.
            handle = await self._method_store_call(
                "get_transfer", lambda: self.store.get_transfer(params.id, scope=scope)
            )
            if handle is not None and not 0 <= params.index < handle.chunk_count:
                raise MCPError(
                    INVALID_PARAMS,
                    f"transfer {params.id!r} has chunks 0 to {handle.chunk_count - 1}, not {params.index}",
                )
            raise _not_found(params.id)
        self._chunks_read += 1
        chunk = ChunkData(id=params.id, index=params.index, data=encode_chunk(data), sha256=sha256_hex(data))
        return msgspec.to_builtins(chunk)

    async def open(self, ctx: ServerRequestContext[Any, Any], params: _OpenRequest) -> HandlerResult:
        """``rmcp/transfer/open``: start or resume an upload; answers the chunks held."""
        try:
            handle = msgspec.convert(params.handle, TransferHandle, strict=True)
        except msgspec.ValidationError as error:
            raise MCPError(INVALID_PARAMS, f"the upload's handle is malformed: {error}") from None
        if (problem := self._upload_problem(handle)) is not None:
            raise MCPError(INVALID_PARAMS, problem)
        scope = principal_scope_of(ctx)
        stored = msgspec.structs.replace(handle, id=_upload_store_id(handle.id, scope))
        have = await self._method_store_call(
            "open_transfer", lambda: self.store.open_transfer(stored, key=None, scope=scope, sealed=True)
        )
        return msgspec.to_builtins(OpenResult(id=handle.id, have=have))

    async def write(self, ctx: ServerRequestContext[Any, Any], params: _WriteRequest) -> HandlerResult:
        """``rmcp/transfer/write``: one verified chunk of an open upload."""
        scope = principal_scope_of(ctx)
        stored_id = _upload_store_id(params.id, scope)
        handle = await self._method_store_call(
            "get_transfer", lambda: self.store.get_transfer(stored_id, scope=scope)
        )
        if handle is None:
            raise _not_found(params.id, "open it first (rmcp/transfer/open)")
        if not 0 <= params.index < handle.chunk_count:
            self._chunks_refused += 1
            raise MCPError(
                CHUNK_INVALID_CODE,
                f"upload {params.id!r} has chunks 0 to {handle.chunk_count - 1}, not {params.index}",
            )
        expected = handle.chunks[params.index]
        data = decode_chunk(params.data, expected) if params.sha256 == expected else None
        if data is None or len(data) != handle.chunk_length(params.index):
            self._chunks_refused += 1
            raise MCPError(
                CHUNK_INVALID_CODE,
                f"chunk {params.index} of upload {params.id!r} does not match its SHA-256 in the "
                "handle: nothing was stored, send it again",
            )
        await self._method_store_call(
            "write_chunk", lambda: self.store.write_chunk(stored_id, params.index, data)
        )
        self._chunks_written += 1
        return msgspec.to_builtins(WriteResult(id=params.id, index=params.index))

    def _upload_problem(self, handle: TransferHandle) -> str | None:
        if handle.encoding != "utf-8":
            return "an upload's encoding must be utf-8 (uploads stand for string arguments)"
        if not MIN_CHUNK_SIZE <= handle.chunk_size <= self.max_chunk_size:
            return (
                f"chunk_size must be between {MIN_CHUNK_SIZE} and {self.max_chunk_size}, "
                f"got {handle.chunk_size}"
            )
        if not 0 <= handle.size <= self.max_upload_bytes:
            return f"this server takes uploads of at most {self.max_upload_bytes} bytes, not {handle.size}"
        count = _chunk_count(handle.size, handle.chunk_size)
        if len(handle.chunks) != count:
            return f"{handle.size} bytes make {count} chunks of {handle.chunk_size}, not {len(handle.chunks)}"
        if handle.id != (expected := upload_id(handle.sha256, handle.chunk_size)):
            return f"an upload's id must be {expected!r} (content addressed)"
        return None

    async def _method_store_call(self, operation: str, call: Callable[[], Awaitable[_T]]) -> _T:
        try:
            return await self.store_call(operation, call)
        except RMCPStoreError as error:
            if isinstance(error.__cause__, TransferConflict):
                # Held with another layout, or gone since it was looked up.
                raise MCPError(TRANSFER_NOT_FOUND_CODE, f"RMCP: {error.__cause__}") from None
            raise MCPError(INTERNAL_ERROR, f"RMCP: {error}; retry the request later") from error


async def _close(chunks: AsyncIterable[bytes | str]) -> None:
    """Close a stream's async generator (a no-op once it ended)."""
    if isinstance(chunks, AsyncGenerator):
        await cast(AsyncGenerator[object, None], chunks).aclose()


def _stream_failed(ctx: ServerRequestContext[Any, Any], tool: str, error: Exception) -> dict[str, Any]:
    """The tool error result for a stream that raised, worded as ``MCPServer`` words a tool's
    own failure (an unexpected exception's text stays in the server's log)."""
    if isinstance(error, ToolError | RMCPStoreError):
        text = f"Error executing tool {tool}: {error}"
        logger.info("RMCP: the streamed result of tool %r failed: %r", tool, str(error))
    else:
        text = f"Error executing tool {tool}"
        logger.exception("RMCP: the streamed result of tool %r raised", tool)
    failed = {"resultType": "complete", "content": [{"type": "text", "text": text}], "isError": True}
    # Shaped for the negotiated version, as the SDK shapes a tool's own result.
    return serialize_server_result("tools/call", ctx.protocol_version, failed)


def _result_id() -> str:
    return f"r-{uuid.uuid4().hex}"


def _upload_store_id(transfer_id: str, scope: str) -> str:
    # Upload ids are content addressed: per scope, or one principal would learn from `have`
    # which payloads another uploaded.
    return f"{transfer_id}@{scope}"


def _same_layout(held: TransferHandle, handle: TransferHandle) -> bool:
    return (
        held.size == handle.size
        and held.chunk_size == handle.chunk_size
        and held.sha256 == handle.sha256
        and held.chunks == handle.chunks
    )


def _not_found(transfer_id: str, advice: str = "") -> MCPError:
    reason = advice or "never created, expired, or not of this caller"
    return MCPError(TRANSFER_NOT_FOUND_CODE, f"no transfer {transfer_id!r}: {reason}")


def _place(arguments: dict[str, Any], path: list[str | int], text: str) -> str | None:
    """Put ``text`` at ``path`` in ``arguments`` (copying the containers on the way, the
    request's own are not changed), where the client left ``""``; or say why not."""
    container: Any = arguments
    for depth, step in enumerate(path[:-1]):
        child = _child(container, step)
        if isinstance(child, Mapping):
            child = dict(cast(Mapping[str, Any], child))
        elif isinstance(child, list):
            child = list(cast(list[Any], child))
        else:
            return f"upload path {path!r} names nothing at {path[: depth + 1]!r}"
        container[step] = child
        container = child
    last = path[-1]
    if _child(container, last) != "":
        return f'upload path {path!r} must name a "" placeholder in the arguments'
    container[last] = text
    return None


def _child(container: Any, step: str | int) -> Any:
    if isinstance(container, dict) and isinstance(step, str):
        return cast(dict[str, Any], container).get(step)
    if isinstance(container, list) and isinstance(step, int) and 0 <= step < len(cast(list[Any], container)):
        return cast(list[Any], container)[step]
    return None
