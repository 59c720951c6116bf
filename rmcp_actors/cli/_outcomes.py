"""What a call ended with, as ``rmcp`` reports it: an exit code, an outcome name, a JSON record.

``rmcp call`` and ``rmcp batch`` share this mapping, so that a call's exit code and a batch
line's ``outcome`` always agree. The library's :class:`~rmcp_actors.Outcome` says ``failed``
both for a tool that ran and reported an error (a result) and for a call that never ran (an
error): a shell needs those apart, so the CLI names five outcomes, one per exit code.
"""

from __future__ import annotations

from typing import Any

from mcp_types import ContentBlock

from ..errors import (
    RMCPArgumentError,
    RMCPConfigError,
    RMCPError,
    RMCPIdempotencyConflictError,
    RMCPResultValidationError,
    RMCPTransferError,
    UnknownServerError,
    UnknownToolError,
)
from ..lifecycle import RequestState
from ..result import CallResult
from ._app import OUTCOME_NAMES, ExitCode

__all__ = [
    "call_record",
    "content_json",
    "error_exit_code",
    "error_record",
    "result_exit_code",
    "show_content",
]

# Errors the user fixes by changing the command (server, tool, arguments, key), not by waiting.
_USAGE_ERRORS = (
    UnknownServerError,
    UnknownToolError,
    RMCPArgumentError,
    RMCPConfigError,
    RMCPIdempotencyConflictError,
)


def result_exit_code(result: CallResult) -> ExitCode:
    """0 for a result that succeeded, 1 for a tool error (``isError``)."""
    return ExitCode.TOOL_ERROR if result.is_error else ExitCode.SUCCEEDED


def error_exit_code(error: RMCPError) -> ExitCode:
    """The exit code of a call that raised ``error``.

    3 for what the command itself got wrong (server, tool, arguments, a reused key); 1 for a
    result that broke the tool's output schema (the tool ran: like a tool error, calling again
    would run it again) or whose payload could not be fetched in chunks; 2 when the tool may
    have run; 4 when nothing ran.
    """
    if isinstance(error, _USAGE_ERRORS):
        return ExitCode.USAGE
    if isinstance(error, RMCPResultValidationError) or (
        isinstance(error, RMCPTransferError) and error.result is not None
    ):
        # A payload that could not be fetched: the tool ran, its answer is not usable as is.
        return ExitCode.TOOL_ERROR
    return ExitCode.OUTCOME_UNKNOWN if error.may_have_executed else ExitCode.REFUSED


def content_json(block: ContentBlock) -> dict[str, Any]:
    """A content block as MCP puts it on the wire (camelCase keys, no empty fields)."""
    return block.model_dump(mode="json", by_alias=True, exclude_none=True)


def call_record(result: CallResult) -> dict[str, Any]:
    """The JSON object of a call that ran and answered (``rmcp call --json``, a batch line)."""
    code = result_exit_code(result)
    return {
        "outcome": OUTCOME_NAMES[code],
        "exit_code": int(code),
        "server": result.server,
        "tool": result.tool,
        "is_error": result.is_error,
        "text": result.text,
        "content": [content_json(block) for block in result.content],
        "structured": result.structured_content,
        "request_id": result.request_id,
        "idempotency_key": result.idempotency_key,
        "attempts": result.attempts,
        "duplicate": result.duplicate,
        "elapsed_s": round(result.elapsed_s, 6),
    }


def error_record(error: RMCPError) -> dict[str, Any]:
    """The JSON object of a call that raised ``error`` (``rmcp call --json``, a batch line)."""
    code = error_exit_code(error)
    return {
        "outcome": OUTCOME_NAMES[code],
        "exit_code": int(code),
        "server": error.server,
        "tool": error.tool,
        "error": {
            "type": type(error).__name__,
            "message": str(error),
            "may_have_executed": error.may_have_executed,
        },
        "request_id": error.request_id,
        "idempotency_key": error.idempotency_key,
        "attempts": sum(event.state is RequestState.SENT for event in error.lifecycle),
    }


def show_content(block: ContentBlock) -> str:
    """A content block as a person reads it: the text, or a one-line summary of binary data."""
    match block.type:
        case "text":
            return block.text
        case "image" | "audio":
            return f"[{block.type} {block.mime_type}, {len(block.data)} base64 characters]"
        case "resource_link":
            return f"[resource link {block.uri}]"
        case "resource":
            resource = block.resource
            text: str | None = getattr(resource, "text", None)
            if text is not None:
                return text
            return f"[resource {resource.uri}, {resource.mime_type or 'binary'}]"
