"""What a failed connection says: the cause named right, and nothing secret in it."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import PYTHON, stdio_args

from rmcp_actors import RMCPNetworkError, RMCPSupervisor, ServerSpec


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
