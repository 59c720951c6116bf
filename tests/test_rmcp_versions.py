"""What the client relies on from an RMCP peer depends on the version the peer advertises."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing
from mcp.server import Server, ServerRequestContext
from mcp.types import (
    CallToolRequestParams,
    CallToolResult,
    ListToolsResult,
    PaginatedRequestParams,
    TextContent,
    Tool,
)

from rmcp_actors import RMCPOutcomeUnknownError, RMCPSupervisor, ServerSpec


def build_rmcp_peer(version: str, ledger: list[str], metas: list[dict[str, Any]]) -> Server[Any]:
    """An RMCP server of another implementation, as its version's spec has it: 0.1 deduplicates
    on ``request_id`` only when the request says ``expect_ack``; 0.2 on ``idempotency_key``.
    Its first run of a key hangs (the answer gets lost), its effect already done."""
    advertised = {"version": version, "features": ["dedup", "ack"], "durable": True, "instance_id": "one"}
    tool = Tool(name="charge", input_schema={"type": "object"}, _meta={"rmcp": advertised})
    seen: set[str] = set()

    async def list_tools(
        ctx: ServerRequestContext[Any], params: PaginatedRequestParams | None
    ) -> ListToolsResult:
        return ListToolsResult(tools=[tool])

    async def call_tool(ctx: ServerRequestContext[Any], params: CallToolRequestParams) -> CallToolResult:
        rmcp: dict[str, Any] = dict((ctx.meta or {}).get("rmcp") or {})
        metas.append(rmcp)
        if version == "0.1":
            key = rmcp["request_id"] if rmcp.get("expect_ack") else None
        else:
            key = rmcp.get("idempotency_key")
        ack = {"ack": True, "processed": True}
        if key is not None and key in seen:
            return CallToolResult(
                content=[TextContent(type="text", text="charged")],
                _meta={"rmcp": {**ack, "duplicate": True}},
            )
        if key is not None:
            seen.add(key)
        ledger.append("charge")
        first = len(ledger) == 1
        if first:
            await trio.sleep_forever()
        return CallToolResult(content=[TextContent(type="text", text="charged")], _meta={"rmcp": ack})

    return Server(f"rmcp-{version}", on_list_tools=list_tools, on_call_tool=call_tool)


async def lose_first_answer(sup: RMCPSupervisor, ledger: list[str]) -> None:
    while not ledger:
        await trio.sleep(0.01)
    connection = sup._servers["peer"].connection  # pyright: ignore[reportPrivateUsage]
    session = connection.current_session()
    assert session is not None
    connection.report_broken(session)


@pytest.mark.parametrize("version", ["0.1", "0.2"])
async def test_a_retry_after_a_lost_answer_is_deduplicated_in_the_peers_own_terms(
    version: str, autojump_clock: trio.testing.MockClock
) -> None:
    ledger: list[str] = []
    metas: list[dict[str, Any]] = []
    async with RMCPSupervisor.open() as sup, trio.open_nursery() as nursery:
        await sup.add_server(ServerSpec.in_memory("peer", build_rmcp_peer(version, ledger, metas)))
        nursery.start_soon(lose_first_answer, sup, ledger)
        result = await sup.call("peer", "charge", {}, timeout=60)
    assert ledger == ["charge"]  # ran once
    assert (result.attempts, result.duplicate) == (2, True)
    if version == "0.1":
        # Only a 0.1 peer is sent the 0.1 fields, and on every attempt.
        assert [(m.get("expect_ack"), m.get("retry_count")) for m in metas] == [(True, 0), (True, 1)]
    else:
        assert all("expect_ack" not in m and "retry_count" not in m for m in metas)


async def test_a_peer_of_an_unknown_version_is_not_relied_on_for_dedup(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ledger: list[str] = []
    async with RMCPSupervisor.open() as sup, trio.open_nursery() as nursery:
        await sup.add_server(ServerSpec.in_memory("peer", build_rmcp_peer("9.0", ledger, [])))
        nursery.start_soon(lose_first_answer, sup, ledger)
        with pytest.raises(RMCPOutcomeUnknownError, match=r"version '9\.0'"):
            await sup.call("peer", "charge", {}, timeout=60)
    assert ledger == ["charge"]
