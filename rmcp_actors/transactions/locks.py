# pyright: strict
"""Named resources that transactions lock, shared or exclusive, with deadlock detection.

The lock manager is a synchronous state machine shared by the transactions, like the
scheduler, not an actor with an inbox: a lock that nobody holds is granted with no task switch,
and a released lock is handed straight to the waiters it unblocks. Nothing in it needs a
timer or I/O of its own: a waiter's deadline is its own cancel scope.

**Wait-for graph.** A transaction waiting for a resource waits for every holder whose mode
conflicts with its request, and for every request queued ahead of it that conflicts (those are
served first). Edges form only when a request is queued (a grant turns a waiter into a holder
that its followers already waited for), so a new cycle always runs through the request that
just queued: the manager looks for one then, and the youngest transaction in it (the one that
started last) fails at once with :class:`~rmcp_actors.RMCPDeadlockError`. Its other waits are
dropped with it, which breaks the cycle; the others keep waiting and go on once it releases its
locks at its end (after its compensation: its locks protect that too).

**Fairness.** Each resource serves its queue in order: a request is granted at once only when
it is compatible with the holders and nobody is queued, and a release grants the requests at
the head of the queue while they are compatible with the holders (a run of shared requests
together). A shared request never passes a queued exclusive one, so readers cannot starve a
writer. An upgrade (a holder of a shared lock asking for it exclusive) is queued ahead of the
other waiters, since they wait for the upgrader already; two upgraders of one resource wait
for each other, and the youngest fails.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Protocol, final

import anyio
import anyio.lowlevel
import attrs

from ..errors import RMCPDeadlockError, RMCPTimeoutError
from ..runtime.watchdog import InFlight, WaitEdge, WorkItem, WorkRegistry

__all__ = ["LockHolder", "LockManager", "LockManagerStatistics", "LockOwner", "TransactionLocks"]


def _mode(exclusive: bool) -> str:
    return "exclusive" if exclusive else "shared"


@final
class LockOwner:
    """A transaction as the lock manager knows it: the locks it holds and the ones it waits for.

    Made by :meth:`LockManager.owner` when the transaction starts; its start order decides who
    fails in a deadlock (the youngest).

    Attributes:
        id: The transaction's id.
        name: The transaction's name.
        started: When its transaction started, then the order the manager saw it in (ties
            under a coarse clock): the largest is the youngest.
    """

    __slots__ = ("_held", "_waiting", "id", "name", "started")

    def __init__(self, owner_id: str, name: str, started: tuple[float, int]) -> None:
        self.id = owner_id
        self.name = name
        self.started = started
        # Resource name -> held exclusive.
        self._held: dict[str, bool] = {}
        self._waiting: list[_Request] = []

    def __repr__(self) -> str:
        return f"<LockOwner {self.label}>"

    @property
    def label(self) -> str:
        """How errors and reports name it: ``transaction 'transfer' (3f2a...)``."""
        return f"transaction {self.name!r} ({self.id})"

    @property
    def held(self) -> dict[str, str]:
        """The resources it holds, each with its mode (``"shared"`` or ``"exclusive"``)."""
        return {name: _mode(exclusive) for name, exclusive in self._held.items()}


@attrs.define(eq=False)
class _Request:
    owner: LockOwner
    resource: _Resource
    exclusive: bool
    upgrade: bool
    queued_at: float
    event: anyio.Event = attrs.Factory(anyio.Event)
    granted: bool = False
    error: BaseException | None = None

    def work_item(self, owner: str, now: float) -> WorkItem:
        # What a stall report shows of a transaction waiting for a lock.
        return WorkItem(
            key=self.owner.id,
            owner=owner,
            what=f"resource {self.resource.name!r}",
            state=f"{self.owner.label} waiting ({_mode(self.exclusive)})",
            age_s=now - self.queued_at,
        )


@attrs.define(eq=False)
class _Resource:
    name: str
    holders: dict[LockOwner, bool] = attrs.Factory(dict[LockOwner, bool])
    # Upgrades first (in their order), then the other requests in arrival order.
    queue: list[_Request] = attrs.Factory(list[_Request])

    def blocks(self, owner: LockOwner, exclusive: bool) -> bool:
        """Whether a holder other than ``owner`` conflicts with a request of that mode."""
        return any(other is not owner and (exclusive or held) for other, held in self.holders.items())

    def waits_for(self, request: _Request) -> list[LockOwner]:
        """Whom ``request`` waits for: conflicting holders, then conflicting requests ahead."""
        owner, exclusive = request.owner, request.exclusive
        found = [other for other, held in self.holders.items() if other is not owner and (exclusive or held)]
        for ahead in self.queue:
            if ahead is request:
                break
            if ahead.owner is not owner and (exclusive or ahead.exclusive) and ahead.owner not in found:
                found.append(ahead.owner)
        return found


@final
@attrs.frozen
class LockManagerStatistics:
    """A snapshot of the lock manager.

    Attributes:
        resources: Resources held or waited for now.
        waiting: Requests waiting now.
        granted_at_once: Locks granted without waiting, in all.
        granted_after_wait: Locks granted after waiting, in all.
        deadlocks: Waits failed with ``RMCPDeadlockError``, in all.
        timeouts: Waits that ran out of ``lock_timeout_s`` (or the given timeout), in all.
        oldest_wait_s: How long the oldest waiting request has waited, or ``None``.
    """

    resources: int
    waiting: int
    granted_at_once: int
    granted_after_wait: int
    deadlocks: int
    timeouts: int
    oldest_wait_s: float | None


@final
@attrs.define(eq=False)
class LockManager:
    """Locks on named resources for transactions, with a wait-for graph (see the module docstring).

    Args:
        lock_timeout_s: How long a request waits unless it says otherwise.
    """

    lock_timeout_s: float = 60.0
    _resources: dict[str, _Resource] = attrs.Factory(dict[str, _Resource])
    _started: itertools.count[int] = attrs.Factory(itertools.count)
    _in_flight: InFlight | None = None
    _granted_at_once: int = 0
    _granted_after_wait: int = 0
    _deadlocks: int = 0
    _timeouts: int = 0

    def owner(self, owner_id: str, name: str, started_at: float | None = None) -> LockOwner:
        """A new owner for a transaction.

        Args:
            owner_id: The transaction's id.
            name: The transaction's name.
            started_at: When it started, on the event loop's clock (default: now); of two
                transactions that started at the same time, the one made an owner later is
                the younger.
        """
        at = anyio.current_time() if started_at is None else started_at
        return LockOwner(owner_id, name, (at, next(self._started)))

    def watch(self, work: WorkRegistry) -> Callable[[], None]:
        """Show this manager to a watchdog: waits count as work in flight (a grant as progress),
        so a transaction waiting for a lock held too long is reported as a stall, and reports
        list the wait-for graph.

        Returns:
            Stops it.
        """
        in_flight = self._in_flight = work.track("locks")
        untrack_waits = work.track_waits(self.wait_edges)

        def unwatch() -> None:
            work.untrack(in_flight)
            untrack_waits()
            if self._in_flight is in_flight:
                self._in_flight = None

        return unwatch

    async def acquire(
        self, owner: LockOwner, resource: str, *, shared: bool = False, timeout: float | None = None
    ) -> float:
        """Lock ``resource`` for ``owner``, waiting while others hold it in a conflicting mode.

        Holding it already in the same mode (or exclusive, for a shared request) returns at
        once; holding it shared and asking exclusive upgrades the lock. The lock is held until
        :meth:`release_all`. A request granted in the instant its caller is cancelled stays
        held until then.

        Args:
            owner: The transaction asking.
            resource: The resource's name (``"account:42"``).
            shared: Whether other transactions may hold it shared at the same time.
            timeout: Seconds to wait at most (``math.inf``: no limit of its own); ``None`` means
                ``lock_timeout_s``. The caller's cancel scopes apply as well.

        Returns:
            Seconds waited (0.0 when granted at once).

        Raises:
            RMCPDeadlockError: Waiting closed a cycle of transactions waiting for each other and
                this one started last among them.
            RMCPTimeoutError: The wait ran out of ``timeout`` (or ``lock_timeout_s``).
        """
        await anyio.lowlevel.checkpoint_if_cancelled()
        exclusive = not shared
        held = owner._held.get(resource)  # pyright: ignore[reportPrivateUsage]
        if held is not None and (held or not exclusive):
            return 0.0
        state = self._resources.get(resource)
        if state is None:
            state = self._resources[resource] = _Resource(resource)
        upgrade = held is not None
        if not state.blocks(owner, exclusive) and (upgrade or not state.queue):
            self._grant(state, owner, exclusive)
            self._granted_at_once += 1
            return 0.0
        request = _Request(owner, state, exclusive, upgrade, anyio.current_time())
        if upgrade:
            # Ahead of every waiter (they wait for this holder already), behind earlier upgrades.
            at = next((i for i, queued in enumerate(state.queue) if not queued.upgrade), len(state.queue))
            state.queue.insert(at, request)
        else:
            state.queue.append(request)
        owner._waiting.append(request)  # pyright: ignore[reportPrivateUsage]
        if self._in_flight is not None:
            self._in_flight.begin(request)
        self._break_cycles(owner)
        return await self._wait(request, timeout)

    def release_all(self, owner: LockOwner) -> None:
        """Release every lock of ``owner`` (its transaction ended) and grant what that unblocks.

        Call it once no :meth:`acquire` of the owner is waiting; one that still is fails.
        """
        for request in list(owner._waiting):  # pyright: ignore[reportPrivateUsage]
            self._withdraw(
                request,
                RuntimeError(f"{owner.label} released its locks while this request waited"),
            )
        held = owner._held  # pyright: ignore[reportPrivateUsage]
        for name in held:
            state = self._resources[name]
            del state.holders[owner]
            self._dispatch(state)
        held.clear()

    def wait_edges(self) -> list[WaitEdge]:
        """The wait-for graph now: one edge per waiting request and transaction it waits for."""
        now = anyio.current_time()
        return [
            WaitEdge(
                waiter=request.owner.label,
                holder=holder.label,
                resource=f"resource {state.name!r}",
                detail=_mode(request.exclusive),
                age_s=now - request.queued_at,
            )
            for state in self._resources.values()
            for request in state.queue
            for holder in state.waits_for(request)
        ]

    def statistics(self) -> LockManagerStatistics:
        """Return a snapshot of the manager: resources, waiters and what happened to waits."""
        queued = [request.queued_at for state in self._resources.values() for request in state.queue]
        return LockManagerStatistics(
            resources=len(self._resources),
            waiting=len(queued),
            granted_at_once=self._granted_at_once,
            granted_after_wait=self._granted_after_wait,
            deadlocks=self._deadlocks,
            timeouts=self._timeouts,
            oldest_wait_s=anyio.current_time() - min(queued) if queued else None,
        )

    async def _wait(self, request: _Request, timeout: float | None) -> float:
        if timeout is None:
            timeout = self.lock_timeout_s
        if not request.event.is_set():
            try:
                with anyio.move_on_after(timeout):
                    await request.event.wait()
            except BaseException:
                if not request.event.is_set():
                    self._withdraw(request, None)
                raise
        if request.error is not None:
            raise request.error
        if not request.granted:
            self._timeouts += 1
            waited_for = ", ".join(holder.label for holder in request.resource.waits_for(request))
            self._withdraw(request, None)
            raise RMCPTimeoutError(
                f"{request.owner.label} waited {timeout:.3g} s for resource {request.resource.name!r} "
                f"({_mode(request.exclusive)}) and gave up; it waits for {waited_for}. Make the "
                "transactions that hold it shorter, give this transaction a timeout of its own "
                "(it then waits within it), or raise transactions.lock_timeout_s",
                may_have_executed=False,
            )
        return anyio.current_time() - request.queued_at

    def _grant(self, state: _Resource, owner: LockOwner, exclusive: bool) -> None:
        state.holders[owner] = exclusive or state.holders.get(owner, False)
        owner._held[state.name] = state.holders[owner]  # pyright: ignore[reportPrivateUsage]

    def _dispatch(self, state: _Resource) -> None:
        queue = state.queue
        while queue and not state.blocks(queue[0].owner, queue[0].exclusive):
            request = queue.pop(0)
            self._end(request)
            self._grant(state, request.owner, request.exclusive)
            self._granted_after_wait += 1
            request.granted = True
            request.event.set()
        if not state.holders and not queue:
            del self._resources[state.name]

    def _withdraw(self, request: _Request, error: BaseException | None) -> None:
        """Take a request out of its queue (failed with ``error``, or given up by its caller)."""
        request.resource.queue.remove(request)
        self._end(request)
        if error is not None:
            request.error = error
            request.event.set()
        self._dispatch(request.resource)

    def _end(self, request: _Request) -> None:
        request.owner._waiting.remove(request)  # pyright: ignore[reportPrivateUsage]
        if self._in_flight is not None:
            self._in_flight.end(request)

    def _break_cycles(self, owner: LockOwner) -> None:
        """Fail the youngest transaction of each cycle through ``owner``, which just queued."""
        while owner._waiting:  # pyright: ignore[reportPrivateUsage]
            found = self._cycle_through(owner)
            if found is None:
                return
            ages = [link_owner.started for link_owner, _ in found]
            victim_at = ages.index(max(ages))
            # The cycle from the victim round: each link waits on the next one's transaction.
            cycle = found[victim_at:] + found[:victim_at]
            victim, first = cycle[0]
            self._deadlocks += 1
            error = RMCPDeadlockError(
                _deadlock_message(cycle),
                lane=f"resource {first.resource.name!r}",
                chain=tuple(link_owner.id for link_owner, _ in cycle),
                may_have_executed=False,
            )
            for request in list(victim._waiting):  # pyright: ignore[reportPrivateUsage]
                self._withdraw(request, error)

    def _cycle_through(self, start: LockOwner) -> list[tuple[LockOwner, _Request]] | None:
        """A cycle of waits from ``start`` back to it, as (transaction, its request) links."""
        # Depth-first over transactions; each frame: the transaction, the request it came
        # through, and the transactions left to visit from it.
        seen: set[LockOwner] = {start}
        path: list[tuple[LockOwner, _Request]] = []
        frames: list[tuple[LockOwner, list[tuple[_Request, LockOwner]]]] = [(start, self._next_hops(start))]
        while frames:
            current, hops = frames[-1]
            if not hops:
                frames.pop()
                if path:
                    path.pop()
                continue
            request, target = hops.pop()
            if target is start:
                path.append((current, request))
                return path
            if target in seen:
                continue
            seen.add(target)
            path.append((current, request))
            frames.append((target, self._next_hops(target)))
        return None

    @staticmethod
    def _next_hops(owner: LockOwner) -> list[tuple[_Request, LockOwner]]:
        return [
            (request, target)
            for request in owner._waiting  # pyright: ignore[reportPrivateUsage]
            for target in request.resource.waits_for(request)
        ]


def _deadlock_message(cycle: list[tuple[LockOwner, _Request]]) -> str:
    links = [
        f"{owner.label} waits for resource {request.resource.name!r} ({_mode(request.exclusive)}) "
        f"held or first asked by {cycle[(i + 1) % len(cycle)][0].label}"
        for i, (owner, request) in enumerate(cycle)
    ]
    victim = cycle[0][0]
    return (
        f"deadlock: {'; '.join(links)}. {victim.label} started last of the {len(cycle)} "
        "transactions in this cycle, so its wait failed; the others go on once its locks are "
        "released at its end. Retry it after its compensation, or take resources in one order "
        "everywhere (declared with resources=, they are taken sorted)"
    )


class LockHolder(Protocol):
    """What :class:`TransactionLocks` needs of a transaction."""

    @property
    def id(self) -> str:
        """Its id."""
        ...

    @property
    def name(self) -> str:
        """Its name."""
        ...

    @property
    def started_at(self) -> float:
        """When its block was entered, on the event loop's clock."""
        ...

    @property
    def deadline(self) -> float:
        """Its own deadline on the event loop's clock (``math.inf`` without a timeout)."""
        ...


@final
@attrs.define(eq=False)
class TransactionLocks:
    """The lock manager as transactions use it (``tx.acquire``, ``resources=``): each running
    transaction is one owner, made at its first lock and forgotten when it releases them all."""

    manager: LockManager
    _owners: dict[str, LockOwner] = attrs.Factory(dict[str, LockOwner])

    async def acquire(self, transaction: LockHolder, resource: str, *, shared: bool) -> None:
        """Lock ``resource`` for ``transaction`` until it ends (see :meth:`LockManager.acquire`).

        A transaction with a timeout waits within it (its block's cancel scope); one without
        waits at most ``lock_timeout_s``.
        """
        owner = self._owners.get(transaction.id)
        if owner is None:
            owner = self._owners[transaction.id] = self.manager.owner(
                transaction.id, transaction.name, transaction.started_at
            )
        timeout = math.inf if transaction.deadline < math.inf else None
        await self.manager.acquire(owner, resource, shared=shared, timeout=timeout)

    async def release_all(self, transaction: LockHolder) -> None:
        """Release every lock of ``transaction``, which ended (committed or compensated)."""
        owner = self._owners.pop(transaction.id, None)
        if owner is not None:
            self.manager.release_all(owner)
