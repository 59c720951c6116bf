"""The RMCP server side in memory: negotiation, dedup, ACK/NACK, and the client's handling of them.

Real MCPServer instances, the SDK's own client for the raw-wire cases, and the runtime for the
client side; MockClock (autojump) for everything timed.
"""

from __future__ import annotations

from typing import Any, cast

import mcp
import pytest
import trio
import trio.testing
from conftest import durable_store
from mcp.server import Server
from mcp.server.mcpserver import Context, MCPServer
from mcp_test_server import State, build_server
from mcp_types import RequestParamsMeta

from rmcp_actors import (
    FastRMCP,
    LifecycleEvent,
    MemoryStore,
    Outcome,
    PolicyOverrides,
    RequestState,
    RetryOverrides,
    RMCPArgumentError,
    RMCPConfigError,
    RMCPIdempotencyConflictError,
    RMCPNackError,
    RMCPOutcomeUnknownError,
    RMCPSupervisor,
    RMCPTimeoutAfterSendError,
    ServerSpec,
    UnknownToolError,
)
from rmcp_actors._protocol import EXTENSION_ID, fingerprint
from rmcp_actors.server import install, rmcp_of, store_key
from rmcp_actors.server._wire import StoredOutcome, encode_outcome
from rmcp_actors.stores import OwnerInfo

PROTOCOLS = ["auto", "legacy"]


def as_meta(raw: dict[str, Any]) -> RequestParamsMeta:
    """A request ``_meta`` as the SDK types it (an open TypedDict): extension keys ride along."""
    return cast(RequestParamsMeta, raw)


def rmcp_meta(
    key: str | None, *, request_id: str = "req-1", attempt: int = 1, **extra: Any
) -> RequestParamsMeta:
    fields: dict[str, Any] = {"version": "0.2", "request_id": request_id, "attempt": attempt, **extra}
    if key is not None:
        fields["idempotency_key"] = key
    return as_meta({"rmcp": fields})


def wire_rmcp(result: Any) -> dict[str, Any]:
    return (result.meta or {})["rmcp"]


def server_side(app: MCPServer | Server[Any]) -> Any:
    side = rmcp_of(app)
    assert side is not None
    return side


# --- Negotiation and plain peers ---------------------------------------------------------------


@pytest.mark.parametrize("mode", PROTOCOLS)
async def test_plain_client_sees_ordinary_results_and_the_advertisement(
    rmcp_server: MCPServer, state: State, mode: Any
) -> None:
    async with mcp.Client(rmcp_server, mode=mode) as client:
        capabilities = client.server_capabilities
        tools = await client.list_tools()
        result = await client.call_tool("record", {"label": "plain"})
        again = await client.call_tool("record", {"label": "plain"})
    assert capabilities.experimental is not None
    advertised = capabilities.experimental["rmcp"]
    assert advertised["version"] == "0.2"
    assert {"dedup", "ack", "early_ack"} <= set(advertised["features"])
    assert advertised["durable"] is False
    assert advertised["instance_id"] == server_side(rmcp_server).instance_id
    if mode == "auto":
        assert capabilities.extensions is not None
        assert capabilities.extensions[EXTENSION_ID] == advertised
    assert all((tool.meta or {}).get("rmcp") == advertised for tool in tools.tools)
    # Without _meta.rmcp, nothing is deduplicated and nothing is stamped.
    assert result.content[0].text == "recorded plain"  # type: ignore[union-attr]
    assert "rmcp" not in (result.meta or {})
    assert "rmcp" not in (again.meta or {})
    assert state.ledger == ["plain", "plain"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_rmcp_client_against_plain_server_sends_no_meta(server: MCPServer, protocol: str) -> None:
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("plain", server, protocol=protocol))
        result = await sup.call("plain", "whoami")
    assert result.structured_content == {}
    assert result.duplicate is False
    assert [event.state for event in result.lifecycle] == [
        RequestState.QUEUED,
        RequestState.SENT,
        RequestState.ANSWERED,
    ]


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_rmcp_client_against_rmcp_server_is_acked(rmcp_server: MCPServer, protocol: str) -> None:
    seen: list[LifecycleEvent] = []
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("test", rmcp_server, protocol=protocol))
        result = await sup.call("test", "add", {"a": 1, "b": 2}, on_lifecycle=seen.append)
    assert result.structured_content == {"result": 3}
    assert wire_rmcp(result) == {
        "ack": True,
        "processed": True,
        "duplicate": False,
        "request_id": result.request_id,
        "attempt": 1,
    }
    assert [event.state for event in result.lifecycle] == [
        RequestState.QUEUED,
        RequestState.SENT,
        RequestState.ACKED,
    ]
    assert seen == list(result.lifecycle)


