"""Throughput of the RMCP server side over a plain ``MCPServer``, over stdio.

Usage::

    python benchmarks/server_overhead.py [--quick] [--json PATH] [--rounds N] [--progress] [--read-only]

One process, one ``trio.run``. Four server processes (``_rmcp_bench_server.py``) are started
once and kept for the whole run, each behind the SDK's raw ``mcp.Client`` with
``StdioServerParameters`` (the same client for all: the client is not what is measured):

* ``plain``:  a bare ``MCPServer`` with a trivial ``async def echo(text) -> str``
* ``plain2``: a second, identical plain server: the control, so that plain2/plain shows the noise
* ``memory``: the same server with ``install(app, store=MemoryStore())``
* ``sqlite``: the same server with ``install(app, store=SQLiteStore(path))``, a fresh file in a
  temporary directory

Every call to every variant carries the same ``params._meta.rmcp`` (version, a fresh request
id, a unique idempotency key, attempt 1, ``timeout_ms``); a plain server ignores it, an RMCP
server claims the key in its store, runs the tool, stores the result and ACKs. For each
concurrency (1 caller, then 16 callers) the variants run interleaved rounds of one block each
(the order rotates every round), after a warm-up of each; ``gc.collect()`` runs before every
block. Throughput is the median over blocks; the judged figure is the ratio of the medians,
variant/plain.

Goals (issue 13): memory/plain >= 0.95 at 1 and 16 callers with at most 40 µs of added server
CPU per call; sqlite/plain >= 0.80 at 1 caller and >= 0.85 at 16, with at most 150 µs added. The
SQLite store's group-commit counters are read from the server through its ``stats`` tool before
and after each row. The same ``stats`` tool reports each server's CPU time
(``time.process_time()``, all threads), so the table also shows server CPU per call, the overhead
figure least moved by the noise of a shared machine.

``--progress``: every call asks for progress (a progress token), as rmcp's own client does when
``ack_timeout_s`` is set; RMCP servers then send an early ACK before calling the tool, and claim
the key in two writes (claim, ACK, entered mark) instead of one. Its figures go to
``server_overhead_progress.json``.

``--read-only``: every call goes to ``echo_read_only``, the same tool annotated
``readOnlyHint=True``: RMCP servers run it unclaimed and record its result in one write
instead of claim and result. Its figures go to ``server_overhead_read_only.json`` (with
``--progress`` as well: ``server_overhead_progress_read_only.json``).

The figures are written to ``benchmarks/results/server_overhead.json`` (``--json`` elsewhere).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import trio
from mcp import Client, StdioServerParameters
from mcp.types import RequestParamsMeta, TextContent

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import Block, Series
from _results import write_results
from _rmcp_bench_server import ECHO_TOOL, READ_ONLY_ECHO_TOOL, STATS_TOOL

from rmcp_actors._protocol import META_KEY, PROTOCOL_VERSION

BENCH_SERVER = Path(__file__).resolve().with_name("_rmcp_bench_server.py")

Variant = Literal["plain", "plain2", "memory", "sqlite"]
VARIANTS: tuple[Variant, ...] = ("plain", "plain2", "memory", "sqlite")
RMCP_VARIANTS: tuple[Variant, ...] = ("memory", "sqlite")
Call = Callable[[], Awaitable[None]]

CONCURRENT_CALLERS = 16
TIMEOUT_MS = 30_000
READ_TIMEOUT_S = TIMEOUT_MS / 1000
ECHO_TEXT = "ok"

# (variant, callers) -> least throughput against plain; variant -> most added server CPU, µs.
RATIO_GOAL: dict[tuple[Variant, int], float] = {
    ("memory", 1): 0.95,
    ("memory", CONCURRENT_CALLERS): 0.95,
    ("sqlite", 1): 0.80,
    ("sqlite", CONCURRENT_CALLERS): 0.85,
}
ADDED_CPU_GOAL_US: dict[Variant, float] = {"memory": 40.0, "sqlite": 150.0}


@dataclass(frozen=True)
class Mode:
    """How many calls to make: per block, per warm-up, and how many rounds of blocks."""

    rounds: int
    sequential_calls: int
    concurrent_calls: int
    warmup_calls: int


# Many short interleaved blocks give steadier medians than a few long ones on a noisy VM.
FULL = Mode(rounds=9, sequential_calls=500, concurrent_calls=1000, warmup_calls=200)
QUICK = Mode(rounds=3, sequential_calls=80, concurrent_calls=160, warmup_calls=32)


@dataclass
class GroupCommit:
    """The SQLite store's counters over one row: how many commits its writes took."""

    calls: int
    commits: int
    writes: int
    largest_batch: int

    @property
    def commits_per_call(self) -> float:
        return self.commits / self.calls if self.calls else math.nan

    @property
    def writes_per_commit(self) -> float:
        return self.writes / self.commits if self.commits else math.nan


