"""RMCP lookups: asking a server what became of a key without running the tool, and the
transactions that use them to undo only the steps that ran (in memory and over stdio)."""

from __future__ import annotations

import os
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import mcp
import msgspec
import pytest
import trio
import trio.testing
from conftest import FAST_RECOVERY, PYTHON, durable_store, stdio_args
from mcp.server.mcpserver import MCPServer
from mcp_test_server import State, build_server, ledger_reconciler
from mcp_types import RequestParamsMeta

from rmcp_actors import (
    CallResult,
    Compensation,
    RMCPNackError,
    RMCPSupervisor,
    RMCPTransactionInDoubtError,
    ServerSpec,
    TransactionState,
)
from rmcp_actors._protocol import fingerprint
from rmcp_actors.client.call import CallRequest, perform_call
from rmcp_actors.server import InDoubtRun, Reconciliation, install, rmcp_of, store_key
from rmcp_actors.stores import (
    AbortingStore,
    DedupStore,
    MemoryJournal,
    MemoryStore,
    OwnerInfo,
    RecordState,
    SQLiteStore,
)
from rmcp_actors.transactions.journal import (
    CompensationSpec,
    JournalRecord,
    StateChanged,
    StepDone,
    StepIntent,
    TransactionBegun,
)
from rmcp_actors.transactions.saga import TransactionHistory, history_of


def rmcp_meta(key: str | None, *, lookup: bool = False, attempt: int = 1) -> RequestParamsMeta:
    fields: dict[str, Any] = {"version": "0.2", "request_id": f"req-{attempt}", "attempt": attempt}
    if key is not None:
        fields["idempotency_key"] = key
    if lookup:
        fields["lookup"] = True
    return cast(RequestParamsMeta, {"rmcp": fields})


def rmcp_answer(result: Any) -> dict[str, Any]:
    return (result.meta or {})["rmcp"]


async def leave_claimed(store: DedupStore, tool: str, arguments: dict[str, Any], *, entered: bool) -> None:
    """Key "k" claimed for ``tool(arguments)`` by an owner that died (after calling the tool,
    with ``entered``; before, without)."""
    await store.register_owner(OwnerInfo(instance_id="crashed", pid=1, host="elsewhere"), lease_s=30)
    scoped = store_key("k")
    claimed = await store.begin(scoped, fingerprint=fingerprint(tool, arguments), tool=tool, owner="crashed")
    assert claimed.claimed
    if entered:
        assert await store.mark_entered(scoped, owner="crashed")
    await store.release_owner("crashed")


# --- Stores -------------------------------------------------------------------------------------


@pytest.fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AbortingStore]:
    made: MemoryStore | SQLiteStore = (
        MemoryStore() if request.param == "memory" else SQLiteStore(tmp_path / "dedup.db")
    )
    yield made
    await made.aclose()


