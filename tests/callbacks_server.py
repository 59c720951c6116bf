"""A real MCP server that asks its client things: in memory (``build_server()``) or over stdio
(run this file).

Its tools send the server-to-client requests and notifications of MCP: sampling, form and URL
elicitation, roots, log messages, progress and list changes. The ``ctx.session`` ones need a
handshake-era protocol (2025-11-25: the 2026-07-28 protocol has no back-channel for them);
the ``*_resolved`` ones use the SDK's resolvers, which ask on either protocol (on 2026-07-28
through an input-required result that the client answers and retries).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import anyio
import mcp_types as types
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.resolve import ListRoots, Resolve, Sample

# The schema of the official conformance suite's elicitation scenario (SEP-1034): every field
# has a default, none is required.
DEFAULTS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "description": "User name", "default": "John Doe"},
        "age": {"type": "integer", "description": "User age", "default": 30},
        "score": {"type": "number", "description": "User score", "default": 95.5},
        "status": {
            "type": "string",
            "description": "User status",
            "enum": ["active", "inactive", "pending"],
            "default": "active",
        },
        "verified": {"type": "boolean", "description": "Verification status", "default": True},
    },
    "required": [],
}


def _sample(prompt: str) -> Sample:
    message = types.SamplingMessage(role="user", content=types.TextContent(type="text", text=prompt))
    return Sample([message], max_tokens=50)


def _roots() -> ListRoots:
    return ListRoots()


def build_server() -> MCPServer:
    """The server, with a fresh tool list (``grow`` adds to it)."""
    server = MCPServer("callbacks-test-server")

    @server.tool()
    async def ask_model(prompt: str, ctx: Context) -> str:
        """Sample the client's model (sampling/createMessage) and return its text."""
        message = types.SamplingMessage(role="user", content=types.TextContent(type="text", text=prompt))
        result = await ctx.session.create_message(messages=[message], max_tokens=50)  # pyright: ignore[reportDeprecated]
        content = result.content
        return content.text if isinstance(content, types.TextContent) else repr(content)

    @server.tool()
    async def ask_model_resolved(
        answer: Annotated[types.CreateMessageResult, Resolve(_sample)], prompt: str
    ) -> str:
        """Sample the client's model through a resolver (either protocol)."""
        del prompt
        content = answer.content
        return content.text if isinstance(content, types.TextContent) else repr(content)

    @server.tool()
    async def ask_user(ctx: Context) -> str:
        """Elicit a form with defaults; return the action and the raw content as JSON."""
        result = await ctx.session.elicit_form(
            "Test client default value handling - please accept with defaults",
            DEFAULTS_SCHEMA,
            related_request_id=ctx.request_id,
        )
        return json.dumps({"action": result.action, "content": result.content})

    @server.tool()
    async def ask_url(ctx: Context) -> str:
        """Elicit in URL mode; return the action."""
        result = await ctx.session.elicit_url(
            "Sign in", "https://example.com/login", "login-1", related_request_id=ctx.request_id
        )
        return result.action

    @server.tool()
    async def client_roots(ctx: Context) -> list[str]:
        """The client's roots (roots/list), as URIs."""
        result = await ctx.session.list_roots()  # pyright: ignore[reportDeprecated]
        return [str(root.uri) for root in result.roots]

    @server.tool()
    async def client_roots_resolved(roots: Annotated[types.ListRootsResult, Resolve(_roots)]) -> list[str]:
        """The client's roots through a resolver (either protocol)."""
        return [str(root.uri) for root in roots.roots]

    @server.tool()
    async def shout(text: str, ctx: Context) -> str:
        """Send ``text`` as a debug, an info and a warning log message."""
        for level in ("debug", "info", "warning"):
            await ctx.log(level, f"{level}: {text}", logger_name="shout")  # pyright: ignore[reportDeprecated]
        return "shouted"

    @server.tool()
    async def steps(count: int, ctx: Context) -> str:
        """Report progress ``count`` times, then answer."""
        for step in range(1, count + 1):
            await ctx.report_progress(step, count, f"step {step}")
        return f"{count} steps"

    @server.tool(annotations=types.ToolAnnotations(read_only_hint=True))
    async def steps_then_die(count: int, marker: str, ctx: Context) -> str:
        """Report progress ``count`` times; the first run (no file at ``marker`` yet) then
        creates it and exits the process, as a crash mid-call (read-only: safe to retry)."""
        for step in range(1, count + 1):
            await ctx.report_progress(step, count, f"step {step}")
        if not os.path.exists(marker):
            Path(marker).touch()
            await anyio.sleep(0.3)  # the progress notifications leave before the process dies
            os._exit(1)
        return f"{count} steps"

    @server.tool()
    async def capabilities(ctx: Context) -> dict[str, bool]:
        """Which of sampling, elicitation and roots the client advertised."""
        caps = ctx.client_capabilities
        return {
            "sampling": caps is not None and caps.sampling is not None,
            "elicitation": caps is not None and caps.elicitation is not None,
            "roots": caps is not None and caps.roots is not None,
        }

    @server.tool()
    async def grow(name: str, ctx: Context) -> str:
        """Add a tool called ``name`` (it echoes its argument), then tell the client that the
        tools, the resources and the prompts changed."""

        async def echo(text: str) -> str:
            return text

        server.add_tool(echo, name=name)
        await ctx.session.send_tool_list_changed()
        await ctx.session.send_resource_list_changed()
        await ctx.session.send_prompt_list_changed()
        return f"added {name}"

    return server


if __name__ == "__main__":
    if sys.argv[1:]:
        raise SystemExit(f"usage: {sys.argv[0]} (no arguments)")
    build_server().run("stdio")
