# pyright: strict
"""Tasks: a tool call the server runs in the background, followed here to its final result.

Two wires carry them. The 2025-11-25 core (``CORE``): the client asks for a task with
``params.task`` on ``tools/call``, for a tool whose ``execution.taskSupport`` allows it, gets a
``CreateTaskResult`` (``{"task": {...}}``), polls ``tasks/get`` (``pollInterval``) and fetches the
result with ``tasks/result``. The ``io.modelcontextprotocol/tasks`` extension (2026-07-28,
``EXTENSION``): the client advertises the extension and the *server* decides, answering a
``tools/call`` with a flat task (``resultType: "task"``); ``tasks/get`` (``pollIntervalMs``)
carries the result inline once the task completed.

Either way a task is the server's, not the transport's: :func:`follow_task` polls it on whatever
session the connection has, so a dropped transport (a lost HTTP session, a broken stream) costs a
reconnect, not the call. Only the creation is an ordinary attempt (its answer can be lost like any
other); from the task id on, the call is a loop of reads.
"""

from __future__ import annotations

import enum
import hashlib
import json
import sqlite3
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import suppress
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, TypeVar, cast

import anyio
import attrs
from mcp import Client, MCPError
from mcp.client.extension import ClaimContext, ClientExtension, ResultClaim
from mcp.client.session import (
    ClientSession,
    _CallToolResultAdapter,  # pyright: ignore[reportPrivateUsage]
)
from mcp_types import (
    CLIENT_CAPABILITIES_META_KEY,
    INVALID_PARAMS,
    CallToolResult,
    Request,
    RequestParams,
    RequestParamsMeta,
    Result,
    TextContent,
)
from pydantic import BaseModel, ConfigDict, ValidationError

from ..errors import (
    RMCPIdempotencyConflictError,
    RMCPNetworkError,
    RMCPOutcomeUnknownError,
    RMCPResultValidationError,
    RMCPTaskCancelledError,
)
from ..flow._feedback import from_error, parse_retry_after
from ._failures import Evidence, classify
from ._http_evidence import current_evidence

if TYPE_CHECKING:
    from .connection import Connection, Session

__all__ = [
    "RELATED_TASK_KEY",
    "TASKS_EXTENSION_ID",
    "MemoryTaskStore",
    "SQLiteTaskStore",
    "TaskCreated",
    "TaskRef",
    "TaskSnapshot",
    "TaskStore",
    "TaskWire",
    "TasksExtension",
    "check_same_call",
    "create_core_task",
    "fingerprint",
    "follow_task",
    "gate_task_capability",
    "task_declared",
]

TASKS_EXTENSION_ID: Final = "io.modelcontextprotocol/tasks"
RELATED_TASK_KEY: Final = "io.modelcontextprotocol/related-task"
_TERMINAL: Final = frozenset({"completed", "failed", "cancelled"})
# When the server suggests no interval (both specs make it optional).
_DEFAULT_POLL_S: Final = 1.0
# A suggestion of 0 ms would poll in a busy loop.
_MIN_POLL_S: Final = 0.01
# tasks/cancel after the caller gave up: shielded, and bounded by this.
_CANCEL_TIMEOUT_S: Final = 5.0
_READ_TIMEOUT_SLACK_S: Final = 1.0
# HTTP statuses of a server or proxy that cannot answer now: a read of a task asks again later.
_UNAVAILABLE: Final = frozenset({502, 503, 504})
# The longest wait for a refused read before asking again (a Retry-After may say hours).
_MAX_REFUSED_WAIT_S: Final = 30.0

_T = TypeVar("_T")


class TaskWire(enum.Enum):
    """Which protocol a task was created on (its polling and its result differ)."""

    CORE = "core"
    EXTENSION = "extension"