async def test_stores_abort_where_a_claim_would_be_taken_and_nowhere_else(store: AbortingStore) -> None:
    assert isinstance(store, AbortingStore)
    await store.register_owner(OwnerInfo(instance_id="me", pid=os.getpid(), host="here"), lease_s=30)
    await store.register_owner(OwnerInfo(instance_id="live", pid=os.getpid(), host="here"), lease_s=30)

    def abort(key: str, *, in_doubt: bool = False, print_: str = "fp") -> Any:
        return store.abort(key, fingerprint=print_, tool="t", owner="me", in_doubt=in_doubt)

    # Absent: tombstoned, and nobody can claim it afterwards.
    assert (await abort("absent")).claimed
    taken = await store.begin("absent", fingerprint="fp", tool="t", owner="live")
    assert not taken.claimed
    assert taken.existing is not None
    assert taken.existing.state is RecordState.ABORTED
    assert (await abort("absent")).existing.state is RecordState.ABORTED  # type: ignore[union-attr]
    # A live owner's claim, entered or not, is its own.
    assert (await store.begin("running", fingerprint="fp", tool="t", owner="live")).claimed
    assert not (await abort("running")).claimed
    # A claim never entered whose owner is gone: tombstoned; the owner, back, cannot enter it.
    await store.register_owner(OwnerInfo(instance_id="gone", pid=os.getpid(), host="here"), lease_s=30)
    assert (await store.begin("abandoned", fingerprint="fp", tool="t", owner="gone")).claimed
    await store.release_owner("gone")
    assert not (await abort("abandoned", print_="other")).claimed
    assert (await abort("abandoned")).taken_over
    assert not await store.mark_entered("abandoned", owner="gone")
    # In doubt: only when a reconciler said so (``in_doubt``).
    assert (await store.begin("doubt", fingerprint="fp", tool="t", owner="live")).claimed
    assert await store.mark_entered("doubt", owner="live")
    await store.mark_in_doubt("doubt", owner="live")
    assert not (await abort("doubt")).claimed
    assert (await abort("doubt", in_doubt=True)).claimed
    record = await store.get("doubt")
    assert record is not None
    assert (record.state, record.in_doubt) == (RecordState.ABORTED, False)
    # Completed: never.
    assert (await store.begin("done", fingerprint="fp", tool="t", owner="me")).claimed
    await store.complete("done", owner="me", result=b"{}")
    assert not (await abort("done", in_doubt=True)).claimed


async def test_stores_abort_an_in_doubt_key_only_for_the_run_the_reconciler_was_asked_about(
    store: AbortingStore,
) -> None:
    for owner in ("first", "second"):
        await store.register_owner(OwnerInfo(instance_id=owner, pid=1, host="elsewhere"), lease_s=30)
    assert (await store.begin("k", fingerprint="fp", tool="t", owner="first")).claimed
    assert await store.mark_entered("k", owner="first")
    await store.release_owner("first")
    # Asked about first's run; meanwhile second reclaimed the key, ran it, and died too.
    assert await store.resolve_in_doubt("k", owner="second", fingerprint="fp", result=None)
    assert await store.mark_entered("k", owner="second")
    await store.release_owner("second")

    def abort(doubted_owner: str) -> Any:
        return store.abort(
            "k", fingerprint="fp", tool="t", owner="me", in_doubt=True, doubted_owner=doubted_owner
        )

    refused = await abort("first")
    assert not refused.claimed
    assert refused.existing is not None
    assert (refused.existing.owner, refused.existing.in_doubt) == ("second", True)
    assert (await abort("second")).claimed


# --- The server side ------------------------------------------------------------------------------


async def test_a_server_advertises_lookups_and_refuses_one_without_a_key(state: State) -> None:
    app = build_server(state, store=MemoryStore(clock=trio.current_time))
    async with mcp.Client(app) as client:
        refused = await client.call_tool("record", {"label": "x"}, meta=rmcp_meta(None, lookup=True))
    side = rmcp_of(app)
    assert side is not None
    assert "lookup" in side.settings.features
    assert (rmcp_answer(refused)["ack"], rmcp_answer(refused)["code"]) == (False, "invalid_meta")
    assert state.ledger == []


async def test_lookup_of_a_completed_key_replays_its_result_without_running(state: State) -> None:
    app = build_server(state, store=MemoryStore(clock=trio.current_time))
    async with mcp.Client(app) as client:
        await client.call_tool("record", {"label": "paid"}, meta=rmcp_meta("k"))
        looked = await client.call_tool("record", {"label": "paid"}, meta=rmcp_meta("k", lookup=True))
    assert (rmcp_answer(looked)["ack"], rmcp_answer(looked)["duplicate"]) == (True, True)
    assert looked.content[0].text == "recorded paid"  # type: ignore[union-attr]
    assert state.ledger == ["paid"]
    side = rmcp_of(app)
    assert side is not None
    assert (side.statistics().executed, side.statistics().replayed) == (1, 1)


