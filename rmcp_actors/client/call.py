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
from collections.abc import Callable
from typing import Any, cast

import anyio
import attrs
from mcp import Client, MCPError
from mcp.shared.dispatcher import ProgressFnT
from mcp_types import CallToolResult, RequestParamsMeta, Tool
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from .._protocol import (
    NackCode,
    RequestMeta,
    ResponseMeta,
    ServerSettings,
    decode_response_meta,
    encode_request_meta,
)
from .._transfer import TransferAccept, Upload
from ..config import CallPolicy
from ..config._policy import TaskMode
from ..errors import (
    RMCPArgumentError,
    RMCPAuthError,
    RMCPError,
    RMCPIdempotencyConflictError,
    RMCPNackError,
    RMCPNetworkError,
    RMCPOutcomeUnknownError,
    RMCPResultValidationError,
    RMCPServerError,
    RMCPTimeoutAfterSendError,
    RMCPTimeoutError,
    RMCPTransferError,
    UnknownToolError,
)
from ..flow._feedback import RateLimitSignal, compile_patterns, from_error, from_nack, from_result
from ..flow._loop import EventLoop
from ..flow._server import ServerFlow
from ..flow.breaker import BreakerPass, Fault, fault_of
from ..flow.budget import RetryBudget
from ..flow.hedge import ToolHedge, race
from ..flow.limiter import take_tokens, wait_tokens
from ..flow.scheduler import Holding, current_holding
from ..lifecycle import LifecycleCallback, LifecycleEvent, RequestState
from ..result import CallResult
from ..runtime import WorkItem
from ._arguments import check_arguments, check_idempotency_key
from ._failures import AckTimeout, Attempt, Evidence, Verdict, classify
from ._http_evidence import current_evidence
from ._records import call_result, lifecycle_event
from ._sent import current_send_hook
from ._tasks import (
    TASKS_EXTENSION_ID,
    TaskCreated,
    TaskRef,
    TaskSnapshot,
    TaskWire,
    check_same_call,
    create_core_task,
    fingerprint,
    follow_task,
    task_declared,
)
from ._validation import validation_deferred
from .backoff import backoff_delay
from .callbacks import ProgressCallback
from .connection import Connection, Session
from .transfers import (
    CallTransfer,
    accept_for,
    check_output,
    fetch_results,
    fetch_structured,
    plan_uploads,
    transfers_on,
    upload_arguments,
)

__all__ = ["CallRequest", "perform_call"]

_logger = logging.getLogger("rmcp_actors")

# Headroom between the SDK's per-request timeout and the caller's deadline, so that the SDK
# times out first and sends notifications/cancelled while the call is still ours to finish.
_SDK_TIMEOUT_MARGIN_S = 0.02
# retry.max_attempts = 0: attempts end with the deadline (and the retry budget), not a count.
_UNTIL_DEADLINE = math.inf
# retry.max_attempts unset, against a server that does not deduplicate.
_DEFAULT_MAX_ATTEMPTS = 3
_RETRYABLE_ATTEMPTS = frozenset({Attempt.SENT_AND_LOST, Attempt.NOT_SENT, Attempt.REFUSED})
# An attempt of a tool that is not safe to repeat is not sent with less time than this left:
# its answer could hardly arrive in time, and a timeout after sending leaves the outcome
# unknown, where not sending leaves a clean "nothing ran".
_MIN_TIME_FOR_ANSWER_S = 0.05
# A refusal for going too fast with no retry_after, no backoff configured (base_delay_s = 0) and
# no limiter pacing (adaptive = false, no rate) is still never retried at once: max_attempts
# does not bound such attempts, so a zero pause sent them back to back until the deadline.
_MIN_RATE_LIMITED_PAUSE_S = 0.01
# Missing required client capability (2026-07-28): what a server requiring tasks answers a call
# that does not declare the extension.
_MISSING_CAPABILITY = -32021


@attrs.define(eq=False)
class CallRequest:
    """One logical call, as the call path needs it (never changed once built)."""

    # Not frozen: a frozen class's __init__ sets each field through object.__setattr__, about
    # three times the cost of define's plain slot writes, on every call.

    tool: str
    arguments: dict[str, Any] | None
    request_id: str
    idempotency_key: str
    priority: int
    timeout_s: float
    on_lifecycle: LifecycleCallback | None = None
    tenant: str | None = None
    transaction_id: str | None = None
    step: int | None = None
    # A lookup (the runtime's own, for transactions): asks the server what became of the
    # key and never runs the tool; sent only to a server that advertises the feature.
    lookup: bool | None = None
    # The caller's progress callback, given to every attempt (None: no progress token is sent).
    on_progress: ProgressCallback | None = None
    # Run as a task (True), never ask for one (False), or as the policy's ``task`` says (None).
    task: bool | None = None
    # Chunked transfer (a sink, a progress callback, the uploads): set for a call that asks for
    # either, or once it reaches a server advertising "transfer"; None keeps the plain path.
    transfer: CallTransfer | None = None


def _no_events() -> list[LifecycleEvent]:
    # Not attrs.Factory(list[LifecycleEvent]): calling a generic alias tries to set
    # __orig_class__ on the list and swallows the AttributeError, ~1.5 us on every call.
    return []


