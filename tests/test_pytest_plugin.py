"""The pytest plugin (_rmcp_actors_pytestplugin, rmcp_actors.testing.pytest_plugin), run on test
files of its own with pytester, as a user's suite would run it."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import trio

from rmcp_actors import RMCPSupervisor
from rmcp_actors.testing.pytest_plugin import ChaosServer, open_chaos_server

pytest_plugins = ["pytester"]

PLUGIN = "_rmcp_actors_pytestplugin"

# A user's test module: a real in-memory MCP server with a side effect, called through rmcp_actors.
SERVER = """
import pytest
from mcp.server.mcpserver import MCPServer

from rmcp_actors import RMCPSupervisor, ServerSpec

LEDGER = []


def build():
    app = MCPServer("users-server")

    @app.tool()
    async def record(label: str) -> str:
        LEDGER.append(label)
        return label

    return app
"""


def installed() -> bool:
    """Whether pytest loads the plugin by itself (rmcp-actors installed with its entry point)."""
    return any(entry.value == PLUGIN for entry in importlib.metadata.entry_points(group="pytest11"))


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    pytester.makeini("[pytest]\ntrio_mode = true\naddopts = --strict-markers\n")
    plugin = [] if installed() else ["-p", PLUGIN]
    return pytester.runpytest_inprocess(*plugin, "-p", "no:cacheprovider", *args)


def test_the_entry_point_names_the_plugin_module() -> None:
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert pyproject["project"]["entry-points"]["pytest11"] == {"rmcp_actors": PLUGIN}


def test_loading_the_plugin_imports_neither_rmcp_actors_nor_the_sdk() -> None:
    # pytest loads the entry point in every run of every suite of an environment that has
    # rmcp-actors installed: a run that uses no fixture of it must not pay for the SDK's import
    # (seconds), only for the plugin's hooks.
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    module = pyproject["project"]["entry-points"]["pytest11"]["rmcp_actors"]
    probe = (
        f"import sys, {module}; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('rmcp_actors', 'mcp', 'trio')))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    ).stdout.strip()
    assert loaded == "[]"


def test_without_a_marker_the_plan_has_no_faults_and_the_option_seeds_it(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        def test_plan(fault_plan, pytestconfig):
            assert not fault_plan.active
            assert fault_plan.seed == (pytestconfig.getoption("--rmcp-fault-seed") or 0)
        """
    )
    run(pytester).assert_outcomes(passed=1)
    run(pytester, "--rmcp-fault-seed=42").assert_outcomes(passed=1)


def test_the_marker_sets_the_plan_and_a_pinned_seed_wins(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.rmcp_faults("drop_response=0.2,disconnect=0.05", seed=3, silent=True)
        def test_pinned(fault_plan):
            assert (fault_plan.drop_response, fault_plan.disconnect) == (0.2, 0.05)
            assert fault_plan.seed == 3
            assert fault_plan.silent

        @pytest.mark.rmcp_faults("duplicate=1")
        def test_seeded_by_the_option(fault_plan):
            assert (fault_plan.duplicate, fault_plan.seed) == (1.0, 9)
        """
    )
    run(pytester, "--rmcp-fault-seed=9").assert_outcomes(passed=2)


def test_an_unknown_kind_in_the_marker_is_an_error_listing_the_kinds(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.rmcp_faults("lose=0.5")
        def test_typo(fault_plan):
            pass
        """
    )
    result = run(pytester)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*unknown fault kind 'lose'; the kinds are drop_request, drop_response*"])


def test_the_option_is_in_the_help(pytester: pytest.Pytester) -> None:
    run(pytester, "--help").stdout.fnmatch_lines(["*--rmcp-fault-seed=SEED*"])
    run(pytester, "--markers").stdout.fnmatch_lines(["@pytest.mark.rmcp_faults(faults=*"])


def test_faulty_spec_injects_into_rmcp_and_the_report_shows_the_counts(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        SERVER
        + """
@pytest.mark.rmcp_faults("duplicate=1", seed=5)
async def test_duplicates(faulty_spec, fault_injector):
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(faulty_spec(ServerSpec.in_memory("users", build())))
        for index in range(3):
            await sup.call("users", "record", {"label": f"r{index}"})
    assert fault_injector.counts["duplicate"] == 3
    assert LEDGER == ["r0", "r0", "r1", "r1", "r2", "r2"]  # a plain server runs duplicates twice
    assert False, "show the report"
"""
    )
    result = run(pytester, "--junitxml=report.xml")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*- rmcp faults -*",
            "faults duplicate=1 (seed 5) over 1 connection(s): drop_request 0, drop_response 0, "
            "delay 0, duplicate 3, disconnect 0, corrupt 0, kill 0, corrupt_chunk 0",
        ]
    )
    report = (pytester.path / "report.xml").read_text()
    assert 'name="rmcp_faults"' in report
    assert "'duplicate': 3" in report


