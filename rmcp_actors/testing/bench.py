"""What ``sup.call`` costs over a raw ``mcp.Client.call_tool`` on a user's own server and tool.

The library behind ``rmcp bench`` (and usable on its own)::

    report = await run_bench(spec, "get_time", {"timezone": "UTC"}, calls=2000, concurrency=8)
    print(report.ratio, report.added_median_us)

Three clients of the same server run the same tool with the same arguments, side by side in one
``trio.run``: ``raw`` (the SDK's ``mcp.Client`` on the SDK's own transport for the spec), ``raw2``
(a second, identical raw client: the control, so that ``raw2/raw`` shows how far noise alone moves
a ratio) and ``rmcp`` (``RMCPSupervisor.call`` with the configured policies). After a warm-up of
each they run interleaved blocks of the same number of calls (raw, raw2, rmcp, raw, raw2, rmcp,
...), ``gc.collect()`` before every block, so that a slow drift of the machine falls on every
client alike. This is the design of ``benchmarks/overhead.py``, which measures the no-op tool.

The tool runs once per call on every client (three times the calls in all): point the benchmark
at a tool whose side effects you can afford to repeat.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, Final, Literal, cast

import attrs
import trio
from mcp import Client, StdioServerParameters
from mcp.client._memory import InMemoryTransport
from mcp.client.streamable_http import streamable_http_client
from mcp.server import Server
from mcp.server.mcpserver import MCPServer
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp_types import ContentBlock

from ..client._transport import client_mode
from ..client.auth import resolve_auth
from ..config import RMCPConfig, ServerSpec
from ..errors import RMCPArgumentError, RMCPError, RMCPNetworkError
from ..root import RMCPSupervisor

__all__ = ["BenchReport", "BenchSide", "BenchToolError", "ClientName", "run_bench"]

ClientName = Literal["raw", "raw2", "rmcp"]
CLIENTS: Final[tuple[ClientName, ...]] = ("raw", "raw2", "rmcp")
_Call = Callable[[], Awaitable[None]]
#: Progress callback: blocks done so far, blocks in all (warm-up counted as one per client).
Progress = Callable[[int, int], None]


class BenchToolError(RMCPError):
    """The benchmarked tool answered with an error (``isError``) during the warm-up.

    A benchmark of error results measures nothing a user wants: fix the tool's arguments (the
    message quotes the tool's own error text) or pick another tool.
    """


@attrs.frozen
class BenchSide:
    """The figures of one client over every measured block.

    Attributes:
        calls: Calls measured (warm-up excluded).
        calls_per_s: Median over blocks of calls per second.
        median_us: Median latency of one call, over every measured call, in microseconds.
        p99_us: 99th percentile of the same latencies (nearest rank).
        block_calls_per_s: Calls per second of each block, in the order run.
    """

    calls: int
    calls_per_s: float
    median_us: float
    p99_us: float
    block_calls_per_s: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        """The figures as a JSON-ready dict."""
        return {
            "calls": self.calls,
            "calls_per_s": self.calls_per_s,
            "median_us": self.median_us,
            "p99_us": self.p99_us,
            "block_calls_per_s": list(self.block_calls_per_s),
        }


@attrs.frozen
class BenchReport:
    """The outcome of :func:`run_bench`: each client's figures and how they compare.

    Attributes:
        server: The server's name.
        tool: The tool called.
        transport: ``"memory"``, ``"stdio"`` or ``"http"``.
        blocks: Blocks per client.
        calls_per_block: Calls per block (split over the concurrent callers).
        concurrency: Concurrent callers per block.
        raw: The SDK's ``mcp.Client``.
        raw2: A second, identical raw client (the control).
        rmcp: ``RMCPSupervisor.call``.
    """

    server: str
    tool: str
    transport: str
    blocks: int
    calls_per_block: int
    concurrency: int
    raw: BenchSide
    raw2: BenchSide
    rmcp: BenchSide

    @property
    def ratio(self) -> float:
        """Throughput of rmcp over raw (ratio of the median calls/s): 1.0 costs nothing."""
        return self.rmcp.calls_per_s / self.raw.calls_per_s

    @property
    def control_ratio(self) -> float:
        """raw2 over raw: how far from 1.0 noise alone moves :attr:`ratio` in this run."""
        return self.raw2.calls_per_s / self.raw.calls_per_s

    @property
    def added_median_us(self) -> float:
        """rmcp's median latency minus raw's, in microseconds (queueing-bound when concurrent)."""
        return self.rmcp.median_us - self.raw.median_us

    @property
    def added_p99_us(self) -> float:
        """rmcp's p99 latency minus raw's, in microseconds."""
        return self.rmcp.p99_us - self.raw.p99_us

    def to_dict(self) -> dict[str, Any]:
        """The report as one JSON-ready object (what ``rmcp bench --json`` prints)."""
        return {
            "server": self.server,
            "tool": self.tool,
            "transport": self.transport,
            "blocks": self.blocks,
            "calls_per_block": self.calls_per_block,
            "concurrency": self.concurrency,
            "clients": {name: getattr(self, name).to_dict() for name in CLIENTS},
            "ratio_rmcp_raw": self.ratio,
            "control_raw2_raw": self.control_ratio,
            "added_median_us": self.added_median_us,
            "added_p99_us": self.added_p99_us,
        }


def _percentile(ordered: list[float], share: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def _side(blocks: list[tuple[int, float, list[float]]]) -> BenchSide:
    latencies = sorted(latency for _, _, block in blocks for latency in block)
    per_block = tuple(calls / elapsed for calls, elapsed, _ in blocks)
    return BenchSide(
        calls=len(latencies),
        calls_per_s=statistics.median(per_block),
        median_us=statistics.median(latencies) * 1e6,
        p99_us=_percentile(latencies, 0.99) * 1e6,
        block_calls_per_s=per_block,
    )


def _raw_client(spec: ServerSpec, stack: AsyncExitStack, connect_timeout_s: float) -> Client:
    """The bare SDK client a user would write for ``spec``, on the SDK's own transport; its
    handshake bounded by ``connect_timeout_s`` (each call sets its own read timeout)."""
    mode = client_mode(spec.protocol)
    if spec.transport == "stdio":
        assert spec.command is not None  # validated by ServerSpec
        params = StdioServerParameters(
            command=spec.command,
            args=list(spec.args),
            env=dict(spec.env) if spec.env is not None else None,
            cwd=spec.cwd,
        )
        return Client(params, mode=mode, read_timeout_seconds=connect_timeout_s)
    if spec.transport == "http":
        assert spec.url is not None  # validated by ServerSpec
        headers = dict(spec.headers) if spec.headers is not None else None
        http_client = create_mcp_http_client(headers=headers, auth=resolve_auth(spec))
        stack.push_async_callback(http_client.aclose)
        return Client(
            streamable_http_client(spec.url, http_client=http_client),
            mode=mode,
            read_timeout_seconds=connect_timeout_s,
        )
    server = cast("MCPServer[Any] | Server[Any]", spec.server)
    return Client(InMemoryTransport(server), mode=mode, read_timeout_seconds=connect_timeout_s)


def _tool_error(spec: ServerSpec, tool: str, content: list[ContentBlock]) -> BenchToolError:
    texts = [getattr(block, "text", "") for block in content]
    quoted = " ".join(text for text in texts if text)[:500] or "(no text)"
    return BenchToolError(
        f"the tool answered with an error: {quoted}; fix its --args or benchmark another tool",
        server=spec.name,
        tool=tool,
    )


@asynccontextmanager
async def _open_clients(
    config: RMCPConfig, spec: ServerSpec, tool: str, arguments: Mapping[str, Any], timeout_s: float
) -> AsyncGenerator[dict[ClientName, _Call]]:
    """Open rmcp, raw and raw2 on ``spec``; each entry makes one call of ``tool``."""
    arguments = dict(arguments)
    async with AsyncExitStack() as stack:
        calls: dict[ClientName, _Call] = {}
        only_this_server = attrs.evolve(config, servers={spec.name: spec})
        # rmcp first: a server that cannot be reached fails within connect_timeout_s and says
        # why, where the SDK's client would wait for its handshake for ever.
        sup = await stack.enter_async_context(RMCPSupervisor.open(only_this_server))
        connect_timeout_s = only_this_server.server_policy(spec).connect_timeout_s
        for name in ("raw", "raw2"):
            try:
                client = await stack.enter_async_context(_raw_client(spec, stack, connect_timeout_s))
            except Exception as exc:
                raise RMCPNetworkError(
                    f"the raw SDK client could not connect to {spec.describe()}: {exc!r}", server=spec.name
                ) from exc

            async def raw_call(client: Client = client) -> None:
                result = await client.call_tool(tool, arguments, read_timeout_seconds=timeout_s)
                if result.is_error:
                    raise _tool_error(spec, tool, result.content)

            calls[name] = raw_call

        async def rmcp_call() -> None:
            result = await sup.call(spec.name, tool, arguments, timeout=timeout_s)
            if result.is_error:
                raise _tool_error(spec, tool, result.content)

        calls["rmcp"] = rmcp_call
        yield calls


def _first_leaf(group: BaseExceptionGroup[Exception]) -> Exception:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


async def _block(call: _Call, calls: int, concurrency: int) -> tuple[int, float, list[float]]:
    """Make ``calls`` calls from ``concurrency`` tasks; return (calls, seconds, latencies)."""
    clock = time.perf_counter
    latencies: list[float] = []
    per_caller = max(1, calls // concurrency)

    async def caller() -> None:
        for _ in range(per_caller):
            start = clock()
            await call()
            latencies.append(clock() - start)

    gc.collect()
    started = clock()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(caller)
    return len(latencies), clock() - started, latencies


async def run_bench(
    spec: ServerSpec,
    tool: str,
    arguments: Mapping[str, Any],
    *,
    config: RMCPConfig | None = None,
    calls: int = 1000,
    concurrency: int = 1,
    blocks: int = 5,
    warmup_calls: int | None = None,
    timeout_s: float = 60.0,
    progress: Progress | None = None,
) -> BenchReport:
    """Measure ``tool`` on ``spec`` through raw, raw2 and rmcp in interleaved blocks.

    Args:
        spec: The server (stdio, Streamable HTTP, or in memory).
        tool: The tool to call.
        arguments: Its arguments, the same on every call.
        config: Runtime settings and policy defaults for the rmcp client (its ``servers`` are
            replaced by ``spec`` alone); None for the defaults.
        calls: Measured calls per client, split into ``blocks`` blocks.
        concurrency: Concurrent callers within a block.
        blocks: Blocks per client (at least 1; 5 or more give steadier medians).
        warmup_calls: Unmeasured calls per client first (default: a tenth of ``calls``, 10 to 200).
        timeout_s: Deadline of each call (rmcp) and read timeout (raw).
        progress: Called after the warm-up and after every block with (done, total).

    Returns:
        The figures of each client and their ratios.

    Raises:
        BenchToolError: The tool answered with an error during the warm-up.
        RMCPArgumentError: ``calls``, ``concurrency`` or ``blocks`` is out of range.
        RMCPError: rmcp could not call the tool (unknown tool, server unreachable...).
    """
    if blocks < 1 or concurrency < 1 or calls < blocks * concurrency:
        raise RMCPArgumentError(
            f"need blocks >= 1, concurrency >= 1 and calls >= blocks x concurrency "
            f"(got calls={calls}, concurrency={concurrency}, blocks={blocks})"
        )
    per_block = calls // blocks
    warmup = warmup_calls if warmup_calls is not None else min(200, max(10, calls // 10))
    total = blocks + 1
    measured: dict[ClientName, list[tuple[int, float, list[float]]]] = {name: [] for name in CLIENTS}
    try:
        async with _open_clients(config or RMCPConfig(), spec, tool, arguments, timeout_s) as clients:
            # rmcp warms up first: a failing tool then fails through the runtime's one
            # classification (unknown tool, refused, may have run), not as an untyped SDK error.
            for name in ("rmcp", "raw", "raw2"):
                await _block(clients[name], max(warmup, concurrency), concurrency)
            if progress is not None:
                progress(1, total)
            for index in range(blocks):
                for name in CLIENTS:
                    measured[name].append(await _block(clients[name], per_block, concurrency))
                if progress is not None:
                    progress(index + 2, total)
    except ExceptionGroup as group:
        # The concurrent callers (and the SDK's task groups) wrap the first failure: report it.
        raise _first_leaf(group) from group
    return BenchReport(
        server=spec.name,
        tool=tool,
        transport=spec.transport,
        blocks=blocks,
        calls_per_block=(per_block // concurrency) * concurrency,
        concurrency=concurrency,
        raw=_side(measured["raw"]),
        raw2=_side(measured["raw2"]),
        rmcp=_side(measured["rmcp"]),
    )
