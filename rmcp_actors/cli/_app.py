"""The ``rmcp`` Typer application, its exit codes and what every subcommand shares.

Each subcommand lives in its own module of this package and registers itself on :data:`app`
with ``@app.command()``; ``rmcp_actors.cli`` imports them all.
"""

from __future__ import annotations

import enum
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import attrs
import typer
from rich.console import Console
from rich.markup import escape

from ..config import RMCPConfig
from ..errors import RMCPConfigError

__all__ = [
    "DEFAULT_CONFIG",
    "OUTCOME_NAMES",
    "AsJson",
    "CliState",
    "ExitCode",
    "app",
    "fail",
    "load_config",
    "print_json",
    "stderr",
    "stdout",
]

DEFAULT_CONFIG = Path("rmcp.toml")


class ExitCode(enum.IntEnum):
    """What ``rmcp`` returns to the shell: the same codes for every subcommand."""

    SUCCEEDED = 0
    TOOL_ERROR = 1
    OUTCOME_UNKNOWN = 2
    USAGE = 3
    REFUSED = 4


#: The ``outcome`` member of ``--json`` output for each exit code: one name per code, so that a
#: script reading the JSON and one reading the exit code agree.
OUTCOME_NAMES: dict[ExitCode, str] = {
    ExitCode.SUCCEEDED: "succeeded",
    ExitCode.TOOL_ERROR: "tool_error",
    ExitCode.OUTCOME_UNKNOWN: "unknown",
    ExitCode.USAGE: "usage_error",
    ExitCode.REFUSED: "refused",
}


#: The ``--json`` flag every subcommand has: one JSON object on stdout instead of tables.
AsJson = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout (see docs/cli.md).")]


@attrs.frozen
class CliState:
    """Options given before the subcommand, kept on the Click context's ``obj``."""

    config_path: Path
    config_from_default: bool


app = typer.Typer(
    name="rmcp",
    help="Reliable MCP: check a config, look at servers, call tools, run chaos and benchmarks.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _options(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            envvar="RMCP_CONFIG",
            help="The TOML config to read (default: rmcp.toml in the current directory).",
            show_default=False,
        ),
    ] = None,
) -> None:
    ctx.obj = CliState(config_path=config or DEFAULT_CONFIG, config_from_default=config is None)


def stdout() -> Console:
    """Rich console on stdout: colours and live progress on a terminal, plain text otherwise."""
    return Console(soft_wrap=True)


def stderr() -> Console:
    """Rich console on stderr, for errors and progress that must not mix with results."""
    return Console(stderr=True, soft_wrap=True)


def print_json(value: object) -> None:
    """Write ``value`` as JSON on stdout: indented on a terminal, one line otherwise."""
    indent = 2 if sys.stdout.isatty() else None
    sys.stdout.write(json.dumps(value, indent=indent, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def fail(
    message: str,
    code: ExitCode = ExitCode.USAGE,
    *,
    as_json: bool = False,
    error_type: str = "UsageError",
    **details: Any,
) -> typer.Exit:
    """Print ``message`` as an error on stderr and return the ``typer.Exit`` to raise.

    With ``as_json`` (a subcommand's ``--json``), stdout gets the error too, as one object
    ``{"outcome", "exit_code", "error": {"type", "message", **details}}``, so that a script
    reading stdout never gets nothing.
    """
    stderr().print(f"[bold red]error:[/] {escape(message)}", highlight=False, markup=True)
    if as_json:
        error = {"type": error_type, "message": message, **details}
        print_json({"outcome": OUTCOME_NAMES[code], "exit_code": int(code), "error": error})
    return typer.Exit(int(code))


def load_config(ctx: typer.Context, *, as_json: bool = False) -> RMCPConfig:
    """The config named by ``--config`` / ``RMCP_CONFIG`` / ``rmcp.toml``, or exit with code 3.

    The error names the file and, for a bad value, the key path (``servers.a.retry.max_attempts``);
    with ``as_json`` it is printed on stdout as well (see :func:`fail`).
    """
    state = ctx.find_object(CliState)
    path = state.config_path if state is not None else DEFAULT_CONFIG
    if not path.is_file():
        defaulted = state is None or state.config_from_default
        hint = " (pass --config PATH or set RMCP_CONFIG)" if defaulted else ""
        raise fail(
            f"no config file at {str(path)!r}{hint}",
            as_json=as_json,
            error_type="RMCPConfigError",
            config=str(path),
        )
    try:
        return RMCPConfig.from_toml(path)
    except RMCPConfigError as exc:
        # The message names the file already ("... (in rmcp.toml)").
        raise fail(
            str(exc), as_json=as_json, error_type="RMCPConfigError", config=str(path), path=exc.path
        ) from None


@app.command()
def version() -> None:
    """Print the installed rmcp_actors version, the RMCP protocol version and the mcp SDK version.

    Example: [bold]rmcp version[/]
    """
    from importlib.metadata import version as installed

    from .._protocol import PROTOCOL_VERSION

    versions = f"RMCP {PROTOCOL_VERSION}, mcp {installed('mcp')}"
    stdout().print(f"rmcp_actors {installed('rmcp-actors')} ({versions})")
