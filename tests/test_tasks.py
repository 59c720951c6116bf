"""Calls that run as tasks: the ``io.modelcontextprotocol/tasks`` extension against a real SDK
server in memory (MockClock), and the 2025-11-25 core tasks against server-everything."""

from __future__ import annotations

import functools
import itertools
import os
import random
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from _http import serve_http
from _npm import SERVER_EVERYTHING, npm_install, package_dir
from conftest import FAST_RECOVERY, process_gone
from mcp_types import GetTaskRequest, GetTaskRequestParams, GetTaskResult
from tasks_servers import TasksState, build_tasks_server

from rmcp_actors import (
    ConnectionState,
    LifecycleEvent,
    MemoryTaskStore,
    Outcome,
    PolicyOverrides,
    ReconnectOverrides,
    RequestState,
    RMCPArgumentError,
    RMCPConfig,
    RMCPConfigError,
    RMCPIdempotencyConflictError,
    RMCPOutcomeUnknownError,
    RMCPResultValidationError,
    RMCPServerError,
    RMCPSupervisor,
    RMCPTaskCancelledError,
    RMCPTimeoutAfterSendError,
    ServerSpec,
    SQLiteTaskStore,
    ToolOverrides,
)
from rmcp_actors.client._tasks import RELATED_TASK_KEY
from rmcp_actors.client.connection import Connection


def _spec(state: TasksState) -> ServerSpec:
    return ServerSpec.in_memory("tasks", build_tasks_server(state))


class _NoJitter(random.Random):
    """Reconnect delays at their cap: full jitter would sometimes reconnect before the next
    poll (or the caller's cancel) that a test means to land while disconnected."""

    def uniform(self, a: float, b: float) -> float:
        del a
        return b


def _task_steps(events: tuple[LifecycleEvent, ...] | list[LifecycleEvent]) -> list[str | None]:
    return [event.detail for event in events if event.state is RequestState.TASK]


async def _break_transport_at_first_poll(
    state: TasksState, connection: Connection, *, server_restarts: bool = False
) -> None:
    """Drop the transport once the task is being polled: the server and its tasks live on,
    unless ``server_restarts`` (a server that kept its tasks in memory loses them)."""
    while not state.polls:
        await trio.sleep(0.05)
    session = connection.current_session()
    assert session is not None
    if server_restarts:
        state.tasks.clear()
    connection.report_broken(session)


async def test_a_task_is_polled_to_its_result_at_the_servers_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    state = TasksState(poll_interval_ms=250)
    seen: list[LifecycleEvent] = []
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(_spec(state))
        started = trio.current_time()
        result = await sup.call(
            "tasks", "research", {"topic": "bees", "seconds": 1.0}, on_lifecycle=seen.append, timeout=30
        )
    assert result.outcome is Outcome.SUCCEEDED
    assert result.text == "report on bees"
    assert result.meta is not None
    assert result.meta[RELATED_TASK_KEY] == {"taskId": "task-1"}
    assert _task_steps(seen) == ["created task-1", "working: halfway", "completed"]
    assert [event.state for event in result.lifecycle][-1] is RequestState.ANSWERED
    times = [at - started for _, at in state.polls]
    # One poll per pollIntervalMs, the last once the task is done.
    assert times == pytest.approx([0.25, 0.5, 0.75, 1.0], abs=0.01)
    assert state.created == 1


async def test_without_an_interval_the_client_polls_once_a_second(
    autojump_clock: trio.testing.MockClock,
) -> None:
    state = TasksState(poll_interval_ms=None)
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(_spec(state))
        await sup.call("tasks", "research", {"topic": "x", "seconds": 2.5}, timeout=30)
    assert len(state.polls) == 3


async def test_a_task_result_is_checked_against_the_tools_output_schema(
    autojump_clock: trio.testing.MockClock,
) -> None:
    state = TasksState(drop_structured=True)
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(_spec(state))
        with pytest.raises(RMCPResultValidationError, match="did not return structured content"):
            await sup.call("tasks", "research", {"topic": "x"}, timeout=30)


