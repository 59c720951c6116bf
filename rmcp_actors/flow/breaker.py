"""Circuit breakers: a synchronous gate per server and per (server, tool), timed by an actor.

The hot path only touches a :class:`Breaker` gate: while it is closed, admission is one
attribute read (``passing``) and an outcome is a few counter updates. When failures trip it,
the gate opens itself at once (the next call already fails fast with
:class:`~rmcp_actors.errors.RMCPCircuitOpenError`) and tells its server's
:class:`BreakerActor` with ``send_nowait``; the actor owns the timer that half-opens the gate,
and, when the policy says so, the active probe (``ping`` or ``tools/list``) that decides
whether it closes again. Nothing on the hot path ever waits on the actor.

What a failed attempt means for the breakers is decided in one place, :func:`fault_of`: only
faults of the dependency count, never a tool's error result, the caller's bad arguments or a
rate-limit signal (the limiter's business).
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Literal, Protocol, final

import anyio
import anyio.abc
import attrs
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS

from .._protocol import NackCode
from ..client._failures import Attempt
from ..errors import RMCPCircuitOpenError, RMCPServerError
from ..runtime import Actor, ActorStatistics

if TYPE_CHECKING:
    from mcp import Client

__all__ = [
    "Breaker",
    "BreakerActor",
    "BreakerActorStatistics",
    "BreakerChange",
    "BreakerChangeCallback",
    "BreakerPolicyLike",
    "BreakerPass",
    "BreakerState",
    "BreakerStatistics",
    "Breakers",
    "BreakersStatistics",
    "Fault",
    "ProbeKind",
    "Prober",
    "Tripped",
    "client_prober",
    "fault_of",
]

_logger = logging.getLogger("rmcp_actors")

# The sliding window is this many buckets: counts age out one bucket (window_s / 10) at a time,
# so a window costs two small arrays whatever the call rate.
_BUCKETS = 10
# JSON-RPC codes that refuse the request as malformed (the caller's fault; the same codes
# RMCPServerError reads as "did not run"), and the rate-limit error proposed by SEP-3304 (the
# limiter's signal, never the breaker's).
_REQUEST_ERRORS = RMCPServerError.NOT_EXECUTED_CODES
_RATE_LIMITED_CODE = -32023


class BreakerState(enum.Enum):
    """Where a circuit breaker is."""

    #: Calls pass; failures are counted.
    CLOSED = "closed"
    #: Calls fail at once until the open period ends.
    OPEN = "open"
    #: A few probe calls (or the actor's ``ping`` / ``tools/list``) decide: close or open again.
    HALF_OPEN = "half_open"


class Fault(enum.Enum):
    """What one attempt's outcome says about the dependency (see :func:`fault_of`)."""

    #: The server answered (a tool's error result and a refusal of bad input included).
    NONE = "none"
    #: A fault of this tool's calls (a timeout, one lost answer): counts against the tool's
    #: breaker only, so one bad tool does not open the whole server.
    TOOL = "tool"
    #: A fault of the whole server (no connection, the transport died, the server says it is
    #: overloaded or unavailable): counts against the server's breaker and the tool's.
    SERVER = "server"
    #: Says nothing either way (rate limiting, a session the server forgot and that is rebuilt
    #: at once, refused credentials, the caller's own cancellation).
    IGNORED = "ignored"


# NACKs that blame the caller (the tool did not run because of what it sent), and in_doubt: the
# server reporting, correctly, an earlier run cut short by a crash that was counted when it
# happened. The server works.
_ANSWERING_NACKS = frozenset(
    {
        NackCode.IDEMPOTENCY_CONFLICT,
        NackCode.INVALID_META,
        NackCode.INVALID_ARGUMENTS,
        NackCode.UNKNOWN_TOOL,
        NackCode.IN_DOUBT,
        NackCode.ABORTED,
    }
)
# NACKs that say the server as a whole cannot take calls now.
_SERVER_NACKS = frozenset({NackCode.OVERLOADED, NackCode.UNAVAILABLE, NackCode.SHUTTING_DOWN})


