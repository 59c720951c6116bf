"""Health: one frozen snapshot of every component, built from each component's ``statistics()``.

Components plug in with one line, ``registry.register(kind, name, component.statistics,
judge=...)``: the registry keeps the providers, and :meth:`ComponentRegistry.health` calls each
one, asks its judge what the numbers mean (ok, degraded, failing, and why) and folds the
results into an overall status. The watchdog's stall report reads the same providers, so a
component registered for health shows up in "who waits on what" too. Nothing here is on the
call path: providers are called only when someone asks for a snapshot.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, final

import anyio
import attrs

__all__ = ["ComponentHealth", "ComponentRegistry", "Health", "HealthStatus", "Judge"]


class HealthStatus(enum.Enum):
    """How well a component (or the whole runtime) is doing, best first.

    ``OK``: working as configured. ``DEGRADED``: working with less than it should (a queue
    building up, a rate cut by the server, a breaker half-open, a stall being reported).
    ``FAILING``: not doing its job (a server unreachable, a breaker open).
    """

    OK = "ok"
    DEGRADED = "degraded"
    FAILING = "failing"

    @property
    def rank(self) -> int:
        """0 for ``OK``, 1 for ``DEGRADED``, 2 for ``FAILING``: larger is worse."""
        return _RANKS[self]


_RANKS = {HealthStatus.OK: 0, HealthStatus.DEGRADED: 1, HealthStatus.FAILING: 2}

#: What a component's statistics mean: its status and, unless it is ``OK``, why.
Judge = Callable[[Any], tuple[HealthStatus, str | None]]


def _always_ok(statistics: object) -> tuple[HealthStatus, str | None]:
    del statistics
    return HealthStatus.OK, None


@final
@attrs.frozen
class ComponentHealth:
    """One component in a :class:`Health` snapshot.

    Attributes:
        kind: What it is: ``"connection"``, ``"lane"``, ``"limiter"``, ``"breaker"``,
            ``"budget"``, ``"watchdog"``...
        name: Its name among components of its kind (a server's name, ``server/tool``...).
        server: The server it belongs to, or ``None`` for a runtime-wide component.
        status: What its judge made of its statistics.
        reason: Why it is not ``OK`` (``None`` when it is).
        statistics: Its ``statistics()`` snapshot, as the component returned it.
    """

    kind: str
    name: str
    server: str | None
    status: HealthStatus
    reason: str | None
    statistics: object


@final
@attrs.frozen
class Health:
    """A frozen snapshot of the runtime's health, returned by ``RMCPSupervisor.health()``.

    The overall ``status`` is ``FAILING`` when a runtime-wide component (one with no server)
    is failing, or when every server has a failing component (nothing can be called);
    ``DEGRADED`` when any component is not ``OK`` (some servers or tools cannot be called, or
    run below their configured capacity); ``OK`` otherwise.

    Attributes:
        status: The overall status.
        at: The runtime clock when the snapshot was taken.
        components: Every registered component, in registration order.
    """

    status: HealthStatus
    at: float
    components: tuple[ComponentHealth, ...]

    def component(self, kind: str, name: str) -> ComponentHealth:
        """Return the component of that kind and name.

        Raises:
            KeyError: No such component in the snapshot.
        """
        for component in self.components:
            if component.kind == kind and component.name == name:
                return component
        raise KeyError((kind, name))

    def servers(self) -> dict[str, HealthStatus]:
        """Return each server's status: the worst status among its components."""
        worst: dict[str, HealthStatus] = {}
        for component in self.components:
            if component.server is None:
                continue
            known = worst.get(component.server)
            if known is None or component.status.rank > known.rank:
                worst[component.server] = component.status
        return worst

    def describe(self) -> str:
        """Return the snapshot as readable lines: the overall status, then one per component."""
        lines = [f"health: {self.status.value}"]
        for component in self.components:
            why = f": {component.reason}" if component.reason else ""
            lines.append(f"  {component.kind} {component.name}: {component.status.value}{why}")
        return "\n".join(lines)


@attrs.define(eq=False)
class _Provider:
    kind: str
    name: str
    server: str | None
    statistics: Callable[[], object]
    judge: Judge


@final
@attrs.define(eq=False)
class ComponentRegistry:
    """The components whose ``statistics()`` make up health snapshots and stall reports.

    A shared, synchronous structure (like the scheduler), not an actor: components register
    when they start and unregister when they go; readers call the providers on demand.
    """

    _providers: dict[object, _Provider] = attrs.field(factory=dict[object, _Provider], init=False)

    def register(
        self,
        kind: str,
        name: str,
        statistics: Callable[[], object],
        *,
        server: str | None = None,
        judge: Judge | None = None,
    ) -> Callable[[], None]:
        """Add a component; call the returned function to remove it (and only it).

        Args:
            kind: What it is (``"limiter"``, ``"breaker"``...).
            name: Its name among components of its kind.
            statistics: Returns a snapshot of the component; called for every health snapshot
                and stall report, so it must be cheap and must not wait.
            server: The server it belongs to, or ``None`` for a runtime-wide component.
            judge: Reads a snapshot and says how the component is doing; ``None`` means
                always ``OK`` (a component that only informs).

        Returns:
            Unregisters this registration; idempotent, and harmless once a newer component
            took the same name.
        """
        token = object()
        self._providers[token] = _Provider(kind, name, server, statistics, judge or _always_ok)

        def unregister() -> None:
            self._providers.pop(token, None)

        return unregister

    def snapshot(self) -> tuple[ComponentHealth, ...]:
        """Return every component's statistics and status, in registration order.

        A provider or judge that raises is reported as ``FAILING`` with the error as its
        reason, instead of failing the whole snapshot.
        """
        return tuple(_judge(provider) for provider in list(self._providers.values()))

    def health(self) -> Health:
        """Return a :class:`Health` snapshot with its overall status (see :class:`Health`)."""
        components = self.snapshot()
        return Health(_overall_status(components), anyio.current_time(), components)


def _overall_status(components: tuple[ComponentHealth, ...]) -> HealthStatus:
    """Fold component statuses into the runtime's (the rule is documented on :class:`Health`)."""
    if any(c.server is None and c.status is HealthStatus.FAILING for c in components):
        return HealthStatus.FAILING
    servers = {c.server for c in components if c.server is not None}
    failing = {c.server for c in components if c.server is not None and c.status is HealthStatus.FAILING}
    if servers and failing == servers:
        return HealthStatus.FAILING
    if any(c.status is not HealthStatus.OK for c in components):
        return HealthStatus.DEGRADED
    return HealthStatus.OK


def _judge(provider: _Provider) -> ComponentHealth:
    try:
        statistics = provider.statistics()
        status, reason = provider.judge(statistics)
    except Exception as error:
        # One broken provider must not hide the health of everything else.
        return ComponentHealth(
            provider.kind,
            provider.name,
            provider.server,
            HealthStatus.FAILING,
            f"statistics() raised {type(error).__name__}: {error}",
            None,
        )
    return ComponentHealth(provider.kind, provider.name, provider.server, status, reason, statistics)