@dataclass
class Row:
    """One concurrency: a series per variant, and the SQLite group-commit counters."""

    callers: int
    series: dict[Variant, Series] = field(default_factory=lambda: {v: Series() for v in VARIANTS})
    cpu_s: dict[Variant, float] = field(default_factory=dict[Variant, float])
    group_commit: GroupCommit | None = None

    def cpu_us_per_call(self, variant: Variant) -> float:
        """CPU time of the variant's server process (all threads) per call over the row, in µs."""
        return self.cpu_s[variant] / self.series[variant].calls() * 1e6

    def ratio(self, variant: Variant) -> float:
        return self.series[variant].throughput() / self.series["plain"].throughput()

    def paired_ratio(self, variant: Variant) -> float:
        """Median of variant/plain over the blocks of the same round (robust to drift)."""
        pairs = zip(self.series[variant].blocks, self.series["plain"].blocks, strict=True)
        return statistics.median(mine.throughput / plain.throughput for mine, plain in pairs)

    @property
    def control(self) -> float:
        return self.ratio("plain2")

    def within_noise(self, ratio: float, goal: float) -> bool:
        """The ratio is nearer its goal than the control ratio is to 1: the verdict is noise."""
        return abs(ratio - goal) <= abs(1.0 - self.control)

    def summary(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "callers": self.callers,
            "variants": {
                name: {**series.summary(), "server_cpu_us_per_call": self.cpu_us_per_call(name)}
                for name, series in self.series.items()
            },
            "control_plain2_plain": self.control,
            "ratios": {name: self.ratio(name) for name in RMCP_VARIANTS},
            "paired_ratios": {name: self.paired_ratio(name) for name in RMCP_VARIANTS},
            "goals": [goal.summary() for goal in goals_of(self)],
        }
        if self.group_commit is not None:
            gc_row = self.group_commit
            document["sqlite_group_commit"] = {
                "calls": gc_row.calls,
                "commits": gc_row.commits,
                "writes": gc_row.writes,
                "commits_per_call": gc_row.commits_per_call,
                "writes_per_commit": gc_row.writes_per_commit,
                "largest_batch_so_far": gc_row.largest_batch,
            }
        return document


@dataclass(frozen=True)
class Goal:
    """One judged figure of one row: a ratio (at least ``goal``) or added CPU (at most)."""

    label: str
    callers: int
    measured: float
    goal: float
    within_noise: bool
    at_most: bool = False

    @property
    def passed(self) -> bool:
        return self.measured <= self.goal if self.at_most else self.measured >= self.goal

    def render(self) -> str:
        verdict = "MET" if self.passed else "NOT MET"
        noise = " (within noise)" if self.within_noise else ""
        if self.at_most:
            judged = f"{self.measured:+.0f} µs <= {self.goal:.0f}"
        else:
            judged = f"{self.measured:.3f} >= {self.goal:.2f}"
        return f"{self.label:<22} x{self.callers:<3} {judged}: {verdict}{noise}"

    def summary(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "measured": self.measured,
            "goal": self.goal,
            "at_most": self.at_most,
            "met": self.passed,
            "within_noise": self.within_noise,
        }


