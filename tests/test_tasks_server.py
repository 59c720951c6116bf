"""Tools run as MCP tasks on an RMCP server (``docs/protocol.md`` section 8).

The server is the real test server (``install(..., tasks=True)``), in memory in both protocol
modes (legacy: 2025-11-25 core tasks; auto: 2026-07-28, the extension), over Streamable HTTP, and
as a stdio subprocess on a SQLite store. It is
driven with the SDK's own client session: requests are stamped as the session stamps every
request and sent as they are, since the SDK has no client for ``tasks/*``.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any, cast

import mcp
import pytest
import trio
import trio.testing
from conftest import PYTHON, stdio_args
from mcp import MCPError, StdioServerParameters
from mcp.server.mcpserver import MCPServer
from mcp_test_server import State, build_server
from mcp_types import (
    CLIENT_CAPABILITIES_META_KEY,
    INVALID_PARAMS,
    METHOD_NOT_FOUND,
    MISSING_REQUIRED_CLIENT_CAPABILITY,
)

from rmcp_actors import FastRMCP, RMCPConfigError
from rmcp_actors._protocol import fingerprint
from rmcp_actors.server import install, rmcp_of, store_key
from rmcp_actors.server.tasks import TASKS_EXTENSION_ID, principal_scope
from rmcp_actors.stores import DedupStore, MemoryStore, SQLiteStore, TaskRecord, TaskState

PROTOCOLS = ["legacy", "auto"]
# Server subprocesses import this checkout's rmcp_actors (the SDK's default environment drops PYTHONPATH).
SAME_PACKAGE = {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
TERMINAL = {"completed", "failed", "cancelled"}


async def send(
    client: mcp.Client, method: str, params: dict[str, Any], *, task: bool = False
) -> dict[str, Any]:
    """Send ``method`` through the client's session as a wire dict and return the wire answer.

    ``task``: on 2026-07-28, declare the tasks extension in this request's capabilities (how a
    client asks for a task there); on 2025-11-25 the caller puts ``task`` in the params.
    """
    session = client.session
    data: dict[str, Any] = {"method": method, "params": dict(params)}
    options: Any = {}
    session._stamp(data, options)  # pyright: ignore[reportPrivateUsage]
    meta = data["params"].get("_meta") or {}
    if task and CLIENT_CAPABILITIES_META_KEY in meta:
        capabilities = dict(meta[CLIENT_CAPABILITIES_META_KEY])
        capabilities["extensions"] = {**(capabilities.get("extensions") or {}), TASKS_EXTENSION_ID: {}}
        meta[CLIENT_CAPABILITIES_META_KEY] = capabilities
    return await session._dispatcher.send_raw_request(method, data["params"], options)  # pyright: ignore[reportPrivateUsage]


def rmcp(key: str | None, attempt: int = 1) -> dict[str, Any]:
    fields: dict[str, Any] = {"version": "0.2", "request_id": f"req-{key}", "attempt": attempt}
    if key is not None:
        fields["idempotency_key"] = key
    return {"rmcp": fields}


async def call_as_task(
    client: mcp.Client,
    tool: str,
    arguments: dict[str, Any],
    *,
    key: str | None = None,
    attempt: int = 1,
    ttl_ms: int | None = None,
) -> dict[str, Any]:
    params: dict[str, Any] = {
        "name": tool,
        "arguments": arguments,
        "task": {} if ttl_ms is None else {"ttl": ttl_ms},
    }
    if key is not None:
        params["_meta"] = rmcp(key, attempt)
    return await send(client, "tools/call", params, task=True)


def task_of(handle: dict[str, Any]) -> dict[str, Any]:
    """The task of a ``CreateTaskResult`` in either wire form."""
    if "task" in handle:
        return handle["task"]
    assert handle["resultType"] == "task"
    return handle


async def get(client: mcp.Client, task_id: str) -> dict[str, Any]:
    return await send(client, "tasks/get", {"taskId": task_id}, task=True)


async def poll(client: mcp.Client, task_id: str) -> dict[str, Any]:
    """Poll ``tasks/get`` as a client should (at ``pollInterval``) until the task is terminal."""
    while True:
        task = await get(client, task_id)
        if task["status"] in TERMINAL:
            return task
        await trio.sleep((task.get("pollIntervalMs") or task.get("pollInterval") or 1000) / 1000)


async def final_result(client: mcp.Client, task_id: str) -> dict[str, Any]:
    """The task's final ``CallToolResult``: ``tasks/result`` on 2025-11-25, inlined on 2026-07-28."""
    if client.protocol_version == "2025-11-25":
        return await send(client, "tasks/result", {"taskId": task_id})
    task = await poll(client, task_id)
    return task["result"]


