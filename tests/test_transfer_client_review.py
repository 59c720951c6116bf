"""Cancellation, deadlines, failing sinks and concurrency around chunked transfer on the client
(review of issue 12): calls cut in the middle of parallel chunk reads or uploads, and calls that
share a server, content or a supervisor with one that fails."""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Any

import pytest
import trio
import trio.testing
from mcp.server.mcpserver import MCPServer
from test_transfer_client import KIB, MIB, sha, supervisor
from transfer_server import build_transfer_server, payload

import rmcp_actors
from rmcp_actors import (
    HedgeOverrides,
    RMCPSupervisor,
    RMCPTimeoutAfterSendError,
    RMCPTimeoutError,
    RMCPTransferError,
    TransferOverrides,
)
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


async def test_a_sink_on_a_full_disk_fails_its_call_alone(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    pieces: list[bytes] = []

    async def refuse(piece: bytes) -> None:
        if len(pieces) == 3:
            raise OSError(28, "No space left on device")
        pieces.append(piece)

    async with supervisor("memory", transfer=PARALLEL) as sup, trio.open_nursery() as nursery:
        good: list[Any] = []

        async def healthy() -> None:
            good.append(await sup.call("t", "text", {"size": 2 * MIB, "seed": 7}))

        nursery.start_soon(healthy)
        before = open_fds()
        failed: list[RMCPTransferError] = []
        # /dev/full: every write fails with ENOSPC, as on a full disk.
        for sink in (Path("/dev/full"), blocker / "out.txt", refuse):
            with pytest.raises(RMCPTransferError) as raised:
                await sup.call("t", "text", {"size": MIB}, result_sink=sink)
            failed.append(raised.value)
        assert open_fds() == before
    assert "No space left on device" in failed[0].message
    assert "NotADirectoryError" in failed[1].message
    assert "No space left on device" in failed[2].message
    for error in failed:
        assert error.may_have_executed
        assert error.outcome is rmcp_actors.Outcome.SUCCEEDED
        assert error.result is not None
        assert "result sink" in error.message
    assert len(pieces) == 3
    assert good[0].text == payload(2 * MIB, 7)


async def test_two_transferred_items_go_to_one_file_one_after_the_other(tmp_path: Path) -> None:
    target = tmp_path / "both.bin"
    seen: list[tuple[int, int]] = []
    async with supervisor("memory", transfer=PARALLEL) as sup:
        result = await sup.call(
            "t",
            "resources",
            {"size": 300 * KIB},
            result_sink=target,
            on_transfer_progress=lambda done, total: seen.append((done, total)),
        )
    assert target.read_bytes() == payload(300 * KIB, 4).encode() + payload(300 * KIB, 5).encode()
    assert [moved.size for moved in result.transfers] == [300 * KIB, 300 * KIB]
    assert [block.type for block in result.content] == ["resource_link", "resource_link"]
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)
    assert seen[-1] == (600 * KIB, 600 * KIB)


async def test_map_with_sinks_fails_the_item_whose_sink_fails_alone(tmp_path: Path) -> None:
    (tmp_path / "1.txt").mkdir()  # a directory where item 1's file should go: it cannot be opened
    items = [{"size": 200 * KIB, "seed": seed} for seed in range(4)]

    def sink(item: Any) -> Path:
        return tmp_path / f"{item['seed']}.txt"

    async with (
        supervisor("memory", transfer=PARALLEL) as sup,
        sup.map("t", "text", items, result_sink=sink) as results,
    ):
        outcomes = dict([pair async for pair in results])
    assert isinstance(outcomes[1], RMCPTransferError)
    for seed in (0, 2, 3):
        assert isinstance(outcomes[seed], rmcp_actors.CallResult)
        assert (tmp_path / f"{seed}.txt").read_text() == payload(200 * KIB, seed)


