"""A FastRMCP server whose large results carry ``structuredContent`` (the ``MCPServer`` shapes
of a tool returning ``str`` or a model), for the transferred-structuredContent tests (in memory,
and as a stdio subprocess: ``python structured_server.py``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from transfer_server import payload

from rmcp_actors.server import FastRMCP
from rmcp_actors.stores import MemoryStore

__all__ = ["Report", "build_structured_server"]


class Report(BaseModel):
    """A dict-like result whose ``body`` is large."""

    label: str
    length: int
    body: str


def build_structured_server(**options: Any) -> FastRMCP:
    """The server: ``text`` (``-> str``), ``report`` (``-> Report``) and ``bad`` (``-> str``,
    but listed with an output schema its large result breaks)."""
    app = FastRMCP("structured", store=MemoryStore(), **options)

    @app.tool()
    async def text(size: int, seed: int = 0) -> str:
        """A text result of ``size`` characters (structuredContent {"result": the text})."""
        return payload(size, seed)

    @app.tool()
    async def report(size: int) -> Report:
        """A model result whose body has ``size`` characters."""
        return Report(label="big", length=size, body=payload(size, 7))

    @app.tool()
    async def bad(size: int) -> str:
        """Lists an output schema allowing 16 characters, returns ``size``."""
        return payload(size, 9)

    # Listed stricter than the tool's own model: the server sends it, the client must refuse it.
    tool = app._tool_manager.get_tool("bad")  # pyright: ignore[reportPrivateUsage]
    assert tool is not None
    tool.fn_metadata.output_schema = {
        "type": "object",
        "properties": {"result": {"type": "string", "maxLength": 16}},
        "required": ["result"],
    }
    return app


if __name__ == "__main__":
    build_structured_server().run()
