"""The admission scheduler on its own: priorities and aging, tenants, global, server and tool limits,
overflow, deadlines, nested-call deadlocks (MockClock)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from rmcp_actors import RMCPDeadlockError, RMCPOverloadedError
from rmcp_actors.flow.scheduler import Holding, Lane, Scheduler, current_holding


async def test_fast_path_admits_without_queueing() -> None:
    scheduler = Scheduler(max_concurrency=2, max_queue=10)
    lane = scheduler.lane("s", 2)
    await scheduler.acquire(lane)
    await scheduler.acquire(lane)
    stats = scheduler.statistics()
    assert (stats.running, stats.queued) == (2, 0)
    scheduler.release(lane)
    scheduler.release(lane)
    assert scheduler.statistics().running == 0


async def test_try_acquire_takes_free_slots_or_nothing(autojump_clock: trio.testing.MockClock) -> None:
    scheduler = Scheduler(max_concurrency=3, max_queue=10)
    lane = scheduler.lane("s", 2)
    tool = scheduler.tool_lane(lane, "t", 1)
    assert scheduler.try_acquire(lane, tool)
    # The tool's only slot is taken: nothing is taken, not even the free server slot.
    assert not scheduler.try_acquire(lane, tool)
    assert (tool.running, lane.running, scheduler.statistics().running) == (1, 1, 1)
    assert scheduler.try_acquire(lane)
    # The server's slots are all taken, and then the runtime's.
    assert not scheduler.try_acquire(lane)
    other = scheduler.lane("o", 5)
    assert scheduler.try_acquire(other)
    assert not scheduler.try_acquire(other)
    scheduler.release(other)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(scheduler.acquire, lane)
        await trio.testing.wait_all_tasks_blocked()
        scheduler.release(lane)  # handed to the waiter
        await trio.testing.wait_all_tasks_blocked()
        scheduler.release(lane, tool)
        # A slot freed while a call is queued goes to that call: none is left to try for.
        nursery.start_soon(scheduler.acquire, lane)
        nursery.start_soon(scheduler.acquire, lane)
        await trio.testing.wait_all_tasks_blocked()
        assert lane.queued == 1
        scheduler.release(lane)
        assert lane.queued == 0
        assert not scheduler.try_acquire(lane)
        scheduler.release(lane)
        scheduler.release(lane)
    assert scheduler.statistics().running == 0


async def test_higher_priority_first_fifo_within_priority(autojump_clock: trio.testing.MockClock) -> None:
    scheduler = Scheduler(max_concurrency=1, max_queue=10)
    lane = scheduler.lane("s", 1)
    order: list[str] = []
    await scheduler.acquire(lane)  # occupy the only slot so that everyone queues

    async def caller(name: str, priority: int) -> None:
        await scheduler.acquire(lane, priority)
        order.append(name)
        await trio.sleep(1)
        scheduler.release(lane)

    async with trio.open_nursery() as nursery:
        for name, priority in [("low1", 0), ("high1", 5), ("low2", 0), ("mid", 2), ("high2", 5)]:
            nursery.start_soon(caller, name, priority)
            await trio.testing.wait_all_tasks_blocked()
        assert scheduler.statistics().queued == 5
        scheduler.release(lane)
    assert order == ["high1", "high2", "mid", "low1", "low2"]


async def test_per_lane_and_global_limits_are_never_exceeded(autojump_clock: trio.testing.MockClock) -> None:
    scheduler = Scheduler(max_concurrency=3, max_queue=100)
    lanes = [scheduler.lane("a", 2), scheduler.lane("b", 2)]
    peak_global = 0
    peak_lane = {"a": 0, "b": 0}

    async def caller(index: int) -> None:
        nonlocal peak_global
        lane = lanes[index % 2]
        await scheduler.acquire(lane)
        stats = scheduler.statistics()
        peak_global = max(peak_global, stats.running)
        peak_lane[lane.name] = max(peak_lane[lane.name], lane.running)
        await trio.sleep(0.1 * (index % 3 + 1))
        scheduler.release(lane)

    async with trio.open_nursery() as nursery:
        for index in range(40):
            nursery.start_soon(caller, index)
    assert peak_global == 3
    assert max(peak_lane.values()) == 2
    assert scheduler.statistics().running == 0


async def test_full_queue_rejects_with_overloaded_error() -> None:
    scheduler = Scheduler(max_concurrency=1, max_queue=1, overflow="reject")
    lane = scheduler.lane("s", 1)
    await scheduler.acquire(lane)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(scheduler.acquire, lane)  # fills the queue
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(RMCPOverloadedError, match="queue is full"):
            await scheduler.acquire(lane)
        nursery.cancel_scope.cancel()


async def test_full_queue_waits_for_space_with_wait_policy(autojump_clock: trio.testing.MockClock) -> None:
    scheduler = Scheduler(max_concurrency=1, max_queue=1, overflow="wait")
    lane = scheduler.lane("s", 1)
    await scheduler.acquire(lane)
    admitted: list[str] = []

    async def caller(name: str) -> None:
        await scheduler.acquire(lane)
        admitted.append(name)
        scheduler.release(lane)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(caller, "queued")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(caller, "waiting-for-space")
        await trio.testing.wait_all_tasks_blocked()
        stats = scheduler.statistics()
        assert (stats.queued, stats.waiting_for_queue_space) == (1, 1)
        scheduler.release(lane)
    assert admitted == ["queued", "waiting-for-space"]


async def test_expired_waiter_leaves_the_queue_and_is_never_admitted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    scheduler = Scheduler(max_concurrency=1, max_queue=10)
    lane = scheduler.lane("s", 1)
    await scheduler.acquire(lane)
    admitted: list[str] = []

    async def caller(name: str, timeout: float) -> None:
        with trio.move_on_after(timeout):
            await scheduler.acquire(lane)
            admitted.append(name)
            scheduler.release(lane)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(caller, "expires", 1.0)
        nursery.start_soon(caller, "patient", 100.0)
        await trio.sleep(5)
        assert scheduler.statistics().queued == 1
        scheduler.release(lane)
    assert admitted == ["patient"]
    assert scheduler.statistics().running == 0


async def test_cancelled_waiter_frees_its_place_for_a_fast_path() -> None:
    scheduler = Scheduler(max_concurrency=1, max_queue=10)
    lane = scheduler.lane("s", 1)
    await scheduler.acquire(lane)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(scheduler.acquire, lane)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    scheduler.release(lane)
    # Only an abandoned waiter is left in the heap: the next caller must still get in.
    with trio.fail_after(1):
        await scheduler.acquire(lane)
    assert scheduler.statistics().running == 1


async def test_queue_space_is_passed_on_when_its_waiter_is_cancelled_as_it_wakes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Trio shuffles its run queue, so the race (the first space waiter woken and cancelled in
    # the same instant) is tried many times.
    for _ in range(40):
        scheduler = Scheduler(max_concurrency=1, max_queue=1)
        lane = scheduler.lane("s", 1)
        await scheduler.acquire(lane)
        async with trio.open_nursery() as outer:
            async with trio.open_nursery() as doomed:
                doomed.start_soon(scheduler.acquire, lane)  # queued
                await trio.testing.wait_all_tasks_blocked()
                doomed.start_soon(scheduler.acquire, lane)  # waits for queue space
                await trio.testing.wait_all_tasks_blocked()
                outer.start_soon(scheduler.acquire, lane)  # waits for queue space, behind it
                await trio.testing.wait_all_tasks_blocked()
                doomed.cancel_scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            stats = scheduler.statistics()
            assert (stats.queued, stats.waiting_for_queue_space) == (1, 0)
            outer.cancel_scope.cancel()


async def test_abandoned_waiters_free_their_heap_entries_while_the_lane_stays_saturated(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The lane never frees a slot, so nothing ever pops the heap from the top: entries of
    # calls that gave up (deadline or cancel) must still go, or memory grows past max_queue.
    scheduler = Scheduler(max_concurrency=1, max_queue=50, overflow="reject")
    lane = scheduler.lane("s", 1)
    await scheduler.acquire(lane)

    async def gives_up_after(seconds: float) -> None:
        with trio.move_on_after(seconds):
            await scheduler.acquire(lane)
            pytest.fail("admitted on a saturated lane")

    async with trio.open_nursery() as nursery:
        patient = trio.CancelScope()

        async def waits_forever() -> None:
            with patient:
                await scheduler.acquire(lane)
                scheduler.release(lane)

        nursery.start_soon(waits_forever)
        await trio.testing.wait_all_tasks_blocked()
        for wave in range(100):
            async with trio.open_nursery() as impatient:
                # A full queue of callers with deadlines, then one cancelled outright.
                for index in range(49):
                    impatient.start_soon(gives_up_after, 1.0 + index / 100)
                await trio.testing.wait_all_tasks_blocked()
                assert scheduler.statistics().queued == 50
                with pytest.raises(RMCPOverloadedError):
                    await scheduler.acquire(lane)
                if wave % 2:
                    impatient.cancel_scope.cancel()
            # Nothing but the one patient waiter is queued, and the heap says so.
            assert scheduler.statistics().queued == 1
            assert lane.footprint() <= 6 * scheduler.max_queue
        assert lane.footprint() <= 6
        patient.cancel()
    assert scheduler.statistics().queued == 0
    assert lane.footprint() == 0
    # The admission count is exact: the queue takes max_queue calls again, and they run in order.
    admitted: list[int] = []

    async def caller(index: int) -> None:
        await scheduler.acquire(lane)
        admitted.append(index)
        scheduler.release(lane)

    async with trio.open_nursery() as nursery:
        for index in range(50):
            nursery.start_soon(caller, index)
            await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(RMCPOverloadedError):
            await scheduler.acquire(lane)
        scheduler.release(lane)
    assert admitted == list(range(50))
    assert (scheduler.statistics().running, lane.footprint()) == (0, 0)


async def test_a_mass_abandonment_shrinks_the_heap_at_once(autojump_clock: trio.testing.MockClock) -> None:
    scheduler = Scheduler(max_concurrency=1, max_queue=100_000)
    lane = scheduler.lane("s", 1)
    await scheduler.acquire(lane)
    async with trio.open_nursery() as nursery:
        keep = trio.CancelScope()

        async def kept() -> None:
            with keep:
                await scheduler.acquire(lane)

        nursery.start_soon(kept)
        async with trio.open_nursery() as doomed:
            for _ in range(5_000):
                doomed.start_soon(scheduler.acquire, lane)
            await trio.testing.wait_all_tasks_blocked()
            assert lane.queued == 5_001
            doomed.cancel_scope.cancel()
        assert scheduler.statistics().queued == 1
        assert lane.footprint() <= 6
        keep.cancel()
    scheduler.release(lane)


async def _admission_order(
    scheduler: Scheduler, lane: Lane, groups: list[tuple[str | None, int, int]], hold_s: float = 1.0
) -> list[str | None]:
    """Queue ``count`` calls per (tenant, priority, count) group, in that order, behind a held
    slot; release it and return the tenants in the order they were admitted."""
    order: list[str | None] = []

    async def caller(tenant: str | None, priority: int) -> None:
        await scheduler.acquire(lane, priority, tenant=tenant)
        order.append(tenant)
        await trio.sleep(hold_s)
        scheduler.release(lane)

    await scheduler.acquire(lane)
    async with trio.open_nursery() as nursery:
        for tenant, priority, count in groups:
            for _ in range(count):
                nursery.start_soon(caller, tenant, priority)
            await trio.testing.wait_all_tasks_blocked()
        scheduler.release(lane)
    return order


async def test_a_small_tenant_is_not_stuck_behind_a_large_one(autojump_clock: trio.testing.MockClock) -> None:
    scheduler = Scheduler(max_concurrency=1, max_queue=10_000)
    lane = scheduler.lane("s", 1)
    order = await _admission_order(scheduler, lane, [("batch", 0, 1_000), ("interactive", 0, 10)])
    # Equal weights: the two take turns while both wait, so the 10 are done among the first 20.
    assert [index for index, tenant in enumerate(order) if tenant == "interactive"] == list(range(1, 20, 2))
    assert order[20:] == ["batch"] * 990
    assert scheduler.statistics().lanes[0].peak_running == 1


async def test_tenants_are_admitted_in_proportion_to_their_weights(
    autojump_clock: trio.testing.MockClock,
) -> None:
    scheduler = Scheduler(max_concurrency=1, max_queue=10_000, tenants={"gold": 3, "bronze": 1})
    lane = scheduler.lane("s", 1)
    # "unlisted" weighs 1, like "bronze"; calls without a tenant weigh 1 too.
    order = await _admission_order(
        scheduler, lane, [("gold", 0, 400), ("bronze", 0, 400), ("unlisted", 0, 400), (None, 0, 400)]
    )
    first = order[:600]
    counts = {tenant: first.count(tenant) for tenant in ("gold", "bronze", "unlisted", None)}
    assert counts["gold"] in range(299, 302)
    for tenant in ("bronze", "unlisted", None):
        assert counts[tenant] in range(99, 102)
    # In every window of 6 admissions while all wait, gold has 3 and each other tenant 1.
    for start in range(0, 600, 6):
        assert first[start : start + 6].count("gold") == 3


async def test_priority_comes_before_tenant_shares(autojump_clock: trio.testing.MockClock) -> None:
    scheduler = Scheduler(max_concurrency=1, max_queue=10_000, tenants={"big": 100})
    lane = scheduler.lane("s", 1)
    order = await _admission_order(scheduler, lane, [("big", 0, 20), ("small", 5, 3)], hold_s=0.01)
    assert order[:3] == ["small"] * 3


async def test_aging_lets_a_low_priority_call_through_a_steady_high_priority_stream(
    autojump_clock: trio.testing.MockClock,
) -> None:
    scheduler = Scheduler(max_concurrency=1, max_queue=10_000, priority_aging_s=5.0)
    lane = scheduler.lane("s", 1)
    admitted: list[tuple[str, float]] = []

    async def caller(name: str, priority: int) -> None:
        await scheduler.acquire(lane, priority)
        admitted.append((name, trio.current_time()))
        await trio.sleep(1)
        scheduler.release(lane)

    start = trio.current_time()
    with trio.fail_after(1_000):
        await scheduler.acquire(lane)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(caller, "low", 0)
            await trio.testing.wait_all_tasks_blocked()
            # A high-priority call arrives every second and each holds the slot for a second,
            # one ahead of the stream, so one is always waiting: without aging, the low one
            # would never run.
            nursery.start_soon(caller, "high-first", 3)
            for index in range(60):
                nursery.start_soon(caller, f"high{index}", 3)
                await trio.testing.wait_all_tasks_blocked()
                if index == 0:
                    scheduler.release(lane)
                await trio.sleep(1)
    names = [name for name, _ in admitted]
    low_at = dict(admitted)["low"] - start
    # Priority first: the high calls go ahead for a while. Aging: three levels in 15 s, the
    # fourth tie broken by age, so the low call runs after about 15 s, not after the stream.
    assert names.index("low") >= 10
    assert 14 <= low_at <= 17


async def test_a_tool_lane_limits_its_tool_without_blocking_the_others(
    autojump_clock: trio.testing.MockClock,
) -> None:
    scheduler = Scheduler(max_concurrency=100, max_queue=100)
    lane = scheduler.lane("s", 10)
    slow = scheduler.tool_lane(lane, "slow", 2)
    waited: dict[str, list[float]] = {"slow": [], "fast": []}
    peak_server = 0

    async def caller(tool: str) -> None:
        nonlocal peak_server
        tool_lane = slow if tool == "slow" else None
        waited[tool].append(await scheduler.acquire(lane, tool_lane=tool_lane))
        peak_server = max(peak_server, lane.running)
        await trio.sleep(10 if tool == "slow" else 1)
        scheduler.release(lane, tool_lane)

    async with trio.open_nursery() as nursery:
        for _ in range(6):
            nursery.start_soon(caller, "slow")
        await trio.testing.wait_all_tasks_blocked()
        for _ in range(4):
            nursery.start_soon(caller, "fast")
        await trio.testing.wait_all_tasks_blocked()
        stats = scheduler.statistics().lanes[0]
        assert (stats.running, stats.queued, stats.tools[0].running, stats.tools[0].queued) == (6, 0, 2, 4)
        assert scheduler.statistics().queued == 4
    assert (slow.peak_running, peak_server) == (2, 6)
    assert waited["fast"] == [0.0] * 4  # not queued behind the slow tool's waiters
    assert sorted(waited["slow"]) == [0.0, 0.0, 10.0, 10.0, 20.0, 20.0]
    assert (lane.running, slow.running, scheduler.statistics().queued) == (0, 0, 0)


async def test_a_call_needs_both_its_tool_slot_and_a_server_slot(
    autojump_clock: trio.testing.MockClock,
) -> None:
    scheduler = Scheduler(max_concurrency=100, max_queue=100)
    lane = scheduler.lane("s", 1)
    tool = scheduler.tool_lane(lane, "t", 5)
    await scheduler.acquire(lane)  # the server's only slot, held by another tool's call
    async with trio.open_nursery() as nursery:
        nursery.start_soon(scheduler.acquire, lane, 0, None, None, tool)
        await trio.testing.wait_all_tasks_blocked()
        # It holds its tool slot while it waits for the server.
        assert (tool.running, lane.queued) == (1, 1)
        nursery.cancel_scope.cancel()
    # Cancelled while waiting for the server: the tool slot is given back.
    assert (tool.running, lane.queued, lane.running) == (0, 0, 1)
    scheduler.release(lane)


async def test_tenant_and_priority_state_goes_with_the_waiters(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Tenant names come from callers: a saturated lane that sees a million names over its life
    # must keep only what its waiting calls need.
    scheduler = Scheduler(max_concurrency=1, max_queue=1_000)
    lane = scheduler.lane("s", 1)
    await scheduler.acquire(lane)

    async def gives_up(tenant: str, priority: int) -> None:
        with trio.move_on_after(1):
            await scheduler.acquire(lane, priority, tenant=tenant)

    async with trio.open_nursery() as nursery:
        keep = trio.CancelScope()

        async def kept() -> None:
            with keep:
                await scheduler.acquire(lane, tenant="patient")

        nursery.start_soon(kept)
        for wave in range(20):
            async with trio.open_nursery() as wave_nursery:
                for index in range(100):
                    wave_nursery.start_soon(gives_up, f"tenant-{wave}-{index}", index % 7)
                await trio.testing.wait_all_tasks_blocked()
                assert scheduler.statistics().lanes[0].tenants_waiting == 101
            stats = scheduler.statistics().lanes[0]
            assert (stats.queued, stats.tenants_waiting) == (1, 1)
            assert lane.footprint() <= 6
        keep.cancel()
    assert lane.footprint() == 0
    scheduler.release(lane)
    # Served calls leave nothing behind either.
    order = await _admission_order(scheduler, lane, [(f"t{index}", index % 3, 1) for index in range(300)])
    assert len(order) == 300
    assert (lane.footprint(), lane.queued, lane.running) == (0, 0, 0)


def _holding(lane: Lane, tool: str, parent: Holding | None = None, tool_lane: Lane | None = None) -> Holding:
    return Holding(lane, tool_lane, tool, parent)


async def test_a_nested_call_that_needs_its_ancestors_slot_raises_at_once() -> None:
    scheduler = Scheduler(max_concurrency=10, max_queue=10)
    lane = scheduler.lane("s", 1)
    await scheduler.acquire(lane)
    token = current_holding.set(_holding(lane, "outer"))
    try:
        with trio.fail_after(1), pytest.raises(RMCPDeadlockError, match="s/outer") as raised:
            await scheduler.acquire(lane)
    finally:
        current_holding.reset(token)
    error = raised.value
    assert (error.lane, error.chain, error.may_have_executed) == ("server 's'", ("s/outer",), False)
    assert "servers.s.max_concurrency" in error.message
    assert (lane.queued, lane.running) == (0, 1)
    scheduler.release(lane)


async def test_a_deadlock_through_a_chain_of_nested_calls_names_the_chain() -> None:
    scheduler = Scheduler(max_concurrency=10, max_queue=10)
    lane = scheduler.lane("s", 2)
    other = scheduler.lane("o", 5)
    for used in (lane, other, lane):
        await scheduler.acquire(used)
    chain = _holding(lane, "c", _holding(other, "b", _holding(lane, "a")))
    token = current_holding.set(chain)
    try:
        with pytest.raises(RMCPDeadlockError) as raised:
            await scheduler.acquire(lane)
    finally:
        current_holding.reset(token)
    assert raised.value.chain == ("s/a", "o/b", "s/c")
    assert "2 slot(s) of server 's'" in raised.value.message


async def test_a_nested_call_deadlocked_on_a_tool_lane_or_the_runtime_raises() -> None:
    scheduler = Scheduler(max_concurrency=2, max_queue=10)
    lane = scheduler.lane("s", 5)
    tool = scheduler.tool_lane(lane, "t", 1)
    await scheduler.acquire(lane, tool_lane=tool)
    token = current_holding.set(_holding(lane, "t", tool_lane=tool))
    try:
        with pytest.raises(RMCPDeadlockError, match=r"servers\.s\.tools\.t\.max_concurrency") as raised:
            await scheduler.acquire(lane, tool_lane=tool)
        assert raised.value.lane == "tool 's/t'"
        assert (tool.running, tool.queued, lane.running) == (1, 0, 1)
        # The runtime's two slots: the ancestor's and a nested call's on another server.
        other = scheduler.lane("o", 5)
        await scheduler.acquire(other)
        inner = current_holding.set(_holding(other, "u", current_holding.get()))
        try:
            with pytest.raises(RMCPDeadlockError, match=r"runtime\.max_concurrency") as raised:
                await scheduler.acquire(scheduler.lane("third", 5))
            assert raised.value.lane == "the runtime"
        finally:
            current_holding.reset(inner)
        scheduler.release(other)
    finally:
        current_holding.reset(token)
    scheduler.release(lane, tool)
    assert scheduler.statistics().running == 0


async def test_no_deadlock_is_reported_while_another_caller_holds_a_slot(
    autojump_clock: trio.testing.MockClock,
) -> None:
    scheduler = Scheduler(max_concurrency=10, max_queue=10)
    lane = scheduler.lane("s", 2)
    await scheduler.acquire(lane)  # the ancestor's slot
    ancestor = _holding(lane, "outer")
    admitted: list[float] = []

    async def unrelated() -> None:
        await scheduler.acquire(lane)
        await trio.sleep(3)
        scheduler.release(lane)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(unrelated)
        await trio.testing.wait_all_tasks_blocked()
        token = current_holding.set(ancestor)
        try:
            # Waits for the unrelated call, which will finish: not a deadlock.
            admitted.append(await scheduler.acquire(lane))
        finally:
            current_holding.reset(token)
    assert admitted == [3.0]
    scheduler.release(lane)  # the nested call's
    scheduler.release(lane)  # the ancestor's
    # A call that released its slots (a task that outlived it kept its context) is no ancestor.
    await scheduler.acquire(lane)
    ancestor.active = False
    async with trio.open_nursery() as nursery:
        nursery.start_soon(unrelated)
        await trio.testing.wait_all_tasks_blocked()
        token = current_holding.set(ancestor)
        try:
            with trio.move_on_after(1) as waited:
                await scheduler.acquire(lane)
            assert waited.cancelled_caught
        finally:
            current_holding.reset(token)
    scheduler.release(lane)


async def test_a_server_added_again_brings_its_own_tool_lanes(autojump_clock: trio.testing.MockClock) -> None:
    scheduler = Scheduler(max_concurrency=10, max_queue=10)
    lane = scheduler.lane("s", 5)
    old_tool = scheduler.tool_lane(lane, "t", 1)
    await scheduler.acquire(lane, tool_lane=old_tool)
    scheduler.retire(lane)  # removed while a call runs on it
    again = scheduler.lane("s", 5)
    assert again is lane
    assert lane.tools == {}  # the new tool table has no lane for "t"
    with trio.fail_after(1):
        await scheduler.acquire(lane, tool_lane=lane.tools.get("t"))
    scheduler.release(lane)
    scheduler.release(lane, old_tool)  # the old call leaves its old tool lane
    assert (lane.running, old_tool.running) == (0, 0)


async def test_review1_a_call_holding_its_tool_slot_never_waits_for_queue_space(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # review1: a call granted its tool slot from the tool's queue then found the server full
    # and waited for queue space, holding the tool slot, while the queue was full of calls
    # waiting for that very slot: nothing could ever free space, even once the server was free.
    scheduler = Scheduler(max_concurrency=10, max_queue=1, overflow="wait")
    lane = scheduler.lane("s", 1)
    tool = scheduler.tool_lane(lane, "t", 1)
    await scheduler.acquire(lane, tool_lane=tool)  # A holds the tool's slot and the server's
    admitted: list[str] = []

    async def x() -> None:
        await scheduler.acquire(lane, tool_lane=tool)
        admitted.append("x")
        scheduler.release(lane, tool)

    async def driver() -> None:
        # A ends; before X wakes, another tool's call P takes the server's slot and Y queues
        # for the tool's slot (X holds it now), filling the queue.
        scheduler.release(lane, tool)
        await scheduler.acquire(lane)
        with trio.move_on_after(50):
            await scheduler.acquire(lane, tool_lane=tool)
            admitted.append("y")
            scheduler.release(lane, tool)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(x)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(driver)
        await trio.testing.wait_all_tasks_blocked()
        scheduler.release(lane)  # P ends: the server is free
        await trio.sleep(10)
        assert admitted[:1] == ["x"]
    assert admitted == ["x", "y"]
    assert (lane.running, tool.running, scheduler.statistics().queued) == (0, 0, 0)


async def test_review1_a_removed_servers_lane_stays_while_a_call_waits_on_its_tool_lane(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The server is removed while a call waits for its tool's slot. The lane must not be
    # forgotten before that call leaves: once it has the tool slot it may have to queue on the
    # server's lane, and a forgotten lane is never dispatched.
    scheduler = Scheduler(max_concurrency=1, max_queue=10)
    lane = scheduler.lane("s", 2)
    other = scheduler.lane("other", 1)
    tool = scheduler.tool_lane(lane, "t", 1)
    await scheduler.acquire(lane, tool_lane=tool)  # D
    admitted: list[str] = []

    async def c() -> None:
        await scheduler.acquire(lane, tool_lane=tool)
        admitted.append("c")
        scheduler.release(lane, tool)

    async def driver() -> None:
        scheduler.release(lane, tool)  # D ends: C gets the tool slot
        await scheduler.acquire(other)  # X takes the runtime's only slot before C runs
        await trio.sleep(1)
        scheduler.release(other)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(c)
        await trio.testing.wait_all_tasks_blocked()
        scheduler.retire(lane)
        nursery.start_soon(driver)
        with trio.fail_after(10):
            while not admitted:
                await trio.sleep(0.5)
    assert scheduler.statistics().lanes == (other.statistics(),)  # the removed lane went after


async def test_review1_a_removed_servers_lane_goes_when_its_last_tool_waiter_gives_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    scheduler = Scheduler(max_concurrency=4, max_queue=10)
    lane = scheduler.lane("s", 2)
    tool = scheduler.tool_lane(lane, "t", 1)
    await scheduler.acquire(lane, tool_lane=tool)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(scheduler.acquire, lane, 0, None, None, tool)
        await trio.testing.wait_all_tasks_blocked()
        scheduler.retire(lane)
        scheduler.release(lane, tool)  # the waiter gets the tool slot, then the server's
        await trio.testing.wait_all_tasks_blocked()
        assert [stats.name for stats in scheduler.statistics().lanes] == ["s"]
        scheduler.release(lane, tool)
    assert scheduler.statistics().lanes == ()
    lane = scheduler.lane("s", 1)
    tool = scheduler.tool_lane(lane, "t", 1)
    await scheduler.acquire(lane, tool_lane=tool)
    with trio.move_on_after(1):  # gives up while waiting for the tool slot
        await scheduler.acquire(lane, tool_lane=tool)
    scheduler.retire(lane)
    assert [stats.name for stats in scheduler.statistics().lanes] == ["s"]
    scheduler.release(lane, tool)
    assert scheduler.statistics().lanes == ()
