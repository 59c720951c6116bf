"""The client stdio transport (``rmcp_actors/client/_stdio.py``): linear framing, the SDK's process
handling. Real subprocesses and real time (a subprocess would see MockClock's jumps as nothing)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import anyio
import pytest
import trio
from conftest import PYTHON, process_gone, stdio_args
from mcp import Client, MCPError, StdioServerParameters
from mcp.shared.message import SessionMessage

from rmcp_actors import RMCPArgumentError, RMCPError, RMCPSupervisor, ServerSpec
from rmcp_actors._framing import LineSplitter
from rmcp_actors.client._stdio import stdio_client

MIB = 1 << 20
RAW_SERVER = Path(__file__).with_name("raw_stdio_server.py")


def script(source: str) -> StdioServerParameters:
    """A stand-in server: ``source`` run by this interpreter."""
    return StdioServerParameters(command=PYTHON, args=["-c", source])


def note(data: object) -> str:
    """A JSON-RPC notification line carrying ``data``."""
    message = {"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": data}}
    return json.dumps(message)


def note_data(item: SessionMessage | Exception) -> object:
    assert isinstance(item, SessionMessage), item
    params = item.message.model_dump()["params"]
    return params["data"]


def test_line_splitter_joins_pieces_and_cuts_chunks() -> None:
    splitter = LineSplitter()
    assert splitter.feed(b'{"a": ') == []
    assert splitter.feed(b"1") == []
    assert splitter.feed(b"}\n{") == [b'{"a": 1}']
    assert splitter.feed(b"}\n\n[]\r\n") == [b"{}", b"", b"[]\r"]
    assert splitter.feed(b"tail") == []
    assert splitter.feed(b"\n") == [b"tail"]


def test_a_20_mib_line_in_pipe_sized_chunks_is_framed_in_linear_time() -> None:
    """The SDK's ``(buffer + chunk).split()`` takes seconds of CPU here; linear framing, milliseconds."""
    chunk = b"x" * 65536
    splitter = LineSplitter()
    started = time.process_time()
    for _ in range(20 * MIB // len(chunk)):
        assert splitter.feed(chunk) == []
    [line] = splitter.feed(b"\n")
    assert time.process_time() - started < 0.5
    assert len(line) == 20 * MIB


@pytest.mark.parametrize("size", [5 * MIB, 20 * MIB])
async def test_large_result_through_sup_call(size: int) -> None:
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.stdio("test", PYTHON, stdio_args()))
        result = await sup.call("test", "blob", {"size": size}, timeout=60)
        # The connection is still good for the next call.
        after = await sup.call("test", "echo", {"text": "after"})
    assert result.text == "x" * size
    assert after.text == "after"


async def test_large_argument_through_sup_call() -> None:
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.stdio("test", PYTHON, stdio_args()))
        result = await sup.call("test", "length", {"text": "é" * (10 * MIB)}, timeout=60)
    assert result.structured_content == {"result": 10 * MIB}


async def test_garbage_lines_are_exception_items_between_messages() -> None:
    """UTF-8 that is not JSON-RPC (a stray print) is skipped, as the SDK does; a line that is not
    UTF-8 at all ends the stream (see the test below)."""
    source = f"""
import sys
sys.stdout.write("not JSON-RPC\\n" + {note("first")!r} + "\\n" + "\\xff\\xfe{{}}\\n")
sys.stdout.write({note("second")!r} + "\\n")
sys.stdout.flush()
sys.stdin.read()
"""
    async with stdio_client(script(source)) as (read_stream, _):
        with trio.fail_after(10):
            items = [await read_stream.receive() for _ in range(4)]
    assert [isinstance(item, Exception) for item in items] == [True, False, True, False]
    assert note_data(items[1]) == "first"
    assert note_data(items[3]) == "second"


async def test_a_server_killed_mid_line_ends_the_stream_and_is_reaped() -> None:
    source = f"""
import os, signal, sys
sys.stdout.write({note("PID")!r}.replace('"PID"', str(os.getpid())) + "\\n")
sys.stdout.write('{{"jsonrpc": "2.0", "method": "notif')
sys.stdout.flush()
os.kill(os.getpid(), signal.SIGKILL)
"""
    async with stdio_client(script(source)) as (read_stream, _):
        with trio.fail_after(10):
            first = await read_stream.receive()
            # The half-written line is dropped: the stream ends, with no item for it.
            with pytest.raises(anyio.EndOfStream):
                await read_stream.receive()
    pid = note_data(first)
    assert isinstance(pid, int)
    assert process_gone(pid)


