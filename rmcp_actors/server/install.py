"""Putting RMCP on a server: :func:`install` for existing servers, :class:`FastRMCP` for new ones."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Coroutine, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, TypeVar

import anyio
from mcp.server.lowlevel.server import Server
from mcp.server.mcpserver import MCPServer
from mcp.types import Icon, ToolAnnotations
from pydantic import ValidationError

from .._protocol import NackCode
from ..errors import RMCPConfigError
from ..stores import DedupStore, MemoryStore
from ._stdio import serve_stdio
from .middleware import (
    DEFAULT_RECONCILE_TIMEOUT_S,
    DEFAULT_STORE_TIMEOUT_S,
    CallCheck,
    Repeatable,
    ResultConverter,
    RMCPServerSide,
)
from .reconcile import Reconciler
from .tasks import TasksExtension, TaskSupport, version_gated
from .transfer import (
    DEFAULT_MAX_UPLOAD_BYTES,
    DEFAULT_MIN_THRESHOLD,
    DEFAULT_SERVER_MAX_CHUNK_SIZE,
    TransferService,
)

__all__ = ["FastRMCP", "install", "reconciler_for", "rmcp_of"]

_RELEASE_TIMEOUT_S = 5.0

# Lifespans running now per store object: servers of one process may share a store, which
# is closed when the last of them stops.
_store_users: dict[int, int] = {}

ServerT = TypeVar("ServerT", bound="Server[Any] | MCPServer[Any]")
ReconcilerT = TypeVar("ReconcilerT", bound=Reconciler)
_CallableT = TypeVar("_CallableT", bound=Callable[..., Any])


def install(
    server: ServerT,
    *,
    store: DedupStore | None = None,
    max_execution_s: float = 300.0,
    max_in_flight: int | None = None,
    rate_limit_per_s: float | None = None,
    early_ack: bool = True,
    lease_s: float = 30.0,
    store_timeout_s: float = DEFAULT_STORE_TIMEOUT_S,
    close_store: bool = True,
    reconcilers: Mapping[str, Reconciler] | None = None,
    reconcile_timeout_s: float = DEFAULT_RECONCILE_TIMEOUT_S,
    tasks: bool = False,
    task_support: Mapping[str, TaskSupport] | None = None,
    task_ttl_s: float = 3600.0,
    task_poll_interval_s: float = 1.0,
    transfer: bool = True,
    transfer_min_threshold: int = DEFAULT_MIN_THRESHOLD,
    transfer_max_chunk_size: int = DEFAULT_SERVER_MAX_CHUNK_SIZE,
    transfer_max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
) -> ServerT:
    """Install the RMCP server side on ``server`` (an ``MCPServer`` or a low-level ``Server``)
    and return it.

    Args:
        store: Where idempotency records live. ``MemoryStore()`` (the default) forgets them
            when the process ends; ``SQLiteStore(path)`` survives restarts and is shared by
            several processes on one host.
        max_execution_s: Bound of a tool run that no client cancellation may cut short; a run
            still going after it is stopped and its key reported ``in_doubt``.
        max_in_flight: Runs allowed at once; more are refused with ``overloaded``.
        rate_limit_per_s: Calls accepted per second (token bucket, burst of one second);
            more are refused with ``rate_limited`` and a ``retry_after_ms``.
        early_ack: Send a progress notification as soon as a run starts, for clients that
            asked for progress (RMCP's early ACK).
        lease_s: How long this instance's claim on running keys outlives its last renewal.
        store_timeout_s: Bound of every store call. A store that fails or does not answer in
            time before a key is claimed gets the call the retryable NACK ``unavailable``.
        close_store: Close the store (``aclose()``) when the server's lifespan ends (the last
            of the servers of this process that share it). Pass False to use the store again
            afterwards: a server whose lifespan runs several times in one process (successive
            in-memory clients), or a store its creator closes.
        reconcilers: Per tool name, an async function asked whether an in-doubt run of that
            tool happened (see :mod:`rmcp_actors.server.reconcile`); more can be added with
            :func:`reconciler_for`.
        reconcile_timeout_s: Bound of one reconciler call; a reconciler that fails or exceeds
            it leaves the key in doubt.
        tasks: Run a tool call as an MCP task when the client asks (2025-11-25 core tasks and
            the 2026-07-28 extension ``io.modelcontextprotocol/tasks``; ``docs/protocol.md``
            section 8). Off by default: advertising tasks invites clients to detach runs from
            their requests.
        task_support: Per tool name, its ``taskSupport`` (``"optional"``, the default for a
            tool not named, ``"required"`` or ``"forbidden"``).
        task_ttl_s: Lifetime of a task whose client asked for none.
        task_poll_interval_s: The least poll interval advised to clients (the rate limiter
            may advise more).
        transfer: Serve chunked transfers of large results and arguments (feature
            ``"transfer"``, ``docs/protocol.md`` section 9) when ``store`` is a
            :class:`~rmcp_actors.stores.BlobStore` (``MemoryStore``, ``SQLiteStore``): a client
            that asks gets a result item larger than its threshold as a handle to read in
            chunks, and may upload large arguments first. Calls that do not ask are unchanged.
        transfer_min_threshold: Result items up to this many bytes stay inline whatever
            threshold a client asks for.
        transfer_max_chunk_size: The largest chunk this server cuts or accepts (a client asking
            for larger chunks gets chunks of this size).
        transfer_max_upload_bytes: The largest argument this server accepts as an upload.

    A tool registered on an ``MCPServer`` with ``ToolAnnotations(readOnlyHint=True)`` runs
    unclaimed: its outcome is recorded in one store write after the run instead of a claim
    before it and the result after. Answers are the same, but a crash
    during such a run leaves no in-doubt record: the retry runs the tool again, as the
    declaration allows (``docs/protocol.md`` section 5).

    Raises:
        RMCPConfigError: RMCP is already installed on ``server``, an option is out of range,
            or ``tasks`` with a store that cannot keep tasks, or with a server that already
            serves ``tasks/*`` methods, or ``transfer`` on a server that already serves
            ``rmcp/transfer/*`` methods.
    """
    if rmcp_of(server) is not None:
        raise RMCPConfigError("RMCP is already installed on this server; install it once")
    side = RMCPServerSide(
        store=MemoryStore() if store is None else store,
        max_execution_s=max_execution_s,
        max_in_flight=max_in_flight,
        rate_limit_per_s=rate_limit_per_s,
        early_ack=early_ack,
        lease_s=lease_s,
        store_timeout_s=store_timeout_s,
        close_store=close_store,
        check_call=_tool_check(server) if isinstance(server, MCPServer) else None,
        repeatable=_declared_repeatable(server) if isinstance(server, MCPServer) else None,
        reconcilers=dict(reconcilers or {}),
        reconcile_timeout_s=reconcile_timeout_s,
        convert_result=_result_converter(server) if isinstance(server, MCPServer) else None,
        run_tasks=tasks,
        task_support=dict(task_support or {}),
        task_ttl_s=task_ttl_s,
        task_poll_interval_s=task_poll_interval_s,
        transfer=transfer,
        transfer_min_threshold=transfer_min_threshold,
        transfer_max_chunk_size=transfer_max_chunk_size,
        transfer_max_upload_bytes=transfer_max_upload_bytes,
    )
    lowlevel = _lowlevel(server)
    if side.tasks is not None:
        _serve_tasks(lowlevel, TasksExtension(side.tasks))
    if side.transfers is not None:
        _serve_transfers(lowlevel, side.transfers)
    server.middleware.append(side)
    lowlevel.lifespan = _with_rmcp_lifespan(side, lowlevel.lifespan)
    return server


def reconciler_for(server: Server[Any] | MCPServer[Any], tool: str) -> Callable[[ReconcilerT], ReconcilerT]:
    """Declare the decorated async function as the reconciler of ``tool`` on ``server``, on
    which RMCP is installed (the same as ``install(..., reconcilers={tool: fn})``).

    The SDK's ``@app.tool()`` takes no extra options, so a reconciler is declared beside its
    tool; on a :class:`FastRMCP`, ``@app.tool(reconcile=fn)`` does it in one place.

    Raises:
        RMCPConfigError: RMCP is not installed on ``server``.
    """
    side = rmcp_of(server)
    if side is None:
        raise RMCPConfigError("RMCP is not installed on this server: call install() first")

    def declare(reconciler: ReconcilerT) -> ReconcilerT:
        side.reconcilers[tool] = reconciler
        return reconciler

    return declare


def rmcp_of(server: Server[Any] | MCPServer[Any]) -> RMCPServerSide | None:
    """Return the RMCP side installed on ``server``, or None."""
    for middleware in server.middleware:
        if isinstance(middleware, RMCPServerSide):
            return middleware
    return None


class FastRMCP(MCPServer[Any]):
    """An ``MCPServer`` with RMCP installed: define tools with ``@app.tool()`` as usual, and
    declare a tool's reconciler with ``@app.tool(reconcile=fn)``.

    ``store`` and the keyword options of :func:`install` configure RMCP (``tasks=True`` runs
    tool calls as MCP tasks when clients ask); every other keyword goes to ``MCPServer``.
    """

    def __init__(
        self,
        name: str | None = None,
        *,
        store: DedupStore | None = None,
        max_execution_s: float = 300.0,
        max_in_flight: int | None = None,
        rate_limit_per_s: float | None = None,
        early_ack: bool = True,
        lease_s: float = 30.0,
        store_timeout_s: float = DEFAULT_STORE_TIMEOUT_S,
        close_store: bool = True,
        reconcilers: Mapping[str, Reconciler] | None = None,
        reconcile_timeout_s: float = DEFAULT_RECONCILE_TIMEOUT_S,
        tasks: bool = False,
        task_support: Mapping[str, TaskSupport] | None = None,
        task_ttl_s: float = 3600.0,
        task_poll_interval_s: float = 1.0,
        transfer: bool = True,
        transfer_min_threshold: int = DEFAULT_MIN_THRESHOLD,
        transfer_max_chunk_size: int = DEFAULT_SERVER_MAX_CHUNK_SIZE,
        transfer_max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
        **mcpserver_kwargs: Any,
    ) -> None:
        super().__init__(name, **mcpserver_kwargs)
        install(
            self,
            store=store,
            max_execution_s=max_execution_s,
            max_in_flight=max_in_flight,
            rate_limit_per_s=rate_limit_per_s,
            early_ack=early_ack,
            lease_s=lease_s,
            store_timeout_s=store_timeout_s,
            close_store=close_store,
            reconcilers=reconcilers,
            reconcile_timeout_s=reconcile_timeout_s,
            tasks=tasks,
            task_support=task_support,
            task_ttl_s=task_ttl_s,
            task_poll_interval_s=task_poll_interval_s,
            transfer=transfer,
            transfer_min_threshold=transfer_min_threshold,
            transfer_max_chunk_size=transfer_max_chunk_size,
            transfer_max_upload_bytes=transfer_max_upload_bytes,
        )

    def tool(
        self,
        name: str | None = None,
        title: str | None = None,
        description: str | None = None,
        annotations: ToolAnnotations | None = None,
        icons: list[Icon] | None = None,
        meta: dict[str, Any] | None = None,
        structured_output: bool | None = None,
        *,
        reconcile: Reconciler | None = None,
        task_support: TaskSupport | None = None,
    ) -> Callable[[_CallableT], _CallableT]:
        """``MCPServer.tool``, and ``reconcile``: the tool's reconciler (see
        :mod:`rmcp_actors.server.reconcile`); ``task_support``: whether it may, must or must
        not run as a task (a server created with ``tasks=True``; ``"optional"`` if not given)."""
        register = super().tool(name, title, description, annotations, icons, meta, structured_output)

        def decorator(fn: _CallableT) -> _CallableT:
            register(fn)
            if reconcile is not None:
                self.rmcp.reconcilers[name or fn.__name__] = reconcile
            if task_support is not None:
                self.rmcp.task_support[name or fn.__name__] = task_support
            return fn

        return decorator

    @property
    def rmcp(self) -> RMCPServerSide:
        """The RMCP side of this server (statistics, drain)."""
        side = rmcp_of(self)
        assert side is not None  # installed in __init__ and never removed
        return side

    async def run_stdio_async(self) -> None:
        """Serve over stdio with the linear-framing transport (``run()`` and ``run("stdio")``)."""
        await serve_stdio(self)


class _Beside:
    """Run a task beside a block, cancelled when the block ends.

    Not a generator with ``yield`` inside a task group: the block's own exception must leave
    unchanged, not wrapped in an exception group by the task group.
    """

    def __init__(self, task: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self._task = task
        self._group = anyio.create_task_group()

    async def __aenter__(self) -> None:
        await self._group.__aenter__()
        self._group.start_soon(self._task)

    async def __aexit__(self, *exc_info: object) -> None:
        self._group.cancel_scope.cancel()
        await self._group.__aexit__(None, None, None)


def _tool_check(server: MCPServer[Any]) -> CallCheck:
    """What ``MCPServer`` itself refuses before running a tool: an unknown name, and arguments
    its own validator rejects (pydantic, lax as the SDK is: ``"5"`` passes for an integer)."""
    # MCPServer has no public lookup of a tool object; the validator lives on it.
    tools = server._tool_manager  # pyright: ignore[reportPrivateUsage]

    def check(name: str, arguments: Mapping[str, Any]) -> tuple[NackCode, str] | None:
        tool = tools.get_tool(name)
        if tool is None:
            return NackCode.UNKNOWN_TOOL, f"no tool named {name!r}"
        try:
            tool.fn_metadata.validate_arguments(dict(arguments))
        except ValidationError as error:
            fields = sorted({".".join(str(part) for part in detail["loc"]) for detail in error.errors()})
            return NackCode.INVALID_ARGUMENTS, f"tool {name!r} rejected the arguments {fields}: {error}"
        except Exception:
            # A validator that crashes is the tool's failure, reported by the SDK as such.
            return None
        return None

    return check


def _declared_repeatable(server: MCPServer[Any]) -> Repeatable:
    """Whether ``MCPServer`` registered a tool as read-only (``readOnlyHint``): the server
    author's own declaration, trusted as such. Not ``idempotentHint``: a lookup of an unclaimed
    key answers ``aborted``, which for a tool with an effect could hide a run that happened
    (``docs/protocol.md`` section 5). A client's view of annotations is another matter. Looked
    up per call: tools may be added after installation."""
    tools = server._tool_manager  # pyright: ignore[reportPrivateUsage]

    def repeatable(name: str) -> bool:
        tool = tools.get_tool(name)
        annotations = None if tool is None else tool.annotations
        return annotations is not None and bool(annotations.read_only_hint)

    return repeatable


def _result_converter(server: MCPServer[Any]) -> ResultConverter:
    """Convert a reconciler's result as ``MCPServer`` converts its tool's return value."""
    tools = server._tool_manager  # pyright: ignore[reportPrivateUsage]

    def convert(name: str, value: Any) -> Any:
        tool = tools.get_tool(name)
        return value if tool is None else tool.fn_metadata.convert_result(value)

    return convert


def _serve_tasks(server: Server[Any], extension: TasksExtension) -> None:
    """Register the extension's methods and advertisement on ``server``, as ``MCPServer`` does
    for the extensions it is constructed with (an installed server exists already)."""
    bindings = extension.methods()
    taken = [binding.method for binding in bindings if server.get_request_handler(binding.method) is not None]
    if taken:
        raise RMCPConfigError(f"the server already serves {taken}: install RMCP without tasks", path="tasks")
    for binding in bindings:
        server.add_request_handler(binding.method, binding.params_type, version_gated(binding))
    server.extensions[extension.identifier] = extension.settings()


def _serve_transfers(server: Server[Any], transfers: TransferService) -> None:
    bindings = transfers.methods()
    taken = [binding.method for binding in bindings if server.get_request_handler(binding.method) is not None]
    if taken:
        raise RMCPConfigError(
            f"the server already serves {taken}: install RMCP with transfer=False", path="transfer"
        )
    for binding in bindings:
        server.add_request_handler(binding.method, binding.params_type, binding.handler)


def _lowlevel(server: Server[Any] | MCPServer[Any]) -> Server[Any]:
    if isinstance(server, MCPServer):
        # MCPServer offers no public way to wrap the lifespan once constructed.
        return server._lowlevel_server  # pyright: ignore[reportPrivateUsage]
    return server


def _with_rmcp_lifespan(
    side: RMCPServerSide,
    inner: Callable[[Server[Any]], AbstractAsyncContextManager[Any]],
) -> Callable[[Server[Any]], AbstractAsyncContextManager[Any]]:
    """Wrap a server lifespan: RMCP registers its instance on entry; on the last exit it drains
    and closes the store."""
    entered = 0

    @asynccontextmanager
    async def lifespan(app: Server[Any]) -> AsyncGenerator[Any]:
        nonlocal entered
        entered += 1
        _store_users[id(side.store)] = _store_users.get(id(side.store), 0) + 1
        try:
            await side.start()
            async with inner(app) as state, _Beside(side.keep_lease), side.hosting_tasks(state):
                yield state
        finally:
            entered -= 1
            users = _store_users.pop(id(side.store)) - 1
            if users:
                _store_users[id(side.store)] = users
            # The serve loop has ended, so no run is in flight: this only marks the instance
            # gone in the store and closes it, and must happen even when cancelled.
            with anyio.move_on_after(_RELEASE_TIMEOUT_S, shield=True):
                try:
                    if not entered:
                        await side.drain(timeout_s=0)
                finally:
                    if not users and side.close_store:
                        await side.store.aclose()

    return lifespan
