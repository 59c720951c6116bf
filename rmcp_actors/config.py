# pyright: strict
"""Configuration: runtime settings, per-server specs and layered call policies.

Everything here is a frozen attrs class. A configuration comes from a TOML file
(:meth:`RMCPConfig.from_toml`), from a plain mapping (:meth:`RMCPConfig.from_dict`) or is built
in Python. Either way every value is validated on construction, and a bad value raises
:class:`~rmcp_actors.errors.RMCPConfigError` whose ``path`` names the offending key (for
example ``servers.time.retry.max_attempts``).

Policies are layered: built-in defaults, then ``[defaults]``, then the server's table, then the
tool's table. A layer's ``None`` (or a key it does not name) inherits from the layer above;
:meth:`RMCPConfig.server_policy` and :meth:`RMCPConfig.call_policy` compute the resolved views.
"""

from __future__ import annotations

import ast
import difflib
import math
import os
import re
import shlex
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Final, Literal, TypeGuard, TypeVar, cast, get_args, get_origin
from urllib.parse import urlsplit

import attrs
import cattrs
from cattrs.errors import ForbiddenExtraKeysError
from cattrs.v import format_exception as _cattrs_format_exception
from cattrs.v import transform_error
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS, MODERN_PROTOCOL_VERSIONS

from .errors import RMCPConfigError

__all__ = [
    "CallPolicy",
    "Overflow",
    "PolicyOverrides",
    "RMCPConfig",
    "ReconnectOverrides",
    "ReconnectPolicy",
    "RetryOverrides",
    "RetryPolicy",
    "RuntimeSettings",
    "ServerPolicy",
    "ServerSpec",
    "ToolOverrides",
    "Transport",
    "WhenDisconnected",
    "Wire",
]

Transport = Literal["stdio", "http", "memory"]
Overflow = Literal["wait", "reject"]
WhenDisconnected = Literal["wait", "fail"]
Wire = Literal["jsonrpc", "direct"]

_K = TypeVar("_K")
_V = TypeVar("_V")
_T = TypeVar("_T")

_Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]


# --------------------------------------------------------------------------------------------
# Immutable mapping
# --------------------------------------------------------------------------------------------


class _FrozenMap(Mapping[_K, _V]):
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
# Validators (they raise RMCPConfigError with the field name as path)
# --------------------------------------------------------------------------------------------


