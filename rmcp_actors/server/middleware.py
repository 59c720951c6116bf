"""The RMCP server side: a server middleware that deduplicates, ACKs and NACKs tool calls.

It sees every inbound message of the server it is installed on (the SDK's ``middleware``
list): it adds RMCP to the ``initialize`` and ``server/discover`` capabilities, stamps every
tool in ``tools/list``, and handles each ``tools/call`` that carries ``_meta.rmcp``. Calls
without it (plain MCP clients) pass through untouched.
"""

from __future__ import annotations

import enum
import functools
import logging
import math
import os
import socket
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import replace
from typing import Any, TypeVar, cast

import anyio
import attrs
import msgspec
from mcp import MCPError
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.request_state import authenticated_principal
from mcp.server.session import ServerSession
from mcp_types import INTERNAL_ERROR
from mcp_types.methods import serialize_server_result, validate_client_request
from pydantic import ValidationError

from .._protocol import (
    EXPERIMENTAL_KEY,
    EXTENSION_ID,
    FEATURE_ACK,
    FEATURE_DEDUP,
    FEATURE_EARLY_ACK,
    FEATURE_LOOKUP,
    FEATURE_TASKS,
    META_KEY,
    InvalidMeta,
    NackCode,
    RequestMeta,
    ServerSettings,
    decode_request_meta,
    fingerprint,
)
from .._transfer import FEATURE_TRANSFER, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE
from ..errors import RMCPConfigError, RMCPStoreError
from ..stores import (
    AbortingStore,
    BeginOutcome,
    BlobStore,
    DedupRecord,
    DedupStore,
    ImmediateStore,
    MemoryStore,
    OwnerInfo,
    RecordState,
    TaskStore,
    WouldWait,
)
from ..stores._base import WOULD_WAIT, immediate, records_now
from ._params import surely_accepted
from ._wire import StoredOutcome, ack, decode_outcome, encode_outcome, nack, to_wire
from .reconcile import InDoubtRun, Reconciler, Reconciliation
from .tasks import (
    TASKS_EXTENSION_ID,
    TaskEngine,
    TaskSupport,
    principal_scope,
    requested_ttl_ms,
    task_asked,
    task_mode_refusal,
)
from .transfer import (
    DEFAULT_MAX_UPLOAD_BYTES,
    DEFAULT_MIN_THRESHOLD,
    DEFAULT_SERVER_MAX_CHUNK_SIZE,
    TransferService,
    UploadRefusal,
)

__all__ = ["CallCheck", "RMCPServerSide", "ServerStatistics", "store_key"]

_T = TypeVar("_T")

Repeatable = Callable[[str], bool]
"""Tells whether a second run of a tool is harmless by its own server's declaration (MCP tool
annotations ``idempotentHint`` or ``readOnlyHint``): its run need not be claimed first."""

CallCheck = Callable[[str, Mapping[str, Any]], "tuple[NackCode, str] | None"]
"""Tells whether the server would refuse a call to ``(tool, arguments)`` without running it:
``(code, detail)`` of the NACK to send instead, or None to let the call through."""

ResultConverter = Callable[[str, Any], Any]
"""Turns what a reconciler says ``tool`` returned into the tool's ``CallToolResult``, as the
server turns the tool's own return value (``MCPServer``'s conversion)."""

logger = logging.getLogger(__name__)

# A duplicate of a call running in another process polls the store at growing intervals.
_FOREIGN_POLL_FIRST_S = 0.01
_FOREIGN_POLL_MAX_S = 0.5
_OVERLOADED_RETRY_AFTER_MS = 100
_EARLY_ACK_PROGRESS = 0.0
# Above SQLiteStore's default busy_timeout_s (10 s), so a locked SQLite file reports its own
# "database is locked" first; well below any client's patience for an answer.
DEFAULT_STORE_TIMEOUT_S = 15.0
# A lookup of one order, say: seconds at most, and the retry that asked is waiting.
DEFAULT_RECONCILE_TIMEOUT_S = 10.0
_IN_DOUBT_DETAIL = "the run of this key never recorded a result"
_ABORTED_DETAIL = "a lookup found that this key never ran, and settled it so"


class _Verdict(enum.Enum):
    """What a reconciler's verdict leaves to its caller (see ``RMCPServerSide._reconciled``)."""

    NOT_RUN = "not_run"
    CHANGED = "changed"


@attrs.frozen(kw_only=True)
class ServerStatistics:
    """Counters of one installed RMCP server side since it was created."""

    executed: int
    """Tool runs started by this instance."""
    replayed: int
    """Calls answered from a stored result (``duplicate: true``)."""
    coalesced: int
    """Duplicates that waited for a run in flight and got its result."""
    nacked: Mapping[str, int]
    """NACKs sent, by code."""
    in_flight: int
    """Tool runs in progress now."""
    taken_over: int = 0
    """Claims of other (gone) owners, or abandoned ones of this instance, that were never
    entered and were run by this instance."""
    reconciled_ran: int = 0
    """In-doubt keys a reconciler said had run: its result was stored and replayed."""
    reconciled_not_run: int = 0
    """In-doubt keys a reconciler said had not run: claimed again and run."""
    aborted: int = 0
    """Keys a lookup settled as never run (tombstones written)."""


@attrs.define(eq=False)
class _Run:
    """A claim or run in flight in this process: duplicates wait for it (:meth:`wait`).

    ``claimed`` tells a waiter whether this handler got the key at all (it may have found
    it taken, or the store may have failed): if not, the waiter looks again itself.
    """

    fingerprint: str
    claimed: bool = False
    outcome: StoredOutcome | None = None
    acked: bool = False
    """Whether this handler sent the caller an early ACK."""
    finished: bool = False
    # Created by the first duplicate that waits: most runs have none (~2 µs an event).
    _done: anyio.Event | None = None

    async def wait(self) -> None:
        """Return once the run has finished."""
        if self.finished:
            return
        if self._done is None:
            self._done = anyio.Event()
        await self._done.wait()

    def finish(self) -> None:
        """Wake the duplicates waiting for the run."""
        self.finished = True
        if self._done is not None:
            self._done.set()


def _sdk_refuses(ctx: ServerRequestContext[Any, Any], params: Mapping[str, Any]) -> bool:
    """Whether the SDK refuses this ``tools/call`` on its own (INVALID_PARAMS) before any
    handler runs. A protocol version this SDK cannot check against is let through."""
    if surely_accepted(ctx.protocol_version, params):
        return False
    try:
        validate_client_request("tools/call", ctx.protocol_version, params)
    except ValidationError:
        return True
    except (KeyError, ValueError):
        return False
    return False


def _store_failure(operation: str, error: Exception) -> RMCPStoreError:
    """The error to raise for a store's own failure in ``operation``."""
    return RMCPStoreError(
        f"the dedup store failed in {operation} ({type(error).__name__}: {error})", operation=operation
    )


def _at_once(operation: str, call: Callable[[], _T]) -> _T:
    """Run one ``*_now`` store call; a failure of the store's own is raised as
    :class:`RMCPStoreError` naming ``operation``, as :meth:`RMCPServerSide._store_call` does."""
    try:
        return call()
    except RMCPStoreError:
        raise
    except Exception as error:
        raise _store_failure(operation, error) from error


def _tool_and_arguments(params: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
    name = params.get("name")
    raw_arguments = params.get("arguments")
    tool = name if isinstance(name, str) else ""
    return tool, cast("Mapping[str, Any]", raw_arguments if isinstance(raw_arguments, Mapping) else {})


@attrs.frozen(kw_only=True)
class _KeyedCall:
    """A call with a dedup key, as the server side handles it."""

    key: str
    """The key in the store: the client's, scoped to its principal (:func:`store_key`)."""
    client_key: str
    tool: str
    arguments: Mapping[str, Any]
    fingerprint: str
    principal: str | None = None


@attrs.define(eq=False)
class _TokenBucket:
    rate_per_s: float
    burst: float
    tokens: float
    updated: float | None = None

    def take(self) -> int | None:
        """Take a token; return None on success, else milliseconds until one is free."""
        now = anyio.current_time()
        if self.updated is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate_per_s)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return None
        return math.ceil((1.0 - self.tokens) / self.rate_per_s * 1000)

    def wait_ms(self) -> int:
        """Milliseconds until a token is free, taking none (0 when one is)."""
        tokens = self.tokens
        if self.updated is not None:
            tokens = min(self.burst, tokens + (anyio.current_time() - self.updated) * self.rate_per_s)
        return 0 if tokens >= 1.0 else math.ceil((1.0 - tokens) / self.rate_per_s * 1000)


