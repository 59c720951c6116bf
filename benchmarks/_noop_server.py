"""A no-op MCP server for the overhead benchmark: in memory (``build_server()``) or over stdio.

Usage over stdio::

    python benchmarks/_noop_server.py

The one tool, ``noop``, is ``async def`` (a sync tool would run in a worker thread), takes a
small argument and returns a short string, so that a call measures the protocol path and
nothing else.
"""

from __future__ import annotations

from mcp.server.mcpserver import MCPServer

TOOL = "noop"


def build_server(name: str = "noop") -> MCPServer:
    """Return a server whose only tool, ``noop(n: int) -> str``, does nothing."""
    app = MCPServer(name)

    @app.tool()
    async def noop(n: int) -> str:  # pyright: ignore[reportUnusedFunction]
        """Do nothing and return a short string."""
        return "ok"

    return app


if __name__ == "__main__":
    build_server().run("stdio")
