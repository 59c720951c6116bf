# pyright: strict
"""What live transactions and recovery share: writing records, and settling a transaction
from its records (compensating it, or finishing it forward past its pivot).

A transaction's records are its truth. A live transaction keeps the records it wrote in
memory (the same records its journal holds); recovery reads them back from the journal. Both
then hand them to :meth:`Engine.settle`, which decides from the records alone what is left to
do: that is why a crash during recovery is recovered again the same way, and why a compensation
that already succeeded (its ``CompensationDone`` is journaled) is never sent again.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

import anyio
import attrs
import msgspec

from ..errors import (
    RMCPArgumentError,
    RMCPConfigError,
    RMCPError,
    RMCPIdempotencyConflictError,
    UnknownServerError,
    UnknownToolError,
)
from ..result import CallResult
from ._keys import compensation_key
from ._model import Compensation, TransactionState
from .journal import (
    CompensationDone,
    CompensationSpec,
    CompensationStarted,
    Journal,
    JournalRecord,
    StateChanged,
    StepDone,
    StepIntent,
    StepResolved,
    TransactionBegun,
)

__all__ = [
    "CompensationFunction",
    "Engine",
    "Ledger",
    "LookedUp",
    "Resolver",
    "Settlement",
    "StepCaller",
    "StepLookup",
    "StepView",
    "TransactionEvent",
    "TransactionView",
    "fold",
]

_logger = logging.getLogger("rmcp_actors.transactions")

# Errors that say the call can never succeed as written: repeating a compensation or a forward
# step after one of them only burns its deadline.
_PERMANENT = (
    UnknownServerError,
    UnknownToolError,
    RMCPArgumentError,
    RMCPConfigError,
    RMCPIdempotencyConflictError,
)
# Pauses between the re-sends of a compensation or of a step past the pivot (full jitter).
_RESEND_BASE_S = 0.1
_RESEND_MAX_S = 5.0


class StepCaller(Protocol):
    """Sends one step or compensation through the runtime's ordinary call path."""

    async def __call__(
        self,
        server: str,
        tool: str,
        arguments: dict[str, Any] | None,
        *,
        idempotency_key: str,
        transaction_id: str,
        step: int,
        timeout: float | None,
    ) -> CallResult: ...


@attrs.frozen
class LookedUp:
    """What a server said of a step whose outcome was unknown: it ran (with ``result``), or it
    did not and never will (its key is settled as never run)."""

    ran: bool
    result: CallResult | None = None


class StepLookup(Protocol):
    """Asks a step's server what became of its key without running the tool (an RMCP
    lookup); None when nothing was learned (a plain server, or it cannot tell)."""

    async def __call__(
        self,
        server: str,
        tool: str,
        arguments: dict[str, Any] | None,
        *,
        idempotency_key: str,
        transaction_id: str,
        step: int,
        intended_at: float,
    ) -> LookedUp | None: ...


#: A compensation computed from the step's result (``None``: nothing to undo).
CompensationFunction = Callable[[CallResult], Compensation | None]


@attrs.frozen
class TransactionEvent:
    """One step of a transaction's progress, as given to ``on_event``.

    There is one event per journal record, after the record is durable.

    Attributes:
        transaction_id: The transaction's id.
        name: The name it was started with.
        state: Its state once this record was written.
        step: The step the record is about, or ``None`` for the transaction as a whole.
        what: The record's kind: ``"begun"``, ``"state"``, ``"step"`` (a step is about to be
            sent), ``"step_done"``, ``"resolved"``, ``"compensation"`` (a compensation is
            about to be sent), ``"compensation_done"``.
        at: When (Unix time, seconds).
        detail: The outcome or error, when the record has one.
    """

    transaction_id: str
    name: str
    state: TransactionState
    step: int | None
    what: str
    at: float
    detail: str | None = None


EventCallback = Callable[[TransactionEvent], None]
#: ``resolve(step, ran)`` of a transaction running in this process.
Resolver = Callable[[int, bool], Awaitable[TransactionState]]


