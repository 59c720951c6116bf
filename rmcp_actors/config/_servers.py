# pyright: strict
"""ServerSpec: how to reach one MCP server, plus its policy layers.

Its reprs and :meth:`ServerSpec.describe` mask credentials (URL passwords and secret query
values, header and environment values, secret-looking arguments, see ``rmcp_actors._redact``);
the fields keep the real values, which the transport uses.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar, cast
from urllib.parse import urlsplit

import attrs
import httpx2
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS, MODERN_PROTOCOL_VERSIONS

from .._redact import mask_args, mask_mapping, mask_url, scrub, secrets_of_args, secrets_of_url
from ..client.callbacks import ServerCallbacks
from ..errors import RMCPConfigError
from ._auth import AuthConfig
from ._checks import FrozenMap, Validator, key_path, one_of, show, string
from ._policy import PolicyOverrides, ToolOverrides

if TYPE_CHECKING:
    from ..testing.faults import FaultInjector
else:
    # rmcp_actors.testing builds on the runtime (servers, the client): importing it here would
    # be circular. attrs.resolve_types only needs the name; the validator checks the type.
    FaultInjector = object

__all__ = ["ServerSpec", "Transport", "Wire", "freeze"]

Transport = Literal["stdio", "http", "memory"]
Wire = Literal["jsonrpc", "direct"]

_K = TypeVar("_K")
_V = TypeVar("_V")

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
        raise RMCPConfigError(f"expected a list of strings, got {show(value)}", path="args")
    items = tuple(cast("Iterable[object]", value))
    for index, item in enumerate(items):
        if not isinstance(item, str):
            raise RMCPConfigError(f"expected a string, got {show(item)}", path=f"args.{index}")
    return cast("tuple[str, ...]", items)


def _to_opt_path(value: str | os.PathLike[str] | None) -> str | None:
    if value is None:
        return None
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def freeze(value: Mapping[_K, _V]) -> Mapping[_K, _V]:
    if _is_instance(value, Mapping):
        return FrozenMap(value)
    return value  # not a mapping: the validator reports it


def _freeze_opt(value: Mapping[_K, _V] | None) -> Mapping[_K, _V] | None:
    return None if value is None else freeze(value)


def _str_map(*, optional: bool) -> Validator:
    def check(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is None and optional:
            return
        if not isinstance(value, Mapping):
            raise RMCPConfigError(f"expected a table of strings, got {show(value)}", path=attribute.name)
        for key, item in cast("Mapping[object, object]", value).items():
            if not isinstance(key, str) or not isinstance(item, str):
                raise RMCPConfigError(
                    f"expected string keys and values, got {show(key)}: {show(item)}",
                    path=key_path(attribute.name, key),
                )

    return check


def _tools_map(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, Mapping):
        raise RMCPConfigError(f"expected a mapping of tool names, got {show(value)}", path=attribute.name)
    for key, item in cast("Mapping[object, object]", value).items():
        if not isinstance(key, str) or not key:
            raise RMCPConfigError(f"tool names must be non-empty strings, got {key!r}", path=attribute.name)
        if not isinstance(item, ToolOverrides):
            raise RMCPConfigError(
                f"expected a ToolOverrides, got {show(item)}", path=key_path(attribute.name, key)
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
    "auth": "http",
}


def _same(a: object, b: object) -> bool:
    return a is b


def _same_auth(a: object, b: object) -> bool:
    # An auth object holds state (tokens, a lock): two are the same only if they are one object.
    # An AuthConfig is a plain value, equal to another with the same keys.
    return a is b or (isinstance(a, AuthConfig) and a == b)


def _check_auth(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and not isinstance(value, httpx2.Auth | AuthConfig):
        raise RMCPConfigError(
            f"expected an httpx2.Auth (e.g. an SDK OAuth provider) or an AuthConfig, got {show(value)}",
            path=attribute.name,
        )


def _auth_repr(value: object) -> str:
    # An Auth object's own repr may show its credentials (httpx2.BasicAuth keeps the header).
    if value is None or isinstance(value, AuthConfig):
        return repr(value)
    return f"<{type(value).__name__}>"


def _instance_of_overrides(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, PolicyOverrides):
        raise RMCPConfigError(f"expected a PolicyOverrides, got {show(value)}", path=attribute.name)


def _optional_callbacks(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and not isinstance(value, ServerCallbacks):
        raise RMCPConfigError(f"expected a ServerCallbacks, got {show(value)}", path=attribute.name)


def _optional_string(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None:
        string(inst, attribute, value)


def _optional_faults(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is None:
        return
    from ..testing.faults import FaultInjector  # see the import at the top

    if not isinstance(value, FaultInjector):
        raise RMCPConfigError(f"expected a FaultInjector, got {show(value)}", path=attribute.name)


def _masked_map_repr(value: Mapping[str, str] | None) -> str:
    return "None" if value is None else repr(mask_mapping(value))


def _masked_url_repr(value: str | None) -> str:
    return "None" if value is None else repr(mask_url(value))


def _masked_args_repr(value: tuple[str, ...]) -> str:
    return repr(mask_args(value))


def _command_line(args: Sequence[str]) -> str:
    # A masked argument is shown as is: quoting would turn ``--token=***`` into a string.
    masked = mask_args(args)
    return " ".join(
        shown if shown != arg else shlex.quote(arg) for arg, shown in zip(args, masked, strict=True)
    )


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
        callbacks: What the client does when the server asks (sampling, elicitation, roots)
            or notifies (logs, list changes); None for nothing (any transport). Compared by
            equality, which for functions is identity.
        auth: How the client authenticates (http): an ``httpx2.Auth`` (the SDK's
            ``OAuthClientProvider`` and its client-credentials variants, ``httpx2.BasicAuth``,
            :class:`~rmcp_actors.EnvBearerAuth`...), compared by identity, or an
            :class:`~rmcp_actors.AuthConfig` (what ``[servers.<name>.auth]`` loads into). Shown
            masked in reprs.
        faults: A :class:`~rmcp_actors.testing.FaultInjector` that wraps every connection to
            the server (tests only, never loaded from TOML; set it with
            ``injector.spec(spec)``). Compared by identity.

    Raises:
        RMCPConfigError: A value is invalid or does not fit the transport; ``path`` is the
            field name.
    """

    name: str = attrs.field(validator=_check_name)
    transport: Transport = attrs.field(validator=one_of("stdio", "http", "memory"))
    protocol: str = attrs.field(default="auto", validator=_check_protocol)
    command: str | None = attrs.field(default=None, validator=_optional_string)
    args: tuple[str, ...] = attrs.field(default=(), converter=_to_args, repr=_masked_args_repr)
    env: Mapping[str, str] | None = attrs.field(
        default=None, converter=_freeze_opt, validator=_str_map(optional=True), repr=_masked_map_repr
    )
    cwd: str | None = attrs.field(default=None, converter=_to_opt_path, validator=_optional_string)
    url: str | None = attrs.field(default=None, validator=_optional_string, repr=_masked_url_repr)
    headers: Mapping[str, str] | None = attrs.field(
        default=None, converter=_freeze_opt, validator=_str_map(optional=True), repr=_masked_map_repr
    )
    server: object | None = attrs.field(default=None, eq=attrs.cmp_using(eq=_same), hash=False)
    wire: Wire = attrs.field(default="jsonrpc", validator=one_of("jsonrpc", "direct"))
    overrides: PolicyOverrides = attrs.field(default=PolicyOverrides(), validator=_instance_of_overrides)
    tools: Mapping[str, ToolOverrides] = attrs.field(
        factory=lambda: FrozenMap[str, ToolOverrides](), converter=freeze, validator=_tools_map
    )
    callbacks: ServerCallbacks | None = attrs.field(default=None, validator=_optional_callbacks, hash=False)
    auth: httpx2.Auth | AuthConfig | None = attrs.field(
        default=None, validator=_check_auth, eq=attrs.cmp_using(eq=_same_auth), hash=False, repr=_auth_repr
    )
    faults: FaultInjector | None = attrs.field(
        default=None, validator=_optional_faults, eq=attrs.cmp_using(eq=_same), hash=False
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
            "auth": self.auth is not None,
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
            if self.auth is not None and (parts.username is not None or parts.password is not None):
                raise RMCPConfigError(
                    "the URL's user:password@ (sent as HTTP Basic auth) and 'auth' would both set the "
                    "Authorization header: keep one",
                    path="auth",
                )
        if self.transport == "memory" and self.server is None:
            raise RMCPConfigError("the memory transport needs a server object", path="server")
        if self.faults is not None:
            if self.wire == "direct":
                raise RMCPConfigError(
                    "the direct in-memory wire has no transport to inject faults into: "
                    "use wire='jsonrpc' (the default)",
                    path="faults",
                )
            if self.faults.plan.kill > 0 and self.transport != "stdio":
                raise RMCPConfigError(
                    f"the kill fault kills a stdio server's process, this server uses {self.transport!r}: "
                    "set kill=0 (disconnect ends a connection on any transport)",
                    path="faults",
                )

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
        callbacks: ServerCallbacks | None = None,
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
            callbacks: Requests and notifications from the server (see ``ServerCallbacks``).

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
            callbacks=callbacks,
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
        callbacks: ServerCallbacks | None = None,
        auth: httpx2.Auth | AuthConfig | None = None,
    ) -> ServerSpec:
        """A server reached over streamable HTTP.

        Args:
            name: The server's name.
            url: Endpoint URL (``http://`` or ``https://``).
            headers: Extra HTTP headers sent with every request.
            protocol: ``"auto"``, ``"legacy"`` or a protocol version such as ``"2025-11-25"``.
            overrides: The server's policy layer.
            tools: Per-tool policy layers.
            callbacks: Requests and notifications from the server (see ``ServerCallbacks``).
            auth: How the client authenticates: any ``httpx2.Auth`` (e.g. the SDK's
                ``OAuthClientProvider`` or ``ClientCredentialsOAuthProvider``, or
                :class:`~rmcp_actors.EnvBearerAuth`), or an :class:`~rmcp_actors.AuthConfig`.
                Refreshing tokens and answering a 401 with a new one is the auth object's job;
                a refusal it cannot answer is an :class:`~rmcp_actors.RMCPAuthError`.

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
            callbacks=callbacks,
            auth=auth,
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
        callbacks: ServerCallbacks | None = None,
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
            callbacks: Requests and notifications from the server (see ``ServerCallbacks``).

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
            callbacks=callbacks,
        )

    def describe(self) -> str:
        """A short human description of where the server is, for error messages.

        Credentials are masked (``***``): a URL's password and secret query values, and
        arguments that look like secrets (``--token=...``, ``--api-key X``, ``sk-...``).

        Returns:
            The command line for stdio, the URL for http, ``"in-memory server <name>"`` for
            memory.
        """
        if self.transport == "stdio":
            return _command_line([self.command or "", *self.args])
        if self.transport == "http":
            return mask_url(self.url or "")
        return f"in-memory server {self.name}"

    def redact(self, text: str) -> str:
        """Mask this spec's secrets wherever they appear in ``text`` (an exception's message).

        The secrets are the URL's password and secret query values, every header and
        environment value, the secret-looking arguments and the values of the environment
        variables an :class:`AuthConfig` names; values under 4 characters are too
        common in prose to be erased from it (``describe()`` and the repr still mask them).

        Args:
            text: Text that may quote the spec, e.g. ``str(exc)`` of a transport error.

        Returns:
            ``text`` with each secret replaced by ``***``.
        """
        secrets: list[str] = []
        if self.url is not None:
            # The whole URL first: that masks its short secrets too (``?token=abc``).
            text = text.replace(self.url, mask_url(self.url))
            secrets += secrets_of_url(self.url)
        secrets += secrets_of_args(self.args)
        for mapping in (self.headers, self.env):
            if mapping is not None:
                secrets += mapping.values()
        if isinstance(self.auth, AuthConfig):
            # The values of the variables it names, as the transport read them.
            for variable in (self.auth.token_env, self.auth.password_env, self.auth.client_secret_env):
                if variable is not None and (value := os.environ.get(variable)):
                    secrets.append(value)
        return scrub(text, secrets)
