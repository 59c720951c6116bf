"""The watchdog and health against real servers: stall reports name the stuck call, a hung
stdio server is restarted (and a slow one is not), ``sup.health()`` follows the components.

In-memory servers run under MockClock; the stdio ones are real subprocesses, so real time with
a short ``stall_s``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from conftest import FAST_RECOVERY
from mcp.server.mcpserver import MCPServer

from rmcp_actors import (
    CallResult,
    CircuitBreakerOverrides,
    ConnectionState,
    HealthStatus,
    PolicyOverrides,
    RMCPConfig,
    RMCPOutcomeUnknownError,
    RMCPServerError,
    RMCPSupervisor,
    RMCPTimeoutError,
    RuntimeSettings,
    ServerSpec,
    StallReport,
    UnknownToolError,
)

RAW_SERVER = str(Path(__file__).with_name("raw_stdio_server.py"))
STALL_S = 10.0


def config(stall_s: float = STALL_S, *, restart_hung: bool = True) -> RMCPConfig:
    return RMCPConfig(runtime=RuntimeSettings(stall_s=stall_s, restart_hung=restart_hung))


async def test_a_stall_names_the_stuck_call_and_a_slow_server_is_not_restarted(
    server: MCPServer, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="rmcp_actors.watchdog")
    reports: list[StallReport] = []
    async with RMCPSupervisor.open(config(), on_stall=reports.append) as sup:
        await sup.add_server(ServerSpec.in_memory("test", server, wire="jsonrpc"))
        started = trio.current_time()
        # Slow, not hung: the server answers the watchdog's ping while the tool sleeps.
        result = await sup.call("test", "sleep", {"seconds": STALL_S * 5}, timeout=STALL_S * 10)
        assert result.content[0].text == "slept"  # type: ignore[union-attr]
        assert result.attempts == 1
        stats = sup.statistics().connections[0]
        assert stats.generation == 1, "a server that answers pings is never reconnected"
        assert stats.hung_restarts == 0
    assert 3 <= len(reports) <= 5
    first = reports[0]
    assert STALL_S <= first.at - started <= STALL_S * 1.25 + 0.01
    (stuck,) = first.oldest
    assert (stuck.key, stuck.owner, stuck.what, stuck.state) == (result.request_id, "test", "sleep", "sent")
    assert stuck.age_s == pytest.approx(first.at - started)
    kinds = {(c.kind, c.name) for c in first.components}
    assert {("connection", "test"), ("lane", "test"), ("scheduler", "scheduler")} <= kinds
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"test/sleep request {result.request_id}: sent, age" in text for text in warnings)
    # The silent server was checked (pinged), answered, and left alone.
    assert any("checking whether it hung" in text for text in warnings)
    assert not any("reconnecting" in text for text in warnings)


async def test_no_stall_while_calls_complete(
    server: MCPServer, autojump_clock: trio.testing.MockClock
) -> None:
    reports: list[StallReport] = []
    async with RMCPSupervisor.open(config(), on_stall=reports.append) as sup:
        await sup.add_server(ServerSpec.in_memory("test", server, wire="jsonrpc"))
        async with trio.open_nursery() as nursery:
            # A slow call runs for 5 x stall_s while short ones keep completing beside it.
            nursery.start_soon(sup.call, "test", "sleep", {"seconds": STALL_S * 5})
            for _ in range(int(STALL_S * 5)):
                await sup.call("test", "sleep", {"seconds": 1.0})
    assert reports == []
    assert sup.health().component("watchdog", "watchdog").status is HealthStatus.OK


async def test_health_snapshot_and_status_transitions(
    server: MCPServer, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with RMCPSupervisor.open(config()) as sup:
        await sup.add_server(ServerSpec.in_memory("a", server, overrides=PolicyOverrides(max_concurrency=1)))
        trips_at_two = PolicyOverrides(circuit_breaker=CircuitBreakerOverrides(failure_threshold=2))
        await sup.add_server(ServerSpec.in_memory("b", server, overrides=trips_at_two))
        health = sup.health()
        assert health.status is HealthStatus.OK
        assert {(c.kind, c.name) for c in health.components} == {
            ("scheduler", "scheduler"),
            ("watchdog", "watchdog"),
            ("locks", "locks"),
            ("connection", "a"),
            ("lane", "a"),
            ("breaker", "a"),
            ("budget", "a"),
            ("limiter", "a"),
            ("connection", "b"),
            ("lane", "b"),
            ("breaker", "b"),
            ("budget", "b"),
            ("limiter", "b"),
        }
        assert health.component("connection", "a").statistics.state is ConnectionState.READY  # type: ignore[attr-defined]

        results: list[CallResult] = []

        async def sleep_on_a() -> None:
            results.append(await sup.call("a", "sleep", {"seconds": STALL_S * 2}, timeout=STALL_S * 5))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sleep_on_a)
            nursery.start_soon(sleep_on_a)
            await trio.testing.wait_all_tasks_blocked()
            # One call runs, one queues: server a runs at its limit.
            health = sup.health()
            lane = health.component("lane", "a")
            assert lane.status is HealthStatus.DEGRADED
            assert lane.reason == "saturated: a 1/1 running, 1 queued"
            assert health.status is HealthStatus.DEGRADED
            assert health.servers() == {"a": HealthStatus.DEGRADED, "b": HealthStatus.OK}
            await trio.sleep(STALL_S * 1.25 + 0.01)
            # Nothing completed for stall_s: the watchdog reports it, health shows it.
            watchdog = sup.health().component("watchdog", "watchdog")
            assert watchdog.status is HealthStatus.DEGRADED
            assert watchdog.reason is not None
            assert watchdog.reason.startswith("stalled: no call completed for")
        assert len(results) == 2
        await trio.sleep(STALL_S / 4 + 0.01)
        assert sup.health().status is HealthStatus.OK

        # A tool of b fails twice: its breaker opens; b's other tools still pass.
        for _ in range(2):
            with pytest.raises(RMCPServerError):
                await sup.call("b", "rpc_error")
        breaker = sup.health().component("breaker", "b")
        assert breaker.status is HealthStatus.DEGRADED
        assert breaker.reason is not None
        assert breaker.reason.startswith("tool 'rpc_error' breaker open, half-opens in 30.0 s")
        await trio.sleep(31.0)
        assert "tool 'rpc_error' breaker half_open" in (sup.health().component("breaker", "b").reason or "")
        assert (await sup.call("b", "echo", {"text": "x"})).attempts == 1

        # Both servers unreachable: nothing can be called.
        def refuse(*args: object, **kwargs: object) -> None:
            raise ConnectionRefusedError("server down")

        monkeypatch.setattr("rmcp_actors.client.connection.build_client", refuse)
        for name in ("a", "b"):
            session = sup._servers[name].connection.current_session()  # pyright: ignore[reportPrivateUsage]
            assert session is not None
            sup._servers[name].connection.report_broken(session)  # pyright: ignore[reportPrivateUsage]
        await trio.sleep(1.0)
        health = sup.health()
        connection = health.component("connection", "a")
        assert connection.status is HealthStatus.FAILING
        assert connection.reason is not None
        assert "server down" in connection.reason
        assert health.status is HealthStatus.FAILING

        await sup.remove_server("b")
        health = sup.health()
        assert not any(c.server == "b" for c in health.components)
        assert health.status is HealthStatus.FAILING


def raw_spec(*options: str, connect_timeout_s: float = 10.0) -> ServerSpec:
    # connect_timeout_s also bounds the watchdog's ping.
    overrides = attrs.evolve(FAST_RECOVERY, connect_timeout_s=connect_timeout_s)
    return ServerSpec.stdio(
        "raw", sys.executable, [RAW_SERVER, *options], protocol="legacy", overrides=overrides
    )


async def test_a_hung_stdio_server_is_restarted_and_later_calls_succeed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="rmcp_actors.watchdog")
    async with RMCPSupervisor.open(config(0.5)) as sup:
        await sup.add_server(raw_spec("--half-line", connect_timeout_s=2.0))
        assert (await sup.call("raw", "echo", timeout=5)).attempts == 1
        started = trio.current_time()
        # The server writes half of the answer's line and hangs: not a byte more, no ping answered.
        with pytest.raises(RMCPOutcomeUnknownError) as lost:
            await sup.call("raw", "half", timeout=20)
        assert trio.current_time() - started < 10, "the hung session was torn down long before the timeout"
        assert lost.value.may_have_executed
        result = await sup.call("raw", "echo", timeout=10)
        assert result.content[0].text == "echo"  # type: ignore[union-attr]
        stats = sup.statistics().connections[0]
        assert stats.hung_restarts == 1
        assert stats.generation == 2
    warnings = [r.getMessage() for r in caplog.records]
    assert any("did not answer a ping" in text and "reconnecting" in text for text in warnings)


async def test_without_restart_hung_a_hung_server_times_every_call_out() -> None:
    async with RMCPSupervisor.open(config(0.5, restart_hung=False)) as sup:
        await sup.add_server(raw_spec("--half-line"))
        with pytest.raises(RMCPTimeoutError):
            await sup.call("raw", "half", timeout=1.5)
        with pytest.raises(RMCPTimeoutError):
            await sup.call("raw", "echo", timeout=1.5)
        assert sup.statistics().connections[0].generation == 1


async def test_a_slow_stdio_server_that_answers_pings_is_not_restarted() -> None:
    # The raw server answers ping with "Method not found": an answer, so it is alive.
    async with RMCPSupervisor.open(config(0.3)) as sup:
        await sup.add_server(raw_spec("--wait-s", "1.5"))
        result = await sup.call("raw", "wait", timeout=10)
        assert result.content[0].text == "wait"  # type: ignore[union-attr]
        stats = sup.statistics().connections[0]
        assert (stats.generation, stats.hung_restarts) == (1, 0)
        assert sup.health().component("watchdog", "watchdog").statistics.hung_checks >= 1  # type: ignore[attr-defined]


async def test_every_call_leaves_the_in_flight_record_however_it_ends(
    server: MCPServer, autojump_clock: trio.testing.MockClock
) -> None:
    async with RMCPSupervisor.open(config()) as sup:
        await sup.add_server(ServerSpec.in_memory("test", server))
        in_flight = sup._servers["test"].flow.in_flight  # pyright: ignore[reportPrivateUsage]
        await sup.call("test", "echo", {"text": "ok"})
        with trio.move_on_after(1.0):  # cancelled by the caller's own scope
            await sup.call("test", "sleep", {"seconds": 100})
        with pytest.raises(RMCPTimeoutError):  # the call's own deadline
            await sup.call("test", "sleep", {"seconds": 100}, timeout=1.0)
        with pytest.raises(UnknownToolError):
            await sup.call("test", "no_such_tool")
        assert len(in_flight) == 0
        assert in_flight.completed == 4


@pytest.mark.parametrize("wire", ["jsonrpc", "direct"])
async def test_the_connection_counts_what_the_server_sends(
    server: MCPServer, autojump_clock: trio.testing.MockClock, wire: Any
) -> None:
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("test", server, wire=wire))
        connection = sup._servers["test"].connection  # pyright: ignore[reportPrivateUsage]
        before = connection.activity()
        await sup.call("test", "echo", {"text": "x"})
        # The answer is a sign of life on a transport; the direct wire has none to count on
        # (the watchdog counts its completed calls instead).
        assert connection.activity() - before == (1 if wire == "jsonrpc" else 0)
