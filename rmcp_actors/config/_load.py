# pyright: strict
"""Loading a configuration mapping (TOML as parsed) into the config classes with cattrs.

The tables are derived from the policy classes of a :class:`Schema`: ``[defaults]`` is
structured as the server-level overrides class, a server table is its spec keys beside the
same policy keys (a class built from those fields), a tool table is the tool-level overrides
class. Errors become one :class:`RMCPConfigError` whose path names the key as the file writes
it, with a hint when a known key sits in a table where it cannot be set.
"""

from __future__ import annotations

import ast
import difflib
import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any, Final, Literal, cast, get_args, get_origin

import attrs
import cattrs
import cattrs.gen
from cattrs.errors import ForbiddenExtraKeysError
from cattrs.v import format_exception as _cattrs_format_exception
from cattrs.v import transform_error

from ..errors import RMCPConfigError
from ._auth import AuthConfig, check_no_inline_secret
from ._checks import choices, is_int, is_number, join_paths, key_path, prefixed, raw_message, show
from ._keys import Table, key_info
from ._policy import (
    CallPolicy,
    PolicyOverrides,
    RuntimeSettings,
    ServerPolicy,
    TaskMode,
    ToolOverrides,
    TransactionSettings,
)

__all__ = ["SCHEMA", "LoadedServer", "LoadedTables", "Schema", "load_tables"]


@attrs.frozen
class Schema:
    """The policy classes a configuration is loaded and resolved into.

    Attributes:
        overrides: The layer of ``[defaults]`` and of a server table.
        tool: The layer of a tool table.
        server_policy: The resolved policy of a server.
        call_policy: The resolved policy of calls to one tool.
    """

    overrides: type
    tool: type
    server_policy: type
    call_policy: type


SCHEMA: Final = Schema(PolicyOverrides, ToolOverrides, ServerPolicy, CallPolicy)


@attrs.frozen
class LoadedServer:
    """A ``[servers.<name>]`` table, structured: spec keys, the policy layer, the tool layers."""

    spec_keys: dict[str, Any]
    overrides: Any
    tools: dict[str, Any]


@attrs.frozen
class LoadedTables:
    """The whole mapping, structured (servers not yet built into specs)."""

    runtime: RuntimeSettings
    defaults: Any
    servers: dict[str, LoadedServer]
    tenants: dict[str, float]
    transactions: TransactionSettings


# The spec keys of a server table as a file writes them (``name`` is the table's key, in-memory
# servers are built in Python).
_SPEC_KEYS: Final[dict[str, Any]] = {
    "transport": attrs.field(type=str),
    "protocol": attrs.field(type=str, default="auto"),
    "command": attrs.field(type=str | None, default=None),
    "args": attrs.field(type=tuple[str, ...], default=()),
    "env": attrs.field(type=dict[str, str] | None, default=None),
    "cwd": attrs.field(type=str | None, default=None),
    "url": attrs.field(type=str | None, default=None),
    "headers": attrs.field(type=dict[str, str] | None, default=None),
    "auth": attrs.field(type=AuthConfig | None, default=None),
}


@functools.cache
def _tables(schema: Schema) -> tuple[type, type]:
    """The server table and the top-level table of ``schema``, built from its policy fields."""
    server_fields = dict(_SPEC_KEYS)
    for field in attrs.fields(cast("type[attrs.AttrsInstance]", schema.overrides)):
        server_fields[field.name] = attrs.field(type=field.type, default=field.default)
    server_fields["tools"] = attrs.field(type=dict[str, schema.tool], factory=dict)
    server_table = attrs.make_class("_ServerTable", server_fields, frozen=True)
    config_table = attrs.make_class(
        "_ConfigTable",
        {
            "runtime": attrs.field(type=RuntimeSettings, factory=RuntimeSettings),
            "defaults": attrs.field(type=schema.overrides, factory=schema.overrides),
            "servers": attrs.field(type=dict[str, server_table], factory=dict),
            "tenants": attrs.field(type=dict[str, float], factory=dict),
            "transactions": attrs.field(type=TransactionSettings, factory=TransactionSettings),
        },
        frozen=True,
    )
    return server_table, config_table


