"""The hot path stays free of inbox hops: task switches per call, counted with a trio Instrument.

A call runs in the caller's task and only reads the synchronous gates the actors publish (the
scheduler's slot, the connection's session lease). Routing it through an actor's inbox would
add at least two task switches per call (the actor wakes for the request, the caller for the
reply). The baselines below are what the code costs today; all of them are the SDK's: the
direct wire calls the server in the caller's task (one checkpoint), and the in-memory
JSON-RPC wire moves a request and its answer through the SDK's streams and tasks.
"""

from __future__ import annotations

import sys
from types import FrameType
from typing import Any

import pytest
import trio
import trio.abc
from mcp_test_server import State, build_server

from rmcp_actors import MemoryStore, Outcome, RMCPSupervisor, ServerSpec

CALLS = 20
# Task switches (trio ``task_scheduled`` events) per sequential call on a warm connection.
# A change that removes switches should lower these, so that the guard stays tight.
BASELINE = {"direct": 1, "jsonrpc": 12}


class SwitchCounter(trio.abc.Instrument):
    """Counts every time a task is scheduled to run: one per task switch."""

    def __init__(self) -> None:
        self.switches = 0

    def task_scheduled(self, task: trio.lowlevel.Task) -> None:
        self.switches += 1


@pytest.mark.parametrize("rmcp", [False, True], ids=["plain", "rmcp"])
@pytest.mark.parametrize("wire", ["direct", "jsonrpc"])
async def test_a_call_adds_no_task_switch_to_the_wire(wire: Any, rmcp: bool) -> None:
    store = MemoryStore(clock=trio.current_time) if rmcp else None
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("test", build_server(State(), store=store), wire=wire))
        for _ in range(3):  # warm: connected, tool policy cached, lanes created
            await sup.call("test", "echo", {"text": "warm"})
        counter = SwitchCounter()
        trio.lowlevel.add_instrument(counter)
        try:
            for _ in range(CALLS):
                await sup.call("test", "echo", {"text": "hot"})
        finally:
            trio.lowlevel.remove_instrument(counter)
    per_call = counter.switches / CALLS
    assert per_call <= BASELINE[wire], (
        f"a call on the {wire} wire now costs {per_call:g} task switches, the baseline is "
        f"{BASELINE[wire]}: something added a hop to the hot path (an inbox round trip, a task "
        "per call, a checkpoint). Calls must read the actors' synchronous gates and report "
        "outcomes without waiting (docs/design.md, Runtime). If the hop is truly needed, say "
        "why there and raise the baseline."
    )


async def test_a_plain_call_to_a_server_without_tasks_runs_no_task_code() -> None:
    """The tasks extension's result claim (a discriminator the SDK calls on every answer) and
    the stamp that leaves the extension off plain calls cost every call; a server that does not
    advertise the extension creates no task, so its plain calls run neither."""
    ran: list[str] = []

    def profile(frame: FrameType, event: str, arg: object) -> None:
        del arg
        code = frame.f_code
        if event == "call" and (
            (code.co_name == "_route" and code.co_filename.endswith("mcp/client/session.py"))
            or (code.co_name == "stamp" and code.co_filename.endswith("rmcp_actors/client/_tasks.py"))
        ):
            ran.append(code.co_name)

    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("test", build_server(State()), wire="jsonrpc"))
        await sup.call("test", "echo", {"text": "warm"})
        sys.setprofile(profile)
        try:
            result = await sup.call("test", "echo", {"text": "hot"})
        finally:
            sys.setprofile(None)
    assert result.outcome is Outcome.SUCCEEDED
    assert ran == [], f"a plain call ran the tasks extension's {ran}"
