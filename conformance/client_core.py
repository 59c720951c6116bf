"""The core client scenarios: initialize, tools_call, sse-retry (plain rmcp_actors, no extras)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from rmcp_actors import Outcome, RMCPSupervisor, ServerSpec

# The suite's scenarios are written for protocol 2025-11-25; "auto" negotiates down to it.
PROTOCOL = "auto"
SERVER = "conformance"


@asynccontextmanager
async def connected(url: str, **spec_options: Any) -> AsyncIterator[RMCPSupervisor]:
    """A supervisor with the suite's server added (``spec_options`` go to ServerSpec.http)."""
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.http(SERVER, url, protocol=PROTOCOL, **spec_options))
        yield sup


async def initialize(url: str, scenario: str, context: dict[str, Any]) -> None:
    """Connect (the handshake is what the scenario checks) and list the tools."""
    async with connected(url) as sup:
        await sup.list_tools(SERVER)


async def tools_call(url: str, scenario: str, context: dict[str, Any]) -> None:
    """Call the scenario's ``add_numbers`` tool."""
    async with connected(url) as sup:
        result = await sup.call(SERVER, "add_numbers", {"a": 5, "b": 3})
        if result.outcome is not Outcome.SUCCEEDED:
            raise SystemExit(f"add_numbers failed: {result.text}")


async def sse_retry(url: str, scenario: str, context: dict[str, Any]) -> None:
    """Call ``test_reconnection``: the server closes the call's SSE stream after a priming event
    with ``retry: 500``, and answers on the GET stream the client must reopen after 500 ms."""
    async with connected(url) as sup:
        result = await sup.call(SERVER, "test_reconnection", {}, timeout=20)
        if result.outcome is not Outcome.SUCCEEDED:
            raise SystemExit(f"test_reconnection failed: {result.text}")
