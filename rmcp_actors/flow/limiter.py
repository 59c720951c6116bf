"""Rate limiting: a synchronous token-bucket gate per server and per tool, and the actor that
owns its timers and adaptation.

The hot path only reads the gate (docs/design.md, "Runtime"): a call whose gate is not
engaged (no configured rate, no feedback so far) pays one attribute check; a call that finds a
token takes it with a little arithmetic and no task switch (the bucket refills lazily from the
clock, no timer). A call that finds none waits in priority order, unless the expected wait
alone would pass its deadline: then it fails at once with
:class:`~rmcp_actors.errors.RMCPTimeoutError`, having sent nothing.

The :class:`RateLimiter` actor (one per server, ``limiter:<server>``) owns what has timers:
waking waiters in priority order as tokens come, AIMD adaptation (a multiplicative cut on each
burst of rate-limit signals, additive recovery up to the ceiling), and the pause a server's
``retry_after`` asks for. Feedback reaches it with ``send_nowait``; when its inbox is full the
gate keeps the strongest pending signal and counts the coalescing, so nothing blocks the hot
path and nothing is dropped silently.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
from collections.abc import Callable, Mapping
from typing import Final, Protocol, final

import anyio
import anyio.abc
import attrs
import trio

from ..errors import RMCPActorStoppedError, RMCPTimeoutError
from ..runtime.actor import Actor, ActorStatistics
from ._feedback import RateLimitSignal, SignalSource

__all__ = [
    "GateStatistics",
    "LimiterStatistics",
    "RateGate",
    "RateLimitSettings",
    "RateLimiter",
    "take_tokens",
    "wait_tokens",
]

# A gate with no rate of its own that had to engage (to honour a pause) refills this fast:
# in effect no limit, without a branch for "unlimited" on the hot path.
_UNLIMITED: Final = 1e9
# A server's retry_after is attacker-controlled input (SEP-3304, RL-8): other callers of the
# server are paused for at most this long; the signalled call itself is bounded by its deadline.
_MAX_PAUSE_S: Final = 300.0
# Adaptation steps (additive recovery, or doubling while discovering) once per this period.
_STEP_S: Final = 1.0
# Signals from calls already in flight when the first one arrived are one congestion event: one
# cut per this period (or per retry_after, when longer), as TCP cuts once per round trip.
_CUT_HOLD_S: Final = 1.0
# The share of the ceiling recovered per second when recover_per_s is not configured.
_DEFAULT_RECOVERY: Final = 0.05
# A token counts as there a hair before the float arithmetic of the refill reaches 1.0, and the
# timer never aims closer than _MIN_DUE_S ahead: either way a timer due "now" that finds 0.99999
# tokens would spin without ever letting the clock move.
_ONE: Final = 1 - 1e-9
_MIN_DUE_S: Final = 1e-6


class RateLimitSettings(Protocol):
    """What a gate reads of the resolved ``rate_limit`` policy (``config.RateLimitPolicy``)."""

    @property
    def rate(self) -> float | None: ...
    @property
    def burst(self) -> int | None: ...
    @property
    def adaptive(self) -> bool: ...
    @property
    def decrease(self) -> float: ...
    @property
    def min_rate(self) -> float: ...
    @property
    def recover_per_s(self) -> float | None: ...


@attrs.define(eq=False)
class _Waiter:
    priority: int
    sequence: int
    event: anyio.Event = attrs.Factory(anyio.Event)
    granted: bool = False
    abandoned: bool = False
    # Set instead of a token when the actor that would have granted one stopped.
    error: BaseException | None = None

    def __lt__(self, other: _Waiter) -> bool:
        # Higher priority first; FIFO (lower sequence) within a priority.
        return (-self.priority, self.sequence) < (-other.priority, other.sequence)


@final
@attrs.frozen
class _Feedback:
    gate: RateGate
    signal: RateLimitSignal


@final
@attrs.frozen
class _Wake:
    """A waiter joined a gate: the actor's timer may have to run sooner."""

    gate: RateGate


LimiterMessage = _Feedback | _Wake


