"""Quickstart: reliable tool calls to a real MCP server (mcp-server-time), started over stdio.

Run with ``make demo`` (creates the virtualenv on first use).
"""

from __future__ import annotations

import sys

import trio

from rmcp_actors import RMCPSupervisor, ServerSpec, ToolOverrides, UnknownToolError


async def main() -> None:
    # The server is a subprocess of this interpreter, so it is found whatever PATH says.
    time_server = ServerSpec.stdio(
        "time",
        sys.executable,
        ["-m", "mcp_server_time", "--local-timezone", "UTC"],
        # Reading the clock is safe to repeat: a call whose answer is lost may be retried.
        tools={"get_current_time": ToolOverrides(timeout_s=5, idempotent=True)},
    )
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(time_server)
        print("tools:", ", ".join(tool.name for tool in await sup.list_tools("time")))

        result = await sup.call("time", "get_current_time", {"timezone": "UTC"})
        print(
            f"\n{result.outcome.value} after {result.attempts} attempt(s) in {result.elapsed_s * 1000:.1f} ms"
        )
        print(result.text)

        # A tool that reports an error is a result with outcome "failed", not an exception.
        bad = await sup.call("time", "get_current_time", {"timezone": "Mars/Olympus_Mons"})
        print(f"\n{bad.outcome.value}: {bad.text}")

        # Anything else raises an RMCPError that says whether the tool may have run.
        try:
            await sup.call("time", "get_current_weather")
        except UnknownToolError as error:
            print(f"\n{type(error).__name__} (may_have_executed={error.may_have_executed}): {error}")

        stats = sup.statistics().connections[0]
        print(f"\nconnection: {stats.state.value}, protocol {stats.protocol_version}")


if __name__ == "__main__":
    trio.run(main)
