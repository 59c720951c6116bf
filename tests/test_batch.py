"""sup.map: batches against real MCP servers (in memory, MockClock where time matters; one stdio run)."""

from __future__ import annotations

import gc
import itertools
import math
import tracemalloc
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import anyio
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
from mcp_test_server import State

from rmcp_actors import (
    CallResult,
    Outcome,
    PolicyOverrides,
    RMCPArgumentError,
    RMCPError,
    RMCPSupervisor,
    RMCPTimeoutAfterSendError,
    ServerSpec,
    ToolOverrides,
    UnknownServerError,
    UnknownToolError,
)
from rmcp_actors.lowlevel import Batch


def noop_server() -> Server[Any]:
    """The cheapest real server: a low-level Server whose one tool answers a constant."""
    tool = Tool(name="noop", input_schema={"type": "object"})
    result = CallToolResult(content=[TextContent(type="text", text="ok")])

    async def list_tools(
        ctx: ServerRequestContext[Any], params: PaginatedRequestParams | None
    ) -> ListToolsResult:
        return ListToolsResult(tools=[tool])

    async def call_tool(ctx: ServerRequestContext[Any], params: CallToolRequestParams) -> CallToolResult:
        return result

    return Server("noop", on_list_tools=list_tools, on_call_tool=call_tool)


async def collect(batch: Batch) -> list[tuple[int, CallResult | RMCPError]]:
    async with batch as results:
        return [pair async for pair in results]


async def test_outcomes_come_in_completion_order_by_default(
    server: MCPServer, autojump_clock: trio.testing.MockClock
) -> None:
    seconds = [3.0, 1.0, 2.0, 0.5]
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("test", server))
        started = trio.current_time()
        outcomes = await collect(sup.map("test", "sleep", ({"seconds": s} for s in seconds)))
        # All four ran side by side: the batch took as long as its slowest item.
        assert trio.current_time() - started == pytest.approx(3.0, abs=0.05)
    assert [index for index, _ in outcomes] == [3, 1, 2, 0]
    for _, outcome in outcomes:
        assert isinstance(outcome, CallResult)
        assert outcome.text == "slept"


async def test_ordered_yields_in_input_order_and_a_slow_head_holds_back_at_most_the_window(
    server: MCPServer, autojump_clock: trio.testing.MockClock
) -> None:
    pulled = 0

    def items() -> Iterator[dict[str, Any]]:
        nonlocal pulled
        for index in range(40):
            pulled += 1
            yield {"seconds": 100.0 if index == 0 else 1.0}

    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("test", server))
        async with sup.map("test", "sleep", items(), concurrency=4, ordered=True, window=6) as results:
            await trio.sleep(50)
            # Item 0 still runs: items 1..5 ran and wait for it; none after them started.
            stats = results.statistics()
            assert (stats.started, stats.completed, stats.yielded) == (6, 5, 0)
            assert pulled == 6
            order = [index async for index, _ in results]
        assert results.statistics().peak_outstanding == 6
    assert order == list(range(40))


async def test_the_input_is_consumed_lazily_and_closed_on_an_early_exit(server: MCPServer) -> None:
    pulled = 0
    closed = False

    def endless() -> Iterator[dict[str, Any]]:
        nonlocal pulled, closed
        try:
            for index in itertools.count():
                pulled += 1
                yield {"text": str(index)}
        finally:
            closed = True

    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("test", server))
        async with sup.map("test", "echo", endless(), concurrency=8) as results:
            seen = 0
            async for _, outcome in results:
                assert isinstance(outcome, CallResult)
                seen += 1
                if seen == 100:
                    break
        # 8 in flight and at most 8 waiting for the consumer, beyond what it took.
        assert pulled <= 100 + 2 * 8 + 1
        assert closed


async def test_an_async_iterable_input_is_closed_on_exit(server: MCPServer) -> None:
    closed = False

    async def endless() -> AsyncIterator[dict[str, Any]]:
        nonlocal closed
        try:
            for index in itertools.count():
                await trio.lowlevel.checkpoint()
                yield {"a": index, "b": 1}
        finally:
            closed = True

    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("test", server))
        async with sup.map("test", "add", endless(), concurrency=4, ordered=True) as results:
            sums = []
            async for index, outcome in results:
                assert isinstance(outcome, CallResult)
                sums.append((index, outcome.structured_content))
                if index == 9:
                    break
    assert sums == [(n, {"result": n + 1}) for n in range(10)]
    assert closed


