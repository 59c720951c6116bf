"""What a failed attempt means: the one place that reads SDK and transport exceptions.

:func:`classify` is a pure function from (the exception ``call_tool`` raised, what the transport
saw of the attempt, the transport's state) to a :class:`Verdict`: what happened to the request
and whether the session is gone. The call path acts on the verdict and never looks at an SDK
exception itself. Every SDK message matched here is checked against the installed SDK by
``tests/test_failures.py`` (the contract test), and ``mcp`` is pinned to the tested minor range.

Only transport-level evidence says a session is lost: the transport's read side ended, the SDK
gave up reconnecting a response stream, or the server no longer knows the session. One failed
response stream (one request) leaves the session to the other callers. An exception not listed
here is not classified (``None``): it is a bug to report, not a lost answer to retry.
"""

from __future__ import annotations

import enum
import re
from typing import Final, final

import attrs
from mcp import MCPError
from mcp_types import CONNECTION_CLOSED, INVALID_REQUEST, PARSE_ERROR, REQUEST_TIMEOUT
from pydantic import ValidationError

__all__ = ["AckTimeout", "Attempt", "Evidence", "Verdict", "classify"]


class Attempt(enum.Enum):
    """What happened to one attempt's request."""

    #: Nothing reached the server (the connection could not be opened): sending again is safe.
    NOT_SENT = "not_sent"
    #: The request was (or may have been) delivered and its answer will not arrive.
    SENT_AND_LOST = "sent_and_lost"
    #: The server answered with a JSON-RPC error; its code says whether the tool may have run.
    ANSWERED = "answered"
    #: The server refused the request without running it: it does not know the session.
    REFUSED = "refused"
    #: No answer within the time the SDK was given; the request was sent.
    TIMED_OUT = "timed_out"
    #: The server answered but the answer cannot be read (too large, malformed, not a valid
    #: result): the tool ran, and sending again would get the same answer.
    UNREADABLE = "unreadable"
    #: The server refused the client's credentials (HTTP 401/403 that the HTTP client's auth
    #: could not answer), or no credentials could be had: nothing ran, and the same request
    #: would be refused again.
    UNAUTHORIZED = "unauthorized"


@final
@attrs.frozen
class Verdict:
    """The meaning of one failed attempt.

    Attributes:
        attempt: What happened to the request.
        session_lost: The transport is gone (or the server forgot the session): reconnect.
        reason: What the caller's error should say about the cause.
    """

    attempt: Attempt
    session_lost: bool
    reason: str


@final
@attrs.define
class Evidence:
    """What the transport saw of one attempt (filled in by the HTTP transport, if any).

    Attributes:
        refused: The connection for the request could not be opened, so nothing was written.
        status: The HTTP status of the attempt's response, once one arrived.
        retry_after: The response's ``Retry-After`` header, as sent (read by the rate limiter's
            feedback, ``flow/_feedback.py``: a 429 is a rate-limit signal, never a failure here).
        auth_failure: The HTTP client's auth flow failed for the request (no token could be
            had): the request was refused or never sent.
        error_message: The JSON-RPC error message in the body of an HTTP 400, read by the
            transport: the SDK reports its own words for an error body it cannot parse.
    """

    refused: BaseException | None = None
    status: int | None = None
    retry_after: str | None = None
    auth_failure: BaseException | None = None
    error_message: str | None = None


class AckTimeout(Exception):
    """No early ACK arrived within the policy's ``ack_timeout_s``."""


