"""Cancellation, concurrency and memory of the server side of chunked transfer, found in
review (docs/protocol.md section 9): each shown with a real server and store."""

from __future__ import annotations

import base64
import os
import signal
import sys
import tracemalloc
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import mcp
import pytest
import trio
import trio.testing
from mcp import MCPError
from mcp.client.stdio import StdioServerParameters
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import ImageContent, RequestParamsMeta, TextContent
from test_transfer_server import (
    open_upload,
    read_chunk,
    read_payload,
    transferred,
    upload_meta,
    write_chunk,
)

import rmcp_actors
from rmcp_actors._transfer import handle_for, sha256_hex, upload_id
from rmcp_actors.errors import RMCPStoreError
from rmcp_actors.server import FastRMCP, stream_result
from rmcp_actors.stores import DedupStore, MemoryStore, SQLiteStore

KIB = 1 << 10
MIB = 1 << 20
SMALL = {"threshold": 64 * KIB, "chunk_size": 64 * KIB}


def rmcp_meta(key: str | None, **extra: Any) -> RequestParamsMeta:
    fields: dict[str, Any] = {"version": "0.2", "request_id": uuid.uuid4().hex, **extra}
    if key is not None:
        fields["idempotency_key"] = key
    return cast(RequestParamsMeta, {"rmcp": fields})


def code_of(result: Any) -> str | None:
    return (result.meta or {})["rmcp"].get("code")