def text(result: dict[str, Any]) -> str:
    return result["content"][0]["text"]


def tasks_server(state: State, store: DedupStore | None = None, **options: Any) -> MCPServer:
    return build_server(
        state, store=MemoryStore(clock=trio.current_time) if store is None else store, tasks=True, **options
    )


# --- Advertisement, and plain peers ------------------------------------------------------------


@pytest.mark.parametrize("mode", PROTOCOLS)
async def test_tasks_are_advertised_only_when_enabled(state: State, mode: Any) -> None:
    async with mcp.Client(tasks_server(state), mode=mode) as client:
        capabilities = client.server_capabilities
        tools = (await send(client, "tools/list", {}))["tools"]
    async with mcp.Client(build_server(State(), store=MemoryStore()), mode=mode) as client:
        plain_capabilities = client.server_capabilities
        plain_tools = (await send(client, "tools/list", {}))["tools"]
    assert capabilities.tasks is not None
    assert capabilities.tasks.requests is not None
    assert capabilities.extensions is not None
    assert TASKS_EXTENSION_ID in capabilities.extensions
    support = {tool["name"]: tool["execution"]["taskSupport"] for tool in tools}
    assert support["record"] == "optional"
    assert support["forbidden"] == "forbidden"
    assert support["required"] == "required"
    assert "tasks" in (capabilities.experimental or {})["rmcp"]["features"]
    assert plain_capabilities.tasks is None
    assert TASKS_EXTENSION_ID not in (plain_capabilities.extensions or {})
    assert all("execution" not in tool for tool in plain_tools)
    assert "tasks" not in (plain_capabilities.experimental or {})["rmcp"]["features"]


@pytest.mark.parametrize("mode", PROTOCOLS)
async def test_plain_calls_on_a_tasks_server_are_unaffected(state: State, mode: Any) -> None:
    async with mcp.Client(tasks_server(state), mode=mode) as client:
        result = await client.call_tool("record", {"label": "plain"})
        again = await client.call_tool("record", {"label": "plain"})
    assert text(result.model_dump(by_alias=True)) == "recorded plain"
    assert again.is_error is False
    assert state.ledger == ["plain", "plain"]


async def test_a_server_without_tasks_runs_a_legacy_task_call_normally(state: State) -> None:
    async with mcp.Client(build_server(state, store=MemoryStore()), mode="legacy") as client:
        answer = await send(
            client, "tools/call", {"name": "record", "arguments": {"label": "x"}, "task": {"ttl": 1000}}
        )
    assert text(answer) == "recorded x"
    assert "task" not in answer
    assert state.ledger == ["x"]


@pytest.mark.parametrize("mode", PROTOCOLS)
async def test_task_support_is_enforced(state: State, mode: Any) -> None:
    async with mcp.Client(tasks_server(state), mode=mode) as client:
        with pytest.raises(MCPError) as forbidden:
            await call_as_task(client, "forbidden", {})
        with pytest.raises(MCPError) as required:
            await client.call_tool("required", {})
        handle = task_of(await call_as_task(client, "required", {}))
        result = await final_result(client, handle["taskId"])
    assert forbidden.value.error.code == METHOD_NOT_FOUND
    expected = METHOD_NOT_FOUND if mode == "legacy" else MISSING_REQUIRED_CLIENT_CAPABILITY
    assert required.value.error.code == expected
    assert text(result) == "required ran"


# --- Call as a task, poll, result ----------------------------------------------------------


@pytest.mark.parametrize("mode", PROTOCOLS)
async def test_call_as_task_poll_to_completion_and_get_the_result(
    state: State, mode: Any, autojump_clock: trio.testing.MockClock
) -> None:
    async with mcp.Client(tasks_server(state), mode=mode) as client:
        handle = await call_as_task(client, "block_unsafe", {"label": "slow", "seconds": 30}, ttl_ms=600_000)
        task = task_of(handle)
        # The answer came at once: the tool is still sleeping.
        assert task["status"] == "working"
        assert state.ledger == []
        assert (task.get("ttlMs") or task.get("ttl")) == 600_000
        assert (task.get("pollIntervalMs") or task.get("pollInterval")) == 1000
        done = await poll(client, task["taskId"])
        result = await final_result(client, task["taskId"])
    assert done["status"] == "completed"
    assert text(result) == "done slow"
    assert state.ledger == ["slow"]
    if mode == "legacy":
        assert result["_meta"]["io.modelcontextprotocol/related-task"] == {"taskId": task["taskId"]}


