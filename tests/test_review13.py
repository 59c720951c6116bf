"""Review of issue 13's server hot path: failure modes found in review, each shown by a test.

Real servers in memory (``tests/_counting_server.py``) and a real SQLite store; MockClock for
time."""

from __future__ import annotations

import math
import os
import socket
import sqlite3
from pathlib import Path
from typing import Any, cast

import mcp
import pytest
import trio
import trio.testing
from _counting_server import Wrapped
from mcp.client._memory import InMemoryTransport
from mcp.server.mcpserver import MCPServer
from mcp_types import RequestParamsMeta, TextContent

from rmcp_actors import RMCPStoreError
from rmcp_actors.server import install
from rmcp_actors.stores import BeginOutcome, OwnerInfo, SQLiteStore, _sqlite_batch


def meta(key: str, attempt: int = 1) -> RequestParamsMeta:
    return cast(
        RequestParamsMeta,
        {"rmcp": {"version": "0.2", "request_id": f"r-{key}", "attempt": attempt, "idempotency_key": key}},
    )


class CommitsThenAnswersLate(Wrapped):
    """A store that never answers at once and whose first claim commits but answers only after
    the server's ``store_timeout_s``: a remote store whose reply is late, or a queued SQLite
    write whose caller gave up while the batch carrying it committed."""

    def __init__(self) -> None:
        super().__init__(clock=trio.current_time)
        self.late = True

    def begin_now(
        self, key: str, *, fingerprint: str, tool: str, owner: str, entered: bool = False
    ) -> BeginOutcome | None:
        return None

    async def begin(
        self, key: str, *, fingerprint: str, tool: str, owner: str, entered: bool = False
    ) -> BeginOutcome:
        outcome = self.inner.begin_now(key, fingerprint=fingerprint, tool=tool, owner=owner, entered=entered)
        if self.late:
            self.late = False
            await trio.sleep(60)
        return outcome


async def test_a_claim_committed_after_the_store_timeout_is_run_by_the_retry(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The caller of a claim that timed out got NACK unavailable and the tool never ran; the
    claim the store committed anyway must not read as a run that may have happened."""
    app = MCPServer("t")
    runs: list[str] = []

    @app.tool()
    async def pay(label: str) -> str:
        runs.append(label)
        return "paid"

    install(app, store=cast(Any, CommitsThenAnswersLate()), store_timeout_s=2.0)
    async with mcp.Client(InMemoryTransport(app)) as client:
        refused = await client.call_tool("pay", {"label": "x"}, meta=meta("k"))
        retry = await client.call_tool("pay", {"label": "x"}, meta=meta("k", 2))
    assert refused.meta is not None
    assert refused.meta["rmcp"]["code"] == "unavailable"
    assert retry.meta is not None
    assert retry.meta["rmcp"].get("code") is None, retry.meta["rmcp"]
    content = retry.content[0]
    assert isinstance(content, TextContent)
    assert content.text == "paid"
    assert runs == ["x"]


async def test_a_claim_whose_entered_mark_failed_is_no_longer_in_flight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server NACKs a call whose entered mark failed and never records its key: counted in
    flight for ever, it would send every later result through the worker thread."""
    # This file's fsyncs may measure slow on a loaded machine: results inline regardless.
    monkeypatch.setattr(_sqlite_batch, "_INLINE_FSYNC_BUDGET_S", math.inf)
    path = tmp_path / "dedup.db"
    store = SQLiteStore(path, busy_timeout_s=0)
    await store.register_owner(OwnerInfo(instance_id="a", pid=os.getpid(), host=socket.gethostname()), 30.0)
    try:
        claimed = store.begin_now("stuck", fingerprint="fp", tool="tool", owner="a")
        assert claimed is not None
        assert claimed.claimed
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            with pytest.raises(RMCPStoreError):
                await store.mark_entered("stuck", owner="a")
        finally:
            other.execute("ROLLBACK")
            other.close()
        claimed = store.begin_now("k", fingerprint="fp", tool="tool", owner="a")
        assert claimed is not None
        assert claimed.claimed
        assert store.mark_entered_now("k", owner="a") is True
        assert store.complete_now("k", owner="a", result=b"r")
    finally:
        await store.aclose()
