"""The moment an attempt's request is handed to the transport, told to the attempt.

The lifecycle's ``sent`` step means the request left for the server, not that ``call_tool`` was
entered: an attempt whose connection could not be opened never reaches the wire. The transport
knows the moment (the write stream took the request; over HTTP, the POST began writing) but not
the call; the attempt sets :data:`current_send_hook` around ``call_tool``, and the SDK writes
the request in the caller's task (stdio, in memory) or in a copy of its context (the HTTP
POST), so the transport finds the hook of that attempt alone.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar

__all__ = ["current_send_hook", "request_handed_over"]

#: Called (once or more) when the current task's request is handed to the transport.
current_send_hook: ContextVar[Callable[[], None] | None] = ContextVar("rmcp_actors_send_hook", default=None)


def request_handed_over() -> None:
    """Tell the attempt sending in this context, if any, that its request left."""
    hook = current_send_hook.get()
    if hook is not None:
        hook()
