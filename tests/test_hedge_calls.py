"""Hedging on the call path, against real MCP servers: in memory on MockClock, and one stdio run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from conftest import PYTHON, stdio_args
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
    PolicyOverrides,
    RetryOverrides,
    RMCPSupervisor,
    ServerSpec,
    ToolOverrides,
)
from rmcp_actors.config import HedgeOverrides, RetryBudgetOverrides
from rmcp_actors.server import rmcp_of
from rmcp_actors.stores import MemoryStore


def hedged(tool: str, **hedge: Any) -> dict[str, ToolOverrides]:
    return {tool: ToolOverrides(hedge=HedgeOverrides(**hedge))}


async def test_a_hedge_beats_a_slow_first_attempt_and_the_loser_is_cancelled(
    state: State, server: MCPServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("s", server, tools=hedged("slow_once", delay_s=0.5)))
        started = trio.current_time()
        result = await sup.call("s", "slow_once", {"label": "a", "seconds": 100})
        elapsed = trio.current_time() - started
        await trio.testing.wait_all_tasks_blocked()
        budget = sup.statistics().budgets[0]
        scheduler = sup.statistics().scheduler
    assert (result.text, result.attempts) == ("done a", 2)
    assert elapsed == pytest.approx(0.5, abs=0.05)
    # The first attempt's run was stopped by the client's notifications/cancelled.
    [cancelled] = state.ledger
    assert cancelled.startswith("cancelled a ")
    assert state.cancel_notices == [cancelled.removeprefix("cancelled a ")]
    assert budget.hedges == 1
    assert scheduler.running == 0


async def test_a_tool_not_safe_to_repeat_is_never_hedged(
    state: State, server: MCPServer, autojump_clock: trio.testing.MockClock
) -> None:
    tools = {
        **hedged("block_unsafe", delay_s=0.1),
        # Annotated idempotent, but the config says otherwise: the config wins.
        "slow_once": ToolOverrides(idempotent=False, hedge=HedgeOverrides(delay_s=0.1)),
    }
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("s", server, tools=tools))
        started = trio.current_time()
        unsafe = await sup.call("s", "block_unsafe", {"label": "u", "seconds": 2})
        assert trio.current_time() - started == pytest.approx(2, abs=0.05)
        overridden = await sup.call("s", "slow_once", {"label": "o", "seconds": 2})
        budget = sup.statistics().budgets[0]
    assert (unsafe.attempts, overridden.attempts) == (1, 1)
    assert state.ledger == ["u"]
    assert budget.hedges == 0


async def test_against_a_deduplicating_server_the_hedge_coalesces_with_the_first_attempt(
    state: State, autojump_clock: trio.testing.MockClock
) -> None:
    """block_unsafe is not safe to repeat, but an RMCP server deduplicates: the hedge carries the
    call's idempotency key, waits on the server for the run in flight, and the tool runs once."""
    app = build_server(state, store=MemoryStore(clock=trio.current_time))
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("s", app, tools=hedged("block_unsafe", delay_s=0.5)))
        result = await sup.call("s", "block_unsafe", {"label": "once", "seconds": 2})
    side = rmcp_of(app)
    assert side is not None
    assert result.attempts == 2
    assert state.ledger == ["once"]
    assert side.statistics().coalesced == 1
    assert side.statistics().executed == 1


async def test_no_budget_no_hedge(server: MCPServer, autojump_clock: trio.testing.MockClock) -> None:
    policy = PolicyOverrides(retry_budget=RetryBudgetOverrides(ratio=0.0, min_per_s=0.0))
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(
            ServerSpec.in_memory("s", server, overrides=policy, tools=hedged("slow_once", delay_s=0.1))
        )
        result = await sup.call("s", "slow_once", {"label": "a", "seconds": 3})
        budget = sup.statistics().budgets[0]
    assert result.attempts == 1
    assert (budget.hedges, budget.refused) == (0, 1)


@pytest.mark.parametrize("lane", ["server", "tool"])
async def test_a_hedge_waits_for_a_slot_like_any_attempt(
    lane: str, server: MCPServer, autojump_clock: trio.testing.MockClock
) -> None:
    hedge = HedgeOverrides(delay_s=0.1)
    if lane == "server":
        policy, tools = PolicyOverrides(max_concurrency=1), {"slow_once": ToolOverrides(hedge=hedge)}
    else:
        policy, tools = None, {"slow_once": ToolOverrides(hedge=hedge, max_concurrency=1)}
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("s", server, overrides=policy, tools=tools))
        started = trio.current_time()
        result = await sup.call("s", "slow_once", {"label": "a", "seconds": 3})
        elapsed = trio.current_time() - started
    # The first attempt held the only slot until it answered: the hedge never went out.
    assert (result.attempts, result.text) == (1, "done a")
    assert elapsed == pytest.approx(3, abs=0.05)


