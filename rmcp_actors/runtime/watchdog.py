"""The watchdog: reports stalls, and asks owners that went silent whether they hung.

Work in flight is tracked per *owner* (a server) in an :class:`InFlight`: the call path adds
its call when it starts and removes it when it ends, a dict insert and a delete plus one
counter, with no task switch and no clock read. Everything else happens in the watchdog's own
task, on a timer (every ``stall_s / 4``), off the call path:

- **Stall**: work is in flight and no call has completed for ``stall_s``. The watchdog logs
  a :class:`StallReport` (logger ``rmcp_actors.watchdog``, WARNING): the oldest calls with
  their ages, owners that went silent, and the statistics of every registered component
  (lanes, limiters, breakers, actors and their pending asks), then calls ``on_stall``. It
  reports again every ``stall_s`` while the stall lasts, and logs (INFO) when it ends.
- **Silent owner**: an owner with work in flight whose activity counter (messages received,
  plus calls completed) has not moved for ``stall_s``. With ``restart_hung`` the watchdog
  tells it through :meth:`Liveness.suspect_hung` (it must not wait); the owner checks for
  itself (a connection pings its server with a bounded timeout) and restarts what hung. The
  watchdog asks again at most once per ``stall_s``.

Who waits for whom: components with a wait-for graph (the transactions' lock manager) register
a provider of its edges with :meth:`WorkRegistry.track_waits`; a report lists every edge, so a
stall caused by a resource held too long shows the holder and its waiters.

The module knows no MCP: what an owner is, and how it checks itself, is the caller's.
"""

from __future__ import annotations

import enum
import itertools
import logging
from collections.abc import Callable, Iterable
from typing import Protocol, cast, final

import anyio
import anyio.abc
import attrs

from .actor import Actor, ActorStatistics, ReplySlot
from .health import ComponentHealth, ComponentRegistry

__all__ = [
    "CheckNow",
    "InFlight",
    "Liveness",
    "StallReport",
    "Tracked",
    "WaitEdge",
    "Watchdog",
    "WatchdogStatistics",
    "WorkItem",
    "WorkRegistry",
]

_logger = logging.getLogger("rmcp_actors.watchdog")

# Calls shown in a report: enough to see a pattern, few enough to read.
_OLDEST_SHOWN = 10


@final
@attrs.frozen
class WorkItem:
    """One call in flight, as a stall report shows it.

    Attributes:
        key: Its request id.
        owner: The server it is for.
        what: The tool it calls.
        state: Its latest lifecycle step (``queued``, ``sent``, ``acked``...).
        age_s: How long ago it started.
        attempts: Attempts made so far.
    """

    key: str
    owner: str
    what: str
    state: str
    age_s: float
    attempts: int = 0

    def describe(self) -> str:
        """One readable line."""
        return (
            f"{self.owner}/{self.what} request {self.key}: {self.state}, "
            f"age {self.age_s:.1f} s, {self.attempts} attempt(s)"
        )


@final
@attrs.frozen
class WaitEdge:
    """One edge of a wait-for graph: ``waiter`` cannot go on until ``holder`` lets go of ``resource``.

    Attributes:
        waiter: Who waits (a transaction, as its owner names it).
        holder: Whom it waits for: a holder of the resource, or a waiter queued ahead of it.
        resource: What it waits on.
        detail: How it asked (``"exclusive"``, ``"shared"``...).
        age_s: How long it has waited.
    """

    waiter: str
    holder: str
    resource: str
    detail: str
    age_s: float

    def describe(self) -> str:
        """One readable line."""
        return (
            f"{self.waiter} waits for {self.holder} on {self.resource} ({self.detail}), "
            f"for {self.age_s:.1f} s"
        )


class Tracked(Protocol):
    """A unit of work an :class:`InFlight` holds (the call path's per-call record)."""

    def work_item(self, owner: str, now: float) -> WorkItem:
        """Describe the work for a report; called only when one is being made."""
        ...


class Liveness(Protocol):
    """What an owner shows the watchdog of its life (a connection, for a server)."""

    def activity(self) -> int:
        """A counter that moves whenever the owner shows life (a message received); read once
        per watchdog tick, so it must be an attribute read or close to it."""
        ...

    def suspect_hung(self, silent_s: float) -> None:
        """The owner showed no activity for ``silent_s`` while work waited on it: check, and
        restart whatever hung. Must not wait (send the check to an actor's inbox)."""
        ...


