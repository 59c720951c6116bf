"""rmcp_actors against what users would pick instead: raw ``mcp.Client``, tenacity, stamina.

Usage::

    python benchmarks/alternatives.py [--quick] [--json PATH] [--only overhead|faults]
                                      [--calls N] [--probability P] [--seed S]

One process, one ``trio.run``, two parts:

**Overhead, no faults.** The no-op server of ``overhead.py`` (``_noop_server.py``), in memory over
the JSON-RPC wire and over stdio, each client with its own server:

* ``raw``, ``raw2``: ``mcp.Client`` and ``call_tool`` (raw2 is the control: raw2/raw is the noise);
* ``tenacity``: the same raw call inside the decorator users write, ``@tenacity.retry(retry=
  retry_if_exception_type(Exception), wait=wait_exponential(...), stop=stop_after_attempt(K))``;
* ``stamina``: the same inside ``@stamina.retry(on=Exception, attempts=K)``;
* ``rmcp``: ``RMCPSupervisor.call`` (``ServerSpec.in_memory(..., wire="jsonrpc")`` /
  ``ServerSpec.stdio``).

As ``overhead.py``: a warm-up of each, then interleaved blocks (raw, raw2, tenacity, stamina, rmcp,
raw, ...) of the same number of calls, 1 caller then 50, ``gc.collect()`` before every block. Figures:
median calls/s over blocks, its ratio to raw, median latency per call and the latency added to raw's.

**Faults.** ``create_order(item)`` of ``examples/order_server.py`` appends ``item`` to a ledger
file: a side effect that must not run twice. Each client makes the same N sequential logical calls
through the fault-injecting stdio relay (``rmcp_actors.testing.relay_command``, same seed): with
probability P it swallows a tool's answer and SIGKILLs the server, after the order was created.
The clients run at once, each with its own server, ledger and relay log:

* ``raw``: no retry: a failed call is reported failed, and the next call reconnects;
* ``tenacity`` / ``stamina``: the decorated call (reconnecting inside it) is retried up to K times;
* ``rmcp``: ``sup.call`` with K attempts against the same server with RMCP and a durable
  ``SQLiteStore`` (``order_server.py --store``): retries carry the call's idempotency key.

From the callers' reports and the ledgers: ``duplicates`` (items created more than once),
``extra_runs`` (side effects beyond one per item), ``lost`` (items never created: their call did not
run), ``succeeded_not_run`` and ``failed_but_ran`` (calls reported wrongly), and ``unknown`` (calls
reported as may-have-run: only rmcp has that answer), split into ran / not run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

import stamina
import stamina.instrumentation
import tenacity
import trio
from mcp import Client, StdioServerParameters
from mcp.client._memory import InMemoryTransport
from mcp.types import CallToolResult

import rmcp_actors
from rmcp_actors import (
    Outcome,
    PolicyOverrides,
    ReconnectOverrides,
    RetryOverrides,
    RMCPError,
    RMCPSupervisor,
    ServerSpec,
)
from rmcp_actors.config import CircuitBreakerOverrides, RMCPConfig, RuntimeSettings
from rmcp_actors.testing import relay_command

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import Series
from _noop_server import TOOL, build_server
from _results import write_results
from overhead import (
    CONCURRENT_CALLERS,
    FULL,
    MAX_CONCURRENCY,
    NOOP_SERVER,
    QUICK,
    RAW_READ_TIMEOUT_S,
    Call,
    Mode,
    raw_caller,
    rmcp_caller,
    run_block,
)

Transport = Literal["memory", "stdio"]
CLIENTS = ("raw", "raw2", "tenacity", "stamina", "rmcp")
FAULT_CLIENTS = ("raw", "tenacity", "stamina", "rmcp")

# Attempts per logical call, the same for every client that retries.
ATTEMPTS = 5
ORDER_SERVER = Path(__file__).resolve().parents[1] / "examples" / "order_server.py"
# The order server imports the rmcp_actors measured here (the SDK's default env drops PYTHONPATH).
SAME_PACKAGE = {"PYTHONPATH": str(Path(rmcp_actors.__file__).resolve().parents[1])}
FAULT_CALL_TIMEOUT_S = 30.0
# Like examples/exactly_once.py: a server restart is the real cost of a lost answer. The circuit
# breaker is off as in chaos_unknowns.py: no alternative has one, and the calls it would refuse
# (not sent) would be counted as lost, hiding what is compared, the handling of a crash.
RMCP_FAULT_POLICY = PolicyOverrides(
    retry=RetryOverrides(max_attempts=ATTEMPTS, base_delay_s=0.01, max_delay_s=0.1),
    reconnect=ReconnectOverrides(base_delay_s=0.02, max_delay_s=0.5),
    circuit_breaker=CircuitBreakerOverrides(mode="disabled"),
)
FAULT_CALLS = {"quick": 30, "full": 200}


# -- the retrying clients users write ------------------------------------------------------

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


class ToolErrorResult(Exception):
    """The tool answered isError: a failure the retry decorators retry like any other."""


def _checked(result: CallToolResult) -> CallToolResult:
    if result.is_error:
        raise ToolErrorResult(str(result.content))
    return result


def tenacity_retry(function: F) -> F:
    """The decorator a tenacity user writes: retry on any exception, exponential backoff, K tries."""
    decorator = tenacity.retry(
        retry=tenacity.retry_if_exception_type(Exception),
        wait=tenacity.wait_exponential(multiplier=0.05, max=1.0),
        stop=tenacity.stop_after_attempt(ATTEMPTS),
        reraise=True,
    )
    return cast(F, decorator(function))


def stamina_retry(function: F) -> F:
    """The decorator a stamina user writes."""
    return cast(F, stamina.retry(on=Exception, attempts=ATTEMPTS)(function))


def tenacity_caller(client: Client) -> Call:
    @tenacity_retry
    async def call(n: int) -> None:
        _checked(await client.call_tool(TOOL, {"n": n}, read_timeout_seconds=RAW_READ_TIMEOUT_S))

    return call


def stamina_caller(client: Client) -> Call:
    @stamina_retry
    async def call(n: int) -> None:
        _checked(await client.call_tool(TOOL, {"n": n}, read_timeout_seconds=RAW_READ_TIMEOUT_S))

    return call


# -- part 1: overhead without faults --------------------------------------------------------


@dataclass
class Row:
    """One (transport x callers) row: every client's blocks."""

    transport: Transport
    callers: int
    series: dict[str, Series] = field(default_factory=lambda: {name: Series() for name in CLIENTS})

    def summary(self) -> dict[str, Any]:
        raw = self.series["raw"]
        clients: dict[str, Any] = {}
        for name, series in self.series.items():
            clients[name] = {
                **series.summary(),
                "ratio_to_raw": series.throughput() / raw.throughput(),
                "added_latency_us": series.latency_us() - raw.latency_us(),
            }
        return {
            "transport": self.transport,
            "callers": self.callers,
            "control_raw2_raw": self.series["raw2"].throughput() / raw.throughput(),
            "clients": clients,
        }


