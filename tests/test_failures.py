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

import anyio
import httpx2
import mcp.client.session
import mcp.client.streamable_http
import mcp.server.streamable_http_manager
import mcp.shared.direct_dispatcher
import mcp.shared.jsonrpc_dispatcher
import mcp_types
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st
from mcp import Client, MCPError
from mcp.client.auth import OAuthTokenError
from mcp.server.mcpserver import MCPServer
from mcp_test_server import State, build_server
from pydantic import BaseModel, ValidationError

from rmcp_actors import RMCPError, RMCPSupervisor, ServerSpec
from rmcp_actors.client import _failures
from rmcp_actors.client._failures import (
    ACCEPTED_UNANSWERED_MESSAGE,
    CONNECTION_CLOSED_MESSAGE,
    NO_VALID_SESSION_MESSAGE,
    RECONNECT_EXHAUSTED_MESSAGE,
    REDIRECT_NOT_FOLLOWED,
    SESSION_UNKNOWN_MESSAGES,
    STREAM_ENDED_MESSAGE,
    STREAM_FAILED_PREFIX,
    UNEXPECTED_CONTENT_TYPE_PREFIX,
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
    NO_VALID_SESSION_MESSAGE,
    ACCEPTED_UNANSWERED_MESSAGE,
    f"{UNEXPECTED_CONTENT_TYPE_PREFIX}text/html",
    "Redirect to http://127.0.0.1:8000/result not followed; use that URL as the endpoint if it is "
    "the intended server",
    "Redirect to http://example.com/mcp not followed: it would downgrade this HTTPS endpoint to "
    "plain HTTP.\nThe server is likely behind a TLS-terminating proxy",
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
        auth_failure=st.one_of(st.none(), st.just(OAuthTokenError("Token exchange failed (401)"))),
    ),
)


def refused_credentials(evidence: Evidence | None) -> bool:
    """The HTTP client's auth could not get the request through: a 401/403, or its flow failed."""
    return evidence is not None and (evidence.auth_failure is not None or evidence.status in (401, 403))


def forgot_session(code: int, message: str, evidence: Evidence | None) -> bool:
    """The server's HTTP status says it does not know the session (the only refusal)."""
    if evidence is None:
        return False
    if evidence.status == 404:
        return message in SESSION_UNKNOWN_MESSAGES or code == -32600
    return evidence.status == 400 and message == NO_VALID_SESSION_MESSAGE


def accepted_unanswered(code: int, message: str, evidence: Evidence | None) -> bool:
    """The SDK's -32600 for an HTTP request delivered and then not answered readably (a 202,
    an odd content type, a redirect it does not follow)."""
    return (
        evidence is not None
        and code == -32600
        and (
            message == ACCEPTED_UNANSWERED_MESSAGE
            or message.startswith(UNEXPECTED_CONTENT_TYPE_PREFIX)
            or REDIRECT_NOT_FOLLOWED.match(message) is not None
        )
    )


def is_sdk_lost_message(message: str) -> bool:
    return message in {CONNECTION_CLOSED_MESSAGE, STREAM_ENDED_MESSAGE, RECONNECT_EXHAUSTED_MESSAGE} or (
        message.startswith(STREAM_FAILED_PREFIX)
    )


@given(code=codes, message=messages, evidence=evidences, closed=st.booleans())
def test_every_mcp_error_gets_a_verdict(
    code: int, message: str, evidence: Evidence | None, closed: bool
) -> None:
    verdict = classify(
        MCPError(code=code, message=message), evidence, transport_closed=closed, handed_over=True
    )
    assert verdict is not None
    assert verdict.reason
    if refused_credentials(evidence):
        # Whatever the SDK made of it, the credentials were refused: nothing ran, no retry.
        assert verdict.attempt is Attempt.UNAUTHORIZED
        assert evidence is not None
        # A failed auth flow ends the SDK's HTTP writer; a plain 401 leaves the session.
        assert verdict.session_lost == (evidence.auth_failure is not None or closed)
        return
    if forgot_session(code, message, evidence):
        # Nothing ran: reconnect and send again.
        assert (verdict.attempt, verdict.session_lost) == (Attempt.REFUSED, True)
        return
    # The session words without the HTTP status are a tool's own answer: the tool ran.
    assert verdict.attempt is not Attempt.REFUSED
    if accepted_unanswered(code, message, evidence):
        # Delivered, and the tool may have run; one request's failure, not the session's.
        assert (verdict.attempt, verdict.session_lost) == (Attempt.SENT_AND_LOST, False)
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
        assert (
            closed
            or (evidence is not None and evidence.refused is not None)
            or (evidence is not None and message == RECONNECT_EXHAUSTED_MESSAGE)
        )
    if code not in {-32000, -32001, -32700}:
        assert verdict.attempt is Attempt.ANSWERED


