"""The RMCP server side of chunked transfer (docs/protocol.md section 9), at the wire: a raw
``mcp.Client`` sends ``_meta.rmcp.transfer`` / ``uploads`` and the ``rmcp/transfer/*`` requests
itself, over in-memory, stdio (a ``FastRMCP.run()`` subprocess) and Streamable HTTP."""

from __future__ import annotations

import base64
import hashlib
import sys
import tracemalloc
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal, cast

import httpx2
import mcp
import msgspec
import pytest
from _http import serve_http
from mcp import MCPError
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import MCPServer
from mcp_types import CallToolResult, Request, RequestParams, RequestParamsMeta
from pydantic import AnyHttpUrl, BaseModel, ConfigDict
from test_tasks_server import final_result, send, task_of
from transfer_server import binary, build_transfer_server, lazy_payload, payload

import rmcp_actors
from rmcp_actors._transfer import (
    CHUNK_INVALID_CODE,
    FEATURE_TRANSFER,
    TRANSFER_NOT_FOUND_CODE,
    TRANSFER_URI_PREFIX,
    TransferHandle,
    TransferredContent,
    chunk_digests,
    decode_chunk,
    encode_chunk,
    handle_for,
    sha256_hex,
    upload_id,
)
from rmcp_actors.errors import RMCPConfigError
from rmcp_actors.server import install, rmcp_of
from rmcp_actors.stores import MemoryStore, SQLiteStore

KIB = 1 << 10
MIB = 1 << 20
SMALL = {"threshold": 64 * KIB, "chunk_size": 64 * KIB}
SERVER_PROGRAM = str(Path(__file__).with_name("transfer_server.py"))
SAME_PACKAGE = {"PYTHONPATH": str(Path(rmcp_actors.__file__).resolve().parents[1])}


# --- the wire, as a client without rmcp_actors' client would speak it --------------------------


class _Raw(BaseModel):
    model_config = ConfigDict(extra="allow")

    @property
    def fields(self) -> dict[str, Any]:
        return self.model_extra or {}


class _ReadParams(RequestParams):
    id: str
    index: int


class _OpenParams(RequestParams):
    handle: dict[str, Any]


class _WriteParams(RequestParams):
    id: str
    index: int
    data: str
    sha256: str


class _Read(Request[_ReadParams, Literal["rmcp/transfer/read"]]):
    method: Literal["rmcp/transfer/read"] = "rmcp/transfer/read"
    params: _ReadParams


class _Open(Request[_OpenParams, Literal["rmcp/transfer/open"]]):
    method: Literal["rmcp/transfer/open"] = "rmcp/transfer/open"
    params: _OpenParams


class _Write(Request[_WriteParams, Literal["rmcp/transfer/write"]]):
    method: Literal["rmcp/transfer/write"] = "rmcp/transfer/write"
    params: _WriteParams


def rmcp_meta(key: str | None = None, **extra: Any) -> RequestParamsMeta:
    fields: dict[str, Any] = {"version": "0.2", "request_id": uuid.uuid4().hex, **extra}
    if key is not None:
        fields["idempotency_key"] = key
    return cast(RequestParamsMeta, {"rmcp": fields})


async def read_chunk(client: mcp.Client, transfer_id: str, index: int) -> dict[str, Any]:
    raw = await client.session.send_request(_Read(params=_ReadParams(id=transfer_id, index=index)), _Raw)
    return raw.fields


async def open_upload(client: mcp.Client, handle: TransferHandle) -> list[int]:
    params = _OpenParams(handle=cast(dict[str, Any], msgspec.to_builtins(handle)))
    raw = await client.session.send_request(_Open(params=params), _Raw)
    assert raw.fields["id"] == handle.id
    return raw.fields["have"]


async def write_chunk(client: mcp.Client, handle: TransferHandle, index: int, data: bytes) -> None:
    params = _WriteParams(id=handle.id, index=index, data=encode_chunk(data), sha256=sha256_hex(data))
    raw = await client.session.send_request(_Write(params=params), _Raw)
    assert raw.fields["id"] == handle.id
    assert raw.fields["index"] == index


def transferred(item: Any) -> TransferredContent:
    """The transfer of a ``resource_link`` item, checked against the protocol's shape."""
    assert item.type == "resource_link"
    meta = msgspec.convert((item.meta or {})["rmcp"]["transfer"], TransferredContent)
    assert str(item.uri) == TRANSFER_URI_PREFIX + meta.handle.id
    assert item.size == meta.handle.size
    return meta