def test_install_twice_is_refused() -> None:
    app = install(build_server())
    with pytest.raises(RMCPConfigError, match="already installed"):
        install(app)


async def test_install_on_a_low_level_server() -> None:
    from mcp_test_server import build_paginated_server

    # Its lifespan runs once per client below: the store must outlive each of them.
    lowlevel = install(build_paginated_server(), close_store=False)
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("low", lowlevel))
        tool = (await sup.list_tools("low"))[0].name
        first = await sup.call("low", tool, idempotency_key="k")
        second = await sup.call("low", tool, idempotency_key="k")
    assert (first.duplicate, second.duplicate) == (False, True)
    assert server_side(lowlevel).statistics().executed == 1
    for mode in PROTOCOLS:
        async with mcp.Client(lowlevel, mode=cast(Any, mode)) as client:
            experimental = client.server_capabilities.experimental or {}
            tools = (await client.list_tools()).tools
        assert experimental["rmcp"]["instance_id"] == server_side(lowlevel).instance_id
        assert all((tool.meta or {})["rmcp"] == experimental["rmcp"] for tool in tools)


# --- Dedup -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", PROTOCOLS)
async def test_completed_key_is_replayed_not_run_again(
    rmcp_server: MCPServer, state: State, mode: Any
) -> None:
    async with mcp.Client(rmcp_server, mode=mode) as client:
        first = await client.call_tool("record", {"label": "once"}, meta=rmcp_meta("k1"))
        second = await client.call_tool("record", {"label": "once"}, meta=rmcp_meta("k1", attempt=2))
    assert state.ledger == ["once"]
    assert first.content == second.content
    assert wire_rmcp(first)["duplicate"] is False
    assert wire_rmcp(second) == {
        "ack": True,
        "processed": True,
        "duplicate": True,
        "request_id": "req-1",
        "attempt": 2,
    }
    assert server_side(rmcp_server).statistics().replayed == 1


async def test_error_results_are_replayed_too(rmcp_server: MCPServer) -> None:
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("test", rmcp_server))
        first = await sup.call("test", "fail", {"reason": "no stock"}, idempotency_key="e")
        second = await sup.call("test", "fail", {"reason": "no stock"}, idempotency_key="e")
    assert first.outcome is second.outcome is Outcome.FAILED
    assert second.duplicate is True
    assert second.text == first.text
    assert server_side(rmcp_server).statistics().executed == 1


async def test_concurrent_duplicates_coalesce_on_the_first_run(
    rmcp_server: MCPServer, state: State, autojump_clock: trio.testing.MockClock
) -> None:
    results: list[Any] = []
    async with mcp.Client(rmcp_server) as client:

        async def call(attempt: int) -> None:
            arguments = {"label": "slow", "seconds": 10}
            results.append(
                await client.call_tool("block_unsafe", arguments, meta=rmcp_meta("c", attempt=attempt))
            )

        async with trio.open_nursery() as nursery:
            for attempt in (1, 2, 3):
                nursery.start_soon(call, attempt)
    assert state.ledger == ["slow"]
    assert sorted(wire_rmcp(result)["duplicate"] for result in results) == [False, True, True]
    assert server_side(rmcp_server).statistics().coalesced == 2


async def test_same_key_other_arguments_is_a_conflict(rmcp_server: MCPServer, state: State) -> None:
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("test", rmcp_server))
        await sup.call("test", "record", {"label": "a"}, idempotency_key="order-1")
        with pytest.raises(RMCPIdempotencyConflictError) as caught:
            await sup.call("test", "record", {"label": "b"}, idempotency_key="order-1")
        with pytest.raises(RMCPIdempotencyConflictError):
            await sup.call("test", "echo", {"text": "a"}, idempotency_key="order-1")
    assert state.ledger == ["a"]
    error = caught.value
    assert error.code == "idempotency_conflict"
    assert error.may_have_executed is False
    assert [event.state for event in error.lifecycle][-2:] == [RequestState.NACKED, RequestState.FAILED]