@final
@attrs.frozen
class GateStatistics:
    """A snapshot of one token bucket.

    Attributes:
        name: ``<server>`` or ``<server>/<tool>``.
        engaged: Whether calls take tokens at all (a rate is configured, or feedback came).
        rate: Tokens per second now (None while not engaged).
        configured_rate: The ``rate_limit.rate`` of the policy.
        ceiling: What recovery climbs back to (None while still discovering it).
        burst: Tokens the bucket holds at most, now.
        tokens: Tokens available now.
        waiting: Calls waiting for a token.
        paused_for_s: Seconds left of a pause a server's retry_after asked for.
        taken: Tokens taken at once, with no wait.
        waited: Calls that waited for their token.
        rejected: Calls failed at once because the wait would pass their deadline.
        signals: Rate-limit signals reported by calls.
        coalesced: Signals merged into a pending one because the actor's inbox was full.
        cuts: Multiplicative decreases applied.
    """

    name: str
    engaged: bool
    rate: float | None
    configured_rate: float | None
    ceiling: float | None
    burst: float
    tokens: float
    waiting: int
    paused_for_s: float
    taken: int
    waited: int
    rejected: int
    signals: int
    coalesced: int
    cuts: int


@final
@attrs.frozen
class LimiterStatistics(ActorStatistics):
    """A snapshot of one server's limiter actor and its gates (``name`` is ``limiter:<server>``)."""

    gates: tuple[GateStatistics, ...]


