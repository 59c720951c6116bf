"""The connection actor's control plane against real servers."""

from __future__ import annotations

import sys
from pathlib import Path

import anyio
import pytest
from conftest import process_gone

from rmcp_actors import Outcome, RMCPNetworkError, RMCPSupervisor, ServerSpec

RAW_SERVER = str(Path(__file__).with_name("raw_stdio_server.py"))


async def test_an_invalid_tools_refresh_fails_the_request_not_the_actor() -> None:
    spec = ServerSpec.stdio(
        "raw", sys.executable, [RAW_SERVER, "--invalid-refresh", "--wait-s", "0.5"], protocol="legacy"
    )
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(spec)
        generation = sup.statistics().connections[0].generation
        results: list[Outcome] = []
        async with anyio.create_task_group() as tg:

            async def in_flight() -> None:
                results.append((await sup.call("raw", "wait", timeout=10)).outcome)

            tg.start_soon(in_flight)
            await anyio.sleep(0.05)  # the call is sent and waits for its answer
            started = anyio.current_time()
            with pytest.raises(RMCPNetworkError, match="could not list the tools") as caught:
                await sup.list_tools("raw", refresh=True)
            assert "ValidationError" in caught.value.message
            assert anyio.current_time() - started < 0.4, "the refresh must fail at once, not time out"
        # The call in flight on the same session was untouched and completed.
        assert results == [Outcome.SUCCEEDED]
        assert (await sup.call("raw", "echo")).outcome is Outcome.SUCCEEDED
        stats = sup.statistics()
        assert stats.connections[0].generation == generation
        assert stats.supervisors[2].children[0].restarts == 0  # server:raw -> connection:raw
        assert {tool.name for tool in await sup.list_tools("raw")} == {"wait", "echo"}


async def test_stubborn_servers_stop_concurrently_within_one_kill_sequence(tmp_path: Path) -> None:
    """Four servers that ignore SIGTERM and stdin EOF: each costs the SDK's whole kill
    sequence (close stdin, wait 2 s, SIGTERM, wait 2 s, SIGKILL). One after the other that
    is 16 s; the connections supervisor (one_for_one) stops them side by side."""
    pid_files = [tmp_path / f"server{index}.pid" for index in range(4)]
    async with RMCPSupervisor.open() as sup:
        for index, pid_file in enumerate(pid_files):
            args = [RAW_SERVER, "--stubborn", "--pid-file", str(pid_file)]
            await sup.add_server(
                ServerSpec.stdio(f"stubborn{index}", sys.executable, args, protocol="legacy")
            )
        stopping = anyio.current_time()
    elapsed = anyio.current_time() - stopping
    assert elapsed < 9, f"stopping took {elapsed:.1f} s: the servers were stopped one after the other"
    for pid_file in pid_files:
        assert process_gone(int(pid_file.read_text()))
