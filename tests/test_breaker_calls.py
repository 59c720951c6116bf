"""Circuit breakers on real calls: in-memory servers that fail, hang or refuse; one stdio run.

Time is trio's MockClock (autojump) except in the stdio test.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import pytest
import trio
import trio.testing
from conftest import PYTHON, stdio_args
from mcp import MCPError
from mcp.server import Server, ServerRequestContext
from mcp.types import (
    CallToolRequestParams,
    CallToolResult,
    ListToolsResult,
    PaginatedRequestParams,
    TextContent,
    Tool,
)
from mcp_types import INTERNAL_ERROR, INVALID_PARAMS

from rmcp_actors import (
    PolicyOverrides,
    RetryOverrides,
    RMCPArgumentError,
    RMCPCircuitOpenError,
    RMCPNackError,
    RMCPOutcomeUnknownError,
    RMCPServerError,
    RMCPSupervisor,
    RMCPTimeoutAfterSendError,
    ServerSpec,
    ToolOverrides,
)
from rmcp_actors.config import CircuitBreakerOverrides, HedgeOverrides
from rmcp_actors.flow.breaker import BreakerChange, BreakerState

Behaviour = Literal[
    "ok",
    "slow",
    "internal_error",
    "error_result",
    "invalid_params",
    "hang",
    "unavailable",
    "rate_limited",
    "invalid_arguments",
    "in_doubt",
    "quota_exceeded",
]
NACKS = frozenset({"unavailable", "rate_limited", "invalid_arguments", "in_doubt", "quota_exceeded"})
CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN
RMCP_STAMP = {"rmcp": {"version": "0.2", "features": ["ack"], "durable": False, "instance_id": "one"}}


class Dependency:
    """A server whose tools behave as the test says; it counts the calls that reached it."""

    def __init__(self) -> None:
        self.behaviour: dict[str, Behaviour] = {}
        self.calls: dict[str, int] = {}

    def build(self) -> Server[Any]:
        tools = [
            Tool(name=name, input_schema={"type": "object"}, _meta=RMCP_STAMP) for name in ("lookup", "other")
        ]

        async def list_tools(
            ctx: ServerRequestContext[Any], params: PaginatedRequestParams | None
        ) -> ListToolsResult:
            return ListToolsResult(tools=tools)

        async def call_tool(ctx: ServerRequestContext[Any], params: CallToolRequestParams) -> CallToolResult:
            self.calls[params.name] = self.calls.get(params.name, 0) + 1
            behaviour = self.behaviour.get(params.name, "ok")
            if behaviour == "internal_error":
                raise MCPError(code=INTERNAL_ERROR, message="the database is down")
            if behaviour == "invalid_params":
                raise MCPError(code=INVALID_PARAMS, message="no such argument")
            if behaviour == "hang":
                await trio.sleep_forever()
            if behaviour == "slow":
                await trio.sleep(1)
            if behaviour in NACKS:
                nack = {
                    "ack": False,
                    "processed": False,
                    "code": behaviour,
                    "reason": "not now",
                    "retryable": behaviour in ("unavailable", "rate_limited"),
                }
                return CallToolResult(
                    content=[TextContent(type="text", text="not now")], is_error=True, _meta={"rmcp": nack}
                )
            text = "it failed" if behaviour == "error_result" else "ok"
            return CallToolResult(
                content=[TextContent(type="text", text=text)],
                is_error=behaviour == "error_result",
                _meta={"rmcp": {"ack": True, "processed": True}},
            )

        return Server("dependency", on_list_tools=list_tools, on_call_tool=call_tool)


def spec(
    dependency: Dependency,
    *,
    tools: dict[str, ToolOverrides] | None = None,
    wire: Any = "jsonrpc",
    protocol: str = "auto",
    **breaker: Any,
) -> ServerSpec:
    return ServerSpec.in_memory(
        "dep",
        dependency.build(),
        wire=wire,
        protocol=protocol,
        overrides=PolicyOverrides(
            circuit_breaker=CircuitBreakerOverrides(**breaker),
            retry=RetryOverrides(base_delay_s=0.01, max_delay_s=0.05),
        ),
        tools=tools,
    )


def breaker_states(sup: RMCPSupervisor) -> dict[str | None, BreakerState]:
    return {stats.tool: stats.state for stats in sup.statistics().breakers}


async def test_full_lifecycle_through_calls(autojump_clock: trio.testing.MockClock) -> None:
    dependency = Dependency()
    changes: list[BreakerChange] = []
    async with RMCPSupervisor.open(on_breaker_change=changes.append) as sup:
        await sup.add_server(spec(dependency))
        dependency.behaviour["lookup"] = "internal_error"
        for _ in range(5):
            with pytest.raises(RMCPServerError):
                await sup.call("dep", "lookup", {})
        assert dependency.calls["lookup"] == 5
        # Open: the call fails at once, nothing sent, and says when to come back.
        opened = trio.current_time()
        with pytest.raises(RMCPCircuitOpenError) as caught:
            await sup.call("dep", "lookup", {})
        error = caught.value
        assert dependency.calls["lookup"] == 5
        assert error.may_have_executed is False
        assert (error.server, error.tool, error.server_wide) == ("dep", "lookup", False)
        assert error.half_open_at == pytest.approx(opened + 30)
        assert error.retry_after_s == pytest.approx(30)
        assert "-32603" in error.message
        assert error.lifecycle[-1].detail == "RMCPCircuitOpenError"
        # A tool fault leaves the server's breaker (and its other tools) alone.
        assert breaker_states(sup) == {None: CLOSED, "lookup": OPEN}
        assert (await sup.call("dep", "other", {})).content[0].text == "ok"  # type: ignore[union-attr]
        # The open period ends; the probe call fails: open again, for twice as long.
        await trio.sleep(30.1)
        assert breaker_states(sup)["lookup"] is HALF_OPEN
        with pytest.raises(RMCPServerError):
            await sup.call("dep", "lookup", {})
        with pytest.raises(RMCPCircuitOpenError) as caught:
            await sup.call("dep", "lookup", {})
        assert caught.value.retry_after_s == pytest.approx(60)
        reopened = trio.current_time()
        # The dependency recovers: the next probe closes it.
        dependency.behaviour["lookup"] = "ok"
        await trio.sleep(60)
        assert trio.current_time() == pytest.approx(reopened + 60)
        assert (await sup.call("dep", "lookup", {})).is_error is False
        assert breaker_states(sup)["lookup"] is CLOSED
        stats = next(s for s in sup.statistics().breakers if s.tool == "lookup")
        assert (stats.opens, stats.reopens, stats.rejected) == (2, 0, 2)
    assert [(c.tool, c.old, c.new) for c in changes] == [
        ("lookup", CLOSED, OPEN),
        ("lookup", OPEN, HALF_OPEN),
        ("lookup", HALF_OPEN, OPEN),
        ("lookup", OPEN, HALF_OPEN),
        ("lookup", HALF_OPEN, CLOSED),
    ]
    # The actor's timer half-opened it on time, with no call waiting.
    assert changes[1].at == pytest.approx(opened + 30)


async def test_bad_arguments_and_tool_error_results_never_trip_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    dependency = Dependency()
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(spec(dependency, failure_threshold=1, min_calls=1))
        dependency.behaviour["lookup"] = "error_result"
        for _ in range(20):
            assert (await sup.call("dep", "lookup", {})).is_error
        dependency.behaviour["lookup"] = "invalid_params"
        for _ in range(20):
            with pytest.raises(RMCPServerError, match="-32602"):
                await sup.call("dep", "lookup", {})
        for _ in range(20):  # the client's own check: never sent
            with pytest.raises(RMCPArgumentError):
                await sup.call("dep", "lookup", {"x": math.nan})
        dependency.behaviour["lookup"] = "invalid_arguments"
        for _ in range(20):  # the RMCP server's check: a NACK
            with pytest.raises(RMCPArgumentError, match="invalid_arguments"):
                await sup.call("dep", "lookup", {})
        assert breaker_states(sup) == {None: CLOSED, "lookup": CLOSED}
        assert dependency.calls["lookup"] == 60


async def test_rate_limiting_is_not_a_fault(autojump_clock: trio.testing.MockClock) -> None:
    dependency = Dependency()
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(spec(dependency, failure_threshold=1, min_calls=1))
        dependency.behaviour["lookup"] = "rate_limited"
        for _ in range(5):
            with pytest.raises(Exception, match="rate_limited"):
                await sup.call("dep", "lookup", {})
        assert breaker_states(sup) == {None: CLOSED, "lookup": CLOSED}


async def test_a_server_fault_opens_the_servers_breaker_for_every_tool(
    autojump_clock: trio.testing.MockClock,
) -> None:
    dependency = Dependency()
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(spec(dependency))
        dependency.behaviour["lookup"] = "unavailable"
        # Each call makes 3 attempts (retryable NACKs): the 5th attempt opens both breakers.
        for _ in range(2):
            with pytest.raises(Exception, match="unavailable"):
                await sup.call("dep", "lookup", {})
        assert breaker_states(sup) == {None: OPEN, "lookup": OPEN}
        with pytest.raises(RMCPCircuitOpenError) as caught:
            await sup.call("dep", "other", {})
        assert caught.value.server_wide
        assert "circuit breaker of the server is open" in caught.value.message
        assert dependency.calls.get("other", 0) == 0


async def test_a_nack_that_ends_the_call_counts(autojump_clock: trio.testing.MockClock) -> None:
    dependency = Dependency()
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(spec(dependency))
        dependency.behaviour["lookup"] = "in_doubt"  # the server answers about an earlier crash
        for _ in range(5):
            with pytest.raises(RMCPOutcomeUnknownError, match="in_doubt"):
                await sup.call("dep", "lookup", {})
        assert breaker_states(sup) == {None: CLOSED, "lookup": CLOSED}
        dependency.behaviour["lookup"] = "quota_exceeded"  # a code this client does not know
        for _ in range(5):
            with pytest.raises(RMCPNackError, match="quota_exceeded"):
                await sup.call("dep", "lookup", {})
        assert breaker_states(sup) == {None: CLOSED, "lookup": OPEN}


async def test_timeouts_trip_the_tools_breaker(autojump_clock: trio.testing.MockClock) -> None:
    dependency = Dependency()
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(spec(dependency))
        dependency.behaviour["lookup"] = "hang"
        for _ in range(5):
            with pytest.raises(RMCPTimeoutAfterSendError):
                await sup.call("dep", "lookup", {}, timeout=1)
        with pytest.raises(RMCPCircuitOpenError, match="5 consecutive failures"):
            await sup.call("dep", "lookup", {}, timeout=1)


async def test_slow_calls_trip_a_tools_breaker(autojump_clock: trio.testing.MockClock) -> None:
    dependency = Dependency()
    slow = ToolOverrides(circuit_breaker=CircuitBreakerOverrides(slow_call_s=0.5))
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(spec(dependency, tools={"lookup": slow}))
        dependency.behaviour["lookup"] = "slow"
        for _ in range(5):  # each answers, in 1 s
            assert (await sup.call("dep", "lookup", {})).is_error is False
        with pytest.raises(RMCPCircuitOpenError, match=r"slow call: 1\.0\d* s, over slow_call_s=0\.5"):
            await sup.call("dep", "lookup", {})
        assert breaker_states(sup) == {None: CLOSED, "lookup": OPEN}  # the server's has no slow_call_s
        dependency.behaviour["lookup"] = "ok"
        await trio.sleep(30)
        assert (await sup.call("dep", "lookup", {})).is_error is False
        assert breaker_states(sup)["lookup"] is CLOSED


async def test_low_rate_traffic_trips_on_consecutive_failures(autojump_clock: trio.testing.MockClock) -> None:
    dependency = Dependency()
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(spec(dependency))
        dependency.behaviour["lookup"] = "internal_error"
        for _ in range(5):  # one call a minute: the window never holds min_calls
            await trio.sleep(60)
            with pytest.raises(RMCPServerError):
                await sup.call("dep", "lookup", {})
        with pytest.raises(RMCPCircuitOpenError):
            await sup.call("dep", "lookup", {})


async def test_the_ratio_trips_after_min_calls(autojump_clock: trio.testing.MockClock) -> None:
    dependency = Dependency()
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(spec(dependency, failure_threshold=100))
        for _ in range(5):  # fail, succeed, ...: never two failures in a row
            dependency.behaviour["lookup"] = "internal_error"
            with pytest.raises(RMCPServerError):
                await sup.call("dep", "lookup", {})
            dependency.behaviour["lookup"] = "ok"
            await sup.call("dep", "lookup", {})
        assert breaker_states(sup)["lookup"] is CLOSED  # 5 of 10: not yet over 10 calls
        dependency.behaviour["lookup"] = "internal_error"
        with pytest.raises(RMCPServerError):
            await sup.call("dep", "lookup", {})
        assert breaker_states(sup)["lookup"] is OPEN  # 6 of 11


async def test_metrics_only_never_rejects(autojump_clock: trio.testing.MockClock) -> None:
    dependency = Dependency()
    changes: list[BreakerChange] = []
    async with RMCPSupervisor.open(on_breaker_change=changes.append) as sup:
        await sup.add_server(spec(dependency, mode="metrics_only"))
        dependency.behaviour["lookup"] = "internal_error"
        for _ in range(20):
            with pytest.raises(RMCPServerError):
                await sup.call("dep", "lookup", {})
        assert dependency.calls["lookup"] == 20
        assert breaker_states(sup)["lookup"] is OPEN
        stats = next(s for s in sup.statistics().breakers if s.tool == "lookup")
        assert stats.rejected == 0
        assert stats.open_until is not None
    assert [c.new for c in changes] == [OPEN]


@pytest.mark.parametrize(
    ("wire", "protocol", "probe"),
    [
        ("jsonrpc", "auto", "ping"),  # the modern protocol: server/discover
        ("jsonrpc", "legacy", "ping"),  # the handshake era: ping
        ("direct", "auto", "ping"),
        ("jsonrpc", "auto", "tools_list"),
    ],
)
async def test_an_active_probe_closes_the_breaker_without_a_user_call(
    autojump_clock: trio.testing.MockClock, wire: str, protocol: str, probe: str
) -> None:
    dependency = Dependency()
    changes: list[BreakerChange] = []
    async with RMCPSupervisor.open(on_breaker_change=changes.append) as sup:
        await sup.add_server(spec(dependency, wire=wire, protocol=protocol, probe=probe))
        dependency.behaviour["lookup"] = "unavailable"
        for _ in range(2):
            with pytest.raises(Exception, match="unavailable"):
                await sup.call("dep", "lookup", {})
        sent = dict(dependency.calls)
        dependency.behaviour["lookup"] = "ok"
        await trio.sleep(30.5)
        # The actor pinged the server (it answers): both breakers closed, no tool call spent.
        assert breaker_states(sup) == {None: CLOSED, "lookup": CLOSED}
        assert dependency.calls == sent
        assert {c.reason for c in changes if c.new is CLOSED} == {f"the {probe} probe succeeded"}
        assert (await sup.call("dep", "lookup", {})).is_error is False


async def test_stdio_server_breaker_opens_and_recovers() -> None:
    """Real time, a real subprocess: a tool that answers JSON-RPC errors opens its breaker."""
    overrides = PolicyOverrides(circuit_breaker=CircuitBreakerOverrides(failure_threshold=3, open_s=0.3))
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.stdio("real", PYTHON, stdio_args(), overrides=overrides))
        for _ in range(3):
            with pytest.raises(RMCPServerError):
                await sup.call("real", "rpc_error", {})
        with pytest.raises(RMCPCircuitOpenError) as caught:
            await sup.call("real", "rpc_error", {})
        assert 0 < caught.value.retry_after_s <= 0.3
        assert (await sup.call("real", "echo", {"text": "still up"})).content[0].text == "still up"  # type: ignore[union-attr]
        await trio.sleep(0.35)
        with pytest.raises(RMCPServerError):  # the probe goes through, and fails
            await sup.call("real", "rpc_error", {})
        assert breaker_states(sup)["rpc_error"] is OPEN


async def test_a_cancelled_probe_call_frees_its_slot(autojump_clock: trio.testing.MockClock) -> None:
    dependency = Dependency()
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(spec(dependency))
        dependency.behaviour["lookup"] = "internal_error"
        for _ in range(5):
            with pytest.raises(RMCPServerError):
                await sup.call("dep", "lookup", {})
        await trio.sleep(30.1)
        dependency.behaviour["lookup"] = "hang"
        with trio.move_on_after(1):  # the caller gives up on the probe: says nothing of the server
            await sup.call("dep", "lookup", {}, timeout=10)
        assert breaker_states(sup)["lookup"] is HALF_OPEN
        dependency.behaviour["lookup"] = "ok"
        assert (await sup.call("dep", "lookup", {})).is_error is False  # the next call probes
        assert breaker_states(sup)["lookup"] is CLOSED


async def test_one_transport_death_counts_once_however_many_calls_it_fails(
    autojump_clock: trio.testing.MockClock,
) -> None:
    dependency = Dependency()
    outcomes: list[BaseException] = []

    async def call() -> None:
        try:
            await sup.call("dep", "lookup", {}, timeout=60)
        except RMCPOutcomeUnknownError as error:
            outcomes.append(error)

    async with RMCPSupervisor.open() as sup:
        await sup.add_server(spec(dependency))
        dependency.behaviour["lookup"] = "hang"
        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(call)
            await trio.sleep(1)
            connection = sup._servers["dep"].connection  # pyright: ignore[reportPrivateUsage]
            session = connection.current_session()
            assert session is not None
            connection.report_broken(session)  # the transport dies under 8 calls in flight
        assert len(outcomes) == 8
        stats = {s.tool: s for s in sup.statistics().breakers}
        assert stats[None].state is CLOSED
        assert (stats[None].consecutive_failures, stats["lookup"].consecutive_failures) == (1, 1)


async def test_review1_a_probe_call_is_not_hedged(autojump_clock: trio.testing.MockClock) -> None:
    # half_open_probes = 1: a half-open breaker lets one request through to see whether the
    # dependency recovered; the probe's hedge would be a second one, admitted by no breaker.
    dependency = Dependency()
    tools = {"lookup": ToolOverrides(idempotent=True, hedge=HedgeOverrides(delay_s=0.1))}
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(spec(dependency, tools=tools, failure_threshold=1, open_s=1))
        dependency.behaviour["lookup"] = "internal_error"
        with pytest.raises(RMCPServerError):
            await sup.call("dep", "lookup", {})
        assert breaker_states(sup)["lookup"] is OPEN
        await trio.sleep(1.5)
        dependency.behaviour["lookup"] = "slow"
        result = await sup.call("dep", "lookup", {})
        budget = sup.statistics().budgets[0]
    assert (result.is_error, result.attempts) == (False, 1)
    assert dependency.calls["lookup"] == 2  # the failure, then the one probe
    assert budget.hedges == 0
