"""A conformance-suite client for the elicitation scenario, built on rmcp_actors' public API.

The official suite (``@modelcontextprotocol/conformance``) runs it as ``python
callbacks_conformance_client.py URL``: connect to URL over Streamable HTTP with an elicitation
callback that accepts with an empty form, then call every tool listed. Filling in the requested
schema's defaults (SEP-1034) is the runtime's job (``ServerCallbacks.apply_elicitation_defaults``),
which is what the scenario checks.
"""

from __future__ import annotations

import sys
from pathlib import Path

import mcp_types as types
import trio

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rmcp_actors import RMCPSupervisor, ServerCallbacks, ServerSpec


async def accept_empty_form(params: types.ElicitRequestParams) -> types.ElicitResult:
    """The user accepts without typing anything: every field keeps its default."""
    del params
    return types.ElicitResult(action="accept", content={})


async def main(url: str) -> None:
    callbacks = ServerCallbacks(elicitation=accept_empty_form)
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.http("conformance", url, callbacks=callbacks))
        for tool in await sup.list_tools("conformance"):
            await sup.call("conformance", tool.name, {})


if __name__ == "__main__":
    trio.run(main, sys.argv[-1])
