"""A cheap proof that the SDK accepts a ``tools/call``'s params, ahead of its own validation.

The server side must not claim a key for a call the SDK then refuses (INVALID_PARAMS): the
refusal would be stored for the key. The SDK's check (``validate_client_request``, a pydantic
validation of the whole request) costs ~10 µs a call and runs again in the SDK's own chain.
Most calls are plainly well formed: a name, arguments as an object, a ``_meta`` whose typed
fields are what the model wants. :func:`surely_accepted` proves that much with type checks,
and answers False (ask the SDK) for anything it cannot prove, so it never accepts what the
SDK refuses (``tests/test_rmcp_params.py`` compares the two on many shapes).

The proof is derived from the SDK's own models at import, per protocol version, and only for
models of the shape it knows (checked field by field): a version whose model differs has no
shortcut. The ``_meta`` fields that are models themselves (the client's capabilities and
information on 2026-07-28) are validated with the SDK's annotation once per distinct value
(by its JSON encoding, for values made of JSON types only) and remembered.
"""

from __future__ import annotations

import math
import types
from collections.abc import Mapping
from typing import Any, Union, cast, get_args, get_origin

import attrs
import msgspec
from mcp_types.methods import CLIENT_REQUESTS
from mcp_types.version import KNOWN_PROTOCOL_VERSIONS
from pydantic import BaseModel, TypeAdapter, ValidationError

__all__ = ["surely_accepted"]

_PROGRESS_TOKEN = "progressToken"
_MAX_DEPTH = 32
_MAX_REMEMBERED = 256

_encoder = msgspec.json.Encoder()


@attrs.frozen
class _Shape:
    """What the params model of one protocol version wants, as far as the proof goes."""

    other_fields: frozenset[str]
    """Params fields this proof does not check (``task``...): present, ask the SDK."""
    meta_required: bool
    meta_required_fields: frozenset[str]
    meta_strings: frozenset[str]
    """``_meta`` fields typed ``str``."""
    meta_parts: Mapping[str, TypeAdapter[Any]]
    """``_meta`` fields validated by their annotation (once per distinct value)."""


def _optional_of(annotation: Any) -> tuple[Any, bool]:
    """``(X, True)`` for ``X | None``, ``(annotation, False)`` otherwise."""
    if get_origin(annotation) in (Union, types.UnionType):
        members = [member for member in get_args(annotation) if member is not type(None)]
        if len(members) == 1 and len(get_args(annotation)) == 2:
            return members[0], True
    return annotation, False


def _shape_of(model: type[BaseModel]) -> _Shape | None:
    """The shape of a ``tools/call`` request model, or None when it is not one this proof
    knows (a field it would check typed otherwise, validators, forbidden extras)."""
    params_field = model.model_fields.get("params")
    if params_field is None or model.model_config.get("extra") == "forbid":
        return None
    params = params_field.annotation
    if not (isinstance(params, type) and issubclass(params, BaseModel)):
        return None
    if params.model_config.get("extra") == "forbid" or _has_validators(model) or _has_validators(params):
        return None
    fields = {field.alias or name: field for name, field in params.model_fields.items()}
    name, arguments, meta = fields.get("name"), fields.get("arguments"), fields.get("_meta")
    if name is None or name.annotation is not str or arguments is None or meta is None:
        return None
    if arguments.annotation != dict[str, Any] | None or arguments.is_required():
        return None
    meta_model, optional = _optional_of(meta.annotation)
    if not (isinstance(meta_model, type) and issubclass(meta_model, BaseModel)):
        return None
    if meta_model.model_config.get("extra") not in ("allow", "ignore") or _has_validators(meta_model):
        return None
    strings: set[str] = set()
    parts: dict[str, TypeAdapter[Any]] = {}
    required: set[str] = set()
    for field_name, field in meta_model.model_fields.items():
        alias = field.alias or field_name
        if field.is_required():
            required.add(alias)
        if alias == _PROGRESS_TOKEN:
            if field.annotation != str | int | None or field.is_required():
                return None
        elif field.annotation is str:
            strings.add(alias)
        elif field.annotation is None:
            return None
        else:
            parts[alias] = TypeAdapter(field.annotation)
    return _Shape(
        other_fields=frozenset(fields) - {"name", "arguments", "_meta"},
        meta_required=meta.is_required() or not optional,
        meta_required_fields=frozenset(required),
        meta_strings=frozenset(strings),
        meta_parts=parts,
    )