@given(message=messages, evidence=evidences, closed=st.booleans())
def test_minus_32000_is_a_lost_answer_only_from_the_sdk_or_a_dead_transport(
    message: str, evidence: Evidence | None, closed: bool
) -> None:
    verdict = classify(
        MCPError(code=-32000, message=message), evidence, transport_closed=closed, handed_over=True
    )
    assert verdict is not None
    if forgot_session(-32000, message, evidence) or refused_credentials(evidence):
        return
    http = evidence is not None
    if message == CONNECTION_CLOSED_MESSAGE and http and evidence.refused is not None:
        assert (verdict.attempt, verdict.session_lost) == (Attempt.NOT_SENT, True)
    elif message == CONNECTION_CLOSED_MESSAGE:
        # The SDK's words, and also a server's own (its database connection closed): a lost
        # answer only from a transport known to be gone.
        assert (verdict.attempt, verdict.session_lost) == (
            (Attempt.SENT_AND_LOST, True) if closed else (Attempt.ANSWERED, False)
        )
    elif not http:
        # The SDK's HTTP client's words from another transport are the server's own.
        assert (verdict.attempt, verdict.session_lost) == (
            (Attempt.SENT_AND_LOST, True) if closed else (Attempt.ANSWERED, False)
        )
    elif "byte limit" in message and message.startswith(STREAM_FAILED_PREFIX):
        assert verdict.attempt is Attempt.UNREADABLE
        assert "1,048,576 bytes" in verdict.reason
        assert "max_sse_event_bytes" in verdict.reason
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
    verdict = classify(
        MCPError(code=-32001, message=message), evidence, transport_closed=closed, handed_over=True
    )
    assert verdict is not None
    if refused_credentials(evidence):
        assert verdict.attempt is Attempt.UNAUTHORIZED
    elif forgot_session(-32001, message, evidence):
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
    assert classify(error, evidence, transport_closed=closed, handed_over=True) is None


def schema_error() -> RuntimeError:
    return RuntimeError("Tool add has an output schema but did not return structured content")


def validation_error() -> ValidationError:
    class Result(BaseModel):
        content: list[int]

    try:
        Result.model_validate({"content": "nope"})
    except ValidationError as error:
        return error
    raise AssertionError("the model accepted an invalid result")


any_exception = st.one_of(
    st.builds(lambda code, message: MCPError(code=code, message=message), codes, messages),
    st.builds(AckTimeout, st.text(max_size=20)),
    st.builds(validation_error),
    st.builds(schema_error),
    unclassified,
)


@given(error=any_exception, evidence=evidences, closed=st.booleans())
def test_a_request_never_handed_over_never_may_have_run(
    error: Exception, evidence: Evidence | None, closed: bool
) -> None:
    verdict = classify(error, evidence, transport_closed=closed, handed_over=False)
    sent = classify(error, evidence, transport_closed=closed, handed_over=True)
    # What is not classified stays so: the hand-over says nothing of an unknown exception.
    assert (verdict is None) == (sent is None)
    if verdict is None or sent is None:
        return
    if sent.attempt is Attempt.UNAUTHORIZED:
        # Refused credentials stay so: sent or not, nothing ran, and a retry would be refused too.
        assert verdict == sent
        return
    assert verdict.attempt is Attempt.NOT_SENT
    assert verdict.reason
    # A dead transport (or one the SDK gave up on) is still dead; a live one is left alone.
    assert verdict.session_lost == (sent.session_lost or closed)


@given(error=any_exception, evidence=evidences, closed=st.booleans())
def test_not_sent_needs_the_transports_word(
    error: Exception, evidence: Evidence | None, closed: bool
) -> None:
    verdict = classify(error, evidence, transport_closed=closed, handed_over=True)
    if verdict is not None and verdict.attempt is Attempt.NOT_SENT:
        assert evidence is not None
        assert evidence.refused is not None


@given(closed=st.booleans())
def test_ack_timeout_is_a_lost_answer_on_a_live_session(closed: bool) -> None:
    verdict = classify(AckTimeout("no early ACK"), None, transport_closed=closed, handed_over=True)
    assert verdict is not None
    assert (verdict.attempt, verdict.session_lost) == (Attempt.SENT_AND_LOST, False)


