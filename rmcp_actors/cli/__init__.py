"""The ``rmcp`` command line (``rmcp``, or ``python -m rmcp_actors``); needs the ``cli`` extra.

Exit codes, the same for every subcommand (:class:`ExitCode`): 0 succeeded, 1 tool error,
2 outcome unknown, 3 usage or config error, 4 refused or not sent.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["main"]

_CLI_PACKAGES = frozenset({"typer", "click", "rich"})
_USAGE_EXIT = 3
_CLICK_USAGE_EXIT = 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``rmcp`` with ``argv`` (default ``sys.argv[1:]``) and return its exit code.

    Click's usage errors would exit 2, which ``rmcp`` reserves for "outcome unknown": they are
    caught here and exit 3 instead.
    """
    try:
        import typer.main
        from typer.rich_utils import rich_format_error

        from ._app import ExitCode
        from ._commands import app
    except ModuleNotFoundError as exc:
        if exc.name not in _CLI_PACKAGES:
            raise
        print(
            f"rmcp needs the 'cli' extra ({exc.name} is missing): pip install 'rmcp-actors[cli]'",
            file=sys.stderr,
        )
        return _USAGE_EXIT
    command = typer.main.get_command(app)
    try:
        code = command.main(list(argv) if argv is not None else None, prog_name="rmcp", standalone_mode=False)
    except typer.Abort:
        print("Aborted.", file=sys.stderr)
        return 130
    except typer.TyperException as exc:
        # Click's errors (Typer vendors Click): usage errors carry exit code 2.
        rich_format_error(exc)  # pyright: ignore[reportArgumentType]
        code = getattr(exc, "exit_code", 1)
        return int(ExitCode.USAGE) if code == _CLICK_USAGE_EXIT else code
    return code if isinstance(code, int) else 0
