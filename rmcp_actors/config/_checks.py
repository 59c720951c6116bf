# pyright: strict
"""Validators, key paths and the frozen mapping shared by the config modules.

Validators raise :class:`~rmcp_actors.errors.RMCPConfigError` with the field's name as path;
the loader prefixes the table's path, so a message always names the key as the file writes it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Final, TypeGuard, TypeVar, cast

import attrs

from ..errors import RMCPConfigError

_K = TypeVar("_K")
_V = TypeVar("_V")

Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]


class FrozenMap(Mapping[_K, _V]):
    """A read-only, hashable copy of a mapping (hashable when its values are)."""

    __slots__ = ("_data", "_hash")

    def __init__(self, data: Mapping[_K, _V] | Iterable[tuple[_K, _V]] = ()) -> None:
        self._data: dict[_K, _V] = dict(data)
        self._hash: int | None = None

    def __getitem__(self, key: _K) -> _V:
        return self._data[key]

    def __iter__(self) -> Iterator[_K]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return self._data == dict(cast("Mapping[object, object]", other))
        return NotImplemented

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(frozenset(self._data.items()))
        return self._hash

    def __repr__(self) -> str:
        return f"{{{', '.join(f'{k!r}: {v!r}' for k, v in self._data.items())}}}"


# --------------------------------------------------------------------------------------------
# Key paths
# --------------------------------------------------------------------------------------------

_BARE_KEY: Final = re.compile(r"[A-Za-z0-9_-]+")


def key_path(*parts: object) -> str:
    """Join keys into a dotted path written as TOML writes keys.

    A key that is not a bare TOML key (empty, with a dot or a space...) is quoted, so
    ``servers."a.b".command`` and ``""`` name exactly one key.
    """
    return ".".join(
        text if _BARE_KEY.fullmatch(text := str(part)) else json.dumps(text, ensure_ascii=False)
        for part in parts
    )


def join_paths(*paths: str) -> str:
    """Join paths that are already written with :func:`key_path` (empty ones are skipped)."""
    return ".".join(path for path in paths if path)


def raw_message(error: RMCPConfigError) -> str:
    """The message of ``error`` without its ``path: `` prefix."""
    head = f"{error.path}: "
    if error.path and error.message.startswith(head):
        return error.message[len(head) :]
    return error.message


def prefixed(error: RMCPConfigError, prefix: str, note: str = "") -> RMCPConfigError:
    """``error`` moved under ``prefix`` (a path), with ``note`` appended to its message."""
    return RMCPConfigError(raw_message(error) + note, path=join_paths(prefix, error.path))


# --------------------------------------------------------------------------------------------
# Validators
# --------------------------------------------------------------------------------------------


def show(value: object) -> str:
    """A short description of a value for messages: its type and a clipped repr."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def is_int(value: object) -> TypeGuard[int]:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> TypeGuard[float]:
    """An int or float that is not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def choices(options: Iterable[object]) -> str:
    """``'a', 'b' or 'c'``."""
    items = [repr(c) for c in options]
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"


def optional(check: Validator) -> Validator:
    """``check``, letting ``None`` through."""

    def check_unless_none(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is not None:
            check(inst, attribute, value)

    return check_unless_none


def int_at_least(minimum: int) -> Validator:
    """An integer (not a bool) of at least ``minimum``."""

    def check(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if not is_int(value):
            raise RMCPConfigError(f"expected an integer, got {show(value)}", path=attribute.name)
        if value < minimum:
            what = "a positive integer (at least 1)" if minimum == 1 else f"at least {minimum}"
            raise RMCPConfigError(f"must be {what}, got {value}", path=attribute.name)

    return check


def number(*, positive: bool) -> Validator:
    """A finite number, greater than 0 when ``positive`` else not negative."""

    def check(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if not is_number(value):
            raise RMCPConfigError(f"expected a number, got {show(value)}", path=attribute.name)
        if not math.isfinite(value):
            raise RMCPConfigError(f"must be a finite number, got {value}", path=attribute.name)
        if positive and value <= 0:
            raise RMCPConfigError(f"must be greater than 0, got {value}", path=attribute.name)
        if not positive and value < 0:
            raise RMCPConfigError(f"must not be negative, got {value}", path=attribute.name)

    return check


def one_of(*options: str) -> Validator:
    """One of the given strings."""

    def check(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if not isinstance(value, str) or value not in options:
            raise RMCPConfigError(f"must be one of {choices(options)}, got {value!r}", path=attribute.name)

    return check


def boolean(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    """``True`` or ``False``."""
    if not isinstance(value, bool):
        raise RMCPConfigError(f"expected true or false, got {show(value)}", path=attribute.name)


def string(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    """A ``str``."""
    if not isinstance(value, str):
        raise RMCPConfigError(f"expected a string, got {show(value)}", path=attribute.name)


def instance_of(cls: type) -> Validator:
    """An instance of ``cls`` (a table given as a plain dict is refused: build the class)."""

    def check(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if not isinstance(value, cls):
            raise RMCPConfigError(f"expected a {cls.__name__}, got {show(value)}", path=attribute.name)

    return check
