"""review2: failure modes found reviewing the limiter, the watchdog and sup.map on main (issue 8),
each against real in-memory servers, on MockClock where time matters."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import trio
import trio.testing
from mcp import MCPError
from mcp.server import Server, ServerRequestContext
from mcp.server.mcpserver import MCPServer
from mcp.types import (
    CallToolRequestParams,
    CallToolResult,
    ListToolsResult,
    PaginatedRequestParams,
    TextContent,
    Tool,
)
from mcp_test_server import State, build_server

from rmcp_actors import (
    CallResult,
    PolicyOverrides,
    RateLimitOverrides,
    RetryOverrides,
    RMCPError,
    RMCPSupervisor,
    ServerSpec,
    ToolOverrides,
)
from rmcp_actors.config import HedgeOverrides, RetryBudgetOverrides
from rmcp_actors.flow._feedback import RateLimitSignal, SignalSource
from rmcp_actors.flow.limiter import RateLimiter, _Feedback  # pyright: ignore[reportPrivateUsage]


def _limiter(sup: RMCPSupervisor, server: str) -> RateLimiter:
    return sup._servers[server].flow.limiter  # pyright: ignore[reportPrivateUsage]


def _crash_limiter(sup: RMCPSupervisor, server: str) -> None:
    """Make the server's limiter actor crash (its supervisor restarts it): a message whose gate is
    not one, as a bug in the actor would."""
    signal = RateLimitSignal(SignalSource.NACK, None, "review2")
    _limiter(sup, server).send_nowait(_Feedback(None, signal))  # pyright: ignore[reportArgumentType]


async def test_review2_a_hedge_whose_limiter_stops_leaves_the_first_attempt_running(
    state: State, autojump_clock: trio.testing.MockClock
) -> None:
    # One token per 5 s: the first attempt takes it, the hedge (at 0.5 s) waits for the next.
    # The limiter restarts while the hedge waits: the hedge was never sent, so the first
    # attempt, sent and running, must be left to answer (at 3 s).
    spec = ServerSpec.in_memory(
        "s",
        build_server(state),
        overrides=PolicyOverrides(rate_limit=RateLimitOverrides(rate=0.2, burst=1)),
        tools={"slow_once": ToolOverrides(hedge=HedgeOverrides(delay_s=0.5))},
    )
    outcome: list[CallResult | RMCPError] = []
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(spec)

        async def call() -> None:
            try:
                outcome.append(await sup.call("s", "slow_once", {"label": "a", "seconds": 3}, timeout=30))
            except RMCPError as error:
                outcome.append(error)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(call)
            await trio.sleep(1)
            assert _limiter(sup, "s").statistics().gates[0].waiting == 1  # the hedge
            _crash_limiter(sup, "s")
    (result,) = outcome
    assert isinstance(result, CallResult), result
    assert (result.text, result.attempts) == ("done a", 1)


async def test_review2_a_hedge_queues_for_a_token_after_the_calls_already_waiting(
    state: State, autojump_clock: trio.testing.MockClock
) -> None:
    # One token per second. A (hedged after 0.5 s) takes the first; B and C wait for the next
    # ones. A's hedge is extra load: it must not get a token before B and C, which came first.
    spec = ServerSpec.in_memory(
        "s",
        build_server(state),
        overrides=PolicyOverrides(rate_limit=RateLimitOverrides(rate=1, burst=1)),
        tools={"slow_once": ToolOverrides(hedge=HedgeOverrides(delay_s=0.5))},
    )
    done: dict[str, float] = {}
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(spec)
        started = trio.current_time()

        async def call(name: str, tool: str, arguments: dict[str, Any]) -> None:
            await sup.call("s", tool, arguments, timeout=30)
            done[name] = trio.current_time() - started

        async with trio.open_nursery() as nursery:
            nursery.start_soon(call, "A", "slow_once", {"label": "a", "seconds": 10})
            await trio.testing.wait_all_tasks_blocked()
            for name in ("B", "C"):
                nursery.start_soon(call, name, "echo", {"text": name})
                await trio.testing.wait_all_tasks_blocked()
    assert done["B"] == pytest.approx(1, abs=0.01)
    assert done["C"] == pytest.approx(2, abs=0.01)
    assert done["A"] == pytest.approx(3, abs=0.01)  # its hedge's token came third


def _refusing(times: list[float], refusals: int) -> MCPServer:
    """A server whose tool refuses its first ``refusals`` calls with -32023 and no retry-after
    (SEP-3304 makes the data optional), noting the clock of each call."""
    server = MCPServer("refusing")

    @server.tool()
    async def echo(text: str) -> str:  # pyright: ignore[reportUnusedFunction]
        """Answer the text once the refusals are spent."""
        times.append(trio.current_time())
        if len(times) <= refusals:
            raise MCPError(code=-32023, message="Rate limited")
        return text

    return server


async def test_review2_a_rate_limited_call_never_retries_without_a_pause(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # No configured rate and no adaptation: only the call's own pause spaces its retries. With
    # base_delay_s = 0 that pause was 0: refused requests back to back until the deadline (on
    # MockClock the clock never moved: this server gives in after 20 to end the loop).
    times: list[float] = []
    overrides = PolicyOverrides(
        rate_limit=RateLimitOverrides(adaptive=False),
        retry=RetryOverrides(base_delay_s=0, max_delay_s=0),
    )
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("s", _refusing(times, 20), overrides=overrides))
        result = await sup.call("s", "echo", {"text": "x"}, timeout=60)
    assert result.text == "x"
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert min(gaps) > 0, gaps


@pytest.mark.xfail(
    strict=True, reason="review2: a limiter restart fails every call waiting for a token (not fixed)"
)
async def test_review2_a_limiter_restart_keeps_the_calls_waiting_for_tokens(
    state: State, autojump_clock: trio.testing.MockClock
) -> None:
    # The limiter crashes and its supervisor restarts it at once; the gates are the same objects
    # and the restarted actor serves them. The call waiting for a token has nothing to do with
    # the crash (the server is up, nothing was sent), yet it failed with RMCPActorStoppedError;
    # a call waiting for a scheduler slot in the same moment is not touched. The same happens
    # to every token waiter when the server's connection or breaker crashes (rest_for_one).
    spec = ServerSpec.in_memory(
        "s", build_server(state), overrides=PolicyOverrides(rate_limit=RateLimitOverrides(rate=0.2, burst=1))
    )
    outcome: list[CallResult | RMCPError] = []
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(spec)
        await sup.call("s", "echo", {"text": "takes the token"})

        async def call() -> None:
            try:
                outcome.append(await sup.call("s", "echo", {"text": "waits"}, timeout=30))
            except RMCPError as error:
                outcome.append(error)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(call)
            await trio.sleep(1)
            _crash_limiter(sup, "s")
    (result,) = outcome
    assert isinstance(result, CallResult), result
    assert result.text == "waits"


def _scripted(answers: list[dict[str, Any] | float]) -> tuple[Server[Any], list[float]]:
    """An RMCP server whose ``lookup`` answers each call with the next RMCP meta of the script (a
    float: sleep that long, then answer with the next one left), noting the clock of each call."""
    stamp = {"rmcp": {"version": "0.2", "features": ["ack"], "durable": False, "instance_id": "one"}}
    tools = [Tool(name="lookup", input_schema={"type": "object"}, _meta=stamp)]
    script = list(answers)
    calls: list[float] = []

    async def list_tools(
        ctx: ServerRequestContext[Any], params: PaginatedRequestParams | None
    ) -> ListToolsResult:
        return ListToolsResult(tools=tools)

    async def call_tool(ctx: ServerRequestContext[Any], params: CallToolRequestParams) -> CallToolResult:
        calls.append(trio.current_time())
        answer = script.pop(0)
        if isinstance(answer, float):
            await trio.sleep(answer)
            answer = script.pop(0)
        assert isinstance(answer, dict)
        return CallToolResult(
            content=[TextContent(type="text", text="ok" if answer["ack"] else "no")],
            is_error=not answer["ack"],
            _meta={"rmcp": answer},
        )

    return Server("scripted", on_list_tools=list_tools, on_call_tool=call_tool), calls


async def test_review2_refused_hedges_do_not_count_against_max_attempts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # max_attempts = 2. The first attempt and its hedge are both refused for going too fast
    # (neither counts); the next attempt fails with a retryable NACK (the first that counts), so
    # one more is due and succeeds. Counting one refusal per race, not per attempt, left the
    # hedge's refusal counted and the call ended after the NACK.
    limited = {
        "ack": False,
        "processed": False,
        "code": "rate_limited",
        "retryable": True,
        "retry_after_ms": 100,
    }
    unavailable = {"ack": False, "processed": False, "code": "unavailable", "retryable": True}
    ok = {"ack": True, "processed": True}
    app, calls = _scripted([0.2, limited, limited, unavailable, ok])
    spec = ServerSpec.in_memory(
        "s",
        app,
        overrides=PolicyOverrides(
            retry=RetryOverrides(max_attempts=2, base_delay_s=0.01, max_delay_s=0.05),
            retry_budget=RetryBudgetOverrides(min_per_s=1000.0),
        ),
        tools={"lookup": ToolOverrides(idempotent=True, hedge=HedgeOverrides(delay_s=0.1))},
    )
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(spec)
        result = await sup.call("s", "lookup", timeout=30)
    assert (result.text, result.attempts, len(calls)) == ("ok", 4, 4)


async def test_review2_a_hedge_refused_for_going_too_fast_slows_the_limiter(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The hedge (at 0.1 s) is refused with retry_after 5 s; the first attempt answers at 0.3 s
    # and wins. The server's refusal is feedback all the same: the gate must pause for it.
    limited = {
        "ack": False,
        "processed": False,
        "retryable": True,
        "code": "rate_limited",
        "retry_after_ms": 5000,
    }
    app, calls = _scripted([0.3, limited, {"ack": True, "processed": True}])
    spec = ServerSpec.in_memory(
        "s", app, tools={"lookup": ToolOverrides(idempotent=True, hedge=HedgeOverrides(delay_s=0.1))}
    )
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(spec)
        result = await sup.call("s", "lookup", timeout=30)
        await trio.testing.wait_all_tasks_blocked()
        gate = _limiter(sup, "s").statistics().gates[0]
    assert (result.text, len(calls)) == ("ok", 2)
    assert gate.signals == 1
    assert gate.paused_for_s == pytest.approx(5 - 0.2, abs=0.01)