def fault_of(
    attempt: Attempt | None,
    *,
    session_lost: bool = False,
    rpc_code: int | None = None,
    nack_code: str | None = None,
) -> Fault:
    """Say what one attempt's outcome means for the circuit breakers (pure).

    Args:
        attempt: The classifier's verdict on a failed attempt (``client/_failures.py``), or
            None when the server answered with a result (``nack_code`` then says whether it
            was a NACK). A deadline that passed after sending is ``Attempt.TIMED_OUT``.
        session_lost: The verdict's ``session_lost``: the transport is gone.
        rpc_code: The JSON-RPC error code, for ``Attempt.ANSWERED``.
        nack_code: The NACK code of an RMCP refusal.

    Returns:
        The fault, if any, and whose it is.
    """
    if attempt is None:
        if nack_code is None or nack_code in _ANSWERING_NACKS:
            return Fault.NONE
        if nack_code == NackCode.RATE_LIMITED:
            return Fault.IGNORED
        if nack_code in _SERVER_NACKS:
            return Fault.SERVER
        # A code this client does not know: the server could not do this call.
        return Fault.TOOL
    if attempt is Attempt.NOT_SENT:
        return Fault.SERVER
    if attempt is Attempt.SENT_AND_LOST:
        return Fault.SERVER if session_lost else Fault.TOOL
    if attempt is Attempt.TIMED_OUT:
        return Fault.TOOL
    if attempt is Attempt.REFUSED or attempt is Attempt.UNAUTHORIZED:
        # A refused credential says nothing of the server's health: it answered.
        return Fault.IGNORED
    if attempt is Attempt.ANSWERED:
        if rpc_code == _RATE_LIMITED_CODE:
            return Fault.IGNORED
        # A refusal of the request itself (parse error, invalid request, unknown method, bad
        # params) blames the caller; any other error instead of a result (-32603 internal
        # error, a server's own -32000..-32099) is the server failing a well-formed call.
        return Fault.NONE if rpc_code in _REQUEST_ERRORS else Fault.TOOL
    # UNREADABLE: the server answered and the tool ran; its answer is the tool's problem.
    return Fault.NONE


class BreakerPolicyLike(Protocol):
    """The keys of ``circuit_breaker`` a breaker reads (``CircuitBreakerPolicy`` in config)."""

    @property
    def failure_threshold(self) -> int: ...
    @property
    def failure_ratio(self) -> float: ...
    @property
    def min_calls(self) -> int: ...
    @property
    def window_s(self) -> float: ...
    @property
    def open_s(self) -> float: ...
    @property
    def max_open_s(self) -> float: ...
    @property
    def half_open_probes(self) -> int: ...
    @property
    def slow_call_s(self) -> float: ...
    @property
    def mode(self) -> Literal["enabled", "disabled", "metrics_only"]: ...
    @property
    def probe(self) -> Literal["call", "ping", "tools_list"]: ...


@final
@attrs.frozen
class BreakerChange:
    """A circuit breaker changed state.

    Attributes:
        server: The server whose breaker it is.
        tool: The tool, for a (server, tool) breaker; None for the server's own breaker.
        old: The state it left.
        new: The state it entered.
        at: When, on the runtime's clock (``anyio.current_time()``).
        reason: Why (the last failure that opened it, the probe's result, ...).
        half_open_at: When an open breaker half-opens (None unless ``new`` is OPEN).
    """

    server: str
    tool: str | None
    old: BreakerState
    new: BreakerState
    at: float
    reason: str
    half_open_at: float | None = None


BreakerChangeCallback = Callable[[BreakerChange], None]


