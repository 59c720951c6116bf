"""The chaos server (``rmcp_actors.testing.chaos_server``): each tool in memory, and the program
over a real stdio subprocess (ledger across processes and restarts, concurrency, rate-limit
signal, large payloads, RMCP on a durable store)."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from conftest import FAST_RECOVERY
from mcp import Client, MCPError, StdioServerParameters
from mcp.client._memory import InMemoryTransport
from mcp.server.mcpserver import MCPServer
from mcp_types import TextContent

from rmcp_actors import (
    ConnectionState,
    Outcome,
    PolicyOverrides,
    RetryOverrides,
    RMCPSupervisor,
    RMCPTimeoutAfterSendError,
    ServerSpec,
)
from rmcp_actors.flow._feedback import RATE_LIMITED_CODE
from rmcp_actors.stores import MemoryStore
from rmcp_actors.testing import Ledger, build_chaos_server, chaos_server_command, chaos_server_environment


def text_of(result: Any) -> str:
    [block] = result.content
    assert isinstance(block, TextContent)
    return block.text


def chaos_app(ledger: Path, *, rmcp: bool, rate_per_s: float = 10.0) -> MCPServer:
    store = MemoryStore(clock=trio.current_time) if rmcp else None
    return build_chaos_server(ledger, store, rmcp=rmcp, rate_per_s=rate_per_s)


@pytest.fixture(params=[False, True], ids=["plain", "rmcp"])
def rmcp(request: pytest.FixtureRequest) -> bool:
    return request.param


async def test_effect_runs_are_counted_in_the_ledger_file_and_by_the_ledger_tool(
    tmp_path: Path, rmcp: bool
) -> None:
    path = tmp_path / "ledger.sqlite"
    async with Client(InMemoryTransport(chaos_app(path, rmcp=rmcp))) as client:
        for label in ["a", "b", "a"]:
            assert text_of(await client.call_tool("effect", {"label": label})) == f"effect {label}"
        every = await client.call_tool("ledger", {})
        one = await client.call_tool("ledger", {"label": "a"})
        never = await client.call_tool("ledger", {"label": "z"})
    assert every.structured_content == {"a": 2, "b": 1}
    assert one.structured_content == {"a": 2}
    assert never.structured_content == {"z": 0}
    # The file outlives the server: a new reader (another process would do the same) sees it.
    with Ledger(path) as ledger:
        assert ledger.counts() == {"a": 2, "b": 1}
        assert ledger.total() == 3
        rows = sqlite3.connect(path).execute("SELECT DISTINCT pid FROM effects").fetchall()
    assert rows == [(os.getpid(),)]


async def test_peak_concurrency_counts_runs_at_once_and_reset_starts_again(
    tmp_path: Path, rmcp: bool, autojump_clock: trio.testing.MockClock
) -> None:
    async with Client(InMemoryTransport(chaos_app(tmp_path / "ledger", rmcp=rmcp))) as client:

        async def slow(seconds: float) -> None:
            await client.call_tool("slow", {"seconds": seconds, "label": f"slept {seconds}"})

        async with trio.open_nursery() as nursery:
            for seconds in (1.0, 2.0, 3.0, 4.0, 5.0):
                nursery.start_soon(slow, seconds)
            await trio.sleep(2.5)
            during = await client.call_tool("peak_concurrency", {"reset": True})
        after = await client.call_tool("peak_concurrency", {})
        ledger = await client.call_tool("ledger", {})
    # Five at once at first; at 2.5 s three still ran, and the reset started from those.
    assert during.structured_content == {"peak": 5, "running": 3}
    assert after.structured_content == {"peak": 3, "running": 0}
    assert ledger.structured_content is not None
    assert sum(ledger.structured_content.values()) == 5


async def test_fail_answers_an_error_result_or_a_protocol_error(tmp_path: Path, rmcp: bool) -> None:
    async with Client(InMemoryTransport(chaos_app(tmp_path / "ledger", rmcp=rmcp))) as client:
        tool_error = await client.call_tool("fail", {"how": "tool_error", "message": "no stock"})
        exception = await client.call_tool("fail", {"how": "exception", "message": "boom"})
        with pytest.raises(MCPError) as protocol_error:
            await client.call_tool("fail", {"how": "protocol_error", "message": "broken"})
    assert (tool_error.is_error, text_of(tool_error)) == (True, "Error executing tool fail: no stock")
    # An unexpected exception's text is not the client's to read: the SDK sends a generic one.
    assert (exception.is_error, text_of(exception)) == (True, "Error executing tool fail")
    assert protocol_error.value.error.message == "broken"


async def test_large_answers_exactly_size_characters(tmp_path: Path, rmcp: bool) -> None:
    async with Client(InMemoryTransport(chaos_app(tmp_path / "ledger", rmcp=rmcp))) as client:
        sizes = [len(text_of(await client.call_tool("large", {"size": size}))) for size in (0, 1, 3_000_017)]
        too_large = await client.call_tool("large", {"size": 1 << 40})
    assert sizes == [0, 1, 3_000_017]
    assert too_large.is_error


async def test_hang_runs_until_the_call_is_given_up(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    app = chaos_app(tmp_path / "ledger", rmcp=False)
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("chaos", app))
        with pytest.raises(RMCPTimeoutAfterSendError):
            await sup.call("chaos", "hang", {}, timeout=30)
        # The client's cancel reached the plain server: the run ended.
        peak = (await sup.call("chaos", "peak_concurrency", {})).structured_content
    assert peak == {"peak": 1, "running": 0}


async def test_limited_refuses_over_its_rate_with_the_signal_rmcp_slows_down_for(
    tmp_path: Path, rmcp: bool, autojump_clock: trio.testing.MockClock
) -> None:
    async with Client(InMemoryTransport(chaos_app(tmp_path / "ledger", rmcp=rmcp, rate_per_s=5))) as client:
        accepted = [await client.call_tool("limited", {"text": "ok"}) for _ in range(5)]
        with pytest.raises(MCPError) as refused:
            await client.call_tool("limited", {"text": "ok"})
    assert all(text_of(result) == "ok" for result in accepted)
    assert refused.value.error.code == RATE_LIMITED_CODE
    assert refused.value.error.data == {"retryAfterMs": 200}

    # The same server behind rmcp_actors: every call succeeds at the server's pace, once each
    # (the refusal comes before RMCP claims a key, so a retry with that key runs).
    once = PolicyOverrides(retry=RetryOverrides(max_attempts=1))
    app = chaos_app(tmp_path / "ledger", rmcp=rmcp, rate_per_s=5)
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("chaos", app, overrides=once))
        started = trio.current_time()
        results: list[Any] = []

        async def call() -> None:
            results.append(await sup.call("chaos", "limited", {"text": "ok"}, timeout=60))

        async with trio.open_nursery() as nursery:
            for _ in range(30):
                nursery.start_soon(call)
        elapsed = trio.current_time() - started
        [limiter] = sup.statistics().limiters
    assert [result.outcome for result in results] == [Outcome.SUCCEEDED] * 30
    assert elapsed >= 25 / 5 - 0.1
    assert limiter.gates[0].signals > 0


def test_a_store_needs_rmcp_and_a_rate_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no idempotency store"):
        build_chaos_server(tmp_path / "ledger", MemoryStore(), rmcp=False)
    with pytest.raises(ValueError, match="positive"):
        build_chaos_server(tmp_path / "ledger", rate_per_s=0)


# Over stdio: the program itself, as `python -m rmcp_actors.testing.chaos_server` runs it.


def stdio_params(argv: list[str]) -> StdioServerParameters:
    return StdioServerParameters(command=argv[0], args=argv[1:], env=chaos_server_environment())


def stdio_spec(argv: list[str]) -> ServerSpec:
    return ServerSpec.stdio(
        "chaos", argv[0], argv[1:], env=chaos_server_environment(), overrides=FAST_RECOVERY
    )


@asynccontextmanager
async def stdio_client(argv: list[str]) -> AsyncIterator[Client]:
    async with Client(stdio_params(argv)) as client:
        yield client


async def test_stdio_plain_server_counts_effects_concurrency_and_large_payloads(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    argv = chaos_server_command(path, None)
    async with stdio_client(argv) as client:
        for label in ["a", "b", "a"]:
            await client.call_tool("effect", {"label": label})
        payload = await client.call_tool("large", {"size": 2_500_001})

        async def hang() -> None:
            await client.call_tool("hang", {})

        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(hang)
            with trio.fail_after(20):
                while (await client.call_tool("peak_concurrency", {})).structured_content != {
                    "peak": 4,
                    "running": 4,
                }:
                    # Across a pipe, no event says the four runs have started.
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        counted = await client.call_tool("ledger", {})
        # This process writes to the same file while the server has it open.
        with Ledger(path) as ledger:
            ledger.record("from the test")
        both = await client.call_tool("ledger", {})
    assert counted.structured_content == {"a": 2, "b": 1}
    assert both.structured_content == {"a": 2, "b": 1, "from the test": 1}
    assert len(text_of(payload)) == 2_500_001
    with Ledger(path) as ledger:
        pids = {pid for (pid,) in sqlite3.connect(path).execute("SELECT pid FROM effects")}
        assert ledger.counts() == {"a": 2, "b": 1, "from the test": 1}
    assert len(pids) == 2
    assert os.getpid() in pids


async def test_stdio_limited_signal_is_recognised_by_rmcp(tmp_path: Path) -> None:
    argv = [*chaos_server_command(tmp_path / "ledger", None), "--rate", "50"]
    spec = ServerSpec.stdio(
        "chaos", argv[0], argv[1:], env=chaos_server_environment(), overrides=FAST_RECOVERY
    )
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(spec)
        results: list[Any] = []

        async def call() -> None:
            results.append(await sup.call("chaos", "limited", {"text": "ok"}, timeout=60))

        async with trio.open_nursery() as nursery:
            for _ in range(80):
                nursery.start_soon(call)
        [limiter] = sup.statistics().limiters
    assert [result.outcome for result in results] == [Outcome.SUCCEEDED] * 80
    assert limiter.gates[0].signals > 0
    assert limiter.gates[0].engaged


async def wait_until_reconnected(sup: RMCPSupervisor, connects: int) -> None:
    with trio.fail_after(30):
        while True:
            [stats] = sup.statistics().connections
            if stats.connects >= connects and stats.state is ConnectionState.READY:
                return
            # The connection actor offers no event to wait on from outside.
            await trio.sleep(0.01)


async def test_stdio_server_on_a_sqlite_store_replays_a_key_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    argv = chaos_server_command(path, tmp_path / "rmcp.sqlite")
    spec = ServerSpec.stdio(
        "chaos", argv[0], argv[1:], env=chaos_server_environment(), overrides=FAST_RECOVERY
    )
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(spec)
        first = await sup.call("chaos", "effect", {"label": "order"}, idempotency_key="order-key")
        with Ledger(path) as ledger:
            [(server_pid,)] = sqlite3.connect(path).execute("SELECT pid FROM effects").fetchall()
            os.kill(server_pid, signal.SIGKILL)
            await wait_until_reconnected(sup, connects=2)
            again = await sup.call("chaos", "effect", {"label": "order"}, idempotency_key="order-key")
            assert ledger.counts() == {"order": 1}
    assert (first.duplicate, again.duplicate) == (False, True)
    assert again.text == first.text == "effect order"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def test_http_option_serves_streamable_http_with_rmcp_on_a_sqlite_store(tmp_path: Path) -> None:
    port = free_port()
    path = tmp_path / "ledger.sqlite"
    argv = [*chaos_server_command(path, tmp_path / "rmcp.sqlite"), "--http", f"127.0.0.1:{port}"]
    process = await trio.lowlevel.open_process(
        argv, env=chaos_server_environment(), stderr=subprocess.DEVNULL
    )
    try:
        with trio.fail_after(30):
            while True:
                try:
                    await (await trio.open_tcp_stream("127.0.0.1", port)).aclose()
                    break
                except OSError:
                    # Nothing says from outside when uvicorn listens.
                    await trio.sleep(0.05)
        spec = ServerSpec.http("chaos", f"http://127.0.0.1:{port}/mcp", overrides=FAST_RECOVERY)
        async with RMCPSupervisor.open() as sup:
            await sup.add_server(spec)
            first = await sup.call("chaos", "effect", {"label": "web"}, idempotency_key="web-key")
            again = await sup.call("chaos", "effect", {"label": "web"}, idempotency_key="web-key")
    finally:
        process.terminate()
        await process.wait()
    assert (first.duplicate, again.duplicate) == (False, True)
    with Ledger(path) as ledger:
        assert ledger.counts() == {"web": 1}
