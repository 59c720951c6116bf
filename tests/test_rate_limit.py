"""The rate limiter in the call path, against real servers that rate-limit in each of the four
ways (NACK, JSON-RPC -32023, HTTP 429, error-result text), with MockClock where time matters."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing
from _http import serve_http
from conftest import FAST_RECOVERY, PYTHON
from mcp_test_server import State, build_server
from rate_limited_servers import ServerLimit, http_429, jsonrpc_server, nack_server, text_server
from test_hot_path import BASELINE, CALLS, SwitchCounter

from rmcp_actors import (
    CallResult,
    Outcome,
    PolicyOverrides,
    RateLimitOverrides,
    RetryOverrides,
    RMCPActorStoppedError,
    RMCPNackError,
    RMCPSupervisor,
    RMCPTimeoutError,
    ServerSpec,
    ToolOverrides,
)
from rmcp_actors.flow.limiter import GateStatistics

RATE_SERVERS = Path(__file__).with_name("rate_limited_servers.py")
# What a wrapped API says in an error result when it is over its limit (see text_server).
TEXT_PATTERNS = (r"rate limit exceeded, retry after (?P<seconds>[\d.]+) s",)


def limited(rate: float | None = None, burst: int | None = None, **keys: object) -> PolicyOverrides:
    return PolicyOverrides(rate_limit=RateLimitOverrides(rate=rate, burst=burst, **keys))  # pyright: ignore[reportArgumentType]


def gate_stats(sup: RMCPSupervisor, server: str) -> GateStatistics:
    (limiter,) = [lim for lim in sup.statistics().limiters if lim.name == f"limiter:{server}"]
    return limiter.gates[0]


async def call_all(sup: RMCPSupervisor, server: str, count: int, **options: object) -> list[CallResult]:
    results: list[CallResult] = []

    async def one(index: int) -> None:
        results.append(await sup.call(server, "echo", {"text": str(index)}, **options))  # pyright: ignore[reportArgumentType]

    async with trio.open_nursery() as nursery:
        for index in range(count):
            nursery.start_soon(one, index)
    return results


async def test_100_calls_at_rate_20_burst_1_take_about_5_s(autojump_clock: trio.testing.MockClock) -> None:
    state = State()
    spec = ServerSpec.in_memory("test", build_server(state), overrides=limited(rate=20, burst=1))
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(spec)
        started = trio.current_time()
        results = await call_all(sup, "test", 100)
        elapsed = trio.current_time() - started
        stats = gate_stats(sup, "test")
    assert len(results) == 100
    assert all(result.outcome is Outcome.SUCCEEDED for result in results)
    assert elapsed == pytest.approx(99 / 20, abs=0.05)
    assert (stats.taken, stats.waited, stats.rate) == (1, 99, 20)
    # The wait for a token counts as queueing.
    assert max(result.queued_s for result in results) == pytest.approx(99 / 20, abs=0.05)


@pytest.mark.parametrize("tool_bucket", [False, True])
async def test_a_free_token_adds_no_task_switch(tool_bucket: bool) -> None:
    # With a tool bucket, the call takes a token from it and from the server's: still none.
    tools = {"echo": ToolOverrides(rate_limit=RateLimitOverrides(rate=1e6))} if tool_bucket else {}
    spec = ServerSpec.in_memory(
        "test", build_server(State()), wire="direct", overrides=limited(rate=1e6), tools=tools
    )
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(spec)
        for _ in range(3):
            await sup.call("test", "echo", {"text": "warm"})
        counter = SwitchCounter()
        trio.lowlevel.add_instrument(counter)
        try:
            for _ in range(CALLS):
                await sup.call("test", "echo", {"text": "hot"})
        finally:
            trio.lowlevel.remove_instrument(counter)
        assert gate_stats(sup, "test").taken >= CALLS
    assert counter.switches / CALLS <= BASELINE["direct"]


async def test_waiters_are_served_in_priority_order(autojump_clock: trio.testing.MockClock) -> None:
    spec = ServerSpec.in_memory("test", build_server(State()), overrides=limited(rate=1, burst=1))
    order: list[str] = []
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(spec)
        await sup.call("test", "echo", {"text": "takes the token"})

        async def call(name: str, priority: int) -> None:
            await sup.call("test", "echo", {"text": name}, priority=priority)
            order.append(name)

        async with trio.open_nursery() as nursery:
            for name, priority in [("low1", 0), ("high1", 5), ("low2", 0), ("mid", 2), ("high2", 5)]:
                nursery.start_soon(call, name, priority)
                await trio.testing.wait_all_tasks_blocked()
    assert order == ["high1", "high2", "mid", "low1", "low2"]


async def test_a_wait_past_the_deadline_fails_at_once_and_sends_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    state = State()
    spec = ServerSpec.in_memory("test", build_server(state), overrides=limited(rate=1, burst=1))
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(spec)
        async with trio.open_nursery() as nursery:
            for index in range(6):
                nursery.start_soon(sup.call, "test", "echo", {"text": str(index)})
            await trio.testing.wait_all_tasks_blocked()
            before = trio.current_time()
            with pytest.raises(RMCPTimeoutError) as raised:
                await sup.call("test", "echo", {"text": "impatient"}, timeout=2)
            assert trio.current_time() == before
    error = raised.value
    assert not error.may_have_executed
    assert error.outcome is Outcome.FAILED
    assert "rate limit of test: 1 calls/s (5 call(s) ahead)" in error.message
    assert "would pass the call's deadline (2.00 s left)" in error.message
    assert (error.server, error.tool) == ("test", "echo")
    assert gate_stats(sup, "test").rejected == 1


async def test_a_tool_with_its_own_rate_limit_has_its_own_bucket(
    autojump_clock: trio.testing.MockClock,
) -> None:
    spec = ServerSpec.in_memory(
        "test",
        build_server(State()),
        overrides=limited(rate=100),
        tools={"echo": ToolOverrides(rate_limit=RateLimitOverrides(rate=2, burst=1))},
    )
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(spec)
        started = trio.current_time()
        await call_all(sup, "test", 5)
        assert trio.current_time() - started == pytest.approx(2.0, abs=0.01)
        (limiter,) = sup.statistics().limiters
    assert [(gate.name, gate.taken + gate.waited) for gate in limiter.gates] == [
        ("test", 5),
        ("test/echo", 5),
    ]


async def test_a_tool_with_its_own_bucket_takes_the_servers_token_too(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Per server AND per tool: a tool's own (faster) bucket does not lift the server's limit.
    spec = ServerSpec.in_memory(
        "test",
        build_server(State()),
        overrides=limited(rate=1, burst=1),
        tools={"echo": ToolOverrides(rate_limit=RateLimitOverrides(rate=100, burst=5))},
    )
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(spec)
        started = trio.current_time()
        await call_all(sup, "test", 5)
        assert trio.current_time() - started == pytest.approx(4.0, abs=0.01)
        # The server's next token is 1 s away: a call with 0.5 s fails at once, nothing sent,
        # though the tool's own bucket has a token for it.
        with pytest.raises(RMCPTimeoutError) as raised:
            await sup.call("test", "echo", {"text": "impatient"}, timeout=0.5)
        assert trio.current_time() - started == pytest.approx(4.0, abs=0.01)
        (limiter,) = sup.statistics().limiters
    assert "rate limit of test: 1 calls/s" in raised.value.message
    assert not raised.value.may_have_executed
    assert [(gate.name, gate.taken + gate.waited, gate.rejected) for gate in limiter.gates] == [
        ("test", 5, 1),
        ("test/echo", 5, 0),
    ]


async def test_a_servers_signal_on_a_tools_call_slows_the_server_gate_too(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # -32023 is the server's refusal, whatever the tool: the server's gate (no rate configured
    # here) engages and pauses, not only the tool's own.
    limit = ServerLimit(rate=1, burst=1)
    spec = ServerSpec.in_memory(
        "up",
        jsonrpc_server(limit),
        tools={"echo": ToolOverrides(rate_limit=RateLimitOverrides(rate=50))},
    )
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(spec)
        results = await call_all(sup, "up", 10, timeout=60)
        (limiter,) = sup.statistics().limiters
    assert all(result.outcome is Outcome.SUCCEEDED for result in results)
    server, tool = limiter.gates
    assert (server.name, tool.name) == ("up", "up/echo")
    assert server.signals > 0
    assert server.engaged
    assert tool.signals == server.signals
    assert tool.cuts > 0


@pytest.mark.parametrize("form", ["nack", "jsonrpc", "text"])
async def test_each_form_of_feedback_slows_the_client_and_every_call_succeeds(
    form: str, autojump_clock: trio.testing.MockClock
) -> None:
    limit = ServerLimit(rate=5, burst=5)
    # One attempt allowed: a refusal for going too fast ran nothing and does not count.
    once = RetryOverrides(max_attempts=1)
    if form == "nack":
        spec = ServerSpec.in_memory("up", nack_server(5), overrides=PolicyOverrides(retry=once))
    elif form == "jsonrpc":
        spec = ServerSpec.in_memory("up", jsonrpc_server(limit), overrides=PolicyOverrides(retry=once))
    else:
        overrides = PolicyOverrides(retry=once, rate_limit=RateLimitOverrides(error_patterns=TEXT_PATTERNS))
        spec = ServerSpec.in_memory("up", text_server(limit), overrides=overrides)
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(spec)
        started = trio.current_time()
        results = await call_all(sup, "up", 40)
        elapsed = trio.current_time() - started
        stats = gate_stats(sup, "up")
    assert all(result.outcome is Outcome.SUCCEEDED for result in results)
    # 5 at once, then 5 per second: the server's own pace.
    assert elapsed >= 35 / 5 - 0.1
    assert stats.engaged
    assert stats.signals > 0
    assert stats.cuts >= 1
    refused = [result for result in results if result.attempts > 1]
    assert refused
    for result in refused:
        states = [event.state.value for event in result.lifecycle]
        assert states.count("nacked") == result.attempts - 1


async def test_an_error_result_is_a_result_unless_the_server_opted_in(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("up", text_server(ServerLimit(rate=1, burst=1))))
        results = await call_all(sup, "up", 3)
        stats = gate_stats(sup, "up")
    assert sorted(result.outcome.value for result in results) == ["failed", "failed", "succeeded"]
    assert (stats.engaged, stats.signals) == (False, 0)


async def test_a_retry_after_past_the_deadline_fails_at_once(autojump_clock: trio.testing.MockClock) -> None:
    state_limit = ServerLimit(rate=0.01, burst=1)  # next token in 100 s
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("up", jsonrpc_server(state_limit)))
        await sup.call("up", "echo", {"text": "first"})
        before = trio.current_time()
        with pytest.raises(RMCPNackError) as raised:
            await sup.call("up", "echo", {"text": "second"}, timeout=10)
        assert trio.current_time() == before
        await trio.testing.wait_all_tasks_blocked()  # the limiter handles the feedback
        stats = gate_stats(sup, "up")
    error = raised.value
    assert (error.code, error.retryable, error.may_have_executed) == ("rate_limited", True, False)
    assert error.retry_after_ms == 100_000
    assert "-32023" in error.message
    assert "reaches past the call's deadline" in error.message
    # Other callers are paused too, not only the refused one.
    assert stats.paused_for_s == pytest.approx(100, abs=0.01)


async def test_aimd_settles_below_the_servers_limit_and_recovers_when_it_lifts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limit = ServerLimit(rate=20, burst=1)
    spec = ServerSpec.in_memory("up", jsonrpc_server(limit), overrides=limited(rate=50, burst=1))
    rates: list[tuple[float, float]] = []
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(spec)
        start = trio.current_time()
        stop = start + 120

        async def worker() -> None:
            while trio.current_time() < stop:
                await sup.call("up", "echo", {"text": "x"})

        async def sample() -> None:
            while trio.current_time() < stop:
                rate = gate_stats(sup, "up").rate
                assert rate is not None
                rates.append((trio.current_time() - start, rate))
                await trio.sleep(1)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sample)
            for _ in range(16):
                nursery.start_soon(worker)
            await trio.sleep(60)
            limit.rate = None  # the server's limit lifts
    settled = [rate for at, rate in rates if 20 <= at < 60]
    assert sum(settled) / len(settled) < 20
    assert max(settled) < 30
    # AIMD's saw tooth (halve at the limit, climb back 5 % of the ceiling per second) uses about
    # three quarters of the limit, and the server refuses few calls.
    assert limit.accepted_rate(start + 20, start + 60) > 0.6 * 20
    assert limit.refused < 0.05 * len(limit.accepted)
    recovered = [rate for at, rate in rates if at >= 110]
    assert min(recovered) == 50
    assert limit.accepted_rate(start + 110, start + 120) == pytest.approx(50, rel=0.05)


async def test_http_429_with_retry_after_slows_the_client() -> None:
    limit = ServerLimit(rate=4, burst=2)
    async with serve_http(build_server(State()), wrap=http_429(limit)) as http, RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.http("up", http.url, overrides=FAST_RECOVERY))
        started = trio.current_time()
        results = await call_all(sup, "up", 6)
        elapsed = trio.current_time() - started
        stats = gate_stats(sup, "up")
    assert all(result.outcome is Outcome.SUCCEEDED for result in results)
    assert limit.refused > 0
    assert stats.signals > 0
    # Retry-After is in whole seconds: the refused calls waited at least one.
    assert elapsed >= 1.0
    details = {event.detail for result in results for event in result.lifecycle}
    assert "rate_limited (http)" in details


async def test_http_429_with_a_sep_3304_body_uses_its_exact_wait() -> None:
    # One token per 0.2 s: the header says 1 s (whole seconds), the body says 200 ms.
    limit = ServerLimit(rate=5, burst=1)
    async with (
        serve_http(build_server(State()), wrap=http_429(limit, sep_3304=True)) as http,
        RMCPSupervisor.open() as sup,
    ):
        await sup.add_server(ServerSpec.http("up", http.url, overrides=FAST_RECOVERY))
        results = await call_all(sup, "up", 4)
    assert all(result.outcome is Outcome.SUCCEEDED for result in results)
    assert limit.refused > 0
    details = {event.detail for result in results for event in result.lifecycle}
    assert "rate_limited (jsonrpc)" in details
    # Each refused call waited what the body said (about 200 ms), not the header's second.
    waits = [
        later.at - event.at
        for result in results
        for event, later in zip(result.lifecycle, result.lifecycle[1:], strict=False)
        if event.state.value == "nacked"
    ]
    assert waits
    assert min(waits) < 0.5


async def test_jsonrpc_32023_over_stdio() -> None:
    spec = ServerSpec.stdio("up", PYTHON, [str(RATE_SERVERS), "20"])
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(spec)
        started = trio.current_time()
        results = await call_all(sup, "up", 30)
        elapsed = trio.current_time() - started
        stats = gate_stats(sup, "up")
    assert all(result.outcome is Outcome.SUCCEEDED for result in results)
    assert stats.signals > 0
    assert elapsed >= 29 / 20 - 0.1


async def test_removing_a_server_ends_the_calls_waiting_on_its_limiter(
    autojump_clock: trio.testing.MockClock,
) -> None:
    spec = ServerSpec.in_memory("test", build_server(State()), overrides=limited(rate=0.1, burst=1))
    errors: list[Exception] = []
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(spec)
        await sup.call("test", "echo", {"text": "takes the token"})

        async def waiter() -> None:
            try:
                await sup.call("test", "echo", {"text": "waits"}, timeout=60)
            except Exception as error:
                errors.append(error)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            before = trio.current_time()
            await sup.remove_server("test")
        assert trio.current_time() - before < 1
    (error,) = errors
    assert isinstance(error, RMCPActorStoppedError)
    assert not error.may_have_executed
    assert "rate limiter of server 'test' stopped" in error.message
    assert error.request_id is not None


@pytest.mark.parametrize("form", ["nack", "jsonrpc", "text"])
async def test_rate_limit_signals_never_trip_a_breaker(
    form: str, autojump_clock: trio.testing.MockClock
) -> None:
    # A hard limit (one call per 2 s) and 30 callers: dozens of refusals, far past the breaker's
    # five consecutive failures, and none of them is a failure of the server.
    limit = ServerLimit(rate=0.5, burst=1)
    if form == "nack":
        spec = ServerSpec.in_memory("up", nack_server(0.5))
    elif form == "jsonrpc":
        spec = ServerSpec.in_memory("up", jsonrpc_server(limit))
    else:
        spec = ServerSpec.in_memory("up", text_server(limit), overrides=limited(error_patterns=TEXT_PATTERNS))
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(spec)
        results = await call_all(sup, "up", 30, timeout=120)
        breakers = sup.statistics().breakers
        stats = gate_stats(sup, "up")
    assert all(result.outcome is Outcome.SUCCEEDED for result in results)
    assert stats.signals >= 10
    assert breakers
    for breaker in breakers:
        assert (breaker.state.value, breaker.opens, breaker.consecutive_failures) == ("closed", 0, 0)
