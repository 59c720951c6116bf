"""A call that can go at once (a usable session, every gate free): its timeout, an enclosing
cancel, and what it leaves on the breakers and the scheduler's lane; and the records it builds.

These pin the error mapping and the bookkeeping of the admission fast path (no wait for a
session, a token or a slot), whatever it costs: a timeout is the SDK's, mapped to
``RMCPTimeoutAfterSendError``; an enclosing cancel propagates unchanged, counts no fault on the
breakers and gives the slot back. Real in-memory servers on both wires, MockClock time.
"""

from __future__ import annotations

from typing import Any

import attrs
import pytest
import trio
import trio.testing
from mcp_test_server import State, build_server
from mcp_types import CallToolResult

from rmcp_actors import CallResult, Outcome, RMCPSupervisor, RMCPTimeoutAfterSendError, ServerSpec
from rmcp_actors.client._records import (  # pyright: ignore[reportPrivateUsage]
    _setters,  # pyright: ignore[reportPrivateUsage]
    call_result,
    lifecycle_event,
)
from rmcp_actors.client.call import CallRequest
from rmcp_actors.lifecycle import LifecycleEvent, RequestState

WIRES = pytest.mark.parametrize("wire", ["jsonrpc", "direct"])


def lane_counts(sup: RMCPSupervisor) -> tuple[int, int, int]:
    [lane] = sup.statistics().scheduler.lanes
    return lane.running, lane.queued, sup.statistics().scheduler.running


def tool_breaker(sup: RMCPSupervisor, tool: str) -> tuple[int, int, int]:
    stats = next(s for s in sup.statistics().breakers if s.tool == tool)
    return stats.consecutive_failures, stats.window_calls, stats.window_failures


async def open_warm(sup: RMCPSupervisor, wire: Any) -> None:
    await sup.add_server(ServerSpec.in_memory("test", build_server(State()), wire=wire))
    # Warm: connected, the tools' breakers and policies exist, so the next calls go at once.
    for tool, arguments in (("echo", {"text": "warm"}), ("sleep", {"seconds": 0})):
        await sup.call("test", tool, arguments)


@WIRES
async def test_a_free_call_that_hangs_ends_in_the_sdk_timeout(
    autojump_clock: trio.testing.MockClock, wire: Any
) -> None:
    async with RMCPSupervisor.open() as sup:
        await open_warm(sup, wire)
        before = tool_breaker(sup, "sleep")
        started = trio.current_time()
        with pytest.raises(RMCPTimeoutAfterSendError) as caught:
            await sup.call("test", "sleep", {"seconds": 10}, timeout=0.05)
        error = caught.value
        # The SDK's per-request timeout (the deadline less its margin) ended it, not our scope.
        assert error.message == (
            "no answer within the call's timeout of 0.05 s; the request was sent, so the tool may "
            "have run: check its effect, or raise timeout_s"
        )
        assert trio.current_time() - started == pytest.approx(0.03)
        assert error.may_have_executed is True
        assert [event.state for event in error.lifecycle] == [
            RequestState.QUEUED,
            RequestState.SENT,
            RequestState.UNKNOWN,
        ]
        assert error.lifecycle[-1].detail == "RMCPTimeoutAfterSendError"
        # One fault of the tool on its breaker; the slot is back.
        assert tool_breaker(sup, "sleep") == (1, before[1] + 1, before[2] + 1)
        assert lane_counts(sup) == (0, 0, 0)
        assert (await sup.call("test", "echo", {"text": "after"})).attempts == 1


@WIRES
async def test_an_enclosing_cancel_of_a_free_call_propagates_and_counts_no_fault(
    autojump_clock: trio.testing.MockClock, wire: Any
) -> None:
    async with RMCPSupervisor.open() as sup:
        await open_warm(sup, wire)
        before = tool_breaker(sup, "sleep")
        seen: list[RequestState] = []
        with trio.move_on_after(1) as outer:
            await sup.call(
                "test",
                "sleep",
                {"seconds": 10},
                timeout=30,
                on_lifecycle=lambda event: seen.append(event.state),
            )
        assert outer.cancelled_caught
        assert trio.current_time() == pytest.approx(outer.deadline)
        # Sent, then cancelled from outside: no step of ours ends it, nothing is counted.
        assert seen == [RequestState.QUEUED, RequestState.SENT]
        assert tool_breaker(sup, "sleep") == before
        assert lane_counts(sup) == (0, 0, 0)
        assert (await sup.call("test", "echo", {"text": "after"})).attempts == 1


@WIRES
async def test_an_enclosing_cancel_before_a_free_call_sends_nothing(
    autojump_clock: trio.testing.MockClock, wire: Any
) -> None:
    state = State()
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("test", build_server(state), wire=wire))
        await sup.call("test", "record", {"label": "warm"})
        before = tool_breaker(sup, "record")
        seen: list[RequestState] = []
        with trio.CancelScope() as outer:
            outer.cancel()
            await sup.call("test", "record", {"label": "never"}, on_lifecycle=lambda e: seen.append(e.state))
        assert outer.cancelled_caught
        assert seen == [RequestState.QUEUED]
        assert "never" not in state.ledger
        assert tool_breaker(sup, "record") == before
        assert lane_counts(sup) == (0, 0, 0)


def test_records_built_through_their_slots_equal_the_constructed_ones() -> None:
    event = lifecycle_event(RequestState.ACKED, 2, 1.5, "duplicate")
    assert type(event) is LifecycleEvent
    assert event == LifecycleEvent(RequestState.ACKED, 2, 1.5, "duplicate")
    assert hash(event) == hash(LifecycleEvent(RequestState.ACKED, 2, 1.5, "duplicate"))
    fields: dict[str, Any] = {
        "outcome": Outcome.SUCCEEDED,
        "content": [],
        "structured_content": {"n": 1},
        "is_error": False,
        "attempts": 1,
        "duplicate": True,
        "request_id": "r",
        "idempotency_key": "k",
        "server": "s",
        "tool": "t",
        "queued_s": 0.25,
        "elapsed_s": 0.5,
        "meta": {"m": 1},
        "lifecycle": (event,),
        "transfers": (),
    }
    answer = CallToolResult.model_validate(
        {"content": [], "structuredContent": {"n": 1}, "isError": False, "_meta": {"m": 1}}
    )
    request = CallRequest("t", {}, "r", "k", 0, 10.0)
    result = call_result(answer, True, request, "s", 1, 0.25, 0.5, (event,))
    assert type(result) is CallResult
    assert result == CallResult(**fields)
    assert repr(result) == repr(CallResult(**fields))
    assert attrs.asdict(result, recurse=False) == fields
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        result.attempts = 2  # type: ignore[misc]
    failed = call_result(CallToolResult(content=[], is_error=True), False, request, "s", 1, 0.0, 0.5, ())
    assert (failed.outcome, failed.is_error, failed.meta) == (Outcome.FAILED, True, None)


def test_a_record_class_that_validates_is_refused() -> None:
    @attrs.frozen
    class Checked:
        at: float = attrs.field(validator=attrs.validators.ge(0))

    with pytest.raises(TypeError, match="validates or converts"):
        _setters(Checked, "at")
    with pytest.raises(TypeError, match="has fields"):
        _setters(LifecycleEvent, "state", "attempt", "at")
