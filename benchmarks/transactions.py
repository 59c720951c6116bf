"""Per-step cost of ``tx.call`` over ``sup.call``, with the SQLite journal.

Usage::

    python benchmarks/transactions.py [--quick] [--json PATH] [--blocks N] [--synchronous normal|full]
                                      [--journal sqlite|memory]

One process, one ``trio.run``, one ``RMCPSupervisor`` whose journal is a ``SQLiteJournal`` on a
file in a temporary directory, and the in-memory no-op server of ``overhead.py``
(``_noop_server.py``, JSON-RPC wire). Interleaved blocks, after a warm-up of each:

* ``call``: sequential ``sup.call("noop", "noop", {"n": i})``;
* ``step``: sequential ``tx.call`` of the same tool, with a ``Compensation`` given as a value,
  inside one open transaction (a step = ``StepIntent`` appended, the call, ``StepDone``
  appended);
* ``saga``: whole transactions of ``SAGA_STEPS`` steps (begin, the steps, commit), timed from
  ``async with`` to its end.

``gc.collect()`` runs before every block. Reported: median latency per call / per step over
every measured one, and the difference per step in ms (the judged figure; goal <= 1 ms per
step, from the issue); the process's CPU time per call / per step (median over blocks, the
journal's worker thread included), steadier than wall time on a busy machine; for whole
transactions, the median time per transaction and its overhead over ``SAGA_STEPS`` plain
calls, per step. The journal's group-commit statistics say how many records each commit
carried (1 when sequential) and how many appends committed inline instead (``synchronous=normal``,
the file free). ``--journal memory`` runs the same with a ``MemoryJournal``: the
saga machinery's own share.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import attrs
import trio

from rmcp_actors import Compensation, RMCPSupervisor
from rmcp_actors.config import RMCPConfig, ServerSpec
from rmcp_actors.stores import MemoryJournal, SQLiteJournal

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import finite
from _noop_server import TOOL, build_server

JournalKind = Literal["sqlite", "memory"]
STEP_GOAL_MS = 1.0
SAGA_STEPS = 4
UNDO = Compensation("noop", TOOL, {"n": -1})


@dataclass(frozen=True)
class Mode:
    blocks: int
    calls: int
    sagas: int
    warmup: int


FULL = Mode(blocks=9, calls=300, sagas=60, warmup=100)
QUICK = Mode(blocks=5, calls=100, sagas=20, warmup=30)


@dataclass
class Samples:
    """One kind of operation: every latency, and the CPU time per operation of each block."""

    latencies_s: list[float] = field(default_factory=list[float])
    cpu_per_op_s: list[float] = field(default_factory=list[float])

    def median_us(self) -> float:
        return statistics.median(self.latencies_s) * 1e6

    def cpu_us(self) -> float:
        return statistics.median(self.cpu_per_op_s) * 1e6


async def timed(count: int, one: Callable[[int], Awaitable[None]], into: Samples | None = None) -> None:
    """``count`` sequential awaits of ``one(i)``, their latencies and CPU time into ``into``.

    The CPU time is the process's (the journal's worker thread included), over the block.
    """
    gc.collect()
    latencies: list[float] = []
    clock = time.perf_counter
    cpu_started = time.process_time()
    for index in range(count):
        started = clock()
        await one(index)
        latencies.append(clock() - started)
    if into is not None:
        into.latencies_s += latencies
        into.cpu_per_op_s.append((time.process_time() - cpu_started) / count)


async def run(
    mode: Mode, kind: JournalKind, synchronous: Literal["normal", "full"], path: Path
) -> dict[str, Any]:
    config = RMCPConfig(servers={"noop": ServerSpec.in_memory("noop", build_server(), wire="jsonrpc")})
    journal = SQLiteJournal(path, synchronous=synchronous) if kind == "sqlite" else MemoryJournal()
    samples = {"call": Samples(), "step": Samples(), "saga": Samples()}
    async with RMCPSupervisor.open(config, journal=journal) as sup:

        async def call(index: int) -> None:
            await sup.call("noop", TOOL, {"n": index})

        async def saga(index: int) -> None:
            async with sup.transaction("bench-saga") as tx:
                for step in range(SAGA_STEPS):
                    await tx.call("noop", TOOL, {"n": step}, compensate=UNDO)

        async def steps(count: int, into: Samples | None = None) -> None:
            async with sup.transaction("bench-steps") as tx:

                async def step(index: int) -> None:
                    await tx.call("noop", TOOL, {"n": index}, compensate=UNDO)

                await timed(count, step, into)

        await timed(mode.warmup, call)
        await steps(mode.warmup)
        await timed(mode.warmup // SAGA_STEPS, saga)
        for _ in range(mode.blocks):
            await timed(mode.calls, call, samples["call"])
            await steps(mode.calls, samples["step"])
            await timed(mode.sagas, saga, samples["saga"])
    commits = journal.statistics() if isinstance(journal, SQLiteJournal) else None
    await journal.aclose()

    call_us, step_us, saga_us = (samples[name].median_us() for name in ("call", "step", "saga"))
    added_ms = (step_us - call_us) / 1000
    saga_added_ms = (saga_us - SAGA_STEPS * call_us) / SAGA_STEPS / 1000
    return {
        "journal_kind": kind,
        "synchronous": synchronous,
        "blocks": mode.blocks,
        "calls_per_block": mode.calls,
        "sagas_per_block": mode.sagas,
        "sup_call_median_us": call_us,
        "tx_call_median_us": step_us,
        "added_per_step_ms": added_ms,
        "sup_call_cpu_us": samples["call"].cpu_us(),
        "tx_call_cpu_us": samples["step"].cpu_us(),
        "added_cpu_per_step_ms": (samples["step"].cpu_us() - samples["call"].cpu_us()) / 1000,
        "saga_steps": SAGA_STEPS,
        "saga_median_us": saga_us,
        "saga_added_per_step_ms": saga_added_ms,
        "goal_ms": STEP_GOAL_MS,
        "pass": added_ms <= STEP_GOAL_MS,
        "journal": None if commits is None else attrs.asdict(commits),
    }


def report(figures: dict[str, Any]) -> str:
    verdict = "PASS" if figures["pass"] else "MISS"
    journal_name = (
        f"SQLite, synchronous={figures['synchronous']}"
        if figures["journal_kind"] == "sqlite"
        else "in memory"
    )
    lines = [
        f"journal: {journal_name}; {figures['blocks']} blocks of "
        f"{figures['calls_per_block']} calls / steps and {figures['sagas_per_block']} sagas",
        f"sup.call median   {figures['sup_call_median_us']:8.1f} µs (CPU {figures['sup_call_cpu_us']:.0f})",
        f"tx.call median    {figures['tx_call_median_us']:8.1f} µs (CPU {figures['tx_call_cpu_us']:.0f})",
        f"added per step    {figures['added_per_step_ms']:8.3f} ms   (goal <= {STEP_GOAL_MS} ms: {verdict}; "
        f"CPU {figures['added_cpu_per_step_ms']:.3f} ms)",
        f"saga of {figures['saga_steps']} steps  {figures['saga_median_us']:8.1f} µs   "
        f"(begin + steps + commit; {figures['saga_added_per_step_ms']:.3f} ms per step over sup.call)",
    ]
    journal = figures["journal"]
    if journal is not None:
        lines.append(
            f"journal commits   {journal['commits']} for {journal['appends']} records "
            f"(largest batch {journal['largest_batch']}), {journal['inline_appends']} more "
            "committed inline on the event loop's thread"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer and shorter blocks (a smoke run)")
    parser.add_argument("--blocks", type=int, help="blocks of each kind (default 9, 5 with --quick)")
    parser.add_argument("--journal", choices=["sqlite", "memory"], default="sqlite")
    parser.add_argument("--synchronous", choices=["normal", "full"], default="normal")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    mode = QUICK if args.quick else FULL
    if args.blocks is not None:
        mode = Mode(blocks=args.blocks, calls=mode.calls, sagas=mode.sagas, warmup=mode.warmup)
    with tempfile.TemporaryDirectory() as directory:
        figures = trio.run(run, mode, args.journal, args.synchronous, Path(directory) / "journal.db")
    print(report(figures))
    if args.json is not None:
        args.json.write_text(json.dumps(finite(figures), indent=2) + "\n")


if __name__ == "__main__":
    main()