@final
@attrs.define(eq=False)
class RateGate:
    """The token bucket of one server or one tool: what the hot path reads.

    Callers use :attr:`engaged`, :meth:`take`, :meth:`wait` and :meth:`report`; the
    adaptation methods (:meth:`apply`, :meth:`advance`) belong to the :class:`RateLimiter`
    actor that owns the gate.

    Args:
        name: ``<server>`` or ``<server>/<tool>``, for errors and statistics.
        settings: The resolved ``rate_limit`` policy.
        notify: Delivers a message to the owning actor without waiting; raises
            ``anyio.WouldBlock`` when its inbox is full.
    """

    name: str
    settings: RateLimitSettings
    notify: Callable[[LimiterMessage], None] = attrs.field(repr=False)
    #: False while there is no configured rate and no feedback: callers skip the gate.
    engaged: bool = attrs.field(init=False)
    rate: float = attrs.field(init=False)
    burst: float = attrs.field(init=False)
    ceiling: float | None = attrs.field(init=False)
    _tokens: float = attrs.field(init=False)
    # The clock the tokens were last counted at.
    _updated: float = attrs.field(default=-math.inf, init=False)
    _clock: Callable[[], float] = attrs.field(init=False, repr=False)
    _paused_until: float = attrs.field(default=-math.inf, init=False)
    _waiters: list[_Waiter] = attrs.field(factory=list[_Waiter], init=False)
    _live_waiters: int = attrs.field(default=0, init=False)
    _sequence: itertools.count[int] = attrs.field(factory=itertools.count, init=False)
    # Rate discovery after the first signal when no rate is configured: the rate doubles each
    # step until the next signal, whose rate becomes the ceiling (TCP's slow start).
    _discovering: bool = attrs.field(default=False, init=False)
    _cut_hold_until: float = attrs.field(default=-math.inf, init=False)
    _next_step_at: float = attrs.field(default=math.inf, init=False)
    # Set by close(): the server is gone, so no token will ever come; waits fail at once.
    _closed: BaseException | None = attrs.field(default=None, init=False)
    # The strongest signal not yet delivered to the actor (its inbox was full).
    _pending: RateLimitSignal | None = attrs.field(default=None, init=False)
    _taken: int = attrs.field(default=0, init=False)
    _waited: int = attrs.field(default=0, init=False)
    _rejected: int = attrs.field(default=0, init=False)
    _signals: int = attrs.field(default=0, init=False)
    _coalesced: int = attrs.field(default=0, init=False)
    _cuts: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        configured = self.settings.rate
        self.engaged = configured is not None
        self.rate = configured if configured is not None else _UNLIMITED
        self.ceiling = configured
        self.burst = self._configured_burst()
        self._tokens = self.burst
        self._clock = _event_loop_clock()

    # --- the hot path -------------------------------------------------------------------

    def take(self) -> bool:
        """Take a token if one is there and nobody waits ahead; never switches tasks."""
        if self._live_waiters:
            return False
        now = self._clock()
        elapsed = now - self._updated
        if elapsed > 0:
            self._updated = now
            tokens = self._tokens + elapsed * self.rate
            self._tokens = tokens if tokens < self.burst else self.burst
        if self._tokens >= _ONE:
            self._tokens -= 1
            self._taken += 1
            return True
        return False

    async def wait(self, priority: int, deadline: float, ticket: int | None = None) -> float:
        """Wait for a token, in priority order, within ``deadline``; call after :meth:`take` failed.

        Args:
            priority: Higher goes first.
            deadline: The call's deadline (the clock of :func:`anyio.current_time`).
            ticket: The call's place in line among its priority (the scheduler's ticket).

        Returns:
            Seconds waited.

        Raises:
            RMCPTimeoutError: The expected wait alone would pass the deadline; nothing was sent.
            RMCPActorStoppedError: The gate was closed (its server removed, or the runtime
                stopping) before or while the call waited; nothing was sent.
        """
        self.check(priority, deadline)
        now = self._clock()
        waiter = _Waiter(priority, next(self._sequence) if ticket is None else ticket)
        heapq.heappush(self._waiters, waiter)
        self._live_waiters += 1
        self._waited += 1
        self._deliver(_Wake(self))
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.granted:
                self.give_back()  # granted and cancelled in the same instant
            elif waiter.error is None:
                self._abandon(waiter)
            raise
        if waiter.error is not None:
            raise waiter.error
        return self._clock() - now

    def check(self, priority: int, deadline: float) -> None:
        """Fail at once if a call of ``priority`` joining now could not get a token by ``deadline``.

        Raises:
            RMCPTimeoutError: The expected wait alone would pass the deadline.
            RMCPActorStoppedError: The gate was closed.
        """
        if self._closed is not None:
            raise self._closed
        now = self._clock()
        self._refill(now)
        expected = self.expected_wait(priority)
        if now + expected > deadline:
            self._rejected += 1
            raise RMCPTimeoutError(self._too_long(expected, deadline - now, priority))

    def give_back(self, *, taken: bool = False) -> None:
        """Return a token a call got but will not use (``taken``: it came from :meth:`take`)."""
        if taken:
            self._taken -= 1
        self._tokens = min(self.burst, self._tokens + 1)
        if self._live_waiters:
            self._deliver(_Wake(self))

    def report(self, signal: RateLimitSignal) -> None:
        """Tell the owning actor the server refused a call for going too fast; never waits."""
        self._signals += 1
        self._deliver(_Feedback(self, signal))

    def expected_wait(self, priority: int) -> float:
        """Seconds until a call of ``priority`` joining now would get its token (after a refill)."""
        ahead = sum(1 for w in self._waiters if not w.abandoned and w.priority >= priority)
        needed = ahead + 1 - self._tokens  # a pause is part of it, as a debt of tokens
        return needed / self.rate if needed > 0 else 0.0

    # --- owned by the actor ---------------------------------------------------------------

    def apply(self, signal: RateLimitSignal, now: float) -> None:
        """Slow down on a rate-limit signal: pause for its retry_after, and cut the rate (AIMD)."""
        self._refill(now)
        if not self.settings.adaptive:
            self.engaged = True  # to honour the pause; the rate stays as configured
        elif now >= self._cut_hold_until:  # else the same congestion event, already answered
            self._cut(signal, now)
        if signal.retry_after_s:
            # After the cut: the pause is a debt of tokens at the rate that follows it.
            self._pause(now, min(signal.retry_after_s, _MAX_PAUSE_S))
            if self._next_step_at < math.inf:
                self._next_step_at = max(self._next_step_at, self._paused_until + _STEP_S)

    def _cut(self, signal: RateLimitSignal, now: float) -> None:
        settings = self.settings
        if not self.engaged:
            # No configured rate: start low and discover the server's rate from here.
            retry_after = signal.retry_after_s
            start = 1.0 / retry_after if retry_after else 1.0
            self.rate = max(settings.min_rate, start)
            self._discovering = True
            self.engaged = True
        else:
            if self._discovering or self.ceiling is None:
                self.ceiling = self.rate
                self._discovering = False
            self.rate = max(settings.min_rate, self.rate * settings.decrease)
        self._cuts += 1
        self.burst = self._effective_burst()
        self._tokens = min(self._tokens, self.burst)
        self._cut_hold_until = now + max(_CUT_HOLD_S, signal.retry_after_s or 0.0)
        self._next_step_at = now + _STEP_S

    def advance(self, now: float) -> float:
        """Deliver what is due at ``now``: adaptation steps, then tokens to waiters in order.

        Returns:
            When the gate next needs the actor (``math.inf``: not until a message comes).
        """
        pending, self._pending = self._pending, None
        if pending is not None:
            self.apply(pending, now)
        while now >= self._next_step_at:
            self._step()
        self._refill(now)
        while self._tokens >= _ONE and (waiter := self._head()) is not None:
            heapq.heappop(self._waiters)
            self._live_waiters -= 1
            self._tokens -= 1
            waiter.granted = True
            waiter.event.set()
        due = self._next_step_at
        if self._live_waiters:
            token_at = now + (1 - self._tokens) / self.rate
            due = min(due, max(token_at, now + _MIN_DUE_S))
        return due

    def close(self, error: BaseException) -> None:
        """Fail every waiter, and every later wait, at once with ``error``: no token will come."""
        self._closed = error
        while (waiter := self._head()) is not None:
            heapq.heappop(self._waiters)
            self._live_waiters -= 1
            waiter.error = error
            waiter.event.set()

    def statistics(self, now: float) -> GateStatistics:
        """A snapshot of the bucket at ``now``."""
        return GateStatistics(
            name=self.name,
            engaged=self.engaged,
            rate=self.rate if self.engaged and self.rate < _UNLIMITED else None,
            configured_rate=self.settings.rate,
            ceiling=self.ceiling,
            burst=self.burst,
            tokens=self._tokens,
            waiting=self._live_waiters,
            paused_for_s=max(0.0, self._paused_until - now),
            taken=self._taken,
            waited=self._waited,
            rejected=self._rejected,
            signals=self._signals,
            coalesced=self._coalesced,
            cuts=self._cuts,
        )

    # --- internals --------------------------------------------------------------------------

    def _deliver(self, message: LimiterMessage) -> None:
        try:
            self.notify(message)
        except anyio.WouldBlock:
            # The actor is busy with earlier messages and calls advance() after each one, so
            # a wake-up it misses is not lost; a signal it has not seen is kept here, the
            # strongest only.
            if isinstance(message, _Feedback):
                self._pending = message.signal.stronger(self._pending)
                self._coalesced += 1

    def _refill(self, now: float) -> None:
        elapsed = now - self._updated
        if elapsed > 0:
            self._updated = now
            self._tokens = min(self.burst, self._tokens + elapsed * self.rate)

    def _pause(self, now: float, seconds: float) -> None:
        until = now + seconds
        if until > self._paused_until:
            self._paused_until = until
            # A debt of tokens that the refill pays off exactly when the pause ends: the first
            # call may go then (what the server asked for), and take() needs no pause check.
            self._tokens = min(self._tokens, 1.0 - self.rate * seconds)

    def _step(self) -> None:
        settings = self.settings
        self._next_step_at += _STEP_S
        if self._discovering:
            self.rate = min(_UNLIMITED, self.rate * 2)
        else:
            ceiling = self.ceiling if self.ceiling is not None else self.rate
            increase = settings.recover_per_s or _DEFAULT_RECOVERY * ceiling
            self.rate = min(ceiling, self.rate + increase * _STEP_S)
            if self.rate >= ceiling:
                if settings.rate is None:
                    # The server's limit was only ever inferred: probe above it again.
                    self._discovering = True
                else:
                    self._next_step_at = math.inf
        if self.rate >= _UNLIMITED:
            self._next_step_at = math.inf
            if settings.rate is None:
                # Discovered no limit at all: the gate steps out of the hot path again.
                self.engaged = False
                self._discovering = False
                self.ceiling = None
        self.burst = self._effective_burst()

    def _configured_burst(self) -> float:
        settings = self.settings
        if settings.burst is not None:
            return float(settings.burst)
        if settings.rate is None:
            return 1.0 if settings.adaptive else _UNLIMITED
        return float(max(1, round(settings.rate)))

    def _effective_burst(self) -> float:
        # A cut rate with the full configured burst would let a burst the server just refused
        # through again; the burst shrinks with the rate and grows back with it.
        return max(1.0, min(self._configured_burst(), math.floor(self.rate)))

    def _head(self) -> _Waiter | None:
        while self._waiters and self._waiters[0].abandoned:
            heapq.heappop(self._waiters)
        return self._waiters[0] if self._waiters else None

    def _abandon(self, waiter: _Waiter) -> None:
        waiter.abandoned = True
        self._live_waiters -= 1
        # Rebuilt once abandoned entries are the majority (as the scheduler's lanes do).
        if 2 * self._live_waiters < len(self._waiters):
            self._waiters[:] = [w for w in self._waiters if not w.abandoned]
            heapq.heapify(self._waiters)

    def _too_long(self, expected: float, remaining: float, priority: int) -> str:
        ahead = sum(1 for w in self._waiters if not w.abandoned and w.priority >= priority)
        paused = max(0.0, self._paused_until - self._clock())
        why = f"paused {paused:.2f} s at the server's request, " if paused > 0 else ""
        return (
            f"rate limit of {self.name}: {self.rate:g} calls/s ({why}{ahead} call(s) ahead); the "
            f"wait for a token (~{expected:.2f} s) would pass the call's deadline ({remaining:.2f} s "
            "left), so it failed at once and nothing was sent: raise timeout_s, lower the load, "
            "or raise rate_limit.rate if the server allows it"
        )


