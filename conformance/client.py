"""A conformance-suite client built on rmcp_actors: ``python conformance/client.py SERVER_URL``.

The suite (``@modelcontextprotocol/conformance client --command ...``) starts a test server per
scenario, appends its URL to the command, and names the scenario in ``MCP_CONFORMANCE_SCENARIO``
(some scenarios add JSON in ``MCP_CONFORMANCE_CONTEXT``: client credentials and the like). This
program dispatches on the scenario's family; each family lives in a module of its own so that it
can grow without touching the others:

- ``client_core.py``: initialize, tools_call, sse-retry
- ``client_elicitation.py``: elicitation-* (server-initiated requests: ServerSpec callbacks)
- ``client_auth.py``: auth/* (OAuth: ServerSpec.http(auth=...))

A scenario the client cannot handle exits non-zero with the reason on stderr; the suite's own
checks decide pass or fail.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import client_auth
import client_core
import client_elicitation
import trio

Scenario = Callable[[str, str, dict[str, Any]], Awaitable[None]]

# Exact names first, then families by prefix.
SCENARIOS: dict[str, Scenario] = {
    "initialize": client_core.initialize,
    "tools_call": client_core.tools_call,
    "sse-retry": client_core.sse_retry,
}
FAMILIES: dict[str, Scenario] = {
    "elicitation-": client_elicitation.run,
    "auth/": client_auth.run,
}


def pick(scenario: str) -> Scenario:
    """The function that plays ``scenario``."""
    if scenario in SCENARIOS:
        return SCENARIOS[scenario]
    for prefix, family in FAMILIES.items():
        if scenario.startswith(prefix):
            return family
    raise SystemExit(f"conformance client: no handler for scenario {scenario!r}")


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit("usage: client.py SERVER_URL (scenario in MCP_CONFORMANCE_SCENARIO)")
    url = sys.argv[-1]
    scenario = os.environ.get("MCP_CONFORMANCE_SCENARIO", "")
    context: dict[str, Any] = json.loads(os.environ.get("MCP_CONFORMANCE_CONTEXT") or "{}")
    trio.run(pick(scenario), url, scenario, context)


if __name__ == "__main__":
    main()
