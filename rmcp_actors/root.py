"""RMCPSupervisor: the public entry point, owning the actor tree of one runtime.

::

    RMCPSupervisor.open()             root Supervisor "rmcp" (one_for_one, restarts nothing)
    ├── Supervisor "servers"          one_for_one, dynamic, restarts nothing
    │   └── Supervisor "server:<name>"  rest_for_one: the Connection, then its gates' actors
    ├── Supervisor "transactions"     one_for_one, restarts nothing: one temporary child per
    │                                 running transaction (see ``transactions/saga.py``)
    └── Watchdog "watchdog"           stall reports, hung servers (see ``runtime/watchdog.py``)

The scheduler is shared state, not an actor (see ``flow/scheduler.py``); calls run in the
caller's task and lease the connection's session, so a call crosses no inbox. Each server's
gates (:class:`~rmcp_actors.flow._server.ServerFlow`) are read synchronously by its calls.
"""

from __future__ import annotations

import math
import random
import secrets
from collections.abc import AsyncGenerator, AsyncIterable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager, suppress
from typing import Any, NoReturn, final

import anyio
import anyio.abc
import attrs
from mcp import Client
from mcp_types import Tool

from ._exceptions import FATAL, is_fatal, leaves
from ._health import judge_scheduler, judge_watchdog, register_server
from ._protocol import NackCode, ServerSettings
from .client._tasks import MemoryTaskStore, SQLiteTaskStore, TaskStore
from .client.call import CallRequest, perform_call
from .client.callbacks import ProgressCallback, notify_roots_changed
from .client.connection import Connection, ConnectionState, ConnectionStatistics, RefreshTools
from .client.transfers import CallTransfer, ResultSink, TransferProgressCallback, check_sink
from .config import CallPolicy, RateLimitOverrides, RMCPConfig, ServerSpec
from .errors import (
    RMCPArgumentError,
    RMCPConfigError,
    RMCPError,
    RMCPNackError,
    RMCPSupervisorError,
    RMCPTimeoutError,
    UnknownServerError,
    UnknownToolError,
)
from .flow._server import ServerFlow
from .flow.batch import Batch, KeyFunction
from .flow.breaker import BreakerChangeCallback, BreakerStatistics
from .flow.budget import RetryBudgetStatistics
from .flow.limiter import LimiterStatistics
from .flow.scheduler import Scheduler, SchedulerStatistics
from .lifecycle import LifecycleCallback
from .result import CallResult
from .runtime import ChildSpec, RestartIntensity, Strategy, Supervisor, SupervisorStatistics
from .runtime.health import ComponentRegistry, Health
from .runtime.watchdog import StallReport, Watchdog, WorkRegistry
from .stores.journal_factory import journal_from_settings
from .transactions._engine import Engine, EventCallback, LookedUp
from .transactions._model import TransactionState, TransactionSummary
from .transactions.journal import Journal
from .transactions.locks import LockManager, TransactionLocks
from .transactions.recovery import RecoveryReport, recover, resolve
from .transactions.saga import LockManagerHook, Transaction

__all__ = ["RMCPSupervisor", "RuntimeStatistics"]


# The SDK's stdio shutdown waits 2 s for exit, then 2 s after SIGTERM before SIGKILL, then up
# to 2 s to reap: a connection actor gets longer than that before its supervisor moves on.
_CONNECTION_SHUTDOWN_S = 7.0
# A server's subtree stops its gates' actors (quick) before its connection.
_SERVER_SHUTDOWN_S = _CONNECTION_SHUTDOWN_S + 2.0
# Transaction actors are stopped by their blocks; any left at shutdown are cancelled at once.
_TRANSACTIONS_SHUTDOWN_S = 2.0


@final
@attrs.frozen
class RuntimeStatistics:
    """A snapshot of the whole runtime, built from each actor's ``statistics()``."""

    scheduler: SchedulerStatistics
    connections: tuple[ConnectionStatistics, ...]
    supervisors: tuple[SupervisorStatistics, ...]
    #: Each server's retry budget, then its tools' own budgets, server by server.
    budgets: tuple[RetryBudgetStatistics, ...] = ()
    #: Each server's rate limiter: its gates' current rates, waiters, signals.
    limiters: tuple[LimiterStatistics, ...] = ()
    #: Every circuit breaker of every server: each server's own, then its tools'.
    breakers: tuple[BreakerStatistics, ...] = ()


