"""The call path: admission, attempts, retries and the mapping of every failure to an RMCPError.

This is the one boundary where SDK and transport exceptions become :mod:`rmcp_actors.errors`.
The caller's deadline is a cancel scope around the whole call (queueing, every attempt and
every backoff sleep); the SDK's per-request timeout gets the remaining time minus a margin only
so that the server receives a clean ``notifications/cancelled`` before the scope fires.
"""

from __future__ import annotations

import logging
import math
import random
from typing import Any

import anyio
import anyio.lowlevel
import attrs
from mcp import MCPError
from mcp_types import CallToolResult, RequestParamsMeta, Tool

from .._protocol import (
    NackCode,
    RequestMeta,
    ResponseMeta,
    ServerSettings,
    decode_response_meta,
    encode_request_meta,
)
from ..config import CallPolicy
from ..errors import (
    Outcome,
    RMCPArgumentError,
    RMCPError,
    RMCPIdempotencyConflictError,
    RMCPNackError,
    RMCPNetworkError,
    RMCPOutcomeUnknownError,
    RMCPResultValidationError,
    RMCPServerError,
    RMCPTimeoutAfterSendError,
    RMCPTimeoutError,
    UnknownToolError,
)
from ..flow._server import ServerFlow
from ..flow.scheduler import Holding, current_holding
from ..lifecycle import LifecycleCallback, LifecycleEvent, RequestState
from ..result import CallResult
from ._arguments import check_arguments, check_idempotency_key
from ._failures import AckTimeout, Attempt, Evidence, Verdict, classify
from ._http_evidence import current_evidence
from ._sent import current_send_hook
from .backoff import backoff_delay
from .connection import Connection, Session

__all__ = ["CallRequest", "perform_call"]

_logger = logging.getLogger("rmcp_actors")

# Headroom between the SDK's per-request timeout and the caller's deadline, so that the SDK
# times out first and sends notifications/cancelled while the call is still ours to finish.
_SDK_TIMEOUT_MARGIN_S = 0.02
# retry.max_attempts = 0: attempts end with the deadline (and the retry budget), not a count.
_UNTIL_DEADLINE = math.inf
# An attempt of a tool that is not safe to repeat is not sent with less time than this left:
# its answer could hardly arrive in time, and a timeout after sending leaves the outcome
# unknown, where not sending leaves a clean "nothing ran".
_MIN_TIME_FOR_ANSWER_S = 0.05


@attrs.frozen
class CallRequest:
    """One logical call, as the call path needs it."""

    tool: str
    arguments: dict[str, Any] | None
    request_id: str
    idempotency_key: str
    priority: int
    timeout_s: float
    on_lifecycle: LifecycleCallback | None = None
    tenant: str | None = None


@attrs.define
class _Progress:
    """What is known about a call so far: decides the error when it ends early."""

    request: CallRequest
    attempts: int = 0
    sent: bool = False
    queued_s: float = 0.0
    # The call's place in line, kept when a reconnect or a retry sends it back to the queue.
    ticket: int | None = None
    last_ambiguous: BaseException | None = None
    # The RMCP server whose deduplication a retry after a lost answer relies on.
    relied_on: ServerSettings | None = None
    events: list[LifecycleEvent] = attrs.Factory(list[LifecycleEvent])

    def record(self, state: RequestState, detail: str | None = None, *, at: float | None = None) -> None:
        # ``at`` spares a clock read where the caller just made one (this is the hot path).
        event = LifecycleEvent(state, self.attempts, anyio.current_time() if at is None else at, detail)
        self.events.append(event)
        if self.request.on_lifecycle is not None:
            try:
                self.request.on_lifecycle(event)
            except Exception:
                # The user's callback: its bug must not cost the result or change the outcome.
                _logger.exception(
                    "on_lifecycle callback raised at %s of request %s", state.value, self.request.request_id
                )


class _SentStep:
    """Records one attempt's SENT step, once, while the attempt is open (the transport's hook)."""

    __slots__ = ("handed_over", "open", "progress")

    def __init__(self, progress: _Progress) -> None:
        self.progress = progress
        self.open = True
        self.handed_over = False

    def __call__(self) -> None:
        if self.open:
            self.open = False
            self.handed_over = True
            self.progress.record(RequestState.SENT)


class _Failed(Exception):
    """An attempt failed; the verdict says what that means (see :mod:`._failures`)."""

    def __init__(self, verdict: Verdict) -> None:
        super().__init__(verdict.reason)
        self.verdict = verdict


