"""What a failed connection says: the cause named right, and nothing secret in it."""

from __future__ import annotations

from pathlib import Path

import pytest
from _http import serve_http
from conftest import PYTHON, stdio_args
from mcp.server.mcpserver import MCPServer

from rmcp_actors import RMCPError, RMCPNetworkError, RMCPSupervisor, ServerSpec


async def test_missing_working_directory_is_named_not_the_command(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir"
    async with RMCPSupervisor.open() as sup:
        with pytest.raises(RMCPNetworkError) as caught:
            await sup.add_server(ServerSpec.stdio("s", PYTHON, stdio_args(), cwd=missing))
    message = str(caught.value)
    assert f"working directory not found ({missing})" in message
    assert "command not found" not in message


async def test_working_directory_that_is_a_file_is_named(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    async with RMCPSupervisor.open() as sup:
        with pytest.raises(RMCPNetworkError) as caught:
            await sup.add_server(ServerSpec.stdio("s", PYTHON, stdio_args(), cwd=not_a_dir))
    assert f"working directory is not a directory ({not_a_dir})" in str(caught.value)


async def test_a_header_secret_with_a_trailing_newline_never_reaches_the_connect_error(
    server: MCPServer,
) -> None:
    # A token read from a file keeps its "\n". h11 refuses it with
    # LocalProtocolError("Illegal header value b'Bearer <token>\\n'"): the repr escapes the
    # newline, so scrubbing only the raw value "Bearer <token>\n" found nothing to mask.
    async with serve_http(server) as http, RMCPSupervisor.open() as sup:
        spec = ServerSpec.http(
            "web", http.url, protocol="legacy", headers={"Authorization": "Bearer tok-s3cret-value\n"}
        )
        with pytest.raises(RMCPError) as caught:
            await sup.add_server(spec)
    assert "tok-s3cret-value" not in str(caught.value)
    assert "Illegal header value" in str(caught.value)  # the cause is still named
