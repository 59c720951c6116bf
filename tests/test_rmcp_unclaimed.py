"""Tools their server declares read-only run unclaimed (issue 13): no claim is
written before the run, the outcome is recorded in one write (``DedupStore.record``), and the
answers to clients are those of a claimed run: a retry replays, other arguments conflict, a
local duplicate joins the run. What changes is a crash during the run: no in-doubt record is
left, and the retry runs the tool again (harmless by the tool's declaration), where a plain
tool's retry is still ``in_doubt``.

Real servers in memory and over stdio (a SIGKILLed subprocess on a SQLite store); MockClock
for time in memory."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, cast

import mcp
import pytest
import trio
import trio.testing
from _counting_server import CountingStore, Wrapped, build, meta, stamp, text_of
from mcp import MCPError, StdioServerParameters
from mcp.client._memory import InMemoryTransport
from mcp.server import Server
from mcp.server.mcpserver import MCPServer
from mcp_types import ToolAnnotations

from rmcp_actors.server import install, rmcp_of, store_key
from rmcp_actors.server._wire import RATE_LIMITED_CODE
from rmcp_actors.stores import BeginOutcome, MemoryStore

COUNTING_SERVER = Path(__file__).with_name("_counting_server.py")
SAME_PACKAGE = {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
CLAIMED = [("begin_now", True), ("complete_now", None)]

CRASH_SERVER = """
import os, sys
from pathlib import Path
import anyio
from mcp.server import Server
from mcp.server.mcpserver import MCPServer
from mcp_types import ToolAnnotations
from rmcp_actors.server import install
from rmcp_actors.stores import SQLiteStore

folder = Path(sys.argv[1])
app = MCPServer("crash")

async def effect(label: str) -> str:
    with open(folder / "ledger", "a") as ledger:
        ledger.write(f"{label} {os.getpid()}\\n")
    if (folder / "hang").exists():
        await anyio.sleep(3600)
    return f"done {label}"

@app.tool(annotations=ToolAnnotations(read_only_hint=True))
async def put(label: str) -> str:
    return await effect(label)

@app.tool()
async def pay(label: str) -> str:
    return await effect(label)

install(app, store=SQLiteStore(folder / "rmcp.sqlite"))
app.run()
"""


def app_with_runs(store: Any) -> tuple[MCPServer, list[str], trio.Event]:
    """A counting server with ``put`` and ``read`` (read-only) and ``set`` (idempotent, not
    read-only), which log their runs; ``put`` with label "slow" waits for the event."""
    app = build(store)
    runs: list[str] = []
    release = trio.Event()

    @app.tool(annotations=ToolAnnotations(read_only_hint=True))
    async def put(label: str) -> str:
        runs.append(label)
        if label == "slow":
            await release.wait()
        return f"put {label}"

    @app.tool(annotations=ToolAnnotations(read_only_hint=True))
    async def read(label: str) -> str:
        runs.append(label)
        return f"read {label}"

    @app.tool(annotations=ToolAnnotations(idempotent_hint=True))
    async def set(label: str) -> str:  # pyright: ignore[reportUnusedFunction]
        runs.append(label)
        return f"set {label}"

    return app, runs, release


async def test_a_read_only_tool_takes_one_write_and_a_plain_one_claim_and_result(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = CountingStore(clock=trio.current_time)
    app, runs, _ = app_with_runs(store)
    async with mcp.Client(InMemoryTransport(app)) as client:
        await client.call_tool("echo", {"text": "a"}, meta=meta("plain"))
        assert store.calls == CLAIMED
        store.calls.clear()
        put = await client.call_tool("echo_read_only", {"text": "a"}, meta=meta("idem"))
        read = await client.call_tool("read", {"label": "r"}, meta=meta("read"))
    assert (text_of(put), stamp(put)["ack"], stamp(put)["duplicate"]) == ("a", True, False)
    assert text_of(read) == "read r"
    assert store.calls == [("record_now", None), ("record_now", None)]
    assert runs == ["r"]


async def test_an_idempotent_tool_that_is_not_read_only_is_claimed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Its run may have an effect: a lookup finding no record of an unclaimed key would answer
    ``aborted`` and hide it from a saga, so it keeps the claim (and in_doubt after a crash)."""
    store = CountingStore(clock=trio.current_time)
    app, runs, _ = app_with_runs(store)
    async with mcp.Client(InMemoryTransport(app)) as client:
        result = await client.call_tool("set", {"label": "s"}, meta=meta("set"))
    assert (text_of(result), stamp(result)["ack"]) == ("set s", True)
    assert store.calls == CLAIMED
    assert runs == ["s"]


