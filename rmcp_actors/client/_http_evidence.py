"""What the HTTP transport saw of one attempt, recorded where the SDK cannot hide it.

The SDK turns a refused connection into the same ``MCPError(-32000, "Connection closed")`` as a
request that was delivered and lost, and drops the HTTP status of a refused handshake. The
httpx transport under the SDK's client sees both. The SDK runs each request's POST in a copy of
the sending task's context, so a context variable set by the caller around ``call_tool`` (or by
the connection around the handshake) names the :class:`Evidence` of that request alone.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any, Final

import httpx2
import msgspec
from httpx2 import USE_CLIENT_DEFAULT
from httpx2._client import UseClientDefault  # send()'s own types, not re-exported
from httpx2._types import AuthTypes
from mcp.client.auth import OAuthFlowError
from mcp.shared._httpx_utils import MCP_DEFAULT_SSE_READ_TIMEOUT, MCP_DEFAULT_TIMEOUT

from ._failures import Evidence
from ._sent import request_handed_over

__all__ = ["current_evidence", "describe_refusal", "recording_http_client"]

#: The evidence of the request the current task is sending, if anyone is recording.
current_evidence: ContextVar[Evidence | None] = ContextVar("rmcp_actors_http_evidence", default=None)

_Trace = Callable[[str, dict[str, Any]], Awaitable[None]]


# The extension that marks a request as one hop of the POST whose evidence it names. httpx copies
# a request's extensions into the request that follows a redirect, so the SDK's second send after
# a 307/308 carries it too, and a later POST in the same context (a courtesy cancel) does not.
_HOP: Final = "rmcp_actors.evidence"
# An error body above this is not one of the short JSON-RPC errors the classifier reads.
_ERROR_BODY_LIMIT: Final = 64 * 1024


class _RecordingClient(httpx2.AsyncClient):
    """Notes, for the request being sent, a connection that could not be opened and the status.

    Recorded around ``send`` rather than in a custom transport: passing ``transport=`` makes
    httpx ignore the environment's proxies (``HTTP(S)_PROXY``, ``NO_PROXY``), which the SDK's
    default client honours; ``send`` sees the same request whichever transport (direct or a
    proxy's) httpx picks for the URL.

    The SDK follows a same-origin 307/308 itself, with one ``send`` per hop: the status kept is
    the last hop's (a restarted server behind a trailing-slash redirect answers 307, then 404).
    A refusal counts only while no hop has had a response: once something answered the request,
    it was delivered, and a refused next hop cannot prove that nothing ran.
    """

    async def send(
        self,
        request: httpx2.Request,
        *,
        stream: bool = False,
        auth: AuthTypes | UseClientDefault | None = USE_CLIENT_DEFAULT,
        follow_redirects: bool | UseClientDefault = USE_CLIENT_DEFAULT,
    ) -> httpx2.Response:
        evidence = current_evidence.get()
        first = evidence is not None and evidence.status is None and evidence.refused is None
        # Only the request's own POST counts: a courtesy cancel or the GET stream that runs in
        # the same context must not overwrite what happened to the request.
        if (
            evidence is None
            or request.method != "POST"
            or not (first or request.extensions.get(_HOP) is evidence)
        ):
            return await super().send(request, stream=stream, auth=auth, follow_redirects=follow_redirects)
        if first:
            request.extensions = {
                **request.extensions,
                "trace": _tracer(request.extensions.get("trace")),
                _HOP: evidence,
            }
        try:
            response = await super().send(
                request, stream=stream, auth=auth, follow_redirects=follow_redirects
            )
        except (httpx2.ConnectError, httpx2.ConnectTimeout) as error:
            if evidence.status is None:
                # No connection (to the server or to its proxy), so not a byte of it was written.
                evidence.refused = error
            raise
        except OAuthFlowError as error:
            # The auth flow could not get a token (before the request, or after its 401): the
            # request was refused or never sent, so nothing ran.
            evidence.auth_failure = error
            raise
        evidence.status = response.status_code
        evidence.retry_after = response.headers.get("retry-after")
        if response.status_code == 400:
            evidence.error_message = await _error_message(response)
        return response


async def _error_message(response: httpx2.Response) -> str | None:
    """The JSON-RPC error message of a small JSON error body, read here because the SDK drops a
    body it cannot parse (an error without an ``id``). The read is cached: the SDK's own read of
    the body returns the same bytes."""
    length = response.headers.get("content-length")
    if (
        not response.headers.get("content-type", "").lower().startswith("application/json")
        or length is None
        or not length.isdigit()
        or int(length) > _ERROR_BODY_LIMIT
    ):
        return None
    try:
        return msgspec.json.decode(await response.aread(), type=_ErrorBody).error.message
    except (httpx2.HTTPError, msgspec.DecodeError):
        return None


class _Error(msgspec.Struct):
    message: str


class _ErrorBody(msgspec.Struct):
    """A JSON-RPC error response, with or without its ``id`` (other members are ignored)."""

    error: _Error


def _tracer(inner: _Trace | None) -> _Trace:
    """An httpcore trace callback that tells the attempt when its POST starts writing: the
    connection is open, the request is leaving (see ``_sent``)."""

    async def trace(event: str, info: dict[str, Any]) -> None:
        if event.endswith(".send_request_headers.started"):
            request_handed_over()
        if inner is not None:
            await inner(event, info)

    return trace


def recording_http_client(
    headers: dict[str, str] | None, auth: httpx2.Auth | None = None
) -> httpx2.AsyncClient:
    """The SDK's default HTTP client (same timeouts, same use of the environment's proxies),
    recording into :data:`current_evidence`."""
    return _RecordingClient(
        headers=headers,
        auth=auth,
        timeout=httpx2.Timeout(MCP_DEFAULT_TIMEOUT, read=MCP_DEFAULT_SSE_READ_TIMEOUT),
    )


def describe_refusal(evidence: Evidence, *, authenticated: bool) -> str | None:
    """Why a request the server refused (HTTP 401 or 403) or whose auth flow failed did not get
    through, and what to do; None when neither happened. Other error statuses can come from a
    probe the SDK falls back from (``server/discover`` on an older server), so they explain
    nothing.

    Args:
        evidence: What the transport saw of the request.
        authenticated: The spec has an ``auth`` (else the advice is about headers).
    """
    where = (
        "the spec's auth (the token or secret it names, its token store)"
        if authenticated
        else "the spec's auth or headers (e.g. Authorization)"
    )
    if evidence.auth_failure is not None:
        failure = evidence.auth_failure
        return f"the auth flow failed ({type(failure).__name__}: {failure}); check {where}"
    if evidence.status == 401:
        if authenticated:
            return (
                "HTTP 401 Unauthorized: the server refused the credentials (expired or revoked, and "
                f"no new ones could be had); check {where}"
            )
        return f"HTTP 401 Unauthorized: the server wants credentials; give them in {where}"
    if evidence.status == 403:
        return (
            "HTTP 403 Forbidden: the server refuses these credentials for this (missing scope or "
            f"permission); check {where} and the scopes the token carries"
        )
    return None