def test_an_invalid_result_is_unreadable_and_the_tool_ran() -> None:
    class Result(BaseModel):
        content: list[int]

    with pytest.raises(ValidationError) as caught:
        Result.model_validate({"content": "nope"})
    verdict = classify(caught.value, None, transport_closed=False, handed_over=True)
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
        (
            mcp.client.streamable_http,
            f'"{ACCEPTED_UNANSWERED_MESSAGE}",\n                        code=INVALID_REQUEST',
        ),
        (
            mcp.client.streamable_http,
            f'ErrorData(code=INVALID_REQUEST, message=f"{UNEXPECTED_CONTENT_TYPE_PREFIX}{{content_type}}")',
        ),
        (
            mcp.client.streamable_http,
            'f"Redirect to {location} not followed; use that URL as the endpoint',
        ),
        (
            mcp.client.streamable_http,
            'f"Redirect to {location} not followed: it would downgrade this HTTPS endpoint',
        ),
        (
            mcp.client.streamable_http,
            "ctx.read_stream_writer, message.id, redirect, code=INVALID_REQUEST",
        ),
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
    for location in ("http://127.0.0.1:8000/result", "https://other.example/mcp"):
        assert REDIRECT_NOT_FOLLOWED.match(
            f"Redirect to {location} not followed; use that URL as the endpoint if it is the intended server"
        )
        assert REDIRECT_NOT_FOLLOWED.match(
            f"Redirect to {location} not followed: it would downgrade this HTTPS endpoint"
        )
    # A tool's own text that merely mentions a redirect is not the SDK's.
    assert not REDIRECT_NOT_FOLLOWED.match("Redirect to the billing page not followed; ask support")


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
        MCPError(code=-32000, message=f"SSE stream failed: {caught.value}"),
        Evidence(status=200),
        transport_closed=False,
        handed_over=True,
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
    verdict = classify(timed_out.value, None, transport_closed=False, handed_over=True)
    assert verdict is not None
    assert verdict.attempt is Attempt.TIMED_OUT
    assert re.search(r"timed out|Timed out", timed_out.value.message)


def test_mcp_is_pinned_to_the_tested_minor_range() -> None:
    pyproject = tomllib.loads(Path(__file__).parents[1].joinpath("pyproject.toml").read_text())
    [pin] = [dep for dep in pyproject["project"]["dependencies"] if dep.startswith("mcp")]
    installed = tuple(int(part) for part in importlib.metadata.version("mcp").split(".")[:2])
    assert pin == "mcp>=2.3,<2.4", pin
    assert installed == (2, 3)


# -- a server's own words are its answer -------------------------------------------------------


def _server_whose_tool_ran_then_says(message: str, code: int) -> tuple[MCPServer, list[int]]:
    """A tool that runs (counts) and then answers a JSON-RPC error of its own with ``message``."""
    app = MCPServer("session-words")
    runs: list[int] = []

    @app.tool()
    async def charge() -> str:
        """Charge a card (not idempotent): it ran, then reports an app-level error."""
        runs.append(1)
        raise MCPError(code=code, message=message)

    return app, runs


@pytest.mark.parametrize("message", ["Session not found", "Session terminated"])
async def test_a_tool_error_worded_like_a_lost_session_is_not_a_refusal(
    message: str, autojump_clock: trio.testing.MockClock
) -> None:
    # Over a transport with no MCP session at all (in memory, like stdio), a server's own
    # -32603 "Session not found" (an app-level session, e.g. a browser or DB session) comes from
    # a tool that ran. _failures.classify matches the message whatever the code and transport,
    # so the call is reported REFUSED: session torn down, the non-idempotent tool sent again,
    # and the caller finally told "nothing was sent or run" (may_have_executed=False).
    app, runs = _server_whose_tool_ran_then_says(message, -32603)
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("s", app))
        with pytest.raises(RMCPError) as caught:
            await sup.call("s", "charge", timeout=30)
        connects = sup.statistics().connections[0].connects
    assert len(runs) == 1, f"a non-idempotent tool ran {len(runs)} times"
    assert caught.value.may_have_executed is True, caught.value
    assert connects == 1


async def test_a_servers_own_connection_closed_error_does_not_tear_down_the_session(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A tool may answer its own -32000 "Connection closed" (its database connection closed).
    # classify() reads that message as the SDK's lost-answer evidence whatever the transport
    # state, so the healthy session is reported broken and torn down: an unrelated
    # non-idempotent call in flight on it becomes outcome-unknown. Only transport-level
    # evidence may mark a session broken (issue section 1).
    app = MCPServer("db")
    runs: list[str] = []

    @app.tool()
    async def query() -> str:
        """Its database connection dropped: a server error in the -32000 range."""
        runs.append("query")
        raise MCPError(code=-32000, message="Connection closed")

    @app.tool()
    async def transfer() -> str:
        """A slow non-idempotent tool."""
        await anyio.sleep(5)
        runs.append("transfer")
        return "done"

    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("db", app))
        outcome: list[object] = []

        async def unrelated() -> None:
            try:
                outcome.append((await sup.call("db", "transfer", timeout=30)).text)
            except RMCPError as error:
                outcome.append(error)

        async with anyio.create_task_group() as tg:
            tg.start_soon(unrelated)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(RMCPError):
                await sup.call("db", "query", timeout=30)
        connects = sup.statistics().connections[0].connects
    assert outcome == ["done"], outcome
    assert connects == 1
