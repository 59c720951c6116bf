"""``ServerCallbacks`` and ``on_progress`` against server-everything (npm) over stdio.

server-everything lists its sampling, elicitation and roots tools only to a client that
advertises those capabilities, and registers them after the handshake, announcing them with
``notifications/tools/list_changed``: the cache refresh on that notification is what makes them
callable.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import _npm
import mcp_types as types
import pytest
import trio

from rmcp_actors import RMCPSupervisor, ServerCallbacks, ServerSpec

pytestmark = pytest.mark.reference

CAPABILITY_TOOLS = {"trigger-sampling-request", "trigger-elicitation-request", "get-roots-list"}


def everything(callbacks: ServerCallbacks | None) -> ServerSpec:
    node = shutil.which("node")
    assert node is not None, "node is not on PATH; server-everything needs it"
    node_modules = _npm.npm_install(_npm.SERVER_EVERYTHING, _npm.SERVER_FILESYSTEM, _npm.SERVER_MEMORY)
    script = _npm.package_dir(node_modules, "@modelcontextprotocol/server-everything") / "dist" / "index.js"
    return ServerSpec.stdio("everything", node, [str(script), "stdio"], callbacks=callbacks)


async def model(params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
    del params
    return types.CreateMessageResult(
        role="assistant", content=types.TextContent(type="text", text="stub model answer"), model="stub"
    )


async def name_only(params: types.ElicitRequestParams) -> types.ElicitResult:
    del params
    return types.ElicitResult(action="accept", content={"name": "Zed"})


async def wait_for_tools(sup: RMCPSupervisor, names: set[str]) -> set[str]:
    with trio.fail_after(10):
        while True:
            listed = {tool.name for tool in await sup.list_tools("everything")}
            if names <= listed:
                return listed
            await trio.sleep(0.05)


async def test_without_callbacks_the_capability_tools_are_not_listed() -> None:
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(everything(None))
        await trio.sleep(0.5)  # room for a late list change, which must not bring them
        listed = {tool.name for tool in await sup.list_tools("everything")}
    assert "echo" in listed
    assert not listed & CAPABILITY_TOOLS


async def test_sampling_elicitation_and_roots_with_callbacks(caplog: pytest.LogCaptureFixture) -> None:
    logs: list[types.LoggingMessageNotificationParams] = []
    changes: list[Mapping[str, types.Tool]] = []

    async def on_log(params: types.LoggingMessageNotificationParams) -> None:
        logs.append(params)

    async def on_tools_changed(tools: Mapping[str, types.Tool]) -> None:
        changes.append(tools)

    callbacks = ServerCallbacks(
        sampling=model,
        elicitation=name_only,
        roots=["file:///srv/project"],
        on_log=on_log,
        on_tools_changed=on_tools_changed,
    )
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(everything(callbacks))
        await wait_for_tools(sup, CAPABILITY_TOOLS)
        sampled = await sup.call("everything", "trigger-sampling-request", {"prompt": "hi"})
        elicited = await sup.call("everything", "trigger-elicitation-request", {})
        roots = await sup.call("everything", "get-roots-list", {})
        with trio.fail_after(5):
            while not any("Roots updated" in str(m.data) for m in logs):
                await trio.sleep(0.05)
    assert "stub model answer" in sampled.content[0].text  # type: ignore[union-attr]
    elicited_text = "\n".join(c.text for c in elicited.content if isinstance(c, types.TextContent))
    # The answer named only "name": the schema's defaults filled in the rest.
    assert '"name": "Zed"' in elicited_text
    assert '"integer": 42' in elicited_text
    assert '"firstLine": "It was a dark and stormy night."' in elicited_text
    assert "file:///srv/project" in roots.content[0].text  # type: ignore[union-attr]
    assert changes
    assert set(changes[-1]) >= CAPABILITY_TOOLS
    assert not [r for r in caplog.records if r.name == "rmcp_actors" and r.levelno >= logging.WARNING]


async def test_progress_of_a_long_running_operation() -> None:
    received: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        received.append((progress, total, message))

    async with RMCPSupervisor.open() as sup:
        await sup.add_server(everything(None))
        result = await sup.call(
            "everything",
            "trigger-long-running-operation",
            {"duration": 1, "steps": 4},
            on_progress=on_progress,
        )
    assert "completed" in result.content[0].text  # type: ignore[union-attr]
    assert [(p, t) for p, t, _ in received] == [(1, 4), (2, 4), (3, 4), (4, 4)]


# The client `make conformance` runs (conformance/client.py), which dispatches on the scenario
# the suite names in MCP_CONFORMANCE_SCENARIO.
CONFORMANCE_CLIENT = Path(__file__).resolve().parents[1] / "conformance" / "client.py"


def test_conformance_elicitation_defaults_scenario(tmp_path: Path) -> None:
    """The official suite's elicitation scenario (SEP-1034 defaults) against an rmcp_actors
    client; its server binds every interface, so it runs in a loopback-only namespace."""
    node_modules = _npm.npm_install(_npm.CONFORMANCE)
    suite = _npm.package_dir(node_modules, "@modelcontextprotocol/conformance") / "dist" / "index.js"
    client = f"{shlex.quote(sys.executable)} {shlex.quote(str(CONFORMANCE_CLIENT))}"
    completed = subprocess.run(
        [
            "unshare",
            "-rn",
            "sh",
            "-c",
            'ip link set lo up && exec "$@"',
            "netns",
            str(_npm.node22()),
            str(suite),
            "client",
            "--command",
            client,
            "--scenario",
            "elicitation-sep1034-client-defaults",
            "-o",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        check=False,
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output
    assert "Passed: 5/5, 0 failed" in output, output


async def test_roots_changed_makes_the_server_ask_again() -> None:
    # server-everything asks for the roots once at connect, then only after
    # notifications/roots/list_changed.
    current = ["file:///srv/one"]

    async def provide() -> list[str]:
        return list(current)

    async with RMCPSupervisor.open() as sup:
        await sup.add_server(everything(ServerCallbacks(roots=provide)))
        await wait_for_tools(sup, {"get-roots-list"})
        before = await sup.call("everything", "get-roots-list", {})
        current.append("file:///srv/two")
        assert await sup.roots_changed("everything")
        with trio.fail_after(10):
            while True:
                after = await sup.call("everything", "get-roots-list", {})
                if "file:///srv/two" in after.content[0].text:  # type: ignore[union-attr]
                    break
                await trio.sleep(0.05)
    assert "file:///srv/two" not in before.content[0].text  # type: ignore[union-attr]
