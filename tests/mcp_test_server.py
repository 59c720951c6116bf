"""A real MCP server for the tests: in memory (``build_server()``) or over stdio (run this file).

Usage over stdio::

    python tests/mcp_test_server.py [--state-dir DIR] [--garbage] [--exit-at-once] [--lifetime S]
                                    [--rmcp-store memory|PATH] [--reconcile-record] [--linear-stdio]

``--state-dir`` keeps the side-effect ledger and the "started" markers in files, so that they
survive a SIGKILL of the server and a test can read them. ``--garbage`` prints non-JSON-RPC
lines on stdout and never answers; ``--exit-at-once`` exits before the handshake;
``--lifetime S`` serves for S seconds, then exits (a server that keeps dying);
``--rmcp-store`` installs the RMCP server side with a MemoryStore or a SQLiteStore at PATH;
``--reconcile-record`` gives ``record`` a reconciler that looks its label up in the ledger;
``--linear-stdio`` serves with ``rmcp_actors.server.run_stdio`` instead of the SDK's ``run("stdio")``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, cast

import anyio

if __name__ == "__main__":
    # Run as a script, import the rmcp_actors of this checkout: the SDK's default environment
    # drops PYTHONPATH, so the interpreter would otherwise find whichever copy is installed.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mcp import MCPError
from mcp.server import Server, ServerRequestContext
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import (
    CallToolRequestParams,
    CallToolResult,
    CancelledNotificationParams,
    ListToolsResult,
    PaginatedRequestParams,
    TextContent,
    Tool,
    ToolAnnotations,
)

from rmcp_actors.server import InDoubtRun, Reconciler, Reconciliation, install, run_stdio
from rmcp_actors.stores import DedupStore, MemoryStore, SQLiteStore

READ_ONLY = ToolAnnotations(read_only_hint=True)
IDEMPOTENT = ToolAnnotations(idempotent_hint=True)


class State:
    """Side effects a test can observe: a ledger of runs, concurrency, and started markers."""

    def __init__(self, state_dir: Path | None = None) -> None:
        self.state_dir = state_dir
        self.ledger: list[str] = []
        self.running = 0
        self.peak = 0
        self.started: set[str] = set()
        self.cancel_notices: list[str] = []

    def record(self, label: str) -> None:
        if self.state_dir is None:
            self.ledger.append(label)
            return
        with (self.state_dir / "ledger").open("a") as ledger:
            ledger.write(label + "\n")

    def recorded(self) -> list[str]:
        """The ledger as it stands (read from disk with a state directory)."""
        if self.state_dir is None:
            return list(self.ledger)
        ledger = self.state_dir / "ledger"
        return ledger.read_text().splitlines() if ledger.exists() else []

    def record_cancel_notice(self, request_id: str) -> None:
        """Note a ``notifications/cancelled`` the server received (file ``cancel_notices`` on disk)."""
        if self.state_dir is None:
            self.cancel_notices.append(request_id)
            return
        with (self.state_dir / "cancel_notices").open("a") as notices:
            notices.write(request_id + "\n")

    def record_meta(self, label: str, ctx: Context) -> None:
        """Append the ``_meta.rmcp`` of this run of ``label`` (one JSON line per run, on disk)."""
        if self.state_dir is None:
            return
        meta = (ctx.request_context.meta or {}).get("rmcp") or {}
        with (self.state_dir / f"{label}.meta").open("a") as log:
            log.write(json.dumps(meta) + "\n")

    def mark_started(self, label: str) -> bool:
        """Mark ``label`` started; return False if it was already (survives a restart on disk)."""
        if self.state_dir is None:
            if label in self.started:
                return False
            self.started.add(label)
            return True
        marker = self.state_dir / f"{label}.started"
        if marker.exists():
            return False
        marker.write_text(str(os.getpid()))
        return True


def build_server(
    state: State | None = None,
    name: str = "rmcp-test",
    *,
    store: DedupStore | None = None,
    reconcile_record: bool = False,
    tasks: bool = False,
    task_ttl_s: float = 3600.0,
) -> MCPServer:
    """The test server; with ``store``, RMCP is installed on it (deduplicating in ``store``),
    and with ``reconcile_record`` as well, ``record`` has a reconciler reading the ledger; with
    ``tasks``, it runs calls as MCP tasks (``forbidden`` and ``required`` say so, ``task_ttl_s``
    is a task's default lifetime)."""
    state = state if state is not None else State()
    app = _build_plain_server(state, name)
    if store is not None:
        reconcilers = {"record": ledger_reconciler(state)} if reconcile_record else {}
        install(
            app,
            store=store,
            reconcilers=reconcilers,
            tasks=tasks,
            task_support={"forbidden": "forbidden", "required": "required"},
            task_ttl_s=task_ttl_s,
        )
    return app


def ledger_reconciler(state: State) -> Reconciler:
    """Whether an in-doubt ``record(label)`` ran: the label is in the ledger or it is not (the
    tool appends it in one write, and the run's process is gone when a reconciler is asked)."""

    async def reconcile(run: InDoubtRun) -> Reconciliation:
        label = run.arguments["label"]
        if label in state.recorded():
            return Reconciliation.did_run(f"recorded {label}")
        return Reconciliation.did_not_run()

    return reconcile


def _build_plain_server(state: State | None, name: str) -> MCPServer:
    """Return the test server; ``state`` collects its side effects."""
    state = state if state is not None else State()
    app = MCPServer(name)

    @app.tool(annotations=READ_ONLY)
    async def echo(text: str) -> str:
        """Return the text."""
        return text

    @app.tool()
    async def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    @app.tool(annotations=READ_ONLY)
    async def sleep(seconds: float) -> str:
        """Sleep, then answer: a server that hangs."""
        await anyio.sleep(seconds)
        return "slept"

    @app.tool(annotations=READ_ONLY)
    async def work(seconds: float) -> int:
        """Take a slot for a while; return the peak concurrency seen so far."""
        state.running += 1
        state.peak = max(state.peak, state.running)
        try:
            await anyio.sleep(seconds)
        finally:
            state.running -= 1
        return state.peak

    @app.tool()
    async def record(label: str) -> str:
        """A side effect that must not run twice: append ``label`` to the ledger."""
        state.record(label)
        return f"recorded {label}"

    @app.tool(annotations=IDEMPOTENT)
    async def block_idempotent(label: str, seconds: float, ctx: Context) -> str:
        """First run: mark started and block; later runs (e.g. after a restart) answer at once."""
        state.record_meta(label, ctx)
        if state.mark_started(label):
            await anyio.sleep(seconds)
        return f"done {label}"

    @app.tool()
    async def block_unsafe(label: str, seconds: float) -> str:
        """Like block_idempotent, but not annotated as safe to repeat."""
        if state.mark_started(label):
            await anyio.sleep(seconds)
        state.record(label)
        return f"done {label}"

    @app.tool(annotations=IDEMPOTENT)
    async def slow_once(label: str, seconds: float, ctx: Context) -> str:
        """The first run of ``label`` takes ``seconds``, later runs answer at once (a slow
        first attempt for a hedge to beat). A run that is cancelled records
        ``cancelled <label> <request id>`` in the ledger."""
        if state.mark_started(label):
            try:
                await anyio.sleep(seconds)
            except anyio.get_cancelled_exc_class():
                state.record(f"cancelled {label} {ctx.request_id}")
                raise
        return f"done {label}"

    @app.tool()
    async def forbidden() -> str:
        """Never run as a task (on a server with tasks)."""
        return "forbidden ran"

    @app.tool()
    async def required() -> str:
        """Run only as a task (on a server with tasks)."""
        return "required ran"

    @app.tool()
    async def fail(reason: str) -> str:
        """Report a tool error (an isError result)."""
        raise ToolError(reason)

    @app.tool()
    async def rpc_error() -> str:
        """Answer with a JSON-RPC error instead of a result."""
        raise MCPError(code=-32050, message="the test server refuses")

    @app.tool()
    async def invalid_params() -> str:
        """Refuse with a protocol-level JSON-RPC error (the tool did not run)."""
        raise MCPError(code=-32602, message="no such argument shape")

    @app.tool()
    async def busy() -> str:
        """Answer with a server-defined JSON-RPC error in the -32000 range."""
        raise MCPError(code=-32000, message="server is busy")

    @app.tool(annotations=READ_ONLY)
    async def whoami(ctx: Context) -> dict[str, Any]:
        """Return the ``_meta.rmcp`` this request carried."""
        meta = ctx.request_context.meta or {}
        return dict(meta.get("rmcp") or {})

    @app.tool(annotations=READ_ONLY)
    async def header(name: str, ctx: Context) -> str:
        """The value of an HTTP request header ("" when absent or not over HTTP)."""
        return (ctx.headers or {}).get(name.lower(), "")

    @app.tool(annotations=READ_ONLY)
    async def pid() -> int:
        """The server's process id."""
        return os.getpid()

    @app.tool(annotations=READ_ONLY)
    async def blob(size: int) -> str:
        """A text of ``size`` characters: a large result."""
        return "x" * size

    @app.tool(annotations=READ_ONLY)
    async def length(text: str) -> int:
        """The length of ``text``: a large argument, a small result."""
        return len(text)

    if state.state_dir is not None and (state.state_dir / "extra_tool").exists():

        @app.tool()
        async def extra() -> str:
            """Listed only by servers started after the test created ``extra_tool``."""
            return "extra"

    async def on_cancelled(ctx: Any, params: CancelledNotificationParams) -> None:
        state.record_cancel_notice(str(params.request_id))

    # Beside the SDK's own handling (which cancels the request's run): the notices a test reads.
    app._lowlevel_server.add_notification_handler(  # pyright: ignore[reportPrivateUsage]
        "notifications/cancelled", CancelledNotificationParams, on_cancelled
    )
    return app


def build_bad_schema_server() -> Server[Any]:
    """A low-level server whose tool breaks its own output schema."""
    tool = Tool(
        name="broken",
        input_schema={"type": "object"},
        output_schema={"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]},
    )

    async def list_tools(
        ctx: ServerRequestContext[Any], params: PaginatedRequestParams | None
    ) -> ListToolsResult:
        return ListToolsResult(tools=[tool])

    async def call_tool(ctx: ServerRequestContext[Any], params: CallToolRequestParams) -> CallToolResult:
        return CallToolResult(content=[TextContent(type="text", text="n")], structured_content={"n": "nope"})

    return Server("bad-schema", on_list_tools=list_tools, on_call_tool=call_tool)


class _DyingAfterAbort:
    """A store whose process dies right after its first tombstone is written (the file
    ``marker`` says it happened): a lookup's answer lost after the lookup did its work."""

    def __init__(self, inner: DedupStore, marker: Path) -> None:
        self.inner, self.marker = inner, marker

    async def abort(self, key: str, **fields: Any) -> Any:
        outcome = await self.inner.abort(key, **fields)  # type: ignore[attr-defined]
        if not self.marker.exists():
            self.marker.write_text("aborted")
            os._exit(5)
        return outcome

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--state-dir", type=Path)
    parser.add_argument("--garbage", action="store_true")
    parser.add_argument("--exit-at-once", action="store_true")
    parser.add_argument("--lifetime", type=float)
    parser.add_argument("--rmcp-store")
    parser.add_argument("--reconcile-record", action="store_true")
    parser.add_argument("--linear-stdio", action="store_true")
    parser.add_argument("--die-after-abort", type=Path)
    parser.add_argument("--tasks", action="store_true")
    options = parser.parse_args()
    if options.exit_at_once:
        sys.exit(3)
    if options.garbage:
        while True:
            print("this is not JSON-RPC", flush=True)
            time.sleep(0.05)
    if options.lifetime is not None:
        # A timer thread, because the stdio server blocks in a thread reading stdin and
        # cannot be cancelled from the event loop.
        threading.Timer(options.lifetime, os._exit, (4,)).start()
    store: DedupStore | None = None
    if options.rmcp_store == "memory":
        store = MemoryStore()
    elif options.rmcp_store is not None:
        store = SQLiteStore(options.rmcp_store)
    if options.die_after_abort is not None and store is not None:
        store = cast(DedupStore, _DyingAfterAbort(store, options.die_after_abort))
    app = build_server(
        State(options.state_dir), store=store, reconcile_record=options.reconcile_record, tasks=options.tasks
    )
    if options.linear_stdio:
        run_stdio(app)
    else:
        app.run("stdio")


if __name__ == "__main__":
    main()


def build_paginated_server(pages: int = 3, per_page: int = 2) -> Server[Any]:
    """A low-level server listing its tools over several pages (cursor = page number)."""
    tools = [Tool(name=f"tool{index}", input_schema={"type": "object"}) for index in range(pages * per_page)]

    async def list_tools(
        ctx: ServerRequestContext[Any], params: PaginatedRequestParams | None
    ) -> ListToolsResult:
        page = int(params.cursor) if params is not None and params.cursor else 0
        next_cursor = str(page + 1) if page + 1 < pages else None
        return ListToolsResult(tools=tools[page * per_page : (page + 1) * per_page], next_cursor=next_cursor)

    async def call_tool(ctx: ServerRequestContext[Any], params: CallToolRequestParams) -> CallToolResult:
        return CallToolResult(content=[TextContent(type="text", text=params.name)])

    return Server("paginated", on_list_tools=list_tools, on_call_tool=call_tool)
