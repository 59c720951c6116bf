"""The dedup stores: shared semantics over both stores, then each store's own guarantees."""

from __future__ import annotations

import contextlib
import os
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import anyio
import attrs
import pytest
import trio
import trio.testing

from rmcp_actors import (
    RMCPConfigError,
    RMCPStoreClosedError,
    RMCPStoreError,
    RMCPUnknownOwnerError,
)
from rmcp_actors.stores import (
    DedupStore,
    MemoryStore,
    OwnerInfo,
    RecordState,
    SQLiteStore,
    _sqlite_batch,
)
from rmcp_actors.stores import memory as memory_module
from rmcp_actors.stores import sqlite as sqlite_module

TTL_S = 3_600.0
LEASE_S = 30.0


class FakeClock:
    """A wall clock that moves only when a test says so (shared by threads, unlike trio's)."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@attrs.frozen
class Harness:
    """A store under test and the way to move its clock forward."""

    store: MemoryStore | SQLiteStore
    advance: Callable[[float], Awaitable[None]]


def owner_info(instance_id: str = "a") -> OwnerInfo:
    return OwnerInfo(instance_id=instance_id, pid=os.getpid(), host=socket.gethostname())


@pytest.fixture(params=["memory", "sqlite"])
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    """Each store with an injected clock. Tests that advance it take ``autojump_clock``: the
    memory store reads ``trio.current_time`` and moves by ``trio.sleep``."""
    if request.param == "memory":
        store: MemoryStore | SQLiteStore = MemoryStore(ttl_s=TTL_S, clock=trio.current_time)

        async def advance(seconds: float) -> None:
            await trio.sleep(seconds)

    else:
        clock = FakeClock()
        store = SQLiteStore(tmp_path / "dedup.db", ttl_s=TTL_S, clock=clock)

        async def advance(seconds: float) -> None:
            clock.now += seconds

    yield Harness(store, advance)
    await store.aclose()


async def claim(store: DedupStore, key: str, owner: str = "a", fingerprint: str = "fp") -> bool:
    outcome = await store.begin(key, fingerprint=fingerprint, tool="tool", owner=owner)
    return outcome.claimed


# Shared semantics


async def test_stores_satisfy_the_protocol(harness: Harness) -> None:
    assert isinstance(harness.store, DedupStore)
    assert harness.store.durable is isinstance(harness.store, SQLiteStore)


async def test_first_begin_claims_and_later_ones_see_the_claim(harness: Harness) -> None:
    store = harness.store
    await store.register_owner(owner_info("a"), LEASE_S)
    first = await store.begin("k", fingerprint="fp-1", tool="send_mail", owner="a")
    assert first.claimed
    assert first.existing is None

    second = await store.begin("k", fingerprint="fp-2", tool="other", owner="b")
    assert not second.claimed
    existing = second.existing
    assert existing is not None
    assert (existing.key, existing.fingerprint, existing.tool) == ("k", "fp-1", "send_mail")
    assert existing.state is RecordState.STARTED
    assert existing.owner == "a"
    assert existing.owner_alive
    assert existing.result is None
    assert existing.expires_at - existing.created_at == pytest.approx(TTL_S)
    assert await store.get("k") == existing


async def test_complete_stores_the_result_for_replay(harness: Harness) -> None:
    store = harness.store
    assert await claim(store, "k")
    await store.complete("k", owner="a", result=b"\x00result\xff")

    record = await store.get("k")
    assert record is not None
    assert record.state is RecordState.COMPLETED
    assert record.result == b"\x00result\xff"
    again = await store.begin("k", fingerprint="fp", tool="tool", owner="b")
    assert not again.claimed
    assert again.existing == record


async def test_mark_in_doubt_is_final(harness: Harness) -> None:
    store = harness.store
    assert await claim(store, "k")
    await store.mark_in_doubt("k", owner="a")
    # A result arriving after the run was declared in doubt must not contradict that answer.
    await store.complete("k", owner="a", result=b"late")

    record = await store.get("k")
    assert record is not None
    assert record.state is RecordState.IN_DOUBT
    assert record.result is None


async def test_only_the_owner_finishes_its_claim(harness: Harness) -> None:
    store = harness.store
    assert await claim(store, "k", owner="a")
    await store.complete("k", owner="b", result=b"stolen")
    await store.mark_in_doubt("k", owner="b")

    record = await store.get("k")
    assert record is not None
    assert (record.state, record.owner, record.result) == (RecordState.STARTED, "a", None)


async def test_get_of_an_absent_key_is_none(harness: Harness) -> None:
    assert await harness.store.get("never-seen") is None


async def test_records_expire_after_the_ttl(harness: Harness, autojump_clock: trio.testing.MockClock) -> None:
    store = harness.store
    assert await claim(store, "k")
    await store.complete("k", owner="a", result=b"r")

    await harness.advance(TTL_S - 1)
    assert await store.get("k") is not None
    await harness.advance(2)
    assert await store.get("k") is None
    # An expired record is replaced as if absent.
    assert await claim(store, "k", owner="b", fingerprint="new")
    record = await store.get("k")
    assert record is not None
    assert (record.owner, record.fingerprint, record.state) == ("b", "new", RecordState.STARTED)


async def test_owner_is_alive_only_within_its_lease(
    harness: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    store = harness.store
    await store.register_owner(owner_info("a"), LEASE_S)
    assert await claim(store, "k")

    async def owner_alive() -> bool:
        record = await store.get("k")
        assert record is not None
        return record.owner_alive

    await harness.advance(LEASE_S - 1)
    assert await owner_alive()
    await harness.advance(2)
    assert not await owner_alive()
    await store.renew_owner("a", LEASE_S)
    assert await owner_alive()


async def test_released_owner_is_dead_and_renewal_does_not_revive_it(harness: Harness) -> None:
    store = harness.store
    await store.register_owner(owner_info("a"), LEASE_S)
    assert await claim(store, "k")
    await store.release_owner("a")
    # A lease task racing the shutdown may still renew once.
    await store.renew_owner("a", LEASE_S)

    record = await store.get("k")
    assert record is not None
    assert record.state is RecordState.STARTED
    assert not record.owner_alive
    await store.register_owner(owner_info("a"), LEASE_S)
    record = await store.get("k")
    assert record is not None
    assert record.owner_alive


async def test_unregistered_owner_is_dead_and_cannot_renew(harness: Harness) -> None:
    store = harness.store
    assert await claim(store, "k", owner="ghost")
    record = await store.get("k")
    assert record is not None
    assert not record.owner_alive
    with pytest.raises(RMCPUnknownOwnerError, match="register_owner"):
        await store.renew_owner("ghost", LEASE_S)


async def test_purge_deletes_only_expired_records(
    harness: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    store = harness.store
    for key in ("old-1", "old-2", "old-3"):
        assert await claim(store, key)
    await store.complete("old-1", owner="a", result=b"r")
    await harness.advance(TTL_S / 2)
    assert await claim(store, "young")
    await harness.advance(TTL_S / 2 + 1)

    assert await store.purge_expired() == 3
    assert await store.purge_expired() == 0
    assert await store.get("young") is not None


async def test_closed_store_refuses_calls(harness: Harness) -> None:
    store = harness.store
    assert await claim(store, "k")
    await store.aclose()
    await store.aclose()
    with pytest.raises(RMCPStoreClosedError, match="closed"):
        await store.get("k")
    with pytest.raises(RMCPStoreClosedError, match="closed"):
        await claim(store, "other")


# The claim split: entered or not, and settling in-doubt keys


async def test_a_claim_starts_not_entered_and_its_owner_marks_it_entered(harness: Harness) -> None:
    store = harness.store
    await store.register_owner(owner_info("a"), LEASE_S)
    assert await claim(store, "k")
    record = await store.get("k")
    assert record is not None
    assert (record.state, record.entered, record.in_doubt) == (RecordState.STARTED, False, False)

    assert not await store.mark_entered("k", owner="b")
    assert await store.mark_entered("k", owner="a")
    record = await store.get("k")
    assert record is not None
    assert (record.entered, record.in_doubt) == (True, False)
    # Finished records cannot be entered again.
    await store.complete("k", owner="a", result=b"r")
    assert not await store.mark_entered("k", owner="a")
    assert not await store.mark_entered("absent", owner="a")


async def test_a_gone_owners_claim_never_entered_is_taken_over(harness: Harness) -> None:
    store = harness.store
    await store.register_owner(owner_info("a"), LEASE_S)
    await store.register_owner(owner_info("b"), LEASE_S)
    assert await claim(store, "k", owner="a")
    # Alive and not entered yet: another claimant waits, it does not run the tool.
    assert not await claim(store, "k", owner="b")
    await store.release_owner("a")
    # Another call with the key is a conflict, never a takeover.
    assert not await claim(store, "k", owner="b", fingerprint="other")

    taken = await store.begin("k", fingerprint="fp", tool="tool", owner="b")
    assert (taken.claimed, taken.taken_over) == (True, True)
    record = await store.get("k")
    assert record is not None
    assert (record.owner, record.state, record.entered) == ("b", RecordState.STARTED, False)
    # The old owner, had it only been paused, can no longer enter nor finish.
    assert not await store.mark_entered("k", owner="a")
    await store.complete("k", owner="a", result=b"stale")
    assert await store.mark_entered("k", owner="b")
    record = await store.get("k")
    assert record is not None
    assert (record.owner, record.state, record.result) == ("b", RecordState.STARTED, None)


async def test_an_owner_claims_again_its_own_claim_never_entered(harness: Harness) -> None:
    store = harness.store
    await store.register_owner(owner_info("a"), LEASE_S)
    assert await claim(store, "k", owner="a")
    again = await store.begin("k", fingerprint="fp", tool="tool", owner="a")
    assert (again.claimed, again.taken_over) == (True, True)
    assert await store.mark_entered("k", owner="a")
    # Entered: never again, by anyone.
    assert not await claim(store, "k", owner="a")
    await store.release_owner("a")
    assert not await claim(store, "k", owner="b")


async def test_a_gone_owners_entered_claim_is_in_doubt_and_never_taken_over(harness: Harness) -> None:
    store = harness.store
    await store.register_owner(owner_info("a"), LEASE_S)
    assert await claim(store, "k", owner="a")
    assert await store.mark_entered("k", owner="a")
    await store.release_owner("a")
    outcome = await store.begin("k", fingerprint="fp", tool="tool", owner="b")
    assert not outcome.claimed
    assert outcome.existing is not None
    assert outcome.existing.in_doubt
    assert outcome.existing.state is RecordState.STARTED


@pytest.mark.parametrize("how", ["marked in doubt", "owner gone"])
async def test_resolve_in_doubt_settles_the_key_once(harness: Harness, how: str) -> None:
    store = harness.store
    await store.register_owner(owner_info("a"), LEASE_S)
    for key in ("ran", "did-not-run"):
        assert await claim(store, key, owner="a")
        assert await store.mark_entered(key, owner="a")
        if how == "marked in doubt":
            await store.mark_in_doubt(key, owner="a")
    await store.release_owner("a")

    assert not await store.resolve_in_doubt("ran", owner="b", fingerprint="other", result=b"r")
    assert await store.resolve_in_doubt("ran", owner="b", fingerprint="fp", result=b"found")
    assert not await store.resolve_in_doubt("ran", owner="c", fingerprint="fp", result=b"again")
    record = await store.get("ran")
    assert record is not None
    assert (record.state, record.result, record.in_doubt) == (RecordState.COMPLETED, b"found", False)

    await store.register_owner(owner_info("b"), LEASE_S)
    assert await store.resolve_in_doubt("did-not-run", owner="b", fingerprint="fp", result=None)
    assert not await store.resolve_in_doubt("did-not-run", owner="c", fingerprint="fp", result=None)
    record = await store.get("did-not-run")
    assert record is not None
    assert (record.state, record.owner, record.entered) == (RecordState.STARTED, "b", False)
    assert await store.mark_entered("did-not-run", owner="b")
    await store.complete("did-not-run", owner="b", result=b"ran now")
    assert not await store.resolve_in_doubt("absent", owner="b", fingerprint="fp", result=None)


async def test_an_owner_whose_lease_lapsed_cannot_enter_its_claim(
    harness: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    store = harness.store
    await store.register_owner(owner_info("a"), LEASE_S)
    await store.register_owner(owner_info("b"), LEASE_S)
    assert await claim(store, "k", owner="a")
    # "a" pauses (a stopped process, a long GC) past its lease, with nobody taking the key over.
    await harness.advance(LEASE_S + 1)
    await store.renew_owner("b", LEASE_S)
    # Entered now, the claim would read as in doubt at once (entered, owner gone): a
    # reconciler, finding no effect yet, would let "b" run the tool while "a" runs it too.
    assert not await store.mark_entered("k", owner="a")
    record = await store.get("k")
    assert record is not None
    assert (record.entered, record.in_doubt) == (False, False)
    taken = await store.begin("k", fingerprint="fp", tool="tool", owner="b")
    assert (taken.claimed, taken.taken_over) == (True, True)
    # Renewed, "a" enters its claims again (a pause is not a crash).
    await store.renew_owner("a", LEASE_S)
    assert await claim(store, "k2", owner="a")
    assert await store.mark_entered("k2", owner="a")


async def test_resolve_in_doubt_leaves_runs_in_progress_alone(harness: Harness) -> None:
    store = harness.store
    await store.register_owner(owner_info("a"), LEASE_S)
    assert await claim(store, "k", owner="a")
    assert not await store.resolve_in_doubt("k", owner="b", fingerprint="fp", result=None)
    assert await store.mark_entered("k", owner="a")
    assert not await store.resolve_in_doubt("k", owner="b", fingerprint="fp", result=b"r")
    record = await store.get("k")
    assert record is not None
    assert (record.state, record.owner) == (RecordState.STARTED, "a")


async def test_sqlite_takeover_is_atomic_across_connections(tmp_path: Path) -> None:
    path = tmp_path / "dedup.db"
    stores = [SQLiteStore(path), SQLiteStore(path)]
    await stores[0].register_owner(owner_info("crashed"), LEASE_S)
    assert await claim(stores[0], "shared", owner="crashed")
    await stores[0].release_owner("crashed")
    claims: list[str] = []

    async def contend(store: SQLiteStore, owner: str) -> None:
        await store.register_owner(owner_info(owner), LEASE_S)
        if await claim(store, "shared", owner=owner):
            claims.append(owner)

    try:
        async with trio.open_nursery() as nursery:
            for index in range(20):
                nursery.start_soon(contend, stores[index % 2], f"owner-{index}")
        assert len(claims) == 1
        assert not await stores[1].mark_entered("shared", owner="crashed")
        assert await stores[1].mark_entered("shared", owner=claims[0])
    finally:
        for store in stores:
            await store.aclose()


async def test_sqlite_records_of_a_file_older_than_the_entered_mark_read_as_entered(tmp_path: Path) -> None:
    path = tmp_path / "dedup.db"
    old = sqlite3.connect(path)
    # The schema before the entered mark, with a claim of an owner that is gone.
    old.execute(
        """CREATE TABLE records (key TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, tool TEXT NOT NULL,
        state TEXT NOT NULL, owner TEXT NOT NULL, result BLOB, created_at REAL NOT NULL,
        expires_at REAL NOT NULL)"""
    )
    now = time.time()
    old.execute(
        "INSERT INTO records VALUES ('k', 'fp', 'tool', 'started', 'gone', NULL, ?, ?)", (now, now + TTL_S)
    )
    old.commit()
    store = SQLiteStore(path)
    try:
        outcome = await store.begin("k", fingerprint="fp", tool="tool", owner="new")
        assert not outcome.claimed
        assert outcome.existing is not None
        assert (outcome.existing.entered, outcome.existing.in_doubt) == (True, True)
        # A process of the old code, writing without the column, still writes entered claims.
        old.execute(
            "INSERT INTO records (key, fingerprint, tool, state, owner, result, created_at, expires_at)"
            " VALUES ('k2', 'fp', 'tool', 'started', 'gone', NULL, ?, ?)",
            (now, now + TTL_S),
        )
        old.commit()
        assert not await claim(store, "k2", owner="new")
    finally:
        old.close()
        await store.aclose()


# MemoryStore


async def test_memory_eviction_takes_the_least_recently_used_finished_record() -> None:
    store = MemoryStore(max_entries=3)
    assert await claim(store, "running")
    for key in ("done-1", "done-2"):
        assert await claim(store, key)
        await store.complete(key, owner="a", result=b"r")
    # Reading done-1 makes done-2 the least recently used finished record.
    assert await store.get("done-1") is not None

    assert await claim(store, "new")
    assert await store.get("done-2") is None
    for key in ("running", "done-1", "new"):
        assert await store.get(key) is not None


async def test_memory_store_grows_rather_than_evict_runs_in_progress() -> None:
    store = MemoryStore(max_entries=2)
    for key in ("run-1", "run-2", "run-3"):
        assert await claim(store, key)
    for key in ("run-1", "run-2", "run-3"):
        record = await store.get(key)
        assert record is not None
        assert record.state is RecordState.STARTED
    # Once a run finishes, it is the first to go.
    await store.complete("run-2", owner="a", result=b"r")
    assert await claim(store, "run-4")
    assert await store.get("run-2") is None
    assert await store.get("run-1") is not None


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: MemoryStore(max_entries=0), "max_entries: must be a positive"),
        (lambda: MemoryStore(ttl_s=0.0), "ttl_s: must be a positive"),
        (lambda: MemoryStore(ttl_s=float("nan")), "ttl_s: must be a positive"),
    ],
)
def test_memory_store_rejects_bad_settings(make: Callable[[], MemoryStore], message: str) -> None:
    with pytest.raises(RMCPConfigError, match=message):
        make()


# SQLiteStore


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: SQLiteStore("unused.db", ttl_s=-1.0), "ttl_s: must be a positive"),
        (lambda: SQLiteStore("unused.db", busy_timeout_s=-1.0), "busy_timeout_s: must be zero or more"),
    ],
)
def test_sqlite_store_rejects_bad_settings(make: Callable[[], SQLiteStore], message: str) -> None:
    # The file is opened on first use only: nothing is created here.
    with pytest.raises(RMCPConfigError, match=message):
        make()


async def test_sqlite_records_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "dedup.db"
    first = SQLiteStore(path)
    await first.register_owner(owner_info("a"), LEASE_S)
    assert await claim(first, "done")
    await first.complete("done", owner="a", result=b"kept")
    assert await claim(first, "running")
    await first.aclose()

    second = SQLiteStore(path)
    try:
        done = await second.get("done")
        assert done is not None
        assert (done.state, done.result) == (RecordState.COMPLETED, b"kept")
        running = await second.get("running")
        assert running is not None
        assert running.state is RecordState.STARTED
        assert running.owner_alive
        assert not await claim(second, "done", owner="b")
    finally:
        await second.aclose()


async def test_sqlite_begin_is_atomic_across_connections(tmp_path: Path) -> None:
    # Both stores also race to create the schema of the fresh file.
    path = tmp_path / "dedup.db"
    stores = [SQLiteStore(path), SQLiteStore(path)]
    claims: list[str] = []

    async def contend(store: SQLiteStore, owner: str) -> None:
        # Live owners: the claim of a gone one, never entered, is free to take over.
        await store.register_owner(owner_info(owner), LEASE_S)
        if await claim(store, "shared", owner=owner):
            claims.append(owner)

    try:
        async with trio.open_nursery() as nursery:
            for index in range(50):
                nursery.start_soon(contend, stores[index % 2], f"owner-{index}")
        assert len(claims) == 1
        for store in stores:
            record = await store.get("shared")
            assert record is not None
            assert record.owner == claims[0]
    finally:
        for store in stores:
            await store.aclose()


CHILD_SERVER = """
import os, socket, sys
import anyio
from rmcp_actors.stores import OwnerInfo, SQLiteStore

