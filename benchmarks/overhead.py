"""Overhead of ``sup.call`` over a raw ``mcp.Client.call_tool``, on the same no-op tool.

Usage::

    python benchmarks/overhead.py [--quick] [--json PATH] [--blocks N] [--pipeline default|full]

One process, one ``trio.run``. For each transport (in memory over the JSON-RPC wire, and
stdio) three clients are opened side by side and kept open:

* ``raw``:  ``mcp.Client(InMemoryTransport(server))`` / ``mcp.Client(StdioServerParameters(...))``
* ``raw2``: a second, identical raw client: the control, so that raw2/raw shows the noise
* ``rmcp``: an ``RMCPSupervisor`` with ``ServerSpec.in_memory(..., wire="jsonrpc")`` /
  ``ServerSpec.stdio(...)`` running the same server

The no-op server is a plain MCP server, so rmcp sends it no ``_meta.rmcp`` (it sends that only
to servers that advertise RMCP) and neither does raw; both pass a ``read_timeout_seconds``, so
both sides do the same wire work. (The RMCP server side is measured by
``benchmarks/server_overhead.py``.) For each
concurrency (1 caller, then 50 callers) the clients run interleaved blocks of the same number
of calls (raw, raw2, rmcp, raw, raw2, rmcp, ...), after a warm-up of each; ``gc.collect()``
runs before every block. Reported figures are medians over blocks (throughput) and over all
measured calls (per-call latency, ``time.perf_counter()`` around each ``await``).

Goals (from the issue): throughput ratio rmcp/raw >= 0.95 over stdio and >= 0.90 in memory,
and added median latency <= 75 µs. The latency goal is judged on the sequential rows, where a
call's latency is its service time; with 50 callers latency is queueing-bound (Little's law:
50 / throughput), so the throughput ratio is the figure that measures overhead there.

``--pipeline full`` runs rmcp with every flow-control gate engaged (issue 8): besides the
defaults (deadline, circuit breakers, retry budget, scheduler), a rate limiter at a rate no
block reaches (``rate_limit = {rate = 1e6, burst = 1000}``), so every call takes a token. The
added-latency goal is then issue 8's, 40 µs; the throughput goals stay.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import trio
from mcp import Client, StdioServerParameters
from mcp.client._memory import InMemoryTransport

from rmcp_actors import RMCPSupervisor
from rmcp_actors.config import PolicyOverrides, RateLimitOverrides, RMCPConfig, RuntimeSettings, ServerSpec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import Block, Series, finite
from _noop_server import TOOL, build_server

NOOP_SERVER = Path(__file__).resolve().with_name("_noop_server.py")

Transport = Literal["memory", "stdio"]
Pipeline = Literal["default", "full"]
Call = Callable[[int], Awaitable[None]]

CONCURRENT_CALLERS = 50
# At least CONCURRENT_CALLERS, on the server policy and the runtime, so that the 50-caller
# run is never throttled by admission.
MAX_CONCURRENCY = 64
RMCP_TIMEOUT_S = 60.0
# rmcp passes the remaining deadline minus 20 ms; the raw baseline passes the same magnitude.
RAW_READ_TIMEOUT_S = 60.0

THROUGHPUT_GOAL: dict[Transport, float] = {"memory": 0.90, "stdio": 0.95}
ADDED_LATENCY_GOAL_US = 75.0
# Issue 8: the full flow-control pipeline adds at most this much median latency.
FULL_PIPELINE_LATENCY_GOAL_US = 40.0
# A limiter engaged on every call that never makes one wait: far above any block's rate.
FULL_RATE_LIMIT = RateLimitOverrides(rate=1e6, burst=1000)
LATENCY_GOAL_US: dict[Pipeline, float] = {
    "default": ADDED_LATENCY_GOAL_US,
    "full": FULL_PIPELINE_LATENCY_GOAL_US,
}


@dataclass(frozen=True)
class Mode:
    """How many calls to make: per block, per warm-up, and how many blocks of each client."""

    blocks: int
    sequential_calls: dict[Transport, int]
    concurrent_calls: dict[Transport, int]
    warmup_calls: int


# Stdio throughput drifts by +-15 % from block to block on a small VM (see raw2/raw): many
# short interleaved blocks give steadier medians than a few long ones.
FULL = Mode(
    blocks=9,
    sequential_calls={"memory": 1500, "stdio": 500},
    concurrent_calls={"memory": 3000, "stdio": 1200},
    warmup_calls=300,
)
QUICK = Mode(
    blocks=5,
    sequential_calls={"memory": 200, "stdio": 150},
    concurrent_calls={"memory": 500, "stdio": 400},
    warmup_calls=100,
)


@dataclass
class Row:
    """One (transport x concurrency) row of the table."""

    transport: Transport
    callers: int
    pipeline: Pipeline = "default"
    raw: Series = field(default_factory=Series)
    raw2: Series = field(default_factory=Series)
    rmcp: Series = field(default_factory=Series)

    @property
    def ratio(self) -> float:
        return self.rmcp.throughput() / self.raw.throughput()

    @property
    def control(self) -> float:
        return self.raw2.throughput() / self.raw.throughput()

    @property
    def paired_ratio(self) -> float:
        """Median of rmcp/raw over the blocks run side by side (robust to drift)."""
        return statistics.median(
            r.throughput / b.throughput for r, b in zip(self.rmcp.blocks, self.raw.blocks, strict=True)
        )

    @property
    def added_us(self) -> float:
        return self.rmcp.latency_us() - self.raw.latency_us()

    @property
    def throughput_goal(self) -> float:
        return THROUGHPUT_GOAL[self.transport]

    @property
    def throughput_pass(self) -> bool:
        return self.ratio >= self.throughput_goal

    @property
    def within_noise(self) -> bool:
        """The ratio is nearer its goal than the control ratio is to 1: the verdict is noise."""
        return abs(self.ratio - self.throughput_goal) <= abs(1.0 - self.control)

    @property
    def latency_judged(self) -> bool:
        return self.callers == 1

    @property
    def latency_goal_us(self) -> float:
        return LATENCY_GOAL_US[self.pipeline]

    @property
    def latency_pass(self) -> bool:
        return self.added_us <= self.latency_goal_us

    def summary(self) -> dict[str, Any]:
        return {
            "transport": self.transport,
            "callers": self.callers,
            "pipeline": self.pipeline,
            "raw": self.raw.summary(),
            "raw2": self.raw2.summary(),
            "rmcp": self.rmcp.summary(),
            "ratio_rmcp_raw": self.ratio,
            "paired_ratio_rmcp_raw": self.paired_ratio,
            "control_raw2_raw": self.control,
            "added_latency_us": self.added_us,
            "throughput_goal": self.throughput_goal,
            "throughput_pass": self.throughput_pass,
            "throughput_verdict_within_noise": self.within_noise,
            "latency_goal_us": self.latency_goal_us if self.latency_judged else None,
            "latency_pass": self.latency_pass if self.latency_judged else None,
        }


# -- the three clients ---------------------------------------------------------------------


def raw_caller(client: Client) -> Call:
    """A call through the bare SDK client, with a read timeout as rmcp sets one."""

    async def call(n: int) -> None:
        result = await client.call_tool(TOOL, {"n": n}, read_timeout_seconds=RAW_READ_TIMEOUT_S)
        if result.is_error:
            raise RuntimeError(f"raw call failed: {result.content}")

    return call


def rmcp_caller(sup: RMCPSupervisor) -> Call:
    """A call through ``sup.call``."""

    async def call(n: int) -> None:
        result = await sup.call("noop", TOOL, {"n": n}, timeout=RMCP_TIMEOUT_S)
        if result.is_error:
            raise RuntimeError(f"rmcp call failed: {result.content}")

    return call


@asynccontextmanager
async def open_clients(transport: Transport, pipeline: Pipeline) -> AsyncIterator[dict[str, Call]]:
    """Open raw, raw2 and rmcp to the no-op server over ``transport``; close them on exit."""
    overrides = PolicyOverrides(max_concurrency=MAX_CONCURRENCY)
    if pipeline == "full":
        overrides = PolicyOverrides(max_concurrency=MAX_CONCURRENCY, rate_limit=FULL_RATE_LIMIT)
    async with AsyncExitStack() as stack:
        raws: list[Call] = []
        for _ in range(2):
            if transport == "memory":
                client = Client(InMemoryTransport(build_server()))
            else:
                client = Client(StdioServerParameters(command=sys.executable, args=[str(NOOP_SERVER)]))
            raws.append(raw_caller(await stack.enter_async_context(client)))
        if transport == "memory":
            spec = ServerSpec.in_memory("noop", build_server(), wire="jsonrpc", overrides=overrides)
        else:
            spec = ServerSpec.stdio("noop", sys.executable, [str(NOOP_SERVER)], overrides=overrides)
        config = RMCPConfig(runtime=RuntimeSettings(max_concurrency=MAX_CONCURRENCY), servers={"noop": spec})
        sup = await stack.enter_async_context(RMCPSupervisor.open(config))
        if pipeline == "full":
            stack.push_async_callback(_check_limiter_engaged, sup)
        yield {"raw": raws[0], "raw2": raws[1], "rmcp": rmcp_caller(sup)}


async def _check_limiter_engaged(sup: RMCPSupervisor) -> None:
    """Fail the run unless every rmcp call took a limiter token at once (none waited)."""
    (limiter,) = sup.statistics().limiters
    gate = limiter.gates[0]
    if not gate.engaged or gate.taken == 0 or gate.waited or gate.rejected:
        raise RuntimeError(f"the rate limiter was not engaged on every call as intended: {gate}")


# -- blocks --------------------------------------------------------------------------------


async def run_block(call: Call, calls: int, callers: int) -> Block:
    """Make ``calls`` calls from ``callers`` concurrent tasks; time each call and the block."""
    clock = time.perf_counter
    latencies: list[float] = []
    record = latencies.append
    per_caller = calls // callers

    async def caller() -> None:
        for n in range(per_caller):
            start = clock()
            await call(n)
            record(clock() - start)

    gc.collect()
    started = clock()
    if callers == 1:
        await caller()
    else:
        async with trio.open_nursery() as nursery:
            for _ in range(callers):
                nursery.start_soon(caller)
    elapsed = clock() - started
    return Block(calls=per_caller * callers, elapsed_s=elapsed, latencies_s=latencies)


async def measure(
    transport: Transport, mode: Mode, progress: Callable[[str], None], pipeline: Pipeline = "default"
) -> list[Row]:
    rows: list[Row] = []
    async with open_clients(transport, pipeline) as clients:
        for name, call in clients.items():  # warm-up: tool listing, caches, code paths
            await run_block(call, mode.warmup_calls, 1)
            await run_block(call, mode.warmup_calls, min(CONCURRENT_CALLERS, mode.warmup_calls))
            progress(f"  warmed up {transport}/{name}")
        for callers in (1, CONCURRENT_CALLERS):
            calls = mode.sequential_calls[transport] if callers == 1 else mode.concurrent_calls[transport]
            row = Row(transport, callers, pipeline)
            for index in range(mode.blocks):
                for name, series in (("raw", row.raw), ("raw2", row.raw2), ("rmcp", row.rmcp)):
                    series.blocks.append(await run_block(clients[name], calls, callers))
                progress(f"  {transport} x{callers}: block {index + 1}/{mode.blocks}")
            rows.append(row)
    return rows


# -- report --------------------------------------------------------------------------------


def _verdict(passed: bool) -> str:
    return "PASS" if passed else "MISS"


def render(rows: list[Row]) -> str:
    header = (
        f"{'transport':<9} {'callers':>7} {'raw/s':>9} {'rmcp/s':>9} {'rmcp/raw':>8} {'paired':>6} "
        f"{'raw2/raw':>8} {'raw µs':>8} {'rmcp µs':>8} {'added µs':>8}  goals"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        goals = f"ratio>={row.throughput_goal:.2f} {_verdict(row.throughput_pass)}"
        if row.within_noise:
            goals += " (within noise)"
        if row.latency_judged:
            goals += f"; added<={row.latency_goal_us:g}µs {_verdict(row.latency_pass)}"
        else:
            goals += "; added: n/a (queueing-bound)"
        lines.append(
            f"{row.transport:<9} {row.callers:>7} {row.raw.throughput():>9.0f} {row.rmcp.throughput():>9.0f} "
            f"{row.ratio:>8.3f} {row.paired_ratio:>6.3f} {row.control:>8.3f} {row.raw.latency_us():>8.1f} "
            f"{row.rmcp.latency_us():>8.1f} {row.added_us:>8.1f}  {goals}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer calls: a smoke run of ~30 s")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures as JSON")
    parser.add_argument("--blocks", type=int, help="blocks per client per row (at least 5)")
    parser.add_argument(
        "--transport", choices=["memory", "stdio"], action="append", help="only these (repeatable)"
    )
    parser.add_argument(
        "--pipeline",
        choices=["default", "full"],
        default="default",
        help="rmcp's config: the defaults, or 'full' with a rate limiter engaged (issue 8)",
    )
    options = parser.parse_args()
    pipeline: Pipeline = options.pipeline
    mode = QUICK if options.quick else FULL
    if options.blocks is not None:
        if options.blocks < 5:
            parser.error("--blocks must be at least 5")
        mode = Mode(options.blocks, mode.sequential_calls, mode.concurrent_calls, mode.warmup_calls)
    transports: list[Transport] = options.transport or ["memory", "stdio"]

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    async def run() -> list[Row]:
        rows: list[Row] = []
        for transport in transports:
            rows.extend(await measure(transport, mode, progress, pipeline))
        return rows

    started = time.perf_counter()
    rows = trio.run(run)
    wall = time.perf_counter() - started

    print(
        f"rmcp_actors overhead: no-op tool, {mode.blocks} interleaved blocks per client "
        f"(raw, raw2, rmcp), medians; python {sys.version.split()[0]}, "
        f"{'quick' if options.quick else 'full'} run in {wall:.0f} s"
        + (
            "\nrmcp pipeline: full (defaults + rate limiter engaged: rate_limit = {rate = 1e6, burst = 1000})"
            if pipeline == "full"
            else ""
        )
    )
    print(render(rows))
    print(
        "rmcp/raw: ratio of the median throughputs (the judged figure). paired: median of rmcp/raw\n"
        "over side-by-side blocks (less sensitive to drift). raw2/raw: a second identical raw\n"
        "client, the noise floor of the ratio; 'within noise' = the ratio is nearer its goal than\n"
        "raw2/raw is to 1. Latency: per call (perf_counter); added = rmcp - raw median latency,\n"
        "judged on sequential rows only."
    )
    if options.json is not None:
        document = {
            "python": sys.version,
            "mode": "quick" if options.quick else "full",
            "blocks": mode.blocks,
            "pipeline": pipeline,
            "wall_s": wall,
            "rows": [row.summary() for row in rows],
        }
        options.json.write_text(json.dumps(finite(document), indent=2) + "\n")


if __name__ == "__main__":
    main()
