"""``sup.map`` over many no-op calls against the obvious alternative: calls/s and peak memory.

Usage::

    python benchmarks/map.py [--quick] [--items N] [--traced-items N] [--rounds N]
                             [--concurrency N] [--json PATH]

Every variant makes ``items`` calls of the no-op tool (``_noop_server.py``) on the SDK's direct
in-memory wire (the server's handler runs in the caller's task: no serialization, no transport),
``concurrency`` at a time, over the lazily generated arguments ``{"n": 0}, {"n": 1}, ...``:

* ``map``: ``sup.map("noop", "noop", items, concurrency=C)`` with ``ServerSpec.in_memory(...,
  wire="direct")``, every outcome consumed (and dropped) as it arrives.
* ``nursery``: the obvious code without rmcp_actors, on a raw ``mcp.Client(server)``: one task
  per item started in a trio nursery, each taking a ``trio.CapacityLimiter(C)`` around its
  ``call_tool``, results appended to a list.
* ``bounded``: the careful version of the same: the limiter is taken *before* each task is
  started (at most C tasks exist), results dropped.
* ``calls``: ``bounded`` calling ``sup.call`` instead of the raw client (same runtime and spec as
  ``map``): ``map``/``calls`` is what the batch machinery costs, ``calls``/``bounded`` what the
  reliability layer of each call costs on this wire.

Each run is a fresh child process (``--child``), so its peak RSS is its own: ``peak RSS`` is
``ru_maxrss`` at the end minus the RSS just before the calls (the runtime and server already
set up). The calls are timed alone (``calls/s``). tracemalloc slows every allocation about
fourfold, so the traced peak (``traced``) comes from a separate run of ``traced-items`` calls.
Rounds run the variants in rotating order; figures are medians over rounds.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import trio
from mcp import Client

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import finite
from _noop_server import TOOL, build_server

from rmcp_actors import CallResult, RMCPSupervisor, ServerSpec
from rmcp_actors.config import PolicyOverrides

VARIANTS = ("map", "nursery", "bounded", "calls")
PAGE_SIZE = resource.getpagesize()


def items(count: int) -> Iterator[dict[str, Any]]:
    return ({"n": n} for n in range(count))


def current_rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE_SIZE


async def run_map(count: int, concurrency: int, trace: bool, through_map: bool) -> dict[str, Any]:
    spec = ServerSpec.in_memory(
        "noop", build_server(), wire="direct", overrides=PolicyOverrides(max_concurrency=concurrency)
    )
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(spec)
        await sup.call("noop", TOOL, {"n": 0})  # warm-up
        done = 0

        def check(outcome: object) -> None:
            nonlocal done
            if not isinstance(outcome, CallResult) or outcome.is_error:
                raise RuntimeError(f"rmcp call failed: {outcome!r}")
            done += 1

        async def mapped() -> None:
            async with sup.map("noop", TOOL, items(count), concurrency=concurrency) as results:
                async for _, outcome in results:
                    check(outcome)

        async def called() -> None:
            limiter = trio.CapacityLimiter(concurrency)

            async def one(index: int, arguments: dict[str, Any]) -> None:
                try:
                    check(await sup.call("noop", TOOL, arguments))
                finally:
                    limiter.release_on_behalf_of(index)

            async with trio.open_nursery() as nursery:
                for index, arguments in enumerate(items(count)):
                    await limiter.acquire_on_behalf_of(index)
                    nursery.start_soon(one, index, arguments)

        figures = await measured(mapped if through_map else called, trace)
    assert done == count, done
    return figures


async def run_nursery(count: int, concurrency: int, trace: bool, bounded: bool) -> dict[str, Any]:
    async with Client(build_server()) as client:
        await client.call_tool(TOOL, {"n": 0})  # warm-up
        results: list[Any] = []
        done = 0

        async def calls() -> None:
            nonlocal done
            limiter = trio.CapacityLimiter(concurrency)

            async def one(arguments: dict[str, Any]) -> None:
                async with limiter:
                    results.append(await client.call_tool(TOOL, arguments))

            async def one_bounded(index: int, arguments: dict[str, Any]) -> None:
                nonlocal done
                try:
                    result = await client.call_tool(TOOL, arguments)
                    if result.is_error:
                        raise RuntimeError(f"raw call failed: {result.content}")
                    done += 1
                finally:
                    limiter.release_on_behalf_of(index)

            async with trio.open_nursery() as nursery:
                for index, arguments in enumerate(items(count)):
                    if bounded:
                        await limiter.acquire_on_behalf_of(index)
                        nursery.start_soon(one_bounded, index, arguments)
                    else:
                        nursery.start_soon(one, arguments)

        figures = await measured(calls, trace)
    assert (done if bounded else len(results)) == count
    return figures


async def measured(calls: Any, trace: bool) -> dict[str, Any]:
    gc.collect()
    rss_before = current_rss()
    if trace:
        tracemalloc.start()
    started = time.perf_counter()
    await calls()
    elapsed = time.perf_counter() - started
    figures: dict[str, Any] = {"elapsed_s": elapsed}
    if trace:
        figures["traced_peak_bytes"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    else:
        figures["rss_peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    return figures


def child(variant: str, count: int, concurrency: int, trace: bool) -> None:
    if variant in ("map", "calls"):
        figures = trio.run(run_map, count, concurrency, trace, variant == "map")
    else:
        figures = trio.run(run_nursery, count, concurrency, trace, variant == "bounded")
    print(json.dumps(figures))


def spawn(variant: str, count: int, concurrency: int, trace: bool) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", variant, "--items", str(count)]
    command += ["--concurrency", str(concurrency)] + (["--trace"] if trace else [])
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="10,000 calls, 1 round: a smoke run")
    parser.add_argument("--items", type=int, help="calls per run (default 100,000)")
    parser.add_argument("--traced-items", type=int, help="calls per traced run (default 20,000)")
    parser.add_argument("--rounds", type=int, help="rounds of every variant (default 3)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures as JSON")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    count = options.items or (10_000 if options.quick else 100_000)
    if options.child is not None:
        child(options.child, count, options.concurrency, options.trace)
        return
    traced_count = options.traced_items or (2_000 if options.quick else 20_000)
    rounds = options.rounds or (1 if options.quick else 3)
    runs: dict[str, list[dict[str, Any]]] = {variant: [] for variant in VARIANTS}
    traced: dict[str, list[dict[str, Any]]] = {variant: [] for variant in VARIANTS}
    started = time.perf_counter()
    for round_index in range(rounds):
        shift = round_index % len(VARIANTS)
        order = VARIANTS[shift:] + VARIANTS[:shift]
        for variant in order:
            runs[variant].append(spawn(variant, count, options.concurrency, trace=False))
            traced[variant].append(spawn(variant, traced_count, options.concurrency, trace=True))
            print(f"  round {round_index + 1}/{rounds}: {variant}", file=sys.stderr, flush=True)
    wall = time.perf_counter() - started

    def median(variant: str, source: dict[str, list[dict[str, Any]]], key: str) -> float:
        return statistics.median(run[key] for run in source[variant])

    rows: dict[str, dict[str, float]] = {}
    for variant in VARIANTS:
        rows[variant] = {
            "calls_per_s": statistics.median(count / run["elapsed_s"] for run in runs[variant]),
            "rss_peak_mib": median(variant, runs, "rss_peak_bytes") / 2**20,
            "traced_peak_mib": median(variant, traced, "traced_peak_bytes") / 2**20,
        }
    print(
        f"sup.map vs a nursery + CapacityLimiter: {count:,} no-op calls "
        f"(traced runs: {traced_count:,}), direct in-memory wire, concurrency {options.concurrency}, "
        f"{rounds} round(s), medians; python {sys.version.split()[0]}, {wall:.0f} s"
    )
    header = f"{'variant':<8} {'calls/s':>9} {'vs map':>7} {'peak RSS MiB':>13} {'traced MiB':>11}"
    print(header)
    print("-" * len(header))
    base = rows["map"]["calls_per_s"]
    for variant, row in rows.items():
        print(
            f"{variant:<8} {row['calls_per_s']:>9.0f} {row['calls_per_s'] / base:>7.2f} "
            f"{row['rss_peak_mib']:>13.1f} {row['traced_peak_mib']:>11.2f}"
        )
    print(
        "vs map: the variant's calls/s over map's. peak RSS: ru_maxrss minus the RSS before the calls\n"
        f"({count:,} calls); traced: tracemalloc's peak over a separate run of {traced_count:,} calls."
    )
    if options.json is not None:
        document = {
            "python": sys.version,
            "items": count,
            "traced_items": traced_count,
            "concurrency": options.concurrency,
            "rounds": rounds,
            "wall_s": wall,
            "rows": rows,
            "runs": runs,
            "traced_runs": traced,
        }
        options.json.write_text(json.dumps(finite(document), indent=2) + "\n")


if __name__ == "__main__":
    main()