async def main() -> None:
    store = SQLiteStore(sys.argv[1])
    owner = OwnerInfo(instance_id="child", pid=os.getpid(), host=socket.gethostname())
    await store.register_owner(owner, 3600.0)
    claimed = await store.begin("child-key", fingerprint="fp", tool="tool", owner="child")
    assert claimed.claimed
    print("ready", flush=True)
    sys.stdin.read()

anyio.run(main)  # asyncio: the store must not depend on trio
"""


async def test_sqlite_owner_dies_with_its_local_process(tmp_path: Path) -> None:
    path = tmp_path / "dedup.db"
    store = SQLiteStore(path)
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", CHILD_SERVER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        output = b""
        with trio.fail_after(30):
            while not output.endswith(b"\n"):
                chunk = await process.stdout.receive_some()
                assert chunk, f"the child exited early with {await process.wait()}"
                output += chunk
        assert output == b"ready\n"

        record = await store.get("child-key")
        assert record is not None
        assert record.owner_alive
        process.kill()
        await process.wait()
        # The lease has an hour left: only the pid check can tell.
        record = await store.get("child-key")
        assert record is not None
        assert record.state is RecordState.STARTED
        assert not record.owner_alive
    finally:
        process.kill()
        await process.wait()
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                await stream.aclose()
        await store.aclose()


CHILD_RESOLVER = """
import os, socket, sys
import anyio
from rmcp_actors.stores import OwnerInfo, SQLiteStore

