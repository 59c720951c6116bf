"""Wire formats of RMCP (``_meta.rmcp``), as msgspec Structs.

Every tool call carries ``params._meta.rmcp`` with the logical call's identity, so that a
server (or a log) can tie the attempts of one call together. Plain MCP servers ignore
``_meta``. docs/protocol.md documents the fields.
"""

from __future__ import annotations

from typing import cast

import msgspec
from mcp_types import RequestParamsMeta

__all__ = ["META_KEY", "PROTOCOL_VERSION", "RequestMeta", "encode_request_meta"]

META_KEY = "rmcp"
PROTOCOL_VERSION = "0.2"


class RequestMeta(msgspec.Struct, omit_defaults=True, kw_only=True):
    """``params._meta.rmcp`` of a ``tools/call`` request."""

    version: str = PROTOCOL_VERSION
    request_id: str
    idempotency_key: str
    attempt: int
    timeout_ms: int | None = None


def encode_request_meta(meta: RequestMeta) -> RequestParamsMeta:
    """Return the ``_meta`` mapping of a request carrying ``meta``."""
    # The SDK types request _meta as a TypedDict of its own keys; extension keys ride along.
    return cast(RequestParamsMeta, {META_KEY: msgspec.to_builtins(meta)})
