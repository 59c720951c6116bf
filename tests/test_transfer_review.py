"""Cancellation, deadlines, failing sinks and concurrency around chunked transfer on the client
(review of issue 12): calls cut in the middle of parallel chunk reads or uploads, and calls that
share a server, content or a supervisor with one that fails."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from mcp.server.mcpserver import MCPServer
from test_transfer_client import KIB, MIB, sha, supervisor
from transfer_server import build_transfer_server, payload

from rmcp_actors import RMCPTimeoutError, RMCPTransferError, TransferOverrides
from rmcp_actors._transfer import METHOD_READ, METHOD_WRITE

PARALLEL = TransferOverrides(threshold=64 * KIB, chunk_size=64 * KIB, parallel=4)


def stall(app: MCPServer, method: str, index: int, reached: trio.Event | None = None) -> None:
    """Make the server's first ``method`` for chunk ``index`` never answer."""
    stalled: list[int] = []
    lowlevel = app._lowlevel_server  # pyright: ignore[reportPrivateUsage]
    entry = lowlevel.get_request_handler(method)
    assert entry is not None

    async def handler(ctx: Any, params: Any) -> Any:
        if params.index == index and not stalled:
            stalled.append(index)
            if reached is not None:
                reached.set()
            await trio.sleep_forever()
        return await entry.handler(ctx, params)

    lowlevel.add_request_handler(method, entry.params_type, handler)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_a_deadline_during_the_reads_is_a_timeout_not_a_lost_answer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    app = build_transfer_server()
    stall(app, METHOD_READ, 5)
    async with supervisor("memory", app, transfer=PARALLEL) as sup:
        started = trio.current_time()
        with pytest.raises(RMCPTransferError) as raised:
            await sup.call("t", "text", {"size": MIB}, timeout=10)
        assert trio.current_time() - started == pytest.approx(10, abs=0.05)
    assert "timeout passed" in raised.value.message
    assert "(0 chunk(s) read again" in raised.value.message  # the timed-out read is not asked again
    assert raised.value.may_have_executed


async def test_a_deadline_during_the_upload_is_a_timeout_that_ran_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    app = build_transfer_server()
    stall(app, METHOD_WRITE, 5)
    async with supervisor("memory", app, transfer=PARALLEL) as sup:
        with pytest.raises(RMCPTimeoutError) as raised:
            await sup.call("t", "digest", {"text": payload(MIB)}, timeout=10)
    assert not raised.value.may_have_executed
    assert app.runs == {}  # type: ignore[attr-defined]


async def test_a_call_cancelled_mid_read_stops_its_reads_and_closes_its_file(tmp_path: Path) -> None:
    app = build_transfer_server()
    reached = trio.Event()
    stall(app, METHOD_READ, 9, reached)
    target = tmp_path / "out.txt"
    async with supervisor("memory", app, transfer=PARALLEL) as sup:
        before = open_fds()
        with trio.move_on_after(5) as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: sup.call("t", "text", {"size": MIB}, result_sink=target))
                await reached.wait()
                nursery.cancel_scope.cancel()
        assert not scope.cancelled_caught
        assert open_fds() == before
        # The server and the supervisor still serve calls.
        result = await sup.call("t", "text", {"size": MIB})
    assert result.text == payload(MIB)


async def test_upload_progress_stays_monotonic_and_ends_at_the_total_when_a_restart_loses_the_upload(
    tmp_path: Path,
) -> None:
    # A memory store: the restarted process lost the chunks written before it died.
    marker = tmp_path / "died"
    args = ("--die-at-write", "5", "--marker", str(marker))
    text = payload(MIB, 13)
    seen: list[tuple[int, int]] = []
    async with supervisor(
        "stdio",
        program="transfer_faults.py",
        args=args,
        transfer=TransferOverrides(threshold=64 * KIB, chunk_size=64 * KIB, parallel=1),
    ) as sup:
        result = await sup.call(
            "t", "digest", {"text": text}, on_transfer_progress=lambda done, total: seen.append((done, total))
        )
    assert marker.exists()
    assert result.structured_content is not None
    assert result.structured_content["sha256"] == sha(text)
    assert all(total == MIB for _, total in seen)
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)
    assert seen[-1] == (MIB, MIB)
