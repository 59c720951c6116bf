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
    ServerSpec,
    TransactionState,
)
from rmcp_actors.config import TransactionSettings

# Far beyond every wait here: a hang fails the test instead of blocking the run.
GUARD_S = 1000.0


def step(label: str) -> tuple[dict[str, Any], Compensation]:
    """A step's arguments and its compensation: ``record(label)`` undone by ``record(undo label)``."""
    return {"label": label}, Compensation("test", "record", {"label": f"undo {label}"})


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
                # Declared in opposite orders: taken sorted, so one waits for the other instead
                # of both deadlocking.
                nursery.start_soon(run, sup, "a", ["account:1", "account:2"])
                nursery.start_soon(run, sup, "b", ["account:2", "account:1"])
    assert sorted(committed) == ["a", "b"]
    first, second = committed
    assert state.ledger == [f"{first}:1", f"{first}:2", f"{second}:1", f"{second}:2"]


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
