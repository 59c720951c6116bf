"""Tool calls run as MCP tasks: the 2025-11-25 core tasks and the 2026-07-28 extension
``io.modelcontextprotocol/tasks`` (``docs/protocol.md`` section 8).

:class:`TaskEngine` keeps task records in the server's :class:`~rmcp_actors.stores.TaskStore`,
runs each task's tool in a task group owned by the server's lifespan (not by the request, so
``tools/call`` answers at once with the handle), and serves ``tasks/*``. It is the SDK's
:class:`~mcp.server.extension.Extension` for the new request methods; the ``tools/call`` side
lives in the RMCP middleware, which must see a call before anything else (admission, dedup).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar, cast

import anyio
import attrs
from mcp import MCPError
from mcp.server.context import HandlerResult, ServerRequestContext
from mcp.server.extension import Extension, MethodBinding, RequestHandler
from mcp.server.mcpserver.server import require_client_extension
from mcp.server.request_state import authenticated_principal
from mcp_types import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    METHOD_NOT_FOUND,
    MISSING_REQUIRED_CLIENT_CAPABILITY,
    CancelTaskRequestParams,
    GetTaskPayloadRequestParams,
    GetTaskRequestParams,
    PaginatedRequestParams,
    RequestParams,
)
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import Field

from .._protocol import META_KEY, NackCode
from ..errors import RMCPStoreError
from ..stores import TaskCreation, TaskRecord, TaskState, TaskStore
from ._wire import StoredOutcome, decode_outcome, encode_outcome

__all__ = ["TASKS_EXTENSION_ID", "TaskEngine", "TaskSupport", "TasksExtension", "principal_scope"]

_T = TypeVar("_T")

TASKS_EXTENSION_ID = "io.modelcontextprotocol/tasks"
RELATED_TASK_KEY = "io.modelcontextprotocol/related-task"
_LEGACY_VERSION = "2025-11-25"
_LIST_PAGE = 100
_MIN_TTL_S = 1.0
# A tasks/result waiting on a task of another process polls the store at growing intervals.
_FOREIGN_POLL_FIRST_S = 0.01
_FOREIGN_POLL_MAX_S = 0.5

TaskSupport = Literal["optional", "required", "forbidden"]
"""A tool's ``execution.taskSupport``: may, must, or must not be called as a task."""

StoreCall = Callable[[str, Callable[[], Awaitable[Any]]], Awaitable[Any]]
"""Runs one store call within the server's ``store_timeout_s`` (``RMCPServerSide``'s)."""

IN_DOUBT_MESSAGE = (
    "RMCP in_doubt: the server instance running this task stopped before it recorded an outcome; "
    "the tool may or may not have run; check its effect"
)
_NOT_FOUND = "Failed to retrieve task: task not found or expired"


def in_doubt_error() -> dict[str, Any]:
    """The JSON-RPC error object of a task whose run never recorded an outcome."""
    return {
        "code": INTERNAL_ERROR,
        "message": IN_DOUBT_MESSAGE,
        "data": {META_KEY: {"code": NackCode.IN_DOUBT.value}},
    }


def _now_iso() -> str:
    return datetime.now(UTC).isoformat()


class UpdateTaskRequestParams(RequestParams):
    """``tasks/update`` params (2026-07-28): responses to a task's input requests."""

    task_id: str
    input_responses: dict[str, Any] | None = Field(default=None)


@attrs.define(eq=False)
class _LocalRun:
    """A task's run in this process: ``tasks/cancel`` cancels its scope, ``tasks/result`` waits."""

    done: anyio.Event = attrs.Factory(anyio.Event)
    scope: anyio.CancelScope | None = None
    cancelled: bool = False


