"""CPU time per call of ``sup.call`` against a raw ``mcp.Client.call_tool``, same run.

Usage::

    python benchmarks/cpu_per_call.py [--quick] [--rounds N] [--calls N] [--json PATH] [--full]
    python benchmarks/cpu_per_call.py --profile /tmp/rmcp.prof   # cProfile of the rmcp blocks
    valgrind --tool=callgrind --dump-before=getppid python benchmarks/cpu_per_call.py --callgrind

Wall-clock latency on a shared machine measures the neighbours as much as the code. CPU time
does not count the time this process waits for a core, so it is the steadier figure for "how
much work does the reliability layer add to a call". One process, one ``trio.run``, three
clients of the same no-op tool (``_noop_server.py``), each on its own in-memory server over
the JSON-RPC wire (the SDK's ``InMemoryTransport``: request and answer cross the SDK's streams
and tasks, as over a real transport):

* ``raw``:  ``mcp.Client(InMemoryTransport(server))``, ``call_tool`` with a read timeout
* ``raw2``: a second, identical raw client: the control (raw2 - raw is the noise floor)
* ``rmcp``: ``RMCPSupervisor`` with ``ServerSpec.in_memory(..., wire="jsonrpc")``, ``sup.call``

The server runs in the same process and thread, so its CPU is in every figure alike and cancels
out of the difference. After a warm-up, the clients run rounds of one block of sequential calls
each, in an order that rotates every round; each block's CPU time (``time.process_time()``)
divided by its calls is one sample; ``gc.collect()`` runs before every block and the GC stays on
during it (allocation is part of the cost). A neighbour that slows the shared cores (cache,
memory bandwidth, a sibling hyperthread) inflates CPU time too, but alike for the blocks of one
round, so the judged figures are paired: per round, rmcp minus the mean of raw and raw2 (the
added µs) and rmcp over that mean (the ratio), medians over rounds. raw2 - raw, paired the same
way, is the noise floor.

``--callgrind`` (under ``valgrind --tool=callgrind --dump-before=getppid``) runs one block per
client between ``os.getppid()`` markers, each of which makes callgrind write the counts since
the previous one, and prints instructions per call read from those dumps: a deterministic
figure for changes smaller than the CPU time's noise floor.

``--full`` adds a fourth client, ``full``: ``sup.call`` with every flow-control gate engaged
(issue 8): the defaults (deadline, circuit breakers, retry budget, scheduler) plus a rate
limiter at a rate no block reaches (``rate_limit = {rate = 1e6, burst = 1000}``), so every call
takes a token. ``full - rmcp`` (paired per round, and in instructions) is what the engaged
limiter costs over the default config; ``full - mean(raw, raw2)`` the whole pipeline.

Only the public API of rmcp_actors and mcp is used, so the script measures whatever the call
path is at the commit it runs on.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import trio
from mcp import Client
from mcp.client._memory import InMemoryTransport

from rmcp_actors import RMCPSupervisor
from rmcp_actors.config import PolicyOverrides, RateLimitOverrides, RMCPConfig, ServerSpec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _noop_server import TOOL, build_server

Call = Callable[[int], Awaitable[None]]

# rmcp passes the SDK the call's remaining time minus a margin; raw passes the same magnitude.
TIMEOUT_S = 60.0
CLIENTS = ("raw", "raw2", "rmcp")
# --full: a fourth client with a rate limiter engaged on every call, never waiting.
FULL_CLIENTS = (*CLIENTS, "full")
FULL_OVERRIDES = PolicyOverrides(rate_limit=RateLimitOverrides(rate=1e6, burst=1000))


def raw_caller(client: Client) -> Call:
    async def call(n: int) -> None:
        result = await client.call_tool(TOOL, {"n": n}, read_timeout_seconds=TIMEOUT_S)
        if result.is_error:
            raise RuntimeError(f"raw call failed: {result.content}")

    return call


def rmcp_caller(sup: RMCPSupervisor, server: str = "noop") -> Call:
    async def call(n: int) -> None:
        result = await sup.call(server, TOOL, {"n": n}, timeout=TIMEOUT_S)
        if result.is_error:
            raise RuntimeError(f"rmcp call failed: {result.content}")

    return call


async def cpu_block(call: Call, calls: int, profiler: cProfile.Profile | None = None) -> float:
    """Make ``calls`` sequential calls; return the CPU µs per call."""
    gc.collect()
    if profiler is not None:
        profiler.enable()
    started = time.process_time()
    for n in range(calls):
        await call(n)
    elapsed = time.process_time() - started
    if profiler is not None:
        profiler.disable()
    return elapsed / calls * 1e6


async def open_clients(stack: AsyncExitStack, full: bool = False) -> dict[str, Call]:
    """Open raw, raw2 and rmcp (and full), each on its own no-op server; ``stack`` closes them."""
    clients: dict[str, Call] = {}
    for name in ("raw", "raw2"):
        client = await stack.enter_async_context(Client(InMemoryTransport(build_server())))
        clients[name] = raw_caller(client)
    spec = ServerSpec.in_memory("noop", build_server(), wire="jsonrpc")
    sup = await stack.enter_async_context(RMCPSupervisor.open(RMCPConfig(servers={"noop": spec})))
    clients["rmcp"] = rmcp_caller(sup)
    if full:
        # A runtime of its own, so that the two rmcp clients share no scheduler or lane.
        spec = ServerSpec.in_memory("full", build_server(), wire="jsonrpc", overrides=FULL_OVERRIDES)
        full_sup = await stack.enter_async_context(RMCPSupervisor.open(RMCPConfig(servers={"full": spec})))
        stack.push_async_callback(_check_limiter_engaged, full_sup)
        clients["full"] = rmcp_caller(full_sup, "full")
    return clients


async def _check_limiter_engaged(sup: RMCPSupervisor) -> None:
    """Fail the run unless every call of ``full`` took a limiter token at once (none waited)."""
    (limiter,) = sup.statistics().limiters
    gate = limiter.gates[0]
    if not gate.engaged or gate.taken == 0 or gate.waited or gate.rejected:
        raise RuntimeError(f"the rate limiter was not engaged on every call as intended: {gate}")


async def measure(
    rounds: int, calls: int, warmup: int, profiler: cProfile.Profile | None, full: bool = False
) -> dict[str, list[float]]:
    """Return each client's CPU µs per call, one sample per round."""
    names = FULL_CLIENTS if full else CLIENTS
    samples: dict[str, list[float]] = {name: [] for name in names}
    async with AsyncExitStack() as stack:
        clients = await open_clients(stack, full)
        for name in names:
            await cpu_block(clients[name], warmup)
        for index in range(rounds):
            shift = index % len(names)
            for name in names[shift:] + names[:shift]:
                # --full --profile: the full pipeline's blocks, else the default's.
                profile = profiler if name == ("full" if full else "rmcp") else None
                samples[name].append(await cpu_block(clients[name], calls, profile))
    return samples