def _show(value: object) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _int_at_least(minimum: int, *, optional: bool = False) -> _Validator:
    def check(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is None and optional:
            return
        if not _is_int(value):
            raise RMCPConfigError(f"expected an integer, got {_show(value)}", path=attribute.name)
        if value < minimum:
            what = "a positive integer (at least 1)" if minimum == 1 else f"at least {minimum}"
            raise RMCPConfigError(f"must be {what}, got {value}", path=attribute.name)

    return check


def _number(*, positive: bool, optional: bool = False) -> _Validator:
    def check(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is None and optional:
            return
        if not _is_number(value):
            raise RMCPConfigError(f"expected a number, got {_show(value)}", path=attribute.name)
        if not math.isfinite(value):
            raise RMCPConfigError(f"must be a finite number, got {value}", path=attribute.name)
        if positive and value <= 0:
            raise RMCPConfigError(f"must be greater than 0, got {value}", path=attribute.name)
        if not positive and value < 0:
            raise RMCPConfigError(f"must not be negative, got {value}", path=attribute.name)

    return check


def _one_of(*choices: str, optional: bool = False) -> _Validator:
    def check(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is None and optional:
            return
        if not isinstance(value, str) or value not in choices:
            raise RMCPConfigError(
                f"must be one of {_choices(choices)}, got {value!r}",
                path=attribute.name,
            )

    return check


def _choices(choices: Iterable[object]) -> str:
    items = [repr(c) for c in choices]
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"


def _opt_bool(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and not isinstance(value, bool):
        raise RMCPConfigError(f"expected true or false, got {_show(value)}", path=attribute.name)


def _bool(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, bool):
        raise RMCPConfigError(f"expected true or false, got {_show(value)}", path=attribute.name)


def _opt_str(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and not isinstance(value, str):
        raise RMCPConfigError(f"expected a string, got {_show(value)}", path=attribute.name)


def _instance_of(cls: type) -> _Validator:
    def check(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if not isinstance(value, cls):
            raise RMCPConfigError(f"expected a {cls.__name__}, got {_show(value)}", path=attribute.name)

    return check


def _check_delays(base: float | None, maximum: float | None) -> None:
    if base is not None and maximum is not None and maximum < base:
        raise RMCPConfigError(
            f"must be at least base_delay_s ({base}), got {maximum}",
            path="max_delay_s",
        )


# --------------------------------------------------------------------------------------------
# Policies and their partial layers
# --------------------------------------------------------------------------------------------


@attrs.frozen
class RetryPolicy:
    """How a failed call is retried (fully resolved).

    Attributes:
        max_attempts: Attempts in all, including the first (at least 1).
        base_delay_s: Delay before the first retry; doubles with each retry (not negative).
        max_delay_s: Upper bound of the delay between attempts (at least ``base_delay_s``).

    Raises:
        RMCPConfigError: A value is out of range; ``path`` is the field name.
    """

    max_attempts: int = attrs.field(default=3, validator=_int_at_least(1))
    base_delay_s: float = attrs.field(default=0.1, validator=_number(positive=False))
    max_delay_s: float = attrs.field(default=10.0, validator=_number(positive=False))

    def __attrs_post_init__(self) -> None:
        _check_delays(self.base_delay_s, self.max_delay_s)


@attrs.frozen
class ReconnectPolicy:
    """How a lost connection is re-established (fully resolved).

    Attributes:
        base_delay_s: Delay before the first reconnect attempt; doubles each time.
        max_delay_s: Upper bound of the delay between reconnect attempts.

    Raises:
        RMCPConfigError: A value is out of range; ``path`` is the field name.
    """

    base_delay_s: float = attrs.field(default=0.1, validator=_number(positive=False))
    max_delay_s: float = attrs.field(default=30.0, validator=_number(positive=False))

    def __attrs_post_init__(self) -> None:
        _check_delays(self.base_delay_s, self.max_delay_s)


@attrs.frozen
class RuntimeSettings:
    """Settings of the runtime as a whole (the ``[runtime]`` table).

    Attributes:
        max_queue: Pending calls allowed in all (at least 1).
        overflow: What a call does when the queue is full: ``"wait"`` or ``"reject"``.
        max_restarts: Restarts of a failing actor allowed within ``restart_period_s``.
        restart_period_s: Window of the restart intensity, in seconds (greater than 0).
        max_concurrency: Calls in flight across all servers (at least 1).

    Raises:
        RMCPConfigError: A value is out of range; ``path`` is the field name.
    """

    max_queue: int = attrs.field(default=10000, validator=_int_at_least(1))
    overflow: Overflow = attrs.field(default="wait", validator=_one_of("wait", "reject"))
    max_restarts: int = attrs.field(default=5, validator=_int_at_least(0))
    restart_period_s: float = attrs.field(default=30.0, validator=_number(positive=True))
    max_concurrency: int = attrs.field(default=1024, validator=_int_at_least(1))


@attrs.frozen
class RetryOverrides:
    """A partial retry table: each ``None`` inherits from the level above.

    Attributes:
        max_attempts: Attempts in all, or ``None``.
        base_delay_s: First retry delay, or ``None``.
        max_delay_s: Delay upper bound, or ``None``.

    Raises:
        RMCPConfigError: A value is out of range; ``path`` is the field name.
    """

    max_attempts: int | None = attrs.field(default=None, validator=_int_at_least(1, optional=True))
    base_delay_s: float | None = attrs.field(default=None, validator=_number(positive=False, optional=True))
    max_delay_s: float | None = attrs.field(default=None, validator=_number(positive=False, optional=True))

    def __attrs_post_init__(self) -> None:
        _check_delays(self.base_delay_s, self.max_delay_s)


@attrs.frozen
class ReconnectOverrides:
    """A partial reconnect table: each ``None`` inherits from the level above.

    Attributes:
        base_delay_s: First reconnect delay, or ``None``.
        max_delay_s: Delay upper bound, or ``None``.

    Raises:
        RMCPConfigError: A value is out of range; ``path`` is the field name.
    """

    base_delay_s: float | None = attrs.field(default=None, validator=_number(positive=False, optional=True))
    max_delay_s: float | None = attrs.field(default=None, validator=_number(positive=False, optional=True))

    def __attrs_post_init__(self) -> None:
        _check_delays(self.base_delay_s, self.max_delay_s)


@attrs.frozen
class PolicyOverrides:
    """Policy keys allowed in ``[defaults]`` and in a server table; ``None`` inherits.

    Attributes:
        timeout_s: Deadline of one logical call, in seconds (greater than 0).
        connect_timeout_s: Deadline of one connection attempt, in seconds (greater than 0).
        max_concurrency: Calls in flight to one server (at least 1).
        retry: Partial retry policy.
        reconnect: Partial reconnect policy.
        when_disconnected: ``"wait"`` for the connection or ``"fail"`` at once.
        trust_annotations: Whether tool annotations (e.g. ``idempotentHint``) are believed.
        ack_timeout_s: Seconds a call may go without the server's early ACK before it is
            treated as lost (only against an RMCP server advertising ``early_ack`` with a
            durable store, and not over HTTP); unset means no ACK timeout.

    Raises:
        RMCPConfigError: A value is out of range; ``path`` is the field name.
    """

    timeout_s: float | None = attrs.field(default=None, validator=_number(positive=True, optional=True))
    connect_timeout_s: float | None = attrs.field(
        default=None, validator=_number(positive=True, optional=True)
    )
    max_concurrency: int | None = attrs.field(default=None, validator=_int_at_least(1, optional=True))
    retry: RetryOverrides = attrs.field(default=RetryOverrides(), validator=_instance_of(RetryOverrides))
    reconnect: ReconnectOverrides = attrs.field(
        default=ReconnectOverrides(), validator=_instance_of(ReconnectOverrides)
    )
    when_disconnected: WhenDisconnected | None = attrs.field(
        default=None, validator=_one_of("wait", "fail", optional=True)
    )
    trust_annotations: bool | None = attrs.field(default=None, validator=_opt_bool)
    ack_timeout_s: float | None = attrs.field(default=None, validator=_number(positive=True, optional=True))


@attrs.frozen
class ToolOverrides:
    """Policy keys allowed in a tool table; ``None`` inherits from the server.

    Attributes:
        timeout_s: Deadline of one call of this tool, in seconds (greater than 0).
        retry: Partial retry policy for this tool.
        idempotent: Whether the tool is safe to repeat; ``None`` means "not said" (the tool's
            annotations may then decide, see ``trust_annotations``).
        ack_timeout_s: ACK timeout of this tool (see :class:`PolicyOverrides`).

    Raises:
        RMCPConfigError: A value is out of range; ``path`` is the field name.
    """

    timeout_s: float | None = attrs.field(default=None, validator=_number(positive=True, optional=True))
    retry: RetryOverrides = attrs.field(default=RetryOverrides(), validator=_instance_of(RetryOverrides))
    idempotent: bool | None = attrs.field(default=None, validator=_opt_bool)
    ack_timeout_s: float | None = attrs.field(default=None, validator=_number(positive=True, optional=True))


@attrs.frozen
class ServerPolicy:
    """The resolved policy of one server (no ``None`` left).

    Built by :meth:`RMCPConfig.server_policy`; see :class:`PolicyOverrides` for the fields.

    Raises:
        RMCPConfigError: A value is out of range; ``path`` is the field name.
    """

    timeout_s: float = attrs.field(validator=_number(positive=True))
    connect_timeout_s: float = attrs.field(validator=_number(positive=True))
    max_concurrency: int = attrs.field(validator=_int_at_least(1))
    retry: RetryPolicy = attrs.field(validator=_instance_of(RetryPolicy))
    reconnect: ReconnectPolicy = attrs.field(validator=_instance_of(ReconnectPolicy))
    when_disconnected: WhenDisconnected = attrs.field(validator=_one_of("wait", "fail"))
    trust_annotations: bool = attrs.field(validator=_bool)
    ack_timeout_s: float | None = attrs.field(default=None, validator=_number(positive=True, optional=True))


@attrs.frozen
class CallPolicy:
    """The resolved policy of calls to one tool of one server.

    Built by :meth:`RMCPConfig.call_policy`.

    Attributes:
        timeout_s: Deadline of the logical call, in seconds.
        retry: Retry policy of the call.
        idempotent: The configured idempotency, or ``None`` when the config does not say.
        trust_annotations: Whether the tool's annotations may decide when ``idempotent`` is
            ``None``.
        ack_timeout_s: Seconds without an early ACK before an attempt counts as lost, or
            ``None`` for no ACK timeout.

    Raises:
        RMCPConfigError: A value is out of range; ``path`` is the field name.
    """

    timeout_s: float = attrs.field(validator=_number(positive=True))
    retry: RetryPolicy = attrs.field(validator=_instance_of(RetryPolicy))
    idempotent: bool | None = attrs.field(validator=_opt_bool)
    trust_annotations: bool = attrs.field(validator=_bool)
    ack_timeout_s: float | None = attrs.field(default=None, validator=_number(positive=True, optional=True))


_BUILTIN: Final = ServerPolicy(
    timeout_s=60.0,
    connect_timeout_s=10.0,
    max_concurrency=16,
    retry=RetryPolicy(),
    reconnect=ReconnectPolicy(),
    when_disconnected="wait",
    trust_annotations=True,
)


# --------------------------------------------------------------------------------------------
# Server specs
# --------------------------------------------------------------------------------------------


_KNOWN_PROTOCOLS = frozenset({*MODERN_PROTOCOL_VERSIONS, *HANDSHAKE_PROTOCOL_VERSIONS})


def _check_protocol(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value in ("auto", "legacy") or value in _KNOWN_PROTOCOLS:
        return
    known = ", ".join(sorted(_KNOWN_PROTOCOLS))
    raise RMCPConfigError(
        f"must be 'auto', 'legacy' or a protocol version the MCP SDK knows ({known}), got {value!r}",
        path=attribute.name,
    )


def _check_name(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise RMCPConfigError(f"a server needs a non-empty name, got {value!r}", path=attribute.name)


def _is_instance(value: object, cls: type | tuple[type, ...]) -> bool:
    """``isinstance`` for values whose static type already claims the answer (user input)."""
    return isinstance(value, cls)


def _to_args(value: Sequence[str]) -> tuple[str, ...]:
    if _is_instance(value, (str, bytes)) or not _is_instance(value, Iterable):
        raise RMCPConfigError(f"expected a list of strings, got {_show(value)}", path="args")
    items = tuple(cast("Iterable[object]", value))
    for index, item in enumerate(items):
        if not isinstance(item, str):
            raise RMCPConfigError(f"expected a string, got {_show(item)}", path=f"args.{index}")
    return cast("tuple[str, ...]", items)


def _to_opt_path(value: str | os.PathLike[str] | None) -> str | None:
    if value is None:
        return None
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def _freeze(value: Mapping[_K, _V]) -> Mapping[_K, _V]:
    if _is_instance(value, Mapping):
        return _FrozenMap(value)
    return value  # not a mapping: the validator reports it


def _freeze_opt(value: Mapping[_K, _V] | None) -> Mapping[_K, _V] | None:
    return None if value is None else _freeze(value)


def _str_map(*, optional: bool) -> _Validator:
    def check(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is None and optional:
            return
        if not isinstance(value, Mapping):
            raise RMCPConfigError(f"expected a table of strings, got {_show(value)}", path=attribute.name)
        for key, item in cast("Mapping[object, object]", value).items():
            if not isinstance(key, str) or not isinstance(item, str):
                raise RMCPConfigError(
                    f"expected string keys and values, got {_show(key)}: {_show(item)}",
                    path=f"{attribute.name}.{key}",
                )

    return check


def _tools_map(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, Mapping):
        raise RMCPConfigError(f"expected a mapping of tool names, got {_show(value)}", path=attribute.name)
    for key, item in cast("Mapping[object, object]", value).items():
        if not isinstance(key, str) or not key:
            raise RMCPConfigError(f"tool names must be non-empty strings, got {key!r}", path=attribute.name)
        if not isinstance(item, ToolOverrides):
            raise RMCPConfigError(
                f"expected a ToolOverrides, got {_show(item)}", path=f"{attribute.name}.{key}"
            )


_TRANSPORT_OF_KEY: Final[Mapping[str, Transport]] = {
    "command": "stdio",
    "args": "stdio",
    "env": "stdio",
    "cwd": "stdio",
    "url": "http",
    "headers": "http",
    "server": "memory",
    "wire": "memory",
}


def _same(a: object, b: object) -> bool:
    return a is b


@attrs.frozen
class ServerSpec:
    """How to reach one MCP server, plus its policy overrides.

    Prefer the factories :meth:`stdio`, :meth:`http` and :meth:`in_memory`; the constructor
    validates the same way.

    Attributes:
        name: The server's name (the key of ``[servers.<name>]``).
        transport: ``"stdio"``, ``"http"`` (streamable HTTP) or ``"memory"``.
        protocol: ``"auto"`` (negotiate), ``"legacy"`` or a protocol version such as
            ``"2025-11-25"``.
        command: Program to run (stdio).
        args: Its arguments (stdio).
        env: Environment variables of the process (stdio); ``None`` inherits the SDK default.
        cwd: Working directory of the process (stdio).
        url: Endpoint URL, ``http://`` or ``https://`` (http).
        headers: Extra HTTP headers (http).
        server: The server object (memory): an ``mcp`` ``MCPServer`` or low-level ``Server``.
            Compared by identity.
        wire: ``"jsonrpc"`` (serialize messages, the default) or ``"direct"`` (memory only).
        overrides: This server's policy layer (over ``[defaults]``).
        tools: Per-tool policy layers, keyed by tool name.

    Raises:
        RMCPConfigError: A value is invalid or does not fit the transport; ``path`` is the
            field name.
    """

    name: str = attrs.field(validator=_check_name)
    transport: Transport = attrs.field(validator=_one_of("stdio", "http", "memory"))
    protocol: str = attrs.field(default="auto", validator=_check_protocol)
    command: str | None = attrs.field(default=None, validator=_opt_str)
    args: tuple[str, ...] = attrs.field(default=(), converter=_to_args)
    env: Mapping[str, str] | None = attrs.field(
        default=None, converter=_freeze_opt, validator=_str_map(optional=True)
    )
    cwd: str | None = attrs.field(default=None, converter=_to_opt_path, validator=_opt_str)
    url: str | None = attrs.field(default=None, validator=_opt_str)
    headers: Mapping[str, str] | None = attrs.field(
        default=None, converter=_freeze_opt, validator=_str_map(optional=True)
    )
    server: object | None = attrs.field(default=None, eq=attrs.cmp_using(eq=_same), hash=False)
    wire: Wire = attrs.field(default="jsonrpc", validator=_one_of("jsonrpc", "direct"))
    overrides: PolicyOverrides = attrs.field(
        default=PolicyOverrides(), validator=_instance_of(PolicyOverrides)
    )
    tools: Mapping[str, ToolOverrides] = attrs.field(
        factory=lambda: _FrozenMap[str, ToolOverrides](), converter=_freeze, validator=_tools_map
    )

    def __attrs_post_init__(self) -> None:
        present = {
            "command": self.command is not None,
            "args": bool(self.args),
            "env": self.env is not None,
            "cwd": self.cwd is not None,
            "url": self.url is not None,
            "headers": self.headers is not None,
            "server": self.server is not None,
            "wire": self.wire != "jsonrpc",
        }
        for key, is_set in present.items():
            owner = _TRANSPORT_OF_KEY[key]
            if is_set and owner != self.transport:
                raise RMCPConfigError(
                    f"{key!r} is only for the {owner!r} transport, this server uses {self.transport!r}",
                    path=key,
                )
        if self.transport == "stdio" and not self.command:
            raise RMCPConfigError("the stdio transport needs a command (the program to run)", path="command")
        if self.transport == "http":
            if not self.url:
                raise RMCPConfigError("the http transport needs a url", path="url")
            parts = urlsplit(self.url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise RMCPConfigError(f"must be an http:// or https:// URL, got {self.url!r}", path="url")
        if self.transport == "memory" and self.server is None:
            raise RMCPConfigError("the memory transport needs a server object", path="server")

    @classmethod
    def stdio(
        cls,
        name: str,
        command: str,
        args: Sequence[str] = (),
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        protocol: str = "auto",
        overrides: PolicyOverrides | None = None,
        tools: Mapping[str, ToolOverrides] | None = None,
    ) -> ServerSpec:
        """A server run as a subprocess speaking MCP over stdin/stdout.

        Args:
            name: The server's name.
            command: Program to run.
            args: Its arguments.
            env: Environment of the process; ``None`` uses the SDK's default environment.
            cwd: Working directory of the process.
            protocol: ``"auto"``, ``"legacy"`` or a protocol version such as ``"2025-11-25"``.
            overrides: The server's policy layer.
            tools: Per-tool policy layers.

        Returns:
            The validated spec.

        Raises:
            RMCPConfigError: A value is invalid (empty name, empty command, bad protocol...).
        """
        return cls(
            name=name,
            transport="stdio",
            protocol=protocol,
            command=command,
            args=args,
            env=env,
            cwd=cwd,
            overrides=PolicyOverrides() if overrides is None else overrides,
            tools={} if tools is None else tools,
        )

    @classmethod
    def http(
        cls,
        name: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        protocol: str = "auto",
        overrides: PolicyOverrides | None = None,
        tools: Mapping[str, ToolOverrides] | None = None,
    ) -> ServerSpec:
        """A server reached over streamable HTTP.

        Args:
            name: The server's name.
            url: Endpoint URL (``http://`` or ``https://``).
            headers: Extra HTTP headers sent with every request.
            protocol: ``"auto"``, ``"legacy"`` or a protocol version such as ``"2025-11-25"``.
            overrides: The server's policy layer.
            tools: Per-tool policy layers.

        Returns:
            The validated spec.

        Raises:
            RMCPConfigError: A value is invalid (empty name, not an http(s) URL, bad protocol...).
        """
        return cls(
            name=name,
            transport="http",
            protocol=protocol,
            url=url,
            headers=headers,
            overrides=PolicyOverrides() if overrides is None else overrides,
            tools={} if tools is None else tools,
        )

    @classmethod
    def in_memory(
        cls,
        name: str,
        server: object,
        *,
        wire: Wire = "jsonrpc",
        protocol: str = "auto",
        overrides: PolicyOverrides | None = None,
        tools: Mapping[str, ToolOverrides] | None = None,
    ) -> ServerSpec:
        """A server object running in this process (tests, embedded tools).

        Args:
            name: The server's name.
            server: An ``mcp`` ``MCPServer`` or low-level ``Server`` object.
            wire: ``"jsonrpc"`` to pass serialized JSON-RPC messages, ``"direct"`` to pass
                objects.
            protocol: ``"auto"``, ``"legacy"`` or a protocol version such as ``"2025-11-25"``.
            overrides: The server's policy layer.
            tools: Per-tool policy layers.

        Returns:
            The validated spec.

        Raises:
            RMCPConfigError: A value is invalid (empty name, ``server`` is ``None``, bad wire...).
        """
        return cls(
            name=name,
            transport="memory",
            protocol=protocol,
            server=server,
            wire=wire,
            overrides=PolicyOverrides() if overrides is None else overrides,
            tools={} if tools is None else tools,
        )

    def describe(self) -> str:
        """A short human description of where the server is, for error messages.

        Returns:
            The command line for stdio, the URL for http, ``"in-memory server <name>"`` for
            memory.
        """
        if self.transport == "stdio":
            return shlex.join([self.command or "", *self.args])
        if self.transport == "http":
            return self.url or ""
        return f"in-memory server {self.name}"


# --------------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------------


def _pick(base: _T, *layers: _T | None) -> _T:
    result = base
    for layer in layers:
        if layer is not None:
            result = layer
    return result


def _prefixed(error: RMCPConfigError, prefix: str) -> RMCPConfigError:
    path = ".".join(part for part in (prefix, error.path) if part)
    return RMCPConfigError(_raw_message(error), path=path)


def _raw_message(error: RMCPConfigError) -> str:
    head = f"{error.path}: "
    if error.path and error.message.startswith(head):
        return error.message[len(head) :]
    return error.message


def _layered(error: RMCPConfigError) -> RMCPConfigError:
    note = " (after layering built-in defaults, [defaults], the server and the tool)"
    return RMCPConfigError(_raw_message(error) + note, path=error.path)


def _resolve_retry(base: RetryPolicy, layers: Sequence[RetryOverrides], where: str) -> RetryPolicy:
    try:
        return RetryPolicy(
            max_attempts=_pick(base.max_attempts, *(layer.max_attempts for layer in layers)),
            base_delay_s=_pick(base.base_delay_s, *(layer.base_delay_s for layer in layers)),
            max_delay_s=_pick(base.max_delay_s, *(layer.max_delay_s for layer in layers)),
        )
    except RMCPConfigError as exc:
        raise _prefixed(_layered(exc), f"{where}.retry") from None


def _resolve_server(layers: Sequence[PolicyOverrides], where: str) -> ServerPolicy:
    retry = _resolve_retry(_BUILTIN.retry, [layer.retry for layer in layers], where)
    reconnects = [layer.reconnect for layer in layers]
    try:
        reconnect = ReconnectPolicy(
            base_delay_s=_pick(_BUILTIN.reconnect.base_delay_s, *(r.base_delay_s for r in reconnects)),
            max_delay_s=_pick(_BUILTIN.reconnect.max_delay_s, *(r.max_delay_s for r in reconnects)),
        )
    except RMCPConfigError as exc:
        raise _prefixed(_layered(exc), f"{where}.reconnect") from None
    when_disconnected = cast(
        "WhenDisconnected", _pick(_BUILTIN.when_disconnected, *(layer.when_disconnected for layer in layers))
    )
    try:
        return ServerPolicy(
            timeout_s=_pick(_BUILTIN.timeout_s, *(layer.timeout_s for layer in layers)),
            connect_timeout_s=_pick(
                _BUILTIN.connect_timeout_s, *(layer.connect_timeout_s for layer in layers)
            ),
            max_concurrency=_pick(_BUILTIN.max_concurrency, *(layer.max_concurrency for layer in layers)),
            retry=retry,
            reconnect=reconnect,
            when_disconnected=when_disconnected,
            trust_annotations=_pick(
                _BUILTIN.trust_annotations, *(layer.trust_annotations for layer in layers)
            ),
            ack_timeout_s=_pick(_BUILTIN.ack_timeout_s, *(layer.ack_timeout_s for layer in layers)),
        )
    except RMCPConfigError as exc:  # pragma: no cover - the layers are validated already
        raise _prefixed(exc, where) from None


# --------------------------------------------------------------------------------------------
# The configuration
# --------------------------------------------------------------------------------------------


def _servers_map(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, Mapping):
        raise RMCPConfigError(f"expected a mapping of server names, got {_show(value)}", path=attribute.name)
    for key, spec in cast("Mapping[object, object]", value).items():
        if not isinstance(spec, ServerSpec):
            raise RMCPConfigError(f"expected a ServerSpec, got {_show(spec)}", path=f"servers.{key}")
        if key != spec.name:
            raise RMCPConfigError(
                f"the key {key!r} differs from the server's name {spec.name!r}", path=f"servers.{key}.name"
            )


@attrs.frozen
class RMCPConfig:
    """The whole configuration: runtime settings, policy defaults and servers.

    Construction validates that every server's and every configured tool's layered policy
    resolves (e.g. a ``max_delay_s`` below an inherited ``base_delay_s`` is refused).

    Attributes:
        runtime: Settings of the runtime as a whole.
        defaults: The policy layer shared by every server and tool.
        servers: The servers, keyed by name (each key equals its spec's ``name``).

    Raises:
        RMCPConfigError: A value is invalid; ``path`` names the key, e.g.
            ``servers.time.retry.max_delay_s``.
    """

    runtime: RuntimeSettings = attrs.field(default=RuntimeSettings(), validator=_instance_of(RuntimeSettings))
    defaults: PolicyOverrides = attrs.field(
        default=PolicyOverrides(), validator=_instance_of(PolicyOverrides)
    )
    servers: Mapping[str, ServerSpec] = attrs.field(
        factory=lambda: _FrozenMap[str, ServerSpec](), converter=_freeze, validator=_servers_map
    )

    def __attrs_post_init__(self) -> None:
        _resolve_server([self.defaults], "defaults")
        for spec in self.servers.values():
            self.server_policy(spec)
            for tool in spec.tools:
                self.call_policy(spec, tool)

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> RMCPConfig:
        """Load and validate a TOML configuration file.

        Args:
            path: The file to read.

        Returns:
            The validated configuration.

        Raises:
            RMCPConfigError: The file is missing or unreadable, is not valid TOML (the message
                names the file), or a value is invalid (``path`` names the key and the message
                the file).
        """
        filename = os.fspath(path)
        try:
            with open(filename, "rb") as file:
                data = tomllib.load(file)
        except FileNotFoundError:
            raise RMCPConfigError(f"config file not found: {filename}") from None
        except tomllib.TOMLDecodeError as exc:
            raise RMCPConfigError(f"invalid TOML in {filename}: {exc}") from None
        except UnicodeDecodeError as exc:
            raise RMCPConfigError(f"config file {filename} is not UTF-8 text: {exc}") from None
        except OSError as exc:
            raise RMCPConfigError(f"cannot read config file {filename}: {exc.strerror or exc}") from None
        try:
            return cls.from_dict(data)
        except RMCPConfigError as exc:
            raise RMCPConfigError(f"{_raw_message(exc)} (in {filename})", path=exc.path) from exc

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RMCPConfig:
        """Build and validate a configuration from a mapping shaped like the TOML file.

        Args:
            data: Tables ``runtime``, ``defaults`` and ``servers`` (all optional), with the
                key names of the TOML format.

        Returns:
            The validated configuration.

        Raises:
            RMCPConfigError: A key is unknown, a value has the wrong type or is out of range, a
                server lacks what its transport needs...; ``path`` names the key.
        """
        if not _is_instance(data, Mapping):
            raise RMCPConfigError(f"the configuration must be a table (mapping), got {_show(data)}")
        try:
            table = _converter.structure(dict(data), _ConfigTable)
        except RMCPConfigError:
            raise
        except Exception as exc:
            raise _error_from_cattrs(exc) from exc
        servers: dict[str, ServerSpec] = {}
        for name, server in table.servers.items():
            try:
                servers[name] = server.to_spec(name)
            except RMCPConfigError as exc:
                raise _prefixed(exc, f"servers.{name}") from None
        return cls(runtime=table.runtime, defaults=table.defaults, servers=servers)

    def server_policy(self, spec: ServerSpec) -> ServerPolicy:
        """Resolve a server's policy: built-in defaults, then ``[defaults]``, then the server.

        Args:
            spec: The server (it need not be one of ``servers``).

        Returns:
            The resolved policy.

        Raises:
            RMCPConfigError: The layers combine into an invalid policy (e.g. ``max_delay_s``
                below an inherited ``base_delay_s``).
        """
        return _resolve_server([self.defaults, spec.overrides], f"servers.{spec.name}")

    def call_policy(self, spec: ServerSpec, tool: str) -> CallPolicy:
        """Resolve the policy of calls to one tool: the server's policy, then the tool's layer.

        A tool without a table in ``spec.tools`` gets the server's values and
        ``idempotent=None``.

        Args:
            spec: The server (it need not be one of ``servers``).
            tool: The tool's name.

        Returns:
            The resolved policy.

        Raises:
            RMCPConfigError: The layers combine into an invalid policy.
        """
        server = self.server_policy(spec)
        overrides = spec.tools.get(tool, _NO_TOOL_OVERRIDES)
        where = f"servers.{spec.name}.tools.{tool}"
        retry = _resolve_retry(
            _BUILTIN.retry, [self.defaults.retry, spec.overrides.retry, overrides.retry], where
        )
        return CallPolicy(
            timeout_s=_pick(server.timeout_s, overrides.timeout_s),
            retry=retry,
            idempotent=overrides.idempotent,
            trust_annotations=server.trust_annotations,
            ack_timeout_s=_pick(server.ack_timeout_s, overrides.ack_timeout_s),
        )


_NO_TOOL_OVERRIDES: Final = ToolOverrides()


# --------------------------------------------------------------------------------------------
# TOML / dict loading with cattrs
# --------------------------------------------------------------------------------------------


@attrs.frozen
class _ServerTable:
    """A ``[servers.<name>]`` table as written: spec keys and policy keys side by side."""

    transport: str
    protocol: str = "auto"
    command: str | None = None
    args: tuple[str, ...] = ()
    env: dict[str, str] | None = None
    cwd: str | None = None
    url: str | None = None
    headers: dict[str, str] | None = None
    timeout_s: float | None = None
    connect_timeout_s: float | None = None
    max_concurrency: int | None = None
    retry: RetryOverrides = RetryOverrides()
    reconnect: ReconnectOverrides = ReconnectOverrides()
    when_disconnected: WhenDisconnected | None = None
    trust_annotations: bool | None = None
    tools: dict[str, ToolOverrides] = attrs.field(factory=dict[str, ToolOverrides])

    def to_spec(self, name: str) -> ServerSpec:
        if self.transport == "memory":
            raise RMCPConfigError(
                "the 'memory' transport cannot be configured in a file; build in-memory servers "
                "in Python with ServerSpec.in_memory()",
                path="transport",
            )
        if self.transport not in ("stdio", "http"):
            raise RMCPConfigError(
                f"unknown transport {self.transport!r}; use 'stdio' or 'http'", path="transport"
            )
        overrides = PolicyOverrides(
            timeout_s=self.timeout_s,
            connect_timeout_s=self.connect_timeout_s,
            max_concurrency=self.max_concurrency,
            retry=self.retry,
            reconnect=self.reconnect,
            when_disconnected=self.when_disconnected,
            trust_annotations=self.trust_annotations,
        )
        return ServerSpec(
            name=name,
            transport=cast("Transport", self.transport),
            protocol=self.protocol,
            command=self.command,
            args=self.args,
            env=self.env,
            cwd=self.cwd,
            url=self.url,
            headers=self.headers,
            overrides=overrides,
            tools=self.tools,
        )


@attrs.frozen
class _ConfigTable:
    """The top level of the file as written."""

    runtime: RuntimeSettings = RuntimeSettings()
    defaults: PolicyOverrides = PolicyOverrides()
    servers: dict[str, _ServerTable] = attrs.field(factory=dict[str, _ServerTable])


class _Invalid(Exception):
    """A value of the wrong type, raised by the strict structure hooks."""


def _structure_int(value: object, _type: object) -> int:
    if not _is_int(value):
        raise _Invalid(f"expected an integer, got {_show(value)}")
    return value


def _structure_float(value: object, _type: object) -> float:
    if not _is_number(value):
        raise _Invalid(f"expected a number, got {_show(value)}")
    return float(value)


def _structure_bool(value: object, _type: object) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"expected true or false, got {_show(value)}")
    return value


def _structure_str(value: object, _type: object) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"expected a string, got {_show(value)}")
    return value


def _structure_str_tuple(value: object, _type: object) -> tuple[str, ...]:
    if not isinstance(value, list | tuple):
        raise _Invalid(f"expected a list of strings, got {_show(value)}")
    items = tuple(cast("Sequence[object]", value))
    for index, item in enumerate(items):
        if not isinstance(item, str):
            raise _Invalid(f"expected a list of strings, item {index} is {_show(item)}")
    return cast("tuple[str, ...]", items)


def _structure_literal(value: object, type_: Any) -> Any:
    choices = get_args(type_)
    if not isinstance(value, str) or value not in choices:
        raise _Invalid(f"must be one of {_choices(choices)}, got {value!r}")
    return value


def _make_converter() -> cattrs.Converter:
    converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    converter.register_structure_hook(int, _structure_int)
    converter.register_structure_hook(float, _structure_float)
    converter.register_structure_hook(bool, _structure_bool)
    converter.register_structure_hook(str, _structure_str)
    converter.register_structure_hook_func(lambda t: t == tuple[str, ...], _structure_str_tuple)
    converter.register_structure_hook_func(lambda t: get_origin(t) is Literal, _structure_literal)
    return converter


_converter: Final = _make_converter()

_SEP: Final = "\x1f"
_END: Final = "\x1e"
_PATH_TOKEN: Final = re.compile(
    r"\.([A-Za-z_][A-Za-z0-9_]*)|\[('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|-?\d+)\]"
)
# Keys allowed at server level but not at tool level, for a helpful hint.
_SERVER_ONLY_KEYS: Final = frozenset(f.name for f in attrs.fields(PolicyOverrides)) - frozenset(
    f.name for f in attrs.fields(ToolOverrides)
)


def _format(exc: BaseException, type_: Any) -> str:
    """Encode one leaf error as ``suffix<SEP>message<END>`` for :func:`transform_error`."""
    suffix = ""
    if isinstance(exc, _Invalid):
        message = str(exc)
    elif isinstance(exc, RMCPConfigError):
        suffix, message = exc.path, _raw_message(exc)
    elif isinstance(exc, ForbiddenExtraKeysError):
        extra = sorted(str(key) for key in exc.extra_fields)
        allowed = [f.name for f in attrs.fields(exc.cl)]
        suffix = extra[0]
        message = f"unknown key{'s' if len(extra) > 1 else ''} {_choices(extra).replace(' or ', ', ')}"
        close = difflib.get_close_matches(extra[0], allowed, n=1)
        if exc.cl is ToolOverrides and extra[0] in _SERVER_ONLY_KEYS:
            message += f"; {extra[0]!r} cannot be set per tool, set it on the server or in [defaults]"
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
    """``$.servers['time'].retry`` -> ``servers.time.retry``."""
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
    return ".".join(parts)


def _error_from_cattrs(exc: BaseException) -> RMCPConfigError:
    """Turn cattrs' nested validation errors into one RMCPConfigError with a dotted path."""
    problems: list[tuple[str, str]] = []
    for line in transform_error(exc, "$", _format):
        encoded, _, where = line.partition(f"{_END} @ ")
        suffix, _, message = encoded.partition(_SEP)
        path = ".".join(part for part in (_dotted(where), suffix) if part)
        problems.append((path, message))
    if not problems:  # pragma: no cover - transform_error always yields at least one line
        return RMCPConfigError(f"invalid configuration: {exc}")
    path, message = problems[0]
    if len(problems) > 1:
        others = "; ".join(f"{p or '<top level>'}: {m}" for p, m in problems[1:])
        message = f"{message} (and {len(problems) - 1} more: {others})"
    return RMCPConfigError(message, path=path)
