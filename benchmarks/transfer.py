"""Large payloads in chunks: a raw ``mcp.Client`` (inline) against rmcp_actors (chunked transfer).

Usage::

    python benchmarks/transfer.py [--quick] [--size MIB] [--runs N] [--timeout S] [--traced]
                                  [--json PATH]

A 50 MiB result (``blob(size)``) and a 50 MiB argument (``digest(text)``) of the server
``_transfer_server.py`` (RMCP installed, MemoryStore), over stdio and Streamable HTTP on
127.0.0.1. Variants (the same server for all; only the client differs):

* ``raw``: ``mcp.Client`` on the SDK's transport (``StdioServerParameters``, or
  ``streamable_http_client(url, max_sse_event_size=None)``: the SDK's default caps one SSE event
  at 1 MiB, so a raw client must lift it to get a large result at all), the payload inline;
* ``raw_linear`` (stdio): the same ``mcp.Client`` on rmcp_actors' linear stdio transport,
  inline: the transport alone, without chunks;
* ``rmcp_p1``, ``rmcp_p4``: ``sup.call`` with chunked transfer, 1 or 4 chunk requests in
  flight, the result reassembled in memory (``CallResult.text``) or the argument uploaded;
* ``rmcp_p4_file`` (results): the same with ``result_sink=<path>``, streamed to a file;
* ``resume`` (stdio, SQLite store, parallel 1, a result to a file or an argument uploaded): the
  server SIGKILLs itself as its store is asked for the middle chunk (``--kill-at``); rmcp_actors
  restarts it and resumes. Figures: wall time, the chunks the server handed out or took in
  twice over its two lives (``served_twice``, from its ``--chunk-log``: the judged figure) and
  the client's own counts (``refetched``, ``resent``, ``reconnects`` of ``CallResult.transfers``).

Each run of a variant is a fresh subprocess (``--child``): it imports, starts the server,
connects and makes one small warm-up call, then resets its peak RSS (``/proc/self/clear_refs``;
without it, ``ru_maxrss``), takes its RSS as the baseline, and times the one large call. Peak
memory is the peak RSS during the call minus that baseline: what the transfer costs the client
(for an argument, the payload itself is built before the baseline; for a result, holding the
result is part of the cost, and the child makes its own copy to check it only afterwards). The
child runs with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed at 128 KiB, so that blocks freed
before the baseline are not silently reused (see ``_child_env``). The server is another
process, not counted. The payload's SHA-256 is checked after the measurement. A run that
exceeds ``--timeout`` is reported as such (and not repeated). With ``--traced``, one more run
per variant under ``tracemalloc`` gives the peak of the Python heap during the call
(``traced_peak_mib``): the RSS also counts memory the allocator keeps after Python freed it,
the heap does not; that run's wall time is not used.

Goals (from the issue), judged on the full run (50 MiB): the stdio result and argument in under
2 s (``rmcp_p4``); peak memory under 2x the payload when reassembled (``rmcp_p1``/``rmcp_p4``
results) and under 32 MiB streamed to a file (``rmcp_p4_file``); resume after a kill re-sends
fewer than 2 chunks.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_results

SERVER = Path(__file__).resolve().with_name("_transfer_server.py")
ROOT = SERVER.parents[1]
MIB = 1 << 20

Direction = Literal["result", "argument"]
Transport = Literal["stdio", "http"]
DIRECTIONS: tuple[Direction, ...] = ("result", "argument")
TRANSPORTS: tuple[Transport, ...] = ("stdio", "http")
VARIANTS = ("raw", "raw_linear", "rmcp_p1", "rmcp_p4", "rmcp_p4_file")
# A chunk's base64 must fit one SSE event of the SDK's HTTP client (1 MiB by default).
CHUNK_SIZE = {"stdio": MIB, "http": 512 << 10}
WALL_GOAL_S = 2.0
REASSEMBLED_GOAL = 2.0  # x the payload
STREAMED_GOAL_MIB = 32.0
RESENT_GOAL = 2


def applies(direction: Direction, transport: Transport, variant: str) -> bool:
    """Whether ``variant`` is measured on this row."""
    if variant == "raw_linear":
        return transport == "stdio"
    if variant == "rmcp_p4_file":
        return direction == "result"
    return True


# --- the child: one variant, one call, measured -----------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset the peak RSS to the current RSS (Linux: ``clear_refs`` 5); False if unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def _rss_bytes() -> int:
    current = _status_kib("VmRSS")
    return (
        current * 1024 if current is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )


def _peak_bytes(reset: bool) -> int:
    peak = _status_kib("VmHWM") if reset else None
    return peak * 1024 if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _server_env() -> dict[str, str]:
    # The SDK's default environment drops PYTHONPATH: the server imports the rmcp_actors measured.
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    environment.pop(_FIXED_MMAP, None)
    return environment


# glibc serves a large block from the heap once its dynamic mmap threshold has grown (up to 32 MiB
# after a large block was freed), and keeps it there when it is freed: a later allocation reuses
# it without growing the RSS, so a variant would look cheaper after garbage of its own (making an
# argument's payload) than in a process that has none. A fixed threshold (which turns the dynamic
# one off) maps every block above 128 KiB and unmaps it when freed: the RSS follows the live
# large blocks. Set for the measured child only, for every variant alike.
_FIXED_MMAP = "MALLOC_MMAP_THRESHOLD_"


def _child_env() -> dict[str, str]:
    return {**_server_env(), _FIXED_MMAP: str(128 << 10)}


@asynccontextmanager
async def http_server(store: str) -> AsyncIterator[str]:
    """Start ``_transfer_server.py --http`` on a free port; yield its MCP URL."""
    port = _free_port()
    process = await trio.lowlevel.open_process(
        [sys.executable, str(SERVER), "--http", str(port), "--store", store],
        env=_server_env(),
        stdout=subprocess.DEVNULL,
    )
    try:
        with trio.fail_after(60):
            while True:
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", port)
                except OSError:
                    await trio.sleep(0.05)
                    continue
                await stream.aclose()
                break
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        process.terminate()
        with trio.move_on_after(10) as waiting:
            await process.wait()
        if waiting.cancelled_caught:
            process.kill()


# call(tool, arguments, **options): the call, not started yet.
Call = Callable[..., Awaitable[Any]]


@asynccontextmanager
async def open_raw(transport: Transport, linear: bool) -> AsyncIterator[Call]:
    from mcp import Client, StdioServerParameters
    from mcp.client.streamable_http import streamable_http_client

    from rmcp_actors.client._stdio import stdio_client

    params = StdioServerParameters(command=sys.executable, args=[str(SERVER)], env=_server_env())
    if transport == "stdio":
        client = Client(stdio_client(params) if linear else params)
        async with client:
            yield lambda tool, arguments: client.call_tool(tool, arguments)
        return
    async with (
        http_server("memory") as url,
        Client(streamable_http_client(url, max_sse_event_size=None)) as client,
    ):
        yield lambda tool, arguments: client.call_tool(tool, arguments)


@asynccontextmanager
async def open_rmcp(
    transport: Transport, parallel: int, server_args: tuple[str, ...] = ()
) -> AsyncIterator[Call]:
    from rmcp_actors import PolicyOverrides, RMCPSupervisor, ServerSpec
    from rmcp_actors.config import TransferOverrides

    overrides = PolicyOverrides(
        transfer=TransferOverrides(parallel=parallel, chunk_size=CHUNK_SIZE[transport])
    )
    async with RMCPSupervisor.open() as sup:
        if transport == "stdio":
            spec = ServerSpec.stdio(
                "bench",
                sys.executable,
                [str(SERVER), *server_args],
                env=_server_env(),
                overrides=overrides,
            )
            await sup.add_server(spec)
            yield lambda tool, arguments, **options: sup.call("bench", tool, arguments, **options)
            return
        async with http_server("memory") as url:
            await sup.add_server(ServerSpec.http("bench", url, overrides=overrides))
            yield lambda tool, arguments, **options: sup.call("bench", tool, arguments, **options)


def _text_of(result: Any) -> str:
    text = getattr(result, "text", None)
    if isinstance(text, str):
        return text
    return "".join(getattr(item, "text", "") for item in result.content)


async def child(
    variant: str, direction: Direction, transport: Transport, size: int, sink: Path, traced: bool = False
) -> dict[str, Any]:
    """Run ``variant`` once in this (fresh) process; return its figures (``sink``: the file a
    streamed result goes to; ``traced``: also the peak of the Python heap, by tracemalloc)."""
    sys.path.insert(0, str(SERVER.parent))
    from _transfer_server import payload

    # A result's payload is made only after the measurement: neither it nor the garbage of
    # making it may sit in this process (freed memory is reused without growing the RSS).
    argument = payload(size) if direction == "argument" else None
    figures: dict[str, Any] = {}
    chunk_log = sink.with_name("chunks.log")
    if variant in ("raw", "raw_linear"):
        opened = open_raw(transport, linear=variant == "raw_linear")
    elif variant == "resume":
        # Killed as it is asked for the middle chunk, once; restarted on the same SQLite file.
        operation = "read" if direction == "result" else "write"
        middle = f"{operation}:{size // CHUNK_SIZE[transport] // 2 + 1}"
        server_args = ("--store", str(sink.with_name("store.sqlite")), "--chunk-log", str(chunk_log))
        server_args += ("--kill-at", middle, "--kill-marker", str(sink.with_name("killed")))
        # One chunk request in flight: with more, the reads in flight when the server dies were
        # handed out by its store but never delivered, and are served again (see the README).
        opened = open_rmcp(transport, parallel=1, server_args=server_args)
    else:
        opened = open_rmcp(transport, parallel=1 if variant == "rmcp_p1" else 4)
    async with opened as call:
        await call("blob", {"size": 16})
        if direction == "result":
            options: dict[str, Any] = {"result_sink": sink} if variant in ("rmcp_p4_file", "resume") else {}
            run = call("blob", {"size": size}, **options)
        else:
            run = call("digest", {"text": argument})
        gc.collect()
        if traced:
            tracemalloc.start()
        reset = _reset_peak()
        baseline = _rss_bytes()
        start = time.perf_counter()
        result = await run
        figures["wall_s"] = time.perf_counter() - start
        figures["peak_bytes"] = _peak_bytes(reset) - baseline
        figures["peak_method"] = "VmHWM after clear_refs" if reset else "ru_maxrss (not reset)"
        if traced:
            figures["traced_peak_bytes"] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        transfers = getattr(result, "transfers", ())
        if variant not in ("raw", "raw_linear"):
            figures["chunked"] = bool(transfers)  # an rmcp row that went inline says so
        if transfers:
            figures["refetched"] = sum(t.refetched for t in transfers)
            figures["resent"] = sum(t.resent for t in transfers)
            figures["reconnects"] = sum(t.reconnects for t in transfers)
            figures["chunks"] = sum(t.chunks for t in transfers)
            figures["bytes_moved"] = sum(t.bytes_moved for t in transfers)
    if variant == "resume":
        # Chunks the server handed out (result) or took in (argument) more than once, over both
        # lives (an upload's chunks are also read once, when the call substitutes them).
        operation = "read " if direction == "result" else "write "
        lines = [
            line
            for line in (await trio.Path(chunk_log).read_text()).splitlines()
            if line.startswith(operation)
        ]
        figures["served_twice"] = len(lines) - len(set(lines))
        figures["killed"] = await trio.Path(sink.with_name("killed")).exists()
    if direction == "argument":
        got = _text_of(result)
    elif variant in ("rmcp_p4_file", "resume"):
        got = hashlib.sha256(await trio.Path(sink).read_bytes()).hexdigest()
    else:
        got = hashlib.sha256(_text_of(result).encode()).hexdigest()
    figures["verified"] = got == hashlib.sha256(payload(size).encode()).hexdigest()
    return figures


# --- the parent: every variant in its own process ---------------------------------------------


def run_child(
    variant: str, direction: Direction, transport: Transport, size: int, timeout: float, traced: bool = False
) -> dict[str, Any]:
    argv = [sys.executable, __file__, "--child", variant, "--direction", direction, "--transport", transport]
    argv += ["--bytes", str(size), *(["--traced"] if traced else [])]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=_child_env())
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:g} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        return {"error": tail[0][:300]}
    return json.loads(lines[-1])


def measure(
    variant: str,
    direction: Direction,
    transport: Transport,
    size: int,
    runs: int,
    options: argparse.Namespace,
) -> dict[str, Any]:
    """``runs`` runs of ``variant`` (fewer if one fails: a timeout would only repeat), then, with
    ``--traced``, one under tracemalloc; summarized."""
    measured: list[dict[str, Any]] = []
    for _ in range(runs):
        measured.append(run_child(variant, direction, transport, size, options.timeout))
        if "error" in measured[-1]:
            return summarize(measured, size)
    summary = summarize(measured, size)
    if options.traced:
        traced = run_child(variant, direction, transport, size, options.timeout, traced=True)
        if "traced_peak_bytes" in traced:
            summary["traced_peak_mib"] = traced["traced_peak_bytes"] / MIB
    return summary


def summarize(runs: list[dict[str, Any]], size: int) -> dict[str, Any]:
    """The median wall time and the largest peak over runs (an error if any run failed)."""
    errors = [run["error"] for run in runs if "error" in run]
    if errors:
        return {"error": errors[0], "runs": len(runs)}
    peak = max(run["peak_bytes"] for run in runs)
    summary: dict[str, Any] = {
        "wall_s": statistics.median(run["wall_s"] for run in runs),
        "wall_s_runs": [round(run["wall_s"], 4) for run in runs],
        "peak_mib": peak / MIB,
        "peak_x_payload": peak / size,
        "peak_method": runs[0]["peak_method"],
        "verified": all(run["verified"] for run in runs),
        "runs": len(runs),
    }
    for key in (
        "chunked",
        "bytes_moved",
        "refetched",
        "resent",
        "reconnects",
        "chunks",
        "served_twice",
        "killed",
    ):
        if key in runs[0]:
            summary[key] = max(run[key] for run in runs)
    return summary


def verdicts(rows: dict[str, dict[str, dict[str, Any]]], resume: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each goal of the issue: the figure, the goal and whether it passed (None: not measured)."""

    def figure(row: str, variant: str, key: str) -> float | None:
        value = rows.get(row, {}).get(variant, {}).get(key)
        return value if isinstance(value, int | float) else None

    goals: dict[str, Any] = {}
    for direction in DIRECTIONS:
        wall = figure(f"{direction}/stdio", "rmcp_p4", "wall_s")
        goals[f"{direction}_stdio_wall_s"] = {
            "value": wall,
            "goal": f"< {WALL_GOAL_S:g} s",
            "passed": None if wall is None else wall < WALL_GOAL_S,
        }
    reassembled = [
        figure(f"result/{transport}", variant, "peak_x_payload")
        for transport in TRANSPORTS
        for variant in ("rmcp_p1", "rmcp_p4")
    ]
    worst = max((value for value in reassembled if value is not None), default=None)
    goals["reassembled_peak_x_payload"] = {
        "value": worst,
        "goal": f"< {REASSEMBLED_GOAL:g}x",
        "passed": None if worst is None else worst < REASSEMBLED_GOAL,
    }
    streamed = [figure(f"result/{transport}", "rmcp_p4_file", "peak_mib") for transport in TRANSPORTS]
    worst_streamed = max((value for value in streamed if value is not None), default=None)
    goals["streamed_peak_mib"] = {
        "value": worst_streamed,
        "goal": f"< {STREAMED_GOAL_MIB:g} MiB",
        "passed": None if worst_streamed is None else worst_streamed < STREAMED_GOAL_MIB,
    }
    for direction in DIRECTIONS:
        resent = resume.get(direction, {}).get("served_twice")
        goals[f"resume_{direction}_resent_chunks"] = {
            "value": resent,
            "goal": f"< {RESENT_GOAL}",
            "passed": None if not isinstance(resent, int) else resent < RESENT_GOAL,
        }
    return goals


