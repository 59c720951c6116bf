"""The auth client scenarios (``auth/*``): OAuth against the suite's authorization server.

Each scenario's server answers 401 with a ``WWW-Authenticate`` pointing at its protected-resource
metadata; the client must discover the authorization server, register (dynamically, by CIMD or
with the pre-registered credentials in ``context``), obtain a token and call ``test-tool``-style
tools with it. That needs ``ServerSpec.http(auth=...)`` (issue 10, section 1); until it exists this
connects without credentials, which the suite reports as failed for every scenario that requires
a token.
"""

from __future__ import annotations

from typing import Any

from client_core import SERVER, connected


async def run(url: str, scenario: str, context: dict[str, Any]) -> None:
    """Connect, list and call every tool the server lists (with no arguments)."""
    async with connected(url) as sup:
        for tool in await sup.list_tools(SERVER):
            await sup.call(SERVER, tool.name, {})
