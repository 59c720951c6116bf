"""The SQLite store's fast path (``ImmediateStore``): claims, entered marks and results
committed on the event loop's thread, as durably as through the group commit, and only when
nothing would wait."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import sqlite3
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.lowlevel

from rmcp_actors import RMCPStoreClosedError
from rmcp_actors.stores import OwnerInfo, RecordState, SQLiteStore, _sqlite_batch
from rmcp_actors.stores._base import immediate

LEASE_S = 30.0
#: The slow-fsync guard's budget, pinned away in every test but the guard's own: a loaded machine
#: fsyncs in over 2 ms at times, which turns inline results off (as it should) and would make
#: these tests depend on the disk.
REAL_FSYNC_BUDGET_S = _sqlite_batch._INLINE_FSYNC_BUDGET_S  # pyright: ignore[reportPrivateUsage]
PIN_BUDGET = (
    "from rmcp_actors.stores import _sqlite_batch; _sqlite_batch._INLINE_FSYNC_BUDGET_S = float('inf')"
)


@pytest.fixture(autouse=True)
def fsync_budget_pinned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_sqlite_batch, "_INLINE_FSYNC_BUDGET_S", float("inf"))


def owner_info(instance_id: str = "a") -> OwnerInfo:
    return OwnerInfo(instance_id=instance_id, pid=os.getpid(), host=socket.gethostname())


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    """A store whose file is open (an owner registered through the queue: the first write
    creates the schema, and no purge is due for a minute)."""
    store = SQLiteStore(tmp_path / "dedup.db")
    await store.register_owner(owner_info("a"), LEASE_S)
    yield store
    await store.aclose()


def stored(path: Path, key: str) -> tuple[str, int, bytes | None] | None:
    """The state, entered mark and result of ``key`` in the file, read behind the store's back."""
    with contextlib.closing(sqlite3.connect(path)) as connection:
        return connection.execute(
            "SELECT state, entered, result FROM records WHERE key = ?", (key,)
        ).fetchone()


def claim_now(store: SQLiteStore, key: str, owner: str = "a", *, entered: bool = False) -> bool | None:
    outcome = store.begin_now(key, fingerprint="fp", tool="tool", owner=owner, entered=entered)
    return None if outcome is None else outcome.claimed


async def test_the_sqlite_store_is_an_immediate_store(store: SQLiteStore) -> None:
    assert immediate(store) is store


async def test_the_hot_path_commits_at_once_without_the_worker_thread(
    store: SQLiteStore, tmp_path: Path
) -> None:
    commits = store.statistics().commits
    assert claim_now(store, "k") is True
    assert store.mark_entered_now("k", owner="a") is True
    assert store.complete_now("k", owner="a", result=b"r") is True
    # Committed, and visible to any other connection.
    assert stored(tmp_path / "dedup.db", "k") == (RecordState.COMPLETED.value, 1, b"r")
    statistics = store.statistics()
    assert statistics.commits == commits
    assert (statistics.inline_claims, statistics.inline_results) == (2, 1)
    record = await store.get("k")
    assert record is not None
    assert (record.state, record.result) == (RecordState.COMPLETED, b"r")


async def test_a_result_committed_at_once_is_fsynced_and_a_claim_is_not(store: SQLiteStore) -> None:
    """complete_now commits with synchronous=FULL (the WAL is fsynced, with the claims before
    it), begin_now and mark_entered_now with NORMAL (in the WAL: a crash of the process keeps
    them)."""
    assert claim_now(store, "open") is True  # opens the inline connection
    assert store.complete_now("open", owner="a", result=b"r") is True
    connection = store._batch._inline  # pyright: ignore[reportPrivateUsage]
    assert connection is not None
    statements: list[str] = []
    connection.set_trace_callback(statements.append)
    modes: dict[str, int] = {}

    def committed(what: str) -> None:
        modes[what] = connection.execute("PRAGMA synchronous").fetchone()[0]

    assert claim_now(store, "k") is True
    committed("begin")
    assert store.mark_entered_now("k", owner="a") is True
    committed("mark_entered")
    assert store.complete_now("k", owner="a", result=b"r") is True
    committed("complete")
    # 1 is NORMAL, 2 is FULL.
    assert modes == {"begin": 1, "mark_entered": 1, "complete": 2}
    # The mode was set before the transaction that stored the result, not after it.
    update = next(index for index, text in enumerate(statements) if "SET state" in text)
    before = [text for text in statements[:update] if "synchronous" in text]
    assert before[-1] == "PRAGMA synchronous = FULL"
    assert statements[update + 1] == "COMMIT"