@pytest.mark.parametrize("mode", PROTOCOLS)
async def test_tool_errors_end_the_task_as_each_protocol_says(state: State, mode: Any) -> None:
    async with mcp.Client(tasks_server(state), mode=mode) as client:
        failing = task_of(await call_as_task(client, "fail", {"reason": "no"}))["taskId"]
        rpc = task_of(await call_as_task(client, "rpc_error", {}))["taskId"]
        failing_task = await poll(client, failing)
        rpc_task = await poll(client, rpc)
        if mode == "legacy":
            failing_result = await send(client, "tasks/result", {"taskId": failing})
            with pytest.raises(MCPError) as raised:
                await send(client, "tasks/result", {"taskId": rpc})
            # 2025-11-25: a tool error result is a failed task; tasks/result still answers it.
            assert failing_task["status"] == "failed"
            assert failing_result["isError"] is True
            assert raised.value.error.code == -32050
    if mode != "legacy":
        # 2026-07-28: a tool error result completes the task; a JSON-RPC error fails it.
        assert failing_task["status"] == "completed"
        assert failing_task["result"]["isError"] is True
        assert rpc_task["error"]["code"] == -32050
    assert rpc_task["status"] == "failed"


# --- Idempotent creation ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", PROTOCOLS)
async def test_a_retried_task_call_gets_the_same_task_and_the_tool_runs_once(
    state: State, mode: Any, autojump_clock: trio.testing.MockClock
) -> None:
    async with mcp.Client(tasks_server(state), mode=mode) as client:
        first = await call_as_task(client, "block_unsafe", {"label": "once", "seconds": 5}, key="K")
        # The handle was lost: the client retries with the same key, while the task runs ...
        second = await call_as_task(
            client, "block_unsafe", {"label": "once", "seconds": 5}, key="K", attempt=2
        )
        await poll(client, task_of(first)["taskId"])
        # ... and after it finished.
        third = await call_as_task(
            client, "block_unsafe", {"label": "once", "seconds": 5}, key="K", attempt=3
        )
        other = await call_as_task(
            client, "block_unsafe", {"label": "other", "seconds": 5}, key="K", attempt=4
        )
    ids = {task_of(answer)["taskId"] for answer in (first, second, third)}
    assert len(ids) == 1
    assert [answer["_meta"]["rmcp"]["duplicate"] for answer in (first, second, third)] == [False, True, True]
    assert task_of(third)["status"] == "completed"
    assert state.ledger == ["once"]
    # Same key, other arguments: the existing conflict NACK, never a task.
    assert other["isError"] is True
    assert other["_meta"]["rmcp"]["code"] == "idempotency_conflict"


@pytest.mark.parametrize("mode", PROTOCOLS)
async def test_task_calls_without_a_key_create_a_task_each(state: State, mode: Any) -> None:
    async with mcp.Client(tasks_server(state), mode=mode) as client:
        first = task_of(await call_as_task(client, "record", {"label": "a"}))["taskId"]
        second = task_of(await call_as_task(client, "record", {"label": "a"}))["taskId"]
        await poll(client, first)
        await poll(client, second)
    assert first != second
    assert state.ledger == ["a", "a"]


async def test_task_calls_are_admitted_as_any_rmcp_call(state: State) -> None:
    async with mcp.Client(tasks_server(state), mode="legacy") as client:
        unknown = await call_as_task(client, "nope", {}, key="K1")
        invalid = await call_as_task(client, "add", {"a": "x", "b": 1}, key="K2")
    assert unknown["_meta"]["rmcp"]["code"] == "unknown_tool"
    assert invalid["_meta"]["rmcp"]["code"] == "invalid_arguments"


# --- tasks/get is a pure read --------------------------------------------------------------


async def test_tasks_get_never_changes_a_task(state: State, autojump_clock: trio.testing.MockClock) -> None:
    store = MemoryStore(clock=trio.current_time)
    app = tasks_server(state, store)
    async with mcp.Client(app, mode="auto") as client:
        task_id = task_of(await call_as_task(client, "block_unsafe", {"label": "p", "seconds": 10}, key="P"))[
            "taskId"
        ]
        before = await store.get_task(task_id)
        reads = [await get(client, task_id) for _ in range(5)]
        after = await store.get_task(task_id)
        assert before == after
        assert {read["status"] for read in reads} == {"working"}
        assert {read["lastUpdatedAt"] for read in reads} == {before.updated_at if before else None}
        await poll(client, task_id)
    assert state.ledger == ["p"]


