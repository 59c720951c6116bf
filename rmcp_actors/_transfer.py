"""Wire formats of RMCP chunked transfer (feature ``"transfer"``), as msgspec Structs.

docs/protocol.md section 9 is the specification; this module is its executable form, shared by
the client and the server. A payload (one large content item of a result, or one large string
argument) moves as numbered chunks, each carrying its SHA-256, over three request methods the
RMCP server serves: :data:`METHOD_READ` (fetch a chunk of a result), :data:`METHOD_OPEN` (start or
resume an upload: which chunks does the server hold) and :data:`METHOD_WRITE` (send a chunk of an
argument). A :class:`TransferHandle` describes a payload: its size, chunk layout and hashes.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from typing import Final, Literal

import msgspec

__all__ = [
    "CHUNK_INVALID_CODE",
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_THRESHOLD",
    "FEATURE_TRANSFER",
    "MAX_CHUNK_SIZE",
    "METHOD_OPEN",
    "METHOD_READ",
    "METHOD_WRITE",
    "MIN_CHUNK_SIZE",
    "TRANSFER_NOT_FOUND_CODE",
    "TRANSFER_URI_PREFIX",
    "ChunkData",
    "Encoding",
    "OpenParams",
    "OpenResult",
    "ReadParams",
    "TransferAccept",
    "STRUCTURED_META_KEY",
    "TransferHandle",
    "TransferredContent",
    "TransferredStructured",
    "Upload",
    "WriteParams",
    "WriteResult",
    "chunk_digests",
    "decode_chunk",
    "encode_chunk",
    "handle_for",
    "sha256_hex",
    "upload_id",
]

FEATURE_TRANSFER: Final = "transfer"
"""Advertised in ``ServerSettings.features`` by a server that serves the methods below."""

METHOD_READ: Final = "rmcp/transfer/read"
METHOD_OPEN: Final = "rmcp/transfer/open"
METHOD_WRITE: Final = "rmcp/transfer/write"

TRANSFER_URI_PREFIX: Final = "rmcp://transfer/"
"""A transferred result item is a ``resource_link`` whose ``uri`` is this prefix + the id."""

TRANSFER_NOT_FOUND_CODE: Final = -32030
"""JSON-RPC error: no such transfer (never created, expired, or its layout differs)."""
CHUNK_INVALID_CODE: Final = -32031
"""JSON-RPC error: a written chunk's bytes do not match its SHA-256 (or its index is out of
range); nothing was stored, send it again."""

MIN_CHUNK_SIZE: Final = 4 << 10
MAX_CHUNK_SIZE: Final = 16 << 20
DEFAULT_CHUNK_SIZE: Final = 1 << 20
DEFAULT_THRESHOLD: Final = 1 << 20

Encoding = Literal["utf-8", "base64"]
"""How a payload's bytes map back to the JSON string they replace: ``utf-8`` (a text field: the
string's UTF-8 bytes) or ``base64`` (a base64 field such as ``data``/``blob``: the decoded
bytes; the client encodes them again when it rebuilds the item)."""


class TransferAccept(msgspec.Struct, omit_defaults=True, kw_only=True, forbid_unknown_fields=False):
    """``params._meta.rmcp.transfer`` of a ``tools/call``: the client accepts transferred results.

    A server that advertises ``"transfer"`` replaces a result's content item whose payload is
    larger than ``threshold`` bytes by a handle, with chunks of at most ``chunk_size`` bytes
    (the server may choose smaller ones). Without this field a server answers inline.
    """

    threshold: int = DEFAULT_THRESHOLD
    chunk_size: int = DEFAULT_CHUNK_SIZE
    structured: bool = False
    """The client also takes a transferred ``structuredContent`` (:class:`TransferredStructured`):
    it checks the tool's output schema itself, once the payload is rebuilt."""


class TransferHandle(msgspec.Struct, omit_defaults=True, kw_only=True, forbid_unknown_fields=False):
    """One payload: ``size`` bytes in ``len(chunks)`` chunks of ``chunk_size`` bytes (the last one
    shorter), ``chunks[i]`` the SHA-256 (hex) of chunk ``i``, ``sha256`` that of the whole."""

    id: str
    size: int
    chunk_size: int
    sha256: str
    chunks: list[str]
    encoding: Encoding = "utf-8"
    media_type: str | None = None

    @property
    def chunk_count(self) -> int:
        """How many chunks the payload has."""
        return len(self.chunks)

    def chunk_length(self, index: int) -> int:
        """The byte length of chunk ``index``."""
        return min(self.chunk_size, self.size - index * self.chunk_size)


