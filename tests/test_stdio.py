"""Real subprocess servers over stdio: the test server and mcp-server-time. Real time (no MockClock:
a subprocess would see its deadlines fire at once)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from conftest import FAST_RECOVERY, PYTHON, process_gone, stdio_args

from rmcp_actors import (
    CallResult,
    ConnectionState,
    Outcome,
    PolicyOverrides,
    ReconnectOverrides,
    RequestState,
    RMCPArgumentError,
    RMCPConfig,
    RMCPNetworkError,
    RMCPOutcomeUnknownError,
    RMCPSupervisor,
    RMCPSupervisorError,
    RMCPTimeoutAfterSendError,
    ServerSpec,
    ToolOverrides,
)
from rmcp_actors.client.connection import Connection


def stdio_test_server(state_dir: Path, *extra: str, overrides: PolicyOverrides = FAST_RECOVERY) -> ServerSpec:
    return ServerSpec.stdio(
        "test", PYTHON, stdio_args("--state-dir", str(state_dir), *extra), overrides=overrides
    )


async def wait_for_file(path: Path, timeout: float = 10) -> str:
    with trio.fail_after(timeout):
        while not path.exists() or not path.read_text():
            await trio.sleep(0.01)
    return path.read_text()


async def killed_mid_run(sup: RMCPSupervisor, tmp_path: Path) -> RMCPOutcomeUnknownError:
    """Call ``block_unsafe`` and SIGKILL the server once the run started; return the error."""
    async with trio.open_nursery() as nursery:

        async def kill_when_started() -> None:
            pid = int(await wait_for_file(tmp_path / "order.started"))
            os.kill(pid, signal.SIGKILL)

        nursery.start_soon(kill_when_started)
        with pytest.raises(RMCPOutcomeUnknownError) as caught:
            await sup.call("test", "block_unsafe", {"label": "order", "seconds": 30}, timeout=20)
    return caught.value


@pytest.mark.parametrize("protocol", ["auto", "legacy"])
async def test_call_over_stdio(tmp_path: Path, protocol: str) -> None:
    spec = ServerSpec.stdio("test", PYTHON, stdio_args("--state-dir", str(tmp_path)), protocol=protocol)
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(spec)
        result = await sup.call("test", "add", {"a": 20, "b": 22})
        expected_version = "2026-07-28" if protocol == "auto" else "2025-11-25"
        assert sup.statistics().connections[0].protocol_version == expected_version
    assert result.structured_content == {"result": 42}


async def test_mcp_server_time() -> None:
    spec = ServerSpec.stdio("time", PYTHON, ["-m", "mcp_server_time", "--local-timezone", "UTC"])
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(spec)
        now = await sup.call("time", "get_current_time", {"timezone": "UTC"})
        bad = await sup.call("time", "get_current_time", {"timezone": "Not/AZone"})
    assert now.outcome is Outcome.SUCCEEDED
    assert "UTC" in now.text
    assert bad.outcome is Outcome.FAILED
    assert bad.is_error


async def test_kill_9_mid_call_idempotent_tool_is_retried_on_the_restarted_server(tmp_path: Path) -> None:
    async with RMCPSupervisor.open() as sup, trio.open_nursery() as nursery:
        # RMCP on a memory store: the retry relies on the tool's annotation, not on dedup
        # (a new process forgets the keys), and the runs show the meta they carried.
        await sup.add_server(stdio_test_server(tmp_path, "--rmcp-store", "memory"))
        first_pid = (await sup.call("test", "pid")).structured_content
        results = []

        async def call() -> None:
            results.append(
                await sup.call("test", "block_idempotent", {"label": "job", "seconds": 30}, timeout=20)
            )

        nursery.start_soon(call)
        pid = int(await wait_for_file(tmp_path / "job.started"))
        os.kill(pid, signal.SIGKILL)
    [result] = results
    assert result.text == "done job"
    assert result.attempts == 2
    assert first_pid == {"result": pid}
    assert process_gone(pid)
    # Both runs (killed, then retried on the new server) carried the same logical call's identity.
    runs = [json.loads(line) for line in (tmp_path / "job.meta").read_text().splitlines()]
    assert [run["attempt"] for run in runs] == [1, 2]
    assert {run["idempotency_key"] for run in runs} == {result.idempotency_key}
    assert {run["request_id"] for run in runs} == {result.request_id}


async def test_kill_9_mid_call_non_idempotent_tool_is_unknown_and_next_call_works(tmp_path: Path) -> None:
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(stdio_test_server(tmp_path))
        error = await killed_mid_run(sup, tmp_path)
        after = await sup.call("test", "echo", {"text": "next"})
        stats = sup.statistics().connections[0]
    assert error.may_have_executed is True
    assert error.outcome is Outcome.UNKNOWN
    assert "not known to be idempotent" in str(error)
    assert after.text == "next"
    assert stats.connects == 2
    # Not retried: the side effect's ledger has no entry from a second run.
    assert not (tmp_path / "ledger").exists()


@pytest.mark.parametrize("store", ["memory", "sqlite"])
async def test_kill_9_mid_run_against_rmcp_is_unknown_never_run_twice(tmp_path: Path, store: str) -> None:
    """The server dies between starting the tool and storing its result.

    With a memory store the restarted server forgot the key, so the client must not retry.
    With SQLite the client retries with the same key and the new server finds the run started
    by an owner that is gone: it answers ``in_doubt`` instead of running the tool again.
    """
    store_arg = "memory" if store == "memory" else str(tmp_path / "rmcp.sqlite")
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(stdio_test_server(tmp_path, "--rmcp-store", store_arg))
        error = await killed_mid_run(sup, tmp_path)
        after = await sup.call("test", "echo", {"text": "next"})
    assert error.may_have_executed is True
    if store == "memory":
        assert "not durable" in str(error)
        assert error.lifecycle[-1].state is RequestState.UNKNOWN
    else:
        assert "in_doubt" in str(error)
        states = [event.state for event in error.lifecycle]
        assert states[-2:] == [RequestState.NACKED, RequestState.UNKNOWN]
        assert states.count(RequestState.SENT) == 2
    assert after.text == "next"
    assert not (tmp_path / "ledger").exists()


async def test_two_server_processes_on_one_sqlite_file_share_dedup(tmp_path: Path) -> None:
    """A key in flight in another live process is waited for, not reported in doubt."""
    store = str(tmp_path / "rmcp.sqlite")
    results: dict[str, CallResult] = {}
    async with RMCPSupervisor.open() as sup:
        for name in ("a", "b"):
            spec = stdio_test_server(tmp_path, "--rmcp-store", store)
            await sup.add_server(attrs.evolve(spec, name=name))
        arguments = {"label": "shared", "seconds": 1.5}

        async def call(name: str) -> None:
            results[name] = await sup.call(name, "block_unsafe", arguments, idempotency_key="K", timeout=30)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(call, "a")
            await wait_for_file(tmp_path / "shared.started")
            nursery.start_soon(call, "b")
    assert (results["a"].duplicate, results["b"].duplicate) == (False, True)
    assert results["a"].text == results["b"].text == "done shared"
    assert (tmp_path / "ledger").read_text().splitlines() == ["shared"]


async def test_when_disconnected_fail_raises_network_error_at_once(tmp_path: Path) -> None:
    overrides = PolicyOverrides(
        when_disconnected="fail", reconnect=ReconnectOverrides(base_delay_s=5, max_delay_s=5)
    )
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(stdio_test_server(tmp_path, overrides=overrides))
        pid = (await sup.call("test", "pid")).structured_content
        assert pid is not None
        os.kill(pid["result"], signal.SIGKILL)
        with trio.fail_after(5):
            while sup.servers()["test"] is ConnectionState.READY:
                await trio.sleep(0.01)
        with trio.fail_after(1), pytest.raises(RMCPNetworkError, match="not connected") as caught:
            await sup.call("test", "record", {"label": "x"})
    assert caught.value.may_have_executed is False


async def test_server_printing_garbage_fails_connect_within_timeout(tmp_path: Path) -> None:
    overrides = PolicyOverrides(connect_timeout_s=1)
    async with RMCPSupervisor.open() as sup:
        with trio.fail_after(15), pytest.raises(RMCPNetworkError, match="connect_timeout_s=1") as caught:
            await sup.add_server(stdio_test_server(tmp_path, "--garbage", overrides=overrides))
        assert sup.servers() == {}
    assert "mcp_test_server.py" in str(caught.value)


async def test_missing_command_is_a_network_error_naming_it() -> None:
    async with RMCPSupervisor.open() as sup:
        with pytest.raises(RMCPNetworkError, match="command not found") as caught:
            await sup.add_server(ServerSpec.stdio("ghost", "/nonexistent/mcp-server-ghost"))
    assert "/nonexistent/mcp-server-ghost" in str(caught.value)
    assert isinstance(caught.value.__cause__, FileNotFoundError)


async def test_server_exiting_at_once_is_a_network_error(tmp_path: Path) -> None:
    async with RMCPSupervisor.open() as sup:
        with trio.fail_after(15), pytest.raises(RMCPNetworkError, match="could not connect"):
            await sup.add_server(stdio_test_server(tmp_path, "--exit-at-once"))


async def test_server_that_keeps_dying_does_not_take_the_runtime_down(tmp_path: Path) -> None:
    stable = ServerSpec.stdio("stable", PYTHON, stdio_args())
    flaky = ServerSpec.stdio("flaky", PYTHON, stdio_args("--lifetime", "1.5"), overrides=FAST_RECOVERY)
    config = RMCPConfig.from_dict({"runtime": {"max_restarts": 1, "restart_period_s": 60}})
    async with RMCPSupervisor.open(config) as sup:
        await sup.add_server(stable)
        await sup.add_server(flaky)
        with trio.fail_after(30):
            while sup.statistics().connections[1].connects < 4:
                await trio.sleep(0.05)
        assert (await sup.call("stable", "echo", {"text": "alive"})).text == "alive"
        assert (
            await sup.call("flaky", "echo", {"text": "between deaths"}, timeout=10)
        ).text == "between deaths"
        supervisors = sup.statistics().supervisors
    assert all(child.restarts == 0 for stats in supervisors for child in stats.children)


async def test_shutdown_reaps_every_stdio_server(tmp_path: Path) -> None:
    pids: list[int] = []
    async with RMCPSupervisor.open() as sup:
        for index in range(3):
            await sup.add_server(ServerSpec.stdio(f"s{index}", PYTHON, stdio_args()))
            pid = (await sup.call(f"s{index}", "pid")).structured_content
            assert pid is not None
            pids.append(pid["result"])
    assert all(process_gone(pid) for pid in pids)


async def test_config_servers_start_with_the_supervisor(tmp_path: Path) -> None:
    config_file = tmp_path / "rmcp.toml"
    config_file.write_text(
        f"""
