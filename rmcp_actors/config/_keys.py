# pyright: strict
"""The machinery that turns one declaration per policy key into everything else.

A policy key is declared once, as an attrs field of a *key group*: a generic attrs class over
``V`` whose fields are typed ``T | V`` (:func:`policy_key`) or, for a nested table such as
``retry``, ``Group[V]`` (:func:`policy_table`). The group is stamped with the tables it may be
written in (:func:`policy_group`). From the groups, :func:`policy_variant` builds the public
classes:

- ``class RetryPolicy(_RetryKeys[Never])``: the **resolved** variant; each field holds a value,
  its default is the key's built-in value (``T | Never`` is ``T`` to the type checker);
- ``class RetryOverrides(_RetryKeys[None])``: the **overrides** variant (one layer); each field
  defaults to ``None``, "inherit from the layer above" (a nested table defaults to its empty
  overrides).

Layering (:func:`resolve`), the TOML tables, the "cannot be set here" hints and the error key
paths all read the variants' fields, so nothing else names a key.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable, Sequence
from typing import (  # Union: Optional[Literal] is a typing.Union at runtime
    Any,
    Final,
    Literal,
    Never,
    TypeVar,
    Union,
    cast,
    dataclass_transform,
    get_args,
    get_origin,
)

import attrs

from ..errors import RMCPConfigError
from ._checks import Validator, instance_of, join_paths, optional, prefixed

__all__ = ["V", "Table", "policy_group", "policy_key", "policy_table", "policy_variant", "resolve"]

V = TypeVar("V")
"""The group's type parameter: ``Never`` in resolved variants, ``None`` in overrides."""

_C = TypeVar("_C")
_R = TypeVar("_R")

Table = Literal["defaults", "server", "tool"]
"""Where a key may be written: ``[defaults]``, ``[servers.<name>]``, ``[servers.<name>.tools.<tool>]``."""

Kind = Literal["resolved", "overrides"]
"""A variant: every key holds a value (``resolved``) or may be ``None``, inherited (``overrides``)."""

_KEY: Final = "rmcp_actors.policy_key"


@attrs.frozen
class KeyInfo:
    """What the machinery knows of one key (in the field's ``metadata``).

    Attributes:
        check: Validator of a value (``None`` for a nested table, checked by its own class).
        group: The key group of a nested table, else ``None``.
        tables: The tables the key may be written in (stamped by :func:`policy_group`).
        variant: In a variant's field, the class of a nested table's value in that variant.
        doc: What the key means, for the variants' docstrings.
    """

    check: Validator | None
    doc: str
    group: type | None = None
    tables: frozenset[Table] = frozenset()
    variant: type | None = None


def key_info(field: attrs.Attribute[Any]) -> KeyInfo:
    """The :class:`KeyInfo` of a variant's or group's field."""
    return cast("KeyInfo", field.metadata[_KEY])


def policy_key(default: object, check: Validator, doc: str) -> Any:
    """Declare a scalar key: its built-in ``default``, the validator of a value and its doc.

    The validator is given the value only (``None`` in an overrides layer never reaches it).
    """
    return attrs.field(default=default, metadata={_KEY: KeyInfo(check, doc)})


def policy_table(group: type, doc: str) -> Any:
    """Declare a nested table whose keys are the fields of ``group`` (layered key by key)."""
    return attrs.field(default=None, metadata={_KEY: KeyInfo(None, doc, group)})


_GROUP_TABLES: dict[type, frozenset[Table]] = {}
_VARIANTS: dict[tuple[type, Kind], type] = {}


def policy_group(*tables: Table) -> Callable[[type[_C]], type[_C]]:
    """Mark an attrs class as a key group whose keys may be written in ``tables``.

    A nested table's group takes no tables: it is written wherever the key holding it is.
    """

    def mark(cls: type[_C]) -> type[_C]:
        _GROUP_TABLES[cls] = frozenset(tables)
        return cls

    return mark