class SlowChunks:
    """A MemoryStore (mock clock) whose chunk writes take a second each while ``slow``: a run
    whose result is being written can be cut short by ``max_execution_s``."""

    def __init__(self, max_blob_bytes: int) -> None:
        self.inner = MemoryStore(clock=trio.current_time, max_blob_bytes=max_blob_bytes)
        self.slow = True

    async def write_chunk(self, transfer_id: str, index: int, data: bytes) -> None:
        if self.slow:
            await trio.sleep(1)
        await self.inner.write_chunk(transfer_id, index, data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def text_server(store: Any, text: str, **options: Any) -> FastRMCP:
    app = FastRMCP("review", store=cast(DedupStore, store), **options)

    @app.tool(structured_output=False)
    async def big() -> str:
        """``text``, built before the call."""
        return text

    return app


# --- a run cut short while its result is written ---------------------------------------------------


async def test_a_result_cut_short_while_written_leaves_no_chunks_and_its_key_in_doubt(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = SlowChunks(max_blob_bytes=3 * MIB // 2)
    # 16 chunks of a second each, cut after 10 s: 640 KiB written when the run is cut short.
    app = text_server(store, "x" * MIB, max_execution_s=10.0)
    async with mcp.Client(app) as client:
        cut = await client.call_tool("big", {}, meta=rmcp_meta("cut", transfer=SMALL))
        retry = await client.call_tool("big", {}, meta=rmcp_meta("cut", transfer=SMALL))
        store.slow = False
        # 1 MiB more fits the cap only if the chunks of the run cut short were freed.
        after = await client.call_tool("big", {}, meta=rmcp_meta("after", transfer=SMALL))
        data = await read_payload(client, transferred(after.content[0]).handle)
    assert code_of(cut) == "in_doubt"
    # Never a handle to chunks that were not all written.
    assert code_of(retry) == "in_doubt"
    assert data == b"x" * MIB


async def test_a_stream_that_hangs_is_cut_short_in_doubt_and_leaves_no_chunks(
    autojump_clock: trio.testing.MockClock,
) -> None:
    closed: list[bool] = []
    store = MemoryStore(clock=trio.current_time, max_blob_bytes=3 * MIB // 2)
    app = text_server(store, "x" * MIB, max_execution_s=10.0)

    @app.tool()
    async def stuck() -> TextContent:
        """1 MiB, then nothing ever again."""

        async def pieces() -> AsyncIterator[bytes]:
            try:
                yield b"h" * MIB
                await trio.sleep_forever()
                yield b""
            finally:
                closed.append(True)

        return await stream_result(pieces())

    async with mcp.Client(app) as client:
        cut = await client.call_tool("stuck", {}, meta=rmcp_meta("stuck", transfer=SMALL))
        after = await client.call_tool("big", {}, meta=rmcp_meta("after", transfer=SMALL))
        data = await read_payload(client, transferred(after.content[0]).handle)
    assert code_of(cut) == "in_doubt"
    assert closed == [True]
    assert data == b"x" * MIB


async def test_a_stream_whose_cleanup_fails_still_leaves_no_chunks() -> None:
    app = text_server(MemoryStore(max_blob_bytes=MIB), "x" * MIB)

    @app.tool()
    async def export() -> TextContent:
        """2 MiB, more than the store holds; its cleanup fails too."""

        async def pieces() -> AsyncIterator[bytes]:
            try:
                for _ in range(32):
                    yield b"c" * (64 * KIB)
            finally:
                raise RuntimeError("could not close the cursor")

        return await stream_result(pieces())

    async with mcp.Client(app) as client:
        failed = await client.call_tool("export", {}, meta=rmcp_meta("export", transfer=SMALL))
        # The whole cap is free again only if the failed stream's chunks were deleted.
        after = await client.call_tool("big", {}, meta=rmcp_meta("after", transfer=SMALL))
        data = await read_payload(client, transferred(after.content[0]).handle)
    assert failed.is_error
    assert data == b"x" * MIB


async def test_the_items_written_before_a_stream_fails_are_forgotten() -> None:
    app = text_server(MemoryStore(max_blob_bytes=3 * MIB // 2), "x" * MIB)

    @app.tool()
    async def then_broken() -> list[TextContent]:
        """A large item, then a stream that fails: the answer is a tool error."""

        async def pieces() -> AsyncIterator[bytes]:
            yield b"y" * MIB
            raise ToolError("the export lost its database")

        return [TextContent(text="z" * MIB), await stream_result(pieces())]

    async with mcp.Client(app) as client:
        failed = await client.call_tool("then_broken", {}, meta=rmcp_meta("broken", transfer=SMALL))
        # 1 MiB more fits the cap only if the first item's transfer was freed.
        after = await client.call_tool("big", {}, meta=rmcp_meta("after", transfer=SMALL))
        data = await read_payload(client, transferred(after.content[0]).handle)
    assert failed.is_error
    assert data == b"x" * MIB


# --- memory --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sqlite", "memory"])
async def test_a_str_result_is_not_encoded_whole_on_its_way_to_the_store(kind: str, tmp_path: Path) -> None:
    size = 16 * MIB
    text = "é" * (size // 4) + "a" * (size // 2)  # 1.5 bytes of UTF-8 a character on average
    store = SQLiteStore(tmp_path / "rmcp.sqlite") if kind == "sqlite" else MemoryStore()
    app = text_server(store, text)
    async with mcp.Client(app) as client:
        await client.call_tool("big", {}, meta=rmcp_meta("warm-up", transfer=SMALL))
        tracemalloc.start()
        try:
            result = await client.call_tool("big", {}, meta=rmcp_meta("measured", transfer=SMALL))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        data = await read_payload(client, transferred(result.content[0]).handle)
    assert data.decode() == text
    encoded = len(data)
    # The store's own copy (MemoryStore keeps the chunks) and a few chunks, not a second payload.
    bound = (encoded if kind == "memory" else 0) + 4 * MIB
    assert peak < bound, f"peak {peak / MIB:.1f} MiB for a {encoded / MIB:.0f} MiB result ({kind})"


@pytest.mark.parametrize("kind", ["sqlite", "memory"])
async def test_a_base64_result_is_not_decoded_whole_on_its_way_to_the_store(
    kind: str, tmp_path: Path
) -> None:
    raw = bytes(range(256)) * (12 * MIB // 256)
    data = base64.b64encode(raw).decode()
    store = SQLiteStore(tmp_path / "rmcp.sqlite") if kind == "sqlite" else MemoryStore()
    app = FastRMCP("review", store=store)

    @app.tool()
    async def picture() -> ImageContent:
        """An image whose base64 was built before the call."""
        return ImageContent(data=data, mime_type="image/png")

    async with mcp.Client(app) as client:
        await client.call_tool("picture", {}, meta=rmcp_meta("warm-up", transfer=SMALL))
        tracemalloc.start()
        try:
            result = await client.call_tool("picture", {}, meta=rmcp_meta("measured", transfer=SMALL))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        held = await read_payload(client, transferred(result.content[0]).handle)
    assert held == raw
    bound = (len(raw) if kind == "memory" else 0) + 4 * MIB
    assert peak < bound, f"peak {peak / MIB:.1f} MiB for a {len(raw) / MIB:.0f} MiB image ({kind})"


@pytest.mark.parametrize("flaw", ["=", "!"])
async def test_an_item_that_is_not_base64_is_answered_inline_and_leaves_nothing_stored(flaw: str) -> None:
    store = MemoryStore(max_blob_bytes=3 * MIB // 2)
    # Not base64 past its first megabyte: found out once chunks are written.
    broken = "QUJD" * (MIB // 4) + flaw + "QUJ" + "QUJD" * (MIB // 8)
    app = text_server(store, "x" * MIB)

    @app.tool()
    async def picture() -> ImageContent:
        """An image whose data is not base64."""
        return ImageContent(data=broken, mime_type="image/png")

    async with mcp.Client(app) as client:
        inline = await client.call_tool("picture", {}, meta=rmcp_meta("broken", transfer=SMALL))
        after = await client.call_tool("big", {}, meta=rmcp_meta("after", transfer=SMALL))
        data = await read_payload(client, transferred(after.content[0]).handle)
    assert inline.content[0].type == "image"
    assert inline.content[0].data == broken  # type: ignore[union-attr]
    assert data == b"x" * MIB


# --- concurrency -----------------------------------------------------------------------------------


async def test_a_waiting_duplicate_and_a_replay_get_the_first_runs_readable_handle() -> None:
    started, release = trio.Event(), trio.Event()
    app = FastRMCP("review", store=MemoryStore())
    runs: list[int] = []

    @app.tool(structured_output=False)
    async def slow() -> str:
        """A large result, once released."""
        runs.append(1)
        started.set()
        await release.wait()
        return "s" * MIB

    results: dict[str, Any] = {}
    async with mcp.Client(app) as client:

        async def call(name: str) -> None:
            results[name] = await client.call_tool("slow", {}, meta=rmcp_meta("same", transfer=SMALL))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(call, "first")
            await started.wait()
            nursery.start_soon(call, "duplicate")
            await trio.testing.wait_all_tasks_blocked()
            release.set()
        await call("replay")
        handles = [transferred(results[name].content[0]).handle for name in ("first", "duplicate", "replay")]
        data = [await read_payload(client, handle) for handle in handles]
    assert runs == [1]
    assert handles[0] == handles[1] == handles[2]
    assert data == [b"s" * MIB] * 3
    assert [(results[name].meta or {})["rmcp"]["duplicate"] for name in ("first", "duplicate", "replay")] == [
        False,
        True,
        True,
    ]


async def test_a_stream_the_store_cannot_hold_is_closed_before_the_answer() -> None:
    closed: list[bool] = []
    app = FastRMCP("review", store=MemoryStore(max_blob_bytes=MIB))

    @app.tool()
    async def export() -> TextContent:
        """A 4 MiB stream: the store holds 1 MiB."""

        async def pieces() -> AsyncIterator[bytes]:
            try:
                for _ in range(64):
                    yield b"e" * (64 * KIB)
            finally:
                closed.append(True)

        return await stream_result(pieces())

    async with mcp.Client(app) as client:
        result = await client.call_tool("export", {}, meta=rmcp_meta("export", transfer=SMALL))
        answered = list(closed)
    assert result.is_error
    assert answered == [True], "the tool's stream was left suspended, for the GC to close"


# --- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sqlite", "memory"])
@pytest.mark.parametrize("index", [-1, 1 << 63, 1 << 70])
async def test_a_read_index_out_of_range_is_invalid_params_with_either_store(
    kind: str, index: int, tmp_path: Path
) -> None:
    store = SQLiteStore(tmp_path / "rmcp.sqlite") if kind == "sqlite" else MemoryStore()
    async with mcp.Client(text_server(store, "i" * MIB)) as client:
        result = await client.call_tool("big", {}, meta=rmcp_meta("k", transfer=SMALL))
        handle = transferred(result.content[0]).handle
        with pytest.raises(MCPError) as refused:
            await read_chunk(client, handle.id, index)
    # Not -32603 ("retry later"): SQLite cannot bind an integer past 2**63 - 1.
    assert refused.value.error.code == -32602


# --- a server gone while a result is written (stdio, SQLite) -------------------------------------

REVIEW_SERVER = str(Path(__file__).with_name("transfer_review_server.py"))


def review_server(database: Path) -> StdioServerParameters:
    package = {"PYTHONPATH": str(Path(rmcp_actors.__file__).resolve().parents[1])}
    return StdioServerParameters(command=sys.executable, args=[REVIEW_SERVER, str(database)], env=package)


def expected_stream(pieces: int) -> bytes:
    return b"".join(bytes([97 + index % 26]) * (256 * KIB) for index in range(pieces))


async def wait_for_pids(marker: Path) -> list[int]:
    with trio.fail_after(30):
        while not marker.exists() or not marker.read_text().endswith("\n"):
            await trio.sleep(0.01)
    return [int(line) for line in marker.read_text().split()]


@pytest.mark.parametrize("gone", ["disconnect", "sigkill"])
async def test_a_retry_after_the_server_went_away_mid_write_gets_a_readable_handle_or_in_doubt(
    gone: str, tmp_path: Path
) -> None:
    database, marker = tmp_path / "rmcp.sqlite", tmp_path / "marker"
    pieces = 16
    arguments = {"pieces": pieces, "marker": str(marker)}
    async with trio.open_nursery() as nursery, mcp.Client(review_server(database)) as client:

        async def call() -> None:
            await client.call_tool("slow_stream", arguments, meta=rmcp_meta("gone", transfer=SMALL))

        nursery.start_soon(call)
        (pid,) = await wait_for_pids(marker)
        if gone == "sigkill":
            os.kill(pid, signal.SIGKILL)
        nursery.cancel_scope.cancel()
    async with mcp.Client(review_server(database)) as client:
        retry = await client.call_tool("slow_stream", arguments, meta=rmcp_meta("gone", transfer=SMALL))
        if gone == "disconnect":
            # The run is shielded from its caller: it ended, stored, and is replayed.
            assert (retry.meta or {})["rmcp"]["duplicate"] is True
            data = await read_payload(client, transferred(retry.content[0]).handle)
            assert data == expected_stream(pieces)
        else:
            assert code_of(retry) == "in_doubt"
    # The tool ran once.
    assert len(await wait_for_pids(marker)) == 1


async def test_two_sqlite_stores_racing_for_the_size_cap_never_pass_it(tmp_path: Path) -> None:
    path, chunk = tmp_path / "rmcp.sqlite", 64 * KIB
    stores = [SQLiteStore(path, max_blob_bytes=MIB) for _ in range(2)]
    stored: list[int] = []

    async def fill(store: SQLiteStore, name: str) -> None:
        data = name.encode() * MIB
        handle = handle_for(upload_id(sha256_hex(data), chunk), data, chunk)
        await store.open_transfer(handle, key=None, scope="s", sealed=True)
        for index in range(handle.chunk_count):
            try:
                await store.write_chunk(handle.id, index, data[index * chunk : (index + 1) * chunk])
            except RMCPStoreError:
                continue
            stored.append(chunk)

    try:
        async with trio.open_nursery() as nursery:
            for store, name in zip(stores, "ab", strict=True):
                nursery.start_soon(fill, store, name)
    finally:
        for store in stores:
            await store.aclose()
    # Each process's writes are checked against the file's total under its write lock.
    assert sum(stored) == MIB


def sizing_server(store: MemoryStore) -> FastRMCP:
    app = FastRMCP("review", store=store)

    @app.tool()
    async def size(text: str) -> int:
        """The length of ``text`` (an uploaded argument)."""
        return len(text)

    return app


async def test_two_callers_uploading_the_same_payload_at_once_both_run(
    autojump_clock: trio.testing.MockClock,
) -> None:
    text = "u" * MIB
    data, chunk = text.encode(), 64 * KIB
    handle = handle_for(upload_id(sha256_hex(data), chunk), data, chunk)
    app = sizing_server(MemoryStore(clock=trio.current_time))
    sizes: list[int] = []

    async def caller(order: range, key: str) -> None:
        async with mcp.Client(app) as client:
            await open_upload(client, handle)
            for index in order:
                await write_chunk(client, handle, index, data[index * chunk : (index + 1) * chunk])
                await trio.sleep(1)
            result = await client.call_tool("size", {"text": ""}, meta=upload_meta(handle, key))
            sizes.append(cast(dict[str, int], result.structured_content)["result"])

    async with trio.open_nursery() as nursery:
        # Opposite orders: each writes chunks the other wrote already (no-ops), interleaved.
        nursery.start_soon(caller, range(handle.chunk_count), "one")
        nursery.start_soon(caller, range(handle.chunk_count - 1, -1, -1), "two")
    assert sizes == [MIB, MIB]


async def test_an_upload_that_expires_between_writes_is_32030_then_starts_over(
    autojump_clock: trio.testing.MockClock,
) -> None:
    data, chunk = b"v" * MIB, 64 * KIB
    handle = handle_for(upload_id(sha256_hex(data), chunk), data, chunk)
    app = sizing_server(MemoryStore(clock=trio.current_time, upload_ttl_s=60.0))
    async with mcp.Client(app) as client:
        await open_upload(client, handle)
        await write_chunk(client, handle, 0, data[:chunk])
        await trio.sleep(61)
        with pytest.raises(MCPError) as expired:
            await write_chunk(client, handle, 1, data[chunk : 2 * chunk])
        have = await open_upload(client, handle)
        refused = await client.call_tool("size", {"text": ""}, meta=upload_meta(handle, "late"))
    assert expired.value.error.code == -32030
    assert have == []
    assert code_of(refused) == "transfer_incomplete"


async def test_a_stream_read_inline_for_a_plain_client_is_held_at_most_twice() -> None:
    size, piece = 16 * MIB, 256 * KIB
    app = FastRMCP("review", store=MemoryStore())

    @app.tool()
    async def export() -> TextContent:
        """16 MiB of text, made piece by piece."""

        async def pieces() -> AsyncIterator[bytes]:
            for index in range(size // piece):
                yield bytes([97 + index % 26]) * piece

        return await stream_result(pieces())

    async with mcp.Client(app) as client:
        await client.call_tool("export", {})
        tracemalloc.start()
        try:
            # The in-memory transport hands the result over without copying it.
            result = await client.call_tool("export", {})
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert len(result.content[0].text) == size  # type: ignore[union-attr]
    # The bytes and the str made of them; not a list of pieces, then their join, then the str.
    assert peak < 2 * size + 4 * MIB, f"peak {peak / MIB:.1f} MiB for a {size // MIB} MiB stream"
