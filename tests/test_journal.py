"""The transaction journals: one conformance suite over both journals, then SQLite's own
guarantees (durability across reopening and SIGKILL, group commit, schema, errors)."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rmcp_actors import RMCPConfigError, RMCPStoreClosedError, RMCPStoreError, TransactionSettings
from rmcp_actors.stores import MemoryJournal, SQLiteJournal
from rmcp_actors.stores.journal_factory import journal_from_settings
from rmcp_actors.transactions import Journal, TransactionState
from rmcp_actors.transactions.journal import (
    CompensationDone,
    CompensationSpec,
    CompensationStarted,
    JournalRecord,
    StateChanged,
    StepDone,
    StepIntent,
    StepResolved,
    TransactionBegun,
    decode_record,
    encode_record,
    summarize,
)

ROOT = Path(__file__).resolve().parent.parent


def begun(tx: str, at: float, name: str = "book") -> TransactionBegun:
    return TransactionBegun(transaction_id=tx, name=name, at=at, resources=(("account:1", False),))


def state(tx: str, at: float, new: TransactionState, reason: str | None = None) -> StateChanged:
    return StateChanged(transaction_id=tx, at=at, state=new.value, reason=reason)


def intent(tx: str, at: float, step: int) -> StepIntent:
    return StepIntent(
        transaction_id=tx,
        step=step,
        at=at,
        server="shop",
        tool="reserve",
        arguments={"seat": step, "note": "é"},
        idempotency_key=f"{tx}:{step}",
        compensation=CompensationSpec(server="shop", tool="release", arguments={"seat": step}),
    )


def done(tx: str, at: float, step: int) -> StepDone:
    return StepDone(
        transaction_id=tx,
        step=step,
        at=at,
        outcome="succeeded",
        ran=True,
        attempts=2,
        result=msgspec.Raw(b'{"content":[],"is_error":false}'),
    )


def a_whole_saga(tx: str, start: float) -> list[JournalRecord]:
    """A transaction that ran two steps, failed, and compensated both."""
    return [
        begun(tx, start),
        state(tx, start + 1, TransactionState.IN_PROGRESS),
        intent(tx, start + 2, 0),
        done(tx, start + 3, 0),
        intent(tx, start + 4, 1),
        done(tx, start + 5, 1),
        state(tx, start + 6, TransactionState.COMPENSATING, reason="step 2 failed"),
        CompensationStarted(transaction_id=tx, step=1, at=start + 7, idempotency_key=f"{tx}:1:compensate"),
        CompensationDone(transaction_id=tx, step=1, at=start + 8, succeeded=True, attempts=1),
        StepResolved(transaction_id=tx, step=0, at=start + 9, ran=True),
        state(tx, start + 10, TransactionState.COMPENSATED),
    ]


@pytest.fixture(params=["memory", "sqlite"])
async def journal(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Journal]:
    opened: Journal = MemoryJournal() if request.param == "memory" else SQLiteJournal(tmp_path / "journal.db")
    yield opened
    await opened.aclose()


# Shared semantics


async def test_journals_satisfy_the_protocol(journal: Journal) -> None:
    assert isinstance(journal, Journal)


async def test_read_returns_each_transaction_in_append_order(journal: Journal) -> None:
    first, second = a_whole_saga("tx-a", 100.0), a_whole_saga("tx-b", 200.0)
    for one, other in zip(first, second, strict=True):
        await journal.append(one)
        await journal.append(other)
    assert await journal.read("tx-a") == first
    assert await journal.read("tx-b") == second
    assert await journal.read("tx-unknown") == []


async def test_summaries_filter_by_state_oldest_first(journal: Journal) -> None:
    await journal.append(begun("late", 300.0, name="late"))
    for record in a_whole_saga("done", 100.0):
        await journal.append(record)
    await journal.append(begun("running", 200.0, name="running"))
    await journal.append(state("running", 201.0, TransactionState.IN_PROGRESS))
    await journal.append(intent("running", 202.0, 0))
    await journal.append(intent("running", 203.0, 1))

    everything = await journal.summaries()
    assert [summary.transaction_id for summary in everything] == ["done", "running", "late"]
    for summary in everything:
        assert summary == summarize(await journal.read(summary.transaction_id))
    running = everything[1]
    assert (running.name, running.state, running.steps) == ("running", TransactionState.IN_PROGRESS, 2)
    assert (running.started_at, running.updated_at) == (200.0, 203.0)

    incomplete = await journal.summaries({TransactionState.INITIATED, TransactionState.IN_PROGRESS})
    assert [summary.transaction_id for summary in incomplete] == ["running", "late"]
    compensated = await journal.summaries([TransactionState.COMPENSATED])
    assert [(summary.transaction_id, summary.steps) for summary in compensated] == [("done", 2)]
    assert await journal.summaries(()) == []


async def test_closed_journal_refuses_calls(journal: Journal) -> None:
    await journal.append(begun("tx", 1.0))
    await journal.aclose()
    await journal.aclose()  # closing twice is harmless
    with pytest.raises(RMCPStoreClosedError, match="closed"):
        await journal.append(begun("other", 2.0))
    with pytest.raises(RMCPStoreClosedError):
        await journal.read("tx")
    with pytest.raises(RMCPStoreClosedError):
        await journal.summaries()


async def test_concurrent_appends_all_land(journal: Journal) -> None:
    async def run(tx: str) -> None:
        for record in a_whole_saga(tx, 10.0):
            await journal.append(record)

    async with trio.open_nursery() as nursery:
        for index in range(20):
            nursery.start_soon(run, f"tx-{index}")
    for index in range(20):
        assert await journal.read(f"tx-{index}") == a_whole_saga(f"tx-{index}", 10.0)
    assert len(await journal.summaries([TransactionState.COMPENSATED])) == 20


@pytest.mark.parametrize("result", [None, msgspec.Raw(b'{"content": [{"type": "text"}]}')])
def test_step_done_round_trips_with_and_without_result(result: msgspec.Raw | None) -> None:
    record = StepDone(transaction_id="tx", step=0, at=1.0, outcome="unknown", result=result)
    assert decode_record(encode_record(record)) == record


def test_durable_flags(tmp_path: Path) -> None:
    assert not MemoryJournal().durable
    assert SQLiteJournal(tmp_path / "journal.db").durable


# The summary table against summarize(), over random interleavings of transactions

transaction_ids = st.sampled_from(["t0", "t1", "t2"])
later_records = st.one_of(
    st.builds(
        lambda tx, at, new: state(tx, at, new),
        transaction_ids,
        st.floats(0, 1_000),
        st.sampled_from(TransactionState),
    ),
    st.builds(intent, transaction_ids, st.floats(0, 1_000), st.integers(0, 5)),
    st.builds(done, transaction_ids, st.floats(0, 1_000), st.integers(0, 5)),
    st.builds(
        lambda tx, at, step: StepResolved(transaction_id=tx, step=step, at=at, ran=False),
        transaction_ids,
        st.floats(0, 1_000),
        st.integers(0, 5),
    ),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    starts=st.lists(st.floats(0, 1_000), min_size=3, max_size=3),
    names=st.lists(st.text(max_size=5), min_size=3, max_size=3),
    later=st.lists(later_records, max_size=30),
)
def test_sqlite_summaries_match_summarize(
    tmp_path_factory: pytest.TempPathFactory,
    starts: list[float],
    names: list[str],
    later: list[JournalRecord],
) -> None:
    records: list[JournalRecord] = [
        begun(f"t{index}", start, name) for index, (start, name) in enumerate(zip(starts, names, strict=True))
    ]
    records += later

    async def check() -> None:
        journal = SQLiteJournal(tmp_path_factory.mktemp("journal") / "journal.db")
        try:
            for record in records:
                await journal.append(record)
            expected = sorted(
                (summarize([r for r in records if r.transaction_id == tx]) for tx in ("t0", "t1", "t2")),
                key=lambda summary: summary.started_at,
            )
            assert await journal.summaries() == expected
            for wanted in TransactionState:
                assert await journal.summaries([wanted]) == [s for s in expected if s.state is wanted]
        finally:
            await journal.aclose()

    trio.run(check)


# SQLite's own guarantees


async def test_sqlite_records_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    journal = SQLiteJournal(path, synchronous="full")
    records = a_whole_saga("tx", 1.0)
    for record in records:
        await journal.append(record)
    await journal.aclose()
    reopened = SQLiteJournal(path)
    try:
        assert await reopened.read("tx") == records
        assert [summary.state for summary in await reopened.summaries()] == [TransactionState.COMPENSATED]
    finally:
        await reopened.aclose()


async def test_sqlite_concurrent_appends_share_commits(tmp_path: Path) -> None:
    # "full": every append goes through the queue ("normal" ones commit inline when they can).
    journal = SQLiteJournal(tmp_path / "journal.db", synchronous="full")

    async def run(tx: str) -> None:
        for record in a_whole_saga(tx, 1.0):
            await journal.append(record)

    try:
        async with trio.open_nursery() as nursery:
            for index in range(20):
                nursery.start_soon(run, f"tx-{index}")
        statistics = journal.statistics()
        assert statistics.appends == 20 * len(a_whole_saga("tx", 1.0))
        # Sequential appends would take one commit each.
        assert statistics.commits < statistics.appends / 5
        assert statistics.largest_batch >= 10
        assert statistics.queued == 0
    finally:
        await journal.aclose()


async def test_sqlite_normal_appends_commit_inline_and_keep_the_wal_bounded(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    journal = SQLiteJournal(path)
    appends = 3_000
    try:
        for index in range(appends):
            await journal.append(begun(f"tx-{index}", float(index)))
        statistics = journal.statistics()
        other = sqlite3.connect(path)
        try:
            # Committed, and visible to any other connection.
            assert other.execute("SELECT COUNT(*) FROM journal_records").fetchone()[0] == appends
            page_size = other.execute("PRAGMA page_size").fetchone()[0]
        finally:
            other.close()
        wal_pages = path.with_name(path.name + "-wal").stat().st_size // page_size
    finally:
        await journal.aclose()
    # The first append opens the file through the queue, and so does one in a run of inline
    # appends: the main connection checkpoints after its commits, the inline one never does.
    assert statistics.inline_appends + statistics.appends == appends
    assert statistics.appends < appends / 50
    # SQLite checkpoints past 1,000 pages; without those commits the WAL would hold every record.
    assert wal_pages < 2_000


async def test_sqlite_append_waits_for_another_writer_in_the_worker_not_on_the_loop(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    journal = SQLiteJournal(path)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        await journal.append(begun("opens", 1.0))
        await journal.append(begun("inline", 2.0))
        before = journal.statistics()
        other.execute("BEGIN IMMEDIATE")  # another process's write lock
        started = time.monotonic()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(journal.append, begun("waits", 3.0))
            # The append waits in a worker thread: the loop never waited for the lock (an
            # inline commit that waited would stall it for its busy timeout).
            await trio.testing.wait_all_tasks_blocked()
            assert time.monotonic() - started < 0.5
            assert journal.statistics().queued == 0
            other.execute("COMMIT")
        after = journal.statistics()
        assert await journal.read("waits") == [begun("waits", 3.0)]
    finally:
        other.close()
        await journal.aclose()
    assert before.inline_appends == 1
    assert after.inline_appends == 1
    assert after.appends == before.appends + 1


async def test_sqlite_full_appends_never_commit_on_the_event_loop(tmp_path: Path) -> None:
    journal = SQLiteJournal(tmp_path / "journal.db", synchronous="full")
    try:
        for record in a_whole_saga("tx", 1.0):
            await journal.append(record)
        statistics = journal.statistics()
    finally:
        await journal.aclose()
    # An fsync in the worker thread, not on the loop.
    assert statistics.inline_appends == 0
    assert statistics.appends == statistics.commits == len(a_whole_saga("tx", 1.0))


async def test_sqlite_two_journals_share_one_file(tmp_path: Path) -> None:
    """Several processes may open the journal: each sees the other's committed records."""
    path = tmp_path / "journal.db"
    first, second = SQLiteJournal(path), SQLiteJournal(path)
    try:
        async with trio.open_nursery() as nursery:
            for journal, tx in ((first, "a"), (second, "b")):
                for record in a_whole_saga(tx, 1.0):
                    nursery.start_soon(journal.append, record)
        for journal in (first, second):
            assert {summary.transaction_id for summary in await journal.summaries()} == {"a", "b"}
            assert len(await journal.read("a")) == len(a_whole_saga("a", 1.0))
    finally:
        await first.aclose()
        await second.aclose()


