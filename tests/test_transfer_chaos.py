"""Chunked transfer under chaos (issue 12, deliverable 4): chunk messages corrupted and dropped by
the FaultInjector, a server killed in the middle of a 50 MiB transfer; every transfer completes,
verified, with each retransmission counted.

The server is ``benchmarks/_transfer_server.py`` (RMCP installed; ``blob(size)`` a large
result, ``digest(text)`` the SHA-256 of a large argument), in memory through the JSON-RPC wire
or over stdio. The counts on ``CallResult.transfers`` must equal the injector's: with one chunk
request in flight, each damaged chunk (``corrupt_chunk``) and each lost one (``drop_response``,
which ends the connection) is read, or written, exactly once more.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import ModuleType

import pytest
from conftest import FAST_RECOVERY, PYTHON
from mcp import Client
from mcp.client._memory import InMemoryTransport

from rmcp_actors import CallResult, MemoryStore, PolicyOverrides, RMCPSupervisor, ServerSpec
from rmcp_actors.config import TransferOverrides
from rmcp_actors.testing import CHUNK_METHODS, FaultInjector, FaultPlan

SERVER_PROGRAM = Path(__file__).resolve().parents[1] / "benchmarks" / "_transfer_server.py"
KIB = 1 << 10
MIB = 1 << 20


def _load_server() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_transfer_server", SERVER_PROGRAM)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("_transfer_server", module)
    spec.loader.exec_module(module)
    return module


transfer_server = _load_server()


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def overrides(parallel: int, chunk_size: int = 64 * KIB) -> PolicyOverrides:
    return PolicyOverrides(
        reconnect=FAST_RECOVERY.reconnect,
        retry=FAST_RECOVERY.retry,
        transfer=TransferOverrides(parallel=parallel, chunk_size=chunk_size, threshold=64 * KIB),
    )


@asynccontextmanager
async def serving(transport: str, tmp_path: Path, policy: PolicyOverrides) -> AsyncIterator[ServerSpec]:
    """The spec of the transfer server over ``transport``, whose chunks outlive a reconnect.

    In memory, the server's lifespan closes its store when its last connection ends, so a
    second connection stays open beside the runtime's (as other clients of a server would):
    a reconnect finds the transfer. Over stdio each connection is a new process: the store is a
    SQLite file they share, as a restarted server would.
    """
    if transport == "memory":
        app = transfer_server.build_server(MemoryStore())
        async with Client(InMemoryTransport(app)):
            yield ServerSpec.in_memory("files", app, wire="jsonrpc", overrides=policy)
        return
    args = [str(SERVER_PROGRAM), "--store", str(tmp_path / "store.sqlite")]
    yield ServerSpec.stdio("files", PYTHON, args, overrides=policy)


def served_twice(log: Path, operation: str) -> int:
    """Chunks the server handed out (``read``) or took in (``write``) more than once."""
    lines = [line for line in log.read_text().splitlines() if line.startswith(operation + " ")]
    return len(lines) - len(set(lines))


# --- corruption and drops of chunk messages ----------------------------------------------------


@pytest.mark.parametrize("transport", ["memory", "stdio"])
async def test_corrupt_and_dropped_result_chunks_are_read_again_each_counted(
    transport: str, tmp_path: Path
) -> None:
    size = 3 * MIB  # 48 chunks of 64 KiB
    plan = FaultPlan(seed=5, corrupt_chunk=0.15, drop_response=0.05, methods=CHUNK_METHODS)
    injector = FaultInjector(plan)
    async with serving(transport, tmp_path, overrides(parallel=1)) as spec, RMCPSupervisor.open() as sup:
        await sup.add_server(injector.spec(spec))
        result = await sup.call("files", "blob", {"size": size})
    assert sha256(result.text) == sha256(transfer_server.payload(size))
    (transfer,) = result.transfers
    assert (transfer.direction, transfer.size, transfer.chunks) == ("result", size, 48)
    assert injector.counts["corrupt_chunk"] > 0
    assert injector.counts["drop_response"] > 0
    assert transfer.refetched == injector.counts["corrupt_chunk"] + injector.counts["drop_response"]
    assert transfer.reconnects == injector.counts["drop_response"]
    assert sum(injector.counts.values()) == transfer.refetched
    assert {event.method for event in injector.events} == {"rmcp/transfer/read"}


@pytest.mark.parametrize("transport", ["memory", "stdio"])
async def test_corrupt_argument_chunks_are_refused_and_sent_again_each_counted(
    transport: str, tmp_path: Path
) -> None:
    text = transfer_server.payload(3 * MIB + 123)
    injector = FaultInjector(FaultPlan(seed=2, corrupt_chunk=0.15, methods=CHUNK_METHODS))
    async with serving(transport, tmp_path, overrides(parallel=1)) as spec, RMCPSupervisor.open() as sup:
        await sup.add_server(injector.spec(spec))
        result = await sup.call("files", "digest", {"text": text})
    assert result.text == sha256(text)  # the server got the argument whole
    (transfer,) = result.transfers
    assert (transfer.direction, transfer.chunks) == ("argument", 49)
    assert injector.counts["corrupt_chunk"] > 0
    # The server refuses each damaged chunk (-32031, nothing stored); the client sends it again.
    assert transfer.resent == injector.counts["corrupt_chunk"]
    assert {event.method for event in injector.events} == {"rmcp/transfer/write"}


DROPS = FaultPlan(seed=2, corrupt_chunk=0.15, drop_response=0.05, methods=CHUNK_METHODS)


async def test_lost_write_answers_end_the_connection_and_each_is_sent_again_counted() -> None:
    text = transfer_server.payload(3 * MIB + 123)
    injector = FaultInjector(DROPS)
    async with serving("memory", Path(), overrides(parallel=1)) as spec, RMCPSupervisor.open() as sup:
        await sup.add_server(injector.spec(spec))
        result = await sup.call("files", "digest", {"text": text})
    assert result.text == sha256(text)
    assert injector.counts["drop_response"] > 0
    assert injector.connections == 1 + injector.counts["drop_response"]
    # Counted over the whole call, though a lost connection starts a new attempt.
    (transfer,) = result.transfers
    assert transfer.resent == injector.counts["corrupt_chunk"] + injector.counts["drop_response"]
    assert transfer.reconnects == injector.counts["drop_response"]


async def test_parallel_reads_repair_every_corrupt_chunk_and_count_it() -> None:
    size = 5 * MIB
    injector = FaultInjector(FaultPlan(seed=11, corrupt_chunk=0.3, methods=CHUNK_METHODS))
    async with serving("memory", Path(), overrides(parallel=4)) as spec, RMCPSupervisor.open() as sup:
        await sup.add_server(injector.spec(spec))
        result = await sup.call("files", "blob", {"size": size})
    assert sha256(result.text) == sha256(transfer_server.payload(size))
    (transfer,) = result.transfers
    assert injector.counts["corrupt_chunk"] > 10
    assert transfer.refetched == injector.counts["corrupt_chunk"]
    assert transfer.reconnects == 0


async def test_every_copy_corrupt_fails_the_call_instead_of_looping() -> None:
    injector = FaultInjector(FaultPlan(corrupt_chunk=1.0, methods=CHUNK_METHODS))
    async with serving("memory", Path(), overrides(parallel=1)) as spec, RMCPSupervisor.open() as sup:
        await sup.add_server(injector.spec(spec))
        with pytest.raises(Exception, match=r"SHA-256|corrupt") as failed:
            await sup.call("files", "blob", {"size": 256 * KIB})
    assert type(failed.value).__module__.startswith("rmcp_actors")
    assert 1 < injector.counts["corrupt_chunk"] < 100  # bounded tries, then a documented error


# --- a server killed in the middle of a 50 MiB transfer (SQLite store) --------------------------


def killing_server(tmp_path: Path, kill_at: str, parallel: int) -> ServerSpec:
    """The stdio server on a SQLite store that SIGKILLs itself at ``kill_at`` once, then, started
    again by rmcp_actors on the same file, serves on."""
    args = ["--store", str(tmp_path / "store.sqlite"), "--chunk-log", str(tmp_path / "chunks.log")]
    args += ["--kill-at", kill_at, "--kill-marker", str(tmp_path / "killed")]
    return ServerSpec.stdio(
        "files", PYTHON, [str(SERVER_PROGRAM), *args], overrides=overrides(parallel, chunk_size=MIB)
    )


@pytest.mark.parametrize("parallel", [1, 4])
async def test_a_server_killed_mid_result_resumes_and_the_file_matches(tmp_path: Path, parallel: int) -> None:
    size = 50 * MIB
    sink = tmp_path / "result.bin"
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(killing_server(tmp_path, "read:26", parallel))
        result: CallResult = await sup.call("files", "blob", {"size": size}, result_sink=sink, timeout=300)
    assert (tmp_path / "killed").exists()
    expected = hashlib.sha256(transfer_server.payload(size).encode()).hexdigest()
    assert hashlib.sha256(sink.read_bytes()).hexdigest() == expected
    (transfer,) = result.transfers
    assert (transfer.sha256, transfer.chunks, transfer.sink) == (expected, 50, str(sink))
    assert transfer.reconnects >= 1
    # Resumed from the last verified chunk: no chunk reached the client twice, and the server
    # handed out again at most the reads in flight when it died (their answers died with it).
    assert transfer.bytes_moved == size
    assert served_twice(tmp_path / "chunks.log", "read") < max(2, parallel)
    assert transfer.refetched <= parallel
    assert result.content[0].type == "resource_link"  # the payload went to the file


async def test_a_server_killed_mid_upload_resumes_and_gets_the_argument_whole(tmp_path: Path) -> None:
    text = transfer_server.payload(50 * MIB)
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(killing_server(tmp_path, "write:26", parallel=1))
        result = await sup.call("files", "digest", {"text": text}, timeout=300)
    assert (tmp_path / "killed").exists()
    assert result.text == sha256(text)
    # The chunks stored before the kill were found on the restarted server, not sent again:
    # only the one being written when it died was.
    assert served_twice(tmp_path / "chunks.log", "write") < 2
    (transfer,) = result.transfers
    assert transfer.reconnects >= 1
    assert transfer.resent < 2
