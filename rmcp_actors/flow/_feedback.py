"""Rate-limit signals from a server, each form parsed in one place (pure functions).

A server says "too fast" in four ways, and each is read here and nowhere else:

- an RMCP NACK with code ``rate_limited`` and ``retry_after_ms`` (:func:`from_nack`);
- a JSON-RPC error ``-32023`` (``RateLimited``, the open SEP-3304 proposal) whose ``data``
  carries ``retryAfterMs`` (:func:`from_error`);
- an HTTP 429, whose ``Retry-After`` header (seconds or an HTTP date) the HTTP evidence
  recorded (:func:`from_error`);
- opt-in per server, an error *result* whose text matches one of ``rate_limit.error_patterns``
  (:func:`from_result`).

Each gives a :class:`RateLimitSignal`; the call path treats the attempt as not executed, the
limiter slows down. A signal is never a breaker failure: the limiter, not the breaker, answers it.
"""

from __future__ import annotations

import email.utils
import enum
import functools
import math
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final, final

import attrs
from mcp import MCPError
from mcp_types import CallToolResult, TextContent

from .._protocol import NackCode, ResponseMeta
from ..client._failures import Evidence

__all__ = [
    "RATE_LIMITED_CODE",
    "RateLimitSignal",
    "SignalSource",
    "compile_patterns",
    "from_error",
    "from_nack",
    "from_result",
    "parse_retry_after",
]

#: JSON-RPC error code of a rate-limited request (SEP-3304, ``RateLimited``).
RATE_LIMITED_CODE: Final = -32023

# SEP-3304 says ``retryAfterMs``; servers written before it settle use the other spellings.
_MS_KEYS: Final = ("retryAfterMs", "retry_after_ms")
_SECONDS_KEYS: Final = ("retryAfter", "retry_after", "retryAfterSeconds", "retry_after_s")


class SignalSource(enum.Enum):
    """Where a rate-limit signal came from."""

    NACK = "nack"
    JSONRPC = "jsonrpc"
    HTTP = "http"
    RESULT = "result"


@final
@attrs.frozen
class RateLimitSignal:
    """The server refused a call for going too fast.

    Attributes:
        source: Which of the four forms said so.
        retry_after_s: How long the server asks the client to wait, when it said.
        detail: What the server said, for errors and statistics.
    """

    source: SignalSource
    retry_after_s: float | None
    detail: str

    def stronger(self, other: RateLimitSignal | None) -> RateLimitSignal:
        """The signal that asks for the longer wait (coalescing keeps the strongest)."""
        if other is None or (self.retry_after_s or 0.0) >= (other.retry_after_s or 0.0):
            return self
        return other


def from_nack(meta: ResponseMeta) -> RateLimitSignal | None:
    """The signal of an RMCP NACK ``rate_limited``; None for any other NACK or an ACK."""
    if meta.ack or meta.code != NackCode.RATE_LIMITED:
        return None
    retry_after = _non_negative(meta.retry_after_ms)
    return RateLimitSignal(
        SignalSource.NACK,
        None if retry_after is None else retry_after / 1000,
        f"NACK rate_limited: {meta.reason or 'no reason given'}",
    )


def from_error(
    error: BaseException, evidence: Evidence | None, now: datetime | None = None
) -> RateLimitSignal | None:
    """The signal of a failed attempt: JSON-RPC ``-32023``, or an HTTP 429.

    When both the error's ``retryAfterMs`` and the ``Retry-After`` header are there, the
    error's wins (SEP-3304 RL-9: it is the more precise).

    Args:
        error: What ``call_tool`` raised.
        evidence: What the HTTP transport saw of the attempt (None off HTTP).
        now: The wall-clock time an HTTP-date ``Retry-After`` is measured from (tests).
    """
    http_429 = evidence is not None and evidence.status == 429
    if isinstance(error, MCPError) and error.code == RATE_LIMITED_CODE:
        retry_after = _retry_after_in_data(error.data)
        if retry_after is None and http_429:
            assert evidence is not None
            retry_after = parse_retry_after(evidence.retry_after, now)
        detail = f"JSON-RPC {RATE_LIMITED_CODE}: {error.message}"
        return RateLimitSignal(SignalSource.JSONRPC, retry_after, detail)
    if http_429:
        assert evidence is not None
        return RateLimitSignal(
            SignalSource.HTTP,
            parse_retry_after(evidence.retry_after, now),
            f"HTTP 429 Too Many Requests (Retry-After: {evidence.retry_after or 'not given'})",
        )
    return None


def from_result(result: CallToolResult, patterns: Sequence[re.Pattern[str]]) -> RateLimitSignal | None:
    """The signal of an error result whose text matches a configured pattern (opt-in).

    A named group ``seconds`` in the matching pattern gives the retry-after.
    """
    if not patterns or not result.is_error:
        return None
    for block in result.content:
        if not isinstance(block, TextContent):
            continue
        for pattern in patterns:
            match = pattern.search(block.text)
            if match is None:
                continue
            seconds = match.groupdict().get("seconds")
            return RateLimitSignal(
                SignalSource.RESULT,
                _non_negative(_number(seconds)) if seconds is not None else None,
                f"error result matching {pattern.pattern!r}: {block.text[:200]}",
            )
    return None


@functools.lru_cache(maxsize=64)
def compile_patterns(patterns: tuple[str, ...]) -> tuple[re.Pattern[str], ...]:
    """``rate_limit.error_patterns`` as the regexes :func:`from_result` takes (case-insensitive);
    cached, as the call path asks on every error result of a server that opted in."""
    return tuple(re.compile(pattern, re.IGNORECASE) for pattern in patterns)


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from an HTTP ``Retry-After`` value: delay-seconds or an HTTP date.

    An unreadable value is None (the limiter still slows down; it only has no pause to honour).
    """
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def _retry_after_in_data(data: Any) -> float | None:
    if not isinstance(data, Mapping):
        return None
    fields: Mapping[Any, Any] = data  # pyright: ignore[reportUnknownVariableType]
    for key in _MS_KEYS:
        value = _non_negative(_number(fields.get(key)))
        if value is not None:
            return value / 1000
    for key in _SECONDS_KEYS:
        value = _non_negative(_number(fields.get(key)))
        if value is not None:
            return value
    return None


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def _non_negative(value: float | None) -> float | None:
    if value is None or not math.isfinite(value) or value < 0:
        return None
    return float(value)