async def test_a_task_whose_owner_died_reads_failed_and_is_never_run_again(state: State) -> None:
    store = MemoryStore(clock=trio.current_time)
    app = tasks_server(state, store)
    # A working task of an instance that is gone (written as a crashed server would leave it).
    dead = await store.create_task(
        TaskRecord(
            task_id="deadbeef" * 4,
            scope=principal_scope(None),
            fingerprint=fingerprint("record", {"label": "d"}),
            key=store_key("D"),
            tool="record",
            state=TaskState.WORKING,
            owner="dead-instance",
            created_at="2026-01-01T00:00:00+00:00",
            updated_at="2026-01-01T00:00:00+00:00",
        ),
        ttl_s=60,
    )
    async with mcp.Client(app, mode="auto") as client:
        read = await get(client, dead.task.task_id)
        again = await get(client, dead.task.task_id)
        stored = await store.get_task(dead.task.task_id)
        retried = task_of(await call_as_task(client, "record", {"label": "d"}, key="D", attempt=2))
    assert read["status"] == "failed"
    assert read["error"]["data"]["rmcp"]["code"] == "in_doubt"
    assert "may or may not have run" in read["statusMessage"]
    assert again == read
    # Pure: the store still holds it as it was written; a retry of its key gets it, not a run.
    assert stored is not None
    assert stored.state is TaskState.WORKING
    assert retried["taskId"] == dead.task.task_id
    assert retried["status"] == "failed"
    assert state.ledger == []


@pytest.mark.parametrize("mode", PROTOCOLS)
async def test_unknown_tasks_and_other_principals_tasks_are_not_found(state: State, mode: Any) -> None:
    store = MemoryStore(clock=trio.current_time)
    app = tasks_server(state, store)
    theirs = await store.create_task(
        TaskRecord(
            task_id="0123" * 8,
            key=None,
            scope=principal_scope("someone else"),
            fingerprint=fingerprint("record", {"label": "theirs"}),
            tool="record",
            state=TaskState.WORKING,
            owner="their-instance",
            created_at="2026-01-01T00:00:00+00:00",
            updated_at="2026-01-01T00:00:00+00:00",
        ),
        ttl_s=60,
    )
    async with mcp.Client(app, mode=mode) as client:
        with pytest.raises(MCPError) as unknown:
            await get(client, "no-such-task")
        with pytest.raises(MCPError) as other:
            await get(client, theirs.task.task_id)
        with pytest.raises(MCPError) as cancel:
            await send(client, "tasks/cancel", {"taskId": theirs.task.task_id}, task=True)
    assert unknown.value.error.code == other.value.error.code == cancel.value.error.code == INVALID_PARAMS
    assert "not found or expired" in unknown.value.error.message
    assert other.value.error.message == unknown.value.error.message


async def test_tasks_list_pages_through_the_callers_tasks(state: State) -> None:
    async with mcp.Client(tasks_server(state), mode="legacy") as client:
        created = [
            task_of(await call_as_task(client, "record", {"label": str(n)}))["taskId"] for n in range(3)
        ]
        listed = await send(client, "tasks/list", {})
        with pytest.raises(MCPError) as bad_cursor:
            await send(client, "tasks/list", {"cursor": "not-a-cursor"})
    assert [task["taskId"] for task in listed["tasks"]] == created
    assert "nextCursor" not in listed
    assert bad_cursor.value.error.code == INVALID_PARAMS


async def test_modern_tasks_methods_require_the_extension(state: State) -> None:
    async with mcp.Client(tasks_server(state), mode="auto") as client:
        task_id = task_of(await call_as_task(client, "record", {"label": "m"}))["taskId"]
        with pytest.raises(MCPError) as refused:
            await send(client, "tasks/get", {"taskId": task_id})
        with pytest.raises(MCPError) as legacy_only:
            await send(client, "tasks/result", {"taskId": task_id}, task=True)
    assert refused.value.error.code == MISSING_REQUIRED_CLIENT_CAPABILITY
    assert legacy_only.value.error.code == METHOD_NOT_FOUND


# --- ttl ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", PROTOCOLS)
async def test_an_expired_task_is_not_found_and_purged(
    state: State, mode: Any, autojump_clock: trio.testing.MockClock
) -> None:
    store = MemoryStore(clock=trio.current_time)
    async with mcp.Client(tasks_server(state, store), mode=mode) as client:
        created = trio.current_time()
        task_id = task_of(await call_as_task(client, "record", {"label": "t"}, key="T", ttl_ms=10_000))[
            "taskId"
        ]
        assert (await poll(client, task_id))["status"] == "completed"
        await trio.sleep_until(created + 9.5)
        assert (await get(client, task_id))["status"] == "completed"
        await trio.sleep_until(created + 10.5)
        with pytest.raises(MCPError) as expired:
            await get(client, task_id)
        purged = await store.purge_expired()
        # Past its lifetime the key no longer holds it: a new task, a new run.
        fresh = task_of(await call_as_task(client, "record", {"label": "t"}, key="T", attempt=2))
        await poll(client, fresh["taskId"])
    assert expired.value.error.code == INVALID_PARAMS
    assert purged >= 1
    assert fresh["taskId"] != task_id
    assert state.ledger == ["t", "t"]


