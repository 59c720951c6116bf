"""Streamable HTTP on 127.0.0.1 (hypercorn's trio worker, in process): calls, server death, reconnect."""

from __future__ import annotations

import base64
import logging
from pathlib import Path
from typing import Any

import pytest
import trio
from _http import call_across_a_restart, serve_http
from conftest import FAST_RECOVERY
from mcp.server.mcpserver import MCPServer
from mcp_test_server import State, build_server

from rmcp_actors import (
    ConnectionState,
    PolicyOverrides,
    RequestState,
    RMCPOutcomeUnknownError,
    RMCPSupervisor,
    ServerSpec,
    SQLiteStore,
)


async def wait_for_state(sup: RMCPSupervisor, state: ConnectionState) -> None:
    with trio.fail_after(10):
        while sup.servers()["web"] is not state:
            await trio.sleep(0.01)


@pytest.mark.parametrize("protocol", ["auto", "legacy"])
async def test_call_over_http(server: MCPServer, protocol: str) -> None:
    async with serve_http(server) as http, RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.http("web", http.url, protocol=protocol))
        result = await sup.call("web", "add", {"a": 1, "b": 2})
        negotiated = sup.statistics().connections[0].protocol_version
    assert result.structured_content == {"result": 3}
    assert negotiated == ("2026-07-28" if protocol == "auto" else "2025-11-25")


async def test_headers_reach_the_server(server: MCPServer) -> None:
    async with serve_http(server) as http, RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.http("web", http.url, headers={"X-Tenant": "acme"}))
        assert (await sup.call("web", "header", {"name": "X-Tenant"})).text == "acme"


async def test_url_credentials_reach_the_server_but_never_a_log_record(
    server: MCPServer, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[tuple[bytes | None, bytes]] = []

    def record_requests(app: Any) -> Any:
        async def wrapped(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] == "http":
                seen.append((dict(scope["headers"]).get(b"authorization"), scope["query_string"]))
            await app(scope, receive, send)

        return wrapped

    caplog.set_level(logging.DEBUG)
    async with serve_http(server, wrap=record_requests) as http, RMCPSupervisor.open() as sup:
        url = http.url.replace("http://", "http://alice:pw-s3cret@") + "?token=qs-s3cret&page=2"
        await sup.add_server(ServerSpec.http("web", url, protocol="legacy"))
        assert (await sup.call("web", "echo", {"text": "hi"})).text == "hi"
    basic = b"Basic " + base64.b64encode(b"alice:pw-s3cret")
    assert seen
    assert all(header == basic and query == b"token=qs-s3cret&page=2" for header, query in seen)
    logged = [record.getMessage() + (record.exc_text or "") for record in caplog.records]
    assert any("HTTP Request: POST http://127.0.0.1" in line for line in logged)
    assert not [line for line in logged if "pw-s3cret" in line or "qs-s3cret" in line]


async def test_http_server_dies_mid_call_non_idempotent_is_unknown_then_reconnects(
    server: MCPServer, state: State
) -> None:
    async with serve_http(server) as http, RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.http("web", http.url, overrides=FAST_RECOVERY))
        async with trio.open_nursery() as nursery:

            async def kill_when_started() -> None:
                while "order" not in state.started:
                    await trio.sleep(0.005)
                await http.stop()

            nursery.start_soon(kill_when_started)
            with pytest.raises(RMCPOutcomeUnknownError) as caught:
                await sup.call("web", "block_unsafe", {"label": "order", "seconds": 30}, timeout=20)
        await wait_for_state(sup, ConnectionState.CONNECTING)
        await http.restart()
        await wait_for_state(sup, ConnectionState.READY)
        assert (await sup.call("web", "echo", {"text": "back"})).text == "back"
    assert caught.value.may_have_executed is True
    assert state.ledger == []


async def test_http_idempotent_call_waits_for_the_server_to_come_back(
    server: MCPServer, state: State
) -> None:
    async with serve_http(server) as http, RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.http("web", http.url, overrides=FAST_RECOVERY))
        results = []
        async with trio.open_nursery() as nursery:

            async def call() -> None:
                results.append(
                    await sup.call("web", "block_idempotent", {"label": "job", "seconds": 30}, timeout=20)
                )

            nursery.start_soon(call)
            while "job" not in state.started:
                await trio.sleep(0.005)
            await http.stop()
            await trio.sleep(0.3)  # the server stays down for a while; the call waits
            assert sup.servers()["web"] is not ConnectionState.READY
            await http.restart()
        [result] = results
    assert result.text == "done job"
    assert result.attempts == 2


async def test_server_restarted_before_the_client_noticed_gets_a_new_session(server: MCPServer) -> None:
    async with serve_http(server) as http:
        # The old session id is unknown to the new server process: HTTP 404, "Session not found".
        result, connects = await call_across_a_restart(http, http.url, "echo", {"text": "after"})
    assert result.text == "after"
    assert connects == 2


@pytest.mark.parametrize("json_response", [False, True])
async def test_rmcp_over_http_dedups_and_ignores_the_ack_timeout(
    state: State, tmp_path: Path, json_response: bool
) -> None:
    """In JSON-response mode progress never reaches the client, so an early ACK cannot either:
    over HTTP the ACK timeout is off and a slow tool is not mistaken for a lost request."""
    app = build_server(state, store=SQLiteStore(tmp_path / "rmcp.sqlite"))
    overrides = PolicyOverrides(ack_timeout_s=0.2)
    async with serve_http(app, json_response=json_response) as http, RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.http("web", http.url, overrides=overrides))
        arguments = {"label": "slow", "seconds": 0.6}
        first = await sup.call("web", "block_unsafe", arguments, idempotency_key="k", timeout=10)
        again = await sup.call("web", "block_unsafe", arguments, idempotency_key="k", timeout=10)
    assert (first.attempts, first.duplicate, again.duplicate) == (1, False, True)
    assert [event.state for event in first.lifecycle] == [
        RequestState.QUEUED,
        RequestState.SENT,
        RequestState.ACKED,
    ]
    assert state.ledger == ["slow"]