async def test_lookup_of_an_absent_key_aborts_it_and_the_late_original_is_refused(state: State) -> None:
    store = MemoryStore(clock=trio.current_time)
    app = build_server(state, store=store)
    async with mcp.Client(app) as client:
        looked = await client.call_tool("record", {"label": "late"}, meta=rmcp_meta("k", lookup=True))
        original = await client.call_tool("record", {"label": "late"}, meta=rmcp_meta("k", attempt=2))
        again = await client.call_tool("record", {"label": "late"}, meta=rmcp_meta("k", lookup=True))
        record = await store.get(store_key("k"))
    for answer in (looked, original, again):
        meta = rmcp_answer(answer)
        assert (answer.is_error, meta["ack"], meta["code"], meta["retryable"]) == (
            True,
            False,
            "aborted",
            False,
        )
    assert looked.content[0].text.startswith("RMCP aborted: a lookup found no run")  # type: ignore[union-attr]
    assert state.ledger == []
    assert record is not None
    assert record.state is RecordState.ABORTED
    side = rmcp_of(app)
    assert side is not None
    assert (side.statistics().executed, side.statistics().aborted) == (0, 1)


async def test_lookup_aborts_a_claim_whose_server_died_before_calling_the_tool(state: State) -> None:
    store = MemoryStore()
    await leave_claimed(store, "record", {"label": "x"}, entered=False)
    app = build_server(state, store=store)
    async with mcp.Client(app) as client:
        looked = await client.call_tool("record", {"label": "x"}, meta=rmcp_meta("k", lookup=True))
        original = await client.call_tool("record", {"label": "x"}, meta=rmcp_meta("k", attempt=2))
    assert rmcp_answer(looked)["code"] == rmcp_answer(original)["code"] == "aborted"
    assert state.ledger == []


@pytest.mark.parametrize(
    ("in_ledger", "reconcile", "code"),
    [(True, True, None), (False, True, "aborted"), (True, False, "in_doubt")],
    ids=["reconciler-finds-the-run", "reconciler-finds-none", "no-reconciler"],
)
async def test_lookup_of_an_in_doubt_key_asks_the_reconciler(
    state: State, in_ledger: bool, reconcile: bool, code: str | None
) -> None:
    store = MemoryStore()
    await leave_claimed(store, "record", {"label": "x"}, entered=True)
    if in_ledger:
        state.record("x")  # the run happened before its server died
    reconcilers = {"record": ledger_reconciler(state)} if reconcile else {}
    app = install(build_server(state), store=store, reconcilers=reconcilers)
    async with mcp.Client(app) as client:
        looked = await client.call_tool("record", {"label": "x"}, meta=rmcp_meta("k", lookup=True))
        original = await client.call_tool("record", {"label": "x"}, meta=rmcp_meta("k", attempt=2))
    if code is None:
        assert (rmcp_answer(looked)["duplicate"], rmcp_answer(original)["duplicate"]) == (True, True)
        assert looked.content[0].text == "recorded x"  # type: ignore[union-attr]
    else:
        assert rmcp_answer(looked)["code"] == rmcp_answer(original)["code"] == code
    # The tool never ran for the lookup, nor after it.
    assert state.ledger == (["x"] if in_ledger else [])


async def test_lookup_waits_for_a_run_in_flight(autojump_clock: trio.testing.MockClock) -> None:
    entries: list[str] = []
    app = saga_server(entries)
    async with mcp.Client(app) as client, trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: client.call_tool("book", {"label": "b", "seconds": 30}, meta=rmcp_meta("k"))
        )
        await trio.sleep(1)
        looked = await client.call_tool(
            "book", {"label": "b", "seconds": 30}, meta=rmcp_meta("k", lookup=True)
        )
    assert rmcp_answer(looked)["duplicate"] is True
    assert looked.structured_content == {"receipt": "r-b"}
    assert entries == ["book b"]


# --- Transactions ---------------------------------------------------------------------------------


