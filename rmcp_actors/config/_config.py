# pyright: strict
"""RMCPConfig: runtime settings, the ``[defaults]`` policy layer and the servers."""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Mapping
from typing import Any, cast

import attrs

from ..errors import RMCPConfigError
from ._checks import FrozenMap, instance_of, is_number, key_path, prefixed, raw_message, show
from ._keys import resolve
from ._load import load_tables
from ._policy import CallPolicy, PolicyOverrides, RuntimeSettings, ServerPolicy, TransactionSettings
from ._servers import ServerSpec, freeze

__all__ = ["RMCPConfig"]


def _servers_map(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, Mapping):
        raise RMCPConfigError(f"expected a mapping of server names, got {show(value)}", path=attribute.name)
    for key, spec in cast("Mapping[object, object]", value).items():
        if not isinstance(spec, ServerSpec):
            raise RMCPConfigError(f"expected a ServerSpec, got {show(spec)}", path=key_path("servers", key))
        if key != spec.name:
            raise RMCPConfigError(
                f"the key {key!r} differs from the server's name {spec.name!r}",
                path=key_path("servers", key, "name"),
            )


def _tenants_map(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, Mapping):
        raise RMCPConfigError(f"expected a table of tenant weights, got {show(value)}", path=attribute.name)
    for key, weight in cast("Mapping[object, object]", value).items():
        if not isinstance(key, str) or not key:
            raise RMCPConfigError(f"tenant names must be non-empty strings, got {key!r}", path=attribute.name)
        if not is_number(weight) or not 0 < weight < math.inf:
            raise RMCPConfigError(
                f"a tenant's weight must be a finite number greater than 0, got {show(weight)}",
                path=key_path("tenants", key),
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
        tenants: Weights of the tenants sharing each server's concurrency (``[tenants]``,
            ``name = weight``, greater than 0); a tenant not listed has weight 1.
        transactions: Settings of transactions: the journal, recovery at open.

    Raises:
        RMCPConfigError: A value is invalid; ``path`` names the key, e.g.
            ``servers.time.retry.max_delay_s``.
    """

    runtime: RuntimeSettings = attrs.field(default=RuntimeSettings(), validator=instance_of(RuntimeSettings))
    defaults: PolicyOverrides = attrs.field(default=PolicyOverrides(), validator=instance_of(PolicyOverrides))
    servers: Mapping[str, ServerSpec] = attrs.field(
        factory=lambda: FrozenMap[str, ServerSpec](), converter=freeze, validator=_servers_map
    )
    tenants: Mapping[str, float] = attrs.field(
        factory=lambda: FrozenMap[str, float](), converter=freeze, validator=_tenants_map
    )
    transactions: TransactionSettings = attrs.field(
        default=TransactionSettings(), validator=instance_of(TransactionSettings)
    )

    def __attrs_post_init__(self) -> None:
        resolve(ServerPolicy, [self.defaults], "defaults")
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
            raise RMCPConfigError(f"{raw_message(exc)} (in {filename})", path=exc.path) from exc

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RMCPConfig:
        """Build and validate a configuration from a mapping shaped like the TOML file.

        Args:
            data: Tables ``runtime``, ``defaults``, ``servers``, ``tenants`` and ``transactions``
                (all optional), with the key names of the TOML format.

        Returns:
            The validated configuration.

        Raises:
            RMCPConfigError: A key is unknown, a value has the wrong type or is out of range, a
                server lacks what its transport needs...; ``path`` names the key.
        """
        if not isinstance(cast("object", data), Mapping):
            raise RMCPConfigError(f"the configuration must be a table (mapping), got {show(data)}")
        tables = load_tables(data)
        servers: dict[str, ServerSpec] = {}
        for name, server in tables.servers.items():
            try:
                servers[name] = _spec(name, server.spec_keys, server.overrides, server.tools)
            except RMCPConfigError as exc:
                raise prefixed(exc, key_path("servers", name)) from None
        return cls(
            runtime=tables.runtime,
            defaults=tables.defaults,
            servers=servers,
            tenants=tables.tenants,
            transactions=tables.transactions,
        )

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
        return resolve(ServerPolicy, [self.defaults, spec.overrides], key_path("servers", spec.name))

    def call_policy(self, spec: ServerSpec, tool: str | None) -> CallPolicy:
        """Resolve the policy of calls to one tool: the server's policy, then the tool's layer.

        A tool without a table in ``spec.tools`` gets the server's values and
        ``idempotent=None``.

        Args:
            spec: The server (it need not be one of ``servers``).
            tool: The tool's name, or ``None`` for the policy of every tool without a table.

        Returns:
            The resolved policy.

        Raises:
            RMCPConfigError: The layers combine into an invalid policy.
        """
        layers: list[object] = [self.defaults, spec.overrides]
        if tool is not None and (overrides := spec.tools.get(tool)) is not None:
            layers.append(overrides)
            return resolve(CallPolicy, layers, key_path("servers", spec.name, "tools", tool))
        return resolve(CallPolicy, layers, key_path("servers", spec.name))


def _spec(name: str, keys: dict[str, Any], overrides: PolicyOverrides, tools: dict[str, Any]) -> ServerSpec:
    transport = keys.pop("transport")
    if transport == "memory":
        raise RMCPConfigError(
            "the 'memory' transport cannot be configured in a file; build in-memory servers "
            "in Python with ServerSpec.in_memory()",
            path="transport",
        )
    if transport not in ("stdio", "http"):
        raise RMCPConfigError(f"unknown transport {transport!r}; use 'stdio' or 'http'", path="transport")
    return ServerSpec(name=name, transport=transport, overrides=overrides, tools=tools, **keys)
