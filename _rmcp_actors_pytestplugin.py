# pyright: strict
"""The pytest plugin of rmcp-actors (entry point ``rmcp_actors``); the user guide is
``rmcp_actors.testing.pytest_plugin`` and docs/testing.md.

pytest imports every ``pytest11`` plugin of the environment at the start of every run, and
importing any module of the ``rmcp_actors`` package runs its ``__init__`` (the MCP SDK
included: seconds). This module lives outside the package, as Hypothesis's
``_hypothesis_pytestplugin`` does, and imports rmcp_actors only inside the fixtures, so that a
run that uses none of them pays for the hooks alone.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from rmcp_actors import ServerSpec
    from rmcp_actors.testing import FaultInjector, FaultPlan
    from rmcp_actors.testing.pytest_plugin import ChaosServer

__all__ = ["chaos_server", "chaos_server_stdio", "fault_injector", "fault_plan", "faulty_spec"]

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
    from rmcp_actors.testing import FaultPlan

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
    from rmcp_actors.testing import FaultInjector

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


@pytest.fixture
def chaos_server(tmp_path: Path) -> Iterator[ChaosServer]:
    """The chaos server in memory, serving RMCP on a SQLite store in ``tmp_path``."""
    from rmcp_actors.testing.pytest_plugin import open_chaos_server

    with open_chaos_server(tmp_path) as server:
        yield server


@pytest.fixture
def chaos_server_stdio(tmp_path: Path) -> Iterator[ChaosServer]:
    """The chaos server as a subprocess over stdio (``python -m
    rmcp_actors.testing.chaos_server``), serving RMCP on a SQLite store in ``tmp_path`` that
    survives its restarts (so ``kill`` faults are replayed, not run twice)."""
    from rmcp_actors.testing.pytest_plugin import open_chaos_server_stdio

    with open_chaos_server_stdio(tmp_path) as server:
        yield server