@attrs.define(eq=False)
class Ledger:
    """A transaction's records as this process wrote or read them, and its current state."""

    transaction_id: str
    name: str
    records: list[JournalRecord]
    state: TransactionState = TransactionState.INITIATED
    on_event: EventCallback | None = None
    #: The compensation functions of its steps (only a live block has them), by step index.
    compensators: dict[int, CompensationFunction] = attrs.Factory(dict[int, CompensationFunction])

    @classmethod
    def of(cls, records: list[JournalRecord], on_event: EventCallback | None = None) -> Ledger:
        """The ledger of records read back from a journal."""
        view = fold(records)
        return cls(view.begun.transaction_id, view.begun.name, list(records), view.state, on_event)


@attrs.define(eq=False)
class StepView:
    """What the records say about one step."""

    intent: StepIntent
    done: StepDone | None = None
    resolved: bool | None = None
    compensation_done: CompensationDone | None = None
    #: Runs of its compensation the tool reported failed (each later run takes a new key).
    failed_compensations: int = 0

    @property
    def index(self) -> int:
        """The step's index."""
        return self.intent.step

    @property
    def ran(self) -> bool | None:
        """Whether the step ran: ``None`` while that is unknown."""
        if self.resolved is not None:
            return self.resolved
        if self.done is None or self.done.outcome == "unknown":
            return None
        return self.done.ran if self.done.ran is not None else True

    @property
    def compensation(self) -> CompensationSpec | None:
        """Its compensation: computed from the result, else the one given up front."""
        if self.done is not None and self.done.compensation is not None:
            return self.done.compensation
        return self.intent.compensation

    @property
    def in_doubt(self) -> bool:
        """Its outcome is unknown and it may not be compensated blindly."""
        return self.ran is None and not self.intent.compensate_unknown

    @property
    def to_compensate(self) -> bool:
        """Whether aborting the transaction must undo this step (if not done already)."""
        if self.compensation_done is not None and self.compensation_done.succeeded:
            return False
        ran = self.ran
        if ran is False:
            return False
        if ran is None:
            return self.intent.compensate_unknown and self.compensation is not None
        if self.resolved is None and self.done is not None and self.done.outcome == "failed":
            # The tool ran and reported that it failed: it did not do its work.
            return False
        return self.compensation is not None or self.intent.compensation_from_result

    @property
    def pivot_passed(self) -> bool:
        """A pivot step that ran to success: the point of no return is behind."""
        if not self.intent.pivot:
            return False
        if self.resolved is not None:
            return self.resolved
        return self.done is not None and self.done.outcome == "succeeded"


@attrs.define(eq=False)
class TransactionView:
    """A transaction as its records describe it: its begin, state and steps."""

    begun: TransactionBegun
    state: TransactionState
    steps: list[StepView]

    @property
    def pivot_started(self) -> bool:
        return any(view.intent.pivot for view in self.steps)

    @property
    def pivot_passed(self) -> bool:
        return any(view.pivot_passed for view in self.steps)


def fold(records: Iterable[JournalRecord]) -> TransactionView:
    """Read a transaction's records into its state and steps.

    Raises:
        ValueError: The records do not start with a ``TransactionBegun``.
    """
    begun: TransactionBegun | None = None
    state = TransactionState.INITIATED
    steps: dict[int, StepView] = {}
    for record in records:
        if isinstance(record, TransactionBegun):
            begun = record
        elif isinstance(record, StateChanged):
            state = TransactionState(record.state)
        elif isinstance(record, StepIntent):
            steps[record.step] = StepView(record)
        elif record.step in steps:
            view = steps[record.step]
            if isinstance(record, StepDone):
                view.done = record
            elif isinstance(record, StepResolved):
                view.resolved = record.ran
            elif isinstance(record, CompensationDone):
                view.compensation_done = record
                view.failed_compensations += record.tool_failed
    if begun is None:
        raise ValueError("a transaction's records start with its TransactionBegun")
    return TransactionView(begun, state, [steps[index] for index in sorted(steps)])


