"""A real MCP server speaking the ``io.modelcontextprotocol/tasks`` extension (2026-07-28), for
the client's task tests: built on the SDK's ``MCPServer`` and its extension interface.

A task's life is read off the event loop's clock (MockClock in the tests): it is ``working``
until ``seconds`` after its creation, then it ends as its tool says. Nothing runs in the
background, so the tasks outlive any session: they live in :class:`TasksState`, which the test
keeps (and may clear, as a server restart would). Run as a script, it serves over stdio.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import anyio
import attrs
from mcp import MCPError
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.extension import Extension, MethodBinding
from mcp.server.mcpserver import MCPServer
from mcp.types import CallToolRequestParams, RequestParams
from mcp_types import CLIENT_CAPABILITIES_META_KEY, INVALID_PARAMS

TASKS = "io.modelcontextprotocol/tasks"
TASK_TOOLS = ("research", "fails", "abandoned", "doubtful")
IN_DOUBT = {"rmcp": {"code": "in_doubt"}}
MISSING_CAPABILITY = -32021


@attrs.define
class Task:
    task_id: str
    tool: str
    arguments: dict[str, Any]
    created_at: float
    seconds: float
    cancelled: bool = False


@attrs.define
class TasksState:
    """What the server holds and what the test reads: tasks, polls (task id, time), cancels."""

    tasks: dict[str, Task] = attrs.Factory(dict[str, Task])
    created: int = 0
    polls: list[tuple[str, float]] = attrs.Factory(list[tuple[str, float]])
    cancels: list[str] = attrs.Factory(list[str])
    poll_interval_ms: int | None = 250
    # A cooperative server may acknowledge tasks/cancel and finish the work anyway.
    honour_cancel: bool = True
    # tasks/get never answers (a server that hangs).
    hang_polls: bool = False
    # A completed result without the structured content the tool's output schema requires.
    drop_structured: bool = False


class _TaskId(RequestParams):
    task_id: str


class _Tasks(Extension):
    identifier = TASKS

    def __init__(self, state: TasksState) -> None:
        self.state = state

    async def intercept_tool_call(
        self, params: CallToolRequestParams, ctx: ServerRequestContext[Any, Any], call_next: CallNext
    ) -> HandlerResult:
        if params.name not in TASK_TOOLS:
            return await call_next(ctx)
        capabilities = (params.meta or {}).get(CLIENT_CAPABILITIES_META_KEY) or {}
        if TASKS not in (capabilities.get("extensions") or {}):
            # The extension's rule: no task for a request that does not declare it.
            raise MCPError(
                MISSING_CAPABILITY,
                "Missing required client capability",
                {"requiredCapabilities": {"extensions": {TASKS: {}}}},
            )
        state = self.state
        state.created += 1
        arguments = dict(params.arguments or {})
        task = Task(
            f"task-{state.created}",
            params.name,
            arguments,
            anyio.current_time(),
            arguments.get("seconds", 1.0),
        )
        state.tasks[task.task_id] = task
        return {"resultType": "task", **self._view(task)}

    def methods(self) -> list[MethodBinding]:
        return [
            MethodBinding("tasks/get", _TaskId, self._get),
            MethodBinding("tasks/cancel", _TaskId, self._cancel),
        ]

    def _find(self, task_id: str) -> Task:
        task = self.state.tasks.get(task_id)
        if task is None:
            raise MCPError(INVALID_PARAMS, "Failed to retrieve task: Task not found")
        return task

    async def _get(self, ctx: ServerRequestContext[Any, Any], params: _TaskId) -> HandlerResult:
        self.state.polls.append((params.task_id, anyio.current_time()))
        if self.state.hang_polls:
            await anyio.sleep_forever()
        return {"resultType": "complete", **self._view(self._find(params.task_id))}

    async def _cancel(self, ctx: ServerRequestContext[Any, Any], params: _TaskId) -> HandlerResult:
        task = self._find(params.task_id)
        self.state.cancels.append(task.task_id)
        task.cancelled = self.state.honour_cancel
        return {"resultType": "complete"}

    def _view(self, task: Task) -> dict[str, Any]:
        view: dict[str, Any] = {
            "taskId": task.task_id,
            "createdAt": "2026-07-28T00:00:00Z",
            "lastUpdatedAt": "2026-07-28T00:00:00Z",
            "ttlMs": None,
        }
        if self.state.poll_interval_ms is not None:
            view["pollIntervalMs"] = self.state.poll_interval_ms
        elapsed = anyio.current_time() - task.created_at
        if task.cancelled:
            return {**view, "status": "cancelled"}
        if elapsed < task.seconds:
            stage = "halfway" if elapsed >= task.seconds / 2 else "started"
            return {**view, "status": "working", "statusMessage": stage}
        if task.tool == "fails":
            return {**view, "status": "failed", "error": {"code": -32603, "message": "the backend is down"}}
        if task.tool == "doubtful":
            error = {"code": -32603, "message": "RMCP in_doubt: the instance stopped", "data": IN_DOUBT}
            return {**view, "status": "failed", "error": error}
        if task.tool == "abandoned":
            return {**view, "status": "cancelled", "statusMessage": "operator stopped it"}
        text = f"report on {task.arguments.get('topic')}"
        result: dict[str, Any] = {"content": [{"type": "text", "text": text}], "isError": False}
        if not self.state.drop_structured:
            result["structuredContent"] = {"result": text}
        return {**view, "status": "completed", "result": result}


def build_tasks_server(state: TasksState) -> MCPServer:
    """The server: ``research`` (a task), ``fails`` (a task that fails with a JSON-RPC error),
    ``abandoned`` (a task the server cancels), ``doubtful`` (failed in doubt) and ``quick`` (a
    plain tool). The tools are async: the SDK runs a sync tool in a worker thread, which
    MockClock's autojump takes for idleness (and jumps the clock past the call's deadline)."""
    server = MCPServer("tasks", extensions=[_Tasks(state)])

    @server.tool()
    async def research(topic: str, seconds: float = 1.0) -> str:
        """Research a topic (runs as a task)."""
        raise AssertionError("answered by the tasks extension")

    @server.tool()
    async def fails(seconds: float = 1.0) -> str:
        """A task whose work fails."""
        raise AssertionError("answered by the tasks extension")

    @server.tool()
    async def abandoned(seconds: float = 1.0) -> str:
        """A task the server cancels."""
        raise AssertionError("answered by the tasks extension")

    @server.tool()
    async def doubtful(seconds: float = 1.0) -> str:
        """A task whose instance died: it failed in doubt (as an RMCP server says)."""
        raise AssertionError("answered by the tasks extension")

    @server.tool()
    async def quick(x: int) -> int:
        """A plain tool."""
        return x

    @server.tool()
    async def pid() -> int:
        """The server's process id (to kill it over stdio)."""
        return os.getpid()

    return server


if __name__ == "__main__":
    # Over stdio (python tests/tasks_servers.py [poll interval ms]): the tasks live in this
    # process and die with it.
    interval = int(sys.argv[1]) if len(sys.argv) > 1 else 250
    build_tasks_server(TasksState(poll_interval_ms=interval)).run("stdio")