async def read_payload(client: mcp.Client, handle: TransferHandle) -> bytes:
    """Every chunk, each verified against the handle, and the whole against its SHA-256."""
    whole = hashlib.sha256()
    parts: list[bytes] = []
    for index in range(handle.chunk_count):
        chunk = await read_chunk(client, handle.id, index)
        assert chunk["id"] == handle.id
        assert chunk["index"] == index
        data = decode_chunk(chunk["data"], handle.chunks[index])
        assert data is not None, f"chunk {index} does not match its hash"
        assert len(data) == handle.chunk_length(index)
        whole.update(data)
        parts.append(data)
    assert whole.hexdigest() == handle.sha256
    return b"".join(parts)


async def upload(client: mcp.Client, text: str, chunk_size: int) -> TransferHandle:
    data = text.encode()
    handle = handle_for(upload_id(sha256_hex(data), chunk_size), data, chunk_size)
    have = await open_upload(client, handle)
    for index in range(handle.chunk_count):
        if index not in have:
            await write_chunk(client, handle, index, data[index * chunk_size : (index + 1) * chunk_size])
    return handle


def upload_meta(
    handle: TransferHandle, key: str | None, path: list[str | int] | None = None
) -> RequestParamsMeta:
    uploads = [{"path": path or ["text"], "handle": msgspec.to_builtins(handle)}]
    return rmcp_meta(key, uploads=uploads)


def stdio_server(*extra: str) -> StdioServerParameters:
    return StdioServerParameters(command=sys.executable, args=[SERVER_PROGRAM, *extra], env=SAME_PACKAGE)


@asynccontextmanager
async def connected(transport: str, app: MCPServer | None = None) -> AsyncIterator[mcp.Client]:
    """A raw client of the transfer server over ``transport``."""
    if transport == "memory":
        async with mcp.Client(app or build_transfer_server()) as client:
            yield client
    elif transport == "stdio":
        async with mcp.Client(stdio_server()) as client:
            yield client
    else:
        async with serve_http(app or build_transfer_server()) as server, mcp.Client(server.url) as client:
            yield client


def runs(app: MCPServer) -> dict[str, int]:
    return cast(dict[str, int], app.runs)  # type: ignore[attr-defined]


# --- advertisement and inline answers ------------------------------------------------------------


async def test_transfer_is_advertised_with_a_blob_store_and_not_when_switched_off() -> None:
    async with mcp.Client(build_transfer_server()) as client:
        on = client.server_capabilities.experimental or {}
    async with mcp.Client(build_transfer_server(transfer=False)) as client:
        off = client.server_capabilities.experimental or {}
        # Nothing serves the methods either.
        with pytest.raises(MCPError) as raised:
            await read_chunk(client, "r-x", 0)
    assert FEATURE_TRANSFER in on["rmcp"]["features"]
    assert FEATURE_TRANSFER not in off["rmcp"]["features"]
    assert raised.value.error.code == -32601


async def test_a_server_without_transfer_answers_inline_and_refuses_uploads() -> None:
    app = build_transfer_server(transfer=False)
    data = payload(MIB).encode()
    handle = handle_for(upload_id(sha256_hex(data), 64 * KIB), data, 64 * KIB)
    async with mcp.Client(app) as client:
        result = await client.call_tool("text", {"size": MIB}, meta=rmcp_meta("k", transfer=SMALL))
        refused = await client.call_tool("digest", {"text": ""}, meta=upload_meta(handle, "u"))
    assert result.content[0].text == payload(MIB)  # type: ignore[union-attr]
    assert (refused.meta or {})["rmcp"]["code"] == "invalid_meta"
    assert runs(app) == {"text": 1}


def test_install_refuses_a_server_that_serves_the_methods_already() -> None:
    app = MCPServer("taken")
    lowlevel = app._lowlevel_server  # pyright: ignore[reportPrivateUsage]
    lowlevel.add_request_handler("rmcp/transfer/read", _ReadParams, read_nothing)
    with pytest.raises(RMCPConfigError, match="transfer=False"):
        install(app)
    install(MCPServer("untaken"), transfer=False)


async def read_nothing(ctx: Any, params: _ReadParams) -> dict[str, Any]:
    return {}


