"""The elicitation client scenarios (``elicitation-sep1034-client-defaults``).

The server calls ``elicitation/create`` from inside its tool, so the client advertises the
elicitation capability (``ServerCallbacks(elicitation=...)``). The callback accepts an empty form,
as a user who keeps every proposed value; filling in the requested schema's defaults (SEP-1034)
is the runtime's job (``ServerCallbacks.apply_elicitation_defaults``), which is what the
scenario checks.
"""

from __future__ import annotations

from typing import Any

import mcp_types as types
from client_core import SERVER, connected

from rmcp_actors import ServerCallbacks

TOOL = "test_client_elicitation_defaults"


async def accept_empty_form(params: types.ElicitRequestParams) -> types.ElicitResult:
    """The user accepts without typing anything: every field keeps its default."""
    del params
    return types.ElicitResult(action="accept", content={})


async def run(url: str, scenario: str, context: dict[str, Any]) -> None:
    """Call the tool that elicits; the suite checks what the client answered."""
    async with connected(url, callbacks=ServerCallbacks(elicitation=accept_empty_form)) as sup:
        await sup.call(SERVER, TOOL, {})