@attrs.define(eq=False)  # identity: the watchdog's in-flight record is keyed by it
class _Progress:
    """What is known about a call so far: decides the error when it ends early."""

    request: CallRequest
    # The running loop's primitives (the server's ServerFlow finds them once).
    loop: EventLoop
    attempts: int = 0
    sent: bool = False
    queued_s: float = 0.0
    # The call's place in line, kept when a reconnect or a retry sends it back to the queue.
    ticket: int | None = None
    last_ambiguous: BaseException | None = None
    # The RMCP server whose deduplication a retry after a lost answer relies on.
    relied_on: ServerSettings | None = None
    # Attempts the server refused for going too fast: they ran nothing and count against the
    # deadline only, not against max_attempts (the limiter paces them).
    rate_limited: int = 0
    events: list[LifecycleEvent] = attrs.Factory(_no_events)

    @property
    def counted(self) -> int:
        """Attempts that count against ``retry.max_attempts``."""
        return self.attempts - self.rate_limited

    def work_item(self, owner: str, now: float) -> WorkItem:
        """Describe the call for the watchdog's stall report (never on the call path)."""
        return WorkItem(
            key=self.request.request_id,
            owner=owner,
            what=self.request.tool,
            state=self.events[-1].state.value if self.events else "starting",
            # The first event is QUEUED, recorded at the call's start.
            age_s=now - self.events[0].at if self.events else 0.0,
            attempts=self.attempts,
        )

    def record(self, state: RequestState, detail: str | None = None, *, at: float | None = None) -> None:
        # ``at`` spares a clock read where the caller just made one (this is the hot path).
        event = lifecycle_event(state, self.attempts, self.loop.clock() if at is None else at, detail)
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


