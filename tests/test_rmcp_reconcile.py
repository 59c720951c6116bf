"""Reconcilers: in-doubt runs turned into known outcomes, in memory and over stdio."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from conftest import FAST_RECOVERY, PYTHON, stdio_args
from mcp.server.mcpserver import MCPServer
from mcp.types import CallToolResult, TextContent
from mcp_test_server import State, build_paginated_server, build_server, ledger_reconciler

from rmcp_actors import (
    FastRMCP,
    RMCPConfigError,
    RMCPOutcomeUnknownError,
    RMCPSupervisor,
    ServerSpec,
)
from rmcp_actors._protocol import fingerprint
from rmcp_actors.server import (
    InDoubtRun,
    Reconciler,
    Reconciliation,
    install,
    reconciler_for,
    rmcp_of,
    store_key,
)
from rmcp_actors.stores import DedupStore, MemoryStore, OwnerInfo, SQLiteStore


async def leave_in_doubt(store: DedupStore, tool: str, arguments: dict[str, Any], key: str = "k") -> None:
    """Make ``key`` in doubt in ``store``: the owner "crashed" claimed it for ``tool(arguments)``,
    called the tool, and died without a result."""
    await store.register_owner(OwnerInfo(instance_id="crashed", pid=1, host="elsewhere"), lease_s=30)
    scoped = store_key(key)
    claimed = await store.begin(scoped, fingerprint=fingerprint(tool, arguments), tool=tool, owner="crashed")
    assert claimed.claimed
    assert await store.mark_entered(scoped, owner="crashed")
    await store.release_owner("crashed")


def counted(reconciler: Reconciler, asked: list[InDoubtRun]) -> Reconciler:
    async def reconcile(run: InDoubtRun) -> Reconciliation | None:
        asked.append(run)
        return await reconciler(run)

    return reconcile


async def test_reconciler_that_finds_the_run_stores_its_result_for_replay(state: State) -> None:
    store = MemoryStore()
    await leave_in_doubt(store, "record", {"label": "paid"})
    # The run happened before its server died: its effect is in the ledger.
    state.record("paid")
    asked: list[InDoubtRun] = []
    app = install(
        build_server(state), store=store, reconcilers={"record": counted(ledger_reconciler(state), asked)}
    )
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("test", app))
        first = await sup.call("test", "record", {"label": "paid"}, idempotency_key="k")
        again = await sup.call("test", "record", {"label": "paid"}, idempotency_key="k")
    assert (first.text, first.duplicate, first.attempts) == ("recorded paid", True, 1)
    # Shaped as the tool's own result (MCPServer's conversion: structured output too).
    assert first.structured_content == {"result": "recorded paid"}
    assert (again.text, again.duplicate) == ("recorded paid", True)
    assert asked == [InDoubtRun(tool="record", arguments={"label": "paid"}, idempotency_key="k")]
    assert state.ledger == ["paid"]
    statistics = rmcp_of(app).statistics()  # type: ignore[union-attr]
    assert (statistics.reconciled_ran, statistics.executed) == (1, 0)


async def test_reconciler_that_finds_no_run_runs_the_tool_now(state: State) -> None:
    store = MemoryStore()
    await leave_in_doubt(store, "record", {"label": "lost"})
    app = install(build_server(state), store=store, reconcilers={"record": ledger_reconciler(state)})
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("test", app))
        first = await sup.call("test", "record", {"label": "lost"}, idempotency_key="k")
        again = await sup.call("test", "record", {"label": "lost"}, idempotency_key="k")
    assert (first.text, first.duplicate) == ("recorded lost", False)
    assert (again.text, again.duplicate) == ("recorded lost", True)
    assert state.ledger == ["lost"]
    statistics = rmcp_of(app).statistics()  # type: ignore[union-attr]
    assert (statistics.reconciled_not_run, statistics.executed) == (1, 1)


async def cannot_tell(run: InDoubtRun) -> Reconciliation:
    return Reconciliation.unknown()


async def says_nothing(run: InDoubtRun) -> None:
    return None


async def raises(run: InDoubtRun) -> Reconciliation:
    raise ConnectionError("the orders database is down")


async def answers_nonsense(run: InDoubtRun) -> Any:
    return True


async def hangs(run: InDoubtRun) -> Reconciliation:
    await trio.sleep_forever()
    raise AssertionError("unreachable")


@pytest.mark.parametrize("reconciler", [cannot_tell, says_nothing, raises, answers_nonsense, hangs])
async def test_reconciler_that_cannot_tell_leaves_the_key_in_doubt(
    state: State, autojump_clock: trio.testing.MockClock, reconciler: Reconciler
) -> None:
    store = MemoryStore(clock=trio.current_time)
    await leave_in_doubt(store, "record", {"label": "unsure"})
    app = install(build_server(state), store=store, reconcilers={"record": reconciler}, reconcile_timeout_s=5)
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("test", app))
        started = trio.current_time()
        with pytest.raises(RMCPOutcomeUnknownError, match="in_doubt") as caught:
            await sup.call("test", "record", {"label": "unsure"}, idempotency_key="k")
        # The server carries on: other keys run as usual.
        other = await sup.call("test", "record", {"label": "other"}, idempotency_key="k2")
    assert "reconciler" in str(caught.value)
    assert trio.current_time() - started < 6
    assert other.text == "recorded other"
    assert state.ledger == ["other"]


async def test_concurrent_retries_of_an_in_doubt_key_run_it_once(state: State) -> None:
    store = MemoryStore()
    await leave_in_doubt(store, "record", {"label": "once"})
    both_asking = trio.Event()
    asked: list[InDoubtRun] = []

    async def slow_lookup(run: InDoubtRun) -> Reconciliation:
        # Both retries are told "did not run" once both are asking: only one may run it.
        asked.append(run)
        if len(asked) == 2:
            both_asking.set()
        await both_asking.wait()
        return Reconciliation.did_not_run()

    app = install(build_server(state), store=store, reconcilers={"record": slow_lookup}, close_store=False)
    results: list[Any] = []

    async def retry(sup: RMCPSupervisor, server: str) -> None:
        results.append(await sup.call(server, "record", {"label": "once"}, idempotency_key="k"))

    async with RMCPSupervisor.open() as sup:
        # Two connections to one server: two retries of the same key arriving together.
        await sup.add_server(ServerSpec.in_memory("one", app))
        await sup.add_server(ServerSpec.in_memory("two", app))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(retry, sup, "one")
            nursery.start_soon(retry, sup, "two")
    assert state.ledger == ["once"]
    assert sorted(result.duplicate for result in results) == [False, True]
    assert {result.text for result in results} == {"recorded once"}


async def found(run: InDoubtRun) -> Reconciliation:
    return Reconciliation.did_run(f"found {run.arguments['label']}")


def test_fastrmcp_tool_takes_its_reconciler() -> None:
    app = FastRMCP("orders")

    @app.tool(reconcile=found)
    async def create_order(label: str) -> str:
        return label

    @app.tool(name="cancel", reconcile=cannot_tell)
    async def cancel_order(label: str) -> str:
        return label

    @app.tool()
    async def plain(label: str) -> str:
        return label

    assert app.rmcp.reconcilers == {"create_order": found, "cancel": cannot_tell}


def test_reconciler_for_declares_beside_the_tool() -> None:
    app = install(MCPServer("orders"))

    @reconciler_for(app, "create_order")
    async def look_up(run: InDoubtRun) -> Reconciliation:
        return Reconciliation.did_not_run()

    assert rmcp_of(app).reconcilers == {"create_order": look_up}  # type: ignore[union-attr]
    with pytest.raises(RMCPConfigError, match="install"):
        reconciler_for(MCPServer("plain"), "create_order")


async def test_low_level_server_reconciler_returns_a_call_tool_result() -> None:
    store = MemoryStore()
    await leave_in_doubt(store, "tool0", {})

    async def found_result(run: InDoubtRun) -> Reconciliation:
        return Reconciliation.did_run(CallToolResult(content=[TextContent(type="text", text="found")]))

    lowlevel = install(build_paginated_server(), store=store, reconcilers={"tool0": found_result})
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("low", lowlevel))
        result = await sup.call("low", "tool0", {}, idempotency_key="k")
    assert (result.text, result.duplicate) == ("found", True)


# Over stdio: the store is a SQLite file the server process shares with the test.


async def prepared_store(path: Path, *, entered: bool, label: str) -> None:
    """A claim of ``record(label)`` under key ``label`` by an owner that is gone."""
    store = SQLiteStore(path)
    try:
        await store.register_owner(OwnerInfo(instance_id="crashed", pid=1, host="elsewhere"), lease_s=30)
        key = store_key(label)
        arguments = {"label": label}
        await store.begin(key, fingerprint=fingerprint("record", arguments), tool="record", owner="crashed")
        if entered:
            assert await store.mark_entered(key, owner="crashed")
        await store.release_owner("crashed")
    finally:
        await store.aclose()


async def test_stdio_server_runs_a_claim_never_entered_and_reconciles_entered_ones(tmp_path: Path) -> None:
    store = tmp_path / "rmcp.sqlite"
    await prepared_store(store, entered=False, label="claimed")
    await prepared_store(store, entered=True, label="ran")
    await prepared_store(store, entered=True, label="never-ran")
    await prepared_store(store, entered=True, label="unreconciled")
    # "ran" ran before its server died; "never-ran" did not.
    (tmp_path / "ledger").write_text("ran\n")
    args = stdio_args("--state-dir", str(tmp_path), "--rmcp-store", str(store), "--reconcile-record")
    spec = ServerSpec.stdio("test", PYTHON, args, overrides=FAST_RECOVERY)
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(spec)
        results = {
            label: await sup.call("test", "record", {"label": label}, idempotency_key=label)
            for label in ("claimed", "ran", "never-ran")
        }
    assert {label: (result.text, result.duplicate) for label, result in results.items()} == {
        "claimed": ("recorded claimed", False),
        "ran": ("recorded ran", True),
        "never-ran": ("recorded never-ran", False),
    }
    assert (tmp_path / "ledger").read_text().splitlines() == ["ran", "claimed", "never-ran"]

    # Without a reconciler, an entered claim stays in doubt; a claim never entered still runs.
    await prepared_store(store, entered=False, label="claimed-2")
    spec = ServerSpec.stdio("plain", PYTHON, args[:-1], overrides=FAST_RECOVERY)
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(spec)
        with pytest.raises(RMCPOutcomeUnknownError, match="in_doubt"):
            await sup.call("plain", "record", {"label": "unreconciled"}, idempotency_key="unreconciled")
        claimed = await sup.call("plain", "record", {"label": "claimed-2"}, idempotency_key="claimed-2")
    assert (claimed.text, claimed.duplicate) == ("recorded claimed-2", False)
    assert (tmp_path / "ledger").read_text().splitlines() == ["ran", "claimed", "never-ran", "claimed-2"]


async def test_a_late_did_run_verdict_waits_for_the_run_in_flight_here(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Two retries of an in-doubt key: the first is told "did not run" and runs the tool; the
    second's reconciler, slower, then sees that run's effect and says "did run". The key is
    this process's run in flight: the second retry gets that run's own result, which is the
    one stored, not the reconciler's stand-in."""
    store = MemoryStore(clock=trio.current_time)
    await leave_in_doubt(store, "book", {"label": "x"})
    ledger: list[str] = []
    asked = 0

    async def look_up(run: InDoubtRun) -> Reconciliation:
        nonlocal asked
        asked += 1
        if asked == 1:
            await trio.sleep(1)
            return Reconciliation.did_not_run()
        while run.arguments["label"] not in ledger:
            await trio.sleep(0.1)
        return Reconciliation.did_run(f"found {run.arguments['label']}")

    app = FastRMCP("orders", store=store, close_store=False)

    @app.tool(reconcile=look_up)
    async def book(label: str) -> str:
        ledger.append(label)
        await trio.sleep(5)
        return f"booked {label}"

    results: list[Any] = []

    async def retry(sup: RMCPSupervisor, server: str) -> None:
        results.append(await sup.call(server, "book", {"label": "x"}, idempotency_key="k", timeout=60))

    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("one", app))
        await sup.add_server(ServerSpec.in_memory("two", app))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(retry, sup, "one")
            nursery.start_soon(retry, sup, "two")
        again = await sup.call("one", "book", {"label": "x"}, idempotency_key="k")
    assert ledger == ["x"]
    assert asked == 2
    assert sorted((result.text, result.duplicate) for result in results) == [
        ("booked x", False),
        ("booked x", True),
    ]
    assert (again.text, again.duplicate) == ("booked x", True)