def test_a_passing_test_shows_the_section_with_rP_and_a_test_without_faults_none(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        SERVER
        + """
async def test_plain(faulty_spec, fault_injector):
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(faulty_spec(ServerSpec.in_memory("users", build())))
        await sup.call("users", "record", {"label": "once"})
    assert sum(fault_injector.counts.values()) == 0


def test_without_the_fixture():
    pass
"""
    )
    result = run(pytester, "-rP")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*- rmcp faults -*", "faults none (seed 0) over 1 connection(s): *"])
    assert result.stdout.str().count("rmcp faults") == 1


def test_chaos_server_in_memory_runs_each_call_once_under_faults(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest
        from mcp import Client

        from rmcp_actors import RMCPSupervisor

        @pytest.mark.rmcp_faults("drop_response=0.3,disconnect=0.1", seed=2)
        async def test_exactly_once(chaos_server, faulty_spec, fault_injector):
            async with RMCPSupervisor.open() as sup:
                await sup.add_server(faulty_spec(chaos_server.spec))
                for index in range(20):
                    await sup.call("chaos", "effect", {"label": f"e{index}"}, timeout=30)
            assert chaos_server.ledger.counts() == {f"e{index}": 1 for index in range(20)}
            assert fault_injector.counts["drop_response"] > 0

        async def test_a_raw_client(chaos_server):
            async with Client(chaos_server.transport()) as client:
                await client.call_tool("effect", {"label": "raw"})
            assert chaos_server.ledger.total() == 1
        """
    )
    run(pytester).assert_outcomes(passed=2)


def test_chaos_server_over_stdio_survives_kills(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest
        from mcp import Client

        from rmcp_actors import RMCPSupervisor

        @pytest.mark.rmcp_faults("kill=0.4", seed=1)
        async def test_killed(chaos_server_stdio, faulty_spec, fault_injector):
            async with RMCPSupervisor.open() as sup:
                await sup.add_server(faulty_spec(chaos_server_stdio.spec))
                for index in range(4):
                    await sup.call("chaos", "effect", {"label": f"k{index}"}, timeout=60)
            assert chaos_server_stdio.ledger.counts() == {f"k{index}": 1 for index in range(4)}
            assert fault_injector.counts["kill"] > 0

        async def test_a_raw_client(chaos_server_stdio, fault_injector):
            async with Client(fault_injector.wrap(chaos_server_stdio.transport())) as client:
                await client.call_tool("effect", {"label": "raw"})
            assert chaos_server_stdio.ledger.total() == 1
        """
    )
    run(pytester).assert_outcomes(passed=2)


def _open_descriptors(path: Path) -> int:
    """How many of this process's file descriptors are open on ``path`` (or its -wal, -shm)."""
    names = {str(path), f"{path}-wal", f"{path}-shm"}
    descriptors = Path("/proc/self/fd")
    count = 0
    for descriptor in descriptors.iterdir():
        with contextlib.suppress(OSError):  # closed meanwhile (the listing's own descriptor)
            count += os.readlink(descriptor) in names
    return count


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")
def test_the_in_memory_chaos_server_closes_its_store_at_teardown(tmp_path: Path) -> None:
    async def use(server: ChaosServer) -> None:
        async with RMCPSupervisor.open() as sup:
            await sup.add_server(server.spec)
            await sup.call("chaos", "effect", {"label": "once"}, timeout=30)

    store = tmp_path / "chaos-store.sqlite"
    with open_chaos_server(tmp_path) as server:
        trio.run(use, server)
        assert _open_descriptors(store) > 0
        assert server.ledger.counts() == {"once": 1}
    assert _open_descriptors(store) == 0


def test_chaos_server_teardown_while_the_tests_event_loop_still_runs(pytester: pytest.Pytester) -> None:
    # anyio's pytest runner keeps its event loop (trio here) open as long as an async fixture of
    # a wider scope lives: the chaos_server fixture's teardown runs inside that loop's thread.
    pytester.makeini("[pytest]\n")
    pytester.makepyfile(
        """
        import pytest
        from rmcp_actors import RMCPSupervisor

        @pytest.fixture(scope="module")
        def anyio_backend():
            return "trio"

        @pytest.fixture(scope="module")
        async def long_lived():
            yield

        @pytest.mark.anyio
        async def test_a_call(long_lived, chaos_server):
            async with RMCPSupervisor.open() as sup:
                await sup.add_server(chaos_server.spec)
                await sup.call("chaos", "effect", {"label": "a"}, timeout=30)
            assert chaos_server.ledger.total() == 1

        @pytest.mark.anyio
        async def test_a_new_server(long_lived, chaos_server):
            assert chaos_server.ledger.total() == 0
        """
    )
    plugin = [] if installed() else ["-p", PLUGIN]
    result = pytester.runpytest_inprocess(*plugin, "-p", "no:trio", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
