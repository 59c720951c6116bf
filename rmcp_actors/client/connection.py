"""The connection actor: one per MCP server, owning its ``mcp.Client`` across reconnects.

The actor task owns the transport (``async with Client`` runs in a session task of its own
nursery); callers never run inside it. They take a *lease* on the current session (a plain
attribute read, no channel hop) and call the SDK in their own task, so the data plane costs
nothing extra while connect, teardown and reconnect stay in the actor. When the transport
dies the actor notices (the read stream ends, or a caller reports ``-32000``), tears the
session down in its own task and reconnects with capped, jittered exponential backoff for as
long as the server is configured. A flaky server is never a crash of the actor.
"""

from __future__ import annotations

import enum
import logging
import random
from contextlib import suppress
from functools import partial
from typing import cast, final

import anyio
import anyio.abc
import anyio.lowlevel
import attrs
import httpx2
from mcp import Client, MCPError
from mcp_types import Tool
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from .._exceptions import is_fatal
from .._protocol import EXPERIMENTAL_KEY, EXTENSION_ID, META_KEY, ServerSettings, decode_server_settings
from .._transfer import FEATURE_TRANSFER
from ..config import AuthConfig, ServerPolicy, ServerSpec
from ..errors import RMCPAuthError, RMCPNetworkError
from ..runtime import Actor, ActorStatistics, ReplySlot
from ._failures import Evidence
from ._http_evidence import current_evidence, describe_refusal
from ._tasks import TaskStore, gate_task_capability
from ._transport import Traffic, build_client
from ._validation import defer_result_validation
from .auth import resolve_auth
from .backoff import backoff_delay
from .callbacks import apply_log_level

__all__ = ["CheckHung", "Connection", "ConnectionState", "ConnectionStatistics", "RefreshTools", "Session"]

_TOOLS_PAGE_CAP = 1000
_watchdog_logger = logging.getLogger("rmcp_actors.watchdog")
_logger = logging.getLogger("rmcp_actors")


class ConnectionState(enum.Enum):
    """Where a connection actor is in its life."""

    CONNECTING = "connecting"
    READY = "ready"
    DISCONNECTED = "disconnected"
    CLOSED = "closed"


@final
@attrs.define(eq=False)
class Session:
    """One connected generation of a server's transport; a caller's lease points at it."""

    generation: int
    client: Client | None = None
    tools: dict[str, Tool] = attrs.Factory(dict[str, Tool])
    protocol_version: str | None = None
    rmcp: ServerSettings | None = None
    ready: anyio.Event = attrs.Factory(anyio.Event)
    broken: anyio.Event = attrs.Factory(anyio.Event)
    ended: anyio.Event = attrs.Factory(anyio.Event)
    scope: anyio.CancelScope = attrs.Factory(anyio.CancelScope)
    error: BaseException | None = None
    connected: bool = False
    # What the HTTP transport saw of the handshake (its status), to explain a refusal.
    evidence: Evidence | None = None
    # Tools this server refused without a task (-32021 asking for the tasks extension): their
    # later calls declare it at once (2026-07-28 lists no execution.taskSupport to tell).
    requires_task: set[str] = attrs.Factory(set[str])

    @property
    def usable(self) -> bool:
        """True while calls may be sent on this session."""
        return self.client is not None and not self.broken.is_set()


@final
@attrs.frozen
class ConnectionStatistics(ActorStatistics):
    """A read-only snapshot of one connection actor (``name`` is the server's name)."""

    state: ConnectionState
    generation: int
    connects: int
    failed_connects: int
    protocol_version: str | None
    tools: int
    last_error: str | None
    hung_restarts: int


@final
@attrs.frozen
class RefreshTools:
    """Ask a connection actor to list the server's tools again (every page) and cache them."""

    reply: ReplySlot[dict[str, Tool]]


@final
@attrs.frozen
class CheckHung:
    """Tell a connection actor that its server showed no sign of life while calls waited on it
    (sent by the watchdog): ping it, and reconnect if it does not answer.

    Attributes:
        generation: The session the watchdog saw; a newer one is left alone.
        silent_s: How long the server has been silent (for the log).
    """

    generation: int
    silent_s: float


ConnectionRequest = RefreshTools | CheckHung