async def callgrind_blocks(calls: int, full: bool = False) -> None:
    """One block per client, each between two callgrind dump markers (see --callgrind)."""
    names = FULL_CLIENTS if full else CLIENTS
    async with AsyncExitStack() as stack:
        clients = await open_clients(stack, full)
        for name in names:
            await cpu_block(clients[name], 300)
        for name in names:
            gc.collect()
            os.getppid()  # a dump: everything before this block
            for n in range(calls):
                await clients[name](n)
            os.getppid()  # a dump: this block alone


def callgrind_report(calls: int, full: bool = False) -> None:
    """Print instructions per call from the dumps of this process (callgrind.out.PID.N)."""
    names = FULL_CLIENTS if full else CLIENTS
    totals: list[int] = []
    for index in range(1, 2 * len(names) + 1):
        dump = Path(f"callgrind.out.{os.getpid()}.{index}")
        if not dump.exists():
            sys.exit(f"no {dump}: run under valgrind --tool=callgrind --dump-before=getppid")
        line = next(line for line in dump.read_text().splitlines() if line.startswith("totals:"))
        totals.append(int(line.split()[1]))
    per_call = {name: totals[2 * index + 1] / calls for index, name in enumerate(names)}
    base = (per_call["raw"] + per_call["raw2"]) / 2
    print(f"instructions per call (callgrind), one block of {calls} sequential calls per client:")
    for name in names:
        print(f"  {name:<5} {per_call[name]:12,.0f}")
    print(
        f"  added {per_call['rmcp'] - base:12,.0f}  (rmcp - mean(raw, raw2); ratio "
        f"{per_call['rmcp'] / base:.3f}; raw2 - raw {per_call['raw2'] - per_call['raw']:+,.0f})"
    )
    if full:
        print(
            f"  full  {per_call['full'] - base:12,.0f}  (full - mean(raw, raw2); ratio "
            f"{per_call['full'] / base:.3f}); the engaged limiter: full - rmcp "
            f"{per_call['full'] - per_call['rmcp']:+,.0f}"
        )


