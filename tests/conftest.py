"""Shared fixtures: the test server, in memory and over stdio."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from mcp.server.mcpserver import MCPServer
from mcp_test_server import State, build_server

TEST_SERVER = Path(__file__).with_name("mcp_test_server.py")


def stdio_args(*extra: str) -> list[str]:
    """Arguments that run the test server over stdio with this interpreter."""
    return [str(TEST_SERVER), *extra]


PYTHON = sys.executable


@pytest.fixture
def state() -> State:
    return State()


@pytest.fixture
def server(state: State) -> MCPServer:
    return build_server(state)
