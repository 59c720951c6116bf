"""The RMCP server side: install it on any MCP server, or start from :class:`FastRMCP`.

Example::

    from rmcp_actors.server import FastRMCP
    from rmcp_actors.stores import SQLiteStore

    app = FastRMCP("orders", store=SQLiteStore("rmcp.sqlite"))

    @app.tool()
    async def create_order(item: str) -> str: ...
"""

from ._stdio import run_stdio, serve_stdio, stdio_server
from .install import FastRMCP, install, reconciler_for, rmcp_of
from .middleware import RMCPServerSide, ServerStatistics, store_key
from .reconcile import InDoubtRun, Reconciler, Reconciliation
from .tasks import TaskEngine, TasksExtension
from .transfer import TransferService, TransferStatistics, stream_resource, stream_result

__all__ = [
    "FastRMCP",
    "InDoubtRun",
    "RMCPServerSide",
    "Reconciler",
    "Reconciliation",
    "ServerStatistics",
    "TaskEngine",
    "TasksExtension",
    "install",
    "reconciler_for",
    "rmcp_of",
    "run_stdio",
    "serve_stdio",
    "stdio_server",
    "store_key",
    "TransferService",
    "TransferStatistics",
    "stream_result",
    "stream_resource",
]
