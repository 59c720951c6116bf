"""ServerFlow: the gates of one server, as the call path passes them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, final

import attrs

from ..config import CallPolicy, RetryBudgetOverrides, ServerPolicy, ToolOverrides
from ..runtime import ChildSpec, InFlight
from ._loop import EventLoop
from .breaker import BreakerActor, BreakerChangeCallback, Breakers, client_prober
from .budget import RetryBudget, RetryBudgetStatistics
from .hedge import ToolHedge
from .limiter import RateLimiter, RateLimitSettings
from .scheduler import Lane, Scheduler

if TYPE_CHECKING:
    from mcp import Client

__all__ = ["ServerFlow"]


@final
@attrs.define(eq=False)
class ServerFlow:
    """Everything a call to one server passes through before and after its attempts.

    Built by ``add_server``; the gates are plain objects read synchronously on the hot path,
    the actors that own their timers are the server's children (:meth:`child_specs`).
    """

    name: str
    policy: ServerPolicy
    scheduler: Scheduler
    lane: Lane
    #: The ``rate_limit`` of each tool whose own table sets one (that tool gets its own bucket).
    tool_rate_limits: Mapping[str, RateLimitSettings] = attrs.field(
        factory=dict[str, RateLimitSettings], kw_only=True
    )
    #: Returns the client of the server's usable session (the breaker's active probes use it).
    current_client: Callable[[], Client | None] = attrs.field(default=lambda: None, kw_only=True)
    on_breaker_change: BreakerChangeCallback | None = attrs.field(default=None, kw_only=True)
    breakers: Breakers = attrs.field(init=False)
    limiter: RateLimiter = attrs.field(init=False)
    # The watchdog's record of this server's calls in flight (a dict insert and delete per call).
    in_flight: InFlight = attrs.field(
        kw_only=True, default=attrs.Factory(lambda flow: InFlight(flow.name), takes_self=True)
    )

    # Retry budget and hedging (flow/budget.py, flow/hedge.py): plain state, no actor (the
    # budget refills lazily from the clock). A tool has its own budget only when its table
    # sets retry_budget; hedging state exists only for tools whose policy hedges.
    budget: RetryBudget = attrs.field(init=False)
    tool_budgets: dict[str, RetryBudget] = attrs.field(init=False, factory=dict[str, RetryBudget])
    hedging: bool = attrs.field(init=False, default=False)
    hedges: dict[str, ToolHedge] = attrs.field(init=False, factory=dict[str, ToolHedge])
    # The running loop's clock, cancellation check and deadline scope (a call uses each).
    loop: EventLoop = attrs.field(init=False, factory=EventLoop)

    def __attrs_post_init__(self) -> None:
        self.breakers = Breakers(self.name, self.policy.circuit_breaker, self.on_breaker_change)
        self.limiter = RateLimiter(
            f"limiter:{self.name}", self.name, self.policy.rate_limit, self.tool_rate_limits
        )
        budget = self.policy.retry_budget
        self.budget = RetryBudget(budget.ratio, budget.min_per_s, server=self.name)
        self.hedging = _hedges(self.policy)

    def configure_tools(self, tools: Mapping[str, ToolOverrides], policies: Mapping[str, CallPolicy]) -> None:
        """Give the tools whose table sets ``retry_budget`` a budget of their own, and note
        whether any tool hedges (a server where none does skips hedging at one attribute read)."""
        for tool, overrides in tools.items():
            policy = policies[tool]
            if overrides.retry_budget != RetryBudgetOverrides():
                budget = policy.retry_budget
                self.tool_budgets[tool] = RetryBudget(
                    budget.ratio, budget.min_per_s, server=self.name, tool=tool
                )
            self.hedging = self.hedging or _hedges(policy)

    def budget_for(self, tool: str) -> RetryBudget:
        """The retry budget calls to ``tool`` deposit into and draw from."""
        return self.tool_budgets.get(tool, self.budget) if self.tool_budgets else self.budget

    def hedge_for(self, tool: str, policy: CallPolicy) -> ToolHedge | None:
        """The hedging state of ``tool`` (a tool the server lists), or None when it does not hedge."""
        hedge = self.hedges.get(tool)
        if hedge is None and _hedges(policy):
            table = policy.hedge
            hedge = self.hedges[tool] = ToolHedge(
                delay_s=table.delay_s,
                delay=table.delay,
                max_hedges=table.max_hedges,
                min_samples=table.min_samples,
            )
        return hedge

    def budget_statistics(self) -> tuple[RetryBudgetStatistics, ...]:
        """Snapshots of the server's retry budget, then of its tools' own budgets."""
        return (self.budget.statistics(), *(budget.statistics() for budget in self.tool_budgets.values()))

    def child_specs(self) -> list[ChildSpec]:
        """The actors of this server's gates, started after its connection (rest_for_one)."""
        breaker = BreakerActor(
            f"breaker:{self.name}",
            self.breakers,
            client_prober(self.current_client),
            probe_timeout_s=self.policy.connect_timeout_s,
        )
        return [ChildSpec(breaker.name, breaker.run), ChildSpec(self.limiter.name, self.limiter.run)]


def _hedges(policy: ServerPolicy | CallPolicy) -> bool:
    return policy.hedge.delay_s is not None or policy.hedge.delay is not None