async def test_expired_key_runs_again(state: State, autojump_clock: trio.testing.MockClock) -> None:
    app = build_server(state, store=MemoryStore(ttl_s=60, clock=trio.current_time))
    async with mcp.Client(app) as client:
        await client.call_tool("record", {"label": "x"}, meta=rmcp_meta("ttl"))
        await trio.sleep(59)
        within = await client.call_tool("record", {"label": "x"}, meta=rmcp_meta("ttl"))
        await trio.sleep(2)
        after = await client.call_tool("record", {"label": "x"}, meta=rmcp_meta("ttl"))
    assert wire_rmcp(within)["duplicate"] is True
    assert wire_rmcp(after)["duplicate"] is False
    assert state.ledger == ["x", "x"]


async def test_client_timeout_then_retry_with_the_same_key_runs_once(
    rmcp_server: MCPServer, state: State, autojump_clock: trio.testing.MockClock
) -> None:
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("test", rmcp_server))
        arguments = {"label": "charge", "seconds": 20}
        with pytest.raises(RMCPTimeoutAfterSendError):
            await sup.call("test", "block_unsafe", arguments, idempotency_key="pay-1", timeout=5)
        # The SDK told the server to cancel; the run went on, shielded, and its result is kept.
        retried = await sup.call("test", "block_unsafe", arguments, idempotency_key="pay-1", timeout=60)
    assert retried.text == "done charge"
    assert retried.duplicate is True
    assert state.ledger == ["charge"]


async def test_old_protocol_request_id_is_the_key_when_an_ack_is_expected(
    rmcp_server: MCPServer, state: State
) -> None:
    legacy = as_meta(
        {
            "rmcp": {
                "request_id": "r-9",
                "retry_count": 1,
                "expect_ack": True,
                "timestamp": "2026-01-01T00:00:00Z",
            }
        }
    )
    async with mcp.Client(rmcp_server) as client:
        first = await client.call_tool("record", {"label": "v01"}, meta=legacy)
        second = await client.call_tool("record", {"label": "v01"}, meta=legacy)
        unkeyed = await client.call_tool(
            "record", {"label": "v01"}, meta=as_meta({"rmcp": {"request_id": "r-10"}})
        )
    assert state.ledger == ["v01", "v01"]
    assert wire_rmcp(first)["attempt"] == 2
    assert (wire_rmcp(second)["duplicate"], wire_rmcp(unkeyed)["duplicate"]) == (True, False)


@pytest.mark.parametrize(
    "bad",
    [
        {"request_id": 5},
        {"request_id": "r", "attempt": 0},
        {"request_id": "r", "idempotency_key": ""},
        {"idempotency_key": "k"},
        {"request_id": "", "expect_ack": True},
        {"request_id": "r", "timeout_ms": -1},
        "not an object",
    ],
)
@pytest.mark.parametrize("mode", PROTOCOLS)
async def test_malformed_meta_is_nacked_and_the_tool_does_not_run(
    rmcp_server: MCPServer, state: State, bad: Any, mode: Any
) -> None:
    async with mcp.Client(rmcp_server, mode=mode) as client:
        result = await client.call_tool("record", {"label": "never"}, meta=as_meta({"rmcp": bad}))
    assert result.is_error is True
    meta = wire_rmcp(result)
    assert (meta["ack"], meta["processed"], meta["code"], meta["retryable"]) == (
        False,
        False,
        "invalid_meta",
        False,
    )
    assert "RMCP invalid_meta" in result.content[0].text  # type: ignore[union-attr]
    assert state.ledger == []


# --- In doubt ----------------------------------------------------------------------------------


async def test_run_cut_short_by_max_execution_is_in_doubt(
    state: State, autojump_clock: trio.testing.MockClock
) -> None:
    app = install(build_server(state), store=MemoryStore(clock=trio.current_time), max_execution_s=5)
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("test", app))
        arguments = {"label": "long", "seconds": 50}
        with pytest.raises(RMCPOutcomeUnknownError, match="in_doubt") as caught:
            await sup.call("test", "block_unsafe", arguments, idempotency_key="d")
        with pytest.raises(RMCPOutcomeUnknownError, match="in_doubt"):
            await sup.call("test", "block_unsafe", arguments, idempotency_key="d")
    assert caught.value.may_have_executed is True
    assert state.ledger == []


