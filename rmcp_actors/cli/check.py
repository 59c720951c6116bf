"""``rmcp check``: validate the config and show the policy every server and tool resolves to."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any, cast

import attrs
import typer
from rich.table import Table

from ..config import RMCPConfig, ServerSpec
from ._app import AsJson, app, load_config, print_json, stdout

__all__ = ["check"]

#: The layers of a policy, least specific first, as ``set_in`` names them.
_BUILT_IN = "built-in"


def _plain(value: object) -> Any:
    """A config value as JSON carries it (enums by value, tuples and frozen maps as lists and
    objects)."""
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in cast("Mapping[object, object]", value).items()}
    if isinstance(value, tuple | list):
        return [_plain(item) for item in cast("tuple[object, ...] | list[object]", value)]
    if attrs.has(type(value)):
        return {field.name: _plain(getattr(value, field.name)) for field in attrs.fields(type(value))}
    return value


def _flat(value: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"retry": {"max_attempts": 3}}`` as ``{"retry.max_attempts": 3}``."""
    flat: dict[str, Any] = {}
    for key, item in value.items():
        path = f"{prefix}{key}"
        if isinstance(item, dict):
            flat.update(_flat(cast("dict[str, Any]", item), f"{path}."))
        else:
            flat[path] = item
    return flat


def _set_in(resolved: Mapping[str, Any], layers: list[tuple[str, object]]) -> dict[str, str]:
    """For each key of ``resolved``, the most specific layer that sets it (as ``resolve`` picks
    it: a layer's ``None`` inherits), or ``built-in``."""
    flat_layers = [(name, _flat(_plain(layer))) for name, layer in layers]
    origin: dict[str, str] = {}
    for path in _flat(resolved):
        origin[path] = next(
            (name for name, flat in reversed(flat_layers) if flat.get(path) is not None), _BUILT_IN
        )
    return origin


def _server_report(config: RMCPConfig, spec: ServerSpec) -> dict[str, Any]:
    policy = _plain(config.server_policy(spec))
    server_layers: list[tuple[str, object]] = [("defaults", config.defaults), ("server", spec.overrides)]
    tools: dict[str, Any] = {}
    for tool, overrides in spec.tools.items():
        tool_policy = _plain(config.call_policy(spec, tool))
        tools[tool] = {
            "policy": tool_policy,
            "set_in": _set_in(tool_policy, [*server_layers, ("tool", overrides)]),
        }
    return {
        "transport": spec.transport,
        "target": spec.describe(),
        "protocol": spec.protocol,
        "policy": policy,
        "set_in": _set_in(policy, server_layers),
        "tools": tools,
    }


def _shown(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "[" + ", ".join(_shown(item) for item in cast("list[object]", value)) + "]"
    return str(value)


def _server_table(name: str, report: Mapping[str, Any]) -> Table:
    table = Table(title=f"server {name} ({report['transport']}: {report['target']})", title_justify="left")
    table.add_column("key")
    table.add_column("value")
    table.add_column("set in")
    tools: Mapping[str, Mapping[str, Any]] = report["tools"]
    for tool in tools:
        table.add_column(f"tool {tool}")
    server_values = _flat(report["policy"])
    tool_only = {path: None for tool in tools.values() for path in _flat(tool["policy"])}
    for path in [*server_values, *(path for path in tool_only if path not in server_values)]:
        cells = [path, _shown(server_values.get(path)), report["set_in"].get(path, "")]
        for tool in tools.values():
            # A tool's cell shows only what its own table sets: a blank inherits the server's.
            set_here = tool["set_in"].get(path) == "tool"
            cells.append(f"[bold]{_shown(_flat(tool['policy'])[path])}[/]" if set_here else "")
        table.add_row(*cells)
    return table


@app.command()
def check(
    ctx: typer.Context,
    as_json: AsJson = False,
) -> None:
    """Validate the config and print the policy each server and tool resolves to.

    Each value shows the layer that set it: [italic]built-in[/], [italic]defaults[/] (the
    \\[defaults] table), [italic]server[/] or [italic]tool[/]. A bad config exits 3 with the
    key path of the offending value (e.g. [italic]servers.time.retry.max_attempts[/]).

    Example: [bold]rmcp --config rmcp.toml check[/]

    Example: [bold]rmcp check --json | jq '.servers.time.policy.retry'[/]
    """
    config = load_config(ctx, as_json=as_json)
    servers = {name: _server_report(config, spec) for name, spec in config.servers.items()}
    if as_json:
        print_json(
            {
                "outcome": "succeeded",
                "exit_code": 0,
                "valid": True,
                "runtime": _plain(config.runtime),
                "transactions": _plain(config.transactions),
                "tenants": _plain(config.tenants),
                "defaults": {
                    key: value for key, value in _flat(_plain(config.defaults)).items() if value is not None
                },
                "servers": servers,
            }
        )
        return
    console = stdout()
    console.print(f"[green]config is valid[/]: {len(servers)} server(s)", highlight=False)
    runtime = Table(title="runtime", title_justify="left")
    runtime.add_column("key")
    runtime.add_column("value")
    for section in ("runtime", "transactions"):
        for path, value in _flat(_plain(getattr(config, section))).items():
            runtime.add_row(f"{section}.{path}", _shown(value))
    for tenant, weight in config.tenants.items():
        runtime.add_row(f"tenants.{tenant}", _shown(weight))
    console.print(runtime)
    for name, report in servers.items():
        console.print(_server_table(name, report))