async def test_a_failed_task_is_a_failed_outcome(autojump_clock: trio.testing.MockClock) -> None:
    state = TasksState()
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(_spec(state))
        result = await sup.call("tasks", "fails", {"seconds": 0.5}, timeout=30)
    assert result.outcome is Outcome.FAILED
    assert result.is_error
    assert "the backend is down" in result.text
    assert "-32603" in result.text
    assert result.meta is not None
    assert result.meta["error"]["code"] == -32603


async def test_a_task_failed_in_doubt_is_unknown(autojump_clock: trio.testing.MockClock) -> None:
    state = TasksState()
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(_spec(state))
        with pytest.raises(RMCPOutcomeUnknownError, match="failed in doubt") as raised:
            await sup.call("tasks", "doubtful", {"seconds": 0.5}, timeout=30)
    assert raised.value.may_have_executed


async def test_a_task_the_server_cancels_raises_task_cancelled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    state = TasksState()
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(_spec(state))
        with pytest.raises(RMCPTaskCancelledError, match="operator stopped it") as raised:
            await sup.call("tasks", "abandoned", {"seconds": 0.5}, timeout=30)
    assert raised.value.may_have_executed
    assert raised.value.outcome is Outcome.UNKNOWN
    assert state.cancels == []  # the server's doing, not the client's


async def test_the_deadline_cancels_the_task_on_the_server(autojump_clock: trio.testing.MockClock) -> None:
    state = TasksState()
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(_spec(state))
        with pytest.raises(RMCPTimeoutAfterSendError):
            await sup.call("tasks", "research", {"topic": "x", "seconds": 60}, timeout=2)
    assert state.cancels == ["task-1"]
    assert state.tasks["task-1"].cancelled


async def test_a_poll_the_server_never_answers_ends_in_the_calls_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    state = TasksState(hang_polls=True)
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(_spec(state))
        with pytest.raises(RMCPTimeoutAfterSendError):
            await sup.call("tasks", "research", {"topic": "x", "seconds": 60}, timeout=2)
    assert state.cancels == ["task-1"]


async def test_a_cancelled_caller_cancels_the_task(autojump_clock: trio.testing.MockClock) -> None:
    state = TasksState()
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(_spec(state))
        with trio.move_on_after(3):
            await sup.call("tasks", "research", {"topic": "x", "seconds": 60}, timeout=30)
    assert state.cancels == ["task-1"]


class _GivesUpWhileStoring(MemoryTaskStore):
    """A store whose write waits (a file, a database): the caller gives up during it."""

    caller: trio.CancelScope | None = None

    async def put(self, server: str, key: str, ref: Any) -> None:
        assert self.caller is not None
        self.caller.cancel()
        await trio.lowlevel.checkpoint()
        await super().put(server, key, ref)


async def test_a_caller_cancelled_while_the_task_is_stored_keeps_it_and_cancels_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    state = TasksState()
    store = _GivesUpWhileStoring()
    async with RMCPSupervisor.open(task_store=store) as sup:
        await sup.add_server(_spec(state))
        with trio.CancelScope() as caller:
            store.caller = caller
            await sup.call("tasks", "research", {"topic": "x", "seconds": 60}, idempotency_key="k", task=True)
    assert caller.cancelled_caught
    # The task was created: its key keeps it (a restart resumes it), and it is not left running.
    assert await store.get("tasks", "k") is not None
    assert state.cancels == ["task-1"]


async def test_polling_goes_on_on_the_new_session_after_the_transport_drops(
    autojump_clock: trio.testing.MockClock,
) -> None:
    state = TasksState()
    seen: list[LifecycleEvent] = []
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(_spec(state))
        connection = sup._servers["tasks"].connection  # pyright: ignore[reportPrivateUsage]

        async with trio.open_nursery() as nursery:
            nursery.start_soon(_break_transport_at_first_poll, state, connection)
            result = await sup.call(
                "tasks", "research", {"topic": "bees", "seconds": 3}, on_lifecycle=seen.append, timeout=30
            )
        generation = connection.statistics().generation
    assert result.outcome is Outcome.SUCCEEDED
    assert result.text == "report on bees"
    assert generation == 2
    assert state.created == 1  # the same task, not a new one
    assert {task_id for task_id, _ in state.polls} == {"task-1"}
    assert result.attempts == 1