[servers.time]
transport = "stdio"
command = "{PYTHON}"
args = ["-m", "mcp_server_time", "--local-timezone", "UTC"]

[servers.time.tools.get_current_time]
timeout_s = 5
idempotent = true
"""
    )
    async with RMCPSupervisor.open(RMCPConfig.from_toml(config_file)) as sup:
        assert sup.servers() == {"time": ConnectionState.READY}
        result = await sup.call("time", "get_current_time", {"timezone": "UTC"})
    assert result.outcome is Outcome.SUCCEEDED


async def test_actor_failing_beyond_intensity_escalates_out_of_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in a runtime actor (not a flaky server) is restarted, then escalated to open()."""
    original = Connection._set_state  # pyright: ignore[reportPrivateUsage]

    def buggy_set_state(self: Connection, state: ConnectionState) -> None:
        if state is ConnectionState.CONNECTING:
            raise ZeroDivisionError("simulated bug in the connection actor")
        original(self, state)

    config = RMCPConfig.from_dict({"runtime": {"max_restarts": 2, "restart_period_s": 60}})

    async def run_until_escalation() -> None:
        async with RMCPSupervisor.open(config) as sup:
            await sup.add_server(stdio_test_server(tmp_path))
            pid = (await sup.call("test", "pid")).structured_content
            assert pid is not None
            monkeypatch.setattr(Connection, "_set_state", buggy_set_state)
            os.kill(pid["result"], signal.SIGKILL)
            await trio.sleep_forever()

    with pytest.raises(RMCPSupervisorError) as caught:
        await run_until_escalation()
    error = caught.value
    assert error.actor == "connection:test"
    assert isinstance(error.__cause__, ZeroDivisionError)
    assert "failed 3 times" in str(error)