class _RateLimited(Exception):
    """The server refused the attempt for going too fast (any of the four forms): the tool did
    not run. ``meta`` is the NACK's, when the refusal was one."""

    def __init__(self, signal: RateLimitSignal, meta: ResponseMeta | None = None) -> None:
        super().__init__(signal.detail)
        self.signal = signal
        self.meta = meta


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
    loop = flow.loop
    started = loop.clock()
    deadline = started + request.timeout_s
    progress = _Progress(request, loop)
    try:
        check_arguments(request.arguments)
        check_idempotency_key(request.idempotency_key)
    except RMCPArgumentError as error:
        _stamp(error, connection.name, request, progress)
        raise
    progress.record(RequestState.QUEUED, at=started)
    breakers = flow.breakers
    if not breakers.server.passing or (
        (tool_breaker := breakers.tools.get(request.tool)) is not None and not tool_breaker.passing
    ):
        # An open breaker refuses the call before its deadline scope is built: the fast-fail
        # is the point of the breaker, and the scope is a third of its cost.
        rejected = breakers.open_rejection(request.tool, started)
        if rejected is not None:
            _stamp(rejected, connection.name, request, progress)
            raise rejected
    # flow: the watchdog sees the call in flight until it ends, however it ends (a dict insert
    # and delete: a context manager would cost five times as much here).
    flow.in_flight.begin(progress)
    answered: CallResult | None = None
    try:
        # move_on_at builds one scope; anyio.CancelScope(deadline=...) builds two under trio.
        with loop.move_on_at(deadline):
            try:
                scheduler = flow.scheduler
                lane = flow.lane
                budget = flow.budget_for(request.tool)
                gate = flow.limiter.gate()
                tool_gate = flow.limiter.tool_gate(request.tool)
                last_limited: _RateLimited | None = None
                tool_lane = lane.tools.get(request.tool) if lane.tools else None
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
                    max_attempts = _max_attempts(policy.retry.max_attempts, session.rmcp)
                    # flow: breaker check (server, then tool): an open breaker fails here, nothing sent.
                    breaker_pass = flow.breakers.admit(request.tool, policy.circuit_breaker)
                    if progress.ticket is None:
                        progress.ticket = scheduler.ticket()
                        # The call's first attempt refills the retry budget (at the call's start: a
                        # clock read costs more, ~1 µs); its retries draw from it below.
                        budget.deposit(started)
                    # The rate limiter's token comes before the slot, so a rate-limited call holds no slot.
                    try:
                        if (gate.engaged or tool_gate is not None) and not take_tokens(gate, tool_gate):
                            try:
                                progress.queued_s += await wait_tokens(
                                    gate, tool_gate, request.priority, deadline, progress.ticket
                                )
                            except RMCPTimeoutError as too_long:
                                if last_limited is None:
                                    raise
                                # The server's refusals are why this call cannot go on: say so.
                                raise _rate_limited_error(
                                    last_limited,
                                    f"and the next attempt would pass the call's deadline: {too_long}",
                                ) from too_long
                        # A free slot is taken with no cancellation check: _send makes the one the attempt
                        # needs, where acquire would make a second in a row with nothing in between.
                        if not scheduler.try_acquire(lane, tool_lane):
                            progress.queued_s += await scheduler.acquire(
                                lane, request.priority, progress.ticket, request.tenant, tool_lane
                            )
                    except BaseException:
                        breaker_pass.release()  # never sent: frees a half-open probe slot
                        raise
                    # Its parent: the call this one was made from, if its work runs in this task
                    # (see flow.scheduler); every attempt resets what it set, so each reads the same.
                    holding = Holding(lane, tool_lane, request.tool, current_holding.get())
                    nesting = current_holding.set(holding)
                    retry_after_s = 0.0
                    # What this attempt says about the server, for its breakers: nothing, until it is
                    # known. A rate-limit signal leaves it so: the server is up and asks for less (the
                    # limiter's job).
                    fault = Fault.IGNORED
                    fault_reason = ""
                    steps_before = len(progress.events)  # this attempt's lifecycle steps come after these
                    try:
                        if not session.usable:
                            # The connection dropped while this call waited for a slot: nothing was sent.
                            continue
                        unsafe = not _safe_to_repeat(policy, tool)
                        hedge = flow.hedge_for(request.tool, policy) if flow.hedging else None
                        try:
                            if hedge is None:
                                answer = await _send(
                                    session, request, progress, deadline, policy, unsafe, connection
                                )
                            else:
                                answer = await _hedged(
                                    hedge,
                                    budget,
                                    connection,
                                    flow,
                                    session,
                                    request,
                                    progress,
                                    deadline,
                                    policy,
                                    unsafe,
                                )
                        except _RateLimited as limited:
                            # Refused, not run; paced by the limiter and bounded by the deadline alone.
                            last: _Failed | _Nacked | _RateLimited = limited
                            progress.sent = progress.last_ambiguous is not None
                            last_limited = limited
                            if hedge is None:  # else reported by the race's attempt (see _hedged)
                                flow.limiter.report(request.tool, limited.signal)
                            retry_after_s = limited.signal.retry_after_s or 0.0
                            if anyio.current_time() + retry_after_s >= deadline:
                                raise _rate_limited_error(
                                    limited, "and the wait it asks for reaches past the call's deadline"
                                ) from None
                        except _Failed as failed:
                            last = failed
                            verdict = failed.verdict
                            fault = _fault_of_failure(verdict, failed.__cause__)
                            if verdict.session_lost and not flow.breakers.first_loss_of(session.generation):
                                fault = Fault.IGNORED  # the same transport death, seen by another caller
                            fault_reason = verdict.reason
                            if verdict.session_lost:
                                connection.report_broken(session)
                            if verdict.attempt is Attempt.SENT_AND_LOST:
                                progress.last_ambiguous = failed.__cause__
                                if unsafe:
                                    progress.relied_on = _deduplicating(session.rmcp, progress)
                            else:
                                # Nothing ran (or _raise_for raises): only an earlier lost answer leaves
                                # the effect in question.
                                _raise_for(verdict, failed.__cause__, request)
                                progress.sent = progress.last_ambiguous is not None
                        except _Nacked as refused:
                            last = refused
                            # Refused, not run: only an earlier lost answer leaves the effect in question.
                            progress.sent = progress.last_ambiguous is not None
                            fault = fault_of(None, nack_code=refused.meta.code)
                            fault_reason = f"NACK {refused.meta.code}"
                            retry_after_s = (refused.meta.retry_after_ms or 0) / 1000
                        except RMCPError:
                            # A NACK that ends the call (its code is the NACKED step's detail), or an
                            # attempt not sent for lack of time.
                            fault, fault_reason = _fault_of_refusal(progress, steps_before)
                            raise
                        except anyio.get_cancelled_exc_class():
                            if (
                                _step_since(progress, steps_before, RequestState.SENT) is not None
                                and anyio.current_time() >= deadline
                            ):
                                # The call's own deadline cut the attempt off after sending: a timeout.
                                fault, fault_reason = Fault.TOOL, "no answer within the call's timeout"
                            raise
                        else:
                            fault = Fault.NONE
                            if (
                                answer[0].is_error
                                and (signal := _result_signal(answer[0], policy)) is not None
                            ):
                                # Matched, but ACKed by a deduplicating server: a retry with this key would
                                # only replay the same answer. The limiter still slows down.
                                flow.limiter.report(request.tool, signal)
                            break  # the answer: the result is built below, in the deadline's scope
                    finally:
                        holding.active = False
                        current_holding.reset(nesting)
                        scheduler.release(lane, tool_lane)
                        # flow: report the attempt's outcome (breaker counts, limiter feedback, latency).
                        _report_to_breakers(breaker_pass, fault, fault_reason, progress)
                    if isinstance(last, _RateLimited):
                        # The server's wait when it gave one; else a backoff of its own, while the limiter's
                        # cut rate takes over the pacing.
                        delay = retry_after_s or max(
                            backoff_delay(
                                progress.rate_limited,
                                policy.retry.base_delay_s,
                                policy.retry.max_delay_s,
                                rng,
                            ),
                            _MIN_RATE_LIMITED_PAUSE_S,
                        )
                        if anyio.current_time() + delay >= deadline:
                            raise _rate_limited_error(
                                last, "and the next attempt would come after the call's deadline"
                            )
                        await anyio.sleep(delay)
                        continue
                    if progress.counted >= max_attempts:
                        raise _last_error(last, connection, progress, None)
                    if isinstance(last, _Failed) and last.verdict.attempt is Attempt.REFUSED:
                        delay = 0.0  # a new session can take it at once
                    else:
                        delay = max(
                            backoff_delay(
                                progress.attempts, policy.retry.base_delay_s, policy.retry.max_delay_s, rng
                            ),
                            retry_after_s,
                        )
                    # An unsafe tool is not sent with too little time left for its answer (see _send).
                    if anyio.current_time() + delay >= deadline - (_MIN_TIME_FOR_ANSWER_S if unsafe else 0.0):
                        # Retrying until the deadline ends here, with the last attempt's error, rather
                        # than in a timeout that would hide it.
                        raise _last_error(
                            last,
                            connection,
                            progress,
                            "its retry_after_ms reaches past the call's deadline"
                            if retry_after_s and anyio.current_time() + retry_after_s >= deadline
                            else "no time is left for another before the call's deadline",
                        )
                    if not budget.withdraw_retry():
                        raise _last_error(
                            last,
                            connection,
                            progress,
                            f"it was not retried: the retry budget of {_budget_name(budget)} is exhausted "
                            "(too many of its calls are failing at once; see retry_budget in config)",
                        )
                    if delay:
                        await anyio.sleep(delay)
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
            # One local for the result, ``answered``: each is a slot of every pending call's
            # frame (docs/design.md, "Memory per pending call").
            answered = call_result(
                answer[0],
                answer[1] is not None and answer[1].duplicate is True,
                request,
                connection.name,
                progress.attempts,
                progress.queued_s,
                # The answer's own step (acked or answered) was the last one recorded: its time is
                # when the answer came, and reading it spares a clock read.
                progress.events[-1].at - started,
                tuple(progress.events),
            )
            if request.transfer is None:
                return answered
            # Payloads to read (or upload statistics to report): outside this scope, whose
            # expiry would say "may have run" where the tool is known to have run.
        # The scope swallows its own deadline (pyright cannot tell from its union of types).
        if answered is None:  # pyright: ignore[reportUnnecessaryComparison]
            # Only the call's own deadline lands here; an enclosing scope's cancellation propagates.
            raise _timeout_error(connection, request, progress)
    finally:
        flow.in_flight.end(progress)
    return await _finish_transfers(connection, policy, request, progress, answered, deadline)


