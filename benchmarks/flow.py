"""Flow control under failure: the open-breaker fast-fail, and retry amplification (issue 8).

Usage::

    python benchmarks/flow.py [--quick] [--json PATH] [--blocks N] [--calls N]
                              [--offered N] [--rate R [--rate R ...]]

Both parts use a failing RMCP server in memory: the no-op tool of ``_noop_server.py`` with the
RMCP server side installed (``install(app, store=...)``) over a dedup store that fails every
claim, so the server answers every attempt with the retryable NACK ``unavailable`` ("the tool
did not run, retry later"). That NACK is a fault of the whole server for the circuit breakers
(``flow/breaker.py``, ``fault_of``) and a retryable failure for the call path: the honest
"dependency is down" case. The store counts the attempts it receives (one ``begin`` per
attempt), so attempts are counted on the server side.

**Fast-fail** (goal: an ``RMCPCircuitOpenError`` costs at most 5 % of one raw in-memory call).
One ``trio.run``, on the real clock: ``raw`` and ``raw2`` are bare ``mcp.Client``s on the
healthy no-op server over the SDK's ``InMemoryTransport`` (JSON-RPC wire), ``open`` is
``sup.call`` to the failing server (same wire), with the default policy except an open period
of an hour (``circuit_breaker = {open_s = 3600, max_open_s = 3600}``) so that it stays open for
the whole run. The breaker is tripped by calling until it opens (default policy: the NACKs are
retried with backoff until five consecutive failures open it), then the clients run interleaved
blocks of sequential calls (raw, raw2, open, raw, ...; ``gc.collect()`` before each block). The
server must receive no attempt during the blocks. Figures: median per-call latency
(``perf_counter`` around each ``await``) and CPU time per call (``process_time`` over the block);
``open/raw`` is the judged fraction (of the median latencies); ``raw2/raw`` is the noise floor.

**Amplification** (goal: attempts received / offered calls <= 1.2 under total failure).
``offered`` calls (1,000) are started at ``rate`` calls/s, one task each, against the failing
server, with the default policy: deadline 60 s, ``retry.max_attempts`` unset (against a server
that deduplicates: retry until the deadline), the default retry budget (``ratio = 0.2``,
``min_per_s = 3``); once with the circuit breaker disabled (so the budget alone is measured),
once with it enabled (the default). Time is trio's ``MockClock(autojump_threshold=0)``: the
backoff sleeps and deadlines are simulated, so the counts are those of the real timing logic and
do not depend on how fast this machine is. Printed: attempts, attempts / offered (goal <= 1.2),
the budget's bound ``(1 + ratio) x offered + min_per_s x (duration + reserve)`` (``reserve`` is
``flow.budget.MEMORY_S``: a new budget starts with ``min_per_s x MEMORY_S`` tokens) and whether
the attempts stay within it; ``duration`` is from the first call to the last one's end.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
import trio.testing
from mcp import Client
from mcp.client._memory import InMemoryTransport

from rmcp_actors import RMCPCircuitOpenError, RMCPError, RMCPSupervisor
from rmcp_actors.config import (
    CircuitBreakerOverrides,
    PolicyOverrides,
    RetryBudgetOverrides,
    RMCPConfig,
    ServerSpec,
)
from rmcp_actors.flow.budget import MEMORY_S
from rmcp_actors.server import install
from rmcp_actors.stores import MemoryStore

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import finite
from _noop_server import TOOL, build_server

Call = Callable[[int], Awaitable[None]]

TIMEOUT_S = 60.0
FAST_FAIL_GOAL = 0.05
AMPLIFICATION_GOAL = 1.2
# Long enough that the breaker stays open for the whole run (the default is 30 s).
STAY_OPEN = CircuitBreakerOverrides(open_s=3600.0, max_open_s=3600.0)
# The defaults of retry_budget (config/_policy.py), for the bound.
BUDGET_RATIO = 0.2
BUDGET_MIN_PER_S = 3.0


class DownStore:
    """A dedup store that fails every claim, so the server NACKs each attempt ``unavailable``
    (retryable, the tool did not run); counts the attempts it received."""

    def __init__(self) -> None:
        self.inner = MemoryStore()
        self.received = 0

    @property
    def durable(self) -> bool:
        return False

    async def begin(self, key: str, **kwargs: Any) -> Any:
        self.received += 1
        raise OSError("the store is down")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def failing_server() -> tuple[Any, DownStore]:
    store = DownStore()
    store_any: Any = store
    return install(build_server("down"), store=store_any), store


# -- fast-fail -----------------------------------------------------------------------------


@dataclass
class Samples:
    latencies_s: list[float] = field(default_factory=list[float])
    cpu_us: list[float] = field(default_factory=list[float])  # per call, one per block
    block_median_s: list[float] = field(default_factory=list[float])

    def latency_us(self) -> float:
        return statistics.median(self.latencies_s) * 1e6

    def cpu_per_call_us(self) -> float:
        return statistics.median(self.cpu_us)


async def timed_block(call: Call, calls: int, samples: Samples) -> None:
    clock = time.perf_counter
    latencies: list[float] = []
    gc.collect()
    cpu_started = time.process_time()
    for n in range(calls):
        started = clock()
        await call(n)
        latencies.append(clock() - started)
    samples.cpu_us.append((time.process_time() - cpu_started) / calls * 1e6)
    samples.latencies_s.extend(latencies)
    samples.block_median_s.append(statistics.median(latencies))


async def trip(sup: RMCPSupervisor, store: DownStore) -> tuple[int, float]:
    """Call the failing server until its breaker opens; return the attempts and seconds it took."""
    started = trio.current_time()
    while True:
        try:
            await sup.call("down", TOOL, {"n": 0}, timeout=TIMEOUT_S)
        except RMCPCircuitOpenError:
            return store.received, trio.current_time() - started
        except RMCPError:
            continue
        raise RuntimeError("the failing server answered a call")


def open_caller(sup: RMCPSupervisor) -> Call:
    async def call(n: int) -> None:
        try:
            await sup.call("down", TOOL, {"n": n}, timeout=TIMEOUT_S)
        except RMCPCircuitOpenError:
            return
        raise RuntimeError("a call passed the open breaker")

    return call


async def fast_fail(blocks: int, calls: int, progress: Callable[[str], None]) -> dict[str, Any]:
    samples = {name: Samples() for name in ("raw", "raw2", "open")}
    async with AsyncExitStack() as stack:
        callers: dict[str, Call] = {}
        for name in ("raw", "raw2"):
            client = await stack.enter_async_context(Client(InMemoryTransport(build_server())))

            async def raw_call(n: int, client: Client = client) -> None:
                result = await client.call_tool(TOOL, {"n": n}, read_timeout_seconds=TIMEOUT_S)
                if result.is_error:
                    raise RuntimeError(f"raw call failed: {result.content}")

            callers[name] = raw_call
        app, store = failing_server()
        spec = ServerSpec.in_memory(
            "down", app, wire="jsonrpc", overrides=PolicyOverrides(circuit_breaker=STAY_OPEN)
        )
        sup = await stack.enter_async_context(RMCPSupervisor.open(RMCPConfig(servers={"down": spec})))
        trip_attempts, trip_s = await trip(sup, store)
        progress(f"  breaker open after {trip_attempts} attempts, {trip_s:.1f} s")
        callers["open"] = open_caller(sup)
        for call in callers.values():  # warm-up
            await timed_block(call, min(calls, 200), Samples())
        received_before = store.received
        for index in range(blocks):
            for name in ("raw", "raw2", "open"):
                await timed_block(callers[name], calls, samples[name])
            progress(f"  fast-fail: block {index + 1}/{blocks}")
        sent_while_open = store.received - received_before
        breaker = next(b for b in sup.statistics().breakers if b.tool is None)
    if sent_while_open:
        raise RuntimeError(f"{sent_while_open} attempts reached the server while its breaker was open")
    raw, raw2, open_ = (samples[name] for name in ("raw", "raw2", "open"))
    fraction = open_.latency_us() / raw.latency_us()
    return {
        "blocks": blocks,
        "calls_per_block": calls,
        "trip_attempts": trip_attempts,
        "trip_s": trip_s,
        "server_breaker_state": str(breaker.state.value),
        "latency_us": {name: s.latency_us() for name, s in samples.items()},
        "cpu_us_per_call": {name: s.cpu_per_call_us() for name, s in samples.items()},
        "fraction": fraction,
        "paired_fraction": statistics.median(
            o / r for o, r in zip(open_.block_median_s, raw.block_median_s, strict=True)
        ),
        "cpu_fraction": statistics.median(o / r for o, r in zip(open_.cpu_us, raw.cpu_us, strict=True)),
        "control": raw2.latency_us() / raw.latency_us(),
        "goal": FAST_FAIL_GOAL,
        "pass": fraction <= FAST_FAIL_GOAL,
    }


CALLGRIND_CLIENTS = ("raw", "raw2", "open")


async def callgrind_blocks(calls: int) -> None:
    """One block per client, each between two callgrind dump markers (as cpu_per_call.py)."""
    async with AsyncExitStack() as stack:
        callers: dict[str, Call] = {}
        for name in ("raw", "raw2"):
            client = await stack.enter_async_context(Client(InMemoryTransport(build_server())))

            async def raw_call(n: int, client: Client = client) -> None:
                await client.call_tool(TOOL, {"n": n}, read_timeout_seconds=TIMEOUT_S)

            callers[name] = raw_call
        app, store = failing_server()
        spec = ServerSpec.in_memory(
            "down", app, wire="jsonrpc", overrides=PolicyOverrides(circuit_breaker=STAY_OPEN)
        )
        sup = await stack.enter_async_context(RMCPSupervisor.open(RMCPConfig(servers={"down": spec})))
        await trip(sup, store)
        callers["open"] = open_caller(sup)
        for call in callers.values():
            await timed_block(call, 300, Samples())
        for name in CALLGRIND_CLIENTS:
            gc.collect()
            os.getppid()  # a dump: everything before this block
            for n in range(calls):
                await callers[name](n)
            os.getppid()  # a dump: this block alone


def callgrind_report(calls: int) -> None:
    """Print instructions per call from this process's dumps (callgrind.out.PID.N)."""
    totals: list[int] = []
    for index in range(1, 2 * len(CALLGRIND_CLIENTS) + 1):
        dump = Path(f"callgrind.out.{os.getpid()}.{index}")
        if not dump.exists():
            sys.exit(f"no {dump}: run under valgrind --tool=callgrind --dump-before=getppid")
        line = next(line for line in dump.read_text().splitlines() if line.startswith("totals:"))
        totals.append(int(line.split()[1]))
    per_call = {name: totals[2 * index + 1] / calls for index, name in enumerate(CALLGRIND_CLIENTS)}
    base = (per_call["raw"] + per_call["raw2"]) / 2
    print(f"open-breaker fast-fail, instructions per call (callgrind), {calls} sequential calls per client:")
    for name in CALLGRIND_CLIENTS:
        print(f"  {name:<5} {per_call[name]:12,.0f}")
    fraction = per_call["open"] / base
    print(
        f"  open / mean(raw, raw2) {fraction:.2%} (raw2 - raw {per_call['raw2'] - per_call['raw']:+,.0f})  "
        f"goal <= {FAST_FAIL_GOAL:.0%} {_verdict(fraction <= FAST_FAIL_GOAL)}"
    )