def saga_server(entries: list[str], *, rmcp: bool = True, store: DedupStore | None = None) -> MCPServer:
    app = MCPServer("saga")

    @app.tool()
    async def book(label: str, seconds: float = 0) -> dict[str, str]:
        """Book ``label`` (taking ``seconds`` to answer); the receipt undoes it."""
        entries.append(f"book {label}")
        await trio.sleep(seconds)
        return {"receipt": f"r-{label}"}

    @app.tool()
    async def cancel(label: str) -> str:
        """Undo a booking (tolerates one that never happened)."""
        entries.append(f"cancel {label}")
        return "cancelled"

    if rmcp:
        install(app, store=store if store is not None else durable_store())
    return app


def cancel(label: str) -> Compensation:
    return Compensation("saga", "cancel", {"label": label})


def cancel_receipt(result: CallResult) -> Compensation:
    """Undo a booking by the receipt its result holds."""
    assert result.structured_content is not None
    return cancel(result.structured_content["receipt"])


def abandoned(tx_id: str, *steps: tuple[str, bool]) -> list[JournalRecord]:
    """The journal of a program that died in transaction ``tx_id``: each step ``(label,
    done)`` journaled its intent, and its outcome when ``done``."""
    records: list[JournalRecord] = [
        TransactionBegun(transaction_id=tx_id, name="trip", at=1.0),
        StateChanged(transaction_id=tx_id, at=1.0, state="in_progress"),
    ]
    for index, (label, done) in enumerate(steps):
        records.append(
            StepIntent(
                transaction_id=tx_id,
                step=index,
                at=time.time(),
                server="saga",
                tool="book",
                arguments={"label": label},
                idempotency_key=f"{tx_id}:{index}",
                compensation=CompensationSpec(server="saga", tool="cancel", arguments={"label": label}),
            )
        )
        if done:
            records.append(StepDone(transaction_id=tx_id, step=index, at=3.0, outcome="succeeded", ran=True))
    return records


async def journal_of(records: list[JournalRecord]) -> MemoryJournal:
    journal = MemoryJournal()
    for record in records:
        await journal.append(record)
    return journal


async def test_recovery_does_not_compensate_a_step_that_was_never_sent() -> None:
    entries: list[str] = []
    # Step 1's intent is journaled; the program died before sending it.
    journal = await journal_of(abandoned("tx", ("a", True), ("b", False)))
    async with RMCPSupervisor.open(journal=journal) as sup:
        await sup.add_server(ServerSpec.in_memory("saga", saga_server(entries)))
        await sup.call("saga", "book", {"label": "a"}, idempotency_key="tx:0")
        report = await sup.recover()
        assert report.compensated == ("tx",)
        # The lookup settled step 1's key as never run: the original, arriving late, is refused.
        with pytest.raises(RMCPNackError) as late:
            await sup.call("saga", "book", {"label": "b"}, idempotency_key="tx:1")
        assert late.value.code == "aborted"
        assert late.value.may_have_executed is False
    assert entries == ["book a", "cancel a"]
    [history] = [step for step in (await _history(journal, "tx")).steps if step.step == 1]
    assert (history.ran, history.looked_up, history.compensation_outcome) == (False, True, None)


async def test_recovery_compensates_a_step_whose_answer_was_lost_knowing_its_result() -> None:
    entries: list[str] = []
    journal = await journal_of(abandoned("tx", ("a", False)))
    async with RMCPSupervisor.open(journal=journal) as sup:
        await sup.add_server(ServerSpec.in_memory("saga", saga_server(entries)))
        # The step was sent and ran; the program died before journaling its answer.
        await sup.call("saga", "book", {"label": "a"}, idempotency_key="tx:0")
        assert (await sup.recover()).compensated == ("tx",)
    assert entries == ["book a", "cancel a"]
    [step] = (await _history(journal, "tx")).steps
    assert (step.ran, step.looked_up, step.outcome) == (True, True, "succeeded")
    assert step.result["structured_content"] == {"receipt": "r-a"}


async def _history(journal: MemoryJournal, tx_id: str) -> TransactionHistory:
    return history_of(await journal.read(tx_id))