async def _finish_transfers(
    connection: Connection,
    policy: CallPolicy,
    request: CallRequest,
    progress: _Progress,
    result: CallResult,
    deadline: float,
) -> CallResult:
    """Read the answer's transferred items (see :mod:`.transfers`), within the call's deadline.

    Raises:
        RMCPTransferError: A payload could not be read; the tool ran (``error.result``).
    """
    transfer = request.transfer
    record = _transfer_recorder(progress)
    try:
        result = await fetch_results(connection, policy.transfer, result, deadline, transfer, record)
        if transfer is not None and transfer.structured:
            # The SDK's output-schema check was deferred to here (see transfers.validation_deferred).
            result = await fetch_structured(connection, policy.transfer, result, deadline, record)
            await check_output(connection, result)
    except RMCPError as error:
        error.lifecycle = tuple(progress.events)
        raise
    return attrs.evolve(result, lifecycle=tuple(progress.events))


def _transfer_recorder(progress: _Progress) -> Callable[[RequestState, str], None]:
    def record(state: RequestState, detail: str) -> None:
        progress.record(state, detail)

    return record


async def _upload(
    connection: Connection,
    session: Session,
    request: CallRequest,
    progress: _Progress,
    policy: CallPolicy,
    deadline: float,
) -> list[Upload] | None:
    """Upload the call's large string arguments before it is sent (a server advertising
    "transfer"); return ``_meta.rmcp.uploads``, or None when there is nothing to upload.

    Raises:
        _Failed: The connection was lost meanwhile (nothing sent): the next attempt resumes.
        RMCPTransferError: The server refused the upload (nothing ran).
    """
    transfer = request.transfer
    if transfer is None:
        transfer = request.transfer = CallTransfer()
    if not transfer.scanned:
        transfer.scanned = True
        transfer.uploads = plan_uploads(request.arguments, policy.transfer)
        if transfer.uploads is not None:
            request.arguments = transfer.uploads.arguments
    plan = transfer.uploads
    if plan is None:
        return None
    try:
        await upload_arguments(
            connection, plan, policy.transfer, deadline, transfer, _transfer_recorder(progress)
        )
    except RMCPTransferError:
        now = connection.current_session()
        if now is not None and not transfers_on(now.rmcp):
            # Replaced by a server without "transfer" meanwhile: the next attempt sends the
            # arguments whole (nothing ran).
            raise _Failed(
                Verdict(Attempt.NOT_SENT, False, "the server no longer advertises 'transfer'")
            ) from None
        raise
    if not session.usable:
        # The chunks went over a new session; the call goes on the next attempt, which opens
        # the upload again and finds them there.
        raise _Failed(Verdict(Attempt.NOT_SENT, True, "the connection was lost during the upload"))
    return plan.uploads


def _accept(policy: CallPolicy, connection: Connection, request: CallRequest) -> TransferAccept:
    """``_meta.rmcp.transfer`` of an attempt to a server advertising "transfer" (``_upload``
    made ``request.transfer``)."""
    transfer = request.transfer
    assert transfer is not None
    # Streamed to a sink, a text is not at hand to rebuild {"result": text} from.
    transfer.structured = transfer.sink is None
    return accept_for(policy.transfer, connection, structured=transfer.structured)


def _drop_uploads(transfer: CallTransfer, request: CallRequest) -> None:
    """The server no longer advertises "transfer" (it was replaced): send the arguments whole,
    never the ``""`` left at the uploads' places, and let the SDK check the answer as usual."""
    plan = transfer.uploads
    if plan is not None:
        request.arguments = plan.original
    transfer.uploads = None
    transfer.scanned = False
    transfer.structured = False


def _max_attempts(configured: int | None, rmcp: ServerSettings | None) -> float:
    """Attempts a call may make: 0 (and unset, against a server that deduplicates, where every
    retry is safe) means until the deadline, which the retry budget still bounds."""
    if configured is None:
        configured = 0 if _dedups(rmcp) else _DEFAULT_MAX_ATTEMPTS
    return _UNTIL_DEADLINE if configured == 0 else configured


def _last_error(
    last: _Failed | _Nacked, connection: Connection, progress: _Progress, why: str | None
) -> RMCPError:
    """The error a call ends with when it stops retrying: its last attempt's, saying why it
    stopped (``None``: its attempts ran out)."""
    attempts = progress.attempts
    if isinstance(last, _Nacked):
        return _nack_error(last.meta, f"after {attempts} attempt(s)" + (f"; {why}" if why else ""))
    if last.verdict.attempt is Attempt.SENT_AND_LOST:
        error: RMCPError = RMCPOutcomeUnknownError(
            f"the answer was lost on all {attempts} attempts ({_cause_text(progress)}); the tool may have run"
            + (f"; {why}" if why else ""),
        )
        error.__cause__ = progress.last_ambiguous
        return error
    error = RMCPNetworkError(
        f"nothing was sent or run on all {attempts} attempts (last: {last.verdict.reason})"
        + (f"; {why}" if why else "")
        + f": check that {connection.spec.describe()} is up, then call again",
    )
    error.__cause__ = last.__cause__
    return error