async def test_failing_fast_on_a_lost_connection_leaves_the_task_to_resume_by_key(
    autojump_clock: trio.testing.MockClock,
) -> None:
    state = TasksState()
    # Reconnecting takes longer than a poll interval: the next poll finds no connection.
    slow = ReconnectOverrides(base_delay_s=5, max_delay_s=5)
    spec = ServerSpec.in_memory(
        "tasks",
        build_tasks_server(state),
        overrides=PolicyOverrides(when_disconnected="fail", reconnect=slow),
    )
    arguments = {"topic": "bees", "seconds": 3}
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(spec)
        connection = sup._servers["tasks"].connection  # pyright: ignore[reportPrivateUsage]
        connection._random = _NoJitter()  # pyright: ignore[reportPrivateUsage]

        async with trio.open_nursery() as nursery:
            nursery.start_soon(_break_transport_at_first_poll, state, connection)
            with pytest.raises(RMCPOutcomeUnknownError, match="same idempotency key"):
                await sup.call("tasks", "research", arguments, idempotency_key="k", task=True, timeout=30)
        while sup.servers()["tasks"] is not ConnectionState.READY:
            await trio.sleep(0.05)
        result = await sup.call("tasks", "research", arguments, idempotency_key="k", task=True, timeout=30)
    assert result.text == "report on bees"
    assert state.created == 1
    assert state.cancels == []  # left running for the key to resume, not cancelled
    assert _task_steps(result.lifecycle)[0] == "resumed task-1"


async def test_a_caller_cancelled_while_reconnecting_still_cancels_the_task(
    autojump_clock: trio.testing.MockClock,
) -> None:
    state = TasksState()
    slow = ReconnectOverrides(base_delay_s=2, max_delay_s=2)
    spec = ServerSpec.in_memory("tasks", build_tasks_server(state), overrides=PolicyOverrides(reconnect=slow))
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(spec)
        connection = sup._servers["tasks"].connection  # pyright: ignore[reportPrivateUsage]
        connection._random = _NoJitter()  # pyright: ignore[reportPrivateUsage]

        async with trio.open_nursery() as nursery:
            nursery.start_soon(_break_transport_at_first_poll, state, connection)
            with trio.move_on_after(1):  # while the connection waits out its reconnect delay
                await sup.call("tasks", "research", {"topic": "x", "seconds": 60}, timeout=30)
                pytest.fail("the call outlived its caller")
    # Sent on the new session, within the bound of a cancel (5 s).
    assert state.cancels == ["task-1"]
    assert state.tasks["task-1"].cancelled


async def test_a_task_the_server_lost_across_a_reconnect_is_unknown(
    autojump_clock: trio.testing.MockClock,
) -> None:
    state = TasksState()
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(_spec(state))
        connection = sup._servers["tasks"].connection  # pyright: ignore[reportPrivateUsage]

        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                functools.partial(_break_transport_at_first_poll, state, connection, server_restarts=True)
            )
            with pytest.raises(
                RMCPOutcomeUnknownError, match="no longer knows task task-1 after a reconnect"
            ):
                await sup.call("tasks", "research", {"topic": "x", "seconds": 3}, timeout=30)


async def test_a_call_with_the_same_key_follows_the_same_task(autojump_clock: trio.testing.MockClock) -> None:
    state = TasksState()
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(_spec(state))
        first = await sup.call(
            "tasks", "research", {"topic": "x"}, idempotency_key="k1", task=True, timeout=30
        )
        again = await sup.call(
            "tasks", "research", {"topic": "x"}, idempotency_key="k1", task=True, timeout=30
        )
        with pytest.raises(RMCPIdempotencyConflictError, match="created task task-1"):
            await sup.call("tasks", "research", {"topic": "y"}, idempotency_key="k1", task=True, timeout=30)
    assert first.text == again.text == "report on x"
    assert state.created == 1
    assert _task_steps(again.lifecycle)[0] == "resumed task-1"


