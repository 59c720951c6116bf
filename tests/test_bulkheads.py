"""Fair bulkheads through ``sup.call``: tenants, per-tool lanes, nested-call deadlocks (real servers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
import trio
import trio.testing
from conftest import PYTHON, stdio_args
from mcp.server.mcpserver import MCPServer

from rmcp_actors import (
    PolicyOverrides,
    RMCPConfig,
    RMCPDeadlockError,
    RMCPSupervisor,
    ServerSpec,
    ToolOverrides,
)


def _recording_server(admitted: list[str]) -> MCPServer:
    """A server whose ``work`` records each call's tag as it starts, then takes a second."""
    app = MCPServer("recording")

    @app.tool()
    async def work(tag: str) -> str:
        admitted.append(tag)
        await anyio.sleep(1)
        return tag

    return app


async def test_a_small_tenant_interleaves_with_a_large_one(autojump_clock: trio.testing.MockClock) -> None:
    admitted: list[str] = []
    spec = ServerSpec.in_memory(
        "s", _recording_server(admitted), wire="direct", overrides=PolicyOverrides(max_concurrency=1)
    )
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(spec)

        async def call(tenant: str) -> None:
            await sup.call("s", "work", {"tag": tenant}, tenant=tenant, timeout=10_000)

        async with trio.open_nursery() as nursery:
            for _ in range(1_000):
                nursery.start_soon(call, "batch")
            await trio.testing.wait_all_tasks_blocked()
            for _ in range(10):
                nursery.start_soon(call, "interactive")
    # The first batch call took the free slot; then the two tenants take turns.
    assert [index for index, tenant in enumerate(admitted) if tenant == "interactive"] == list(
        range(2, 21, 2)
    )
    assert len(admitted) == 1_010


async def test_tenant_weights_come_from_config(autojump_clock: trio.testing.MockClock) -> None:
    admitted: list[str] = []
    spec = ServerSpec.in_memory(
        "s", _recording_server(admitted), overrides=PolicyOverrides(max_concurrency=1)
    )
    config = RMCPConfig.from_dict({"tenants": {"interactive": 4}})
    async with RMCPSupervisor.open(config) as sup:
        await sup.add_server(spec)

        async def call(tenant: str | None) -> None:
            await sup.call("s", "work", {"tag": str(tenant)}, tenant=tenant, timeout=10_000)

        await sup.call("s", "work", {"tag": "warm"})
        admitted.clear()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call, "first")  # takes the free slot
            await trio.testing.wait_all_tasks_blocked()
            for tenant in ("interactive", None, "batch"):
                for _ in range(60):
                    nursery.start_soon(call, tenant)
                await trio.testing.wait_all_tasks_blocked()
    # While all three wait: 4 of "interactive" for 1 each of "batch" and of no tenant.
    window = admitted[1:61]
    assert (window.count("interactive"), window.count("None"), window.count("batch")) == (40, 10, 10)


async def test_a_tool_lane_bounds_its_tool_and_leaves_the_others_free(
    autojump_clock: trio.testing.MockClock,
) -> None:
    admitted: list[str] = []
    running = {"work": 0, "quick": 0}
    peak = {"work": 0, "quick": 0}
    app = _recording_server(admitted)

    @app.tool()
    async def quick() -> str:
        running["quick"] += 1
        peak["quick"] = max(peak["quick"], running["quick"])
        await anyio.sleep(0.1)
        running["quick"] -= 1
        return "quick"

    spec = ServerSpec.in_memory(
        "s",
        app,
        overrides=PolicyOverrides(max_concurrency=8),
        tools={"work": ToolOverrides(max_concurrency=2)},
    )
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(spec)
        quick_done: list[float] = []

        async def work() -> None:
            await sup.call("s", "work", {"tag": "w"}, timeout=100)

        async def call_quick() -> None:
            await sup.call("s", "quick", timeout=100)
            quick_done.append(trio.current_time())

        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(work)
            await trio.testing.wait_all_tasks_blocked()
            [lane] = sup.statistics().scheduler.lanes
            assert (lane.running, lane.tools[0].name, lane.tools[0].running, lane.tools[0].queued) == (
                2,
                "s/work",
                2,
                8,
            )
            for _ in range(6):
                nursery.start_soon(call_quick)
        elapsed = trio.current_time() - start
        [lane] = sup.statistics().scheduler.lanes
    # Two at a time: 10 calls of one second take 5 s; the quick tool used the rest at once.
    assert lane.tools[0].peak_running == 2
    assert elapsed == pytest.approx(5, abs=0.1)
    assert peak["quick"] == 6
    assert max(quick_done) - start < 0.5


def _nesting_server(sup_ref: dict[str, RMCPSupervisor], errors: list[RMCPDeadlockError]) -> MCPServer:
    """``outer(depth)`` calls ``outer(depth - 1)`` on the same server, ``inner`` at depth 0."""
    app = MCPServer("nesting")

    @app.tool()
    async def outer(depth: int = 0, tool: str = "inner") -> str:
        try:
            if depth > 0:
                result = await sup_ref["sup"].call("self", "outer", {"depth": depth - 1, "tool": tool})
            else:
                result = await sup_ref["sup"].call("self", tool)
        except RMCPDeadlockError as error:
            errors.append(error)
            raise
        return f"nested: {_text(result.content)}"

    @app.tool()
    async def inner() -> str:
        return "inner ran"

    return app