async def test_a_working_task_outlives_its_ttl_and_keeps_it_after_it_finishes(
    state: State, autojump_clock: trio.testing.MockClock
) -> None:
    async with mcp.Client(tasks_server(state), mode="auto") as client:
        task_id = task_of(
            await call_as_task(
                client, "block_unsafe", {"label": "long", "seconds": 10.5}, key="L", ttl_ms=2000
            )
        )["taskId"]
        await trio.sleep(5)
        working = await get(client, task_id)
        done = await poll(client, task_id)
        # It finished at 10.5 s, past its 2 s: kept 2 s from then.
        await trio.sleep(0.5)
        kept = await get(client, task_id)
    assert working["status"] == "working"
    assert done["status"] == kept["status"] == "completed"
    assert kept["ttlMs"] > 2000


async def test_requested_ttls_are_clamped_to_the_stores(state: State) -> None:
    store = MemoryStore(clock=trio.current_time, ttl_s=60)
    async with mcp.Client(tasks_server(state, store), mode="legacy") as client:
        long = task_of(await call_as_task(client, "record", {"label": "a"}, ttl_ms=10_000_000))
        short = task_of(await call_as_task(client, "record", {"label": "b"}, ttl_ms=1))
        default = task_of(await call_as_task(client, "record", {"label": "c"}))
    assert long["ttl"] == 60_000
    assert short["ttl"] == 1000
    assert default["ttl"] == 60_000


# --- pollInterval from the limiter ----------------------------------------------------------


async def test_poll_interval_follows_the_rate_limiter(
    state: State, autojump_clock: trio.testing.MockClock
) -> None:
    app = build_server(state)
    install(app, store=MemoryStore(clock=trio.current_time), tasks=True, rate_limit_per_s=0.25)
    async with mcp.Client(app, mode="legacy") as client:
        first = task_of(await call_as_task(client, "record", {"label": "a"}, key="A"))
        # The one token is gone: the limiter needs 4 s for the next.
        later = await get(client, first["taskId"])
    assert first["pollInterval"] == 4000
    assert later["pollInterval"] == 4000


# --- cancel ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", PROTOCOLS)
async def test_cancel_stops_the_run_and_records_cancelled(
    state: State, mode: Any, autojump_clock: trio.testing.MockClock
) -> None:
    async with mcp.Client(tasks_server(state), mode=mode) as client:
        handle = await call_as_task(client, "slow_once", {"label": "c", "seconds": 60}, key="C")
        task_id = task_of(handle)["taskId"]
        await trio.sleep(1)
        answer = await send(client, "tasks/cancel", {"taskId": task_id}, task=True)
        read = await get(client, task_id)
        await trio.sleep(1)
        later = await get(client, task_id)
        retried = await call_as_task(client, "slow_once", {"label": "c", "seconds": 60}, key="C", attempt=2)
        if mode == "legacy":
            with pytest.raises(MCPError) as again:
                await send(client, "tasks/cancel", {"taskId": task_id})
            assert again.value.error.code == INVALID_PARAMS
            with pytest.raises(MCPError) as result:
                await send(client, "tasks/result", {"taskId": task_id})
            assert "cancelled" in result.value.error.message.lower()
    assert read["status"] == later["status"] == "cancelled"
    # The tool saw the cancellation; the key still answers with this task, not a new run.
    assert [entry.split()[:2] for entry in state.ledger] == [["cancelled", "c"]]
    assert task_of(retried)["taskId"] == task_id
    assert task_of(retried)["status"] == "cancelled"
    if mode == "legacy":
        assert answer["status"] == "cancelled"
    else:
        assert answer.get("resultType") == "complete"


async def test_drain_waits_for_task_runs_and_refuses_new_task_calls(
    state: State, autojump_clock: trio.testing.MockClock
) -> None:
    app = tasks_server(state)
    side = rmcp_of(app)
    assert side is not None
    async with mcp.Client(app, mode="legacy") as client:
        task_id = task_of(await call_as_task(client, "block_unsafe", {"label": "d", "seconds": 5}, key="D"))[
            "taskId"
        ]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(side.drain, 60.0)
            await trio.sleep(1)
            refused = await call_as_task(client, "record", {"label": "late"}, key="LATE")
        # drain() returned: the run had finished (and recorded its result) before.
        done = await get(client, task_id)
    assert done["status"] == "completed"
    assert refused["_meta"]["rmcp"]["code"] == "shutting_down"
    assert state.ledger == ["d"]


# --- Tasks outlive the connection --------------------------------------------------------------