def _budget_name(budget: RetryBudget) -> str:
    if budget.tool is None:
        return f"server {budget.server!r}"
    return f"tool {budget.tool!r} of server {budget.server!r}"


async def _hedged(
    hedge: ToolHedge,
    budget: RetryBudget,
    connection: Connection,
    flow: ServerFlow,
    session: Session,
    request: CallRequest,
    progress: _Progress,
    deadline: float,
    policy: CallPolicy,
    unsafe: bool,
) -> tuple[CallToolResult, ResponseMeta | None]:
    """Send one attempt of a tool whose policy hedges: raced against hedges when the tool is
    safe to repeat (or the server deduplicates, and a hedge with the same key coalesces with
    the attempt there), each hedge paid from the retry budget and admitted like any attempt."""
    sketch = hedge.sketch

    async def send(on: Session) -> tuple[CallToolResult, ResponseMeta | None]:
        started = anyio.current_time()
        try:
            answer = await _send(on, request, progress, deadline, policy, unsafe, connection)
        except _Failed as failed:
            if failed.verdict.session_lost:
                connection.report_broken(on)
            raise
        except _RateLimited as limited:
            # Each attempt's own: the race keeps one failure at most, none when another wins.
            flow.limiter.report(request.tool, limited.signal)
            raise
        if sketch is not None:
            sketch.record(anyio.current_time() - started)
        return answer

    delay = hedge.delay()
    if delay is None or (unsafe and not _dedups(session.rmcp)):
        return await send(session)
    tool_lane = flow.lane.tools.get(request.tool) if flow.lane.tools else None
    # Hedges still waiting for their slots: the slot they wait for may be the one this call's
    # first attempt holds until the race ends, so they are dropped when that attempt fails.
    queued: set[anyio.CancelScope] = set()
    first_failed = False

    async def attempt(index: int) -> tuple[CallToolResult, ResponseMeta | None]:
        nonlocal first_failed
        if index == 0:
            try:
                return await send(session)
            except Exception:
                first_failed = True
                for scope in queued:
                    scope.cancel()
                raise
        # A hedge is an attempt like any other: its own slots (queued after the calls already
        # waiting: it is extra load), on the current session. Its task inherited the first
        # attempt's holding; it holds its own slots, beside the call's ancestors.
        primary = current_holding.get()
        parent = primary.parent if primary is not None else None
        current_holding.set(parent)
        # The same gates as an attempt's: a rate limiter token, then the slots.
        gate = flow.limiter.gate()
        tool_gate = flow.limiter.tool_gate(request.tool)
        with anyio.CancelScope() as waiting:
            queued.add(waiting)
            if first_failed:  # before this hedge's task first ran
                waiting.cancel()
            try:
                if (gate.engaged or tool_gate is not None) and not take_tokens(gate, tool_gate):
                    # A ticket of the scheduler's, which the first attempts' are: with none the
                    # gate numbers from 0 and the hedge went ahead of every call waiting.
                    await wait_tokens(gate, tool_gate, request.priority, deadline, flow.scheduler.ticket())
                await flow.scheduler.acquire(flow.lane, request.priority, None, request.tenant, tool_lane)
            except RMCPError as error:
                # Not sent, whatever the refusal (a limiter stopping says RMCPActorStoppedError):
                # raised as it is, it would win the race and cancel the first attempt, sent.
                raise _Failed(
                    Verdict(Attempt.NOT_SENT, False, f"no token or slot for a hedge ({error.message})")
                ) from error
            finally:
                queued.discard(waiting)
        if waiting.cancelled_caught:
            raise _Failed(
                Verdict(Attempt.NOT_SENT, False, "the first attempt failed while the hedge waited for a slot")
            )
        holding = Holding(flow.lane, tool_lane, request.tool, parent)
        current_holding.set(holding)
        try:
            now = connection.current_session()
            if now is None or not now.usable or deadline - anyio.current_time() < _MIN_TIME_FOR_ANSWER_S:
                raise _Failed(Verdict(Attempt.NOT_SENT, False, "the hedge could not be sent"))
            return await send(now)
        finally:
            holding.active = False
            flow.scheduler.release(flow.lane, tool_lane)
            # flow: report the hedge's outcome like an attempt's (breaker counts, limiter feedback).

    breakers = flow.breakers
    gate = breakers.tools.get(request.tool)

    def may_hedge() -> bool:
        # Not past a breaker that is not closed: a half-open one admits half_open_probes requests.
        return (
            breakers.server.passing
            and (gate is None or gate.passing)
            and deadline - anyio.current_time() >= _MIN_TIME_FOR_ANSWER_S
            and budget.withdraw_hedge()
        )

    return await race(
        attempt,
        delay_s=delay,
        max_hedges=hedge.max_hedges,
        may_hedge=may_hedge,
        retryable=_leaves_the_race,
        worst=_gravity,
    )


def _leaves_the_race(error: Exception) -> bool:
    """Whether a failed attempt leaves the answer to the others (nothing final was said)."""
    if isinstance(error, _Nacked | _RateLimited):
        return True
    return isinstance(error, _Failed) and error.verdict.attempt in _RETRYABLE_ATTEMPTS


def _gravity(error: Exception) -> int:
    """The failure a hedged call reports when all its attempts failed: a lost answer first
    (the tool may have run), then a refusal, then nothing sent."""
    if isinstance(error, _Failed) and error.verdict.attempt is Attempt.SENT_AND_LOST:
        return 2
    return 1 if isinstance(error, _Nacked | _RateLimited) else 0