def load_tables(data: Mapping[str, Any], schema: Schema = SCHEMA) -> LoadedTables:
    """Structure a configuration mapping into ``schema``'s classes.

    Args:
        data: Tables ``runtime``, ``defaults``, ``servers``, ``tenants`` and ``transactions`` (all
            optional).
        schema: The policy classes.

    Returns:
        The structured tables.

    Raises:
        RMCPConfigError: A key is unknown, a value has the wrong type or is out of range;
            ``path`` names the key.
    """
    server_table, config_table = _tables(schema)
    try:
        table = _converter.structure(dict(data), cast("type[Any]", config_table))
    except RMCPConfigError:
        raise
    except Exception as exc:
        raise _error_from_cattrs(exc, schema, server_table) from exc
    policy_names = [field.name for field in attrs.fields(cast("type[attrs.AttrsInstance]", schema.overrides))]
    servers: dict[str, LoadedServer] = {}
    for name, server in cast("dict[str, Any]", table.servers).items():
        try:
            overrides = schema.overrides(**{key: getattr(server, key) for key in policy_names})
        except RMCPConfigError as exc:
            raise prefixed(exc, key_path("servers", name)) from None
        servers[name] = LoadedServer(
            spec_keys={key: getattr(server, key) for key in _SPEC_KEYS},
            overrides=overrides,
            tools=server.tools,
        )
    return LoadedTables(
        runtime=table.runtime,
        defaults=table.defaults,
        servers=servers,
        tenants=table.tenants,
        transactions=table.transactions,
    )


# --------------------------------------------------------------------------------------------
# Strict structure hooks: TOML has types, a string is not an integer
# --------------------------------------------------------------------------------------------


class _Invalid(Exception):
    """A value of the wrong type, raised by the strict structure hooks."""


def _structure_int(value: object, _type: object) -> int:
    if not is_int(value):
        raise _Invalid(f"expected an integer, got {show(value)}")
    return value


def _structure_float(value: object, _type: object) -> float:
    if not is_number(value):
        raise _Invalid(f"expected a number, got {show(value)}")
    return float(value)


def _structure_bool(value: object, _type: object) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"expected true or false, got {show(value)}")
    return value


def _structure_str(value: object, _type: object) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"expected a string, got {show(value)}")
    return value


def _structure_str_tuple(value: object, _type: object) -> tuple[str, ...]:
    if not isinstance(value, list | tuple):
        raise _Invalid(f"expected a list of strings, got {show(value)}")
    items = tuple(cast("Sequence[object]", value))
    for index, item in enumerate(items):
        if not isinstance(item, str):
            raise _Invalid(f"expected a list of strings, item {index} is {show(item)}")
    return cast("tuple[str, ...]", items)


def _structure_literal(value: object, type_: Any) -> Any:
    options = get_args(type_)
    if not isinstance(value, str) or value not in options:
        raise _Invalid(f"must be one of {choices(options)}, got {value!r}")
    return value


def _structure_task_mode(value: object, _type: object) -> TaskMode | None:
    if value is None or isinstance(value, bool) or value == "auto":
        return cast("TaskMode | None", value)
    raise _Invalid(f"must be true, false or 'auto', got {value!r}")


def _make_converter() -> cattrs.Converter:
    converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    converter.register_structure_hook(int, _structure_int)
    converter.register_structure_hook(float, _structure_float)
    converter.register_structure_hook(bool, _structure_bool)
    converter.register_structure_hook(str, _structure_str)
    converter.register_structure_hook_func(lambda t: t == tuple[str, ...], _structure_str_tuple)
    converter.register_structure_hook_func(lambda t: get_origin(t) is Literal, _structure_literal)
    structure_auth = cattrs.gen.make_dict_structure_fn(AuthConfig, converter, _cattrs_forbid_extra_keys=True)

    def _structure_auth(value: object, type_: Any) -> AuthConfig:
        check_no_inline_secret(value)
        return structure_auth(value, type_)  # pyright: ignore[reportArgumentType]

    converter.register_structure_hook(AuthConfig, _structure_auth)
    # bool | "auto" (and that or None in an overrides layer): cattrs structures no such union.
    converter.register_structure_hook_func(lambda t: t in (TaskMode, TaskMode | None), _structure_task_mode)
    return converter


_converter: Final = _make_converter()


# --------------------------------------------------------------------------------------------
# cattrs errors -> one RMCPConfigError with the key's path
# --------------------------------------------------------------------------------------------

