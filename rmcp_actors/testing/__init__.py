"""Test utilities for code that calls MCP servers through rmcp_actors.

``stdio_relay`` is a runnable module (``python -m rmcp_actors.testing.stdio_relay``) that relays
a stdio MCP server and injects faults; ``relay_command`` builds its command line.

``FaultPlan`` and ``FaultInjector`` inject seeded faults into any transport (stdio, Streamable
HTTP, in memory), for a raw ``mcp.Client`` or every connection rmcp_actors makes. The pytest
plugin (documented in ``rmcp_actors.testing.pytest_plugin``; pytest loads it, as the top-level
module ``_rmcp_actors_pytestplugin``, when rmcp-actors is installed) gives them as fixtures. See
docs/testing.md.

The chaos server (``python -m rmcp_actors.testing.chaos_server``, or ``build_chaos_server`` in
this process) misbehaves on request and counts its side effects in a ``Ledger``; ``run_chaos``
(``rmcp chaos``) compares raw MCP, a naive retry loop and rmcp_actors against it under faults.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import attrs

from ..client._stdio import stdio_client as stdio_client
from .faults import CHUNK_METHODS as CHUNK_METHODS
from .faults import FAULT_KINDS as FAULT_KINDS
from .faults import FaultEvent as FaultEvent
from .faults import FaultInjector as FaultInjector
from .faults import FaultPlan as FaultPlan

__all__ = ["relay_command"]
__all__ += ["CHUNK_METHODS", "FAULT_KINDS", "FaultEvent", "FaultInjector", "FaultPlan", "stdio_client"]


def relay_command(
    server_argv: Sequence[str],
    *,
    swallow_probability: float,
    seed: int | None = None,
    skip_first: int = 0,
    log: str | os.PathLike[str] | None = None,
) -> list[str]:
    """Return the argv that runs ``server_argv`` behind the fault-injecting stdio relay.

    With probability ``swallow_probability`` the relay drops the server's answer to a
    ``tools/call`` and kills the server with SIGKILL: the tool ran, the client never hears.
    Pass the first element as a ``ServerSpec.stdio`` command and the rest as its args.

    Args:
        server_argv: The server's command and arguments.
        swallow_probability: Chance, from 0 to 1, that a tools/call answer is swallowed.
        seed: Seed of the relay's RNG, for reproducible faults; random when None.
        skip_first: How many tools/call answers are always delivered before any can be swallowed.
        log: A file the relay appends one JSON line to per injected fault:
            ``{"event": "swallowed", "id": <request id>, "pid": <server pid>}``.

    Returns:
        ``[sys.executable, <path of stdio_relay.py>, ..., "--", *server_argv]``: the file is run
        as a script, so that each (re)start of the relay skips importing rmcp_actors and the
        SDK (about 0.7 s).

    Raises:
        ValueError: ``server_argv`` is empty, or an option is out of range (the relay would
            refuse it only once spawned, where the error is harder to see).
    """
    if not server_argv:
        raise ValueError("server_argv is empty")
    if not 0.0 <= swallow_probability <= 1.0:
        raise ValueError(f"swallow_probability must be between 0 and 1, got {swallow_probability}")
    if skip_first < 0:
        raise ValueError(f"skip_first must be 0 or more, got {skip_first}")
    argv = [sys.executable, str(Path(__file__).with_name("stdio_relay.py"))]
    argv += ["--swallow-probability", repr(swallow_probability), "--skip-first", str(skip_first)]
    if seed is not None:
        argv += ["--seed", str(seed)]
    if log is not None:
        argv += ["--log", os.fspath(log)]
    return [*argv, "--", *server_argv]


def _show_testing_module() -> None:
    """Make reprs say ``rmcp_actors.testing.FaultPlan``, the name users import."""
    for value in (FaultEvent, FaultInjector, FaultPlan):
        attrs.resolve_types(value)  # string annotations resolve in the defining module
        value.__module__ = __name__


_show_testing_module()


# The chaos server and the chaos comparison (see docs/testing.md).
from ._chaos_server import Ledger as Ledger  # noqa: E402
from ._chaos_server import build_chaos_server as build_chaos_server  # noqa: E402
from .chaos import CHAOS_POLICY as CHAOS_POLICY  # noqa: E402
from .chaos import ChaosReport as ChaosReport  # noqa: E402
from .chaos import WayReport as WayReport  # noqa: E402
from .chaos import chaos_server_command as chaos_server_command  # noqa: E402
from .chaos import chaos_server_environment as chaos_server_environment  # noqa: E402
from .chaos import run_chaos as run_chaos  # noqa: E402

__all__ += [
    "CHAOS_POLICY",
    "ChaosReport",
    "Ledger",
    "WayReport",
    "build_chaos_server",
    "chaos_server_command",
    "chaos_server_environment",
    "run_chaos",
]

for _public in (ChaosReport, WayReport):
    attrs.resolve_types(_public)  # string annotations resolve in the defining module
for _public in (ChaosReport, WayReport, Ledger):
    _public.__module__ = __name__
del _public