class _Host:
    """The task group of one server lifespan; the task runs its requests start live in it.

    Not a generator with ``yield`` inside a task group: the lifespan block's own exception
    must leave unchanged, not wrapped in an exception group. On exit the runs are cancelled;
    each records itself as in doubt (its tool may have had its effect) before the group ends.
    """

    def __init__(self, engine: TaskEngine, state: object) -> None:
        self._engine = engine
        self.state = state
        """What the lifespan yielded: its requests carry it (``ctx.lifespan_context``)."""
        self.group = anyio.create_task_group()

    async def __aenter__(self) -> None:
        await self.group.__aenter__()
        self._engine.hosts.append(self)

    async def __aexit__(self, *exc_info: object) -> None:
        self._engine.hosts.remove(self)
        self.group.cancel_scope.cancel()
        await self.group.__aexit__(None, None, None)


@attrs.define(eq=False)
class TaskEngine:
    """The tasks of one installed RMCP server side (see :func:`rmcp_actors.server.install`)."""

    store: TaskStore
    instance_id: str
    store_call: StoreCall
    limiter_wait_ms: Callable[[], int]
    """Milliseconds until the server's rate limiter holds a token again (0 without one)."""
    default_ttl_s: float = 3600.0
    poll_interval_s: float = 1.0
    support: dict[str, TaskSupport] = attrs.field(factory=dict[str, TaskSupport])
    """Per tool, its ``taskSupport``; a tool not named here is ``"optional"``."""
    hosts: list[_Host] = attrs.field(factory=list[_Host], init=False)
    """The lifespans running now, oldest first (over in-memory transports, one a connection)."""
    _runs: dict[str, _LocalRun] = attrs.field(factory=dict[str, _LocalRun], init=False)
    # Keyed tasks whose creation raised (store_timeout_s, or the request cancelled while its
    # group commit ran): written perhaps, never run. A retry of the key finding one runs it.
    _unconfirmed: set[str] = attrs.field(factory=set[str], init=False)
    # Outcomes of runs here that the store refused (task id -> state, result, message).
    _unfinished: dict[str, tuple[TaskState, bytes, str | None]] = attrs.field(
        factory=dict[str, tuple[TaskState, bytes, str | None]], init=False
    )

    def support_of(self, tool: str) -> TaskSupport:
        """The ``taskSupport`` of ``tool``."""
        return self.support.get(tool, "optional")

    def hosting(self, state: object = None) -> _Host:
        """A context for the server's lifespan, which yielded ``state``: the task runs its
        requests start live in its task group, and are cancelled (recorded in doubt) when it
        ends."""
        return _Host(self, state)

    @property
    def running(self) -> int:
        """Task runs in progress in this process."""
        return len(self._runs)

    async def wait_idle(self) -> None:
        """Return once no task runs in this process."""
        while self._runs:
            await next(iter(self._runs.values())).done.wait()

    @property
    def can_run(self) -> bool:
        """Whether a lifespan hosts task runs now."""
        return bool(self.hosts)

    def ttl_s(self, requested_ms: object) -> float:
        """The lifetime of a new task: the requested one in bounds (8.9), else the default."""
        bound = self.store.ttl_s
        if isinstance(requested_ms, int | float) and not isinstance(requested_ms, bool) and requested_ms > 0:
            return min(max(requested_ms / 1000, _MIN_TTL_S), bound)
        return min(self.default_ttl_s, bound)

    def poll_interval_ms(self) -> int:
        """The poll interval of an answer (``docs/protocol.md`` 8.10)."""
        return max(math.ceil(self.poll_interval_s * 1000), self.limiter_wait_ms())

    async def create(
        self,
        *,
        key: str | None,
        scope: str,
        fingerprint: str,
        tool: str,
        ttl_s: float,
        run: Callable[[], Awaitable[StoredOutcome | None]],
        lifespan_state: object = None,
    ) -> TaskCreation:
        """Create the task (or find its key's) and, when created, start ``run`` in the task
        group of the lifespan that yielded ``lifespan_state`` (the request's), or else of the
        latest one. Store failures raise :class:`~rmcp_actors.RMCPStoreError`."""
        now = _now_iso()
        task = TaskRecord(
            task_id=uuid.uuid4().hex,
            key=key,
            scope=scope,
            fingerprint=fingerprint,
            tool=tool,
            state=TaskState.WORKING,
            owner=self.instance_id,
            created_at=now,
            updated_at=now,
        )
        try:
            creation: TaskCreation = await self.store_call(
                "create_task", lambda: self.store.create_task(task, ttl_s=ttl_s)
            )
        except BaseException:
            if key is not None:
                self._unconfirmed.add(task.task_id)
            raise
        found = creation.task
        if creation.created or (
            found.task_id in self._unconfirmed
            and found.state is TaskState.WORKING
            and found.fingerprint == fingerprint
        ):
            # Created, or the retry of a creation whose answer was lost before its run started.
            self._unconfirmed.discard(found.task_id)
            task_id = found.task_id
            if not self.hosts:
                # The lifespan ended while the task was written: it will not run here. Failed (in
                # doubt, as any run the lifespan cut short) rather than WORKING under a live owner.
                await self._finish(task_id, None)
                return creation
            # Not simply the latest lifespan: over in-memory transports each connection has
            # its own, and another connection closing must not cut this run short.
            own = [host for host in self.hosts if host.state is lifespan_state]
            host = own[0] if len(own) == 1 else self.hosts[-1]
            self._runs[task_id] = _LocalRun()
            host.group.start_soon(self._run, task_id, run)
        return creation

    async def _run(self, task_id: str, run: Callable[[], Awaitable[StoredOutcome | None]]) -> None:
        local = self._runs[task_id]
        outcome: StoredOutcome | None = None
        try:
            with anyio.CancelScope() as scope:
                local.scope = scope
                if local.cancelled:
                    scope.cancel()
                outcome = await run()
        finally:
            # Shielded: the lifespan's end cancels runs, and each must still say how it ended.
            with anyio.CancelScope(shield=True):
                await self._finish(task_id, outcome)
                local.done.set()
                del self._runs[task_id]

    async def _finish(self, task_id: str, outcome: StoredOutcome | None) -> None:
        if outcome is None:
            # Stopped (tasks/cancel, which already wrote CANCELLED and wins; the server's own
            # shutdown; max_execution_s): the tool may have had its effect.
            error = in_doubt_error()
            outcome = StoredOutcome(
                error_code=error["code"], error_message=error["message"], error_data=error["data"]
            )
            state, message = TaskState.FAILED, IN_DOUBT_MESSAGE
        elif outcome.result is None:
            state, message = TaskState.FAILED, f"the tool failed: {outcome.error_message}"
        else:
            state, message = TaskState.COMPLETED, None
        result = encode_outcome(outcome)
        try:
            await self._write_finish(task_id, state, result, message)
        except RMCPStoreError:
            # Written again at each renewal of the lease (write_unfinished). Until then the task
            # reads WORKING under this live owner; if the process ends first, in doubt: honest,
            # since its outcome is known to no one else.
            self._unfinished[task_id] = (state, result, message)
            logging.getLogger(__name__).exception("RMCP: could not record the outcome of task %s", task_id)

    async def write_unfinished(self) -> None:
        """Write the outcomes the store refused when their runs ended (the server's lease
        keeper calls this). Raises :class:`~rmcp_actors.RMCPStoreError` if it fails again."""
        for task_id, (state, result, message) in list(self._unfinished.items()):
            await self._write_finish(task_id, state, result, message)
            del self._unfinished[task_id]

    async def _write_finish(self, task_id: str, state: TaskState, result: bytes, message: str | None) -> None:
        await self.store_call(
            "finish_task",
            lambda: self.store.finish_task(
                task_id,
                owner=self.instance_id,
                state=state,
                result=result,
                message=message,
                updated_at=_now_iso(),
            ),
        )

    # --- wire ----------------------------------------------------------------------------

    def handle(self, task: TaskRecord, version: str) -> dict[str, Any]:
        """The ``CreateTaskResult`` for ``task`` on protocol ``version``."""
        fields = self._fields(task, version)
        if _modern(version):
            return {**fields, "resultType": "task"}
        return {"task": fields}

    def _fields(self, task: TaskRecord, version: str) -> dict[str, Any]:
        modern = _modern(version)
        status = _status(task, modern)
        fields: dict[str, Any] = {
            "taskId": task.task_id,
            "status": status,
            "createdAt": task.created_at,
            "lastUpdatedAt": task.updated_at,
        }
        message = IN_DOUBT_MESSAGE if task.in_doubt else task.message
        if message is not None:
            fields["statusMessage"] = message
        ttl_ms = max(0, round((task.expires_at - task.created_clock) * 1000))
        poll_ms = self.poll_interval_ms()
        if modern:
            fields["ttlMs"], fields["pollIntervalMs"] = ttl_ms, poll_ms
        else:
            fields["ttl"], fields["pollInterval"] = ttl_ms, poll_ms
        return fields

    def _detailed(self, task: TaskRecord, version: str) -> dict[str, Any]:
        """``tasks/get``: the task, and on 2026-07-28 its result or error inlined."""
        fields = self._fields(task, version)
        if not _modern(version):
            return fields
        if task.in_doubt:
            fields["error"] = in_doubt_error()
        elif task.state in (TaskState.COMPLETED, TaskState.FAILED) and task.result is not None:
            outcome = decode_outcome(task.result)
            if outcome.result is not None:
                fields["result"] = outcome.result
            else:
                error: dict[str, Any] = {"code": outcome.error_code, "message": outcome.error_message}
                if outcome.error_data is not None:
                    error["data"] = outcome.error_data
                fields["error"] = error
        return fields

    # --- tasks/* handlers ------------------------------------------------------------------

    async def get(self, ctx: ServerRequestContext[Any, Any], params: GetTaskRequestParams) -> HandlerResult:
        """``tasks/get``: a pure read of the task."""
        _require_extension(ctx)
        task = await self._read(ctx, params.task_id)
        return self._detailed(task, ctx.protocol_version)

    async def result(
        self, ctx: ServerRequestContext[Any, Any], params: GetTaskPayloadRequestParams
    ) -> HandlerResult:
        """``tasks/result`` (2025-11-25): wait for the end, answer what the call would have."""
        task = await self._read(ctx, params.task_id)
        poll_s = _FOREIGN_POLL_FIRST_S
        while not task.state.terminal and not task.in_doubt:
            local = self._runs.get(task.task_id)
            if local is not None:
                await local.done.wait()
            else:
                await anyio.sleep(poll_s)
                poll_s = min(poll_s * 2, _FOREIGN_POLL_MAX_S)
            task = await self._read(ctx, params.task_id)
        related = {RELATED_TASK_KEY: {"taskId": task.task_id}}
        if task.in_doubt:
            raise MCPError(INTERNAL_ERROR, IN_DOUBT_MESSAGE, in_doubt_error()["data"])
        if task.state is TaskState.CANCELLED or task.result is None:
            raise MCPError(INTERNAL_ERROR, f"Task cancelled: {task.message or 'by tasks/cancel'}", related)
        outcome = decode_outcome(task.result)
        if outcome.result is None:
            raise MCPError(
                outcome.error_code or INTERNAL_ERROR, outcome.error_message or "", outcome.error_data
            )
        meta = outcome.result.get("_meta")
        merged: dict[str, Any] = dict(cast(Mapping[str, Any], meta)) if isinstance(meta, Mapping) else {}
        return {**outcome.result, "_meta": {**merged, **related}}

    async def cancel(
        self, ctx: ServerRequestContext[Any, Any], params: CancelTaskRequestParams
    ) -> HandlerResult:
        """``tasks/cancel``: record ``cancelled`` (a working task), then stop its run here."""
        _require_extension(ctx)
        task = await self._read(ctx, params.task_id)
        modern = _modern(ctx.protocol_version)
        if task.state.terminal or task.in_doubt:
            if modern:
                return {}
            raise MCPError(INVALID_PARAMS, f"Task is already {_status(task, modern)}: it cannot be cancelled")
        cancelled: TaskRecord | None = await self._store(
            "cancel_task",
            lambda: self.store.cancel_task(
                task.task_id, message="cancelled by tasks/cancel", updated_at=_now_iso()
            ),
        )
        if cancelled is None:
            raise MCPError(INVALID_PARAMS, _NOT_FOUND)
        local = self._runs.get(task.task_id)
        if local is not None and cancelled.state is TaskState.CANCELLED:
            local.cancelled = True
            if local.scope is not None:
                local.scope.cancel()
        if modern:
            return {}
        if cancelled.state is not TaskState.CANCELLED:
            raise MCPError(
                INVALID_PARAMS, f"Task is already {_status(cancelled, modern)}: it cannot be cancelled"
            )
        return self._fields(cancelled, ctx.protocol_version)

    async def list_tasks(
        self, ctx: ServerRequestContext[Any, Any], params: PaginatedRequestParams
    ) -> HandlerResult:
        """``tasks/list`` (2025-11-25): the caller's tasks, oldest first."""
        try:
            offset = int(params.cursor) if params.cursor else 0
        except ValueError:
            offset = -1
        if offset < 0:
            raise MCPError(INVALID_PARAMS, f"invalid tasks/list cursor {params.cursor!r}")
        scope = principal_scope_of(ctx)
        page: list[TaskRecord] = await self._store(
            "list_tasks", lambda: self.store.list_tasks(scope, offset=offset, limit=_LIST_PAGE + 1)
        )
        answer: dict[str, Any] = {
            "tasks": [self._fields(task, ctx.protocol_version) for task in page[:_LIST_PAGE]]
        }
        if len(page) > _LIST_PAGE:
            answer["nextCursor"] = str(offset + _LIST_PAGE)
        return answer

    async def update(
        self, ctx: ServerRequestContext[Any, Any], params: UpdateTaskRequestParams
    ) -> HandlerResult:
        """``tasks/update`` (2026-07-28): no task here asks for input; acknowledged, ignored."""
        _require_extension(ctx)
        await self._read(ctx, params.task_id)
        return {}

    async def _read(self, ctx: ServerRequestContext[Any, Any], task_id: str) -> TaskRecord:
        task: TaskRecord | None = await self._store("get_task", lambda: self.store.get_task(task_id))
        # Another principal's task reads as absent: its existence is not theirs to learn.
        if task is None or task.scope != principal_scope_of(ctx):
            raise MCPError(INVALID_PARAMS, _NOT_FOUND)
        return task

    async def _store(self, operation: str, call: Callable[[], Awaitable[_T]]) -> _T:
        try:
            return await self.store_call(operation, call)
        except RMCPStoreError as error:
            raise MCPError(INTERNAL_ERROR, f"RMCP: {error}; retry later") from error