@attrs.frozen
class Settlement:
    """How settling a transaction ended."""

    state: TransactionState
    failed_steps: tuple[int, ...] = ()
    in_doubt_step: int | None = None
    #: A step past the pivot that could not be finished (the transaction stays in progress).
    stuck_step: int | None = None
    error: str | None = None


def compensation_spec(compensation: Compensation) -> CompensationSpec:
    """A compensation as the journal keeps it."""
    arguments = dict(compensation.arguments) if compensation.arguments is not None else None
    return CompensationSpec(server=compensation.server, tool=compensation.tool, arguments=arguments)


def result_json(result: CallResult) -> msgspec.Raw:
    """A step's result as the journal keeps it (for history and for a replay after recovery)."""
    content = [block.model_dump(mode="json", by_alias=True, exclude_none=True) for block in result.content]
    return msgspec.Raw(
        msgspec.json.encode(
            {"content": content, "structured_content": result.structured_content, "is_error": result.is_error}
        )
    )


@attrs.define(eq=False)
class Engine:
    """Writes transactions' records and settles transactions: one per runtime.

    Attributes:
        journal: Where every record goes before it is acted on.
        call: The runtime's call path for steps and compensations.
        compensation_timeout_s: How long one compensation (or one re-sent step past the pivot,
            in recovery) may keep trying.
    """

    journal: Journal
    call: StepCaller
    compensation_timeout_s: float
    #: Whether the runtime has a server of that name (recovery waits for missing ones).
    knows: Callable[[str], bool] = lambda server: True
    rng: random.Random = attrs.Factory(random.Random)
    #: Transactions whose block runs in this process, with how to resolve their steps:
    #: ``recover()`` leaves them to their owners.
    live: dict[str, Resolver] = attrs.Factory(dict[str, "Resolver"])
    #: Held while a transaction no block runs is settled (``recover()``, ``resolve`` after its
    #: block): two of them at once would send its compensations twice.
    settling: anyio.Lock = attrs.Factory(anyio.Lock)
    #: Asks RMCP servers what became of a step whose outcome is unknown (None: nobody asks).
    look_up: StepLookup | None = None

    @staticmethod
    def now() -> float:
        """Journal time: Unix seconds (the records outlive this event loop)."""
        return time.time()

    async def write(self, ledger: Ledger, record: JournalRecord) -> None:
        """Journal ``record`` (durable on return), then note it and tell the subscriber."""
        await self.journal.append(record)
        ledger.records.append(record)
        if isinstance(record, StateChanged):
            ledger.state = TransactionState(record.state)
        if ledger.on_event is not None:
            _emit(ledger, record)

    async def change_state(self, ledger: Ledger, state: TransactionState, reason: str | None = None) -> None:
        """Journal a new state (before acting on it)."""
        if ledger.state is state:
            return
        await self.write(
            ledger,
            StateChanged(
                transaction_id=ledger.transaction_id, at=self.now(), state=state.value, reason=reason
            ),
        )

    async def settle(self, ledger: Ledger, *, parallel: bool, continue_on_failure: bool) -> Settlement:
        """Bring an aborted (or interrupted) transaction to rest, from its records alone.

        Past a started pivot, the steps that have no outcome (and those an operator said did
        not run) are sent again with their own keys, then the transaction commits; a pivot
        that turns out not to have succeeded sends it back to compensation. Otherwise every
        step that ran, or may have run, is compensated, in reverse order (or all at once).
        A step in doubt stops either path: the transaction waits in ``in_doubt``.
        """
        view = fold(ledger.records)
        if view.state is not TransactionState.COMPENSATING and view.pivot_started:
            forward = await self._forward(ledger, view)
            if forward is not None:
                return forward
            view = fold(ledger.records)
        if await self.look_up_unknown(ledger, view):
            view = fold(ledger.records)
        doubtful = [step for step in view.steps if step.in_doubt]
        if doubtful:
            await self.change_state(
                ledger, TransactionState.IN_DOUBT, f"step {doubtful[0].index} is in doubt"
            )
            return Settlement(TransactionState.IN_DOUBT, in_doubt_step=doubtful[0].index)
        await self.change_state(ledger, TransactionState.COMPENSATING)
        plan = [step for step in reversed(view.steps) if step.to_compensate]
        failed = await self._compensate(
            ledger, plan, parallel=parallel, continue_on_failure=continue_on_failure
        )
        if failed:
            await self.change_state(
                ledger,
                TransactionState.COMPENSATION_FAILED,
                f"the compensation of step(s) {', '.join(map(str, failed))} failed",
            )
            return Settlement(TransactionState.COMPENSATION_FAILED, failed_steps=failed)
        await self.change_state(ledger, TransactionState.COMPENSATED)
        return Settlement(TransactionState.COMPENSATED)

    async def look_up_unknown(self, ledger: Ledger, view: TransactionView | None = None) -> bool:
        """Ask the servers of the steps whose outcome is unknown (no answer, or a lost one) what
        became of them, and journal what they say (``StepDone`` with ``looked_up``).

        Only for undoing a transaction, never past its pivot: a lookup settles a key that never
        ran as never to run, so the step could not be sent forward with its key afterwards.
        A step that ran gets its result, and a compensation function of the live block is
        computed from it; one that did not run is not compensated. Returns whether anything
        was learned.
        """
        if self.look_up is None:
            return False
        learned = False
        for step in (view or fold(ledger.records)).steps:
            if step.ran is not None or (
                step.compensation_done is not None and step.compensation_done.succeeded
            ):
                continue
            intent = step.intent
            found = await self.look_up(
                intent.server,
                intent.tool,
                intent.arguments,
                idempotency_key=intent.idempotency_key,
                transaction_id=intent.transaction_id,
                step=intent.step,
                intended_at=intent.at,
            )
            if found is None:
                continue
            attempts = step.done.attempts if step.done is not None else 0
            if not found.ran or found.result is None:
                done = self._step_done(
                    intent,
                    "failed",
                    False,
                    attempts,
                    "a lookup found that it never ran; its key is settled as never to run",
                )
                done = msgspec.structs.replace(done, looked_up=True)
            else:
                result = found.result
                done = StepDone(
                    transaction_id=intent.transaction_id,
                    step=intent.step,
                    at=self.now(),
                    outcome="failed" if result.is_error else "succeeded",
                    ran=True,
                    attempts=attempts,
                    result=result_json(result),
                    compensation=_computed(ledger, intent, result),
                    looked_up=True,
                )
            await self.write(ledger, done)
            learned = True
        return learned

    async def _forward(self, ledger: Ledger, view: TransactionView) -> Settlement | None:
        """Finish the steps past a started pivot; ``None`` when the pivot did not succeed."""
        timeout_s = self.compensation_timeout_s
        for step in view.steps:
            pending = step.done is None or (step.resolved is False and step.done.outcome == "unknown")
            if step.resolved is True or not pending:
                continue
            if step.intent.pivot and step.resolved is False and not view.pivot_passed:
                # An operator says the pivot did not run: the point of no return was not
                # reached, and the block that sent it has ended: compensate, do not send it now.
                return None
            done, _, last = await self.resend(
                ledger, step.intent, call_timeout=None, give_up_after_s=timeout_s
            )
            if done is not None and done.outcome == "unknown":
                await self.change_state(ledger, TransactionState.IN_DOUBT, f"step {step.index} is in doubt")
                return Settlement(TransactionState.IN_DOUBT, in_doubt_step=step.index)
            if step.intent.pivot and (done is None or done.outcome != "succeeded") and not view.pivot_passed:
                # The pivot itself did not go through: compensate instead.
                return None
            if done is None or done.ran is False:
                error = done.error if done is not None else f"gave up after {timeout_s:g} s: {last}"
                return Settlement(ledger.state, stuck_step=step.index, error=error)
        if not fold(ledger.records).pivot_passed:
            return None
        await self.change_state(ledger, TransactionState.COMMITTED, "finished forward past the pivot")
        return Settlement(TransactionState.COMMITTED)

    async def resend(
        self, ledger: Ledger, intent: StepIntent, *, call_timeout: float | None, give_up_after_s: float | None
    ) -> tuple[StepDone | None, CallResult | None, RMCPError | None]:
        """Send a step with its own key until it has an outcome, and journal the outcome.

        Only a failure that says the step did not run is followed by another send, after a
        pause: an unknown outcome is final (against an RMCP server the call path already
        retried it under its key), and so is a failure that can never pass (unknown tool, bad
        arguments). A send is never cut short from here (that would make its outcome unknown):
        ``give_up_after_s`` only stops the sends that would start after it.

        Returns:
            The journaled outcome (``None`` when it gave up: nothing new is known, nothing is
            journaled), the result if it ran, and the last error.
        """
        give_up_at = anyio.current_time() + (give_up_after_s if give_up_after_s is not None else math.inf)
        attempts = 0
        failures = 0
        while True:
            try:
                result = await self.call(
                    intent.server,
                    intent.tool,
                    intent.arguments,
                    idempotency_key=intent.idempotency_key,
                    transaction_id=intent.transaction_id,
                    step=intent.step,
                    timeout=call_timeout,
                )
            except RMCPError as failure:
                attempts += attempts_of(failure)
                error = f"{type(failure).__name__}: {failure.message}"
                if failure.may_have_executed:
                    done = self._step_done(intent, "unknown", None, attempts, error)
                elif isinstance(failure, _PERMANENT):
                    done = self._step_done(intent, "failed", False, attempts, error)
                else:
                    failures += 1
                    pause = self._pause(failures)
                    if anyio.current_time() + pause >= give_up_at:
                        return None, None, failure
                    await anyio.sleep(pause)
                    continue
                await self.write(ledger, done)
                return done, None, failure
            done = StepDone(
                transaction_id=intent.transaction_id,
                step=intent.step,
                at=self.now(),
                outcome="failed" if result.is_error else "succeeded",
                ran=True,
                attempts=attempts + result.attempts,
                result=result_json(result),
            )
            await self.write(ledger, done)
            return done, result, None

    def _step_done(
        self, intent: StepIntent, outcome: Any, ran: bool | None, attempts: int, error: str | None
    ) -> StepDone:
        return StepDone(
            transaction_id=intent.transaction_id,
            step=intent.step,
            at=self.now(),
            outcome=outcome,
            ran=ran,
            attempts=attempts,
            error=error,
        )

    async def _compensate(
        self, ledger: Ledger, plan: list[StepView], *, parallel: bool, continue_on_failure: bool
    ) -> tuple[int, ...]:
        failed: list[int] = []
        if parallel:
            try:
                async with anyio.create_task_group() as group:
                    for step in plan:

                        async def compensate(step: StepView = step) -> None:
                            if not await self.compensate_one(ledger, step):
                                failed.append(step.index)

                        group.start_soon(compensate)
            except BaseExceptionGroup as errors:
                # A journal failure (the same for every compensation) is what the owner is
                # told, not the task group's wrapper; anything else stays a crash.
                first = errors.exceptions[0]
                if all(isinstance(error, RMCPError) for error in errors.exceptions):
                    raise first  # noqa: B904 (its own cause stays)
                raise
            return tuple(sorted(failed, reverse=True))
        for step in plan:
            if not await self.compensate_one(ledger, step):
                failed.append(step.index)
                if not continue_on_failure:
                    break
        return tuple(failed)

    async def compensate_one(self, ledger: Ledger, step: StepView) -> bool:
        """Run one step's compensation until it succeeds or ``compensation_timeout_s`` passes.

        Each try goes through the call path (retried there under the tool's policy); a try
        that failed for a reason that may pass (the server unreachable, a refusal, a timeout)
        is made again with the same derived key after a pause. A compensation the tool itself
        reports as failed, or that can never succeed (unknown tool, bad arguments), is not.

        Returns:
            Whether it succeeded (its ``CompensationDone`` is journaled either way).
        """
        transaction_id = ledger.transaction_id
        spec = step.compensation
        if spec is None:
            await self.write(
                ledger,
                CompensationDone(
                    transaction_id=transaction_id,
                    step=step.index,
                    at=self.now(),
                    succeeded=False,
                    error=(
                        "its compensation is computed from its result, and its result is unknown: "
                        "undo it by hand"
                    ),
                ),
            )
            return False
        key = compensation_key(transaction_id, step.index, step.failed_compensations)
        await self.write(
            ledger,
            CompensationStarted(
                transaction_id=transaction_id, step=step.index, at=self.now(), idempotency_key=key
            ),
        )
        attempts = 0
        error: str | None = None
        succeeded = tool_failed = False
        with anyio.move_on_after(self.compensation_timeout_s) as scope:
            failures = 0
            while True:
                try:
                    result = await self.call(
                        spec.server,
                        spec.tool,
                        spec.arguments,
                        idempotency_key=key,
                        transaction_id=transaction_id,
                        step=step.index,
                        timeout=None,
                    )
                except RMCPError as failure:
                    attempts += attempts_of(failure)
                    error = f"{type(failure).__name__}: {failure.message}"
                    if isinstance(failure, _PERMANENT):
                        break
                    failures += 1
                    await anyio.sleep(self._pause(failures))
                    continue
                attempts += result.attempts
                if result.is_error:
                    error = f"the tool reported an error: {_text_of(result)}"
                    tool_failed = True
                else:
                    succeeded = True
                break
        if scope.cancelled_caught:
            limit = self.compensation_timeout_s
            error = f"did not succeed within compensation_timeout_s={limit:g} s; last: {error}"
        await self.write(
            ledger,
            CompensationDone(
                transaction_id=transaction_id,
                step=step.index,
                at=self.now(),
                succeeded=succeeded,
                attempts=attempts,
                error=error,
                tool_failed=tool_failed,
            ),
        )
        return succeeded

    def _pause(self, failures: int) -> float:
        cap = min(_RESEND_MAX_S, _RESEND_BASE_S * 2.0 ** min(failures - 1, 62))
        return self.rng.uniform(cap / 2, cap)