@attrs.define(eq=False)
class _Server:
    spec: ServerSpec
    connection: Connection
    flow: ServerFlow
    # Resolved once, for the configured tools only: callers' tool names never grow it.
    policies: Mapping[str, CallPolicy]
    default_policy: CallPolicy
    intensity: RestartIntensity
    # The server's subtree in the servers supervisor: what removing this entry stops.
    child: ChildSpec = attrs.field(init=False)
    supervisor: Supervisor | None = None
    # Takes the server out of health snapshots and the watchdog's watch.
    forget: Callable[[], None] = lambda: None

    def __attrs_post_init__(self) -> None:
        self.child = ChildSpec(f"server:{self.spec.name}", self.run, shutdown_timeout_s=_SERVER_SHUTDOWN_S)

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run the server's subtree: its connection first (whose first connection must
        succeed, or this start fails with the connection's error), then its gates' actors.

        Each run (a restart of the subtree included) builds a new supervisor: its children are
        added with ``start_child`` so that a failed first connection reaches ``add_server`` as
        the connection's own error, not as a restart.
        """
        supervisor = self.supervisor = Supervisor(
            f"server:{self.spec.name}", Strategy.REST_FOR_ONE, intensity=self.intensity
        )
        async with anyio.create_task_group() as task_group:
            await task_group.start(supervisor.run)
            try:
                await supervisor.start_child(
                    ChildSpec(
                        _child_name(self.spec.name),
                        self.connection.run,
                        shutdown_timeout_s=_CONNECTION_SHUTDOWN_S,
                    )
                )
                for spec in self.flow.child_specs():
                    await supervisor.start_child(spec)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await supervisor.stop()
                raise
            task_status.started()


@final
class RMCPSupervisor:
    """A running rmcp_actors runtime: servers, their connections, and reliable tool calls.

    Not constructed directly: use ``async with RMCPSupervisor.open(config) as sup:``.
    """

    def __init__(
        self,
        config: RMCPConfig,
        scheduler: Scheduler,
        root: Supervisor,
        servers: Supervisor,
        *,
        components: ComponentRegistry,
        work: WorkRegistry,
        transactions: Supervisor,
        journal: Journal,
    ) -> None:
        self._config = config
        self._scheduler = scheduler
        self._root = root
        self._servers_supervisor = servers
        self._components = components
        self._work = work
        self._servers: dict[str, _Server] = {}
        self._random = random.Random()
        self._on_breaker_change: BreakerChangeCallback | None = None
        self._transactions_supervisor = transactions
        self._journal = journal
        self._engine = Engine(
            journal,
            self._step_call,
            config.transactions.compensation_timeout_s,
            knows=self._servers.__contains__,
            look_up=self._step_lookup,
        )
        # The lock manager behind tx.acquire and resources=: shared state, not an actor (see
        # transactions/locks.py); the watchdog shows its waits and its wait-for graph.
        lock_manager = LockManager(config.transactions.lock_timeout_s)
        lock_manager.watch(work)
        components.register("locks", "locks", lock_manager.statistics)
        self._locks: LockManagerHook | None = TransactionLocks(lock_manager)
        # Which task each idempotency key created (calls that run as tasks; see client/_tasks.py).
        self._task_store: TaskStore = MemoryTaskStore()

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        config: RMCPConfig | None = None,
        *,
        on_breaker_change: BreakerChangeCallback | None = None,
        on_stall: Callable[[StallReport], None] | None = None,
        journal: Journal | None = None,
        task_store: TaskStore | None = None,
    ) -> AsyncGenerator[RMCPSupervisor]:
        """Start a runtime, connect the configured servers, and stop everything on exit.

        Leaving the block stops the connections side by side, since they are independent (each
        stdio server gets the SDK's terminate, wait, kill sequence: stopping many costs about one
        sequence), and joins every task the runtime started.

        Args:
            config: The configuration; ``None`` means built-in defaults and no servers.
            on_breaker_change: Called synchronously with a ``BreakerChange`` each time a
                circuit breaker (a server's, or a tool's on a server) changes state; an
                exception it raises is logged and ignored.
            on_stall: Called with the watchdog's report whenever calls are in flight and none
                completed for ``runtime.stall_s`` (the report is logged too, logger
                ``rmcp_actors.watchdog``); it runs in the watchdog's task and must not wait.
            journal: The transaction journal to use instead of the one ``[transactions]``
                names; the caller keeps it (it is not closed on exit). With
                ``recover_on_open``, its incomplete transactions are recovered before this yields.
            task_store: Where the task each idempotency key created is kept, instead of the
                SQLite file ``runtime.task_store`` names (or memory); the caller keeps it.

        Yields:
            The running supervisor.

        Raises:
            RMCPNetworkError: A server named in the config could not be connected at start.
            RMCPSupervisorError: A runtime actor failed beyond its restart intensity; the
                failing actor's last exception is the ``__cause__``.
        """
        config = config if config is not None else RMCPConfig()
        runtime = config.runtime
        # Only a server's own subtree restarts its actors, within the configured intensity. The
        # supervisors above restart nothing: they hold state a restart cannot rebuild (the added
        # servers), and an escalation reaching them ends the runtime with RMCPSupervisorError.
        escalate = RestartIntensity(max_restarts=0, period_s=runtime.restart_period_s)
        servers = Supervisor("servers", Strategy.ONE_FOR_ONE, intensity=escalate)
        # Transactions are temporary children: one that crashes is gone, its siblings untouched.
        transactions = Supervisor("transactions", Strategy.ONE_FOR_ONE, intensity=escalate)
        components, work = ComponentRegistry(), WorkRegistry()
        watchdog = Watchdog(
            "watchdog",
            work,
            components,
            stall_s=runtime.stall_s,
            restart_hung=runtime.restart_hung,
            on_stall=on_stall,
        )
        root = Supervisor(
            "rmcp",
            Strategy.ONE_FOR_ONE,
            children=[
                ChildSpec("servers", servers.run, shutdown_timeout_s=_SERVER_SHUTDOWN_S),
                ChildSpec("transactions", transactions.run, shutdown_timeout_s=_TRANSACTIONS_SHUTDOWN_S),
                ChildSpec("watchdog", watchdog.run, shutdown_timeout_s=1.0),
            ],
            intensity=escalate,
        )
        scheduler = Scheduler(
            runtime.max_concurrency,
            runtime.max_queue,
            runtime.overflow,
            config.tenants,
            runtime.priority_aging_s,
        )
        components.register("scheduler", "scheduler", scheduler.statistics, judge=judge_scheduler)
        components.register("watchdog", "watchdog", watchdog.statistics, judge=judge_watchdog)
        owns_journal = journal is None
        journal = journal if journal is not None else journal_from_settings(config.transactions)
        supervisor = cls(
            config,
            scheduler,
            root,
            servers,
            components=components,
            work=work,
            transactions=transactions,
            journal=journal,
        )
        supervisor._on_breaker_change = on_breaker_change
        owns_task_store = task_store is None and runtime.task_store is not None
        if task_store is not None:
            supervisor._task_store = task_store
        elif runtime.task_store is not None:
            supervisor._task_store = SQLiteTaskStore(runtime.task_store)
        try:
            async with anyio.create_task_group() as task_group:
                await task_group.start(root.run)
                try:
                    for spec in config.servers.values():
                        await supervisor.add_server(spec)
                    if config.transactions.recover_on_open:
                        await supervisor.recover()
                    yield supervisor
                finally:
                    # Calls waiting for a token fail now, before their connections stop.
                    for entry in supervisor._servers.values():
                        entry.flow.limiter.close()
                    await root.stop()
                    if owns_journal:
                        with anyio.CancelScope(shield=True):
                            await journal.aclose()
                    if owns_task_store:
                        with anyio.CancelScope(shield=True):
                            await supervisor._task_store.aclose()
        except BaseException as error:
            # An escalation is what ended the runtime, whatever the body saw of it first (a
            # closed connection, a supervisor that stopped): that is what the caller is told.
            escalation = servers.last_escalation or root.last_escalation
            if escalation is not None and not is_fatal(error):
                innermost = _innermost_escalation(escalation)
                raise innermost from innermost.__cause__
            if isinstance(error, BaseExceptionGroup):
                _raise_unwrapped(error)  # pyright: ignore[reportUnknownArgumentType]
            raise

    async def add_server(self, spec: ServerSpec) -> None:
        """Add a server and wait for its first connection.

        Args:
            spec: How to reach the server (``ServerSpec.stdio``, ``.http`` or ``.in_memory``).

        Raises:
            RMCPConfigError: A server with that name was already added.
            RMCPNetworkError: The first connection failed within ``connect_timeout_s``; the
                message names the command or URL and why.
            UnknownServerError: ``remove_server`` removed it before its first connection.
        """
        if spec.name in self._servers:
            raise RMCPConfigError(f"a server named {spec.name!r} was already added", path=spec.name)
        policy = self._config.server_policy(spec)
        connection = Connection(spec.name, spec, policy, task_store=self._task_store)
        policies = {tool: self._config.call_policy(spec, tool) for tool in spec.tools}
        flow = ServerFlow(
            spec.name,
            policy,
            self._scheduler,
            self._scheduler.lane(spec.name, policy.max_concurrency),
            # A tool gets its own bucket only when its own table sets rate_limit.
            tool_rate_limits={
                tool: policies[tool].rate_limit
                for tool, overrides in spec.tools.items()
                if overrides.rate_limit != RateLimitOverrides()
            },
            current_client=_current_client(connection),
            on_breaker_change=self._on_breaker_change,
            in_flight=self._work.track(spec.name, connection),
        )
        flow.configure_tools(spec.tools, policies)
        for tool, tool_policy in policies.items():
            if tool_policy.max_concurrency is not None:
                self._scheduler.tool_lane(flow.lane, tool, tool_policy.max_concurrency)
        runtime = self._config.runtime
        entry = self._servers[spec.name] = _Server(
            spec,
            connection,
            flow,
            policies,
            self._config.call_policy(spec, None),
            RestartIntensity(max_restarts=runtime.max_restarts, period_s=runtime.restart_period_s),
        )
        entry.forget = register_server(self._components, self._work, connection, flow)
        try:
            await self._servers_supervisor.start_child(entry.child)
        except BaseException as error:
            # Only this call's entry: a remove and a new add of the name may have come between.
            removed = self._servers.get(spec.name) is not entry
            if not removed:
                del self._servers[spec.name]
                flow.limiter.close()
                self._scheduler.retire(flow.lane)
                entry.forget()
            elif isinstance(error, RMCPSupervisorError):
                # remove_server stopped the connection while it was still connecting.
                raise UnknownServerError(
                    f"server {spec.name!r} was removed while it was being added", server=spec.name
                ) from error
            if isinstance(error, BaseExceptionGroup):
                _raise_unwrapped(error)  # pyright: ignore[reportUnknownArgumentType]
            raise
        if self._servers.get(spec.name) is not entry:
            # Its own child only: the name may already belong to a newer add's connection.
            await self._stop_connection(entry)
            raise UnknownServerError(
                f"server {spec.name!r} was removed while it was being added", server=spec.name
            )

    async def remove_server(self, name: str) -> None:
        """Stop a server's connection and forget it; calls to it then raise UnknownServerError.

        Raises:
            UnknownServerError: No server of that name.
        """
        entry = self._server(name)
        # Forget it first: a concurrent removal must find it gone, not half-removed.
        del self._servers[name]
        entry.flow.limiter.close()  # its waiters fail now, before the connection stops
        self._scheduler.retire(entry.flow.lane)
        entry.forget()
        await self._stop_connection(entry)

    async def _stop_connection(self, entry: _Server) -> None:
        """Stop ``entry``'s own subtree, never a newer one that took its server's name."""
        # Shielded (and bounded by the child's shutdown timeout): a cancelled removal must not
        # leave the connection and its subprocess running without an entry.
        with anyio.CancelScope(shield=True), suppress(KeyError):
            # KeyError: the child is gone already (its start failed, or the removal that made
            # its add clean up stopped it).
            await self._servers_supervisor.terminate_child(entry.child.name, spec=entry.child)

    def servers(self) -> dict[str, ConnectionState]:
        """Return each server's name and connection state."""
        return {name: server.connection.state for name, server in self._servers.items()}

    async def list_tools(self, server: str, *, refresh: bool = False) -> list[Tool]:
        """Return the tools ``server`` listed at its latest connection (every page).

        Args:
            server: The server's name.
            refresh: List them again now (the connection actor asks the server and updates its
                cache, which the call path checks tool names against).

        Raises:
            UnknownServerError: No server of that name.
            RMCPNetworkError: ``refresh`` and the server is not connected, did not answer, or
                answered with a tool list that is not valid (the cached list is kept); or its
                first connection, which the refresh waited for, failed or was closed.
            RMCPTimeoutError: ``refresh`` and the connection actor did not answer in time.
            RMCPActorStoppedError: ``refresh`` and the connection actor is restarting after a
                crash, or crashed or stopped before it answered.

        A refresh while ``add_server`` is still making the first connection waits for it.
        """
        connection = self._server(server).connection
        if not refresh:
            return list(connection.tools.values())
        with anyio.move_on_after(connection.policy.connect_timeout_s * 2):
            # The actor runs only once its first connection is made: wait for that within the
            # same bound rather than calling it stopped.
            await connection.wait_first_connection()
            return list((await connection.ask(RefreshTools)).values())
        raise RMCPTimeoutError(
            f"the connection actor of {server!r} did not answer a tools refresh within "
            f"{connection.policy.connect_timeout_s * 2:g} s (still connecting, or restarting?); try again",
            server=server,
        )

    async def roots_changed(self, server: str) -> bool:
        """Tell ``server`` that the roots its callbacks give changed, so that it asks again.

        Sends ``notifications/roots/list_changed`` on the current connection (a server such as
        server-everything asks for the roots once, then only after this notification).

        Args:
            server: The server's name.

        Returns:
            Whether it was sent. Not while disconnected (the next connection's server asks for
            the roots anew), nor on the 2026-07-28 protocol, which has no such notification
            (a server asks for the roots whenever it needs them).

        Raises:
            UnknownServerError: No server of that name.
        """
        session = self._server(server).connection.current_session()
        if session is None or session.client is None:
            return False
        return await notify_roots_changed(session.client)

    async def call(
        self,
        server: str,
        tool: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
        priority: int = 0,
        timeout: float | None = None,
        on_lifecycle: LifecycleCallback | None = None,
        tenant: str | None = None,
        on_progress: ProgressCallback | None = None,
        task: bool | None = None,
        result_sink: ResultSink | None = None,
        on_transfer_progress: TransferProgressCallback | None = None,
    ) -> CallResult:
        """Call a tool reliably and return its result once it ran and answered.

        Args:
            server: The server's name.
            tool: The tool's name, as the server lists it.
            arguments: The tool's arguments.
            idempotency_key: The key every attempt of this call carries; generated if omitted.
            priority: Admission priority: higher runs first, FIFO within a priority; a waiting
                call gains one level per ``runtime.priority_aging_s`` waited.
            timeout: Seconds for the whole call (queueing, attempts, backoff); defaults to the
                tool's ``timeout_s``. An enclosing cancel scope also bounds the call, and its
                cancellation propagates unchanged.
            on_lifecycle: Called at each step of the call (queued, sent, acked, nacked,
                answered, failed, unknown); the same steps are on the result or error as
                ``lifecycle``. An exception it raises is logged (logger ``rmcp_actors``) and
                changes nothing about the call.
            tenant: Who the call is for: a server's concurrency is shared between the tenants
                with calls waiting, in proportion to their weights in ``[tenants]`` (1 when not
                listed, and for calls without a tenant), within each priority.
            on_progress: ``async (progress, total, message)``, awaited for each progress
                notification the server sends about this call, on every attempt (a retried
                call may report progress again from the start). Without it, no progress token
                is sent. An exception it raises is logged and changes nothing about the call.
            task: Run the call as a task (``True``: the server runs it in the background, the
                call polls ``tasks/get`` to its result and goes on polling the same task after
                a reconnect; with ``idempotency_key``, a later call with that key follows the
                same task), never ask for one (``False``), or as the tool's ``task`` policy
                says (``None``; by default a task exactly when the tool requires one). A server
                speaking the 2026-07-28 tasks extension decides by itself; its tasks are always
                followed.
            result_sink: Where the payloads of result items that a server advertising
                ``"transfer"`` sends in chunks go, instead of ``content``: a file path (created
                or truncated), a binary file object, or an async callable awaited with each
                verified piece in order (``send`` of a memory object stream turns it into an
                async iterator read by another task). Several such items go one after the
                other, in content order; ``result.transfers`` gives each one's size. Their
                handles (``resource_link``) stay in ``content``. Peak memory stays at about
                ``2 * transfer.parallel`` chunks whatever the size. Without it (the default),
                the payloads are reassembled into ``content`` as if sent inline.
            on_transfer_progress: ``(done_bytes, total_bytes)``, called after each verified
                chunk of the payloads moving in chunks: uploaded arguments first, then result
                items. An exception it raises is logged and changes nothing about the call.

        Returns:
            The result, with ``outcome`` SUCCEEDED, or FAILED when the tool reported an error
            (or its task failed); ``transfers`` counts the chunks moved, read again and sent
            again.

        Raises:
            UnknownServerError: ``server`` is not configured.
            UnknownToolError: The server does not list ``tool``.
            RMCPNetworkError: The server could not be reached; nothing was sent.
            RMCPOutcomeUnknownError: The request was sent, the answer was lost, and the tool was
                not safe to retry (or the RMCP server reported the key ``in_doubt``).
            RMCPNackError: The RMCP server refused the call (the tool did not run), after
                retries within the policy when the refusal was retryable.
            RMCPIdempotencyConflictError: ``idempotency_key`` was used before for another call.
            RMCPTimeoutError: The deadline passed (``RMCPTimeoutAfterSendError`` after sending).
            RMCPServerError: The server answered with a JSON-RPC error.
            RMCPResultValidationError: The result breaks the tool's output schema.
            RMCPOverloadedError: The admission queue is full and ``overflow = "reject"``.
            RMCPDeadlockError: The call was made from inside another call's work (a tool of an
                in-process server calling back) and every slot it needs is held by the calls it
                is nested in; nothing was sent.
            RMCPArgumentError: ``timeout`` is not a positive finite number, or ``arguments``
                hold a value JSON cannot carry unchanged (bytes, a non-str key,
                NaN, a set, a circular reference, nesting deeper than 190), or ``task`` is True
                and the server does not run the tool as a task; nothing was sent.
            RMCPTaskCancelledError: The server cancelled the call's task (the tool may have
                run in part).
            RMCPTransferError: A payload moving in chunks could not be moved in full: for a
                result, the tool ran and ``error.result`` is its answer with the handles (call
                again with the same ``idempotency_key`` to fetch it without running the tool);
                for an argument, nothing was sent.
        """
        if timeout is not None:
            _check_timeout(timeout, server, tool)
        entry = self._server(server)
        policy = entry.policies.get(tool, entry.default_policy)
        request = _request(policy, tool, arguments, idempotency_key, priority, timeout, on_lifecycle, tenant)
        # The request holds its own copy: a mapping the caller made for the call alone goes
        # now, not when the call ends (docs/design.md, "Memory per pending call").
        del arguments
        request.on_progress = on_progress
        if task is not None:
            request.task = task
        if result_sink is not None or on_transfer_progress is not None:
            if result_sink is not None:
                check_sink(result_sink, server, tool)
            request.transfer = CallTransfer(sink=result_sink, on_progress=on_transfer_progress)
        return await perform_call(entry.connection, entry.flow, policy, request, self._random)

    async def _step_call(
        self,
        server: str,
        tool: str,
        arguments: dict[str, Any] | None,
        *,
        idempotency_key: str,
        transaction_id: str,
        step: int,
        timeout: float | None,
    ) -> CallResult:
        """A transaction's step or compensation: ``call`` with its key and its place in
        ``_meta.rmcp`` (``transaction_id``, ``step``)."""
        if timeout is not None:
            _check_timeout(timeout, server, tool)
        entry = self._server(server)
        policy = entry.policies.get(tool, entry.default_policy)
        request = _request(policy, tool, arguments, idempotency_key, 0, timeout, None, None)
        request.transaction_id = transaction_id
        request.step = step
        return await perform_call(entry.connection, entry.flow, policy, request, self._random)

    async def _step_lookup(
        self,
        server: str,
        tool: str,
        arguments: dict[str, Any] | None,
        *,
        idempotency_key: str,
        transaction_id: str,
        step: int,
        intended_at: float,
    ) -> LookedUp | None:
        """Ask an RMCP server what became of a step's key, never running the tool (a lookup,
        retried as any call); None when nothing is learned: the server does not advertise
        lookups (a plain server), or it cannot tell, or it could not be asked.

        ``intended_at`` is when the step's intent was journaled (before its first attempt)."""
        entry = self._servers.get(server)
        if entry is None:
            return None
        policy = entry.policies.get(tool, entry.default_policy)
        connection = entry.connection
        session = None
        with anyio.move_on_after(policy.timeout_s):
            try:
                session = connection.current_session() or await connection.wait_session()
            except RMCPError:
                return None
        settings = session.rmcp if session is not None else None
        if settings is None or not settings.lookup:
            return None
        request = _request(policy, tool, arguments, idempotency_key, 0, None, None, None)
        request.transaction_id = transaction_id
        request.step = step
        request.lookup = True
        try:
            result = await perform_call(connection, entry.flow, policy, request, self._random)
        except RMCPError as error:
            # An earlier attempt of the lookup lost leaves the call "outcome unknown", but a
            # lookup never runs the tool: the NACK its retry got is as good as a first answer.
            refused = error if isinstance(error, RMCPNackError) else error.__cause__
            # "Never ran" from a store that forgets on restart may only mean "not since the
            # restart": trusted from a durable server alone, and within its TTL.
            if (
                isinstance(refused, RMCPNackError)
                and refused.code == NackCode.ABORTED
                and settings.durable
                and _within_ttl(settings, intended_at)
            ):
                return LookedUp(ran=False)
            return None
        return LookedUp(ran=True, result=result)

    def transaction(
        self,
        name: str,
        *,
        timeout: float | None = None,
        resources: Iterable[str | tuple[str, bool]] = (),
        compensate_parallel: bool = False,
        continue_on_compensation_failure: bool = False,
        on_event: EventCallback | None = None,
    ) -> Transaction:
        """Start a transaction: a saga of tool calls, undone in reverse order if it aborts.

        Use it as a block::

            async with sup.transaction("book") as tx:
                await tx.call("seats", "reserve", {...}, compensate=Compensation("seats", "release", {...}))
                await tx.call("cards", "charge", {...}, compensate=Compensation("cards", "refund", {...}))

        Leaving the block normally commits. An exception, a cancellation or the timeout
        compensates every step that ran (or may have run) in reverse order, each compensation
        retried with its own derived key for up to ``[transactions] compensation_timeout_s``;
        then the block's exception is re-raised unchanged (with a note naming the
        transaction), a cancellation propagates unchanged, and the timeout raises
        ``RMCPTransactionError``. Past a step marked ``pivot=True`` an abort finishes the steps
        already started instead. Every state, step intent and outcome is journaled before it is
        acted on, so ``recover()`` can finish the transaction after a crash.

        Args:
            name: What the transaction is (in its journal, history, events and errors).
            timeout: Seconds for the whole block (its steps included).
            resources: Resources to hold for the whole transaction, taken before the block
                runs: names (exclusive) or ``(name, shared)`` pairs (see ``tx.acquire``).
            compensate_parallel: Run the compensations all at once instead of in reverse order.
            continue_on_compensation_failure: After a compensation failed, still run the
                others (in order), instead of stopping at the first failure.
            on_event: Called with a ``TransactionEvent`` after each journal record (state
                changes, step intents and outcomes, compensations); it must not wait, and an
                exception it raises is logged and ignored.

        Returns:
            The transaction, to enter with ``async with``.

        Raises:
            RMCPArgumentError: ``timeout`` is not a positive finite number (at once).
            RMCPTransactionError: On leaving the block: the timeout expired (its ``__cause__``
                is an ``RMCPTimeoutError``); ``state`` says how it ended.
            RMCPCompensationError: A compensation failed: ``compensation_failed``, the steps
                in ``failed_steps`` may still be in effect.
            RMCPTransactionInDoubtError: A step's outcome is unknown and it may not be
                compensated blindly: ``in_doubt`` until ``tx.resolve(step, ran=...)``.
        """
        return Transaction(
            self._engine,
            self._transactions_supervisor,
            name,
            timeout=timeout,
            resources=resources,
            compensate_parallel=compensate_parallel,
            continue_on_compensation_failure=continue_on_compensation_failure,
            on_event=on_event,
            locks=self._locks,
        )

    async def transactions(
        self, state: TransactionState | Iterable[TransactionState] | None = None
    ) -> list[TransactionSummary]:
        """List the journal's transactions, oldest first.

        Args:
            state: Only those in this state (or these states); all when ``None``.
        """
        if state is None:
            return await self._journal.summaries()
        states = {state} if isinstance(state, TransactionState) else set(state)
        return await self._journal.summaries(states)

    async def recover(self, *, retry_failed: bool = False) -> RecoveryReport:
        """Finish the journal's incomplete transactions (those no block of this process runs).

        Before its pivot, a transaction is compensated (every step with a journaled intent that
        ran or may have run, in reverse order, each compensation under its derived key); past
        its pivot, its steps without an outcome are sent again under their own keys (an RMCP
        server replays or finishes the first run), then it commits. Transactions in doubt are
        left for ``resolve``; ended ones are left alone. Idempotent: a crash during recovery
        is recovered again. It cannot run the steps a crashed program had not issued.

        Args:
            retry_failed: Also compensate the ``compensation_failed`` transactions again (once
                the cause is fixed): only the compensations that did not succeed, same keys.

        Returns:
            Which transactions were committed, compensated, left in doubt, or failed.
        """
        return await recover(self._engine, retry_failed=retry_failed)

    async def resolve(self, transaction_id: str, step: int, *, ran: bool) -> TransactionState:
        """Say whether a step in doubt ran, and finish its transaction (as ``tx.resolve`` does,
        for a transaction that may have run in another process).

        Returns:
            The transaction's state afterwards.

        Raises:
            RMCPArgumentError: No such transaction, or ``step`` is not in doubt.
            RMCPCompensationError: Finishing it, a compensation failed.
        """
        return await resolve(self._engine, transaction_id, step, ran)

    def health(self) -> Health:
        """Return a frozen snapshot of every component's health, and the runtime's.

        Each component (the scheduler, the watchdog, and per server its connection, its lane
        and its gates) contributes its ``statistics()`` and a status (``ok``, ``degraded`` or
        ``failing``, with the reason). The overall status is ``failing`` when a runtime-wide
        component fails or every server has a failing component, ``degraded`` when any
        component is not ``ok``, and ``ok`` otherwise. Cheap: nothing waits, no actor is asked.
        """
        return self._components.health()

    def map(
        self,
        server: str,
        tool: str,
        arguments: Iterable[Mapping[str, Any] | None] | AsyncIterable[Mapping[str, Any] | None],
        *,
        concurrency: int | None = None,
        priority: int = 0,
        tenant: str | None = None,
        key: KeyFunction | None = None,
        ordered: bool = False,
        window: int | None = None,
        timeout: float | None = None,
        task: bool | None = None,
        result_sink: Callable[[Mapping[str, Any] | None], ResultSink] | None = None,
    ) -> Batch:
        """Call one tool once per item of ``arguments``, streaming ``(index, outcome)`` back.

        Use it as a block, which bounds the batch's tasks::

            async with sup.map("server", "tool", ({"n": n} for n in range(1_000_000))) as results:
                async for index, outcome in results:
                    ...  # a CallResult, or the RMCPError this item's call raised

        The input is consumed lazily, as calls free up, so memory stays bounded by the
        concurrency (and the window), not the input's length. Each item's outcome is its own:
        an item's bad arguments, timeout or refusal is that item's ``RMCPError``. Leaving the
        block early (``break``, an exception, a cancellation) cancels the calls in flight.

        Args:
            server: The server's name.
            tool: The tool's name, as the server lists it.
            arguments: One item per call: a mapping of arguments (or ``None`` for none); an
                iterable or an async iterable (a generator is fine, and is closed on exit).
            concurrency: Calls at once; defaults to the server's ``max_concurrency`` (or the
                tool's, when its table sets a lower one).
            priority: Admission priority of every call (see :meth:`call`).
            tenant: Who every call is for: the server's concurrency is shared between tenants
                by weight (see :meth:`call`), so a large batch does not hold off others.
            key: A function of an item giving its idempotency key: rerunning the batch against
                an RMCP server then replays the items that finished (``duplicate``) instead of
                running them again. Default (and for an item whose key is ``None``): a fresh
                key per call.
            ordered: Yield in input order instead of completion order.
            window: With ``ordered``, items started and not yet yielded, at most (default
                ``2 * concurrency``): a slow item holds back at most ``window - 1`` finished ones.
            timeout: Seconds for each item's call (see :meth:`call`); the batch as a whole is
                bounded by the caller's cancel scopes, whose cancellation propagates.
            task: Run every call as a task (see :meth:`call`); with ``key``, rerunning the batch
                (in a new process, with ``runtime.task_store``) follows the tasks already
                created instead of creating them again.
            result_sink: A function of an item's arguments giving where that call's chunked
                result payloads go (see :meth:`call`), e.g. ``lambda a: f"out/{a['id']}.bin"``;
                unset reassembles them into each result's ``content``.

        Returns:
            The batch, to enter with ``async with``.

        Raises:
            UnknownServerError: ``server`` is not configured (at once, not per item).
            UnknownToolError: The server did not list ``tool`` at its latest connection.
            RMCPArgumentError: A parameter is invalid (``concurrency``, ``window``, ``timeout``,
                or ``arguments`` is a mapping instead of an iterable of them).

        While iterating, the batch raises (after the outcomes of the items already started) an
        exception of the input iterator or of ``key``, and ``UnknownServerError`` when the
        server is removed during the batch.
        """
        entry = self._server(server)
        if tool not in entry.connection.tools:
            listed = ", ".join(sorted(entry.connection.tools)) or "(no tools)"
            raise UnknownToolError(
                f"server {server!r} does not list tool {tool!r}; it lists: {listed} "
                "(list_tools(refresh=True) if it was added since)",
                server=server,
                tool=tool,
            )
        if timeout is not None:
            _check_timeout(timeout, server, tool)

        if concurrency is None:
            # The calls the server (and the tool's own lane, when it has one) admit at once:
            # more would only queue in the scheduler, fewer would leave slots unused.
            concurrency = entry.flow.lane.max_concurrency
            tool_limit = entry.policies.get(tool, entry.default_policy).max_concurrency
            if tool_limit is not None:
                concurrency = min(concurrency, tool_limit)

        async def call_item(item: Mapping[str, Any] | None, idempotency_key: str | None) -> CallResult:
            return await self.call(
                server,
                tool,
                item,
                idempotency_key=idempotency_key,
                priority=priority,
                timeout=timeout,
                tenant=tenant,
                task=task,
                result_sink=None if result_sink is None else result_sink(item),
            )

        return Batch(
            call_item,
            arguments,
            concurrency=concurrency,
            ordered=ordered,
            window=window,
            key=key,
        )

    def statistics(self) -> RuntimeStatistics:
        """Return a snapshot of the scheduler, every connection, the supervisors and the breakers."""
        now = anyio.current_time()
        return RuntimeStatistics(
            scheduler=self._scheduler.statistics(),
            connections=tuple(server.connection.statistics() for server in self._servers.values()),
            supervisors=(
                self._root.statistics(),
                self._servers_supervisor.statistics(),
                *(
                    server.supervisor.statistics()
                    for server in self._servers.values()
                    if server.supervisor is not None
                ),
                # Last, so that the servers' subtrees keep their places.
                self._transactions_supervisor.statistics(),
            ),
            budgets=tuple(
                budget for server in self._servers.values() for budget in server.flow.budget_statistics()
            ),
            limiters=tuple(server.flow.limiter.statistics() for server in self._servers.values()),
            breakers=tuple(
                gate.statistics(now)
                for server in self._servers.values()
                for gate in server.flow.breakers.gates()
            ),
        )

    def _server(self, name: str) -> _Server:
        server = self._servers.get(name)
        if server is None:
            known = ", ".join(sorted(self._servers)) or "none"
            raise UnknownServerError(
                f"no server named {name!r} (configured: {known}); add it with add_server() or in config",
                server=name,
            )
        return server


