"""Rate-limit signals, each of the four forms parsed in one place (flow/_feedback.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from mcp import MCPError
from mcp_types import CallToolResult, ImageContent, TextContent

from rmcp_actors._protocol import ResponseMeta
from rmcp_actors.client._failures import Evidence
from rmcp_actors.flow._feedback import (
    RateLimitSignal,
    SignalSource,
    compile_patterns,
    from_error,
    from_nack,
    from_result,
    parse_retry_after,
)

NOW = datetime(2026, 11, 30, 9, 0, 0, tzinfo=UTC)


def test_nack_rate_limited_carries_retry_after_ms() -> None:
    meta = ResponseMeta(
        ack=False, processed=False, code="rate_limited", reason="slow down", retry_after_ms=1500
    )
    signal = from_nack(meta)
    assert signal is not None
    assert (signal.source, signal.retry_after_s) == (SignalSource.NACK, 1.5)
    assert "slow down" in signal.detail


@pytest.mark.parametrize(
    "meta",
    [
        ResponseMeta(ack=False, processed=False, code="overloaded", retry_after_ms=100),
        ResponseMeta(ack=True, processed=True),
    ],
)
def test_other_nacks_and_acks_are_not_rate_limit_signals(meta: ResponseMeta) -> None:
    assert from_nack(meta) is None


def test_nack_without_or_with_a_bad_retry_after_still_signals() -> None:
    signal = from_nack(ResponseMeta(ack=False, processed=False, code="rate_limited", retry_after_ms=-5))
    assert signal is not None
    assert signal.retry_after_s is None


@pytest.mark.parametrize(
    ("data", "seconds"),
    [
        ({"retryAfterMs": 2500, "limit": 10, "remaining": 0}, 2.5),  # SEP-3304's shape
        ({"retry_after_ms": 300}, 0.3),
        ({"retryAfter": 4}, 4.0),
        ({"retry_after": "1.5"}, 1.5),
        ({"retryAfterMs": True}, None),  # not a number
        ({"limit": 10}, None),
        (None, None),
        ("try later", None),
    ],
)
def test_jsonrpc_32023_reads_retry_after_from_data(data: object, seconds: float | None) -> None:
    signal = from_error(MCPError(-32023, "Rate limited", data), None)
    assert signal is not None
    assert (signal.source, signal.retry_after_s) == (SignalSource.JSONRPC, seconds)


def test_other_jsonrpc_errors_are_not_signals() -> None:
    assert from_error(MCPError(-32603, "boom", {"retryAfterMs": 10}), None) is None
    assert from_error(ValueError("no"), Evidence(status=500, retry_after="3")) is None


def test_http_429_reads_retry_after_seconds() -> None:
    error = MCPError(-32603, "Server returned an error response")
    signal = from_error(error, Evidence(status=429, retry_after="7"))
    assert signal is not None
    assert (signal.source, signal.retry_after_s) == (SignalSource.HTTP, 7.0)
    assert "429" in signal.detail


def test_http_429_reads_retry_after_as_an_http_date() -> None:
    when = (NOW + timedelta(seconds=30)).strftime("%a, %d %b %Y %H:%M:%S GMT")
    signal = from_error(MCPError(-32603, "x"), Evidence(status=429, retry_after=when), NOW)
    assert signal is not None
    assert signal.retry_after_s == 30.0


def test_http_429_without_retry_after_still_signals() -> None:
    signal = from_error(MCPError(-32603, "x"), Evidence(status=429))
    assert signal is not None
    assert signal.retry_after_s is None


def test_error_data_wins_over_the_header() -> None:
    # SEP-3304 RL-9: retryAfterMs is the more precise of the two.
    error = MCPError(-32023, "Rate limited", {"retryAfterMs": 1200})
    signal = from_error(error, Evidence(status=429, retry_after="5"))
    assert signal is not None
    assert signal.retry_after_s == 1.2
    header_only = from_error(MCPError(-32023, "Rate limited"), Evidence(status=429, retry_after="5"))
    assert header_only is not None
    assert header_only.retry_after_s == 5.0


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        (" 3 ", 3.0),
        ("Sun, 30 Nov 2026 09:00:10 GMT", 10.0),
        ("Sun, 30 Nov 2026 08:59:00 GMT", 0.0),  # in the past: no wait
        ("-4", None),
        ("soon", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_retry_after(value: str | None, seconds: float | None) -> None:
    assert parse_retry_after(value, NOW) == seconds


def _error_result(*texts: str) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=text) for text in texts], is_error=True)


def test_error_result_matching_a_pattern_is_a_signal_with_its_seconds() -> None:
    patterns = compile_patterns((r"rate limit", r"retry after (?P<seconds>\d+(\.\d+)?) ?s"))
    signal = from_result(_error_result("Upstream says: Retry after 2.5 s"), patterns)
    assert signal is not None
    assert (signal.source, signal.retry_after_s) == (SignalSource.RESULT, 2.5)
    plain = from_result(_error_result("RATE LIMIT exceeded"), patterns)
    assert plain is not None
    assert plain.retry_after_s is None


def test_results_that_do_not_match_or_are_not_errors_are_not_signals() -> None:
    patterns = compile_patterns((r"rate limit",))
    assert from_result(_error_result("file not found"), patterns) is None
    ok = CallToolResult(content=[TextContent(type="text", text="rate limit docs")], is_error=False)
    assert from_result(ok, patterns) is None
    # Opt-in: with no patterns configured nothing is read.
    assert from_result(_error_result("rate limit"), ()) is None
    image = CallToolResult(
        content=[ImageContent(type="image", data="", mime_type="image/png")], is_error=True
    )
    assert from_result(image, patterns) is None


def test_coalescing_keeps_the_longest_wait() -> None:
    short = RateLimitSignal(SignalSource.HTTP, 1.0, "a")
    long = RateLimitSignal(SignalSource.NACK, 4.0, "b")
    none = RateLimitSignal(SignalSource.RESULT, None, "c")
    assert short.stronger(long) is long
    assert long.stronger(short) is long
    assert none.stronger(None) is none
    assert none.stronger(short) is short