@pytest.mark.parametrize("mode", PROTOCOLS)
async def test_a_task_outlives_the_connection_that_created_it(state: State, mode: Any) -> None:
    """Over HTTP the server (and its lifespan) outlives each client: a new client connection
    reads the task that an earlier, closed one created, while it still runs."""
    from _http import serve_http

    app = tasks_server(state, MemoryStore())
    async with serve_http(app) as server:
        async with mcp.Client(server.url, mode=mode) as client:
            handle = await call_as_task(client, "block_unsafe", {"label": "h", "seconds": 0.5}, key="H")
        task_id = task_of(handle)["taskId"]
        async with mcp.Client(server.url, mode=mode) as client:
            working = await get(client, task_id)
            result = await final_result(client, task_id)
        await server.stop()
    assert working["status"] == "working"
    assert text(result) == "done h"
    assert state.ledger == ["h"]


async def test_sqlite_tasks_survive_a_server_restart(state: State, tmp_path: Path) -> None:
    path = tmp_path / "rmcp.sqlite"
    async with mcp.Client(tasks_server(state, SQLiteStore(path)), mode="legacy") as client:
        task_id = task_of(await call_as_task(client, "record", {"label": "s"}, key="S"))["taskId"]
        await poll(client, task_id)
    # A new server on the same file: the finished result is still served.
    async with mcp.Client(tasks_server(state, SQLiteStore(path)), mode="legacy") as client:
        read = await get(client, task_id)
        result = await send(client, "tasks/result", {"taskId": task_id})
        retried = task_of(await call_as_task(client, "record", {"label": "s"}, key="S", attempt=2))
    assert read["status"] == "completed"
    assert text(result) == "recorded s"
    assert retried["taskId"] == task_id
    assert state.ledger == ["s"]


async def test_a_task_cut_short_by_the_servers_end_reads_in_doubt(state: State, tmp_path: Path) -> None:
    path = tmp_path / "rmcp.sqlite"
    async with mcp.Client(tasks_server(state, SQLiteStore(path)), mode="auto") as client:
        task_id = task_of(
            await call_as_task(client, "block_unsafe", {"label": "cut", "seconds": 60}, key="X")
        )["taskId"]
        await trio.sleep(0.05)
    async with mcp.Client(tasks_server(state, SQLiteStore(path)), mode="auto") as client:
        read = await get(client, task_id)
        retried = task_of(
            await call_as_task(client, "block_unsafe", {"label": "cut", "seconds": 60}, key="X", attempt=2)
        )
    assert read["status"] == "failed"
    assert read["error"]["data"]["rmcp"]["code"] == "in_doubt"
    assert retried["taskId"] == task_id
    assert state.ledger == []


# --- Configuration ---------------------------------------------------------------------------


class _KeysOnly:
    """A store without tasks (only the dedup protocol)."""

    def __init__(self) -> None:
        self.inner = MemoryStore()

    def __getattr__(self, name: str) -> Any:
        if "task" in name:
            raise AttributeError(name)
        return getattr(self.inner, name)


def test_tasks_need_a_task_store() -> None:
    with pytest.raises(RMCPConfigError, match="cannot keep tasks"):
        install(MCPServer("x"), store=cast(DedupStore, _KeysOnly()), tasks=True)


def test_task_support_values_are_checked() -> None:
    with pytest.raises(RMCPConfigError, match=r"task_support\.record"):
        install(MCPServer("x"), store=MemoryStore(), tasks=True, task_support=cast(Any, {"record": "maybe"}))


async def test_fastrmcp_declares_task_support_per_tool() -> None:
    app = FastRMCP("fast", store=MemoryStore(), tasks=True)

    @app.tool(task_support="required")
    async def long_job() -> str:
        return "done"

    side = rmcp_of(app)
    assert side is not None
    assert side.tasks is not None
    async with mcp.Client(app, mode="legacy") as client:
        tools = (await send(client, "tools/list", {}))["tools"]
        task_id = task_of(await call_as_task(client, "long_job", {}))["taskId"]
        result = await send(client, "tasks/result", {"taskId": task_id})
    assert tools[0]["execution"] == {"taskSupport": "required"}
    assert text(result) == "done"


# --- Over stdio: a real server subprocess ------------------------------------------------------


def stdio_server(store: Path, state_dir: Path) -> StdioServerParameters:
    return StdioServerParameters(
        command=PYTHON,
        args=stdio_args("--tasks", "--rmcp-store", str(store), "--state-dir", str(state_dir)),
        env=SAME_PACKAGE,
    )