@attrs.frozen
class TaskRef:
    """A task a call created: what a new session, or a new process, needs to follow it.

    Attributes:
        task_id: The server's id of the task.
        wire: The protocol it was created on.
        fingerprint: The call it runs (tool and arguments, see :func:`fingerprint`): the same
            key with another call is a conflict, never a resumption of the wrong task.
    """

    task_id: str
    wire: TaskWire
    fingerprint: str


@attrs.frozen
class TaskSnapshot:
    """One reading of a task's state (``tasks/get``, or its creation)."""

    task_id: str
    status: str
    message: str | None
    poll_interval_s: float | None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None

    @property
    def terminal(self) -> bool:
        """Whether the task is done (completed, failed or cancelled)."""
        return self.status in _TERMINAL


def snapshot(raw: Mapping[str, Any]) -> TaskSnapshot:
    """Read a task from either wire's shape (``pollInterval`` or ``pollIntervalMs``).

    Raises:
        ValueError: There is no task id or status.
    """
    task_id, status = raw.get("taskId"), raw.get("status")
    if not isinstance(task_id, str) or not isinstance(status, str):
        raise ValueError(f"not a task (no taskId or status): {dict(raw)!r:.200}")
    interval = raw.get("pollIntervalMs", raw.get("pollInterval"))
    message = raw.get("statusMessage")
    result, error = raw.get("result"), raw.get("error")
    return TaskSnapshot(
        task_id=task_id,
        status=status,
        message=message if isinstance(message, str) else None,
        poll_interval_s=interval / 1000 if isinstance(interval, int | float) and interval >= 0 else None,
        result=cast("dict[str, Any]", result) if isinstance(result, dict) else None,
        error=cast("dict[str, Any]", error) if isinstance(error, dict) else None,
    )


