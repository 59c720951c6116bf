"""The server stdio transport (``rmcp_actors/server/_stdio.py``): in process over real pipes, and
in real server subprocesses behind the SDK's client and behind ``sup.call``."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import BinaryIO

import pytest
import trio
from conftest import PYTHON, stdio_args
from mcp import Client, StdioServerParameters
from mcp.shared._stream_protocols import ReadStream
from mcp.shared.message import SessionMessage

import rmcp_actors
from rmcp_actors import RMCPSupervisor, ServerSpec
from rmcp_actors.server import stdio_server

MIB = 1 << 20
# The SDK's default environment leaves PYTHONPATH out: pass it, so that the server subprocesses
# import this rmcp_actors, not whichever one the interpreter would find.
SAME_PACKAGE = {"PYTHONPATH": str(Path(rmcp_actors.__file__).resolve().parents[1])}
PING = b'{"jsonrpc": "2.0", "id": 1, "method": "ping"}'


@asynccontextmanager
async def pipes() -> AsyncIterator[tuple[BinaryIO, BinaryIO, BinaryIO, BinaryIO]]:
    """(server stdin, client end writing to it, server stdout, client end reading it)."""
    in_read, in_write = os.pipe()
    out_read, out_write = os.pipe()
    files = (
        os.fdopen(in_read, "rb"),
        os.fdopen(in_write, "wb"),
        os.fdopen(out_write, "wb"),
        os.fdopen(out_read, "rb"),
    )
    try:
        yield files
    finally:
        for file in files:
            file.close()


@asynccontextmanager
async def serving(
    server_in: BinaryIO, server_out: BinaryIO
) -> AsyncIterator[ReadStream[SessionMessage | Exception]]:
    """The server transport's read side; the write side is closed on exit, as a server's run does."""
    async with stdio_server(server_in, server_out) as (read_stream, write_stream):
        yield read_stream
        await write_stream.aclose()


async def test_lines_split_across_writes_garbage_and_a_last_line_without_newline() -> None:
    async with (
        pipes() as (server_in, client_out, server_out, _),
        serving(server_in, server_out) as read_stream,
    ):
        for piece in (PING[:10], PING[10:] + b"\nnot JSON\n", "é".encode()[:1] + b"\n", PING):
            client_out.write(piece)
            client_out.flush()
            await trio.sleep(0.01)
        client_out.close()
        with trio.fail_after(10):
            items = [item async for item in read_stream]
    assert [type(item) is SessionMessage for item in items] == [True, False, False, True]
    for item in (items[0], items[3]):
        assert isinstance(item, SessionMessage)
        assert item.message.model_dump()["method"] == "ping"


async def test_invalid_utf8_inside_a_string_is_replaced_as_the_sdk_does() -> None:
    line = b'{"jsonrpc": "2.0", "method": "notifications/message", "params": {"data": "a\xffb"}}'
    async with (
        pipes() as (server_in, client_out, server_out, _),
        serving(server_in, server_out) as read_stream,
    ):
        client_out.write(line + b"\n")
        client_out.close()
        with trio.fail_after(10):
            [item] = [item async for item in read_stream]
    assert isinstance(item, SessionMessage)
    assert item.message.model_dump()["params"]["data"] == "a\ufffdb"


async def test_messages_written_are_lines_of_json() -> None:
    async with (
        pipes() as (server_in, client_out, server_out, client_in),
        stdio_server(server_in, server_out) as (read_stream, write_stream),
    ):
        client_out.write(PING + b"\n")
        client_out.flush()
        with trio.fail_after(10):
            request = await read_stream.receive()
            assert isinstance(request, SessionMessage)
            await write_stream.send(request)
            line = await trio.to_thread.run_sync(client_in.readline)
        client_out.close()
        await write_stream.aclose()
    assert json.loads(line) == json.loads(PING)
    assert line.endswith(b"}\n")


def linear_server(*extra: str) -> StdioServerParameters:
    return StdioServerParameters(command=PYTHON, args=stdio_args("--linear-stdio", *extra), env=SAME_PACKAGE)


@pytest.mark.parametrize("text", ["y" * (20 * MIB), "é" * (5 * MIB)])
async def test_a_large_argument_reaches_a_run_stdio_server(text: str) -> None:
    async with Client(linear_server()) as client:
        result = await client.call_tool("length", {"text": text})
        after = await client.call_tool("echo", {"text": "after"})
    assert result.structured_content == {"result": len(text)}
    assert after.content[0].model_dump()["text"] == "after"


async def test_rmcp_over_run_stdio_through_sup_call(tmp_path: Path) -> None:
    spec = ServerSpec.stdio(
        "test", PYTHON, stdio_args("--linear-stdio", "--rmcp-store", "memory"), env=SAME_PACKAGE
    )
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(spec)
        big = await sup.call("test", "length", {"text": "z" * (10 * MIB)}, timeout=60)
        blob = await sup.call("test", "blob", {"size": 10 * MIB}, timeout=60)
        whoami = await sup.call("test", "whoami")
    assert big.structured_content == {"result": 10 * MIB}
    assert blob.text == "x" * (10 * MIB)
    assert whoami.structured_content is not None
    assert "idempotency_key" in whoami.structured_content


FAST_RMCP_APP = """
import sys
import rmcp_actors.server._stdio as transport
from rmcp_actors.server import FastRMCP

linear_stdio_server = transport.stdio_server

def recording_stdio_server():
    open(sys.argv[1], "w").write("entered")
    return linear_stdio_server()

transport.stdio_server = recording_stdio_server
app = FastRMCP("fast")

@app.tool()
async def shout(text: str) -> str:
    print("a stray print must not reach the wire")
    return text.upper()

app.run()
"""


async def test_fast_rmcp_run_serves_on_the_linear_transport_and_keeps_prints_off_the_wire(
    tmp_path: Path,
) -> None:
    marker = tmp_path / "entered"
    params = StdioServerParameters(command=PYTHON, args=["-c", FAST_RMCP_APP, str(marker)], env=SAME_PACKAGE)
    async with Client(params) as client:
        result = await client.call_tool("shout", {"text": "q" * MIB})
        again = await client.call_tool("shout", {"text": "again"})
    assert marker.read_text() == "entered"
    assert result.content[0].model_dump()["text"] == "Q" * MIB
    assert again.content[0].model_dump()["text"] == "AGAIN"
