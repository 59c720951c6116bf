"""Which store calls the RMCP server side makes per call (issue 13): claimed, entered and
recorded at once by a store that can (``ImmediateStore``), one write for claim and entered
mark when no early ACK goes out, the async methods (bounded by ``store_timeout_s``) when the
store cannot answer at once, and the same answers to clients whichever path was taken.

Real servers in memory and over stdio (``tests/_counting_server.py``); MockClock for time."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, cast

import mcp
import pytest
import trio
import trio.testing
from _counting_server import CountingStore, Wrapped, build, meta, stamp, text_of
from mcp import StdioServerParameters
from mcp.client._memory import InMemoryTransport
from mcp.server.mcpserver import MCPServer

from rmcp_actors.server import install, rmcp_of
from rmcp_actors.stores import BeginOutcome, MemoryStore

COUNTING_SERVER = Path(__file__).with_name("_counting_server.py")
SAME_PACKAGE = {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}

ONE_WRITE = [("begin_now", True), ("complete_now", None)]
TWO_WRITES = [("begin_now", False), ("mark_entered_now", None), ("complete_now", None)]


def wire(app: MCPServer) -> InMemoryTransport:
    """The server behind a real wire in memory (the direct one carries no progress token)."""
    return InMemoryTransport(app)


class Progress:
    def __init__(self) -> None:
        self.seen: list[tuple[float, str | None]] = []

    async def __call__(self, progress: float, total: float | None, message: str | None) -> None:
        self.seen.append((progress, message))


async def test_without_a_progress_token_one_write_claims_and_enters(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = CountingStore(clock=trio.current_time)
    async with mcp.Client(wire(build(store))) as client:
        first = await client.call_tool("echo", {"text": "a"}, meta=meta("k"))
        retry = await client.call_tool("echo", {"text": "a"}, meta=meta("k", 2))
    assert (stamp(first)["duplicate"], stamp(retry)["duplicate"]) == (False, True)
    # The retry found the key completed: no write of its own.
    assert store.calls == [*ONE_WRITE, ("begin_now", True)]


async def test_with_a_progress_token_the_early_ack_goes_between_claim_and_entered_mark(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = CountingStore(clock=trio.current_time)
    progress = Progress()
    async with mcp.Client(wire(build(store))) as client:
        result = await client.call_tool("echo", {"text": "a"}, meta=meta("k"), progress_callback=progress)
    assert stamp(result)["ack"] is True
    assert progress.seen == [(0.0, "rmcp: accepted")]
    assert store.calls == TWO_WRITES


async def test_early_ack_off_claims_in_one_write_even_with_a_progress_token(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = CountingStore(clock=trio.current_time)
    app = MCPServer("t")

    @app.tool()
    async def echo(text: str) -> str:
        return text

    install(app, store=cast(Any, store), early_ack=False)
    progress = Progress()
    async with mcp.Client(wire(app)) as client:
        await client.call_tool("echo", {"text": "a"}, meta=meta("k"), progress_callback=progress)
    assert progress.seen == []
    assert store.calls == ONE_WRITE


async def test_over_stdio_one_write_without_progress_and_two_with_it() -> None:
    params = StdioServerParameters(command=sys.executable, args=[str(COUNTING_SERVER)], env=SAME_PACKAGE)
    progress = Progress()
    with trio.fail_after(30):
        async with mcp.Client(params) as client:
            plain = await client.call_tool("echo", {"text": "a"}, meta=meta("a"))
            acked = await client.call_tool("echo", {"text": "b"}, meta=meta("b"), progress_callback=progress)
            writes = json.loads(text_of(await client.call_tool("writes", {})))
    assert (text_of(plain), text_of(acked)) == ("a", "b")
    assert (stamp(plain)["ack"], stamp(acked)["ack"]) == (True, True)
    assert progress.seen == [(0.0, "rmcp: accepted")]
    assert [tuple(call) for call in writes] == ONE_WRITE + TWO_WRITES


class Forwarding:
    """A store that forwards to a MemoryStore through ``__getattr__`` and counts its async
    claims: the server cannot see ``*_now`` methods on its class, so it awaits these."""

    def __init__(self) -> None:
        self.inner = MemoryStore(clock=trio.current_time)
        self.claims: list[bool] = []
        self.entered_marks = 0

    @property
    def durable(self) -> bool:
        return False

    async def begin(
        self, key: str, *, fingerprint: str, tool: str, owner: str, entered: bool = False
    ) -> BeginOutcome:
        self.claims.append(entered)
        return await self.inner.begin(key, fingerprint=fingerprint, tool=tool, owner=owner, entered=entered)

    async def mark_entered(self, key: str, *, owner: str) -> bool:
        self.entered_marks += 1
        return await self.inner.mark_entered(key, owner=owner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_a_forwarding_store_is_awaited_with_claim_and_entered_mark_apart(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = Forwarding()
    async with mcp.Client(wire(build(store))) as client:
        await client.call_tool("echo", {"text": "a"}, meta=meta("a"))
        await client.call_tool("echo", {"text": "b"}, meta=meta("b"), progress_callback=Progress())
    # Awaited, a claim is never written entered: one that commits after store_timeout_s gave up
    # on it must read as never run (tests/test_review13.py).
    assert store.claims == [False, False]
    assert store.entered_marks == 2


async def test_a_lapsed_lease_with_the_one_write_claim_is_renewed_and_the_claim_retried(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = CountingStore(clock=trio.current_time)
    app = build(store)
    runs: list[str] = []

    @app.tool()
    async def pay(label: str) -> str:
        runs.append(label)
        return "paid"

    async with mcp.Client(wire(app)) as client:
        await client.call_tool("echo", {"text": "warm"}, meta=meta("w"))
        # The lease lapses (a long pause, failed renewals) while the server thinks it fresh.
        side = rmcp_of(app)
        assert side is not None
        await store.renew_owner(side.instance_id, -1.0)
        store.calls.clear()
        result = await client.call_tool("pay", {"label": "x"}, meta=meta("k"))
        retry = await client.call_tool("pay", {"label": "x"}, meta=meta("k", 2))
    assert (text_of(result), stamp(result)["duplicate"]) == ("paid", False)
    assert stamp(retry)["duplicate"] is True
    assert runs == ["x"]
    # Refused while lapsed (nothing claimed), claimed in one write once renewed.
    assert store.calls[:3] == [("begin_now", True), ("begin_now", True), ("complete_now", None)]


class FailsAtOnce(Wrapped):
    """A MemoryStore whose immediate ``failing`` method raises (a broken disk, say)."""

    def __init__(self, failing: str) -> None:
        super().__init__(clock=trio.current_time)
        self.failing = failing

    def begin_now(
        self, key: str, *, fingerprint: str, tool: str, owner: str, entered: bool = False
    ) -> BeginOutcome | None:
        if self.failing == "begin_now":
            raise OSError("disk I/O error")
        return super().begin_now(key, fingerprint=fingerprint, tool=tool, owner=owner, entered=entered)

    def mark_entered_now(self, key: str, *, owner: str) -> bool | None:
        if self.failing == "mark_entered_now":
            raise OSError("disk I/O error")
        return super().mark_entered_now(key, owner=owner)


@pytest.mark.parametrize("failing", ["begin_now", "mark_entered_now"])
async def test_a_claim_that_fails_at_once_is_nacked_unavailable_and_the_tool_does_not_run(
    failing: str, autojump_clock: trio.testing.MockClock
) -> None:
    store = FailsAtOnce(failing)
    app = build(store)
    runs: list[str] = []

    @app.tool()
    async def pay(label: str) -> str:
        runs.append(label)
        return "paid"

    async with mcp.Client(wire(app)) as client:
        # With progress asked for, the entered mark is a write of its own.
        refused = await client.call_tool("pay", {"label": "x"}, meta=meta("k"), progress_callback=Progress())
    answer = stamp(refused)
    assert (answer["ack"], answer["code"], answer["retryable"]) == (False, "unavailable", True)
    assert runs == []


class WaitsForAsync(Wrapped):
    """A MemoryStore that never answers at once; its async claim hangs when ``hang``."""

    def __init__(self, *, hang: bool) -> None:
        super().__init__(clock=trio.current_time)
        self.hang = hang
        self.async_calls: list[str] = []

    def begin_now(
        self, key: str, *, fingerprint: str, tool: str, owner: str, entered: bool = False
    ) -> BeginOutcome | None:
        return None

    def mark_entered_now(self, key: str, *, owner: str) -> bool | None:
        return None

    def complete_now(self, key: str, *, owner: str, result: bytes) -> bool:
        return False

    async def begin(
        self, key: str, *, fingerprint: str, tool: str, owner: str, entered: bool = False
    ) -> BeginOutcome:
        self.async_calls.append("begin")
        if self.hang:
            await trio.sleep_forever()
        return self.inner.begin_now(key, fingerprint=fingerprint, tool=tool, owner=owner, entered=entered)

    async def complete(self, key: str, *, owner: str, result: bytes) -> None:
        self.async_calls.append("complete")
        self.inner.complete_now(key, owner=owner, result=result)


async def test_a_store_that_cannot_answer_at_once_is_awaited(autojump_clock: trio.testing.MockClock) -> None:
    store = WaitsForAsync(hang=False)
    async with mcp.Client(wire(build(store))) as client:
        first = await client.call_tool("echo", {"text": "a"}, meta=meta("k"))
        retry = await client.call_tool("echo", {"text": "a"}, meta=meta("k", 2))
    assert (stamp(first)["duplicate"], stamp(retry)["duplicate"]) == (False, True)
    assert store.async_calls == ["begin", "complete", "begin"]


async def test_the_awaited_claim_is_bounded_by_store_timeout(autojump_clock: trio.testing.MockClock) -> None:
    app = MCPServer("t")
    runs: list[str] = []

    @app.tool()
    async def pay(label: str) -> str:
        runs.append(label)
        return "paid"

    install(app, store=cast(Any, WaitsForAsync(hang=True)), store_timeout_s=2.0)
    async with mcp.Client(wire(app)) as client:
        started = trio.current_time()
        with trio.fail_after(60):
            refused = await client.call_tool("pay", {"label": "x"}, meta=meta("k"))
        waited = trio.current_time() - started
    assert stamp(refused)["code"] == "unavailable"
    assert 2.0 <= waited < 3.0
    assert runs == []


class RecordFailsAtOnce(Wrapped):
    """A MemoryStore whose immediate record raises; its async record works."""

    def __init__(self) -> None:
        super().__init__(clock=trio.current_time)
        self.completed: list[str] = []

    def complete_now(self, key: str, *, owner: str, result: bytes) -> bool:
        raise OSError("disk I/O error")

    async def complete(self, key: str, *, owner: str, result: bytes) -> None:
        self.completed.append(key)
        self.inner.complete_now(key, owner=owner, result=result)


async def test_a_record_that_fails_at_once_is_tried_again_awaited(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = RecordFailsAtOnce()
    app = build(store)
    runs: list[str] = []

    @app.tool()
    async def pay(label: str) -> str:
        runs.append(label)
        return "paid"

    async with mcp.Client(wire(app)) as client:
        first = await client.call_tool("pay", {"label": "x"}, meta=meta("k"))
        retry = await client.call_tool("pay", {"label": "x"}, meta=meta("k", 2))
    assert (text_of(first), text_of(retry)) == ("paid", "paid")
    assert stamp(retry)["duplicate"] is True
    assert len(store.completed) == 1
    assert runs == ["x"]
