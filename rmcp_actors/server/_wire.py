"""Building RMCP answers as wire dicts: ACK stamps, NACK results, stored outcomes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec
from mcp import MCPError
from pydantic import BaseModel

from .._protocol import META_KEY, RETRYABLE_NACKS, NackCode, ResponseMeta
from ..flow._feedback import RATE_LIMITED_CODE

__all__ = [
    "NOTHING_DONE_ERRORS",
    "StoredOutcome",
    "ack",
    "decode_outcome",
    "encode_outcome",
    "nack",
    "to_wire",
]

_NACK_ADVICE = {
    NackCode.INVALID_META: "fix the client's _meta.rmcp; the tool did not run",
    NackCode.IDEMPOTENCY_CONFLICT: (
        "this idempotency key was already used for a different tool or different arguments; "
        "use a new key for a new operation. The tool did not run"
    ),
    NackCode.IN_DOUBT: (
        "an earlier attempt with this idempotency key started but its server stopped before "
        "recording a result, so the tool may or may not have run; check its effect before "
        "calling again with a new key"
    ),
    NackCode.OVERLOADED: "the server is at its concurrency limit; the tool did not run, retry later",
    NackCode.RATE_LIMITED: "the server's rate limit was reached; the tool did not run, retry later",
    NackCode.SHUTTING_DOWN: "the server is shutting down; the tool did not run, retry on another instance",
    NackCode.UNAVAILABLE: "the server's dedup store failed; the tool did not run, retry later",
    NackCode.UNKNOWN_TOOL: "the server has no such tool; the tool did not run, list the tools again",
    NackCode.INVALID_ARGUMENTS: "the arguments do not match the tool's input schema; the tool did not run",
    NackCode.ABORTED: (
        "a lookup settled this key as never run (a transaction was undone, say): the tool did not "
        "run and will never run for this key; use a new key for a new call"
    ),
    NackCode.TRANSFER_INCOMPLETE: (
        "the server does not hold every chunk of an uploaded argument; the tool did not run, "
        "open the upload again (rmcp/transfer/open), send the missing chunks and call again"
    ),
}


NOTHING_DONE_ERRORS = frozenset({RATE_LIMITED_CODE})
"""JSON-RPC error codes by which a tool says it refused the call and did nothing: ``-32023``
(SEP-3304, rate limited: try later). Such an outcome releases the key instead of being stored
(``docs/protocol.md`` section 5); every other error may follow an effect, and is stored."""


class StoredOutcome(msgspec.Struct, omit_defaults=True):
    """What a dedup record keeps: the result as sent the first time, or the JSON-RPC error."""

    result: dict[str, Any] | None = None
    error_code: int | None = None
    error_message: str | None = None
    error_data: Any = None

    @property
    def nothing_done(self) -> bool:
        """Whether the tool refused the call and did nothing (:data:`NOTHING_DONE_ERRORS`)."""
        return self.result is None and self.error_code in NOTHING_DONE_ERRORS

    def replay(self) -> dict[str, Any]:
        """Return the stored result (not to be mutated), or raise the stored JSON-RPC error."""
        if self.result is None:
            raise MCPError(self.error_code or 0, self.error_message or "", self.error_data)
        return self.result


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(StoredOutcome)


def encode_outcome(outcome: StoredOutcome) -> bytes:
    """Encode an outcome for a store."""
    return _encoder.encode(outcome)


def decode_outcome(data: bytes) -> StoredOutcome:
    """Decode an outcome read from a store."""
    return _decoder.decode(data)


def to_wire(result: object) -> dict[str, Any]:
    """Return a handler result as a wire dict (results of the SDK's own chain already are)."""
    if isinstance(result, BaseModel):
        return result.model_dump(by_alias=True, mode="json", exclude_none=True)
    if isinstance(result, Mapping):
        return dict(result)  # pyright: ignore[reportUnknownArgumentType]
    raise TypeError(f"tools/call handler returned {type(result).__name__}; expected a result mapping")


def ack(result: dict[str, Any], *, request_id: str, attempt: int, duplicate: bool) -> dict[str, Any]:
    """Stamp an ACK into a copy of a result's ``_meta`` (keeping what the tool put there).

    The fields of :class:`ResponseMeta` for an ACK, written out: this runs on every call.
    """
    existing = result.get("_meta")
    merged: dict[str, Any] = dict(existing) if isinstance(existing, Mapping) else {}  # pyright: ignore[reportUnknownArgumentType]
    merged[META_KEY] = {
        "ack": True,
        "processed": True,
        "duplicate": duplicate,
        "request_id": request_id,
        "attempt": attempt,
    }
    return {**result, "_meta": merged}


def nack(
    code: NackCode,
    detail: str,
    *,
    request_id: str | None = None,
    attempt: int | None = None,
    retry_after_ms: int | None = None,
) -> dict[str, Any]:
    """A NACK: a tool error result a plain client can read, with the refusal in ``_meta.rmcp``."""
    reason = f"{detail}: {_NACK_ADVICE[code]}"
    meta = ResponseMeta(
        ack=False,
        processed=False,
        request_id=request_id,
        attempt=attempt,
        code=code.value,
        reason=reason,
        retryable=code in RETRYABLE_NACKS,
        retry_after_ms=retry_after_ms,
    )
    return {
        "content": [{"type": "text", "text": f"RMCP {code.value}: {reason}"}],
        "isError": True,
        "_meta": {META_KEY: msgspec.to_builtins(meta)},
    }