def fingerprint(tool: str, arguments: Mapping[str, Any] | None) -> str:
    """A digest of the call a task runs (canonical JSON of tool and arguments)."""
    canonical = json.dumps([tool, arguments], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


# -- the extension's claim ------------------------------------------------------------------


class CreatedTask(Result):
    """The extension's ``CreateTaskResult``: a flat task in lieu of a tool result."""

    result_type: Literal["task"] = "task"
    task_id: str
    status: str
    status_message: str | None = None
    poll_interval_ms: float | None = None


class TaskCreated(Exception):
    """The server answered a ``tools/call`` with a task (raised by the claim's resolver, so
    that the call path, not the SDK, follows it: across sessions and within its deadline)."""

    def __init__(self, first: TaskSnapshot) -> None:
        super().__init__(f"the server created task {first.task_id}")
        self.first = first


async def _hand_over(created: CreatedTask, context: ClaimContext) -> CallToolResult:
    del context
    raw = created.model_dump(by_alias=True, mode="json")
    raise TaskCreated(snapshot(raw))


#: Set while a ``tools/call`` that asks for a task is sent: only that request declares the
#: extension (see :func:`gate_task_capability`).
task_declared: ContextVar[bool] = ContextVar("rmcp_actors_task_declared", default=False)


def gate_task_capability(client: Client) -> None:
    """Declare the tasks extension on the ``tools/call`` requests that ask for a task only.

    On 2026-07-28 the capabilities travel in every request's ``_meta``, and a server may make any
    call that declares the extension a task (the reference server makes every one a task). A
    call that did not ask for one (``task=False``, or ``"auto"`` for a tool that does not require
    it) leaves it out, so it gets its result in the answer, not after a poll interval. The SDK
    stamps the same capabilities on every request: its stamp is wrapped, per session.

    A server that does not advertise the extension creates no task: its session declares the
    extension on no request and validates ``tools/call`` answers without the claim, so that a
    plain call costs what it did before tasks (the claim's discriminated union and the wrapped
    stamp each add work to every call).
    """
    session = client.session
    inner = session._stamp  # pyright: ignore[reportPrivateUsage]
    server_extensions = client.server_capabilities.extensions
    if server_extensions is None or TASKS_EXTENSION_ID not in server_extensions:
        _drop_task_capability(session, inner)
        return
    # The capabilities without the extension, computed once per capabilities object stamped.
    stripped: list[tuple[object, dict[str, Any]]] = []

    def stamp(data: dict[str, Any], options: Any) -> None:
        inner(data, options)
        if data.get("method") != "tools/call" or task_declared.get():
            return
        params: dict[str, Any] = data.get("params") or {}
        meta: object = params.get("_meta")
        if not isinstance(meta, dict):
            return
        meta_fields = cast("dict[str, Any]", meta)
        capabilities: object = meta_fields.get(CLIENT_CAPABILITIES_META_KEY)
        if not isinstance(capabilities, dict):
            return
        if not stripped or stripped[0][0] is not capabilities:
            fields = cast("dict[str, Any]", capabilities)
            extensions = {
                key: value
                for key, value in cast("dict[str, Any]", fields.get("extensions") or {}).items()
                if key != TASKS_EXTENSION_ID
            }
            without = {**fields, "extensions": extensions or None}
            stripped[:] = [(capabilities, {k: v for k, v in without.items() if v is not None})]
        meta_fields[CLIENT_CAPABILITIES_META_KEY] = stripped[0][1]

    session._stamp = stamp  # pyright: ignore[reportPrivateUsage]


def _drop_task_capability(session: ClientSession, inner: Callable[[dict[str, Any], Any], None]) -> None:
    # The SDK's stamp puts one capabilities dict, the session's own, on every request: a probe
    # request finds it, and it loses the extension once for all.
    probe: dict[str, Any] = {"method": "ping"}
    inner(probe, {})
    capabilities: object = probe.get("params", {}).get("_meta", {}).get(CLIENT_CAPABILITIES_META_KEY)
    if isinstance(capabilities, dict):
        fields = cast("dict[str, Any]", capabilities)
        extensions: object = fields.get("extensions")
        if isinstance(extensions, dict) and TASKS_EXTENSION_ID in extensions:
            declared = cast("dict[str, Any]", extensions)
            remaining = {key: value for key, value in declared.items() if key != TASKS_EXTENSION_ID}
            if remaining:
                fields["extensions"] = remaining
            else:
                del fields["extensions"]
    session._call_tool_adapter = _CallToolResultAdapter  # pyright: ignore[reportPrivateUsage]


class TasksExtension(ClientExtension):
    """``io.modelcontextprotocol/tasks`` on the client: advertised, and a task answer claimed."""

    identifier = TASKS_EXTENSION_ID

    def claims(self) -> Sequence[ResultClaim[Any]]:
        """The ``resultType: "task"`` shape of ``tools/call``."""
        return (ResultClaim(result_type="task", model=CreatedTask, resolve=_hand_over),)


# -- requests -------------------------------------------------------------------------------


class _Raw(BaseModel):
    """Any JSON object: the two wires' answers differ, and :func:`snapshot` reads both."""

    model_config = ConfigDict(extra="allow")

    @property
    def fields(self) -> dict[str, Any]:
        return self.model_extra or {}


class _TaskParams(RequestParams):
    task_id: str


class _GetTask(Request[_TaskParams, Literal["tasks/get"]]):
    method: Literal["tasks/get"] = "tasks/get"
    params: _TaskParams
    # The extension's routing header (Mcp-Name: the task id) over Streamable HTTP.
    name_param = "taskId"


class _TaskResult(Request[_TaskParams, Literal["tasks/result"]]):
    method: Literal["tasks/result"] = "tasks/result"
    params: _TaskParams
    name_param = "taskId"


class _CancelTask(Request[_TaskParams, Literal["tasks/cancel"]]):
    method: Literal["tasks/cancel"] = "tasks/cancel"
    params: _TaskParams
    name_param = "taskId"


async def create_core_task(
    client: Client,
    tool: str,
    arguments: dict[str, Any] | None,
    meta: RequestParamsMeta | None,
    timeout_s: float,
) -> TaskSnapshot | CallToolResult:
    """Send a 2025-11-25 task-augmented ``tools/call``: the task, or the tool's result when the
    server ran it directly.

    The SDK's ``call_tool`` has no ``task`` parameter and validates every ``tools/call`` answer as
    a ``CallToolResult`` of the negotiated version, which a ``CreateTaskResult`` is not: the
    request goes through the session's dispatcher with the session's own stamp (headers).
    """
    params: dict[str, Any] = {"name": tool, "task": {}}
    if arguments is not None:
        params["arguments"] = arguments
    if meta is not None:
        params["_meta"] = dict(meta)
    data: dict[str, Any] = {"method": "tools/call", "params": params}
    session = client.session
    options: dict[str, Any] = {}
    session._stamp(data, options)  # pyright: ignore[reportPrivateUsage, reportArgumentType]
    options["timeout"] = timeout_s
    raw = await session._dispatcher.send_raw_request(  # pyright: ignore[reportPrivateUsage]
        "tools/call",
        data["params"],
        options,  # pyright: ignore[reportArgumentType]
    )
    task = raw.get("task")
    if isinstance(task, dict):
        return snapshot(cast("dict[str, Any]", task))
    return CallToolResult.model_validate(raw, by_name=False)


async def _get(client: Client, task_id: str, timeout_s: float) -> TaskSnapshot:
    raw = await client.session.send_request(
        _GetTask(params=_TaskParams(task_id=task_id)), _Raw, request_read_timeout_seconds=timeout_s
    )
    return snapshot(raw.fields)


async def _core_result(client: Client, task_id: str, timeout_s: float) -> CallToolResult:
    raw = await client.session.send_request(
        _TaskResult(params=_TaskParams(task_id=task_id)), _Raw, request_read_timeout_seconds=timeout_s
    )
    return CallToolResult.model_validate(raw.fields, by_name=False)


async def _cancel(client: Client, task_id: str, timeout_s: float) -> None:
    await client.session.send_request(
        _CancelTask(params=_TaskParams(task_id=task_id)), _Raw, request_read_timeout_seconds=timeout_s
    )


# -- following a task -----------------------------------------------------------------------


async def follow_task(
    connection: Connection,
    created_on: int,
    ref: TaskRef,
    first: TaskSnapshot | None,
    deadline: float,
    on_status: Callable[[str], None],
) -> CallToolResult:
    """Poll a task to its end and return its result, on whichever session is current.

    Args:
        connection: The server's connection (its session may change under the loop).
        created_on: The session generation the task was created (or first resumed) on.
        ref: The task.
        first: Its state at creation, or None when resumed from a store.
        deadline: The call's deadline (its cancel scope ends the loop; intervals stop there).
        on_status: Told each new status (``"working: <message>"``), for the lifecycle.

    Returns:
        The tool's result; a ``failed`` task as an error result (``is_error``).

    Raises:
        RMCPTaskCancelledError: The server cancelled the task.
        RMCPOutcomeUnknownError: The server no longer knows the task, or answered a poll with
            an error: what the tool did cannot be learnt.
    """
    task_id = ref.task_id
    state = first
    seen = None if first is None else (first.status, first.message)
    interval = _interval(first)
    try:
        while state is None or not state.terminal:
            if state is not None:
                await anyio.sleep(max(0.0, min(interval, deadline - anyio.current_time())))
            state = await _on_current_session(
                connection, ref, created_on, lambda c: _get(c, task_id, _remaining(deadline)), interval
            )
            if state.task_id != task_id:
                raise RMCPOutcomeUnknownError(
                    f"tasks/get for task {task_id} answered with task {state.task_id}: the server "
                    "is confused; the tool may have run"
                )
            interval = _interval(state) if state.poll_interval_s is not None else interval
            if (state.status, state.message) != seen:
                seen = (state.status, state.message)
                on_status(f"{state.status}: {state.message}" if state.message else state.status)
    except anyio.get_cancelled_exc_class():
        # The caller gave up (or the deadline passed): the task would run on for nobody.
        with anyio.CancelScope(shield=True), anyio.move_on_after(_CANCEL_TIMEOUT_S):
            session = connection.current_session()
            if session is None:
                # Reconnecting: the task outlives the transport, so the cancel waits for the
                # next session, within the same bound (at once an error when disconnected calls
                # fail fast, the credentials are refused, or the connection is closed).
                with suppress(RMCPNetworkError):
                    session = await connection.wait_session()
            if session is not None and session.client is not None:
                # Cooperative anyway: the server may not stop it, or not know it any more.
                with suppress(MCPError, ValidationError):
                    await _cancel(session.client, task_id, _CANCEL_TIMEOUT_S)
        raise
    if state.status == "cancelled":
        raise RMCPTaskCancelledError(
            f"the server cancelled task {task_id}"
            + (f" ({state.message})" if state.message else "")
            + "; the tool may have run in part: check its effect before calling again with a new key",
        )
    if ref.wire is TaskWire.CORE:
        # A failed task's tasks/result may be the JSON-RPC error it failed with: its answer.
        answered = _error_snapshot(state) if state.status == "failed" else None
        result = await _on_current_session(
            connection,
            ref,
            created_on,
            lambda c: _core_result(c, task_id, _remaining(deadline)),
            interval,
            answered,
        )
        if state.status == "failed" and not result.is_error:
            result = result.model_copy(update={"is_error": True})
        return _related(result, task_id)
    if state.status == "completed":
        if state.result is None:
            raise RMCPResultValidationError(f"task {task_id} completed without a result; the tool ran")
        try:
            return _related(CallToolResult.model_validate(state.result, by_name=False), task_id)
        except ValidationError as error:
            raise RMCPResultValidationError(
                f"the result of task {task_id} is not a valid tool result ({error.error_count()} "
                "problem(s)); the tool ran"
            ) from error
    return _failed_result(state)


def _error_snapshot(state: TaskSnapshot) -> Callable[[MCPError], CallToolResult]:
    def failed(error: MCPError) -> CallToolResult:
        return _failed_result(attrs.evolve(state, error=error.error.model_dump(exclude_none=True)))

    return failed


def _interval(state: TaskSnapshot | None) -> float:
    if state is None or state.poll_interval_s is None:
        return _DEFAULT_POLL_S
    return max(state.poll_interval_s, _MIN_POLL_S)


def _remaining(deadline: float) -> float:
    # Past the deadline: the call's own scope ends a slow answer first (a timeout, and the task
    # is cancelled), not the SDK's read timeout (an error that would read as the server's).
    return max(deadline - anyio.current_time(), 0.0) + _READ_TIMEOUT_SLACK_S


def _related(result: CallToolResult, task_id: str) -> CallToolResult:
    """The result, with the task it came from in ``_meta`` (as the spec relates messages)."""
    meta = dict(result.meta or {})
    meta.setdefault(RELATED_TASK_KEY, {"taskId": task_id})
    return result.model_copy(update={"meta": meta})


def _failed_result(state: TaskSnapshot) -> CallToolResult:
    """A task that failed with a JSON-RPC error, as the error result a caller reads.

    Raises:
        RMCPOutcomeUnknownError: The error is an RMCP server's ``in_doubt``: the instance
            running the task stopped before recording an outcome, so the tool may have run.
    """
    error = state.error or {}
    code, message = error.get("code"), error.get("message")
    data = error.get("data")
    rmcp = cast("dict[str, Any]", data).get("rmcp") if isinstance(data, dict) else None
    if isinstance(rmcp, dict) and cast("dict[str, Any]", rmcp).get("code") == "in_doubt":
        raise RMCPOutcomeUnknownError(
            f"task {state.task_id} failed in doubt ({message}): the server cannot tell whether "
            "the tool ran; check its effect"
        )
    text = f"task {state.task_id} failed" + (f": {message}" if message else "")
    text += f" (code {code})" if code is not None else ""
    if state.message and state.message != message:
        text += f"; {state.message}"
    meta: dict[str, Any] = {RELATED_TASK_KEY: {"taskId": state.task_id}}
    if state.error is not None:
        meta["error"] = state.error
    return CallToolResult(content=[TextContent(type="text", text=text)], is_error=True, _meta=meta)


async def _on_current_session(
    connection: Connection,
    ref: TaskRef,
    created_on: int,
    request: Callable[[Client], Awaitable[_T]],
    interval: float,
    answered: Callable[[MCPError], _T] | None = None,
) -> _T:
    """Send one task request on the current session, again on the next one when the transport
    is lost meanwhile (the task lives on the server, not on the transport), and again after a
    wait when a rate limiter or a busy proxy refused it (HTTP 429, 502-504, JSON-RPC -32023):
    a read is safe to repeat, ``Retry-After`` (capped) or else ``interval`` later; the call's
    deadline bounds the waits. A JSON-RPC error answer is ``answered``'s to read when given,
    else the end of what can be learnt."""
    http = connection.spec.transport == "http"
    while True:
        session = await _session(connection, ref)
        client = session.client
        assert client is not None  # a usable session has its client
        evidence = Evidence() if http else None
        token = current_evidence.set(evidence) if http else None
        try:
            return await request(client)
        except MCPError as error:
            verdict = classify(error, evidence, transport_closed=session.broken.is_set(), handed_over=True)
            if verdict is not None and verdict.session_lost:
                connection.report_broken(session)
                continue
            wait = _refused_wait(error, evidence, interval)
            if wait is not None:
                await anyio.sleep(wait)
                continue
            if answered is not None:
                # Even -32602: the task was just read as failed, so this is the error it failed with.
                return answered(error)
            raise _lost(ref, session, created_on, error) from error
        except (ValidationError, ValueError) as error:
            raise RMCPOutcomeUnknownError(
                f"the server's answer about task {ref.task_id} cannot be read ({error!s:.200}); the "
                "tool may have run"
            ) from error
        finally:
            if token is not None:
                current_evidence.reset(token)


def _refused_wait(error: MCPError, evidence: Evidence | None, interval: float) -> float | None:
    """How long to wait before asking again, when the request was refused for now (rate
    limited, or the server or a proxy unavailable); None for any other error."""
    signal = from_error(error, evidence)
    if signal is not None:
        retry_after = signal.retry_after_s
    elif evidence is not None and evidence.status in _UNAVAILABLE:
        retry_after = parse_retry_after(evidence.retry_after)
    else:
        return None
    return min(max(interval if retry_after is None else retry_after, _MIN_POLL_S), _MAX_REFUSED_WAIT_S)


async def _session(connection: Connection, ref: TaskRef) -> Session:
    session = connection.current_session()
    if session is not None:
        return session
    try:
        return await connection.wait_session()
    except Exception as error:
        raise RMCPOutcomeUnknownError(
            f"the connection was lost while following task {ref.task_id} ({error}); the task may "
            "still be running on the server: call again with the same idempotency key (and a task "
            "store) to follow it to its end"
        ) from error


def _lost(ref: TaskRef, session: Session, created_on: int, error: MCPError) -> RMCPOutcomeUnknownError:
    if error.code == INVALID_PARAMS:
        where = "after a reconnect" if session.generation != created_on else "on the session that created it"
        return RMCPOutcomeUnknownError(
            f"the server no longer knows task {ref.task_id} {where} ({error.message}): it restarted "
            "or dropped the task (its ttl passed?), so whether the tool ran cannot be learnt; check "
            "its effect before calling again with a new idempotency key"
        )
    return RMCPOutcomeUnknownError(
        f"the server answered a request about task {ref.task_id} with error {error.code} "
        f"({error.message}); the tool may have run"
    )


# -- where key -> task id is kept ----------------------------------------------------------


class TaskStore(Protocol):
    """Where the task each idempotency key created is kept, so that a call with the same key
    (in this process or a new one) follows that task instead of creating another."""

    async def get(self, server: str, key: str) -> TaskRef | None:
        """The task ``key`` created on ``server``, if any."""
        ...

    async def put(self, server: str, key: str, ref: TaskRef) -> None:
        """Record the task ``key`` created on ``server``."""
        ...

    async def aclose(self) -> None:
        """Release the store's resources."""
        ...


@attrs.define
class MemoryTaskStore:
    """A :class:`TaskStore` in this process's memory (the default): a repeated call with the
    same key follows the same task for as long as the runtime runs."""

    _refs: dict[tuple[str, str], TaskRef] = attrs.Factory(dict[tuple[str, str], TaskRef])

    async def get(self, server: str, key: str) -> TaskRef | None:
        """The task ``key`` created on ``server``, if any."""
        return self._refs.get((server, key))

    async def put(self, server: str, key: str, ref: TaskRef) -> None:
        """Record the task ``key`` created on ``server``."""
        self._refs[(server, key)] = ref

    async def aclose(self) -> None:
        """Nothing to release."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS rmcp_tasks (
    server TEXT NOT NULL,
    key TEXT NOT NULL,
    task_id TEXT NOT NULL,
    wire TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    PRIMARY KEY (server, key)
)
"""


class SQLiteTaskStore:
    """A :class:`TaskStore` in a SQLite file: a new process resumes the tasks of a batch
    (``sup.map`` with the same keys) instead of creating them again.

    Each write is committed before the call polls its task (a few per call at most, in a
    worker thread), so a crash right after a task was created still finds it.
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(_SCHEMA)
        self._lock = anyio.Lock()

    async def get(self, server: str, key: str) -> TaskRef | None:
        """The task ``key`` created on ``server``, if any."""
        async with self._lock:
            row = await anyio.to_thread.run_sync(self._select, server, key)
        return None if row is None else TaskRef(row[0], TaskWire(row[1]), row[2])

    async def put(self, server: str, key: str, ref: TaskRef) -> None:
        """Record the task ``key`` created on ``server`` (committed on return)."""
        async with self._lock:
            with anyio.CancelScope(shield=True):  # half a write would lose the task
                await anyio.to_thread.run_sync(self._upsert, server, key, ref)

    async def aclose(self) -> None:
        """Close the database."""
        async with self._lock:
            self._db.close()

    def _select(self, server: str, key: str) -> tuple[str, str, str] | None:
        cursor = self._db.execute(
            "SELECT task_id, wire, fingerprint FROM rmcp_tasks WHERE server = ? AND key = ?", (server, key)
        )
        return cast("tuple[str, str, str] | None", cursor.fetchone())

    def _upsert(self, server: str, key: str, ref: TaskRef) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO rmcp_tasks (server, key, task_id, wire, fingerprint) "
            "VALUES (?, ?, ?, ?, ?)",
            (server, key, ref.task_id, ref.wire.value, ref.fingerprint),
        )


def check_same_call(ref: TaskRef, key: str, call_print: str) -> None:
    """Raise when ``key`` created its task for another call (Stripe semantics, as for keys).

    Raises:
        RMCPIdempotencyConflictError: The stored task runs another tool or other arguments.
    """
    if ref.fingerprint != call_print:
        raise RMCPIdempotencyConflictError(
            "idempotency_conflict",
            f"idempotency key {key!r} created task {ref.task_id} for another tool or other "
            "arguments; use a new key for this call",
            retryable=False,
        )
