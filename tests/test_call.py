"""The call path against a real MCP server in memory (JSON-RPC wire unless said), MockClock."""

from __future__ import annotations

import math
from typing import Any

import anyio
import pytest
import trio
import trio.testing
from mcp.server.mcpserver import MCPServer
from mcp_test_server import State, build_bad_schema_server

from rmcp_actors import (
    CallResult,
    Outcome,
    PolicyOverrides,
    ReconnectOverrides,
    RequestState,
    RMCPArgumentError,
    RMCPConfig,
    RMCPConfigError,
    RMCPError,
    RMCPOutcomeUnknownError,
    RMCPOverloadedError,
    RMCPResultValidationError,
    RMCPServerError,
    RMCPSupervisor,
    RMCPTimeoutAfterSendError,
    RMCPTimeoutError,
    RuntimeSettings,
    ServerSpec,
    UnknownServerError,
    UnknownToolError,
)


@pytest.mark.parametrize(
    ("protocol", "wire"),
    [("auto", "jsonrpc"), ("legacy", "jsonrpc"), ("auto", "direct"), ("2025-11-25", "jsonrpc")],
)
async def test_call_returns_the_tool_result(server: MCPServer, protocol: str, wire: Any) -> None:
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("test", server, wire=wire, protocol=protocol))
        result = await sup.call("test", "add", {"a": 2, "b": 3})
    assert isinstance(result, CallResult)
    assert result.outcome is Outcome.SUCCEEDED
    assert result.structured_content == {"result": 5}
    assert result.text == "5"
    assert (result.attempts, result.is_error, result.duplicate) == (1, False, False)
    assert result.request_id
    assert result.idempotency_key == result.request_id
    assert (result.server, result.tool) == ("test", "add")


async def test_request_carries_rmcp_meta_and_the_given_key(rmcp_server: MCPServer) -> None:
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("test", rmcp_server))
        result = await sup.call("test", "whoami", idempotency_key="order-42", timeout=30)
    meta = result.structured_content
    assert meta is not None
    assert meta["idempotency_key"] == "order-42" == result.idempotency_key
    assert meta["request_id"] == result.request_id
    assert meta["attempt"] == 1
    assert 0 < meta["timeout_ms"] <= 30_000


async def test_tool_error_is_a_failed_result_not_an_exception(server: MCPServer) -> None:
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("test", server))
        result = await sup.call("test", "fail", {"reason": "bad input"})
    assert result.outcome is Outcome.FAILED
    assert result.is_error
    assert "bad input" in result.text


async def test_unknown_server_and_unknown_tool_raise_before_sending(server: MCPServer, state: State) -> None:
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("test", server))
        with pytest.raises(UnknownServerError, match="no server named 'nope'") as server_error:
            await sup.call("nope", "echo", {"text": "x"})
        with pytest.raises(UnknownToolError, match="does not list tool 'nope'") as tool_error:
            await sup.call("test", "nope")
    assert "echo" in str(tool_error.value)
    assert server_error.value.may_have_executed is False
    assert tool_error.value.may_have_executed is False
    assert tool_error.value.outcome is Outcome.FAILED


async def test_json_rpc_error_raises_server_error(server: MCPServer) -> None:
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("test", server))
        with pytest.raises(RMCPServerError) as caught:
            await sup.call("test", "rpc_error")
    assert caught.value.code == -32050
    assert "refuses" in str(caught.value)
    assert caught.value.request_id is not None


async def test_result_breaking_output_schema_raises_validation_error() -> None:
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("bad", build_bad_schema_server()))
        with pytest.raises(RMCPResultValidationError, match="output schema") as caught:
            await sup.call("bad", "broken")
    assert caught.value.may_have_executed is True


