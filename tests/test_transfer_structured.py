"""A large ``structuredContent`` moves in chunks too (docs/protocol.md 9.2): a client that says
``_meta.rmcp.transfer.structured`` gets it described in ``_meta["rmcp.structured"]`` (a reference
to the text item it repeats, or a transfer of its JSON) instead of inline, and checks the tool's
output schema once it is rebuilt. At the wire with a raw ``mcp.Client``, and through ``sup.call``
in memory and over stdio."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, cast

import mcp
import pytest
from _http import serve_http
from mcp_test_server import build_bad_schema_server
from mcp_types import CallToolRequest, CallToolRequestParams, RequestParamsMeta
from structured_server import build_structured_server
from test_transfer_server import SMALL, _Raw, read_chunk, rmcp_meta
from transfer_server import payload

import rmcp_actors
from rmcp_actors import (
    PolicyOverrides,
    RMCPResultValidationError,
    RMCPSupervisor,
    ServerSpec,
    TransferOverrides,
)
from rmcp_actors._transfer import STRUCTURED_META_KEY, TRANSFER_URI_PREFIX, decode_chunk
from rmcp_actors.server import rmcp_of

KIB = 1 << 10
MIB = 1 << 20
STRUCTURED = {**SMALL, "structured": True}
PROGRAM = str(Path(__file__).with_name("structured_server.py"))
PYTHONPATH = {"PYTHONPATH": str(Path(rmcp_actors.__file__).resolve().parents[1])}


async def raw_call(
    client: mcp.Client, tool: str, arguments: dict[str, Any], meta: RequestParamsMeta
) -> dict[str, Any]:
    """The ``tools/call`` answer as sent (the SDK's own check of the output schema skipped)."""
    request = CallToolRequest(params=CallToolRequestParams(name=tool, arguments=arguments, _meta=meta))
    return (await client.session.send_request(request, _Raw)).fields


async def read_whole(client: mcp.Client, handle: dict[str, Any]) -> bytes:
    parts: list[bytes] = []
    for index, digest in enumerate(handle["chunks"]):
        chunk = decode_chunk((await read_chunk(client, handle["id"], index))["data"], digest)
        assert chunk is not None
        parts.append(chunk)
    return b"".join(parts)


# --- the wire ------------------------------------------------------------------------------------


async def test_a_str_tools_structured_result_refers_to_its_transferred_text() -> None:
    async with mcp.Client(build_structured_server()) as client:
        answer = await raw_call(client, "text", {"size": 5 * MIB}, rmcp_meta(transfer=STRUCTURED))
    assert "structuredContent" not in answer
    assert answer["_meta"][STRUCTURED_META_KEY] == {"result_of": 0}
    (link,) = answer["content"]
    assert link["uri"].startswith(TRANSFER_URI_PREFIX)
    # The 5 MiB cross once, as chunks: the answer itself is a few KiB of handle.
    assert len(json.dumps(answer)) < 64 * KIB
    assert link["_meta"]["rmcp"]["transfer"]["handle"]["size"] == 5 * MIB


async def test_a_models_structured_result_is_a_transfer_of_its_json() -> None:
    app = build_structured_server()
    async with mcp.Client(app) as client:
        answer = await raw_call(client, "report", {"size": MIB}, rmcp_meta(transfer=STRUCTURED))
        described = answer["_meta"][STRUCTURED_META_KEY]
        handle = described["handle"]
        whole = await read_whole(client, handle)
    assert "structuredContent" not in answer
    assert set(described) == {"handle"}
    assert handle["media_type"] == "application/json"
    assert json.loads(whole) == {"label": "big", "length": MIB, "body": payload(MIB, 7)}
    assert len(json.dumps(answer)) < 64 * KIB
    # The text item (the model's JSON) and the structured result: two transfers.
    assert rmcp_of(app).transfers.statistics().results == 2  # type: ignore[union-attr]


@pytest.mark.parametrize("structured", [None, False])
async def test_a_client_without_the_flag_gets_structured_content_inline(structured: bool | None) -> None:
    accept: dict[str, Any] = dict(SMALL) if structured is None else {**SMALL, "structured": structured}
    async with mcp.Client(build_structured_server()) as client:
        answer = await raw_call(client, "text", {"size": MIB}, rmcp_meta(transfer=accept))
        checked = await client.call_tool("text", {"size": MIB}, meta=rmcp_meta(transfer=accept))
    assert answer["structuredContent"] == {"result": payload(MIB)}
    assert STRUCTURED_META_KEY not in answer["_meta"]
    assert answer["content"][0]["type"] == "resource_link"  # the text item as before
    assert checked.structured_content == {"result": payload(MIB)}


async def test_a_structured_result_within_the_threshold_stays_inline() -> None:
    async with mcp.Client(build_structured_server()) as client:
        answer = await raw_call(client, "report", {"size": KIB}, rmcp_meta(transfer=STRUCTURED))
    assert answer["structuredContent"]["body"] == payload(KIB, 7)
    assert STRUCTURED_META_KEY not in answer["_meta"]


# --- through sup.call ----------------------------------------------------------------------------

SMALL_POLICY = TransferOverrides(threshold=64 * KIB, chunk_size=64 * KIB)


def spec(transport: str, app: Any = None) -> ServerSpec:
    layer = PolicyOverrides(transfer=SMALL_POLICY)
    if transport == "memory":
        return ServerSpec.in_memory("s", app or build_structured_server(), overrides=layer)
    return ServerSpec.stdio("s", sys.executable, [PROGRAM], env=PYTHONPATH, overrides=layer)


@pytest.mark.parametrize("transport", ["memory", "stdio", "http"])
async def test_a_5_mib_str_result_crosses_once(transport: str) -> None:
    app = build_structured_server()
    text = payload(5 * MIB)
    async with RMCPSupervisor.open() as sup:
        if transport == "http":
            async with serve_http(app) as server:
                layer = PolicyOverrides(transfer=SMALL_POLICY)
                await sup.add_server(ServerSpec.http("s", server.url, overrides=layer))
                result = await sup.call("s", "text", {"size": 5 * MIB})
        else:
            await sup.add_server(spec(transport, app))
            result = await sup.call("s", "text", {"size": 5 * MIB})
    assert result.text == text
    assert result.structured_content == {"result": text}
    # Rebuilt from the text item's chunks: the answer carried a reference, not the 5 MiB again
    # (the answer's size is measured at the wire above).
    assert result.meta is not None
    assert result.meta[STRUCTURED_META_KEY] == {"result_of": 0}
    (moved,) = result.transfers
    assert (moved.where, moved.bytes_moved, moved.chunks) == ("content[0]", 5 * MIB, 80)
    if transport != "stdio":
        assert rmcp_of(app).transfers.statistics().chunks_read == 80  # type: ignore[union-attr]


@pytest.mark.parametrize("transport", ["memory", "stdio"])
async def test_a_large_model_result_is_rebuilt(transport: str) -> None:
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(spec(transport))
        result = await sup.call("s", "report", {"size": 2 * MIB})
    assert result.structured_content == {"label": "big", "length": 2 * MIB, "body": payload(2 * MIB, 7)}
    assert json.loads(result.text) == result.structured_content
    assert [moved.where for moved in result.transfers] == ["content[0]", "structuredContent"]
    compact = json.dumps(result.structured_content, separators=(",", ":"))
    assert result.transfers[1].bytes_moved == len(compact)


@pytest.mark.parametrize("transport", ["memory", "stdio"])
async def test_the_output_schema_still_catches_a_bad_structured_result(transport: str) -> None:
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(spec(transport))
        with pytest.raises(RMCPResultValidationError, match="output schema") as caught:
            await sup.call("s", "bad", {"size": MIB})
        small = await sup.call("s", "text", {"size": 10})
    assert caught.value.may_have_executed is True
    assert caught.value.tool == "bad"
    assert caught.value.lifecycle
    assert small.structured_content == {"result": payload(10)}


async def test_the_deferred_check_ends_with_the_call() -> None:
    """A plain server's answers are checked by the SDK as ever, after a deferred call too."""
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(spec("memory"))
        await sup.add_server(ServerSpec.in_memory("plain", build_bad_schema_server()))
        assert (await sup.call("s", "text", {"size": MIB})).structured_content == {"result": payload(MIB)}
        with pytest.raises(RMCPResultValidationError, match="output schema"):
            await sup.call("plain", "broken")


async def test_a_result_streamed_to_a_sink_keeps_structured_content_inline(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(spec("memory"))
        result = await sup.call("s", "text", {"size": MIB}, result_sink=target)
    assert target.read_text() == payload(MIB)
    assert cast(dict[str, Any], result.structured_content) == {"result": payload(MIB)}
