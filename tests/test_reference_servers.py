"""The reference-server matrix: MCP servers nobody on this project wrote, through the public API.

mcp-server-time, -fetch and -git (PyPI) and server-everything, -filesystem and -memory (npm, cached
by ``_npm.py``) over stdio, in both protocol modes; server-everything over Streamable HTTP inside a
loopback-only network namespace (``reference_http_netns.py``, see its docstring for why a
subprocess). For each: connect, list tools, a call that succeeds, bad arguments (every reference
server answers them with an ``isError`` result: outcome ``failed``), then SIGKILL of the server
process, and the connection reconnects by itself so that the next call succeeds.

These are in the default run: an npm install that fails fails the tests (CI must run them).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import _npm
import attrs
import pytest
import trio
from conftest import FAST_RECOVERY, process_gone

from rmcp_actors import CallResult, ConnectionState, Outcome, RMCPSupervisor, ServerSpec

pytestmark = pytest.mark.reference

BIN = Path(sys.executable).parent
NETNS_SCRIPT = Path(__file__).with_name("reference_http_netns.py")
PAGE_TEXT = "rmcp reference page: served on 127.0.0.1 for mcp-server-fetch"
ENTITY = "rmcp-reference-entity"
# A server restart is a process start (about 1 s for the Python servers on a busy 2-core box).
RECONNECT_DEADLINE_S = 30
# The Python servers speak the newest protocol; the Node ones (TypeScript SDK) stop at 2025-11-25.
MODERN, HANDSHAKE = "2026-07-28", "2025-11-25"


@attrs.frozen
class Workspace:
    """What a server of the matrix works on: a folder of its own and the local HTTP page."""

    folder: Path
    page_url: str


@attrs.frozen
class Step:
    """One tool call and what its result must show."""

    tool: str
    arguments: dict[str, Any]
    check: Callable[[CallResult, Workspace], None] = lambda _result, _workspace: None


@attrs.frozen
class Reference:
    """One reference server: how to start it and the calls that exercise it."""

    name: str
    command: Callable[[Workspace], list[str]]
    tools: frozenset[str]
    # Run once before the kill; ``probe`` runs before and after it (the state must survive).
    setup: tuple[Step, ...]
    probe: Step
    bad: Step
    auto_protocol: str
    env: Callable[[Workspace], dict[str, str]] | None = None


def _node_script(package: str) -> str:
    node_modules = _npm.npm_install(_npm.SERVER_EVERYTHING, _npm.SERVER_FILESYSTEM, _npm.SERVER_MEMORY)
    return str(_npm.package_dir(node_modules, f"@modelcontextprotocol/{package}") / "dist" / "index.js")


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("node is not on PATH; the npm reference servers need it (Node >= 18)")
    return node


def _in_text(*needles: str) -> Callable[[CallResult, Workspace], None]:
    def check(result: CallResult, _workspace: Workspace) -> None:
        for needle in needles:
            assert needle in result.text, result.text

    return check


def _utc_time(result: CallResult, _workspace: Workspace) -> None:
    assert result.structured_content is not None, result.text
    assert result.structured_content["timezone"] == "UTC"


def _git_repository(folder: Path) -> str:
    repository = folder / "repo"
    repository.mkdir(exist_ok=True)
    subprocess.run(["git", "init", "-q", "-b", "main", str(repository)], check=True)
    (repository / "tracked.txt").write_text("tracked\n")
    return str(repository)


REFERENCES = [
    Reference(
        name="time",
        command=lambda _ws: [str(BIN / "mcp-server-time"), "--local-timezone", "UTC"],
        tools=frozenset({"get_current_time", "convert_time"}),
        setup=(),
        probe=Step("get_current_time", {"timezone": "UTC"}, _utc_time),
        bad=Step("get_current_time", {"timezone": "Not/AZone"}),
        auto_protocol=MODERN,
    ),
    Reference(
        name="fetch",
        command=lambda _ws: [str(BIN / "mcp-server-fetch"), "--allow-private-ips", "--ignore-robots-txt"],
        tools=frozenset({"fetch"}),
        setup=(),
        probe=Step("fetch", {"url": "{page_url}", "max_length": 1000}, _in_text(PAGE_TEXT)),
        bad=Step("fetch", {"url": "not a url at all"}),
        auto_protocol=MODERN,
    ),
    Reference(
        name="git",
        command=lambda ws: [str(BIN / "mcp-server-git"), "--repository", _git_repository(ws.folder)],
        tools=frozenset({"git_status", "git_log", "git_add", "git_commit", "git_diff"}),
        setup=(),
        probe=Step("git_status", {"repo_path": "{folder}/repo"}, _in_text("On branch main", "tracked.txt")),
        bad=Step("git_status", {}),
        auto_protocol=MODERN,
    ),
    Reference(
        name="everything",
        command=lambda _ws: [_node(), _node_script("server-everything"), "stdio"],
        tools=frozenset({"echo", "get-sum", "trigger-long-running-operation"}),
        setup=(Step("echo", {"message": "hello"}, _in_text("hello")),),
        probe=Step("get-sum", {"a": 2, "b": 3}, _in_text("5")),
        bad=Step("get-sum", {"a": "two"}),
        auto_protocol=HANDSHAKE,
    ),
    Reference(
        name="filesystem",
        command=lambda ws: [_node(), _node_script("server-filesystem"), str(ws.folder)],
        tools=frozenset({"read_text_file", "write_file", "list_directory"}),
        setup=(Step("write_file", {"path": "{folder}/note.txt", "content": "kept across the kill"}),),
        probe=Step("read_text_file", {"path": "{folder}/note.txt"}, _in_text("kept across the kill")),
        bad=Step("read_text_file", {}),
        auto_protocol=HANDSHAKE,
    ),
    Reference(
        name="memory",
        command=lambda _ws: [_node(), _node_script("server-memory")],
        env=lambda ws: {"MEMORY_FILE_PATH": str(ws.folder / "memory.jsonl")},
        tools=frozenset({"create_entities", "read_graph", "open_nodes"}),
        setup=(
            Step(
                "create_entities",
                {"entities": [{"name": ENTITY, "entityType": "test", "observations": ["survives SIGKILL"]}]},
            ),
        ),
        probe=Step("open_nodes", {"names": [ENTITY]}, _in_text(ENTITY, "survives SIGKILL")),
        bad=Step("create_entities", {"entities": "not a list"}),
        auto_protocol=HANDSHAKE,
    ),
]


class _PageHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = PAGE_TEXT.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Keep the test output clean."""