# -- amplification -------------------------------------------------------------------------


async def amplification(offered: int, rate: float, breaker: bool, min_per_s: float) -> dict[str, Any]:
    app, store = failing_server()
    overrides = PolicyOverrides(
        circuit_breaker=CircuitBreakerOverrides(mode="enabled" if breaker else "disabled"),
        retry_budget=RetryBudgetOverrides(min_per_s=None if min_per_s == BUDGET_MIN_PER_S else min_per_s),
    )
    spec = ServerSpec.in_memory("down", app, overrides=overrides)
    outcomes: Counter[str] = Counter()
    async with RMCPSupervisor.open(RMCPConfig(servers={"down": spec})) as sup:
        started = trio.current_time()

        async def one(n: int) -> None:
            try:
                await sup.call("down", TOOL, {"n": n})
            except RMCPCircuitOpenError:
                outcomes["circuit open"] += 1
            except RMCPError as error:
                text = str(error)
                if "retry budget" in text:
                    outcomes["budget exhausted"] += 1
                elif "deadline" in text or "timeout" in text.lower():
                    outcomes["deadline"] += 1
                else:
                    outcomes[type(error).__name__] += 1
            else:
                raise RuntimeError("the failing server answered a call")

        async with trio.open_nursery() as nursery:
            for n in range(offered):
                nursery.start_soon(one, n)
                await trio.sleep(1 / rate)
        duration = trio.current_time() - started
        budget = sup.statistics().budgets[0]
    attempts = store.received
    bound = (1 + BUDGET_RATIO) * offered + min_per_s * (duration + MEMORY_S)
    ratio = attempts / offered
    return {
        "breaker": "enabled" if breaker else "disabled",
        "min_per_s": min_per_s,
        # The attempts the ratio term pays for: those beyond min_per_s x (duration + reserve).
        "ratio_term": (attempts - min_per_s * (duration + MEMORY_S)) / offered,
        "offered": offered,
        "rate_per_s": rate,
        "attempts": attempts,
        "ratio": ratio,
        "duration_s": duration,
        "bound": bound,
        "within_bound": attempts <= bound,
        "budget_retries": budget.retries,
        "budget_refused": budget.refused,
        "outcomes": dict(outcomes),
        "goal": AMPLIFICATION_GOAL,
        "pass": ratio <= AMPLIFICATION_GOAL,
    }


