"""``rmcp bench``: what ``sup.call`` costs over a raw ``mcp.Client`` on your own server and tool.

A thin layer over :func:`rmcp_actors.testing.bench.run_bench`: it resolves the server (from the
config, or ``--server module:attribute`` for the in-memory transport), shows a progress bar on
stderr and prints a table, or one JSON object with ``--json``.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from typing import Annotated, Any, Literal

import attrs
import typer
from mcp import MCPError
from mcp.server import Server
from mcp.server.mcpserver import MCPServer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..config import RMCPConfig, ServerSpec
from ..errors import RMCPError, RMCPServerError
from ..testing.bench import BenchReport, BenchToolError, run_bench
from ._app import CliState, ExitCode, app, fail, load_config, stderr, stdout
from ._connect import run, without_journal
from ._outcomes import error_exit_code

__all__ = ["bench"]

TransportName = Literal["memory", "stdio", "http"]

_EXAMPLE = (
    "Three clients call TOOL with the same arguments in interleaved blocks: raw (the SDK's "
    "mcp.Client), raw2 (a second raw client: the noise floor) and rmcp (sup.call with your "
    "configured policies, max_concurrency included). Reported: calls/s, median and p99 latency, the "
    "throughput ratio rmcp/raw beside raw2/raw, and the median latency rmcp adds. The tool runs "
    "3 x (CALLS + warm-up) times: pick one whose side effects you can repeat.\n\n"
    "Examples:\n\n"
    'rmcp bench time get_current_time --args \'{"timezone": "UTC"}\' --calls 2000 --concurrency 8\n\n'
    'rmcp bench local echo --args \'{"text": "hi"}\' --server myapp.server:app --json'
)


def _raw_exit_code(error: Exception) -> ExitCode:
    """A raw client's failure: a JSON-RPC error other than a protocol refusal may come from a
    tool that ran (as :class:`RMCPServerError` says); anything else happened before sending."""
    if isinstance(error, MCPError) and error.code not in RMCPServerError.NOT_EXECUTED_CODES:
        return ExitCode.OUTCOME_UNKNOWN
    return ExitCode.REFUSED


def _arguments(raw: str) -> dict[str, Any]:
    try:
        arguments = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise fail(f"--args is not valid JSON ({exc.msg} at character {exc.pos}): {raw!r}") from None
    if not isinstance(arguments, dict):
        raise fail(f'--args must be a JSON object such as \'{{"text": "hi"}}\', got {raw!r}')
    return arguments  # pyright: ignore[reportUnknownVariableType]


def _in_memory_server(target: str) -> object:
    """The ``MCPServer`` / low-level ``Server`` (or a factory of one) named by ``module:attribute``,
    or exit 3."""
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise fail(f"--server must be module:attribute (e.g. myapp.server:app), got {target!r}")
    if os.getcwd() not in sys.path:  # the rmcp script, unlike python -m, does not look there
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise fail(f"--server {target!r}: cannot import {module_name!r} ({exc})") from None
    server = module
    for part in attribute.split("."):
        if not hasattr(server, part):
            raise fail(f"--server {target!r}: {module_name!r} has no attribute {attribute!r}")
        server = getattr(server, part)
    if callable(server) and not isinstance(server, MCPServer | Server):
        try:
            server = server()  # a factory such as build_server
        except TypeError as exc:
            raise fail(f"--server {target!r}: a factory must take no arguments ({exc})") from None
    if not isinstance(server, MCPServer | Server):
        kind = type(server).__name__  # pyright: ignore[reportUnknownArgumentType]
        raise fail(f"--server {target!r} is a {kind}, not an mcp MCPServer or low-level Server")
    return server  # pyright: ignore[reportUnknownVariableType]


def _config_if_any(ctx: typer.Context) -> RMCPConfig:
    """The config for an in-memory run: read if named or present, else the defaults."""
    state = ctx.find_object(CliState)
    if state is not None and state.config_from_default and not state.config_path.is_file():
        return RMCPConfig()
    return load_config(ctx)


def _resolve(
    ctx: typer.Context, name: str, transport: TransportName | None, server_target: str | None
) -> tuple[RMCPConfig, ServerSpec]:
    """The config and the spec of the server to measure, or exit 3 saying what is wrong."""
    if server_target is not None or transport == "memory":
        if server_target is None:
            raise fail("--transport memory needs --server module:attribute naming an MCPServer object")
        if transport not in (None, "memory"):
            raise fail(
                f"--server runs the server in memory; it cannot be combined with --transport {transport}"
            )
        config = _config_if_any(ctx)
        configured = config.servers.get(name)
        spec = ServerSpec.in_memory(name, _in_memory_server(server_target))
        if configured is not None:  # the configured policies, on the in-memory server
            spec = attrs.evolve(spec, overrides=configured.overrides, tools=configured.tools)
        return config, spec
    config = load_config(ctx)
    spec = config.servers.get(name)
    if spec is None:
        known = ", ".join(sorted(config.servers)) or "none"
        raise fail(f"unknown server {name!r} (configured servers: {known})")
    if spec.transport == "memory":
        raise fail(f"server {name!r} is in memory: name its object with --server module:attribute")
    if transport is not None and transport != spec.transport:
        raise fail(f"server {name!r} is configured with transport {spec.transport!r}, not {transport!r}")
    return config, spec


def _table(report: BenchReport) -> Table:
    table = Table(
        title=(
            f"{report.server}/{report.tool} over {report.transport}: {report.blocks} interleaved blocks "
            f"of {report.calls_per_block} calls, {report.concurrency} caller(s)"
        )
    )
    for column in ("client", "calls/s", "median µs", "p99 µs", "vs raw"):
        table.add_column(column, justify="left" if column == "client" else "right")
    for name in ("raw", "raw2", "rmcp"):
        side = getattr(report, name)
        ratio = side.calls_per_s / report.raw.calls_per_s
        table.add_row(
            name, f"{side.calls_per_s:,.0f}", f"{side.median_us:,.1f}", f"{side.p99_us:,.1f}", f"{ratio:.3f}"
        )
    return table


def _summary(report: BenchReport) -> str:
    noise = abs(1.0 - report.control_ratio)
    verdict = " (within noise: rerun with more --calls)" if abs(1.0 - report.ratio) <= noise else ""
    latency = "added median latency" if report.concurrency == 1 else "added median latency (queueing-bound)"
    return (
        f"rmcp/raw throughput {report.ratio:.3f}{verdict}; "
        f"raw2/raw (noise floor) {report.control_ratio:.3f}; "
        f"{latency} {report.added_median_us:+,.1f} µs, p99 {report.added_p99_us:+,.1f} µs"
    )


@app.command(epilog=_EXAMPLE)
def bench(
    ctx: typer.Context,
    server: Annotated[str, typer.Argument(help="The server's name in the config.")],
    tool: Annotated[str, typer.Argument(help="The tool to call.")],
    args: Annotated[str, typer.Option("--args", "-a", help="The tool's arguments, a JSON object.")] = "{}",
    transport: Annotated[
        TransportName | None,
        typer.Option(help="Check the server's transport; memory needs --server.", show_default=False),
    ] = None,
    server_object: Annotated[
        str | None,
        typer.Option(
            "--server",
            help="module:attribute of an MCPServer (or a function returning one) to run in memory.",
            show_default=False,
        ),
    ] = None,
    calls: Annotated[int, typer.Option(min=1, help="Measured calls per client.")] = 1000,
    concurrency: Annotated[int, typer.Option(min=1, help="Concurrent callers per client.")] = 1,
    blocks: Annotated[int, typer.Option(min=1, help="Interleaved blocks per client.")] = 5,
    timeout: Annotated[float, typer.Option(min=0.001, help="Deadline of each call, in seconds.")] = 60.0,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object instead of a table.")
    ] = False,
) -> None:
    """Measure what rmcp_actors adds over a raw mcp.Client calling TOOL on SERVER.

    Example: [bold]rmcp bench time get_current_time --args '{"timezone": "UTC"}' --calls 2000[/]
    """
    arguments = _arguments(args)
    config, spec = _resolve(ctx, server, transport, server_object)
    if calls < blocks * concurrency:
        raise fail(f"--calls ({calls}) must be at least --blocks x --concurrency ({blocks * concurrency})")
    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=stderr(),
        transient=True,
    ) as progress:
        task = progress.add_task(f"bench {server}/{tool}", total=blocks + 1)

        def advance(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        try:
            report = run(
                lambda: run_bench(
                    spec,
                    tool,
                    arguments,
                    config=without_journal(config),
                    calls=calls,
                    concurrency=concurrency,
                    blocks=blocks,
                    timeout_s=timeout,
                    progress=advance,
                ),
                interrupted=lambda: "(nothing measured is kept)",
            )
        except typer.Exit:  # Ctrl-C (130): a RuntimeError, which the last clause would take
            raise
        except BenchToolError as exc:
            raise fail(str(exc), ExitCode.TOOL_ERROR) from None
        except RMCPError as exc:
            raise fail(str(exc), error_exit_code(exc)) from None
        except Exception as exc:  # the raw SDK clients' own errors: no server, transport failure
            raise fail(
                f"could not run the benchmark against {server!r}: {exc!r}", _raw_exit_code(exc)
            ) from None
    if as_json:
        typer.echo(json.dumps(report.to_dict()))
        return
    out = stdout()
    out.print(_table(report))
    out.print(_summary(report), highlight=False)