async def claimed_by_a_crashed_owner(call: dict[str, Any], *, entered: bool) -> MemoryStore:
    """A store where the owner "crashed" claimed key "k" for ``record(call)`` and died, after
    calling the tool (``entered``) or before."""
    store = MemoryStore()
    await store.register_owner(OwnerInfo(instance_id="crashed", pid=1, host="elsewhere"), lease_s=30)
    key = store_key("k")
    await store.begin(key, fingerprint=fingerprint("record", call), tool="record", owner="crashed")
    if entered:
        assert await store.mark_entered(key, owner="crashed")
    await store.release_owner("crashed")
    return store


async def test_entered_key_of_a_gone_owner_is_in_doubt(state: State) -> None:
    call = {"label": "lost"}
    app = build_server(state, store=await claimed_by_a_crashed_owner(call, entered=True))
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("test", app))
        with pytest.raises(RMCPOutcomeUnknownError, match="in_doubt"):
            await sup.call("test", "record", call, idempotency_key="k")
    assert state.ledger == []


async def test_claim_of_a_gone_owner_never_entered_is_run_now(state: State) -> None:
    call = {"label": "claimed, never run"}
    app = build_server(state, store=await claimed_by_a_crashed_owner(call, entered=False))
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("test", app))
        result = await sup.call("test", "record", call, idempotency_key="k")
        again = await sup.call("test", "record", call, idempotency_key="k")
    assert (result.text, result.duplicate, result.attempts) == ("recorded claimed, never run", False, 1)
    assert (again.text, again.duplicate) == (result.text, True)
    assert state.ledger == ["claimed, never run"]
    assert server_side(app).statistics().taken_over == 1


async def test_retry_waits_for_a_live_owner_that_has_not_entered_yet(
    state: State, autojump_clock: trio.testing.MockClock
) -> None:
    # Another instance on the same store claimed the key and is about to call the tool.
    store = MemoryStore(clock=trio.current_time)
    await store.register_owner(OwnerInfo(instance_id="other", pid=1, host="elsewhere"), lease_s=3_600)
    call = {"label": "slow start"}
    key = store_key("k")
    await store.begin(key, fingerprint=fingerprint("record", call), tool="record", owner="other")
    app = build_server(state, store=store)
    results: list[Any] = []
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("test", app))

        async def retry() -> None:
            results.append(await sup.call("test", "record", call, idempotency_key="k", timeout=60))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(retry)
            await trio.sleep(5)
            assert results == []
            assert await store.mark_entered(key, owner="other")
            answer = {
                "content": [{"type": "text", "text": "recorded by the other"}],
                "structuredContent": {"result": "recorded by the other"},
                "isError": False,
                "resultType": "complete",
            }
            await store.complete(key, owner="other", result=encode_outcome(StoredOutcome(result=answer)))
    [result] = results
    assert (result.text, result.duplicate) == ("recorded by the other", True)
    assert state.ledger == []


async def test_claim_never_entered_is_not_taken_over_for_other_arguments(state: State) -> None:
    app = build_server(state, store=await claimed_by_a_crashed_owner({"label": "a"}, entered=False))
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("test", app))
        with pytest.raises(RMCPIdempotencyConflictError):
            await sup.call("test", "record", {"label": "b"}, idempotency_key="k")
    assert state.ledger == []


# --- Other NACKs -------------------------------------------------------------------------------


async def test_overloaded_nack_is_retried_after_its_delay(
    state: State, autojump_clock: trio.testing.MockClock
) -> None:
    app = install(build_server(state), store=MemoryStore(clock=trio.current_time), max_in_flight=1)
    results: list[Any] = []
    policy = PolicyOverrides(retry=RetryOverrides(max_attempts=5, base_delay_s=0.01, max_delay_s=0.01))
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("test", app, overrides=policy))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sup.call, "test", "block_unsafe", {"label": "first", "seconds": 0.25})
            await trio.testing.wait_all_tasks_blocked()

            async def second() -> None:
                results.append(await sup.call("test", "record", {"label": "second"}))

            nursery.start_soon(second)
    [result] = results
    assert result.attempts >= 2
    assert RequestState.NACKED in [event.state for event in result.lifecycle]
    assert sorted(state.ledger) == ["first", "second"]
    assert server_side(app).statistics().nacked["overloaded"] >= 1


