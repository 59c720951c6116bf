"""Admission: fair, prioritised queues in front of global, per-server and per-tool concurrency limits.

The scheduler is a synchronous state machine shared by the callers, in the manner of
``trio.CapacityLimiter``, not an actor with an inbox: a call that finds a free slot is
admitted with no task switch at all, and a freed slot is handed straight to the best waiter
(baton passing), so a queued call costs one wake-up. An inbox hop per call would cost more
than the whole overhead budget (see docs/design.md).

Who goes next, among the calls waiting on a lane:

1. The priority level whose oldest waiter has the highest *effective* priority: its priority
   plus one level per ``priority_aging_s`` it has waited (ties: the older first), so a steady
   stream of urgent calls cannot starve the others.
2. Within that level, the tenant with the smallest pass (stride scheduling): each admission
   advances its tenant's pass by ``1 / weight``, so backlogged tenants are admitted in
   proportion to their weights and a tenant with ten calls is not stuck behind one with a
   thousand.
3. Within the tenant, FIFO by ticket (a call sent back to the queue keeps its place).

Levels and tenants exist only while they have waiters, so memory follows the calls waiting,
never the number of distinct tenant names or priorities ever seen.

A call made while another call holds its slots (a tool of an in-process server calling back
into the runtime from the caller's task) can find every slot of a lane it needs held by the
calls it is nested in: those wait for it, so it would wait forever. The call path records the
slots it holds in :data:`current_holding`; before queueing, the scheduler checks that chain and
raises :class:`~rmcp_actors.RMCPDeadlockError` instead.
"""

from __future__ import annotations

import collections
import heapq
import itertools
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from typing import Literal, NoReturn, final

import anyio
import anyio.lowlevel
import attrs
import trio
import trio.lowlevel

from ..errors import RMCPDeadlockError, RMCPOverloadedError

__all__ = [
    "Holding",
    "Lane",
    "LaneStatistics",
    "Scheduler",
    "SchedulerStatistics",
    "current_holding",
]


@final
class Holding:
    """The slots one call holds while its work runs: a link in the chain of nested calls.

    The call path sets :data:`current_holding` to one of these (``parent`` being the value it
    replaces) for as long as the call holds its slots, and clears ``active`` when it releases
    them, so a task that outlives the call (it inherited the context) no longer counts it.
    """

    __slots__ = ("active", "lane", "parent", "tool", "tool_lane")

    def __init__(self, lane: Lane, tool_lane: Lane | None, tool: str, parent: Holding | None) -> None:
        self.lane = lane
        self.tool_lane = tool_lane
        self.tool = tool
        self.parent = parent
        self.active = True


#: The slots held by the call whose work is running in this context, if any (see :class:`Holding`).
current_holding: ContextVar[Holding | None] = ContextVar("rmcp_actors_current_holding", default=None)


@attrs.define(eq=False)
class _Waiter:
    sequence: int
    queued_at: float
    lane: Lane
    queue: _TenantQueue
    granted: bool = False
    abandoned: bool = False
    # While the call waits: its task, parked (trio), or the event it waits on (other backends).
    # Not an anyio.Event per waiter: under trio that is an Event, a ParkingLot, an OrderedDict
    # and three coroutines, about 0.7 KB for each call in the queue (docs/design.md).
    _task: trio.lowlevel.Task | None = None
    _event: anyio.Event | None = None

    def __lt__(self, other: _Waiter) -> bool:
        # Within one tenant and priority: FIFO by ticket.
        return self.sequence < other.sequence

    async def wait(self) -> None:
        """Wait until :meth:`wake` (a checkpoint: a cancellation ends the wait)."""
        try:
            task = trio.lowlevel.current_task()
        except RuntimeError:
            # Not under trio.
            self._event = anyio.Event()
            await self._event.wait()
            return
        self._task = task
        await trio.lowlevel.wait_task_rescheduled(self._abort)

    def wake(self) -> None:
        """End the wait (the waiter is parked: it waits from the moment it is queued)."""
        task, self._task = self._task, None
        if task is not None:
            trio.lowlevel.reschedule(task)
        elif self._event is not None:
            self._event.set()

    def _abort(self, _: Callable[[], NoReturn]) -> trio.lowlevel.Abort:
        self._task = None
        return trio.lowlevel.Abort.SUCCEEDED


