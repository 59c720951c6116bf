"""The call path: admission, attempts, retries and the mapping of every failure to an RMCPError.

This is the one boundary where SDK and transport exceptions become :mod:`rmcp_actors.errors`.
The caller's deadline is a cancel scope around the whole call (queueing, every attempt and
every backoff sleep); the SDK's per-request timeout gets the remaining time minus a margin only
so that the server receives a clean ``notifications/cancelled`` before the scope fires.
"""

from __future__ import annotations

import random
from typing import Any

import anyio
import anyio.lowlevel
import attrs
import msgspec
from mcp import MCPError
from mcp_types import CONNECTION_CLOSED, INVALID_REQUEST, REQUEST_TIMEOUT, CallToolResult, Tool
from pydantic import ValidationError

from .._protocol import META_KEY, RequestMeta, encode_request_meta
from ..config import CallPolicy
from ..errors import (
    Outcome,
    RMCPArgumentError,
    RMCPError,
    RMCPNetworkError,
    RMCPOutcomeUnknownError,
    RMCPResultValidationError,
    RMCPServerError,
    RMCPTimeoutAfterSendError,
    RMCPTimeoutError,
    UnknownToolError,
)
from ..result import CallResult
from .connection import Connection, Session
from .retry import backoff_delay
from .scheduler import Lane, Scheduler

__all__ = ["CallRequest", "perform_call"]

# The messages the SDK itself puts on -32000 when an answer can no longer arrive
# (mcp/shared/jsonrpc_dispatcher.py, mcp/client/streamable_http.py).
_SDK_LOST_ANSWER_MESSAGES = frozenset({"Connection closed", "SSE stream ended without a response"})
_SDK_LOST_STREAM_PREFIX = "SSE stream failed:"
# Streamable HTTP: a server that restarted answers an old session id with 404, which the SDK
# server words "Session not found" and the SDK client "Session terminated". Nothing ran.
_SESSION_LOST_MESSAGES = frozenset({"Session not found", "Session terminated"})

# Headroom between the SDK's per-request timeout and the caller's deadline, so that the SDK
# times out first and sends notifications/cancelled while the call is still ours to finish.
_SDK_TIMEOUT_MARGIN_S = 0.02


@attrs.frozen
class CallRequest:
    """One logical tool call, as the call path needs it."""

    tool: str
    arguments: dict[str, Any] | None
    request_id: str
    idempotency_key: str
    priority: int
    timeout_s: float


@attrs.define
class _Progress:
    """What is known about a call so far: decides the error when it ends early."""

    attempts: int = 0
    sent: bool = False
    queued_s: float = 0.0
    last_ambiguous: BaseException | None = None


class _Ambiguous(Exception):
    """An attempt was sent and its answer was lost (the transport failed)."""


class _SessionLost(Exception):
    """The server refused the request because it no longer knows the transport's session."""


async def perform_call(
    connection: Connection,
    scheduler: Scheduler,
    lane: Lane,
    policy: CallPolicy,
    request: CallRequest,
    rng: random.Random,
) -> CallResult:
    """Run one logical call to completion: a result, or an RMCPError saying what is known.

    Raises:
        RMCPError: A subclass per failure; see :mod:`rmcp_actors.errors`.
    """
    started = anyio.current_time()
    deadline = started + request.timeout_s
    progress = _Progress()
    # move_on_at builds one scope; anyio.CancelScope(deadline=...) builds two under trio.
    with anyio.move_on_at(deadline):
        try:
            result = await _attempts(connection, scheduler, lane, policy, request, rng, deadline, progress)
        except RMCPError as error:
            if progress.last_ambiguous is not None and not error.may_have_executed:
                # A later attempt failed cleanly, but an earlier one was sent and lost.
                unknown = RMCPOutcomeUnknownError(
                    f"an earlier attempt was sent and its answer lost ({_cause_text(progress)}), so the "
                    f"tool may have run; the retry then failed: {error.message}",
                )
                _stamp(unknown, connection.name, request)
                raise unknown from error
            _stamp(error, connection.name, request)
            raise
        rmcp_meta = (result.meta or {}).get(META_KEY)
        return CallResult(
            outcome=Outcome.FAILED if result.is_error else Outcome.SUCCEEDED,
            content=result.content,
            structured_content=result.structured_content,
            is_error=result.is_error,
            attempts=progress.attempts,
            duplicate=isinstance(rmcp_meta, dict) and rmcp_meta.get("duplicate") is True,  # pyright: ignore[reportUnknownMemberType]
            request_id=request.request_id,
            idempotency_key=request.idempotency_key,
            server=connection.name,
            tool=request.tool,
            queued_s=progress.queued_s,
            elapsed_s=anyio.current_time() - started,
            meta=result.meta,
        )
    # Only the call's own deadline lands here; an enclosing scope's cancellation propagates.
    raise _timeout_error(connection, request, progress)


