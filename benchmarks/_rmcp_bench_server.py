"""The stdio server of the server-side benchmark: a plain ``MCPServer``, or the same with RMCP.

Usage::

    python benchmarks/_rmcp_bench_server.py --mode plain|memory|sqlite [--store PATH] [--profile PATH]

``plain`` is a bare ``MCPServer``; ``memory`` and ``sqlite`` install the RMCP server side
(``install(app, store=...)``) with a ``MemoryStore`` or a ``SQLiteStore`` at ``--store``
(required for ``sqlite``: pass a fresh file). Every variant serves the same three tools:

* ``echo(text) -> str``: ``async def`` (a sync tool would run in a worker thread) and trivial,
  so that a call measures the server's protocol and RMCP path and nothing else;
* ``echo_read_only(text) -> str``: the same, annotated ``readOnlyHint=True``: RMCP runs it
  unclaimed and records its result in one write (``server_overhead.py --read-only``);
* ``stats() -> str``: a JSON object with ``cpu_s`` (``time.process_time()``: the CPU time of
  the server process, all threads), ``rmcp`` (``rmcp_of(app).statistics()``, absent on
  ``plain``) and ``store`` (the ``SQLiteStore``'s group-commit counters, on ``sqlite`` only).
  The benchmark calls it without ``_meta.rmcp``, so it is never deduplicated or counted.

``--profile PATH`` runs the server under ``cProfile`` and writes the stats to ``PATH`` when
stdin closes (read them with ``python -m pstats PATH``).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import time
from pathlib import Path
from typing import Any, Literal

import anyio
from mcp.server.mcpserver import MCPServer
from mcp_types import ToolAnnotations

from rmcp_actors.server import install, rmcp_of
from rmcp_actors.stores import DedupStore, MemoryStore, SQLiteStore

Mode = Literal["plain", "memory", "sqlite"]
MODES: tuple[Mode, ...] = ("plain", "memory", "sqlite")
ECHO_TOOL = "echo"
READ_ONLY_ECHO_TOOL = "echo_read_only"
STATS_TOOL = "stats"


def build_server(mode: Mode, store: DedupStore | None) -> MCPServer:
    """Return the benchmark server; RMCP is installed on ``store`` unless ``mode`` is plain."""
    app = MCPServer(f"rmcp-bench-{mode}")

    @app.tool()
    async def echo(text: str) -> str:  # pyright: ignore[reportUnusedFunction]
        """Return ``text``."""
        return text

    @app.tool(annotations=ToolAnnotations(read_only_hint=True))
    async def echo_read_only(text: str) -> str:  # pyright: ignore[reportUnusedFunction]
        """Return ``text`` (declared read-only)."""
        return text

    @app.tool()
    async def stats() -> str:  # pyright: ignore[reportUnusedFunction]
        """Return the RMCP and store counters of this server as JSON."""
        report: dict[str, Any] = {"cpu_s": time.process_time()}
        side = rmcp_of(app)
        if side is not None:
            statistics = side.statistics()
            report["rmcp"] = {
                "executed": statistics.executed,
                "replayed": statistics.replayed,
                "coalesced": statistics.coalesced,
                "nacked": dict(statistics.nacked),
                "in_flight": statistics.in_flight,
            }
        if isinstance(store, SQLiteStore):
            counters = store.statistics()
            report["store"] = {
                "commits": counters.commits,
                "writes": counters.writes,
                "largest_batch": counters.largest_batch,
                "inline_claims": counters.inline_claims,
                # Absent from stores before issue 13: the script also measures older checkouts.
                "inline_results": getattr(counters, "inline_results", 0),
            }
        return json.dumps(report)

    if mode != "plain":
        assert store is not None
        install(app, store=store)
    return app


def open_store(mode: Mode, path: Path | None) -> DedupStore | None:
    """The store of ``mode``: none for plain, a ``MemoryStore``, or a ``SQLiteStore`` at ``path``."""
    if mode == "plain":
        return None
    if mode == "memory":
        return MemoryStore()
    if path is None:
        raise SystemExit("--store PATH is required with --mode sqlite")
    return SQLiteStore(path)


async def serve(mode: Mode, path: Path | None) -> None:
    """Serve over stdio until the client closes stdin, then close the store."""
    store = open_store(mode, path)
    try:
        await build_server(mode, store).run_stdio_async()
    finally:
        if store is not None:
            await store.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--store", type=Path, metavar="PATH", help="the SQLite file (sqlite mode)")
    parser.add_argument("--profile", type=Path, metavar="PATH", help="write cProfile stats here on exit")
    options = parser.parse_args()
    mode: Mode = options.mode
    if options.profile is None:
        anyio.run(serve, mode, options.store)
        return
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        anyio.run(serve, mode, options.store)
    finally:
        profiler.disable()
        profiler.dump_stats(options.profile)


if __name__ == "__main__":
    main()
