# pyright: strict
"""Transaction actors: sagas of tool calls, compensated in reverse when they abort.

::

    async with sup.transaction("book") as tx:
        seat = await tx.call("seats", "reserve", {"flight": "LH1"},
                             compensate=lambda r: Compensation("seats", "release", r.structured_content))
        await tx.call("cards", "charge", {"eur": 90}, compensate=Compensation("cards", "refund", {"eur": 90}))
        await tx.call("mail", "send_ticket", {...}, pivot=True)

A step runs in the caller's task through the ordinary call path (no inbox hop per step); its
intent is journaled before it is sent and its outcome before it is returned. Ending a
transaction that did not commit (compensating it, or finishing it forward past its pivot) runs
in the transaction's own actor, a temporary child of the ``transactions`` supervisor: a crash
there fails that transaction only, and a cancellation of the caller does not cut it short (the
caller waits for it, shielded; every compensation has its own deadline).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextlib import suppress
from types import TracebackType
from typing import Any, NoReturn, Protocol, TypeVar, cast, final

import anyio
import attrs
import msgspec

from .._exceptions import is_fatal
from ..errors import (
    RMCPArgumentError,
    RMCPCompensationError,
    RMCPError,
    RMCPTimeoutError,
    RMCPTransactionError,
    RMCPTransactionInDoubtError,
)
from ..result import CallResult
from ..runtime import Actor, ChildSpec, ReplySlot, Restart, Supervisor
from ._engine import (
    CompensationFunction,
    Engine,
    EventCallback,
    Ledger,
    Settlement,
    attempts_of,
    compensation_spec,
    fold,
    result_json,
)
from ._keys import new_transaction_id, step_key
from ._model import Compensation, TransactionState
from .journal import (
    CompensationStarted,
    JournalRecord,
    StateChanged,
    StepDone,
    StepIntent,
    StepResolved,
    TransactionBegun,
)

__all__ = [
    "CompensationFunction",
    "LockManagerHook",
    "StepHistory",
    "Transaction",
    "TransactionHistory",
]

_logger = logging.getLogger("rmcp_actors.transactions")

# A transaction actor stops at once: it is idle whenever its owner stops it.
_ACTOR_SHUTDOWN_S = 1.0

_E = TypeVar("_E", bound=RMCPTransactionError)


class LockManagerHook(Protocol):
    """What the lock manager gives transactions (``tx.acquire`` and ``resources=``)."""

    async def acquire(self, transaction: Transaction, resource: str, *, shared: bool) -> None:
        """Hold ``resource`` for ``transaction`` (waiting within its deadline)."""
        ...

    async def release_all(self, transaction: Transaction) -> None:
        """Release everything ``transaction`` holds (it has ended)."""
        ...


@attrs.frozen(kw_only=True)
class StepHistory:
    """One step of a transaction, from its journal records.

    Attributes:
        step: Its index.
        server: The server it was sent to.
        tool: The tool.
        arguments: Its arguments.
        idempotency_key: The key every send of it carried.
        pivot: Whether it was the point of no return.
        sent_at: When its intent was journaled (Unix time).
        ended_at: When its outcome was journaled, if it was.
        outcome: ``"succeeded"``, ``"failed"``, ``"unknown"``, or ``None`` while in flight.
        ran: Whether it ran (``None`` when unknown); an operator's resolution wins.
        attempts: Attempts the call path made.
        error: Why it failed, when it did.
        result: The result as journaled (content, structured_content, is_error), if any.
        resolved: What an operator said (``ran``), if asked.
        compensation: How it is undone, when it is.
        compensation_outcome: ``"succeeded"``, ``"failed"``, ``"started"`` (no outcome yet),
            or ``None`` when it was not compensated.
        compensation_attempts: Attempts its compensation made.
        compensation_error: Why its compensation failed.
        looked_up: Its outcome was learned by asking its server (an RMCP lookup) after its
            own answer was lost.
    """

    step: int
    server: str
    tool: str
    arguments: Mapping[str, Any] | None
    idempotency_key: str
    pivot: bool
    sent_at: float
    ended_at: float | None = None
    outcome: str | None = None
    ran: bool | None = None
    attempts: int = 0
    error: str | None = None
    result: Any = None
    resolved: bool | None = None
    compensation: Compensation | None = None
    compensation_outcome: str | None = None
    compensation_attempts: int = 0
    compensation_error: str | None = None
    looked_up: bool = False


@attrs.frozen(kw_only=True)
class TransactionHistory:
    """What a transaction did, from its journal records (``tx.history()``).

    Attributes:
        transaction_id: Its id.
        name: The name it was started with.
        state: Where it stands.
        started_at: When it began (Unix time).
        updated_at: When its journal last changed.
        states: Each state it entered: ``(state, at, reason)``.
        steps: Its steps, in order.
    """

    transaction_id: str
    name: str
    state: TransactionState
    started_at: float
    updated_at: float
    states: tuple[tuple[TransactionState, float, str | None], ...]
    steps: tuple[StepHistory, ...]


def history_of(records: list[JournalRecord]) -> TransactionHistory:
    """The history of a transaction from its records."""
    view = fold(records)
    steps: dict[int, dict[str, Any]] = {}
    states: list[tuple[TransactionState, float, str | None]] = [
        (TransactionState.INITIATED, view.begun.at, None)
    ]
    for record in records:
        if isinstance(record, StateChanged):
            states.append((TransactionState(record.state), record.at, record.reason))
        elif isinstance(record, StepIntent):
            spec = record.compensation
            steps[record.step] = {
                "step": record.step,
                "server": record.server,
                "tool": record.tool,
                "arguments": record.arguments,
                "idempotency_key": record.idempotency_key,
                "pivot": record.pivot,
                "sent_at": record.at,
                "compensation": None
                if spec is None
                else Compensation(spec.server, spec.tool, spec.arguments),
            }
        elif isinstance(record, TransactionBegun) or record.step not in steps:
            continue
        elif isinstance(record, StepDone):
            entry = steps[record.step]
            entry.update(
                ended_at=record.at,
                outcome=record.outcome,
                attempts=record.attempts,
                error=record.error,
                result=None if record.result is None else msgspec.json.decode(record.result),
                looked_up=record.looked_up,
            )
            if record.compensation is not None:
                spec = record.compensation
                entry["compensation"] = Compensation(spec.server, spec.tool, spec.arguments)
        elif isinstance(record, StepResolved):
            steps[record.step]["resolved"] = record.ran
        elif isinstance(record, CompensationStarted):
            steps[record.step]["compensation_outcome"] = "started"
        else:
            steps[record.step].update(
                compensation_outcome="succeeded" if record.succeeded else "failed",
                compensation_attempts=record.attempts,
                compensation_error=record.error,
            )
    ran = {step.index: step.ran for step in view.steps}
    return TransactionHistory(
        transaction_id=view.begun.transaction_id,
        name=view.begun.name,
        state=view.state,
        started_at=view.begun.at,
        updated_at=records[-1].at,
        states=tuple(states),
        steps=tuple(StepHistory(**entry, ran=ran[index]) for index, entry in sorted(steps.items())),
    )


@attrs.frozen
class _Settle:
    work: Callable[[], Awaitable[Settlement]]
    reply: ReplySlot[Settlement]


@attrs.define(eq=False)
class _TransactionActor(Actor[_Settle]):
    """Runs the end of a transaction that did not commit, in a task of its own."""

    async def handle(self, message: _Settle) -> None:
        try:
            settlement = await message.work()
        except RMCPError as error:
            # A journal or call failure is the transaction's outcome, told to its owner; a bug
            # (any other exception) crashes this actor only, and the owner's ask fails.
            message.reply.fail(error)
        else:
            message.reply.set(settlement)


@final
class Transaction:
    """A running transaction: ``async with sup.transaction(name) as tx:``.

    Not constructed directly. Its steps are :meth:`call`; leaving the block commits it, an
    exception, a cancellation or its timeout compensates it (see ``RMCPSupervisor.transaction``).
    """

    def __init__(
        self,
        engine: Engine,
        supervisor: Supervisor,
        name: str,
        *,
        timeout: float | None = None,
        resources: Iterable[str | tuple[str, bool]] = (),
        compensate_parallel: bool = False,
        continue_on_compensation_failure: bool = False,
        on_event: EventCallback | None = None,
        locks: LockManagerHook | None = None,
    ) -> None:
        if timeout is not None and not 0 < timeout < math.inf:
            raise RMCPArgumentError(f"timeout must be a positive, finite number of seconds, got {timeout!r}")
        self._engine = engine
        self._supervisor = supervisor
        self._ledger = Ledger(new_transaction_id(), name, [], on_event=on_event)
        self._timeout = timeout
        self._declared = tuple(
            (item, False) if isinstance(item, str) else (item[0], bool(item[1])) for item in resources
        )
        self._parallel = compensate_parallel
        self._continue = continue_on_compensation_failure
        self._locks = locks
        self._next_step = 0
        self._pivot_passed = False
        self._entered = False
        self._active = False
        # Set once its locks are released: a lock taken after that would never be.
        self._ended = False
        self._resources: list[tuple[str, bool]] = []
        self._scope = anyio.CancelScope()
        #: When its block was entered, on the event loop's clock (the youngest transaction
        #: has the largest).
        self.started_at = math.nan
        #: Its deadline on the event loop's clock (``inf`` without a timeout).
        self.deadline = math.inf
        self._actor = _TransactionActor(f"transaction:{name}:{self._ledger.transaction_id}", inbox_size=1)
        self._child = ChildSpec(
            self._actor.name, self._actor.run, restart=Restart.TEMPORARY, shutdown_timeout_s=_ACTOR_SHUTDOWN_S
        )

    async def __aenter__(self) -> Transaction:
        if self._entered:
            raise RuntimeError("a Transaction is entered once; start another with sup.transaction()")
        self._entered = True
        self.started_at = anyio.current_time()
        if self._timeout is not None:
            self.deadline = self.started_at + self._timeout
        self._scope = anyio.CancelScope(deadline=self.deadline)
        self._scope.__enter__()
        try:
            await self._start()
        except BaseException as error:
            await self.__aexit__(type(error), error, error.__traceback__)
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        try:
            try:
                # It answers True without an exception too: only a swallowed one (the
                # transaction's own deadline) counts, and it is reported as a timeout below.
                timed_out = bool(self._scope.__exit__(exc_type, exc, traceback)) and exc is not None
            except BaseException as remaining:
                # The scope took its own Cancelled out of a group: the rest is the block's error.
                self._active = False
                await self._abort(remaining)
                raise
            self._active = False
            if timed_out:
                await self._end_on_timeout()
            elif exc is None:
                await self._commit()
            else:
                await self._abort(exc)
        finally:
            await self._stop()

    @property
    def id(self) -> str:
        """Its id: the key of its journal records, and the root of its steps' keys."""
        return self._ledger.transaction_id

    @property
    def name(self) -> str:
        """The name it was started with."""
        return self._ledger.name

    @property
    def state(self) -> TransactionState:
        """Where it stands now."""
        return self._ledger.state

    @property
    def steps(self) -> int:
        """How many steps it has started."""
        return self._next_step

    @property
    def resources(self) -> tuple[tuple[str, bool], ...]:
        """The resources it asked for: ``(name, shared)``."""
        return tuple(self._resources)

    def history(self) -> TransactionHistory:
        """What it did so far: states, steps, outcomes, attempts, compensations."""
        return history_of(self._ledger.records)

    async def call(
        self,
        server: str,
        tool: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        compensate: Compensation | CompensationFunction | None = None,
        pivot: bool = False,
        compensate_unknown: bool = True,
        timeout: float | None = None,
    ) -> CallResult:
        """Run one step: a tool call whose key derives from (transaction id, step index).

        The step's intent is journaled before it is sent and its outcome before it is
        returned. Before the pivot a step is sent once, through the call path (retried there
        under its policy, with its own key); past a step marked ``pivot`` the transaction only
        moves forward, and a step that failed without running is sent again (same key) until it
        has an outcome (no new send starts after ``compensation_timeout_s``, nor past the
        transaction's deadline).

        Args:
            server: The server's name.
            tool: The tool.
            arguments: Its arguments (JSON values: they are journaled).
            compensate: How to undo the step if the transaction aborts: a ``Compensation``, or a
                function of the step's result returning one (or ``None``), evaluated when the
                step succeeds. A step the tool reports as failed (``isError``) is not undone.
            pivot: The point of no return: once it succeeded, an abort finishes the steps
                already started instead of compensating.
            compensate_unknown: When the step's outcome is unknown (answer lost from a plain
                server, or ``in_doubt`` from an RMCP server), it is never sent again; with
                ``True`` it is compensated like a completed step (the compensation must
                tolerate a step that did not happen), with ``False`` the transaction goes
                ``in_doubt``. A step with a function ``compensate`` always goes in doubt then:
                without a result there is nothing to compute the compensation from.
            timeout: Seconds for this step (default: the tool's ``timeout_s``).

        Returns:
            The result (``outcome`` SUCCEEDED, or FAILED when the tool reported an error).

        Raises:
            RMCPTransactionError: The transaction cannot take steps (it is not in progress, or
                its block has ended).
            RMCPTransactionInDoubtError: The outcome is unknown and the step may not be
                compensated blindly: the transaction is ``in_doubt`` (see :meth:`resolve`).
            RMCPError: What the call raised (the step is journaled as not run or unknown).
        """
        if not self._active or self._ledger.state is not TransactionState.IN_PROGRESS:
            raise self._error(
                RMCPTransactionError,
                f" is {self.state.value}{'' if self._active else ' and its block has ended'}: "
                "it takes no more steps",
                server=server,
                tool=tool,
            )
        index = self._next_step
        self._next_step += 1
        from_result = compensate is not None and not isinstance(compensate, Compensation)
        intent = StepIntent(
            transaction_id=self.id,
            step=index,
            at=self._engine.now(),
            server=server,
            tool=tool,
            arguments=dict(arguments) if arguments is not None else None,
            idempotency_key=step_key(self.id, index),
            pivot=pivot,
            compensate_unknown=compensate_unknown and not from_result,
            compensation=compensation_spec(compensate) if isinstance(compensate, Compensation) else None,
            compensation_from_result=from_result,
        )
        engine, ledger = self._engine, self._ledger
        if from_result:
            assert callable(compensate)
            # A lookup after a lost answer can still compute it (see Engine.look_up_unknown).
            ledger.compensators[index] = compensate
        await engine.write(ledger, intent)
        if self._pivot_passed:
            # A send cut short here leaves the step without an outcome: ending the transaction
            # sends it again with its key, as recovery would.
            return await self._forward_step(intent, timeout)
        try:
            result = await engine.call(
                server,
                tool,
                intent.arguments,
                idempotency_key=intent.idempotency_key,
                transaction_id=self.id,
                step=index,
                timeout=timeout,
            )
        except RMCPError as error:
            unknown = error.may_have_executed
            # Shielded (as below): an outcome this task knows must not be lost to a
            # cancellation, or the abort would treat a step known not to have run as unknown.
            with anyio.CancelScope(shield=True):
                await engine.write(
                    ledger,
                    StepDone(
                        transaction_id=self.id,
                        step=index,
                        at=engine.now(),
                        outcome="unknown" if unknown else "failed",
                        ran=None if unknown else False,
                        attempts=attempts_of(error),
                        error=f"{type(error).__name__}: {error.message}",
                    ),
                )
            if unknown and not intent.compensate_unknown:
                raise await self._in_doubt(index, error) from error
            raise
        except BaseException:
            # Cancelled (or worse) mid-step: it may have been sent. Recorded as unknown, so the
            # abort that follows compensates it (or leaves it in doubt) instead of forgetting it.
            # A step with no outcome journaled is unknown as well: a journal failure here is
            # logged, and the cancellation goes on unchanged.
            with anyio.CancelScope(shield=True):
                try:
                    await engine.write(
                        ledger,
                        StepDone(
                            transaction_id=self.id,
                            step=index,
                            at=engine.now(),
                            outcome="unknown",
                            error="cancelled while the step was in flight",
                        ),
                    )
                except RMCPError:
                    _logger.exception(
                        "transaction %r (%s): journaling step %d as unknown failed", self.name, self.id, index
                    )
            raise
        computed: Compensation | None = None
        failure: Exception | None = None
        if from_result and not result.is_error:
            assert callable(compensate)
            try:
                computed = compensate(result)
            except Exception as error:
                failure = error
        # Shielded: the step ran and its result is in hand; losing its outcome to a
        # cancellation would compensate it blindly, put it in doubt (a computed compensation),
        # or send it again past the pivot.
        with anyio.CancelScope(shield=True):
            await engine.write(
                ledger,
                StepDone(
                    transaction_id=self.id,
                    step=index,
                    at=engine.now(),
                    outcome="failed" if result.is_error else "succeeded",
                    ran=True,
                    attempts=result.attempts,
                    result=result_json(result),
                    compensation=compensation_spec(computed) if computed is not None else None,
                ),
            )
        if failure is not None:
            # The step ran; without its compensation an abort reports it as not undone.
            raise failure
        if pivot and not result.is_error:
            self._pivot_passed = True
        return result

    async def _forward_step(self, intent: StepIntent, timeout: float | None) -> CallResult:
        engine = self._engine
        done, result, error = await engine.resend(
            self._ledger, intent, call_timeout=timeout, give_up_after_s=engine.compensation_timeout_s
        )
        if result is not None:
            return result
        assert error is not None
        if done is not None and done.outcome == "unknown":
            raise await self._in_doubt(intent.step, error) from error
        raise error

    async def _in_doubt(self, step: int, cause: RMCPError) -> RMCPTransactionInDoubtError:
        await self._engine.change_state(self._ledger, TransactionState.IN_DOUBT, f"step {step} is in doubt")
        return self._error(
            RMCPTransactionInDoubtError,
            f": the outcome of step {step} is unknown ({cause.message}) and it may not be compensated "
            f"blindly; find out whether it ran, then call resolve({step}, ran=True|False)",
            state=TransactionState.IN_DOUBT,
            step=step,
            server=cause.server,
            tool=cause.tool,
            idempotency_key=cause.idempotency_key,
        )

    async def acquire(self, resource: str, *, shared: bool = False) -> None:
        """Hold ``resource`` until the transaction ends (exclusive unless ``shared``).

        Without a lock manager in the runtime the resource is only recorded.

        Raises:
            RMCPDeadlockError: Waiting would close a cycle of transactions waiting on each
                other, and this transaction is the youngest in it.
            RMCPTransactionError: Its block has not started or has ended.
        """
        if not self._entered or self._ended:
            raise self._error(
                RMCPTransactionError,
                f" {'has ended' if self._ended else 'has not started'}: it holds resources only "
                "inside its block (or declare them with resources=)",
            )
        self._resources.append((resource, shared))
        if self._locks is not None:
            await self._locks.acquire(self, resource, shared=shared)

    async def resolve(self, step: int, *, ran: bool) -> TransactionState:
        """Say whether a step in doubt ran, once someone looked it up.

        Inside the block, the transaction goes back to ``in_progress`` once no step is in
        doubt, and takes steps again. After the block ended in doubt, the transaction is
        finished: before its pivot it is compensated (a step that ran included), past its
        pivot a step that did not run is sent again, then it commits.

        Returns:
            Its state afterwards.

        Raises:
            RMCPArgumentError: ``step`` is not in doubt.
            RMCPCompensationError: A compensation failed (``compensation_failed``).
        """
        if self._active:
            await record_resolution(self._engine, self._ledger, step, ran)
            if fold(self._ledger.records).pivot_passed:
                # A pivot that did run is the point of no return, as if it had answered.
                self._pivot_passed = True
            if not any(view.in_doubt for view in fold(self._ledger.records).steps):
                await self._engine.change_state(
                    self._ledger, TransactionState.IN_PROGRESS, f"step {step} resolved"
                )
            return self.state
        engine, ledger = self._engine, self._ledger
        async with engine.settling:
            # The journal's records, not this object's: sup.resolve (or another process) may
            # have settled the transaction since its block ended. (While its block still ends,
            # it is live, and its own records are being written: they are the truth.)
            records = [] if self.id in engine.live else await engine.journal.read(self.id)
            if records:
                ledger.records[:] = records
                ledger.state = fold(records).state
            return await resolve_ledger(
                engine,
                ledger,
                step,
                ran,
                parallel=self._parallel,
                continue_on_failure=self._continue,
            )

    async def _resolve_live(self, step: int, ran: bool) -> TransactionState:
        return await self.resolve(step, ran=ran)

    async def _start(self) -> None:
        await self._supervisor.start_child(self._child)
        resources = self._declared
        begun = TransactionBegun(
            transaction_id=self.id,
            name=self.name,
            at=self._engine.now(),
            timeout_s=self._timeout,
            resources=resources,
            compensate_parallel=self._parallel,
            continue_on_compensation_failure=self._continue,
        )
        # Live before its first record is durable: recover() may read the record before this
        # task resumes, and must leave the transaction to its block.
        self._engine.live[self.id] = self._resolve_live
        await self._engine.write(self._ledger, begun)
        # In one order for every transaction (exclusive before shared of one name), so that
        # declared resources alone never deadlock.
        for resource, shared in sorted(resources):
            await self.acquire(resource, shared=shared)
        await self._engine.change_state(self._ledger, TransactionState.IN_PROGRESS)
        self._active = True

    async def _settle(self) -> Settlement:
        """Compensate (or finish forward) in the actor's task; the caller waits, shielded."""

        async def work() -> Settlement:
            return await self._engine.settle(
                self._ledger,
                parallel=self._parallel,
                continue_on_failure=self._continue,
            )

        def message(reply: ReplySlot[Settlement]) -> _Settle:
            return _Settle(work, reply)

        settlement: Settlement | None = None
        with anyio.CancelScope(shield=True):
            settlement = await self._actor.ask(message)
        assert settlement is not None
        return settlement

    async def _stop(self) -> None:
        supervisor = self._supervisor
        self._ended = True
        with anyio.CancelScope(shield=True):
            self._engine.live.pop(self.id, None)
            if self._locks is not None:
                await self._locks.release_all(self)
            with suppress(KeyError):  # it crashed (and, being temporary, was removed)
                await supervisor.terminate_child(self._child.name, spec=self._child)

    def _error(
        self, kind: type[_E], message: str, *, state: TransactionState | None = None, **context: Any
    ) -> _E:
        """A ``kind`` error about this transaction: ``message`` follows its name and id (it starts
        with its own separator), its id, name and ``state`` (by default its current one) are the
        error's attributes."""
        return kind(
            f"transaction {self.name!r} ({self.id}){message}",
            transaction_id=self.id,
            name=self.name,
            state=(self.state if state is None else state).value,
            **context,
        )

    def _failure(self, settlement: Settlement, what: str) -> RMCPTransactionError | None:
        """The error that reports a settlement that did not end as planned, or ``None``."""
        if settlement.state is TransactionState.COMPENSATION_FAILED:
            failed = ", ".join(map(str, settlement.failed_steps))
            return self._error(
                RMCPCompensationError,
                f" {what}, and the compensation of step(s) {failed} failed: the world may be half "
                "changed; history() says which steps ran and why each compensation failed",
                state=settlement.state,
                failed_steps=settlement.failed_steps,
            )
        if settlement.state is TransactionState.IN_DOUBT:
            step = settlement.in_doubt_step if settlement.in_doubt_step is not None else -1
            return self._error(
                RMCPTransactionInDoubtError,
                f" {what}, and step {step}'s outcome is unknown: "
                f"find out whether it ran, then call resolve({step}, ran=True|False)",
                state=settlement.state,
                step=step,
            )
        if settlement.stuck_step is not None:
            return self._error(
                RMCPTransactionError,
                f" {what}; it is past its pivot and step {settlement.stuck_step} could not be finished "
                f"({settlement.error}); run sup.recover() once the cause is fixed",
                state=settlement.state,
            )
        return None

    async def _commit(self) -> None:
        if self.state is TransactionState.IN_DOUBT:
            step = next(view.index for view in fold(self._ledger.records).steps if view.in_doubt)
            raise self._error(
                RMCPTransactionInDoubtError,
                f" ended its block with step {step} in doubt: find out whether it ran, then call "
                f"resolve({step}, ran=True|False)",
                step=step,
            )
        # Shielded: the block ended normally, so the transaction is decided; a cancellation
        # while this is journaled would leave it in progress with nobody to end it.
        with anyio.CancelScope(shield=True):
            await self._engine.change_state(self._ledger, TransactionState.COMMITTED)

    async def _abort(self, error: BaseException) -> None:
        """Settle after the block raised; the caller re-raises ``error`` unless this raises."""
        if is_fatal(error):
            # The process is going down: the journal tells recover() the rest.
            return
        cancelled = _is_cancellation(error)
        if self.state is TransactionState.INITIATED:
            if self._ledger.records:
                with anyio.CancelScope(shield=True):
                    try:
                        await self._engine.change_state(
                            self._ledger, TransactionState.COMPENSATED, "aborted before its first step"
                        )
                    except RMCPError:
                        if not cancelled:
                            raise
                        # A cancellation propagates unchanged; recover() ends it (no steps).
                        _logger.exception(
                            "transaction %r (%s): journaling its abort failed", self.name, self.id
                        )
            return
        if self.state is not TransactionState.IN_DOUBT or await self._doubt_lifted():
            try:
                settlement = await self._settle()
            except RMCPError:
                if not cancelled:
                    raise
                # A cancellation propagates unchanged whatever ending the transaction did.
                _logger.exception(
                    "transaction %r (%s): compensation after a cancellation failed", self.name, self.id
                )
            else:
                failure = self._failure(settlement, f"aborted on {type(error).__name__}")
                if failure is not None and not cancelled:
                    raise failure from error
        error.add_note(f"transaction {self.name!r} ({self.id}) ended {self.state.value}")

    async def _doubt_lifted(self) -> bool:
        """Ask the servers of the steps in doubt what became of them (RMCP lookups, shielded):
        whether no step is in doubt any more, so the transaction can be settled."""
        ledger = self._ledger
        if fold(ledger.records).pivot_started:
            # Past a pivot steps are finished forward with their keys, which a lookup would
            # settle as never to run: resolve() decides there.
            return False
        with anyio.CancelScope(shield=True):
            try:
                await self._engine.look_up_unknown(ledger)
            except RMCPError:
                _logger.exception("transaction %r (%s): looking its steps up failed", self.name, self.id)
                return False
        return not any(view.in_doubt for view in fold(ledger.records).steps)

    async def _end_on_timeout(self) -> NoReturn:
        timeout = self._timeout if self._timeout is not None else math.inf
        timed_out = RMCPTimeoutError(
            f"transaction {self.name!r} ({self.id}) did not finish within {timeout:g} s"
        )
        settlement = await self._settle()
        failure = self._failure(settlement, f"did not finish within {timeout:g} s")
        if failure is not None:
            raise failure from timed_out
        if self.state is TransactionState.COMPENSATED:
            done = "its completed steps were compensated"
        else:
            done = (
                "it was past its pivot: the steps it had started were finished, the rest of its "
                "block did not run"
            )
        raise self._error(
            RMCPTransactionError, f" did not finish within {timeout:g} s; {done}"
        ) from timed_out