async def kill_mid_call(
    tmp_path: Path, tool: str, *, overrides: PolicyOverrides, tools: dict[str, ToolOverrides] | None = None
) -> int:
    """Call ``tool`` on a stdio server, SIGKILL the server once the tool started; return attempts."""
    spec = ServerSpec.stdio(
        "test", PYTHON, stdio_args("--state-dir", str(tmp_path)), overrides=overrides, tools=tools or {}
    )
    async with RMCPSupervisor.open() as sup, trio.open_nursery() as nursery:
        await sup.add_server(spec)

        async def kill_when_started() -> None:
            os.kill(int(await wait_for_file(tmp_path / "job.started")), signal.SIGKILL)

        nursery.start_soon(kill_when_started)
        outcome: CallResult | RMCPOutcomeUnknownError
        try:
            outcome = await sup.call("test", tool, {"label": "job", "seconds": 30}, timeout=20)
        except RMCPOutcomeUnknownError as error:
            outcome = error
    # Raised out here, not inside the nursery, so that it is not wrapped in an exception group.
    if isinstance(outcome, RMCPOutcomeUnknownError):
        raise outcome
    return outcome.attempts


async def test_untrusted_annotations_do_not_make_a_tool_retryable(tmp_path: Path) -> None:
    untrusted = attrs.evolve(FAST_RECOVERY, trust_annotations=False)
    with pytest.raises(RMCPOutcomeUnknownError):
        await kill_mid_call(tmp_path, "block_idempotent", overrides=untrusted)