async def test_env_is_merged_over_the_default_environment_cwd_and_stderr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RMCP_TEST_NOT_INHERITED", "parent only")
    source = f"""
import json, os, sys
sys.stderr.write("to the error log\\n")
sys.stderr.flush()
data = {{
    "cwd": os.getcwd(),
    "given": os.environ.get("RMCP_TEST_GIVEN"),
    "inherited": os.environ.get("RMCP_TEST_NOT_INHERITED"),
    "path": os.environ.get("PATH"),
}}
print({note("DATA")!r}.replace('"DATA"', json.dumps(data)), flush=True)
sys.stdin.read()
"""
    params = StdioServerParameters(
        command=PYTHON, args=["-c", source], env={"RMCP_TEST_GIVEN": "given"}, cwd=tmp_path
    )
    errlog_path = tmp_path / "stderr.log"
    with errlog_path.open("w") as errlog:
        async with stdio_client(params, errlog=errlog) as (read_stream, _):
            with trio.fail_after(10):
                item = await read_stream.receive()
    assert note_data(item) == {
        "cwd": str(tmp_path),
        "given": "given",
        "inherited": None,
        "path": os.environ["PATH"],
    }
    assert errlog_path.read_text() == "to the error log\n"


def _dead(pid: int) -> bool:
    """Gone, or a zombie whose reaping is its new parent's job (the server died first)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


async def test_a_server_ignoring_eof_and_sigterm_is_killed_with_its_group_on_the_sdk_schedule() -> None:
    """Close stdin, wait 2 s, SIGTERM the group, wait 2 s, SIGKILL: no process left behind."""
    source = f"""
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
line = {note("PIDS")!r}.replace('"PIDS"', "[%d, %d]" % (__import__("os").getpid(), child.pid))
print(line, flush=True)
while True:
    time.sleep(1)
"""
    async with stdio_client(script(source)) as (read_stream, _):
        with trio.fail_after(10):
            item = await read_stream.receive()
        started = trio.current_time()
    elapsed = trio.current_time() - started
    server_pid, child_pid = note_data(item)  # pyright: ignore[reportGeneralTypeIssues]
    assert 3.9 < elapsed < 6
    assert process_gone(server_pid)
    assert _dead(child_pid)


async def test_a_lone_surrogate_argument_is_refused_before_admission_over_stdio() -> None:
    # A str holding a lone surrogate cannot be encoded as UTF-8: once, it passed the argument
    # check and failed in the transport's writer task, killing the transport; the unrelated
    # non-idempotent call in flight became "outcome unknown" and the session reconnected.
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.stdio("s", PYTHON, stdio_args()))
        outcome: list[object] = []

        async def unrelated() -> None:
            try:
                outcome.append(
                    await sup.call("s", "block_unsafe", {"label": "a", "seconds": 1.0}, timeout=20)
                )
            except RMCPError as error:
                outcome.append(error)

        async with anyio.create_task_group() as tg:
            tg.start_soon(unrelated)
            await anyio.sleep(0.3)
            with pytest.raises(RMCPArgumentError) as caught:
                await sup.call("s", "echo", {"text": "\ud800"}, timeout=5)
            assert caught.value.may_have_executed is False
        connects = sup.statistics().connections[0].connects
    assert not isinstance(outcome[0], RMCPError), outcome[0]
    assert connects == 1


async def test_a_request_that_cannot_be_serialized_fails_alone_and_the_transport_goes_on() -> None:
    """Past check_arguments (here: the raw SDK client), a message the writer cannot serialize
    fails that request with an answer saying nothing was sent; the next request still works."""
    async with Client(stdio_client(StdioServerParameters(command=PYTHON, args=stdio_args()))) as client:
        with trio.fail_after(10), pytest.raises(MCPError) as caught:
            await client.call_tool("echo", {"text": "\ud800"})
        with trio.fail_after(10):
            after = await client.call_tool("echo", {"text": "after"})
    assert caught.value.code == -32602
    assert "nothing was sent" in caught.value.message
    assert after.content[0].model_dump()["text"] == "after"


async def test_a_line_that_is_not_utf8_ends_the_stream_at_once() -> None:
    """The corrupt line carried some answer nobody can name: the read side ends (and the session
    with it, so every call in flight learns its answer is lost) instead of one call waiting out
    its timeout. The server is still alive and ignoring stdin; the transport still stops it."""
    source = f"""
import sys, time
sys.stdout.write({note("first")!r} + "\\n")
sys.stdout.flush()
sys.stdout.buffer.write(b'{{"jsonrpc": "2.0", "id": 1, "result": {{"text": "\\xff"}}}}\\n')
sys.stdout.buffer.write({note("after")!r}.encode() + b"\\n")
sys.stdout.buffer.flush()
time.sleep(60)
"""
    started = time.monotonic()
    async with stdio_client(script(source)) as (read_stream, _):
        with trio.fail_after(10):
            first = await read_stream.receive()
            with pytest.raises(anyio.EndOfStream):
                await read_stream.receive()
    assert note_data(first) == "first"
    assert time.monotonic() - started < 10


async def test_an_unreadable_answer_over_stdio_is_a_lost_answer_not_a_wait_for_the_timeout() -> None:
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(
            ServerSpec.stdio("s", PYTHON, [str(RAW_SERVER), "--non-utf8-echo"], protocol="legacy")
        )
        started = time.monotonic()
        with pytest.raises(RMCPError) as caught:
            await sup.call("s", "echo", {"text": "x"}, timeout=30)
        elapsed = time.monotonic() - started
    # echo is not declared safe to repeat: its lost answer is not retried, and may have run.
    assert caught.value.may_have_executed is True, caught.value
    assert elapsed < 10, elapsed