async def test_a_small_result_stays_inline() -> None:
    async with mcp.Client(build_transfer_server()) as client:
        result = await client.call_tool("text", {"size": KIB}, meta=rmcp_meta("k", transfer=SMALL))
    assert result.content[0].type == "text"
    assert result.content[0].text == payload(KIB)  # type: ignore[union-attr]


@pytest.mark.parametrize("rmcp", [False, True], ids=["plain", "rmcp-without-transfer"])
async def test_a_request_without_transfer_gets_inline_content(rmcp: bool) -> None:
    app = build_transfer_server()
    async with mcp.Client(app) as client:
        result = await client.call_tool("text", {"size": MIB}, meta=rmcp_meta("t") if rmcp else None)
        streamed = await client.call_tool("streamed", {"size": MIB}, meta=rmcp_meta("s") if rmcp else None)
    assert result.content[0].text == payload(MIB)  # type: ignore[union-attr]
    assert streamed.content[0].text == payload(MIB, 3)  # type: ignore[union-attr]
    assert rmcp_of(app).transfers.statistics().results == 0  # type: ignore[union-attr]


# --- results as handles --------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["memory", "stdio", "http"])
async def test_a_5_mib_result_is_read_in_verified_chunks(transport: str) -> None:
    size = 5 * MIB
    async with connected(transport) as client:
        # 256 KiB chunks: their base64 fits the SDK's 1 MiB cap of an SSE event.
        accept = {"threshold": MIB, "chunk_size": 256 * KIB}
        result = await client.call_tool("text", {"size": size}, meta=rmcp_meta("five", transfer=accept))
        (item,) = result.content
        meta = transferred(item)
        data = await read_payload(client, meta.handle)
    assert meta.field == "text"
    assert meta.content == {"type": "text"}
    assert meta.handle.encoding == "utf-8"
    assert meta.handle.media_type == "text/plain"
    assert meta.handle.chunk_size == 256 * KIB
    assert meta.handle.chunk_count == 20
    assert data.decode() == payload(size)
    assert (result.meta or {})["rmcp"]["ack"] is True


async def test_a_50_mib_result_over_stdio() -> None:
    size = 50 * MIB
    async with mcp.Client(stdio_server()) as client:
        accept = {"threshold": MIB, "chunk_size": MIB}
        result = await client.call_tool("text", {"size": size}, meta=rmcp_meta("fifty", transfer=accept))
        meta = transferred(result.content[0])
        data = await read_payload(client, meta.handle)
    assert meta.handle.chunk_count == 50
    assert hashlib.sha256(data).hexdigest() == hashlib.sha256(payload(size).encode()).hexdigest()


async def test_a_50_mib_argument_over_stdio() -> None:
    text = payload(50 * MIB, 6)
    async with mcp.Client(stdio_server()) as client:
        handle = await upload(client, text, MIB)
        result = await client.call_tool("digest", {"text": ""}, meta=upload_meta(handle, "fifty-up"))
    assert handle.chunk_count == 50
    assert digest_of(result)["sha256"] == hashlib.sha256(text.encode()).hexdigest()


async def test_a_replay_serves_the_same_handle_and_the_tool_ran_once() -> None:
    app = build_transfer_server()
    async with mcp.Client(app) as client:
        first = await client.call_tool("text", {"size": MIB}, meta=rmcp_meta("same", transfer=SMALL))
        again = await client.call_tool("text", {"size": MIB}, meta=rmcp_meta("same", transfer=SMALL))
        handle = transferred(again.content[0]).handle
        data = await read_payload(client, handle)
    assert transferred(first.content[0]).handle == handle
    assert (again.meta or {})["rmcp"]["duplicate"] is True
    assert runs(app) == {"text": 1}
    assert data.decode() == payload(MIB)


async def test_a_call_without_a_key_still_gets_handles() -> None:
    async with mcp.Client(build_transfer_server()) as client:
        result = await client.call_tool("text", {"size": MIB}, meta=rmcp_meta(None, transfer=SMALL))
        data = await read_payload(client, transferred(result.content[0]).handle)
    assert data.decode() == payload(MIB)


