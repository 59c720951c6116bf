"""Wire formats of RMCP (``_meta.rmcp``), as msgspec Structs.

docs/protocol.md is the specification; this module is its executable form. Requests carry
``params._meta.rmcp`` (:class:`RequestMeta`), results carry ``result._meta.rmcp``
(:class:`ResponseMeta`), and a server advertises :class:`ServerSettings` in its
capabilities and on every tool. Plain MCP peers ignore all of it.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Mapping
from typing import Any, Final, cast

import msgspec
from mcp_types import RequestParamsMeta

from ._transfer import TransferAccept, Upload

__all__ = [
    "EXPERIMENTAL_KEY",
    "EXTENSION_ID",
    "META_KEY",
    "PROTOCOL_VERSION",
    "InvalidMeta",
    "NackCode",
    "RequestMeta",
    "ResponseMeta",
    "ServerSettings",
    "decode_request_meta",
    "decode_response_meta",
    "decode_server_settings",
    "encode_request_meta",
    "fingerprint",
]

META_KEY: Final = "rmcp"
EXTENSION_ID: Final = "io.github.rmcp-actors/rmcp"
EXPERIMENTAL_KEY: Final = "rmcp"
PROTOCOL_VERSION: Final = "0.2"

FEATURE_DEDUP: Final = "dedup"
FEATURE_ACK: Final = "ack"
FEATURE_EARLY_ACK: Final = "early_ack"
FEATURE_LOOKUP: Final = "lookup"
FEATURE_TASKS: Final = "tasks"


class NackCode(enum.StrEnum):
    """Why a server refused a call without running the tool (or, for ``in_doubt``, cannot
    say whether an earlier run had its effect)."""

    INVALID_META = "invalid_meta"
    IDEMPOTENCY_CONFLICT = "idempotency_conflict"
    IN_DOUBT = "in_doubt"
    OVERLOADED = "overloaded"
    RATE_LIMITED = "rate_limited"
    SHUTTING_DOWN = "shutting_down"
    UNAVAILABLE = "unavailable"
    UNKNOWN_TOOL = "unknown_tool"
    INVALID_ARGUMENTS = "invalid_arguments"
    ABORTED = "aborted"
    TRANSFER_INCOMPLETE = "transfer_incomplete"


RETRYABLE_NACKS: Final = frozenset(
    {NackCode.OVERLOADED, NackCode.RATE_LIMITED, NackCode.SHUTTING_DOWN, NackCode.UNAVAILABLE}
)


class RequestMeta(msgspec.Struct, omit_defaults=True, kw_only=True, forbid_unknown_fields=False):
    """``params._meta.rmcp`` of a ``tools/call`` request.

    ``retry_count``, ``expect_ack`` and ``timestamp`` are the RMCP 0.1 fields, accepted from
    older clients; this one sends ``retry_count`` and ``expect_ack`` only to a 0.1 server,
    which deduplicates only when ``expect_ack`` is true.
    """

    version: str = PROTOCOL_VERSION
    request_id: str
    idempotency_key: str | None = None
    attempt: int | None = None
    timeout_ms: int | None = None
    transaction_id: str | None = None
    step: int | None = None
    correlation_id: str | None = None
    retry_count: int | None = None
    expect_ack: bool | None = None
    timestamp: str | float | None = None
    lookup: bool | None = None
    """Ask what became of the key without ever running the tool (see docs/protocol.md)."""
    transfer: TransferAccept | None = None
    """The client accepts large result items as transfer handles (docs/protocol.md section 9)."""
    uploads: list[Upload] | None = None
    """Arguments sent as uploaded payloads (docs/protocol.md section 9)."""

    @property
    def attempt_number(self) -> int:
        """Which attempt this is: ``attempt``, else (RMCP 0.1) ``retry_count + 1``, else 1."""
        if self.attempt is not None:
            return self.attempt
        if self.retry_count is not None:
            return self.retry_count + 1
        return 1

    @property
    def dedup_key(self) -> str | None:
        """The key a server deduplicates on: the idempotency key, else (RMCP 0.1, when an
        ACK is expected) the request id."""
        if self.idempotency_key is not None:
            return self.idempotency_key
        if self.expect_ack:
            return self.request_id
        return None


class ResponseMeta(msgspec.Struct, omit_defaults=True, kw_only=True, forbid_unknown_fields=False):
    """``result._meta.rmcp`` of a ``tools/call`` result: an ACK or a NACK."""

    ack: bool
    processed: bool
    duplicate: bool | None = None
    request_id: str | None = None
    attempt: int | None = None
    code: str | None = None
    reason: str | None = None
    retryable: bool | None = None
    retry_after_ms: int | None = None


class ServerSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    """What a server advertises: in ``capabilities.extensions[EXTENSION_ID]``,
    ``capabilities.experimental.rmcp`` and every tool's ``_meta.rmcp``."""

    version: str = PROTOCOL_VERSION
    features: list[str] = msgspec.field(default_factory=list[str])
    durable: bool = False
    instance_id: str | None = None
    early_ack: bool = False
    ttl_s: float | None = None
    """How long the server keeps a key's record (a tombstone included) after creating it: a
    lookup later than that finds nothing whether or not the tool ran."""

    @property
    def dedup(self) -> bool:
        """Whether the server deduplicates calls by idempotency key."""
        return FEATURE_DEDUP in self.features

    @property
    def lookup(self) -> bool:
        """Whether the server answers a lookup (``_meta.rmcp.lookup``) without running the tool."""
        return FEATURE_LOOKUP in self.features