def _fault_of_failure(verdict: Verdict, cause: BaseException | None) -> Fault:
    code = cause.code if isinstance(cause, MCPError) else None
    return fault_of(verdict.attempt, session_lost=verdict.session_lost, rpc_code=code)


def _step_since(progress: _Progress, steps_before: int, state: RequestState) -> LifecycleEvent | None:
    """The attempt's last lifecycle step of ``state`` (steps from ``steps_before`` on), if any."""
    return next((e for e in reversed(progress.events[steps_before:]) if e.state is state), None)


def _fault_of_refusal(progress: _Progress, steps_before: int) -> tuple[Fault, str]:
    nacked = _step_since(progress, steps_before, RequestState.NACKED)
    if nacked is None:
        return Fault.IGNORED, ""
    return fault_of(None, nack_code=nacked.detail), f"NACK {nacked.detail}"


def _report_to_breakers(breaker_pass: BreakerPass, fault: Fault, reason: str, progress: _Progress) -> None:
    """Count one attempt's outcome on its breakers, reading no clock for an answer."""
    events = progress.events
    if fault is Fault.NONE:
        # The answer's lifecycle step was just recorded, with the time it arrived.
        now = events[-1].at
        sent_at = None
        if breaker_pass.timed:
            sent_at = next((e.at for e in reversed(events) if e.state is RequestState.SENT), None)
        breaker_pass.record(fault, now, sent_at, reason)
    elif fault is Fault.IGNORED:
        breaker_pass.release()
    else:
        breaker_pass.record(fault, anyio.current_time(), None, reason)


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
    if verdict.attempt is Attempt.UNAUTHORIZED:
        raise RMCPAuthError(
            f"the server refused the client's credentials ({verdict.reason}); the tool did not run. "
            "It is not retried: check the credentials the server's auth names (a revoked or expired "
            "token, a rotated secret) and, for HTTP 403, the scopes the token carries",
            may_have_executed=False,
        ) from cause


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


def _result_signal(result: CallToolResult, policy: CallPolicy) -> RateLimitSignal | None:
    """An error result matching the opt-in ``rate_limit.error_patterns``, as a signal."""
    patterns = policy.rate_limit.error_patterns
    return from_result(result, compile_patterns(patterns)) if patterns else None


