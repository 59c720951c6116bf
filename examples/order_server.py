"""An order service over stdio whose one tool has a side effect that must not run twice.

Usage::

    python examples/order_server.py --ledger PATH [--store PATH]

``create_order(item)`` appends ``item`` to the ledger file: one line per order created, so the
ledger shows how many times each call really ran. With ``--store``, the server is a
``FastRMCP`` that deduplicates calls by idempotency key in a ``SQLiteStore`` at that path (it
survives the server's restarts); without it, a plain ``MCPServer`` with the same tool, the raw
side of ``examples/exactly_once.py``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mcp.server.mcpserver import MCPServer


def build_server(ledger: Path, store: Path | None = None) -> MCPServer[Any]:
    """Return the order service: with RMCP on a SQLite store at ``store``, or plain MCP.

    Args:
        ledger: The file ``create_order`` appends each item to.
        store: Where RMCP keeps its idempotency records; None for a plain MCP server.
    """
    if store is None:
        app: MCPServer[Any] = MCPServer("orders")
    else:
        # Imported here: the plain server, restarted after every crash, does not pay for it.
        from rmcp_actors import FastRMCP, SQLiteStore

        app = FastRMCP("orders", store=SQLiteStore(store))

    @app.tool()
    def create_order(item: str) -> str:
        """Create an order for ``item`` (appends it to the ledger: not safe to repeat)."""
        with ledger.open("a") as file:
            file.write(item + "\n")
        return f"order created: {item}"

    return app


def main() -> None:
    """Serve the order service over stdio until stdin closes."""
    parser = argparse.ArgumentParser(description="An MCP order service over stdio.")
    parser.add_argument("--ledger", type=Path, required=True, help="file the orders are appended to")
    parser.add_argument("--store", type=Path, help="SQLite file for RMCP's idempotency records")
    options = parser.parse_args()
    build_server(options.ledger, options.store).run("stdio")


if __name__ == "__main__":
    main()
