"""A tool's own "refused, nothing done" is not its key's outcome (docs/protocol.md section 5).

A tool raising JSON-RPC ``-32023`` (rate limited) did nothing: the server side releases the
key instead of storing the refusal, so the retry with the same key runs the tool again, and
the effect happens once, when the tool finally runs. Any other failure of a tool may follow
its effect, and is stored and replayed as before.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import mcp
import pytest
import trio
import trio.testing
from mcp_types import INTERNAL_ERROR
from refusing_server import RATE_LIMITED, Ledger, build_refusing_server
from test_rmcp_server import rmcp_meta, server_side, wire_rmcp

from rmcp_actors import (
    MemoryStore,
    Outcome,
    PolicyOverrides,
    RetryOverrides,
    RMCPSupervisor,
    ServerSpec,
    SQLiteStore,
)
from rmcp_actors.server import store_key

REFUSING_SERVER = Path(__file__).with_name("refusing_server.py")
RETRIES = PolicyOverrides(retry=RetryOverrides(max_attempts=10, base_delay_s=0.01, max_delay_s=0.05))


async def test_a_refused_run_leaves_no_record_and_the_retry_runs_the_tool(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore(clock=trio.current_time)
    ledger = Ledger()
    app = build_refusing_server(store, ledger, refusals=2, close_store=False)
    async with mcp.Client(app) as client:
        for attempt in (1, 2):
            with pytest.raises(mcp.MCPError) as refused:
                await client.call_tool("book", {"label": "a"}, meta=rmcp_meta("k", attempt=attempt))
            # The tool's own refusal, as it raised it: a fresh run's, not a replay.
            assert refused.value.error.code == RATE_LIMITED
            assert f"call {attempt} of 'a'" in refused.value.error.message
            assert refused.value.error.data == {"retryAfterMs": 50}
            assert await store.get(store_key("k")) is None
        booked = await client.call_tool("book", {"label": "a"}, meta=rmcp_meta("k", attempt=3))
        again = await client.call_tool("book", {"label": "a"}, meta=rmcp_meta("k", attempt=4))
    assert ledger.read() == ["a"]
    assert wire_rmcp(booked)["duplicate"] is False
    assert wire_rmcp(again)["duplicate"] is True
    assert again.content == booked.content
    statistics = server_side(app).statistics()
    assert (statistics.executed, statistics.replayed) == (3, 1)


async def test_rmcp_actors_retries_a_refusing_tool_until_it_runs_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ledger = Ledger()
    app = build_refusing_server(MemoryStore(clock=trio.current_time), ledger, refusals=3)
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("r", app, overrides=RETRIES))
        result = await sup.call("r", "book", {"label": "a"}, idempotency_key="k", timeout=60)
    assert result.outcome is Outcome.SUCCEEDED
    assert result.text == "booked a"
    assert result.attempts == 4
    assert ledger.read() == ["a"]
    statistics = server_side(app).statistics()
    # Every attempt ran the tool; none was answered a replayed refusal.
    assert (statistics.executed, statistics.replayed) == (4, 0)


async def test_duplicates_waiting_on_a_refused_run_get_its_refusal_not_a_stored_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore(clock=trio.current_time)
    ledger = Ledger()
    app = build_refusing_server(store, ledger, refusals=1, close_store=False)
    answers: list[Any] = []
    async with mcp.Client(app) as client:

        async def call(attempt: int) -> None:
            try:
                meta = rmcp_meta("k", attempt=attempt)
                answers.append(await client.call_tool("book", {"label": "a", "seconds": 1}, meta=meta))
            except mcp.MCPError as error:
                answers.append(error.error.code)

        async with trio.open_nursery() as nursery:
            for attempt in (1, 2):
                nursery.start_soon(call, attempt)
        # The refusal was answered to both and stored for neither: the next attempt runs.
        assert answers == [RATE_LIMITED, RATE_LIMITED]
        assert await store.get(store_key("k")) is None
        meta = rmcp_meta("k", attempt=3)
        booked = await client.call_tool("book", {"label": "a", "seconds": 1}, meta=meta)
    assert wire_rmcp(booked)["duplicate"] is False
    assert ledger.read() == ["a"]
    statistics = server_side(app).statistics()
    assert (statistics.executed, statistics.coalesced, statistics.replayed) == (2, 1, 0)


@pytest.mark.parametrize("how", ["tool_error", "protocol_error", "exception"])
async def test_other_failures_of_a_tool_are_stored_and_replayed(
    how: str, autojump_clock: trio.testing.MockClock
) -> None:
    store = MemoryStore(clock=trio.current_time)
    ledger = Ledger()
    app = build_refusing_server(store, ledger, refusals=0, close_store=False)
    answers: list[Any] = []
    async with mcp.Client(app) as client:
        for attempt in (1, 2):
            meta = rmcp_meta("k", attempt=attempt)
            try:
                answers.append(await client.call_tool("broken", {"label": "b", "how": how}, meta=meta))
            except mcp.MCPError as error:
                answers.append((error.error.code, error.error.message))
    assert ledger.read() == ["b"]
    first, second = answers
    if how == "protocol_error":
        assert first == second
        assert first[0] == INTERNAL_ERROR
    else:
        # MCPServer answers any other exception of a tool as an error result.
        assert first.is_error
        assert second.is_error
        assert first.content == second.content
        assert wire_rmcp(second)["duplicate"] is True
    assert server_side(app).statistics().replayed == 1
    record = await store.get(store_key("k"))
    assert record is not None
    assert record.result is not None


async def test_a_duplicate_in_another_instance_claims_the_released_key(tmp_path: Path) -> None:
    """Two instances share a SQLite store: the second's duplicate polls the first's run, and
    once that run's tool refused, finds the key free (not a refusal) and runs it."""
    path = tmp_path / "rmcp.sqlite"
    ledger = Ledger()
    refusing = build_refusing_server(SQLiteStore(path), ledger, refusals=1)
    running = build_refusing_server(SQLiteStore(path), ledger, refusals=0)
    arguments = {"label": "a", "seconds": 1}
    answers: dict[str, Any] = {}
    async with mcp.Client(refusing) as first, mcp.Client(running) as second:

        async def refused() -> None:
            with pytest.raises(mcp.MCPError) as error:
                await first.call_tool("book", arguments, meta=rmcp_meta("k", attempt=1))
            answers["refusing"] = error.value.error.code

        async with trio.open_nursery() as nursery:
            nursery.start_soon(refused)
            # The first instance has claimed the key and is in its tool (1 s) when the second asks.
            while not server_side(refusing).statistics().in_flight:
                await trio.sleep(0.01)
            answers["running"] = await second.call_tool("book", arguments, meta=rmcp_meta("k", attempt=2))
    assert answers["refusing"] == RATE_LIMITED
    assert wire_rmcp(answers["running"])["duplicate"] is False
    assert ledger.read() == ["a"]
    assert (server_side(refusing).statistics().executed, server_side(running).statistics().executed) == (1, 1)