@dataclass_transform(frozen_default=True)
def policy_variant(cls: type[_C]) -> type[_C]:
    """Build a resolved or overrides class from the key groups it derives from.

    The class derives from one or more ``Group[Never]`` (resolved) or ``Group[None]``
    (overrides); its fields are the groups' keys, in order.
    """
    kinds: set[Kind] = set()
    groups: list[type] = []
    for base in cast("tuple[Any, ...]", cls.__dict__.get("__orig_bases__", ())):
        args = get_args(base)
        if args == (Never,):
            kinds.add("resolved")
        elif args == (types.NoneType,):
            kinds.add("overrides")
        else:
            raise TypeError(f"{cls.__name__}: derive from key groups as Group[Never] or Group[None]")
        groups.append(cast("type", get_origin(base)))
    if len(kinds) != 1:
        raise TypeError(f"{cls.__name__}: derive from key groups, all [Never] or all [None]")
    kind = kinds.pop()
    fields: dict[str, Any] = {}
    for group in groups:
        if group not in _GROUP_TABLES:
            raise TypeError(f"{cls.__name__}: {group.__name__} is not marked with @policy_group")
        # An inherited key's annotation names what its own module imports (a group derived
        # in another module, as the config tests do, inherits every key of the base group).
        hints: dict[str, Any] = {}
        for klass in reversed(group.__mro__):
            hints.update(vars(sys.modules[klass.__module__]))
        for field in attrs.fields(group):
            if field.name in fields:
                raise TypeError(f"{cls.__name__}: the key {field.name!r} is declared twice")
            fields[field.name] = _variant_field(field, kind, _GROUP_TABLES[group], hints)
    built = attrs.frozen(cls, these=fields)
    docs = "\n".join(f"        {field.name}: {key_info(field).doc}" for field in attrs.fields(built))
    built.__doc__ = f"{cls.__doc__}\n\n    Attributes:\n{docs}\n\n    Raises:\n" + (
        "        RMCPConfigError: A value is out of range; ``path`` is the field name.\n"
    )
    # The types given above are final: keep attrs.resolve_types from reading the groups'
    # ``T | V`` annotations over them (cattrs structures by these types).
    setattr(built, "__attrs_types_resolved__", built)  # noqa: B010 - unknown to pyright
    if len(groups) == 1:
        _VARIANTS[groups[0], kind] = built
    return built


def _variant_field(
    field: attrs.Attribute[Any], kind: Kind, tables: frozenset[Table], hints: dict[str, Any]
) -> Any:
    info = key_info(field)
    if info.group is not None:
        inner = _VARIANTS[info.group, kind]
        return attrs.field(
            factory=inner,
            validator=instance_of(inner),
            type=inner,
            metadata={_KEY: attrs.evolve(info, tables=tables, variant=inner)},
        )
    assert info.check is not None
    written = eval(cast("str", field.type), hints, {"V": None})  # our own annotation, in its module
    if kind == "overrides":
        return attrs.field(
            default=None,
            validator=optional(info.check),
            type=written,
            metadata={_KEY: attrs.evolve(info, tables=tables)},
        )
    nullable = field.default is None
    return attrs.field(
        default=field.default,
        validator=optional(info.check) if nullable else info.check,
        type=written if nullable else _without_none(written),
        metadata={_KEY: attrs.evolve(info, tables=tables)},
    )


def _without_none(type_: Any) -> Any:
    args = [arg for arg in get_args(type_) if arg is not types.NoneType]
    if not args or get_origin(type_) not in (types.UnionType, Union):
        return type_
    result = args[0]
    for arg in args[1:]:
        result = result | arg
    return result


def resolve(target: type[_R], layers: Sequence[object], where: str) -> _R:
    """Layer ``layers`` (most general first) over ``target``'s built-in defaults.

    Each key takes the value of the most specific layer that sets it (not ``None``); a layer
    without the key (a tool table for a server-wide key) is skipped; nested tables are layered
    key by key.

    Args:
        target: A resolved variant.
        layers: Overrides layers, from ``[defaults]`` to the most specific.
        where: Path of the most specific layer, for errors.

    Raises:
        RMCPConfigError: The layered values are inconsistent (e.g. a ``max_delay_s`` below an
            inherited ``base_delay_s``); ``path`` is under ``where``.
    """
    values: dict[str, Any] = {}
    for field in attrs.fields(cast("type[attrs.AttrsInstance]", target)):
        present = [getattr(layer, field.name) for layer in layers if hasattr(layer, field.name)]
        info = key_info(field)
        if info.variant is not None:
            values[field.name] = resolve(info.variant, present, join_paths(where, field.name))
        else:
            values[field.name] = next((v for v in reversed(present) if v is not None), field.default)
    try:
        return target(**values)
    except RMCPConfigError as exc:
        note = " (after layering built-in defaults, [defaults], the server and the tool)"
        raise prefixed(exc, where, note) from None
