"""server-everything over Streamable HTTP, checked through rmcp_actors, inside a network namespace.

Run by ``test_reference_servers.py`` as ``unshare -rn sh -c 'ip link set lo up && exec python
reference_http_netns.py NODE SCRIPT REPORT'``. server-everything listens on every interface (it
takes no host), so it must not run in the machine's network namespace; a process in a fresh one
is unreachable from outside it, so the client checks run here too, in this program, and write
what they saw to REPORT (JSON) for the test to assert on. A failed check exits non-zero with its
traceback on stderr.

For each protocol mode (``auto``, ``legacy``): connect, list tools, ``get-sum``, bad arguments,
SIGKILL of the server and a new one on the same port (its sessions are gone: it answers the
stale session id with HTTP 400), then ``echo`` must succeed on a reconnected session.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio

from rmcp_actors import (
    ConnectionState,
    Outcome,
    PolicyOverrides,
    ReconnectOverrides,
    RetryOverrides,
    RMCPSupervisor,
    ServerSpec,
)

PORT = 3001  # any port: the namespace is empty
FAST_RECOVERY = PolicyOverrides(
    reconnect=ReconnectOverrides(base_delay_s=0.02, max_delay_s=0.2),
    retry=RetryOverrides(base_delay_s=0.01, max_delay_s=0.05),
)
DEADLINE_S = 30


def start_server(node: str, script: str) -> subprocess.Popen[bytes]:
    """Start server-everything over HTTP and return once it accepts connections."""
    process = subprocess.Popen(
        [node, script, "streamableHttp"],
        env={**os.environ, "PORT": str(PORT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server-everything exited with code {process.returncode} at start")
        try:
            socket.create_connection(("127.0.0.1", PORT), timeout=1).close()
            return process
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"server-everything did not listen on port {PORT} within {DEADLINE_S} s")


async def check(mode: str, node: str, script: str) -> dict[str, Any]:
    """Every step of the matrix for one protocol mode; returns what was seen."""
    server = start_server(node, script)
    try:
        async with RMCPSupervisor.open() as sup:
            spec = ServerSpec.http(
                "everything", f"http://127.0.0.1:{PORT}/mcp", protocol=mode, overrides=FAST_RECOVERY
            )
            await sup.add_server(spec)
            tools = [tool.name for tool in await sup.list_tools("everything")]
            (stats,) = sup.statistics().connections
            total = await sup.call("everything", "get-sum", {"a": 2, "b": 3})
            assert total.outcome is Outcome.SUCCEEDED, total.text
            refused = await sup.call("everything", "get-sum", {"a": "two"})

            server.kill()
            server.wait()
            server = start_server(node, script)
            again = await sup.call(
                "everything", "echo", {"message": "back after SIGKILL"}, timeout=DEADLINE_S
            )
            assert again.outcome is Outcome.SUCCEEDED, again.text
            assert sup.servers()["everything"] is ConnectionState.READY
            (after,) = sup.statistics().connections
            return {
                "mode": mode,
                "protocol": stats.protocol_version,
                "tools": tools,
                "sum": total.text,
                "bad_arguments": refused.outcome.value,
                "after_kill": again.text,
                "reconnects": after.connects - stats.connects,
            }
    finally:
        server.kill()
        server.wait()


async def main(node: str, script: str, report: Path) -> None:
    results = [await check(mode, node, script) for mode in ("auto", "legacy")]
    report.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    trio.run(main, sys.argv[1], sys.argv[2], Path(sys.argv[3]))