def _rate_limited_error(limited: _RateLimited, when: str) -> RMCPError:
    """The error of a call the server kept refusing for going too fast: nothing ran."""
    if limited.meta is not None:
        return _nack_error(limited.meta, when)
    signal = limited.signal
    retry_after = signal.retry_after_s
    return RMCPNackError(
        NackCode.RATE_LIMITED,
        f"{signal.detail} ({when})",
        retryable=True,
        retry_after_ms=None if retry_after is None else round(retry_after * 1000),
    )


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
    unsafe: bool,
    connection: Connection,
) -> tuple[CallToolResult, ResponseMeta | None]:
    # Few parameters and locals: each is a slot of the frame every pending call keeps
    # (docs/design.md, "Memory per pending call").
    client = session.client
    assert client is not None  # the caller checked session.usable, with no checkpoint since
    # A deadline that fired while this call waited for its slot ends it here, before it counts
    # as sent (the SDK would refuse to write it anyway); so does a cancel that came before a
    # slot taken without waiting.
    loop = progress.loop
    await loop.checkpoint_if_cancelled()
    remaining = deadline - loop.clock()
    if unsafe and remaining < _MIN_TIME_FOR_ANSWER_S:
        raise RMCPTimeoutError(
            f"only {remaining * 1000:.0f} ms of the call's timeout of {request.timeout_s:g} s were "
            "left when it could be sent: too little for an answer, and the tool is not safe to "
            "repeat, so it was not sent (this attempt ran nothing): raise timeout_s, or lower the load",
        )
    rmcp = session.rmcp
    if request.lookup and (rmcp is None or not rmcp.lookup):
        # A server that does not know the flag would run the tool: never send it one.
        raise RMCPNackError(
            NackCode.INVALID_META,
            "the server does not advertise RMCP lookups (any more): a lookup was not sent",
        )
    wire = _task_wire(session, request, policy)
    # The key's task, when an earlier call (in this process, or one before it) created one.
    store = (
        connection.task_store if wire is not None and request.idempotency_key != request.request_id else None
    )
    if store is not None and (ref := await store.get(connection.name, request.idempotency_key)) is not None:
        progress.attempts += 1
        progress.sent = True  # by the call that created the task
        return await _resume(connection, session, request, progress, deadline, ref), None
    progress.attempts += 1
    meta = None
    if rmcp is not None:
        expect_ack = rmcp.version == _EXPECT_ACK_VERSION
        accept = uploads = None
        if transfers_on(rmcp):
            uploads = await _upload(connection, session, request, progress, policy, deadline)
            accept = _accept(policy, connection, request)
            if uploads is not None:
                # The upload took its time: the call carries, and waits, what is left.
                remaining = deadline - loop.clock()
        elif request.transfer is not None:
            _drop_uploads(request.transfer, request)
        meta = encode_request_meta(
            RequestMeta(
                request_id=request.request_id,
                idempotency_key=request.idempotency_key,
                attempt=progress.attempts,
                timeout_ms=int(remaining * 1000),
                transaction_id=request.transaction_id,
                step=request.step,
                retry_count=progress.attempts - 1 if expect_ack else None,
                expect_ack=True if expect_ack else None,
                lookup=request.lookup,
                transfer=accept,
                uploads=uploads,
            )
        )
    elif request.transfer is not None:
        _drop_uploads(request.transfer, request)  # the server was replaced by a plain one
    ack_timeout_s = _ack_timeout(policy, rmcp) if rmcp is not None and _acks_arrive(connection) else None
    # From here the request may reach the server: a deadline says "may have run". The
    # lifecycle's SENT step waits for the transport to take the request (see _sent).
    progress.sent = True
    sent_step = _SentStep(progress)
    if connection.spec.wire == "direct":
        sent_step()  # no transport: the server's handler is called in this task
    sent_token = current_send_hook.set(sent_step)
    if connection.spec.transport == "http":
        evidence = Evidence()
        token = current_evidence.set(evidence)
    else:
        evidence = token = None
    answer: CallToolResult | TaskSnapshot | TaskRef
    # The SDK calls it positionally: any callable of three arguments fits.
    on_progress = None if request.on_progress is None else cast("ProgressFnT", request.on_progress)
    # A call that takes a transferred structuredContent checks it once rebuilt (_finish_transfers).
    # Set and cleared without a token: every local is a slot of each pending call's frame.
    if request.transfer is not None and request.transfer.structured:
        validation_deferred.set(True)
    try:
        if wire is TaskWire.CORE:
            answer = await create_core_task(
                client,
                request.tool,
                request.arguments,
                meta,
                max(remaining - _SDK_TIMEOUT_MARGIN_S, 0.001),
            )
        elif wire is TaskWire.EXTENSION:
            answer = await _call_declaring_task(
                client, request, max(remaining - _SDK_TIMEOUT_MARGIN_S, 0.001), meta, on_progress
            )
        elif ack_timeout_s is None:
            try:
                answer = await client.call_tool(
                    request.tool,
                    request.arguments,
                    read_timeout_seconds=max(remaining - _SDK_TIMEOUT_MARGIN_S, 0.001),
                    meta=meta,
                    progress_callback=on_progress,
                )
            except MCPError as refused:
                if not _asks_for_a_task(refused, request, policy):
                    raise
                # Nothing ran: the server wants the call as a task, which "auto" grants.
                session.requires_task.add(request.tool)
                # This session had not learnt it yet (a new process, a reconnect): the key may
                # have created its task already.
                store = connection.task_store if request.idempotency_key != request.request_id else None
                ref = None if store is None else await store.get(connection.name, request.idempotency_key)
                if ref is not None:
                    answer = ref
                else:
                    answer = await _call_declaring_task(
                        client,
                        request,
                        max(deadline - loop.clock() - _SDK_TIMEOUT_MARGIN_S, 0.001),
                        meta,
                        on_progress,
                    )
        else:
            answer = await _call_with_ack_timeout(session, request, progress, remaining, meta, ack_timeout_s)
    except TaskCreated as created:
        # The server chose to run it as a task (the extension's claim hands it over).
        answer = created.first
    except Exception as error:
        # Stdio and in-memory transports write in this task: once call_tool is left, a request
        # they did not take never leaves. Over HTTP the POST runs in a task of its own that may
        # still start writing, so only a refused connection says it never will.
        signal = from_error(error, evidence)
        if signal is not None:
            progress.record(RequestState.NACKED, f"rate_limited ({signal.source.value})")
            # Counted per attempt, here: a race raises one refusal for all its attempts.
            progress.rate_limited += 1
            raise _RateLimited(signal) from error
        verdict = classify(
            error,
            evidence,
            transport_closed=session.broken.is_set(),
            handed_over=sent_step.handed_over or (evidence is not None and evidence.refused is None),
        )
        if verdict is None:
            raise
        raise _Failed(verdict) from error
    finally:
        # A write the transport starts after the attempt ended is not this attempt's step.
        sent_step.open = False
        current_send_hook.reset(sent_token)
        if token is not None:
            current_evidence.reset(token)
        if request.transfer is not None and request.transfer.structured:
            validation_deferred.set(False)
    if isinstance(answer, TaskRef):
        return await _resume(connection, session, request, progress, deadline, answer), None
    if isinstance(answer, TaskSnapshot):
        answer = await _follow(connection, session, request, progress, deadline, wire, answer)
    rmcp_meta = None if rmcp is None else decode_response_meta(answer.meta)
    if rmcp_meta is None:
        if answer.is_error and (signal := _result_signal(answer, policy)) is not None:
            # Opted in: this server's error result says "too fast"; nothing ran (nothing
            # deduplicates it either, so a retry is a fresh request).
            progress.record(RequestState.NACKED, f"rate_limited ({signal.source.value})")
            progress.rate_limited += 1
            raise _RateLimited(signal)
        progress.record(RequestState.ANSWERED)
        return answer, None
    if rmcp_meta.ack:
        progress.record(RequestState.ACKED, "duplicate" if rmcp_meta.duplicate else None)
        return answer, rmcp_meta
    progress.record(RequestState.NACKED, rmcp_meta.code)
    if (signal := from_nack(rmcp_meta)) is not None:
        progress.rate_limited += 1
        raise _RateLimited(signal, rmcp_meta)
    if rmcp_meta.retryable or (
        rmcp_meta.code == NackCode.TRANSFER_INCOMPLETE and request.transfer is not None
    ):
        # transfer_incomplete: the server lacks an uploaded chunk (nothing ran); the next
        # attempt opens the upload again and sends what is missing.
        raise _Nacked(rmcp_meta)
    raise _nack_error(rmcp_meta, f"on attempt {progress.attempts}")


async def _call_declaring_task(
    client: Client,
    request: CallRequest,
    read_timeout_s: float,
    meta: RequestParamsMeta | None,
    on_progress: ProgressFnT | None,
) -> CallToolResult:
    """``tools/call`` declaring the tasks extension (2026-07-28): the server may answer with a
    task, which the extension's claim raises as :class:`TaskCreated`."""
    declared = task_declared.set(True)
    try:
        return await client.call_tool(
            request.tool,
            request.arguments,
            read_timeout_seconds=read_timeout_s,
            meta=meta,
            progress_callback=on_progress,
        )
    finally:
        task_declared.reset(declared)