@asynccontextmanager
async def open_clients(transport: Transport) -> AsyncIterator[dict[str, Call]]:
    """The five clients of the no-op tool over ``transport``, each with its own server."""
    async with AsyncExitStack() as stack:

        async def raw_client() -> Client:
            if transport == "memory":
                client = Client(InMemoryTransport(build_server()))
            else:
                client = Client(StdioServerParameters(command=sys.executable, args=[str(NOOP_SERVER)]))
            return await stack.enter_async_context(client)

        calls: dict[str, Call] = {
            "raw": raw_caller(await raw_client()),
            "raw2": raw_caller(await raw_client()),
            "tenacity": tenacity_caller(await raw_client()),
            "stamina": stamina_caller(await raw_client()),
        }
        overrides = PolicyOverrides(max_concurrency=MAX_CONCURRENCY)
        if transport == "memory":
            spec = ServerSpec.in_memory("noop", build_server(), wire="jsonrpc", overrides=overrides)
        else:
            spec = ServerSpec.stdio("noop", sys.executable, [str(NOOP_SERVER)], overrides=overrides)
        config = RMCPConfig(runtime=RuntimeSettings(max_concurrency=MAX_CONCURRENCY), servers={"noop": spec})
        calls["rmcp"] = rmcp_caller(await stack.enter_async_context(RMCPSupervisor.open(config)))
        yield calls


async def measure_overhead(transport: Transport, mode: Mode, progress: Callable[[str], None]) -> list[Row]:
    rows: list[Row] = []
    async with open_clients(transport) as clients:
        for name, call in clients.items():
            await run_block(call, mode.warmup_calls, 1)
            await run_block(call, mode.warmup_calls, min(CONCURRENT_CALLERS, mode.warmup_calls))
            progress(f"  warmed up {transport}/{name}")
        for callers in (1, CONCURRENT_CALLERS):
            calls = mode.sequential_calls[transport] if callers == 1 else mode.concurrent_calls[transport]
            row = Row(transport, callers)
            for index in range(mode.blocks):
                for name in CLIENTS:
                    row.series[name].blocks.append(await run_block(clients[name], calls, callers))
                progress(f"  {transport} x{callers}: block {index + 1}/{mode.blocks}")
            rows.append(row)
    return rows


