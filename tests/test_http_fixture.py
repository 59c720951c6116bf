"""Tests of the in-process Streamable HTTP helper in ``tests/_http.py`` (real time, not MockClock)."""

from __future__ import annotations

import time

import httpx2
import mcp
import pytest
import trio
from _http import serve_http
from mcp.server.mcpserver import MCPServer
from mcp.shared.exceptions import MCPError
from mcp_types import CONNECTION_CLOSED

MODES = ["auto", "legacy"]


def _make_app() -> MCPServer:
    app = MCPServer("http-fixture-test")

    @app.tool()
    async def echo(text: str) -> str:
        return text

    @app.tool()
    async def slow(seconds: float) -> str:
        await trio.sleep(seconds)
        return "done"

    return app


def _text(result: mcp.types.CallToolResult) -> str:
    assert not result.is_error
    content = result.content[0]
    assert isinstance(content, mcp.types.TextContent)
    return content.text


async def _echo(url: str, mode: str, text: str) -> str:
    with trio.fail_after(2):
        async with mcp.Client(url, mode=mode) as client:
            return _text(await client.call_tool("echo", {"text": text}))


async def _own_client(
    url: str, mode: str, *, task_status: trio.TaskStatus[mcp.Client] = trio.TASK_STATUS_IGNORED
) -> None:
    """Hold ``async with Client`` in its own task, as a runtime would, and absorb the transport error
    its ``__aexit__`` raises once the server is gone."""
    try:
        async with mcp.Client(url, mode=mode) as client:
            task_status.started(client)
            await trio.sleep_forever()
    except* httpx2.TransportError:
        pass


@pytest.mark.parametrize("mode", MODES)
async def test_call_over_http_succeeds(mode: str) -> None:
    async with serve_http(_make_app()) as server:
        assert server.url == f"http://127.0.0.1:{server.port}/mcp"
        assert server.port > 0
        assert await _echo(server.url, mode, "hello") == "hello"


@pytest.mark.parametrize(("json_response", "stateless"), [(True, False), (False, True), (True, True)])
async def test_transport_options(json_response: bool, stateless: bool) -> None:
    async with serve_http(_make_app(), json_response=json_response, stateless=stateless) as server:
        for mode in MODES:
            assert await _echo(server.url, mode, mode) == mode


@pytest.mark.parametrize("mode", MODES)
async def test_call_fails_after_stop(mode: str) -> None:
    async with serve_http(_make_app()) as server, trio.open_nursery() as nursery:
        client: mcp.Client = await nursery.start(_own_client, server.url, mode)
        assert _text(await client.call_tool("echo", {"text": "x"})) == "x"
        await server.stop()
        assert not server.running
        with trio.fail_after(2), pytest.raises(MCPError) as exc_info:
            await client.call_tool("echo", {"text": "y"})
        assert exc_info.value.error.code == CONNECTION_CLOSED
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("mode", MODES)
async def test_stop_aborts_in_flight_call_quickly(mode: str) -> None:
    async with serve_http(_make_app()) as server, trio.open_nursery() as nursery:
        client: mcp.Client = await nursery.start(_own_client, server.url, mode)
        stopped_at: list[float] = []

        async def stop_soon() -> None:
            await trio.sleep(0.2)
            stopped_at.append(time.monotonic())
            await server.stop()

        nursery.start_soon(stop_soon)
        with trio.fail_after(2), pytest.raises(MCPError) as exc_info:
            await client.call_tool("slow", {"seconds": 5.0})
        assert exc_info.value.error.code == CONNECTION_CLOSED
        assert stopped_at
        assert time.monotonic() - stopped_at[0] < 1.0
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("mode", MODES)
async def test_new_client_works_after_restart(mode: str) -> None:
    async with serve_http(_make_app()) as server:
        url, port = server.url, server.port
        assert await _echo(url, mode, "before") == "before"
        await server.stop()
        with trio.fail_after(2), pytest.raises(Exception):  # noqa: B017, PT011 - refused connection, any form
            await _echo(url, mode, "down")
        await server.restart()
        assert (server.url, server.port) == (url, port)
        assert await _echo(url, mode, "after") == "after"


async def test_stop_is_idempotent_and_restart_requires_stop() -> None:
    async with serve_http(_make_app()) as server:
        with pytest.raises(RuntimeError, match="still running"):
            await server.restart()
        await server.stop()
        await server.stop()
        await server.restart()
        assert server.running
    assert not server.running