# The SDK's own messages (mcp/shared/jsonrpc_dispatcher.py, direct_dispatcher.py,
# mcp/client/streamable_http.py, mcp/client/session.py).
CONNECTION_CLOSED_MESSAGE: Final = "Connection closed"
STREAM_ENDED_MESSAGE: Final = "SSE stream ended without a response"
RECONNECT_EXHAUSTED_MESSAGE: Final = "SSE stream ended and reconnection attempts were exhausted"
STREAM_FAILED_PREFIX: Final = "SSE stream failed: "
PARSE_FAILED_PREFIXES: Final = ("Failed to parse JSON response: ", "Failed to parse SSE message: ")
TIMEOUT_MESSAGES: Final = (
    re.compile(r"Request '[^']*' timed out"),
    re.compile(r"Timed out after \S+s waiting for '[^']*'"),
)
# httpx2's SSE decoder (httpx2/_sse.py), wrapped in STREAM_FAILED_PREFIX by the SDK.
EVENT_TOO_LARGE: Final = re.compile(r"Server-sent event exceeded the (\d+) byte limit")
SCHEMA_MESSAGES: Final = (
    re.compile(r"Tool .* has an output schema but did not return structured content"),
    re.compile(r"Invalid structured content returned by tool "),
    re.compile(r"Invalid schema for tool "),
)
# A server that no longer knows the session id: the Python SDK's server says "Session not found"
# (HTTP 404), its client "Session terminated" for a 404 without a JSON-RPC body, and every
# TypeScript-SDK server answers HTTP 400 "Bad Request: No valid session ID provided". These words
# mean a refusal only with that HTTP status: from a tool (an app's own browser or database session)
# they are an answer, and the tool ran.
SESSION_UNKNOWN_MESSAGES: Final = frozenset({"Session not found", "Session terminated"})
NO_VALID_SESSION_MESSAGE: Final = "Bad Request: No valid session ID provided"
# The SDK's -32600 for a request the server accepted but did not answer in a readable way (a
# gateway's HTML page, a 202 for a request): the request was delivered and may have run.
ACCEPTED_UNANSWERED_MESSAGE: Final = "server answered a request with 202 Accepted"
UNEXPECTED_CONTENT_TYPE_PREFIX: Final = "Unexpected content type: "
# The SDK's -32600 for a redirect it does not follow (a 303, a 301/302 that would turn the POST
# into a GET, another origin, an HTTPS-to-HTTP downgrade): whoever answered it had the whole
# request, and a POST/Redirect/GET server answers 303 after running it.
REDIRECT_NOT_FOLLOWED: Final = re.compile(r"Redirect to \S+ not followed[;:] ")


def classify(
    error: BaseException, evidence: Evidence | None, *, transport_closed: bool, handed_over: bool
) -> Verdict | None:
    """Say what a failed ``call_tool`` means.

    Args:
        error: What ``call_tool`` raised (or :class:`AckTimeout`).
        evidence: What the HTTP transport saw of this attempt; None on other transports.
        transport_closed: The transport's read side had ended when the error arrived.
        handed_over: The transport took the request, or still may (see ``_sent``); False only
            when it is known never to write it.

    Returns:
        The verdict, or None when the exception is not one the SDK documents for a failed
        request (the caller lets it propagate).
    """
    verdict = _classify(error, evidence, transport_closed)
    if verdict is None or handed_over or verdict.attempt in (Attempt.NOT_SENT, Attempt.UNAUTHORIZED):
        return verdict
    # Whatever the SDK made of it, a request the transport never took cannot have run. The
    # usual case: the transport's writer ended (a stdio server died) with the request still
    # waiting to be taken, which the SDK reports like a lost answer ("Connection closed").
    return Verdict(
        Attempt.NOT_SENT,
        verdict.session_lost or transport_closed,
        f"the transport never took the request ({verdict.reason})",
    )


def _classify(error: BaseException, evidence: Evidence | None, transport_closed: bool) -> Verdict | None:
    if (
        isinstance(error, MCPError)
        and evidence is not None
        and (evidence.auth_failure is not None or evidence.status in (401, 403))
    ):
        # Whatever the SDK made of it (-32603 "Server returned an error response", or "Connection
        # closed" once a failed auth flow ended its writer), the auth layer refused the request.
        failure = evidence.auth_failure
        if failure is not None:
            # The SDK's HTTP writer ends with the exception: the session is gone.
            reason = f"the auth flow failed: {type(failure).__name__}: {failure}"
            return Verdict(Attempt.UNAUTHORIZED, True, reason)
        return Verdict(Attempt.UNAUTHORIZED, transport_closed, f"the server answered HTTP {evidence.status}")
    if isinstance(error, MCPError):
        return _classify_mcp_error(error.code, error.message, evidence, transport_closed)
    if isinstance(error, AckTimeout):
        return Verdict(Attempt.SENT_AND_LOST, False, str(error))
    if isinstance(error, ValidationError):
        first = error.errors()[0]["msg"] if error.error_count() else "invalid"
        return Verdict(
            Attempt.UNREADABLE,
            False,
            f"the server's answer is not a valid tool result: {error.error_count()} problem(s), "
            f"first: {first}",
        )
    if isinstance(error, RuntimeError) and any(p.match(str(error)) for p in SCHEMA_MESSAGES):
        return Verdict(Attempt.UNREADABLE, False, f"the result breaks the tool's output schema: {error}")
    return None