async def test_over_stdio_with_a_sqlite_store(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.txt")
    arguments = [str(REFUSING_SERVER), str(tmp_path / "rmcp.sqlite"), str(ledger.path), "3"]
    spec = ServerSpec.stdio("r", sys.executable, arguments, overrides=RETRIES)
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(spec)
        result = await sup.call("r", "book", {"label": "a"}, idempotency_key="k", timeout=30)
        again = await sup.call("r", "book", {"label": "a"}, idempotency_key="k", timeout=30)
        failed = await sup.call("r", "broken", {"label": "b", "how": "tool_error"}, idempotency_key="f")
        failed_again = await sup.call("r", "broken", {"label": "b", "how": "tool_error"}, idempotency_key="f")
    assert result.outcome is Outcome.SUCCEEDED
    assert result.attempts == 4
    assert result.duplicate is False
    assert again.duplicate is True
    assert failed.outcome is failed_again.outcome is Outcome.FAILED
    assert failed_again.duplicate is True
    assert ledger.read() == ["a", "b"]
    # A refusal stored for the key would have been replayed to the fourth attempt: it would
    # have failed, and "book" would not be in the store as completed.
    store = SQLiteStore(tmp_path / "rmcp.sqlite")
    try:
        record = await store.get(store_key("k"))
    finally:
        await store.aclose()
    assert record is not None
    assert record.result is not None
    assert b"booked a" in record.result


class ReleaseFails:
    """A MemoryStore that cannot delete a record (a store failing for a moment, say)."""

    def __init__(self) -> None:
        self.inner = MemoryStore(clock=trio.current_time)

    @property
    def durable(self) -> bool:
        return False

    async def release(self, key: str, *, owner: str) -> bool:
        raise OSError("disk I/O error")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_a_refusal_the_store_cannot_release_is_recorded_as_any_outcome(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The key must not stay claimed by a run that ended: the refusal is stored (and replayed
    to the key's retries) rather than leave them waiting on it, or reading it in doubt."""
    store: Any = ReleaseFails()
    ledger = Ledger()
    app = build_refusing_server(store, ledger, refusals=1, close_store=False)
    async with mcp.Client(app) as client:
        for attempt in (1, 2):
            with pytest.raises(mcp.MCPError) as refused:
                await client.call_tool("book", {"label": "a"}, meta=rmcp_meta("k", attempt=attempt))
            assert "call 1 of 'a'" in refused.value.error.message
    assert ledger.read() == []
    statistics = server_side(app).statistics()
    assert (statistics.executed, statistics.replayed) == (1, 1)
