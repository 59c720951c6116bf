"""Helpers for exception groups, shared by the actors and the public entry point."""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast

__all__ = ["FATAL", "is_fatal", "leaves"]

#: Exceptions that must reach the program whatever else is going on: never absorbed.
FATAL = (KeyboardInterrupt, SystemExit)


def leaves(exc: BaseException) -> Iterator[BaseException]:
    """The exception itself, or every exception inside a (nested) group."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in cast("BaseExceptionGroup[BaseException]", exc).exceptions:
            yield from leaves(inner)
    else:
        yield exc


def is_fatal(exc: BaseException) -> bool:
    """True for KeyboardInterrupt and SystemExit, alone or anywhere in a group."""
    return any(isinstance(leaf, FATAL) for leaf in leaves(exc))
