"""``rmcp call SERVER TOOL --args JSON``: one reliable call, its result, and an exit code that
says what happened (see :class:`~rmcp_actors.cli._app.ExitCode`)."""

from __future__ import annotations

import json
import sys
from collections.abc import Generator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, cast

import typer
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from ..client.transfers import TransferProgressCallback
from ..errors import RMCPError, RMCPTransferError
from ..result import CallResult
from ._app import AsJson, ExitCode, app, fail, load_config, print_json, stderr, stdout
from ._connect import connect, require_server, run
from ._outcomes import call_record, error_exit_code, error_record, result_exit_code, show_content

__all__ = ["call", "parse_arguments"]


def parse_arguments(text: str, *, as_json: bool = False) -> dict[str, Any]:
    """The tool's arguments from ``--args``: a JSON object, or ``-`` to read it from stdin.

    Exits with code 3 and the position of the mistake when it is not a JSON object.
    """
    source = "--args"
    if text == "-":
        text, source = sys.stdin.read(), "the JSON on stdin"
    try:
        value: object = json.loads(text)
    except json.JSONDecodeError as exc:
        raise fail(
            f"{source} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}; "
            """pass an object such as '{"text": "hi"}'""",
            as_json=as_json,
            error_type="ArgumentsError",
        ) from None
    if not isinstance(value, dict):
        raise fail(
            f"{source} must be a JSON object of the tool's arguments, got {type(value).__name__}",
            as_json=as_json,
            error_type="ArgumentsError",
        )
    return cast("dict[str, Any]", value)


@contextmanager
def _transfer_bar() -> Generator[TransferProgressCallback | None]:
    """A progress bar on stderr for payloads moving in chunks, shown only on a terminal (and
    only once a chunk moved: a call without transfers shows nothing)."""
    console = stderr()
    if not console.is_terminal:
        yield None
        return
    progress = Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )
    task: TaskID | None = None

    def update(done: int, total: int) -> None:
        nonlocal task
        if task is None:
            task = progress.add_task("transfer", total=total)
        progress.update(task, completed=done, total=total)

    with progress:
        yield update


def _report_result(result: CallResult, output: Path | None = None) -> None:
    console = stdout()
    streamed = {moved.where for moved in result.transfers if moved.sink is not None}
    for index, block in enumerate(result.content):
        if f"content[{index}]" in streamed:
            continue  # its payload is in --output, reported below
        console.print(show_content(block), markup=False, highlight=False)
    for moved in result.transfers:
        if moved.sink is not None:
            stderr().print(
                f"{moved.where}: {moved.size} bytes written to {escape(str(output))} (sha256 {moved.sha256})",
                highlight=False,
            )
    # A tool with structured content usually also returns it as text (MCPServer does): show
    # it as JSON only when there is no text, and --json always carries it.
    if result.structured_content is not None and not result.text:
        console.print_json(json.dumps(result.structured_content, ensure_ascii=False))
    err = stderr()
    if result.is_error:
        err.print("[bold red]error:[/] the tool reported an error (exit 1)", highlight=False)
    if err.is_terminal:
        retried = f", {result.attempts} attempts" if result.attempts > 1 else ""
        replayed = ", replayed from the server's dedup store" if result.duplicate else ""
        err.print(
            f"[dim]{result.outcome.value} in {result.elapsed_s * 1000:.0f} ms{retried}{replayed}; "
            f"idempotency key {escape(result.idempotency_key)}[/]",
            highlight=False,
        )


def _report_error(error: RMCPError, code: ExitCode) -> None:
    err = stderr()
    err.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False)
    if isinstance(error, RMCPTransferError) and error.result is not None:
        err.print(
            "The tool ran; only its payload is missing. Fetch it without running the tool again: "
            f"--idempotency-key {escape(error.idempotency_key or '')}",
            highlight=False,
        )
    elif code is ExitCode.OUTCOME_UNKNOWN:
        err.print(
            "The tool may have run. Check its effect before calling again; against an RMCP "
            "server, calling again with the same key replays the first run instead of running "
            f"it twice: --idempotency-key {escape(error.idempotency_key or '')}",
            highlight=False,
        )


@app.command()
def call(
    ctx: typer.Context,
    server: Annotated[str, typer.Argument(help="The server's name, as in the config.", show_default=False)],
    tool: Annotated[str, typer.Argument(help="The tool's name, as the server lists it.", show_default=False)],
    args: Annotated[
        str,
        typer.Option("--args", "-a", help="The tool's arguments: a JSON object, or - to read it from stdin."),
    ] = "{}",
    idempotency_key: Annotated[
        str | None,
        typer.Option(
            "--idempotency-key",
            "-k",
            help="The key every attempt carries (default: a fresh one). Reuse it to repeat the same call "
            "safely against an RMCP server.",
            show_default=False,
        ),
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option(
            "--timeout",
            "-t",
            help="Seconds for the whole call, retries included (default: the tool's timeout_s).",
            show_default=False,
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Write the payloads of large result items (moved in chunks by a server advertising "
            "'transfer') to FILE instead of holding them in memory and printing them.",
            show_default=False,
            dir_okay=False,
        ),
    ] = None,
    as_json: AsJson = False,
) -> None:
    """Call a tool reliably and print its result; the exit code says what happened.

    Exit codes: 0 succeeded, 1 the tool reported an error, 2 outcome unknown (the tool may
    have run), 3 usage or config error, 4 refused or not sent (nothing ran).

    Example: [bold]rmcp call time get_current_time --args '{"timezone": "UTC"}'[/]

    Example: [bold]rmcp call orders create_order -a '{"item": "book"}' -k order-42 --json[/]

    Example: [bold]rmcp call files export -a '{"table": "logs"}' -o logs.csv[/]
    """
    config = load_config(ctx, as_json=as_json)
    require_server(config, server, as_json=as_json)
    arguments = parse_arguments(args, as_json=as_json)

    async def perform() -> CallResult | RMCPError:
        async with connect(config, [server]) as connected:
            error = connected.failures.get(server)
            if error is not None:
                return error
            with _transfer_bar() as on_transfer_progress:
                try:
                    return await connected.supervisor.call(
                        server,
                        tool,
                        arguments,
                        idempotency_key=idempotency_key,
                        timeout=timeout,
                        result_sink=output,
                        on_transfer_progress=on_transfer_progress,
                    )
                except RMCPError as error:
                    return error

    outcome = run(perform, interrupted=lambda: "(the tool may have run if the request was already sent)")
    if isinstance(outcome, CallResult):
        code = result_exit_code(outcome)
        if as_json:
            print_json(call_record(outcome))
        else:
            _report_result(outcome, output)
    else:
        code = error_exit_code(outcome)
        if as_json:
            print_json(error_record(outcome))
        _report_error(outcome, code)
    raise typer.Exit(int(code))