async def test_only_the_large_item_becomes_a_handle_and_binary_items_keep_their_bytes() -> None:
    async with mcp.Client(build_transfer_server()) as client:
        two = await client.call_tool("two", {"size": MIB}, meta=rmcp_meta("two", transfer=SMALL))
        image = await client.call_tool("image", {"size": MIB}, meta=rmcp_meta("img", transfer=SMALL))
        image_meta = transferred(image.content[0])
        image_bytes = await read_payload(client, image_meta.handle)
    assert two.content[0].type == "text"
    assert two.content[0].text == "small"
    assert transferred(two.content[1]).handle.size == MIB
    assert image_meta.field == "data"
    assert image_meta.handle.encoding == "base64"
    assert image_meta.content == {"type": "image", "mimeType": "image/png"}
    assert image_meta.handle.media_type == "image/png"
    # The payload is the decoded bytes: the client encodes them again to rebuild `data`.
    assert image_bytes == payload(MIB, 2).encode()


async def test_embedded_resources_keep_everything_but_their_text_or_blob() -> None:
    async with mcp.Client(build_transfer_server()) as client:
        result = await client.call_tool("resources", {"size": MIB}, meta=rmcp_meta("res", transfer=SMALL))
        text, blob = (transferred(item) for item in result.content)
        text_bytes = await read_payload(client, text.handle)
        blob_bytes = await read_payload(client, blob.handle)
    assert text.field == "resource.text"
    assert text.handle.encoding == "utf-8"
    assert text.content == {
        "type": "resource",
        "resource": {"uri": "file:///report.txt", "mimeType": "text/plain"},
    }
    assert text_bytes.decode() == payload(MIB, 4)
    assert blob.field == "resource.blob"
    assert blob.handle.encoding == "base64"
    assert blob.handle.media_type == "application/octet-stream"
    assert blob.content["resource"] == {"uri": "file:///report.bin", "mimeType": "application/octet-stream"}
    assert blob_bytes == payload(MIB, 5).encode()


async def test_the_server_honours_its_own_least_threshold_and_largest_chunk() -> None:
    app = build_transfer_server(transfer_min_threshold=2 * MIB, transfer_max_chunk_size=128 * KIB)
    async with mcp.Client(app) as client:
        accept = {"threshold": 0, "chunk_size": MIB}
        inline = await client.call_tool("text", {"size": MIB}, meta=rmcp_meta("a", transfer=accept))
        linked = await client.call_tool("text", {"size": 3 * MIB}, meta=rmcp_meta("b", transfer=accept))
    assert inline.content[0].type == "text"
    assert transferred(linked.content[0]).handle.chunk_size == 128 * KIB


async def test_a_malformed_transfer_request_is_nacked_before_anything_runs() -> None:
    app = build_transfer_server()
    async with mcp.Client(app) as client:
        accept = {"threshold": 0, "chunk_size": 10}
        result = await client.call_tool("text", {"size": MIB}, meta=rmcp_meta("bad", transfer=accept))
    assert result.is_error
    assert (result.meta or {})["rmcp"]["code"] == "invalid_meta"
    assert runs(app) == {}


# --- the read method -----------------------------------------------------------------------------


async def test_an_unknown_transfer_is_32030_and_an_index_out_of_range_is_invalid_params() -> None:
    async with mcp.Client(build_transfer_server()) as client:
        with pytest.raises(MCPError) as unknown:
            await read_chunk(client, "r-nothing", 0)
        result = await client.call_tool("text", {"size": MIB}, meta=rmcp_meta("k", transfer=SMALL))
        handle = transferred(result.content[0]).handle
        with pytest.raises(MCPError) as beyond:
            await read_chunk(client, handle.id, handle.chunk_count)
    assert unknown.value.error.code == TRANSFER_NOT_FOUND_CODE
    assert "r-nothing" in unknown.value.error.message
    assert beyond.value.error.code == -32602


class Verifier:
    """Two users' bearer tokens: requests of each carry its own principal, hence scope."""

    async def verify_token(self, token: str) -> AccessToken | None:
        user = token.removeprefix("token-")
        return AccessToken(token=token, client_id="agent", scopes=[], subject=user) if user in USERS else None


USERS = ("alice", "bob")


def protected_server() -> MCPServer:
    return build_transfer_server(
        token_verifier=Verifier(),
        auth=AuthSettings(issuer_url=AnyHttpUrl("https://auth.example"), resource_server_url=None),
    )


@asynccontextmanager
async def as_user(url: str, user: str) -> AsyncIterator[mcp.Client]:
    headers = {"Authorization": f"Bearer token-{user}"}
    async with (
        httpx2.AsyncClient(headers=headers) as http,
        mcp.Client(streamable_http_client(url, http_client=http)) as client,
    ):
        yield client