async def test_sqlite_append_cancelled_while_queued_is_dropped(tmp_path: Path) -> None:
    journal = SQLiteJournal(tmp_path / "journal.db")
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(journal.append, begun("committing", 1.0))
            await trio.testing.wait_all_tasks_blocked()
            with trio.CancelScope() as queued_scope:
                queued_scope.cancel()
                await journal.append(begun("cancelled", 2.0))
        assert queued_scope.cancelled_caught
        assert [summary.transaction_id for summary in await journal.summaries()] == ["committing"]
    finally:
        await journal.aclose()


async def test_sqlite_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    journal = SQLiteJournal(path)
    await journal.append(begun("tx", 1.0))
    await journal.aclose()
    with contextlib.closing(sqlite3.connect(path)) as connection, connection:
        connection.execute("UPDATE journal_schema SET version = 99")
    newer = SQLiteJournal(path)
    try:
        with pytest.raises(RMCPStoreError, match=r"schema version 99.*upgrade rmcp_actors"):
            await newer.read("tx")
    finally:
        await newer.aclose()


async def test_sqlite_failures_are_store_errors_naming_the_operation(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    journal = SQLiteJournal(path, busy_timeout_s=0.05)
    try:
        await journal.append(begun("tx", 1.0))
        with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as other:
            other.execute("BEGIN IMMEDIATE")
            with pytest.raises(RMCPStoreError, match="locked") as caught:
                await journal.append(begun("blocked", 2.0))
            other.execute("ROLLBACK")
        # The failed append left nothing behind, and the journal still works.
        await journal.append(begun("after", 3.0))
        assert [summary.transaction_id for summary in await journal.summaries()] == ["tx", "after"]
    finally:
        await journal.aclose()
    assert caught.value.operation == "append"
    assert isinstance(caught.value.__cause__, sqlite3.OperationalError)
    assert str(path) in str(caught.value)


async def test_sqlite_files_are_readable_by_their_owner_only(tmp_path: Path) -> None:
    """Records hold the tools' arguments: no other user of the host may read them."""
    path = tmp_path / "journal.db"
    old_umask = os.umask(0o022)
    try:
        journal = SQLiteJournal(path)
        try:
            await journal.append(begun("tx", 1.0))
            modes = {
                suffix: path.with_name(path.name + suffix).stat().st_mode & 0o777
                for suffix in ("", "-wal", "-shm")
            }
        finally:
            await journal.aclose()
    finally:
        os.umask(old_umask)
    assert modes == {"": 0o600, "-wal": 0o600, "-shm": 0o600}


@pytest.mark.parametrize(
    ("keywords", "message"),
    [({"synchronous": "off"}, '"normal" or "full"'), ({"busy_timeout_s": -1.0}, "zero or more")],
)
def test_sqlite_journal_rejects_bad_settings(
    tmp_path: Path, keywords: dict[str, object], message: str
) -> None:
    with pytest.raises(RMCPConfigError, match=message):
        SQLiteJournal(tmp_path / "journal.db", **keywords)  # type: ignore[arg-type]


# A crash right after appends were acknowledged

_APPENDER = textwrap.dedent(
    """
    import sys, trio
    from rmcp_actors.stores import SQLiteJournal
    from rmcp_actors.transactions.journal import TransactionBegun

    async def main(path, synchronous):
        journal = SQLiteJournal(path, synchronous=synchronous)

        async def append(index):
            await journal.append(TransactionBegun(transaction_id=f"tx-{index}", name="n", at=float(index)))
            # Acknowledged: the parent may kill us from now on and expects the record.
            sys.stdout.write(f"tx-{index}\\n")
            sys.stdout.flush()

        index = 0
        while True:
            async with trio.open_nursery() as nursery:
                for _ in range(8):
                    nursery.start_soon(append, index)
                    index += 1

    trio.run(main, sys.argv[1], sys.argv[2])
    """
)


@pytest.mark.parametrize("synchronous", ["normal", "full"])
def test_sqlite_acknowledged_records_survive_sigkill(tmp_path: Path, synchronous: str) -> None:
    path = tmp_path / "journal.db"
    process = subprocess.Popen(
        [sys.executable, "-c", _APPENDER, str(path), synchronous],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        text=True,
    )
    assert process.stdout is not None
    acknowledged: list[str] = []
    try:
        while len(acknowledged) < 200:
            line = process.stdout.readline()
            assert line, f"the appender exited early with {process.wait()}"
            acknowledged.append(line.strip())
        # Killed in the middle of its commits: records in flight may or may not be there.
        process.send_signal(signal.SIGKILL)
        acknowledged += process.stdout.read().split()
    finally:
        process.kill()
        process.wait()
        process.stdout.close()
    assert process.returncode == -signal.SIGKILL

    async def read_back() -> set[str]:
        journal = SQLiteJournal(path)
        try:
            for tx in acknowledged:
                expected = TransactionBegun(transaction_id=tx, name="n", at=float(tx.removeprefix("tx-")))
                assert await journal.read(tx) == [expected]
            return {summary.transaction_id for summary in await journal.summaries()}
        finally:
            await journal.aclose()

    assert set(acknowledged) <= trio.run(read_back)


# The journal the [transactions] settings ask for


async def test_settings_choose_the_journal(tmp_path: Path) -> None:
    assert isinstance(journal_from_settings(TransactionSettings()), MemoryJournal)
    path = tmp_path / "configured.db"
    journal = journal_from_settings(TransactionSettings(journal=str(path), synchronous="full"))
    try:
        assert isinstance(journal, SQLiteJournal)
        await journal.append(begun("tx", 1.0))
    finally:
        await journal.aclose()
    with contextlib.closing(sqlite3.connect(path)) as connection:
        assert connection.execute("SELECT transaction_id FROM journal_transactions").fetchall() == [("tx",)]