# -- part 2: side-effecting calls under crashes ---------------------------------------------


class Reconnecting:
    """A raw ``mcp.Client`` that reconnects on the next call after any failure (as users write)."""

    def __init__(self, params: StdioServerParameters) -> None:
        self.params = params
        self.client: Client | None = None
        self.stack: AsyncExitStack | None = None

    async def call_tool(self, tool: str, arguments: dict[str, Any]) -> CallToolResult:
        if self.client is None:
            stack = AsyncExitStack()
            self.client = await stack.enter_async_context(Client(self.params))
            self.stack = stack
        try:
            return _checked(
                await self.client.call_tool(tool, arguments, read_timeout_seconds=FAULT_CALL_TIMEOUT_S)
            )
        except Exception:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        stack, self.client, self.stack = self.stack, None, None
        if stack is not None:
            await stack.aclose()


@dataclass
class Reports:
    """What one client's callers were told, per item."""

    succeeded: set[str] = field(default_factory=set[str])
    failed: set[str] = field(default_factory=set[str])
    unknown: set[str] = field(default_factory=set[str])
    elapsed_s: float = 0.0


def relayed(workdir: Path, probability: float, seed: int, *, store: bool) -> list[str]:
    server = [sys.executable, str(ORDER_SERVER), "--ledger", str(workdir / "ledger")]
    if store:
        server += ["--store", str(workdir / "rmcp.sqlite")]
    return relay_command(server, swallow_probability=probability, seed=seed, log=workdir / "faults")


async def run_raw_side(name: str, workdir: Path, items: list[str], argv: list[str]) -> Reports:
    """raw, tenacity or stamina: sequential create_order calls over a reconnecting raw client."""
    connection = Reconnecting(StdioServerParameters(command=argv[0], args=argv[1:], env=SAME_PACKAGE))

    async def once(item: str) -> CallToolResult:
        return await connection.call_tool("create_order", {"item": item})

    call = {"raw": once, "tenacity": tenacity_retry(once), "stamina": stamina_retry(once)}[name]
    reports = Reports()
    started = time.perf_counter()
    try:
        for item in items:
            try:
                await call(item)
            except Exception:
                reports.failed.add(item)
            else:
                reports.succeeded.add(item)
    finally:
        await connection.aclose()
    reports.elapsed_s = time.perf_counter() - started
    return reports


async def run_rmcp_side(workdir: Path, items: list[str], argv: list[str]) -> Reports:
    spec = ServerSpec.stdio("orders", argv[0], argv[1:], env=SAME_PACKAGE, overrides=RMCP_FAULT_POLICY)
    reports = Reports()
    started = time.perf_counter()
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(spec)
        for item in items:
            try:
                result = await sup.call(
                    "orders", "create_order", {"item": item}, timeout=FAULT_CALL_TIMEOUT_S
                )
            except RMCPError as error:
                (reports.unknown if error.may_have_executed else reports.failed).add(item)
            else:
                (reports.succeeded if result.outcome is Outcome.SUCCEEDED else reports.failed).add(item)
    reports.elapsed_s = time.perf_counter() - started
    return reports


def tally(workdir: Path, items: list[str], reports: Reports) -> dict[str, Any]:
    ledger_file, log_file = workdir / "ledger", workdir / "faults"
    runs = Counter(ledger_file.read_text().splitlines() if ledger_file.exists() else [])
    ran = {item for item in items if runs[item]}
    return {
        "calls": len(items),
        "reported_succeeded": len(reports.succeeded),
        "reported_failed": len(reports.failed),
        "reported_unknown": len(reports.unknown),
        "side_effects": sum(runs[item] for item in items),
        "duplicates": sum(1 for item in items if runs[item] > 1),
        "extra_runs": sum(max(0, runs[item] - 1) for item in items),
        "lost": len(items) - len(ran),
        "succeeded_not_run": len(reports.succeeded - ran),
        "failed_but_ran": len(reports.failed & ran),
        "wrongly_reported": len(reports.succeeded - ran) + len(reports.failed & ran),
        "unknown_ran": len(reports.unknown & ran),
        "unknown_not_run": len(reports.unknown - ran),
        "answers_swallowed": len(log_file.read_text().splitlines()) if log_file.exists() else 0,
        "elapsed_s": round(reports.elapsed_s, 2),
    }


