"""``DedupStore.record`` (issue 13): the outcome of a run that no claim preceded (a tool its
server declares idempotent or read-only), written ``COMPLETED`` in one write where no live
record exists; the existing record returned, nothing written, otherwise. MemoryStore and
SQLiteStore, the latter fsynced (``synchronous=FULL``) and atomic across processes."""

from __future__ import annotations

import contextlib
import os
import socket
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from rmcp_actors.stores import (
    WOULD_WAIT,
    DedupStore,
    MemoryStore,
    OwnerInfo,
    RecordState,
    SQLiteStore,
    _sqlite_batch,
)
from rmcp_actors.stores._base import records_now

LEASE_S = 30.0


def owner_info(instance_id: str) -> OwnerInfo:
    return OwnerInfo(instance_id=instance_id, pid=os.getpid(), host=socket.gethostname())


@pytest.fixture(autouse=True)
def fsync_budget_pinned(monkeypatch: pytest.MonkeyPatch) -> None:
    """No slow-fsync guard: a loaded machine fsyncs in over 2 ms at times, which turns inline
    results off (as it should) and would make these tests depend on the disk."""
    monkeypatch.setattr(_sqlite_batch, "_INLINE_FSYNC_BUDGET_S", float("inf"))


@pytest.fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[DedupStore]:
    store: DedupStore = (
        MemoryStore(clock=trio.current_time) if request.param == "memory" else SQLiteStore(tmp_path / "d.db")
    )
    await store.register_owner(owner_info("a"), LEASE_S)
    await store.register_owner(owner_info("b"), LEASE_S)
    yield store
    await store.aclose()


async def test_record_writes_a_fresh_key_completed_in_one_write(store: DedupStore) -> None:
    assert await store.record("k", fingerprint="fp", tool="t", owner="a", result=b"r") is None
    record = await store.get("k")
    assert record is not None
    assert (record.state, record.result, record.fingerprint, record.owner, record.entered) == (
        RecordState.COMPLETED,
        b"r",
        "fp",
        "a",
        True,
    )


async def test_record_returns_a_live_record_and_changes_nothing(store: DedupStore) -> None:
    assert await store.record("k", fingerprint="fp", tool="t", owner="a", result=b"first") is None
    found = await store.record("k", fingerprint="other", tool="t", owner="b", result=b"second")
    assert found is not None
    assert (found.state, found.result, found.owner) == (RecordState.COMPLETED, b"first", "a")
    claimed = await store.begin("c", fingerprint="fp", tool="t", owner="b", entered=True)
    assert claimed.claimed
    running = await store.record("c", fingerprint="fp", tool="t", owner="a", result=b"r")
    assert running is not None
    assert (running.state, running.owner) == (RecordState.STARTED, "b")
    after = await store.get("c")
    assert after is not None
    assert after.result is None


async def test_record_replaces_what_begin_would_take_over(store: DedupStore) -> None:
    """A claim never entered whose owner is gone never ran: recorded over, as begin claims it."""
    assert (await store.begin("k", fingerprint="fp", tool="t", owner="b")).claimed
    await store.release_owner("b")
    assert await store.record("k", fingerprint="fp", tool="t", owner="a", result=b"r") is None
    record = await store.get("k")
    assert record is not None
    assert (record.state, record.result, record.owner) == (RecordState.COMPLETED, b"r", "a")


async def test_record_and_get_at_once(store: DedupStore) -> None:
    now = records_now(store)
    assert now is not None
    assert now.get_now("k") is None
    assert now.record_now("k", fingerprint="fp", tool="t", owner="a", result=b"r") is None
    found = now.get_now("k")
    assert found is not None
    assert found is not WOULD_WAIT
    assert found.result == b"r"
    again = now.record_now("k", fingerprint="fp", tool="t", owner="b", result=b"x")
    assert again is not None
    assert again is not WOULD_WAIT
    assert again.owner == "a"


def stored(path: Path, key: str) -> tuple[str, int, bytes | None] | None:
    with contextlib.closing(sqlite3.connect(path)) as connection:
        return connection.execute(
            "SELECT state, entered, result FROM records WHERE key = ?", (key,)
        ).fetchone()


async def test_sqlite_record_at_once_is_fsynced(tmp_path: Path) -> None:
    """record_now commits with synchronous=FULL on the inline connection, as complete_now."""
    store = SQLiteStore(tmp_path / "d.db")
    try:
        await store.register_owner(owner_info("a"), LEASE_S)
        assert store.begin_now("open", fingerprint="fp", tool="t", owner="a") is not None
        assert store.complete_now("open", owner="a", result=b"r")
        connection = store._batch._inline  # pyright: ignore[reportPrivateUsage]
        assert connection is not None
        connection.execute("PRAGMA synchronous = NORMAL")
        store._batch._inline_sync = False  # pyright: ignore[reportPrivateUsage]
        statements: list[str] = []
        connection.set_trace_callback(statements.append)
        commits = store.statistics().commits
        assert store.record_now("k", fingerprint="fp", tool="t", owner="a", result=b"r") is None
        assert connection.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        insert = next(index for index, text in enumerate(statements) if "INSERT INTO records" in text)
        assert [text for text in statements[:insert] if "synchronous" in text][
            -1
        ] == "PRAGMA synchronous = FULL"
        assert statements[insert + 1] == "COMMIT"
        assert store.statistics().commits == commits
    finally:
        await store.aclose()
    assert stored(tmp_path / "d.db", "k") == (RecordState.COMPLETED.value, 1, b"r")


async def test_sqlite_record_waits_for_the_group_commit_while_a_claim_is_in_flight(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "d.db")
    try:
        await store.register_owner(owner_info("a"), LEASE_S)
        assert store.begin_now("c", fingerprint="fp", tool="t", owner="a", entered=True) is not None
        assert store.record_now("k", fingerprint="fp", tool="t", owner="a", result=b"r") is WOULD_WAIT
        assert stored(tmp_path / "d.db", "k") is None
        commits = store.statistics().commits
        assert await store.record("k", fingerprint="fp", tool="t", owner="a", result=b"r") is None
        assert store.statistics().commits == commits + 1
    finally:
        await store.aclose()
    assert stored(tmp_path / "d.db", "k") == (RecordState.COMPLETED.value, 1, b"r")


async def test_sqlite_get_now_waits_until_the_file_is_open(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "d.db")
    try:
        assert store.get_now("k") is WOULD_WAIT
        assert await store.get("k") is None
    finally:
        await store.aclose()


async def test_two_sqlite_stores_on_one_file_record_a_key_once(tmp_path: Path) -> None:
    path = tmp_path / "d.db"
    first, second = SQLiteStore(path), SQLiteStore(path)
    try:
        await first.register_owner(owner_info("a"), LEASE_S)
        await second.register_owner(owner_info("b"), LEASE_S)
        assert await first.record("k", fingerprint="fp", tool="t", owner="a", result=b"mine") is None
        found = await second.record("k", fingerprint="fp", tool="t", owner="b", result=b"theirs")
        assert found is not None
        assert (found.owner, found.result) == ("a", b"mine")
        # The same through the queue (a claim of the second store in flight).
        assert second.begin_now("c", fingerprint="fp", tool="t", owner="b", entered=True) is not None
        assert await first.record("j", fingerprint="fp", tool="t", owner="a", result=b"mine") is None
        queued = await second.record("j", fingerprint="fp", tool="t", owner="b", result=b"theirs")
        assert queued is not None
        assert queued.owner == "a"
    finally:
        await first.aclose()
        await second.aclose()
    assert stored(path, "k") == (RecordState.COMPLETED.value, 1, b"mine")