async def test_idempotent_in_config_makes_an_unannotated_tool_retryable(tmp_path: Path) -> None:
    attempts = await kill_mid_call(
        tmp_path,
        "block_unsafe",
        overrides=FAST_RECOVERY,
        tools={"block_unsafe": ToolOverrides(idempotent=True)},
    )
    assert attempts == 2
    # It ran to completion once, on the restarted server (the killed run never got that far).
    assert (tmp_path / "ledger").read_text().split() == ["job"]


async def test_a_hanging_stdio_server_meets_the_deadline(tmp_path: Path) -> None:
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(stdio_test_server(tmp_path))
        started = trio.current_time()
        with pytest.raises(RMCPTimeoutAfterSendError):
            await sup.call("test", "sleep", {"seconds": 60}, timeout=0.5)
        assert trio.current_time() - started < 2
        assert (await sup.call("test", "echo", {"text": "still here"})).text == "still here"


async def test_a_restarted_connection_actor_leaves_its_siblings_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = Connection._set_state  # pyright: ignore[reportPrivateUsage]
    crashes: list[str] = []

    def crash_once(self: Connection, state: ConnectionState) -> None:
        if self.name == "a" and state is ConnectionState.CONNECTING and not crashes:
            crashes.append(self.name)
            raise ZeroDivisionError("simulated bug in connection a")
        original(self, state)

    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.stdio("a", PYTHON, stdio_args(), overrides=FAST_RECOVERY))
        await sup.add_server(ServerSpec.stdio("b", PYTHON, stdio_args(), overrides=FAST_RECOVERY))
        pid_a = (await sup.call("a", "pid")).structured_content
        pid_b = (await sup.call("b", "pid")).structured_content
        assert pid_a is not None
        monkeypatch.setattr(Connection, "_set_state", crash_once)
        os.kill(pid_a["result"], signal.SIGKILL)
        # A call made meanwhile waits through the crash and the restart (it is not told "closed").
        result = await sup.call("a", "echo", {"text": "after restart"}, timeout=20)
        assert (await sup.call("b", "pid")).structured_content == pid_b
        stats = {connection.name: connection for connection in sup.statistics().connections}
        subtrees = [s for s in sup.statistics().supervisors if s.name.startswith("server:")]
    assert crashes == ["a"]
    assert result.text == "after restart"
    assert stats["b"].connects == 1
    restarts = {child.name: child.restarts for s in subtrees for child in s.children}
    assert restarts == {"connection:a": 1, "connection:b": 0}


