"""Shared fixtures: the test server, in memory and over stdio."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import prefork
import pytest
import trio
from mcp.server.mcpserver import MCPServer
from mcp_test_server import State, build_server

from rmcp_actors import PolicyOverrides, ReconnectOverrides, RetryOverrides
from rmcp_actors.stores import DedupStore, MemoryStore

TEST_SERVER = Path(__file__).with_name("mcp_test_server.py")


def stdio_args(*extra: str) -> list[str]:
    """Arguments that run the test server over stdio with this interpreter."""
    return [str(TEST_SERVER), *extra]


PYTHON = sys.executable

# Real-time tests (subprocess, HTTP) recover within tens of milliseconds, not seconds.
FAST_RECOVERY = PolicyOverrides(
    reconnect=ReconnectOverrides(base_delay_s=0.02, max_delay_s=0.2),
    retry=RetryOverrides(base_delay_s=0.01, max_delay_s=0.05),
)


@pytest.fixture
def state() -> State:
    return State()


@pytest.fixture
def server(state: State) -> MCPServer:
    return build_server(state)


@pytest.fixture
def rmcp_server(state: State) -> MCPServer:
    """The test server with RMCP installed on a MemoryStore (TTLs on the event loop's clock)."""
    return build_server(state, store=MemoryStore(clock=trio.current_time))


class _DurableMemoryStore:
    """A MemoryStore that claims to be durable: early ACK and ACK timeouts need a durable
    store, and SQLite's worker threads would defeat MockClock's autojump."""

    def __init__(self) -> None:
        self.inner = MemoryStore(clock=trio.current_time)

    @property
    def durable(self) -> bool:
        return True

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def durable_store() -> DedupStore:
    """A store that says it is durable and keeps time on the event loop's (mock) clock."""
    store: Any = _DurableMemoryStore()
    return store


def process_gone(pid: int) -> bool:
    """True when ``pid`` no longer exists (reaped), not merely a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture(scope="module")
def zygote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The socket of a warm fork server for the test server, the relay and test programs
    (see prefork.py)."""
    socket_path = str(tmp_path_factory.mktemp("prefork") / "zygote.sock")
    process = prefork.start_zygote(socket_path)
    try:
        yield socket_path
    finally:
        assert process.stdin is not None
        process.stdin.close()
        process.wait(timeout=10)


def processes_naming(text: str) -> dict[int, str]:
    """The running processes whose command line contains ``text``: pid and command line."""
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in command:
            found[int(entry.name)] = command
    return found
