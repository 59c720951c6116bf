"""Transactions under cancellation and concurrency (review of issue 9).

A journal whose appends take time (MockClock) makes a cancellation or a concurrent
``recover()`` land exactly at one await of the transaction; the servers are real in-memory
ledger servers (RMCP installed or plain).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing
from test_transactions import Boom, Ledger, begun, done, intent, ledger_server, step, undo

from rmcp_actors import (
    Compensation,
    RMCPArgumentError,
    RMCPCompensationError,
    RMCPConfig,
    RMCPStoreError,
    RMCPSupervisor,
    RMCPTransactionError,
    RMCPTransactionInDoubtError,
    ServerSpec,
    TransactionSettings,
    TransactionState,
)
from rmcp_actors.stores import MemoryJournal
from rmcp_actors.transactions.journal import (
    CompensationStarted,
    JournalRecord,
    StateChanged,
    StepDone,
    TransactionBegun,
)


class SlowJournal(MemoryJournal):
    """A journal whose chosen appends take ``seconds`` before (or after) the record is stored:
    a group commit waiting its turn, or a durable record whose writer has not resumed yet."""

    def __init__(
        self, slow: Callable[[JournalRecord], bool], *, seconds: float = 10.0, after: bool = False
    ) -> None:
        super().__init__()
        self.slow = slow
        self.seconds = seconds
        self.after = after

    async def append(self, record: JournalRecord) -> None:
        slow = self.slow(record)
        if slow and not self.after:
            await trio.sleep(self.seconds)
        await super().append(record)
        if slow and self.after:
            await trio.sleep(self.seconds)


def committed(record: JournalRecord) -> bool:
    return isinstance(record, StateChanged) and record.state == "committed"


async def states_of(sup: RMCPSupervisor) -> dict[str, TransactionState]:
    return {summary.transaction_id: summary.state for summary in await sup.transactions()}


@pytest.fixture
def ledger() -> Ledger:
    return Ledger()


async def test_a_cancellation_while_the_commit_is_journaled_does_not_leave_it_in_progress(
    ledger: Ledger, autojump_clock: trio.testing.MockClock
) -> None:
    journal = SlowJournal(committed)
    async with RMCPSupervisor.open(journal=journal) as sup:
        await sup.add_server(ServerSpec.in_memory("ledger", ledger_server(ledger)))
        tx = sup.transaction("book")
        with trio.move_on_after(5):
            async with tx:
                await step(tx, "a")
        # The block ended normally: the commit is decided; a cancellation while it is being
        # journaled must not leave a transaction nobody ends (neither committed nor undone).
        assert tx.state is TransactionState.COMMITTED
        assert await states_of(sup) == {tx.id: TransactionState.COMMITTED}
    assert ledger.entries == ["do a"]


async def test_a_cancellation_while_a_step_outcome_is_journaled_keeps_the_outcome(
    ledger: Ledger, autojump_clock: trio.testing.MockClock
) -> None:
    journal = SlowJournal(lambda record: isinstance(record, StepDone) and record.outcome == "succeeded")
    async with RMCPSupervisor.open(journal=journal) as sup:
        await sup.add_server(ServerSpec.in_memory("ledger", ledger_server(ledger)))
        tx = sup.transaction("book")
        with trio.move_on_after(5):
            async with tx:
                # The compensation is computed from the result: losing the outcome would put the
                # transaction in doubt although the step's result was in hand.
                await tx.call("ledger", "do", {"label": "a"}, compensate=lambda _result: undo("a"))
                await trio.sleep(60)
        assert tx.state is TransactionState.COMPENSATED
        assert await states_of(sup) == {tx.id: TransactionState.COMPENSATED}
    assert ledger.entries == ["do a", "undo a"]


async def test_two_recoveries_at_once_compensate_once(
    ledger: Ledger, autojump_clock: trio.testing.MockClock
) -> None:
    journal = MemoryJournal()
    tx_id = "t1"
    for record in [*begun(tx_id), intent(tx_id, 0, "a"), done(tx_id, 0)]:
        await journal.append(record)
    async with RMCPSupervisor.open(journal=journal) as sup:
        # A plain server: nothing deduplicates a compensation sent twice.
        await sup.add_server(ServerSpec.in_memory("ledger", ledger_server(ledger, rmcp=False)))
        reports: list[Any] = []

        async def recover() -> None:
            reports.append(await sup.recover())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(recover)
            nursery.start_soon(recover)
        assert sorted(report.compensated for report in reports) == [(), (tx_id,)]
        records = await journal.read(tx_id)
        assert [r.state for r in records if isinstance(r, StateChanged)] == [
            "in_progress",
            "compensating",
            "compensated",
        ]
    assert ledger.entries == ["undo a"]


async def test_recover_never_settles_a_transaction_whose_begin_was_just_journaled(
    ledger: Ledger, autojump_clock: trio.testing.MockClock
) -> None:
    # A durable journal's append returns a while after the record is committed (its writer
    # waits for its turn to run): recover() may read the new transaction in that window.
    journal = SlowJournal(lambda record: isinstance(record, TransactionBegun), seconds=1.0, after=True)
    async with RMCPSupervisor.open(journal=journal) as sup:
        await sup.add_server(ServerSpec.in_memory("ledger", ledger_server(ledger)))
        ids: list[str] = []

        async def book() -> None:
            async with sup.transaction("book") as tx:
                ids.append(tx.id)
                await step(tx, "a")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(book)
            await trio.sleep(0.5)
            report = await sup.recover()
        assert report.total == 0
        assert await states_of(sup) == {ids[0]: TransactionState.COMMITTED}
        states = [r.state for r in await journal.read(ids[0]) if isinstance(r, StateChanged)]
        assert states == ["in_progress", "committed"]
    assert ledger.entries == ["do a"]


async def test_a_compensation_cut_short_is_retried_under_its_own_key(
    ledger: Ledger, autojump_clock: trio.testing.MockClock
) -> None:
    config = RMCPConfig(transactions=TransactionSettings(compensation_timeout_s=5))
    async with RMCPSupervisor.open(config) as sup:
        await sup.add_server(ServerSpec.in_memory("ledger", ledger_server(ledger)))
        tx = sup.transaction("book")
        slow_undo = Compensation("ledger", "undo_slowly", {"label": "a", "seconds": 10})
        with pytest.raises(RMCPCompensationError):  # noqa: PT012
            async with tx:
                await tx.call("ledger", "do", {"label": "a"}, compensate=slow_undo)
                raise Boom
        # The compensation was cut short after 5 s, but the RMCP server finishes a tool it
        # started: the undo ran once, its outcome is not known to the transaction.
        await trio.sleep(10)
        assert ledger.entries == ["do a", "undo a"]
        report = await sup.recover(retry_failed=True)
        await trio.sleep(10)
        # Retried under the key of the run that was cut short, the server replays that run
        # instead of undoing a second time.
        assert ledger.entries == ["do a", "undo a"]
        assert report.compensated == (tx.id,)


async def test_a_runtime_cancelled_mid_transaction_leaves_it_for_recover(
    ledger: Ledger, autojump_clock: trio.testing.MockClock
) -> None:
    journal = MemoryJournal()
    tx_id = ""
    with trio.move_on_after(5):
        async with RMCPSupervisor.open(journal=journal) as sup:
            await sup.add_server(ServerSpec.in_memory("ledger", ledger_server(ledger)))
            async with sup.transaction("book") as tx:
                tx_id = tx.id
                await step(tx, "a")
                await step(tx, "b")
                await trio.sleep(60)
    # The cancellation reaches the runtime's actors with the block: whatever the abort could
    # do, the journal must not call the transaction ended unless it is.
    [summary] = await journal.summaries()
    undone = [entry for entry in ledger.entries if entry.startswith("undo")]
    if summary.state is TransactionState.COMPENSATED:
        assert undone == ["undo b", "undo a"]
    else:
        assert summary.state in (TransactionState.IN_PROGRESS, TransactionState.COMPENSATING)
        async with RMCPSupervisor.open(journal=journal) as sup:
            # The server lives on (its RMCP store closed with the first runtime's connection).
            await sup.add_server(ServerSpec.in_memory("ledger", ledger_server(ledger)))
            report = await sup.recover()
            assert report.compensated == (tx_id,)
    assert ledger.entries == ["do a", "do b", "undo b", "undo a"]


async def test_a_cancellation_through_a_nursery_in_the_block_propagates_when_compensation_fails(
    ledger: Ledger, autojump_clock: trio.testing.MockClock
) -> None:
    ledger.undo_failures["a"] = 1
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("ledger", ledger_server(ledger)))
        tx = sup.transaction("book")
        with trio.move_on_after(5) as scope:
            async with tx:
                await step(tx, "a")
                # The outer cancellation leaves this nursery as a group of Cancelled.
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(trio.sleep, 60)
                    await trio.sleep(60)
        assert scope.cancelled_caught
        assert tx.state is TransactionState.COMPENSATION_FAILED
    assert ledger.entries == ["do a"]


class FailingJournal(MemoryJournal):
    """A journal that fails (RMCPStoreError) on the chosen records."""

    def __init__(self, fails: Callable[[JournalRecord], bool]) -> None:
        super().__init__()
        self.fails = fails

    async def append(self, record: JournalRecord) -> None:
        if self.fails(record):
            raise RMCPStoreError("journal broken", operation="append")
        await super().append(record)


async def test_a_journal_failure_while_a_cancelled_step_is_journaled_keeps_the_cancellation(
    ledger: Ledger, autojump_clock: trio.testing.MockClock
) -> None:
    journal = FailingJournal(lambda record: isinstance(record, StepDone) and record.outcome == "unknown")
    async with RMCPSupervisor.open(journal=journal) as sup:
        await sup.add_server(ServerSpec.in_memory("ledger", ledger_server(ledger)))
        tx = sup.transaction("book")
        with trio.move_on_after(5) as scope:
            async with tx:
                await tx.call("ledger", "slow", {"label": "a", "seconds": 60}, compensate=undo("a"))
        assert scope.cancelled_caught
        # The step's outcome was not journaled: it may have run, and it is compensated.
        assert tx.state is TransactionState.COMPENSATED
    assert ledger.entries == ["do a", "undo a"]


async def test_tx_resolve_after_sup_resolve_does_not_compensate_again(
    ledger: Ledger, autojump_clock: trio.testing.MockClock
) -> None:
    async with RMCPSupervisor.open() as sup:
        # Plain servers: nothing deduplicates a compensation sent twice.
        await sup.add_server(ServerSpec.in_memory("plain", ledger_server(ledger, rmcp=False)))
        tx = sup.transaction("book")
        with pytest.raises(RMCPTransactionInDoubtError):
            async with tx:
                await tx.call(
                    "plain",
                    "slow",
                    {"label": "a", "seconds": 60},
                    timeout=1,
                    compensate=Compensation("plain", "undo", {"label": "a"}),
                    compensate_unknown=False,
                )
        # An operator resolves it through the supervisor; then the program, too late.
        assert await sup.resolve(tx.id, 0, ran=True) is TransactionState.COMPENSATED
        with pytest.raises(RMCPArgumentError):
            await tx.resolve(0, ran=True)
        assert tx.state is TransactionState.COMPENSATED
    assert ledger.entries == ["do a", "undo a"]


async def test_a_pivot_resolved_as_run_inside_the_block_is_the_point_of_no_return(
    ledger: Ledger, autojump_clock: trio.testing.MockClock
) -> None:
    ledger.refusals["b"] = 2
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("plain", ledger_server(ledger, rmcp=False)))
        async with sup.transaction("book") as tx:
            with pytest.raises(RMCPTransactionInDoubtError):
                await tx.call(
                    "plain",
                    "slow",
                    {"label": "a", "seconds": 60},
                    timeout=1,
                    pivot=True,
                    compensate_unknown=False,
                )
            assert await tx.resolve(0, ran=True) is TransactionState.IN_PROGRESS
            # Past the pivot, a step refused (it did not run) is sent again until done.
            # (A plain server: an RMCP server would store the refusal under the key.)
            await tx.call("plain", "refused", {"label": "b"})
        assert tx.state is TransactionState.COMMITTED
    assert ledger.entries == ["do a", "do b"]


async def test_steps_from_two_tasks_get_unique_indices_and_keys(ledger: Ledger) -> None:
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("ledger", ledger_server(ledger)))
        tx = sup.transaction("book")
        with pytest.raises(BaseExceptionGroup):  # noqa: PT012
            async with tx:

                async def steps(prefix: str) -> None:
                    for index in range(5):
                        await step(tx, f"{prefix}{index}")
                    raise Boom

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(steps, "x")
                    nursery.start_soon(steps, "y")
        history = tx.history()
        assert [s.step for s in history.steps] == list(range(len(history.steps)))
        assert len({s.idempotency_key for s in history.steps}) == len(history.steps)
        # Every step that ran was undone once, in the reverse of the step order.
        undone = [entry for entry in ledger.entries if entry.startswith("undo")]
        assert undone == [f"undo {s.arguments['label']}" for s in reversed(history.steps) if s.arguments]
        assert len(undone) == len(history.steps) == len(set(undone))
        assert tx.state is TransactionState.COMPENSATED


async def test_a_lock_asked_for_after_the_block_is_refused_not_leaked(
    ledger: Ledger, autojump_clock: trio.testing.MockClock
) -> None:
    async with RMCPSupervisor.open() as sup:
        async with sup.transaction("first") as first:
            pass
        with pytest.raises(RMCPTransactionError, match="ended"):
            await first.acquire("account:1")
        # The resource is free: another transaction takes it at once.
        with trio.fail_after(1):
            async with sup.transaction("second", resources=["account:1"]) as second:
                pass
        assert second.state is TransactionState.COMMITTED


async def test_a_pivot_in_doubt_resolved_as_not_run_compensates(
    ledger: Ledger, autojump_clock: trio.testing.MockClock
) -> None:
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("ledger", ledger_server(ledger)))
        await sup.add_server(ServerSpec.in_memory("plain", ledger_server(ledger, rmcp=False)))
        tx = sup.transaction("book")
        with pytest.raises(RMCPTransactionInDoubtError):  # noqa: PT012
            async with tx:
                await step(tx, "a")
                await tx.call(
                    "plain",
                    "slow",
                    {"label": "p", "seconds": 60},
                    timeout=1,
                    pivot=True,
                    compensate_unknown=False,
                )
        # The pivot did not go through (says the operator): the block ended there, so the
        # transaction is undone; sending the pivot now would commit what the program abandoned.
        assert await tx.resolve(1, ran=False) is TransactionState.COMPENSATED
    assert ledger.entries == ["do a", "do p", "undo a"]


async def test_an_event_callback_that_raises_stops_nothing(
    ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[str] = []

    def broken(event: Any) -> None:
        seen.append(event.what)
        raise RuntimeError("callback bug")

    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("ledger", ledger_server(ledger)))
        tx = sup.transaction("book", on_event=broken)
        with pytest.raises(Boom):  # noqa: PT012
            async with tx:
                await step(tx, "a")
                raise Boom
        assert tx.state is TransactionState.COMPENSATED
    assert ledger.entries == ["do a", "undo a"]
    assert seen == [
        "begun",
        "state",
        "step",
        "step_done",
        "state",
        "compensation",
        "compensation_done",
        "state",
    ]
    assert sum("on_event callback raised" in record.getMessage() for record in caplog.records) == len(seen)


async def test_a_compensation_whose_server_was_removed_waits_for_it_in_recovery(ledger: Ledger) -> None:
    journal = MemoryJournal()
    async with RMCPSupervisor.open(journal=journal) as sup:
        await sup.add_server(ServerSpec.in_memory("ledger", ledger_server(ledger)))
        await sup.add_server(ServerSpec.in_memory("undoer", ledger_server(ledger)))
        tx = sup.transaction("book")
        with pytest.raises(RMCPCompensationError) as caught:  # noqa: PT012
            async with tx:
                await tx.call(
                    "ledger", "do", {"label": "a"}, compensate=Compensation("undoer", "undo", {"label": "a"})
                )
                await sup.remove_server("undoer")
                raise Boom
        assert isinstance(caught.value.__cause__, Boom)
        assert tx.state is TransactionState.COMPENSATION_FAILED
        assert (await sup.recover(retry_failed=True)).waiting == (tx.id,)
        await sup.add_server(ServerSpec.in_memory("undoer", ledger_server(ledger)))
        assert (await sup.recover(retry_failed=True)).compensated == (tx.id,)
        # Nothing ran under the first key (no server): the retry keeps it.
        keys = [r.idempotency_key for r in await journal.read(tx.id) if isinstance(r, CompensationStarted)]
        assert keys == [f"{tx.id}:0:compensate"] * 2
    assert ledger.entries == ["do a", "undo a"]
