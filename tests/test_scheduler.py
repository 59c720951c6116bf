"""The admission scheduler on its own: priorities, limits, overflow, deadlines (MockClock)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from rmcp_actors import RMCPOverloadedError
from rmcp_actors.flow.scheduler import Scheduler


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
            assert len(lane.waiters) <= 2 * scheduler.max_queue
        assert len(lane.waiters) <= 2
        patient.cancel()
    assert scheduler.statistics().queued == 0
    assert len(lane.waiters) <= 1
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
    assert (scheduler.statistics().running, len(lane.waiters)) == (0, 0)


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
            assert len(lane.waiters) == 5_001
            doomed.cancel_scope.cancel()
        assert scheduler.statistics().queued == 1
        assert len(lane.waiters) <= 2
        keep.cancel()
    scheduler.release(lane)