class InvalidMeta(ValueError):
    """``_meta.rmcp`` is present but does not follow the protocol."""


def encode_request_meta(meta: RequestMeta) -> RequestParamsMeta:
    """Return the ``_meta`` mapping of a request carrying ``meta``."""
    # The SDK types request _meta as a TypedDict of its own keys; extension keys ride along.
    return cast(RequestParamsMeta, {META_KEY: msgspec.to_builtins(meta)})


def decode_request_meta(meta: Mapping[str, Any] | None) -> RequestMeta | None:
    """Return the RMCP part of a request's ``_meta``; None when absent.

    Raises:
        InvalidMeta: ``_meta.rmcp`` is present but malformed.
    """
    if meta is None or META_KEY not in meta:
        return None
    try:
        decoded = msgspec.convert(meta[META_KEY], RequestMeta, strict=True)
    except msgspec.ValidationError as exc:
        raise InvalidMeta(str(exc)) from None
    if decoded.attempt is not None and decoded.attempt < 1:
        raise InvalidMeta("attempt must be at least 1")
    if decoded.retry_count is not None and decoded.retry_count < 0:
        raise InvalidMeta("retry_count must not be negative")
    if decoded.idempotency_key == "":
        raise InvalidMeta("idempotency_key must not be empty")
    if decoded.request_id == "":
        raise InvalidMeta("request_id must not be empty")
    if decoded.timeout_ms is not None and decoded.timeout_ms < 0:
        raise InvalidMeta("timeout_ms must not be negative")
    if decoded.step is not None and decoded.step < 0:
        raise InvalidMeta("step must not be negative")
    if decoded.lookup and decoded.idempotency_key is None:
        raise InvalidMeta("lookup needs an idempotency_key")
    return decoded


def decode_response_meta(meta: Mapping[str, Any] | None) -> ResponseMeta | None:
    """Return the RMCP part of a result's ``_meta``; None when absent or unreadable (a
    result from a plain server is never refused for its ``_meta``).

    Lenient, because other implementations write numbers their own way (``100.0``), and a
    refusal must never pass for a result: anything that says ``ack: false`` is a NACK, with
    whatever of its fields can be read.
    """
    if not meta:
        return None
    raw = meta.get(META_KEY)
    if not isinstance(raw, Mapping):
        return None
    try:
        return msgspec.convert(raw, ResponseMeta, strict=False)
    except msgspec.ValidationError:
        pass
    fields = cast(Mapping[str, Any], raw)
    if fields.get("ack") is not False:
        return None
    code, reason = fields.get("code"), fields.get("reason")
    return ResponseMeta(
        ack=False,
        processed=False,
        code=code if isinstance(code, str) else "unknown",
        reason=reason if isinstance(reason, str) else None,
        retryable=False,
    )


def decode_server_settings(raw: object) -> ServerSettings | None:
    """Return advertised settings, or None when ``raw`` is absent or not RMCP settings (an
    object without ``version`` is not taken for an advertisement)."""
    if not isinstance(raw, dict) or "version" not in raw:
        return None
    try:
        return msgspec.convert(raw, ServerSettings, strict=True)
    except msgspec.ValidationError:
        return None


_canonical = msgspec.json.Encoder(order="sorted")


def fingerprint(tool: str, arguments: Mapping[str, Any] | None) -> str:
    """Hash of a call's tool and canonical JSON arguments: the same key with a different
    fingerprint is an idempotency conflict."""
    # The encoder takes a dict as it is (no copy); other mappings are made one.
    canonical = _canonical.encode(arguments if type(arguments) is dict else dict(arguments or {}))
    return hashlib.sha256(b"%b\x00%b" % (tool.encode(), canonical)).hexdigest()