def render(
    rows: dict[str, dict[str, dict[str, Any]]],
    resume: dict[str, dict[str, Any]],
    goals: dict[str, Any],
    size: int,
) -> str:
    lines = [
        f"{'payload/transport':<18} {'variant':<13} {'wall s':>8} {'peak MiB':>9} {'x payload':>9}  verified"
    ]
    for row, variants in rows.items():
        for variant, summary in variants.items():
            if "error" in summary:
                lines.append(f"{row:<18} {variant:<13} {summary['error']}")
                continue
            heap = summary.get("traced_peak_mib")
            lines.append(
                f"{row:<18} {variant:<13} {summary['wall_s']:>8.3f} {summary['peak_mib']:>9.1f} "
                f"{summary['peak_x_payload']:>9.2f} {'-' if heap is None else f'{heap:.1f}':>8}  "
                f"{summary['verified']}"
            )
    for direction, summary in resume.items():
        lines.append(f"resume {direction}: " + ", ".join(f"{key} {value}" for key, value in summary.items()))
    lines.append(f"payload {size / MIB:g} MiB; goals:")
    for name, goal in goals.items():
        verdict = {True: "PASS", False: "MISS", None: "not measured"}[goal["passed"]]
        value = goal["value"]
        shown = "-" if value is None else f"{value:.3g}"
        lines.append(f"  {name:<28} {shown:>8}  goal {goal['goal']:<10} {verdict}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="smoke run: 10 MiB, one run per variant")
    parser.add_argument(
        "--size", type=float, metavar="MIB", help="payload size in MiB (default 50; 10 quick)"
    )
    parser.add_argument(
        "--runs", type=int, help="runs per variant, each a fresh process (default 3; 1 quick)"
    )
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per run before it is abandoned")
    parser.add_argument(
        "--json", type=Path, metavar="PATH", help="results file (default benchmarks/results/)"
    )
    parser.add_argument("--child", choices=(*VARIANTS, "resume"), help=argparse.SUPPRESS)
    parser.add_argument("--direction", choices=DIRECTIONS, default="result", help=argparse.SUPPRESS)
    parser.add_argument("--transport", choices=TRANSPORTS, default="stdio", help=argparse.SUPPRESS)
    parser.add_argument("--bytes", type=int, help=argparse.SUPPRESS)
    parser.add_argument(
        "--traced",
        action="store_true",
        help="one more run per variant under tracemalloc: the peak of the Python heap, beside the RSS",
    )
    options = parser.parse_args()
    if options.child is not None:
        with tempfile.TemporaryDirectory(prefix="rmcp-transfer-bench-") as directory:
            sink = Path(directory) / "result.txt"
            figures = trio.run(
                child,
                options.child,
                options.direction,
                options.transport,
                options.bytes,
                sink,
                options.traced,
            )
        print(json.dumps(figures))
        return
    size = int((options.size or (10 if options.quick else 50)) * MIB)
    runs = options.runs or (1 if options.quick else 3)
    rows: dict[str, dict[str, dict[str, Any]]] = {}
    for direction in DIRECTIONS:
        for transport in TRANSPORTS:
            row = rows.setdefault(f"{direction}/{transport}", {})
            for variant in VARIANTS:
                if not applies(direction, transport, variant):
                    continue
                print(f"{direction} over {transport}: {variant} x{runs}", file=sys.stderr, flush=True)
                row[variant] = measure(variant, direction, transport, size, runs, options)
    resume: dict[str, Any] = {}
    for direction in DIRECTIONS:
        print(f"{direction} over stdio, server killed halfway: resume x{runs}", file=sys.stderr, flush=True)
        resume[direction] = measure("resume", direction, "stdio", size, runs, options)
    goals = verdicts(rows, resume)
    print(render(rows, resume, goals, size))
    figures = {"payload_bytes": size, "runs": runs, "rows": rows, "resume": resume, "goals": goals}
    path = write_results("transfer", figures, quick=options.quick, path=options.json)
    print(f"results: {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