def take_tokens(server: RateGate, tool: RateGate | None) -> bool:
    """Take a token from the tool's own gate (when it has one) and from the server's, or none;
    never switches tasks. A gate that is not engaged gives its token for nothing."""
    if tool is None or not tool.engaged:
        return not server.engaged or server.take()
    if not tool.take():
        return False
    if not server.engaged or server.take():
        return True
    tool.give_back(taken=True)
    return False


async def wait_tokens(
    server: RateGate, tool: RateGate | None, priority: int, deadline: float, ticket: int | None = None
) -> float:
    """Wait for the tokens :func:`take_tokens` did not find, within ``deadline``.

    The tool's token first, then the server's: a call holding a token of the shared server
    bucket while it waits for its tool's would hold up the server's other tools.

    Returns:
        Seconds waited.

    Raises:
        RMCPTimeoutError: Either wait alone would pass the deadline (checked before the call
            holds anything); nothing was sent.
        RMCPActorStoppedError: A gate was closed; nothing was sent.
    """
    if tool is None or not tool.engaged:
        return await server.wait(priority, deadline, ticket)
    if not server.engaged:
        return await tool.wait(priority, deadline, ticket)
    tool.check(priority, deadline)
    server.check(priority, deadline)
    waited = 0.0 if tool.take() else await tool.wait(priority, deadline, ticket)
    try:
        if not server.take():
            waited += await server.wait(priority, deadline, ticket)
    except BaseException:
        tool.give_back()
        raise
    return waited