async def test_another_scope_can_neither_read_a_result_nor_see_an_upload() -> None:
    text = payload(MIB, 12)
    async with serve_http(protected_server()) as server:
        async with as_user(server.url, "alice") as alice:
            result = await alice.call_tool("text", {"size": MIB}, meta=rmcp_meta("mine", transfer=SMALL))
            handle = transferred(result.content[0]).handle
            uploaded = await upload(alice, text, 64 * KIB)
            assert await read_payload(alice, handle)
        async with as_user(server.url, "bob") as bob:
            with pytest.raises(MCPError) as refused:
                await read_chunk(bob, handle.id, 0)
            bob_has = await open_upload(bob, uploaded)
            incomplete = await bob.call_tool("digest", {"text": ""}, meta=upload_meta(uploaded, "bob's"))
    assert refused.value.error.code == TRANSFER_NOT_FOUND_CODE
    # Content-addressed ids, yet bob does not learn that alice uploaded these bytes.
    assert bob_has == []
    assert (incomplete.meta or {})["rmcp"]["code"] == "transfer_incomplete"


# --- streamed results ----------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["memory", "stdio"])
async def test_a_streamed_result_is_written_chunk_by_chunk(transport: str) -> None:
    size = 3 * MIB + 17
    async with connected(transport) as client:
        result = await client.call_tool("streamed", {"size": size}, meta=rmcp_meta("s", transfer=SMALL))
        meta = transferred(result.content[0])
        data = await read_payload(client, meta.handle)
    assert data == payload(size, 3).encode()
    assert meta.handle.chunk_size == SMALL["chunk_size"]
    assert meta.handle.chunks == list(chunk_digests(data, SMALL["chunk_size"]))
    assert meta.handle.media_type == "text/csv"


@pytest.mark.parametrize("accept", [None, SMALL], ids=["plain", "transfer"])
async def test_a_binary_stream_is_a_blob_resource(accept: dict[str, int] | None) -> None:
    size = 2 * MIB + 3
    expected = b"".join(binary(min(50_000, size - start), start) for start in range(0, size, 50_000))
    meta = None if accept is None else rmcp_meta("zip", transfer=accept)
    async with mcp.Client(build_transfer_server()) as client:
        result = await client.call_tool("archive", {"size": size}, meta=meta)
        (item,) = result.content
        if accept is None:
            assert item.type == "resource"
            data = base64.b64decode(item.resource.blob)  # type: ignore[union-attr]
        else:
            moved = transferred(item)
            assert moved.field == "resource.blob"
            assert moved.handle.encoding == "base64"
            assert moved.handle.media_type == "application/zip"
            assert moved.content == {
                "type": "resource",
                "resource": {"uri": "file:///archive.zip", "mimeType": "application/zip"},
            }
            data = await read_payload(client, moved.handle)
    assert data == expected


async def test_a_streamed_result_within_the_threshold_is_inline() -> None:
    async with mcp.Client(build_transfer_server()) as client:
        result = await client.call_tool("streamed", {"size": 5000}, meta=rmcp_meta("s", transfer=SMALL))
    assert result.content[0].type == "text"
    assert result.content[0].text == payload(5000, 3)  # type: ignore[union-attr]


@pytest.mark.parametrize("accept", [None, SMALL], ids=["plain", "transfer"])
async def test_a_stream_that_fails_is_the_same_tool_error_with_or_without_transfer(
    accept: dict[str, int] | None,
) -> None:
    app = build_transfer_server()
    meta = None if accept is None else rmcp_meta("broken", transfer=accept)
    async with mcp.Client(app) as client:
        result = await client.call_tool("broken_stream", {"size": MIB}, meta=meta)
    assert result.is_error
    assert result.content[0].text == (  # type: ignore[union-attr]
        "Error executing tool broken_stream: the export lost its database"
    )
    assert rmcp_of(app).transfers.statistics().results == 0  # type: ignore[union-attr]


async def test_an_item_the_store_cannot_hold_is_answered_inline() -> None:
    app = build_transfer_server(MemoryStore(max_blob_bytes=512 * KIB))
    async with mcp.Client(app) as client:
        result = await client.call_tool("text", {"size": MIB}, meta=rmcp_meta("big", transfer=SMALL))
        again = await client.call_tool("text", {"size": MIB}, meta=rmcp_meta("big", transfer=SMALL))
    assert result.content[0].text == payload(MIB)  # type: ignore[union-attr]
    assert again.content[0].text == payload(MIB)  # type: ignore[union-attr]
    assert runs(app) == {"text": 1}


