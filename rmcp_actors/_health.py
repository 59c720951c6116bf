"""What each component's statistics mean for health, and the one place components register.

``RMCPSupervisor.health()`` and the watchdog's stall report read the
:class:`~rmcp_actors.runtime.ComponentRegistry`; a server's components are registered by
:func:`register_server` when it is added and unregistered when it is removed. A new gate
(limiter, breaker, budget) adds one ``registry.register(...)`` line there, with its judge.
"""

from __future__ import annotations

from collections.abc import Callable

from .client.connection import Connection, ConnectionState, ConnectionStatistics
from .flow._server import ServerFlow
from .flow.scheduler import LaneStatistics, SchedulerStatistics
from .runtime import ComponentRegistry, HealthStatus, WatchdogStatistics, WorkRegistry

__all__ = ["judge_scheduler", "judge_watchdog", "register_server"]

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