@final
@attrs.define(eq=False)
class Connection(Actor[ConnectionRequest]):
    """The actor owning one MCP server's connection.

    Its inbox takes control requests (:class:`RefreshTools`); its reconnect loop runs beside
    the inbox in the actor's own nursery.

    Args:
        name: The server's name.
        spec: How to reach the server.
        policy: The server's resolved policy (timeouts, reconnect backoff, when_disconnected).
        task_store: Where the tasks that calls with a key created are kept (see ``_tasks``).
    """

    spec: ServerSpec
    policy: ServerPolicy
    task_store: TaskStore | None = None
    _state: ConnectionState = ConnectionState.CONNECTING
    _session: Session | None = None
    _generation: int = 0
    _connects: int = 0
    _failed_connects: int = 0
    _last_error: BaseException | None = None
    _tools: dict[str, Tool] = attrs.Factory(dict[str, Tool])
    _state_changed: anyio.Event = attrs.Factory(anyio.Event)
    # Set once the actor's first life accepts requests, or ended without ever accepting them.
    _first_life_settled: anyio.Event = attrs.Factory(anyio.Event)
    _first_life_failure: RMCPNetworkError | None = None
    _random: random.Random = attrs.Factory(random.Random)
    # Messages received from the server, across sessions: the watchdog's sign of life.
    _traffic: Traffic = attrs.Factory(Traffic)
    _hung_restarts: int = 0
    # The HTTP client's auth, resolved once: an OAuth provider keeps its tokens across sessions.
    _auth: httpx2.Auth | None = None
    # Why the latest connect was refused for its credentials (None once one succeeds).
    _auth_refusal: RMCPAuthError | None = None

    @property
    def state(self) -> ConnectionState:
        """The connection's current state."""
        if self._state is ConnectionState.READY and self.current_session() is None:
            # The transport broke a moment ago; the actor has not seen the session end yet.
            return ConnectionState.DISCONNECTED
        return self._state

    @property
    def tools(self) -> dict[str, Tool]:
        """The tools the server listed at the latest connection, by name."""
        return self._tools

    def statistics(self) -> ConnectionStatistics:
        """Return a snapshot of the connection's state and counters."""
        session = self._session
        inbox = super().statistics()
        return ConnectionStatistics(
            name=self.name,
            inbox_used=inbox.inbox_used,
            inbox_size=inbox.inbox_size,
            pending_asks=inbox.pending_asks,
            oldest_ask_s=inbox.oldest_ask_s,
            state=self.state,
            generation=self._generation,
            connects=self._connects,
            failed_connects=self._failed_connects,
            protocol_version=session.protocol_version if session else None,
            tools=len(self._tools),
            last_error=_describe(self._last_error, self.spec) if self._last_error else None,
            hung_restarts=self._hung_restarts,
        )

    # -- liveness: what the watchdog reads ---------------------------------------------------

    def activity(self) -> int:
        """A counter that moves whenever the server shows life: a message received, or a new
        session (both only grow, so their sum moves when either does)."""
        return self._traffic.received + self._generation

    def suspect_hung(self, silent_s: float) -> None:
        """The watchdog saw no message from the server for ``silent_s`` while calls waited on
        it: have the actor ping it, and reconnect if it does not answer. Never waits."""
        session = self.current_session()
        if session is None:
            return  # not connected: the reconnect loop is already on it
        # A full inbox skips this check; the watchdog asks again after stall_s.
        with suppress(anyio.WouldBlock):
            self.send_nowait(CheckHung(session.generation, silent_s))

    # -- data plane: what callers use -------------------------------------------------------

    def current_session(self) -> Session | None:
        """The usable session, or None while disconnected. Never waits."""
        session = self._session
        if session is not None and session.usable:
            return session
        return None

    async def wait_session(self) -> Session:
        """Return a usable session, waiting for a reconnect if the policy says ``wait``.

        The caller's cancel scope bounds the wait.

        Raises:
            RMCPNetworkError: The server is disconnected and ``when_disconnected = "fail"``, or the
                connection was closed.
        """
        while True:
            session = self.current_session()
            if session is not None:
                return session
            if self._state is ConnectionState.CLOSED:
                raise RMCPNetworkError(
                    f"the connection to {self.spec.describe()} is closed (server removed or runtime "
                    "stopping); add the server again to call it",
                    server=self.name,
                )
            refusal = self._auth_refusal
            if refusal is not None:
                # Reconnecting goes on in the background, but the same credentials are refused
                # again: waiting out the deadline for it would only hide why.
                raise RMCPAuthError(
                    f"{refusal.message}; nothing was sent. The runtime keeps reconnecting: fix the "
                    "credentials (secrets from the environment are read again when the server is "
                    "removed and added again)",
                    server=self.name,
                )
            if self.policy.when_disconnected == "fail":
                raise RMCPNetworkError(
                    f"not connected to {self.spec.describe()} ({self._reason()}); the runtime is "
                    "reconnecting: retry later, or set when_disconnected = 'wait' to wait within "
                    "the call's deadline",
                    server=self.name,
                )
            await self._state_changed.wait()

    def unreachable_reason(self) -> str | None:
        """Why the server cannot be reached now: its last connection error, secrets masked;
        None while a session is usable or before any connection failed."""
        if self.current_session() is not None or self._last_error is None:
            return None
        return f"last connection error: {_describe(self._last_error, self.spec)}"

    def report_broken(self, session: Session) -> None:
        """Tell the actor that a call saw ``session``'s transport fail (``MCPError -32000``)."""
        session.broken.set()

    async def wait_first_connection(self) -> None:
        """Wait while the actor's first connection is being made (``add_server`` in progress).

        Returns at once afterwards, whatever the state; the caller's cancel scope bounds the wait.

        Raises:
            RMCPNetworkError: The first connection failed, or the connection was closed first
                (the server removed, or the runtime stopping).
        """
        await self._first_life_settled.wait()
        if self._connects > 0:
            return
        failure = self._first_life_failure
        if failure is not None:
            error_class = RMCPAuthError if isinstance(failure, RMCPAuthError) else RMCPNetworkError
            raise error_class(
                f"{failure.message} (the first connection, which add_server reported); add the "
                "server again once it is reachable",
                server=self.name,
            ) from failure
        raise RMCPNetworkError(
            f"the connection to {self.spec.describe()} was closed during its first connection "
            "(server removed or runtime stopping); add the server again to use it",
            server=self.name,
        )

    # -- control plane: the actor ----------------------------------------------------------

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Connect, then keep the server connected until cancelled.

        The first connection of the actor's life must succeed (``task_status.started()`` is
        called once it has), so that ``add_server`` reports a bad command or URL at once. After
        a restart by its supervisor, the actor starts at once and reconnects in the background.

        Raises:
            RMCPNetworkError: The first connection failed.
        """
        first_life = self._connects == 0
        crashed = False
        try:
            async with anyio.create_task_group() as task_group:
                if first_life:
                    try:
                        await self._connect(task_group)
                    except RMCPNetworkError as error:
                        # A refresh waiting for this first connection tells its caller why.
                        self._first_life_failure = error
                        raise
                await task_group.start(super().run)
                self._first_life_settled.set()
                task_status.started()
                failures = 0 if first_life else 1
                while True:
                    session = self._session
                    if session is not None and session.connected:
                        # Only a session that was up resets the backoff: failed connects grow it.
                        session.connected = False
                        await session.ended.wait()
                        self._set_state(ConnectionState.DISCONNECTED)
                        failures = 0
                    delay = backoff_delay(
                        failures + 1,
                        self.policy.reconnect.base_delay_s,
                        self.policy.reconnect.max_delay_s,
                        self._random,
                    )
                    await anyio.sleep(delay)
                    try:
                        await self._connect(task_group)
                    except RMCPNetworkError:
                        failures += 1
        except Exception:
            crashed = True
            raise
        finally:
            self._first_life_settled.set()
            # After a crash the supervisor restarts the actor: callers may keep waiting.
            self._set_state(ConnectionState.DISCONNECTED if crashed else ConnectionState.CLOSED)

    async def handle(self, message: ConnectionRequest) -> None:
        """Serve one control request from the inbox; a server failure fails the reply, not the actor."""
        if isinstance(message, CheckHung):
            await self._check_hung(message)
            return
        session = self.current_session()
        if session is None or session.client is None:
            message.reply.fail(
                RMCPNetworkError(
                    f"not connected to {self.spec.describe()} ({self._reason()})", server=self.name
                )
            )
            return
        try:
            with anyio.fail_after(self.policy.connect_timeout_s):
                tools = await _list_all_tools(session.client)
        except (MCPError, TimeoutError) as error:
            message.reply.fail(
                RMCPNetworkError(
                    f"could not list the tools of {self.spec.describe()}: {self.spec.redact(str(error))}",
                    server=self.name,
                )
            )
            return
        except Exception as error:
            # Anything else (a tools/list the SDK's validation rejects) is this request's failure
            # too: crashing here would cancel the session that callers are using.
            message.reply.fail(
                RMCPNetworkError(
                    f"could not list the tools of {self.spec.describe()}: the server's answer was "
                    f"rejected ({_describe(error, self.spec)}); the cached list is kept, calls go on",
                    server=self.name,
                )
            )
            return
        session.tools = tools
        session.rmcp = _rmcp_settings(session.client, tools)
        self._tools = tools
        message.reply.set(tools)

    async def _check_hung(self, message: CheckHung) -> None:
        session = self.current_session()
        if session is None or session.client is None or session.generation != message.generation:
            return  # that session is gone already
        received = self._traffic.received
        # The handshake's own bound: a live server answers a ping no slower than an initialize
        # (not stall_s: a short stall_s on a loaded machine would restart live servers).
        timeout_s = self.policy.connect_timeout_s
        with anyio.move_on_after(timeout_s):
            # An error is an answer too (the modern protocol has no ping: -32601): it is alive.
            with suppress(MCPError):
                await session.client.session.send_ping()
            return
        if self._traffic.received != received or not session.usable:
            return  # something arrived meanwhile, or the session ended on its own
        self._hung_restarts += 1
        reason = (
            f"{self.spec.describe()} sent nothing for {message.silent_s:.1f} s while calls waited "
            f"on it and did not answer a ping within {timeout_s:g} s: it hung"
        )
        self._last_error = RMCPNetworkError(f"{reason}; reconnected", server=self.name)
        _watchdog_logger.warning("%s; reconnecting (calls in flight see the session lost)", reason)
        # As when a call sees the transport fail: the session task tears it down (a stdio
        # server is terminated, then killed) and the actor reconnects.
        self.report_broken(session)

    async def _connect(self, task_group: anyio.abc.TaskGroup) -> None:
        if self._auth is None and self.spec.auth is not None:
            try:
                self._auth = resolve_auth(self.spec)
            except RMCPAuthError as error:
                self._failed_connects += 1
                self._last_error = error
                self._refused(error)
                raise
        self._generation += 1
        session = Session(generation=self._generation)
        self._session = session
        self._set_state(ConnectionState.CONNECTING)
        task_group.start_soon(self._run_session, session)
        with anyio.move_on_after(self.policy.connect_timeout_s):
            await _first_of(session.ready, session.ended)
        if session.ready.is_set() and not session.ended.is_set():
            session.connected = True
            self._auth_refusal = None
            self._connects += 1
            self._tools = session.tools
            self._set_state(ConnectionState.READY)
            return
        session.scope.cancel()
        # The SDK's own teardown (stdio: close stdin, SIGTERM, SIGKILL) is shielded and bounded.
        await session.ended.wait()
        self._failed_connects += 1
        error = session.error
        self._last_error = error
        refusal = (
            describe_refusal(session.evidence, authenticated=self.spec.auth is not None)
            if session.evidence is not None
            else None
        )
        if refusal is not None:
            # Nothing to retry blindly: the same credentials would be refused again.
            refused = RMCPAuthError(
                f"could not connect to {self.spec.describe()}: {self.spec.redact(refusal)}", server=self.name
            )
            self._refused(refused)
            raise refused from error
        # Not refused this time (the server is down, say): calls wait for the reconnect again
        # rather than fail with an earlier connect's refusal.
        self._auth_refusal = None
        reason = (_describe(error, self.spec) if error is not None else None) or (
            f"no answer to the handshake within connect_timeout_s={self.policy.connect_timeout_s}"
            + (
                " (an OAuth authorization a person completes in a browser counts in it: raise "
                "connect_timeout_s for the first login; later connections use the stored tokens)"
                if isinstance(self.spec.auth, AuthConfig) and self.spec.auth.method == "authorization_code"
                else ""
            )
        )
        raise RMCPNetworkError(
            f"could not connect to {self.spec.describe()}: {reason}; check the command or URL and "
            "that the server speaks MCP on it",
            server=self.name,
        ) from error

    async def _run_session(self, session: Session) -> None:
        if self.spec.transport == "http":
            # This task's context reaches the handshake's POST (see _http_evidence).
            session.evidence = Evidence()
            current_evidence.set(session.evidence)
        try:
            with session.scope:
                async with build_client(
                    self.spec,
                    session.broken.set,
                    max_sse_event_bytes=self.policy.max_sse_event_bytes,
                    traffic=self._traffic,
                    refresh_tools=partial(self._tools_changed, session),
                    auth=self._auth,
                ) as client:
                    await apply_log_level(client, self.spec.callbacks, self.name)
                    session.tools = await _list_all_tools(client)
                    session.rmcp = _rmcp_settings(client, session.tools)
                    session.protocol_version = client.protocol_version
                    if client.protocol_version in MODERN_PROTOCOL_VERSIONS:
                        gate_task_capability(client)
                    if session.rmcp is not None and FEATURE_TRANSFER in session.rmcp.features:
                        defer_result_validation(client)
                    session.client = client
                    session.ready.set()
                    try:
                        await session.broken.wait()
                    finally:
                        # No new call may start on a client that is being torn down.
                        session.broken.set()
        except BaseException as exc:
            if is_fatal(exc):
                raise
            # Cancellation from above (runtime stopping) is re-raised by this checkpoint; what is
            # left is the transport failing, which is ours to handle, not the supervisor's.
            await anyio.lowlevel.checkpoint_if_cancelled()
            session.error = _root_cause(exc)
            self._last_error = session.error
        finally:
            session.broken.set()
            session.client = None
            session.ended.set()

    async def _tools_changed(self, session: Session) -> dict[str, Tool] | None:
        """``session``'s server said its tools changed: have the actor list them again (as
        ``list_tools(refresh=True)`` does) and return them, or None when that failed (the cached
        list stays; the next change or refresh catches up)."""
        # A change announced during the handshake (server-everything registers the tools that
        # depend on the client's capabilities then) is listed once the session serves calls
        # and the inbox runs (after the actor's first connection).
        await session.ready.wait()
        await self._first_life_settled.wait()
        if not session.usable:
            return None  # the next session lists its tools when it connects
        try:
            return await self.ask(RefreshTools)
        except Exception as error:
            _logger.warning(
                "server %r said its tools changed, but listing them again failed (%s); the cached "
                "list is kept",
                self.name,
                _describe(error, self.spec),
            )
            return None

    def _refused(self, error: RMCPAuthError) -> None:
        self._auth_refusal = error
        # Wakes the calls waiting for a reconnect: this one will not come by itself.
        self._set_state(ConnectionState.DISCONNECTED)

    def _set_state(self, state: ConnectionState) -> None:
        self._state = state
        changed, self._state_changed = self._state_changed, anyio.Event()
        changed.set()

    def _reason(self) -> str:
        if self._last_error is not None:
            return f"last error: {_describe(self._last_error, self.spec)}"
        return f"state {self.state.value}"


async def _first_of(*events: anyio.Event) -> None:
    async with anyio.create_task_group() as task_group:

        async def wait_then_cancel(event: anyio.Event) -> None:
            await event.wait()
            task_group.cancel_scope.cancel()

        for event in events:
            task_group.start_soon(wait_then_cancel, event)


def _rmcp_settings(client: Client, tools: dict[str, Tool]) -> ServerSettings | None:
    """What the server advertises of RMCP: its capability on the modern protocol, the
    experimental capability older clients read, or the stamp on its tools (which survives
    every protocol version)."""
    capabilities = client.server_capabilities
    for section, key in (
        (capabilities.extensions, EXTENSION_ID),
        (capabilities.experimental, EXPERIMENTAL_KEY),
    ):
        if section is not None and (settings := decode_server_settings(section.get(key))) is not None:
            return settings
    for tool in tools.values():
        if (
            tool.meta is not None
            and (settings := decode_server_settings(tool.meta.get(META_KEY))) is not None
        ):
            return settings
    return None


async def _list_all_tools(client: Client) -> dict[str, Tool]:
    tools: dict[str, Tool] = {}
    cursor: str | None = None
    for _ in range(_TOOLS_PAGE_CAP):
        page = await client.list_tools(cursor=cursor)
        tools.update((tool.name, tool) for tool in page.tools)
        cursor = page.next_cursor
        if cursor is None:
            break
    return tools


def _root_cause(exc: BaseException) -> BaseException:
    """The most telling exception inside a (possibly nested) exception group."""
    while isinstance(exc, BaseExceptionGroup):
        group = cast("BaseExceptionGroup[BaseException]", exc)
        inner = [e for e in group.exceptions if not isinstance(e, anyio.get_cancelled_exc_class())]
        if not inner:
            return group
        exc = inner[0]
    return exc


def _describe(exc: BaseException, spec: ServerSpec) -> str:
    """Why a connection failed, in words, with the spec's secrets masked."""
    # The OS names the working directory when it is the one that is missing, not the command.
    if isinstance(exc, OSError) and spec.cwd is not None and exc.filename == spec.cwd:
        if isinstance(exc, NotADirectoryError):
            return f"working directory is not a directory ({spec.cwd})"
        if isinstance(exc, FileNotFoundError):
            return f"working directory not found ({spec.cwd})"
    if isinstance(exc, FileNotFoundError):
        return spec.redact(f"command not found ({exc.filename or exc})")
    text = str(exc) or type(exc).__name__
    return spec.redact(f"{type(exc).__name__}: {text}")