async def test_memory_is_bounded_independent_of_the_input_length_on_the_direct_wire() -> None:
    """The batch against the SDK's direct in-memory wire, end to end, at two lengths."""

    async def peak_of(sup: RMCPSupervisor, items: int) -> tuple[int, int]:
        gc.collect()
        tracemalloc.start()
        try:
            count = 0
            async with sup.map("noop", "noop", ({"n": n} for n in range(items))) as results:
                async for _, outcome in results:
                    assert isinstance(outcome, CallResult)
                    count += 1
            return count, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("noop", noop_server(), wire="direct"))
        await peak_of(sup, 100)  # warm-up: caches, code paths
        small_count, small_peak = await peak_of(sup, 300)
        large_count, large_peak = await peak_of(sup, 3_000)
    assert (small_count, large_count) == (300, 3_000)
    # Ten times the items, not ten times the memory (a list of the items alone would be more).
    assert large_peak < small_peak * 1.5 + 64 * 1024, (small_peak, large_peak)


async def test_batch_memory_is_bounded_for_100_000_items() -> None:
    """The batch machinery alone (its call seam given a trivial call): 10k vs 100k items.

    The SDK's round trip under tracemalloc costs ~1-5 ms per call on a busy 2-core machine,
    so 100,000 traced calls through a real server would take minutes; the end-to-end test
    above checks the same property through the direct wire at smaller sizes.
    """
    result = CallResult(
        outcome=Outcome.SUCCEEDED,
        content=[],
        structured_content=None,
        is_error=False,
        attempts=1,
        duplicate=False,
        request_id="r",
        idempotency_key="k",
        server="s",
        tool="t",
        queued_s=0.0,
        elapsed_s=0.0,
    )

    async def call(item: Mapping[str, Any] | None, key: str | None) -> CallResult:
        await trio.lowlevel.checkpoint()
        return result

    async def peak_of(items: int, ordered: bool) -> int:
        gc.collect()
        tracemalloc.start()
        try:
            count = 0
            batch = Batch(call, ({"n": n} for n in range(items)), concurrency=16, ordered=ordered)
            async with batch as results:
                async for _ in results:
                    count += 1
            assert count == items
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    # Input order, which buffers outcomes by index, at a tenth of the sizes (tracing is slow).
    for ordered, small_size in ((False, 10_000), (True, 2_000)):
        await peak_of(500, ordered)
        small = await peak_of(small_size, ordered)
        large = await peak_of(small_size * 10, ordered)
        # The items alone, as a list, would take several MB.
        assert large < small * 1.5 + 64 * 1024, (ordered, small, large)


async def test_key_reuse_replays_finished_items_on_an_rmcp_server(
    rmcp_server: MCPServer, state: State
) -> None:
    def items(count: int) -> Iterator[dict[str, Any]]:
        return ({"label": f"order-{n}"} for n in range(count))

    def key(item: Mapping[str, Any]) -> str:
        return f"batch-7/{item['label']}"

    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("test", rmcp_server))
        first = await collect(sup.map("test", "record", items(20), key=key))
        # The rerun (say, after a crash) carries on with more items: the 20 finished ones replay.
        second = dict(await collect(sup.map("test", "record", items(25), key=key)))
    assert len(first) == 20
    assert all(isinstance(outcome, CallResult) and not outcome.duplicate for _, outcome in first)
    assert sorted(state.ledger) == sorted(f"order-{n}" for n in range(25))
    for index, outcome in second.items():
        assert isinstance(outcome, CallResult)
        assert outcome.duplicate is (index < 20)
        assert outcome.idempotency_key == f"batch-7/order-{index}"


async def test_an_items_bad_input_is_that_items_outcome(
    server: MCPServer, autojump_clock: trio.testing.MockClock
) -> None:
    items: list[Any] = [
        {"a": 1, "b": 2},
        {"a": math.nan, "b": 1},  # JSON cannot carry NaN
        [1, 2],  # not a mapping
        None,  # no arguments: the server rejects the call (a tool error result)
        {"a": 3, "b": 4},
    ]
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("test", server))
        outcomes = dict(await collect(sup.map("test", "add", items, ordered=True)))
        slow = dict(await collect(sup.map("test", "sleep", [{"seconds": 1}, {"seconds": 100}], timeout=10)))
    assert sorted(outcomes) == [0, 1, 2, 3, 4]
    assert isinstance(outcomes[0], CallResult)
    assert outcomes[0].structured_content == {"result": 3}
    assert isinstance(outcomes[1], RMCPArgumentError)
    assert "NaN" in str(outcomes[1])
    assert isinstance(outcomes[2], RMCPArgumentError)
    assert "item 2" in str(outcomes[2])
    assert isinstance(outcomes[3], CallResult)
    assert outcomes[3].outcome is Outcome.FAILED
    assert isinstance(outcomes[4], CallResult)
    assert outcomes[4].structured_content == {"result": 7}
    assert isinstance(slow[0], CallResult)
    assert isinstance(slow[1], RMCPTimeoutAfterSendError)