# -- report --------------------------------------------------------------------------------


def _verdict(passed: bool) -> str:
    return "PASS" if passed else "MISS"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer, shorter fast-fail blocks (~15 s)")
    parser.add_argument("--blocks", type=int, help="fast-fail blocks per client (default 9; quick 5)")
    parser.add_argument("--calls", type=int, help="calls per fast-fail block (default 1000; quick 300)")
    parser.add_argument("--offered", type=int, default=1000, help="offered calls (amplification)")
    parser.add_argument(
        "--rate", type=float, action="append", help="offered calls/s (repeatable; default 100 and 1000)"
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures as JSON")
    parser.add_argument(
        "--callgrind",
        action="store_true",
        help="fast-fail in instructions, under valgrind --tool=callgrind --dump-before=getppid",
    )
    options = parser.parse_args()
    # The server logs every NACK it sends, the breakers every change: thousands of lines.
    logging.getLogger("rmcp_actors").setLevel(logging.ERROR)
    if options.callgrind:
        calls = options.calls or 200
        trio.run(callgrind_blocks, calls)
        callgrind_report(calls)
        return
    blocks = options.blocks or (5 if options.quick else 9)
    calls = options.calls or (300 if options.quick else 1000)
    rates: list[float] = options.rate or [100.0, 1000.0]

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    wall_started = time.perf_counter()
    fast = trio.run(fast_fail, blocks, calls, progress)
    rows: list[dict[str, Any]] = []
    # The default budget without, then with the breaker; then the ratio term alone (min_per_s = 0).
    variants = ((False, BUDGET_MIN_PER_S), (True, BUDGET_MIN_PER_S), (False, 0.0))
    for rate in rates:
        for breaker, min_per_s in variants:
            rows.append(
                trio.run(
                    amplification,
                    options.offered,
                    rate,
                    breaker,
                    min_per_s,
                    clock=trio.testing.MockClock(autojump_threshold=0),
                )
            )
            progress(f"  amplification: {rate:g}/s, breaker {rows[-1]['breaker']}, min_per_s {min_per_s:g}")
    wall = time.perf_counter() - wall_started

    print(
        f"rmcp_actors flow control under failure; python {sys.version.split()[0]}, "
        f"{'quick' if options.quick else 'full'} run in {wall:.0f} s"
    )
    print(
        f"\nopen-breaker fast-fail: {blocks} interleaved blocks x {calls} sequential calls per client, "
        f"in-memory JSON-RPC wire (breaker tripped by {fast['trip_attempts']} NACKed attempts in "
        f"{fast['trip_s']:.1f} s)"
    )
    header = f"{'client':<6} {'median µs':>10} {'CPU µs/call':>12}"
    print(header)
    print("-" * len(header))
    for name in ("raw", "raw2", "open"):
        print(f"{name:<6} {fast['latency_us'][name]:>10.1f} {fast['cpu_us_per_call'][name]:>12.1f}")
    print(
        f"open/raw {fast['fraction']:.2%} of a raw call (median latency; paired per block "
        f"{fast['paired_fraction']:.2%}; CPU {fast['cpu_fraction']:.2%}; raw2/raw {fast['control']:.3f})  "
        f"goal <= {FAST_FAIL_GOAL:.0%} {_verdict(fast['pass'])}"
    )
    print(
        f"\namplification under total failure: {options.offered:,} offered calls, every attempt NACKed "
        f"'unavailable'; default policy\n(deadline {TIMEOUT_S:g} s, retry until the deadline, retry_budget "
        f"ratio {BUDGET_RATIO}, min_per_s {BUDGET_MIN_PER_S:g} unless min/s says); MockClock"
    )
    header = (
        f"{'rate/s':>7} {'breaker':<8} {'min/s':>5} {'attempts':>8} {'/offered':>8} {'ratio term':>10} "
        f"{'duration s':>10} {'bound':>7}  goals; outcomes"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        outcomes = ", ".join(f"{name} {count}" for name, count in sorted(row["outcomes"].items()))
        print(
            f"{row['rate_per_s']:>7g} {row['breaker']:<8} {row['min_per_s']:>5g} {row['attempts']:>8} "
            f"{row['ratio']:>8.3f} {row['ratio_term']:>10.3f} {row['duration_s']:>10.1f}"
            f" {row['bound']:>7.0f}  <=1.2x {_verdict(row['pass'])}, "
            f"<=bound {_verdict(row['within_bound'])}; {outcomes}"
        )
    print(
        "attempts: received by the server (its store's claims). bound: (1 + ratio) x offered + min_per_s x\n"
        f"(duration + {MEMORY_S:g} s reserve). duration: first call to the last call's end. ratio term:\n"
        "(attempts - min_per_s x (duration + reserve)) / offered, what the per-call ratio let through.\n"
        "Rows with min/s 0 are not the default: they isolate the ratio term (goal judged on it alone)."
    )
    if options.json is not None:
        document = {"python": sys.version, "wall_s": wall, "fast_fail": fast, "amplification": rows}
        options.json.write_text(json.dumps(finite(document), indent=2) + "\n")


if __name__ == "__main__":
    main()
