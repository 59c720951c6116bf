"""ServerFlow: the gates of one server, as the call path passes them."""

from __future__ import annotations

from typing import final

import attrs

from ..config import ServerPolicy
from ..runtime import ChildSpec
from .scheduler import Lane, Scheduler

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

    def child_specs(self) -> list[ChildSpec]:
        """The actors of this server's gates, started after its connection (rest_for_one)."""
        return []