async def main() -> None:
    store = SQLiteStore(sys.argv[1])
    me = f"child-{os.getpid()}"
    await store.register_owner(OwnerInfo(instance_id=me, pid=os.getpid(), host=socket.gethostname()), 3600.0)
    print("ready", flush=True)
    sys.stdin.readline()
    won = await store.resolve_in_doubt("k", owner=me, fingerprint="fp", result=None)
    # A winner enters; a loser must not be able to, nor to take the claim over.
    entered = await store.mark_entered("k", owner=me)
    taken = (await store.begin("k", fingerprint="fp", tool="tool", owner=me)).claimed
    print(f"{won} {entered} {taken}", flush=True)
    await store.aclose()

anyio.run(main)
"""


async def test_sqlite_resolve_in_doubt_is_atomic_across_processes(tmp_path: Path) -> None:
    """Processes retrying one in-doubt key, each told by its reconciler that the run did not
    happen: exactly one claims it again and enters it."""
    path = tmp_path / "dedup.db"
    store = SQLiteStore(path)
    await store.register_owner(owner_info("crashed"), LEASE_S)
    assert await claim(store, "k", owner="crashed")
    assert await store.mark_entered("k", owner="crashed")
    await store.release_owner("crashed")
    await store.aclose()
    processes = [
        await trio.lowlevel.open_process(
            [sys.executable, "-c", CHILD_RESOLVER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        for _ in range(4)
    ]

    async def read_line(process: trio.Process) -> str:
        assert process.stdout is not None
        data = b""
        while not data.endswith(b"\n"):
            chunk = await process.stdout.receive_some(1)
            assert chunk, "the child exited early"
            data += chunk
        return data.decode().strip()

    try:
        with trio.fail_after(60):
            for process in processes:
                assert await read_line(process) == "ready"
            for process in processes:
                assert process.stdin is not None
                await process.stdin.send_all(b"go\n")
            answers = sorted([await read_line(process) for process in processes])
    finally:
        for process in processes:
            process.kill()
            await process.wait()
            for stream in (process.stdin, process.stdout):
                if stream is not None:
                    await stream.aclose()
    assert answers == ["False False False"] * 3 + ["True True False"]


async def test_sqlite_group_commit_batches_concurrent_writes(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "dedup.db")

    async def call(index: int) -> None:
        assert await claim(store, f"k{index}")
        await store.complete(f"k{index}", owner="a", result=f"r{index}".encode())

    try:
        async with trio.open_nursery() as nursery:
            for index in range(50):
                nursery.start_soon(call, index)
        for index in range(50):
            record = await store.get(f"k{index}")
            assert record is not None
            assert (record.state, record.result) == (RecordState.COMPLETED, f"r{index}".encode())
        statistics = store.statistics()
        assert statistics.writes == 100
        assert statistics.commits <= 10
        assert statistics.largest_batch >= 25
        assert statistics.queued == 0
    finally:
        await store.aclose()


async def test_sqlite_a_failing_write_does_not_fail_its_batch(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "dedup.db")
    failures: list[Exception] = []

    async def renew_ghost() -> None:
        try:
            await store.renew_owner("ghost", LEASE_S)
        except LookupError as exc:
            failures.append(exc)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(claim, store, "first")
            # The first write is in its flush: the next ones queue up for one batch.
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(claim, store, "before")
            nursery.start_soon(renew_ghost)
            nursery.start_soon(claim, store, "after")
        assert len(failures) == 1
        assert store.statistics().commits == 2
        for key in ("first", "before", "after"):
            assert await store.get(key) is not None
    finally:
        await store.aclose()


async def test_sqlite_cancelled_flusher_still_commits_the_queue(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "dedup.db")
    # With every worker thread taken, the flusher waits for one: a point where it can be cancelled.
    threads = anyio.to_thread.current_default_thread_limiter()
    threads.total_tokens = 1
    try:
        async with trio.open_nursery() as nursery:
            flusher_scope = trio.CancelScope()

            async def flusher() -> None:
                with flusher_scope:
                    await claim(store, "flusher")

            async with threads:
                nursery.start_soon(flusher)
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(claim, store, "queued-1")
                nursery.start_soon(claim, store, "queued-2")
                await trio.testing.wait_all_tasks_blocked()
                flusher_scope.cancel()
                await trio.testing.wait_all_tasks_blocked()
        for key in ("flusher", "queued-1", "queued-2"):
            assert await store.get(key) is not None
        assert store.statistics().commits == 2
    finally:
        await store.aclose()


async def test_sqlite_write_cancelled_while_queued_is_dropped(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "dedup.db")
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(claim, store, "flusher")
            await trio.testing.wait_all_tasks_blocked()
            queued_scope = trio.CancelScope()

            async def queued() -> None:
                with queued_scope:
                    await claim(store, "cancelled")

            nursery.start_soon(queued)
            await trio.testing.wait_all_tasks_blocked()
            queued_scope.cancel()
        assert queued_scope.cancelled_caught
        assert await store.get("cancelled") is None
        assert await store.get("flusher") is not None
    finally:
        await store.aclose()


async def test_sqlite_aclose_commits_the_writes_already_queued(tmp_path: Path) -> None:
    path = tmp_path / "dedup.db"
    store = SQLiteStore(path)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(claim, store, "flushing")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(claim, store, "queued")
        await trio.testing.wait_all_tasks_blocked()
        await store.aclose()
    reopened = SQLiteStore(path)
    try:
        for key in ("flushing", "queued"):
            assert await reopened.get(key) is not None
    finally:
        await reopened.aclose()


def stored_keys(path: Path) -> set[str]:
    """The keys in the file, expired or not, read behind the store's back."""
    with contextlib.closing(sqlite3.connect(path)) as connection:
        return {key for (key,) in connection.execute("SELECT key FROM records")}