def _event_loop_clock() -> Callable[[], float]:
    """The running event loop's clock, found once.

    ``anyio.current_time()`` finds the backend on every call (1.5 µs here, against 0.5 µs for
    ``trio.current_time()``), and a gate reads the clock on every call that takes a token. The
    values are the same (anyio's are the backend's), so MockClock still drives it.
    """
    try:
        trio.lowlevel.current_root_task()
    except RuntimeError:
        pass
    else:
        return trio.current_time
    try:
        return asyncio.get_running_loop().time
    except RuntimeError:
        return anyio.current_time  # built outside any loop: find it on each call


@final
@attrs.define(eq=False)
class RateLimiter(Actor[LimiterMessage]):
    """The actor owning one server's rate-limit gates: their timers and adaptation.

    Its inbox takes feedback from calls (a rate-limit signal) and wake-ups (a call started
    waiting); a timer task beside the inbox hands tokens to waiters in priority order as they
    come, and steps the rate back up. Calls only touch the gates (:meth:`gate`).

    Args:
        name: ``limiter:<server>``.
        server: The server's name.
        settings: The server's resolved ``rate_limit`` policy.
        tool_settings: The ``rate_limit`` of each tool whose table sets one: that tool's calls
            take a token from its own bucket and from the server's; any other tool's, from the
            server's only.
    """

    server: str
    settings: RateLimitSettings
    tool_settings: Mapping[str, RateLimitSettings] = attrs.field(factory=dict[str, RateLimitSettings])
    _server_gate: RateGate = attrs.field(init=False)
    _tool_gates: dict[str, RateGate] = attrs.field(factory=dict[str, RateGate], init=False)
    _changed: anyio.Event = attrs.field(factory=anyio.Event, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._server_gate = RateGate(self.server, self.settings, self.send_nowait)
        for tool, settings in self.tool_settings.items():
            self._tool_gates[tool] = RateGate(f"{self.server}/{tool}", settings, self.send_nowait)

    def gate(self, tool: str | None = None) -> RateGate:
        """The tool's own gate when it has one, else the server's (``gate()``: the server's)."""
        if tool is not None and (gate := self._tool_gates.get(tool)) is not None:
            return gate
        return self._server_gate

    def tool_gate(self, tool: str) -> RateGate | None:
        """The tool's own gate, taken from beside the server's, or None when it has none."""
        return self._tool_gates.get(tool) if self._tool_gates else None

    def report(self, tool: str, signal: RateLimitSignal) -> None:
        """Report a rate-limit signal on a call of ``tool``; never waits.

        A refusal by the server (NACK, ``-32023``, HTTP 429) slows the server's gate and the
        tool's own; an error result matching a pattern is the tool's word (its upstream API's
        limit, say), so it slows the tool's own gate when it has one, else the server's.
        """
        own = self.tool_gate(tool)
        if own is not None:
            own.report(signal)
            if signal.source is SignalSource.RESULT:
                return
        self._server_gate.report(signal)

    def gates(self) -> tuple[RateGate, ...]:
        """Every gate of this server, the server's first."""
        return (self._server_gate, *self._tool_gates.values())

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve the inbox, with the timer task beside it, until cancelled.

        The calls waiting on its gates outlive it: the gates are the server's, not this run's,
        so a restart (its own crash, or rest_for_one after the connection's or the breaker's)
        leaves them waiting, and the new run's timer, which computes its next wake-up first
        thing, serves them. Only :meth:`close` (the server removed, the runtime stopping) fails
        them.
        """
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(self._timers)
            await super().run(task_status=task_status)

    def close(self) -> None:
        """Fail the calls waiting on its gates (and any later wait) at once, nothing sent.

        Called by the owner when the server is removed or the runtime stops, before the
        connection stops: letting the waiters through would send them on a connection being torn
        down, where a lost answer would make a call that never needed to run "may have run".
        """
        error = RMCPActorStoppedError(
            f"the rate limiter of server {self.server!r} stopped (server removed, or runtime "
            "stopping) while this call waited for a token; nothing was sent: call again",
            actor=self.name,
            may_have_executed=False,
        )
        for gate in self.gates():
            gate.close(error)

    async def handle(self, message: LimiterMessage) -> None:
        """Apply a signal (a wake-up needs nothing more), then let the timer recompute."""
        if isinstance(message, _Feedback):
            message.gate.apply(message.signal, anyio.current_time())
        self._changed.set()

    def statistics(self) -> LimiterStatistics:
        """Return a snapshot of the inbox and of every gate."""
        base = super().statistics()
        now = anyio.current_time()
        return LimiterStatistics(
            name=base.name,
            inbox_used=base.inbox_used,
            inbox_size=base.inbox_size,
            gates=tuple(gate.statistics(now) for gate in self.gates()),
        )

    async def _timers(self) -> None:
        while True:
            self._changed = anyio.Event()
            now = anyio.current_time()
            due = min(gate.advance(now) for gate in self.gates())
            with anyio.move_on_at(due):
                await self._changed.wait()