@final
class InFlight:
    """The calls in flight to one owner, and how many have completed.

    :meth:`begin` and :meth:`end` around a call are the call path's only cost: a dict insert,
    a delete and an increment (plain calls in a ``try``/``finally``; a context manager costs
    five times as much). Insertion order is start order, so the oldest calls come first.
    """

    __slots__ = ("_calls", "completed", "liveness", "owner")

    def __init__(self, owner: str, liveness: Liveness | None = None) -> None:
        self.owner = owner
        self.liveness = liveness
        self.completed = 0
        self._calls: dict[Tracked, None] = {}

    def begin(self, work: Tracked) -> None:
        """Record that ``work`` started; pair it with :meth:`end` in a ``finally``."""
        self._calls[work] = None

    def end(self, work: Tracked) -> None:
        """Record that ``work`` ended."""
        del self._calls[work]
        self.completed += 1

    def __len__(self) -> int:
        return len(self._calls)

    def oldest(self, now: float, limit: int) -> list[WorkItem]:
        """Describe the ``limit`` oldest calls, oldest first."""
        return [work.work_item(self.owner, now) for work in itertools.islice(self._calls, limit)]


@final
@attrs.define(eq=False)
class WorkRegistry:
    """The owners whose work the watchdog watches: a shared synchronous structure, written by
    whoever adds and removes servers, read by the watchdog on its timer."""

    _owners: dict[InFlight, None] = attrs.field(factory=dict[InFlight, None], init=False)
    _waits: dict[object, Callable[[], Iterable[WaitEdge]]] = attrs.field(
        factory=dict[object, Callable[[], Iterable[WaitEdge]]], init=False
    )

    def track(self, owner: str, liveness: Liveness | None = None) -> InFlight:
        """Start watching a new owner; the call path records its calls in the result.

        Args:
            owner: Its name (a server's).
            liveness: How to see whether it is alive and ask it to check itself; ``None`` for
                an owner that cannot hang on its own.
        """
        in_flight = InFlight(owner, liveness)
        self._owners[in_flight] = None
        return in_flight

    def untrack(self, in_flight: InFlight) -> None:
        """Stop watching an owner (removed); idempotent."""
        self._owners.pop(in_flight, None)

    def owners(self) -> tuple[InFlight, ...]:
        """The owners watched, in the order they were added."""
        return tuple(self._owners)

    def track_waits(self, edges: Callable[[], Iterable[WaitEdge]]) -> Callable[[], None]:
        """Show a wait-for graph in stall reports.

        Args:
            edges: Returns the graph's edges now; called only when a report is made, in the
                watchdog's task, so it must not wait.

        Returns:
            Stops showing it; idempotent.
        """
        token = object()
        self._waits[token] = edges

        def untrack() -> None:
            self._waits.pop(token, None)

        return untrack

    def waits(self) -> tuple[WaitEdge, ...]:
        """Every registered graph's edges, oldest wait first. A provider that raises is logged
        and left out: a component's bug must not stop the watchdog."""
        found: list[WaitEdge] = []
        for edges in list(self._waits.values()):
            try:
                found.extend(edges())
            except Exception:
                _logger.exception("a wait-for graph provider raised")
        found.sort(key=lambda edge: edge.age_s, reverse=True)
        return tuple(found)


@final
@attrs.frozen
class StallReport:
    """What the watchdog saw when work stopped completing.

    Attributes:
        at: The runtime clock at the report.
        stalled_for_s: How long no call has completed while calls were in flight.
        in_flight: Calls in flight, in all.
        oldest: The oldest calls in flight, oldest first.
        silent: Owners with calls waiting on them that showed no activity for ``stall_s``,
            with how long (seconds).
        components: Every registered component's statistics and status: who waits on what.
        waits: The edges of the registered wait-for graphs (transactions waiting for
            resources), oldest wait first.
    """

    at: float
    stalled_for_s: float
    in_flight: int
    oldest: tuple[WorkItem, ...]
    silent: tuple[tuple[str, float], ...]
    components: tuple[ComponentHealth, ...]
    waits: tuple[WaitEdge, ...] = ()

    def describe(self) -> str:
        """The report as readable lines, as the watchdog logs it."""
        lines = [
            f"stall: no call completed for {self.stalled_for_s:.1f} s while {self.in_flight} "
            "call(s) are in flight",
            "oldest calls:",
        ]
        lines.extend(f"  {item.describe()}" for item in self.oldest)
        if len(self.oldest) < self.in_flight:
            lines.append(f"  ... and {self.in_flight - len(self.oldest)} more")
        if self.silent:
            lines.append("silent (no message received while calls wait on it):")
            lines.extend(f"  {owner} for {silent_s:.1f} s" for owner, silent_s in self.silent)
        if self.waits:
            lines.append("waits for (who waits for whom):")
            lines.extend(f"  {edge.describe()}" for edge in self.waits)
        if self.components:
            lines.append("components:")
            for component in self.components:
                why = f": {component.reason}" if component.reason else ""
                lines.append(
                    f"  {component.kind} {component.name} [{component.status.value}{why}] "
                    f"{_format_statistics(component.statistics)}"
                )
        return "\n".join(lines)