@pytest.mark.parametrize("mode", PROTOCOLS)
async def test_stdio_task_result_is_served_to_the_next_server_process(tmp_path: Path, mode: Any) -> None:
    store, state = tmp_path / "rmcp.sqlite", State(tmp_path)
    async with mcp.Client(stdio_server(store, tmp_path), mode=mode) as client:
        first = await call_as_task(client, "record", {"label": "io"}, key="IO")
        retried = await call_as_task(client, "record", {"label": "io"}, key="IO", attempt=2)
        task_id = task_of(first)["taskId"]
        assert (await poll(client, task_id))["status"] == "completed"
    # The connection (and with stdio, the server process) is gone; a new one reads the task.
    async with mcp.Client(stdio_server(store, tmp_path), mode=mode) as client:
        read = await get(client, task_id)
        result = await final_result(client, task_id)
    assert task_of(retried)["taskId"] == task_id
    assert read["status"] == "completed"
    assert text(result) == "recorded io"
    assert state.recorded() == ["io"]


@pytest.mark.parametrize("mode", PROTOCOLS)
async def test_stdio_task_of_a_killed_server_reads_in_doubt_and_never_runs_again(
    tmp_path: Path, mode: Any
) -> None:
    store, state = tmp_path / "rmcp.sqlite", State(tmp_path)
    async with mcp.Client(stdio_server(store, tmp_path), mode=mode) as client:
        handle = await call_as_task(client, "block_unsafe", {"label": "k", "seconds": 60}, key="KILL")
        server_pid = (await client.call_tool("pid", {})).structured_content
        assert server_pid is not None
        os.kill(server_pid["result"], signal.SIGKILL)
    task_id = task_of(handle)["taskId"]
    async with mcp.Client(stdio_server(store, tmp_path), mode=mode) as client:
        read = await get(client, task_id)
        retried = task_of(
            await call_as_task(client, "block_unsafe", {"label": "k", "seconds": 60}, key="KILL", attempt=2)
        )
    assert read["status"] == "failed"
    assert "may or may not have run" in read["statusMessage"]
    assert retried["taskId"] == task_id
    assert retried["status"] == "failed"
    assert state.recorded() == []


# --- Races between a task's creation and the store, drain --------------------------------------


