"""The chaos MCP server's implementation; run it as ``python -m rmcp_actors.testing.chaos_server``
(see that module for the tools and options)."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any, Final, Literal, final

import anyio
import attrs
from mcp import MCPError
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import INTERNAL_ERROR

from ..flow._feedback import RATE_LIMITED_CODE
from ..server import install, run_stdio
from ..stores import DedupStore, MemoryStore, SQLiteStore

__all__ = ["DEFAULT_LEDGER", "DEFAULT_RATE_PER_S", "MAX_LARGE_SIZE", "Ledger", "build_chaos_server", "main"]

#: The ledger file when ``--ledger`` is not given (in the current directory).
DEFAULT_LEDGER: Final = "chaos-ledger.sqlite"
#: Calls per second ``limited`` accepts when ``--rate`` is not given.
DEFAULT_RATE_PER_S: Final = 10.0
#: The largest payload ``large`` builds, in characters.
MAX_LARGE_SIZE: Final = 64 << 20

# Long enough for every other process's commit: each write is one short autocommit transaction.
_BUSY_TIMEOUT_MS: Final = 10_000
_PATTERN: Final = "0123456789abcdef"

FailureKind = Literal["tool_error", "exception", "protocol_error"]


@final
class Ledger:
    """The side-effect ledger: one row per run of ``effect(label)``, in a SQLite file.

    Several processes may write and read the same file at once (WAL, a busy timeout); a row is
    committed before ``effect`` answers, and survives the process being killed.

    Args:
        path: The SQLite file; created with its table if absent.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        # isolation_level=None: each INSERT is its own transaction, committed when it returns.
        self._connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._connection.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        self._connection.execute("PRAGMA journal_mode = WAL")
        # A killed process loses nothing committed (the WAL is in the OS's page cache); only a
        # power loss could, which no chaos run simulates.
        self._connection.execute("PRAGMA synchronous = NORMAL")
        self._connection.execute(
            "CREATE TABLE IF NOT EXISTS effects ("
            " seq INTEGER PRIMARY KEY AUTOINCREMENT, label TEXT NOT NULL,"
            " pid INTEGER NOT NULL, at REAL NOT NULL)"
        )
        self._connection.execute("CREATE INDEX IF NOT EXISTS effects_label ON effects (label)")

    def record(self, label: str) -> None:
        """Add one row for a run of ``label`` (committed when this returns)."""
        with self._lock:
            self._connection.execute(
                "INSERT INTO effects (label, pid, at) VALUES (?, ?, ?)", (label, os.getpid(), time.time())
            )

    def counts(self, label: str | None = None) -> dict[str, int]:
        """Runs per label: of ``label`` only (``{label: 0}`` if it never ran), or of every label."""
        with self._lock:
            if label is not None:
                query = "SELECT COUNT(*) FROM effects WHERE label = ?"
                [(count,)] = self._connection.execute(query, (label,))
                return {label: int(count)}
            rows = self._connection.execute("SELECT label, COUNT(*) FROM effects GROUP BY label")
            return {str(name): int(count) for name, count in rows}

    def total(self) -> int:
        """How many runs the ledger holds, all labels together."""
        with self._lock:
            [(count,)] = self._connection.execute("SELECT COUNT(*) FROM effects")
            return int(count)

    def close(self) -> None:
        """Close the connection (the file stays)."""
        with self._lock:
            self._connection.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


@attrs.define
class _Gauge:
    """Tool runs in progress in this process, and the most there were at once."""

    running: int = 0
    peak: int = 0

    @contextlib.contextmanager
    def run(self) -> Generator[None]:
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            yield
        finally:
            self.running -= 1


@attrs.define
class _TokenBucket:
    """``rate`` calls per second with a burst of one second, on the event loop's clock (so a
    test's MockClock drives it)."""

    rate: float
    tokens: float = attrs.field(init=False)
    updated: float | None = None

    def __attrs_post_init__(self) -> None:
        self.tokens = self.burst

    @property
    def burst(self) -> float:
        return max(1.0, self.rate)

    def take(self) -> float | None:
        """None when a call may run now, else the seconds until one may."""
        now = anyio.current_time()
        if self.updated is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return None
        return (1 - self.tokens) / self.rate