async def test_an_unknown_step_with_a_compensation_function_is_undone_with_its_real_result(
    autojump_clock: trio.testing.MockClock,
) -> None:
    entries: list[str] = []
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("saga", saga_server(entries)))
        tx = sup.transaction("trip")
        with pytest.raises(RMCPTransactionInDoubtError):  # noqa: PT012
            async with tx:
                await tx.call("saga", "book", {"label": "a"}, compensate=cancel("a"))
                # Its answer does not come in time: its outcome is unknown, and a function of
                # its result cannot be computed without one.
                await tx.call(
                    "saga",
                    "book",
                    {"label": "b", "seconds": 30},
                    compensate=cancel_receipt,
                    timeout=5,
                )
        # The abort looked the step up (waiting for the run the server still had in flight):
        # it ran, so it is undone with its real receipt.
        assert tx.state is TransactionState.COMPENSATED
    assert entries == ["book a", "book b", "cancel r-b", "cancel a"]
    assert tx.history().steps[1].looked_up is True


@pytest.mark.parametrize("server", ["plain", "not-durable"])
async def test_never_sent_steps_are_compensated_blindly_when_the_server_cannot_vouch(server: str) -> None:
    entries: list[str] = []
    store = MemoryStore(clock=trio.current_time)
    app = saga_server(entries, rmcp=server != "plain", store=store)
    journal = await journal_of(abandoned("tx", ("a", False)))
    async with RMCPSupervisor.open(journal=journal) as sup:
        await sup.add_server(ServerSpec.in_memory("saga", app))
        assert (await sup.recover()).compensated == ("tx",)
        if server == "not-durable":
            # It was asked all the same: the key can no longer run late.
            record = await store.get(store_key("tx:0"))
            assert record is not None
            assert record.state is RecordState.ABORTED
    # A plain server is never asked; a store that forgets on restart cannot say "never ran"
    # for the runs of an earlier instance, so the step is undone as before.
    assert entries == ["cancel a"]


async def test_recovery_over_stdio_with_sqlite_does_not_compensate_a_step_never_sent(tmp_path: Path) -> None:
    spec = ServerSpec.stdio(
        "saga",
        PYTHON,
        stdio_args("--state-dir", str(tmp_path), "--rmcp-store", str(tmp_path / "dedup.db")),
        overrides=FAST_RECOVERY,
    )
    records: list[JournalRecord] = [
        TransactionBegun(transaction_id="tx", name="trip", at=1.0),
        StateChanged(transaction_id="tx", at=1.0, state="in_progress"),
    ]
    for index, label in enumerate(("seat", "card")):
        records.append(
            StepIntent(
                transaction_id="tx",
                step=index,
                at=time.time(),
                server="saga",
                tool="record",
                arguments={"label": label},
                idempotency_key=f"tx:{index}",
                compensation=CompensationSpec(
                    server="saga", tool="record", arguments={"label": f"undo {label}"}
                ),
            )
        )
    journal = await journal_of(records)
    async with RMCPSupervisor.open(journal=journal) as sup:
        await sup.add_server(spec)
        # The program sent step 0 (its answer never reached the journal), not step 1.
        await sup.call("saga", "record", {"label": "seat"}, idempotency_key="tx:0")
        assert (await sup.recover()).compensated == ("tx",)
        with pytest.raises(RMCPNackError) as late:
            await sup.call("saga", "record", {"label": "card"}, idempotency_key="tx:1")
        assert late.value.code == "aborted"
    ledger = (tmp_path / "ledger").read_text().splitlines()
    assert ledger == ["seat", "undo seat"]


class _StoreWithoutTombstones:
    """A dedup store of the protocol before lookups: no ``abort``."""

    def __init__(self) -> None:
        self.inner = MemoryStore(clock=trio.current_time)

    @property
    def durable(self) -> bool:
        return True

    def __getattr__(self, name: str) -> Any:
        if name == "abort":
            raise AttributeError(name)
        return getattr(self.inner, name)