async def test_a_new_process_resumes_by_key_a_task_auto_learnt_from_the_servers_refusal(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # task "auto" (the default) learns from the server's -32021 that the tool needs a task; a
    # new process (a fresh session) has not learnt it yet, and must still find the key's task.
    state = TasksState(honour_cancel=False)
    store = MemoryTaskStore()
    arguments = {"topic": "bees", "seconds": 3}
    async with RMCPSupervisor.open(task_store=store) as sup:
        await sup.add_server(_spec(state))
        with trio.move_on_after(1):
            await sup.call("tasks", "research", arguments, idempotency_key="k", timeout=30)
    assert state.created == 1
    async with RMCPSupervisor.open(task_store=store) as sup:
        await sup.add_server(_spec(state))
        result = await sup.call("tasks", "research", arguments, idempotency_key="k", timeout=30)
    assert result.text == "report on bees"
    assert state.created == 1  # followed, not created again (this server does not dedup keys)
    assert "resumed task-1" in _task_steps(result.lifecycle)


async def test_a_new_process_resumes_a_batchs_tasks_from_the_sqlite_store(tmp_path: Path) -> None:
    # Real time (SQLite works in threads), short intervals: the first "process" gives up on
    # its batch once every task was polled (each key's task is stored before its first poll),
    # whenever that is; the server ignores the cancel (cooperation is optional).
    state = TasksState(poll_interval_ms=10, honour_cancel=False)
    server = build_tasks_server(state)
    path = str(tmp_path / "tasks.db")
    items = [{"topic": f"t{n}", "seconds": 0.3} for n in range(3)]

    def key(item: Any) -> str:
        return f"batch-{item['topic']}"

    config = RMCPConfig.from_dict({"runtime": {"task_store": path}})
    async with RMCPSupervisor.open(config) as sup:
        await sup.add_server(ServerSpec.in_memory("tasks", server))
        with trio.CancelScope() as gave_up:

            async def give_up_once_all_polled() -> None:
                while len({task_id for task_id, _ in state.polls}) < len(items):
                    await trio.sleep(0.005)
                gave_up.cancel()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(give_up_once_all_polled)
                async with sup.map("tasks", "research", items, key=key, task=True) as results:
                    async for _ in results:
                        pass
    assert state.created == 3
    async with RMCPSupervisor.open(config) as sup:
        await sup.add_server(ServerSpec.in_memory("tasks", server))
        async with sup.map("tasks", "research", items, key=key, task=True, ordered=True) as results:
            texts = [outcome.text async for _, outcome in results if not isinstance(outcome, Exception)]
    assert texts == ["report on t0", "report on t1", "report on t2"]
    assert state.created == 3  # followed, not created again


async def test_sqlite_task_store_keeps_refs_across_instances(tmp_path: Path) -> None:
    from rmcp_actors.client._tasks import TaskRef, TaskWire

    path = str(tmp_path / "t.db")
    store = SQLiteTaskStore(path)
    await store.put("s", "k", TaskRef("t-1", TaskWire.CORE, "abc"))
    await store.aclose()
    again = SQLiteTaskStore(path)
    assert await again.get("s", "k") == TaskRef("t-1", TaskWire.CORE, "abc")
    assert await again.get("s", "other") is None
    await again.aclose()
    memory = MemoryTaskStore()
    await memory.put("s", "k", TaskRef("t-2", TaskWire.EXTENSION, "f"))
    assert (await memory.get("s", "k"), await memory.get("t", "k")) == (
        TaskRef("t-2", TaskWire.EXTENSION, "f"),
        None,
    )


async def test_a_plain_tool_of_a_tasks_server_is_a_plain_call(autojump_clock: trio.testing.MockClock) -> None:
    state = TasksState()
    config = RMCPConfig(defaults=PolicyOverrides(task=True))
    async with RMCPSupervisor.open(config) as sup:
        await sup.add_server(_spec(state))
        result = await sup.call("tasks", "quick", {"x": 4})
    assert result.structured_content == {"result": 4}
    assert state.created == 0
    assert not _task_steps(result.lifecycle)


async def test_task_false_leaves_the_extension_out_of_the_request(
    autojump_clock: trio.testing.MockClock,
) -> None:
    state = TasksState()
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(_spec(state))
        with pytest.raises(RMCPServerError, match="-32021"):
            await sup.call("tasks", "research", {"topic": "x"}, task=False, timeout=30)
    assert state.created == 0


async def test_the_task_policy_key_per_tool(autojump_clock: trio.testing.MockClock) -> None:
    state = TasksState()
    spec = ServerSpec.in_memory(
        "tasks",
        build_tasks_server(state),
        overrides=PolicyOverrides(task=True),
        tools={"research": ToolOverrides(task=False)},
    )
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(spec)
        with pytest.raises(RMCPServerError, match="-32021"):
            await sup.call("tasks", "research", {"topic": "x"}, timeout=30)
        result = await sup.call("tasks", "fails", {"seconds": 0.1}, timeout=30)
    assert result.is_error
    assert state.created == 1
    with pytest.raises(RMCPConfigError, match="true, false or 'auto'") as raised:
        RMCPConfig.from_dict({"defaults": {"task": "sometimes"}})
    assert raised.value.path == "defaults.task"


async def test_the_task_store_is_used_only_for_calls_with_a_given_key(
    autojump_clock: trio.testing.MockClock,
) -> None:
    state = TasksState()
    store = MemoryTaskStore()
    async with RMCPSupervisor.open(task_store=store) as sup:
        await sup.add_server(_spec(state))
        await sup.call("tasks", "research", {"topic": "x"}, timeout=30)
        await sup.call("tasks", "research", {"topic": "x"}, idempotency_key="given", timeout=30)
    assert await store.get("tasks", "given") is not None
    assert state.created == 2


# -- over stdio: a real server process (real time) ------------------------------------------


def _stdio_spec() -> ServerSpec:
    server = str(Path(__file__).with_name("tasks_servers.py"))
    return ServerSpec.stdio("tasks", sys.executable, [server, "20"], overrides=FAST_RECOVERY)


async def test_a_task_over_stdio_is_polled_to_its_result() -> None:
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(_stdio_spec())
        result = await sup.call("tasks", "research", {"topic": "owls", "seconds": 0.3}, timeout=20)
    assert result.text == "report on owls"
    assert _task_steps(result.lifecycle)[-1] == "completed"


async def test_a_task_dies_with_its_killed_stdio_server_and_the_call_is_unknown() -> None:
    seen: list[LifecycleEvent] = []
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(_stdio_spec())
        pid = (await sup.call("tasks", "pid")).structured_content
        assert pid is not None

        async def kill_mid_task() -> None:
            while not any(event.state is RequestState.TASK for event in seen):
                await trio.sleep(0.01)
            os.kill(pid["result"], signal.SIGKILL)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(kill_mid_task)
            with pytest.raises(
                RMCPOutcomeUnknownError, match="no longer knows task task-1 after a reconnect"
            ):
                await sup.call(
                    "tasks", "research", {"topic": "x", "seconds": 30}, on_lifecycle=seen.append, timeout=20
                )
        after = await sup.call("tasks", "quick", {"x": 1})
    assert after.structured_content == {"result": 1}
    assert process_gone(pid["result"])


# -- 2025-11-25 core tasks: server-everything over stdio (real time, a real Node server) -------


@pytest.fixture(scope="module")
def everything_script() -> str:
    node_modules = npm_install(SERVER_EVERYTHING)
    return str(package_dir(node_modules, "@modelcontextprotocol/server-everything") / "dist" / "index.js")


@pytest.mark.reference
async def test_server_everythings_research_query_runs_as_a_task(everything_script: str) -> None:
    seen: list[LifecycleEvent] = []
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.stdio("everything", "node", [everything_script, "stdio"]))
        # taskSupport "required": the default policy ("auto") asks for the task.
        result = await sup.call(
            "everything", "simulate-research-query", {"topic": "bees"}, on_lifecycle=seen.append, timeout=60
        )
        with pytest.raises(RMCPArgumentError, match="taskSupport is 'forbidden'"):
            await sup.call("everything", "echo", {"message": "hi"}, task=True)
        plain = await sup.call("everything", "echo", {"message": "hi"})
    assert result.outcome is Outcome.SUCCEEDED
    assert "Research Report: bees" in result.text
    steps = _task_steps(seen)
    assert steps[0] is not None
    assert steps[0].startswith("created ")
    # Which of the server's working stages a poll sees depends on when it lands (a loaded
    # machine may miss some): every step between creation and the end is a working one, each
    # new (a status is recorded when it changes), and the last one is the completion.
    middle = steps[1:-1]
    assert all(step is not None and step.startswith("working: ") for step in middle), steps
    assert all(a != b for a, b in itertools.pairwise(middle)), steps
    assert steps[-1] == "completed: Generating report..."
    assert result.meta is not None
    assert result.meta[RELATED_TASK_KEY] == {"taskId": steps[0].removeprefix("created ")}
    assert plain.text == "Echo: hi"