CHILD = """
import os, signal, socket, sys
import anyio
from rmcp_actors.stores import OwnerInfo, SQLiteStore
PIN_BUDGET

async def main() -> None:
    store = SQLiteStore(sys.argv[1])
    me = OwnerInfo(instance_id="child", pid=os.getpid(), host=socket.gethostname())
    await store.register_owner(me, 3600.0)
    claimed = store.begin_now("claimed", fingerprint="fp", tool="tool", owner="child")
    entered = store.begin_now("entered", fingerprint="fp", tool="tool", owner="child", entered=True)
    marked = store.begin_now("marked", fingerprint="fp", tool="tool", owner="child")
    assert claimed is not None and entered is not None and marked is not None
    assert claimed.claimed and entered.claimed and marked.claimed
    assert store.mark_entered_now("marked", owner="child") is True
    assert store.begin_now("done", fingerprint="fp", tool="tool", owner="child", entered=True) is not None
    # Other claims are in flight: the result is left for a group commit.
    assert not store.complete_now("done", owner="child", result=b"result")
    await store.complete("done", owner="child", result=b"result")
    # Nothing in the worker thread since the claims: they are in the inline connection's WAL.
    os.kill(os.getpid(), signal.SIGKILL)

anyio.run(main)  # asyncio: the store must not depend on trio
"""