async def test_a_supervisor_closed_mid_read_ends_the_call_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    app = build_transfer_server()
    reached = trio.Event()
    stall(app, METHOD_READ, 6, reached)
    errors: list[BaseException] = []

    async def call(sup: RMCPSupervisor) -> None:
        try:
            await sup.call("t", "text", {"size": MIB}, timeout=100)
        except Exception as error:
            errors.append(error)

    async with trio.open_nursery() as nursery:
        async with supervisor("memory", app, transfer=PARALLEL) as sup:
            nursery.start_soon(call, sup)
            await reached.wait()
            closed = trio.current_time()
        with trio.fail_after(5):
            while not errors:
                await trio.sleep(0.01)
    assert trio.current_time() - closed < 5
    assert isinstance(errors[0], RMCPTransferError)


async def test_an_upload_cancelled_midway_frees_its_slot_and_a_retry_sends_only_the_rest(
    autojump_clock: trio.testing.MockClock,
) -> None:
    app = build_transfer_server()
    reached = trio.Event()
    stall(app, METHOD_WRITE, 9, reached)
    text = payload(MIB, 21)
    async with supervisor("memory", app, transfer=PARALLEL, max_concurrency=1) as sup:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: sup.call("t", "digest", {"text": text}, timeout=100))
            await reached.wait()
            nursery.cancel_scope.cancel()
        # The one slot is free: the retry gets it at once and finds the chunks written before.
        with trio.fail_after(1):
            result = await sup.call("t", "digest", {"text": text})
    assert result.structured_content is not None
    assert result.structured_content["sha256"] == sha(text)
    moved = result.transfers[0]
    assert moved.already_held >= 9
    assert moved.bytes_moved == (16 - moved.already_held) * 64 * KIB
    assert app.runs == {"digest": 1}  # type: ignore[attr-defined]


@pytest.mark.parametrize("transport", ["memory", "stdio"])
async def test_concurrent_calls_uploading_the_same_text_both_run_with_it_whole(transport: str) -> None:
    text = payload(2 * MIB, 22)
    async with supervisor(transport, transfer=PARALLEL) as sup:
        results: list[Any] = []

        async def call(label: str) -> None:
            results.append(await sup.call("t", "digest", {"text": text, "label": label}))

        async with trio.open_nursery() as nursery:
            for label in "abc":
                nursery.start_soon(call, label)
    assert sorted(result.structured_content["label"] for result in results) == ["a", "b", "c"]
    for result in results:
        assert result.structured_content["sha256"] == sha(text)
        assert result.structured_content["length"] == 2 * MIB


async def test_max_bytes_per_s_bounds_the_rate_of_parallel_reads_and_uploads(
    autojump_clock: trio.testing.MockClock,
) -> None:
    paced = TransferOverrides(threshold=64 * KIB, chunk_size=64 * KIB, parallel=4, max_bytes_per_s=256 * KIB)
    text = payload(MIB, 23)
    async with supervisor("memory", transfer=paced) as sup:
        started = trio.current_time()
        result = await sup.call("t", "text", {"size": MIB}, timeout=60)
        read_s = trio.current_time() - started
        started = trio.current_time()
        sent = await sup.call("t", "digest", {"text": text}, timeout=60)
        upload_s = trio.current_time() - started
    assert result.text == payload(MIB)
    assert sent.structured_content is not None
    assert sent.structured_content["sha256"] == sha(text)
    # 16 chunks of 64 KiB at 256 KiB/s, 4 at a time: still one every 0.25 s after the first.
    assert read_s == pytest.approx(15 * 0.25, abs=0.05)
    assert upload_s == pytest.approx(15 * 0.25, abs=0.05)


async def test_a_hedge_of_a_call_still_uploading_does_not_upload_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    paced = TransferOverrides(threshold=64 * KIB, chunk_size=64 * KIB, parallel=4, max_bytes_per_s=256 * KIB)
    text = payload(MIB, 24)
    app = build_transfer_server()
    async with supervisor("memory", app, transfer=paced, hedge=HedgeOverrides(delay_s=0.5)) as sup:
        result = await sup.call("t", "digest", {"text": text}, timeout=60)
    assert result.structured_content is not None
    assert result.structured_content["sha256"] == sha(text)
    (moved,) = result.transfers
    assert (moved.bytes_moved, moved.resent) == (MIB, 0)
    assert app.runs == {"digest": 1}  # type: ignore[attr-defined]


