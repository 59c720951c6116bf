"""Health snapshots from the component registry: per-component status and the overall rule.

``RMCPSupervisor.health()`` against real servers is tested in ``tests/test_watchdog_servers.py``.
"""

from __future__ import annotations

import attrs
import pytest

from rmcp_actors._health import judge_breakers, judge_budgets, judge_limiter
from rmcp_actors.flow.breaker import BreakersStatistics, BreakerState, BreakerStatistics
from rmcp_actors.flow.budget import RetryBudgetStatistics
from rmcp_actors.flow.limiter import GateStatistics, LimiterStatistics
from rmcp_actors.runtime import ComponentRegistry, HealthStatus


@attrs.frozen
class FakeBreakerStatistics:
    name: str
    state: str


def breaker_judge(statistics: FakeBreakerStatistics) -> tuple[HealthStatus, str | None]:
    if statistics.state == "open":
        return HealthStatus.FAILING, "breaker open"
    if statistics.state == "half_open":
        return HealthStatus.DEGRADED, "breaker half-open"
    return HealthStatus.OK, None


@attrs.define
class Breaker:
    name: str
    state: str = "closed"

    def statistics(self) -> FakeBreakerStatistics:
        return FakeBreakerStatistics(self.name, self.state)


async def test_status_transitions_follow_the_components() -> None:
    registry = ComponentRegistry()
    a, b = Breaker("a"), Breaker("b")
    registry.register("breaker", "a", a.statistics, server="a", judge=breaker_judge)
    registry.register("breaker", "b", b.statistics, server="b", judge=breaker_judge)
    registry.register("scheduler", "scheduler", lambda: "no judge: informs only")

    health = registry.health()
    assert health.status is HealthStatus.OK
    assert health.component("breaker", "a").statistics == FakeBreakerStatistics("a", "closed")
    assert health.component("scheduler", "scheduler").status is HealthStatus.OK

    b.state = "half_open"
    health = registry.health()
    assert health.status is HealthStatus.DEGRADED
    assert health.servers() == {"a": HealthStatus.OK, "b": HealthStatus.DEGRADED}

    b.state = "open"  # one server of two cannot be called: degraded, not failing
    health = registry.health()
    assert health.status is HealthStatus.DEGRADED
    assert health.component("breaker", "b").reason == "breaker open"

    a.state = "open"  # no server can be called
    assert registry.health().status is HealthStatus.FAILING

    a.state = b.state = "closed"
    assert registry.health().status is HealthStatus.OK


async def test_a_failing_runtime_component_fails_the_whole() -> None:
    registry = ComponentRegistry()
    registry.register("breaker", "a", Breaker("a").statistics, server="a", judge=breaker_judge)
    registry.register(
        "watchdog", "watchdog", lambda: None, judge=lambda _: (HealthStatus.FAILING, "not running")
    )
    health = registry.health()
    assert health.status is HealthStatus.FAILING
    assert "watchdog watchdog: failing: not running" in health.describe()


async def test_unregister_removes_only_its_own_registration() -> None:
    registry = ComponentRegistry()
    old = registry.register("breaker", "a", Breaker("a", "open").statistics, server="a", judge=breaker_judge)
    # The server is added again under the same name before the old one's cleanup ran.
    registry.register("breaker", "a", Breaker("a").statistics, server="a", judge=breaker_judge)
    old()
    old()  # idempotent
    health = registry.health()
    assert [c.statistics for c in health.components] == [FakeBreakerStatistics("a", "closed")]
    assert health.status is HealthStatus.OK
    with pytest.raises(KeyError):
        health.component("limiter", "a")


async def test_a_provider_that_raises_is_failing_not_fatal() -> None:
    registry = ComponentRegistry()

    def broken() -> object:
        raise RuntimeError("boom")

    registry.register("limiter", "a", broken, server="a")
    registry.register("breaker", "b", Breaker("b").statistics, server="b", judge=breaker_judge)
    health = registry.health()
    limiter = health.component("limiter", "a")
    assert limiter.status is HealthStatus.FAILING
    assert limiter.statistics is None
    assert limiter.reason == "statistics() raised RuntimeError: boom"
    assert health.status is HealthStatus.DEGRADED
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        health.status = HealthStatus.OK  # type: ignore[misc]


def breaker(state: BreakerState, tool: str | None = None, mode: str = "enabled") -> BreakerStatistics:
    return BreakerStatistics(
        server="s",
        tool=tool,
        mode=mode,
        state=state,
        consecutive_failures=0,
        window_calls=0,
        window_failures=0,
        open_until=None,
        opens=0,
        reopens=0,
        rejected=0,
        last_failure="MCPError -32000" if state is not BreakerState.CLOSED else None,
    )


@pytest.mark.parametrize(
    ("server", "tools", "expected"),
    [
        (BreakerState.CLOSED, (), HealthStatus.OK),
        (BreakerState.OPEN, (), HealthStatus.FAILING),
        (BreakerState.HALF_OPEN, (), HealthStatus.DEGRADED),
        (BreakerState.CLOSED, (BreakerState.OPEN,), HealthStatus.DEGRADED),
    ],
)
async def test_a_servers_open_breaker_fails_it_a_tools_degrades_it(
    server: BreakerState, tools: tuple[BreakerState, ...], expected: HealthStatus
) -> None:
    statistics = BreakersStatistics(breaker(server), tuple(breaker(state, "t") for state in tools))
    status, reason = judge_breakers(statistics)
    assert status is expected
    assert (reason is None) == (expected is HealthStatus.OK)


async def test_an_open_breaker_in_metrics_only_mode_only_degrades() -> None:
    statistics = BreakersStatistics(breaker(BreakerState.OPEN, mode="metrics_only"), ())
    assert judge_breakers(statistics) == (
        HealthStatus.DEGRADED,
        "server breaker open (metrics_only: calls pass): MCPError -32000",
    )


async def test_an_empty_retry_budget_degrades_its_server() -> None:
    def budget(balance: float, tool: str | None = None) -> RetryBudgetStatistics:
        return RetryBudgetStatistics("s", tool, 0.2, 3.0, balance, 100, 20, 0, 7)

    assert judge_budgets((budget(5.0), budget(1.0, "t"))) == (HealthStatus.OK, None)
    assert judge_budgets((budget(5.0), budget(0.4, "t"))) == (
        HealthStatus.DEGRADED,
        "tool 't' retry budget empty (0.40 tokens; 7 retries or hedges refused so far)",
    )


async def test_a_limiter_slowed_by_the_server_degrades_its_server() -> None:
    def gate(name: str, rate: float | None, *, paused_for_s: float = 0.0, waiting: int = 0) -> GateStatistics:
        return GateStatistics(
            name, rate is not None, rate, 50.0, 50.0, 50.0, 1.0, waiting, paused_for_s, 10, 0, 0, 0, 0, 0
        )

    def limiter(*gates: GateStatistics) -> LimiterStatistics:
        return LimiterStatistics("limiter:s", 0, 64, gates=gates)

    assert judge_limiter(limiter(gate("s", 50.0), gate("s/t", None))) == (HealthStatus.OK, None)
    assert judge_limiter(limiter(gate("s", 12.5))) == (
        HealthStatus.DEGRADED,
        "s cut to 12.5/s (configured 50/s)",
    )
    assert judge_limiter(limiter(gate("s/t", 50.0, paused_for_s=2.0))) == (
        HealthStatus.DEGRADED,
        "s/t paused 2.0 s by the server",
    )
    assert judge_limiter(limiter(gate("s", 50.0, waiting=3))) == (
        HealthStatus.DEGRADED,
        "s: 3 calls waiting for tokens",
    )