class TasksExtension(Extension):
    """The request methods of MCP tasks, as the SDK's extension for ``MCPServer(extensions=[...])``
    (:func:`~rmcp_actors.server.install` registers them on any server the same way)."""

    identifier = TASKS_EXTENSION_ID

    def __init__(self, engine: TaskEngine) -> None:
        self.engine = engine

    def methods(self) -> Sequence[MethodBinding]:
        """``tasks/get`` and ``tasks/cancel`` (both protocols), ``tasks/result`` and ``tasks/list``
        (2025-11-25), ``tasks/update`` (2026-07-28)."""
        legacy = frozenset({_LEGACY_VERSION})
        modern = frozenset(MODERN_PROTOCOL_VERSIONS)
        return (
            MethodBinding("tasks/get", GetTaskRequestParams, cast(RequestHandler, self.engine.get)),
            MethodBinding("tasks/cancel", CancelTaskRequestParams, cast(RequestHandler, self.engine.cancel)),
            MethodBinding(
                "tasks/result", GetTaskPayloadRequestParams, cast(RequestHandler, self.engine.result), legacy
            ),
            MethodBinding(
                "tasks/list", PaginatedRequestParams, cast(RequestHandler, self.engine.list_tasks), legacy
            ),
            MethodBinding(
                "tasks/update", UpdateTaskRequestParams, cast(RequestHandler, self.engine.update), modern
            ),
        )