async def test_deadline_after_sending_is_unknown_outcome(
    server: MCPServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("test", server))
        started = trio.current_time()
        with pytest.raises(RMCPTimeoutAfterSendError) as caught:
            await sup.call("test", "sleep", {"seconds": 1000}, timeout=5)
        assert trio.current_time() - started == pytest.approx(5, abs=0.1)
        # The connection is still usable.
        assert (await sup.call("test", "echo", {"text": "after"})).text == "after"
    error = caught.value
    assert isinstance(error, RMCPOutcomeUnknownError)
    assert isinstance(error, RMCPTimeoutError)
    assert error.may_have_executed is True
    assert error.outcome is Outcome.UNKNOWN


async def test_deadline_while_queued_is_a_timeout_that_never_ran(
    server: MCPServer, state: State, autojump_clock: trio.testing.MockClock
) -> None:
    spec = ServerSpec.in_memory("test", server, overrides=PolicyOverrides(max_concurrency=1))
    async with RMCPSupervisor.open() as sup, trio.open_nursery() as nursery:
        await sup.add_server(spec)
        nursery.start_soon(sup.call, "test", "sleep", {"seconds": 50})
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(RMCPTimeoutError) as caught:
            await sup.call("test", "record", {"label": "never"}, timeout=2)
    assert not isinstance(caught.value, RMCPOutcomeUnknownError)
    assert caught.value.may_have_executed is False
    assert "nothing was sent" in str(caught.value)
    assert state.ledger == []


async def test_enclosing_cancel_scope_propagates_unchanged(
    server: MCPServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("test", server))
        with trio.move_on_after(3) as scope:
            await sup.call("test", "sleep", {"seconds": 1000}, timeout=100)
        assert scope.cancelled_caught
        assert (await sup.call("test", "echo", {"text": "still usable"})).text == "still usable"
        assert sup.statistics().scheduler.running == 0


async def test_cancelling_the_caller_leaves_the_connection_usable(server: MCPServer) -> None:
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("test", server))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sup.call, "test", "sleep", {"seconds": 1000})
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        assert (await sup.call("test", "add", {"a": 1, "b": 1})).structured_content == {"result": 2}


async def test_max_concurrency_is_never_exceeded(
    server: MCPServer, state: State, autojump_clock: trio.testing.MockClock
) -> None:
    spec = ServerSpec.in_memory("test", server, overrides=PolicyOverrides(max_concurrency=3))
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(spec)
        async with trio.open_nursery() as nursery:
            for index in range(25):
                nursery.start_soon(sup.call, "test", "work", {"seconds": 1 + index % 4})
        stats = sup.statistics().scheduler
    assert state.peak == 3
    assert stats.lanes[0].peak_running == 3
    assert stats.running == stats.queued == 0


async def test_global_max_concurrency_spans_servers(autojump_clock: trio.testing.MockClock) -> None:
    from mcp_test_server import build_server

    shared = State()
    config = RMCPConfig(runtime=RuntimeSettings(max_concurrency=2))
    async with RMCPSupervisor.open(config) as sup:
        await sup.add_server(ServerSpec.in_memory("a", build_server(shared)))
        await sup.add_server(ServerSpec.in_memory("b", build_server(shared)))
        async with trio.open_nursery() as nursery:
            for index in range(12):
                nursery.start_soon(sup.call, "ab"[index % 2], "work", {"seconds": 1})
    assert shared.peak == 2


async def test_priority_order_when_queued(
    server: MCPServer, state: State, autojump_clock: trio.testing.MockClock
) -> None:
    spec = ServerSpec.in_memory("test", server, overrides=PolicyOverrides(max_concurrency=1))
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(spec)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sup.call, "test", "sleep", {"seconds": 10})
            await trio.testing.wait_all_tasks_blocked()
            for label, priority in [("low-a", 0), ("urgent", 9), ("low-b", 0), ("normal", 5)]:
                nursery.start_soon(
                    lambda lb=label, p=priority: sup.call("test", "record", {"label": lb}, priority=p)
                )
                await trio.testing.wait_all_tasks_blocked()
    assert state.ledger == ["urgent", "normal", "low-a", "low-b"]


