"""The RMCPError hierarchy: every failure a caller can see, in one place.

Every error carries what the caller needs to decide what to do next: the logical call it
belongs to (``request_id``, ``idempotency_key``, ``server``, ``tool``), whether the tool may
have run (``may_have_executed``) and the call's ``outcome``. Transport and SDK exceptions are
mapped to these classes at one boundary (``rmcp_actors.client.call``) and never leak.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .lifecycle import LifecycleEvent
    from .result import CallResult

__all__ = [
    "Outcome",
    "RMCPActorStoppedError",
    "RMCPArgumentError",
    "RMCPAuthError",
    "RMCPCircuitOpenError",
    "RMCPCompensationError",
    "RMCPConfigError",
    "RMCPDeadlockError",
    "RMCPError",
    "RMCPIdempotencyConflictError",
    "RMCPNackError",
    "RMCPNetworkError",
    "RMCPOutcomeUnknownError",
    "RMCPOverloadedError",
    "RMCPResultValidationError",
    "RMCPServerError",
    "RMCPStoreClosedError",
    "RMCPStoreError",
    "RMCPSupervisorError",
    "RMCPTaskCancelledError",
    "RMCPTimeoutAfterSendError",
    "RMCPTimeoutError",
    "RMCPTransactionError",
    "RMCPTransactionInDoubtError",
    "RMCPTransferError",
    "RMCPUnknownOwnerError",
    "UnknownServerError",
    "UnknownToolError",
]


class Outcome(enum.Enum):
    """What is known about a logical call's effect on the server.

    ``SUCCEEDED``: the tool ran and answered normally. ``FAILED``: the call ended without
    success; on a :class:`~rmcp_actors.CallResult` it means the tool ran and reported an error,
    on an :class:`RMCPError` that nothing is known to have run. ``UNKNOWN``: the request may have
    run (it was sent and the answer was lost) and could not be retried safely.
    """

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    UNKNOWN = "unknown"


class RMCPError(Exception):
    """Base class of every error rmcp_actors raises.

    Attributes:
        message: What happened and what the caller can do about it.
        server: The server the call was addressed to, when there is one.
        tool: The tool the call was addressed to, when there is one.
        request_id: The logical call's request id, when the error belongs to a call.
        idempotency_key: The key every attempt of the call carried.
        may_have_executed: ``True`` when the tool may have run (its side effects may exist).
        outcome: ``Outcome.UNKNOWN`` when the tool may have run, else ``Outcome.FAILED``.
        lifecycle: The steps of the call up to the error (empty outside a call).
    """

    #: Default for the class; an instance may say more (see ``may_have_executed`` above).
    default_may_have_executed: bool = False

    def __init__(
        self,
        message: str,
        *,
        server: str | None = None,
        tool: str | None = None,
        request_id: str | None = None,
        idempotency_key: str | None = None,
        may_have_executed: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.server = server
        self.tool = tool
        self.request_id = request_id
        self.idempotency_key = idempotency_key
        self.may_have_executed = (
            self.default_may_have_executed if may_have_executed is None else may_have_executed
        )
        self.lifecycle: tuple[LifecycleEvent, ...] = ()

    def __reduce__(self) -> tuple[Any, ...]:
        # Exception's own reduce calls ``type(self)(*self.args)``, which fails for a subclass
        # whose __init__ takes other arguments (RMCPNackError, RMCPServerError, ...) and would
        # rebuild the message. Rebuild without __init__ and restore every attribute instead.
        return (_restore_error, (type(self), self.args), self.__dict__)

    @property
    def outcome(self) -> Outcome:
        """``Outcome.UNKNOWN`` if the tool may have run, else ``Outcome.FAILED``."""
        return Outcome.UNKNOWN if self.may_have_executed else Outcome.FAILED

    def __str__(self) -> str:
        where = "/".join(part for part in (self.server, self.tool) if part)
        prefix = f"[{where}] " if where else ""
        suffix = f" (request_id={self.request_id})" if self.request_id else ""
        return f"{prefix}{self.message}{suffix}"


class RMCPConfigError(RMCPError):
    """The configuration is malformed: the message names the key path and the problem.

    Attributes:
        path: Dotted path of the offending key, e.g. ``servers.time.retry.max_attempts``.
    """

    def __init__(self, message: str, *, path: str = "") -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path


class RMCPArgumentError(RMCPError, ValueError):
    """The call itself is malformed (a timeout that is not a positive finite number, arguments
    that cannot be serialized to JSON); nothing was sent."""


class UnknownServerError(RMCPError):
    """The call named a server that is not configured; nothing was sent."""


class UnknownToolError(RMCPError):
    """The server does not list the tool (checked against the cached tool list); nothing was sent."""


class RMCPNetworkError(RMCPError):
    """The connection was down before sending, or could not be made: the tool did not run."""


class RMCPAuthError(RMCPNetworkError):
    """The server refused the client's credentials (HTTP 401 or 403), or the auth flow that gets
    them failed (no token, a token endpoint that refused the client): the tool did not run.

    Raised by ``add_server`` for a refused handshake and by ``call`` for a refused call (a token
    revoked mid-run). It is not retried and does not count against the circuit breakers: the
    same credentials would be refused again, and the server is working. Check the credentials
    (the environment variable the config names, the token store), and for a 403 the scopes the
    token carries.
    """


class RMCPOverloadedError(RMCPError):
    """The call was refused at admission (queue full with ``overflow = "reject"``); nothing was sent."""


class RMCPOutcomeUnknownError(RMCPError):
    """The request was sent and its answer was lost; the tool may have run.

    The call was not retried because the tool is not known to be safe to repeat. Check the
    side effect (by ``idempotency_key`` where the tool supports it) before calling again.
    """

    default_may_have_executed = True


class RMCPTimeoutError(RMCPError):
    """The call's deadline passed before an answer arrived.

    An instance of this class itself means the request was never sent (still queued, waiting
    for a connection, or backing off between attempts). After sending, the raised class is
    :class:`RMCPTimeoutAfterSendError`, which is also an :class:`RMCPOutcomeUnknownError`.
    """


class RMCPTimeoutAfterSendError(RMCPTimeoutError, RMCPOutcomeUnknownError):
    """The deadline passed after the request was sent: the tool may have run."""

    default_may_have_executed = True


class RMCPServerError(RMCPError):
    """The server answered with a JSON-RPC error instead of a result.

    Protocol-level refusals (parse error, invalid request, method not found, invalid params)
    mean the tool did not run; any other code may come from a tool that had started.

    Attributes:
        code: The JSON-RPC error code.
        server_message: The error's ``message`` member, as the server sent it.
        data: The error's ``data`` member, if any.
    """

    NOT_EXECUTED_CODES = frozenset({-32700, -32600, -32601, -32602})

    def __init__(self, code: int, message: str, data: Any = None, **context: Any) -> None:
        context.setdefault("may_have_executed", code not in self.NOT_EXECUTED_CODES)
        super().__init__(f"server answered JSON-RPC error {code}: {message}", **context)
        self.code = code
        self.server_message = message
        self.data = data


class RMCPNackError(RMCPError):
    """The server refused the call with a NACK: the tool did not run.

    A retryable NACK (``overloaded``, ``rate_limited``, ``shutting_down``) was retried within
    the call's policy and deadline before this was raised.

    Attributes:
        code: The NACK code, e.g. ``"overloaded"`` (see docs/protocol.md).
        reason: The server's explanation.
        retryable: Whether the server said a later attempt may succeed.
        retry_after_ms: How long the server asked to wait before the next attempt, if it said.
    """

    def __init__(
        self,
        code: str,
        reason: str,
        *,
        retryable: bool = False,
        retry_after_ms: int | None = None,
        **context: Any,
    ) -> None:
        context.setdefault("may_have_executed", False)
        super().__init__(f"the server refused the call ({code}): {reason}", **context)
        self.code = code
        self.reason = reason
        self.retryable = retryable
        self.retry_after_ms = retry_after_ms


class RMCPIdempotencyConflictError(RMCPNackError):
    """The idempotency key was already used for a different tool or different arguments.

    The tool did not run. Use a new key for a new operation; reuse a key only to repeat the
    very same call.
    """


class RMCPResultValidationError(RMCPError):
    """The tool ran, but its result broke the tool's declared output schema.

    The side effect, if any, happened: do not blindly call again.
    """

    default_may_have_executed = True


class RMCPSupervisorError(RMCPError):
    """A runtime actor kept failing beyond its restart intensity and the runtime stopped.

    Raised by ``RMCPSupervisor.open()``; ``__cause__`` is the failing actor's last exception.

    Attributes:
        actor: Name of the actor whose failures escalated.
    """

    def __init__(self, message: str, *, actor: str) -> None:
        super().__init__(message)
        self.actor = actor


class RMCPActorStoppedError(RMCPError):
    """A runtime actor stopped or crashed before it answered a request, or was not running.

    A request still waiting in the actor's inbox was never handled (``may_have_executed`` is
    ``False``) and never will be: the restarted actor skips it. The request the actor was
    handling when it stopped may have had effects (``may_have_executed`` is ``True``). A
    supervisor usually restarts the actor: ask again.

    Attributes:
        actor: Name of the actor that did not answer.
    """

    def __init__(self, message: str, *, actor: str = "", **context: Any) -> None:
        super().__init__(message, **context)
        self.actor = actor


def _restore_error(cls: type[RMCPError], args: tuple[Any, ...]) -> RMCPError:
    """Unpickle an :class:`RMCPError` (see ``RMCPError.__reduce__``); attributes come after."""
    return cls.__new__(cls, *args)


class RMCPStoreError(RMCPError):
    """The RMCP server's dedup store failed, or did not answer within ``store_timeout_s``.

    Raised by the stores in ``rmcp_actors.stores`` and by the server side. Before a key is
    claimed, the server turns it into the retryable NACK ``unavailable``: the tool did not run.

    Attributes:
        operation: The store operation that failed (``"begin"``, ``"complete"``, ...), if known.
    """

    def __init__(self, message: str, *, operation: str | None = None, **context: Any) -> None:
        super().__init__(message, **context)
        self.operation = operation


class RMCPStoreClosedError(RMCPStoreError):
    """The store was closed (``aclose()``, or the server's lifespan ended): create a new one."""


class RMCPUnknownOwnerError(RMCPStoreError, LookupError):
    """The store does not know the server instance (never registered, or purged after its
    lease lapsed long ago): register it again with ``register_owner``."""


class RMCPDeadlockError(RMCPError):
    """The call could only wait forever: the slots it needs are held by calls waiting for it.

    Raised at once, before sending (``may_have_executed`` is ``False``), when a call made from
    inside another call's work (a tool of an in-process server calling back into the runtime)
    needs a concurrency slot of a lane whose every slot is held by the calls it is nested in.

    Also raised by ``tx.acquire`` (and ``resources=``) when a transaction's wait for a resource
    closes a cycle of transactions waiting for each other: the youngest in the cycle fails, its
    block compensates, and the others go on once its locks are released.

    Attributes:
        lane: The lane it would have waited on (``"server 'a'"``, ``"tool 'a/t'"``, ``"the runtime"``),
            or the resource (``"resource 'account:42'"``).
        chain: The calls it is nested in, outermost first, as ``server/tool``; for a resource,
            the transaction ids round the cycle, from the one that failed.
    """

    def __init__(self, message: str, *, lane: str, chain: tuple[str, ...] = (), **context: Any) -> None:
        super().__init__(message, **context)
        self.lane = lane
        self.chain = chain


class RMCPCircuitOpenError(RMCPError):
    """A circuit breaker is open (or half-open with its probes under way): the call failed at
    once and nothing was sent.

    The server, or this tool on it, failed repeatedly; calls fail fast until the breaker's open
    period ends and a probe succeeds. Call again after ``retry_after_s``.

    Attributes:
        half_open_at: When the breaker half-opens, on the runtime's clock (``anyio.current_time()``).
        retry_after_s: Seconds from the error until then (0 while half-open and probing).
        server_wide: True for the server's own breaker, False for the tool's.
    """

    def __init__(
        self,
        message: str,
        *,
        half_open_at: float,
        retry_after_s: float,
        server_wide: bool,
        **context: Any,
    ) -> None:
        context.setdefault("may_have_executed", False)
        super().__init__(message, **context)
        self.half_open_at = half_open_at
        self.retry_after_s = retry_after_s
        self.server_wide = server_wide


class RMCPTransactionError(RMCPError):
    """A transaction did not commit; base of the transaction errors.

    Raised when the transaction's own ``timeout`` aborted it (after its completed steps were
    compensated; the timeout is the ``__cause__``), and by ``tx.call`` when the transaction
    can no longer take steps. An exception raised by the block itself is re-raised unchanged
    after compensation.

    Attributes:
        transaction_id: The transaction's id (its journal key).
        name: The name the transaction was started with.
        state: Where it ended, a ``TransactionState`` value (e.g. ``"compensated"``).
    """

    def __init__(self, message: str, *, transaction_id: str, name: str, state: str, **context: Any) -> None:
        super().__init__(message, **context)
        self.transaction_id = transaction_id
        self.name = name
        self.state = state


class RMCPCompensationError(RMCPTransactionError):
    """One or more compensations failed within ``compensation_timeout_s``: the transaction is
    ``compensation_failed`` and the world may be half changed. The journal keeps every step;
    fix the cause and run ``sup.recover(retry_failed=True)``, or undo the listed steps by hand.

    Attributes:
        failed_steps: The indices of the steps whose compensation failed.
    """

    def __init__(self, message: str, *, failed_steps: tuple[int, ...] = (), **context: Any) -> None:
        super().__init__(message, **context)
        self.failed_steps = failed_steps


class RMCPTransactionInDoubtError(RMCPTransactionError):
    """A step marked ``compensate_unknown=False`` has an unknown outcome: the transaction is
    ``in_doubt`` and waits for ``tx.resolve(step, ran=...)`` (or ``sup.resolve``) from someone
    who can look the effect up.

    Attributes:
        step: The index of the step in doubt.
    """

    default_may_have_executed = True

    def __init__(self, message: str, *, step: int, **context: Any) -> None:
        super().__init__(message, **context)
        self.step = step


class RMCPTaskCancelledError(RMCPError):
    """The server cancelled the task the call ran as (``tasks/get`` said ``cancelled``) before
    it completed, and not at this client's request.

    Cancellation is cooperative: the tool may have run in part. Check its effect, then call
    again with a new idempotency key (the old key still names the cancelled task).
    """

    default_may_have_executed = True


class RMCPTransferError(RMCPError):
    """A large payload could not be moved in chunks (docs/protocol.md section 9).

    For a result, the tool ran and answered: ``result`` is its answer, each payload not fetched
    still the ``resource_link`` handle the server sent, and ``outcome`` the tool's own
    (``SUCCEEDED`` or ``FAILED``), never ``UNKNOWN``. Do not call with a new key to get the
    payload: that runs the tool again. Call again with the same ``idempotency_key``: an RMCP
    server replays the same answer (``duplicate``) and its payload, without running the tool,
    as long as it keeps the key (its ``ttl_s``). The message says why it stopped (the handle
    expired on the server, the server gone, the sink failing, a chunk corrupt again and again,
    the call's timeout).

    For an argument (``result`` is ``None``), the upload failed before the call was sent: the
    tool did not run (``may_have_executed`` is ``False``).

    Attributes:
        result: The call's result with the payloads not fetched left as handles, or ``None``
            when the tool did not run.
    """

    #: Set on an instance for a result (with ``may_have_executed=True``).
    result: CallResult | None = None

    @property
    def outcome(self) -> Outcome:
        """The tool's outcome when it ran (it answered; only its payload is missing)."""
        return self.result.outcome if self.result is not None else super().outcome
