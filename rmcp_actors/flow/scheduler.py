"""Admission: a bounded priority queue in front of global and per-server concurrency limits.

The scheduler is a synchronous state machine shared by the callers, in the manner of
``trio.CapacityLimiter``, not an actor with an inbox: a call that finds a free slot is
admitted with no task switch at all, and a freed slot is handed straight to the best waiter
(baton passing), so a queued call costs one wake-up. An inbox hop per call would cost more
than the whole overhead budget (see docs/design.md).
"""

from __future__ import annotations

import heapq
import itertools
from typing import Literal, final

import anyio
import anyio.lowlevel
import attrs

from ..errors import RMCPOverloadedError

__all__ = ["Lane", "LaneStatistics", "Scheduler", "SchedulerStatistics"]


@attrs.define(eq=False)
class _Waiter:
    priority: int
    sequence: int
    lane: Lane
    event: anyio.Event = attrs.Factory(anyio.Event)
    granted: bool = False
    abandoned: bool = False

    def __lt__(self, other: _Waiter) -> bool:
        # Higher priority first; FIFO (lower sequence) within a priority.
        return (-self.priority, self.sequence) < (-other.priority, other.sequence)


@final
@attrs.define(eq=False)
class Lane:
    """The admission state of one server: its concurrency limit and its waiting calls."""

    name: str
    max_concurrency: int
    running: int = 0
    peak_running: int = 0
    waiters: list[_Waiter] = attrs.Factory(list[_Waiter])
    _abandoned: int = 0
    retired: bool = False

    @property
    def queued(self) -> int:
        """Calls waiting on this lane (entries of calls that gave up are not counted)."""
        return len(self.waiters) - self._abandoned

    def head(self) -> _Waiter | None:
        """The best waiter still waiting, dropping those that left."""
        while self.waiters and self.waiters[0].abandoned:
            heapq.heappop(self.waiters)
            self._abandoned -= 1
        return self.waiters[0] if self.waiters else None

    def abandon(self, waiter: _Waiter) -> None:
        """Mark ``waiter`` as gone; its heap entry is freed lazily but within a bounded delay.

        Removing an entry from the middle of a heap costs a search, so it is only marked, and
        the heap is rebuilt once marked entries are the majority: each rebuild costs no more
        than the abandonments that triggered it, and the heap never holds more than twice the
        waiters still waiting, however long the lane stays saturated.
        """
        waiter.abandoned = True
        self._abandoned += 1
        if 2 * self._abandoned > len(self.waiters):
            self.waiters[:] = [w for w in self.waiters if not w.abandoned]
            heapq.heapify(self.waiters)
            self._abandoned = 0


@final
@attrs.frozen
class LaneStatistics:
    """A snapshot of one server's admission state."""

    name: str
    max_concurrency: int
    running: int
    peak_running: int
    queued: int


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
    """Admits calls by priority within global and per-server concurrency limits.

    Args:
        max_concurrency: Calls running at once across all servers.
        max_queue: Calls waiting for admission at once, across all servers.
        overflow: What a call does when the queue is full: ``"wait"`` for space (backpressure)
            or ``"reject"`` with :class:`~rmcp_actors.RMCPOverloadedError`.
    """

    max_concurrency: int
    max_queue: int
    overflow: Literal["wait", "reject"] = "wait"
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
        return lane

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

    async def acquire(self, lane: Lane, priority: int = 0, ticket: int | None = None) -> float:
        """Wait for a slot on ``lane``; pair every successful call with :meth:`release`.

        ``ticket`` (from :meth:`ticket`) orders the call among waiters of its priority; without
        one it queues last.

        A call whose deadline has passed is never admitted: its cancel scope fires while it
        waits, and it leaves the queue.

        Returns:
            Seconds spent waiting (0.0 when a slot was free at once).

        Raises:
            RMCPOverloadedError: The queue is full and ``overflow = "reject"``.
        """
        await anyio.lowlevel.checkpoint_if_cancelled()
        if self._running < self.max_concurrency and lane.running < lane.max_concurrency and not lane.waiters:
            self._admit(lane)
            return 0.0
        queued_at = anyio.current_time()
        while self._queued >= self.max_queue:
            if self.overflow == "reject":
                raise RMCPOverloadedError(
                    f"admission queue is full ({self.max_queue} calls waiting); retry later, raise "
                    "runtime.max_queue, or set runtime.overflow = 'wait' for backpressure",
                    server=lane.name,
                )
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
        waiter = _Waiter(priority, next(self._sequence) if ticket is None else ticket, lane)
        heapq.heappush(lane.waiters, waiter)
        self._queued += 1
        # Only abandoned waiters may have blocked the fast path: a free slot goes out now.
        self._dispatch()
        if waiter.granted:
            return anyio.current_time() - queued_at
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.granted:
                # Granted and cancelled in the same instant: pass the slot on.
                self.release(lane)
            else:
                lane.abandon(waiter)
                self._queued -= 1
                self._wake_queue_space()
                if lane.retired:
                    self._prune(lane)
            raise
        return anyio.current_time() - queued_at

    def release(self, lane: Lane) -> None:
        """Give back a slot taken by :meth:`acquire` and hand it to the best waiter."""
        self._running -= 1
        lane.running -= 1
        self._dispatch()
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
            lanes=tuple(
                LaneStatistics(
                    name=lane.name,
                    max_concurrency=lane.max_concurrency,
                    running=lane.running,
                    peak_running=lane.peak_running,
                    queued=lane.queued,
                )
                for lane in self._lanes.values()
            ),
        )

    def _prune(self, lane: Lane) -> None:
        if lane.running == 0 and lane.queued == 0 and self._lanes.get(lane.name) is lane:
            del self._lanes[lane.name]

    def _admit(self, lane: Lane) -> None:
        self._running += 1
        lane.running += 1
        lane.peak_running = max(lane.peak_running, lane.running)

    def _dispatch(self) -> None:
        while self._running < self.max_concurrency:
            best: _Waiter | None = None
            for lane in self._lanes.values():
                if lane.running >= lane.max_concurrency:
                    continue
                head = lane.head()
                if head is not None and (best is None or head < best):
                    best = head
            if best is None:
                return
            heapq.heappop(best.lane.waiters)
            best.granted = True
            self._queued -= 1
            self._admit(best.lane)
            best.event.set()
            self._wake_queue_space()

    def _wake_queue_space(self) -> None:
        if self._queue_space:
            self._queue_space.pop(0).set()
