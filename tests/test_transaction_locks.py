"""Transactions holding resources against a real MCP server in memory (RMCP installed): deadlocks
fail the youngest, which compensates while the others commit; declared resources; deadlines;
the watchdog's report (MockClock, every wait under a fail_after guard)."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing
from mcp.server.mcpserver import MCPServer
from mcp_test_server import State

from rmcp_actors import (
    Compensation,
    RMCPConfig,
    RMCPDeadlockError,
    RMCPSupervisor,
    RMCPTimeoutError,
    RMCPTransactionError,
    RuntimeSettings,
    ServerSpec,
    StallReport,
    TransactionState,
)
from rmcp_actors.config import TransactionSettings
from rmcp_actors.transactions.locks import LockManagerStatistics

# Far beyond every wait here: a hang fails the test instead of blocking the run.
GUARD_S = 1000.0


def step(label: str) -> tuple[dict[str, Any], Compensation]:
    """A step's arguments and its compensation: ``record(label)`` undone by ``record(undo label)``."""
    return {"label": label}, Compensation("test", "record", {"label": f"undo {label}"})


def lock_waits(sup: RMCPSupervisor) -> int:
    """Requests waiting for a lock, as ``sup.health()`` shows the lock manager."""
    statistics = sup.health().component("locks", "locks").statistics
    assert isinstance(statistics, LockManagerStatistics)
    return statistics.waiting


async def transfer(
    sup: RMCPSupervisor,
    name: str,
    first: str,
    second: str,
    outcomes: dict[str, object],
    delay_s: float = 1.0,
) -> None:
    """Lock ``first``, record a step, work, lock ``second``, record a step, commit."""
    tx = sup.transaction(name)
    try:
        async with tx:
            await tx.acquire(first)
            arguments, undo = step(f"{name}:1")
            await tx.call("test", "record", arguments, compensate=undo)
            await trio.sleep(delay_s)
            await tx.acquire(second)
            arguments, undo = step(f"{name}:2")
            await tx.call("test", "record", arguments, compensate=undo)
        outcomes[name] = tx.state
    except RMCPDeadlockError as error:
        outcomes[name] = (error, tx.state)


async def test_opposite_order_one_deadlock_one_commit(
    rmcp_server: MCPServer, state: State, autojump_clock: trio.testing.MockClock
) -> None:
    outcomes: dict[str, object] = {}
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("test", rmcp_server))
        with trio.fail_after(GUARD_S):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(transfer, sup, "a", "account:1", "account:2", outcomes)
                await trio.sleep(0.1)  # b starts last: the youngest
                nursery.start_soon(transfer, sup, "b", "account:2", "account:1", outcomes)
    assert outcomes["a"] is TransactionState.COMMITTED
    error, b_state = outcomes["b"]  # type: ignore[misc]
    assert isinstance(error, RMCPDeadlockError)
    assert b_state is TransactionState.COMPENSATED
    assert error.lane == "resource 'account:1'"
    assert len(error.chain) == 2
    # b's step was undone before a took account:2 (held by b until its compensation ended).
    assert state.ledger == ["a:1", "b:1", "undo b:1", "a:2"]


async def test_three_way_cycle_only_the_youngest_compensates(
    rmcp_server: MCPServer, state: State, autojump_clock: trio.testing.MockClock
) -> None:
    outcomes: dict[str, object] = {}
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("test", rmcp_server))
        with trio.fail_after(GUARD_S):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(transfer, sup, "a", "r1", "r2", outcomes, 1.0)
                await trio.sleep(0.1)
                nursery.start_soon(transfer, sup, "b", "r2", "r3", outcomes, 2.0)
                await trio.sleep(0.1)
                nursery.start_soon(transfer, sup, "c", "r3", "r1", outcomes, 3.0)
    assert outcomes["a"] is outcomes["b"] is TransactionState.COMMITTED
    error, c_state = outcomes["c"]  # type: ignore[misc]
    assert isinstance(error, RMCPDeadlockError)
    assert c_state is TransactionState.COMPENSATED
    assert len(error.chain) == 3
    assert sorted(state.ledger) == sorted(["a:1", "b:1", "c:1", "undo c:1", "b:2", "a:2"])
    assert state.ledger.index("undo c:1") < state.ledger.index("b:2") < state.ledger.index("a:2")