async def test_overloaded_until_attempts_run_out_raises_nack_error(
    state: State, autojump_clock: trio.testing.MockClock
) -> None:
    app = install(build_server(state), store=MemoryStore(clock=trio.current_time), max_in_flight=1)
    policy = PolicyOverrides(retry=RetryOverrides(max_attempts=3, base_delay_s=0.01, max_delay_s=0.01))
    async with RMCPSupervisor.open() as sup, trio.open_nursery() as nursery:
        await sup.add_server(ServerSpec.in_memory("test", app, overrides=policy))
        nursery.start_soon(sup.call, "test", "block_unsafe", {"label": "hog", "seconds": 100})
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(RMCPNackError) as caught:
            await sup.call("test", "record", {"label": "refused"})
        nursery.cancel_scope.cancel()
    error = caught.value
    assert (error.code, error.retryable, error.retry_after_ms) == ("overloaded", True, 100)
    assert error.may_have_executed is False
    assert "refused" not in state.ledger


async def test_rate_limited_nack_waits_retry_after(
    state: State, autojump_clock: trio.testing.MockClock
) -> None:
    app = install(build_server(state), store=MemoryStore(clock=trio.current_time), rate_limit_per_s=0.5)
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("test", app))
        await sup.call("test", "record", {"label": "a"})
        started = trio.current_time()
        second = await sup.call("test", "record", {"label": "b"}, timeout=30)
    # One token per 2 s: the server asked for about 2 s and the client waited that long.
    assert trio.current_time() - started == pytest.approx(2, abs=0.2)
    assert second.attempts == 2
    assert state.ledger == ["a", "b"]


async def test_rate_limited_beyond_the_deadline_fails_fast(
    state: State, autojump_clock: trio.testing.MockClock
) -> None:
    app = install(build_server(state), store=MemoryStore(clock=trio.current_time), rate_limit_per_s=0.01)
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("test", app))
        await sup.call("test", "record", {"label": "a"})
        started = trio.current_time()
        with pytest.raises(RMCPNackError, match="deadline") as caught:
            await sup.call("test", "record", {"label": "b"}, timeout=10)
    assert trio.current_time() - started < 1
    assert caught.value.code == "rate_limited"
    assert caught.value.retry_after_ms is not None
    assert caught.value.retry_after_ms > 10_000


async def test_draining_server_nacks_shutting_down(rmcp_server: MCPServer, state: State) -> None:
    async with mcp.Client(rmcp_server) as client:
        await server_side(rmcp_server).drain()
        result = await client.call_tool("record", {"label": "late"}, meta=rmcp_meta("s"))
    assert (wire_rmcp(result)["code"], wire_rmcp(result)["retryable"]) == ("shutting_down", True)
    assert state.ledger == []


# --- Early ACK -----------------------------------------------------------------------------------


async def test_early_ack_lets_a_slow_tool_outlive_the_ack_timeout(
    state: State, autojump_clock: trio.testing.MockClock
) -> None:
    app = build_server(state, store=durable_store())
    policy = PolicyOverrides(ack_timeout_s=1)
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("test", app, overrides=policy))
        result = await sup.call("test", "block_unsafe", {"label": "slow", "seconds": 30}, timeout=60)
    assert result.attempts == 1
    states = [(event.state, event.detail) for event in result.lifecycle]
    assert states[2] == (RequestState.ACKED, "early: rmcp: accepted")
    assert states[3][0] is RequestState.ACKED


async def test_no_ack_within_the_ack_timeout_is_retried_with_the_same_key(
    state: State, autojump_clock: trio.testing.MockClock
) -> None:
    app = build_server(state, store=durable_store())
    stalled = trio.Event()

    async def stall_first_call(ctx: Any, call_next: Any) -> Any:
        # A server that accepted the request but did not get to it (e.g. a stuck queue).
        if ctx.method == "tools/call" and not stalled.is_set():
            stalled.set()
            await trio.sleep(10)
        return await call_next(ctx)

    app.middleware.insert(0, stall_first_call)
    policy = PolicyOverrides(ack_timeout_s=2, retry=RetryOverrides(base_delay_s=0.1, max_delay_s=0.1))
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("test", app, overrides=policy))
        result = await sup.call("test", "record", {"label": "once"}, timeout=60)
    assert result.attempts == 2
    assert state.ledger == ["once"]