async def test_sqlite_writes_purge_expired_records_once_a_minute(tmp_path: Path) -> None:
    path = tmp_path / "dedup.db"
    clock = FakeClock()
    store = SQLiteStore(path, ttl_s=10.0, clock=clock)
    try:
        # The first write purges, the next purge is due a minute later.
        assert await claim(store, "old")
        clock.now += 20
        assert await claim(store, "recent")
        assert await store.get("old") is None
        assert stored_keys(path) == {"old", "recent"}

        clock.now += 41
        assert await claim(store, "trigger")
        assert stored_keys(path) == {"trigger"}
    finally:
        await store.aclose()


async def test_sqlite_claims_commit_inline_when_the_database_is_free(tmp_path: Path) -> None:
    path = tmp_path / "dedup.db"
    store = SQLiteStore(path)
    try:
        assert await claim(store, "first")  # opens the file through the queue
        for index in range(5):
            assert await claim(store, f"key-{index}")
        assert not await claim(store, "key-0", fingerprint="another call")
        stats = store.statistics()
        # Committed, and visible to any other connection.
        assert stored_keys(path) == {"first", *(f"key-{index}" for index in range(5))}
    finally:
        await store.aclose()
    assert stats.inline_claims == 6
    assert stats.commits == 1


async def test_sqlite_claim_never_blocks_the_event_loop_on_another_writer(tmp_path: Path) -> None:
    path = tmp_path / "dedup.db"
    store = SQLiteStore(path)
    other = sqlite3.connect(path, isolation_level=None)
    ticks = 0
    try:
        assert await claim(store, "open")
        inline_before = store.statistics().inline_claims
        other.execute("BEGIN IMMEDIATE")  # another process's write lock, held for a while

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await trio.sleep(0.01)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(tick)
            claimed = trio.Event()

            async def claim_meanwhile() -> None:
                assert await claim(store, "waits")
                claimed.set()

            nursery.start_soon(claim_meanwhile)
            await trio.sleep(0.3)
            assert not claimed.is_set()
            other.execute("COMMIT")
            with trio.fail_after(5):
                await claimed.wait()
            nursery.cancel_scope.cancel()
        assert store.statistics().inline_claims == inline_before
    finally:
        other.close()
        await store.aclose()
    # The loop kept running while the claim waited for the lock in a worker thread.
    assert ticks >= 20


