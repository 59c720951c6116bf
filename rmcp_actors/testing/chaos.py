"""The chaos comparison: the same side-effecting calls made three ways under the same faults.

:func:`run_chaos` makes ``calls`` calls of the chaos server's ``effect(label)`` tool (one label
per logical call), ``concurrency`` at a time, each way against a fresh server and its own
ledger:

``raw``
    ``mcp.Client`` on a plain MCP server, no retry: a call that raises or answers an error is
    reported failed. The callers share one client; one whose connection closed (or timed out)
    is replaced by a new connection, so later calls can still succeed.
``naive_retry``
    The same client with the loop people write: any exception is retried, after reconnecting
    when the connection is gone, up to ``raw_attempts`` attempts in all.
``rmcp``
    :class:`~rmcp_actors.RMCPSupervisor` on the chaos server with RMCP and a durable
    ``SQLiteStore``, with :data:`CHAOS_POLICY`: retries reuse the call's idempotency key, and
    the server replays a call that already ran.

Each logical call ends reported one of three ways:

- *succeeded*: the way says the effect happened;
- *failed*: the way says it did not (an error result, an exception of the raw ways, an
  :class:`~rmcp_actors.RMCPError` with ``may_have_executed`` false);
- *unknown*: the way says it cannot tell (:class:`~rmcp_actors.RMCPOutcomeUnknownError`; the
  raw ways never say so).

Then each way's ledger is read back: ``side_effects`` is its rows (runs of the tool),
``duplicates`` the runs beyond the first of each label (a label run three times counts 2),
and ``lost`` the calls whose report the ledger contradicts: reported succeeded with no row, or
reported failed with a row. An unknown report is never lost: it claims nothing. ``p50_ms`` and
``p99_ms`` are the latency of the logical calls, from the first attempt to the report, retries
and reconnects included.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, Final, Literal, final

import attrs
import trio
from mcp import Client, MCPError, StdioServerParameters
from mcp.client._memory import InMemoryTransport
from mcp.client._transport import Transport
from mcp.client.stdio import get_default_environment
from mcp_types import CONNECTION_CLOSED, REQUEST_TIMEOUT, CallToolResult

from ..client._stdio import stdio_client
from ..config import (
    CircuitBreakerOverrides,
    PolicyOverrides,
    ReconnectOverrides,
    RetryBudgetOverrides,
    RetryOverrides,
    ServerSpec,
)
from ..errors import Outcome, RMCPError, RMCPNetworkError
from ..root import RMCPSupervisor
from ..stores import SQLiteStore
from ._chaos_server import Ledger, build_chaos_server
from .faults import FAULT_KINDS, FaultInjector, FaultKind, FaultPlan

__all__ = [
    "CHAOS_POLICY",
    "WAYS",
    "ChaosReport",
    "ChaosTransport",
    "ProgressCallback",
    "ServerCommand",
    "WayName",
    "WayReport",
    "chaos_server_command",
    "chaos_server_environment",
    "run_chaos",
]

WayName = Literal["raw", "naive_retry", "rmcp"]
ChaosTransport = Literal["memory", "stdio"]
#: The three ways, in the order they run and are reported.
WAYS: Final[tuple[WayName, ...]] = ("raw", "naive_retry", "rmcp")

#: Called after each logical call with the way's name and how many of its calls are done.
ProgressCallback = Callable[[WayName, int], None]
#: The argv of the chaos server for a ledger, a SQLite store (None: plain MCP): see
#: :func:`chaos_server_command`, the default.
ServerCommand = Callable[[Path, "Path | None"], list[str]]

#: The rmcp way's policy, for a network that loses answers and connections in front of a
#: healthy server. Retries are what save a call here: against a server that deduplicates on a
#: durable store every attempt is safe, and a lost connection cuts every call in flight on it,
#: so a call retries until its deadline (``max_attempts = 0``), with short pauses (a reconnect
#: already separates the attempts) and a quick reconnect. The retry budget, which stops retries
#: from multiplying a dead dependency's load, is widened so that it never binds: with a fault
#: on a quarter of the attempts, the default (a retry per five calls) would end most faulted
#: calls "unknown". The breaker is off: it would open on the injected faults and refuse calls
#: that the raw ways get to send, which measures the breaker, not exactly-once. The raw ways
#: have neither.
CHAOS_POLICY: Final = PolicyOverrides(
    retry=RetryOverrides(max_attempts=0, base_delay_s=0.01, max_delay_s=0.1),
    retry_budget=RetryBudgetOverrides(ratio=11.0, min_per_s=100.0),
    reconnect=ReconnectOverrides(base_delay_s=0.005, max_delay_s=0.05),
    circuit_breaker=CircuitBreakerOverrides(mode="disabled"),
)

_SERVER_NAME: Final = "chaos"
_TOOL: Final = "effect"
# A lost answer over a live connection is only noticed by a timeout; the figures below keep a
# run short while leaving a loaded machine's slowest answers (and stdio restarts) room.
_ATTEMPT_TIMEOUT_S: Final[Mapping[ChaosTransport, float]] = {"memory": 2.0, "stdio": 10.0}
_RECONNECT_PAUSE_S: Final = 0.01
# Connection attempts of a raw way failing in a row before the run gives up: the faults never
# touch a connection's handshake, so only a server that cannot start fails this often.
_MAX_CONNECT_FAILURES: Final = 20


@final
@attrs.frozen
class WayReport:
    """What one way reported, checked against its ledger.

    Attributes:
        succeeded: Calls reported done.
        failed: Calls reported not done.
        unknown: Calls reported as possibly done (only the rmcp way says so).
        side_effects: Runs of the tool (rows in the way's ledger).
        duplicates: Runs beyond the first of each label.
        lost: Calls whose report the ledger contradicts: succeeded without a run, or failed
            with one.
        p50_ms: Median latency of a logical call, retries included, in milliseconds.
        p99_ms: Its 99th percentile.
    """

    succeeded: int
    failed: int
    unknown: int
    side_effects: int
    duplicates: int
    lost: int
    p50_ms: float
    p99_ms: float

    def to_json(self) -> dict[str, int | float]:
        """The report as a JSON object, with exactly the keys above."""
        return attrs.asdict(self)


@final
@attrs.frozen
class ChaosReport:
    """The three ways' reports, and what the run was.

    Attributes:
        ways: Per way (``raw``, ``naive_retry``, ``rmcp``), its report.
        config: The run's parameters (calls, concurrency, seed, transport, faults asked).
        faults: Per way, the faults injected per kind.
    """

    ways: Mapping[WayName, WayReport]
    config: Mapping[str, Any]
    faults: Mapping[WayName, Mapping[FaultKind, int]]

    def to_json(self) -> dict[str, Any]:
        """``{"ways": {"raw": {...}, "naive_retry": {...}, "rmcp": {...}}, "config": {...},
        "faults": {...}}``."""
        return {
            "ways": {name: self.ways[name].to_json() for name in WAYS},
            "config": dict(self.config),
            "faults": {name: dict(self.faults[name]) for name in WAYS},
        }

    @property
    def rmcp_exactly_once(self) -> bool:
        """Whether the rmcp way ran no call twice and reported none wrongly."""
        rmcp = self.ways["rmcp"]
        return rmcp.duplicates == 0 and rmcp.lost == 0


_ReportKind = Literal["succeeded", "failed", "unknown"]


@attrs.define
class _Tally:
    """What a way reported per label, and how long each logical call took."""

    reports: dict[str, _ReportKind] = attrs.Factory(dict[str, _ReportKind])
    latencies_s: list[float] = attrs.Factory(list[float])

    def add(self, label: str, report: _ReportKind, latency_s: float) -> None:
        self.reports[label] = report
        self.latencies_s.append(latency_s)

    def measure(self, runs: Mapping[str, int]) -> WayReport:
        """Check the reports against ``runs``, the ledger's runs per label."""
        kinds = list(self.reports.values())
        lost = sum(
            1
            for label, report in self.reports.items()
            if (report == "succeeded" and runs.get(label, 0) == 0)
            or (report == "failed" and runs.get(label, 0) > 0)
        )
        return WayReport(
            succeeded=kinds.count("succeeded"),
            failed=kinds.count("failed"),
            unknown=kinds.count("unknown"),
            side_effects=sum(runs.values()),
            duplicates=sum(count - 1 for count in runs.values() if count > 1),
            lost=lost,
            p50_ms=_percentile_ms(self.latencies_s, 0.50),
            p99_ms=_percentile_ms(self.latencies_s, 0.99),
        )


def _percentile_ms(samples_s: Sequence[float], quantile: float) -> float:
    """The nearest-rank percentile, in milliseconds rounded to 0.01 (0.0 without samples)."""
    if not samples_s:
        return 0.0
    ordered = sorted(samples_s)
    rank = max(1, math.ceil(quantile * len(ordered)))
    return round(ordered[rank - 1] * 1000, 2)


def chaos_server_command(ledger: Path, store: Path | None) -> list[str]:
    """The argv of the chaos server (``python -m rmcp_actors.testing.chaos_server``) with this
    ledger: RMCP on a SQLiteStore at ``store``, or plain MCP when ``store`` is None."""
    argv = [sys.executable, "-m", "rmcp_actors.testing.chaos_server", "--ledger", str(ledger)]
    return [*argv, "--store", str(store)] if store is not None else [*argv, "--plain"]


def chaos_server_environment() -> dict[str, str]:
    """The environment to run :func:`chaos_server_command` in: the SDK's default (which drops
    ``PYTHONPATH``) plus the import path of the rmcp_actors running now, so that the server is
    the same code as its caller (a source checkout, not whatever copy is installed)."""
    environment = get_default_environment()
    package_root = str(Path(__file__).resolve().parents[2])
    inherited = os.environ.get("PYTHONPATH")
    environment["PYTHONPATH"] = package_root if not inherited else f"{package_root}{os.pathsep}{inherited}"
    return environment


@attrs.define
class _RawConnection:
    """One ``mcp.Client`` shared by a raw way's callers, replaced when its connection is lost.

    Each client is entered and left by a task of its own (the SDK's cancel scopes must be
    exited by the task that entered them); the next connection is made at once, without
    waiting for the lost one to wind down (an in-memory server may take seconds to).
    """

    connect: Callable[[], Transport]
    current: Client | None = None
    broken: trio.Event = attrs.Factory(trio.Event)
    ready: trio.Event = attrs.Factory(trio.Event)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep a client connected until cancelled.

        Raises:
            RMCPNetworkError: The server could not be reached :data:`_MAX_CONNECT_FAILURES`
                times in a row.
        """
        unreachable: RMCPNetworkError | None = None
        async with trio.open_nursery() as nursery:
            started = False
            failures = 0
            while True:
                broken = trio.Event()
                try:
                    await nursery.start(self._hold, broken)
                except Exception as error:
                    # The connection attempt failed: the raw way's callers wait for the next,
                    # unless the server cannot be reached at all (the error ends the run).
                    failures += 1
                    if failures == _MAX_CONNECT_FAILURES:
                        unreachable = _unreachable(error)
                        unreachable.__cause__ = error
                        break
                    await trio.sleep(_RECONNECT_PAUSE_S)
                    continue
                failures = 0
                if not started:
                    started = True
                    task_status.started()
                await broken.wait()
        # Raised out here, not in the nursery: the caller sees the error, not a group of one.
        assert unreachable is not None, "the loop ends only when the server is unreachable"
        raise unreachable

    async def _hold(self, broken: trio.Event, *, task_status: trio.TaskStatus[None]) -> None:
        connected = False
        try:
            async with Client(self.connect()) as client:
                # As an agent does on connecting, and rmcp_actors too: without the listing, the
                # SDK lists the tools after a call's answer (to check it against the tool's
                # output schema), and a connection lost meanwhile fails a call that had run.
                await client.list_tools()
                self.current, self.broken = client, broken
                self.ready.set()
                connected = True
                task_status.started()
                await broken.wait()
        except Exception:
            if not connected:
                raise
            # The lost client failing on its way out changes nothing for the callers.

    async def client(self) -> tuple[Client, trio.Event]:
        """The connected client, and the event that marks it lost."""
        while True:
            await self.ready.wait()
            if self.current is not None:
                return self.current, self.broken

    def lost(self, broken: trio.Event) -> None:
        """The client of ``broken`` lost its connection: callers wait for the next one."""
        broken.set()
        if broken is self.broken and self.current is not None:
            self.current = None
            self.ready = trio.Event()


def _unreachable(error: Exception) -> RMCPNetworkError:
    return RMCPNetworkError(
        f"the raw way could not connect to the chaos server {_MAX_CONNECT_FAILURES} times in a row "
        f"(last: {error!r}); check that the server command starts (server_command, or "
        "python -m rmcp_actors.testing.chaos_server --help)",
        server=_SERVER_NAME,
    )


def _connection_lost(error: Exception) -> bool:
    """Whether a raw call's exception leaves its client unusable: the connection closed, a
    transport error, or a timeout (a connection that lost an answer is not trusted again). A
    JSON-RPC error the server sent leaves the connection as it was."""
    if isinstance(error, MCPError):
        return error.error.code in (CONNECTION_CLOSED, REQUEST_TIMEOUT)
    return True


async def _raw_attempt(connection: _RawConnection, label: str, timeout_s: float) -> CallToolResult:
    """One ``effect(label)`` call on the current client; a lost connection is replaced."""
    client, broken = await connection.client()
    try:
        return await client.call_tool(_TOOL, {"label": label}, read_timeout_seconds=timeout_s)
    except Exception as error:
        if _connection_lost(error):
            connection.lost(broken)
        raise


async def _raw_call(
    connection: _RawConnection, label: str, *, attempts: int, timeout_s: float
) -> _ReportKind:
    """Call ``effect(label)``, retrying any exception up to ``attempts`` in all (1: no retry)."""
    for attempt in range(1, attempts + 1):
        try:
            result = await _raw_attempt(connection, label, timeout_s)
        except Exception:
            if attempt == attempts:
                return "failed"
            continue
        return "failed" if result.is_error else "succeeded"
    raise AssertionError("unreachable: attempts is at least 1")


async def _rmcp_call(sup: RMCPSupervisor, label: str, timeout_s: float) -> _ReportKind:
    try:
        result = await sup.call(_SERVER_NAME, _TOOL, {"label": label}, timeout=timeout_s)
    except RMCPError as error:
        return "unknown" if error.may_have_executed else "failed"
    # A failed outcome is the tool's own error result: for effect, a call it refused to run.
    return "succeeded" if result.outcome is Outcome.SUCCEEDED else "failed"


async def _drive(
    calls: int,
    concurrency: int,
    label_prefix: str,
    call: Callable[[str], Awaitable[_ReportKind]],
    on_done: Callable[[int], None],
) -> _Tally:
    """Make ``calls`` logical calls, ``concurrency`` at a time, through ``call(label)``."""
    tally = _Tally()
    labels = iter(f"{label_prefix}-{index:06d}" for index in range(calls))

    async def worker() -> None:
        for label in labels:
            started = trio.current_time()
            report = await call(label)
            tally.add(label, report, trio.current_time() - started)
            on_done(len(tally.reports))

    async with trio.open_nursery() as nursery:
        for _ in range(min(concurrency, calls)):
            nursery.start_soon(worker)
    return tally


@attrs.frozen
class _Setup:
    calls: int
    concurrency: int
    transport: ChaosTransport
    workdir: Path
    attempt_timeout_s: float
    call_timeout_s: float
    progress: ProgressCallback
    plan: FaultPlan | None
    server_command: ServerCommand

    def injector(self) -> FaultInjector | None:
        """A new injector of the run's faults for one way (each way draws the same faults at
        the same places: the k-th call of the n-th connection)."""
        return FaultInjector(self.plan) if self.plan is not None else None


_NO_FAULTS: Final[Mapping[FaultKind, int]] = dict.fromkeys(FAULT_KINDS, 0)


@attrs.frozen
class _WayRun:
    report: WayReport
    faults: Mapping[FaultKind, int]


def _counts(injector: FaultInjector | None) -> Mapping[FaultKind, int]:
    return dict(injector.counts) if injector is not None else _NO_FAULTS


async def _raw_way(setup: _Setup, name: WayName, attempts: int) -> _WayRun:
    directory = setup.workdir / name
    directory.mkdir()
    ledger_path = directory / "ledger.sqlite"
    injector = setup.injector()
    with Ledger(ledger_path) as ledger:
        if setup.transport == "memory":
            server = build_chaos_server(ledger, rmcp=False)

            def transport() -> Transport:
                return InMemoryTransport(server)
        else:
            argv = setup.server_command(ledger_path, None)
            params = StdioServerParameters(command=argv[0], args=argv[1:], env=chaos_server_environment())

            def transport() -> Transport:
                return stdio_client(params)

        def connect() -> Transport:
            return transport() if injector is None else injector.wrap(transport())

        connection = _RawConnection(connect)

        async def call(label: str) -> _ReportKind:
            return await _raw_call(connection, label, attempts=attempts, timeout_s=setup.attempt_timeout_s)

        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(connection.run)
                tally = await _drive(
                    setup.calls, setup.concurrency, name, call, lambda done: setup.progress(name, done)
                )
                nursery.cancel_scope.cancel()
        except* RMCPNetworkError as group:
            [unreachable] = group.exceptions
            raise unreachable from unreachable.__cause__
        return _WayRun(tally.measure(ledger.counts()), _counts(injector))


async def _rmcp_way(setup: _Setup) -> _WayRun:
    name: WayName = "rmcp"
    directory = setup.workdir / name
    directory.mkdir()
    ledger_path, store_path = directory / "ledger.sqlite", directory / "rmcp.sqlite"
    overrides = attrs.evolve(CHAOS_POLICY, max_concurrency=setup.concurrency)
    injector = setup.injector()
    with Ledger(ledger_path) as ledger:
        async with AsyncExitStack() as stack:
            if setup.transport == "memory":
                # One store for every connection: the in-memory server's lifespan (which would
                # close it) runs once per connection, and a reconnect must find the keys.
                store = SQLiteStore(store_path)
                stack.push_async_callback(store.aclose)
                server = build_chaos_server(ledger, store)
                spec = ServerSpec.in_memory(_SERVER_NAME, server, overrides=overrides)
            else:
                argv = setup.server_command(ledger_path, store_path)
                spec = ServerSpec.stdio(
                    _SERVER_NAME, argv[0], argv[1:], env=chaos_server_environment(), overrides=overrides
                )
            sup = await stack.enter_async_context(RMCPSupervisor.open())
            await sup.add_server(spec if injector is None else injector.spec(spec))

            async def call(label: str) -> _ReportKind:
                return await _rmcp_call(sup, label, setup.call_timeout_s)

            tally = await _drive(
                setup.calls, setup.concurrency, name, call, lambda done: setup.progress(name, done)
            )
        # Read once every server process is gone: a run it finished is in the ledger.
        return _WayRun(tally.measure(ledger.counts()), _counts(injector))


def _no_progress(_way: WayName, _done: int) -> None:
    return None


async def run_chaos(
    calls: int = 200,
    concurrency: int = 8,
    *,
    faults: FaultPlan | None = None,
    seed: int | None = None,
    transport: ChaosTransport = "memory",
    raw_attempts: int = 5,
    attempt_timeout_s: float | None = None,
    call_timeout_s: float = 60.0,
    workdir: str | os.PathLike[str] | None = None,
    progress: ProgressCallback | None = None,
    server_command: ServerCommand = chaos_server_command,
) -> ChaosReport:
    """Make ``calls`` side-effecting calls three ways and report what each got right.

    See the module's docstring for the ways and the measures. The ways run one after the
    other, each against its own new server and ledger.

    Args:
        calls: Logical calls per way.
        concurrency: Calls in flight at once, per way.
        faults: The faults to inject into every way's connections (a new
            :class:`~rmcp_actors.testing.FaultInjector` per way, so each way draws the same
            faults for the k-th call of its n-th connection); None for none.
        seed: Replaces the seed of ``faults`` when given.
        transport: ``"memory"`` (the server in this process, through the SDK's in-memory
            transport) or ``"stdio"`` (a ``python -m rmcp_actors.testing.chaos_server``
            subprocess per connection).
        raw_attempts: Attempts in all per call of the naive retry loop.
        attempt_timeout_s: How long a raw attempt waits for its answer (default 2 s in memory,
            10 s over stdio).
        call_timeout_s: The rmcp way's deadline of a logical call, every attempt included.
        workdir: Where the ledgers and the store go (a new ``raw``, ``naive_retry`` and
            ``rmcp`` directory each); a temporary directory, removed afterwards, when None.
        progress: Called after each logical call with the way and its calls done.
        server_command: The argv of the stdio server for a ledger and a store (None for plain
            MCP); replace :func:`chaos_server_command` to start it another way (a wrapper, a
            warm fork server), run in :func:`chaos_server_environment`.

    Returns:
        The report of each way.

    Raises:
        ValueError: ``calls``, ``concurrency`` or ``raw_attempts`` below 1, an unknown
            ``transport``, or the ``kill`` fault in memory.
        RMCPNetworkError: A raw way's connection attempts failed 20 times in a row (the
            server cannot start); the last attempt's error is its ``__cause__``.
    """
    if calls < 1 or concurrency < 1 or raw_attempts < 1:
        raise ValueError(
            "calls, concurrency and raw_attempts must be at least 1, "
            f"got {calls}, {concurrency}, {raw_attempts}"
        )
    if transport not in _ATTEMPT_TIMEOUT_S:
        raise ValueError(f"transport must be 'memory' or 'stdio', got {transport!r}")
    if faults is not None and faults.kill > 0 and transport != "stdio":
        raise ValueError("the kill fault kills a server process: it needs the stdio transport")
    with tempfile.TemporaryDirectory(prefix="rmcp-chaos-") as temporary:
        root = Path(workdir) if workdir is not None else Path(temporary)
        root.mkdir(parents=True, exist_ok=True)
        plan = attrs.evolve(faults, seed=seed) if faults is not None and seed is not None else faults
        setup = _Setup(
            calls=calls,
            concurrency=concurrency,
            transport=transport,
            workdir=root,
            attempt_timeout_s=attempt_timeout_s or _ATTEMPT_TIMEOUT_S[transport],
            call_timeout_s=call_timeout_s,
            progress=progress or _no_progress,
            plan=plan,
            server_command=server_command,
        )
        runs: dict[WayName, _WayRun] = {
            "raw": await _raw_way(setup, "raw", attempts=1),
            "naive_retry": await _raw_way(setup, "naive_retry", attempts=raw_attempts),
            "rmcp": await _rmcp_way(setup),
        }
    config = {
        "calls": calls,
        "concurrency": concurrency,
        "faults": plan.describe() if plan is not None else "none",
        "seed": plan.seed if plan is not None else seed,
        "transport": transport,
        "raw_attempts": raw_attempts,
    }
    return ChaosReport(
        ways={name: run.report for name, run in runs.items()},
        config=config,
        faults={name: run.faults for name, run in runs.items()},
    )
