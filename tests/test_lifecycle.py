"""RMCPSupervisor's own lifecycle under races: escalation, add and remove of the same name."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, nullcontext
from typing import Any

import anyio
import anyio.abc
import pytest
import trio.testing
from conftest import PYTHON, stdio_args
from mcp.server.mcpserver import MCPServer
from mcp_test_server import build_server

from rmcp_actors import (
    ConnectionState,
    PolicyOverrides,
    RMCPConfig,
    RMCPError,
    RMCPNetworkError,
    RMCPSupervisor,
    RMCPSupervisorError,
    RuntimeSettings,
    ServerSpec,
    UnknownServerError,
)
from rmcp_actors.runtime import ChildSpec, Supervisor

NEVER_ANSWERS = ServerSpec.stdio(
    "x", sys.executable, ["-c", "import time; time.sleep(60)"], overrides=PolicyOverrides(connect_timeout_s=1)
)


class Boom(Exception):
    pass


async def test_escalation_is_what_open_reports_whatever_the_body_saw_first() -> None:
    # Real time: the application below never lets every task idle, so a MockClock would not move.
    async def crasher(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        task_status.started()
        await anyio.sleep(0.02)
        raise Boom("a runtime actor's bug")

    config = RMCPConfig(runtime=RuntimeSettings(max_restarts=2, restart_period_s=30))

    async def application() -> None:
        async with RMCPSupervisor.open(config) as sup:
            connections = sup._servers_supervisor  # pyright: ignore[reportPrivateUsage]
            await connections.start_child(ChildSpec("crasher", crasher))
            index = 0
            while True:  # the application keeps adding servers while the runtime fails
                index += 1
                await sup.add_server(ServerSpec.in_memory(f"m{index}", build_server()))

    with pytest.raises(RMCPSupervisorError) as caught:
        await application()
    assert caught.value.actor == "crasher"
    assert isinstance(caught.value.__cause__, Boom)


async def test_remove_and_re_add_while_the_first_add_still_connects() -> None:
    outcomes: list[str] = []
    async with RMCPSupervisor.open() as sup, anyio.create_task_group() as task_group:

        async def add(spec: ServerSpec, tag: str) -> None:
            try:
                await sup.add_server(spec)
                outcomes.append(f"{tag} ok")
            except UnknownServerError:
                outcomes.append(f"{tag} removed")

        task_group.start_soon(add, NEVER_ANSWERS, "first")
        await anyio.sleep(0.2)
        # The first add is still connecting: the removal stops it (its process gets the SDK's
        # terminate sequence) and the first add says why it ended.
        with anyio.fail_after(5):
            await sup.remove_server("x")
            while not outcomes:
                await anyio.sleep(0.01)
        assert outcomes == ["first removed"]
        await add(ServerSpec.in_memory("x", build_server()), "second")
        children = sup.statistics().supervisors[1].children
        assert [child.name for child in children] == ["server:x"]
        assert (await sup.call("x", "echo", {"text": "the second one"})).text == "the second one"
    assert outcomes == ["first removed", "second ok"]


async def test_a_finishing_add_does_not_stop_the_connection_of_a_re_add_under_its_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first add's connection is up, but the add has not resumed yet: meanwhile the server is
    removed and added again. The first add's cleanup must stop its own connection (already
    stopped by the removal), never the new one that now holds the name."""
    first_started = anyio.Event()
    resume_first = anyio.Event()
    start_child = Supervisor.start_child
    starts = 0

    async def start_then_hold_the_first(self: Supervisor, spec: ChildSpec) -> None:
        nonlocal starts
        starts += 1
        first = starts == 1
        await start_child(self, spec)
        if first:
            first_started.set()
            await resume_first.wait()

    monkeypatch.setattr(Supervisor, "start_child", start_then_hold_the_first)
    async with RMCPSupervisor.open() as sup, anyio.create_task_group() as task_group:

        async def first_add() -> None:
            with pytest.raises(UnknownServerError, match="removed while it was being added"):
                await sup.add_server(ServerSpec.in_memory("x", build_server()))

        task_group.start_soon(first_add)
        await first_started.wait()
        await sup.remove_server("x")
        await sup.add_server(ServerSpec.in_memory("x", build_server()))
        resume_first.set()
        await anyio.wait_all_tasks_blocked()
        children = sup.statistics().supervisors[1].children
        assert [child.name for child in children] == ["server:x"]
        assert sup.servers() == {"x": ConnectionState.READY}
        assert (await sup.call("x", "echo", {"text": "the second one"})).text == "the second one"