async def test_a_streamed_result_into_sqlite_is_memory_bounded(tmp_path: Path) -> None:
    size, piece = 16 * MIB, 64 * KIB
    expected = hashlib.sha256()
    async for part in lazy_payload(size, piece):
        expected.update(part)
    app = build_transfer_server(SQLiteStore(tmp_path / "rmcp.sqlite"))
    async with mcp.Client(app) as client:
        tracemalloc.start()
        try:
            result = await client.call_tool("lazy", {"size": size}, meta=rmcp_meta("lazy", transfer=SMALL))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        handle = transferred(result.content[0]).handle
        data = await read_payload(client, handle)
    assert handle.sha256 == expected.hexdigest()
    assert len(data) == size
    # A few chunks' worth, against 16 MiB (and 2-3 times that) when built in memory.
    assert peak < 4 * MIB, f"peak {peak / MIB:.1f} MiB while streaming a 16 MiB result"


async def test_a_result_is_read_from_another_server_process_sharing_the_sqlite_store(tmp_path: Path) -> None:
    database = str(tmp_path / "rmcp.sqlite")
    size = 3 * MIB
    accept = {"threshold": MIB, "chunk_size": 256 * KIB}
    async with mcp.Client(stdio_server("--sqlite", database)) as client:
        result = await client.call_tool("text", {"size": size}, meta=rmcp_meta("durable", transfer=accept))
        handle = transferred(result.content[0]).handle
        first = await read_chunk(client, handle.id, 0)
    # The first server is gone; a new one on the same file serves the rest, and the replay.
    async with mcp.Client(stdio_server("--sqlite", database)) as client:
        rest = await read_payload(client, handle)
        again = await client.call_tool("text", {"size": size}, meta=rmcp_meta("durable", transfer=accept))
    assert decode_chunk(first["data"], handle.chunks[0]) == rest[: 256 * KIB]
    assert rest.decode() == payload(size)
    assert transferred(again.content[0]).handle == handle
    assert (again.meta or {})["rmcp"]["duplicate"] is True


async def test_an_upload_survives_a_server_restart_with_sqlite(tmp_path: Path) -> None:
    database = str(tmp_path / "rmcp.sqlite")
    text = payload(MIB, 13)
    data = text.encode()
    handle = handle_for(upload_id(sha256_hex(data), 64 * KIB), data, 64 * KIB)
    async with mcp.Client(stdio_server("--sqlite", database)) as client:
        await open_upload(client, handle)
        for index in range(5):
            await write_chunk(client, handle, index, data[index * 64 * KIB : (index + 1) * 64 * KIB])
    async with mcp.Client(stdio_server("--sqlite", database)) as client:
        have = await open_upload(client, handle)
        await upload(client, text, 64 * KIB)
        result = await client.call_tool("digest", {"text": ""}, meta=upload_meta(handle, "restart"))
    assert have == [0, 1, 2, 3, 4]
    assert digest_of(result)["sha256"] == hashlib.sha256(data).hexdigest()


# --- uploads -------------------------------------------------------------------------------------


def digest_of(result: CallToolResult) -> dict[str, Any]:
    assert not result.is_error, result.content
    assert result.structured_content is not None
    return result.structured_content