def store_key(key: str, principal: str | None = None) -> str:
    """The key under which a store keeps a client's dedup key: scoped to the principal that
    presents it (``mcp.server.request_state.authenticated_principal``; None when the caller
    is not authenticated).

    Another principal presenting the same key gets a key of its own, so it can neither replay
    the result nor learn from a conflict that the key exists. Every scope, the unauthenticated
    one too, is a fixed-length digest prefix, so no key chosen by a client can name another
    scope's record.
    """
    return f"{principal_scope(principal)}/{key}"


class _ProgressAfterAck:
    """The request's session as the tool sees it once the early ACK went out as progress 0.

    Progress values must increase, so a tool's report that is not above the last value sent
    (its own first report of 0, typically) is not forwarded.
    """

    def __init__(self, session: ServerSession) -> None:
        self._session = session
        self._last = _EARLY_ACK_PROGRESS

    async def report_progress(
        self, progress: float, total: float | None = None, message: str | None = None
    ) -> None:
        if progress <= self._last:
            return
        self._last = progress
        await self._session.report_progress(progress, total, message)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


class _Detached:
    """A request's session as a task's run sees it: the request was answered with the task's
    handle, and its connection may close while the tool runs; progress the tool reports then
    is dropped rather than failing the run."""

    def __init__(self, session: ServerSession) -> None:
        self._session = session

    async def report_progress(
        self, progress: float, total: float | None = None, message: str | None = None
    ) -> None:
        try:
            await self._session.report_progress(progress, total, message)
        except Exception:
            logger.debug("RMCP: a task's progress could not be sent", exc_info=True)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


def _check_task_support(support: Mapping[str, str]) -> None:
    for tool, value in support.items():
        if value not in ("optional", "required", "forbidden"):
            raise RMCPConfigError(
                f"must be 'optional', 'required' or 'forbidden', got {value!r}", path=f"task_support.{tool}"
            )


def _validate_positive(name: str) -> Any:
    def check(_instance: object, _attribute: object, value: float | None) -> None:
        if value is not None and not value > 0:
            raise RMCPConfigError(f"must be a positive number, got {value!r}", path=name)

    return check


def _validate_at_least(least: int, name: str) -> Any:
    def check(_instance: object, _attribute: object, value: int) -> None:
        if not value >= least:
            raise RMCPConfigError(f"must be at least {least}, got {value!r}", path=name)

    return check


def _validate_between(least: int, most: int, name: str) -> Any:
    def check(_instance: object, _attribute: object, value: int) -> None:
        if not least <= value <= most:
            raise RMCPConfigError(f"must be between {least} and {most}, got {value!r}", path=name)

    return check