@attrs.frozen
class _RateLimitGate:
    """Server middleware refusing ``limited`` calls over the bucket's rate with ``-32023``."""

    bucket: _TokenBucket

    async def __call__(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        if ctx.method == "tools/call" and (ctx.params or {}).get("name") == "limited":
            wait = self.bucket.take()
            if wait is not None:
                retry_after_ms = math.ceil(wait * 1000)
                rate = f"{self.bucket.rate:g} calls/s"
                raise MCPError(
                    code=RATE_LIMITED_CODE,
                    message=f"Rate limited: over {rate}, retry after {retry_after_ms} ms",
                    data={"retryAfterMs": retry_after_ms},
                )
        return await call_next(ctx)


def build_chaos_server(
    ledger: Ledger | str | os.PathLike[str],
    store: DedupStore | None = None,
    *,
    rmcp: bool = True,
    rate_per_s: float = DEFAULT_RATE_PER_S,
    close_store: bool = False,
    name: str = "chaos",
) -> MCPServer[Any]:
    """Return the chaos server (see the module's docstring for its tools), to serve in memory
    (``ServerSpec.in_memory``, the SDK's ``InMemoryTransport``) or over any transport.

    Args:
        ledger: The ledger, or the path of its SQLite file.
        store: The RMCP idempotency store; None for a new ``MemoryStore``. Pass a
            ``SQLiteStore`` to replay keyed calls across reconnects and restarts.
        rmcp: Install the RMCP server side; False serves plain MCP (``store`` must be None).
        rate_per_s: Calls per second ``limited`` accepts (a burst of one second's worth).
        close_store: Close ``store`` when the server's lifespan ends. An in-memory server's
            lifespan runs once per client connection, so the default leaves it to the caller
            (``await store.aclose()``) and lets reconnects use it again.

    Raises:
        ValueError: ``store`` with ``rmcp=False``, or ``rate_per_s`` not positive.
    """
    if store is not None and not rmcp:
        raise ValueError("a plain MCP server (rmcp=False) has no idempotency store")
    if not rate_per_s > 0:
        raise ValueError(f"rate_per_s must be a positive number, got {rate_per_s!r}")
    book = ledger if isinstance(ledger, Ledger) else Ledger(ledger)
    gauge = _Gauge()
    # Outermost first: the rate-limit refusal comes before RMCP claims the call's key, as a
    # gateway's does. (Raised by the tool, RMCP would release the key as well, after a claim
    # write and a release per refused call: a flood of refusals must not load the store.)
    app: MCPServer[Any] = MCPServer(name, middleware=[_RateLimitGate(_TokenBucket(rate_per_s))])

    @app.tool()
    async def effect(label: str) -> str:  # pyright: ignore[reportUnusedFunction]
        """Run a side effect that must not run twice: one row per run in the ledger."""
        with gauge.run():
            book.record(label)
            return f"effect {label}"

    @app.tool(name="ledger")
    async def ledger_counts(label: str | None = None) -> dict[str, int]:  # pyright: ignore[reportUnusedFunction]
        """The ledger's runs per label: of ``label``, or of every label."""
        return book.counts(label)

    @app.tool()
    async def fail(  # pyright: ignore[reportUnusedFunction]
        how: FailureKind = "tool_error", message: str = "chaos: this tool fails"
    ) -> str:
        """Fail: an error result (tool_error), an unexpected exception, or a JSON-RPC error."""
        with gauge.run():
            if how == "tool_error":
                raise ToolError(message)
            if how == "protocol_error":
                raise MCPError(code=INTERNAL_ERROR, message=message)
            raise RuntimeError(message)

    @app.tool()
    async def hang() -> str:  # pyright: ignore[reportUnusedFunction]
        """Never answer: run until cancelled."""
        with gauge.run():
            await anyio.sleep_forever()
        raise AssertionError("unreachable: sleep_forever returned")

    @app.tool()
    async def slow(seconds: float, label: str | None = None) -> str:  # pyright: ignore[reportUnusedFunction]
        """Answer after ``seconds``; record ``label`` in the ledger first if given."""
        with gauge.run():
            if label is not None:
                book.record(label)
            await anyio.sleep(seconds)
            return f"slept {seconds:g} s"

    @app.tool()
    async def limited(text: str = "ok") -> str:  # pyright: ignore[reportUnusedFunction]
        """Answer ``text``; more calls per second than the server's rate are refused (-32023)."""
        with gauge.run():
            return text

    @app.tool(structured_output=False)
    async def large(size: int) -> str:  # pyright: ignore[reportUnusedFunction]
        """A text of exactly ``size`` characters."""
        if not 0 <= size <= MAX_LARGE_SIZE:
            raise ToolError(f"size must be between 0 and {MAX_LARGE_SIZE}, got {size}")
        with gauge.run():
            return (_PATTERN * (size // len(_PATTERN) + 1))[:size]

    @app.tool()
    async def peak_concurrency(reset: bool = False) -> dict[str, int]:  # pyright: ignore[reportUnusedFunction]
        """The most tool runs at once in this process (``peak``) and those running now."""
        figures = {"peak": gauge.peak, "running": gauge.running}
        if reset:
            gauge.peak = gauge.running
        return figures

    if rmcp:
        install(app, store=MemoryStore() if store is None else store, close_store=close_store)
    return app


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


def main(argv: Sequence[str] | None = None) -> None:
    """Serve the chaos server over stdio (or Streamable HTTP) until the client goes away."""
    parser = argparse.ArgumentParser(
        prog="python -m rmcp_actors.testing.chaos_server",
        description="An MCP server whose tools fail, hang, are slow, rate-limit, return large "
        "payloads and count their side effects.",
    )
    parser.add_argument(
        "--ledger",
        type=Path,
        default=Path(DEFAULT_LEDGER),
        help=f"the side-effect ledger (SQLite; default {DEFAULT_LEDGER})",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--store", type=Path, help="RMCP with a durable SQLiteStore at this path")
    mode.add_argument("--plain", action="store_true", help="plain MCP, without RMCP")
    parser.add_argument(
        "--rate",
        type=_positive,
        default=DEFAULT_RATE_PER_S,
        metavar="N",
        help=f"calls per second the limited tool accepts (default {DEFAULT_RATE_PER_S:g})",
    )
    parser.add_argument("--http", type=_host_port, metavar="HOST:PORT", help="serve Streamable HTTP here")
    options = parser.parse_args(argv)
    store = SQLiteStore(options.store) if options.store is not None else None
    app = build_chaos_server(
        options.ledger, store, rmcp=not options.plain, rate_per_s=options.rate, close_store=True
    )
    if options.http is None:
        run_stdio(app)
        return
    host, port = options.http
    print(f"chaos server on http://{host}:{port}/mcp", file=sys.stderr)
    app.run("streamable-http", host=host, port=port)