_SEP: Final = "\x1f"
_END: Final = "\x1e"
_PATH_TOKEN: Final = re.compile(
    r"\.([A-Za-z_][A-Za-z0-9_]*)|\[('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|-?\d+)\]"
)
# How a message names each table: where the key was found, and where it may go instead.
_HERE: Final[dict[Table, str]] = {"server": "on the server", "defaults": "in [defaults]", "tool": "per tool"}
_THERE: Final[dict[Table, str]] = {**_HERE, "tool": "per tool ([servers.<name>.tools.<tool>])"}


def _misplaced(key: str, table: Table, schema: Schema) -> str | None:
    """A hint when ``key`` is a policy key that may not be written in ``table``."""
    for cls in (schema.overrides, schema.tool):
        for field in attrs.fields(cast("type[attrs.AttrsInstance]", cls)):
            tables = key_info(field).tables
            if field.name == key and table not in tables:
                allowed = " or ".join(_THERE[t] for t in _THERE if t in tables)
                return f"{key!r} cannot be set {_HERE[table]}, set it {allowed}"
    return None


def _format(exc: BaseException, type_: Any, schema: Schema, server_table: type) -> str:
    """Encode one leaf error as ``suffix<SEP>message<END>`` for :func:`transform_error`."""
    suffix = ""
    if isinstance(exc, _Invalid):
        message = str(exc)
    elif isinstance(exc, RMCPConfigError):
        suffix, message = exc.path, raw_message(exc)
    elif isinstance(exc, ForbiddenExtraKeysError):
        extra = sorted(str(key) for key in exc.extra_fields)
        allowed = [f.name for f in attrs.fields(exc.cl)]
        suffix = key_path(extra[0])
        message = f"unknown key{'s' if len(extra) > 1 else ''} {choices(extra).replace(' or ', ', ')}"
        table: Table | None = (
            "tool"
            if exc.cl is schema.tool
            else "server"
            if exc.cl is server_table
            else "defaults"
            if exc.cl is schema.overrides
            else None
        )
        hint = _misplaced(extra[0], table, schema) if table is not None else None
        close = difflib.get_close_matches(extra[0], allowed, n=1)
        if hint is not None:
            message += f"; {hint}"
        elif close:
            message += f" (did you mean {close[0]!r}?)"
        message += f"; allowed keys here: {', '.join(allowed)}"
    elif isinstance(exc, KeyError):
        message = "required key is missing"
    elif (isinstance(exc, TypeError | AttributeError) and attrs.has(type_)) or (
        isinstance(exc, AttributeError) and "'items'" in str(exc)
    ):
        message = "expected a table of keys and values"
    else:
        message = _cattrs_format_exception(exc, type_)
    message = message.replace(_SEP, " ").replace(_END, " ")
    return f"{suffix}{_SEP}{message}{_END}"


def _dotted(path: str) -> str:
    """``$.servers['a b'].retry`` -> ``servers."a b".retry``."""
    parts: list[str] = []
    rest = path[1:] if path.startswith("$") else path
    position = 0
    while position < len(rest):
        match = _PATH_TOKEN.match(rest, position)
        if match is None:  # pragma: no cover - transform_error only makes these tokens
            parts.append(rest[position:])
            break
        name, index = match.groups()
        parts.append(name if name is not None else str(ast.literal_eval(index)))
        position = match.end()
    return key_path(*parts) if parts else ""


def _error_from_cattrs(exc: BaseException, schema: Schema, server_table: type) -> RMCPConfigError:
    """Turn cattrs' nested validation errors into one RMCPConfigError with a key path."""
    problems: list[tuple[str, str]] = []
    lines = transform_error(exc, "$", lambda e, t: _format(e, t, schema, server_table))
    for line in lines:
        encoded, _, where = line.partition(f"{_END} @ ")
        suffix, _, message = encoded.partition(_SEP)
        problems.append((join_paths(_dotted(where), suffix), message))
    if not problems:  # pragma: no cover - transform_error always yields at least one line
        return RMCPConfigError(f"invalid configuration: {exc}")
    path, message = problems[0]
    if len(problems) > 1:
        others = "; ".join(f"{p or '<top level>'}: {m}" for p, m in problems[1:])
        message = f"{message} (and {len(problems) - 1} more: {others})"
    return RMCPConfigError(message, path=path)