async def test_errors_of_the_batch_itself_raise_at_once(server: MCPServer) -> None:
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("test", server))
        with pytest.raises(UnknownServerError, match="no server named 'nope'"):
            sup.map("nope", "echo", [{"text": "x"}])
        with pytest.raises(UnknownToolError, match="does not list tool 'nope'"):
            sup.map("test", "nope", [{"text": "x"}])
        with pytest.raises(RMCPArgumentError, match="not a dict"):
            sup.map("test", "echo", {"text": "x"})  # pyright: ignore[reportArgumentType]
        with pytest.raises(RMCPArgumentError, match="concurrency"):
            sup.map("test", "echo", [], concurrency=0)
        with pytest.raises(RMCPArgumentError, match="window"):
            sup.map("test", "echo", [], ordered=True, window=0)
        with pytest.raises(RMCPArgumentError, match="timeout"):
            sup.map("test", "echo", [], timeout=-1)
        batch = sup.map("test", "echo", [{"text": "x"}])
        with pytest.raises(RuntimeError, match=r"async with sup\.map"):
            await batch.__anext__()


async def test_the_inputs_own_error_ends_the_batch_after_the_items_started(server: MCPServer) -> None:
    def items() -> Iterator[dict[str, Any]]:
        for index in range(5):
            yield {"text": str(index)}
        raise ValueError("the source broke")

    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("test", server))
        for ordered in (False, True):
            seen: list[int] = []

            async def consume(batch: Batch, seen: list[int] = seen) -> None:
                async with batch as results:
                    async for index, _ in results:
                        seen.append(index)

            with pytest.raises(ValueError, match="the source broke"):
                await consume(sup.map("test", "echo", items(), ordered=ordered))
            assert sorted(seen) == [0, 1, 2, 3, 4]


async def test_a_key_function_that_fails_ends_the_batch(server: MCPServer) -> None:
    items = [{"text": "a"}, {"text": "b"}, {"text": "c"}]
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("test", server))
        with pytest.raises(KeyError, match="nope"):
            await collect(sup.map("test", "echo", items, key=lambda item: item["nope"]))
        with pytest.raises(RMCPArgumentError, match=r"must return a str .* got int for item 0"):
            await collect(sup.map("test", "echo", items, key=lambda item: 42))  # pyright: ignore[reportArgumentType]
        # None: that item gets a fresh key.
        outcomes = await collect(sup.map("test", "echo", items, key=lambda item: None, ordered=True))
    assert [outcome.text for _, outcome in outcomes if isinstance(outcome, CallResult)] == ["a", "b", "c"]


async def test_a_server_removed_during_the_batch_ends_it(
    server: MCPServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("test", server))
        seen: list[int] = []

        async def consume(batch: Batch) -> None:
            async with batch as results:
                async for index, _ in results:
                    seen.append(index)
                    if index == 3:
                        await sup.remove_server("test")

        with pytest.raises(UnknownServerError, match="no server named 'test'"):
            await consume(sup.map("test", "sleep", ({"seconds": 1} for _ in range(1000)), concurrency=2))
        # The two calls in flight at the removal were the last (nothing waits on a queue).
        assert len(seen) <= 6


async def test_leaving_the_block_early_cancels_the_calls_in_flight(
    server: MCPServer, state: State, autojump_clock: trio.testing.MockClock
) -> None:
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(
            ServerSpec.in_memory("test", server, overrides=PolicyOverrides(max_concurrency=4))
        )
        started = trio.current_time()
        items = [{"seconds": 1.0}] + [{"seconds": 1000.0}] * 20
        async with sup.map("test", "work", items) as results:
            async for index, _ in results:
                assert index == 0
                assert state.running == 3
                break
        assert trio.current_time() - started == pytest.approx(1.0, abs=0.05)
        await trio.testing.wait_all_tasks_blocked()
        # The server saw the cancellations; nothing of the batch runs or waits any more.
        assert state.running == 0
        (lane,) = sup.statistics().scheduler.lanes
        assert (lane.running, lane.queued) == (0, 0)