def version_gated(binding: MethodBinding) -> RequestHandler:
    """``binding``'s handler, answering ``METHOD_NOT_FOUND`` outside its protocol versions (as
    ``MCPServer`` gates extension methods)."""
    versions = binding.protocol_versions
    if versions is None:
        return binding.handler

    async def gated(ctx: ServerRequestContext[Any, Any], params: Any) -> HandlerResult:
        if ctx.protocol_version not in versions:
            raise MCPError(code=METHOD_NOT_FOUND, message="Method not found", data=binding.method)
        return await binding.handler(ctx, params)

    return gated


# Every keyed call asks for its principal's scope, and a server sees few principals: a
# digest computed once each (bounded, for a server with very many).
@functools.lru_cache(maxsize=1024)
def principal_scope(principal: str | None) -> str:
    """The scope of a principal's keys and tasks: a fixed-length digest prefix, so that no
    key a client chooses can name another scope's record (see :func:`store_key`)."""
    return hashlib.sha256((principal or "").encode()).hexdigest()[:32]


def principal_scope_of(ctx: ServerRequestContext[Any, Any]) -> str:
    """The scope of the request's principal."""
    return principal_scope(authenticated_principal(ctx))


def task_asked(ctx: ServerRequestContext[Any, Any], params: Mapping[str, Any]) -> bool:
    """Whether a ``tools/call`` asks to run as a task (``docs/protocol.md`` 8.2)."""
    if _modern(ctx.protocol_version):
        capabilities = ctx.session.client_capabilities
        return bool(
            capabilities and capabilities.extensions and TASKS_EXTENSION_ID in capabilities.extensions
        )
    return isinstance(params.get("task"), Mapping)