@final
@attrs.frozen
class BreakerStatistics:
    """A snapshot of one circuit breaker.

    Attributes:
        server: The server.
        tool: The tool, or None for the server's own breaker.
        mode: ``enabled``, ``disabled`` or ``metrics_only``.
        state: The current state.
        consecutive_failures: Failures since the last success.
        window_calls: Outcomes counted in the sliding window.
        window_failures: Failures among them.
        open_until: When an open breaker half-opens (runtime clock), else None.
        opens: How many times it opened (trips and re-opens).
        reopens: Re-opens since it last closed (each doubles the open period).
        rejected: Calls it failed fast.
        last_failure: The last failure counted, in words.
    """

    server: str
    tool: str | None
    mode: str
    state: BreakerState
    consecutive_failures: int
    window_calls: int
    window_failures: int
    open_until: float | None
    opens: int
    reopens: int
    rejected: int
    last_failure: str | None


@final
@attrs.define(eq=False)
class Breaker:
    """The synchronous gate of one circuit breaker (a server's, or one tool's on a server).

    The hot path reads :attr:`passing`; only when it is False does it call :meth:`admit`,
    which may raise. Every call admitted is recorded once with the :attr:`epoch` it was
    admitted in (:meth:`succeeded`, :meth:`failed` or :meth:`release`), so an outcome that
    arrives after the state changed (a call sent before the breaker opened) is not taken for a
    probe's.

    Args:
        server: The server.
        tool: The tool, or None for the server's own breaker.
        policy: The ``circuit_breaker`` keys.
        on_change: Called synchronously at each state change (exceptions are logged).
    """

    server: str
    tool: str | None
    policy: BreakerPolicyLike
    on_change: BreakerChangeCallback | None = None
    #: True while a call may pass without :meth:`admit` (closed, or not enforcing).
    passing: bool = attrs.field(default=True, init=False)
    #: Bumped at every state change; outcomes of calls admitted in another epoch are stale.
    epoch: int = attrs.field(default=0, init=False)
    state: BreakerState = attrs.field(default=BreakerState.CLOSED, init=False)
    #: When an open breaker half-opens (runtime clock).
    half_open_at: float = attrs.field(default=0.0, init=False)
    #: The actor probes with ``ping`` / ``tools/list``: calls never do.
    actively_probed: bool = attrs.field(init=False)
    # Called with the gate when it opens, so its actor starts the timer (send_nowait).
    _notify: Callable[[Breaker], None] | None = attrs.field(default=None, init=False)
    _enforcing: bool = attrs.field(init=False)
    _counting: bool = attrs.field(init=False)
    #: True when a success slower than ``slow_call_s`` counts as a failure.
    times_calls: bool = attrs.field(init=False)
    # The epoch whose outcomes are counted: -1 while none are (disabled, or open).
    _live: int = attrs.field(default=0, init=False)
    _slow_s: float = attrs.field(init=False)
    _consecutive: int = attrs.field(default=0, init=False)
    _buckets_per_s: float = attrs.field(init=False)
    # The window's newest bucket (an absolute count of bucket lengths) and its slot.
    _bucket: int = attrs.field(default=0, init=False)
    _index: int = attrs.field(default=0, init=False)
    _calls: list[int] = attrs.field(init=False)
    _failures: list[int] = attrs.field(init=False)
    _window_calls: int = attrs.field(default=0, init=False)
    _window_failures: int = attrs.field(default=0, init=False)
    _probes_in_flight: int = attrs.field(default=0, init=False)
    _probe_successes: int = attrs.field(default=0, init=False)
    _opens: int = attrs.field(default=0, init=False)
    _reopens: int = attrs.field(default=0, init=False)
    _rejected: int = attrs.field(default=0, init=False)
    _last_failure: str | None = attrs.field(default=None, init=False)
    # Why it last opened, for the fast-fail message.
    _opened_for: str = attrs.field(default="", init=False)

    def __attrs_post_init__(self) -> None:
        mode = self.policy.mode
        self._counting = mode != "disabled"
        self._enforcing = mode == "enabled"
        self.actively_probed = self._counting and self.policy.probe != "call"
        self._live = 0 if self._counting else -1
        slow = self.policy.slow_call_s
        self.times_calls = slow > 0
        self._slow_s = slow if slow > 0 else math.inf
        self._buckets_per_s = _BUCKETS / self.policy.window_s
        self._calls = [0] * _BUCKETS
        self._failures = [0] * _BUCKETS

    @property
    def name(self) -> str:
        """``server`` or ``server/tool``."""
        return self.server if self.tool is None else f"{self.server}/{self.tool}"

    # -- hot path ---------------------------------------------------------------------------

    def admit(self) -> int:
        """Let a call through a breaker that is not :attr:`passing`, or fail it at once.

        Reads the clock once. A half-open breaker admits up to ``half_open_probes`` calls at a
        time as probes (none when the actor probes by itself).

        Returns:
            The epoch to record the call's outcome with.

        Raises:
            RMCPCircuitOpenError: The breaker is open, or half-open with its probes taken.
        """
        now = anyio.current_time()
        if self.state is BreakerState.OPEN:
            if now < self.half_open_at or self.actively_probed:
                raise self.rejection(now)
            # The timer is the actor's; a call arriving first need not wait for it to run.
            self._half_open(now, "the open period ended")
        if self.state is BreakerState.HALF_OPEN:
            if self.actively_probed or self._probes_in_flight >= self.policy.half_open_probes:
                raise self.rejection(now)
            self._probes_in_flight += 1
        return self.epoch

    def succeeded(self, epoch: int, now: float, elapsed_s: float) -> None:
        """Record a call whose attempt shows the dependency working (see :func:`fault_of`).

        Args:
            epoch: The :attr:`epoch` the call was admitted in.
            now: The runtime's clock now.
            elapsed_s: How long the attempt took (a slow call counts as a failure).
        """
        if epoch != self._live:
            return
        if elapsed_s > self._slow_s:
            self.failed(epoch, now, f"slow call: {elapsed_s:.3f} s, over slow_call_s={self._slow_s:g}")
            return
        # The common case, inlined: a success in the current bucket.
        self._consecutive = 0
        if int(now * self._buckets_per_s) != self._bucket:
            self._advance(now)
        self._calls[self._index] += 1
        self._window_calls += 1
        if self.state is BreakerState.HALF_OPEN:
            self._probe_done()
            self._probe_successes += 1
            if self._probe_successes >= self.policy.half_open_probes:
                self._close(now, f"{self._probe_successes} probe call(s) succeeded")

    def failed(self, epoch: int, now: float, reason: str) -> None:
        """Record a fault of the dependency.

        Args:
            epoch: The :attr:`epoch` the call was admitted in.
            now: The runtime's clock now.
            reason: What failed, for statistics and the breaker's messages.
        """
        if epoch != self._live:
            return
        self._last_failure = reason
        if self.state is BreakerState.HALF_OPEN:
            self._probe_done()
            self._open(now, f"a probe call failed: {reason}", reopen=True)
            return
        self._consecutive += 1
        self._advance(now)
        self._calls[self._index] += 1
        self._failures[self._index] += 1
        self._window_calls += 1
        self._window_failures += 1
        policy = self.policy
        if self._consecutive >= policy.failure_threshold:
            self._open(now, f"{self._consecutive} consecutive failures, the last: {reason}", reopen=False)
        elif (
            self._window_calls >= policy.min_calls
            and self._window_failures >= policy.failure_ratio * self._window_calls
        ):
            self._open(
                now,
                f"{self._window_failures} failures in the last {self._window_calls} calls "
                f"(failure_ratio={policy.failure_ratio:g}), the last: {reason}",
                reopen=False,
            )

    def release(self, epoch: int) -> None:
        """Record a call whose outcome says nothing about the dependency (frees a probe slot).

        Args:
            epoch: The :attr:`epoch` the call was admitted in.
        """
        if epoch == self.epoch and self.state is BreakerState.HALF_OPEN:
            self._probe_done()

    # -- control: the actor's side -----------------------------------------------------------

    def attach(self, notify: Callable[[Breaker], None]) -> None:
        """Have ``notify`` called with the gate each time it opens (its timer's owner)."""
        self._notify = notify

    def half_open(self, now: float) -> None:
        """End the open period (the actor's timer)."""
        if self.state is BreakerState.OPEN:
            self._half_open(now, "the open period ended")

    def close(self, now: float, reason: str) -> None:
        """Close a half-open breaker (the actor's probe succeeded)."""
        if self.state is BreakerState.HALF_OPEN:
            self._close(now, reason)

    def reopen(self, now: float, reason: str) -> None:
        """Open a half-open breaker again for a doubled period (the actor's probe failed)."""
        if self.state is BreakerState.HALF_OPEN:
            self._last_failure = reason
            self._open(now, f"the probe failed: {reason}", reopen=True, notify=False)

    def statistics(self, now: float | None = None) -> BreakerStatistics:
        """Return a snapshot of the breaker.

        Args:
            now: The runtime's clock (read when not given), to age the window.
        """
        if self._counting:
            self._advance(anyio.current_time() if now is None else now)
        return BreakerStatistics(
            server=self.server,
            tool=self.tool,
            mode=self.policy.mode,
            state=self.state,
            consecutive_failures=self._consecutive,
            window_calls=self._window_calls,
            window_failures=self._window_failures,
            open_until=self.half_open_at if self.state is BreakerState.OPEN else None,
            opens=self._opens,
            reopens=self._reopens,
            rejected=self._rejected,
            last_failure=self._last_failure,
        )

    # -- internals ---------------------------------------------------------------------------

    def rejection(self, now: float) -> RMCPCircuitOpenError:
        """Count a refused call and return its error (the breaker is open or probing)."""
        self._rejected += 1
        what = "the server" if self.tool is None else "this tool"
        if self.state is BreakerState.OPEN:
            wait = max(self.half_open_at - now, 0.0)
            message = (
                f"the circuit breaker of {what} is open ({self._opened_for}); calls fail at once "
                f"for {wait:.1f} s more, then a probe decides: call again after that, or check the server"
            )
        else:
            wait = 0.0
            message = (
                f"the circuit breaker of {what} is half-open and its probe is under way (last "
                f"failure: {self._last_failure}); call again in a moment"
            )
        return RMCPCircuitOpenError(
            message,
            half_open_at=self.half_open_at,
            retry_after_s=wait,
            server_wide=self.tool is None,
            server=self.server,
            tool=self.tool,
        )

    def _advance(self, now: float) -> None:
        bucket = int(now * self._buckets_per_s)
        last = self._bucket
        if bucket == last:
            return
        self._bucket = bucket
        self._index = bucket % _BUCKETS
        if bucket - last >= _BUCKETS or bucket < last:
            self._reset_window()
            return
        calls, failures = self._calls, self._failures
        for passed in range(last + 1, bucket + 1):
            index = passed % _BUCKETS
            self._window_calls -= calls[index]
            self._window_failures -= failures[index]
            calls[index] = failures[index] = 0

    def _reset_window(self) -> None:
        self._calls = [0] * _BUCKETS
        self._failures = [0] * _BUCKETS
        self._window_calls = self._window_failures = 0

    def _probe_done(self) -> None:
        if self._probes_in_flight > 0:
            self._probes_in_flight -= 1

    def _open(self, now: float, reason: str, *, reopen: bool, notify: bool = True) -> None:
        self._reopens = self._reopens + 1 if reopen else 0
        policy = self.policy
        period = min(policy.open_s * 2**self._reopens, policy.max_open_s)
        self.half_open_at = now + period
        self._opens += 1
        self._opened_for = reason
        self._consecutive = 0
        self._reset_window()
        self._change(BreakerState.OPEN, now, reason)
        if notify and self._notify is not None:
            self._notify(self)

    def _half_open(self, now: float, reason: str) -> None:
        self._probes_in_flight = 0
        self._probe_successes = 0
        self._change(BreakerState.HALF_OPEN, now, reason)

    def _close(self, now: float, reason: str) -> None:
        self._reopens = 0
        self._consecutive = 0
        self._reset_window()
        self._change(BreakerState.CLOSED, now, reason)

    def _change(self, new: BreakerState, now: float, reason: str) -> None:
        old = self.state
        self.state = new
        self.epoch += 1
        self._live = self.epoch if self._counting and new is not BreakerState.OPEN else -1
        self.passing = new is BreakerState.CLOSED or not self._enforcing
        # The window was just reset: it starts at this bucket.
        self._bucket = int(now * self._buckets_per_s)
        self._index = self._bucket % _BUCKETS
        change = BreakerChange(
            self.server,
            self.tool,
            old,
            new,
            now,
            reason,
            self.half_open_at if new is BreakerState.OPEN else None,
        )
        if new is BreakerState.OPEN:
            _logger.warning("circuit breaker %s opened until %.3f: %s", self.name, self.half_open_at, reason)
        else:
            _logger.info("circuit breaker %s is %s: %s", self.name, new.value, reason)
        if self.on_change is not None:
            try:
                self.on_change(change)
            except Exception:
                # The user's callback: its bug must not fail the call that changed the state.
                _logger.exception("on_breaker_change callback raised for breaker %s", self.name)