async def test_the_callers_cancel_scope_bounds_the_batch(
    server: MCPServer, state: State, autojump_clock: trio.testing.MockClock
) -> None:
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("test", server))
        started = trio.current_time()
        with trio.move_on_after(5) as scope:
            async with sup.map("test", "work", ({"seconds": 1000.0} for _ in range(100))) as results:
                async for _ in results:
                    pytest.fail("no item finishes within the scope")
        assert scope.cancelled_caught
        assert trio.current_time() - started == pytest.approx(5.0, abs=0.05)
        await trio.testing.wait_all_tasks_blocked()
        assert state.running == 0


async def test_default_concurrency_is_the_servers_max_concurrency(server: MCPServer, state: State) -> None:
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(
            ServerSpec.in_memory("test", server, overrides=PolicyOverrides(max_concurrency=3))
        )
        batch = sup.map("test", "work", ({"seconds": 0.01} for _ in range(12)))
        outcomes = await collect(batch)
    assert batch.statistics().concurrency == 3
    assert len(outcomes) == 12
    assert state.peak == 3


async def test_default_concurrency_is_the_tools_lane_when_lower(server: MCPServer, state: State) -> None:
    spec = ServerSpec.in_memory(
        "test",
        server,
        overrides=PolicyOverrides(max_concurrency=8),
        tools={"work": ToolOverrides(max_concurrency=2)},
    )
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(spec)
        batch = sup.map("test", "work", ({"seconds": 0.01} for _ in range(12)))
        outcomes = await collect(batch)
        wide = sup.map("test", "echo", [], concurrency=5)
    assert batch.statistics().concurrency == 2
    assert len(outcomes) == 12
    assert state.peak == 2
    assert wide.statistics().concurrency == 5


async def test_a_batch_under_a_tenant_does_not_hold_off_another_tenant(
    autojump_clock: trio.testing.MockClock,
) -> None:
    admitted: list[str] = []
    app = MCPServer("recording")

    @app.tool()
    async def work(tag: str) -> str:  # pyright: ignore[reportUnusedFunction]
        admitted.append(tag)
        await anyio.sleep(1)
        return tag

    spec = ServerSpec.in_memory("s", app, wire="direct", overrides=PolicyOverrides(max_concurrency=1))
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(spec)
        items = ({"tag": "batch"} for _ in range(300))
        async with sup.map("s", "work", items, concurrency=200, tenant="batch", timeout=10_000) as results:
            await trio.testing.wait_all_tasks_blocked()
            async with trio.open_nursery() as nursery:
                for _ in range(10):
                    # No tenant: these share the server with the batch's tenant by weight.
                    nursery.start_soon(lambda: sup.call("s", "work", {"tag": "interactive"}, timeout=10_000))
            outcomes = [outcome async for _, outcome in results]
    assert all(isinstance(outcome, CallResult) for outcome in outcomes)
    # 199 batch calls were queued when the interactive ones came: they took turns with them.
    interactive = [index for index, tag in enumerate(admitted) if tag == "interactive"]
    assert interactive == list(range(2, 21, 2))


def test_a_batch_under_asyncio() -> None:
    from mcp_test_server import build_server

    async def main() -> list[int]:
        async with RMCPSupervisor.open() as sup:
            await sup.add_server(ServerSpec.in_memory("test", build_server()))
            items = ({"a": n, "b": 1} for n in range(20))
            async with sup.map("test", "add", items, concurrency=4, ordered=True) as results:
                return [index async for index, outcome in results if isinstance(outcome, CallResult)]

    assert anyio.run(main, backend="asyncio") == list(range(20))


async def test_a_batch_over_stdio() -> None:
    spec = ServerSpec.stdio("test", PYTHON, stdio_args())
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(spec)
        outcomes = await collect(sup.map("test", "add", ({"a": n, "b": n} for n in range(50)), ordered=True))
    assert [index for index, _ in outcomes] == list(range(50))
    for index, outcome in outcomes:
        assert isinstance(outcome, CallResult)
        assert outcome.structured_content == {"result": 2 * index}