async def test_a_retry_is_replayed_and_other_arguments_conflict(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = CountingStore(clock=trio.current_time)
    app, runs, _ = app_with_runs(store)
    async with mcp.Client(InMemoryTransport(app)) as client:
        first = await client.call_tool("put", {"label": "a"}, meta=meta("k"))
        retry = await client.call_tool("put", {"label": "a"}, meta=meta("k", 2))
        other = await client.call_tool("put", {"label": "b"}, meta=meta("k", 3))
    assert runs == ["a"]
    assert (stamp(first)["duplicate"], stamp(retry)["duplicate"]) == (False, True)
    assert text_of(retry) == text_of(first) == "put a"
    assert other.is_error
    assert (stamp(other)["ack"], stamp(other)["code"]) == (False, "idempotency_conflict")
    # The retries found the record and claimed nothing.
    assert [call for call, _ in store.calls] == ["record_now", "begin_now", "begin_now"]


async def test_a_concurrent_duplicate_joins_the_run(autojump_clock: trio.testing.MockClock) -> None:
    store = CountingStore(clock=trio.current_time)
    app, runs, release = app_with_runs(store)
    results: list[Any] = []
    async with mcp.Client(InMemoryTransport(app)) as client:

        async def call(attempt: int) -> None:
            results.append(await client.call_tool("put", {"label": "slow"}, meta=meta("k", attempt)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(call, 1)
            await trio.sleep(1)
            nursery.start_soon(call, 2)
            await trio.sleep(1)
            release.set()
    assert runs == ["slow"]
    assert sorted(stamp(result)["duplicate"] for result in results) == [False, True]
    side = rmcp_of(app)
    assert side is not None
    assert side.statistics().coalesced == 1
    assert store.calls == [("record_now", None)]


async def test_a_record_written_meanwhile_elsewhere_leaves_this_run_answered(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Another process sharing the store ran and recorded the key during this run: this run's
    caller gets this run's result (the tool ran), never a conflict."""
    store = MemoryStore(clock=trio.current_time)
    app, runs, release = app_with_runs(store)
    answers: list[Any] = []
    async with mcp.Client(InMemoryTransport(app)) as client:

        async def call() -> None:
            answers.append(await client.call_tool("put", {"label": "slow"}, meta=meta("k")))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(call)
            await trio.sleep(1)
            elsewhere = await store.record(
                store_key("k"), fingerprint="other", tool="put", owner="another", result=b"x"
            )
            assert elsewhere is None
            release.set()
    [answer] = answers
    assert (text_of(answer), stamp(answer)["ack"], stamp(answer)["duplicate"]) == ("put slow", True, False)
    assert runs == ["slow"]


class NoRecord(Wrapped):
    """A store written before ``record`` existed: it counts its claims."""

    def __init__(self) -> None:
        super().__init__(clock=trio.current_time)
        self.claims = 0

    def begin_now(
        self, key: str, *, fingerprint: str, tool: str, owner: str, entered: bool = False
    ) -> BeginOutcome | None:
        self.claims += 1
        return super().begin_now(key, fingerprint=fingerprint, tool=tool, owner=owner, entered=entered)

    def __getattr__(self, name: str) -> Any:
        if name == "record":
            raise AttributeError(name)
        return super().__getattr__(name)


async def test_a_store_without_record_or_a_low_level_server_claims_first(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = NoRecord()
    async with mcp.Client(InMemoryTransport(build(store))) as client:
        result = await client.call_tool("echo_read_only", {"text": "a"}, meta=meta("k"))
        retry = await client.call_tool("echo_read_only", {"text": "a"}, meta=meta("k", 2))
    assert (text_of(result), stamp(retry)["duplicate"]) == ("a", True)
    assert store.claims == 2
    # Nothing declares a low-level Server's tools.
    side = rmcp_of(install(Server("low")))
    assert side is not None
    assert side.repeatable is None


async def test_over_stdio_a_read_only_tool_takes_one_write() -> None:
    params = StdioServerParameters(command=sys.executable, args=[str(COUNTING_SERVER)], env=SAME_PACKAGE)
    with trio.fail_after(30):
        async with mcp.Client(params) as client:
            first = await client.call_tool("echo_read_only", {"text": "a"}, meta=meta("a"))
            retry = await client.call_tool("echo_read_only", {"text": "a"}, meta=meta("a", 2))
            plain = await client.call_tool("echo", {"text": "b"}, meta=meta("b"))
            writes = json.loads(text_of(await client.call_tool("writes", {})))
    assert (stamp(first)["duplicate"], stamp(retry)["duplicate"], stamp(plain)["duplicate"]) == (
        False,
        True,
        False,
    )
    assert [tuple(call) for call in writes] == [("record_now", None), ("begin_now", True), *CLAIMED]


async def start_killed_run(folder: Path, tool: str, key: str) -> None:
    """Call ``tool`` with ``key`` on a fresh crash server, and SIGKILL the server during the run."""
    script = folder / "server.py"
    script.write_text(CRASH_SERVER)
    (folder / "hang").touch()
    params = StdioServerParameters(command=sys.executable, args=[str(script), str(folder)], env=SAME_PACKAGE)
    ledger = folder / "ledger"
    before = ledger.read_text().count("\n") if ledger.exists() else 0
    with trio.fail_after(30):
        async with mcp.Client(params) as client, trio.open_nursery() as nursery:

            async def call() -> None:
                # The connection dies with the server: whatever the client raises then.
                with pytest.raises(Exception):  # noqa: B017, PT011
                    await client.call_tool(tool, {"label": "x"}, meta=meta(key))

            nursery.start_soon(call)
            while not ledger.exists() or ledger.read_text().count("\n") == before:
                # Another process: nothing to wait on but the file it writes.
                await trio.sleep(0.02)
            pid = int(ledger.read_text().splitlines()[-1].split()[1])
            os.kill(pid, signal.SIGKILL)
    (folder / "hang").unlink()


async def retry_on_a_new_server(folder: Path, tool: str, key: str) -> Any:
    params = StdioServerParameters(
        command=sys.executable, args=[str(folder / "server.py"), str(folder)], env=SAME_PACKAGE
    )
    with trio.fail_after(30):
        async with mcp.Client(params) as client:
            return await client.call_tool(tool, {"label": "x"}, meta=meta(key, 2))


async def test_a_crash_during_a_read_only_run_lets_the_retry_run_it_again(tmp_path: Path) -> None:
    await start_killed_run(tmp_path, "put", "k")
    retry = await retry_on_a_new_server(tmp_path, "put", "k")
    assert (text_of(retry), stamp(retry)["ack"], stamp(retry)["duplicate"]) == ("done x", True, False)
    assert len((tmp_path / "ledger").read_text().splitlines()) == 2


async def test_a_crash_during_a_plain_run_leaves_the_retry_in_doubt(tmp_path: Path) -> None:
    await start_killed_run(tmp_path, "pay", "k")
    retry = await retry_on_a_new_server(tmp_path, "pay", "k")
    assert retry.is_error
    assert (stamp(retry)["ack"], stamp(retry)["code"]) == (False, "in_doubt")
    assert len((tmp_path / "ledger").read_text().splitlines()) == 1


async def test_a_refusal_or_a_run_cut_short_records_nothing(autojump_clock: trio.testing.MockClock) -> None:
    """A tool's "nothing done" refusal (-32023) is not recorded, as a claimed run releases its
    key; a run cut by max_execution_s records nothing either (no claim to mark in doubt): its
    caller gets in_doubt, and the retry runs the tool again."""
    store = CountingStore(clock=trio.current_time)
    app = MCPServer("t")
    runs: list[str] = []

    @app.tool(annotations=ToolAnnotations(read_only_hint=True))
    async def put(label: str) -> str:
        runs.append(label)
        if label == "refused" and runs.count("refused") == 1:
            raise MCPError(RATE_LIMITED_CODE, "over the limit", {"retryAfterMs": 10})
        if label == "slow" and runs.count("slow") == 1:
            await trio.sleep(100)
        return f"put {label}"

    install(app, store=cast(Any, store), max_execution_s=10)
    async with mcp.Client(InMemoryTransport(app)) as client:
        with pytest.raises(MCPError) as refused:
            await client.call_tool("put", {"label": "refused"}, meta=meta("r"))
        again = await client.call_tool("put", {"label": "refused"}, meta=meta("r", 2))
        cut = await client.call_tool("put", {"label": "slow"}, meta=meta("s"))
        retried = await client.call_tool("put", {"label": "slow"}, meta=meta("s", 2))
    assert refused.value.error.code == RATE_LIMITED_CODE
    assert (text_of(again), stamp(again)["duplicate"]) == ("put refused", False)
    assert cut.is_error
    assert stamp(cut)["code"] == "in_doubt"
    assert (text_of(retried), stamp(retried)["duplicate"]) == ("put slow", False)
    assert runs == ["refused", "refused", "slow", "slow"]
    assert store.calls == [("record_now", None), ("record_now", None)]