async def test_a_cancelled_remove_server_still_stops_the_connection() -> None:
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.stdio("a", PYTHON, stdio_args()))
        pid = (await sup.call("a", "pid")).structured_content
        assert pid is not None
        async with anyio.create_task_group() as task_group:

            async def slow_add() -> None:
                # Fails to connect for a second, while "a" is removed beside it.
                with pytest.raises(RMCPNetworkError):
                    await sup.add_server(NEVER_ANSWERS)

            task_group.start_soon(slow_add)
            await anyio.sleep(0.2)
            with anyio.move_on_after(0.3):
                await sup.remove_server("a")
        assert sup.servers() == {}
        assert sup.statistics().supervisors[1].children == ()
        with pytest.raises(UnknownServerError):
            await sup.remove_server("a")
        await sup.add_server(ServerSpec.stdio("a", PYTHON, stdio_args()))
        assert (await sup.call("a", "echo", {"text": "re-added"})).text == "re-added"


def _server_that_starts_when(gate: anyio.Event) -> MCPServer:
    """A real server whose handshake waits for ``gate`` (its lifespan does)."""

    @asynccontextmanager
    async def lifespan(app: MCPServer) -> AsyncIterator[dict[str, Any]]:
        await gate.wait()
        yield {}

    app = MCPServer("late", lifespan=lifespan)

    @app.tool()
    def hello() -> str:
        """Say hello."""
        return "hello"

    return app


@pytest.mark.parametrize("first_connection", ["made", "failed", "removed"])
async def test_a_tools_refresh_during_the_first_connection_waits_for_it(first_connection: str) -> None:
    # The connection actor is not running until its first connection is made: a refresh then
    # waits for it (within its own bound) instead of calling it "stopped, or restarting".
    gate = anyio.Event()
    spec = ServerSpec.in_memory(
        "late", _server_that_starts_when(gate), overrides=PolicyOverrides(connect_timeout_s=2)
    )
    refreshed: list[object] = []
    async with RMCPSupervisor.open() as sup, anyio.create_task_group() as task_group:

        async def add() -> None:
            expected = {"failed": RMCPNetworkError, "removed": UnknownServerError}.get(first_connection)
            with pytest.raises(expected) if expected else nullcontext():
                await sup.add_server(spec)

        async def refresh() -> None:
            try:
                refreshed.append([tool.name for tool in await sup.list_tools("late", refresh=True)])
            except RMCPError as error:
                refreshed.append(error)

        task_group.start_soon(add)
        await trio.testing.wait_all_tasks_blocked()
        task_group.start_soon(refresh)
        await trio.testing.wait_all_tasks_blocked()
        assert refreshed == []  # waiting, not failed
        if first_connection == "made":
            gate.set()
        elif first_connection == "removed":
            await sup.remove_server("late")
        with anyio.fail_after(5):
            while not refreshed:
                await anyio.sleep(0.01)
    [outcome] = refreshed
    if first_connection == "made":
        assert outcome == ["hello"]
    elif first_connection == "failed":
        assert isinstance(outcome, RMCPNetworkError), repr(outcome)
        assert "could not connect" in str(outcome)
        assert "first connection" in str(outcome)
    else:
        assert isinstance(outcome, RMCPNetworkError), repr(outcome)
        assert "closed during its first connection (server removed" in str(outcome)
