"""Circuit breakers: the gate's state machine, its window, the timer actor and fault_of.

Time is trio's MockClock (autojump): an open period of 30 s passes in no real time.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import trio
import trio.testing

from rmcp_actors import RMCPCircuitOpenError
from rmcp_actors._protocol import NackCode
from rmcp_actors.client._failures import Attempt
from rmcp_actors.config import CircuitBreakerPolicy
from rmcp_actors.flow.breaker import (
    Breaker,
    BreakerActor,
    BreakerChange,
    Breakers,
    BreakerState,
    Fault,
    ProbeKind,
    fault_of,
)

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


Policy = CircuitBreakerPolicy


def now() -> float:
    return trio.current_time()


def gate(changes: list[BreakerChange] | None = None, **policy: Any) -> Breaker:
    return Breaker("srv", "tool", Policy(**policy), None if changes is None else changes.append)


def call(breaker: Breaker) -> int:
    """Admit one call the way the hot path does."""
    return breaker.epoch if breaker.passing else breaker.admit()


def fail(breaker: Breaker, times: int = 1) -> None:
    for _ in range(times):
        breaker.failed(call(breaker), now(), "timed out")


def succeed(breaker: Breaker, elapsed_s: float = 0.01) -> None:
    breaker.succeeded(call(breaker), now(), elapsed_s)


# -- what counts --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "fault"),
    [
        # Answers: a result, a tool's error result, an ACK.
        ({"attempt": None}, Fault.NONE),
        # NACKs that blame the caller's request, not the server.
        ({"attempt": None, "nack_code": NackCode.IDEMPOTENCY_CONFLICT}, Fault.NONE),
        ({"attempt": None, "nack_code": NackCode.INVALID_META}, Fault.NONE),
        ({"attempt": None, "nack_code": NackCode.INVALID_ARGUMENTS}, Fault.NONE),
        ({"attempt": None, "nack_code": NackCode.UNKNOWN_TOOL}, Fault.NONE),
        # Rate limiting is the limiter's.
        ({"attempt": None, "nack_code": NackCode.RATE_LIMITED}, Fault.IGNORED),
        ({"attempt": Attempt.ANSWERED, "rpc_code": -32023}, Fault.IGNORED),
        # The server as a whole cannot take calls.
        ({"attempt": None, "nack_code": NackCode.OVERLOADED}, Fault.SERVER),
        ({"attempt": None, "nack_code": NackCode.UNAVAILABLE}, Fault.SERVER),
        ({"attempt": None, "nack_code": NackCode.SHUTTING_DOWN}, Fault.SERVER),
        # The server tells of an earlier run a crash cut short: that crash was counted.
        ({"attempt": None, "nack_code": NackCode.IN_DOUBT}, Fault.NONE),
        ({"attempt": None, "nack_code": "some_future_code"}, Fault.TOOL),
        # Transport faults, timeouts, lost answers.
        ({"attempt": Attempt.NOT_SENT}, Fault.SERVER),
        ({"attempt": Attempt.SENT_AND_LOST, "session_lost": True}, Fault.SERVER),
        ({"attempt": Attempt.SENT_AND_LOST}, Fault.TOOL),
        ({"attempt": Attempt.TIMED_OUT}, Fault.TOOL),
        ({"attempt": Attempt.REFUSED, "session_lost": True}, Fault.IGNORED),
        # JSON-RPC errors: a server failing a call counts; a refusal of a malformed request does not.
        ({"attempt": Attempt.ANSWERED, "rpc_code": -32603}, Fault.TOOL),
        ({"attempt": Attempt.ANSWERED, "rpc_code": -32602}, Fault.NONE),
        ({"attempt": Attempt.ANSWERED, "rpc_code": -32601}, Fault.NONE),
        ({"attempt": Attempt.ANSWERED, "rpc_code": -32600}, Fault.NONE),
        ({"attempt": Attempt.ANSWERED, "rpc_code": -32000}, Fault.TOOL),
        ({"attempt": Attempt.ANSWERED, "rpc_code": -32050}, Fault.TOOL),
        ({"attempt": Attempt.UNREADABLE}, Fault.NONE),
    ],
)
def test_fault_of(kwargs: dict[str, Any], fault: Fault) -> None:
    attempt = kwargs.pop("attempt")
    assert fault_of(attempt, **kwargs) is fault


def test_fault_of_covers_every_attempt_and_nack() -> None:
    for attempt in [None, *Attempt]:
        for session_lost in (False, True):
            assert isinstance(fault_of(attempt, session_lost=session_lost), Fault)
    for code in NackCode:
        assert isinstance(fault_of(None, nack_code=code), Fault)


# -- the gate -------------------------------------------------------------------------------


async def test_consecutive_failures_open_it_and_calls_fail_fast(autojump_clock: Any) -> None:
    changes: list[BreakerChange] = []
    breaker = gate(changes)
    fail(breaker, 4)
    assert breaker.passing
    assert breaker.state is CLOSED
    fail(breaker)
    assert (breaker.state, breaker.passing) == (OPEN, False)
    assert breaker.half_open_at == pytest.approx(now() + 30)
    await trio.sleep(10)
    with pytest.raises(RMCPCircuitOpenError) as caught:
        call(breaker)
    error = caught.value
    assert error.may_have_executed is False
    assert error.retry_after_s == pytest.approx(20)
    assert error.half_open_at == breaker.half_open_at
    assert (error.server, error.tool, error.server_wide) == ("srv", "tool", False)
    assert "5 consecutive failures" in error.message
    assert "timed out" in error.message
    assert [(c.old, c.new) for c in changes] == [(CLOSED, OPEN)]
    assert changes[0].half_open_at == breaker.half_open_at
    assert breaker.statistics().rejected == 1


async def test_a_success_resets_the_consecutive_count(autojump_clock: Any) -> None:
    breaker = gate(min_calls=1000)
    for _ in range(3):
        fail(breaker, 4)
        succeed(breaker)
    assert breaker.state is CLOSED
    assert breaker.statistics().consecutive_failures == 0


async def test_low_rate_traffic_trips_on_consecutive_failures(autojump_clock: Any) -> None:
    # One call a minute: the 30 s window never holds min_calls, the ratio never applies.
    breaker = gate()
    for _ in range(4):
        fail(breaker)
        await trio.sleep(60)
    assert breaker.state is CLOSED
    assert breaker.statistics().window_calls == 0
    fail(breaker)
    assert breaker.state is OPEN


async def test_the_ratio_trips_only_after_min_calls(autojump_clock: Any) -> None:
    # Failure, success, failure, ...: never two failures in a row.
    breaker = gate(failure_threshold=100)
    for _ in range(4):
        fail(breaker)
        succeed(breaker)
    fail(breaker)
    assert breaker.statistics().window_calls == 9
    assert breaker.state is CLOSED  # 5 of 9 fail, but only 9 calls were seen
    succeed(breaker)
    assert breaker.state is CLOSED  # a success never trips it
    fail(breaker)
    assert breaker.state is OPEN  # 6 of 11
    with pytest.raises(RMCPCircuitOpenError, match=r"6 failures in the last 11 calls \(failure_ratio=0.5\)"):
        call(breaker)


async def test_a_ratio_below_the_threshold_keeps_it_closed(autojump_clock: Any) -> None:
    breaker = gate(failure_threshold=100)
    for _ in range(50):
        fail(breaker)
        succeed(breaker)
        succeed(breaker)
    assert breaker.state is CLOSED
    stats = breaker.statistics()
    assert (stats.window_calls, stats.window_failures) == (150, 50)


async def test_the_window_forgets_old_calls(autojump_clock: Any) -> None:
    breaker = gate(failure_threshold=100, min_calls=4)
    fail(breaker, 3)
    await trio.sleep(31)  # past window_s: those three are forgotten
    assert breaker.statistics().window_calls == 0
    succeed(breaker)
    succeed(breaker)
    fail(breaker)
    assert breaker.state is CLOSED  # 1 of 3 in the window
    await trio.sleep(15)
    fail(breaker)
    assert breaker.state is OPEN  # 2 of 4


async def test_full_lifecycle_with_a_doubling_open_period(autojump_clock: Any) -> None:
    changes: list[BreakerChange] = []
    breaker = gate(changes, max_open_s=100)
    fail(breaker, 5)
    opened = now()
    # Half-open once the open period ends: one probe call passes, the next is refused.
    await trio.sleep(30)
    probe = call(breaker)
    assert breaker.state is HALF_OPEN
    with pytest.raises(RMCPCircuitOpenError, match="half-open") as caught:
        call(breaker)
    assert caught.value.retry_after_s == 0
    # The probe fails: open again for twice as long.
    breaker.failed(probe, now(), "timed out")
    assert breaker.state is OPEN
    assert breaker.half_open_at == pytest.approx(opened + 30 + 60)
    await trio.sleep(59)
    with pytest.raises(RMCPCircuitOpenError):
        call(breaker)
    await trio.sleep(1)
    fail(breaker)  # the probe fails again: 120 s, capped at max_open_s
    assert breaker.half_open_at == pytest.approx(now() + 100)
    assert breaker.statistics().reopens == 2
    await trio.sleep(100)
    succeed(breaker)  # the probe succeeds: closed, the period back to open_s
    assert (breaker.state, breaker.passing) == (CLOSED, True)
    stats = breaker.statistics()
    assert (stats.reopens, stats.opens, stats.window_calls) == (0, 3, 0)
    fail(breaker, 5)
    assert breaker.half_open_at == pytest.approx(now() + 30)
    assert [(c.old.value, c.new.value) for c in changes] == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "open"),
        ("open", "half_open"),
        ("half_open", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
        ("closed", "open"),
    ]


async def test_half_open_admits_the_configured_probes(autojump_clock: Any) -> None:
    breaker = gate(half_open_probes=2)
    fail(breaker, 5)
    await trio.sleep(30)
    first, second = call(breaker), call(breaker)
    with pytest.raises(RMCPCircuitOpenError):
        call(breaker)
    # A probe whose outcome says nothing (rate limited, cancelled) frees its slot.
    breaker.release(first)
    third = call(breaker)
    breaker.succeeded(second, now(), 0.01)
    assert breaker.state is HALF_OPEN  # one of two probes succeeded
    breaker.succeeded(third, now(), 0.01)
    assert breaker.state is CLOSED


async def test_an_outcome_from_before_the_state_changed_is_ignored(autojump_clock: Any) -> None:
    breaker = gate()
    early = call(breaker)  # sent while closed, answered after the breaker opened
    fail(breaker, 5)
    await trio.sleep(30)
    probe = call(breaker)
    breaker.succeeded(early, now(), 0.01)
    assert breaker.state is HALF_OPEN  # not taken for the probe's answer
    breaker.failed(early, now(), "timed out")
    assert breaker.state is HALF_OPEN
    breaker.succeeded(probe, now(), 0.01)
    assert breaker.state is CLOSED


async def test_slow_calls_count_as_failures(autojump_clock: Any) -> None:
    breaker = gate(slow_call_s=2.0)
    for _ in range(4):
        succeed(breaker, elapsed_s=2.5)
    succeed(breaker, elapsed_s=1.0)  # fast enough: resets
    for _ in range(5):
        succeed(breaker, elapsed_s=3.0)
    assert breaker.state is OPEN
    assert "slow call" in (breaker.statistics().last_failure or "")


async def test_metrics_only_counts_and_reports_but_never_rejects(autojump_clock: Any) -> None:
    changes: list[BreakerChange] = []
    breaker = gate(changes, mode="metrics_only")
    fail(breaker, 5)
    assert breaker.state is OPEN
    assert breaker.passing
    for _ in range(100):
        fail(breaker)  # all pass; while open they are not counted
    assert breaker.statistics().rejected == 0
    breaker.half_open(now() + 30)  # the actor's timer
    succeed(breaker)
    assert breaker.state is CLOSED
    assert [c.new for c in changes] == [OPEN, HALF_OPEN, CLOSED]


async def test_disabled_counts_nothing(autojump_clock: Any) -> None:
    breaker = gate(mode="disabled")
    fail(breaker, 50)
    stats = breaker.statistics()
    assert (stats.state, stats.consecutive_failures, stats.window_calls) == (CLOSED, 0, 0)
    assert breaker.passing


async def test_a_raising_callback_is_logged_and_the_change_happens(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    def explode(change: BreakerChange) -> None:
        raise RuntimeError("callback bug")

    breaker = Breaker("srv", None, Policy(), explode)
    with caplog.at_level(logging.ERROR, logger="rmcp_actors"):
        fail(breaker, 5)
    assert breaker.state is OPEN
    assert "on_breaker_change callback raised" in caplog.text
    with pytest.raises(RMCPCircuitOpenError) as caught:
        call(breaker)
    assert caught.value.server_wide
    assert "of the server" in caught.value.message


# -- the actor ------------------------------------------------------------------------------


async def never_probed(kind: ProbeKind) -> None:
    raise AssertionError("probe = 'call': the actor never probes")


def breakers(changes: list[BreakerChange] | None = None, **policy: Any) -> Breakers:
    return Breakers("srv", Policy(**policy), None if changes is None else changes.append)


async def test_the_actor_half_opens_an_open_breaker_on_time(autojump_clock: Any) -> None:
    changes: list[BreakerChange] = []
    gates = breakers(changes)
    actor = BreakerActor("breaker:srv", gates, never_probed)
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        breaker = gates.tool("tool", Policy(open_s=5))
        assert gates.tool("tool", Policy()) is breaker
        fail(breaker, 5)
        await trio.sleep(4.9)
        assert breaker.state is OPEN
        await trio.sleep(0.2)
        assert breaker.state is HALF_OPEN  # no call came: the timer did it
        assert changes[-1].at == pytest.approx(5.0 + changes[0].at)
        stats = actor.statistics().breakers
        assert stats.server.state is CLOSED
        assert [(s.tool, s.state) for s in stats.tools] == [("tool", HALF_OPEN)]
        nursery.cancel_scope.cancel()


async def test_probe_ping_replaces_a_user_call(autojump_clock: Any) -> None:
    probes: list[tuple[float, ProbeKind]] = []
    answers = iter([ConnectionError("refused"), None])

    async def prober(kind: ProbeKind) -> None:
        probes.append((now(), kind))
        await trio.sleep(0.5)
        answer = next(answers)
        if answer is not None:
            raise answer

    changes: list[BreakerChange] = []
    gates = breakers(changes, probe="ping")
    actor = BreakerActor("breaker:srv", gates, prober)
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        breaker = gates.server
        fail(breaker, 5)
        opened = now()
        await trio.sleep(30.1)
        # Half-open, the actor's ping under way: user calls are not used as probes.
        assert breaker.state is HALF_OPEN
        with pytest.raises(RMCPCircuitOpenError, match="half-open"):
            call(breaker)
        await trio.sleep(0.5)
        # The ping failed: open for twice as long, then pinged again, which succeeds.
        assert breaker.state is OPEN
        assert breaker.half_open_at == pytest.approx(opened + 30.5 + 60)
        await trio.sleep(61)
        assert breaker.state is CLOSED
        assert [kind for _, kind in probes] == ["ping", "ping"]
        assert probes[1][0] == pytest.approx(opened + 90.5)
        assert [c.new for c in changes] == [OPEN, HALF_OPEN, OPEN, HALF_OPEN, CLOSED]
        assert "ConnectionError: refused" in changes[2].reason
        succeed(breaker)
        assert breaker.state is CLOSED
        nursery.cancel_scope.cancel()


async def test_a_probe_that_hangs_counts_as_failed(autojump_clock: Any) -> None:
    async def prober(kind: ProbeKind) -> None:
        await trio.sleep_forever()

    gates = breakers(probe="tools_list")
    actor = BreakerActor("breaker:srv", gates, prober, probe_timeout_s=2)
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        fail(gates.server, 5)
        await trio.sleep(32.5)
        assert gates.server.state is OPEN
        last_failure = gates.server.statistics().last_failure or ""
        assert "no answer to the tools_list probe within 2 s" in last_failure
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("probe", ["call", "ping"])
async def test_a_restarted_actor_takes_over_the_open_breakers(autojump_clock: Any, probe: Any) -> None:
    async def prober(kind: ProbeKind) -> None:
        pass

    gates = breakers(probe=probe)
    async with trio.open_nursery() as nursery:
        await nursery.start(BreakerActor("breaker:srv", gates, prober).run)
        fail(gates.server, 5)
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    # Stopped while the breaker was open (its timer gone); the gates outlive the actor. A gate
    # that opens while no actor runs is taken over too.
    fail(gates.tool("t", Policy(probe=probe)), 5)
    async with trio.open_nursery() as nursery:
        await nursery.start(BreakerActor("breaker:srv", gates, prober).run)
        await trio.sleep(30.5)  # both periods ended (at 30 s and 31 s)
        expected = HALF_OPEN if probe == "call" else CLOSED
        assert (gates.server.state, gates.tools["t"].state) == (expected, expected)
        nursery.cancel_scope.cancel()


async def test_opening_never_waits_on_a_full_inbox(autojump_clock: Any) -> None:
    gates = breakers()
    actor = BreakerActor("breaker:srv", gates, never_probed, inbox_size=1)
    gates.timer = actor._opened  # as if running, but its inbox is never read
    fail(gates.tool("a", Policy()), 5)
    fail(gates.tool("b", Policy()), 5)  # the inbox is full: the gate opens all the same
    other = gates.tools["b"]
    assert other.state is OPEN
    await trio.sleep(30)
    call(other)  # probed by calls, the gate half-opens without its timer
    assert other.state is HALF_OPEN


def test_a_lost_session_is_news_once() -> None:
    gates = Breakers("srv", Policy())
    assert gates.first_loss_of(3)
    assert not gates.first_loss_of(3)  # another caller on the same dead transport
    assert not gates.first_loss_of(2)  # an older generation's straggler
    assert gates.first_loss_of(4)


async def test_open_rejection_refuses_only_while_open_and_changes_nothing_else(autojump_clock: Any) -> None:
    gates = breakers()
    assert gates.open_rejection("tool", now()) is None  # closed
    tool = gates.tool("tool", Policy(open_s=5))
    fail(tool, 5)
    refused = gates.open_rejection("tool", now())
    assert isinstance(refused, RMCPCircuitOpenError)
    assert (refused.tool, refused.server_wide, refused.may_have_executed) == ("tool", False, False)
    assert gates.open_rejection("other", now()) is None  # another tool's calls pass
    await trio.sleep(5.1)
    # The open period is over: admit() decides (and half-opens); the early check stays out.
    assert gates.open_rejection("tool", now()) is None
    assert tool.state is OPEN
    call(tool)
    assert tool.state is HALF_OPEN
    assert gates.open_rejection("tool", now()) is None
    fail(gates.server, 5)
    server_refused = gates.open_rejection("tool", now())
    assert server_refused is not None
    assert server_refused.server_wide