async def measure_faults(
    calls: int, probability: float, seed: int, root: Path, progress: Callable[[str], None]
) -> dict[str, Any]:
    items = [f"order-{number:04d}" for number in range(calls)]
    results: dict[str, dict[str, Any]] = {}

    async def side(name: str) -> None:
        workdir = root / name
        workdir.mkdir()
        argv = relayed(workdir, probability, seed, store=name == "rmcp")
        if name == "rmcp":
            reports = await run_rmcp_side(workdir, items, argv)
        else:
            reports = await run_raw_side(name, workdir, items, argv)
        results[name] = tally(workdir, items, reports)
        progress(f"  faults: {name} done in {reports.elapsed_s:.0f} s")

    # Each client has its own relay, server and ledger: they run at once, each waiting on its
    # own server restarts.
    async with trio.open_nursery() as nursery:
        for name in FAULT_CLIENTS:
            nursery.start_soon(side, name)
    return {
        "calls": calls,
        "swallow_probability": probability,
        "seed": seed,
        "attempts": ATTEMPTS,
        "clients": {name: results[name] for name in FAULT_CLIENTS},
    }


# -- report --------------------------------------------------------------------------------


def render_overhead(rows: list[Row]) -> str:
    header = (
        f"{'transport':<9} {'callers':>7} {'client':<9} {'calls/s':>9} {'vs raw':>7} "
        f"{'median µs':>10} {'added µs':>9}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        summary = row.summary()
        for name in CLIENTS:
            figures = summary["clients"][name]
            lines.append(
                f"{row.transport:<9} {row.callers:>7} {name:<9} {figures['calls_per_s']:>9.0f} "
                f"{figures['ratio_to_raw']:>7.3f} {figures['median_latency_us']:>10.1f} "
                f"{figures['added_latency_us']:>9.1f}"
            )
        lines.append(f"{'':17} control raw2/raw {summary['control_raw2_raw']:.3f}")
    return "\n".join(lines)


FAULT_COLUMNS = (
    "reported_succeeded",
    "reported_failed",
    "reported_unknown",
    "side_effects",
    "duplicates",
    "extra_runs",
    "lost",
    "succeeded_not_run",
    "failed_but_ran",
    "unknown_ran",
    "answers_swallowed",
)


def render_faults(faults: dict[str, Any]) -> str:
    lines = [
        f"{faults['calls']} create_order calls per client, answer swallowed + server killed with "
        f"p={faults['swallow_probability']} (seed {faults['seed']}), {faults['attempts']} attempts"
    ]
    lines.append(f"{'':20}" + "".join(f"{name:>10}" for name in FAULT_CLIENTS))
    for column in FAULT_COLUMNS:
        values = "".join(f"{faults['clients'][name][column]:>10}" for name in FAULT_CLIENTS)
        lines.append(f"{column:<20}{values}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a smoke run (~1-2 min): fewer blocks and calls")
    parser.add_argument(
        "--json",
        type=Path,
        metavar="PATH",
        default=Path(__file__).resolve().parent / "results" / "alternatives.json",
        help="where to write the figures (default benchmarks/results/alternatives.json)",
    )
    parser.add_argument("--only", choices=["overhead", "faults"], help="run one part only")
    parser.add_argument("--calls", type=int, help="logical calls per client under faults (200; quick 30)")
    parser.add_argument("--probability", type=float, default=0.2, help="chance of a crash per answer (0.2)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the relay's faults (1)")
    options = parser.parse_args()
    # stamina logs every retry it schedules; tenacity logs nothing by default: alike, and quiet.
    stamina.instrumentation.set_on_retry_hooks([])
    mode = QUICK if options.quick else FULL
    fault_calls = options.calls or FAULT_CALLS["quick" if options.quick else "full"]

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    async def run(root: Path) -> dict[str, Any]:
        figures: dict[str, Any] = {}
        if options.only != "faults":
            rows: list[Row] = []
            for transport in ("memory", "stdio"):
                rows.extend(await measure_overhead(transport, mode, progress))
            figures["overhead"] = {"blocks": mode.blocks, "rows": [row.summary() for row in rows]}
            print(render_overhead(rows), flush=True)
        if options.only != "overhead":
            figures["faults"] = await measure_faults(
                fault_calls, options.probability, options.seed, root, progress
            )
            print(render_faults(figures["faults"]), flush=True)
        return figures

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="alternatives-") as directory:
        figures = trio.run(run, Path(directory))
    figures["wall_s"] = round(time.perf_counter() - started, 1)
    path = write_results("alternatives", figures, quick=options.quick, path=options.json)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