@attrs.define(eq=False)
class _TenantQueue:
    """One tenant's waiters at one priority level, and its turn in the level's rotation."""

    tenant: str | None
    level: _Level
    stride: float
    pass_: float
    order: int
    waiters: list[_Waiter] = attrs.Factory(list[_Waiter])
    live: int = 0
    dropped: bool = False

    def __lt__(self, other: _TenantQueue) -> bool:
        return (self.pass_, self.order) < (other.pass_, other.order)

    def pop(self) -> _Waiter:
        waiters = self.waiters
        while True:
            waiter = heapq.heappop(waiters)
            if not waiter.abandoned:
                self.live -= 1
                return waiter

    def compact(self) -> None:
        # Removing from the middle of a heap costs a search: entries of calls that left are
        # only marked, and the heap is rebuilt once they are the majority (amortised O(1)).
        if 2 * self.live < len(self.waiters):
            self.waiters[:] = [waiter for waiter in self.waiters if not waiter.abandoned]
            heapq.heapify(self.waiters)


@attrs.define(eq=False)
class _Level:
    """The waiters of one priority on one lane: tenants in rotation, and arrival order for aging."""

    priority: int
    tenants: dict[str | None, _TenantQueue] = attrs.Factory(dict[str | None, _TenantQueue])
    # Tenants by pass (stride scheduling); dropped ones are skipped lazily.
    turns: list[_TenantQueue] = attrs.Factory(list[_TenantQueue])
    # Every waiter in the order it queued, admitted and abandoned ones until they are skipped:
    # the first still waiting is the level's oldest, which its aging is measured by.
    arrivals: collections.deque[_Waiter] = attrs.Factory(collections.deque[_Waiter])
    live: int = 0
    # The pass of the tenant served last: where a tenant joining the rotation starts.
    clock: float = 0.0
    joined: int = 0

    def oldest(self) -> _Waiter:
        arrivals = self.arrivals
        while arrivals[0].granted or arrivals[0].abandoned:
            arrivals.popleft()
        return arrivals[0]

    def compact(self) -> None:
        if 2 * self.live < len(self.arrivals):
            self.arrivals = collections.deque(
                waiter for waiter in self.arrivals if not (waiter.granted or waiter.abandoned)
            )
        if 2 * len(self.tenants) < len(self.turns):
            self.turns[:] = [queue for queue in self.turns if not queue.dropped]
            heapq.heapify(self.turns)


def _no_lanes() -> dict[str, Lane]:
    return {}


