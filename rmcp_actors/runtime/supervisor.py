"""Supervisors: restart failed children with Erlang/OTP semantics.

A :class:`Supervisor` starts its children in order, watches them, and when one ends applies its
:class:`Strategy` to it and, depending on the strategy, to its siblings. Restarts are rate
limited by a :class:`RestartIntensity`; a child that keeps failing escalates as
:class:`~rmcp_actors.errors.RMCPSupervisorError` to whoever runs the supervisor, which may be a
parent supervisor that treats it as a crash of its own child.

Every child runs in a cancel scope of its own that is shielded from the supervisor's
surroundings. A cancellation reaching the supervisor therefore cannot tear the children down
behind its back: the supervisor stops them itself, and only a child whose own scope the
supervisor cancelled is ever cancelled. That also lets a child's exit be classified by the
scope's ``cancel_called`` alone: cancelled by us means stopped, anything else is the child's
own doing.

How a supervisor stops its children follows its strategy. Under ``ONE_FOR_ALL`` and
``REST_FOR_ONE`` a later child may depend on an earlier one, so they are stopped one by one in
reverse start order. Under ``ONE_FOR_ONE`` the children are independent by definition, so they
are all stopped at once and waited on side by side, each within its own ``shutdown_timeout_s``:
stopping N children costs the slowest one, not the sum. Restarts follow the same line: under
``ONE_FOR_ONE`` each restart (its backoff, then its start) runs in the child's own task and the
supervisor goes on handling other exits, while the group strategies restart the group in order
before handling the next exit.
"""

from __future__ import annotations

import enum
import math
import random
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import cast

import anyio
import anyio.abc
import attrs
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ..errors import RMCPSupervisorError

__all__ = [
    "ChildSpec",
    "ChildStatistics",
    "Restart",
    "RestartIntensity",
    "Strategy",
    "Supervisor",
    "SupervisorStatistics",
]


class Restart(enum.Enum):
    """When a child that ended is restarted.

    ``PERMANENT``: always. ``TRANSIENT``: only after it raised. ``TEMPORARY``: never; it is
    removed from the supervisor when it ends.
    """

    PERMANENT = "permanent"
    TRANSIENT = "transient"
    TEMPORARY = "temporary"


class Strategy(enum.Enum):
    """Which children a supervisor restarts when one of them ends and is to be restarted.

    ``ONE_FOR_ONE``: only that child. ``ONE_FOR_ALL``: all children. ``REST_FOR_ONE``: that
    child and the children started after it.
    """

    ONE_FOR_ONE = "one_for_one"
    ONE_FOR_ALL = "one_for_all"
    REST_FOR_ONE = "rest_for_one"


@attrs.frozen
class ChildSpec:
    """How to start and restart one child.

    Attributes:
        name: Unique among the supervisor's children.
        start: Called as ``await start(task_status=...)``; it must call ``task_status.started()``
            once ready, then run until done. Returning is a normal exit, raising is a crash.
        restart: When the child is restarted after it ends.
        shutdown_timeout_s: How long stopping waits for the child after cancelling it before
            moving on (the child itself is never abandoned, only waited on later).
    """

    name: str
    start: Callable[..., Awaitable[None]]
    restart: Restart = Restart.PERMANENT
    shutdown_timeout_s: float = 5.0


@attrs.frozen
class RestartIntensity:
    """How many restarts a supervisor allows before it gives up, and how long it pauses before each.

    Attributes:
        max_restarts: Restarts allowed within ``period_s``; one more escalates.
        period_s: Length of the sliding window, in seconds.
        backoff_base_s: Pause before a restart is drawn from ``uniform(0, min(backoff_max_s,
            backoff_base_s * 2**n))`` where ``n`` is the number of restarts already in the window.
        backoff_max_s: Upper bound of that pause.
    """

    max_restarts: int = 5
    period_s: float = 30.0
    backoff_base_s: float = 0.01
    backoff_max_s: float = 1.0


@attrs.frozen
class ChildStatistics:
    """A snapshot of one child.

    Attributes:
        name: The child's name.
        running: Whether it has started and has not ended or been stopped.
        restarts: How many times the supervisor has restarted it.
        last_error: ``"Type: message"`` of the last exception it ended with, if any.
    """

    name: str
    running: bool
    restarts: int
    last_error: str | None


@attrs.frozen
class SupervisorStatistics:
    """A snapshot of a supervisor.

    Attributes:
        name: The supervisor's name.
        strategy: Its restart strategy.
        children: Its children, in start order.
        restarts_in_window: Restarts counted against its intensity right now.
    """

    name: str
    strategy: Strategy
    children: tuple[ChildStatistics, ...]
    restarts_in_window: int


@attrs.define(eq=False)
class _Child:
    """A child as the supervisor tracks it across restarts."""

    spec: ChildSpec
    current: _Incarnation | None = None
    restarts: int = 0
    last_error: Exception | None = None


