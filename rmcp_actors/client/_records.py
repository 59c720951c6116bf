"""The call path's records, built by writing their slots directly.

``LifecycleEvent`` (three per call) and ``CallResult`` (one) are frozen, slotted attrs classes:
their generated ``__init__`` sets each field through a bound ``object.__setattr__``, which
finds the slot by name every time. Writing through the slots' own descriptors builds the same
instance (same class, fields, equality, hash and repr) in about half the time. It is only
right for classes with no validators, converters or ``__attrs_post_init__``; :func:`_setters`
checks that, and the field list, when this module is imported, so a change to either class
fails at once instead of building a half-set record.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
from mcp_types import CallToolResult

from ..errors import Outcome
from ..lifecycle import LifecycleEvent, RequestState
from ..result import CallResult

if TYPE_CHECKING:
    from .call import CallRequest

__all__ = ["call_result", "lifecycle_event"]

_Setter = Callable[[object, Any], None]


def _setters(cls: type, *names: str) -> tuple[_Setter, ...]:
    fields = attrs.fields(cls)
    if tuple(field.name for field in fields) != names:
        raise TypeError(
            f"{cls.__name__} has fields {[f.name for f in fields]}, this module sets {list(names)}"
        )
    if any(field.validator is not None or field.converter is not None for field in fields) or hasattr(
        cls, "__attrs_post_init__"
    ):
        raise TypeError(f"{cls.__name__} validates or converts its fields: build it with its __init__")
    return tuple(cls.__dict__[name].__set__ for name in names)


_new = object.__new__
_state, _attempt, _at, _detail = _setters(LifecycleEvent, "state", "attempt", "at", "detail")
(
    _outcome,
    _content,
    _structured_content,
    _is_error,
    _attempts,
    _duplicate,
    _request_id,
    _idempotency_key,
    _server,
    _tool,
    _queued_s,
    _elapsed_s,
    _meta,
    _lifecycle,
    _transfers,
) = _setters(
    CallResult,
    "outcome",
    "content",
    "structured_content",
    "is_error",
    "attempts",
    "duplicate",
    "request_id",
    "idempotency_key",
    "server",
    "tool",
    "queued_s",
    "elapsed_s",
    "meta",
    "lifecycle",
    "transfers",
)


def lifecycle_event(state: RequestState, attempt: int, at: float, detail: str | None) -> LifecycleEvent:
    """``LifecycleEvent(state, attempt, at, detail)``, built faster."""
    event = _new(LifecycleEvent)
    _state(event, state)
    _attempt(event, attempt)
    _at(event, at)
    _detail(event, detail)
    return event


def call_result(
    result: CallToolResult,
    duplicate: bool,
    request: CallRequest,
    server: str,
    attempts: int,
    queued_s: float,
    elapsed_s: float,
    lifecycle: tuple[LifecycleEvent, ...],
) -> CallResult:
    """The ``CallResult`` of a call that ended with ``result``, built faster.

    Takes the answer and the request whole rather than field by field: every argument is a
    slot of the waiting call's frame (see docs/design.md, "Memory per pending call").
    """
    is_error = result.is_error
    built = _new(CallResult)
    _outcome(built, Outcome.FAILED if is_error else Outcome.SUCCEEDED)
    _content(built, result.content)
    _structured_content(built, result.structured_content)
    _is_error(built, is_error)
    _attempts(built, attempts)
    _duplicate(built, duplicate)
    _request_id(built, request.request_id)
    _idempotency_key(built, request.idempotency_key)
    _server(built, server)
    _tool(built, request.tool)
    _queued_s(built, queued_s)
    _elapsed_s(built, elapsed_s)
    _meta(built, result.meta)
    _lifecycle(built, lifecycle)
    _transfers(built, ())
    return built