def _is_cancellation(error: BaseException) -> bool:
    """Whether ``error`` is a cancellation: Cancelled, or a group of nothing else (how one
    leaves a nursery inside the block)."""
    cancelled = anyio.get_cancelled_exc_class()
    if isinstance(error, BaseExceptionGroup):
        _, rest = cast("BaseExceptionGroup[BaseException]", error).split(cancelled)
        return rest is None
    return isinstance(error, cancelled)


async def record_resolution(engine: Engine, ledger: Ledger, step: int, ran: bool) -> None:
    """Journal an operator's answer for a step in doubt.

    Raises:
        RMCPArgumentError: ``step`` is not a step of the transaction whose outcome is unknown.
    """
    view = fold(ledger.records)
    doubtful = [candidate.index for candidate in view.steps if candidate.ran is None]
    if step not in doubtful:
        raise RMCPArgumentError(
            f"step {step} of transaction {ledger.name!r} ({ledger.transaction_id}) has no unknown "
            f"outcome to resolve (steps with one: {doubtful or 'none'})"
        )
    await engine.write(
        ledger, StepResolved(transaction_id=ledger.transaction_id, step=step, at=engine.now(), ran=ran)
    )


async def resolve_ledger(
    engine: Engine,
    ledger: Ledger,
    step: int,
    ran: bool,
    *,
    parallel: bool,
    continue_on_failure: bool,
) -> TransactionState:
    """Journal the answer for a step in doubt, then finish the (ended) transaction; the caller
    holds ``engine.settling``."""
    await record_resolution(engine, ledger, step, ran)
    if ledger.state is not TransactionState.IN_DOUBT or any(
        view.in_doubt for view in fold(ledger.records).steps
    ):
        return ledger.state
    settlement = await engine.settle(
        ledger,
        parallel=parallel,
        continue_on_failure=continue_on_failure,
    )
    if settlement.state is TransactionState.COMPENSATION_FAILED:
        failed = ", ".join(map(str, settlement.failed_steps))
        raise RMCPCompensationError(
            f"transaction {ledger.name!r} ({ledger.transaction_id}) was compensated after step {step} "
            f"was resolved, and the compensation of step(s) {failed} failed: undo them by hand",
            transaction_id=ledger.transaction_id,
            name=ledger.name,
            state=settlement.state.value,
            failed_steps=settlement.failed_steps,
        )
    return settlement.state