async def test_a_lookup_is_never_sent_to_a_server_that_does_not_advertise_it() -> None:
    entries: list[str] = []
    store: Any = _StoreWithoutTombstones()
    app = saga_server(entries, store=store)
    side = rmcp_of(app)
    assert side is not None
    assert "lookup" not in side.settings.features
    journal = await journal_of(abandoned("tx", ("a", False)))
    async with RMCPSupervisor.open(journal=journal) as sup:
        await sup.add_server(ServerSpec.in_memory("saga", app))
        # Such a server ignores the flag and would run the tool: the call path refuses to send it.
        entry = sup._server("saga")
        request = CallRequest(
            tool="book",
            arguments={"label": "a"},
            request_id="r",
            idempotency_key="tx:0",
            priority=0,
            timeout_s=5,
            lookup=True,
        )
        with pytest.raises(RMCPNackError, match="does not advertise RMCP lookups"):
            await perform_call(entry.connection, entry.flow, entry.default_policy, request, random.Random())
        # Recovery compensates as before, without asking.
        assert (await sup.recover()).compensated == ("tx",)
    assert entries == ["cancel a"]


async def test_a_lookup_older_than_the_servers_ttl_is_not_taken_for_never_ran(tmp_path: Path) -> None:
    entries: list[str] = []
    offset = [-120.0]
    store = SQLiteStore(tmp_path / "dedup.db", ttl_s=60, clock=lambda: time.time() + offset[0])
    records = abandoned("tx", ("a", False))
    # The program journaled step 0 two minutes ago, sent it (it ran), and died.
    records = [msgspec.structs.replace(record, at=time.time() - 120) for record in records]
    journal = await journal_of(records)
    async with RMCPSupervisor.open(journal=journal) as sup:
        await sup.add_server(ServerSpec.in_memory("saga", saga_server(entries, store=store)))
        await sup.call("saga", "book", {"label": "a"}, idempotency_key="tx:0")
        # Recovery runs now: the server kept the key's record for 60 s only.
        offset[0] = 0.0
        assert (await sup.recover()).compensated == ("tx",)
    await store.aclose()
    # Its record gone, nobody can tell whether step 0 ran: it is undone blindly.
    assert entries == ["book a", "cancel a"]
    [step] = (await _history(journal, "tx")).steps
    assert step.looked_up is False


async def test_a_lookup_never_acts_on_a_verdict_a_run_since_has_made_stale(
    autojump_clock: trio.testing.MockClock,
) -> None:
    entries: list[str] = []
    arguments = {"label": "b", "seconds": 30}
    store = MemoryStore(clock=trio.current_time)
    # Key "k" in doubt: claimed and entered by an owner that died.
    await leave_claimed(store, "book", arguments, entered=True)
    lookup_asked, lookup_answers = trio.Event(), trio.Event()

    async def reconcile(run: InDoubtRun) -> Reconciliation:
        if not lookup_asked.is_set():
            # The lookup's question, answered late: "not run" was true when it was asked.
            lookup_asked.set()
            await lookup_answers.wait()
            return Reconciliation.did_not_run()
        return Reconciliation.unknown() if entries else Reconciliation.did_not_run()

    app = MCPServer("saga")

    @app.tool()
    async def book(label: str, seconds: float = 0) -> dict[str, str]:
        entries.append(f"book {label}")
        await trio.sleep(seconds)
        return {"receipt": f"r-{label}"}

    install(app, store=store, max_execution_s=5, reconcilers={"book": reconcile}, reconcile_timeout_s=60)
    looked: list[Any] = []
    async with mcp.Client(app) as client, trio.open_nursery() as nursery:

        async def look_up() -> None:
            looked.append(await client.call_tool("book", arguments, meta=rmcp_meta("k", lookup=True)))

        nursery.start_soon(look_up)
        await lookup_asked.wait()
        # The original's retry arrives meanwhile: "not run" for it too, so it runs the tool,
        # which max_execution_s cuts short: in doubt again, and this time the tool ran.
        original = await client.call_tool("book", arguments, meta=rmcp_meta("k", attempt=2))
        assert rmcp_answer(original)["code"] == "in_doubt"
        assert entries == ["book b"]
        lookup_answers.set()
    assert rmcp_answer(looked[0]).get("code") != "aborted"


