# pyright: strict
"""pytest plugin: fault injection fixtures for tests of code that calls MCP servers.

pytest loads it by itself wherever rmcp-actors is installed (the ``pytest11`` entry point
``rmcp_actors``, the module ``_rmcp_actors_pytestplugin``, which imports this package only when
a test uses one of its fixtures); ``-p no:rmcp_actors`` turns it off. Fixtures:

- ``fault_plan``: the test's :class:`~rmcp_actors.testing.FaultPlan`. No faults unless the test
  says so with ``@pytest.mark.rmcp_faults("drop_response=0.2", seed=3)`` (the syntax of
  ``rmcp chaos --faults``) or overrides the fixture.
- ``fault_injector``: a :class:`~rmcp_actors.testing.FaultInjector` applying ``fault_plan``; a
  test that used it gets an ``rmcp faults`` section in its report (the plan, the seed, the
  counts per kind), and its counts as the ``rmcp_faults`` user property (JUnit XML).
- ``faulty_spec``: ``faulty_spec(spec)`` is ``spec`` with the injector's faults on every
  connection rmcp_actors makes to it.
- ``chaos_server``: a :class:`ChaosServer`, the chaos MCP server
  (``rmcp_actors.testing.chaos_server``) in memory, serving RMCP on a SQLite store, with its
  side-effect ledger; ``chaos_server_stdio``: the same as a subprocess over stdio.

The option ``--rmcp-fault-seed N`` seeds the plans of tests that do not pin a seed, to explore
other faults or replay a run's.

This module holds what the fixtures build: :class:`ChaosServer`, :func:`open_chaos_server` and
:func:`open_chaos_server_stdio`.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, contextmanager
from pathlib import Path
from typing import Any, final

import attrs
import trio
from mcp.client._memory import InMemoryTransport
from mcp.client.stdio import StdioServerParameters
from mcp.server.mcpserver import MCPServer

from ..client._stdio import stdio_client
from ..config import ServerSpec
from ..stores import SQLiteStore
from ._chaos_server import Ledger, build_chaos_server
from ._fault_streams import TransportStreams
from .chaos import CHAOS_POLICY, chaos_server_command, chaos_server_environment

__all__ = ["ChaosServer", "open_chaos_server", "open_chaos_server_stdio"]


@final
@attrs.frozen
class ChaosServer:
    """A test's chaos server (fixtures ``chaos_server`` and ``chaos_server_stdio``).

    The server's tools are those of ``python -m rmcp_actors.testing.chaos_server`` (``effect``,
    ``ledger``, ``fail``, ``hang``, ``slow``, ``limited``, ``large``, ``peak_concurrency``); it
    serves RMCP on a SQLite store in the test's ``tmp_path``, so a keyed call retried after a
    lost answer or a restart is replayed, not run again.

    Attributes:
        spec: A ``ServerSpec`` named ``"chaos"`` that reaches it, with
            :data:`~rmcp_actors.testing.CHAOS_POLICY` (retries until the call's deadline, no
            circuit breaker); pass it through ``faulty_spec`` to add faults.
        ledger: Its side-effect ledger: ``ledger.counts()`` runs per label, ``ledger.total()``.
        server: The ``MCPServer`` object (in memory); None over stdio.
        command: The server's command line (stdio); empty in memory.
    """

    spec: ServerSpec
    ledger: Ledger
    server: MCPServer[Any] | None = None
    command: Sequence[str] = ()

    def transport(self) -> AbstractAsyncContextManager[TransportStreams]:
        """A new transport to the server, for a raw ``mcp.Client`` (wrap it with
        ``fault_injector.wrap`` for faults): ``InMemoryTransport`` in memory, the stdio client
        (which ``kill`` can reach) over stdio."""
        if self.server is not None:
            return InMemoryTransport(self.server)
        command, *args = self.command
        return stdio_client(StdioServerParameters(command=command, args=args, env=chaos_server_environment()))


@contextmanager
def open_chaos_server(directory: Path) -> Generator[ChaosServer]:
    """The chaos server in memory (the ``chaos_server`` fixture), serving RMCP on a SQLite store
    in ``directory``, with its ledger there too.

    Leaving it closes the store, in an event loop of its own in a thread of its own: the test's
    event loop may still run in this thread (anyio's runner keeps it for wider-scoped async
    fixtures), and the store is idle once the test is over.
    """
    # The store outlives each connection (an in-memory server's lifespan is one connection), so
    # the server does not close it: this does. Left to the garbage collector, its connections
    # (five descriptors) stayed open for as long as anything held the server, and held the files
    # of tmp_path open.
    store = SQLiteStore(directory / "chaos-store.sqlite")
    try:
        with Ledger(directory / "chaos-ledger.sqlite") as ledger:
            server = build_chaos_server(ledger, store)
            spec = ServerSpec.in_memory("chaos", server, overrides=CHAOS_POLICY)
            yield ChaosServer(spec=spec, ledger=ledger, server=server)
    finally:
        with ThreadPoolExecutor(max_workers=1) as thread:
            thread.submit(trio.run, store.aclose).result()


@contextmanager
def open_chaos_server_stdio(directory: Path) -> Generator[ChaosServer]:
    """The chaos server as a subprocess over stdio (the ``chaos_server_stdio`` fixture), serving
    RMCP on a SQLite store in ``directory`` that survives its restarts."""
    ledger_path = directory / "chaos-ledger.sqlite"
    command = chaos_server_command(ledger_path, directory / "chaos-store.sqlite")
    spec = ServerSpec.stdio(
        "chaos", command[0], command[1:], env=chaos_server_environment(), overrides=CHAOS_POLICY
    )
    with Ledger(ledger_path) as ledger:
        yield ChaosServer(spec=spec, ledger=ledger, command=tuple(command))