@final
@attrs.define(eq=False)
class Lane:
    """The admission state of one server, or of one tool inside it: its limit and its waiters.

    Attributes:
        name: The server's name (``server/tool`` for a tool lane).
        max_concurrency: Calls admitted at once.
        running: Calls holding a slot now.
        peak_running: The most calls that ever held a slot at once.
        queued: Calls waiting for a slot (calls that gave up are not counted).
        retired: The server was removed; the lane goes once no call runs or waits on it.
        tools: The lanes of the server's tools that have their own ``max_concurrency``.
    """

    name: str
    max_concurrency: int
    running: int = 0
    peak_running: int = 0
    queued: int = 0
    retired: bool = False
    tools: dict[str, Lane] = attrs.Factory(_no_lanes)
    _levels: dict[int, _Level] = attrs.Factory(dict[int, _Level])

    def footprint(self) -> int:
        """Entries this lane keeps for waiting calls, including some of calls that already left.

        Entries of calls that were admitted or gave up are freed lazily, but never outnumber
        the calls still waiting by more than about two to one, however long the lane stays
        saturated and however many tenants come and go.
        """
        return sum(
            len(level.arrivals)
            + len(level.turns)
            + sum(len(queue.waiters) for queue in level.tenants.values())
            for level in self._levels.values()
        )

    def push(self, priority: int, tenant: str | None, weight: float, sequence: int, now: float) -> _Waiter:
        """Queue a call (the scheduler's slow path); ``weight`` is its tenant's share."""
        level = self._levels.get(priority)
        if level is None:
            level = self._levels[priority] = _Level(priority)
        queue = level.tenants.get(tenant)
        if queue is None:
            # A tenant joins the rotation where it stands now: no credit for the time it had
            # nothing waiting (and none to remember once it leaves).
            level.joined += 1
            queue = level.tenants[tenant] = _TenantQueue(
                tenant, level, 1.0 / weight, level.clock, level.joined
            )
            heapq.heappush(level.turns, queue)
        waiter = _Waiter(sequence, now, self, queue)
        heapq.heappush(queue.waiters, waiter)
        level.arrivals.append(waiter)
        queue.live += 1
        level.live += 1
        self.queued += 1
        return waiter

    def best(self, now: float, aging_s: float) -> tuple[float, float, _Level]:
        """The level to serve next, with its oldest waiter's effective priority and queue time."""
        best: tuple[float, float, _Level] | None = None
        for level in self._levels.values():
            queued_at = level.oldest().queued_at
            effective = level.priority + (now - queued_at) / aging_s
            if best is None or effective > best[0] or (effective == best[0] and queued_at < best[1]):
                best = (effective, queued_at, level)
        assert best is not None  # only called with waiters
        return best

    def pop(self, level: _Level) -> _Waiter:
        """Take the next waiter of ``level``: the tenant whose turn it is, FIFO within it."""
        while True:
            queue = heapq.heappop(level.turns)
            if not queue.dropped:
                break
        level.clock = queue.pass_
        waiter = queue.pop()
        waiter.granted = True
        queue.pass_ += queue.stride
        if queue.live:
            heapq.heappush(level.turns, queue)
        else:
            queue.dropped = True
            del level.tenants[queue.tenant]
        self._left(level)
        return waiter

    def abandon(self, waiter: _Waiter) -> None:
        """Forget a waiter that gave up (deadline, cancel); its entries go lazily."""
        waiter.abandoned = True
        queue = waiter.queue
        level = queue.level
        queue.live -= 1
        queue.compact()
        if not queue.live:
            queue.dropped = True
            del level.tenants[queue.tenant]
        self._left(level)

    def _left(self, level: _Level) -> None:
        level.live -= 1
        self.queued -= 1
        if level.live:
            level.compact()
        else:
            del self._levels[level.priority]

    def statistics(self) -> LaneStatistics:
        """Return a snapshot of this lane and its tool lanes."""
        return LaneStatistics(
            name=self.name,
            max_concurrency=self.max_concurrency,
            running=self.running,
            peak_running=self.peak_running,
            queued=self.queued,
            tenants_waiting=len({tenant for level in self._levels.values() for tenant in level.tenants}),
            tools=tuple(tool.statistics() for tool in self.tools.values()),
        )


@final
@attrs.frozen
class LaneStatistics:
    """A snapshot of one server's (or tool's) admission state.

    Attributes:
        tenants_waiting: Distinct tenants with calls waiting on the lane.
        tools: The server's tool lanes (tools with their own ``max_concurrency``).
    """

    name: str
    max_concurrency: int
    running: int
    peak_running: int
    queued: int
    tenants_waiting: int = 0
    tools: tuple[LaneStatistics, ...] = ()


@final
@attrs.frozen
class SchedulerStatistics:
    """A snapshot of the scheduler: running and queued calls, in all and per server."""

    max_concurrency: int
    max_queue: int
    running: int
    queued: int
    waiting_for_queue_space: int
    lanes: tuple[LaneStatistics, ...]


