"""An RMCP server whose tools refuse, then run: the server side must not store a refusal that
says "nothing done, try later" as the key's outcome (docs/protocol.md section 5).

- ``book(label, seconds=0)``: after ``seconds``, raises JSON-RPC ``-32023`` (SEP-3304,
  ``retryAfterMs``) for its first ``refusals`` calls with ``label``, then records ``label`` in
  the ledger (the side effect) and answers ``booked <label>``;
- ``broken(label, how)``: records ``label``, then fails: an error result (``tool_error``), a
  JSON-RPC error (``protocol_error``) or an unexpected exception (``exception``).

Run as a script it serves over stdio with a ``SQLiteStore``:
``python refusing_server.py STORE LEDGER REFUSALS`` (the ledger is a text file, one line a run).
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any, Literal

if __name__ == "__main__":
    # The SDK's default environment drops PYTHONPATH: import the rmcp_actors of this checkout.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import anyio
from mcp import MCPError
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import INTERNAL_ERROR

from rmcp_actors.server import install, run_stdio
from rmcp_actors.stores import DedupStore, SQLiteStore

__all__ = ["RATE_LIMITED", "RETRY_AFTER_MS", "Ledger", "build_refusing_server"]

RATE_LIMITED = -32023
RETRY_AFTER_MS = 50


class Ledger:
    """The side effects: in memory, or appended to a file (one line a run) that a test reads."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.entries: list[str] = []

    def record(self, label: str) -> None:
        self.entries.append(label)
        if self.path is not None:
            with self.path.open("a") as file:
                file.write(f"{label}\n")

    def read(self) -> list[str]:
        if self.path is None:
            return list(self.entries)
        return self.path.read_text().split() if self.path.exists() else []


def build_refusing_server(store: DedupStore, ledger: Ledger, refusals: int, **options: Any) -> MCPServer:
    """The server described in the module docstring, with RMCP installed on ``store``."""
    app = MCPServer("refusing")
    calls: Counter[str] = Counter()

    @app.tool()
    async def book(label: str, seconds: float = 0.0) -> str:  # pyright: ignore[reportUnusedFunction]
        """After ``seconds``, refuse with -32023 for the first calls of ``label``, then record it."""
        await anyio.sleep(seconds)
        calls[label] += 1
        if calls[label] <= refusals:
            raise MCPError(
                code=RATE_LIMITED,
                message=f"Rate limited: call {calls[label]} of {label!r}, retry later",
                data={"retryAfterMs": RETRY_AFTER_MS},
            )
        ledger.record(label)
        return f"booked {label}"

    @app.tool()
    async def broken(  # pyright: ignore[reportUnusedFunction]
        label: str, how: Literal["tool_error", "protocol_error", "exception"]
    ) -> str:
        """Record ``label``, then fail as ``how`` says."""
        ledger.record(label)
        if how == "tool_error":
            raise ToolError(f"{label}: the tool failed after its effect")
        if how == "protocol_error":
            raise MCPError(code=INTERNAL_ERROR, message=f"{label}: the tool failed after its effect")
        raise RuntimeError(f"{label}: the tool failed after its effect")

    return install(app, store=store, **options)


if __name__ == "__main__":
    store_path, ledger_path, refusals = sys.argv[1:4]
    run_stdio(build_refusing_server(SQLiteStore(store_path), Ledger(Path(ledger_path)), int(refusals)))