def _computed(ledger: Ledger, intent: StepIntent, result: CallResult) -> CompensationSpec | None:
    """The compensation a live block's function computes from a looked-up result, if any."""
    function = ledger.compensators.get(intent.step)
    if function is None or result.is_error:
        return None
    try:
        computed = function(result)
    except Exception:
        # The user's function; the step then reads as not undone ("undo it by hand").
        _logger.exception(
            "the compensation function of step %d of transaction %s raised",
            intent.step,
            ledger.transaction_id,
        )
        return None
    return compensation_spec(computed) if computed is not None else None


def attempts_of(error: RMCPError) -> int:
    """The attempts a failed call made (1 when it failed before its first was recorded)."""
    return max((event.attempt for event in error.lifecycle), default=0) or 1


def _text_of(result: CallResult) -> str:
    texts = [getattr(block, "text", "") for block in result.content]
    return " ".join(text for text in texts if text)[:200] or "(no text)"


def _emit(ledger: Ledger, record: JournalRecord) -> None:
    step = None if isinstance(record, TransactionBegun | StateChanged) else record.step
    detail: str | None = None
    if isinstance(record, StateChanged):
        detail = record.reason
    elif isinstance(record, StepDone):
        detail = record.outcome if record.error is None else f"{record.outcome}: {record.error}"
    elif isinstance(record, CompensationDone):
        detail = "succeeded" if record.succeeded else f"failed: {record.error}"
    elif isinstance(record, StepResolved):
        detail = f"ran={record.ran}"
    event = TransactionEvent(
        transaction_id=ledger.transaction_id,
        name=ledger.name,
        state=ledger.state,
        step=step,
        what=_TAGS[type(record)],
        at=record.at,
        detail=detail,
    )
    assert ledger.on_event is not None
    try:
        ledger.on_event(event)
    except Exception:
        # The user's callback: its bug must not stop the transaction half way.
        _logger.exception(
            "on_event callback raised at %s of transaction %s", event.what, ledger.transaction_id
        )


_TAGS: dict[type[Any], str] = {
    TransactionBegun: "begun",
    StateChanged: "state",
    StepIntent: "step",
    StepDone: "step_done",
    StepResolved: "resolved",
    CompensationStarted: "compensation",
    CompensationDone: "compensation_done",
}