async def test_a_percentile_delay_hedges_only_once_enough_latencies_were_seen(
    server: MCPServer, autojump_clock: trio.testing.MockClock
) -> None:
    tools = hedged("slow_once", delay="p95", min_samples=20)
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("s", server, tools=tools))
        started = trio.current_time()
        early = await sup.call("s", "slow_once", {"label": "early", "seconds": 2})
        assert trio.current_time() - started == pytest.approx(2, abs=0.05)
        for index in range(19):
            await sup.call("s", "slow_once", {"label": f"warm{index}", "seconds": 0.2})
        started = trio.current_time()
        late = await sup.call("s", "slow_once", {"label": "late", "seconds": 100})
        elapsed = trio.current_time() - started
    assert early.attempts == 1
    # 20 latencies seen: 19 of 0.2 s and one of 2 s; their p95 is 0.2 s.
    assert late.attempts == 2
    assert elapsed == pytest.approx(0.2, abs=0.05)


async def test_cancelling_the_caller_cancels_the_hedges_too(
    state: State, server: MCPServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("s", server, tools=hedged("work", delay_s=0.5)))
        with trio.move_on_after(2):
            await sup.call("s", "work", {"seconds": 100})
        await trio.testing.wait_all_tasks_blocked()
        scheduler = sup.statistics().scheduler
        budget = sup.statistics().budgets[0]
    assert budget.hedges == 1
    assert (state.peak, state.running) == (2, 0)
    assert (scheduler.running, scheduler.queued) == (0, 0)


async def test_stdio_a_hedge_wins_and_the_server_gets_notifications_cancelled(tmp_path: Path) -> None:
    spec = ServerSpec.stdio(
        "s", PYTHON, stdio_args("--state-dir", str(tmp_path)), tools=hedged("slow_once", delay_s=0.2)
    )
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(spec)
        started = trio.current_time()
        result = await sup.call("s", "slow_once", {"label": "a", "seconds": 60})
        elapsed = trio.current_time() - started
        ledger, notices = tmp_path / "ledger", tmp_path / "cancel_notices"
        with trio.fail_after(10):
            while not (ledger.exists() and notices.exists()):
                await trio.sleep(0.02)
    assert (result.text, result.attempts) == ("done a", 2)
    assert elapsed < 5
    # The first attempt's run was cancelled, and the server had its notifications/cancelled.
    [cancelled] = ledger.read_text().splitlines()
    assert cancelled.startswith("cancelled a ")
    assert notices.read_text().splitlines() == [cancelled.removeprefix("cancelled a ")]


def _slow_then_unavailable() -> tuple[Server[Any], list[str]]:
    """An RMCP server whose ``lookup`` refuses its first call with a retryable NACK after 1 s,
    then answers at once."""
    seen: list[str] = []
    stamp = {"rmcp": {"version": "0.2", "features": ["ack"], "durable": False, "instance_id": "one"}}
    tools = [Tool(name="lookup", input_schema={"type": "object"}, _meta=stamp)]

    async def list_tools(
        ctx: ServerRequestContext[Any], params: PaginatedRequestParams | None
    ) -> ListToolsResult:
        return ListToolsResult(tools=tools)

    async def call_tool(ctx: ServerRequestContext[Any], params: CallToolRequestParams) -> CallToolResult:
        seen.append(params.name)
        if len(seen) == 1:
            await trio.sleep(1)
            nack = {"ack": False, "processed": False, "code": "unavailable", "reason": "x", "retryable": True}
            return CallToolResult(
                content=[TextContent(type="text", text="no")], is_error=True, _meta={"rmcp": nack}
            )
        return CallToolResult(
            content=[TextContent(type="text", text="ok")], _meta={"rmcp": {"ack": True, "processed": True}}
        )

    return Server("flaky", on_list_tools=list_tools, on_call_tool=call_tool), seen


async def test_review1_a_hedge_queued_behind_its_own_call_does_not_outlive_the_first_attempt(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The only slot is the first attempt's: the hedge queues for it. When the first attempt is
    # refused (retryable), the race must not wait for that hedge (it waits for a slot its own
    # call holds until the race ends): the retry loop retries at once.
    app, seen = _slow_then_unavailable()
    spec = ServerSpec.in_memory(
        "s",
        app,
        overrides=PolicyOverrides(
            max_concurrency=1, retry=RetryOverrides(base_delay_s=0.01, max_delay_s=0.05)
        ),
        tools={"lookup": ToolOverrides(idempotent=True, hedge=HedgeOverrides(delay_s=0.1))},
    )
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(spec)
        started = trio.current_time()
        result = await sup.call("s", "lookup", timeout=30)
        elapsed = trio.current_time() - started
        scheduler = sup.statistics().scheduler
    assert (result.text, len(seen)) == ("ok", 2)
    assert elapsed < 1.5, elapsed
    assert (scheduler.running, scheduler.queued) == (0, 0)
