"""Check a call's arguments before admission: only values JSON carries unchanged may be sent.

The SDK serializes arguments with pydantic only once the request is being written, and what it
does with a value JSON has no type for is either an exception deep in the send path (``bytes``
that are not UTF-8) or a silent change (``NaN`` becomes ``null``, a set a list). Neither may
reach the session: a failure there looks like a transport failure, and a silent change sends a
call the caller did not make. So the rule is strict and checked up front, in the caller's task:
dicts with ``str`` keys, lists and tuples, ``str``, ``int``, finite ``float``, ``bool`` and
``None`` (subclasses included, e.g. a ``StrEnum``). Text must be encodable as UTF-8: a lone
surrogate (``"\\ud800"``, e.g. from ``os.fsdecode`` of a non-UTF-8 file name) fails in the
transport's writer, not in the caller. Only non-ASCII text is encoded to find out (``isascii``
costs nanoseconds; encoding, about 2-3 ms per MiB of non-ASCII text, is less than the JSON
serialization that follows).
"""

from __future__ import annotations

import math
from typing import Any, cast

from ..errors import RMCPArgumentError

__all__ = ["MAX_DEPTH", "check_arguments", "check_idempotency_key"]

#: Deepest nesting accepted. The SDK's JSON parser (pydantic's) gives up at about 200 levels
#: for the whole message, and the JSON-RPC envelope takes a few of them.
MAX_DEPTH = 190

_SCALARS = (str, int, bool)
# Exact types whose values are always valid: one set lookup per item on the common path.
_PLAIN = frozenset({int, bool, type(None)})
_PATH_SHOWN = 8
_HINTS: dict[type[object], str] = {
    bytes: "decode it to str, or base64-encode it, as the tool expects",
    bytearray: "decode it to str, or base64-encode it, as the tool expects",
    set: "pass a list",
    frozenset: "pass a list",
}


class _Bad(Exception):
    """Unwinds the walk; the path is built on the way out, so a valid walk pays nothing for it."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem
        self.path: list[str] = []


def check_arguments(arguments: dict[str, Any] | None) -> None:
    """Raise unless ``arguments`` is made only of JSON values.

    Raises:
        RMCPArgumentError: A value JSON cannot carry unchanged, a non-``str`` key, a circular
            reference or nesting deeper than :data:`MAX_DEPTH`; the message names where.
    """
    if arguments is None:
        return
    try:
        _check_dict(arguments, 1)
    except _Bad as bad:
        path = bad.path[::-1]
        where = "arguments" + "".join(path[:_PATH_SHOWN]) + ("..." if len(path) > _PATH_SHOWN else "")
        if bad.problem.startswith("nested") and _circular(arguments, set()):
            bad.problem = "it is a circular reference (a container that holds itself)"
        raise RMCPArgumentError(
            f"{where} cannot be sent as JSON: {bad.problem}; nothing was sent. Pass only dicts "
            "with str keys, lists, str, int, finite float, bool and None",
        ) from None


def check_idempotency_key(key: str) -> None:
    """Raise unless ``key`` can be sent (it travels in the request's ``_meta`` as UTF-8).

    Raises:
        RMCPArgumentError: The key holds a lone surrogate; nothing was sent.
    """
    if key.isascii():
        return
    try:
        _check_text(key)
    except _Bad as bad:
        raise RMCPArgumentError(f"idempotency_key cannot be sent: {bad.problem}; nothing was sent") from None


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise _Bad(
            f"its text holds a lone surrogate {text[error.start]!r} at index {error.start}, which "
            "UTF-8 cannot encode (decode bytes with errors='replace', or pass them base64-encoded)"
        ) from None


def _check_dict(value: dict[Any, Any], depth: int) -> None:
    if depth > MAX_DEPTH:
        raise _Bad(f"nested more than {MAX_DEPTH} levels deep")
    for key, item in value.items():
        if type(key) is not str and not isinstance(key, str):
            raise _Bad(f"its key {key!r} is a {type(key).__name__}; JSON object keys are str")
        if not key.isascii():
            try:
                _check_text(key)
            except _Bad as bad:
                bad.path.append(f"[{key!r}]")
                raise
        kind: type[object] = type(cast("object", item))
        if kind is str:
            if item.isascii():
                continue
        elif kind in _PLAIN:
            continue
        try:
            _check(item, depth)
        except _Bad as bad:
            bad.path.append(f"[{key!r}]")
            raise


def _check(value: Any, depth: int) -> None:
    kind: type[object] = type(cast("object", value))
    if isinstance(value, str):
        _check_text(value)
        return
    if kind is float:
        if not math.isfinite(value):
            raise _Bad(f"{value!r} is not a finite number, and JSON has no NaN or infinity")
        return
    if kind is dict:
        _check_dict(value, depth + 1)
        return
    if kind is list or kind is tuple:
        _check_sequence(value, depth + 1)
        return
    if isinstance(value, _SCALARS):
        return
    if isinstance(value, float):
        _check(float(value), depth)
        return
    if isinstance(value, dict):
        _check_dict(value, depth + 1)  # pyright: ignore[reportUnknownArgumentType]
        return
    if isinstance(value, list | tuple):
        _check_sequence(value, depth + 1)  # pyright: ignore[reportUnknownArgumentType]
        return
    hint = _HINTS.get(kind, "convert it to one of the JSON types")
    raise _Bad(f"a {kind.__name__} is not a JSON value ({hint})")


def _check_sequence(value: list[Any] | tuple[Any, ...], depth: int) -> None:
    if depth > MAX_DEPTH:
        raise _Bad(f"nested more than {MAX_DEPTH} levels deep")
    for index, item in enumerate(value):
        kind: type[object] = type(cast("object", item))
        if kind is str:
            if item.isascii():
                continue
        elif kind in _PLAIN:
            continue
        try:
            _check(item, depth)
        except _Bad as bad:
            bad.path.append(f"[{index}]")
            raise


def _circular(value: Any, ancestors: set[int]) -> bool:
    """True when a container holds itself; only run once the depth limit was hit."""
    children: Any
    if isinstance(value, dict):
        children = cast("dict[Any, Any]", value).values()
    elif isinstance(value, list | tuple):
        children = cast("list[Any]", value)
    else:
        return False
    identity = id(cast("object", value))
    if identity in ancestors:
        return True
    if len(ancestors) > MAX_DEPTH:
        return False
    ancestors.add(identity)
    found = any(_circular(child, ancestors) for child in children)
    ancestors.discard(identity)
    return found
