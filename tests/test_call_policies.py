"""The supervisor's per-tool policies: resolved for configured tools only, whatever names callers use."""

from __future__ import annotations

import pytest
from mcp.server.mcpserver import MCPServer

from rmcp_actors import RMCPConfig, RMCPSupervisor, ServerSpec, ToolOverrides, UnknownToolError
from rmcp_actors.config import PolicyOverrides


async def test_unknown_tool_names_do_not_grow_the_policy_cache(server: MCPServer) -> None:
    spec = ServerSpec.in_memory("mem", server, tools={"add": ToolOverrides(timeout_s=5)})
    config = RMCPConfig(defaults=PolicyOverrides(timeout_s=9))
    async with RMCPSupervisor.open(config) as sup:
        await sup.add_server(spec)
        for index in range(200):
            with pytest.raises(UnknownToolError):
                await sup.call("mem", f"no_such_tool_{index}")
        assert (await sup.call("mem", "echo", {"text": "x"})).text == "x"
        assert (await sup.call("mem", "add", {"a": 1, "b": 2})).structured_content == {"result": 3}
        entry = sup._servers["mem"]  # pyright: ignore[reportPrivateUsage]
        assert set(entry.policies) == {"add"}
        assert entry.policies["add"] == config.call_policy(spec, "add")
        assert entry.policies["add"].timeout_s == 5
        assert entry.default_policy == config.call_policy(spec, "echo")
        assert entry.default_policy.timeout_s == 9