def requested_ttl_ms(params: Mapping[str, Any]) -> object:
    """``params.task.ttl``, whatever it is (checked by :meth:`TaskEngine.ttl_s`)."""
    task = params.get("task")
    return cast(Mapping[str, Any], task).get("ttl") if isinstance(task, Mapping) else None


def task_mode_refusal(support: TaskSupport, asked: bool, version: str) -> MCPError | None:
    """The error for a call whose task mode its tool's ``taskSupport`` forbids, or None."""
    if asked and support == "forbidden":
        return MCPError(METHOD_NOT_FOUND, "this tool cannot be called as a task (taskSupport: forbidden)")
    if not asked and support == "required":
        if _modern(version):
            return MCPError(
                MISSING_REQUIRED_CLIENT_CAPABILITY,
                "this tool runs only as a task: declare the io.modelcontextprotocol/tasks extension "
                "on the request",
                {"requiredCapabilities": {"extensions": {TASKS_EXTENSION_ID: {}}}},
            )
        return MCPError(
            METHOD_NOT_FOUND, "this tool runs only as a task (taskSupport: required): send params.task"
        )
    return None


def _require_extension(ctx: ServerRequestContext[Any, Any]) -> None:
    if _modern(ctx.protocol_version):
        require_client_extension(ctx, TASKS_EXTENSION_ID)


def _modern(version: str) -> bool:
    return version in MODERN_PROTOCOL_VERSIONS


def _status(task: TaskRecord, modern: bool) -> str:
    if task.in_doubt:
        return "failed"
    if task.state is TaskState.COMPLETED and not modern and task.result is not None:
        # 2025-11-25 counts a tool error result as a failed task; 2026-07-28 as completed.
        result = decode_outcome(task.result).result
        if result is not None and result.get("isError") is True:
            return "failed"
    return task.state.value
