# pyright: strict
"""Recovery: finish the transactions a crashed (or cancelled) program left in its journal.

``sup.recover()`` reads every transaction that is neither ended (committed, compensated,
compensation_failed) nor in doubt, and settles it from its records alone, as the program would
have on an abort: before its pivot every step that ran or may have run is compensated, in
reverse order, each compensation with its derived key; past its pivot the steps that have no
outcome are sent again with their own keys (an RMCP server replays the first run, or finishes
waiting for it) and the transaction commits.

Recovery is idempotent: everything it does is journaled first, so a crash during recovery is
recovered again the same way, a compensation whose ``CompensationDone`` is journaled is not sent
again, and one that was started but not finished is sent again with the same key.

What recovery cannot do: run the steps a crashed program had not issued yet. It only knows the
steps the journal holds; the rest of the block died with the program.
"""

from __future__ import annotations

import logging

import attrs

from ..errors import RMCPArgumentError, RMCPError
from ._engine import Engine, Ledger, TransactionView, fold
from ._model import TransactionState
from .saga import resolve_ledger

__all__ = ["RecoveryReport", "recover", "resolve"]

_logger = logging.getLogger("rmcp_actors.transactions")

_INCOMPLETE = frozenset(
    {TransactionState.INITIATED, TransactionState.IN_PROGRESS, TransactionState.COMPENSATING}
)


@attrs.frozen(kw_only=True)
class RecoveryReport:
    """What ``sup.recover()`` did, transaction ids per outcome.

    Attributes:
        committed: Finished forward past their pivot, then committed.
        compensated: Compensated (every step that ran, or may have run, undone).
        in_doubt: Left in doubt: a step's outcome is unknown and may not be compensated
            blindly; ``sup.resolve(transaction_id, step, ran=...)`` finishes them.
        failed: Not finished: a compensation failed (``compensation_failed``), or a step past
            the pivot could not be sent (left in progress for the next ``recover()``), or the
            journal failed. Their ``history`` says why.
        waiting: Not touched: a server one of their steps or compensations needs is not
            added to the runtime; add it, then recover again.
    """

    committed: tuple[str, ...] = ()
    compensated: tuple[str, ...] = ()
    in_doubt: tuple[str, ...] = ()
    failed: tuple[str, ...] = ()
    waiting: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        """How many transactions recovery looked at."""
        return sum(map(len, (self.committed, self.compensated, self.in_doubt, self.failed, self.waiting)))


async def recover(engine: Engine, *, retry_failed: bool = False) -> RecoveryReport:
    """Settle every incomplete transaction of the journal that no block of this process runs.

    Transactions are settled one after the other, oldest first. With ``retry_failed``, the
    ``compensation_failed`` ones are compensated again too (only their compensations that did
    not succeed, with the same keys).
    """
    async with engine.settling:
        return await _recover(engine, retry_failed=retry_failed)


async def _recover(engine: Engine, *, retry_failed: bool) -> RecoveryReport:
    outcomes: dict[str, list[str]] = {
        "committed": [],
        "compensated": [],
        "in_doubt": [],
        "failed": [],
        "waiting": [],
    }
    states = _INCOMPLETE | {TransactionState.COMPENSATION_FAILED} if retry_failed else _INCOMPLETE
    for summary in await engine.journal.summaries(states):
        transaction_id = summary.transaction_id
        if transaction_id in engine.live:
            continue
        try:
            records = await engine.journal.read(transaction_id)
            view = fold(records)
            missing = sorted({server for server in _servers(view) if not engine.knows(server)})
            if missing:
                _logger.warning(
                    "recovery of transaction %s (%s) waits for server(s) %s: add them, then recover again",
                    transaction_id,
                    summary.name,
                    ", ".join(missing),
                )
                outcomes["waiting"].append(transaction_id)
                continue
            begun = view.begun
            settlement = await engine.settle(
                Ledger.of(records),
                parallel=begun.compensate_parallel,
                continue_on_failure=begun.continue_on_compensation_failure,
            )
        except RMCPError:
            _logger.exception("recovery of transaction %s (%s) failed", transaction_id, summary.name)
            outcomes["failed"].append(transaction_id)
            continue
        if settlement.state is TransactionState.COMMITTED:
            outcomes["committed"].append(transaction_id)
        elif settlement.state is TransactionState.COMPENSATED:
            outcomes["compensated"].append(transaction_id)
        elif settlement.state is TransactionState.IN_DOUBT:
            outcomes["in_doubt"].append(transaction_id)
        else:
            outcomes["failed"].append(transaction_id)
    return RecoveryReport(
        committed=tuple(outcomes["committed"]),
        compensated=tuple(outcomes["compensated"]),
        in_doubt=tuple(outcomes["in_doubt"]),
        failed=tuple(outcomes["failed"]),
        waiting=tuple(outcomes["waiting"]),
    )


def _servers(view: TransactionView) -> set[str]:
    servers = {step.intent.server for step in view.steps}
    servers.update(step.compensation.server for step in view.steps if step.compensation is not None)
    return servers


async def resolve(engine: Engine, transaction_id: str, step: int, ran: bool) -> TransactionState:
    """Say whether a step in doubt ran, and finish its transaction (``sup.resolve``).

    Raises:
        RMCPArgumentError: No such transaction in the journal, or ``step`` is not in doubt.
        RMCPCompensationError: Finishing it, a compensation failed.
    """
    live = engine.live.get(transaction_id)
    if live is not None:
        return await live(step, ran)
    # Read under the lock: a recovery or another resolve may be settling it right now.
    async with engine.settling:
        records = await engine.journal.read(transaction_id)
        if not records:
            raise RMCPArgumentError(f"the journal has no transaction {transaction_id!r}")
        begun = fold(records).begun
        return await resolve_ledger(
            engine,
            Ledger.of(records),
            step,
            ran,
            parallel=begun.compensate_parallel,
            continue_on_failure=begun.continue_on_compensation_failure,
        )