async def _attempts(
    connection: Connection,
    scheduler: Scheduler,
    lane: Lane,
    policy: CallPolicy,
    request: CallRequest,
    rng: random.Random,
    deadline: float,
    progress: _Progress,
) -> CallToolResult:
    retry = policy.retry
    while True:
        session = connection.current_session() or await connection.wait_session()
        tool = session.tools.get(request.tool)
        if tool is None:
            raise UnknownToolError(
                f"server {connection.name!r} does not list tool {request.tool!r}; it lists: "
                f"{', '.join(sorted(session.tools)) or '(no tools)'}",
            )
        progress.queued_s += await scheduler.acquire(lane, request.priority)
        try:
            if not session.usable:
                # The connection dropped while this call waited for a slot: nothing was sent.
                continue
            try:
                return await _send(session, request, progress, deadline)
            except _Ambiguous as lost:
                connection.report_broken(session)
                progress.last_ambiguous = lost.__cause__
            except _SessionLost as refused:
                # Refused, not run: safe to send again on a new session.
                connection.report_broken(session)
                progress.sent = progress.last_ambiguous is not None
                if progress.attempts >= retry.max_attempts:
                    raise RMCPNetworkError(
                        f"the server kept refusing the session ({refused}) on all {progress.attempts} "
                        "attempts; nothing ran: check the server, then call again",
                    ) from refused.__cause__
                continue
        finally:
            scheduler.release(lane)
        if not _safe_to_repeat(policy, tool):
            raise RMCPOutcomeUnknownError(
                f"the request was sent but its answer was lost ({_cause_text(progress)}); the tool "
                "may have run. It is not retried because the tool is not known to be idempotent: "
                "check its effect before calling again, or mark it idempotent = true in config",
            ) from progress.last_ambiguous
        if progress.attempts >= retry.max_attempts:
            raise RMCPOutcomeUnknownError(
                f"the answer was lost on all {progress.attempts} attempts ({_cause_text(progress)}); "
                "the tool may have run",
            ) from progress.last_ambiguous
        await anyio.sleep(backoff_delay(progress.attempts, retry.base_delay_s, retry.max_delay_s, rng))


