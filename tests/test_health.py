"""Health snapshots from the component registry: per-component status and the overall rule.

``RMCPSupervisor.health()`` against real servers is tested in ``tests/test_watchdog_servers.py``.
"""

from __future__ import annotations

import attrs
import pytest

from rmcp_actors.runtime import ComponentRegistry, HealthStatus


@attrs.frozen
class BreakerStatistics:
    name: str
    state: str


def breaker_judge(statistics: BreakerStatistics) -> tuple[HealthStatus, str | None]:
    if statistics.state == "open":
        return HealthStatus.FAILING, "breaker open"
    if statistics.state == "half_open":
        return HealthStatus.DEGRADED, "breaker half-open"
    return HealthStatus.OK, None


@attrs.define
class Breaker:
    name: str
    state: str = "closed"

    def statistics(self) -> BreakerStatistics:
        return BreakerStatistics(self.name, self.state)


async def test_status_transitions_follow_the_components() -> None:
    registry = ComponentRegistry()
    a, b = Breaker("a"), Breaker("b")
    registry.register("breaker", "a", a.statistics, server="a", judge=breaker_judge)
    registry.register("breaker", "b", b.statistics, server="b", judge=breaker_judge)
    registry.register("scheduler", "scheduler", lambda: "no judge: informs only")

    health = registry.health()
    assert health.status is HealthStatus.OK
    assert health.component("breaker", "a").statistics == BreakerStatistics("a", "closed")
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
    assert [c.statistics for c in health.components] == [BreakerStatistics("a", "closed")]
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