async def test_without_a_durable_store_there_is_no_ack_timeout(
    state: State, autojump_clock: trio.testing.MockClock
) -> None:
    """Recovering an unACKed attempt means retrying it with its key on a server that may be a
    new process: with keys in memory that could run the tool twice, so the call just waits."""
    app = build_server(state, store=MemoryStore(clock=trio.current_time))

    async def stall(ctx: Any, call_next: Any) -> Any:
        if ctx.method == "tools/call":
            await trio.sleep(10)
        return await call_next(ctx)

    app.middleware.insert(0, stall)
    policy = PolicyOverrides(ack_timeout_s=2)
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("test", app, overrides=policy))
        result = await sup.call("test", "record", {"label": "once"}, timeout=60)
    assert result.attempts == 1
    assert state.ledger == ["once"]


async def test_a_draining_server_refuses_until_attempts_run_out(
    rmcp_server: MCPServer, state: State, autojump_clock: trio.testing.MockClock
) -> None:
    policy = PolicyOverrides(retry=RetryOverrides(max_attempts=2, base_delay_s=0.1, max_delay_s=0.1))
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("test", rmcp_server, overrides=policy))
        await server_side(rmcp_server).drain()
        with pytest.raises(RMCPNackError) as caught:
            await sup.call("test", "record", {"label": "late"})
    assert (caught.value.code, caught.value.retryable, caught.value.may_have_executed) == (
        "shutting_down",
        True,
        False,
    )
    assert [event.state for event in caught.value.lifecycle].count(RequestState.NACKED) == 2
    assert state.ledger == []


async def test_early_ack_never_breaks_the_tools_own_increasing_progress(
    autojump_clock: trio.testing.MockClock,
) -> None:
    app = FastRMCP("progress", store=durable_store())

    @app.tool()
    async def steps(ctx: Context) -> str:
        for value in (0, 0.5, 1.0):
            await ctx.report_progress(value, 1.0)
        return "done"

    seen: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append(progress)

    async with mcp.Client(app) as client:
        await client.call_tool("steps", {}, meta=rmcp_meta("p"), progress_callback=on_progress)
    assert seen == [0, 0.5, 1.0]
    assert seen == sorted(set(seen))


async def test_the_lifespan_keeps_the_lease_of_a_long_run_alive(
    state: State, autojump_clock: trio.testing.MockClock
) -> None:
    store = MemoryStore(clock=trio.current_time)
    app = install(build_server(state), store=store, lease_s=3)
    async with mcp.Client(app) as client, trio.open_nursery() as nursery:

        async def long_run() -> None:
            arguments = {"label": "long", "seconds": 20}
            await client.call_tool("block_unsafe", arguments, meta=rmcp_meta("lease"))

        nursery.start_soon(long_run)
        await trio.sleep(15)
        record = await store.get(store_key("lease"))
        assert record is not None
        # Five leases later, with no other call to renew it, the owner still reads alive.
        assert (record.state.value, record.owner_alive) == ("started", True)
    assert state.ledger == ["long"]


async def test_a_refusal_of_the_arguments_is_an_argument_error_that_never_ran() -> None:
    app = FastRMCP("t", store=MemoryStore())
    runs: list[int] = []

    @app.tool()
    async def pay(amount: int) -> str:
        runs.append(amount)
        return "paid"

    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("t", app))
        with pytest.raises(RMCPArgumentError) as refused:
            await sup.call("t", "pay", {"amount": "lots"})
        assert (await sup.call("t", "pay", {"amount": 5})).text == "paid"
    assert refused.value.may_have_executed is False
    assert "amount" in str(refused.value)
    assert runs == [5]


async def test_a_tool_the_server_no_longer_has_is_an_unknown_tool_that_never_ran() -> None:
    app = FastRMCP("t", store=MemoryStore())

    @app.tool()
    async def pay(amount: int) -> str:
        return "paid"

    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("t", app))
        app.remove_tool("pay")  # the client's cached list still has it
        with pytest.raises(UnknownToolError) as refused:
            await sup.call("t", "pay", {"amount": 5})
    assert refused.value.may_have_executed is False
    assert "list the tools again" in str(refused.value)