def goals_of(row: Row) -> list[Goal]:
    goals: list[Goal] = []
    control_cpu = abs(row.cpu_us_per_call("plain2") - row.cpu_us_per_call("plain"))
    for variant in RMCP_VARIANTS:
        goal = RATIO_GOAL[(variant, row.callers)]
        ratio = row.ratio(variant)
        goals.append(Goal(f"{variant}/plain", row.callers, ratio, goal, row.within_noise(ratio, goal)))
        added = row.cpu_us_per_call(variant) - row.cpu_us_per_call("plain")
        cpu_goal = ADDED_CPU_GOAL_US[variant]
        noise = abs(added - cpu_goal) <= control_cpu
        goals.append(Goal(f"{variant} added CPU", row.callers, added, cpu_goal, noise, at_most=True))
    return goals


# -- the clients ---------------------------------------------------------------------------


def rmcp_meta() -> RequestParamsMeta:
    """The ``_meta`` every call sends: a fresh request id and a unique idempotency key."""
    request_id = str(uuid.uuid4())
    rmcp = {
        "version": PROTOCOL_VERSION,
        "request_id": request_id,
        "idempotency_key": request_id,
        "attempt": 1,
        "timeout_ms": TIMEOUT_MS,
    }
    # The SDK types request _meta as a TypedDict of its own keys; extension keys ride along.
    return cast(RequestParamsMeta, {META_KEY: rmcp})


async def _ignore_progress(progress: float, total: float | None, message: str | None) -> None:
    """The progress callback of ``--progress`` calls: the early ACK arrives here."""


def caller_of(client: Client, *, progress: bool = False, tool: str = ECHO_TOOL) -> Call:
    """One ``tool`` call (``echo`` or its read-only twin) through the bare SDK client, with
    the RMCP ``_meta`` (and, with ``progress``, a progress token: RMCP servers then send an
    early ACK)."""
    on_progress = _ignore_progress if progress else None

    async def call() -> None:
        result = await client.call_tool(
            tool,
            {"text": ECHO_TEXT},
            read_timeout_seconds=READ_TIMEOUT_S,
            meta=rmcp_meta(),
            progress_callback=on_progress,
        )
        if result.is_error:
            raise RuntimeError(f"echo failed: {result.content}")

    return call


async def check_ack(variant: Variant, client: Client) -> None:
    """Fail early unless RMCP variants ACK the ``_meta`` and plain ones ignore it."""
    result = await client.call_tool(
        ECHO_TOOL, {"text": ECHO_TEXT}, read_timeout_seconds=READ_TIMEOUT_S, meta=rmcp_meta()
    )
    meta = result.meta or {}
    acked = isinstance(rmcp := meta.get(META_KEY), dict) and cast(dict[str, Any], rmcp).get("ack") is True
    if acked != (variant in RMCP_VARIANTS):
        raise RuntimeError(f"{variant}: unexpected _meta in the answer: {meta!r}")


async def read_stats(client: Client) -> dict[str, Any]:
    """The server's counters, through its ``stats`` tool (called without ``_meta.rmcp``)."""
    result = await client.call_tool(STATS_TOOL, {}, read_timeout_seconds=READ_TIMEOUT_S)
    content = result.content[0]
    if result.is_error or not isinstance(content, TextContent):
        raise RuntimeError(f"stats failed: {result.content}")
    return json.loads(content.text)


