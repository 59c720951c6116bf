"""The fault-injecting stdio relay, between the SDK client (or a raw pipe) and a stdio server."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import PYTHON, process_gone, stdio_args
from mcp import Client, MCPError, StdioServerParameters

from rmcp_actors.testing import relay_command
from rmcp_actors.testing.stdio_relay import _LineSplitter, main

# The relay and the test server each take most of a second to import: the exits the tests
# wait for come after that.
EXIT_TIMEOUT_S = 5


def relayed_server(state_dir: Path, **relay: Any) -> StdioServerParameters:
    argv = relay_command([PYTHON, *stdio_args("--state-dir", str(state_dir))], **relay)
    return StdioServerParameters(command=argv[0], args=argv[1:])


def test_line_splitter_joins_and_cuts_reads() -> None:
    splitter = _LineSplitter()
    assert splitter.feed(b'{"a": ') == []
    assert splitter.feed(b"1}\n{") == [b'{"a": 1}']
    assert splitter.feed(b"}\n\n[]\r\ntail") == [b"{}", b"", b"[]\r"]
    assert splitter.rest() == b"tail"


async def test_probability_zero_is_transparent(tmp_path: Path) -> None:
    log = tmp_path / "faults"
    big = "x" * 300_000  # many pipe reads long, both ways
    async with Client(relayed_server(tmp_path, swallow_probability=0, log=log)) as client:
        tools = await client.list_tools()
        echoes = [await client.call_tool("echo", {"text": text}) for text in ("a", "b", big)]
        await client.call_tool("record", {"label": "kept"})
        with pytest.raises(MCPError) as refused:
            await client.call_tool("rpc_error", {})
    assert {"echo", "record", "pid"} <= {tool.name for tool in tools.tools}
    assert [echo.structured_content for echo in echoes] == [{"result": text} for text in ("a", "b", big)]
    assert (tmp_path / "ledger").read_text() == "kept\n"
    assert refused.value.error.code == -32050
    assert not log.exists()


async def test_swallowed_answer_kills_the_server_after_the_tool_ran(tmp_path: Path) -> None:
    log = tmp_path / "faults"
    params = relayed_server(tmp_path, swallow_probability=1, skip_first=1, seed=7, log=log)
    async with Client(params) as client:
        server_pid = (await client.call_tool("pid", {})).structured_content["result"]
        with pytest.raises(MCPError) as lost:
            await client.call_tool("record", {"label": "ran"})
    assert (lost.value.error.code, lost.value.error.message) == (-32000, "Connection closed")
    assert (tmp_path / "ledger").read_text() == "ran\n"
    # The relay reaps the server before it exits, and the client hears nothing until it exits.
    assert process_gone(server_pid)
    [fault] = [json.loads(line) for line in log.read_text().splitlines()]
    assert fault["event"] == "swallowed"
    assert fault["pid"] == server_pid


async def test_client_closing_stdin_stops_relay_and_server() -> None:
    # A stand-in server that says its pid, then serves until its stdin ends, like a stdio MCP server.
    server = "import os, sys; print(os.getpid(), flush=True); sys.stdin.read()"
    relay = await trio.lowlevel.open_process(
        relay_command([PYTHON, "-c", server], swallow_probability=1),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert relay.stdin is not None
    assert relay.stdout is not None
    try:
        splitter = _LineSplitter()
        said: list[bytes] = []
        with trio.fail_after(EXIT_TIMEOUT_S):
            while not said:
                said = splitter.feed(await relay.stdout.receive_some())
            await relay.stdin.aclose()
            assert await relay.wait() == 0
    finally:
        if relay.returncode is None:
            relay.kill()
            await relay.wait()
    # The relay reaped its server before exiting.
    assert process_gone(int(said[0]))


async def test_relay_exits_with_the_server(tmp_path: Path) -> None:
    argv = relay_command([PYTHON, "-c", "raise SystemExit(3)"], swallow_probability=0.5)
    # The client keeps the relay's stdin open: only the server's exit can end the relay.
    relay = await trio.lowlevel.open_process(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        with trio.fail_after(EXIT_TIMEOUT_S):
            assert await relay.wait() == 3
    finally:
        if relay.returncode is None:
            relay.kill()
            await relay.wait()


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        (["--swallow-probability", "1.5", "--", "server"], "must be between 0 and 1"),
        (["--skip-first", "-1", "--", "server"], "must be 0 or more"),
        (["--seed", "7", "server"], "the server command goes after --"),
        (["--seed", "7"], "the server command is missing"),
        (["--"], "the server command is missing"),
    ],
)
def test_bad_arguments_are_refused(
    argv: list[str], complaint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as refused:
        main(argv)
    assert refused.value.code == 2
    assert complaint in capsys.readouterr().err


def test_relay_command_puts_the_server_after_the_options(tmp_path: Path) -> None:
    argv = relay_command(
        ["server", "--seed", "1"], swallow_probability=0.25, seed=3, skip_first=2, log=tmp_path / "faults"
    )
    assert Path(argv[1]).name == "stdio_relay.py"
    assert Path(argv[1]).is_file()
    assert argv[-4:] == ["--", "server", "--seed", "1"]
    options = argv[2:-4]
    assert dict(zip(options[::2], options[1::2], strict=True)) == {
        "--swallow-probability": "0.25",
        "--seed": "3",
        "--skip-first": "2",
        "--log": str(tmp_path / "faults"),
    }
    with pytest.raises(ValueError, match="swallow_probability"):
        relay_command(["server"], swallow_probability=2)


def test_each_server_life_draws_afresh_but_reproducibly(tmp_path: Path) -> None:
    from rmcp_actors.testing.stdio_relay import _life_seed  # pyright: ignore[reportPrivateUsage]

    log = tmp_path / "faults"
    first_life = _life_seed(7, str(log))
    log.write_text('{"event": "swallowed"}\n')
    second_life = _life_seed(7, str(log))
    assert first_life != second_life
    assert second_life == _life_seed(7, str(log))
    assert _life_seed(7, None) == first_life
    assert _life_seed(None, str(log)) is None