def _has_validators(model: type[BaseModel]) -> bool:
    decorators = model.__pydantic_decorators__
    return bool(
        decorators.model_validators
        or decorators.field_validators
        or decorators.validators
        or decorators.root_validators
    )


def _shapes() -> dict[str, _Shape]:
    shapes: dict[str, _Shape] = {}
    for version in KNOWN_PROTOCOL_VERSIONS:
        model = CLIENT_REQUESTS.get(("tools/call", version))
        shape = None if model is None else _shape_of(model)
        if shape is not None:
            shapes[version] = shape
    return shapes


_SHAPES = _shapes()
_remembered: dict[tuple[str, bytes], None] = {}


def _plain(value: object, depth: int = 0) -> bool:
    """Whether ``value`` is made of JSON types only (so its JSON encoding identifies it)."""
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:
        return True
    if kind is float:
        return math.isfinite(cast(float, value))
    if depth >= _MAX_DEPTH:
        return False
    if kind is dict:
        for key, item in cast("dict[object, object]", value).items():
            # Loops, not all() over a generator: this runs on every call (~1 µs saved).
            if type(key) is not str:
                return False
            item_kind = type(item)
            if not (item_kind is str or item_kind is int or item_kind is bool or item is None) and not _plain(
                item, depth + 1
            ):
                return False
        return True
    if kind is list:
        return all(_plain(item, depth + 1) for item in cast("list[object]", value))
    return False


def _part_accepted(alias: str, adapter: TypeAdapter[Any], value: object) -> bool:
    if not _plain(value):
        return False
    try:
        key = (alias, _encoder.encode(value))
    except (TypeError, OverflowError, msgspec.EncodeError):
        return False
    if key in _remembered:
        return True
    try:
        adapter.validate_python(value, by_name=False)
    except ValidationError:
        return False
    if len(_remembered) >= _MAX_REMEMBERED:
        _remembered.clear()
    _remembered[key] = None
    return True


def _meta_accepted(shape: _Shape, meta: object) -> bool:
    if meta is None:
        return not shape.meta_required
    if type(meta) is not dict:
        return False
    fields: dict[Any, Any] = meta  # pyright: ignore[reportUnknownVariableType]
    for key in shape.meta_required_fields:
        if key not in fields:
            return False
    for key, value in fields.items():
        if type(key) is not str:
            return False
        if key == _PROGRESS_TOKEN:
            if value is not None and type(value) is not str and type(value) is not int:
                return False
        elif key in shape.meta_strings:
            if type(value) is not str:
                return False
        elif (adapter := shape.meta_parts.get(key)) is not None and not _part_accepted(key, adapter, value):
            return False
    return True


def surely_accepted(version: str, params: Mapping[str, Any] | None) -> bool:
    """True when the SDK's validation of these ``tools/call`` params on protocol ``version``
    certainly passes; False when this cheap look cannot tell (ask the SDK)."""
    shape = _SHAPES.get(version)
    if shape is None or type(params) is not dict or "name" not in params:
        return False
    fields: dict[Any, Any] = params  # pyright: ignore[reportUnknownVariableType]
    if shape.meta_required and "_meta" not in fields:
        return False
    for key, value in fields.items():
        if key == "name":
            if type(value) is not str:
                return False
        elif key == "arguments":
            if value is not None and not (
                type(value) is dict and all(type(name) is str for name in cast("dict[object, object]", value))
            ):
                return False
        elif key == "_meta":
            if not _meta_accepted(shape, value):
                return False
        elif type(key) is not str or key in shape.other_fields:
            return False
    return True