async def test_sqlite_entered_mark_judges_the_lease_when_it_commits(tmp_path: Path) -> None:
    """A mark that waited for another process's write lock while its owner's lease lapsed
    (its renewals wait in the same queue) must not enter: others read the lapsed lease."""
    path = tmp_path / "dedup.db"
    clock = FakeClock()
    store = SQLiteStore(path, clock=clock)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        await store.register_owner(owner_info("a"), LEASE_S)
        assert await claim(store, "k")
        other.execute("BEGIN IMMEDIATE")  # another process's write lock, held for a while
        entered: list[bool] = []
        async with trio.open_nursery() as nursery:

            async def mark() -> None:
                entered.append(await store.mark_entered("k", owner="a"))

            nursery.start_soon(mark)
            await trio.sleep(0.3)
            assert not entered
            clock.now += LEASE_S + 1
            other.execute("COMMIT")
        assert entered == [False]
    finally:
        other.close()
        await store.aclose()


async def test_owners_long_gone_are_forgotten(
    harness: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    # Every server start registers a new instance: the store must not keep them all forever.
    store = harness.store
    await store.register_owner(owner_info("with-a-record"), 10 * TTL_S)
    assert await claim(store, "k", owner="with-a-record")
    for index in range(200):
        await store.register_owner(owner_info(f"gone-{index}"), LEASE_S)
        if index % 2:
            await store.release_owner(f"gone-{index}")
    await harness.advance(LEASE_S + TTL_S / 2)
    await store.purge_expired()
    # Within the grace period a released owner still reads as released, not unknown.
    await store.renew_owner("gone-1", LEASE_S)
    await harness.advance(TTL_S / 2 + 1)
    await store.purge_expired()
    for owner in ("gone-0", "gone-1", "gone-3"):
        with pytest.raises(LookupError, match="register_owner"):
            await store.renew_owner(owner, LEASE_S)
    # An owner still alive, whose run is on record, is kept.
    await store.renew_owner("with-a-record", LEASE_S)
    record = await store.get("k")
    assert record is not None
    assert record.owner_alive


async def test_memory_store_forgets_gone_owners_without_a_purge(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore(ttl_s=TTL_S, clock=trio.current_time)
    for index in range(1_000):
        await store.register_owner(owner_info(f"instance-{index}"), LEASE_S)
        await store.release_owner(f"instance-{index}")
        await trio.sleep(LEASE_S)
    # Only those released within the last TTL are kept (twice that at most, between prunes).
    within_ttl = TTL_S / LEASE_S + 1
    assert len(store._owner_leases) <= 2 * within_ttl + 16  # pyright: ignore[reportPrivateUsage]


@pytest.mark.parametrize(
    "code",
    [
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_BUSY_SNAPSHOT,
        sqlite3.SQLITE_BUSY_RECOVERY,
        sqlite3.SQLITE_LOCKED_SHAREDCACHE,
    ],
)
def test_sqlite_busy_is_read_from_the_primary_result_code(code: int) -> None:
    """Extended codes (BUSY_SNAPSHOT = 517, ...) carry BUSY or LOCKED in their low byte."""
    error = sqlite3.OperationalError("database is locked")
    error.sqlite_errorcode = code
    assert _sqlite_batch.is_busy(error)  # pyright: ignore[reportPrivateUsage]
    other = sqlite3.OperationalError("disk I/O error")
    other.sqlite_errorcode = sqlite3.SQLITE_IOERR_WRITE
    assert not _sqlite_batch.is_busy(other)  # pyright: ignore[reportPrivateUsage]


def insert_expired(path: Path, count: int, expires_at: float) -> None:
    with contextlib.closing(sqlite3.connect(path)) as connection, connection:
        connection.executemany(
            "INSERT INTO records (key, fingerprint, tool, state, owner, result, created_at, expires_at)"
            " VALUES (?, 'fp', 'tool', 'completed', 'gone', NULL, 0, ?)",
            [(f"old-{index}", expires_at) for index in range(count)],
        )


async def test_sqlite_purges_expired_records_in_bounded_batches(tmp_path: Path) -> None:
    """One write never carries more than one batch of deletions; purge_expired() commits one
    transaction per batch, so other writers get the lock between them."""
    path = tmp_path / "dedup.db"
    clock = FakeClock()
    store = SQLiteStore(path, ttl_s=10.0, clock=clock)
    batch = sqlite_module._PURGE_BATCH  # pyright: ignore[reportPrivateUsage]
    try:
        assert await claim(store, "first")  # creates the schema; expired with the others below
        insert_expired(path, 2 * batch + 500, expires_at=clock.now - 1)
        clock.now += 61
        assert await claim(store, "trigger")
        assert len(stored_keys(path)) == batch + 501 + 1
        commits = store.statistics().commits
        assert await store.purge_expired() == batch + 501
        assert store.statistics().commits - commits >= 2
        assert stored_keys(path) == {"trigger"}
    finally:
        await store.aclose()


async def test_memory_purge_lets_other_tasks_run_between_batches(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore(ttl_s=10.0, clock=trio.current_time)
    batch = memory_module._PURGE_BATCH  # pyright: ignore[reportPrivateUsage]
    for index in range(3 * batch):
        assert await claim(store, f"old-{index}")
        await store.complete(f"old-{index}", owner="a", result=b"r")
    await trio.sleep(11)
    others_ran = 0
    done = False

    async def purge() -> None:
        nonlocal done
        assert await store.purge_expired() == 3 * batch
        done = True

    async def other() -> None:
        nonlocal others_ran
        while not done:
            others_ran += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(purge)
        nursery.start_soon(other)
    assert others_ran >= 3


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
async def test_sqlite_files_are_readable_by_their_owner_only(tmp_path: Path) -> None:
    """Stored results are the tools' answers: no other user of the host may read them."""
    path = tmp_path / "dedup.db"
    old_umask = os.umask(0o022)
    try:
        store = SQLiteStore(path)
        try:
            assert await claim(store, "k")
            await store.complete("k", owner="a", result=b"secret")
            modes = {
                suffix: path.with_name(path.name + suffix).stat().st_mode & 0o777
                for suffix in ("", "-wal", "-shm")
            }
        finally:
            await store.aclose()
    finally:
        os.umask(old_umask)
    assert modes == {"": 0o600, "-wal": 0o600, "-shm": 0o600}


async def test_sqlite_failures_are_store_errors_naming_the_operation(tmp_path: Path) -> None:
    path = tmp_path / "dedup.db"
    store = SQLiteStore(path, busy_timeout_s=0.05)
    try:
        await store.register_owner(owner_info("a"), LEASE_S)
        with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as other:
            other.execute("BEGIN IMMEDIATE")
            with pytest.raises(RMCPStoreError, match="locked") as caught:
                await store.begin("k", fingerprint="fp", tool="tool", owner="a")
            other.execute("ROLLBACK")
    finally:
        await store.aclose()
    assert caught.value.operation == "begin"
    assert isinstance(caught.value.__cause__, sqlite3.OperationalError)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize(
    "error",
    [
        RMCPStoreError("the store failed", operation="begin"),
        RMCPStoreClosedError("this store was closed"),
        RMCPUnknownOwnerError("owner 'a' is not registered", operation="renew_owner"),
        RMCPConfigError("must be a positive number", path="ttl_s"),
    ],
)
def test_store_errors_pickle_with_their_fields(error: RMCPStoreError | RMCPConfigError) -> None:
    """Servers run in process pools too: an error must cross a process boundary whole."""
    import pickle

    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert vars(copy) == vars(error)
    assert str(copy) == str(error)


async def test_release_frees_only_the_owners_own_claim(harness: Harness) -> None:
    """A claim whose tool refused and did nothing is deleted in one step: the key reads absent
    and the next claim is a new one; nothing but a STARTED record of the owner is released."""
    store = harness.store
    await store.register_owner(owner_info("a"), LEASE_S)
    await store.register_owner(owner_info("b"), LEASE_S)
    assert await claim(store, "k")
    assert await store.mark_entered("k", owner="a")
    assert not await store.release("k", owner="b")
    assert await store.release("k", owner="a")
    assert await store.get("k") is None
    assert not await store.release("k", owner="a")
    again = await store.begin("k", fingerprint="fp", tool="tool", owner="b")
    assert (again.claimed, again.taken_over) == (True, False)

    for settle in ("complete", "mark_in_doubt"):
        key = f"settled-{settle}"
        assert await claim(store, key)
        if settle == "complete":
            await store.complete(key, owner="a", result=b"done")
        else:
            await store.mark_in_doubt(key, owner="a")
        before = await store.get(key)
        assert not await store.release(key, owner="a")
        assert await store.get(key) == before


async def test_begin_entered_claims_and_enters_in_one_write(harness: Harness) -> None:
    store = harness.store
    await store.register_owner(owner_info("a"), LEASE_S)
    outcome = await store.begin("k", fingerprint="fp", tool="tool", owner="a", entered=True)
    assert (outcome.claimed, outcome.existing, outcome.taken_over) == (True, None, False)
    record = await store.get("k")
    assert record is not None
    assert (record.state, record.owner, record.entered) == (RecordState.STARTED, "a", True)
    # Entered: nobody takes it over, and it is finished as any claim is.
    again = await store.begin("k", fingerprint="fp", tool="tool", owner="a", entered=True)
    assert not again.claimed
    assert again.existing == record
    await store.complete("k", owner="a", result=b"r")
    done = await store.get("k")
    assert done is not None
    assert (done.state, done.result) == (RecordState.COMPLETED, b"r")


async def test_begin_entered_claims_nothing_for_an_owner_whose_lease_lapsed(
    harness: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    store = harness.store
    await store.register_owner(owner_info("a"), LEASE_S)
    await harness.advance(LEASE_S + 1)
    outcome = await store.begin("k", fingerprint="fp", tool="tool", owner="a", entered=True)
    assert (outcome.claimed, outcome.existing) == (False, None)
    assert await store.get("k") is None
    # Not entered, the claim is still written: nothing runs before the entered mark, which
    # refuses it as well.
    assert await claim(store, "k", owner="a")
    assert not await store.mark_entered("k", owner="a")
    await store.renew_owner("a", LEASE_S)
    outcome = await store.begin("k2", fingerprint="fp", tool="tool", owner="a", entered=True)
    assert outcome.claimed


async def test_begin_entered_claims_nothing_for_a_released_or_unknown_owner(harness: Harness) -> None:
    store = harness.store
    await store.register_owner(owner_info("a"), LEASE_S)
    await store.release_owner("a")
    for owner in ("a", "never-registered"):
        outcome = await store.begin("k", fingerprint="fp", tool="tool", owner=owner, entered=True)
        assert (outcome.claimed, outcome.existing) == (False, None)
        assert await store.get("k") is None


async def test_begin_entered_over_a_claim_reports_the_claim_whatever_the_lease(
    harness: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    """A taken key is reported as taken (the caller waits for it or replays it), even when
    the claimant's own lease lapsed: only a write it would have made is refused."""
    store = harness.store
    await store.register_owner(owner_info("a"), LEASE_S)
    await store.register_owner(owner_info("b"), LEASE_S * 10)
    assert await claim(store, "k", owner="b")
    assert await store.mark_entered("k", owner="b")
    await harness.advance(LEASE_S + 1)
    outcome = await store.begin("k", fingerprint="fp", tool="tool", owner="a", entered=True)
    assert not outcome.claimed
    assert outcome.existing is not None
    assert outcome.existing.owner == "b"