@attrs.define(eq=False)
class _Incarnation:
    """One run of a child's ``start``; it is also the ``task_status`` handed to that run."""

    child: _Child
    # A one_for_one restart's backoff, waited out in this run's own task before ``start``.
    delay_s: float = 0.0
    scope: anyio.CancelScope = attrs.field(factory=lambda: anyio.CancelScope(shield=True))
    has_started: bool = False
    # A start_child caller waits on this run: if it ends before starting, the failure is the
    # caller's to raise, not a crash for the supervisor to restart.
    caller_waits: bool = False
    # Set when the child called started() or ended, whichever comes first.
    settled: anyio.Event = attrs.field(factory=anyio.Event)
    exited: anyio.Event = attrs.field(factory=anyio.Event)
    error: Exception | None = None
    # Whether it ended because the supervisor cancelled it (stopped, terminated or restarted
    # with a sibling), as opposed to ending on its own.
    stopped: bool = False

    def started(self, value: None = None) -> None:
        if self.has_started:
            raise RuntimeError(f"child {self.child.spec.name!r} called task_status.started() twice")
        self.has_started = True
        self.settled.set()


@attrs.define(eq=False)
class _Running:
    """What exists only while :meth:`Supervisor.run` is running."""

    task_group: anyio.abc.TaskGroup
    exits: MemoryObjectSendStream[_Incarnation]
    finished: anyio.Event
    loop_scope: anyio.CancelScope = attrs.field(factory=anyio.CancelScope)
    closing: bool = False


@attrs.frozen
class _Escalation:
    child: str
    failures: int
    error: Exception | None