ProbeKind = Literal["ping", "tools_list"]
#: Probes the server once (raises on failure): ``ping`` or ``tools/list``.
Prober = Callable[[ProbeKind], Awaitable[None]]


def client_prober(current_client: Callable[[], Client | None]) -> Prober:
    """A prober over the server's current ``mcp.Client`` (no client: the probe fails).

    ``ping`` is the handshake era's ``ping``; the modern protocol removed it, and there the
    probe is its stateless equivalent, ``server/discover`` at the negotiated version.
    ``tools_list`` lists the tools past the client's response cache.

    Args:
        current_client: Returns the client of the server's usable session, or None.
    """

    async def probe(kind: ProbeKind) -> None:
        client = current_client()
        if client is None:
            raise ConnectionError("not connected")
        if kind == "tools_list":
            await client.list_tools(cache_mode="bypass")
        elif client.protocol_version in HANDSHAKE_PROTOCOL_VERSIONS:
            await client.session.send_ping()
        else:
            await client.session.send_discover(client.protocol_version)

    return probe


@final
class BreakerPass:
    """One attempt's passage through its server's breaker and its tool's (see :meth:`Breakers.admit`).

    The call path records the attempt's outcome on it exactly once: :meth:`record`, or
    :meth:`release` when the attempt never reached the server.
    """

    __slots__ = ("server", "server_epoch", "tool", "tool_epoch")

    def __init__(self, server: Breaker, server_epoch: int, tool: Breaker, tool_epoch: int) -> None:
        self.server = server
        self.server_epoch = server_epoch
        self.tool = tool
        self.tool_epoch = tool_epoch

    @property
    def timed(self) -> bool:
        """Whether either breaker counts slow calls (``record`` then wants ``sent_at``)."""
        return self.server.times_calls or self.tool.times_calls

    def record(self, fault: Fault, now: float, sent_at: float | None, reason: str) -> None:
        """Count the attempt's outcome on both breakers.

        Args:
            fault: What the outcome says (:func:`fault_of`).
            now: The runtime's clock when the outcome arrived.
            sent_at: When the request was handed to the transport (for ``slow_call_s``); None
                if it never was.
            reason: The failure in words (for a fault).
        """
        if fault is Fault.NONE:
            elapsed = 0.0 if sent_at is None else now - sent_at
            self.server.succeeded(self.server_epoch, now, elapsed)
            self.tool.succeeded(self.tool_epoch, now, elapsed)
        elif fault is Fault.IGNORED:
            self.release()
        else:
            if fault is Fault.SERVER:
                self.server.failed(self.server_epoch, now, reason)
            else:
                self.server.release(self.server_epoch)
            self.tool.failed(self.tool_epoch, now, reason)

    def release(self) -> None:
        """The attempt says nothing about the dependency: free any probe slot it held."""
        self.server.release(self.server_epoch)
        self.tool.release(self.tool_epoch)


