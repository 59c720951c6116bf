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
from typing import Any

import attrs
from mcp_types import ContentBlock

from ..errors import Outcome
from ..lifecycle import LifecycleEvent, RequestState
from ..result import CallResult

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
    *,
    outcome: Outcome,
    content: list[ContentBlock],
    structured_content: dict[str, Any] | None,
    is_error: bool,
    attempts: int,
    duplicate: bool,
    request_id: str,
    idempotency_key: str,
    server: str,
    tool: str,
    queued_s: float,
    elapsed_s: float,
    meta: dict[str, Any] | None,
    lifecycle: tuple[LifecycleEvent, ...],
) -> CallResult:
    """``CallResult(...)`` with every field given, built faster."""
    result = _new(CallResult)
    _outcome(result, outcome)
    _content(result, content)
    _structured_content(result, structured_content)
    _is_error(result, is_error)
    _attempts(result, attempts)
    _duplicate(result, duplicate)
    _request_id(result, request_id)
    _idempotency_key(result, idempotency_key)
    _server(result, server)
    _tool(result, tool)
    _queued_s(result, queued_s)
    _elapsed_s(result, elapsed_s)
    _meta(result, meta)
    _lifecycle(result, lifecycle)
    return result