def server_params(mode: str, store: Path | None = None) -> StdioServerParameters:
    args = [str(BENCH_SERVER), "--mode", mode]
    if store is not None:
        args += ["--store", str(store)]
    # The SDK's default environment drops PYTHONPATH: the servers would import whichever
    # rmcp_actors is installed, not the checkout (or the one PYTHONPATH names) being measured.
    env = {"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ else None
    return StdioServerParameters(command=sys.executable, args=args, env=env)


@asynccontextmanager
async def open_clients(store_dir: Path) -> AsyncIterator[dict[Variant, Client]]:
    """Start the four servers (each kept for the whole run) and open a client to each."""
    params: dict[Variant, StdioServerParameters] = {
        "plain": server_params("plain"),
        "plain2": server_params("plain"),
        "memory": server_params("memory"),
        "sqlite": server_params("sqlite", store_dir / "rmcp.sqlite"),
    }
    async with AsyncExitStack() as stack:
        clients: dict[Variant, Client] = {}
        for name, parameters in params.items():
            clients[name] = await stack.enter_async_context(Client(parameters))
        yield clients


# -- blocks --------------------------------------------------------------------------------


async def run_block(call: Call, calls: int, callers: int) -> Block:
    """Make ``calls`` calls from ``callers`` concurrent tasks; time each call and the block."""
    clock = time.perf_counter
    latencies: list[float] = []
    record = latencies.append
    per_caller = calls // callers

    async def caller() -> None:
        for _ in range(per_caller):
            start = clock()
            await call()
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


def _delta(after: dict[str, Any], before: dict[str, Any], section: str, key: str) -> int:
    return int(after[section][key]) - int(before[section][key])


async def measure(
    mode: Mode, progress: Callable[[str], None], *, ask_progress: bool = False, tool: str = ECHO_TOOL
) -> list[Row]:
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="rmcp-bench-") as store_dir:
        async with open_clients(Path(store_dir)) as clients:
            calls = {
                name: caller_of(client, progress=ask_progress, tool=tool) for name, client in clients.items()
            }
            for name, client in clients.items():  # warm-up: tool listing, caches, code paths
                await check_ack(name, client)
                await run_block(calls[name], mode.warmup_calls, 1)
                await run_block(calls[name], mode.warmup_calls, CONCURRENT_CALLERS)
                progress(f"  warmed up {name}")
            for callers in (1, CONCURRENT_CALLERS):
                block_calls = mode.sequential_calls if callers == 1 else mode.concurrent_calls
                row = Row(callers)
                before = {name: await read_stats(client) for name, client in clients.items()}
                for index in range(mode.rounds):
                    # Rotate the order so that no variant always follows the same one.
                    order = VARIANTS[index % len(VARIANTS) :] + VARIANTS[: index % len(VARIANTS)]
                    for name in order:
                        row.series[name].blocks.append(await run_block(calls[name], block_calls, callers))
                    progress(f"  x{callers}: round {index + 1}/{mode.rounds}")
                after = {name: await read_stats(client) for name, client in clients.items()}
                row.cpu_s = {name: after[name]["cpu_s"] - before[name]["cpu_s"] for name in VARIANTS}
                for name in RMCP_VARIANTS:
                    executed = _delta(after[name], before[name], "rmcp", "executed")
                    if executed != row.series[name].calls():
                        raise RuntimeError(f"{name}: {executed} runs for {row.series[name].calls()} calls")
                row.group_commit = GroupCommit(
                    calls=row.series["sqlite"].calls(),
                    commits=_delta(after["sqlite"], before["sqlite"], "store", "commits"),
                    writes=_delta(after["sqlite"], before["sqlite"], "store", "writes"),
                    largest_batch=int(after["sqlite"]["store"]["largest_batch"]),
                )
                rows.append(row)
    return rows


# -- report --------------------------------------------------------------------------------


