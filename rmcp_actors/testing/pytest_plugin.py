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

The option ``--rmcp-fault-seed N`` seeds the plans of tests that do not pin a seed, to explore
other faults or replay a run's.

The plugin imports rmcp_actors (and the MCP SDK) only when a test asks for a fixture, so that
installing rmcp-actors does not slow down the start of unrelated test suites.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from ..config import ServerSpec
    from .faults import FaultInjector, FaultPlan

__all__ = ["fault_injector", "fault_plan", "faulty_spec"]

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
    from .faults import FaultPlan

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
    from .faults import FaultInjector

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