async def test_declared_resources_are_taken_in_one_order(
    rmcp_server: MCPServer, state: State, autojump_clock: trio.testing.MockClock
) -> None:
    committed: list[str] = []

    async def run(sup: RMCPSupervisor, name: str, resources: list[str]) -> None:
        async with sup.transaction(name, resources=resources) as tx:
            arguments, undo = step(f"{name}:1")
            await tx.call("test", "record", arguments, compensate=undo)
            await trio.sleep(1)
            arguments, undo = step(f"{name}:2")
            await tx.call("test", "record", arguments, compensate=undo)
        committed.append(name)

    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("test", rmcp_server))
        with trio.fail_after(GUARD_S):
            async with trio.open_nursery() as nursery:
                # While account:1 is held, a waits for it; b, declared in the opposite order,
                # would take account:2 and then wait for account:1 behind a, which would then
                # wait for account:2: a deadlock. Taken sorted, b waits for account:1 first,
                # holding nothing, and the two run one after the other.
                async with sup.transaction("holder", resources=["account:1"]):
                    nursery.start_soon(run, sup, "a", ["account:1", "account:2"])
                    await trio.sleep(0.1)
                    nursery.start_soon(run, sup, "b", ["account:2", "account:1"])
                    await trio.sleep(0.1)
    assert committed == ["a", "b"]
    assert state.ledger == ["a:1", "a:2", "b:1", "b:2"]


async def test_lock_wait_without_deadline_times_out_and_compensates(
    rmcp_server: MCPServer, state: State, autojump_clock: trio.testing.MockClock
) -> None:
    config = RMCPConfig(transactions=TransactionSettings(lock_timeout_s=5.0))
    async with RMCPSupervisor.open(config) as sup:
        await sup.add_server(ServerSpec.in_memory("test", rmcp_server))
        tx = sup.transaction("waiter")

        async def waiter() -> None:
            async with tx:
                arguments, undo = step("waiter:1")
                await tx.call("test", "record", arguments, compensate=undo)
                await tx.acquire("r")

        async with sup.transaction("holder", resources=["r"]):
            with trio.fail_after(GUARD_S), pytest.raises(RMCPTimeoutError, match="lock_timeout_s"):
                await waiter()
        assert tx.state is TransactionState.COMPENSATED
    assert state.ledger == ["waiter:1", "undo waiter:1"]


async def test_a_transaction_timeout_bounds_the_wait_instead_of_lock_timeout(
    rmcp_server: MCPServer, state: State, autojump_clock: trio.testing.MockClock
) -> None:
    config = RMCPConfig(transactions=TransactionSettings(lock_timeout_s=5.0))
    async with RMCPSupervisor.open(config) as sup:
        await sup.add_server(ServerSpec.in_memory("test", rmcp_server))
        waited: list[float] = []

        async def patient() -> None:
            # Its timeout is longer than lock_timeout_s: it waits the 50 s the holder takes.
            async with sup.transaction("patient", timeout=100) as tx:
                start = trio.current_time()
                await tx.acquire("r")
                waited.append(trio.current_time() - start)
                arguments, undo = step("patient:1")
                await tx.call("test", "record", arguments, compensate=undo)

        async def hasty() -> None:
            # Its timeout is shorter than the holder's work: it ends the wait, and the
            # transaction is compensated.
            tx = sup.transaction("hasty", timeout=10)

            async def body() -> None:
                async with tx:
                    arguments, undo = step("hasty:1")
                    await tx.call("test", "record", arguments, compensate=undo)
                    await tx.acquire("r")

            with pytest.raises(RMCPTransactionError) as caught:
                await body()
            assert caught.value.state == "compensated"

        with trio.fail_after(GUARD_S):
            async with trio.open_nursery() as nursery, sup.transaction("holder", resources=["r"]):
                nursery.start_soon(patient)
                nursery.start_soon(hasty)
                await trio.sleep(50)
    assert waited == [50.0]
    assert sorted(state.ledger) == ["hasty:1", "patient:1", "undo hasty:1"]