@attrs.define(eq=False)
class Supervisor:
    """Runs children and restarts them according to a strategy, Erlang/OTP style.

    Run it with ``await task_group.start(supervisor.run)``; a supervisor can be run again after
    its previous run ended, so ``ChildSpec(name, supervisor.run)`` nests it under another one.

    Attributes:
        name: Name used in statistics and errors.
        strategy: Which children are restarted when one of them is.
        children: Static children, started in this order by :meth:`run`.
        intensity: Restart rate limit and backoff.
    """

    name: str
    strategy: Strategy = Strategy.ONE_FOR_ONE
    children: Sequence[ChildSpec] = ()
    intensity: RestartIntensity = attrs.field(factory=RestartIntensity)
    _children: list[_Child] = attrs.field(factory=list[_Child], init=False)
    _restart_times: deque[float] = attrs.field(factory=deque[float], init=False)
    _running: _Running | None = attrs.field(default=None, init=False)
    #: The escalation the latest run ended with, if it ended with one.
    last_escalation: RMCPSupervisorError | None = attrs.field(default=None, init=False)

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Start the static children, then supervise them until stopped, cancelled or escalating.

        Args:
            task_status: Told ``started()`` once every static child has been started (a child
                whose start raised counts as crashed and is handled by the strategy).

        Raises:
            RMCPSupervisorError: A child needed more restarts than the intensity allows; every
                child has been stopped, ``actor`` names the child and ``__cause__`` is its last
                exception.
            ValueError: Two static children share a name.
            RuntimeError: The supervisor is already running.
        """
        if self._running is not None:
            raise RuntimeError(f"supervisor {self.name!r} is already running")
        children = [_Child(spec) for spec in self.children]
        names = [child.spec.name for child in children]
        if len(set(names)) != len(names):
            raise ValueError(f"supervisor {self.name!r}: duplicate child names in {names}")
        self._children = children
        self._restart_times.clear()
        self.last_escalation = None
        exits_send, exits_receive = anyio.create_memory_object_stream[_Incarnation](math.inf)
        finished = anyio.Event()
        escalation: _Escalation | None = None
        try:
            async with anyio.create_task_group() as task_group:
                running = self._running = _Running(task_group, exits_send, finished)
                try:
                    with running.loop_scope:
                        for child in children:
                            await self._start(running, child)
                        task_status.started()
                        escalation = await self._supervise(running, exits_receive)
                finally:
                    running.closing = True
                    # Cancelled or not, the children must be stopped in order before we leave.
                    with anyio.CancelScope(shield=True):
                        await self._stop_all()
        finally:
            self._running = None
            exits_send.close()
            exits_receive.close()
            finished.set()
        if escalation is not None:
            message = (
                f"supervisor {self.name!r}: child {escalation.child!r} failed {escalation.failures} times "
                f"in {self.intensity.period_s} s (max_restarts={self.intensity.max_restarts}); "
                "all children stopped"
            )
            error = RMCPSupervisorError(message, actor=escalation.child)
            # Kept, because a parent stopping this supervisor at the same moment would drop it.
            self.last_escalation = error
            raise error from escalation.error

    async def start_child(self, spec: ChildSpec) -> None:
        """Add a child while the supervisor runs and wait until it has started.

        If the caller is cancelled before the child has started, the child is stopped and removed.

        Args:
            spec: The child to start; its name must not be in use.

        Raises:
            Exception: What the child's ``start`` raised before calling ``task_status.started()``;
                the child is removed and the supervisor keeps running.
            RuntimeError: The child's ``start`` returned without calling ``task_status.started()``.
            RMCPSupervisorError: The supervisor is not running, or stopped before the child started.
            ValueError: A child with that name exists.
        """
        running = self._running
        if running is None or running.closing:
            raise RMCPSupervisorError(f"supervisor {self.name!r} is not running", actor=spec.name)
        if any(child.spec.name == spec.name for child in self._children):
            raise ValueError(f"supervisor {self.name!r} already has a child named {spec.name!r}")
        child = _Child(spec)
        self._children.append(child)
        incarnation = self._spawn(running, child, caller_waits=True)
        try:
            await incarnation.settled.wait()
        except BaseException:
            # The caller is leaving (cancelled) and takes the child along, even one that
            # started in the same instant: stopped, never left running unowned.
            self._forget(child)
            with anyio.CancelScope(shield=True):
                await self._stop([child])
            raise
        if incarnation.has_started:
            return
        # A child that never started belongs to the caller's failure, not to the supervisor:
        # it is neither kept nor restarted.
        self._forget(child)
        # Still being a child proves nothing (a ONE_FOR_ALL restart stops it and keeps it):
        # only our cancel of its scope says the supervisor, not the child, ended it.
        if incarnation.stopped or (running.closing and incarnation.error is None):
            raise RMCPSupervisorError(
                f"supervisor {self.name!r} stopped child {spec.name!r} before it started (the "
                "supervisor stopping, the child terminated, or a sibling's restart); start it again",
                actor=spec.name,
            ) from incarnation.error
        if incarnation.error is not None:
            raise incarnation.error
        raise RuntimeError(f"child {spec.name!r} returned without calling task_status.started()")

    async def terminate_child(self, name: str, *, spec: ChildSpec | None = None) -> None:
        """Stop a child and remove it; it is not restarted.

        Args:
            name: The child's name.
            spec: Stop the child only if it was started from this very spec: an owner cleaning
                up after itself must not stop a newer child that has taken the name since.

        Raises:
            KeyError: No child has that name (or, with ``spec``, none started from it).
        """
        child = next(
            (
                child
                for child in self._children
                if child.spec.name == name and (spec is None or child.spec is spec)
            ),
            None,
        )
        if child is None:
            raise KeyError(name)
        self._children.remove(child)
        await self._stop([child])

    async def stop(self) -> None:
        """Stop every child and make :meth:`run` return normally.

        Under ``ONE_FOR_ONE`` the children are stopped together, each waited on for at most its
        ``shutdown_timeout_s``; under the other strategies one by one in reverse start order,
        each waited on for at most its ``shutdown_timeout_s`` before the next one is stopped.
        Returns once :meth:`run` has returned; at once if it is not running.
        """
        running = self._running
        if running is None:
            return
        running.loop_scope.cancel()
        await running.finished.wait()

    def statistics(self) -> SupervisorStatistics:
        """Return a snapshot of the supervisor and its children.

        Returns:
            The supervisor's name, strategy, children in start order and restarts in the window.
        """
        if self._restart_times:
            self._prune_window(anyio.current_time())
        return SupervisorStatistics(
            name=self.name,
            strategy=self.strategy,
            children=tuple(
                ChildStatistics(
                    name=child.spec.name,
                    running=child.current is not None
                    and child.current.has_started
                    and not child.current.exited.is_set(),
                    restarts=child.restarts,
                    last_error=None
                    if child.last_error is None
                    else f"{type(child.last_error).__name__}: {child.last_error}",
                )
                for child in self._children
            ),
            restarts_in_window=len(self._restart_times),
        )

    async def _supervise(
        self, running: _Running, exits: MemoryObjectReceiveStream[_Incarnation]
    ) -> _Escalation | None:
        async for incarnation in exits:
            child = incarnation.child
            # A child already stopped, terminated or restarted by then is no longer ours to handle.
            if child.current is incarnation and child in self._children:
                escalation = await self._on_exit(running, incarnation)
                if escalation is not None:
                    return escalation

    async def _on_exit(self, running: _Running, incarnation: _Incarnation) -> _Escalation | None:
        child = incarnation.child
        child.current = None
        restart = child.spec.restart
        if restart is Restart.TEMPORARY or (restart is Restart.TRANSIENT and incarnation.error is None):
            self._children.remove(child)
            return None
        now = anyio.current_time()
        self._prune_window(now)
        earlier_restarts = len(self._restart_times)
        self._restart_times.append(now)
        if len(self._restart_times) > self.intensity.max_restarts:
            return _Escalation(child.spec.name, len(self._restart_times), incarnation.error)
        # Capping the exponent keeps 2**n a finite float however large max_restarts is.
        ceiling = self.intensity.backoff_base_s * 2.0 ** min(earlier_restarts, 64)
        delay_s = random.uniform(0, min(self.intensity.backoff_max_s, ceiling))
        if self.strategy is Strategy.ONE_FOR_ONE:
            # Independent children restart independently: the backoff and the start run in the
            # new incarnation's own task, so this loop goes on to the next exit at once and a
            # slow start never keeps a crashed sibling down. Stopping or terminating the child
            # during its backoff cancels that incarnation like any other.
            child.restarts += 1
            self._spawn(running, child, delay_s=delay_s)
            return None

        if self.strategy is Strategy.ONE_FOR_ALL:
            affected = list(self._children)
        else:
            affected = self._children[self._children.index(child) :]
        await self._stop(reversed(affected))
        for sibling in affected:
            if sibling.spec.restart is Restart.TEMPORARY:
                self._forget(sibling)
        # A group restarts as a group: its exits wait here, as later members may depend on
        # earlier ones being up.
        await anyio.sleep(delay_s)
        for sibling in affected:
            # No lock is held across the stop, the backoff or a start (a starting child may
            # call start_child): a sibling terminated meanwhile is no longer ours to restart.
            if sibling in self._children and sibling.current is None:
                sibling.restarts += 1
                await self._start(running, sibling)
        return None

    def _forget(self, child: _Child) -> None:
        """Remove ``child`` if it is still a child."""
        if child in self._children:
            self._children.remove(child)

    def _prune_window(self, now: float) -> None:
        while self._restart_times and self._restart_times[0] <= now - self.intensity.period_s:
            self._restart_times.popleft()

    async def _start(self, running: _Running, child: _Child) -> None:
        # Whether it started or ended first, an ended child is reported through the exit stream.
        await self._spawn(running, child).settled.wait()

    def _spawn(
        self, running: _Running, child: _Child, *, caller_waits: bool = False, delay_s: float = 0.0
    ) -> _Incarnation:
        incarnation = _Incarnation(child, delay_s=delay_s, caller_waits=caller_waits)
        child.current = incarnation
        running.task_group.start_soon(
            self._run_incarnation, incarnation, running.exits, name=f"{self.name}/{child.spec.name}"
        )
        return incarnation

    async def _run_incarnation(
        self, incarnation: _Incarnation, exits: MemoryObjectSendStream[_Incarnation]
    ) -> None:
        try:
            # The shielded scope absorbs the only cancellation that can reach the child: ours.
            with incarnation.scope:
                if incarnation.delay_s:
                    await anyio.sleep(incarnation.delay_s)
                await incarnation.child.spec.start(task_status=incarnation)
        except Exception as exc:
            error = _sole_exception(exc)
            incarnation.error = error
            incarnation.child.last_error = error
        finally:
            incarnation.stopped = incarnation.scope.cancel_called
            incarnation.exited.set()
            incarnation.settled.set()
        if not incarnation.stopped and (incarnation.has_started or not incarnation.caller_waits):
            exits.send_nowait(incarnation)

    async def _stop_all(self) -> None:
        if self.strategy is not Strategy.ONE_FOR_ONE:
            await self._stop(reversed(self._children))
            return
        stopping: list[tuple[_Child, _Incarnation, float]] = []
        now = anyio.current_time()
        for child in reversed(self._children):
            incarnation = child.current
            if incarnation is not None:
                incarnation.scope.cancel()
                stopping.append((child, incarnation, now + child.spec.shutdown_timeout_s))
        # Waiting for each in turn costs the slowest: they all stop at the same time.
        for child, incarnation, deadline in stopping:
            with anyio.move_on_at(deadline):
                await incarnation.exited.wait()
            child.current = None

    async def _stop(self, children: Iterable[_Child]) -> None:
        for child in children:
            incarnation = child.current
            if incarnation is None:
                continue
            incarnation.scope.cancel()
            with anyio.move_on_after(child.spec.shutdown_timeout_s):
                await incarnation.exited.wait()
            child.current = None


def _sole_exception(exc: Exception) -> Exception:
    """Unwrap an exception group holding one exception: an actor's own nursery adds the group,
    while the failure a reader of the escalation wants to see is the one inside."""
    while True:
        inner = _group_members(exc)
        if len(inner) != 1:
            return exc
        exc = inner[0]


def _group_members(exc: Exception) -> tuple[Exception, ...]:
    if isinstance(exc, ExceptionGroup):
        return cast("ExceptionGroup[Exception]", exc).exceptions
    return ()