@pytest.mark.parametrize("transport", ["memory", "stdio", "http"])
async def test_an_uploaded_argument_reaches_the_tool(transport: str) -> None:
    text = payload(5 * MIB, 7)
    async with connected(transport) as client:
        handle = await upload(client, text, 256 * KIB)
        result = await client.call_tool("digest", {"text": ""}, meta=upload_meta(handle, "up"))
    assert digest_of(result)["sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert digest_of(result)["length"] == len(text)


async def test_an_upload_resumes_from_the_chunks_the_server_holds() -> None:
    text = payload(MIB, 8)
    data = text.encode()
    async with mcp.Client(build_transfer_server()) as client:
        handle = handle_for(upload_id(sha256_hex(data), 64 * KIB), data, 64 * KIB)
        assert await open_upload(client, handle) == []
        for index in (0, 3, 15):
            await write_chunk(client, handle, index, data[index * 64 * KIB : (index + 1) * 64 * KIB])
        # Connection "lost": opening again tells what is held.
        assert await open_upload(client, handle) == [0, 3, 15]
        again = await upload(client, text, 64 * KIB)
        result = await client.call_tool("digest", {"text": ""}, meta=upload_meta(again, "resumed"))
    assert again == handle
    assert digest_of(result)["length"] == MIB


async def test_a_corrupt_chunk_is_32031_and_nothing_is_stored() -> None:
    data = payload(MIB, 9).encode()
    async with mcp.Client(build_transfer_server()) as client:
        handle = handle_for(upload_id(sha256_hex(data), 64 * KIB), data, 64 * KIB)
        await open_upload(client, handle)
        corrupt = bytearray(data[: 64 * KIB])
        corrupt[5] ^= 1
        params = _WriteParams(id=handle.id, index=0, data=encode_chunk(corrupt), sha256=handle.chunks[0])
        with pytest.raises(MCPError) as refused:
            await client.session.send_request(_Write(params=params), _Raw)
        with pytest.raises(MCPError) as beyond:
            await write_chunk(client, handle, handle.chunk_count, b"x")
        held = await open_upload(client, handle)
    assert refused.value.error.code == CHUNK_INVALID_CODE
    assert beyond.value.error.code == CHUNK_INVALID_CODE
    assert held == []


async def test_an_incomplete_upload_is_nacked_nothing_runs_and_the_key_is_not_claimed() -> None:
    text = payload(MIB, 10)
    data = text.encode()
    app = build_transfer_server()
    async with mcp.Client(app) as client:
        handle = handle_for(upload_id(sha256_hex(data), 64 * KIB), data, 64 * KIB)
        await open_upload(client, handle)
        await write_chunk(client, handle, 0, data[: 64 * KIB])
        refused = await client.call_tool("digest", {"text": ""}, meta=upload_meta(handle, "inc"))
        await upload(client, text, 64 * KIB)
        # The same key now runs: the refusal was not stored for it.
        result = await client.call_tool("digest", {"text": ""}, meta=upload_meta(handle, "inc"))
    assert refused.is_error
    nack = (refused.meta or {})["rmcp"]
    assert nack["ack"] is False
    assert nack["code"] == "transfer_incomplete"
    assert digest_of(result)["length"] == MIB
    assert runs(app) == {"digest": 1}


async def test_an_inline_retry_and_an_uploaded_retry_of_one_key_agree() -> None:
    text = payload(MIB, 11)
    app = build_transfer_server()
    async with mcp.Client(app) as client:
        inline = await client.call_tool("digest", {"text": text}, meta=rmcp_meta("both"))
        handle = await upload(client, text, 64 * KIB)
        chunked = await client.call_tool("digest", {"text": ""}, meta=upload_meta(handle, "both"))
    assert (chunked.meta or {})["rmcp"]["duplicate"] is True
    assert digest_of(chunked) == digest_of(inline)
    assert runs(app) == {"digest": 1}


async def test_an_upload_path_that_names_no_placeholder_is_invalid_meta() -> None:
    app = build_transfer_server()
    async with mcp.Client(app) as client:
        handle = await upload(client, payload(MIB), 64 * KIB)
        result = await client.call_tool(
            "digest", {"text": "", "label": "x"}, meta=upload_meta(handle, "p", path=["label"])
        )
    assert (result.meta or {})["rmcp"]["code"] == "invalid_meta"
    assert runs(app) == {}


async def test_a_malformed_upload_handle_is_refused_at_open() -> None:
    data = b"z" * MIB
    async with mcp.Client(build_transfer_server()) as client:
        wrong_id = handle_for("up-chosen-by-me", data, 64 * KIB)
        with pytest.raises(MCPError) as refused:
            await open_upload(client, wrong_id)
    assert refused.value.error.code == -32602
    assert "content addressed" in refused.value.error.message


async def test_a_task_call_takes_uploaded_arguments() -> None:
    text = payload(MIB, 14)
    app = build_transfer_server(tasks=True)
    async with mcp.Client(app, mode="legacy") as client:
        handle = await upload(client, text, 64 * KIB)
        uploads = [{"path": ["text"], "handle": msgspec.to_builtins(handle)}]
        meta = rmcp_meta("as-task", uploads=uploads, transfer=SMALL)
        params = {"name": "digest", "arguments": {"text": ""}, "task": {}, "_meta": meta}
        created = await send(client, "tools/call", params, task=True)
        result = await final_result(client, task_of(created)["taskId"])
    assert result["structuredContent"]["sha256"] == hashlib.sha256(text.encode()).hexdigest()