@pytest.mark.parametrize("overflow", ["reject", "wait"])
async def test_full_queue_under_each_overflow_policy(
    server: MCPServer, state: State, overflow: Any, autojump_clock: trio.testing.MockClock
) -> None:
    config = RMCPConfig(runtime=RuntimeSettings(max_queue=2, overflow=overflow))
    spec = ServerSpec.in_memory("test", server, overrides=PolicyOverrides(max_concurrency=1))
    outcomes: list[str] = []
    rejected: list[RMCPOverloadedError] = []

    async def record(label: str) -> None:
        try:
            await sup.call("test", "record", {"label": label})
            outcomes.append(f"ok {label}")
        except RMCPOverloadedError as error:
            rejected.append(error)
            outcomes.append(f"rejected {label}")

    async with RMCPSupervisor.open(config) as sup:
        await sup.add_server(spec)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sup.call, "test", "sleep", {"seconds": 10})
            await trio.testing.wait_all_tasks_blocked()
            for label in ["q1", "q2", "overflow"]:
                nursery.start_soon(record, label)
                await trio.testing.wait_all_tasks_blocked()
    assert all(error.may_have_executed is False for error in rejected)
    if overflow == "reject":
        assert outcomes[0] == "rejected overflow"
        assert state.ledger == ["q1", "q2"]
    else:
        assert state.ledger == ["q1", "q2", "overflow"]
        assert "rejected overflow" not in outcomes


async def test_many_calls_complete_none_lost(server: MCPServer, state: State) -> None:
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("test", server))
        results: list[CallResult] = []

        async def one(index: int) -> None:
            results.append(await sup.call("test", "record", {"label": str(index)}))

        async with trio.open_nursery() as nursery:
            for index in range(200):
                nursery.start_soon(one, index)
    assert len(results) == 200
    assert sorted(state.ledger, key=int) == [str(i) for i in range(200)]


async def test_list_tools_and_servers(server: MCPServer) -> None:
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("test", server))
        tools = {tool.name: tool for tool in await sup.list_tools("test")}
        assert sup.servers() == {"test": sup.servers()["test"]}
        assert sup.servers()["test"].value == "ready"
    assert {"echo", "add", "record", "block_unsafe"} <= set(tools)
    assert tools["echo"].annotations is not None
    assert tools["echo"].annotations.read_only_hint is True


def test_smoke_under_asyncio() -> None:
    from mcp_test_server import build_server

    async def main() -> str:
        async with RMCPSupervisor.open() as sup:
            await sup.add_server(ServerSpec.in_memory("test", build_server()))
            result = await sup.call("test", "echo", {"text": "asyncio"})
            return result.text

    assert anyio.run(main, backend="asyncio") == "asyncio"


async def test_every_page_of_tools_is_listed_at_connect() -> None:
    from mcp_test_server import build_paginated_server

    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("paged", build_paginated_server(pages=3, per_page=2)))
        names = sorted(tool.name for tool in await sup.list_tools("paged"))
        result = await sup.call("paged", "tool5")
    assert names == [f"tool{index}" for index in range(6)]
    assert result.text == "tool5"


async def test_unknown_protocol_version_is_a_config_error(server: MCPServer) -> None:
    with pytest.raises(RMCPConfigError, match="protocol version the MCP SDK knows") as caught:
        ServerSpec.in_memory("test", server, protocol="2030-01-01")
    assert caught.value.path == "protocol"


async def test_an_error_in_the_body_of_open_propagates_unwrapped(server: MCPServer) -> None:
    async def body() -> None:
        async with RMCPSupervisor.open() as sup:
            await sup.add_server(ServerSpec.in_memory("test", server))
            raise LookupError("user code failed")

    with pytest.raises(LookupError, match="user code failed"):
        await body()


async def test_adding_a_server_twice_is_a_config_error(server: MCPServer) -> None:
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("test", server))
        with pytest.raises(RMCPConfigError, match="already added"):
            await sup.add_server(ServerSpec.in_memory("test", server))


async def test_removed_server_is_unknown(server: MCPServer, autojump_clock: trio.testing.MockClock) -> None:
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("test", server))
        await sup.remove_server("test")
        with pytest.raises(UnknownServerError):
            await sup.call("test", "echo", {"text": "x"})


