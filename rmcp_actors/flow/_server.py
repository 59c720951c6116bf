"""ServerFlow: the gates of one server, as the call path passes them."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, final

import attrs

from ..config import ServerPolicy
from ..runtime import ChildSpec, InFlight
from .breaker import BreakerActor, BreakerChangeCallback, Breakers, client_prober
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
    #: Returns the client of the server's usable session (the breaker's active probes use it).
    current_client: Callable[[], Client | None] = attrs.field(default=lambda: None, kw_only=True)
    on_breaker_change: BreakerChangeCallback | None = attrs.field(default=None, kw_only=True)
    breakers: Breakers = attrs.field(init=False)
    # The watchdog's record of this server's calls in flight (a dict insert and delete per call).
    in_flight: InFlight = attrs.field(
        kw_only=True, default=attrs.Factory(lambda flow: InFlight(flow.name), takes_self=True)
    )

    def __attrs_post_init__(self) -> None:
        self.breakers = Breakers(self.name, self.policy.circuit_breaker, self.on_breaker_change)

    def child_specs(self) -> list[ChildSpec]:
        """The actors of this server's gates, started after its connection (rest_for_one)."""
        breaker = BreakerActor(
            f"breaker:{self.name}",
            self.breakers,
            client_prober(self.current_client),
            probe_timeout_s=self.policy.connect_timeout_s,
        )
        return [ChildSpec(breaker.name, breaker.run)]