@pytest.mark.reference
async def test_server_everythings_task_is_cancelled_when_the_call_times_out(everything_script: str) -> None:
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.stdio("everything", "node", [everything_script, "stdio"]))
        with pytest.raises(RMCPTimeoutAfterSendError) as raised:
            await sup.call("everything", "simulate-research-query", {"topic": "bees"}, timeout=1.5)
        created = _task_steps(raised.value.lifecycle)[0]
        assert created is not None
        task_id = created.removeprefix("created ")
        session = sup._servers["everything"].connection.current_session()  # pyright: ignore[reportPrivateUsage]
        assert session is not None
        assert session.client is not None
        status = await session.client.session.send_request(
            GetTaskRequest(params=GetTaskRequestParams(task_id=task_id)), GetTaskResult
        )
    assert status.status == "cancelled"


# -- Streamable HTTP: the connection is lost, the server's tasks are not ----------------------


async def test_a_task_outlives_an_http_server_restart() -> None:
    # Real time (hypercorn); the task state lives outside the app, as in a durable store, so a
    # restart drops the connections (and any session) and keeps the tasks. Polls fail while the
    # server is down: the call reconnects and polls the same task on the new connection.
    state = TasksState(poll_interval_ms=20)
    restarted_at: list[float] = []
    async with serve_http(build_tasks_server(state)) as http, RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.http("web", http.url, overrides=FAST_RECOVERY))

        async def restart_mid_task() -> None:
            while len(state.polls) < 2:
                await trio.sleep(0.01)
            await http.stop()
            await trio.sleep(0.2)  # a few polls find it down
            await http.restart()
            restarted_at.append(trio.current_time())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(restart_mid_task)
            result = await sup.call("web", "research", {"topic": "bees", "seconds": 1.0}, timeout=20)
        generation = sup.statistics().connections[0].generation
    assert result.text == "report on bees"
    assert generation >= 2
    assert any(at > restarted_at[0] for _, at in state.polls)  # polled on the new connection
    assert state.created == 1
    assert result.attempts == 1