def _check_timeout(timeout: float, server: str, tool: str) -> None:
    if not 0 < timeout < math.inf:
        raise RMCPArgumentError(
            f"timeout must be a positive, finite number of seconds, got {timeout!r}",
            server=server,
            tool=tool,
        )


def _within_ttl(settings: ServerSettings, intended_at: float) -> bool:
    """Whether every record of a key first sent after ``intended_at`` is still kept by the
    server: a lookup later than its TTL finds nothing whether or not the tool ran. Half the
    TTL allows for the skew between this clock and the server's."""
    return settings.ttl_s is not None and Engine.now() - intended_at < settings.ttl_s / 2


def _request(
    policy: CallPolicy,
    tool: str,
    arguments: Mapping[str, Any] | None,
    idempotency_key: str | None,
    priority: int,
    timeout: float | None,
    on_lifecycle: LifecycleCallback | None,
    tenant: str | None,
) -> CallRequest:
    # 128 random bits as 32 hex digits, as uuid4().hex gave, at a fifth of its cost.
    request_id = secrets.token_hex(16)
    return CallRequest(
        tool=tool,
        arguments=dict(arguments) if arguments is not None else None,
        request_id=request_id,
        idempotency_key=idempotency_key if idempotency_key is not None else request_id,
        priority=priority,
        timeout_s=timeout if timeout is not None else policy.timeout_s,
        on_lifecycle=on_lifecycle,
        tenant=tenant,
    )


def _current_client(connection: Connection) -> Callable[[], Client | None]:
    def current() -> Client | None:
        session = connection.current_session()
        return session.client if session is not None else None

    return current


def _child_name(server: str) -> str:
    return f"connection:{server}"


def _innermost_escalation(error: RMCPSupervisorError) -> RMCPSupervisorError:
    """The escalation that names the actor which actually failed, not the supervisors above it."""
    while isinstance(error.__cause__, RMCPSupervisorError):
        error = error.__cause__
    return error


def _raise_unwrapped(group: BaseExceptionGroup[Any]) -> NoReturn:
    """Raise the one exception a caller should see instead of a task group's wrapper."""
    for leaf in leaves(group):
        if isinstance(leaf, FATAL):
            raise leaf
    # Only the task group's own wrapper goes: a group raised by the caller's code stays whole.
    if len(group.exceptions) == 1:
        raise group.exceptions[0]
    raise group