async def test_cancelled_waiting_transaction_compensates_and_leaves_the_graph(
    rmcp_server: MCPServer, state: State, autojump_clock: trio.testing.MockClock
) -> None:
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("test", rmcp_server))
        tx = sup.transaction("waiter")

        async def waiter() -> None:
            async with tx:
                arguments, undo = step("waiter:1")
                await tx.call("test", "record", arguments, compensate=undo)
                await tx.acquire("r")

        with trio.fail_after(GUARD_S):
            async with sup.transaction("holder", resources=["r"]) as holder:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(waiter)
                    await trio.sleep(5)
                    assert lock_waits(sup) == 1
                    nursery.cancel_scope.cancel()
                assert lock_waits(sup) == 0
                # The holder is untouched and goes on.
                arguments, undo = step("holder:1")
                await holder.call("test", "record", arguments, compensate=undo)
        assert tx.state is TransactionState.COMPENSATED
        assert holder.state is TransactionState.COMMITTED
    assert state.ledger == ["waiter:1", "undo waiter:1", "holder:1"]


async def test_shared_resources_let_transactions_run_together_but_not_with_a_writer(
    rmcp_server: MCPServer, state: State, autojump_clock: trio.testing.MockClock
) -> None:
    ends: list[float] = []

    async def reader(sup: RMCPSupervisor, name: str) -> None:
        async with sup.transaction(name, resources=[("config", True)]) as tx:
            await tx.call("test", "record", {"label": name})
            await trio.sleep(10)
        ends.append(trio.current_time())

    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("test", rmcp_server))
        start = trio.current_time()
        with trio.fail_after(GUARD_S):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader, sup, "r1")
                nursery.start_soon(reader, sup, "r2")
                await trio.sleep(1)
                # A writer waits for both readers.
                async with sup.transaction("writer", resources=["config"]) as tx:
                    await tx.call("test", "record", {"label": "writer"})
                    ends.append(trio.current_time())
    assert [end - start for end in ends] == [10.0, 10.0, 10.0]
    assert state.ledger[2] == "writer"


async def test_stall_report_shows_which_transaction_waits_for_which(
    rmcp_server: MCPServer, autojump_clock: trio.testing.MockClock
) -> None:
    reports: list[StallReport] = []
    config = RMCPConfig(runtime=RuntimeSettings(stall_s=4.0))
    async with RMCPSupervisor.open(config, on_stall=reports.append) as sup:
        await sup.add_server(ServerSpec.in_memory("test", rmcp_server))

        async def slow_holder() -> None:
            async with sup.transaction("slow", resources=["account:7"]) as tx:
                # A tool that takes 20 s while the transaction holds the resource.
                await tx.call("test", "sleep", {"seconds": 20})

        async def waiter() -> None:
            async with sup.transaction("waiter") as tx:
                await tx.acquire("account:7", shared=True)

        with trio.fail_after(GUARD_S):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(slow_holder)
                await trio.sleep(1)
                nursery.start_soon(waiter)
    assert reports
    edges = [edge.describe() for edge in reports[0].waits]
    assert len(edges) == 1
    assert "transaction 'waiter' (" in edges[0]
    assert "waits for transaction 'slow' (" in edges[0]
    assert "on resource 'account:7' (shared)" in edges[0]
    assert "waits for (who waits for whom):" in reports[0].describe()