async def test_removed_servers_leave_no_scheduler_lane_behind(
    server: MCPServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with RMCPSupervisor.open() as sup:
        for index in range(100):
            await sup.add_server(ServerSpec.in_memory(f"s{index}", server))
            await sup.call(f"s{index}", "echo", {"text": "x"})
            await sup.remove_server(f"s{index}")
        assert sup.statistics().scheduler.lanes == ()
        # A removed lane with a call running and one queued goes once both have left it.
        spec = ServerSpec.in_memory("busy", server, overrides=PolicyOverrides(max_concurrency=1))
        await sup.add_server(spec)
        errors: list[RMCPError] = []
        async with trio.open_nursery() as nursery:

            async def call() -> None:
                try:
                    await sup.call("busy", "sleep", {"seconds": 100}, timeout=500)
                except RMCPError as error:
                    errors.append(error)

            nursery.start_soon(call)
            nursery.start_soon(call)
            await trio.testing.wait_all_tasks_blocked()
            [lane] = sup.statistics().scheduler.lanes
            assert (lane.running, lane.queued) == (1, 1)
            await sup.remove_server("busy")
        assert len(errors) == 2
        assert sup.statistics().scheduler.lanes == ()
        # The name can be used again, with a fresh limit.
        await sup.add_server(
            ServerSpec.in_memory("busy", server, overrides=PolicyOverrides(max_concurrency=3))
        )
        [lane] = sup.statistics().scheduler.lanes
        assert (lane.name, lane.max_concurrency, lane.running) == ("busy", 3, 0)


async def test_server_sent_32000_is_a_server_error_not_a_lost_connection(
    server: MCPServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with RMCPSupervisor.open() as sup, trio.open_nursery() as nursery:
        await sup.add_server(ServerSpec.in_memory("test", server))
        results: list[CallResult] = []

        async def slow_call() -> None:
            results.append(await sup.call("test", "sleep", {"seconds": 5}))

        nursery.start_soon(slow_call)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(RMCPServerError) as caught:
            await sup.call("test", "busy")
    assert caught.value.code == -32000
    assert caught.value.may_have_executed is True
    # The healthy session was not torn down: the concurrent call finished on it.
    assert [result.text for result in results] == ["slept"]
    assert sup.statistics().connections[0].connects == 1


async def test_a_sent_attempt_keeps_may_have_executed_when_the_retry_fails_cleanly(
    server: MCPServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with RMCPSupervisor.open() as sup, trio.open_nursery() as nursery:
        await sup.add_server(ServerSpec.in_memory("test", server))
        errors: list[RMCPError] = []

        async def call() -> None:
            try:
                await sup.call("test", "sleep", {"seconds": 100}, timeout=50)
            except RMCPError as error:
                errors.append(error)

        nursery.start_soon(call)
        await trio.testing.wait_all_tasks_blocked()
        # The first attempt is in flight; the server goes away and the read-only tool's retry
        # then finds the connection closed.
        await sup.remove_server("test")
    [error] = errors
    assert isinstance(error, RMCPOutcomeUnknownError)
    assert error.may_have_executed is True
    assert "earlier attempt was sent" in str(error)


async def test_reconnect_backoff_grows_while_connects_keep_failing(
    server: MCPServer, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    overrides = PolicyOverrides(reconnect=ReconnectOverrides(base_delay_s=1, max_delay_s=30))
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("test", server, overrides=overrides))
        connection = sup._servers["test"].connection  # pyright: ignore[reportPrivateUsage]

        def refuse(*args: object, **kwargs: object) -> None:
            raise ConnectionRefusedError("server down")

        monkeypatch.setattr("rmcp_actors.client.connection.build_client", refuse)
        session = connection.current_session()
        assert session is not None
        connection.report_broken(session)
        await trio.sleep(300)
        failed = connection.statistics().failed_connects
    # Capped exponential backoff: about 15-25 attempts in 300 s; a backoff stuck at its base
    # would make hundreds.
    assert 5 <= failed <= 40


@pytest.mark.parametrize("timeout", [0, -1, math.inf, math.nan])
async def test_bad_timeout_is_an_argument_error(server: MCPServer, timeout: float) -> None:
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("test", server))
        with pytest.raises(RMCPArgumentError, match="positive, finite"):
            await sup.call("test", "echo", {"text": "x"}, timeout=timeout)


async def test_arguments_that_are_not_json_are_an_argument_error(server: MCPServer, state: State) -> None:
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("test", server))
        with pytest.raises(RMCPArgumentError, match="cannot be sent as JSON") as caught:
            await sup.call("test", "record", {"label": object()})
        assert (await sup.call("test", "echo", {"text": "fine"})).text == "fine"
    assert caught.value.may_have_executed is False
    assert state.ledger == []


async def test_a_group_raised_by_user_code_in_open_stays_whole(server: MCPServer) -> None:
    async def body() -> None:
        async with RMCPSupervisor.open():
            raise ExceptionGroup("user's own", [KeyError("a")])

    with pytest.raises(ExceptionGroup) as caught:
        await body()
    assert caught.value.message == "user's own"


async def test_refreshing_tools_goes_through_the_connection_actor(server: MCPServer) -> None:
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("test", server))
        with pytest.raises(UnknownToolError):
            await sup.call("test", "late_tool")

        async def late_tool() -> str:
            return "late"

        server.add_tool(late_tool)
        assert "late_tool" not in {tool.name for tool in await sup.list_tools("test")}
        refreshed = {tool.name for tool in await sup.list_tools("test", refresh=True)}
        result = await sup.call("test", "late_tool")
        inbox = sup.statistics().connections[0]
    assert "late_tool" in refreshed
    assert result.text == "late"
    assert (inbox.name, inbox.inbox_used) == ("test", 0)