@final
@attrs.define(eq=False)
class Scheduler:
    """Admits calls by priority and tenant share within global, per-server and per-tool limits.

    Args:
        max_concurrency: Calls running at once across all servers.
        max_queue: Calls waiting for admission at once, across all servers.
        overflow: What a call does when the queue is full: ``"wait"`` for space (backpressure)
            or ``"reject"`` with :class:`~rmcp_actors.RMCPOverloadedError`.
        tenants: Weight of each tenant (greater than 0); a tenant not listed, and calls with no
            tenant, weigh 1.
        priority_aging_s: A waiting call gains one priority level per this many seconds waited.
    """

    max_concurrency: int
    max_queue: int
    overflow: Literal["wait", "reject"] = "wait"
    tenants: Mapping[str, float] = attrs.Factory(dict[str, float])
    priority_aging_s: float = 5.0
    _running: int = 0
    _queued: int = 0
    _lanes: dict[str, Lane] = attrs.Factory(dict[str, Lane])
    _sequence: itertools.count[int] = attrs.Factory(itertools.count)
    _queue_space: list[anyio.Event] = attrs.Factory(list[anyio.Event])

    def lane(self, name: str, max_concurrency: int) -> Lane:
        """Return the lane of server ``name``, creating it (or updating its limit)."""
        lane = self._lanes.get(name)
        if lane is None:
            lane = self._lanes[name] = Lane(name, max_concurrency)
        else:
            lane.max_concurrency = max_concurrency
            lane.retired = False
            # The server added again under the name brings its own tool table: calls still on
            # the old tool lanes keep them until they leave, new calls use the new ones.
            lane.tools = {}
        return lane

    def tool_lane(self, lane: Lane, tool: str, max_concurrency: int) -> Lane:
        """Return the lane of ``tool`` inside server ``lane``, creating it (or updating its limit).

        A call to the tool needs a slot of both; it takes the tool's first. The tool lane lives
        in the server's lane and goes with it.
        """
        tool_lane = lane.tools.get(tool)
        if tool_lane is None:
            tool_lane = lane.tools[tool] = Lane(f"{lane.name}/{tool}", max_concurrency)
        else:
            tool_lane.max_concurrency = max_concurrency
        self._dispatch_tool(tool_lane)
        return tool_lane

    def retire(self, lane: Lane) -> None:
        """Forget ``lane`` (its server was removed) once no call runs or waits on it.

        Calls still on it keep their place and their slots until they leave, so a lane is
        never dropped under a caller; a server added again under the name before that reuses it.
        """
        lane.retired = True
        self._prune(lane)

    def ticket(self) -> int:
        """A place in line for one call: pass it to each of the call's :meth:`acquire`, so a
        call sent back to the queue (by a reconnect, a retry) keeps its place among equals."""
        return next(self._sequence)

    async def acquire(
        self,
        lane: Lane,
        priority: int = 0,
        ticket: int | None = None,
        tenant: str | None = None,
        tool_lane: Lane | None = None,
    ) -> float:
        """Wait for a slot on ``lane`` (and first on ``tool_lane``); pair it with :meth:`release`.

        ``ticket`` (from :meth:`ticket`) orders the call among waiters of its tenant and
        priority; without one it queues last.

        A call whose deadline has passed is never admitted: its cancel scope fires while it
        waits, and it leaves the queue.

        Returns:
            Seconds spent waiting (0.0 when a slot was free at once).

        Raises:
            RMCPOverloadedError: The queue is full and ``overflow = "reject"``.
            RMCPDeadlockError: Every slot of a lane the call needs is held by the calls it is
                nested in (see :data:`current_holding`), so it would wait forever.
        """
        await anyio.lowlevel.checkpoint_if_cancelled()
        if tool_lane is None:
            if (
                self._running < self.max_concurrency
                and lane.running < lane.max_concurrency
                and not lane.queued
            ):
                self._admit(lane)
                return 0.0
            return await self._wait(lane, priority, ticket, tenant, server=True)
        if tool_lane.running < tool_lane.max_concurrency and not tool_lane.queued:
            _admit_tool(tool_lane)
            waited = 0.0
        else:
            try:
                waited = await self._wait(tool_lane, priority, ticket, tenant, server=False)
            except BaseException:
                if lane.retired:
                    self._prune(lane)
                raise
        try:
            if (
                self._running < self.max_concurrency
                and lane.running < lane.max_concurrency
                and not lane.queued
            ):
                self._admit(lane)
                return waited
            return waited + await self._wait(lane, priority, ticket, tenant, server=True, holds_tool=True)
        except BaseException:
            self._release_tool(tool_lane)
            if lane.retired:
                self._prune(lane)
            raise

    def try_acquire(self, lane: Lane, tool_lane: Lane | None = None) -> bool:
        """Take a slot on ``lane`` (and on ``tool_lane``) if both are free now; never waits.

        The admission fast path of :meth:`acquire` without its cancellation check, for a
        caller that checks for cancellation itself before using the slot. A call that gets
        ``False`` has taken nothing and goes through :meth:`acquire`, where it queues.
        """
        if (
            self._running < self.max_concurrency
            and lane.running < lane.max_concurrency
            and not lane.queued
            and (
                tool_lane is None or (tool_lane.running < tool_lane.max_concurrency and not tool_lane.queued)
            )
        ):
            if tool_lane is not None:
                _admit_tool(tool_lane)
            self._admit(lane)
            return True
        return False

    def release(self, lane: Lane, tool_lane: Lane | None = None) -> None:
        """Give back the slots taken by :meth:`acquire` and hand them to the best waiters."""
        self._running -= 1
        lane.running -= 1
        self._dispatch()
        if tool_lane is not None:
            self._release_tool(tool_lane)
        if lane.retired:
            self._prune(lane)

    def statistics(self) -> SchedulerStatistics:
        """Return a snapshot of running and queued calls."""
        return SchedulerStatistics(
            max_concurrency=self.max_concurrency,
            max_queue=self.max_queue,
            running=self._running,
            queued=self._queued,
            waiting_for_queue_space=len(self._queue_space),
            lanes=tuple(lane.statistics() for lane in self._lanes.values()),
        )

    async def _wait(
        self,
        lane: Lane,
        priority: int,
        ticket: int | None,
        tenant: str | None,
        *,
        server: bool,
        holds_tool: bool = False,
    ) -> float:
        """Queue on ``lane`` until a slot is handed over; the slow path of :meth:`acquire`."""
        holding = current_holding.get()
        if holding is not None:
            self._check_deadlock(lane, holding, server=server)
        queued_at = anyio.current_time()
        while self._queued >= self.max_queue:
            if self.overflow == "reject":
                raise RMCPOverloadedError(
                    f"admission queue is full ({self.max_queue} calls waiting); retry later, raise "
                    "runtime.max_queue, or set runtime.overflow = 'wait' for backpressure",
                    server=lane.name,
                )
            if holds_tool:
                # Waiting for space with a tool slot held would wait on the calls queued for
                # that slot: it goes over max_queue, by at most the tool lanes' slots.
                break
            space = anyio.Event()
            self._queue_space.append(space)
            try:
                await space.wait()
            except BaseException:
                if space.is_set():
                    # Woken and cancelled at once: the space goes to the next in line.
                    self._wake_queue_space()
                else:
                    self._queue_space.remove(space)
                raise
        weight = self.tenants.get(tenant, 1.0) if tenant is not None else 1.0
        sequence = next(self._sequence) if ticket is None else ticket
        waiter = lane.push(priority, tenant, weight, sequence, queued_at)
        self._queued += 1
        # Only calls that gave up may have blocked the fast path: a free slot goes out now.
        if server:
            self._dispatch()
        else:
            self._dispatch_tool(lane)
        if not waiter.granted:
            try:
                await waiter.wait()
            except BaseException:
                if waiter.granted:
                    # Granted and cancelled in the same instant: pass the slot on.
                    if server:
                        self.release(lane)
                    else:
                        self._release_tool(lane)
                else:
                    lane.abandon(waiter)
                    self._queued -= 1
                    self._wake_queue_space()
                    if lane.retired:
                        self._prune(lane)
                raise
        return anyio.current_time() - queued_at

    def _check_deadlock(self, lane: Lane, holding: Holding, *, server: bool) -> None:
        """Raise when a lane this call must wait on is full of the calls it is nested in."""
        chain: list[Holding] = []
        link: Holding | None = holding
        while link is not None:
            if link.active:
                chain.append(link)
            link = link.parent
        if not chain:
            return
        held = sum(1 for link in chain if link.lane is lane or link.tool_lane is lane)
        if lane.running >= lane.max_concurrency and held >= lane.running:
            if server:
                what, key = f"server {lane.name!r}", f"servers.{lane.name}.max_concurrency"
            else:
                server_name, _, tool = lane.name.partition("/")
                what, key = f"tool {lane.name!r}", f"servers.{server_name}.tools.{tool}.max_concurrency"
        elif server and self._running >= self.max_concurrency and len(chain) >= self._running:
            held = len(chain)
            what, key = "the runtime", "runtime.max_concurrency"
        else:
            return
        names = tuple(f"{link.lane.name}/{link.tool}" for link in reversed(chain))
        raise RMCPDeadlockError(
            f"this call was made from inside the call(s) {' -> '.join(names)}, which hold all "
            f"{held} slot(s) of {what} it needs and wait for it to finish: it would wait forever, "
            f"so it was not sent. Raise {key} above the nesting depth, or do not call back into "
            "a server or tool from inside its own calls",
            lane=what,
            chain=names,
        )

    def _prune(self, lane: Lane) -> None:
        # Not while a call holds or waits for one of its tool slots: it will need the lane next.
        if (
            lane.running == 0
            and lane.queued == 0
            and self._lanes.get(lane.name) is lane
            and not any(tool.running or tool.queued for tool in lane.tools.values())
        ):
            del self._lanes[lane.name]

    def _admit(self, lane: Lane) -> None:
        self._running += 1
        lane.running += 1
        lane.peak_running = max(lane.peak_running, lane.running)

    def _dispatch(self) -> None:
        if not self._queued:
            return
        now = anyio.current_time()
        aging_s = self.priority_aging_s
        while self._running < self.max_concurrency:
            best: tuple[float, float, Lane, _Level] | None = None
            for lane in self._lanes.values():
                if not lane.queued or lane.running >= lane.max_concurrency:
                    continue
                effective, queued_at, level = lane.best(now, aging_s)
                if best is None or effective > best[0] or (effective == best[0] and queued_at < best[1]):
                    best = (effective, queued_at, lane, level)
            if best is None:
                return
            lane, level = best[2], best[3]
            waiter = lane.pop(level)
            self._queued -= 1
            self._admit(lane)
            waiter.wake()
            self._wake_queue_space()

    def _dispatch_tool(self, tool_lane: Lane) -> None:
        if not tool_lane.queued:
            return
        now = anyio.current_time()
        while tool_lane.queued and tool_lane.running < tool_lane.max_concurrency:
            level = tool_lane.best(now, self.priority_aging_s)[2]
            waiter = tool_lane.pop(level)
            self._queued -= 1
            _admit_tool(tool_lane)
            waiter.wake()
            self._wake_queue_space()

    def _release_tool(self, tool_lane: Lane) -> None:
        tool_lane.running -= 1
        self._dispatch_tool(tool_lane)

    def _wake_queue_space(self) -> None:
        if self._queue_space:
            self._queue_space.pop(0).set()


def _admit_tool(tool_lane: Lane) -> None:
    tool_lane.running += 1
    tool_lane.peak_running = max(tool_lane.peak_running, tool_lane.running)
