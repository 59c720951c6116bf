"""The failure classifier: exhaustive properties, and a contract with the installed SDK.

The properties hold for every code, message, evidence and transport state hypothesis draws. The
contract tests check every SDK message and code the classifier relies on against the installed
``mcp`` (and httpx2), by triggering them where that is cheap and by reading the source
otherwise, so an SDK upgrade that rewords one fails here, not in production.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import re
import tomllib
from pathlib import Path

import httpx2
import mcp.client.session
import mcp.client.streamable_http
import mcp.server.streamable_http_manager
import mcp.shared.direct_dispatcher
import mcp.shared.jsonrpc_dispatcher
import mcp_types
import pytest
from hypothesis import given
from hypothesis import strategies as st
from mcp import Client, MCPError
from mcp.server.mcpserver import MCPServer
from mcp_test_server import State, build_server
from pydantic import BaseModel, ValidationError

from rmcp_actors.client import _failures
from rmcp_actors.client._failures import (
    CONNECTION_CLOSED_MESSAGE,
    RECONNECT_EXHAUSTED_MESSAGE,
    SESSION_UNKNOWN_MESSAGES,
    STREAM_ENDED_MESSAGE,
    STREAM_FAILED_PREFIX,
    AckTimeout,
    Attempt,
    Evidence,
    classify,
)

SDK_MESSAGES = [
    CONNECTION_CLOSED_MESSAGE,
    STREAM_ENDED_MESSAGE,
    RECONNECT_EXHAUSTED_MESSAGE,
    "Request 'tools/call' timed out",
    "Timed out after 0.5s waiting for 'tools/call'",
    f"{STREAM_FAILED_PREFIX}Server-sent event exceeded the 1048576 byte limit.",
    f"{STREAM_FAILED_PREFIX}peer closed connection",
    "Failed to parse JSON response: bad",
    *SESSION_UNKNOWN_MESSAGES,
]

codes = st.one_of(
    st.sampled_from([-32700, -32600, -32601, -32602, -32603, -32000, -32001, -32002, -32099, 0, 1, 42]),
    st.integers(min_value=-(2**31), max_value=2**31 - 1),
)
messages = st.one_of(st.sampled_from(SDK_MESSAGES), st.text(max_size=80))
evidences = st.one_of(
    st.none(),
    st.builds(
        Evidence,
        refused=st.one_of(st.none(), st.just(httpx2.ConnectError("refused"))),
        status=st.one_of(st.none(), st.sampled_from([200, 202, 400, 401, 403, 404, 500, 503])),
    ),
)


def is_sdk_lost_message(message: str) -> bool:
    return message in {CONNECTION_CLOSED_MESSAGE, STREAM_ENDED_MESSAGE, RECONNECT_EXHAUSTED_MESSAGE} or (
        message.startswith(STREAM_FAILED_PREFIX)
    )


@given(code=codes, message=messages, evidence=evidences, closed=st.booleans())
def test_every_mcp_error_gets_a_verdict(
    code: int, message: str, evidence: Evidence | None, closed: bool
) -> None:
    verdict = classify(MCPError(code=code, message=message), evidence, transport_closed=closed)
    assert verdict is not None
    assert verdict.reason
    if message in SESSION_UNKNOWN_MESSAGES:
        # Nothing ran, whatever the code: reconnect and send again.
        assert (verdict.attempt, verdict.session_lost) == (Attempt.REFUSED, True)
        return
    if evidence is not None and evidence.status == 404 and code == -32600:
        assert (verdict.attempt, verdict.session_lost) == (Attempt.REFUSED, True)
        return
    # Nothing is "not sent" without the transport's word for it.
    if verdict.attempt is Attempt.NOT_SENT:
        assert evidence is not None
        assert evidence.refused is not None
        assert (code, message) == (-32000, CONNECTION_CLOSED_MESSAGE)
    # A server's answer, a timeout or an unreadable answer never marks the session broken.
    if verdict.attempt in {Attempt.ANSWERED, Attempt.TIMED_OUT, Attempt.UNREADABLE}:
        assert verdict.session_lost is False
    # A lost answer marks the session broken only on transport-level evidence.
    if verdict.session_lost:
        assert closed or message in {CONNECTION_CLOSED_MESSAGE, RECONNECT_EXHAUSTED_MESSAGE}
    if code not in {-32000, -32001, -32700}:
        assert verdict.attempt is Attempt.ANSWERED


@given(message=messages, evidence=evidences, closed=st.booleans())
def test_minus_32000_is_a_lost_answer_only_from_the_sdk_or_a_dead_transport(
    message: str, evidence: Evidence | None, closed: bool
) -> None:
    verdict = classify(MCPError(code=-32000, message=message), evidence, transport_closed=closed)
    assert verdict is not None
    if message in SESSION_UNKNOWN_MESSAGES:
        return
    if "byte limit" in message and message.startswith(STREAM_FAILED_PREFIX):
        assert verdict.attempt is Attempt.UNREADABLE
        assert "1,048,576 bytes" in verdict.reason
        assert "max_sse_event_bytes" in verdict.reason
    elif message == CONNECTION_CLOSED_MESSAGE:
        refused = evidence is not None and evidence.refused is not None
        assert verdict.attempt is (Attempt.NOT_SENT if refused else Attempt.SENT_AND_LOST)
        assert verdict.session_lost is True
    elif message == RECONNECT_EXHAUSTED_MESSAGE:
        assert (verdict.attempt, verdict.session_lost) == (Attempt.SENT_AND_LOST, True)
    elif is_sdk_lost_message(message):
        # One response stream failed: the session is the other callers' still.
        assert (verdict.attempt, verdict.session_lost) == (Attempt.SENT_AND_LOST, closed)
    elif closed:
        assert (verdict.attempt, verdict.session_lost) == (Attempt.SENT_AND_LOST, True)
    else:
        # A server's own error in the implementation-defined range.
        assert (verdict.attempt, verdict.session_lost) == (Attempt.ANSWERED, False)


@given(message=messages, evidence=evidences, closed=st.booleans())
def test_minus_32001_is_a_timeout_only_in_the_sdks_words(
    message: str, evidence: Evidence | None, closed: bool
) -> None:
    verdict = classify(MCPError(code=-32001, message=message), evidence, transport_closed=closed)
    assert verdict is not None
    if message in SESSION_UNKNOWN_MESSAGES:
        assert verdict.attempt is Attempt.REFUSED
    elif message.startswith(("Request '", "Timed out after ")) and "timed out" in message.lower():
        assert (verdict.attempt, verdict.session_lost) == (Attempt.TIMED_OUT, False)
    else:
        assert (verdict.attempt, verdict.session_lost) == (Attempt.ANSWERED, False)


unclassified = st.one_of(
    st.builds(ValueError, st.text(max_size=20)),
    st.builds(TypeError, st.text(max_size=20)),
    st.builds(KeyError, st.text(max_size=20)),
    st.builds(RuntimeError, st.text(max_size=20).filter(lambda text: "schema" not in text)),
    st.just(UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")),
    st.just(RecursionError("maximum recursion depth exceeded")),
    st.just(httpx2.ConnectError("refused")),
    st.just(OSError("broken pipe")),
)


@given(error=unclassified, evidence=evidences, closed=st.booleans())
def test_what_the_sdk_does_not_document_is_not_classified(
    error: Exception, evidence: Evidence | None, closed: bool
) -> None:
    assert classify(error, evidence, transport_closed=closed) is None


@given(closed=st.booleans())
def test_ack_timeout_is_a_lost_answer_on_a_live_session(closed: bool) -> None:
    verdict = classify(AckTimeout("no early ACK"), None, transport_closed=closed)
    assert verdict is not None
    assert (verdict.attempt, verdict.session_lost) == (Attempt.SENT_AND_LOST, False)


def test_an_invalid_result_is_unreadable_and_the_tool_ran() -> None:
    class Result(BaseModel):
        content: list[int]

    with pytest.raises(ValidationError) as caught:
        Result.model_validate({"content": "nope"})
    verdict = classify(caught.value, None, transport_closed=False)
    assert verdict is not None
    assert (verdict.attempt, verdict.session_lost) == (Attempt.UNREADABLE, False)


# -- contract with the installed SDK -----------------------------------------------------------


def test_the_sdk_codes_are_the_ones_the_classifier_knows() -> None:
    assert (mcp_types.CONNECTION_CLOSED, mcp_types.REQUEST_TIMEOUT) == (-32000, -32001)
    assert (mcp_types.INVALID_REQUEST, mcp_types.PARSE_ERROR) == (-32600, -32700)


def source(module: object) -> str:
    return inspect.getsource(module)  # pyright: ignore[reportArgumentType]


@pytest.mark.parametrize(
    ("module", "literal"),
    [
        (mcp.shared.jsonrpc_dispatcher, 'message="Connection closed"'),
        (mcp.shared.jsonrpc_dispatcher, 'message=f"Request {method!r} timed out"'),
        (mcp.shared.direct_dispatcher, 'message="Connection closed"'),
        (
            mcp.shared.direct_dispatcher,
            "message=f\"Timed out after {opts.get('timeout')}s waiting for {method!r}\"",
        ),
        (mcp.client.streamable_http, f'"{STREAM_ENDED_MESSAGE}"'),
        (mcp.client.streamable_http, f'"{RECONNECT_EXHAUSTED_MESSAGE}"'),
        (mcp.client.streamable_http, 'f"SSE stream failed: {exc}"'),
        (mcp.client.streamable_http, 'message="Session terminated"'),
        (mcp.client.streamable_http, 'message=f"Failed to parse JSON response: {exc}"'),
        (mcp.client.streamable_http, 'message=f"Failed to parse SSE message: {exc}"'),
        (mcp.client.streamable_http, "max_sse_event_size: int | None = DEFAULT_MAX_SSE_EVENT_SIZE"),
        (mcp.server.streamable_http_manager, '_error_response("Session not found", 404)'),
        (mcp.client.session, 'f"Tool {name} has an output schema but did not return structured content"'),
        (mcp.client.session, 'f"Invalid structured content returned by tool {name}: {error}"'),
        (mcp.client.session, 'f"Invalid schema for tool {name}: {e}"'),
    ],
)
def test_the_sdk_still_says_what_the_classifier_matches(module: object, literal: str) -> None:
    assert literal in source(module)


def test_the_classifier_patterns_match_the_sdk_wording() -> None:
    assert any(p.fullmatch("Request 'tools/call' timed out") for p in _failures.TIMEOUT_MESSAGES)
    assert any(
        p.fullmatch("Timed out after 0.5s waiting for 'tools/call'") for p in _failures.TIMEOUT_MESSAGES
    )
    for text in (
        "Tool add has an output schema but did not return structured content",
        "Invalid structured content returned by tool add: 3 is not a string",
        "Invalid schema for tool add: bad",
    ):
        assert any(p.match(text) for p in _failures.SCHEMA_MESSAGES)


async def test_httpx2_names_the_sse_event_limit_as_the_classifier_expects() -> None:
    response = httpx2.Response(
        200,
        headers={"content-type": "text/event-stream"},
        content=b"data: " + b"x" * 200 + b"\n\n",
        request=httpx2.Request("GET", "http://127.0.0.1/mcp"),
    )
    with pytest.raises(httpx2.SSEError) as caught:
        async for _ in httpx2.EventSource(response, max_event_size=100):
            pass
    verdict = classify(
        MCPError(code=-32000, message=f"SSE stream failed: {caught.value}"), None, transport_closed=False
    )
    assert verdict is not None
    assert verdict.attempt is Attempt.UNREADABLE
    assert "100 bytes" in verdict.reason


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_a_real_sdk_timeout_and_closed_session_are_classified(mode: str) -> None:
    server: MCPServer = build_server(State())
    async with Client(server, mode=mode) as client:  # pyright: ignore[reportArgumentType]
        with pytest.raises(MCPError) as timed_out:
            await client.call_tool("sleep", {"seconds": 5}, read_timeout_seconds=0.05)
    verdict = classify(timed_out.value, None, transport_closed=False)
    assert verdict is not None
    assert verdict.attempt is Attempt.TIMED_OUT
    assert re.search(r"timed out|Timed out", timed_out.value.message)


def test_mcp_is_pinned_to_the_tested_minor_range() -> None:
    pyproject = tomllib.loads(Path(__file__).parents[1].joinpath("pyproject.toml").read_text())
    [pin] = [dep for dep in pyproject["project"]["dependencies"] if dep.startswith("mcp")]
    installed = tuple(int(part) for part in importlib.metadata.version("mcp").split(".")[:2])
    assert pin == "mcp>=2.3,<2.4", pin
    assert installed == (2, 3)