async def test_protocol_level_json_rpc_error_says_the_tool_did_not_run(server: MCPServer) -> None:
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("test", server))
        with pytest.raises(RMCPServerError) as caught:
            await sup.call("test", "invalid_params")
    assert caught.value.code == -32602
    assert caught.value.may_have_executed is False
    assert caught.value.server_message == "no such argument shape"


def _circular() -> dict[str, Any]:
    loop: dict[str, Any] = {"text": "x"}
    loop["self"] = loop
    return loop


def _deep(levels: int) -> dict[str, Any]:
    nested: Any = "bottom"
    for _ in range(levels):
        nested = [nested]
    return {"label": nested}


@pytest.mark.parametrize(
    ("arguments", "says"),
    [
        ({"label": b"\xff\xfe"}, "bytes"),
        ({"label": b"ascii"}, "bytes"),
        ({1: "x"}, "key"),
        ({"label": {("a", "b"): 1}}, "key"),
        ({"label": float("nan")}, "finite"),
        ({"label": [1.0, float("inf")]}, "finite"),
        ({"label": {1, 2}}, "set"),
        (_circular(), "circular"),
        (_deep(10_000), "deep"),
        ({"label": "\ud800"}, "lone surrogate"),
        ({"label": ["fine", {"caf\udce9": 1}]}, "lone surrogate"),
    ],
)
async def test_arguments_the_wire_cannot_carry_fail_before_admission(
    server: MCPServer, state: State, arguments: dict[Any, Any], says: str
) -> None:
    """A bad value never touches the session: a non-idempotent call in flight on the same
    server finishes, nothing reconnects, and the bad call is not reported as maybe run."""
    events: list[Any] = []
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("test", server))
        async with trio.open_nursery() as nursery:
            results: list[CallResult] = []

            async def in_flight() -> None:
                results.append(await sup.call("test", "block_unsafe", {"label": "order", "seconds": 0.05}))

            nursery.start_soon(in_flight)
            while "order" not in state.started:
                await trio.sleep(0.001)
            with pytest.raises(RMCPArgumentError, match=says) as caught:
                await sup.call("test", "record", arguments, on_lifecycle=events.append)
        stats = sup.statistics()
    assert caught.value.may_have_executed is False
    assert (caught.value.server, caught.value.tool) == ("test", "record")
    # Refused before admission: never queued, never sent.
    assert [event.state for event in caught.value.lifecycle] == [RequestState.FAILED]
    assert [event.state for event in events] == [RequestState.FAILED]
    assert results[0].text == "done order"
    assert state.ledger == ["order"]
    assert stats.connections[0].connects == 1
    assert stats.scheduler.running == 0


