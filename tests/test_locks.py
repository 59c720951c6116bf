"""The lock manager on its own: shared and exclusive locks, fairness, upgrades, deadlines,
cancellation, deadlock detection in the wait-for graph, and what the watchdog shows (MockClock)."""

from __future__ import annotations

import functools
import math

import hypothesis
import hypothesis.strategies as st
import pytest
import trio
import trio.testing

from rmcp_actors import RMCPDeadlockError, RMCPTimeoutError
from rmcp_actors.runtime import ComponentRegistry, WaitEdge, Watchdog, WorkRegistry
from rmcp_actors.runtime.watchdog import CheckNow, StallReport
from rmcp_actors.transactions.locks import LockManager, LockOwner

# Generous next to every wait in these tests: a hang fails the test instead of blocking it.
GUARD_S = 1000.0


def owners(manager: LockManager, *names: str) -> list[LockOwner]:
    """Owners started in the order given (the last is the youngest)."""
    return [manager.owner(f"{name}-id", name) for name in names]


async def hold_then_wait(
    manager: LockManager,
    owner: LockOwner,
    first: str,
    second: str,
    outcomes: dict[str, object],
    delay_s: float = 1.0,
) -> None:
    """A transaction: lock ``first``, work, lock ``second``, then end (releasing both)."""
    try:
        await manager.acquire(owner, first)
        await trio.sleep(delay_s)
        await manager.acquire(owner, second)
        await trio.sleep(1)
        outcomes[owner.name] = "committed"
    except RMCPDeadlockError as error:
        outcomes[owner.name] = error
    finally:
        manager.release_all(owner)


async def test_opposite_order_fails_the_youngest_and_the_other_commits(
    autojump_clock: trio.testing.MockClock,
) -> None:
    manager = LockManager()
    a, b = owners(manager, "a", "b")
    outcomes: dict[str, object] = {}
    with trio.fail_after(GUARD_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hold_then_wait, manager, a, "r1", "r2", outcomes)
            nursery.start_soon(hold_then_wait, manager, b, "r2", "r1", outcomes)
    assert outcomes["a"] == "committed"
    error = outcomes["b"]
    assert isinstance(error, RMCPDeadlockError)
    assert error.lane == "resource 'r1'"
    assert error.chain == ("b-id", "a-id")
    assert not error.may_have_executed
    assert "transaction 'b' (b-id) started last of the 2 transactions" in str(error)
    assert "resources=" in str(error)
    stats = manager.statistics()
    assert (stats.deadlocks, stats.resources, stats.waiting) == (1, 0, 0)


async def test_the_youngest_fails_even_when_an_older_one_closes_the_cycle(
    autojump_clock: trio.testing.MockClock,
) -> None:
    manager = LockManager()
    a, b = owners(manager, "a", "b")
    outcomes: dict[str, object] = {}
    with trio.fail_after(GUARD_S):
        async with trio.open_nursery() as nursery:
            # b waits for r1 first; a's request for r2 closes the cycle a second later.
            nursery.start_soon(hold_then_wait, manager, a, "r1", "r2", outcomes, 2.0)
            nursery.start_soon(hold_then_wait, manager, b, "r2", "r1", outcomes, 1.0)
            await trio.sleep(1.5)
            assert [edge.waiter for edge in manager.wait_edges()] == [b.label]
    assert outcomes["a"] == "committed"
    assert isinstance(outcomes["b"], RMCPDeadlockError)


async def test_three_way_cycle_fails_only_the_youngest(autojump_clock: trio.testing.MockClock) -> None:
    manager = LockManager()
    a, b, c = owners(manager, "a", "b", "c")
    outcomes: dict[str, object] = {}
    with trio.fail_after(GUARD_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hold_then_wait, manager, a, "r1", "r2", outcomes)
            nursery.start_soon(hold_then_wait, manager, c, "r3", "r1", outcomes, 3.0)
            nursery.start_soon(hold_then_wait, manager, b, "r2", "r3", outcomes, 2.0)
    assert outcomes["a"] == outcomes["b"] == "committed"
    error = outcomes["c"]
    assert isinstance(error, RMCPDeadlockError)
    assert error.lane == "resource 'r1'"
    assert error.chain == ("c-id", "a-id", "b-id")
    assert "3 transactions" in str(error)
    assert manager.statistics().deadlocks == 1


