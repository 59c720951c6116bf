"""``on_lifecycle`` callbacks are the user's code: their failures are logged, never the call's."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
from mcp.server.mcpserver import MCPServer

from rmcp_actors import (
    LifecycleEvent,
    Outcome,
    RequestState,
    RMCPServerError,
    RMCPSupervisor,
    ServerSpec,
)


class CallbackBug(Exception):
    pass


def raising(states: set[RequestState], seen: list[RequestState]) -> Callable[[LifecycleEvent], None]:
    def callback(event: LifecycleEvent) -> None:
        seen.append(event.state)
        if event.state in states:
            raise CallbackBug(f"bug at {event.state.value}")

    return callback


async def test_a_raising_callback_loses_no_result(
    server: MCPServer, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[RequestState] = []
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("test", server))
        result = await sup.call("test", "echo", {"text": "hi"}, on_lifecycle=raising(set(RequestState), seen))
    assert result.outcome is Outcome.SUCCEEDED
    states = [RequestState.QUEUED, RequestState.SENT, RequestState.ANSWERED]
    assert [event.state for event in result.lifecycle] == states
    assert seen == states
    logged = [record for record in caplog.records if record.name == "rmcp_actors"]
    assert len(logged) == 3
    assert all(isinstance(record.exc_info and record.exc_info[1], CallbackBug) for record in logged)
    assert all(record.levelno == logging.ERROR for record in logged)


async def test_a_raising_callback_changes_no_outcome(
    server: MCPServer, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[RequestState] = []
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("test", server))
        with pytest.raises(RMCPServerError) as caught:
            await sup.call(
                "test", "rpc_error", on_lifecycle=raising({RequestState.FAILED, RequestState.UNKNOWN}, seen)
            )
    assert caught.value.lifecycle[-1].state is seen[-1]
    assert "bug at" in caplog.text