class _Nacked(Exception):
    """The server refused the attempt with a retryable NACK: the tool did not run."""

    def __init__(self, meta: ResponseMeta) -> None:
        super().__init__(meta.code)
        self.meta = meta


async def perform_call(
    connection: Connection,
    flow: ServerFlow,
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
    progress = _Progress(request)
    try:
        check_arguments(request.arguments)
        check_idempotency_key(request.idempotency_key)
    except RMCPArgumentError as error:
        _stamp(error, connection.name, request, progress)
        raise
    progress.record(RequestState.QUEUED, at=started)
    # move_on_at builds one scope; anyio.CancelScope(deadline=...) builds two under trio.
    with anyio.move_on_at(deadline):
        try:
            result, rmcp_meta = await _attempts(connection, flow, policy, request, rng, deadline, progress)
        except RMCPError as error:
            if progress.last_ambiguous is not None and not error.may_have_executed:
                # A later attempt failed cleanly, but an earlier one was sent and lost.
                unknown = RMCPOutcomeUnknownError(
                    f"an earlier attempt was sent and its answer lost ({_cause_text(progress)}), so the "
                    f"tool may have run; the retry then failed: {error.message}",
                )
                _stamp(unknown, connection.name, request, progress)
                raise unknown from error
            _stamp(error, connection.name, request, progress)
            raise
        return CallResult(
            outcome=Outcome.FAILED if result.is_error else Outcome.SUCCEEDED,
            content=result.content,
            structured_content=result.structured_content,
            is_error=result.is_error,
            attempts=progress.attempts,
            duplicate=rmcp_meta is not None and rmcp_meta.duplicate is True,
            request_id=request.request_id,
            idempotency_key=request.idempotency_key,
            server=connection.name,
            tool=request.tool,
            queued_s=progress.queued_s,
            elapsed_s=anyio.current_time() - started,
            meta=result.meta,
            lifecycle=tuple(progress.events),
        )
    # Only the call's own deadline lands here; an enclosing scope's cancellation propagates.
    raise _timeout_error(connection, request, progress)


async def _attempts(
    connection: Connection,
    flow: ServerFlow,
    policy: CallPolicy,
    request: CallRequest,
    rng: random.Random,
    deadline: float,
    progress: _Progress,
) -> tuple[CallToolResult, ResponseMeta | None]:
    retry = policy.retry
    scheduler = flow.scheduler
    lane = flow.lane
    http = connection.spec.transport == "http"
    direct = connection.spec.wire == "direct"
    max_attempts = _UNTIL_DEADLINE if retry.max_attempts == 0 else retry.max_attempts or 3
    tool_lane = lane.tools.get(request.tool) if lane.tools else None
    # The call this one was made from, if its work runs in this task (see flow.scheduler).
    parent = current_holding.get()
    while True:
        session = connection.current_session() or await connection.wait_session()
        tool = session.tools.get(request.tool)
        if tool is None:
            raise UnknownToolError(
                f"server {connection.name!r} does not list tool {request.tool!r}; it lists: "
                f"{', '.join(sorted(session.tools)) or '(no tools)'}",
            )
        if progress.relied_on is not None:
            _check_dedup_still_covers(progress.relied_on, session.rmcp, progress)
        # flow: breaker check (server, then tool): an open breaker fails here, nothing sent.
        # flow: retry budget: an attempt after the first draws from it; the first refills it.
        # flow: rate limiter token (before the slot, so a rate-limited call holds no slot).
        if progress.ticket is None:
            progress.ticket = scheduler.ticket()
        progress.queued_s += await scheduler.acquire(
            lane, request.priority, progress.ticket, request.tenant, tool_lane
        )
        holding = Holding(lane, tool_lane, request.tool, parent)
        nesting = current_holding.set(holding)
        retry_after_s = 0.0
        try:
            if not session.usable:
                # The connection dropped while this call waited for a slot: nothing was sent.
                continue
            try:
                return await _send(
                    session,
                    request,
                    progress,
                    deadline,
                    policy,
                    _acks_arrive(connection),
                    http,
                    direct,
                    not _safe_to_repeat(policy, tool),
                )
            except _Failed as failed:
                verdict = failed.verdict
                if verdict.session_lost:
                    connection.report_broken(session)
                if verdict.attempt is Attempt.SENT_AND_LOST:
                    progress.last_ambiguous = failed.__cause__
                    if not _safe_to_repeat(policy, tool):
                        progress.relied_on = _deduplicating(session.rmcp, progress)
                else:
                    # Nothing ran (or _raise_for raises): only an earlier lost answer leaves
                    # the effect in question.
                    _raise_for(verdict, failed.__cause__, request)
                    progress.sent = progress.last_ambiguous is not None
                    if progress.attempts >= max_attempts:
                        raise RMCPNetworkError(
                            f"nothing was sent or run on all {progress.attempts} attempts "
                            f"(last: {verdict.reason}): check that {connection.spec.describe()} is "
                            "up, then call again",
                        ) from failed.__cause__
                    if verdict.attempt is Attempt.REFUSED:
                        # A new session can take it at once; no backoff.
                        continue
            except _Nacked as refused:
                # Refused, not run: only an earlier lost answer leaves the effect in question.
                progress.sent = progress.last_ambiguous is not None
                meta = refused.meta
                if progress.attempts >= max_attempts:
                    raise _nack_error(meta, f"after {progress.attempts} attempt(s)") from None
                retry_after_s = (meta.retry_after_ms or 0) / 1000
                if anyio.current_time() + retry_after_s >= deadline:
                    raise _nack_error(
                        meta, "and its retry_after_ms reaches past the call's deadline"
                    ) from None
        finally:
            holding.active = False
            current_holding.reset(nesting)
            scheduler.release(lane, tool_lane)
            # flow: report the attempt's outcome (breaker counts, limiter feedback, latency).
        if progress.attempts >= max_attempts:
            raise RMCPOutcomeUnknownError(
                f"the answer was lost on all {progress.attempts} attempts ({_cause_text(progress)}); "
                "the tool may have run",
            ) from progress.last_ambiguous
        delay = backoff_delay(progress.attempts, retry.base_delay_s, retry.max_delay_s, rng)
        await anyio.sleep(max(delay, retry_after_s))


def _raise_for(verdict: Verdict, cause: BaseException | None, request: CallRequest) -> None:
    """Raise the caller's error for a verdict that ends the call; return for one that retries."""
    if verdict.attempt is Attempt.ANSWERED:
        assert isinstance(cause, MCPError)
        raise RMCPServerError(cause.code, cause.message, cause.data) from cause
    if verdict.attempt is Attempt.TIMED_OUT:
        raise RMCPTimeoutAfterSendError(
            f"no answer within the call's timeout of {request.timeout_s:g} s; the request was "
            "sent, so the tool may have run: check its effect, or raise timeout_s",
        ) from cause
    if verdict.attempt is Attempt.UNREADABLE:
        raise RMCPResultValidationError(f"{verdict.reason}; the tool ran") from cause


# The RMCP versions whose dedup this client knows how to use: 0.2 deduplicates on the
# idempotency key; 0.1 on the request id, and only when the request says expect_ack (which
# this client then sends, see _send). A version it does not know is not relied on.
_DEDUP_VERSIONS = frozenset({"0.1", "0.2"})
_EXPECT_ACK_VERSION = "0.1"


def _dedups(settings: ServerSettings | None) -> bool:
    return settings is not None and settings.dedup and settings.version in _DEDUP_VERSIONS


def _deduplicating(settings: ServerSettings | None, progress: _Progress) -> ServerSettings:
    """The server a retry of a non-idempotent tool relies on; raise when there is none."""
    if settings is not None and settings.dedup and settings.version not in _DEDUP_VERSIONS:
        raise RMCPOutcomeUnknownError(
            f"the request was sent but its answer was lost ({_cause_text(progress)}); the tool "
            f"may have run. It is not retried: the server speaks RMCP version {settings.version!r}, "
            f"whose deduplication this client does not know (it knows {sorted(_DEDUP_VERSIONS)}); "
            "check its effect before calling again, or mark the tool idempotent = true in config",
        ) from progress.last_ambiguous
    if settings is None or not settings.dedup:
        raise RMCPOutcomeUnknownError(
            f"the request was sent but its answer was lost ({_cause_text(progress)}); the tool "
            "may have run. It is not retried because the tool is not known to be idempotent and "
            "the server does not deduplicate (it does not speak RMCP): check its effect before "
            "calling again, or mark it idempotent = true in config",
        ) from progress.last_ambiguous
    return settings


def _check_dedup_still_covers(
    relied_on: ServerSettings, now: ServerSettings | None, progress: _Progress
) -> None:
    """A retry with the same key is safe on the same server instance, or when the instance
    that lost the answer and the one now serving both keep their keys in a durable store
    (taken to be the same store: same server, same configuration); anything else could run
    the tool a second time."""
    same_instance = (
        now is not None and now.instance_id is not None and now.instance_id == relied_on.instance_id
    )
    if _dedups(now) and (same_instance or (relied_on.durable and now is not None and now.durable)):
        return
    why = (
        "the server no longer deduplicates"
        if not _dedups(now)
        else "the server restarted and its idempotency store is not durable"
    )
    raise RMCPOutcomeUnknownError(
        f"the request was sent but its answer was lost ({_cause_text(progress)}), and {why}, so "
        "the call cannot be retried safely; the tool may have run: check its effect",
    ) from progress.last_ambiguous


def _nack_error(meta: ResponseMeta, when: str) -> RMCPError:
    code = meta.code or "unknown"
    reason = f"{meta.reason or 'no reason given'} ({when})"
    if code == NackCode.IDEMPOTENCY_CONFLICT:
        return RMCPIdempotencyConflictError(code, reason, retryable=False)
    if code == NackCode.IN_DOUBT:
        return RMCPOutcomeUnknownError(
            f"the server cannot tell whether an earlier attempt ran ({code}): {meta.reason}"
        )
    # The same bad input the client checks before sending, found by the server: raised as the
    # errors a caller already handles for it, not as a generic refusal.
    if code == NackCode.UNKNOWN_TOOL:
        return UnknownToolError(f"the server refused the call ({code}): {reason}")
    if code == NackCode.INVALID_ARGUMENTS:
        return RMCPArgumentError(
            f"the server refused the arguments ({code}): {reason}; fix them and call again"
        )
    return RMCPNackError(code, reason, retryable=bool(meta.retryable), retry_after_ms=meta.retry_after_ms)


async def _send(
    session: Session,
    request: CallRequest,
    progress: _Progress,
    deadline: float,
    policy: CallPolicy,
    acks_arrive: bool,
    http: bool,
    direct: bool,
    unsafe: bool,
) -> tuple[CallToolResult, ResponseMeta | None]:
    client = session.client
    assert client is not None  # the caller checked session.usable, with no checkpoint since
    # A deadline that fired while this call waited for its slot ends it here, before it counts
    # as sent (the SDK would refuse to write it anyway).
    await anyio.lowlevel.checkpoint_if_cancelled()
    remaining = deadline - anyio.current_time()
    if unsafe and remaining < _MIN_TIME_FOR_ANSWER_S:
        raise RMCPTimeoutError(
            f"only {remaining * 1000:.0f} ms of the call's timeout of {request.timeout_s:g} s were "
            "left when it could be sent: too little for an answer, and the tool is not safe to "
            "repeat, so it was not sent (this attempt ran nothing): raise timeout_s, or lower the load",
        )
    progress.attempts += 1
    rmcp = session.rmcp
    meta = None
    if rmcp is not None:
        expect_ack = rmcp.version == _EXPECT_ACK_VERSION
        meta = encode_request_meta(
            RequestMeta(
                request_id=request.request_id,
                idempotency_key=request.idempotency_key,
                attempt=progress.attempts,
                timeout_ms=int(remaining * 1000),
                retry_count=progress.attempts - 1 if expect_ack else None,
                expect_ack=True if expect_ack else None,
            )
        )
    ack_timeout_s = _ack_timeout(policy, rmcp) if acks_arrive else None
    # From here the request may reach the server: a deadline says "may have run". The
    # lifecycle's SENT step waits for the transport to take the request (see _sent).
    progress.sent = True
    sent_step = _SentStep(progress)
    if direct:
        sent_step()  # no transport: the server's handler is called in this task
    sent_token = current_send_hook.set(sent_step)
    evidence = Evidence() if http else None
    token = current_evidence.set(evidence) if http else None
    try:
        if ack_timeout_s is None:
            result = await client.call_tool(
                request.tool,
                request.arguments,
                read_timeout_seconds=max(remaining - _SDK_TIMEOUT_MARGIN_S, 0.001),
                meta=meta,
            )
        else:
            result = await _call_with_ack_timeout(session, request, progress, remaining, meta, ack_timeout_s)
    except Exception as error:
        # Stdio and in-memory transports write in this task: once call_tool is left, a request
        # they did not take never leaves. Over HTTP the POST runs in a task of its own that may
        # still start writing, so only a refused connection says it never will.
        handed_over = sent_step.handed_over or (evidence is not None and evidence.refused is None)
        verdict = classify(error, evidence, transport_closed=session.broken.is_set(), handed_over=handed_over)
        if verdict is None:
            raise
        raise _Failed(verdict) from error
    finally:
        # A write the transport starts after the attempt ended is not this attempt's step.
        sent_step.open = False
        current_send_hook.reset(sent_token)
        if token is not None:
            current_evidence.reset(token)
    if rmcp is None:
        progress.record(RequestState.ANSWERED)
        return result, None
    rmcp_meta = decode_response_meta(result.meta)
    if rmcp_meta is None:
        progress.record(RequestState.ANSWERED)
        return result, None
    if rmcp_meta.ack:
        progress.record(RequestState.ACKED, "duplicate" if rmcp_meta.duplicate else None)
        return result, rmcp_meta
    progress.record(RequestState.NACKED, rmcp_meta.code)
    if rmcp_meta.retryable:
        raise _Nacked(rmcp_meta)
    raise _nack_error(rmcp_meta, f"on attempt {progress.attempts}")


def _acks_arrive(connection: Connection) -> bool:
    """Whether an early ACK (a progress notification) can reach this client at all.

    Not over HTTP, where JSON-response mode drops progress and the client cannot tell the
    mode; not on the SDK's in-process direct wire, whose requests carry no progress token
    for the server to answer.
    """
    spec = connection.spec
    return spec.transport != "http" and spec.wire != "direct"


def _ack_timeout(policy: CallPolicy, rmcp: ServerSettings | None) -> float | None:
    """The ACK timeout of an attempt, or None when it does not apply.

    It needs a server that sends early ACKs and whose store is durable (the only way to
    recover a call that was never ACKed is a retry with its key).
    """
    if policy.ack_timeout_s is None or rmcp is None or not (rmcp.early_ack and rmcp.durable):
        return None
    return policy.ack_timeout_s


async def _call_with_ack_timeout(
    session: Session,
    request: CallRequest,
    tracker: _Progress,
    remaining: float,
    meta: RequestParamsMeta | None,
    ack_timeout_s: float,
) -> CallToolResult:
    client = session.client
    assert client is not None
    ack_scope = anyio.CancelScope(deadline=anyio.current_time() + ack_timeout_s)

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        del progress, total  # any progress at all is the ACK
        if ack_scope.deadline != math.inf:
            ack_scope.deadline = math.inf
            tracker.record(RequestState.ACKED, f"early: {message}" if message else "early")

    with ack_scope:
        return await client.call_tool(
            request.tool,
            request.arguments,
            read_timeout_seconds=max(remaining - _SDK_TIMEOUT_MARGIN_S, 0.001),
            meta=meta,
            progress_callback=on_progress,
        )
    # The SDK sent notifications/cancelled; the server's run, if it started, goes on.
    raise AckTimeout(f"no early ACK within ack_timeout_s={ack_timeout_s:g} s")


def _safe_to_repeat(policy: CallPolicy, tool: Tool) -> bool:
    if policy.idempotent is not None:
        return policy.idempotent
    annotations = tool.annotations
    if not policy.trust_annotations or annotations is None:
        return False
    return bool(annotations.read_only_hint or annotations.idempotent_hint)


def _timeout_error(connection: Connection, request: CallRequest, progress: _Progress) -> RMCPTimeoutError:
    where = f"after {progress.attempts} attempt(s)" if progress.attempts else "before sending"
    if progress.sent:
        error: RMCPTimeoutError = RMCPTimeoutAfterSendError(
            f"the call's timeout of {request.timeout_s:g} s passed after {where}; the request was "
            "sent, so the tool may have run: check its effect, or raise timeout_s",
        )
    elif (unreachable := connection.unreachable_reason()) is not None:
        # Waiting for a reconnect (when_disconnected = "wait") that never came: say why.
        error = RMCPTimeoutError(
            f"the call's timeout of {request.timeout_s:g} s passed {where} while waiting for the "
            f"connection; nothing was sent: the server is unreachable ({unreachable}); check that "
            f"{connection.spec.describe()} is up, or raise timeout_s",
        )
    else:
        error = RMCPTimeoutError(
            f"the call's timeout of {request.timeout_s:g} s passed {where} (queued "
            f"{progress.queued_s:.3f} s, connection {connection.state.value}); nothing was sent: "
            "retry later, raise timeout_s, or lower the load",
        )
    _stamp(error, connection.name, request, progress)
    return error


def _stamp(error: RMCPError, server: str, request: CallRequest, progress: _Progress) -> None:
    error.server = error.server or server
    error.tool = error.tool or request.tool
    error.request_id = request.request_id
    error.idempotency_key = request.idempotency_key
    progress.record(
        RequestState.UNKNOWN if error.may_have_executed else RequestState.FAILED, type(error).__name__
    )
    error.lifecycle = tuple(progress.events)


def _cause_text(progress: _Progress) -> str:
    cause = progress.last_ambiguous
    return f"{type(cause).__name__}: {cause}" if cause is not None else "connection lost"