def _task_mode(request: CallRequest, policy: CallPolicy) -> TaskMode:
    return policy.task if request.task is None else request.task


def _task_wire(session: Session, request: CallRequest, policy: CallPolicy) -> TaskWire | None:
    """The wire this call asks for a task on; None for a plain call (which a server speaking
    the tasks extension may still answer with a task: it decides, see :mod:`._tasks`).

    Raises:
        RMCPArgumentError: ``task`` is True and the server does not run the tool as a task.
    """
    mode = _task_mode(request, policy)
    if mode is False or request.lookup:
        return None  # a lookup asks about an earlier call and never runs the tool
    tool = session.tools.get(request.tool)
    execution = tool.execution if tool is not None else None
    support = execution.task_support if execution is not None else None
    if mode == "auto" and support != "required" and request.tool not in session.requires_task:
        return None
    client = session.client
    assert client is not None  # the caller checked session.usable
    if session.protocol_version in MODERN_PROTOCOL_VERSIONS:
        extensions = client.server_capabilities.extensions
        if extensions is not None and TASKS_EXTENSION_ID in extensions:
            return TaskWire.EXTENSION
    elif support in ("optional", "required"):
        return TaskWire.CORE
    if mode == "auto":
        return None  # a tool the server requires a task for, on a wire without them: it says so
    raise RMCPArgumentError(
        f"task=True, but server {session.protocol_version} does not run tool {request.tool!r} as a "
        f"task (its execution.taskSupport is {support or 'absent'!r}, and the server does not "
        f"advertise {TASKS_EXTENSION_ID}); nothing was sent: call it without task=True"
    )


def _asks_for_a_task(error: MCPError, request: CallRequest, policy: CallPolicy) -> bool:
    """Whether a refusal says the tool runs only as a task (the tasks extension's -32021 with
    the extension as the missing capability), and the call may run as one (``task`` "auto")."""
    mode = _task_mode(request, policy)
    if error.code != _MISSING_CAPABILITY or mode != "auto":
        return False
    data: object = error.data
    required = cast("dict[str, object]", data).get("requiredCapabilities") if isinstance(data, dict) else None
    extensions = cast("dict[str, object]", required).get("extensions") if isinstance(required, dict) else None
    return isinstance(extensions, dict) and TASKS_EXTENSION_ID in extensions


async def _follow(
    connection: Connection,
    session: Session,
    request: CallRequest,
    progress: _Progress,
    deadline: float,
    wire: TaskWire | None,
    first: TaskSnapshot,
) -> CallToolResult:
    """Follow the task the server created for this attempt to its result, its id kept in the
    task store first when the caller gave the key (so that another call can resume it)."""
    ref = TaskRef(first.task_id, wire or TaskWire.EXTENSION, fingerprint(request.tool, request.arguments))
    progress.record(RequestState.TASK, f"created {first.task_id}")
    store = connection.task_store
    if store is not None and request.idempotency_key != request.request_id:
        # Shielded: a cancel here would leave a created task unrecorded (a restart with the key
        # creates another) and uncancelled (follow_task, which sends tasks/cancel, not entered);
        # it is delivered at follow_task's first wait instead.
        with anyio.CancelScope(shield=True):
            await store.put(connection.name, request.idempotency_key, ref)
    result = await follow_task(
        connection, session.generation, ref, first, deadline, _status_recorder(progress)
    )
    return await _checked(connection, request.tool, result)


async def _resume(
    connection: Connection,
    session: Session,
    request: CallRequest,
    progress: _Progress,
    deadline: float,
    ref: TaskRef,
) -> CallToolResult:
    """Follow the task an earlier call with this key created (found in the task store).

    Raises:
        RMCPIdempotencyConflictError: That task runs another tool or other arguments.
    """
    check_same_call(ref, request.idempotency_key, fingerprint(request.tool, request.arguments))
    progress.record(RequestState.TASK, f"resumed {ref.task_id}")
    result = await follow_task(
        connection, session.generation, ref, None, deadline, _status_recorder(progress)
    )
    result = await _checked(connection, request.tool, result)
    progress.record(RequestState.ANSWERED)
    return result


async def _checked(connection: Connection, tool: str, result: CallToolResult) -> CallToolResult:
    """A task's result, checked against the tool's output schema as the SDK's ``call_tool``
    checks a plain call's (a task's result arrives by ``tasks/get`` or ``tasks/result``).

    Raises:
        RMCPResultValidationError: The result breaks the tool's output schema.
    """
    session = connection.current_session()
    if result.is_error or session is None or session.client is None:
        return result
    try:
        await session.client.session.validate_tool_result(tool, result)
    except RuntimeError as error:
        raise RMCPResultValidationError(
            f"the result of the call's task breaks the tool's output schema ({error}); the tool ran"
        ) from error
    except MCPError:
        return result  # the tool listing could not be fetched again: the result is the server's
    return result


def _status_recorder(progress: _Progress) -> Callable[[str], None]:
    def record(status: str) -> None:
        progress.record(RequestState.TASK, status)

    return record


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

    caller_progress = request.on_progress

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        # Any progress at all is the ACK; the caller sees every notification, the ACK included.
        if ack_scope.deadline != math.inf:
            ack_scope.deadline = math.inf
            tracker.record(RequestState.ACKED, f"early: {message}" if message else "early")
        if caller_progress is not None:
            await caller_progress(progress, total, message)

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
            f"the call's timeout of {request.timeout_s:g} s passed {where}; the request was "
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