def render(rows: list[Row]) -> str:
    header = (
        f"{'variant':<7} {'callers':>7} {'calls/s':>8} {'vs plain':>8} {'paired':>6} "
        f"{'plain2/plain':>12} {'median µs':>9} {'server CPU µs/call':>18} {'added':>6}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        for name in VARIANTS:
            series = row.series[name]
            ratio = "" if name == "plain" else f"{row.ratio(name):.3f}"
            paired = "" if name == "plain" else f"{row.paired_ratio(name):.3f}"
            control = f"{row.control:.3f}" if name == "plain" else ""
            cpu = row.cpu_us_per_call(name)
            added = "" if name == "plain" else f"{cpu - row.cpu_us_per_call('plain'):+.0f}"
            lines.append(
                f"{name:<7} {row.callers:>7} {series.throughput():>8.0f} {ratio:>8} {paired:>6} "
                f"{control:>12} {series.latency_us():>9.0f} {cpu:>18.0f} {added:>6}"
            )
    return "\n".join(lines)


def render_group_commit(rows: list[Row]) -> str:
    lines = ["SQLite group commit (store counters, read through the server's stats tool):"]
    for row in rows:
        if row.group_commit is None:
            continue
        gc_row = row.group_commit
        lines.append(
            f"  x{row.callers:<3} {gc_row.calls} calls, {gc_row.writes} writes in {gc_row.commits} commits: "
            f"{gc_row.commits_per_call:.2f} commits/call in the worker thread, "
            f"{gc_row.writes_per_commit:.2f} writes/commit, largest batch so far {gc_row.largest_batch}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer calls: a smoke run of < 20 s")
    parser.add_argument(
        "--json", type=Path, metavar="PATH", help="write the figures here (default: benchmarks/results/)"
    )
    parser.add_argument(
        "--progress", action="store_true", help="every call asks for progress: the early-ACK path"
    )
    parser.add_argument(
        "--read-only",
        action="store_true",
        help="every call goes to echo_read_only (readOnlyHint): the unclaimed path",
    )
    parser.add_argument("--rounds", type=int, help="blocks per variant per row (at least 3)")
    options = parser.parse_args()
    mode = QUICK if options.quick else FULL
    if options.rounds is not None:
        if options.rounds < 3:
            parser.error("--rounds must be at least 3")
        mode = Mode(options.rounds, mode.sequential_calls, mode.concurrent_calls, mode.warmup_calls)

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    started = time.perf_counter()
    tool = READ_ONLY_ECHO_TOOL if options.read_only else ECHO_TOOL
    rows = trio.run(functools.partial(measure, mode, progress, ask_progress=options.progress, tool=tool))
    wall = time.perf_counter() - started

    asking = ", every call asking for progress" if options.progress else ""
    print(
        f"RMCP server-side overhead over stdio: {tool} tool, {mode.rounds} interleaved rounds "
        f"(plain, plain2, memory, sqlite), medians{asking}; "
        f"python {sys.version.split()[0]}, "
        f"{'quick' if options.quick else 'full'} run in {wall:.0f} s; "
        f"SQLite file under {tempfile.gettempdir()}"
    )
    print(render(rows))
    print(
        "vs plain: ratio of the median throughputs (the judged figure). paired: median of the\n"
        "per-round ratios (less sensitive to drift). plain2/plain: two identical plain servers,\n"
        "the noise floor; 'within noise' = the ratio is nearer its goal than plain2/plain is to 1.\n"
        "server CPU: time.process_time() of the server process over the row / calls (less noisy\n"
        "than throughput; it excludes waiting on the disk); added = minus plain's."
    )
    print(render_group_commit(rows))
    print("Goals:")
    for row in rows:
        for goal in goals_of(row):
            print(f"  {goal.render()}")
    figures = {
        "rounds": mode.rounds,
        "progress": options.progress,
        "read_only": options.read_only,
        "wall_s": wall,
        "rows": [row.summary() for row in rows],
    }
    name = "server_overhead_progress" if options.progress else "server_overhead"
    if options.read_only:
        name += "_read_only"
    path = write_results(name, figures, quick=options.quick, path=options.json)
    print(f"figures written to {path}")


if __name__ == "__main__":
    main()
