# pyright: strict
"""pytest plugin: fault injection fixtures for tests of code that calls MCP servers.

pytest loads it by itself wherever rmcp-actors is installed (the ``pytest11`` entry point
``rmcp_actors``); ``-p no:rmcp_actors`` turns it off. Fixtures:

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

Loading the plugin imports rmcp_actors (and the MCP SDK), as any module of the package does; a
suite that does not use it can skip that with ``-p no:rmcp_actors``.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, final

import attrs
import pytest
from mcp.client._memory import InMemoryTransport
from mcp.client.stdio import StdioServerParameters
from mcp.server.mcpserver import MCPServer

from ..client._stdio import stdio_client
from ..config import ServerSpec
from ..stores import SQLiteStore
from ._chaos_server import Ledger, build_chaos_server
from ._fault_streams import TransportStreams
from .chaos import CHAOS_POLICY, chaos_server_command, chaos_server_environment
from .faults import FaultInjector, FaultPlan

__all__ = [
    "ChaosServer",
    "chaos_server",
    "chaos_server_stdio",
    "fault_injector",
    "fault_plan",
    "faulty_spec",
]

_INJECTOR = pytest.StashKey["FaultInjector"]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("rmcp", "rmcp_actors fault injection")
    group.addoption(
        "--rmcp-fault-seed",
        type=int,
        default=None,
        metavar="SEED",
        help="seed of the fault_plan fixture for tests that do not pin one (default 0)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "rmcp_faults(faults='', *, seed=None, **options): the test's fault_plan, in the syntax of "
        "`rmcp chaos --faults` (e.g. rmcp_faults('drop_response=0.2,disconnect=0.05', seed=3)); "
        "options are other FaultPlan attributes (methods, delay_s, silent)",
    )


@pytest.fixture
def fault_plan(request: pytest.FixtureRequest) -> FaultPlan:
    """The test's fault plan: from its ``rmcp_faults`` marker, else no faults.

    The seed is the marker's ``seed``, else ``--rmcp-fault-seed``, else 0.
    """
    option: int | None = request.config.getoption("--rmcp-fault-seed")
    default_seed = 0 if option is None else option
    marker = request.node.get_closest_marker("rmcp_faults")
    if marker is None:
        return FaultPlan(seed=default_seed)
    if len(marker.args) > 1 or (marker.args and not isinstance(marker.args[0], str)):
        raise TypeError(
            f"rmcp_faults takes one string of faults such as 'drop_response=0.2', got {marker.args!r}"
        )
    options: dict[str, Any] = dict(marker.kwargs)
    seed = options.pop("seed", None)
    faults: str = marker.args[0] if marker.args else ""
    return FaultPlan.parse(faults, seed=default_seed if seed is None else seed, **options)


@pytest.fixture
def fault_injector(request: pytest.FixtureRequest, fault_plan: FaultPlan) -> Iterator[FaultInjector]:
    """A fault injector applying ``fault_plan``; its counts go to the test's report."""
    injector = FaultInjector(fault_plan)
    request.node.stash[_INJECTOR] = injector
    yield injector
    request.node.user_properties.append(("rmcp_faults", dict(injector.counts)))


@pytest.fixture
def faulty_spec(fault_injector: FaultInjector) -> Callable[[ServerSpec], ServerSpec]:
    """``faulty_spec(spec)``: the server spec with ``fault_injector`` on every connection."""
    return fault_injector.spec


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    report = yield
    injector = item.stash.get(_INJECTOR, None)
    if injector is not None and call.when == "call":
        # In the call's report, the one shown with a failure (and with -rP for a pass).
        report.sections.append(("rmcp faults", injector.summary()))
    return report


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


@pytest.fixture
def chaos_server(tmp_path: Path) -> Iterator[ChaosServer]:
    """The chaos server in memory, serving RMCP on a SQLite store in ``tmp_path``."""
    # The store outlives each connection (an in-memory server's lifespan is one connection).
    # Left to the garbage collector: closing it needs the event loop, gone at teardown, and
    # it is idle by then.
    store = SQLiteStore(tmp_path / "chaos-store.sqlite")
    with Ledger(tmp_path / "chaos-ledger.sqlite") as ledger:
        server = build_chaos_server(ledger, store)
        spec = ServerSpec.in_memory("chaos", server, overrides=CHAOS_POLICY)
        yield ChaosServer(spec=spec, ledger=ledger, server=server)


@pytest.fixture
def chaos_server_stdio(tmp_path: Path) -> Iterator[ChaosServer]:
    """The chaos server as a subprocess over stdio (``python -m
    rmcp_actors.testing.chaos_server``), serving RMCP on a SQLite store in ``tmp_path`` that
    survives its restarts (so ``kill`` faults are replayed, not run twice)."""
    ledger_path = tmp_path / "chaos-ledger.sqlite"
    command = chaos_server_command(ledger_path, tmp_path / "chaos-store.sqlite")
    spec = ServerSpec.stdio(
        "chaos", command[0], command[1:], env=chaos_server_environment(), overrides=CHAOS_POLICY
    )
    with Ledger(ledger_path) as ledger:
        yield ChaosServer(spec=spec, ledger=ledger, command=tuple(command))