@final
@attrs.frozen
class WatchdogStatistics(ActorStatistics):
    """A snapshot of the watchdog.

    Attributes:
        stall_s: The configured stall threshold.
        stalled: Whether a stall is being reported now.
        stalled_for_s: How long no call has completed while calls were in flight (0 when
            not stalled), as of the latest check.
        stalls: Stalls reported so far (a stall that lasts counts once).
        in_flight: Calls in flight at the latest check.
        completed: Calls completed in all, at the latest check.
        hung_checks: Times an owner was asked to check whether it hung.
        last_report: The latest stall report, kept after the stall ended.
    """

    stall_s: float
    stalled: bool
    stalled_for_s: float
    stalls: int
    in_flight: int
    completed: int
    hung_checks: int
    last_report: StallReport | None


@final
@attrs.frozen
class CheckNow:
    """Ask the watchdog to check at once (not waiting for its timer); the reply is the current
    stall report, or ``None`` when nothing is stalled."""

    reply: ReplySlot[StallReport | None]


@attrs.define(eq=False)
class _OwnerMark:
    activity: int
    quiet_since: float
    checked_at: float | None = None


@final
@attrs.define(eq=False)
class Watchdog(Actor[CheckNow]):
    """The actor that watches work in flight (see the module docstring).

    Attributes:
        work: The owners and their calls in flight.
        components: Whose statistics a report shows.
        stall_s: How long without a completion (or without any sign of life from an owner)
            counts as a stall (or as silent); checked every ``stall_s / 4``.
        restart_hung: Whether silent owners are asked to check whether they hung.
        on_stall: Called with each report, in the watchdog's task; it must not wait. An
            exception it raises is logged and changes nothing.
    """

    work: WorkRegistry
    components: ComponentRegistry
    stall_s: float = attrs.field(default=30.0, kw_only=True)
    restart_hung: bool = attrs.field(default=True, kw_only=True)
    on_stall: Callable[[StallReport], None] | None = attrs.field(default=None, kw_only=True)
    _marks: dict[InFlight, _OwnerMark] = attrs.field(factory=dict[InFlight, _OwnerMark], init=False)
    _completed: int = attrs.field(default=0, init=False)
    _calls_in_flight: int = attrs.field(default=0, init=False)
    _progress_at: float | None = attrs.field(default=None, init=False)
    _checked_at: float = attrs.field(default=0.0, init=False)
    _stalled: bool = attrs.field(default=False, init=False)
    _next_report_at: float = attrs.field(default=0.0, init=False)
    _stalls: int = attrs.field(default=0, init=False)
    _hung_checks: int = attrs.field(default=0, init=False)
    _last_report: StallReport | None = attrs.field(default=None, init=False)

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve :class:`CheckNow` requests and check every ``stall_s / 4``, until cancelled."""
        async with anyio.create_task_group() as task_group:
            await task_group.start(super().run)
            self._check(anyio.current_time())
            task_status.started()
            while True:
                await anyio.sleep(self.stall_s / 4)
                self._check(anyio.current_time())

    async def handle(self, message: CheckNow) -> None:
        """Check now and answer with the current stall report (or ``None``)."""
        report = self._check(anyio.current_time())
        message.reply.set(report)

    def statistics(self) -> WatchdogStatistics:
        """Return a snapshot of the watchdog: thresholds, counters and the latest report."""
        inbox = super().statistics()
        return WatchdogStatistics(
            name=self.name,
            inbox_used=inbox.inbox_used,
            inbox_size=inbox.inbox_size,
            pending_asks=inbox.pending_asks,
            oldest_ask_s=inbox.oldest_ask_s,
            stall_s=self.stall_s,
            stalled=self._stalled,
            stalled_for_s=self._checked_at - self._progress_at
            if self._stalled and self._progress_at is not None
            else 0.0,
            stalls=self._stalls,
            in_flight=self._calls_in_flight,
            completed=self._completed,
            hung_checks=self._hung_checks,
            last_report=self._last_report,
        )

    def _check(self, now: float) -> StallReport | None:
        self._checked_at = now
        owners = self.work.owners()
        in_flight = completed = 0
        silent: list[tuple[InFlight, float]] = []
        for owner in owners:
            waiting = len(owner)
            in_flight += waiting
            completed += owner.completed
            activity = owner.completed + (owner.liveness.activity() if owner.liveness is not None else 0)
            mark = self._marks.get(owner)
            if mark is None or mark.activity != activity or not waiting:
                self._marks[owner] = _OwnerMark(activity, now)
            elif now - mark.quiet_since >= self.stall_s:
                silent.append((owner, now - mark.quiet_since))
        for gone in self._marks.keys() - set(owners):
            del self._marks[gone]
        progressed = completed != self._completed
        self._completed, self._calls_in_flight = completed, in_flight
        if self._progress_at is None or progressed or not in_flight:
            if self._stalled:
                _logger.info("stall over: calls complete again (%d in flight)", in_flight)
            self._stalled = False
            self._progress_at = now
        if self.restart_hung:
            for owner, silent_s in silent:
                self._ask_if_hung(owner, silent_s, now)
        if now - self._progress_at < self.stall_s:
            return None
        first = not self._stalled
        if first:
            self._stalled = True
            self._stalls += 1
        # Built after the state changed, so the watchdog's own line in it is current.
        report = self._report(now, owners, silent)
        if first or now >= self._next_report_at:
            self._publish(report, now)
        return report

    def _ask_if_hung(self, owner: InFlight, silent_s: float, now: float) -> None:
        mark = self._marks[owner]
        if owner.liveness is None or (mark.checked_at is not None and now - mark.checked_at < self.stall_s):
            return
        mark.checked_at = now
        self._hung_checks += 1
        _logger.warning(
            "%s showed no sign of life for %.1f s while %d call(s) waited on it: checking whether it hung",
            owner.owner,
            silent_s,
            len(owner),
        )
        try:
            owner.liveness.suspect_hung(silent_s)
        except Exception:
            # A component's bug must not stop the watchdog (the root restarts nothing).
            _logger.exception("checking whether %s hung failed", owner.owner)

    def _report(
        self, now: float, owners: tuple[InFlight, ...], silent: list[tuple[InFlight, float]]
    ) -> StallReport:
        assert self._progress_at is not None
        # Each owner's calls are in start order: the oldest overall are among each one's first.
        candidates = [item for owner in owners for item in owner.oldest(now, _OLDEST_SHOWN)]
        candidates.sort(key=lambda item: item.age_s, reverse=True)
        return StallReport(
            at=now,
            stalled_for_s=now - self._progress_at,
            in_flight=self._calls_in_flight,
            oldest=tuple(candidates[:_OLDEST_SHOWN]),
            silent=tuple((owner.owner, silent_s) for owner, silent_s in silent),
            components=self.components.snapshot(),
            waits=self.work.waits(),
        )

    def _publish(self, report: StallReport, now: float) -> None:
        self._last_report = report
        self._next_report_at = now + self.stall_s
        _logger.warning("%s", report.describe())
        if self.on_stall is not None:
            try:
                self.on_stall(report)
            except Exception:
                _logger.exception("the on_stall callback raised")


def _format_statistics(statistics: object) -> str:
    """``field=value`` pairs of an attrs snapshot (its name left out: the line already says it)."""
    if not attrs.has(type(statistics)):
        return repr(statistics)
    return ", ".join(
        f"{field.name}={_format_value(getattr(statistics, field.name))}"
        for field in attrs.fields(type(statistics))
        if field.name not in ("name", "last_report")
    )


def _format_value(value: object) -> str:
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, tuple):
        items = cast("tuple[object, ...]", value)
        if items and attrs.has(type(items[0])):
            # Nested snapshots (a scheduler's lanes): each with its own name.
            return (
                "["
                + "; ".join(f"{getattr(item, 'name', '?')}: {_format_statistics(item)}" for item in items)
                + "]"
            )
    return repr(cast(object, value))