class TransferredContent(msgspec.Struct, omit_defaults=True, kw_only=True, forbid_unknown_fields=False):
    """``_meta.rmcp.transfer`` of a ``resource_link`` item that stands for a large content item.

    ``content`` is the original item without its payload field; ``field`` names that field as a
    dotted path inside it (``text``, ``data``, ``resource.text``, ``resource.blob``). The client
    rebuilds the original item by setting ``field`` to the payload (UTF-8 decoded, or base64
    encoded again, per ``handle.encoding``).
    """

    handle: TransferHandle
    content: dict[str, object]
    field: str


STRUCTURED_META_KEY: Final = "rmcp.structured"
"""The key of ``result._meta`` holding a :class:`TransferredStructured` (beside ``rmcp``, which
the ACK rewrites on every answer)."""


class TransferredStructured(msgspec.Struct, omit_defaults=True, kw_only=True, forbid_unknown_fields=False):
    """``result._meta["rmcp.structured"]``: the result's ``structuredContent``, left out of the
    answer because it is larger than the client's threshold.

    Exactly one field is set. ``handle``: the JSON (UTF-8) of ``structuredContent``, read as any
    transfer. ``result_of``: ``structuredContent`` is ``{"result": text}``, ``text`` being the
    payload of the transferred text item ``content[result_of]`` (the shape ``MCPServer`` gives a
    tool returning ``str``): its bytes cross once.
    """

    handle: TransferHandle | None = None
    result_of: int | None = None


class Upload(msgspec.Struct, omit_defaults=True, kw_only=True, forbid_unknown_fields=False):
    """One entry of ``params._meta.rmcp.uploads``: the argument at ``path`` (keys and list
    indices from the top of ``arguments``) is the uploaded payload ``handle``, UTF-8 decoded.
    The client sends ``""`` in its place; the server substitutes the payload before anything
    else sees the arguments (fingerprint, validation, the tool)."""

    path: list[str | int]
    handle: TransferHandle


class ReadParams(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    """Params of :data:`METHOD_READ`: chunk ``index`` of result transfer ``id``."""

    id: str
    index: int


class ChunkData(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    """Result of :data:`METHOD_READ`: the chunk's bytes in base64 and their SHA-256 (hex)."""

    id: str
    index: int
    data: str
    sha256: str


class OpenParams(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    """Params of :data:`METHOD_OPEN`: start, or resume, an upload of ``handle``.

    Opening the same id again with the same layout resumes; a different layout is
    :data:`TRANSFER_NOT_FOUND_CODE`."""

    handle: TransferHandle


class OpenResult(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    """Result of :data:`METHOD_OPEN`: the indices of the chunks the server holds, verified."""

    id: str
    have: list[int]


class WriteParams(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    """Params of :data:`METHOD_WRITE`: chunk ``index`` of upload ``id``, base64, with its SHA-256."""

    id: str
    index: int
    data: str
    sha256: str


class WriteResult(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    """Result of :data:`METHOD_WRITE`: the chunk is stored (durably, with a durable store)."""

    id: str
    index: int


def sha256_hex(data: bytes | bytearray | memoryview) -> str:
    """The SHA-256 of ``data`` in lowercase hex."""
    return hashlib.sha256(data).hexdigest()


def chunk_digests(payload: bytes | bytearray | memoryview, chunk_size: int) -> Iterator[str]:
    """The SHA-256 of each ``chunk_size`` slice of ``payload``, in order (one empty chunk for an
    empty payload)."""
    view = memoryview(payload)
    if not view.nbytes:
        yield sha256_hex(b"")
        return
    for start in range(0, view.nbytes, chunk_size):
        yield sha256_hex(view[start : start + chunk_size])


def handle_for(
    transfer_id: str,
    payload: bytes | bytearray | memoryview,
    chunk_size: int,
    *,
    encoding: Encoding = "utf-8",
    media_type: str | None = None,
) -> TransferHandle:
    """The handle of ``payload`` held in memory, cut into ``chunk_size`` chunks."""
    return TransferHandle(
        id=transfer_id,
        size=memoryview(payload).nbytes,
        chunk_size=chunk_size,
        sha256=sha256_hex(payload),
        chunks=list(chunk_digests(payload, chunk_size)),
        encoding=encoding,
        media_type=media_type,
    )


def upload_id(handle_sha256: str, chunk_size: int) -> str:
    """The id of an upload: content-addressed, so a retried call reuses what the server holds."""
    return f"up-{handle_sha256}-{chunk_size}"


def encode_chunk(data: bytes | bytearray | memoryview) -> str:
    """A chunk's bytes as the base64 string the wire carries."""
    return base64.b64encode(data).decode("ascii")


def decode_chunk(data: str, sha256: str) -> bytes | None:
    """The bytes of a chunk received as base64, or None when they do not match ``sha256`` (or
    are not base64): the caller fetches or sends the chunk again."""
    try:
        raw = base64.b64decode(data, validate=True)
    except ValueError:
        return None
    return raw if sha256_hex(raw) == sha256 else None
