"""Test helper: HTTP servers that behave as real servers the Python SDK does not ship.

Each is an ASGI middleware for ``serve_http(app, wrap=...)`` in front of the SDK's own app, so
the MCP side stays the real SDK and only the HTTP behaviour under test differs.
"""

from __future__ import annotations

import itertools
from typing import Any

from mcp.server.streamable_http import EventCallback, EventId, EventMessage, EventStore, StreamId
from mcp_types import JSONRPCMessage

__all__ = ["MemoryEventStore", "require_bearer", "typescript_session_errors"]

ASGIApp = Any
_TS_UNKNOWN_SESSION = (
    b'{"jsonrpc":"2.0","error":{"code":-32000,"message":"Bad Request: No valid session ID provided"},'
    b'"id":null}'
)
# server-everything's own words (its Express handler sends ``id: req?.body?.id``, which is undefined
# there, so JSON leaves the member out): the SDK cannot parse that as a JSON-RPC error and reports
# its own -32603 "Server returned an error response" instead.
_TS_UNKNOWN_SESSION_WITHOUT_ID = (
    b'{"jsonrpc":"2.0","error":{"code":-32000,"message":"Bad Request: No valid session ID provided"}}'
)


def typescript_session_errors(app: ASGIApp, *, with_id: bool = True) -> ASGIApp:
    """Answer an unknown session id as every TypeScript-SDK server does: HTTP 400 with a
    JSON-RPC -32000 error and no id, instead of the Python SDK's 404 (``with_id=False``: without
    the ``id`` member at all, as server-everything answers)."""
    body = _TS_UNKNOWN_SESSION if with_id else _TS_UNKNOWN_SESSION_WITHOUT_ID

    async def wrapped(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        replaced = False

        async def send_rewritten(message: dict[str, Any]) -> None:
            nonlocal replaced
            if message["type"] == "http.response.start" and message["status"] == 404:
                replaced = True
                await send(
                    {
                        "type": "http.response.start",
                        "status": 400,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
            elif not replaced:
                await send(message)

        await app(scope, receive, send_rewritten)

    return wrapped


def require_bearer(token: str, status: int = 401) -> Any:
    """A gateway that answers ``status`` (plain text) to any request without ``Bearer <token>``."""

    def wrap(app: ASGIApp) -> ASGIApp:
        async def wrapped(scope: dict[str, Any], receive: Any, send: Any) -> None:
            headers = dict(scope.get("headers") or [])
            if scope["type"] != "http" or headers.get(b"authorization") == f"Bearer {token}".encode():
                await app(scope, receive, send)
                return
            body = b"Unauthorized" if status == 401 else b"Forbidden"
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [(b"content-type", b"text/plain"), (b"www-authenticate", b"Bearer")],
                }
            )
            await send({"type": "http.response.body", "body": body})

        return wrapped

    return wrap


class MemoryEventStore(EventStore):
    """The smallest event store: SSE resumability for the tests, events kept in a list."""

    def __init__(self) -> None:
        self._events: list[tuple[StreamId, EventId, JSONRPCMessage | None]] = []
        self._ids = itertools.count(1)

    async def store_event(self, stream_id: StreamId, message: JSONRPCMessage | None) -> EventId:
        event_id = str(next(self._ids))
        self._events.append((stream_id, event_id, message))
        return event_id

    async def replay_events_after(
        self, last_event_id: EventId, send_callback: EventCallback
    ) -> StreamId | None:
        stream = next((s for s, e, _ in self._events if e == last_event_id), None)
        if stream is None:
            return None
        after = False
        for stream_id, event_id, message in self._events:
            if event_id == last_event_id:
                after = True
            elif after and stream_id == stream and message is not None:
                await send_callback(EventMessage(message, event_id))
        return stream