def _refuse_polls(statuses: list[tuple[int, bytes | None]]) -> Any:
    """A proxy in front of the server that answers the next ``tasks/get`` POSTs with the given
    statuses (and ``Retry-After``, when given), one each, as a rate limiter or a busy gateway
    does (popped from the list as they are sent); the rest pass through."""

    def wrap(app: Any) -> Any:
        async def wrapped(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] != "http" or scope["method"] != "POST" or not statuses:
                await app(scope, receive, send)
                return
            body = b""
            while True:
                message = await receive()
                body += message.get("body", b"")
                if not message.get("more_body"):
                    break
            replayed = False

            async def replay() -> dict[str, Any]:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            if b'"tasks/get"' not in body:
                await app(scope, replay, send)
                return
            status, retry_after = statuses.pop(0)
            headers = [(b"content-type", b"text/plain")]
            if retry_after is not None:
                headers.append((b"retry-after", retry_after))
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": b"try again later"})

        return wrapped

    return wrap


async def test_a_poll_refused_with_429_or_503_is_polled_again() -> None:
    # Real time (hypercorn), kept short: Retry-After 0, then the task's 20 ms interval. A poll is
    # a read of a task that lives on the server: a rate limiter's 429 or a busy proxy's 503 asks
    # for the same poll later, not for the end of the call.
    state = TasksState(poll_interval_ms=20)
    refusals: list[tuple[int, bytes | None]] = [(429, b"0"), (503, None)]
    wrap = _refuse_polls(refusals)
    async with serve_http(build_tasks_server(state), wrap=wrap) as http, RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.http("web", http.url, overrides=FAST_RECOVERY))
        result = await sup.call("web", "research", {"topic": "bees", "seconds": 0.2}, task=True, timeout=20)
    assert result.text == "report on bees"
    assert refusals == []  # both refusals were met, and polled past
    assert state.created == 1
    assert result.attempts == 1
