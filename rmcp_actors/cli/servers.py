"""``rmcp servers`` (connect to every configured server and report) and ``rmcp tools SERVER``."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from mcp_types import Tool
from rich.markup import escape
from rich.table import Table

from .._protocol import META_KEY, ServerSettings, decode_server_settings
from ..config import CallPolicy
from ._app import OUTCOME_NAMES, AsJson, ExitCode, app, fail, load_config, print_json, stderr, stdout
from ._connect import connect, require_server, run

__all__ = ["servers", "tools"]


def _rmcp_of(tools: list[Tool]) -> ServerSettings | None:
    """What the server advertises of RMCP, read from the stamp its middleware puts on every
    tool (the connection also reads the capability, which the public API does not expose; an
    RMCP server stamps its tools on every protocol version)."""
    for tool in tools:
        if (
            tool.meta is not None
            and (settings := decode_server_settings(tool.meta.get(META_KEY))) is not None
        ):
            return settings
    return None


def _rmcp_json(settings: ServerSettings | None) -> dict[str, Any] | None:
    if settings is None:
        return None
    return {"version": settings.version, "features": list(settings.features), "durable": settings.durable}


def _rmcp_shown(rmcp: dict[str, Any] | None) -> str:
    if rmcp is None:
        return "no (plain MCP)"
    durable = ", durable store" if rmcp["durable"] else ""
    return f"{rmcp['version']} ({', '.join(rmcp['features']) or 'no features'}{durable})"


def _error_json(error: BaseException) -> dict[str, Any]:
    return {"type": type(error).__name__, "message": str(error)}


@app.command()
def servers(
    ctx: typer.Context,
    as_json: AsJson = False,
) -> None:
    """Connect to every configured server and show its state, protocol, RMCP support and tools.

    Servers are connected side by side, each within its [italic]connect_timeout_s[/]. A server
    that cannot be reached is shown with its error; the command then exits 4.

    Example: [bold]rmcp --config rmcp.toml servers[/]
    """
    config = load_config(ctx, as_json=as_json)

    async def gather() -> dict[str, dict[str, Any]]:
        reports: dict[str, dict[str, Any]] = {}
        async with connect(config, config.servers) as connected:
            for name, spec in config.servers.items():
                base: dict[str, Any] = {"transport": spec.transport, "target": spec.describe()}
                error = connected.failures.get(name)
                if error is None:
                    tools = await connected.supervisor.list_tools(name)
                    statistics = next(
                        connection
                        for connection in connected.supervisor.statistics().connections
                        if connection.name == name
                    )
                    reports[name] = base | {
                        "reachable": True,
                        "state": connected.supervisor.servers()[name].value,
                        "protocol_version": statistics.protocol_version,
                        "rmcp": _rmcp_json(_rmcp_of(tools)),
                        "tools": len(tools),
                        "error": None,
                    }
                else:
                    reports[name] = base | {
                        "reachable": False,
                        "state": "unreachable",
                        "protocol_version": None,
                        "rmcp": None,
                        "tools": None,
                        "error": _error_json(error),
                    }
        return reports

    reports = run(gather)
    code = ExitCode.SUCCEEDED if all(report["reachable"] for report in reports.values()) else ExitCode.REFUSED
    if as_json:
        print_json({"outcome": OUTCOME_NAMES[code], "exit_code": int(code), "servers": reports})
        raise typer.Exit(int(code))
    table = Table()
    for column in ("server", "state", "transport", "protocol", "RMCP", "tools"):
        table.add_column(column)
    for name, report in reports.items():
        state = report["state"]
        table.add_row(
            name,
            f"[green]{state}[/]" if report["reachable"] else f"[red]{state}[/]",
            report["transport"],
            report["protocol_version"] or "-",
            escape(_rmcp_shown(report["rmcp"])) if report["reachable"] else "-",
            str(report["tools"]) if report["tools"] is not None else "-",
        )
    stdout().print(table)
    for name, report in reports.items():
        if not report["reachable"]:
            stderr().print(f"[red]{name}[/]: {escape(report['error']['message'])}", highlight=False)
    raise typer.Exit(int(code))


def _safe_to_repeat(policy: CallPolicy, tool: Tool) -> tuple[bool, str]:
    """Whether the runtime retries ``tool`` after a lost answer from a plain MCP server, and
    why: the same rule as the call path (config first, then trusted annotations)."""
    if policy.idempotent is not None:
        return policy.idempotent, f"config: idempotent = {str(policy.idempotent).lower()}"
    annotations = tool.annotations
    if annotations is None:
        return False, "no annotations"
    if not policy.trust_annotations:
        return False, "annotations not trusted (trust_annotations = false)"
    if annotations.read_only_hint:
        return True, "annotation: readOnlyHint"
    if annotations.idempotent_hint:
        return True, "annotation: idempotentHint"
    return False, "annotations say neither read-only nor idempotent"


def _first_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0] if (text or "").strip() else ""


@app.command()
def tools(
    ctx: typer.Context,
    server: Annotated[str, typer.Argument(help="The server's name, as in the config.", show_default=False)],
    as_json: AsJson = False,
) -> None:
    """List a server's tools: name, description, and whether a lost answer is retried.

    [italic]safe to repeat[/] is what the runtime decides after a lost answer from a plain MCP
    server: the tool's [italic]idempotent[/] key in the config, else its readOnlyHint /
    idempotentHint annotations (when [italic]trust_annotations[/]). Against an RMCP server that
    deduplicates, every tool is retried safely by its idempotency key.

    Example: [bold]rmcp tools time[/]
    """
    config = load_config(ctx, as_json=as_json)
    require_server(config, server, as_json=as_json)
    spec = config.servers[server]

    async def listed() -> list[Tool]:
        async with connect(config, [server]) as connected:
            error = connected.failures.get(server)
            if error is not None:
                raise fail(
                    f"cannot connect to {server!r}: {error}",
                    ExitCode.REFUSED,
                    as_json=as_json,
                    error_type=type(error).__name__,
                )
            return await connected.supervisor.list_tools(server)

    listed_tools = run(listed)
    rmcp = _rmcp_json(_rmcp_of(listed_tools))
    report: dict[str, dict[str, Any]] = {}
    for tool in listed_tools:
        safe, because = _safe_to_repeat(config.call_policy(spec, tool.name), tool)
        annotations = tool.annotations
        report[tool.name] = {
            "title": tool.title,
            "description": tool.description,
            "annotations": annotations.model_dump(mode="json", by_alias=True, exclude_none=True)
            if annotations is not None
            else None,
            "safe_to_repeat": safe,
            "safe_because": because,
            "input_schema": tool.input_schema,
        }
    if as_json:
        print_json({"outcome": "succeeded", "exit_code": 0, "server": server, "rmcp": rmcp, "tools": report})
        return
    console = stdout()
    dedup = rmcp is not None and "dedup" in rmcp["features"]
    note = "RMCP server: every call is retried safely by its idempotency key" if dedup else _rmcp_shown(rmcp)
    console.print(f"[bold]{escape(server)}[/]: {len(report)} tool(s); RMCP: {escape(note)}", highlight=False)
    table = Table()
    for column in ("tool", "description", "safe to repeat", "because"):
        table.add_column(column)
    for name, tool_report in report.items():
        table.add_row(
            escape(name),
            escape(_first_line(tool_report["description"])),
            "yes" if tool_report["safe_to_repeat"] else "no",
            escape(tool_report["safe_because"]),
        )
    console.print(table)