@final
@attrs.frozen
class BreakersStatistics:
    """A snapshot of one server's circuit breakers.

    Attributes:
        server: The server's own breaker.
        tools: The breakers of the server's tools that were called.
    """

    server: BreakerStatistics
    tools: tuple[BreakerStatistics, ...]


@final
@attrs.define(eq=False)
class Breakers:
    """The circuit breakers of one server: its own, and one per tool, created on first use.

    Plain state, kept in the server's ``ServerFlow``: the :class:`BreakerActor` that times them
    may restart (or not be running) without losing a count.

    Args:
        server: The server's name.
        policy: The server's ``circuit_breaker`` keys.
        on_change: Called at every state change of any of the server's breakers.
    """

    server_name: str
    policy: BreakerPolicyLike
    on_change: BreakerChangeCallback | None = None
    server: Breaker = attrs.field(init=False)
    tools: dict[str, Breaker] = attrs.field(factory=dict[str, Breaker], init=False)
    # The running actor's "a gate opened" hook; None while no actor runs.
    timer: Callable[[Breaker], None] | None = attrs.field(default=None, init=False)
    # The newest connection generation whose loss was counted.
    _lost_generation: int = attrs.field(default=-1, init=False)

    def __attrs_post_init__(self) -> None:
        self.server = self._gate(None, self.policy)

    def tool(self, tool: str, policy: BreakerPolicyLike) -> Breaker:
        """The breaker of ``tool``, created with ``policy`` on first use."""
        gate = self.tools.get(tool)
        if gate is None:
            gate = self.tools[tool] = self._gate(tool, policy)
        return gate

    def admit(self, tool: str, policy: BreakerPolicyLike) -> BreakerPass:
        """Pass one attempt through the server's breaker, then the tool's.

        While both are closed this reads two attributes per gate and never the clock.

        Raises:
            RMCPCircuitOpenError: One of them refuses the call; nothing is held.
        """
        server = self.server
        tool_gate = self.tools.get(tool) or self.tool(tool, policy)
        server_epoch = server.epoch if server.passing else server.admit()
        if tool_gate.passing:
            return BreakerPass(server, server_epoch, tool_gate, tool_gate.epoch)
        try:
            tool_epoch = tool_gate.admit()
        except RMCPCircuitOpenError:
            server.release(server_epoch)
            raise
        return BreakerPass(server, server_epoch, tool_gate, tool_epoch)

    def open_rejection(self, tool: str, now: float) -> RMCPCircuitOpenError | None:
        """The error of a call refused by an open breaker (the server's, or ``tool``'s if it has
        one), or ``None`` when :meth:`admit` must decide (a half-open or closed breaker).

        Changes nothing but the rejection count: the call path asks before it builds the call's
        deadline scope, so a fast-fail costs a fraction of a call.
        """
        for gate in (self.server, self.tools.get(tool)):
            if (
                gate is not None
                and gate.state is BreakerState.OPEN
                and (now < gate.half_open_at or gate.actively_probed)
            ):
                return gate.rejection(now)
        return None

    def first_loss_of(self, generation: int) -> bool:
        """Whether a lost session (connection ``generation``) is news: the first of its calls.

        One transport death fails every call in flight on it at once; it is one fault of the
        server, counted once, not once per caller (eight callers would otherwise open the
        breaker at a single crash that the connection repairs by itself).
        """
        if generation <= self._lost_generation:
            return False
        self._lost_generation = generation
        return True

    def gates(self) -> Iterable[Breaker]:
        """Every breaker of the server: its own first, then its tools'."""
        yield self.server
        yield from self.tools.values()

    def statistics(self, now: float | None = None) -> BreakersStatistics:
        """Return a snapshot of every breaker of the server."""
        now = anyio.current_time() if now is None else now
        return BreakersStatistics(
            server=self.server.statistics(now),
            tools=tuple(gate.statistics(now) for gate in self.tools.values()),
        )

    def _gate(self, tool: str | None, policy: BreakerPolicyLike) -> Breaker:
        gate = Breaker(self.server_name, tool, policy, self.on_change)
        gate.attach(self._opened)
        return gate

    def _opened(self, gate: Breaker) -> None:
        if self.timer is not None:
            self.timer(gate)
        # Without a running actor, the one that starts next takes over every open gate.