async def test_tools_are_listed_again_on_reconnect(tmp_path: Path) -> None:
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(stdio_test_server(tmp_path))
        assert "extra" not in {tool.name for tool in await sup.list_tools("test")}
        pid = (await sup.call("test", "pid")).structured_content
        assert pid is not None
        (tmp_path / "extra_tool").write_text("")
        os.kill(pid["result"], signal.SIGKILL)
        with trio.fail_after(15):
            while "extra" not in {tool.name for tool in await sup.list_tools("test")}:
                await trio.sleep(0.02)
        assert (await sup.call("test", "extra")).text == "extra"


async def test_arguments_the_wire_cannot_carry_never_reach_the_server_process(tmp_path: Path) -> None:
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(stdio_test_server(tmp_path))
        bad_arguments: list[Any] = [{"label": b"\xff"}, {1: "x"}, {"label": float("nan")}]
        for bad in bad_arguments:
            with pytest.raises(RMCPArgumentError) as caught:
                await sup.call("test", "record", bad)
            assert caught.value.may_have_executed is False
        assert (await sup.call("test", "record", {"label": "fine"})).text == "recorded fine"
        connects = sup.statistics().connections[0].connects
    assert connects == 1
    assert (tmp_path / "ledger").read_text() == "fine\n"


async def test_a_request_the_transport_never_took_is_not_sent_and_runs_once(tmp_path: Path) -> None:
    # The server stops reading (SIGSTOP): a large request fills the pipe and holds the transport's
    # writer, and a non-idempotent call waits behind it, not yet taken. SIGKILL breaks the pipe:
    # the writer ends without ever taking the waiting request, so nothing of it left. It must be
    # sent again on the restarted server and run once, not be reported "may have run".
    async with RMCPSupervisor.open() as sup, trio.open_nursery() as nursery:
        await sup.add_server(stdio_test_server(tmp_path))
        pid = (await sup.call("test", "pid")).structured_content
        assert pid is not None
        os.kill(pid["result"], signal.SIGSTOP)
        outcomes: dict[str, object] = {}

        async def call(name: str, tool: str, arguments: dict[str, Any]) -> None:
            try:
                outcomes[name] = await sup.call("test", tool, arguments, timeout=20)
            except RMCPOutcomeUnknownError as error:
                outcomes[name] = error

        nursery.start_soon(call, "large", "length", {"text": "x" * 4_000_000})
        await trio.testing.wait_all_tasks_blocked(0.05)
        nursery.start_soon(call, "record", "record", {"label": "once"})
        await trio.testing.wait_all_tasks_blocked(0.05)
        os.kill(pid["result"], signal.SIGKILL)
    record = outcomes["record"]
    assert isinstance(record, CallResult), record
    assert record.text == "recorded once"
    # The first attempt reached the dead transport (and nothing of it left); the second ran it.
    assert record.attempts == 2
    assert [event.attempt for event in record.lifecycle if event.state is RequestState.SENT] == [2]
    assert (tmp_path / "ledger").read_text().split() == ["once"]
