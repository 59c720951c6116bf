"""``rmcp chaos``: the same side-effecting calls made three ways under injected faults, and
what each way got right (see :func:`rmcp_actors.testing.run_chaos`).

Exit status: 0 when the rmcp way ran no call twice and reported none wrongly (0 duplicates,
0 lost), else 1; 3 for a usage error (a bad ``--faults``); 130 when interrupted (Ctrl-C).
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

import trio
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..errors import RMCPConfigError
from ..testing.chaos import WAYS, ChaosReport, WayName, run_chaos
from ..testing.faults import FaultPlan
from ._app import ExitCode, app, fail, stderr, stdout
from ._connect import is_ctrl_c

__all__ = ["DEFAULT_FAULTS", "chaos"]

#: The faults of ``rmcp chaos`` without ``--faults``: a network that loses one answer in five
#: (after the server ran the call) and one connection in twenty.
DEFAULT_FAULTS = "drop_response=0.2,disconnect=0.05"

_WAY_TITLES: dict[WayName, str] = {
    "raw": "raw MCP",
    "naive_retry": "naive retry",
    "rmcp": "rmcp_actors",
}
_COLUMNS: tuple[tuple[str, str], ...] = (
    ("succeeded", "succeeded"),
    ("failed", "failed"),
    ("unknown", "unknown"),
    ("side_effects", "side effects"),
    ("duplicates", "duplicates"),
    ("lost", "lost"),
    ("p50_ms", "p50 ms"),
    ("p99_ms", "p99 ms"),
)


def _plan(faults: str, seed: int) -> FaultPlan:
    text = "" if faults.strip().lower() == "none" else faults
    try:
        return FaultPlan.parse(text, seed=seed)
    except RMCPConfigError as exc:
        raise fail(f"--faults: {exc}") from None


def _table(report: ChaosReport) -> Table:
    """One column per way, one row per measure: narrow enough for any terminal."""
    table = Table(title=f"{report.config['calls']} effect(label) calls per way, {report.config['faults']}")
    table.add_column("")
    for name in WAYS:
        table.add_column(_WAY_TITLES[name], justify="right")
    figures = {name: report.ways[name].to_json() for name in WAYS}
    for key, title in _COLUMNS:
        table.add_row(title, *(f"{figures[name][key]:g}" for name in WAYS))
    return table


def _verdict(report: ChaosReport) -> str:
    rmcp = report.ways["rmcp"]
    if report.rmcp_exactly_once:
        return (
            "rmcp_actors: no call ran twice and every report matches the ledger; "
            f"{rmcp.unknown} call(s) reported unknown (the caller is told to check)."
        )
    return (
        f"rmcp_actors: {rmcp.duplicates} duplicate run(s) and {rmcp.lost} wrong report(s): a bug, "
        "please report it with this command line."
    )


def _faults_line(report: ChaosReport) -> str:
    parts: list[str] = []
    for name in WAYS:
        counts = {kind: count for kind, count in report.faults[name].items() if count}
        shown = ", ".join(f"{kind} {count}" for kind, count in counts.items()) or "none"
        parts.append(f"{_WAY_TITLES[name]}: {shown}")
    return "faults injected: " + "; ".join(parts)


@app.command()
def chaos(
    calls: Annotated[int, typer.Option("--calls", "-n", min=1, help="Logical calls per way.")] = 200,
    concurrency: Annotated[
        int, typer.Option("--concurrency", "-C", min=1, help="Calls in flight at once, per way.")
    ] = 8,
    faults: Annotated[
        str,
        typer.Option(
            "--faults",
            help="Fault probabilities, kind=p pairs (drop_request, drop_response, delay, duplicate, "
            "disconnect, corrupt, kill, corrupt_chunk), or 'none'.",
        ),
    ] = DEFAULT_FAULTS,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the faults: the same run again.")] = 0,
    transport: Annotated[
        Literal["memory", "stdio"],
        typer.Option(
            "--transport",
            help="memory: the chaos server in this process; stdio: a subprocess "
            "(python -m rmcp_actors.testing.chaos_server) per connection.",
        ),
    ] = "memory",
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the report as one JSON object on stdout.")
    ] = False,
) -> None:
    """Make the same side-effecting calls three ways under faults and compare what each reports.

    The ways: raw MCP (mcp.Client, no retry), raw MCP with a naive retry loop, and rmcp_actors
    against the chaos server with RMCP and a durable store. Each way runs against a fresh
    ledger; per way the report shows the calls succeeded, failed and unknown, the side effects
    run, the duplicates (runs beyond the first per call), the lost calls (reported succeeded
    with no run, or failed with one) and the latency. Exit 0 when rmcp_actors had 0 duplicates
    and 0 lost, else 1.

    Example: [bold]rmcp chaos --calls 2000 --faults drop_response=0.2,disconnect=0.05 --seed 1[/]
    """
    plan = _plan(faults, seed)
    if plan.kill > 0 and transport != "stdio":
        raise fail("--faults kill=... kills the server's process: add --transport stdio")
    console = stderr()
    with Progress(
        TextColumn("{task.description:<12}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=as_json,
    ) as progress:
        tasks = {name: progress.add_task(_WAY_TITLES[name], total=calls) for name in WAYS}

        def advance(way: WayName, done: int) -> None:
            progress.update(tasks[way], completed=done)

        try:
            report = trio.run(
                lambda: run_chaos(calls, concurrency, faults=plan, transport=transport, progress=advance)
            )
        except BaseException as error:
            # trio's nurseries deliver Ctrl-C inside an exception group, which the command line's
            # own Ctrl-C handling does not recognise: it would print the group and exit 1, the
            # status of an rmcp way that ran a call twice. The group may also hold what the
            # interrupt broke on its way (the SDK's in-memory server: BrokenResourceError), so
            # any Ctrl-C in it is an abort, not only a group of Ctrl-Cs alone.
            if is_ctrl_c(error):
                raise typer.Abort from None
            raise
    if as_json:
        stdout().out(json.dumps(report.to_json()), highlight=False)
    else:
        out = stdout()
        out.print(_table(report))
        out.print(_faults_line(report), highlight=False)
        out.print(_verdict(report), highlight=False)
    if not report.rmcp_exactly_once:
        raise typer.Exit(int(ExitCode.TOOL_ERROR))
