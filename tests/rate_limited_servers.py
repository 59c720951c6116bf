"""Test servers that rate-limit, each in one of the four ways a client can be told, with a real
server-side limit (a token bucket on the event loop's clock, so MockClock drives it).

- :func:`nack_server`: the RMCP server side's own limit (NACK ``rate_limited`` + ``retry_after_ms``);
- :func:`jsonrpc_server`: a tool that raises JSON-RPC ``-32023`` with ``retryAfterMs`` (SEP-3304);
- :func:`text_server`: a tool that answers an error result "rate limit exceeded, retry after N s";
- :func:`http_429`: a gateway in front of an HTTP server answering ``429`` with ``Retry-After``.

Run as a script, it serves :func:`jsonrpc_server` over stdio: ``python rate_limited_servers.py RATE``.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import anyio

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mcp import MCPError
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

from rmcp_actors.server import install
from rmcp_actors.stores import MemoryStore

__all__ = ["ServerLimit", "http_429", "jsonrpc_server", "nack_server", "text_server"]


class ServerLimit:
    """A server's own rate limit: a token bucket of ``rate`` calls/s, ``burst`` deep.

    ``rate = None`` lifts the limit. ``accepted`` holds the clock of every call let through.
    """

    def __init__(self, rate: float | None, burst: float = 1.0) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.updated: float | None = None
        self.accepted: list[float] = []
        self.refused = 0

    def take(self) -> float | None:
        """None when the call may run, else seconds until a token."""
        now = anyio.current_time()
        if self.rate is None:
            self.accepted.append(now)
            return None
        if self.updated is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            self.accepted.append(now)
            return None
        self.refused += 1
        return (1 - self.tokens) / self.rate

    def accepted_rate(self, start: float, end: float) -> float:
        """Calls accepted per second over [start, end)."""
        return sum(1 for t in self.accepted if start <= t < end) / (end - start)


def _plain() -> MCPServer:
    server = MCPServer("rate-limited")

    @server.tool()
    async def echo(text: str) -> str:  # pyright: ignore[reportUnusedFunction]
        """Answer the text (the RMCP server side applies the limit)."""
        return text

    return server


def nack_server(rate: float) -> MCPServer:
    """An RMCP server refusing over ``rate`` calls/s with NACK ``rate_limited``."""
    return install(_plain(), store=MemoryStore(clock=anyio.current_time), rate_limit_per_s=rate)


def jsonrpc_server(limit: ServerLimit) -> MCPServer:
    """A plain MCP server whose tool raises ``-32023`` (SEP-3304) over the limit."""
    server = MCPServer("rate-limited-jsonrpc")

    @server.tool()
    async def echo(text: str) -> str:  # pyright: ignore[reportUnusedFunction]
        """Answer the text, or refuse with -32023 over the server's limit."""
        wait = limit.take()
        if wait is not None:
            raise MCPError(code=-32023, message="Rate limited", data={"retryAfterMs": math.ceil(wait * 1000)})
        return text

    return server


def text_server(limit: ServerLimit) -> MCPServer:
    """A plain MCP server whose tool answers an error result over the limit (a wrapped API's words)."""
    server = MCPServer("rate-limited-text")

    @server.tool()
    async def echo(text: str) -> str:  # pyright: ignore[reportUnusedFunction]
        """Answer the text, or an error result saying when to retry over the server's limit."""
        wait = limit.take()
        if wait is not None:
            raise ToolError(f"upstream API: rate limit exceeded, retry after {wait:.3f} s")
        return text

    return server


def http_429(limit: ServerLimit, *, sep_3304: bool = False) -> Any:
    """A gateway (ASGI middleware for ``serve_http(wrap=...)``) answering ``tools/call`` POSTs over
    the limit with HTTP 429 and ``Retry-After`` in whole seconds, as gateways do.

    With ``sep_3304`` the body is SEP-3304's JSON-RPC error ``-32023`` with the exact
    ``retryAfterMs``, which a client must prefer to the header (RL-9).
    """

    def wrap(app: Any) -> Any:
        async def wrapped(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] != "http" or scope["method"] != "POST":
                await app(scope, receive, send)
                return
            body = b""
            while True:
                message = await receive()
                body += message.get("body", b"")
                if not message.get("more_body"):
                    break
            replayed = False

            async def replay() -> dict[str, Any]:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            request_id = _tool_call_id(body)
            if request_id is not None and (wait := limit.take()) is not None:
                if sep_3304:
                    error = {
                        "code": -32023,
                        "message": "Rate limited",
                        "data": {"retryAfterMs": math.ceil(wait * 1000)},
                    }
                    content = (
                        b"application/json",
                        json.dumps({"jsonrpc": "2.0", "id": request_id, "error": error}).encode(),
                    )
                else:
                    content = (b"text/plain", b"Too Many Requests")
                await send(
                    {
                        "type": "http.response.start",
                        "status": 429,
                        "headers": [
                            (b"content-type", content[0]),
                            (b"retry-after", str(math.ceil(wait)).encode()),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": content[1]})
                return
            await app(scope, replay, send)

        return wrapped

    return wrap


def _tool_call_id(body: bytes) -> object:
    """The request id of a ``tools/call`` request, None for anything else."""
    try:
        message = json.loads(body)
    except ValueError:
        return None
    if isinstance(message, dict) and message.get("method") == "tools/call":  # pyright: ignore[reportUnknownMemberType]
        return message.get("id")  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
    return None


if __name__ == "__main__":
    jsonrpc_server(ServerLimit(float(sys.argv[1]))).run("stdio")