@final
@attrs.frozen
class Tripped:
    """A gate opened: its actor starts the timer that half-opens it."""

    breaker: Breaker


@final
@attrs.frozen
class BreakerActorStatistics(ActorStatistics):
    """A snapshot of one server's breaker actor: its inbox, and the breakers it times."""

    breakers: BreakersStatistics


@final
@attrs.define(eq=False)
class BreakerActor(Actor[Tripped]):
    """The actor owning the timers of one server's circuit breakers (``breaker:<server>``).

    It half-opens each open gate when its period ends and, where the gate's policy says
    ``probe = "ping"`` or ``"tools_list"``, probes the server itself and closes or re-opens
    the gate. A (re)started actor first takes over every gate that is open or probing.

    Args:
        name: The actor's name.
        breakers: The server's breakers.
        prober: Probes the server (``ping`` / ``tools/list``).
        probe_timeout_s: How long a probe may take before it counts as failed.
    """

    breakers: Breakers
    prober: Prober
    probe_timeout_s: float = 10.0
    _task_group: anyio.abc.TaskGroup | None = attrs.field(default=None, init=False)
    _watched: set[Breaker] = attrs.field(factory=set[Breaker], init=False)

    def statistics(self) -> BreakerActorStatistics:
        """Return a snapshot of the inbox and of every breaker."""
        inbox = super().statistics()
        return BreakerActorStatistics(
            name=self.name,
            inbox_used=inbox.inbox_used,
            inbox_size=inbox.inbox_size,
            breakers=self.breakers.statistics(),
        )

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve the inbox and the timers until cancelled."""
        try:
            async with anyio.create_task_group() as task_group:
                self._task_group = task_group
                self.breakers.timer = self._opened
                for gate in self.breakers.gates():
                    if gate.state is not BreakerState.CLOSED:
                        self._watch(gate)
                await task_group.start(super().run)
                task_status.started()
        finally:
            if self.breakers.timer == self._opened:
                self.breakers.timer = None
            self._task_group = None
            self._watched.clear()

    async def handle(self, message: Tripped) -> None:
        """Start the timer of a gate that opened."""
        self._watch(message.breaker)

    def _opened(self, gate: Breaker) -> None:
        try:
            self.send_nowait(Tripped(gate))
        except anyio.WouldBlock:
            # Opening never waits. A gate probed by calls half-opens by itself at the next
            # call; one probed actively is taken over when the actor next starts.
            _logger.warning("breaker actor %s missed the opening of %s", self.name, gate.name)

    def _watch(self, gate: Breaker) -> None:
        if gate not in self._watched and self._task_group is not None:
            self._watched.add(gate)
            self._task_group.start_soon(self._time, gate)

    async def _time(self, gate: Breaker) -> None:
        try:
            while True:
                if gate.state is BreakerState.OPEN:
                    epoch = gate.epoch
                    await anyio.sleep_until(gate.half_open_at)
                    if gate.epoch != epoch:
                        return  # a call half-opened it first
                    gate.half_open(anyio.current_time())
                if gate.state is not BreakerState.HALF_OPEN or not gate.actively_probed:
                    return
                epoch = gate.epoch
                failure = await self._probe(gate)
                if gate.epoch != epoch:
                    return
                now = anyio.current_time()
                if failure is None:
                    gate.close(now, f"the {gate.policy.probe} probe succeeded")
                    return
                gate.reopen(now, failure)
        finally:
            self._watched.discard(gate)

    async def _probe(self, gate: Breaker) -> str | None:
        """Probe the server once; the failure in words, or None on success."""
        kind: ProbeKind = "ping" if gate.policy.probe == "ping" else "tools_list"
        with anyio.move_on_after(self.probe_timeout_s):
            try:
                await self.prober(kind)
            except Exception as error:
                return f"{type(error).__name__}: {error}"
            return None
        return f"no answer to the {kind} probe within {self.probe_timeout_s:g} s"