def _text(content: Any) -> str:
    return content[0].text


@pytest.mark.parametrize("wire", ["direct", "jsonrpc"])
async def test_a_nested_call_that_needs_its_callers_slot_raises_instead_of_hanging(
    wire: Any, autojump_clock: trio.testing.MockClock
) -> None:
    sup_ref: dict[str, RMCPSupervisor] = {}
    errors: list[RMCPDeadlockError] = []
    spec = ServerSpec.in_memory(
        "self", _nesting_server(sup_ref, errors), wire=wire, overrides=PolicyOverrides(max_concurrency=2)
    )
    async with RMCPSupervisor.open() as sup:
        sup_ref["sup"] = sup
        await sup.add_server(spec)
        with trio.fail_after(60):  # a hang would jump the clock here
            result = await sup.call("self", "outer", {"depth": 1}, timeout=30)
        assert trio.current_time() < 1  # at once, not after the timeout
    # The innermost call found both slots held by its two callers; the tool reported it.
    [error] = errors
    assert (error.lane, error.chain) == ("server 'self'", ("self/outer", "self/outer"))
    assert (error.server, error.tool, error.may_have_executed) == ("self", "inner", False)
    assert "servers.self.max_concurrency" in error.message
    # The tool that got the error failed; its caller got that as an error result, not a hang.
    assert _text(result.content).startswith("nested: Error executing tool outer")
    assert sup.statistics().scheduler.running == 0


async def test_nested_calls_run_when_a_slot_is_left(autojump_clock: trio.testing.MockClock) -> None:
    sup_ref: dict[str, RMCPSupervisor] = {}
    errors: list[RMCPDeadlockError] = []
    spec = ServerSpec.in_memory(
        "self", _nesting_server(sup_ref, errors), wire="direct", overrides=PolicyOverrides(max_concurrency=3)
    )
    async with RMCPSupervisor.open() as sup:
        sup_ref["sup"] = sup
        await sup.add_server(spec)
        with trio.fail_after(60):
            result = await sup.call("self", "outer", {"depth": 1}, timeout=30)
    assert (errors, result.is_error, _text(result.content)) == ([], False, "nested: nested: inner ran")


async def test_a_nested_call_waits_for_a_slot_held_by_an_unrelated_call(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The outer call holds one slot, an unrelated call the other: the nested call must wait
    # for the unrelated one, not fail.
    sup_ref: dict[str, RMCPSupervisor] = {}
    errors: list[RMCPDeadlockError] = []
    app = _nesting_server(sup_ref, errors)

    @app.tool()
    async def hold() -> str:
        await anyio.sleep(5)
        return "held"

    spec = ServerSpec.in_memory("self", app, wire="direct", overrides=PolicyOverrides(max_concurrency=2))
    async with RMCPSupervisor.open() as sup:
        sup_ref["sup"] = sup
        await sup.add_server(spec)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sup.call, "self", "hold")
            await trio.testing.wait_all_tasks_blocked()
            with trio.fail_after(60):
                result = await sup.call("self", "outer", timeout=30)
            assert trio.current_time() == pytest.approx(5, abs=0.01)
    assert (errors, _text(result.content)) == ([], "nested: inner ran")


async def test_a_recursive_tool_deadlocked_on_its_own_tool_lane_raises(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sup_ref: dict[str, RMCPSupervisor] = {}
    errors: list[RMCPDeadlockError] = []
    spec = ServerSpec.in_memory(
        "self",
        _nesting_server(sup_ref, errors),
        wire="direct",
        overrides=PolicyOverrides(max_concurrency=10),
        tools={"outer": ToolOverrides(max_concurrency=1)},
    )
    async with RMCPSupervisor.open() as sup:
        sup_ref["sup"] = sup
        await sup.add_server(spec)
        with trio.fail_after(60):
            await sup.call("self", "outer", {"depth": 1}, timeout=30)
    [error] = errors
    assert (error.lane, error.chain) == ("tool 'self/outer'", ("self/outer",))
    assert "servers.self.tools.outer.max_concurrency" in error.message


async def test_tenants_and_a_tool_lane_over_stdio(tmp_path: Path) -> None:
    spec = ServerSpec.stdio(
        "test",
        PYTHON,
        stdio_args("--state-dir", str(tmp_path)),
        tools={"sleep": ToolOverrides(max_concurrency=1)},
    )
    finished: list[str] = []
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(spec)

        async def call(tenant: str) -> None:
            await sup.call("test", "sleep", {"seconds": 0.1}, tenant=tenant, timeout=30)
            finished.append(tenant)

        async with trio.open_nursery() as nursery:
            for _ in range(6):
                nursery.start_soon(call, "bulk")
            await trio.sleep(0.05)
            for _ in range(2):
                nursery.start_soon(call, "urgent")
            # The tool's lane holds one call; the server's other slots stay free for others.
            assert _text((await sup.call("test", "echo", {"text": "free"})).content) == "free"
        [lane] = sup.statistics().scheduler.lanes
    assert lane.tools[0].peak_running == 1
    # The first bulk call was running; then the tenants took turns at the tool's lane.
    assert finished[:5].count("urgent") == 2