# Counters and state change on every call: no validators on assignment (they run at init).
@attrs.define(eq=False, on_setattr=attrs.setters.NO_OP)
class RMCPServerSide:
    """RMCP installed on one MCP server (see :func:`rmcp_actors.server.install`).

    Calls carrying ``_meta.rmcp`` with an idempotency key run at most once per key: a
    completed key's result is replayed, a key in flight makes the duplicate wait for the
    first run, a reused key with other arguments is refused, and a key whose run was cut
    short is reported ``in_doubt``. Once a tool has started, the client's cancellation does
    not stop it: it runs to completion (within ``max_execution_s``) and its result is stored
    before the answer is sent.

    Every store call is bounded by ``store_timeout_s``. A store that fails or times out before
    the key is claimed is answered with the retryable NACK ``unavailable`` (the tool did not
    run). A keyed call that ``check_call`` refuses (an unknown tool, arguments that break the
    tool's input schema) is NACKed before any key is claimed, so the refusal is never stored.
    """

    store: DedupStore = attrs.field(factory=MemoryStore)
    max_execution_s: float = attrs.field(default=300.0, validator=_validate_positive("max_execution_s"))
    max_in_flight: int | None = attrs.field(default=None, validator=_validate_positive("max_in_flight"))
    rate_limit_per_s: float | None = attrs.field(
        default=None, validator=_validate_positive("rate_limit_per_s")
    )
    early_ack: bool = True
    lease_s: float = attrs.field(default=30.0, validator=_validate_positive("lease_s"))
    instance_id: str = attrs.field(factory=lambda: uuid.uuid4().hex)
    store_timeout_s: float = attrs.field(
        default=DEFAULT_STORE_TIMEOUT_S, validator=_validate_positive("store_timeout_s")
    )
    close_store: bool = True
    check_call: CallCheck | None = None
    repeatable: Repeatable | None = None
    """Tells which tools run unclaimed (see :data:`Repeatable`): a keyed call of one is not
    claimed before its run, whose outcome is recorded in one write (``DedupStore.record``).
    A crash during such a run leaves no record: the retry runs the tool again, not ``in_doubt``.
    """
    reconcilers: dict[str, Reconciler] = attrs.field(factory=dict[str, Reconciler])
    """Per tool name, the reconciler asked about in-doubt runs (see
    :mod:`rmcp_actors.server.reconcile`); may be added to after installation."""
    reconcile_timeout_s: float = attrs.field(
        default=DEFAULT_RECONCILE_TIMEOUT_S, validator=_validate_positive("reconcile_timeout_s")
    )
    convert_result: ResultConverter | None = None
    run_tasks: bool = False
    """Run tool calls as MCP tasks when the client asks (``docs/protocol.md`` section 8)."""
    task_support: dict[str, TaskSupport] = attrs.field(
        factory=dict[str, TaskSupport],
        validator=lambda _instance, _attribute, value: _check_task_support(value),
    )
    """Per tool name, its ``taskSupport`` (a tool not named is ``"optional"``)."""
    task_ttl_s: float = attrs.field(default=3600.0, validator=_validate_positive("task_ttl_s"))
    task_poll_interval_s: float = attrs.field(
        default=1.0, validator=_validate_positive("task_poll_interval_s")
    )
    tasks: TaskEngine | None = attrs.field(default=None, init=False)
    """The tasks of this server, when ``run_tasks``."""
    transfer: bool = True
    """Serve chunked transfers (``docs/protocol.md`` section 9) when the store is a
    :class:`~rmcp_actors.stores.BlobStore`."""
    transfer_min_threshold: int = attrs.field(
        default=DEFAULT_MIN_THRESHOLD, validator=_validate_at_least(0, "transfer_min_threshold")
    )
    transfer_max_chunk_size: int = attrs.field(
        default=DEFAULT_SERVER_MAX_CHUNK_SIZE,
        validator=_validate_between(MIN_CHUNK_SIZE, MAX_CHUNK_SIZE, "transfer_max_chunk_size"),
    )
    transfer_max_upload_bytes: int = attrs.field(
        default=DEFAULT_MAX_UPLOAD_BYTES, validator=_validate_at_least(0, "transfer_max_upload_bytes")
    )
    transfers: TransferService | None = attrs.field(default=None, init=False)
    """The transfers of this server, when it serves them."""
    _running: dict[str, _Run] = attrs.field(factory=dict[str, _Run], init=False)
    _in_flight: int = attrs.field(default=0, init=False)
    _idle: anyio.Event | None = attrs.field(default=None, init=False)
    _draining: bool = attrs.field(default=False, init=False)
    _owner_registered: bool = attrs.field(default=False, init=False)
    _owner_lock: anyio.Lock = attrs.field(factory=anyio.Lock, init=False)
    _last_renewal: float = attrs.field(default=-math.inf, init=False)
    _bucket: _TokenBucket | None = attrs.field(default=None, init=False)
    _executed: int = attrs.field(default=0, init=False)
    _replayed: int = attrs.field(default=0, init=False)
    _coalesced: int = attrs.field(default=0, init=False)
    _nacked: Counter[str] = attrs.field(factory=Counter[str], init=False)
    _settings_wire: dict[str, Any] = attrs.field(factory=dict[str, Any], init=False)
    _unrecorded: set[str] = attrs.field(factory=set[str], init=False)
    _taken_over: int = attrs.field(default=0, init=False)
    _reconciled_ran: int = attrs.field(default=0, init=False)
    _reconciled_not_run: int = attrs.field(default=0, init=False)
    _active: int = attrs.field(default=0, init=False)
    _aborted: int = attrs.field(default=0, init=False)
    _now: ImmediateStore | None = attrs.field(default=None, init=False)
    _records_now: ImmediateStore | None = attrs.field(default=None, init=False)
    _can_record: bool = attrs.field(default=False, init=False)

    def __attrs_post_init__(self) -> None:
        self._now = immediate(self.store)
        self._records_now = records_now(self.store)
        self._can_record = callable(getattr(self.store, "record", None))
        if self.rate_limit_per_s is not None:
            burst = max(1.0, self.rate_limit_per_s)
            self._bucket = _TokenBucket(rate_per_s=self.rate_limit_per_s, burst=burst, tokens=burst)
        if self.run_tasks:
            if not isinstance(self.store, TaskStore):
                raise RMCPConfigError(
                    f"{type(self.store).__name__} cannot keep tasks: use MemoryStore or SQLiteStore, "
                    "or install without tasks",
                    path="tasks",
                )
            self.tasks = TaskEngine(
                store=self.store,
                instance_id=self.instance_id,
                store_call=self._store_call,
                limiter_wait_ms=self._limiter_wait_ms,
                default_ttl_s=self.task_ttl_s,
                poll_interval_s=self.task_poll_interval_s,
                support=self.task_support,
            )
        if self.transfer and isinstance(self.store, BlobStore):
            self.transfers = TransferService(
                store=self.store,
                store_call=self._store_call,
                min_threshold=self.transfer_min_threshold,
                max_chunk_size=self.transfer_max_chunk_size,
                max_upload_bytes=self.transfer_max_upload_bytes,
            )
        self._settings_wire = msgspec.to_builtins(self.settings)

    @property
    def settings(self) -> ServerSettings:
        """What this server advertises to clients."""
        features = [FEATURE_DEDUP, FEATURE_ACK]
        if self.early_ack:
            features.append(FEATURE_EARLY_ACK)
        ttl_s = None
        if isinstance(self.store, AbortingStore):
            features.append(FEATURE_LOOKUP)
            ttl_s = self.store.ttl_s
        if self.run_tasks:
            features.append(FEATURE_TASKS)
        if self.transfers is not None:
            features.append(FEATURE_TRANSFER)
        return ServerSettings(
            features=features,
            durable=self.store.durable,
            instance_id=self.instance_id,
            early_ack=self.early_ack,
            ttl_s=ttl_s,
        )

    def statistics(self) -> ServerStatistics:
        """Counters since creation."""
        return ServerStatistics(
            executed=self._executed,
            replayed=self._replayed,
            coalesced=self._coalesced,
            nacked=dict(self._nacked),
            in_flight=self._in_flight,
            taken_over=self._taken_over,
            reconciled_ran=self._reconciled_ran,
            reconciled_not_run=self._reconciled_not_run,
            aborted=self._aborted,
        )

    def hosting_tasks(self, state: object = None) -> AbstractAsyncContextManager[None]:
        """For the server's lifespan, which yielded ``state``: the task group that the task
        runs of its requests live in (nothing without tasks)."""
        return nullcontext() if self.tasks is None else self.tasks.hosting(state)

    def _limiter_wait_ms(self) -> int:
        return 0 if self._bucket is None else self._bucket.wait_ms()

    async def start(self) -> None:
        """Accept calls again (after :meth:`drain`) and register this instance in the store."""
        self._draining = False
        await self._ensure_owner()

    async def drain(self, timeout_s: float | None = None) -> None:
        """Refuse new calls with ``shutting_down``, wait for runs in flight, release the owner.

        Runs still going after ``timeout_s`` (default: ``max_execution_s``) are left to their
        own bound; their keys become ``in_doubt`` if they never finish. Task runs count: the
        owner is released only once none runs here (its tasks would read in doubt at once).
        """
        self._draining = True
        with anyio.move_on_after(self.max_execution_s if timeout_s is None else timeout_s):
            while self._active:
                self._idle = self._idle or anyio.Event()
                await self._idle.wait()
            if self.tasks is not None:
                await self.tasks.wait_idle()
        if self._owner_registered and not self._active and (self.tasks is None or not self.tasks.running):
            if self.tasks is not None:
                try:
                    await self.tasks.write_unfinished()
                except RMCPStoreError:
                    # Released anyway: those tasks read in doubt, as after a crash.
                    logger.exception("RMCP: could not record the outcome of finished tasks at drain")
            self._owner_registered = False
            await self._store_call("release_owner", lambda: self.store.release_owner(self.instance_id))

    async def __call__(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        """The middleware entry point: every inbound message of the server passes here."""
        method = ctx.method
        if method == "tools/call":
            return await self._tools_call(ctx, call_next)
        result = await call_next(ctx)
        if method == "tools/list":
            return self._stamp_tools(to_wire(result))
        if method in ("initialize", "server/discover"):
            return self._stamp_capabilities(to_wire(result))
        return result

    def _stamp_tools(self, result: dict[str, Any]) -> dict[str, Any]:
        tools = result.get("tools")
        if isinstance(tools, list):
            stamped: list[Any] = []
            for tool in cast(list[Any], tools):
                if isinstance(tool, dict):
                    tool_meta = cast(dict[str, Any], tool).get("_meta")
                    merged = dict(cast(dict[str, Any], tool_meta)) if isinstance(tool_meta, dict) else {}
                    merged[META_KEY] = self._settings_wire
                    tool = {**cast(dict[str, Any], tool), "_meta": merged}
                    if self.tasks is not None:
                        support = self.tasks.support_of(str(tool.get("name")))
                        tool["execution"] = {"taskSupport": support}
                stamped.append(tool)
            result = {**result, "tools": stamped}
        return result

    def _stamp_capabilities(self, result: dict[str, Any]) -> dict[str, Any]:
        capabilities = result.get("capabilities")
        if isinstance(capabilities, dict):
            capabilities = dict(cast(dict[str, Any], capabilities))
            for field, key in (("experimental", EXPERIMENTAL_KEY), ("extensions", EXTENSION_ID)):
                current = capabilities.get(field)
                section = dict(cast(dict[str, Any], current)) if isinstance(current, dict) else {}
                section[key] = self._settings_wire
                capabilities[field] = section
            if self.tasks is not None:
                capabilities["tasks"] = {"list": {}, "cancel": {}, "requests": {"tools": {"call": {}}}}
                extensions = cast(dict[str, Any], capabilities["extensions"])
                extensions[TASKS_EXTENSION_ID] = {}
            result = {**result, "capabilities": capabilities}
        return result

    async def _tools_call(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        params: Mapping[str, Any] = ctx.params or {}
        if self.tasks is not None:
            asked = task_asked(ctx, params)
            name = params.get("name")
            refused = task_mode_refusal(
                self.tasks.support_of(name if isinstance(name, str) else ""), asked, ctx.protocol_version
            )
            if refused is not None:
                raise refused
            if asked:
                return await self._task_call(ctx, call_next, params, self.tasks)
        raw_meta = params.get("_meta")
        try:
            meta = decode_request_meta(raw_meta if isinstance(raw_meta, Mapping) else None)  # pyright: ignore[reportUnknownArgumentType]
        except InvalidMeta as error:
            return self._nack(ctx, NackCode.INVALID_META, f"_meta.rmcp is malformed ({error})")
        if meta is None:
            return await call_next(ctx)
        if (admission := self._admission_refusal(ctx, meta)) is not None:
            return admission
        # Counted from admission, not from the claim: drain() must not release the owner while
        # an admitted call is still claiming its key.
        self._active += 1
        try:
            if meta.transfer is not None or meta.uploads is not None:
                prepared = await self._transferring(ctx, call_next, params, meta, results=True)
                if not isinstance(prepared, tuple):
                    return prepared
                ctx, call_next, params = prepared
            client_key = meta.dedup_key
            if client_key is None:
                outcome = await self._run_unkeyed(ctx, call_next)
                return self._answer(ctx, outcome, meta, duplicate=False)
            principal = authenticated_principal(ctx)
            key = store_key(client_key, principal)
            if _sdk_refuses(ctx, params):
                # Nothing to claim, and the refusal must not be stored for the key.
                return await call_next(ctx)
            tool, arguments = _tool_and_arguments(params)
            if self.check_call is not None:
                refusal = self.check_call(tool, arguments)
                if refusal is not None:
                    return self._nack(ctx, refusal[0], refusal[1], meta)
            call = _KeyedCall(
                key=key,
                client_key=client_key,
                tool=tool,
                arguments=arguments,
                fingerprint=fingerprint(tool, arguments),
                principal=principal,
            )
            if meta.lookup:
                return await self._look_up(ctx, meta, call)
            # A transfer's result chunks are tied to a claimed key's record: claimed first.
            unclaimed = (
                self.repeatable is not None
                and self._can_record
                and meta.transfer is None
                and meta.uploads is None
                and self.repeatable(tool)
            )
            return await self._deduplicated(ctx, call_next, meta, call, unclaimed=unclaimed)
        finally:
            self._active -= 1
            if not self._active and self._idle is not None:
                self._idle.set()
                self._idle = None

    async def _transferring(
        self,
        ctx: ServerRequestContext[Any, Any],
        call_next: CallNext,
        params: Mapping[str, Any],
        meta: RequestMeta,
        *,
        results: bool,
    ) -> tuple[ServerRequestContext[Any, Any], CallNext, Mapping[str, Any]] | HandlerResult:
        """The call with its uploads in place and, with ``results``, its large result items
        sent as handles; or the NACK refusing it (nothing ran, no key claimed)."""
        transfers = self.transfers
        if transfers is None:
            if meta.uploads is not None:
                detail = "this server does not serve transfers (no 'transfer' feature) and took no upload"
                return self._nack(ctx, NackCode.INVALID_META, detail, meta)
            # A client that accepts handles accepts inline content too.
            return ctx, call_next, params
        principal = authenticated_principal(ctx)
        scope = principal_scope(principal)
        tool, arguments = _tool_and_arguments(params)
        if meta.uploads is not None:
            try:
                substituted = await transfers.substitute(arguments, meta.uploads, scope)
            except RMCPStoreError as error:
                return self._unavailable(ctx, meta, error)
            if isinstance(substituted, UploadRefusal):
                code = NackCode.TRANSFER_INCOMPLETE if substituted.incomplete else NackCode.INVALID_META
                return self._nack(ctx, code, substituted.detail, meta)
            params = {**params, "arguments": substituted}
            ctx = replace(ctx, params=params)
        if results and meta.transfer is not None:
            problem = transfers.accept_check(meta.transfer)
            if problem is not None:
                return self._nack(ctx, NackCode.INVALID_META, problem, meta)
            client_key = meta.dedup_key
            call_next = transfers.results_as_handles(
                call_next,
                meta.transfer,
                tool=tool,
                key=None if client_key is None else store_key(client_key, principal),
                scope=scope,
            )
        return ctx, call_next, params

    async def _task_call(
        self,
        ctx: ServerRequestContext[Any, Any],
        call_next: CallNext,
        params: Mapping[str, Any],
        tasks: TaskEngine,
    ) -> HandlerResult:
        """A ``tools/call`` the client asked to run as a task (``docs/protocol.md`` section 8):
        checked as any call (a NACK answers it directly), then one task per dedup key, whose
        tool runs in the lifespan's task group while the handle is answered at once."""
        raw_meta = params.get("_meta")
        try:
            meta = decode_request_meta(raw_meta if isinstance(raw_meta, Mapping) else None)  # pyright: ignore[reportUnknownArgumentType]
        except InvalidMeta as error:
            return self._nack(ctx, NackCode.INVALID_META, f"_meta.rmcp is malformed ({error})")
        if meta is not None and meta.lookup:
            # A lookup never runs the tool, and a task call's answer is a task that runs it.
            return self._nack(
                ctx,
                NackCode.INVALID_META,
                "a lookup cannot run as a task: send it without params.task (2025-11-25) or without "
                "declaring io.modelcontextprotocol/tasks on the request (2026-07-28)",
                meta,
            )
        if meta is not None and meta.uploads is not None:
            # A task's result is answered inline (tasks/result); its arguments may be uploaded.
            prepared = await self._transferring(ctx, call_next, params, meta, results=False)
            if not isinstance(prepared, tuple):
                return prepared
            ctx, call_next, params = prepared
        if _sdk_refuses(ctx, params):
            # No task for a malformed call.
            return await call_next(ctx)
        tool, arguments = _tool_and_arguments(params)
        if meta is not None:
            if (admission := self._admission_refusal(ctx, meta)) is not None:
                return admission
            if self.check_call is not None and (refused := self.check_call(tool, arguments)) is not None:
                return self._nack(ctx, refused[0], refused[1], meta)
        if not tasks.can_run:
            raise MCPError(
                INTERNAL_ERROR,
                "RMCP: this server runs tasks only while its lifespan runs (serve it with run(), "
                "serve_stdio() or its HTTP app); the tool did not run",
            )
        principal = authenticated_principal(ctx)
        client_key = None if meta is None else meta.dedup_key
        call_print = fingerprint(tool, arguments)
        run = functools.partial(self._run_task_tool, ctx, call_next)
        # Counted until its run is registered with the engine: drain() must not release the
        # owner while the task is being written (it would read in doubt while it ran).
        self._active += 1
        try:
            await self._ensure_owner()
            creation = await tasks.create(
                key=None if client_key is None else store_key(client_key, principal),
                scope=principal_scope(principal),
                fingerprint=call_print,
                tool=tool,
                ttl_s=tasks.ttl_s(requested_ttl_ms(params)),
                run=run,
                lifespan_state=ctx.lifespan_context,
            )
        except RMCPStoreError as error:
            if meta is not None:
                return self._unavailable(ctx, meta, error)
            raise MCPError(INTERNAL_ERROR, f"RMCP: {error}; the tool did not run, retry later") from error
        finally:
            self._active -= 1
            if not self._active and self._idle is not None:
                self._idle.set()
                self._idle = None
        handle = tasks.handle(creation.task, ctx.protocol_version)
        if meta is None:
            return handle
        if not creation.created:
            if creation.task.fingerprint != call_print:
                return self._conflict(ctx, meta)
            self._replayed += 1
        return ack(
            handle, request_id=meta.request_id, attempt=meta.attempt_number, duplicate=not creation.created
        )

    async def _run_task_tool(
        self, ctx: ServerRequestContext[Any, Any], call_next: CallNext
    ) -> StoredOutcome | None:
        """A task's run: bounded by ``max_execution_s`` (None when cut short), detached from
        the request (its answer was the handle; its connection may be gone)."""
        self._run_started()
        try:
            with anyio.move_on_after(self.max_execution_s):
                detached = replace(ctx, session=cast(ServerSession, _Detached(ctx.session)))
                return await self._run_tool(detached, call_next, acked=False)
            return None
        finally:
            self._run_ended()

    async def _deduplicated(
        self,
        ctx: ServerRequestContext[Any, Any],
        call_next: CallNext,
        meta: RequestMeta,
        call: _KeyedCall,
        *,
        unclaimed: bool = False,
    ) -> HandlerResult:
        try:
            await self._ensure_owner()
        except RMCPStoreError as error:
            return self._unavailable(ctx, meta, error)
        key, call_print = call.key, call.fingerprint
        acked = refused = False
        while True:
            local = self._running.get(key)
            if local is not None:
                if local.fingerprint != call_print:
                    return self._conflict(ctx, meta)
                if not acked:
                    acked = await self._send_early_ack(ctx, "waiting for the first run of this key")
                joined = await self._joined(ctx, meta, local)
                if joined is None:
                    continue
                return joined
            run = _Run(fingerprint=call_print)
            # Registered before the store is asked, so a local duplicate arriving meanwhile waits.
            self._running[key] = run
            if unclaimed:
                ran = await self._run_unclaimed(ctx, call_next, call, run)
                if isinstance(ran, RMCPStoreError):
                    return self._unavailable(ctx, meta, ran)
                if ran:
                    return self._answer(ctx, run.outcome, meta, duplicate=False)
                # The key has a record: answered as any call's (replay, conflict, in doubt...),
                # by a claim that finds it; the run stays registered for local duplicates.
            begun = await self._claim_and_run(ctx, call_next, call, run)
            if isinstance(begun, RMCPStoreError):
                return self._unavailable(ctx, meta, begun)
            if begun.claimed:
                self._taken_over += begun.taken_over
                return self._answer(ctx, run.outcome, meta, duplicate=False)
            acked = acked or run.acked
            if begun.existing is None:
                # The entered mark failed: taken over, or this instance's lease lapsed in the
                # store (a pause, failed renewals). Renewed, it can enter its next claim; a
                # store that refuses it even then must not be asked again and again.
                if refused:
                    return self._unavailable(
                        ctx,
                        meta,
                        RMCPStoreError(
                            f"the store refused instance {self.instance_id}'s entered mark even "
                            "after its lease was renewed: it reads this instance as released or "
                            "its lease as lapsed; check the store's clock, or restart the server",
                            operation="mark_entered",
                        ),
                    )
                refused = True
                try:
                    await self._renew()
                except RMCPStoreError as error:
                    return self._unavailable(ctx, meta, error)
                continue
            poll_s = _FOREIGN_POLL_FIRST_S
            record = begun.existing
            while record is not None:
                settled = self._settled(ctx, meta, record, call_print)
                if settled is not None:
                    return settled
                if record.owner == self.instance_id and key in self._running:
                    # A run of this process: wait on it, not on the store.
                    break
                orphaned = self._orphaned(record)
                if not record.entered and (orphaned or not record.owner_alive):
                    # Claimed, and abandoned before its tool was called: claim it again.
                    break
                if record.in_doubt or orphaned:
                    answer = await self._settle_in_doubt(ctx, call_next, meta, call)
                    if answer is not None:
                        return answer
                    break
                # Started by another live process on the same store: wait for its result.
                if not acked:
                    acked = await self._send_early_ack(ctx, "waiting for the first run of this key")
                await anyio.sleep(poll_s)
                poll_s = min(poll_s * 2, _FOREIGN_POLL_MAX_S)
                try:
                    record = await self._store_call("get", lambda: self.store.get(key))
                except RMCPStoreError as error:
                    return self._unavailable(ctx, meta, error)

    async def _look_up(
        self, ctx: ServerRequestContext[Any, Any], meta: RequestMeta, call: _KeyedCall
    ) -> HandlerResult:
        """Answer a lookup (``_meta.rmcp.lookup``): what became of the key, never running the tool.

        A completed key is replayed (ACK, ``duplicate: true``). A key that never ran (absent,
        claimed and abandoned before its tool was entered, or in doubt and found not run by the
        tool's reconciler) is settled as never run: a tombstone, so that an original arriving
        late is refused, and NACK ``aborted``. A run in flight is waited for, as a duplicate
        waits. An in-doubt key is asked about as a retry would ask (the reconciler), and stays
        ``in_doubt`` when nobody can tell.
        """
        store = self.store
        if not isinstance(store, AbortingStore):
            return self._nack(
                ctx, NackCode.INVALID_META, "this server's dedup store cannot answer lookups", meta
            )
        try:
            await self._ensure_owner()
        except RMCPStoreError as error:
            return self._unavailable(ctx, meta, error)
        # A client with an ACK timeout waits for this, as for any attempt: a lookup may wait
        # for a run in flight for as long as that run takes.
        await self._send_early_ack(ctx, "looking up this key")
        key, call_print = call.key, call.fingerprint

        def abort(doubted: DedupRecord | None = None) -> Awaitable[BeginOutcome]:
            # doubted: the in-doubt record a reconciler said did not run; the tombstone may
            # replace it, and nothing claimed since (by another process) in its place.
            return store.abort(
                key,
                fingerprint=call_print,
                tool=call.tool,
                owner=self.instance_id,
                in_doubt=doubted is not None,
                doubted_owner=None if doubted is None else doubted.owner,
            )

        while True:
            local = self._running.get(key)
            if local is not None:
                if local.fingerprint != call_print:
                    return self._conflict(ctx, meta)
                joined = await self._joined(ctx, meta, local)
                if joined is None:
                    continue
                return joined
            # Held while the store decides, so that an original arriving here meanwhile waits,
            # then finds the tombstone.
            held = _Run(fingerprint=call_print)
            self._running[key] = held
            try:
                begun = await self._store_call("abort", abort)
            except RMCPStoreError as error:
                return self._unavailable(ctx, meta, error)
            finally:
                self._finish(key, held)
            if begun.claimed:
                self._aborted += 1
                return self._nack(ctx, NackCode.ABORTED, "a lookup found no run of this key", meta)
            poll_s = _FOREIGN_POLL_FIRST_S
            record = begun.existing
            while record is not None:
                settled = self._settled(ctx, meta, record, call_print)
                if settled is not None:
                    return settled
                orphaned = self._orphaned(record)
                if key in self._running or (not record.entered and (orphaned or not record.owner_alive)):
                    # A run here to wait on, or a claim abandoned before its tool: look again.
                    break
                if record.in_doubt or orphaned:
                    # Held from the question to the tombstone: a retry of the original here
                    # would otherwise run the tool meanwhile (and be in doubt again, cut short),
                    # making the reconciler's "did not run" stale before the tombstone lands;
                    # one in another process is caught by the store (``doubted_owner``).
                    held = _Run(fingerprint=call_print)
                    self._running[key] = held
                    doubted = record
                    try:
                        answer = await self._reconciled(ctx, meta, call, wait_for_local=False)
                        if answer is _Verdict.CHANGED:
                            break
                        if answer is not _Verdict.NOT_RUN:
                            return answer
                        begun = await self._store_call("abort", lambda doubted=doubted: abort(doubted))
                    except RMCPStoreError as error:
                        return self._unavailable(ctx, meta, error)
                    finally:
                        self._finish(key, held)
                    if begun.claimed:
                        self._aborted += 1
                        return self._nack(
                            ctx, NackCode.ABORTED, "its reconciler found no run of this key", meta
                        )
                    record = begun.existing
                    continue
                # A run of another live process: wait for its result, as a duplicate does.
                await anyio.sleep(poll_s)
                poll_s = min(poll_s * 2, _FOREIGN_POLL_MAX_S)
                try:
                    record = await self._store_call("get", lambda: store.get(key))
                except RMCPStoreError as error:
                    return self._unavailable(ctx, meta, error)

    async def _joined(
        self, ctx: ServerRequestContext[Any, Any], meta: RequestMeta, local: _Run
    ) -> HandlerResult | None:
        """The answer of ``local``, a run of this process, once it ends: its result (ACK,
        ``duplicate: true``), or NACK ``in_doubt`` when it was cut short; None when it did not
        claim the key (look again)."""
        await local.wait()
        if not local.claimed:
            return None
        if local.outcome is None:
            return self._nack(ctx, NackCode.IN_DOUBT, "the first run of this key was cut short", meta)
        self._coalesced += 1
        return self._answer(ctx, local.outcome, meta, duplicate=True)

    def _settled(
        self, ctx: ServerRequestContext[Any, Any], meta: RequestMeta, record: DedupRecord, call_print: str
    ) -> HandlerResult | None:
        """The answer a stored ``record`` settles for good (other arguments, a tombstone, a
        result), or None while its run may still end otherwise."""
        if record.fingerprint != call_print:
            return self._conflict(ctx, meta)
        if record.state is RecordState.ABORTED:
            return self._nack(ctx, NackCode.ABORTED, _ABORTED_DETAIL, meta)
        if record.state is RecordState.COMPLETED and record.result is not None:
            self._replayed += 1
            return self._answer(ctx, decode_outcome(record.result), meta, duplicate=True)
        return None

    async def _reconciled(
        self,
        ctx: ServerRequestContext[Any, Any],
        meta: RequestMeta,
        call: _KeyedCall,
        *,
        wait_for_local: bool,
    ) -> HandlerResult | _Verdict:
        """Ask the tool's reconciler about an in-doubt key (a retry's or a lookup's question).

        The answer when that settles it: the run's result, stored and replayed (ACK,
        ``duplicate: true``), or NACK ``in_doubt`` when nobody can tell. ``NOT_RUN`` when the
        run did not happen (the caller settles the key so); ``CHANGED`` when the key changed
        meanwhile (look at it again), and, with ``wait_for_local`` (a caller that does not hold
        the key itself), when a duplicate of this process settled the key and runs it
        meanwhile: the effect the verdict saw may be that run's, so wait for its own result,
        whatever the verdict."""
        reconciler = self.reconcilers.get(call.tool)
        if reconciler is None:
            return self._nack(ctx, NackCode.IN_DOUBT, _IN_DOUBT_DETAIL, meta)
        verdict = await self._reconcile(reconciler, call)
        if verdict is None or verdict.ran is None:
            return self._nack(
                ctx, NackCode.IN_DOUBT, f"{_IN_DOUBT_DETAIL}, and its reconciler could not tell", meta
            )
        if wait_for_local and call.key in self._running:
            return _Verdict.CHANGED
        if not verdict.ran:
            return _Verdict.NOT_RUN
        try:
            outcome = StoredOutcome(result=self._reconciled_result(ctx, call.tool, verdict.result))
        except Exception:
            logger.exception("RMCP: the reconciler of tool %r gave a result that is not one", call.tool)
            return self._nack(
                ctx, NackCode.IN_DOUBT, f"{_IN_DOUBT_DETAIL}, and its reconciler's result was invalid", meta
            )
        result = encode_outcome(outcome)
        try:
            settled = await self._store_call(
                "resolve_in_doubt",
                lambda: self.store.resolve_in_doubt(
                    call.key, owner=self.instance_id, fingerprint=call.fingerprint, result=result
                ),
            )
        except RMCPStoreError as error:
            return self._unavailable(ctx, meta, error)
        if not settled:
            return _Verdict.CHANGED
        # The lease keeper must no longer mark it in doubt (it may be this instance's orphan).
        self._unrecorded.discard(call.key)
        self._reconciled_ran += 1
        return self._answer(ctx, outcome, meta, duplicate=True)

    def _begin(self, call: _KeyedCall, *, entered: bool) -> Callable[[], Awaitable[BeginOutcome]]:
        def begin() -> Awaitable[BeginOutcome]:
            return self.store.begin(
                call.key,
                fingerprint=call.fingerprint,
                tool=call.tool,
                owner=self.instance_id,
                entered=entered,
            )

        return begin

    def _begin_now(self, call: _KeyedCall, *, entered: bool) -> BeginOutcome | None:
        """The claim, made at once when the store can (:class:`ImmediateStore`); None when it
        must be awaited. A store failure is raised as :class:`RMCPStoreError`."""
        now = self._now
        if now is None:
            return None
        return _at_once(
            "begin",
            lambda: now.begin_now(
                call.key,
                fingerprint=call.fingerprint,
                tool=call.tool,
                owner=self.instance_id,
                entered=entered,
            ),
        )

    async def _mark_entered(self, key: str) -> bool:
        now = self._now
        if now is not None:
            entered = _at_once("mark_entered", lambda: now.mark_entered_now(key, owner=self.instance_id))
            if entered is not None:
                return entered
        return await self._store_call(
            "mark_entered", lambda: self.store.mark_entered(key, owner=self.instance_id)
        )

    def _recorded_now(self, key: str, outcome: StoredOutcome) -> bool:
        """Store a run's outcome at once when the store can; False when :meth:`_record` must
        (a store that failed at once is asked again there, then the key marked in doubt)."""
        now = self._now
        if now is None:
            return False
        try:
            return now.complete_now(key, owner=self.instance_id, result=encode_outcome(outcome))
        except Exception:
            logger.warning("RMCP: the dedup store failed in complete_now; trying complete", exc_info=True)
            return False

    async def _settle_in_doubt(
        self, ctx: ServerRequestContext[Any, Any], call_next: CallNext, meta: RequestMeta, call: _KeyedCall
    ) -> HandlerResult | None:
        """Answer for an in-doubt key: ask the tool's reconciler, if it has one, and settle the
        key by its verdict. None when the key changed meanwhile: look at it again."""
        answer = await self._reconciled(ctx, meta, call, wait_for_local=True)
        if answer is _Verdict.CHANGED:
            return None
        if answer is not _Verdict.NOT_RUN:
            return answer

        def reclaim() -> Awaitable[BeginOutcome]:
            async def settle() -> BeginOutcome:
                settled = await self.store.resolve_in_doubt(
                    call.key, owner=self.instance_id, fingerprint=call.fingerprint, result=None
                )
                if settled:
                    # A claim of this instance again: the lease keeper must not mark it in doubt.
                    self._unrecorded.discard(call.key)
                return BeginOutcome(claimed=settled, existing=None)

            return settle()

        run = _Run(fingerprint=call.fingerprint)
        self._running[call.key] = run
        begun = await self._claim_and_run(ctx, call_next, call, run, reclaim)
        if isinstance(begun, RMCPStoreError):
            return self._unavailable(ctx, meta, begun)
        if not begun.claimed:
            return None
        self._reconciled_not_run += 1
        return self._answer(ctx, run.outcome, meta, duplicate=False)

    async def _reconcile(self, reconciler: Reconciler, call: _KeyedCall) -> Reconciliation | None:
        """The reconciler's verdict, or None when it failed, timed out or answered nonsense:
        the key then stays in doubt, and the server carries on."""
        run = InDoubtRun(
            tool=call.tool,
            arguments=call.arguments,
            idempotency_key=call.client_key,
            principal=call.principal,
        )
        with anyio.move_on_after(self.reconcile_timeout_s):
            try:
                # User code: whatever it returns is checked, a wrong type must not pass for a verdict.
                verdict = cast(object, await reconciler(run))
            except Exception:
                logger.exception("RMCP: the reconciler of tool %r failed; the key stays in doubt", call.tool)
                return None
            if not isinstance(verdict, Reconciliation | None):
                logger.error(
                    "RMCP: the reconciler of tool %r returned %s, not a Reconciliation; "
                    "the key stays in doubt",
                    call.tool,
                    type(verdict).__name__,
                )
                return None
            return verdict
        logger.warning(
            "RMCP: the reconciler of tool %r did not answer within reconcile_timeout_s=%g; "
            "the key stays in doubt",
            call.tool,
            self.reconcile_timeout_s,
        )
        return None

    def _reconciled_result(
        self, ctx: ServerRequestContext[Any, Any], tool: str, value: Any
    ) -> dict[str, Any]:
        """The wire result of a run a reconciler says happened, shaped as the tool's own."""
        if self.convert_result is not None:
            value = self.convert_result(tool, value)
        return serialize_server_result("tools/call", ctx.protocol_version, to_wire(value))

    def _orphaned(self, record: DedupRecord) -> bool:
        """A STARTED record of this very instance that no task here runs: its outcome could
        not be stored (the store failed), or its tool was never entered."""
        return (
            record.state is RecordState.STARTED
            and record.owner == self.instance_id
            and record.key not in self._running
        )

    async def _claim_and_run(
        self,
        ctx: ServerRequestContext[Any, Any],
        call_next: CallNext,
        call: _KeyedCall,
        run: _Run,
        reclaim: Callable[[], Awaitable[BeginOutcome]] | None = None,
    ) -> BeginOutcome | RMCPStoreError:
        """Claim the key (``begin``, or ``reclaim`` for an in-doubt key a reconciler found not
        run); when claimed, mark it entered, run the tool and store its outcome in ``run``.

        Returns the store's error when the claim or the entered mark failed: the tool did not
        run. A claim whose entered mark fails (this instance's lease lapsed, and another may
        have claimed the key) reads as not claimed: the tool did not run here.

        Without an early ACK to send, ``begin`` claims and enters in one write. With one, the
        claim is written first and entered after the ACK: a server killed while the ACK's
        write waits behind other answers leaves a claim never entered, which a retry runs.

        All of it is shielded from the caller's cancellation: a claim committed for a caller
        that left would be a STARTED record nobody runs, and a run stopped by the client's
        cancel (the SDK's ``notifications/cancelled`` after a client timeout) would leave the
        retry to run the tool again. Only ``max_execution_s`` bounds the run; a run it cuts
        short leaves the key in doubt.
        """
        key = call.key
        one_write = reclaim is None and not self._acks(ctx)
        begun: BeginOutcome | None = None
        running = stored = False
        try:
            if reclaim is None:
                try:
                    begun = self._begin_now(call, entered=one_write)
                except RMCPStoreError as error:
                    return error
            # Claimed at once and entered: nothing is awaited before the run, so its bound is
            # the scope's only deadline, set as the scope opens (a scope costs ~10 µs, a
            # deadline set again ~5 µs more on asyncio).
            bound = math.inf
            if one_write and begun is not None and begun.claimed:
                bound = anyio.current_time() + self.max_execution_s
            with anyio.CancelScope(shield=True, deadline=bound) as scope:
                if begun is None:
                    # Awaited, a claim may commit after store_timeout_s gave up on it: written
                    # entered, it would read as a run that may have happened (in doubt) though
                    # the tool never ran. Not entered, a retry claims it again and runs it.
                    one_write = False
                    try:
                        if reclaim is None:
                            begun = await self._store_call("begin", self._begin(call, entered=False))
                        else:
                            begun = await self._store_call("resolve_in_doubt", reclaim)
                    except RMCPStoreError as error:
                        return error
                acked = False
                if begun.claimed and not one_write:
                    # The early ACK before the entered mark: its write may wait behind other
                    # answers, and a server killed meanwhile has not called the tool.
                    acked = run.acked = await self._send_early_ack(ctx, "accepted")
                    # The one write that tells a claim whose server died before calling the
                    # tool (run it again) from one that may have run (in doubt).
                    try:
                        entered = await self._mark_entered(key)
                    except RMCPStoreError as error:
                        return error
                    if not entered:
                        begun = BeginOutcome(claimed=False, existing=None)
                run.claimed = begun.claimed
                if begun.claimed:
                    running = True
                    self._run_started()
                    if bound == math.inf:
                        scope.deadline = anyio.current_time() + self.max_execution_s
                    outcome = await self._run_tool(ctx, call_next, acked=acked)
                    # Stored at once, nothing is awaited: the deadline cannot cut the record.
                    if outcome.nothing_done or not self._recorded_now(key, outcome):
                        scope.deadline = math.inf
                        if outcome.nothing_done:
                            await self._release(key, outcome)
                        else:
                            await self._record(key, outcome)
                    run.outcome, stored = outcome, True
            if running and not stored:
                with anyio.CancelScope(shield=True):
                    await self._record(key, None)
        finally:
            if running:
                self._run_ended()
            self._finish(key, run)
        assert begun is not None  # the scope's deadline is set only after a claim
        return begun

    async def _run_unclaimed(
        self, ctx: ServerRequestContext[Any, Any], call_next: CallNext, call: _KeyedCall, run: _Run
    ) -> bool | RMCPStoreError:
        """Run a call to a repeatable tool (see :attr:`repeatable`) without claiming its key:
        when the store has no live record of it, run the tool as a claimed run is run
        (shielded, bounded by ``max_execution_s``, early ACK first) and record its outcome in one
        write. True when it ran (its outcome in ``run``; None when ``max_execution_s`` cut it
        short: nothing is recorded, there is no claim to mark in doubt); False when the key has
        a record (``run`` stays registered: claim the key instead); the store's error when the
        record could not be read (the tool did not run).

        The claim exists so that a crash during the run leaves an in-doubt record and a
        duplicate in another process waits; for a tool whose second run is harmless by its own
        server's declaration neither is needed. A record written meanwhile by another process
        (its run of the key) does not change this run's answer: the tool ran, and its result
        is valid by that declaration.
        """
        key = call.key
        handed_on = False
        try:
            try:
                found = self._get_now(key)
                if found is WOULD_WAIT:
                    found = await self._store_call("get", lambda: self.store.get(key))
            except RMCPStoreError as error:
                return error
            if found is not None:
                handed_on = True
                return False
            run.claimed = True
            self._run_started()
            try:
                with anyio.CancelScope(
                    shield=True, deadline=anyio.current_time() + self.max_execution_s
                ) as scope:
                    acked = run.acked = await self._send_early_ack(ctx, "accepted")
                    outcome = await self._run_tool(ctx, call_next, acked=acked)
                    run.outcome = outcome
                    if not outcome.nothing_done:
                        # Recorded at once, nothing is awaited: the deadline cannot cut it.
                        result = encode_outcome(outcome)
                        existing = self._recorded_unclaimed_now(call, result)
                        if existing is WOULD_WAIT:
                            scope.deadline = math.inf
                            existing = await self._record_unclaimed(call, result)
                        if existing is not None:
                            logger.info(
                                "RMCP: idempotency key %r was recorded by %s while its repeatable "
                                "tool %r ran here; this run's result answers its caller",
                                key,
                                existing.owner,
                                call.tool,
                            )
            finally:
                self._run_ended()
            return True
        finally:
            if not handed_on:
                self._finish(key, run)

    def _get_now(self, key: str) -> DedupRecord | WouldWait | None:
        now = self._records_now
        if now is None:
            return WOULD_WAIT
        return _at_once("get", lambda: now.get_now(key))

    def _recorded_unclaimed_now(self, call: _KeyedCall, result: bytes) -> DedupRecord | WouldWait | None:
        now = self._records_now
        if now is None:
            return WOULD_WAIT
        try:
            return now.record_now(
                call.key, fingerprint=call.fingerprint, tool=call.tool, owner=self.instance_id, result=result
            )
        except Exception:
            logger.warning("RMCP: the dedup store failed in record_now; trying record", exc_info=True)
            return WOULD_WAIT

    async def _record_unclaimed(self, call: _KeyedCall, result: bytes) -> DedupRecord | None:
        """Record the outcome of an unclaimed run; a store failure is logged and leaves the key
        without a record (a retry runs the tool again, harmless by its declaration)."""
        try:
            return await self._store_call(
                "record",
                lambda: self.store.record(
                    call.key,
                    fingerprint=call.fingerprint,
                    tool=call.tool,
                    owner=self.instance_id,
                    result=result,
                ),
            )
        except RMCPStoreError:
            logger.exception(
                "RMCP: could not record the outcome of idempotency key %r (tool %r runs unclaimed: "
                "a retry runs it again)",
                call.key,
                call.tool,
            )
            return None

    async def _run_unkeyed(
        self, ctx: ServerRequestContext[Any, Any], call_next: CallNext
    ) -> StoredOutcome | None:
        """Run a call that has no dedup key: shielded and bounded like any run, not stored."""
        outcome: StoredOutcome | None = None
        self._run_started()
        try:
            with anyio.CancelScope(shield=True, deadline=anyio.current_time() + self.max_execution_s):
                acked = await self._send_early_ack(ctx, "accepted")
                outcome = await self._run_tool(ctx, call_next, acked=acked)
        finally:
            self._run_ended()
        return outcome

    def _run_started(self) -> None:
        self._in_flight += 1
        self._executed += 1

    def _run_ended(self) -> None:
        self._in_flight -= 1

    async def _release(self, key: str, outcome: StoredOutcome) -> None:
        """Free the key of a run whose tool refused and did nothing (rate limited): stored,
        the refusal would be replayed to every retry of the key until it expired. The caller
        and the duplicates waiting on the run get the refusal itself. A store that cannot
        release the key gets the refusal recorded as any outcome (a key claimed by nobody's
        run would make its retries wait, then read in doubt)."""
        try:
            await self._store_call("release", lambda: self.store.release(key, owner=self.instance_id))
            return
        except RMCPStoreError:
            logger.exception("RMCP: could not release idempotency key %r after its tool refused", key)
        await self._record(key, outcome)

    async def _record(self, key: str, outcome: StoredOutcome | None) -> None:
        """Store a run's outcome. If the store fails, the caller still gets the result, and
        the key is marked in doubt if possible: a STARTED record of a live owner would make
        every retry wait for a result that never comes."""
        try:
            if outcome is None:
                await self._store_call(
                    "mark_in_doubt", lambda: self.store.mark_in_doubt(key, owner=self.instance_id)
                )
            else:
                result = encode_outcome(outcome)
                await self._store_call(
                    "complete", lambda: self.store.complete(key, owner=self.instance_id, result=result)
                )
            return
        except RMCPStoreError:
            logger.exception("RMCP: could not store the outcome of idempotency key %r", key)
        try:
            await self._store_call(
                "mark_in_doubt", lambda: self.store.mark_in_doubt(key, owner=self.instance_id)
            )
        except RMCPStoreError:
            # Other processes would wait on the STARTED record while this one lives: the
            # lease keeper tries again.
            self._unrecorded.add(key)
            logger.exception("RMCP: could not mark idempotency key %r in doubt either", key)

    async def _run_tool(
        self, ctx: ServerRequestContext[Any, Any], call_next: CallNext, *, acked: bool
    ) -> StoredOutcome:
        if acked:
            ctx = replace(ctx, session=cast(ServerSession, _ProgressAfterAck(ctx.session)))
        try:
            return StoredOutcome(result=to_wire(await call_next(ctx)))
        except MCPError as error:
            return StoredOutcome(
                error_code=error.error.code, error_message=error.error.message, error_data=error.error.data
            )
        except Exception as error:
            # The tool ran and failed: replaying its failure is honest, running it again is not.
            return StoredOutcome(error_code=INTERNAL_ERROR, error_message=f"{type(error).__name__}: {error}")

    def _acks(self, ctx: ServerRequestContext[Any, Any]) -> bool:
        """Whether this request gets early ACKs: only a caller that asked for progress can
        receive one. (The SDK's in-process direct wire carries no token: no early ACK there,
        and the client does not expect one.)"""
        return self.early_ack and bool(ctx.meta) and ctx.meta.get("progress_token") is not None  # pyright: ignore[reportOptionalMemberAccess]

    async def _send_early_ack(self, ctx: ServerRequestContext[Any, Any], message: str) -> bool:
        if not self._acks(ctx):
            return False
        try:
            await ctx.session.report_progress(_EARLY_ACK_PROGRESS, None, f"rmcp: {message}")
        except Exception:
            # The ACK is a courtesy; a transport that cannot carry it must not stop the run.
            logger.warning("RMCP: could not send the early ACK", exc_info=True)
            return False
        return True

    def _finish(self, key: str, run: _Run) -> None:
        if self._running.get(key) is run:
            del self._running[key]
        run.finish()

    async def _ensure_owner(self) -> None:
        if self._owner_registered:
            if anyio.current_time() - self._last_renewal >= self.lease_s / 3:
                # Without a lifespan keeping the lease (a server driven by hand), calls do.
                await self._renew()
            return
        async with self._owner_lock:
            if not self._owner_registered:
                await self._register()
                self._last_renewal = anyio.current_time()
                self._owner_registered = True

    async def keep_lease(self) -> None:
        """Renew this instance's lease in the store for as long as it runs (never returns).

        The server's lifespan runs it; a store failure is logged and retried at the next
        interval, since a lapsed lease only makes this instance's records read as abandoned
        (never-entered claims are taken over, entered ones are in doubt) and its claims
        unenterable until it renews, which is safe.
        """
        while True:
            await anyio.sleep(self.lease_s / 3)
            if self._owner_registered:
                try:
                    await self._renew()
                    for key in list(self._unrecorded):
                        if key not in self._unrecorded or key in self._running:
                            # Settled, or claimed again and running here, while an earlier
                            # mark was written: in doubt now, a run in flight would be run again.
                            continue
                        mark = functools.partial(self.store.mark_in_doubt, key, owner=self.instance_id)
                        await self._store_call("mark_in_doubt", mark)
                        self._unrecorded.discard(key)
                    if self.tasks is not None:
                        await self.tasks.write_unfinished()
                except RMCPStoreError:
                    logger.exception(
                        "RMCP: could not renew the lease of instance %s, or mark in doubt the keys "
                        "(write the task outcomes) it could not store; retrying in lease_s/3",
                        self.instance_id,
                    )

    async def _renew(self) -> None:
        self._last_renewal = anyio.current_time()
        try:
            await self._store_call(
                "renew_owner", lambda: self.store.renew_owner(self.instance_id, self.lease_s)
            )
        except RMCPStoreError as error:
            if not isinstance(error, LookupError) and not isinstance(error.__cause__, LookupError):
                raise
            # Purged by another process while this one was suspended for longer than the
            # store's TTL: register again, or new claims would read as owned by the dead.
            await self._register()

    async def _register(self) -> None:
        owner = self._owner_info()
        await self._store_call("register_owner", lambda: self.store.register_owner(owner, self.lease_s))

    async def _store_call(self, operation: str, call: Callable[[], Awaitable[_T]]) -> _T:
        """Run one store call within ``store_timeout_s``; any failure of it, or the deadline,
        is raised as :class:`RMCPStoreError` (its ``__cause__`` is the store's own error)."""
        # move_on_after, not fail_after: two store calls per tool call, and under trio
        # fail_after costs ~21 µs a scope against ~11 µs (measured on this machine).
        try:
            with anyio.move_on_after(self.store_timeout_s):
                return await call()
        except RMCPStoreError:
            raise
        except Exception as error:
            raise _store_failure(operation, error) from error
        # Only the deadline leaves the block without a value.
        raise RMCPStoreError(
            f"the dedup store did not answer {operation} within store_timeout_s="
            f"{self.store_timeout_s:g}; check the store, or raise store_timeout_s",
            operation=operation,
        )

    def _owner_info(self) -> OwnerInfo:
        return OwnerInfo(instance_id=self.instance_id, pid=os.getpid(), host=socket.gethostname())

    def _unavailable(
        self, ctx: ServerRequestContext[Any, Any], meta: RequestMeta, error: BaseException
    ) -> HandlerResult:
        logger.warning("RMCP: the dedup store failed before the claim; NACK unavailable: %s", error)
        return self._nack(ctx, NackCode.UNAVAILABLE, "the dedup store could not be reached", meta)

    def _answer(
        self,
        ctx: ServerRequestContext[Any, Any],
        outcome: StoredOutcome | None,
        meta: RequestMeta,
        *,
        duplicate: bool,
    ) -> HandlerResult:
        if outcome is None:
            return self._nack(
                ctx, NackCode.IN_DOUBT, f"the run exceeded max_execution_s={self.max_execution_s:g}", meta
            )
        return ack(
            outcome.replay(), request_id=meta.request_id, attempt=meta.attempt_number, duplicate=duplicate
        )

    def _conflict(self, ctx: ServerRequestContext[Any, Any], meta: RequestMeta) -> HandlerResult:
        return self._nack(ctx, NackCode.IDEMPOTENCY_CONFLICT, "key reused with a different call", meta)

    def _admission_refusal(
        self, ctx: ServerRequestContext[Any, Any], meta: RequestMeta
    ) -> HandlerResult | None:
        """The NACK refusing an RMCP call at the door (draining, rate bucket empty, too many
        calls running), or None when it may run. Takes a token from the bucket when it admits."""
        if self._draining:
            return self._nack(ctx, NackCode.SHUTTING_DOWN, "not accepting calls", meta)
        if self._bucket is not None and (wait_ms := self._bucket.take()) is not None:
            return self._nack(ctx, NackCode.RATE_LIMITED, "too many calls", meta, retry_after_ms=wait_ms)
        if self.max_in_flight is not None and self._in_flight >= self.max_in_flight:
            return self._nack(
                ctx,
                NackCode.OVERLOADED,
                f"{self._in_flight} calls running (limit {self.max_in_flight})",
                meta,
                retry_after_ms=_OVERLOADED_RETRY_AFTER_MS,
            )
        return None

    def _nack(
        self,
        ctx: ServerRequestContext[Any, Any],
        code: NackCode,
        detail: str,
        meta: RequestMeta | None = None,
        *,
        retry_after_ms: int | None = None,
    ) -> HandlerResult:
        self._nacked[code.value] += 1
        refusal = nack(
            code,
            detail,
            request_id=meta.request_id if meta else None,
            attempt=meta.attempt_number if meta else None,
            retry_after_ms=retry_after_ms,
        )
        # A middleware answering on its own owns the result's envelope: the SDK's serializer
        # shapes it for the negotiated version (it drops resultType on the legacy protocol).
        return serialize_server_result(
            "tools/call", ctx.protocol_version, {"resultType": "complete", **refusal}
        )