@pytest.fixture(scope="module")
def page_url() -> Iterator[str]:
    """A plain-text page on 127.0.0.1 for mcp-server-fetch (hence its ``--allow-private-ips``)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _PageHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/page.txt"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _arguments(step: Step, workspace: Workspace) -> dict[str, Any]:
    """The step's arguments with ``{folder}`` and ``{page_url}`` filled in."""
    text = json.dumps(step.arguments)
    text = text.replace("{folder}", str(workspace.folder)).replace("{page_url}", workspace.page_url)
    return json.loads(text)


async def _run(sup: RMCPSupervisor, step: Step, workspace: Workspace) -> CallResult:
    result = await sup.call("ref", step.tool, _arguments(step, workspace), timeout=RECONNECT_DEADLINE_S)
    assert result.outcome is Outcome.SUCCEEDED, result.text
    step.check(result, workspace)
    return result


async def _wait_for_reconnect(sup: RMCPSupervisor, connects_before: int) -> None:
    with trio.fail_after(RECONNECT_DEADLINE_S):
        while True:
            (stats,) = sup.statistics().connections
            if stats.connects > connects_before and sup.servers()["ref"] is ConnectionState.READY:
                return
            await trio.sleep(0.02)


@pytest.mark.parametrize("mode", ["auto", "legacy"])
@pytest.mark.parametrize("reference", REFERENCES, ids=[reference.name for reference in REFERENCES])
async def test_reference_server_over_stdio(
    reference: Reference, mode: str, tmp_path: Path, page_url: str
) -> None:
    workspace = Workspace(folder=tmp_path, page_url=page_url)
    pidfile = tmp_path / "server.pid"
    # The shell writes its own pid and execs the server, so the file names the server process
    # (rewritten at every reconnect) for the SIGKILL below.
    spec = ServerSpec.stdio(
        "ref",
        "/bin/sh",
        ["-c", 'echo $$ > "$0"; exec "$@"', str(pidfile), *reference.command(workspace)],
        env=None if reference.env is None else reference.env(workspace),
        protocol=mode,
        overrides=FAST_RECOVERY,
    )
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(spec)
        listed = {tool.name for tool in await sup.list_tools("ref")}
        assert reference.tools <= listed
        (stats,) = sup.statistics().connections
        assert stats.protocol_version == (reference.auto_protocol if mode == "auto" else HANDSHAKE)

        for step in reference.setup:
            await _run(sup, step, workspace)
        await _run(sup, reference.probe, workspace)
        refused = await sup.call("ref", reference.bad.tool, _arguments(reference.bad, workspace))
        assert refused.outcome is Outcome.FAILED, refused.text

        pid = int(pidfile.read_text())
        os.kill(pid, signal.SIGKILL)
        await _wait_for_reconnect(sup, stats.connects)
        assert int(pidfile.read_text()) != pid
        assert process_gone(pid)
        await _run(sup, reference.probe, workspace)


def test_server_everything_over_http_in_a_network_namespace(tmp_path: Path) -> None:
    """server-everything binds every interface: it runs, with the client checks, in a netns."""
    script = _node_script("server-everything")
    report = tmp_path / "report.json"
    completed = subprocess.run(
        [
            "unshare",
            "-rn",
            "sh",
            "-c",
            'ip link set lo up && exec "$@"',
            "netns",
            sys.executable,
            str(NETNS_SCRIPT),
            _node(),
            script,
            str(report),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    results = json.loads(report.read_text())
    assert [result["mode"] for result in results] == ["auto", "legacy"]
    for result in results:
        assert result["protocol"] == HANDSHAKE
        assert {"echo", "get-sum"} <= set(result["tools"])
        assert result["sum"] == "The sum of 2 and 3 is 5."
        assert result["bad_arguments"] == "failed"
        assert result["after_kill"] == "Echo: back after SIGKILL"
        assert result["reconnects"] >= 1