async def test_a_lookup_never_acts_on_a_verdict_another_servers_run_has_made_stale(tmp_path: Path) -> None:
    entries: list[str] = []
    arguments = {"label": "b", "seconds": 30}
    stores = [SQLiteStore(tmp_path / "dedup.db"), SQLiteStore(tmp_path / "dedup.db")]
    # Key "k" in doubt: claimed and entered by an owner that died.
    await leave_claimed(stores[0], "book", arguments, entered=True)
    lookup_asked, lookup_answers = trio.Event(), trio.Event()

    async def slow_reconcile(run: InDoubtRun) -> Reconciliation:
        if not lookup_asked.is_set():
            # The lookup's question, answered late: "not run" was true when it was asked.
            lookup_asked.set()
            await lookup_answers.wait()
            return Reconciliation.did_not_run()
        return Reconciliation.unknown() if entries else Reconciliation.did_not_run()

    async def reconcile(run: InDoubtRun) -> Reconciliation:
        return Reconciliation.did_not_run()

    def server(store: SQLiteStore, reconciler: Any) -> MCPServer:
        app = MCPServer("saga")

        @app.tool()
        async def book(label: str, seconds: float = 0) -> dict[str, str]:
            entries.append(f"book {label}")
            await trio.sleep(seconds)
            return {"receipt": f"r-{label}"}

        return install(app, store=store, max_execution_s=0.2, reconcilers={"book": reconciler})

    looked: list[Any] = []
    async with (
        mcp.Client(server(stores[0], slow_reconcile)) as first,
        mcp.Client(server(stores[1], reconcile)) as second,
        trio.open_nursery() as nursery,
    ):

        async def look_up() -> None:
            looked.append(await first.call_tool("book", arguments, meta=rmcp_meta("k", lookup=True)))

        nursery.start_soon(look_up)
        await lookup_asked.wait()
        # The original's retry reaches the other server meanwhile: it runs the tool, which
        # max_execution_s cuts short: in doubt again, and this time the tool ran.
        original = await second.call_tool("book", arguments, meta=rmcp_meta("k", attempt=2))
        assert rmcp_answer(original)["code"] == "in_doubt"
        assert entries == ["book b"]
        lookup_answers.set()
    assert rmcp_answer(looked[0]).get("code") != "aborted"


async def test_a_lookup_retried_after_its_answer_was_lost_still_learns_never_ran(tmp_path: Path) -> None:
    spec = ServerSpec.stdio(
        "saga",
        PYTHON,
        stdio_args(
            "--state-dir",
            str(tmp_path),
            "--rmcp-store",
            str(tmp_path / "dedup.db"),
            "--die-after-abort",
            str(tmp_path / "aborted"),
        ),
        overrides=FAST_RECOVERY,
    )
    records: list[JournalRecord] = [
        TransactionBegun(transaction_id="tx", name="trip", at=time.time()),
        StateChanged(transaction_id="tx", at=time.time(), state="in_progress"),
        StepIntent(
            transaction_id="tx",
            step=0,
            at=time.time(),
            server="saga",
            tool="record",
            arguments={"label": "seat"},
            idempotency_key="tx:0",
            compensation=CompensationSpec(server="saga", tool="record", arguments={"label": "undo seat"}),
        ),
    ]
    journal = await journal_of(records)
    async with RMCPSupervisor.open(journal=journal) as sup:
        await sup.add_server(spec)
        # The program died before sending step 0. The lookup's first answer is lost with its
        # server (the tombstone is on disk); its retry, on a new server process, is told aborted.
        assert (await sup.recover()).compensated == ("tx",)
    assert (tmp_path / "aborted").exists()
    ledger = tmp_path / "ledger"
    assert (ledger.read_text().splitlines() if ledger.exists() else []) == []
    [step] = (await _history(journal, "tx")).steps
    assert (step.ran, step.looked_up) == (False, True)