async def test_an_idempotency_key_utf8_cannot_carry_fails_before_admission(
    server: MCPServer, state: State
) -> None:
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("test", server))
        with pytest.raises(RMCPArgumentError, match=r"idempotency_key.*lone surrogate") as caught:
            await sup.call("test", "record", {"label": "x"}, idempotency_key="order-\udc80")
        # Non-ASCII that UTF-8 carries is a key like any other.
        await sup.call("test", "record", {"label": "y"}, idempotency_key="commande-é")
    assert caught.value.may_have_executed is False
    assert state.ledger == ["y"]


async def test_an_unsafe_attempt_with_too_little_time_left_is_not_sent(
    server: MCPServer, state: State, autojump_clock: trio.testing.MockClock
) -> None:
    """It waited in the queue until 20 ms were left: sent, it would surely end "may have run"."""
    async with RMCPSupervisor.open() as sup, trio.open_nursery() as nursery:
        await sup.add_server(
            ServerSpec.in_memory("test", server, overrides=PolicyOverrides(max_concurrency=1))
        )
        nursery.start_soon(sup.call, "test", "sleep", {"seconds": 0.98})
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(RMCPTimeoutError) as caught:
            await sup.call("test", "block_unsafe", {"label": "late", "seconds": 1}, timeout=1.0)
        # A tool safe to repeat is still sent: its worst case is harmless.
        nursery.start_soon(sup.call, "test", "sleep", {"seconds": 0.98})
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(RMCPTimeoutAfterSendError):
            await sup.call("test", "block_idempotent", {"label": "safe", "seconds": 1}, timeout=1.0)
    assert not isinstance(caught.value, RMCPTimeoutAfterSendError)
    assert caught.value.may_have_executed is False
    assert "too little" in str(caught.value)
    assert [event.state for event in caught.value.lifecycle] == [RequestState.QUEUED, RequestState.FAILED]
    assert "late" not in state.started
    assert "safe" in state.started


async def test_a_call_sent_back_to_the_queue_by_a_reconnect_keeps_its_place(
    server: MCPServer, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One slot. A is in flight when the connection drops and backs off for 1 s. Meanwhile D
    takes the slot and E queues behind it. A was in line before E, so A runs before E."""
    monkeypatch.setattr("rmcp_actors.client.call.backoff_delay", lambda *_: 1.0)  # pyright: ignore[reportUnknownLambdaType]
    overrides = PolicyOverrides(
        max_concurrency=1, reconnect=ReconnectOverrides(base_delay_s=0.001, max_delay_s=0.001)
    )
    finished: list[str] = []
    async with RMCPSupervisor.open() as sup, trio.open_nursery() as nursery:
        await sup.add_server(ServerSpec.in_memory("test", server, overrides=overrides))

        async def call(label: str, seconds: float) -> None:
            await sup.call("test", "block_idempotent", {"label": label, "seconds": seconds}, timeout=60)
            finished.append(label)

        nursery.start_soon(call, "a", 10)
        await trio.testing.wait_all_tasks_blocked()
        connection = sup._servers["test"].connection  # pyright: ignore[reportPrivateUsage]
        session = connection.current_session()
        assert session is not None
        connection.report_broken(session)
        await trio.sleep(0.5)  # reconnected; A still backing off
        for label, seconds in (("d", 5), ("e", 0)):
            nursery.start_soon(call, label, seconds)
            await trio.testing.wait_all_tasks_blocked()
    assert finished == ["d", "a", "e"]