async def test_over_http_an_argument_uploads_in_default_size_chunks() -> None:
    # A 1 MiB chunk's write is 1.33 MiB of base64 in one POST body (only answers are SSE events).
    text = payload(3 * MIB, 25)
    async with supervisor("http", transfer=TransferOverrides(threshold=64 * KIB)) as sup:
        result = await sup.call("t", "digest", {"text": text})
    assert result.structured_content is not None
    assert result.structured_content["sha256"] == sha(text)
    assert result.transfers[0].chunks == 3


async def test_the_timeout_sent_with_an_uploaded_call_is_what_is_left_after_the_upload(
    autojump_clock: trio.testing.MockClock,
) -> None:
    paced = TransferOverrides(threshold=64 * KIB, chunk_size=64 * KIB, parallel=4, max_bytes_per_s=256 * KIB)
    app = build_transfer_server()
    lowlevel = app._lowlevel_server  # pyright: ignore[reportPrivateUsage]
    entry = lowlevel.get_request_handler("tools/call")
    assert entry is not None
    told: list[int] = []

    async def handler(ctx: Any, params: Any) -> Any:
        told.append(params.meta["rmcp"]["timeout_ms"])
        return await entry.handler(ctx, params)

    lowlevel.add_request_handler("tools/call", entry.params_type, handler)
    async with supervisor("memory", app, transfer=paced) as sup:
        result = await sup.call("t", "digest", {"text": payload(MIB, 26)}, timeout=10)
    assert result.structured_content is not None
    # The upload took 15 * 0.25 s of the 10 s ("how long the client will still wait").
    assert told == [pytest.approx(6250, abs=50)]


def unread_pipe() -> tuple[int, IO[bytes]]:
    """A pipe nobody reads: its read end, and its write end as a binary file object."""
    read_end, write_end = os.pipe()
    return read_end, open(write_end, "wb", buffering=0)


async def test_a_file_sink_that_blocks_forever_ends_at_the_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The first writes fill the pipe, the next blocks in its worker thread.
    read_end, sink = unread_pipe()
    try:
        async with supervisor("memory", transfer=PARALLEL) as sup:
            with trio.fail_after(30):
                with pytest.raises(RMCPTransferError) as raised:
                    await sup.call("t", "text", {"size": MIB}, result_sink=sink, timeout=5)
            assert "timeout passed" in raised.value.message
            # Others still call meanwhile.
            assert (await sup.call("t", "text", {"size": 100 * KIB})).text == payload(100 * KIB)
    finally:
        os.close(read_end)  # the blocked write fails now, and its thread ends
        sink.close()


async def test_a_supervisor_closed_mid_upload_ends_the_call_with_nothing_run(
    autojump_clock: trio.testing.MockClock,
) -> None:
    app = build_transfer_server()
    reached = trio.Event()
    stall(app, METHOD_WRITE, 6, reached)
    errors: list[Exception] = []

    async def call(sup: RMCPSupervisor) -> None:
        try:
            await sup.call("t", "digest", {"text": payload(MIB, 27)}, timeout=100)
        except Exception as error:
            errors.append(error)

    async with trio.open_nursery() as nursery, supervisor("memory", app, transfer=PARALLEL) as sup:
        nursery.start_soon(call, sup)
        await reached.wait()
        closed = trio.current_time()
    assert trio.current_time() - closed < 5
    (error,) = errors
    assert isinstance(error, rmcp_actors.RMCPError)
    assert not error.may_have_executed
    assert app.runs == {}  # type: ignore[attr-defined]


async def test_a_deadline_during_the_call_after_an_upload_is_a_timeout_after_send(
    autojump_clock: trio.testing.MockClock,
) -> None:
    app = build_transfer_server()

    @app.tool()
    async def hang(text: str) -> str:
        """Never answers."""
        await trio.sleep_forever()
        return text

    async with supervisor("memory", app, transfer=PARALLEL) as sup:
        started = trio.current_time()
        with pytest.raises(RMCPTimeoutAfterSendError) as raised:
            await sup.call("t", "hang", {"text": payload(MIB)}, timeout=10)
        assert trio.current_time() - started == pytest.approx(10, abs=0.05)
    assert raised.value.may_have_executed
    assert not isinstance(raised.value, RMCPTransferError)
