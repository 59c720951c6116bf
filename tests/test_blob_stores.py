"""The blob part of the stores (chunks of RMCP transfers): shared semantics over both stores,
then the SQLite store's durability."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Protocol

import attrs
import pytest
import trio
import trio.testing

from rmcp_actors import RMCPConfigError, RMCPStoreClosedError, RMCPStoreError
from rmcp_actors._transfer import TransferHandle, handle_for
from rmcp_actors.stores import (
    BlobStore,
    MemoryStore,
    OwnerInfo,
    SQLiteStore,
    TaskRecord,
    TaskState,
    TransferConflict,
)

TTL_S = 3_600.0
UPLOAD_TTL_S = 600.0
CHUNK = 4096
PAYLOAD = bytes(range(256)) * 40  # 10,240 bytes: chunks of 4096, 4096 and 2048


def chunks_of(payload: bytes, chunk_size: int = CHUNK) -> list[bytes]:
    return [payload[start : start + chunk_size] for start in range(0, len(payload), chunk_size)]


class FakeClock:
    """A wall clock that moves only when a test says so (shared by threads, unlike trio's)."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


Store = MemoryStore | SQLiteStore


class MakeStore(Protocol):
    def __call__(self, *, max_blob_bytes: int = ..., upload_ttl_s: float = ...) -> Store: ...


@attrs.frozen
class Harness:
    """A store under test, how to make another one like it, and how to move its clock."""

    store: Store
    make: MakeStore
    advance: Callable[[float], Awaitable[None]]


@pytest.fixture(params=["memory", "sqlite"])
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    """Each store with an injected clock. Tests that advance it take ``autojump_clock``: the
    memory store reads ``trio.current_time`` and moves by ``trio.sleep``."""
    made: list[Store] = []
    clock = FakeClock()

    def make(*, max_blob_bytes: int = 1 << 30, upload_ttl_s: float = UPLOAD_TTL_S) -> Store:
        store: Store
        if request.param == "memory":
            store = MemoryStore(
                ttl_s=TTL_S, clock=trio.current_time, max_blob_bytes=max_blob_bytes, upload_ttl_s=upload_ttl_s
            )
        else:
            store = SQLiteStore(
                tmp_path / f"store-{len(made)}.db",
                ttl_s=TTL_S,
                clock=clock,
                max_blob_bytes=max_blob_bytes,
                upload_ttl_s=upload_ttl_s,
            )
        made.append(store)
        return store

    async def advance(seconds: float) -> None:
        if request.param == "memory":
            await trio.sleep(seconds)
        else:
            clock.now += seconds

    yield Harness(make(), make, advance)
    for store in made:
        await store.aclose()


async def upload(store: BlobStore, payload: bytes = PAYLOAD, *, scope: str = "s") -> TransferHandle:
    """Open an upload of ``payload`` and write all its chunks."""
    handle = handle_for("up-1", payload, CHUNK)
    assert await store.open_transfer(handle, key=None, scope=scope, sealed=True) == []
    for index, chunk in enumerate(chunks_of(payload)):
        await store.write_chunk(handle.id, index, chunk)
    return handle


async def read_all(store: BlobStore, handle: TransferHandle, scope: str = "s") -> bytes:
    parts = [await store.read_chunk(handle.id, index, scope=scope) for index in range(handle.chunk_count)]
    assert all(part is not None for part in parts)
    return b"".join(part for part in parts if part is not None)


async def claim(store: Store, key: str = "k") -> None:
    """Claim ``key``, as the server does before the tool produces a result transfer of it."""
    await store.register_owner(OwnerInfo(instance_id="a", pid=os.getpid(), host=socket.gethostname()), TTL_S)
    assert (await store.begin(key, fingerprint="fp", tool="tool", owner="a")).claimed


async def claim_and_complete(store: Store, key: str) -> None:
    await claim(store, key)
    await store.complete(key, owner="a", result=b"result with handles")


async def test_stores_satisfy_the_blob_protocol(harness: Harness) -> None:
    assert isinstance(harness.store, BlobStore)


async def test_a_result_is_opened_written_sealed_and_read_back(harness: Harness) -> None:
    store = harness.store
    final = handle_for("r-1", PAYLOAD, CHUNK, encoding="base64", media_type="image/png")
    await claim(store)
    provisional = TransferHandle(id="r-1", size=0, chunk_size=CHUNK, sha256="", chunks=[])
    assert await store.open_transfer(provisional, key="k", scope="s", sealed=False) == []
    # Chunks arrive in any order.
    parts = chunks_of(PAYLOAD)
    for index in (2, 0, 1):
        await store.write_chunk("r-1", index, parts[index])
    # Unsealed, the transfer has no handle to give yet.
    assert await store.get_transfer("r-1", scope="s") is None
    await store.seal_transfer(final)

    assert await store.get_transfer("r-1", scope="s") == final
    assert await read_all(store, final) == PAYLOAD
    assert await store.read_chunk("r-1", 3, scope="s") is None
    assert await store.get_transfer("r-2", scope="s") is None
    # Sealing again with the same layout is a no-op; with another it conflicts.
    await store.seal_transfer(final)
    with pytest.raises(TransferConflict):
        await store.seal_transfer(handle_for("r-1", PAYLOAD[:-1], CHUNK))


async def test_reopening_an_upload_resumes_it_and_another_layout_conflicts(harness: Harness) -> None:
    store = harness.store
    handle = handle_for("up-1", PAYLOAD, CHUNK)
    assert await store.open_transfer(handle, key=None, scope="s", sealed=True) == []
    parts = chunks_of(PAYLOAD)
    await store.write_chunk("up-1", 2, parts[2])
    await store.write_chunk("up-1", 0, parts[0])

    assert await store.open_transfer(handle, key=None, scope="s", sealed=True) == [0, 2]
    # Encoding and media type say how to present the bytes, not which bytes: same layout.
    relabelled = handle_for("up-1", PAYLOAD, CHUNK, media_type="text/csv")
    assert await store.open_transfer(relabelled, key=None, scope="s", sealed=True) == [0, 2]
    for other in (handle_for("up-1", PAYLOAD, CHUNK * 2), handle_for("up-1", PAYLOAD[::-1], CHUNK)):
        with pytest.raises(TransferConflict):
            await store.open_transfer(other, key=None, scope="s", sealed=True)
    # The conflict changed nothing.
    assert await store.open_transfer(handle, key=None, scope="s", sealed=True) == [0, 2]
    assert await store.read_chunk("up-1", 0, scope="s") == parts[0]


async def test_reopening_an_unsealed_result_starts_it_over(harness: Harness) -> None:
    """An unsealed result is the output of a run cut short; a new run may produce other bytes."""
    store = harness.store
    await claim(store)
    provisional = TransferHandle(id="r-1", size=0, chunk_size=CHUNK, sha256="", chunks=[])
    await store.open_transfer(provisional, key="k", scope="s", sealed=False)
    await store.write_chunk("r-1", 0, b"first run")

    assert await store.open_transfer(provisional, key="k", scope="s", sealed=False) == []
    assert await store.read_chunk("r-1", 0, scope="s") is None


async def test_writing_an_index_twice_is_a_no_op(harness: Harness) -> None:
    store = harness.make(max_blob_bytes=2 * CHUNK + 2048)
    handle = handle_for("up-1", PAYLOAD, CHUNK)
    await store.open_transfer(handle, key=None, scope="s", sealed=True)
    parts = chunks_of(PAYLOAD)
    for _ in range(3):
        await store.write_chunk("up-1", 0, parts[0])
    # Counted once against the cap: the whole payload still fits.
    await store.write_chunk("up-1", 1, parts[1])
    await store.write_chunk("up-1", 2, parts[2])
    assert await store.open_transfer(handle, key=None, scope="s", sealed=True) == [0, 1, 2]
    assert await read_all(store, handle) == PAYLOAD


async def test_another_scope_finds_nothing(harness: Harness) -> None:
    store = harness.store
    handle = await upload(store, scope="alice")
    assert await read_all(store, handle, scope="alice") == PAYLOAD

    assert await store.get_transfer("up-1", scope="bob") is None
    assert await store.read_chunk("up-1", 0, scope="bob") is None
    # Upload ids are content addressed: knowing the hashes must not let another principal
    # claim the bytes as uploaded.
    with pytest.raises(TransferConflict, match="another scope"):
        await store.open_transfer(handle, key=None, scope="bob", sealed=True)


async def test_a_write_past_the_size_cap_stores_nothing(harness: Harness) -> None:
    store = harness.make(max_blob_bytes=CHUNK + 100)
    handle = handle_for("up-1", PAYLOAD, CHUNK)
    # Too large as a whole: refused at once rather than after a gigabyte of chunks.
    with pytest.raises(RMCPStoreError, match="max_blob_bytes") as too_large:
        await store.open_transfer(handle, key=None, scope="s", sealed=True)
    assert too_large.value.operation == "open_transfer"

    await claim(store)
    provisional = TransferHandle(id="r-1", size=0, chunk_size=CHUNK, sha256="", chunks=[])
    await store.open_transfer(provisional, key="k", scope="s", sealed=False)
    parts = chunks_of(PAYLOAD)
    await store.write_chunk("r-1", 0, parts[0])
    with pytest.raises(RMCPStoreError, match="max_blob_bytes of 4196: nothing was stored") as past_cap:
        await store.write_chunk("r-1", 1, parts[1])
    assert past_cap.value.operation == "write_chunk"
    assert "Retry once older transfers expire" in str(past_cap.value)
    assert await store.read_chunk("r-1", 1, scope="s") is None

    # Deleting a transfer frees its bytes.
    await store.delete_transfer("r-1")
    assert await store.read_chunk("r-1", 0, scope="s") is None
    await store.open_transfer(provisional, key="k", scope="s", sealed=False)
    await store.write_chunk("r-1", 1, parts[1])
    assert await store.read_chunk("r-1", 1, scope="s") == parts[1]


async def test_room_held_by_dead_transfers_is_reclaimed_at_the_cap(harness: Harness) -> None:
    """No server calls purge_expired on a schedule: a write at the cap must not fail for room
    that transfers nobody can read any more hold."""
    store = harness.make(max_blob_bytes=2 * CHUNK)
    await claim(store, "k")
    provisional = TransferHandle(id="r-1", size=0, chunk_size=CHUNK, sha256="", chunks=[])
    await store.open_transfer(provisional, key="k", scope="s", sealed=False)
    await store.write_chunk("r-1", 0, PAYLOAD[:CHUNK])
    await store.write_chunk("r-1", 1, PAYLOAD[CHUNK : 2 * CHUNK])
    # The tool refused after all: its key is free, its output dead.
    assert await store.release("k", owner="a")

    await store.open_transfer(handle_for("up-1", PAYLOAD[:CHUNK], CHUNK), key=None, scope="s", sealed=True)
    await store.write_chunk("up-1", 0, PAYLOAD[:CHUNK])
    assert await store.read_chunk("up-1", 0, scope="s") == PAYLOAD[:CHUNK]
    assert await store.read_chunk("r-1", 0, scope="s") is None


async def test_writing_or_sealing_an_unknown_transfer_conflicts(harness: Harness) -> None:
    store = harness.store
    with pytest.raises(TransferConflict, match="open it again"):
        await store.write_chunk("nope", 0, b"x")
    with pytest.raises(TransferConflict, match="open it again"):
        await store.seal_transfer(handle_for("nope", b"x", CHUNK))
    await store.delete_transfer("nope")


async def test_uploads_live_upload_ttl_s_after_their_last_open(
    harness: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    store = harness.store
    handle = await upload(store)
    await harness.advance(UPLOAD_TTL_S - 10)
    # A resumed upload starts its lifetime over.
    assert await store.open_transfer(handle, key=None, scope="s", sealed=True) == [0, 1, 2]
    await harness.advance(UPLOAD_TTL_S - 10)
    assert await store.purge_expired() == 0
    assert await read_all(store, handle) == PAYLOAD

    await harness.advance(20)
    # Gone for readers at once, and its bytes freed by the purge.
    assert await store.get_transfer("up-1", scope="s") is None
    assert await store.read_chunk("up-1", 0, scope="s") is None
    assert await store.purge_expired() == 1
    assert await store.open_transfer(handle, key=None, scope="s", sealed=True) == []


async def test_a_result_lives_as_long_as_its_keys_record(
    harness: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    store = harness.store
    await claim_and_complete(store, "k")
    handle = handle_for("r-1", PAYLOAD, CHUNK)
    await store.open_transfer(handle, key="k", scope="s", sealed=False)
    for index, chunk in enumerate(chunks_of(PAYLOAD)):
        await store.write_chunk("r-1", index, chunk)
    await store.seal_transfer(handle)

    # Well past the upload TTL: a result is kept for its record, not for a fixed time.
    await harness.advance(TTL_S - 1)
    assert await store.purge_expired() == 0
    assert await read_all(store, handle) == PAYLOAD
    await harness.advance(2)
    assert await store.purge_expired() == 2  # the record and its transfer
    assert await store.get_transfer("r-1", scope="s") is None
    assert await store.read_chunk("r-1", 0, scope="s") is None


async def test_a_task_result_lives_as_long_as_its_task(
    harness: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    store = harness.store
    await store.register_owner(OwnerInfo(instance_id="a", pid=os.getpid(), host=socket.gethostname()), TTL_S)
    task = TaskRecord(
        task_id="t-1",
        key=None,
        scope="s",
        fingerprint="fp",
        tool="tool",
        state=TaskState.WORKING,
        owner="a",
        created_at="2026-01-01T00:00:00Z",
        updated_at="2026-01-01T00:00:00Z",
    )
    assert (await store.create_task(task, ttl_s=TTL_S / 2)).created
    handle = handle_for("r-1", PAYLOAD, CHUNK)
    await store.open_transfer(handle, key="t-1", scope="s", sealed=False)
    await store.write_chunk("r-1", 0, chunks_of(PAYLOAD)[0])
    assert await store.finish_task(
        "t-1", owner="a", state=TaskState.COMPLETED, result=b"r", message=None, updated_at="later"
    )

    await harness.advance(TTL_S / 2 - 1)
    assert await store.purge_expired() == 0
    assert await store.read_chunk("r-1", 0, scope="s") == chunks_of(PAYLOAD)[0]
    await harness.advance(2)
    assert await store.purge_expired() == 2  # the task and its transfer
    assert await store.read_chunk("r-1", 0, scope="s") is None


async def test_an_unsealed_result_of_a_crashed_run_goes_with_its_record(
    harness: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    store = harness.store
    owner = OwnerInfo(instance_id="crashed", pid=os.getpid(), host=socket.gethostname())
    await store.register_owner(owner, 30.0)
    assert (await store.begin("k", fingerprint="fp", tool="tool", owner="crashed")).claimed
    assert await store.mark_entered("k", owner="crashed")
    provisional = TransferHandle(id="r-1", size=0, chunk_size=CHUNK, sha256="", chunks=[])
    await store.open_transfer(provisional, key="k", scope="s", sealed=False)
    await store.write_chunk("r-1", 0, PAYLOAD[:CHUNK])
    await store.release_owner("crashed")

    # The in-doubt record lives its TTL (a lookup must still answer in doubt), and so do the
    # chunks; then both go.
    await harness.advance(TTL_S - 1)
    assert await store.purge_expired() == 0
    await harness.advance(2)
    assert await store.purge_expired() == 2
    assert await store.read_chunk("r-1", 0, scope="s") is None


async def test_a_result_whose_record_was_never_written_goes_at_the_next_purge(harness: Harness) -> None:
    store = harness.store
    # Another key's claim first: the SQLite store's first write also purges (then once a minute).
    await claim(store, "other")
    provisional = TransferHandle(id="r-1", size=0, chunk_size=CHUNK, sha256="", chunks=[])
    await store.open_transfer(provisional, key="never-claimed", scope="s", sealed=False)
    await store.write_chunk("r-1", 0, b"orphan")
    assert await store.read_chunk("r-1", 0, scope="s") == b"orphan"
    assert await store.purge_expired() == 1
    assert await store.read_chunk("r-1", 0, scope="s") is None


async def test_every_blob_method_fails_after_aclose(harness: Harness) -> None:
    store = harness.store
    handle = await upload(store)
    await store.aclose()
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: store.open_transfer(handle, key=None, scope="s", sealed=True),
        lambda: store.write_chunk("up-1", 0, b"x"),
        lambda: store.seal_transfer(handle),
        lambda: store.get_transfer("up-1", scope="s"),
        lambda: store.read_chunk("up-1", 0, scope="s"),
        lambda: store.delete_transfer("up-1"),
    ]
    for call in calls:
        with pytest.raises(RMCPStoreClosedError):
            await call()


async def test_blob_settings_must_be_positive(harness: Harness) -> None:
    with pytest.raises(RMCPConfigError, match="must be a positive number of bytes") as error:
        harness.make(max_blob_bytes=0)
    assert error.value.path == "max_blob_bytes"
    for ttl in (0.0, float("nan")):
        with pytest.raises(RMCPConfigError, match="must be a positive number of seconds") as error:
            harness.make(upload_ttl_s=ttl)
        assert error.value.path == "upload_ttl_s"


# SQLite: durability


async def test_sqlite_chunks_survive_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "dedup.db"
    store = SQLiteStore(path)
    handle = await upload(store)
    await claim(store, "k")
    result = handle_for("r-1", PAYLOAD[::-1], CHUNK)
    await store.open_transfer(result, key="k", scope="s", sealed=False)
    await store.write_chunk("r-1", 1, chunks_of(PAYLOAD[::-1])[1])
    await store.aclose()

    reopened = SQLiteStore(path)
    try:
        assert await reopened.open_transfer(handle, key=None, scope="s", sealed=True) == [0, 1, 2]
        assert await reopened.get_transfer("up-1", scope="s") == handle
        assert await read_all(reopened, handle) == PAYLOAD
        # Unsealed: no handle to give, but the chunk is there for the run's owner.
        assert await reopened.get_transfer("r-1", scope="s") is None
        assert await reopened.read_chunk("r-1", 1, scope="s") == chunks_of(PAYLOAD[::-1])[1]
    finally:
        await reopened.aclose()


CHILD_WRITER = """
import sys
import anyio
from rmcp_actors._transfer import handle_for
from rmcp_actors.stores import SQLiteStore

async def main() -> None:
    store = SQLiteStore(sys.argv[1])
    payload = bytes(range(256)) * 64
    handle = handle_for("up-1", payload, 4096)
    await store.open_transfer(handle, key=None, scope="s", sealed=True)
    await store.write_chunk("up-1", 0, payload[:4096])
    await store.write_chunk("up-1", 3, payload[3 * 4096 : 4 * 4096])
    print("written", flush=True)
    sys.stdin.read()

anyio.run(main)  # asyncio: the store must not depend on trio
"""


async def test_sqlite_a_written_chunk_survives_a_killed_process(tmp_path: Path) -> None:
    path = tmp_path / "dedup.db"
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", CHILD_WRITER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        output = b""
        with trio.fail_after(30):
            while not output.endswith(b"\n"):
                data = await process.stdout.receive_some()
                assert data, f"the child exited early with {await process.wait()}"
                output += data
        assert output == b"written\n"
        # SIGKILL: no aclose, no checkpoint; what write_chunk returned for must be in the file.
        process.send_signal(signal.SIGKILL)
        assert await process.wait() == -signal.SIGKILL
    finally:
        process.kill()
        await process.wait()
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                await stream.aclose()

    store = SQLiteStore(path)
    try:
        payload = bytes(range(256)) * 64
        handle = handle_for("up-1", payload, 4096)
        assert await store.open_transfer(handle, key=None, scope="s", sealed=True) == [0, 3]
        assert await store.read_chunk("up-1", 3, scope="s") == payload[3 * 4096 : 4 * 4096]
    finally:
        await store.aclose()


async def test_sqlite_two_stores_on_one_file_write_the_same_upload(tmp_path: Path) -> None:
    """Server processes sharing a file: a chunk both write is held once, counted once."""
    path = tmp_path / "dedup.db"
    stores = [SQLiteStore(path, max_blob_bytes=len(PAYLOAD)) for _ in range(2)]
    handle = handle_for("up-1", PAYLOAD, CHUNK)

    async def send(store: SQLiteStore) -> None:
        await store.open_transfer(handle, key=None, scope="s", sealed=True)
        for index, chunk in enumerate(chunks_of(PAYLOAD)):
            await store.write_chunk(handle.id, index, chunk)

    try:
        async with trio.open_nursery() as nursery:
            for store in stores:
                nursery.start_soon(send, store)
        assert await stores[0].open_transfer(handle, key=None, scope="s", sealed=True) == [0, 1, 2]
        assert await read_all(stores[1], handle) == PAYLOAD
        # Counted once: the cap (exactly the payload) has no room for a byte more.
        await stores[1].open_transfer(handle_for("up-2", b"x", CHUNK), key=None, scope="s", sealed=True)
        with pytest.raises(RMCPStoreError, match="max_blob_bytes"):
            await stores[1].write_chunk("up-2", 0, b"x")
    finally:
        for store in stores:
            await store.aclose()
