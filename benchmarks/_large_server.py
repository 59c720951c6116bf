"""The large-payload benchmark's server: the SDK's stdio server or rmcp_actors' linear one.

Usage::

    python benchmarks/_large_server.py [--linear]

``blob(size)`` returns a text of ``size`` characters (a large result); ``length(text)`` returns
the length of its argument (a large argument, a small result). Without ``--linear`` the server
runs ``MCPServer.run("stdio")`` (the SDK's transport), with it ``rmcp_actors.server.run_stdio``.
"""

from __future__ import annotations

import sys

from mcp.server.mcpserver import MCPServer


def build_server() -> MCPServer:
    app = MCPServer("large")

    @app.tool()
    async def blob(size: int) -> str:  # pyright: ignore[reportUnusedFunction]
        """A text of ``size`` characters."""
        return "x" * size

    @app.tool()
    async def length(text: str) -> int:  # pyright: ignore[reportUnusedFunction]
        """The length of ``text``."""
        return len(text)

    return app


if __name__ == "__main__":
    if "--linear" in sys.argv[1:]:
        from rmcp_actors.server import run_stdio

        run_stdio(build_server())
    else:
        build_server().run("stdio")
