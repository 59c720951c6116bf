"""The rate-limit gate and its actor on their own: pacing, priorities, deadlines, AIMD (MockClock)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest
import trio
import trio.testing

from rmcp_actors import RateLimitPolicy, RMCPActorStoppedError, RMCPTimeoutError
from rmcp_actors.flow._feedback import RateLimitSignal, SignalSource
from rmcp_actors.flow.limiter import RateGate, RateLimiter

Settings = RateLimitPolicy


def signal(retry_after_s: float | None = None) -> RateLimitSignal:
    return RateLimitSignal(SignalSource.HTTP, retry_after_s, "HTTP 429")


@asynccontextmanager
async def running(limiter: RateLimiter) -> AsyncIterator[RateLimiter]:
    async with trio.open_nursery() as nursery:
        await nursery.start(limiter.run)
        yield limiter
        nursery.cancel_scope.cancel()


async def take(gate: RateGate, priority: int = 0, timeout_s: float = 60.0) -> float:
    """What the call path does: a token at once, else a wait within the deadline."""
    if gate.take():
        return 0.0
    return await gate.wait(priority, trio.current_time() + timeout_s)


async def test_no_rate_and_no_feedback_leaves_the_gate_disengaged() -> None:
    limiter = RateLimiter("limiter:s", "s", Settings())
    assert limiter.gate().engaged is False
    assert limiter.gate("any").engaged is False
    assert RateLimiter("limiter:s", "s", Settings(rate=5)).gate().engaged is True


async def test_100_calls_at_rate_20_burst_1_take_about_5_s(autojump_clock: trio.testing.MockClock) -> None:
    limiter = RateLimiter("limiter:s", "s", Settings(rate=20, burst=1))
    gate = limiter.gate()
    started = trio.current_time()
    finished: list[float] = []

    async def call() -> None:
        await take(gate)
        finished.append(trio.current_time() - started)

    async with running(limiter), trio.open_nursery() as nursery:
        for _ in range(100):
            nursery.start_soon(call)
    assert len(finished) == 100
    assert max(finished) == pytest.approx(99 / 20, abs=0.01)
    stats = limiter.statistics().gates[0]
    assert (stats.taken, stats.waited, stats.waiting) == (1, 99, 0)


async def test_a_free_token_is_taken_without_a_checkpoint() -> None:
    gate = RateLimiter("limiter:s", "s", Settings(rate=10, burst=3)).gate()
    # take() is synchronous: three calls pass at once, the fourth finds the bucket empty.
    assert [gate.take() for _ in range(4)] == [True, True, True, False]


async def test_waiters_get_tokens_in_priority_order(autojump_clock: trio.testing.MockClock) -> None:
    limiter = RateLimiter("limiter:s", "s", Settings(rate=1, burst=1))
    gate = limiter.gate()
    order: list[str] = []

    async def call(name: str, priority: int) -> None:
        await take(gate, priority)
        order.append(name)

    async with running(limiter):
        assert gate.take()  # the only token: everyone below waits
        async with trio.open_nursery() as nursery:
            for name, priority in [("low1", 0), ("high1", 5), ("low2", 0), ("mid", 2), ("high2", 5)]:
                nursery.start_soon(call, name, priority)
                await trio.testing.wait_all_tasks_blocked()
            assert limiter.statistics().gates[0].waiting == 5
    assert order == ["high1", "high2", "mid", "low1", "low2"]


async def test_a_wait_that_would_pass_the_deadline_fails_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limiter = RateLimiter("limiter:s", "s", Settings(rate=2, burst=1))
    gate = limiter.gate()
    async with running(limiter):
        assert gate.take()
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(take, gate)
            await trio.testing.wait_all_tasks_blocked()
            before = trio.current_time()
            # Five ahead at 2 calls/s: ~3 s of wait, and only 1 s left.
            with pytest.raises(RMCPTimeoutError) as raised:
                await gate.wait(0, trio.current_time() + 1.0)
            assert trio.current_time() == before  # failed at once, waited nothing
            message = raised.value.message
            assert "2 calls/s" in message
            assert "5 call(s) ahead" in message
            assert "~3.00 s" in message
            assert "nothing was sent" in message
            assert not raised.value.may_have_executed
            # A higher priority goes ahead of them: its wait fits.
            assert await gate.wait(9, trio.current_time() + 1.0) == pytest.approx(0.5)
    assert limiter.statistics().gates[0].rejected == 1


async def test_a_waiter_that_gives_up_leaves_the_line(autojump_clock: trio.testing.MockClock) -> None:
    limiter = RateLimiter("limiter:s", "s", Settings(rate=1, burst=1))
    gate = limiter.gate()
    got: list[str] = []

    async def call(name: str, priority: int) -> None:
        await take(gate, priority)
        got.append(name)

    async with running(limiter):
        assert gate.take()
        async with trio.open_nursery() as nursery:
            with trio.move_on_after(0.5):
                await take(gate, priority=9)  # first in line, gives up before its token
                got.append("impatient")
            nursery.start_soon(call, "patient", 0)
        assert got == ["patient"]
        assert trio.current_time() == pytest.approx(1.0)
        assert limiter.statistics().gates[0].waiting == 0


async def test_retry_after_pauses_the_gate(autojump_clock: trio.testing.MockClock) -> None:
    limiter = RateLimiter("limiter:s", "s", Settings(rate=100, burst=10, adaptive=False))
    gate = limiter.gate()
    async with running(limiter):
        gate.report(signal(retry_after_s=2.0))
        await trio.testing.wait_all_tasks_blocked()
        assert not gate.take()
        stats = limiter.statistics().gates[0]
        assert stats.paused_for_s == pytest.approx(2.0)
        assert stats.rate == 100  # not adaptive: only the pause
        # The first call goes when the pause ends, as the server asked.
        waited = await take(gate)
        assert waited == pytest.approx(2.0)


async def test_a_pause_engages_a_gate_with_no_rate(autojump_clock: trio.testing.MockClock) -> None:
    limiter = RateLimiter("limiter:s", "s", Settings(adaptive=False))
    gate = limiter.gate()
    async with running(limiter):
        gate.report(signal(retry_after_s=1.0))
        await trio.testing.wait_all_tasks_blocked()
        assert gate.engaged
        assert await take(gate) == pytest.approx(1.0, abs=0.01)
        # Past the pause, no limit at all.
        await trio.sleep(0.001)
        assert all(gate.take() for _ in range(1000))


async def test_aimd_cuts_once_per_burst_of_signals_and_recovers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limiter = RateLimiter("limiter:s", "s", Settings(rate=40, burst=40))
    gate = limiter.gate()
    async with running(limiter):
        for _ in range(10):  # ten calls in flight refused at once: one congestion event
            gate.report(signal())
        await trio.testing.wait_all_tasks_blocked()
        stats = limiter.statistics().gates[0]
        assert (stats.rate, stats.cuts, stats.signals) == (20, 1, 10)
        assert stats.burst == 20  # the burst shrinks with the rate
        await trio.sleep(1.5)
        gate.report(signal())
        await trio.testing.wait_all_tasks_blocked()
        assert limiter.statistics().gates[0].rate == pytest.approx(11.0)  # (20 + 2) * 0.5
        # Additive recovery: 5 % of the ceiling (2 calls/s) per second, up to the ceiling.
        await trio.sleep(5.5)  # five steps, the first a second after the cut
        assert limiter.statistics().gates[0].rate == pytest.approx(21.0)
        await trio.sleep(60)
        stats = limiter.statistics().gates[0]
        assert (stats.rate, stats.burst, stats.ceiling) == (40, 40, 40)


async def test_rate_never_falls_below_min_rate(autojump_clock: trio.testing.MockClock) -> None:
    limiter = RateLimiter("limiter:s", "s", Settings(rate=1, min_rate=0.25, recover_per_s=0.01))
    gate = limiter.gate()
    async with running(limiter):
        for _ in range(6):
            gate.report(signal())
            await trio.sleep(1.01)
        assert limiter.statistics().gates[0].rate == pytest.approx(0.25, abs=0.05)


async def test_no_configured_rate_engages_on_feedback_and_discovers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limiter = RateLimiter("limiter:s", "s", Settings())
    gate = limiter.gate()
    async with running(limiter):
        gate.report(signal(retry_after_s=0.5))
        await trio.testing.wait_all_tasks_blocked()
        stats = limiter.statistics().gates[0]
        assert gate.engaged
        assert stats.rate == 2.0
        assert stats.ceiling is None
        await trio.sleep(0.5 + 3.01)  # the pause, then three doublings
        assert limiter.statistics().gates[0].rate == 16.0
        gate.report(signal())
        await trio.testing.wait_all_tasks_blocked()
        stats = limiter.statistics().gates[0]
        assert (stats.rate, stats.ceiling) == (8.0, 16.0)
        # Never refused again: it climbs to the inferred ceiling, probes above it, and, finding
        # no limit at all, steps out of the hot path.
        await trio.sleep(120)
        assert not gate.engaged


async def test_feedback_coalesces_when_the_inbox_is_full(autojump_clock: trio.testing.MockClock) -> None:
    limiter = RateLimiter("limiter:s", "s", Settings(rate=10), inbox_size=1)
    gate = limiter.gate()
    # The actor is not running yet: the first signal fills the inbox, the rest coalesce.
    gate.report(signal(retry_after_s=1.0))
    gate.report(signal(retry_after_s=5.0))
    gate.report(signal(retry_after_s=2.0))
    stats = limiter.statistics().gates[0]
    assert (stats.signals, stats.coalesced) == (3, 2)
    async with running(limiter):
        await trio.testing.wait_all_tasks_blocked()
        stats = limiter.statistics().gates[0]
        assert stats.paused_for_s == pytest.approx(5.0)  # the strongest pending signal was kept
        assert stats.cuts == 1


async def test_a_tool_with_its_own_bucket_does_not_share_the_servers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limiter = RateLimiter("limiter:s", "s", Settings(rate=1, burst=1), {"slow": Settings(rate=0.5, burst=1)})
    assert limiter.gate("other") is limiter.gate()
    slow = limiter.gate("slow")
    assert slow is not limiter.gate()
    assert slow.name == "s/slow"
    async with running(limiter):
        assert limiter.gate().take()
        assert slow.take()
        assert await take(slow) == pytest.approx(2.0)
    assert [g.name for g in limiter.statistics().gates] == ["s", "s/slow"]


async def test_statistics_of_a_fresh_limiter() -> None:
    stats = RateLimiter("limiter:s", "s", Settings()).statistics()
    assert stats.name == "limiter:s"
    assert stats.inbox_used == 0
    gate = stats.gates[0]
    assert (gate.engaged, gate.rate, gate.configured_rate, gate.waiting) == (False, None, None, 0)


def test_runs_under_asyncio_too() -> None:
    async def main() -> float:
        elapsed = 0.0
        limiter = RateLimiter("limiter:s", "s", Settings(rate=50, burst=1))
        gate = limiter.gate()
        async with anyio.create_task_group() as task_group:
            await task_group.start(limiter.run)
            start = anyio.current_time()
            for _ in range(3):
                if not gate.take():
                    await gate.wait(0, anyio.current_time() + 5)
            elapsed = anyio.current_time() - start
            task_group.cancel_scope.cancel()
        return elapsed

    assert anyio.run(main, backend="asyncio") == pytest.approx(2 / 50, abs=0.03)


async def test_a_restart_keeps_the_waiters_and_close_fails_them_and_later_waits_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limiter = RateLimiter("limiter:s", "s", Settings(rate=1, burst=1))
    gate = limiter.gate()
    assert gate.take()
    waited: list[float | BaseException] = []

    async def call() -> None:
        try:
            waited.append(await take(gate))
        except RMCPActorStoppedError as error:
            waited.append(error)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(call)
        async with running(limiter):
            await trio.sleep(0.2)
        # Stopped (as a restart stops it): the waiter stays; the next run wakes it on time.
        await trio.sleep(0.2)
        assert (waited, gate.statistics(trio.current_time()).waiting) == ([], 1)
        async with running(limiter):
            await trio.sleep(1)
        assert waited == [pytest.approx(1.0)]
        nursery.start_soon(call)
        await trio.testing.wait_all_tasks_blocked()
        limiter.close()
    assert isinstance(waited[1], RMCPActorStoppedError)
    with pytest.raises(RMCPActorStoppedError, match="nothing was sent"):
        await take(gate)


async def test_a_servers_refusal_slows_both_gates_a_matched_result_only_the_tools_own() -> None:
    limiter = RateLimiter("limiter:s", "s", Settings(rate=10), {"slow": Settings(rate=5)})
    limiter.report("slow", RateLimitSignal(SignalSource.NACK, 1.0, "NACK rate_limited"))
    limiter.report("slow", RateLimitSignal(SignalSource.RESULT, 1.0, "error result"))
    limiter.report("other", RateLimitSignal(SignalSource.RESULT, 1.0, "error result"))
    server, slow = (gate.statistics(0.0) for gate in limiter.gates())
    assert (server.signals, slow.signals) == (2, 2)
