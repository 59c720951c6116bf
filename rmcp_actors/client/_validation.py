"""The SDK's output-schema check of a ``tools/call`` answer, deferrable per call.

A call that accepts a transferred ``structuredContent`` (``docs/protocol.md`` 9.2) may be
answered without the ``structuredContent`` its tool's output schema requires: the SDK's
``call_tool`` would refuse that answer before the payload is read. Such a call is sent with
:data:`validation_deferred` set, and checks the rebuilt result itself
(:func:`~rmcp_actors.client.transfers.check_output`).
"""

from __future__ import annotations

from contextvars import ContextVar

from mcp import Client
from mcp_types import CallToolResult

__all__ = ["defer_result_validation", "validation_deferred"]

validation_deferred: ContextVar[bool] = ContextVar("rmcp_actors_validation_deferred", default=False)
"""Set while a ``tools/call`` that accepts a transferred ``structuredContent`` is sent: the SDK's
output-schema check of its answer is skipped, as the answer may lack the ``structuredContent``
the schema requires; the call checks it once the payload is read
(:func:`~rmcp_actors.client.transfers.check_output`)."""


def defer_result_validation(client: Client) -> None:
    """Make the SDK's output-schema check of ``client``'s answers skippable by
    :data:`validation_deferred`: ``call_tool`` stays the way calls are sent (its ``Mcp-Param-*``
    headers, header-mismatch re-list, input rounds and claims), its check deferred. Installed
    only on a session whose server advertises ``"transfer"``: others keep the SDK's own."""
    session = client.session
    validate = session.validate_tool_result

    async def validate_unless_deferred(name: str, result: CallToolResult) -> None:
        if not validation_deferred.get():
            await validate(name, result)

    session.validate_tool_result = validate_unless_deferred
