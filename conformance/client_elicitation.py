"""The elicitation client scenarios (``elicitation-sep1034-client-defaults``).

The server calls ``elicitation/create`` from inside its tool, so the client must advertise the
elicitation capability and answer with the schema's defaults applied. That needs per-server
callbacks on ServerSpec (issue 10, section 2); until they exist this plays the scenario with the
plain client, which the server's checks report as failed.
"""

from __future__ import annotations

from typing import Any

from client_core import SERVER, connected

TOOL = "test_client_elicitation_defaults"


async def run(url: str, scenario: str, context: dict[str, Any]) -> None:
    """Call the tool that elicits; the suite checks what the client answered."""
    async with connected(url) as sup:
        await sup.call(SERVER, TOOL, {})
