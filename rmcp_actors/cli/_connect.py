"""Running a subcommand's async body, and connecting only the servers it needs.

``RMCPSupervisor.open(config)`` connects every configured server and fails if one cannot be
reached: right for a program, wrong for ``rmcp call a t`` (why wait for server ``b``?) and for
``rmcp servers`` (one unreachable server is a line of the report, not the end of it). Here the
runtime opens with the config's settings and no servers, then adds the servers asked for side
by side, each failure kept as that server's.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import TypeVar, cast

import attrs
import trio
import typer
from rich.markup import escape

from ..config import RMCPConfig
from ..errors import RMCPError
from ..root import RMCPSupervisor
from ._app import ExitCode, fail, stderr

__all__ = ["INTERRUPTED", "TERMINATED", "Connected", "connect", "require_server", "run", "without_journal"]

_T = TypeVar("_T")


#: The shell's exit code for a program ended by Ctrl-C (128 + SIGINT).
INTERRUPTED = 130
#: The shell's exit code for a program ended by SIGTERM (128 + SIGTERM).
TERMINATED = 143


def is_ctrl_c(error: BaseException) -> bool:
    """Whether Ctrl-C ended the run: Ctrl-C reaches the main task wherever it waits, and inside
    the SDK's task groups (the raw clients of rmcp bench, a handshake) it comes out wrapped in
    an exception group."""
    if isinstance(error, BaseExceptionGroup):
        group = cast("BaseExceptionGroup[BaseException]", error)
        return any(is_ctrl_c(inner) for inner in group.exceptions)
    return isinstance(error, KeyboardInterrupt)


def run(body: Callable[[], Awaitable[_T]], *, interrupted: Callable[[], str] = str) -> _T:
    """Run ``body`` on trio and return what it returns (the CLI's one event loop).

    Ctrl-C cancels ``body`` (its ``finally`` blocks and the runtime's shutdown run), prints
    what ``interrupted()`` says (what the user should know about the work cut short, as it
    stands then) and exits 130. SIGTERM does the same and exits 143.
    """
    terminated = False

    def stop_as_ctrl_c(signum: int, frame: object) -> None:
        # SIGTERM (kill, timeout, a service manager) would end the process at once and leave
        # its stdio servers running the tool: take Ctrl-C's path, which stops them.
        nonlocal terminated
        terminated = True
        if callable(signal.getsignal(signal.SIGINT)):
            signal.raise_signal(signal.SIGINT)
        else:  # SIGINT ignored (a shell's background job): nothing to take over; end as before
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.raise_signal(signal.SIGTERM)

    # Signal handlers can only be set from the main thread (main() may run in another).
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM)
    if in_main_thread:
        signal.signal(signal.SIGTERM, stop_as_ctrl_c)
    try:
        return trio.run(body)
    except BaseException as exc:
        if not is_ctrl_c(exc):
            raise
        word = "terminated" if terminated else "interrupted"
        stderr().print(f"[bold red]{word}[/] {escape(interrupted())}".rstrip(), highlight=False)
        raise typer.Exit(TERMINATED if terminated else INTERRUPTED) from None
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def require_server(config: RMCPConfig, name: str, *, as_json: bool = False) -> None:
    """Exit with code 3 and the configured servers' names if ``name`` is not one of them."""
    if name not in config.servers:
        known = ", ".join(sorted(config.servers)) or "none"
        raise fail(
            f"no server named {name!r} in the config (configured: {known})",
            ExitCode.USAGE,
            as_json=as_json,
            error_type="UnknownServerError",
        )


def without_journal(config: RMCPConfig) -> RMCPConfig:
    """``config`` for a command's runtime, which runs no transactions: it must not recover (run
    compensations of) another program's incomplete ones from the journal the config names,
    nor open that journal."""
    transactions = attrs.evolve(config.transactions, journal=None, recover_on_open=False)
    return attrs.evolve(config, transactions=transactions)


@attrs.frozen
class Connected:
    """A runtime with some of the configured servers added.

    Attributes:
        supervisor: The running runtime.
        failures: The servers that could not be added, with the error of each.
    """

    supervisor: RMCPSupervisor
    failures: dict[str, RMCPError]


@asynccontextmanager
async def connect(config: RMCPConfig, names: Iterable[str]) -> AsyncGenerator[Connected]:
    """Open a runtime on ``config`` and add the servers ``names``, side by side.

    A server that cannot be added (unreachable, refused credentials) is in ``failures``; the
    others are connected.
    """
    failures: dict[str, RMCPError] = {}
    runtime_only = attrs.evolve(without_journal(config), servers={})
    async with RMCPSupervisor.open(runtime_only) as supervisor:

        async def add(name: str) -> None:
            try:
                await supervisor.add_server(config.servers[name])
            except RMCPError as error:
                failures[name] = error

        async with trio.open_nursery() as nursery:
            for name in names:
                nursery.start_soon(add, name)
        yield Connected(supervisor, failures)
