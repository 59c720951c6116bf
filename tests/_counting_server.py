"""A server over stdio whose RMCP store counts its writes, for tests/test_rmcp_store_calls.py.

``python tests/_counting_server.py`` serves ``echo`` (RMCP on a counting MemoryStore), the
same tool declared read-only (``echo_read_only``: run unclaimed) and ``writes`` (the store
calls so far, as JSON; call it without ``_meta.rmcp``).
"""

from __future__ import annotations

import json
from typing import Any, cast

from mcp.server.mcpserver import MCPServer
from mcp_types import RequestParamsMeta, TextContent, ToolAnnotations

from rmcp_actors.server import install
from rmcp_actors.stores import BeginOutcome, DedupRecord, DedupStore, MemoryStore


def meta(key: str, attempt: int = 1) -> RequestParamsMeta:
    """The ``_meta`` of a keyed RMCP call (the tests' shared helpers follow)."""
    return cast(
        RequestParamsMeta,
        {"rmcp": {"version": "0.2", "request_id": f"r-{key}", "attempt": attempt, "idempotency_key": key}},
    )


def stamp(result: Any) -> dict[str, Any]:
    return result.meta["rmcp"]


def text_of(result: Any) -> str:
    content = result.content[0]
    assert isinstance(content, TextContent)
    return content.text


class Wrapped:
    """A MemoryStore behind a class of a test's own (MemoryStore is final) that implements
    the hot path's methods itself, so the server calls them (``ImmediateStore``); every other
    attribute is forwarded."""

    def __init__(self, **kwargs: Any) -> None:
        self.inner = MemoryStore(**kwargs)

    @property
    def durable(self) -> bool:
        return False

    async def begin(
        self, key: str, *, fingerprint: str, tool: str, owner: str, entered: bool = False
    ) -> BeginOutcome:
        return await self.inner.begin(key, fingerprint=fingerprint, tool=tool, owner=owner, entered=entered)

    def begin_now(
        self, key: str, *, fingerprint: str, tool: str, owner: str, entered: bool = False
    ) -> BeginOutcome | None:
        return self.inner.begin_now(key, fingerprint=fingerprint, tool=tool, owner=owner, entered=entered)

    async def mark_entered(self, key: str, *, owner: str) -> bool:
        return await self.inner.mark_entered(key, owner=owner)

    def mark_entered_now(self, key: str, *, owner: str) -> bool | None:
        return self.inner.mark_entered_now(key, owner=owner)

    async def complete(self, key: str, *, owner: str, result: bytes) -> None:
        await self.inner.complete(key, owner=owner, result=result)

    def complete_now(self, key: str, *, owner: str, result: bytes) -> bool:
        return self.inner.complete_now(key, owner=owner, result=result)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class CountingStore(Wrapped):
    """Records each claim, entered mark and record, by method; it implements ``record_now``
    and ``get_now`` (reads are not counted), so the server records at once."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.calls: list[tuple[str, bool | None]] = []

    async def begin(
        self, key: str, *, fingerprint: str, tool: str, owner: str, entered: bool = False
    ) -> BeginOutcome:
        self.calls.append(("begin", entered))
        return await super().begin(key, fingerprint=fingerprint, tool=tool, owner=owner, entered=entered)

    def begin_now(
        self, key: str, *, fingerprint: str, tool: str, owner: str, entered: bool = False
    ) -> BeginOutcome | None:
        self.calls.append(("begin_now", entered))
        return super().begin_now(key, fingerprint=fingerprint, tool=tool, owner=owner, entered=entered)

    async def mark_entered(self, key: str, *, owner: str) -> bool:
        self.calls.append(("mark_entered", None))
        return await super().mark_entered(key, owner=owner)

    def mark_entered_now(self, key: str, *, owner: str) -> bool | None:
        self.calls.append(("mark_entered_now", None))
        return super().mark_entered_now(key, owner=owner)

    async def complete(self, key: str, *, owner: str, result: bytes) -> None:
        self.calls.append(("complete", None))
        await super().complete(key, owner=owner, result=result)

    def complete_now(self, key: str, *, owner: str, result: bytes) -> bool:
        self.calls.append(("complete_now", None))
        return super().complete_now(key, owner=owner, result=result)

    async def record(
        self, key: str, *, fingerprint: str, tool: str, owner: str, result: bytes
    ) -> DedupRecord | None:
        self.calls.append(("record", None))
        return await self.inner.record(key, fingerprint=fingerprint, tool=tool, owner=owner, result=result)

    def record_now(
        self, key: str, *, fingerprint: str, tool: str, owner: str, result: bytes
    ) -> DedupRecord | None:
        self.calls.append(("record_now", None))
        return self.inner.record_now(key, fingerprint=fingerprint, tool=tool, owner=owner, result=result)

    def get_now(self, key: str) -> DedupRecord | None:
        return self.inner.get_now(key)


def build(store: Any) -> MCPServer:
    app = MCPServer("counting")

    @app.tool()
    async def echo(text: str) -> str:  # pyright: ignore[reportUnusedFunction]
        return text

    @app.tool(annotations=ToolAnnotations(read_only_hint=True))
    async def echo_read_only(text: str) -> str:  # pyright: ignore[reportUnusedFunction]
        return text

    @app.tool()
    async def writes() -> str:  # pyright: ignore[reportUnusedFunction]
        calls = store.calls if isinstance(store, CountingStore) else []
        return json.dumps(calls)

    install(app, store=cast(DedupStore, store))
    return app


if __name__ == "__main__":
    build(CountingStore()).run()