async def test_shared_locks_coexist_and_exclusive_waits_for_them(
    autojump_clock: trio.testing.MockClock,
) -> None:
    manager = LockManager()
    a, b, c = owners(manager, "a", "b", "c")
    assert await manager.acquire(a, "r", shared=True) == 0.0
    assert await manager.acquire(b, "r", shared=True) == 0.0
    waited: list[float] = []

    async def writer() -> None:
        waited.append(await manager.acquire(c, "r"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        await trio.sleep(3)
        assert {(edge.waiter, edge.holder) for edge in manager.wait_edges()} == {
            (c.label, a.label),
            (c.label, b.label),
        }
        manager.release_all(a)
        await trio.sleep(1)
        assert not waited  # b still reads
        manager.release_all(b)
    assert waited == [4.0]
    assert c.held == {"r": "exclusive"}
    stats = manager.statistics()
    assert (stats.granted_at_once, stats.granted_after_wait) == (2, 1)


async def test_reacquire_by_the_holder_returns_at_once() -> None:
    manager = LockManager()
    (a,) = owners(manager, "a")
    await manager.acquire(a, "x")
    assert await manager.acquire(a, "x") == 0.0
    assert await manager.acquire(a, "x", shared=True) == 0.0
    await manager.acquire(a, "s", shared=True)
    assert await manager.acquire(a, "s", shared=True) == 0.0
    assert a.held == {"x": "exclusive", "s": "shared"}
    assert manager.statistics().granted_at_once == 2
    manager.release_all(a)
    assert a.held == {}
    assert manager.statistics().resources == 0


async def test_readers_do_not_pass_a_waiting_writer_and_are_granted_together(
    autojump_clock: trio.testing.MockClock,
) -> None:
    manager = LockManager()
    holder, writer, reader1, reader2, writer2, reader3 = owners(manager, "h", "w", "r1", "r2", "w2", "r3")
    order: list[str] = []

    async def take(owner: LockOwner, shared: bool) -> None:
        await manager.acquire(owner, "r", shared=shared)
        order.append(owner.name)

    await manager.acquire(holder, "r", shared=True)
    async with trio.open_nursery() as nursery:
        # The writer waits for the reader holding it; a later reader queues behind the writer
        # though it is compatible with the holder: readers cannot starve a writer.
        for owner, shared in (
            (writer, False),
            (reader1, True),
            (reader2, True),
            (writer2, False),
            (reader3, True),
        ):
            nursery.start_soon(take, owner, shared)
            await trio.testing.wait_all_tasks_blocked()
        assert order == []
        manager.release_all(holder)
        await trio.testing.wait_all_tasks_blocked()
        assert order == ["w"]
        manager.release_all(writer)
        await trio.testing.wait_all_tasks_blocked()
        # The run of readers at the head goes together; the reader behind the next writer waits.
        assert order[0] == "w"
        assert sorted(order[1:]) == ["r1", "r2"]
        manager.release_all(reader1)
        manager.release_all(reader2)
        await trio.testing.wait_all_tasks_blocked()
        assert order[3:] == ["w2"]
        manager.release_all(writer2)
    assert order[3:] == ["w2", "r3"]


async def test_upgrade_goes_ahead_of_waiters(autojump_clock: trio.testing.MockClock) -> None:
    manager = LockManager()
    a, b, c = owners(manager, "a", "b", "c")
    (solo,) = owners(manager, "solo")
    await manager.acquire(solo, "alone", shared=True)
    assert await manager.acquire(solo, "alone") == 0.0  # the only holder upgrades at once
    assert solo.held == {"alone": "exclusive"}
    await manager.acquire(a, "r", shared=True)
    await manager.acquire(b, "r", shared=True)
    order: list[str] = []

    async def take(owner: LockOwner) -> None:
        await manager.acquire(owner, "r")
        order.append(owner.name)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(take, c)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(take, a)  # a upgrades: c waits for a anyway, so a goes first
        await trio.testing.wait_all_tasks_blocked()
        manager.release_all(b)
        await trio.testing.wait_all_tasks_blocked()
        assert order == ["a"]
        assert a.held == {"r": "exclusive"}
        manager.release_all(a)
    assert order == ["a", "c"]


async def test_two_upgraders_deadlock_and_the_youngest_fails(autojump_clock: trio.testing.MockClock) -> None:
    manager = LockManager()
    a, b = owners(manager, "a", "b")
    await manager.acquire(a, "r", shared=True)
    await manager.acquire(b, "r", shared=True)
    with trio.fail_after(GUARD_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(manager.acquire, a, "r")
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(RMCPDeadlockError) as caught:
                await manager.acquire(b, "r")
            assert caught.value.chain == ("b-id", "a-id")
            assert b.held == {"r": "shared"}  # kept until its transaction ends
            manager.release_all(b)
    assert a.held == {"r": "exclusive"}


async def test_wait_without_deadline_times_out_after_lock_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    manager = LockManager(lock_timeout_s=5.0)
    a, b = owners(manager, "a", "b")
    await manager.acquire(a, "r")
    start = trio.current_time()
    with pytest.raises(RMCPTimeoutError) as caught:
        await manager.acquire(b, "r")
    assert trio.current_time() - start == 5.0
    assert "waits for transaction 'a' (a-id)" in str(caught.value)
    assert "transactions.lock_timeout_s" in str(caught.value)
    assert not caught.value.may_have_executed
    with pytest.raises(RMCPTimeoutError):
        await manager.acquire(b, "r", timeout=1.0)
    assert trio.current_time() - start == 6.0
    stats = manager.statistics()
    assert (stats.timeouts, stats.waiting) == (2, 0)
    assert manager.wait_edges() == []


async def test_wait_honours_the_callers_deadline_too(autojump_clock: trio.testing.MockClock) -> None:
    manager = LockManager(lock_timeout_s=5.0)
    a, b = owners(manager, "a", "b")
    await manager.acquire(a, "r")
    # A shorter deadline of the caller's ends the wait as the caller's own timeout.
    with pytest.raises(trio.TooSlowError), trio.fail_after(2):
        await manager.acquire(b, "r")
    assert manager.statistics().waiting == 0
    # With no limit of its own, the wait lasts as long as the caller lets it: the lock freed
    # at 50 s is granted.
    async with trio.open_nursery() as nursery:

        async def release_later() -> None:
            await trio.sleep(50)
            manager.release_all(a)

        nursery.start_soon(release_later)
        with trio.fail_after(100):
            assert await manager.acquire(b, "r", timeout=math.inf) == 50.0
    assert b.held == {"r": "exclusive"}


async def test_cancelled_waiter_leaves_the_graph_and_unblocks_those_behind(
    autojump_clock: trio.testing.MockClock,
) -> None:
    manager = LockManager()
    a, b, c = owners(manager, "a", "b", "c")
    await manager.acquire(a, "r", shared=True)
    granted: list[str] = []

    async def take(owner: LockOwner, shared: bool) -> None:
        await manager.acquire(owner, "r", shared=shared)
        granted.append(owner.name)

    writer_scope = trio.CancelScope()

    async def writer() -> None:
        with writer_scope:
            await take(b, False)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(take, c, True)  # compatible with a, but queued behind the writer
        await trio.testing.wait_all_tasks_blocked()
        assert granted == []
        assert {edge.waiter for edge in manager.wait_edges()} == {b.label, c.label}
        writer_scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        # The reader queued behind the cancelled writer is granted beside the holder.
        assert granted == ["c"]
        assert manager.wait_edges() == []
    assert b.held == {}


async def test_watchdog_report_shows_the_wait_for_graph(autojump_clock: trio.testing.MockClock) -> None:
    manager = LockManager()
    work, components = WorkRegistry(), ComponentRegistry()
    unwatch = manager.watch(work)
    components.register("locks", "locks", manager.statistics)
    watchdog = Watchdog("watchdog", work, components, stall_s=4.0)
    a, b, c = owners(manager, "a", "b", "c")
    await manager.acquire(a, "account:1")
    async with trio.open_nursery() as nursery:
        await nursery.start(watchdog.run)
        nursery.start_soon(manager.acquire, b, "account:1")
        await trio.sleep(1)
        nursery.start_soon(functools.partial(manager.acquire, c, "account:1", shared=True))
        await trio.sleep(9)
        report = await watchdog.ask(CheckNow)
        assert isinstance(report, StallReport)
        # Oldest wait first.
        assert report.waits[0] == WaitEdge(b.label, a.label, "resource 'account:1'", "exclusive", 10.0)
        assert {(edge.waiter, edge.holder) for edge in report.waits} == {
            (b.label, a.label),
            (c.label, a.label),
            (c.label, b.label),
        }
        text = report.describe()
        assert "waits for (who waits for whom):" in text
        assert (
            "transaction 'b' (b-id) waits for transaction 'a' (a-id) on resource 'account:1' (exclusive)"
            in text
        )
        assert "locks/resource 'account:1'" in text  # the waits are work in flight
        manager.release_all(a)
        manager.release_all(b)
        await trio.sleep(1)
        assert await watchdog.ask(CheckNow) is None  # grants are progress
        nursery.cancel_scope.cancel()
    unwatch()
    assert work.owners() == ()
    assert work.waits() == ()


async def test_a_wait_provider_that_raises_is_left_out_of_the_report() -> None:
    work = WorkRegistry()

    def broken() -> list[WaitEdge]:
        raise RuntimeError("bug")

    untrack = work.track_waits(broken)
    work.track_waits(lambda: [WaitEdge("w", "h", "r", "shared", 1.0)])
    assert [edge.waiter for edge in work.waits()] == ["w"]
    untrack()
    untrack()


# A step: transaction i locks resource r (shared or not), or ends (releases everything).
_steps = st.lists(
    st.tuples(
        st.integers(0, 3),
        st.one_of(st.tuples(st.integers(0, 2), st.booleans()), st.none()),
    ),
    max_size=40,
)


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(_steps)
def test_random_locking_never_hangs_and_never_keeps_a_cycle(
    steps: list[tuple[int, tuple[int, bool] | None]],
) -> None:
    trio.run(_locking_scenario, steps, clock=trio.testing.MockClock(autojump_threshold=0))


async def _locking_scenario(steps: list[tuple[int, tuple[int, bool] | None]]) -> None:
    manager = LockManager(lock_timeout_s=1e9)
    transactions = owners(manager, "t0", "t1", "t2", "t3")
    waiting = [False] * len(transactions)

    async def acquire(index: int, resource: str, shared: bool) -> None:
        try:
            await manager.acquire(transactions[index], resource, shared=shared)
        except RMCPDeadlockError:
            manager.release_all(transactions[index])  # it aborts, as a transaction would
        waiting[index] = False

    with trio.fail_after(GUARD_S):
        async with trio.open_nursery() as nursery:
            for index, step in steps:
                if waiting[index]:
                    continue  # a transaction does one thing at a time
                if step is None:
                    manager.release_all(transactions[index])
                else:
                    waiting[index] = True
                    nursery.start_soon(acquire, index, f"r{step[0]}", not step[1])
                await trio.testing.wait_all_tasks_blocked()
                _check_invariants(manager, transactions, waiting)
            # Every transaction that is not waiting ends; the waiters must then all get through.
            while any(waiting):
                before = list(waiting)
                for index, owner in enumerate(transactions):
                    if not waiting[index]:
                        manager.release_all(owner)
                await trio.testing.wait_all_tasks_blocked()
                _check_invariants(manager, transactions, waiting)
                assert waiting != before, "waiters made no progress once everyone else ended"
    for owner in transactions:
        manager.release_all(owner)
    assert manager.statistics().resources == 0


def _check_invariants(manager: LockManager, transactions: list[LockOwner], waiting: list[bool]) -> None:
    edges = manager.wait_edges()
    graph: dict[str, set[str]] = {}
    for edge in edges:
        graph.setdefault(edge.waiter, set()).add(edge.holder)
    assert not _has_cycle(graph), f"a cycle was left: {[edge.describe() for edge in edges]}"
    # Exactly the transactions waiting have edges: nobody waits without a reason to (a lost
    # wake-up), and no edge is left behind by one that stopped waiting.
    assert set(graph) == {owner.label for owner, busy in zip(transactions, waiting, strict=True) if busy}
    # Holders are compatible: an exclusive holder is alone.
    holders: dict[str, list[str]] = {}
    for owner in transactions:
        for resource, mode in owner.held.items():
            holders.setdefault(resource, []).append(mode)
    for modes in holders.values():
        assert modes == ["exclusive"] or set(modes) == {"shared"}


def _has_cycle(graph: dict[str, set[str]]) -> bool:
    done: set[str] = set()
    active: set[str] = set()

    def visit(node: str) -> bool:
        if node in active:
            return True
        if node in done:
            return False
        active.add(node)
        found = any(visit(target) for target in graph.get(node, ()))
        active.discard(node)
        done.add(node)
        return found

    return any(visit(node) for node in list(graph))


def test_has_cycle_helper_sees_cycles() -> None:
    assert _has_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}})
    assert not _has_cycle({"a": {"b"}, "b": {"c"}})