class _GatedStore:
    """A MemoryStore whose task writes wait for the test: ``gate`` holds each ``create_task``
    before it writes (a store busy in a worker thread, or another process's write lock), and
    ``stall_s`` holds the first one's answer after it wrote (a commit that landed while its
    caller gave up: ``store_timeout_s``, or a request cancelled while its group commit ran)."""

    def __init__(
        self,
        *,
        gated: bool = False,
        stall_s: float = 0.0,
        finish_failures: int = 0,
        inner: DedupStore | None = None,
    ) -> None:
        # Any: the test reaches the TaskStore half of the store, which DedupStore does not name.
        self.inner: Any = MemoryStore(clock=trio.current_time) if inner is None else inner
        self.gate = trio.Event()
        if not gated:
            self.gate.set()
        self.creating = trio.Event()
        self.stall_s = stall_s
        self.finish_failures = finish_failures

    async def create_task(self, task: TaskRecord, *, ttl_s: float) -> Any:
        self.creating.set()
        await self.gate.wait()
        creation = await self.inner.create_task(task, ttl_s=ttl_s)
        stall_s, self.stall_s = self.stall_s, 0.0
        await trio.sleep(stall_s)
        return creation

    async def finish_task(self, task_id: str, **fields: Any) -> bool:
        if self.finish_failures:
            self.finish_failures -= 1
            raise OSError("the store's disk is full for now")
        return await self.inner.finish_task(task_id, **fields)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_drain_waits_for_a_task_call_still_writing_its_task(
    state: State, autojump_clock: trio.testing.MockClock
) -> None:
    store = _GatedStore(gated=True)
    app = tasks_server(state, cast(DedupStore, store))
    side = rmcp_of(app)
    assert side is not None
    handles: list[dict[str, Any]] = []
    async with mcp.Client(app, mode="auto") as client:

        async def create() -> None:
            handles.append(await call_as_task(client, "block_unsafe", {"label": "w", "seconds": 5}, key="W"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(create)
            await store.creating.wait()
            # Admitted before the drain began, its task not written yet.
            nursery.start_soon(side.drain, 60.0)
            await trio.testing.wait_all_tasks_blocked()
            store.gate.set()
        read = await get(client, task_of(handles[0])["taskId"])
    # drain() returned once the call's run had finished: the instance was not released under
    # a task it was running (which would have read failed, in doubt, while it ran).
    assert read["status"] == "completed"
    assert state.ledger == ["w"]


@pytest.mark.parametrize("mode", PROTOCOLS)
async def test_a_task_written_after_its_call_gave_up_runs_for_the_retry_of_its_key(
    state: State, mode: Any, autojump_clock: trio.testing.MockClock
) -> None:
    store = _GatedStore(stall_s=60.0)
    final: dict[str, Any] = {}
    async with mcp.Client(tasks_server(state, cast(DedupStore, store)), mode=mode) as client:
        # The write lands; its answer comes after store_timeout_s (15 s): NACK unavailable.
        first = await call_as_task(client, "record", {"label": "o"}, key="O")
        retried = task_of(await call_as_task(client, "record", {"label": "o"}, key="O", attempt=2))
        with trio.move_on_after(600):
            final = await poll(client, retried["taskId"])
    assert first["_meta"]["rmcp"]["code"] == "unavailable"
    # The retry got the task that was written, and it ran (once), rather than a task that no
    # run would ever finish, holding the key for as long as the instance lives.
    assert final.get("status") == "completed"
    assert state.ledger == ["o"]


@pytest.mark.parametrize("mode", PROTOCOLS)
async def test_an_outcome_the_store_refused_once_is_written_later(
    state: State, mode: Any, autojump_clock: trio.testing.MockClock
) -> None:
    store = _GatedStore(finish_failures=1)
    final: dict[str, Any] = {}
    async with mcp.Client(tasks_server(state, cast(DedupStore, store)), mode=mode) as client:
        task_id = task_of(await call_as_task(client, "record", {"label": "f"}, key="F"))["taskId"]
        with trio.move_on_after(600):
            final = await poll(client, task_id)
        retried = task_of(await call_as_task(client, "record", {"label": "f"}, key="F", attempt=2))
    # The run's result is kept and written once the store takes it, not lost with the task
    # left working (and its key held) for as long as the instance lives.
    assert final.get("status") == "completed"
    assert retried["status"] == "completed"
    assert state.ledger == ["f"]


async def test_concurrent_task_calls_with_one_key_share_one_task(state: State, tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "rmcp.sqlite")
    answers: list[dict[str, Any]] = []
    async with mcp.Client(tasks_server(state, store), mode="legacy") as client:

        async def create(attempt: int) -> None:
            answers.append(await call_as_task(client, "record", {"label": "c"}, key="C", attempt=attempt))

        async with trio.open_nursery() as nursery:
            for attempt in range(1, 5):
                nursery.start_soon(create, attempt)
        task_ids = {task_of(answer)["taskId"] for answer in answers}
        result = await send(client, "tasks/result", {"taskId": next(iter(task_ids))})
    assert len(task_ids) == 1
    assert sorted(answer["_meta"]["rmcp"]["duplicate"] for answer in answers) == [False, True, True, True]
    assert text(result) == "recorded c"
    assert state.ledger == ["c"]


async def test_a_task_outlives_another_connection_closing(
    state: State, autojump_clock: trio.testing.MockClock
) -> None:
    app = tasks_server(state)
    async with mcp.Client(app, mode="legacy") as first:
        async with mcp.Client(app, mode="legacy"):
            task_id = task_of(
                await call_as_task(first, "block_unsafe", {"label": "m", "seconds": 5}, key="M")
            )["taskId"]
            await trio.sleep(1)
        read = await poll(first, task_id)
    assert read["status"] == "completed"
    assert state.ledger == ["m"]


@pytest.mark.parametrize("mode", PROTOCOLS)
async def test_a_lookup_sent_as_a_task_call_never_runs_the_tool(state: State, mode: Any) -> None:
    async with mcp.Client(tasks_server(state), mode=mode) as client:
        params: dict[str, Any] = {"name": "record", "arguments": {"label": "l"}, "task": {}}
        params["_meta"] = {"rmcp": {**rmcp("LK")["rmcp"], "lookup": True}}
        answer = await send(client, "tools/call", params, task=True)
        listed = await send(client, "tasks/list", {}) if mode == "legacy" else {"tasks": []}
    # Section 5: a lookup never runs the tool. As a task it could not say what became of the
    # key without creating (and running) one, so it is refused.
    assert answer["isError"] is True
    assert answer["_meta"]["rmcp"]["ack"] is False
    assert answer["_meta"]["rmcp"]["code"] == "invalid_meta"
    assert listed["tasks"] == []
    assert state.ledger == []


async def test_an_outcome_still_unwritten_at_shutdown_is_written_before_the_owner_goes(
    state: State, tmp_path: Path
) -> None:
    path = tmp_path / "rmcp.sqlite"
    store = _GatedStore(finish_failures=1, inner=SQLiteStore(path))
    async with mcp.Client(tasks_server(state, cast(DedupStore, store)), mode="legacy") as client:
        task_id = task_of(await call_as_task(client, "record", {"label": "u"}, key="U"))["taskId"]
        with trio.fail_after(10):
            while not state.ledger:
                await trio.sleep(0.01)
        # The run ended and the store refused its outcome; the server stops before the lease
        # keeper writes it again.
    async with mcp.Client(tasks_server(state, SQLiteStore(path)), mode="legacy") as client:
        read = await get(client, task_id)
    assert read["status"] == "completed"
    assert state.ledger == ["u"]