def _server_forgot_session(code: int, message: str, evidence: Evidence | None) -> bool:
    if evidence is None:
        return False
    if evidence.status == 404:
        return message in SESSION_UNKNOWN_MESSAGES or code == INVALID_REQUEST
    # server-everything leaves the id out of that error, so the SDK cannot parse it and says
    # "Server returned an error response": the transport kept the server's own message.
    return evidence.status == 400 and NO_VALID_SESSION_MESSAGE in (message, evidence.error_message)


def _classify_mcp_error(
    code: int, message: str, evidence: Evidence | None, transport_closed: bool
) -> Verdict:
    said = f"MCPError {code}: {message or '(no message)'}"
    if _server_forgot_session(code, message, evidence):
        return Verdict(Attempt.REFUSED, True, f"the server does not know the session ({said})")
    if code == REQUEST_TIMEOUT and any(p.fullmatch(message) for p in TIMEOUT_MESSAGES):
        return Verdict(Attempt.TIMED_OUT, False, message)
    if code == PARSE_ERROR and message.startswith(PARSE_FAILED_PREFIXES):
        return Verdict(Attempt.UNREADABLE, False, f"the server's answer cannot be parsed: {message}")
    # The SDK's HTTP client says the rest only over HTTP (evidence is recorded there alone);
    # the same words from a stdio or in-memory peer are that server's own answer.
    http = evidence is not None
    if (
        http
        and code == INVALID_REQUEST
        and (
            message == ACCEPTED_UNANSWERED_MESSAGE
            or message.startswith(UNEXPECTED_CONTENT_TYPE_PREFIX)
            or REDIRECT_NOT_FOLLOWED.match(message) is not None
        )
    ):
        return Verdict(Attempt.SENT_AND_LOST, False, f"the request was delivered but {said}")
    if code != CONNECTION_CLOSED:
        return Verdict(Attempt.ANSWERED, False, said)
    if message == CONNECTION_CLOSED_MESSAGE:
        if evidence is not None and evidence.refused is not None:
            # No connection for the request (the SDK's HTTP writer ends the transport with it).
            refused = evidence.refused
            return Verdict(Attempt.NOT_SENT, True, f"{type(refused).__name__}: {refused}".rstrip(": "))
    elif http and message == RECONNECT_EXHAUSTED_MESSAGE:
        return Verdict(Attempt.SENT_AND_LOST, True, message)
    elif http and message == STREAM_ENDED_MESSAGE:
        return Verdict(Attempt.SENT_AND_LOST, transport_closed, message)
    elif http and message.startswith(STREAM_FAILED_PREFIX):
        too_large = EVENT_TOO_LARGE.search(message)
        if too_large is not None:
            return Verdict(
                Attempt.UNREADABLE,
                False,
                f"the answer is larger than the SDK's limit of {int(too_large.group(1)):,} bytes for "
                "one server-sent event: the tool ran; raise max_sse_event_bytes in the server's "
                "config ([servers.<name>] or [defaults]), ask the server for a smaller result "
                "(pagination, a resource link), or have it answer with JSON responses instead of SSE",
            )
        return Verdict(Attempt.SENT_AND_LOST, transport_closed, message)
    if transport_closed:
        # -32000 is also the implementation-defined range servers use for their own errors
        # (even "Connection closed", from a tool whose database dropped): it means a lost
        # answer only from a transport known to be gone.
        return Verdict(Attempt.SENT_AND_LOST, True, said)
    return Verdict(Attempt.ANSWERED, False, said)