async def test_release_all_fails_a_request_still_waiting(autojump_clock: trio.testing.MockClock) -> None:
    manager = LockManager()
    a, b = owners(manager, "a", "b")
    await manager.acquire(a, "r")
    await manager.acquire(b, "q")
    async with trio.open_nursery() as nursery:

        async def waits() -> None:
            with pytest.raises(RuntimeError, match="released its locks while this request waited"):
                await manager.acquire(b, "r")

        nursery.start_soon(waits)
        await trio.testing.wait_all_tasks_blocked()
        manager.release_all(b)
    assert b.held == {}
    assert manager.wait_edges() == []
    assert a.held == {"r": "exclusive"}


async def test_the_youngest_is_the_one_that_started_last(autojump_clock: trio.testing.MockClock) -> None:
    manager = LockManager()
    # Made an owner first, but its transaction started later: it is the younger one.
    late = manager.owner("late-id", "late", started_at=trio.current_time() + 5)
    early = manager.owner("early-id", "early", started_at=trio.current_time())
    outcomes: dict[str, object] = {}
    with trio.fail_after(GUARD_S):
        async with trio.open_nursery() as nursery:
            # The older one closes the cycle; by the order of owners it would be the victim.
            nursery.start_soon(hold_then_wait, manager, early, "r1", "r2", outcomes, 2.0)
            nursery.start_soon(hold_then_wait, manager, late, "r2", "r1", outcomes)
    assert outcomes["early"] == "committed"
    assert isinstance(outcomes["late"], RMCPDeadlockError)
