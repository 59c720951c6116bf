"""Transactions (sagas) against real in-memory MCP servers with side-effect ledgers.

Each ledger server records every tool run ("do a", "undo a"); RMCP is installed on it, so a
step sent twice with its key is replayed, not run again. MockClock (autojump) for the timed
cases.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import anyio
import pytest
import trio
import trio.testing
from mcp import MCPError
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError

from rmcp_actors import (
    CallResult,
    Compensation,
    MemoryStore,
    Outcome,
    RMCPCompensationError,
    RMCPConfig,
    RMCPSupervisor,
    RMCPTransactionError,
    RMCPTransactionInDoubtError,
    ServerSpec,
    TransactionEvent,
    TransactionSettings,
    TransactionState,
)
from rmcp_actors.server import install
from rmcp_actors.stores import MemoryJournal
from rmcp_actors.transactions.journal import (
    CompensationDone,
    CompensationSpec,
    CompensationStarted,
    JournalRecord,
    StateChanged,
    StepDone,
    StepIntent,
    TransactionBegun,
)


class Ledger:
    """What the server did, and what it is told to fail."""

    def __init__(self) -> None:
        self.entries: list[str] = []
        self.failing: set[str] = set()
        #: Labels whose "undo" fails this many more times (then succeeds).
        self.undo_failures: dict[str, int] = {}
        #: Labels the "refused" tool refuses this many more times (then runs).
        self.refusals: dict[str, int] = {}


def ledger_server(ledger: Ledger, *, rmcp: bool = True) -> MCPServer:
    app = MCPServer("ledger")

    @app.tool()
    async def do(label: str) -> dict[str, str]:
        """Apply a side effect (fails for labels in ``failing``)."""
        if label in ledger.failing:
            raise ToolError(f"cannot do {label}")
        ledger.entries.append(f"do {label}")
        return {"label": label, "receipt": f"r-{label}"}

    @app.tool()
    async def undo(label: str) -> str:
        """Undo a side effect (tolerates one that never happened)."""
        if ledger.undo_failures.get(label, 0) > 0:
            ledger.undo_failures[label] -= 1
            raise ToolError(f"cannot undo {label}")
        ledger.entries.append(f"undo {label}")
        return f"undone {label}"

    @app.tool()
    async def refused(label: str) -> str:
        """Refused (a JSON-RPC "invalid params": it did not run) while ``refusals`` lasts."""
        if ledger.refusals.get(label, 0) > 0:
            ledger.refusals[label] -= 1
            raise MCPError(code=-32602, message=f"not now: {label}")
        ledger.entries.append(f"do {label}")
        return label

    @app.tool()
    async def slow(label: str, seconds: float) -> str:
        """Apply a side effect, then take ``seconds`` to answer."""
        ledger.entries.append(f"do {label}")
        await anyio.sleep(seconds)
        return label

    @app.tool()
    async def undo_slowly(label: str, seconds: float) -> str:
        """Take ``seconds``, then undo."""
        await anyio.sleep(seconds)
        ledger.entries.append(f"undo {label}")
        return label

    if rmcp:
        install(app, store=MemoryStore(clock=trio.current_time))
    return app


def undo(label: str) -> Compensation:
    return Compensation("ledger", "undo", {"label": label})


class Boom(Exception):
    pass


async def step(tx: Any, label: str, **options: Any) -> CallResult:
    """A step that raises when the tool reports a failure (the usual saga program)."""
    result = await tx.call("ledger", "do", {"label": label}, compensate=undo(label), **options)
    if result.outcome is Outcome.FAILED:
        raise Boom(result.text)
    return result


@pytest.fixture
def ledger() -> Ledger:
    return Ledger()


@pytest.fixture
async def sup(ledger: Ledger) -> Any:
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("ledger", ledger_server(ledger)))
        yield sup


# --- commit and abort ------------------------------------------------------------------------


async def test_leaving_the_block_commits(sup: RMCPSupervisor, ledger: Ledger) -> None:
    events: list[TransactionEvent] = []
    async with sup.transaction("book", on_event=events.append) as tx:
        for label in ("a", "b", "c"):
            result = await step(tx, label)
            assert result.idempotency_key == f"{tx.id}:{tx.steps - 1}"
        assert tx.state is TransactionState.IN_PROGRESS
    assert tx.state is TransactionState.COMMITTED
    assert ledger.entries == ["do a", "do b", "do c"]
    history = tx.history()
    assert [state for state, _, _ in history.states] == [
        TransactionState.INITIATED,
        TransactionState.IN_PROGRESS,
        TransactionState.COMMITTED,
    ]
    assert [(s.step, s.outcome, s.ran, s.attempts) for s in history.steps] == [
        (0, "succeeded", True, 1),
        (1, "succeeded", True, 1),
        (2, "succeeded", True, 1),
    ]
    assert history.steps[0].result["structured_content"] == {"label": "a", "receipt": "r-a"}
    assert [event.what for event in events] == ["begun", "state"] + ["step", "step_done"] * 3 + ["state"]
    assert events[-1].state is TransactionState.COMMITTED
    [summary] = await sup.transactions(TransactionState.COMMITTED)
    assert (summary.transaction_id, summary.name, summary.steps) == (tx.id, "book", 3)
    assert await sup.transactions(TransactionState.COMPENSATED) == []


async def test_steps_and_compensations_carry_the_transaction_id_and_step_in_meta(sup: RMCPSupervisor) -> None:
    seen: list[dict[str, Any]] = []
    app = MCPServer("meta")

    @app.tool()
    async def whoami(ctx: Context) -> str:
        seen.append(dict((ctx.request_context.meta or {}).get("rmcp") or {}))
        return "ok"

    install(app, store=MemoryStore(clock=trio.current_time))
    await sup.add_server(ServerSpec.in_memory("meta", app))
    tx = sup.transaction("meta")
    with pytest.raises(Boom):  # noqa: PT012
        async with tx:
            await tx.call("meta", "whoami", compensate=Compensation("meta", "whoami"))
            await tx.call("meta", "whoami")
            raise Boom
    assert [(m["transaction_id"], m["step"], m["idempotency_key"]) for m in seen] == [
        (tx.id, 0, f"{tx.id}:0"),
        (tx.id, 1, f"{tx.id}:1"),
        (tx.id, 0, f"{tx.id}:0:compensate"),
    ]


@pytest.mark.parametrize("failing_step", [0, 1, 2, 3])
async def test_failure_at_each_step_compensates_exactly_the_completed_steps_in_reverse(
    sup: RMCPSupervisor, ledger: Ledger, failing_step: int
) -> None:
    labels = ["a", "b", "c", "d"]
    ledger.failing.add(labels[failing_step])
    tx = sup.transaction("book")
    with pytest.raises(Boom) as caught:  # noqa: PT012
        async with tx:
            for label in labels:
                await step(tx, label)
    done = labels[:failing_step]
    assert ledger.entries == [f"do {x}" for x in done] + [f"undo {x}" for x in reversed(done)]
    assert tx.state is TransactionState.COMPENSATED
    assert f"transaction 'book' ({tx.id}) ended compensated" in caught.value.__notes__
    history = tx.history()
    assert [s.compensation_outcome for s in history.steps] == ["succeeded"] * failing_step + [None]
    assert history.steps[failing_step].outcome == "failed"


async def test_compensations_carry_their_derived_keys(sup: RMCPSupervisor, ledger: Ledger) -> None:
    tx = sup.transaction("book")
    with pytest.raises(Boom):  # noqa: PT012
        async with tx:
            await step(tx, "a")
            raise Boom
    # Sent again with the same key, the compensation is replayed, not run twice.
    again = await sup.call("ledger", "undo", {"label": "a"}, idempotency_key=f"{tx.id}:0:compensate")
    assert again.duplicate is True
    assert ledger.entries == ["do a", "undo a"]


async def test_a_replayed_step_is_deduplicated(sup: RMCPSupervisor, ledger: Ledger) -> None:
    async with sup.transaction("book") as tx:
        first = await step(tx, "a")
        assert first.duplicate is False
    again = await sup.call("ledger", "do", {"label": "a"}, idempotency_key=f"{tx.id}:0")
    assert again.duplicate is True
    assert again.structured_content == first.structured_content
    assert ledger.entries == ["do a"]


async def test_callable_compensation_is_computed_from_the_result(sup: RMCPSupervisor, ledger: Ledger) -> None:
    def refund(result: CallResult) -> Compensation:
        assert result.structured_content is not None
        return Compensation("ledger", "undo", {"label": result.structured_content["receipt"]})

    tx = sup.transaction("book")
    with pytest.raises(Boom):  # noqa: PT012
        async with tx:
            await tx.call("ledger", "do", {"label": "a"}, compensate=refund)
            raise Boom
    assert ledger.entries == ["do a", "undo r-a"]
    assert tx.history().steps[0].compensation == Compensation("ledger", "undo", {"label": "r-a"})


async def test_a_step_the_tool_reports_failed_is_not_compensated(sup: RMCPSupervisor, ledger: Ledger) -> None:
    ledger.failing.add("b")
    tx = sup.transaction("book")
    with pytest.raises(Boom):  # noqa: PT012
        async with tx:
            await step(tx, "a")
            await step(tx, "b")
    assert ledger.entries == ["do a", "undo a"]


async def test_no_steps_after_the_block(sup: RMCPSupervisor) -> None:
    async with sup.transaction("book") as tx:
        pass
    with pytest.raises(RMCPTransactionError, match="takes no more steps") as caught:
        await tx.call("ledger", "do", {"label": "late"})
    assert caught.value.state == "committed"


# --- compensation failures, parallel --------------------------------------------------------


async def test_a_failed_compensation_is_reported_and_stops_the_others(
    sup: RMCPSupervisor, ledger: Ledger, autojump_clock: trio.testing.MockClock
) -> None:
    ledger.undo_failures["b"] = 1
    tx = sup.transaction("book")
    with pytest.raises(RMCPCompensationError) as caught:  # noqa: PT012
        async with tx:
            for label in ("a", "b", "c"):
                await step(tx, label)
            raise Boom
    error = caught.value
    assert isinstance(error.__cause__, Boom)
    assert (error.state, error.failed_steps, error.transaction_id) == ("compensation_failed", (1,), tx.id)
    assert tx.state is TransactionState.COMPENSATION_FAILED
    # c undone, b failed (the tool reported it: not retried), a not attempted.
    assert ledger.entries == ["do a", "do b", "do c", "undo c"]
    steps = tx.history().steps
    assert [s.compensation_outcome for s in steps] == [None, "failed", "succeeded"]
    assert "cannot undo b" in str(steps[1].compensation_error)
    # Once the cause is gone, recovery retries the compensations that did not succeed, only.
    assert (await sup.recover()).total == 0
    report = await sup.recover(retry_failed=True)
    assert report.compensated == (tx.id,), report
    assert ledger.entries == ["do a", "do b", "do c", "undo c", "undo b", "undo a"]


async def test_continue_past_a_failing_compensation(sup: RMCPSupervisor, ledger: Ledger) -> None:
    ledger.undo_failures["b"] = 1
    tx = sup.transaction("book", continue_on_compensation_failure=True)
    with pytest.raises(RMCPCompensationError) as caught:  # noqa: PT012
        async with tx:
            for label in ("a", "b", "c"):
                await step(tx, label)
            raise Boom
    assert caught.value.failed_steps == (1,)
    assert ledger.entries == ["do a", "do b", "do c", "undo c", "undo a"]


async def test_compensations_in_parallel(
    sup: RMCPSupervisor, ledger: Ledger, autojump_clock: trio.testing.MockClock
) -> None:
    start = trio.current_time()
    tx = sup.transaction("book", compensate_parallel=True)
    with pytest.raises(Boom):  # noqa: PT012
        async with tx:
            for label in ("a", "b", "c"):
                await tx.call(
                    "ledger",
                    "do",
                    {"label": label},
                    compensate=Compensation("ledger", "undo_slowly", {"label": label, "seconds": 5}),
                )
            raise Boom
    assert trio.current_time() - start < 6  # side by side, not 15 s in a row
    assert sorted(ledger.entries[3:]) == ["undo a", "undo b", "undo c"]
    assert tx.state is TransactionState.COMPENSATED


# --- timeout, cancellation ------------------------------------------------------------------


async def test_timeout_compensates_and_raises_a_transaction_error(
    sup: RMCPSupervisor, ledger: Ledger, autojump_clock: trio.testing.MockClock
) -> None:
    tx = sup.transaction("book", timeout=10)
    with pytest.raises(RMCPTransactionError) as caught:  # noqa: PT012
        async with tx:
            await step(tx, "a")
            await tx.call("ledger", "slow", {"label": "b", "seconds": 60}, compensate=undo("b"))
    error = caught.value
    assert type(error) is RMCPTransactionError
    assert error.state == "compensated"
    assert "did not finish within 10 s" in error.message
    assert tx.state is TransactionState.COMPENSATED
    # b was sent and cut short; the abort looked its key up (the server waited for the run
    # it still had in flight): it ran, so it is compensated with its result known.
    assert ledger.entries == ["do a", "do b", "undo b", "undo a"]
    assert (tx.history().steps[1].outcome, tx.history().steps[1].looked_up) == ("succeeded", True)


async def test_timeout_leaving_an_error_group_still_compensates(
    sup: RMCPSupervisor, ledger: Ledger, autojump_clock: trio.testing.MockClock
) -> None:
    async def fails_when_cancelled() -> None:
        try:
            await trio.sleep(60)
        except trio.Cancelled:
            raise Boom("cleanup failed") from None

    tx = sup.transaction("book", timeout=10)
    with pytest.raises(BaseExceptionGroup) as caught:  # noqa: PT012
        async with tx:
            await step(tx, "a")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fails_when_cancelled)
                await trio.sleep(60)
    assert caught.value.subgroup(Boom) is not None
    assert tx.state is TransactionState.COMPENSATED
    assert ledger.entries == ["do a", "undo a"]


async def test_cancellation_compensates_then_propagates(
    sup: RMCPSupervisor, ledger: Ledger, autojump_clock: trio.testing.MockClock
) -> None:
    tx = sup.transaction("book")
    with trio.move_on_after(5) as scope:
        async with tx:
            await step(tx, "a")
            await trio.sleep(60)
    assert scope.cancelled_caught
    assert tx.state is TransactionState.COMPENSATED
    assert ledger.entries == ["do a", "undo a"]


async def test_cancellation_does_not_cut_compensation_short(
    sup: RMCPSupervisor, ledger: Ledger, autojump_clock: trio.testing.MockClock
) -> None:
    tx = sup.transaction("book")
    with trio.move_on_after(5):
        async with tx:
            await tx.call(
                "ledger",
                "do",
                {"label": "a"},
                compensate=Compensation("ledger", "undo_slowly", {"label": "a", "seconds": 20}),
            )
            await trio.sleep(60)
    assert ledger.entries == ["do a", "undo a"]
    assert tx.state is TransactionState.COMPENSATED


# --- pivot -----------------------------------------------------------------------------------


async def test_past_the_pivot_an_exception_does_not_compensate(sup: RMCPSupervisor, ledger: Ledger) -> None:
    tx = sup.transaction("book")
    with pytest.raises(Boom) as caught:  # noqa: PT012
        async with tx:
            await step(tx, "a")
            await step(tx, "b", pivot=True)
            raise Boom
    assert ledger.entries == ["do a", "do b"]
    assert tx.state is TransactionState.COMMITTED
    assert f"transaction 'book' ({tx.id}) ended committed" in caught.value.__notes__


async def test_a_failed_pivot_still_compensates(sup: RMCPSupervisor, ledger: Ledger) -> None:
    ledger.failing.add("b")
    tx = sup.transaction("book")
    with pytest.raises(Boom):  # noqa: PT012
        async with tx:
            await step(tx, "a")
            await step(tx, "b", pivot=True)
    assert ledger.entries == ["do a", "undo a"]
    assert tx.state is TransactionState.COMPENSATED


async def test_past_the_pivot_a_step_that_did_not_run_is_sent_again_until_done(
    plain: RMCPSupervisor, ledger: Ledger, autojump_clock: trio.testing.MockClock
) -> None:
    # A plain server: an RMCP server would store the refusal under the key and replay it.
    ledger.refusals["c"] = 3
    async with plain.transaction("book") as tx:
        await step(tx, "a")
        await step(tx, "b", pivot=True)
        result = await tx.call("plain", "refused", {"label": "c"})
    assert result.text == "c"
    assert ledger.entries == ["do a", "do b", "do c"]
    assert tx.history().steps[2].attempts == 4
    assert tx.state is TransactionState.COMMITTED


async def test_before_the_pivot_a_refused_step_is_not_sent_again(sup: RMCPSupervisor, ledger: Ledger) -> None:
    from rmcp_actors import RMCPServerError

    ledger.refusals["b"] = 1
    tx = sup.transaction("book")
    with pytest.raises(RMCPServerError):  # noqa: PT012
        async with tx:
            await step(tx, "a")
            await tx.call("ledger", "refused", {"label": "b"}, compensate=undo("b"))
    assert ledger.entries == ["do a", "undo a"]  # b did not run: not compensated
    assert tx.history().steps[1].ran is False


# --- unknown outcomes -----------------------------------------------------------------------


async def unknown_step(tx: Any, label: str, **options: Any) -> None:
    """A step whose answer does not come back in time from a plain server: outcome unknown."""
    await tx.call(
        "plain", "slow", {"label": label, "seconds": 60}, timeout=1, compensate=undo(label), **options
    )


@pytest.fixture
async def plain(sup: RMCPSupervisor, ledger: Ledger) -> RMCPSupervisor:
    await sup.add_server(ServerSpec.in_memory("plain", ledger_server(ledger, rmcp=False)))
    return sup


async def test_an_unknown_step_is_compensated_by_default(
    plain: RMCPSupervisor, ledger: Ledger, autojump_clock: trio.testing.MockClock
) -> None:
    from rmcp_actors import RMCPOutcomeUnknownError

    tx = plain.transaction("book")
    with pytest.raises(RMCPOutcomeUnknownError):  # noqa: PT012
        async with tx:
            await step(tx, "a")
            await unknown_step(tx, "b")
    assert ledger.entries == ["do a", "do b", "undo b", "undo a"]
    assert tx.state is TransactionState.COMPENSATED
    assert tx.history().steps[1].outcome == "unknown"
    assert tx.history().steps[1].ran is None


@pytest.mark.parametrize("ran", [True, False])
async def test_an_unknown_step_marked_not_to_compensate_blindly_is_in_doubt_until_resolved(
    plain: RMCPSupervisor, ledger: Ledger, autojump_clock: trio.testing.MockClock, ran: bool
) -> None:
    tx = plain.transaction("book")
    with pytest.raises(RMCPTransactionInDoubtError) as caught:  # noqa: PT012
        async with tx:
            await step(tx, "a")
            await unknown_step(tx, "b", compensate_unknown=False)
    assert caught.value.step == 1
    assert tx.state is TransactionState.IN_DOUBT
    assert ledger.entries == ["do a", "do b"]
    assert [s.transaction_id for s in await plain.transactions(TransactionState.IN_DOUBT)] == [tx.id]
    assert await tx.resolve(1, ran=ran) is TransactionState.COMPENSATED
    undone = ["undo b", "undo a"] if ran else ["undo a"]
    assert ledger.entries == ["do a", "do b", *undone]
    assert tx.history().steps[1].resolved is ran


async def test_resolve_inside_the_block_lets_the_transaction_go_on(
    plain: RMCPSupervisor, ledger: Ledger, autojump_clock: trio.testing.MockClock
) -> None:
    async with plain.transaction("book") as tx:
        with pytest.raises(RMCPTransactionInDoubtError):
            await unknown_step(tx, "a", compensate_unknown=False)
        with pytest.raises(RMCPTransactionError, match="in_doubt"):
            await step(tx, "b")
        assert await tx.resolve(0, ran=True) is TransactionState.IN_PROGRESS
        await step(tx, "c")
    assert tx.state is TransactionState.COMMITTED
    assert ledger.entries == ["do a", "do c"]


async def test_a_callable_compensation_of_an_unknown_step_is_in_doubt(
    plain: RMCPSupervisor, ledger: Ledger, autojump_clock: trio.testing.MockClock
) -> None:
    tx = plain.transaction("book")
    with pytest.raises(RMCPTransactionInDoubtError):
        async with tx:
            await tx.call(
                "plain", "slow", {"label": "a", "seconds": 60}, timeout=1, compensate=lambda r: undo("a")
            )
    assert tx.state is TransactionState.IN_DOUBT
    # It ran, says the operator: its compensation cannot be computed without the result.
    with pytest.raises(RMCPCompensationError) as caught:
        await plain.resolve(tx.id, 0, ran=True)
    assert caught.value.failed_steps == (0,)


async def test_past_the_pivot_an_unknown_step_is_in_doubt(
    plain: RMCPSupervisor, ledger: Ledger, autojump_clock: trio.testing.MockClock
) -> None:
    tx = plain.transaction("book")
    with pytest.raises(RMCPTransactionInDoubtError) as caught:  # noqa: PT012
        async with tx:
            await step(tx, "a", pivot=True)
            await unknown_step(tx, "b")
    assert caught.value.step == 1
    assert ledger.entries == ["do a", "do b"]
    # It did run, says the operator: past the pivot, the transaction commits.
    assert await plain.resolve(tx.id, 1, ran=True) is TransactionState.COMMITTED
    assert ledger.entries == ["do a", "do b"]


# --- isolation ------------------------------------------------------------------------------


class PoisonedJournal(MemoryJournal):
    """A journal that breaks (with a bug, not an RMCPError) on the compensations of chosen
    transactions: their actors crash."""

    def __init__(self, error: type[Exception] = RuntimeError) -> None:
        super().__init__()
        self.poisoned: set[str] = set()
        self.error = error

    async def append(self, record: JournalRecord) -> None:
        if isinstance(record, CompensationStarted) and record.transaction_id in self.poisoned:
            raise self.error("journal broken")
        await super().append(record)


async def test_a_crashing_transaction_never_touches_another(ledger: Ledger) -> None:
    from rmcp_actors import RMCPActorStoppedError

    journal = PoisonedJournal()
    async with RMCPSupervisor.open(journal=journal) as sup:
        await sup.add_server(ServerSpec.in_memory("ledger", ledger_server(ledger)))
        outcomes: dict[str, BaseException] = {}

        async def book(label: str, *, poison: bool) -> None:
            tx = sup.transaction(label)
            try:
                async with tx:
                    if poison:
                        journal.poisoned.add(tx.id)
                    await step(tx, label)
                    await trio.sleep(0.01)
                    raise Boom
            except BaseException as error:
                outcomes[label] = error

        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(book, "bad", poison=True))
            nursery.start_soon(partial(book, "good", poison=False))
        assert isinstance(outcomes["bad"], RMCPActorStoppedError)
        assert isinstance(outcomes["bad"].__cause__, RuntimeError)
        assert isinstance(outcomes["good"], Boom)
        assert sorted(ledger.entries) == ["do bad", "do good", "undo good"]
        # The supervisor goes on: a new transaction commits, and recovery finishes the crashed one.
        async with sup.transaction("next") as tx:
            await step(tx, "next")
        journal.poisoned.clear()
        report = await sup.recover()
        assert len(report.compensated) == 1
        assert sorted(ledger.entries) == ["do bad", "do good", "do next", "undo bad", "undo good"]


# --- recovery -------------------------------------------------------------------------------


def begun(tx_id: str, **options: Any) -> list[JournalRecord]:
    return [
        TransactionBegun(transaction_id=tx_id, name="abandoned", at=1.0, **options),
        StateChanged(transaction_id=tx_id, at=1.0, state="in_progress"),
    ]


def intent(tx_id: str, index: int, label: str, *, pivot: bool = False) -> StepIntent:
    return StepIntent(
        transaction_id=tx_id,
        step=index,
        at=2.0,
        server="ledger",
        tool="do",
        arguments={"label": label},
        idempotency_key=f"{tx_id}:{index}",
        pivot=pivot,
        compensation=CompensationSpec(server="ledger", tool="undo", arguments={"label": label}),
    )


def done(tx_id: str, index: int, *, outcome: Any = "succeeded", ran: bool | None = True) -> StepDone:
    return StepDone(transaction_id=tx_id, step=index, at=3.0, outcome=outcome, ran=ran, attempts=1)


async def test_recover_compensates_a_transaction_abandoned_before_its_pivot(ledger: Ledger) -> None:
    journal = MemoryJournal()
    tx_id = "t1"
    # Step 0 ran; step 1 was sent (and ran) but the program died before its outcome was journaled;
    # step 2 was refused (did not run).
    ledger.entries = ["do a", "do b"]
    for record in [
        *begun(tx_id),
        intent(tx_id, 0, "a"),
        done(tx_id, 0),
        intent(tx_id, 1, "b"),
    ]:
        await journal.append(record)
    other = "t2"
    for record in [*begun(other), intent(other, 0, "x"), done(other, 0, outcome="failed", ran=False)]:
        await journal.append(record)
    async with RMCPSupervisor.open(journal=journal) as sup:
        await sup.add_server(ServerSpec.in_memory("ledger", ledger_server(ledger)))
        report = await sup.recover()
        assert report.compensated == (tx_id, other)
        assert ledger.entries == ["do a", "do b", "undo b", "undo a"]
        # Recovery is idempotent: nothing left to do.
        again = await sup.recover()
        assert again.total == 0
        states = {s.transaction_id: s.state for s in await sup.transactions()}
        assert states == {tx_id: TransactionState.COMPENSATED, other: TransactionState.COMPENSATED}
    assert ledger.entries == ["do a", "do b", "undo b", "undo a"]


async def test_recover_finishes_a_transaction_whose_program_went_down(ledger: Ledger) -> None:
    journal = MemoryJournal()
    tx_id = ""
    with pytest.raises(SystemExit):  # noqa: PT012
        async with RMCPSupervisor.open(journal=journal) as sup:
            await sup.add_server(ServerSpec.in_memory("ledger", ledger_server(ledger)))
            async with sup.transaction("book") as tx:
                tx_id = tx.id
                await step(tx, "a")
                await step(tx, "b")
                raise SystemExit(1)  # the process is going down: nothing is compensated
    assert ledger.entries == ["do a", "do b"]
    async with RMCPSupervisor.open(journal=journal) as sup:
        [summary] = await sup.transactions(TransactionState.IN_PROGRESS)
        assert summary.transaction_id == tx_id
        # The server lives on (its RMCP store closed with the first runtime's connection).
        await sup.add_server(ServerSpec.in_memory("ledger", ledger_server(ledger)))
        assert (await sup.recover()).compensated == (tx_id,)
    assert ledger.entries == ["do a", "do b", "undo b", "undo a"]


async def test_recovery_interrupted_mid_compensation_resumes_without_repeating(ledger: Ledger) -> None:
    journal = MemoryJournal()
    tx_id = "t1"
    ledger.entries = ["do a", "do b", "undo b"]
    for record in [
        *begun(tx_id),
        intent(tx_id, 0, "a"),
        done(tx_id, 0),
        intent(tx_id, 1, "b"),
        done(tx_id, 1),
        StateChanged(transaction_id=tx_id, at=4.0, state="compensating"),
        CompensationStarted(transaction_id=tx_id, step=1, at=4.0, idempotency_key=f"{tx_id}:1:compensate"),
        CompensationDone(transaction_id=tx_id, step=1, at=4.0, succeeded=True, attempts=1),
        CompensationStarted(transaction_id=tx_id, step=0, at=4.0, idempotency_key=f"{tx_id}:0:compensate"),
    ]:
        await journal.append(record)
    async with RMCPSupervisor.open(journal=journal) as sup:
        await sup.add_server(ServerSpec.in_memory("ledger", ledger_server(ledger)))
        report = await sup.recover()
    assert report.compensated == (tx_id,)
    assert ledger.entries == ["do a", "do b", "undo b", "undo a"]


async def test_recover_finishes_forward_past_the_pivot_with_the_same_keys(ledger: Ledger) -> None:
    journal = MemoryJournal()
    tx_id = "t1"
    app = ledger_server(ledger)
    for record in [*begun(tx_id), intent(tx_id, 0, "a"), done(tx_id, 0), intent(tx_id, 1, "b", pivot=True)]:
        await journal.append(record)
    async with RMCPSupervisor.open(journal=journal) as sup:
        await sup.add_server(ServerSpec.in_memory("ledger", app))
        # The crashed program had sent the pivot, and the server ran it under the step's key.
        await sup.call("ledger", "do", {"label": "a"}, idempotency_key=f"{tx_id}:0")
        await sup.call("ledger", "do", {"label": "b"}, idempotency_key=f"{tx_id}:1")
        report = await sup.recover()
        assert report.committed == (tx_id,)
        [summary] = await sup.transactions()
        assert summary.state is TransactionState.COMMITTED
    assert ledger.entries == ["do a", "do b"]  # replayed under its key, not run again


async def test_recover_on_open(ledger: Ledger) -> None:
    journal = MemoryJournal()
    for record in [*begun("t1"), intent("t1", 0, "a"), done("t1", 0)]:
        await journal.append(record)
    # Servers from config are connected before recovery; in-memory ones are given by object.
    spec = ServerSpec.in_memory("ledger", ledger_server(ledger))
    config = RMCPConfig(servers={"ledger": spec}, transactions=TransactionSettings(recover_on_open=True))
    async with RMCPSupervisor.open(config, journal=journal) as sup:
        assert ledger.entries == ["undo a"]
        [summary] = await sup.transactions()
        assert summary.state is TransactionState.COMPENSATED


async def test_recovery_waits_for_the_servers_a_transaction_needs(ledger: Ledger) -> None:
    journal = MemoryJournal()
    for record in [*begun("t1"), intent("t1", 0, "a"), done("t1", 0)]:
        await journal.append(record)
    async with RMCPSupervisor.open(journal=journal) as sup:
        report = await sup.recover()
        assert report.waiting == ("t1",)
        [summary] = await sup.transactions()
        assert summary.state is TransactionState.IN_PROGRESS  # untouched
        await sup.add_server(ServerSpec.in_memory("ledger", ledger_server(ledger)))
        assert (await sup.recover()).compensated == ("t1",)
    assert ledger.entries == ["undo a"]


async def test_recover_leaves_live_transactions_alone(sup: RMCPSupervisor, ledger: Ledger) -> None:
    async with sup.transaction("book") as tx:
        await step(tx, "a")
        report = await sup.recover()
        assert report.total == 0
    assert tx.state is TransactionState.COMMITTED
    assert ledger.entries == ["do a"]


async def test_a_cancellation_propagates_even_when_compensation_crashes(
    ledger: Ledger, autojump_clock: trio.testing.MockClock
) -> None:
    journal = PoisonedJournal()
    async with RMCPSupervisor.open(journal=journal) as sup:
        await sup.add_server(ServerSpec.in_memory("ledger", ledger_server(ledger)))
        tx = sup.transaction("book")
        with trio.move_on_after(5) as scope:
            async with tx:
                journal.poisoned.add(tx.id)
                await step(tx, "a")
                await trio.sleep(60)
        assert scope.cancelled_caught
        assert tx.state is TransactionState.COMPENSATING  # recover() finishes it


@pytest.mark.parametrize("parallel", [False, True])
async def test_a_journal_failure_while_compensating_reaches_the_owner(ledger: Ledger, parallel: bool) -> None:
    from rmcp_actors import RMCPStoreError

    journal = PoisonedJournal(RMCPStoreError)
    async with RMCPSupervisor.open(journal=journal) as sup:
        await sup.add_server(ServerSpec.in_memory("ledger", ledger_server(ledger)))
        tx = sup.transaction("book", compensate_parallel=parallel)
        with pytest.raises(RMCPStoreError, match="journal broken"):  # noqa: PT012
            async with tx:
                journal.poisoned.add(tx.id)
                await step(tx, "a")
                await step(tx, "b")
                raise Boom
        assert tx.state is TransactionState.COMPENSATING


async def test_timeout_past_the_pivot_commits_what_was_started(
    sup: RMCPSupervisor, ledger: Ledger, autojump_clock: trio.testing.MockClock
) -> None:
    tx = sup.transaction("book", timeout=10)
    with pytest.raises(RMCPTransactionError) as caught:  # noqa: PT012
        async with tx:
            await step(tx, "a", pivot=True)
            await trio.sleep(60)
            await step(tx, "never")
    assert caught.value.state == "committed"
    assert "past its pivot" in caught.value.message
    assert ledger.entries == ["do a"]


async def test_a_compensation_function_that_raises_leaves_its_step_to_undo_by_hand(
    sup: RMCPSupervisor, ledger: Ledger
) -> None:
    def broken(result: CallResult) -> Compensation:
        raise KeyError("receipt")

    tx = sup.transaction("book")
    with pytest.raises(RMCPCompensationError) as caught:  # noqa: PT012
        async with tx:
            await step(tx, "a")
            await tx.call("ledger", "do", {"label": "b"}, compensate=broken)
    assert isinstance(caught.value.__cause__, KeyError)
    assert caught.value.failed_steps == (1,)
    assert ledger.entries == ["do a", "do b"]  # the first failure stops the compensations
    assert "undo it by hand" in str(tx.history().steps[1].compensation_error)


async def test_resolve_refuses_a_step_that_is_not_in_doubt(sup: RMCPSupervisor) -> None:
    from rmcp_actors import RMCPArgumentError

    async with sup.transaction("book") as tx:
        await step(tx, "a")
        with pytest.raises(RMCPArgumentError, match="no unknown outcome"):
            await tx.resolve(0, ran=False)
    with pytest.raises(RMCPArgumentError, match="no transaction"):
        await sup.resolve("nope", 0, ran=True)


async def test_declared_resources_are_journaled(sup: RMCPSupervisor) -> None:
    async with sup.transaction("book", resources=["account:1", ("account:2", True)]) as tx:
        await tx.acquire("seat:12A")
    assert tx.resources == (("account:1", False), ("account:2", True), ("seat:12A", False))
    [begun_record] = [r for r in await sup._journal.read(tx.id) if isinstance(r, TransactionBegun)]  # pyright: ignore[reportPrivateUsage]
    assert begun_record.resources == (("account:1", False), ("account:2", True))


async def test_past_the_pivot_a_step_that_never_goes_through_leaves_the_transaction_to_recover(
    plain: RMCPSupervisor, ledger: Ledger, autojump_clock: trio.testing.MockClock
) -> None:
    from rmcp_actors import RMCPServerError

    ledger.refusals["c"] = 10**6
    tx = plain.transaction("book")
    with trio.fail_after(1000), pytest.raises(RMCPTransactionError) as caught:  # noqa: PT012
        async with tx:
            await step(tx, "a", pivot=True)
            with pytest.raises(RMCPServerError):
                await tx.call("plain", "refused", {"label": "c"})
            raise Boom
    assert caught.value.state == "in_progress"
    assert "run sup.recover()" in caught.value.message
    assert isinstance(caught.value.__cause__, Boom)
    assert [s.transaction_id for s in await plain.transactions(TransactionState.IN_PROGRESS)] == [tx.id]
    ledger.refusals["c"] = 0
    assert (await plain.recover()).committed == (tx.id,)
    assert ledger.entries == ["do a", "do c"]