async def _send(
    session: Session, request: CallRequest, progress: _Progress, deadline: float
) -> CallToolResult:
    client = session.client
    assert client is not None  # the caller checked session.usable, with no checkpoint since
    # A deadline that fired while this call waited for its slot ends it here, before it counts
    # as sent (the SDK would refuse to write it anyway).
    await anyio.lowlevel.checkpoint_if_cancelled()
    progress.attempts += 1
    remaining = deadline - anyio.current_time()
    meta = encode_request_meta(
        RequestMeta(
            request_id=request.request_id,
            idempotency_key=request.idempotency_key,
            attempt=progress.attempts,
            timeout_ms=int(remaining * 1000),
        )
    )
    progress.sent = True
    try:
        return await client.call_tool(
            request.tool,
            request.arguments,
            read_timeout_seconds=max(remaining - _SDK_TIMEOUT_MARGIN_S, 0.001),
            meta=meta,
        )
    except MCPError as error:
        if _answer_lost(session, error):
            raise _Ambiguous(error.message) from error
        if error.code == INVALID_REQUEST and error.message in _SESSION_LOST_MESSAGES:
            raise _SessionLost(error.message) from error
        if error.code == REQUEST_TIMEOUT:
            raise RMCPTimeoutAfterSendError(
                f"no answer within the call's timeout of {request.timeout_s:g} s; the request was "
                "sent, so the tool may have run: check its effect, or raise timeout_s",
            ) from error
        if error.code == CONNECTION_CLOSED:
            # A server's own error in the implementation-defined range: it answered, so the
            # request reached it and may have run.
            raise RMCPServerError(error.code, error.message, error.data, may_have_executed=True) from error
        raise RMCPServerError(error.code, error.message, error.data) from error
    except ValidationError as error:
        raise RMCPResultValidationError(
            f"the server's answer is not a valid tool result: {error.error_count()} problem(s), "
            f"first: {error.errors()[0]['msg']}; the tool ran",
        ) from error
    except RuntimeError as error:
        if not session.usable:
            raise _Ambiguous(str(error)) from error
        raise RMCPResultValidationError(
            f"the tool ran but its result breaks the tool's output schema: {error}",
        ) from error
    except Exception as error:
        if not _json_serializable(request.arguments):
            # Every attempt sends the same arguments, so this is the first: none was sent.
            progress.sent = False
            raise RMCPArgumentError(
                f"the arguments cannot be serialized to JSON ({type(error).__name__}: {error}); nothing "
                "was sent",
            ) from error
        # The SDK failed in a way it does not document: the request may have been written.
        raise _Ambiguous(f"{type(error).__name__}: {error}") from error


def _answer_lost(session: Session, error: MCPError) -> bool:
    """True when ``error`` says the transport lost the answer, not that the server refused.

    The SDK reports a closed connection, and the HTTP transport a response stream that ended,
    with code -32000, which servers may also use for errors of their own: only a transport
    known to be gone, or one of the SDK's own messages, counts as a lost answer.
    """
    if error.code != CONNECTION_CLOSED:
        return False
    if session.broken.is_set() or error.message in _SDK_LOST_ANSWER_MESSAGES:
        return True
    return error.message.startswith(_SDK_LOST_STREAM_PREFIX)


def _json_serializable(arguments: dict[str, Any] | None) -> bool:
    try:
        msgspec.json.encode(arguments)
    except (TypeError, ValueError, OverflowError):
        return False
    return True


def _safe_to_repeat(policy: CallPolicy, tool: Tool) -> bool:
    if policy.idempotent is not None:
        return policy.idempotent
    annotations = tool.annotations
    if not policy.trust_annotations or annotations is None:
        return False
    return bool(annotations.read_only_hint or annotations.idempotent_hint)


def _timeout_error(connection: Connection, request: CallRequest, progress: _Progress) -> RMCPTimeoutError:
    where = f"{progress.attempts} attempt(s)" if progress.attempts else "before sending"
    if progress.sent:
        error: RMCPTimeoutError = RMCPTimeoutAfterSendError(
            f"the call's timeout of {request.timeout_s:g} s passed after {where}; the request was "
            "sent, so the tool may have run: check its effect, or raise timeout_s",
        )
    else:
        error = RMCPTimeoutError(
            f"the call's timeout of {request.timeout_s:g} s passed {where} (queued "
            f"{progress.queued_s:.3f} s, connection {connection.state.value}); nothing was sent: "
            "retry later, raise timeout_s, or lower the load",
        )
    _stamp(error, connection.name, request)
    return error


def _stamp(error: RMCPError, server: str, request: CallRequest) -> None:
    error.server = error.server or server
    error.tool = error.tool or request.tool
    error.request_id = request.request_id
    error.idempotency_key = request.idempotency_key


def _cause_text(progress: _Progress) -> str:
    cause = progress.last_ambiguous
    return f"{type(cause).__name__}: {cause}" if cause is not None else "connection lost"