async def test_claims_committed_at_once_survive_a_crash_of_the_process(tmp_path: Path) -> None:
    path = tmp_path / "dedup.db"
    completed = await trio.run_process(
        [sys.executable, "-c", CHILD.replace("PIN_BUDGET", PIN_BUDGET), str(path)],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert completed.returncode == -signal.SIGKILL, completed.stderr.decode()
    store = SQLiteStore(path)
    try:
        records = {key: await store.get(key) for key in ("claimed", "entered", "marked", "done")}
    finally:
        await store.aclose()
    assert all(record is not None for record in records.values())
    states = {
        key: (record.state, record.entered, record.owner_alive) for key, record in records.items() if record
    }
    assert states == {
        "claimed": (RecordState.STARTED, False, False),
        "entered": (RecordState.STARTED, True, False),
        "marked": (RecordState.STARTED, True, False),
        "done": (RecordState.COMPLETED, True, False),
    }
    # The crashed owner's entered claims are in doubt, its claim never entered is free again.
    assert records["entered"] is not None
    assert records["entered"].in_doubt
    assert records["claimed"] is not None
    assert not records["claimed"].in_doubt


CHILD_RESULT = """
import os, signal, socket, sys
import anyio
from rmcp_actors.stores import OwnerInfo, SQLiteStore
PIN_BUDGET

async def main() -> None:
    store = SQLiteStore(sys.argv[1])
    me = OwnerInfo(instance_id="child", pid=os.getpid(), host=socket.gethostname())
    await store.register_owner(me, 3600.0)
    assert store.begin_now("k", fingerprint="fp", tool="tool", owner="child", entered=True) is not None
    assert store.complete_now("k", owner="child", result=b"result")
    os.kill(os.getpid(), signal.SIGKILL)

anyio.run(main)
"""


async def test_a_result_committed_at_once_survives_a_crash_of_the_process(tmp_path: Path) -> None:
    path = tmp_path / "dedup.db"
    completed = await trio.run_process(
        [sys.executable, "-c", CHILD_RESULT.replace("PIN_BUDGET", PIN_BUDGET), str(path)],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert completed.returncode == -signal.SIGKILL, completed.stderr.decode()
    assert stored(path, "k") == (RecordState.COMPLETED.value, 1, b"result")


async def test_complete_now_leaves_the_result_to_the_group_commit_while_another_claim_is_in_flight(
    store: SQLiteStore, tmp_path: Path
) -> None:
    assert claim_now(store, "k1") is True
    assert claim_now(store, "k2") is True
    # k2's result may come soon: one fsync and one thread hop for both beats two fsyncs.
    assert not store.complete_now("k1", owner="a", result=b"r1")
    assert stored(tmp_path / "dedup.db", "k1") == (RecordState.STARTED.value, 0, None)
    commits = store.statistics().commits
    await store.complete("k1", owner="a", result=b"r1")
    assert store.statistics().commits == commits + 1
    # k1 is done: k2 is the only claim in flight, nobody to batch with.
    assert store.complete_now("k2", owner="a", result=b"r2")
    assert stored(tmp_path / "dedup.db", "k2") == (RecordState.COMPLETED.value, 0, b"r2")


async def test_claims_finished_otherwise_are_no_longer_in_flight(store: SQLiteStore) -> None:
    """Released, marked in doubt, taken over or refused: none leaves a claim counted, which
    would send every later result through the worker thread."""
    await store.register_owner(owner_info("b"), LEASE_S)
    assert claim_now(store, "released") is True
    assert await store.release("released", owner="a")
    assert claim_now(store, "doubted") is True
    await store.mark_in_doubt("doubted", owner="a")
    assert claim_now(store, "lost") is True
    await store.release_owner("a")
    assert store.mark_entered_now("lost", owner="a") is False
    assert claim_now(store, "refused", entered=True) is False
    assert claim_now(store, "k", owner="b") is True
    assert store.complete_now("k", owner="b", result=b"r")


async def test_concurrent_runs_share_the_fsync_of_a_group_commit(store: SQLiteStore) -> None:
    async def run(index: int) -> None:
        key = f"k{index}"
        outcome = await store.begin(key, fingerprint="fp", tool="tool", owner="a")
        assert outcome.claimed
        await trio.lowlevel.checkpoint()
        await store.complete(key, owner="a", result=b"r")

    async with trio.open_nursery() as nursery:
        for index in range(20):
            nursery.start_soon(run, index)
    statistics = store.statistics()
    # The claims were counted as they committed, before any run recorded its result: at most
    # the last one or two results found nobody left to batch with.
    assert statistics.inline_results <= 2
    assert statistics.largest_batch >= 10


async def test_complete_now_waits_for_nothing_while_a_flush_runs(store: SQLiteStore, tmp_path: Path) -> None:
    assert claim_now(store, "k") is True
    gate = threading.Event()
    async with trio.open_nursery() as nursery:
        # A write of this store held in the worker thread: the flush is running.
        nursery.start_soon(store._batch.write, lambda _connection: gate.wait(10))  # pyright: ignore[reportPrivateUsage]
        await trio.sleep(0.05)
        started = time.monotonic()
        assert not store.complete_now("k", owner="a", result=b"r")
        assert claim_now(store, "k2") is None
        assert store.mark_entered_now("k", owner="a") is None
        assert time.monotonic() - started < 0.5
        gate.set()
    assert stored(tmp_path / "dedup.db", "k") == (RecordState.STARTED.value, 0, None)
    assert store.complete_now("k", owner="a", result=b"r")


async def test_a_database_locked_by_another_connection_sends_every_write_to_the_queue(
    store: SQLiteStore, tmp_path: Path
) -> None:
    """Another process's write lock: the fast path returns at once, writing nothing; the async
    methods then wait for the lock in the worker thread (exclusion across processes holds)."""
    path = tmp_path / "dedup.db"
    assert claim_now(store, "k") is True
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        assert claim_now(store, "k2") is None
        assert store.mark_entered_now("k", owner="a") is None
        assert not store.complete_now("k", owner="a", result=b"r")
        # timeout=0 on the inline connection: no busy wait (the main one waits up to 10 s).
        assert time.monotonic() - started < 0.5
        other.execute("INSERT INTO records VALUES ('k2', 'fp', 'tool', 'started', 'b', NULL, 0, 1e12, 1)")
        other.execute("COMMIT")
    finally:
        other.close()
    # The other connection's claim is seen, not overwritten.
    outcome = store.begin_now("k2", fingerprint="fp", tool="tool", owner="a")
    assert outcome is not None
    assert not outcome.claimed
    assert outcome.existing is not None
    assert outcome.existing.owner == "b"


async def test_two_stores_on_one_file_claim_a_key_once(tmp_path: Path) -> None:
    path = tmp_path / "dedup.db"
    first, second = SQLiteStore(path), SQLiteStore(path)
    try:
        await first.register_owner(owner_info("a"), LEASE_S)
        await second.register_owner(owner_info("b"), LEASE_S)
        assert claim_now(first, "k", "a", entered=True) is True
        outcome = second.begin_now("k", fingerprint="fp", tool="tool", owner="b")
        assert outcome is not None
        assert not outcome.claimed
        assert outcome.existing is not None
        assert outcome.existing.owner == "a"
        assert first.complete_now("k", owner="a", result=b"mine")
        # Not the claimant: done at once, as complete() is, and changes nothing.
        assert second.complete_now("k", owner="b", result=b"theirs")
    finally:
        await first.aclose()
        await second.aclose()
    assert stored(path, "k") == (RecordState.COMPLETED.value, 1, b"mine")


async def test_a_slow_fsync_keeps_results_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While FULL commits measure slower than the budget (a network filesystem, a busy
    disk), results go to the worker thread; once they measure fast again, inline resumes."""
    step = [0.005]
    ticks = itertools.count()

    def timer() -> float:
        # Each reading is step later than the one before: every commit measures step.
        return next(ticks) * step[0]

    monkeypatch.setattr(_sqlite_batch, "_INLINE_FSYNC_BUDGET_S", REAL_FSYNC_BUDGET_S)
    monkeypatch.setattr(_sqlite_batch, "_timer", timer)
    store = SQLiteStore(tmp_path / "dedup.db")
    try:
        await slow_then_fast(store, tmp_path, step)
    finally:
        await store.aclose()


async def slow_then_fast(store: SQLiteStore, tmp_path: Path, step: list[float]) -> None:
    await store.register_owner(owner_info("a"), LEASE_S)  # a FULL commit in the worker thread
    assert store._batch.fsync_s == pytest.approx(0.005)  # pyright: ignore[reportPrivateUsage]
    assert claim_now(store, "k0") is True
    assert not store.complete_now("k0", owner="a", result=b"r")
    assert stored(tmp_path / "dedup.db", "k0") == (RecordState.STARTED.value, 0, None)
    step[0] = 0.0001
    inline_after = None
    for index in range(10):
        key = f"k{index}"
        if index:
            assert claim_now(store, key) is True
        before = store.statistics().inline_results
        await store.complete(key, owner="a", result=b"r")
        if store.statistics().inline_results > before:
            inline_after = index
            break
    # A moving average: a few fast commits in the worker thread bring it under the budget.
    assert inline_after is not None
    assert 2 <= inline_after <= 6


async def test_no_claim_at_once_with_fsync_claims_or_a_purge_due(tmp_path: Path) -> None:
    fsynced = SQLiteStore(tmp_path / "fsynced.db", fsync_claims=True)
    fresh = SQLiteStore(tmp_path / "fresh.db")
    try:
        await fsynced.register_owner(owner_info("a"), LEASE_S)
        assert claim_now(fsynced, "k") is None
        assert await fsynced.begin("k", fingerprint="fp", tool="tool", owner="a")
        assert fsynced.mark_entered_now("k", owner="a") is None
        assert fsynced.statistics().inline_claims == 0
        # Not open yet, and its first write carries the purge: nothing at once.
        assert claim_now(fresh, "k") is None
        assert not fresh.complete_now("k", owner="a", result=b"r")
    finally:
        await fsynced.aclose()
        await fresh.aclose()


async def test_the_fast_path_is_closed_with_the_store(store: SQLiteStore) -> None:
    assert claim_now(store, "k") is True
    await store.aclose()
    assert claim_now(store, "k2") is None
    assert store.mark_entered_now("k", owner="a") is None
    assert not store.complete_now("k", owner="a", result=b"r")
    with pytest.raises(RMCPStoreClosedError):
        await store.complete("k", owner="a", result=b"r")


async def test_inline_runs_leave_the_wal_bounded(store: SQLiteStore, tmp_path: Path) -> None:
    path = tmp_path / "dedup.db"
    calls = 1_500
    for index in range(calls):
        key = f"k{index}"
        if not claim_now(store, key):
            assert await store.begin(key, fingerprint="fp", tool="tool", owner="a")
        if not store.complete_now(key, owner="a", result=b"x" * 200):
            await store.complete(key, owner="a", result=b"x" * 200)
    statistics = store.statistics()
    with contextlib.closing(sqlite3.connect(path)) as connection:
        page_size = connection.execute("PRAGMA page_size").fetchone()[0]
    wal_pages = path.with_name(path.name + "-wal").stat().st_size // page_size
    # One call in a run of inline ones goes through the queue: the main connection's commit
    # checkpoints; the inline connection never does.
    assert statistics.inline_claims + statistics.inline_results > calls * 19 // 10
    assert statistics.commits < calls / 20
    assert wal_pages < 2_000
