"""What each component's statistics mean for health, and the one place components register.

``RMCPSupervisor.health()`` and the watchdog's stall report read the
:class:`~rmcp_actors.runtime.ComponentRegistry`; a server's components are registered by
:func:`register_server` when it is added and unregistered when it is removed. A new gate
(limiter, breaker, budget) adds one ``registry.register(...)`` line there, with its judge.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio

from .client.connection import Connection, ConnectionState, ConnectionStatistics
from .flow._server import ServerFlow
from .flow.breaker import BreakersStatistics, BreakerState, BreakerStatistics
from .flow.budget import RetryBudgetStatistics
from .flow.limiter import LimiterStatistics
from .flow.scheduler import LaneStatistics, SchedulerStatistics
from .runtime import ComponentRegistry, HealthStatus, WatchdogStatistics, WorkRegistry

__all__ = ["judge_breakers", "judge_budgets", "judge_scheduler", "judge_watchdog", "register_server"]

Verdict = tuple[HealthStatus, str | None]


def register_server(
    registry: ComponentRegistry, work: WorkRegistry, connection: Connection, flow: ServerFlow
) -> Callable[[], None]:
    """Register one server's components (its calls in flight are in ``flow.in_flight``, which
    ``work`` tracks); the result unregisters them all and stops tracking (idempotent)."""
    server = flow.name
    lane = flow.lane
    unregister = [
        registry.register("connection", server, connection.statistics, server=server, judge=judge_connection),
        registry.register("lane", server, lane.statistics, server=server, judge=judge_lane),
        registry.register("breaker", server, flow.breakers.statistics, server=server, judge=judge_breakers),
        registry.register("budget", server, flow.budget_statistics, server=server, judge=judge_budgets),
        registry.register("limiter", server, flow.limiter.statistics, server=server, judge=judge_limiter),
    ]

    def unregister_all() -> None:
        for each in unregister:
            each()
        work.untrack(flow.in_flight)

    return unregister_all


def judge_connection(statistics: ConnectionStatistics) -> Verdict:
    """Failing unless connected: calls to the server fail or wait for a reconnect."""
    if statistics.state is ConnectionState.READY:
        return HealthStatus.OK, None
    why = f" ({statistics.last_error})" if statistics.last_error else ""
    return HealthStatus.FAILING, f"{statistics.state.value}{why}"


def judge_limiter(statistics: LimiterStatistics) -> Verdict:
    """Degraded while a gate runs below its configured rate (the server asked for less), is
    paused by a server's retry_after, or has calls waiting for tokens: calls to it are slowed."""
    slowed: list[str] = []
    for gate in statistics.gates:
        if gate.paused_for_s > 0:
            slowed.append(f"{gate.name} paused {gate.paused_for_s:.1f} s by the server")
        elif gate.rate is not None and gate.configured_rate is not None and gate.rate < gate.configured_rate:
            slowed.append(f"{gate.name} cut to {gate.rate:.3g}/s (configured {gate.configured_rate:g}/s)")
        elif gate.waiting:
            slowed.append(f"{gate.name}: {gate.waiting} calls waiting for tokens")
    if slowed:
        return HealthStatus.DEGRADED, "; ".join(slowed)
    return HealthStatus.OK, None


def judge_lane(statistics: LaneStatistics) -> Verdict:
    """Degraded while calls queue for the server's slots, or a tool's: it runs at its limit."""
    saturated = [lane for lane in (statistics, *statistics.tools) if lane.queued]
    if saturated:
        return (
            HealthStatus.DEGRADED,
            "saturated: "
            + "; ".join(
                f"{lane.name} {lane.running}/{lane.max_concurrency} running, {lane.queued} queued"
                for lane in saturated
            ),
        )
    return HealthStatus.OK, None


def judge_breakers(statistics: BreakersStatistics) -> Verdict:
    """Failing while the server's own breaker is open (every call fails fast); degraded while it
    half-opens, or while a tool's breaker is not closed (that tool fails fast, others pass), or
    when a breaker in ``metrics_only`` mode would be open (it records, calls still pass)."""
    server = statistics.server
    if server.state is BreakerState.OPEN and server.mode == "enabled":
        return HealthStatus.FAILING, _breaker_words(server)
    troubled = [b for b in (server, *statistics.tools) if b.state is not BreakerState.CLOSED]
    if troubled:
        return HealthStatus.DEGRADED, "; ".join(_breaker_words(b) for b in troubled)
    return HealthStatus.OK, None


def _breaker_words(breaker: BreakerStatistics) -> str:
    whose = f"tool {breaker.tool!r}" if breaker.tool is not None else "server"
    mode = " (metrics_only: calls pass)" if breaker.mode == "metrics_only" else ""
    until = (
        f", half-opens in {max(0.0, breaker.open_until - anyio.current_time()):.1f} s"
        if breaker.open_until is not None
        else ""
    )
    why = f": {breaker.last_failure}" if breaker.last_failure else ""
    return f"{whose} breaker {breaker.state.value}{until}{mode}{why}"


def judge_budgets(statistics: tuple[RetryBudgetStatistics, ...]) -> Verdict:
    """Degraded while a retry budget is empty: failures end calls instead of being retried
    (the budget doing its job under a dependency's failure, which the breakers show)."""
    empty = [budget for budget in statistics if budget.balance < 1.0]
    if empty:
        return (
            HealthStatus.DEGRADED,
            "; ".join(
                f"{'tool ' + repr(b.tool) if b.tool is not None else 'server'} retry budget empty "
                f"({b.balance:.2f} tokens; {b.refused} retries or hedges refused so far)"
                for b in empty
            ),
        )
    return HealthStatus.OK, None


def judge_scheduler(statistics: SchedulerStatistics) -> Verdict:
    """Degraded while the admission queue is full and callers wait for room in it."""
    if statistics.waiting_for_queue_space:
        return (
            HealthStatus.DEGRADED,
            f"admission queue full ({statistics.queued}/{statistics.max_queue}); "
            f"{statistics.waiting_for_queue_space} caller(s) wait for room",
        )
    return HealthStatus.OK, None


def judge_watchdog(statistics: WatchdogStatistics) -> Verdict:
    """Degraded while a stall is being reported (calls in flight, none completing)."""
    if statistics.stalled:
        return (
            HealthStatus.DEGRADED,
            f"stalled: no call completed for {statistics.stalled_for_s:.1f} s with "
            f"{statistics.in_flight} in flight",
        )
    return HealthStatus.OK, None