def paired(samples: dict[str, list[float]]) -> dict[str, float]:
    """The per-round figures against the mean of raw and raw2, medians over rounds."""
    base = [(a + b) / 2 for a, b in zip(samples["raw"], samples["raw2"], strict=True)]
    figures = {
        "added_us": statistics.median(r - b for r, b in zip(samples["rmcp"], base, strict=True)),
        "ratio": statistics.median(r / b for r, b in zip(samples["rmcp"], base, strict=True)),
        "control_us": statistics.median(b - a for a, b in zip(samples["raw"], samples["raw2"], strict=True)),
    }
    if "full" in samples:
        full = samples["full"]
        figures["full_added_us"] = statistics.median(f - b for f, b in zip(full, base, strict=True))
        figures["full_ratio"] = statistics.median(f / b for f, b in zip(full, base, strict=True))
        figures["full_minus_rmcp_us"] = statistics.median(
            f - r for f, r in zip(full, samples["rmcp"], strict=True)
        )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 8 rounds of 200 calls")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (one block per client; default 40)")
    parser.add_argument("--calls", type=int, default=None, help="calls per block (default 250)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures as JSON")
    parser.add_argument("--profile", type=Path, metavar="PATH", help="cProfile the rmcp blocks into PATH")
    parser.add_argument(
        "--callgrind", action="store_true", help="instructions per call, under valgrind (see above)"
    )
    parser.add_argument(
        "--full", action="store_true", help="add a client with a rate limiter engaged (issue 8's pipeline)"
    )
    options = parser.parse_args()
    if options.callgrind:
        calls = options.calls or 200
        trio.run(callgrind_blocks, calls, options.full)
        callgrind_report(calls, options.full)
        return
    rounds = options.rounds or (8 if options.quick else 40)
    calls = options.calls or (200 if options.quick else 250)
    profiler = cProfile.Profile() if options.profile is not None else None

    started = time.perf_counter()
    samples = trio.run(measure, rounds, calls, 300, profiler, options.full)
    wall = time.perf_counter() - started
    if profiler is not None and options.profile is not None:
        profiler.dump_stats(options.profile)

    median = {name: statistics.median(values) for name, values in samples.items()}
    figures: dict[str, Any] = {
        "python": sys.version.split()[0],
        "rounds": rounds,
        "calls_per_block": calls,
        "wall_s": wall,
        "cpu_us_per_call": median,
        **paired(samples),
        "samples_us": samples,
    }
    print(
        f"CPU per call, in-memory JSON-RPC wire: {rounds} rounds x {calls} sequential calls per client "
        f"(python {figures['python']}, {wall:.0f} s{', rmcp profiled' if profiler else ''})"
    )
    for name in samples:
        values = samples[name]
        spread = f"blocks {min(values):.1f} .. {max(values):.1f}"
        print(f"  {name:<5} {median[name]:7.1f} µs/call  (median; {spread})")
    print(
        f"  added {figures['added_us']:7.1f} µs/call  (rmcp - mean(raw, raw2), paired per round; "
        f"ratio {figures['ratio']:.3f}; noise floor raw2 - raw {figures['control_us']:+.1f} µs)"
    )
    if options.full:
        print(
            f"  full  {figures['full_added_us']:7.1f} µs/call  (full - mean(raw, raw2), paired; ratio "
            f"{figures['full_ratio']:.3f}); the engaged limiter: full - rmcp "
            f"{figures['full_minus_rmcp_us']:+.1f} µs"
        )
    if options.json is not None:
        options.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
