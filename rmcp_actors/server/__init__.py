"""The RMCP server side: install it on any MCP server, or start from :class:`FastRMCP`.

Example::

    from rmcp_actors.server import FastRMCP
    from rmcp_actors.stores import SQLiteStore

    app = FastRMCP("orders", store=SQLiteStore("rmcp.sqlite"))

    @app.tool()
    async def create_order(item: str) -> str: ...
"""

from ._stdio import run_stdio, serve_stdio, stdio_server
from .install import FastRMCP, install, rmcp_of
from .middleware import RMCPServerSide, ServerStatistics, store_key

__all__ = [
    "FastRMCP",
    "RMCPServerSide",
    "ServerStatistics",
    "install",
    "rmcp_of",
    "run_stdio",
    "serve_stdio",
    "stdio_server",
    "store_key",
]
