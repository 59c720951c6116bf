"""Fault injection (rmcp_actors.testing.faults): each kind happens as configured, seeded,
counted and logged, over in-memory, stdio and Streamable HTTP transports, with a raw
``mcp.Client`` and through RMCPSupervisor."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any, Literal, cast

import attrs
import pytest
import trio
import trio.testing
from conftest import FAST_RECOVERY, PYTHON, durable_store, process_gone, stdio_args
from mcp import Client, MCPError, StdioServerParameters
from mcp.client._memory import InMemoryTransport
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import MCPServer
from mcp.shared.message import SessionMessage
from mcp.types import RequestParams
from mcp_test_server import State, build_server
from mcp_types import JSONRPCResponse, Request
from pydantic import BaseModel, ConfigDict

from rmcp_actors import (
    MemoryStore,
    Outcome,
    PolicyOverrides,
    RetryOverrides,
    RMCPConfigError,
    RMCPSupervisor,
    ServerSpec,
)
from rmcp_actors._transfer import (
    CHUNK_INVALID_CODE,
    METHOD_READ,
    METHOD_WRITE,
    TRANSFER_NOT_FOUND_CODE,
    decode_chunk,
    encode_chunk,
    handle_for,
    sha256_hex,
)
from rmcp_actors.config import CircuitBreakerOverrides, RetryBudgetOverrides
from rmcp_actors.server import install
from rmcp_actors.testing import CHUNK_METHODS, FAULT_KINDS, FaultInjector, FaultPlan, stdio_client
from rmcp_actors.testing._fault_streams import _Connection, _damaged_chunk, decide  # pyright: ignore[reportPrivateUsage]
from rmcp_actors.testing.faults import FaultKind

Transport = AbstractAsyncContextManager[Any]

# Every call of these tests may meet a fault: room for many retries, none refused by the budget.
MANY_RETRIES = PolicyOverrides(
    retry=RetryOverrides(max_attempts=20, base_delay_s=0.001, max_delay_s=0.01),
    retry_budget=RetryBudgetOverrides(ratio=19.0, min_per_s=1000.0),
    reconnect=FAST_RECOVERY.reconnect,
    # Faults on purpose are not a failing dependency to shed load from.
    circuit_breaker=CircuitBreakerOverrides(mode="disabled"),
)


def record_call(client: Client, label: str, timeout: float | None = None) -> Any:
    return client.call_tool("record", {"label": label}, read_timeout_seconds=timeout)


# --- the plan --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", FAULT_KINDS)
@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), "0.5", True])
def test_a_probability_outside_0_to_1_is_refused_naming_the_kind(kind: str, value: Any) -> None:
    with pytest.raises(RMCPConfigError, match="probability from 0 to 1") as error:
        FaultPlan(**{kind: value})
    assert error.value.path == kind


def test_plan_values_are_validated() -> None:
    with pytest.raises(RMCPConfigError) as error:
        FaultPlan(delay_s=(0.2, 0.1))
    assert error.value.path == "delay_s"
    with pytest.raises(RMCPConfigError) as error:
        FaultPlan(methods="tools/call")  # type: ignore[arg-type]
    assert error.value.path == "methods"
    with pytest.raises(RMCPConfigError) as error:
        FaultPlan(seed=1.5)  # type: ignore[arg-type]
    assert error.value.path == "seed"
    assert FaultPlan(drop_response=1, methods=["tools/call", "tools/list"]).methods == frozenset(
        {"tools/call", "tools/list"}
    )
    assert FaultPlan(drop_response=1).drop_response == 1.0


def test_parse_reads_the_chaos_syntax_and_describe_writes_it_back() -> None:
    plan = FaultPlan.parse("drop_response=0.2, disconnect=0.05,delay=1,delay_s=0.5:2", seed=3)
    assert (plan.seed, plan.drop_response, plan.disconnect, plan.delay, plan.delay_s) == (
        3,
        0.2,
        0.05,
        1.0,
        (0.5, 2.0),
    )
    assert FaultPlan.parse(plan.describe(), seed=3) == plan
    assert FaultPlan.parse("", seed=4) == FaultPlan(seed=4)
    assert FaultPlan().describe() == "none"
    assert FaultPlan.parse("drop_request=1,silent=true").silent


@pytest.mark.parametrize(
    ("text", "path", "message"),
    [
        ("drop=0.2", "drop", "the kinds are drop_request, drop_response, delay, duplicate, disconnect"),
        ("drop_response", "drop_response", "expected kind=probability"),
        ("drop_response=lots", "drop_response", "expected a number"),
        ("corrupt=2", "corrupt", "probability from 0 to 1"),
        ("silent=maybe", "silent", "true or false"),
    ],
)
def test_parse_errors_name_the_key(text: str, path: str, message: str) -> None:
    with pytest.raises(RMCPConfigError, match=message) as error:
        FaultPlan.parse(text)
    assert error.value.path == path


def test_decisions_are_a_function_of_seed_connection_and_ordinal() -> None:
    plan = FaultPlan(seed=1, drop_response=0.3, duplicate=0.3, delay=0.5)
    other = attrs.evolve(plan, seed=2)
    grid = [(connection, ordinal) for connection in range(1, 4) for ordinal in range(1, 40)]
    assert [decide(plan, *at) for at in grid] == [decide(FaultPlan(**attrs.asdict(plan)), *at) for at in grid]
    assert [decide(plan, *at) for at in grid] != [decide(other, *at) for at in grid]
    kinds = {decide(plan, *at).kind for at in grid}
    assert kinds == {None, "drop_response", "duplicate"}


# --- raw mcp.Client, in memory ---------------------------------------------------------------


async def test_no_faults_change_nothing_and_every_kind_is_counted_as_zero() -> None:
    state = State()
    injector = FaultInjector(FaultPlan(seed=1))
    async with Client(injector.wrap(InMemoryTransport(build_server(state)))) as client:
        for index in range(10):
            await record_call(client, f"r{index}")
    assert state.recorded() == [f"r{index}" for index in range(10)]
    assert dict(injector.counts) == dict.fromkeys(FAULT_KINDS, 0)
    assert injector.events == ()
    assert injector.connections == 1


async def test_drop_response_ran_on_the_server_and_the_client_sees_the_connection_end(
    tmp_path: Path,
) -> None:
    state = State()
    log = tmp_path / "faults.jsonl"
    injector = FaultInjector(FaultPlan(seed=1, drop_response=1.0), log=log)
    async with Client(injector.wrap(InMemoryTransport(build_server(state)))) as client:
        with pytest.raises(MCPError, match="Connection closed"):
            await record_call(client, "lost")
        # The connection is gone: later requests fail at once.
        with pytest.raises(MCPError, match="Connection closed"):
            await client.list_tools()
    assert state.recorded() == ["lost"]
    assert injector.counts["drop_response"] == 1
    (event,) = injector.events
    assert (event.kind, event.method, event.connection, event.ordinal) == (
        "drop_response",
        "tools/call",
        1,
        1,
    )
    assert [json.loads(line) for line in log.read_text().splitlines()] == [event.as_dict()]


async def test_silent_drop_response_leaves_the_connection_up_and_the_call_waits_its_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    state = State()
    injector = FaultInjector(FaultPlan(drop_response=1.0, silent=True))
    async with Client(injector.wrap(InMemoryTransport(build_server(state)))) as client:
        start = trio.current_time()
        with pytest.raises(MCPError, match="timed out"):
            await record_call(client, "hangs", timeout=30)
        assert trio.current_time() - start == pytest.approx(30)
        tools = await client.list_tools()  # not a tools/call: no fault, the connection is up
    assert tools.tools
    assert state.recorded() == ["hangs"]
    assert injector.counts["drop_response"] == 1


async def test_drop_request_never_reaches_the_server() -> None:
    state = State()
    injector = FaultInjector(FaultPlan(drop_request=1.0))
    async with Client(injector.wrap(InMemoryTransport(build_server(state)))) as client:
        with pytest.raises(MCPError, match="Connection closed"):
            await record_call(client, "never")
    assert state.recorded() == []
    assert injector.counts["drop_request"] == 1


async def test_silent_drop_request_waits_for_the_deadline(autojump_clock: trio.testing.MockClock) -> None:
    state = State()
    injector = FaultInjector(FaultPlan(drop_request=1.0, silent=True))
    async with Client(injector.wrap(InMemoryTransport(build_server(state)))) as client:
        with pytest.raises(MCPError, match="timed out"):
            await record_call(client, "never", timeout=5)
        assert (await client.list_tools()).tools  # the connection is still up
    assert state.recorded() == []


async def test_disconnect_fails_the_write_and_ends_the_connection() -> None:
    state = State()
    injector = FaultInjector(FaultPlan(disconnect=1.0))
    async with Client(injector.wrap(InMemoryTransport(build_server(state)))) as client:
        with pytest.raises(MCPError, match="Connection closed"):
            await record_call(client, "never")
        with pytest.raises(MCPError, match="Connection closed"):
            await client.list_tools()
    assert state.recorded() == []
    assert injector.counts["disconnect"] == 1


async def test_duplicate_runs_the_tool_twice_and_the_client_gets_one_answer() -> None:
    state = State()
    injector = FaultInjector(FaultPlan(duplicate=1.0))
    async with Client(injector.wrap(InMemoryTransport(build_server(state)))) as client:
        result = await record_call(client, "twice")
        assert result.content[0].text == "recorded twice"
        await client.list_tools()
    assert state.recorded() == ["twice", "twice"]
    assert injector.counts["duplicate"] == 1


async def test_delay_holds_the_request_for_the_drawn_time(autojump_clock: trio.testing.MockClock) -> None:
    state = State()
    injector = FaultInjector(FaultPlan(delay=1.0, delay_s=(7.0, 7.0)))
    async with Client(injector.wrap(InMemoryTransport(build_server(state)))) as client:
        start = trio.current_time()
        await record_call(client, "late")
        assert trio.current_time() - start == pytest.approx(7.0)
    assert state.recorded() == ["late"]
    (event,) = injector.events
    assert (event.kind, event.detail) == ("delay", "7.000000 s")


async def test_corrupt_answer_is_a_parse_error_and_the_call_waits_its_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    state = State()
    injector = FaultInjector(FaultPlan(corrupt=1.0))
    stream_errors: list[Exception] = []

    async def on_stream_exception(error: Exception) -> None:
        stream_errors.append(error)

    async with Client(injector.wrap(InMemoryTransport(build_server(state)))) as client:
        dispatcher: Any = client.session._dispatcher  # pyright: ignore[reportPrivateUsage]
        dispatcher.on_stream_exception = on_stream_exception
        with pytest.raises(MCPError, match="timed out"):
            await record_call(client, "garbled", timeout=10)
        await client.list_tools()
    assert state.recorded() == ["garbled"]
    assert injector.counts["corrupt"] == 1
    assert len(stream_errors) == 1
    assert isinstance(stream_errors[0], ValueError)


@pytest.mark.parametrize("method", ["sampling/createMessage", "elicitation/create", "roots/list"])
def test_a_method_only_servers_send_is_refused(method: str) -> None:
    # The injector draws faults on the client's requests (and their answers); a request the
    # server sends would never draw one: a plan naming it would silently inject nothing.
    with pytest.raises(RMCPConfigError, match="requests the server sends") as error:
        FaultPlan(disconnect=1.0, methods={"tools/call", method})
    assert error.value.path == "methods"


async def test_methods_outside_the_plan_never_draw_faults() -> None:
    injector = FaultInjector(FaultPlan(disconnect=1.0, methods={"resources/list"}))
    async with Client(injector.wrap(InMemoryTransport(build_server(State())))) as client:
        await client.call_tool("echo", {"text": "fine"})
        with pytest.raises(MCPError, match="Connection closed"):
            await client.list_resources()
    assert injector.counts["disconnect"] == 1


@pytest.mark.parametrize("probability", [0.0, 1.0])
async def test_probabilities_0_and_1_are_exact(probability: float) -> None:
    state = State()
    injector = FaultInjector(FaultPlan(seed=5, duplicate=probability))
    async with Client(injector.wrap(InMemoryTransport(build_server(state)))) as client:
        for index in range(50):
            await record_call(client, f"r{index}")
    assert injector.counts["duplicate"] == 50 * probability
    assert len(state.recorded()) == 50 * (1 + probability)


async def run_calls(
    injector: FaultInjector, make_transport: Callable[[], Transport], calls: int
) -> list[str]:
    """``calls`` record calls in sequence, reconnecting (a new wrapped transport) whenever a fault
    ends the connection; returns what each call saw."""
    seen: list[str] = []
    index = 0
    while index < calls:
        async with Client(injector.wrap(make_transport())) as client:
            while index < calls:
                index += 1
                try:
                    await record_call(client, f"r{index}")
                except MCPError as error:
                    seen.append(error.error.message)
                    break
                seen.append("ok")
    return seen


def fingerprint(injector: FaultInjector) -> list[tuple[str, int, int]]:
    return [(event.kind, event.connection, event.ordinal) for event in injector.events]


async def test_the_same_seed_gives_the_same_faults_and_another_seed_other_faults() -> None:
    runs: list[tuple[list[tuple[str, int, int]], list[str]]] = []
    for seed in (11, 11, 12):
        plan = FaultPlan(seed=seed, drop_response=0.15, drop_request=0.1, duplicate=0.1, disconnect=0.05)
        injector = FaultInjector(plan)
        server = build_server(State())
        seen = await run_calls(injector, lambda server=server: InMemoryTransport(server), 60)
        runs.append((fingerprint(injector), seen))
        assert sum(injector.counts.values()) == len(injector.events) > 5
        assert {event.kind for event in injector.events} == {
            "drop_response",
            "drop_request",
            "duplicate",
            "disconnect",
        }
    assert runs[0] == runs[1]
    assert runs[0][0] != runs[2][0]


async def test_concurrent_calls_meet_the_same_faults_at_the_same_places() -> None:
    fingerprints: list[list[tuple[str, int, int]]] = []
    for _ in range(2):
        injector = FaultInjector(FaultPlan(seed=3, duplicate=0.3, delay=0.3, delay_s=(0.0, 0.001)))
        transport = injector.wrap(InMemoryTransport(build_server(State())))
        async with Client(transport) as client, trio.open_nursery() as nursery:
            for index in range(30):
                nursery.start_soon(record_call, client, f"r{index}")
        fingerprints.append(sorted(fingerprint(injector)))
    assert fingerprints[0] == fingerprints[1]
    assert fingerprints[0]


async def test_each_wrap_is_a_new_connection_with_its_own_draws() -> None:
    injector = FaultInjector(FaultPlan(seed=2, drop_response=0.5, silent=True, methods={"resources/list"}))
    server = build_server(State())
    for _ in range(3):
        async with Client(injector.wrap(InMemoryTransport(server))) as client:
            await client.call_tool("echo", {"text": "x"})
    assert injector.connections == 3


async def test_kill_is_refused_on_a_transport_without_a_process() -> None:
    injector = FaultInjector(FaultPlan(kill=0.5))
    with pytest.raises(RMCPConfigError, match="kill fault needs a stdio server process"):
        async with Client(injector.wrap(InMemoryTransport(build_server(State())))):
            pass  # pragma: no cover


# --- stdio -----------------------------------------------------------------------------------


def stdio_params(state_dir: Path, *extra: str) -> StdioServerParameters:
    return StdioServerParameters(command=PYTHON, args=stdio_args("--state-dir", str(state_dir), *extra))


async def test_kill_sigkills_the_stdio_server_after_handing_it_the_request(tmp_path: Path) -> None:
    injector = FaultInjector(FaultPlan(kill=1.0))
    async with Client(injector.wrap(stdio_client(stdio_params(tmp_path)))) as client:
        with pytest.raises(MCPError, match="Connection closed"):
            await record_call(client, "maybe")
        (event,) = injector.events
        server_pid = int(event.detail.removeprefix("pid "))
        assert server_pid != os.getpid()
    assert event.kind == "kill"
    assert process_gone(server_pid)


async def test_drop_response_and_duplicate_over_stdio(tmp_path: Path) -> None:
    state = State(tmp_path)
    injector = FaultInjector(FaultPlan(duplicate=1.0, methods={"tools/call"}))
    async with Client(injector.wrap(stdio_client(stdio_params(tmp_path)))) as client:
        await record_call(client, "twice")
    dropping = FaultInjector(FaultPlan(drop_response=1.0))
    async with Client(dropping.wrap(stdio_client(stdio_params(tmp_path)))) as client:
        with pytest.raises(MCPError, match="Connection closed"):
            await record_call(client, "lost")
    assert state.recorded() == ["twice", "twice", "lost"]
    assert injector.counts["duplicate"] == dropping.counts["drop_response"] == 1


async def test_the_sdk_stdio_client_can_be_wrapped_too(tmp_path: Path) -> None:
    from mcp.client.stdio import stdio_client as sdk_stdio_client

    state = State(tmp_path)
    injector = FaultInjector(FaultPlan(drop_request=1.0))
    async with Client(injector.wrap(sdk_stdio_client(stdio_params(tmp_path)))) as client:
        with pytest.raises(MCPError, match="Connection closed"):
            await record_call(client, "never")
    assert state.recorded() == []
    assert injector.counts["drop_request"] == 1


# --- Streamable HTTP -------------------------------------------------------------------------


@asynccontextmanager
async def http_server(app: MCPServer) -> AsyncIterator[str]:
    from _http import serve_http

    async with serve_http(app) as server:
        yield server.url


async def test_drop_response_and_disconnect_over_streamable_http() -> None:
    state = State()
    async with http_server(build_server(state)) as url:
        injector = FaultInjector(FaultPlan(drop_response=1.0))
        async with Client(injector.wrap(streamable_http_client(url))) as client:
            with pytest.raises(MCPError, match="Connection closed"):
                await record_call(client, "lost")
        cutting = FaultInjector(FaultPlan(disconnect=1.0))
        async with Client(cutting.wrap(streamable_http_client(url))) as client:
            with pytest.raises(MCPError, match="Connection closed"):
                await record_call(client, "never")
    assert state.recorded() == ["lost"]
    assert injector.counts["drop_response"] == cutting.counts["disconnect"] == 1


# --- through RMCPSupervisor ------------------------------------------------------------------


def test_a_spec_with_faults_keeps_the_injector_by_identity() -> None:
    injector = FaultInjector(FaultPlan(drop_response=0.5))
    plain = ServerSpec.in_memory("s", build_server(State()))
    faulty = injector.spec(plain)
    assert faulty.faults is injector
    assert faulty != plain
    assert faulty == injector.spec(plain)
    assert faulty != FaultInjector(FaultPlan(drop_response=0.5)).spec(plain)
    hash(faulty)


def test_faults_are_refused_where_they_cannot_happen() -> None:
    injector = FaultInjector(FaultPlan(drop_response=0.5))
    with pytest.raises(RMCPConfigError, match="direct in-memory wire") as error:
        injector.spec(ServerSpec.in_memory("s", build_server(State()), wire="direct"))
    assert error.value.path == "faults"
    killer = FaultInjector(FaultPlan(kill=0.1))
    with pytest.raises(RMCPConfigError, match="kill fault kills a stdio server") as error:
        killer.spec(ServerSpec.http("h", "http://127.0.0.1:1/mcp"))
    assert error.value.path == "faults"
    with pytest.raises(RMCPConfigError, match="expected a FaultInjector"):
        ServerSpec(name="s", transport="stdio", command="x", faults=object())  # type: ignore[arg-type]


async def test_rmcp_retries_and_replays_each_call_exactly_once_under_drop_response() -> None:
    state = State()
    injector = FaultInjector(FaultPlan(seed=7, drop_response=0.3, disconnect=0.1))
    # Durable, so that the client retries across a reconnect; kept open across the server's
    # lifespans (one per connection in memory).
    server = install(build_server(state), store=durable_store(), close_store=False)
    spec = injector.spec(ServerSpec.in_memory("chaos", server, overrides=MANY_RETRIES))
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(spec)
        results = [await sup.call("chaos", "record", {"label": f"r{index}"}) for index in range(40)]
    assert all(result.outcome is Outcome.SUCCEEDED for result in results)
    assert sorted(state.recorded()) == sorted(f"r{index}" for index in range(40))
    assert injector.counts["drop_response"] > 0
    assert injector.counts["disconnect"] > 0
    assert any(result.duplicate for result in results)  # a replay of a lost answer
    assert injector.connections > 1  # each cut was a reconnection


async def test_rmcp_over_stdio_survives_kills_with_a_durable_store(tmp_path: Path) -> None:
    state = State(tmp_path)
    injector = FaultInjector(FaultPlan(seed=4, kill=0.3))
    spec = ServerSpec.stdio(
        "killed",
        PYTHON,
        stdio_args("--state-dir", str(tmp_path), "--rmcp-store", str(tmp_path / "dedup.sqlite")),
        overrides=MANY_RETRIES,
    )
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(injector.spec(spec))
        results = [
            await sup.call("killed", "record", {"label": f"r{index}"}, timeout=60) for index in range(6)
        ]
    assert all(result.outcome is Outcome.SUCCEEDED for result in results)
    assert sorted(state.recorded()) == [f"r{index}" for index in range(6)]
    assert injector.counts["kill"] > 0
    for event in injector.events:
        assert process_gone(int(event.detail.removeprefix("pid ")))


async def test_rmcp_over_http_with_drop_response() -> None:
    state = State()
    injector = FaultInjector(FaultPlan(seed=9, drop_response=0.3))
    async with http_server(build_server(state, store=MemoryStore())) as url, RMCPSupervisor.open() as sup:
        await sup.add_server(injector.spec(ServerSpec.http("web", url, overrides=MANY_RETRIES)))
        results = [await sup.call("web", "record", {"label": f"r{index}"}, timeout=30) for index in range(10)]
    assert all(result.outcome is Outcome.SUCCEEDED for result in results)
    assert sorted(state.recorded()) == sorted(f"r{index}" for index in range(10))
    assert injector.counts["drop_response"] > 0


async def test_without_an_rmcp_server_a_lost_answer_is_an_unknown_outcome() -> None:
    state = State()
    injector = FaultInjector(FaultPlan(drop_response=1.0))
    spec = injector.spec(ServerSpec.in_memory("plain", build_server(state), overrides=MANY_RETRIES))
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(spec)
        from rmcp_actors import RMCPOutcomeUnknownError

        with pytest.raises(RMCPOutcomeUnknownError):
            await sup.call("plain", "record", {"label": "once"})
    assert state.recorded() == ["once"]  # not retried: it may have run, and it did


async def test_an_rmcp_server_runs_a_duplicated_request_once() -> None:
    state = State()
    injector = FaultInjector(FaultPlan(duplicate=1.0))
    server = build_server(state, store=MemoryStore(clock=trio.current_time))
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(injector.spec(ServerSpec.in_memory("dedup", server)))
        for index in range(5):
            await sup.call("dedup", "record", {"label": f"r{index}"})
    assert injector.counts["duplicate"] == 5
    assert state.recorded() == [f"r{index}" for index in range(5)]


async def test_a_disconnect_is_retried_even_against_a_plain_server_since_nothing_left() -> None:
    state = State()
    injector = FaultInjector(FaultPlan(seed=1, disconnect=0.5))
    spec = injector.spec(ServerSpec.in_memory("plain", build_server(state), overrides=MANY_RETRIES))
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(spec)
        results = [await sup.call("plain", "record", {"label": f"r{index}"}) for index in range(10)]
    assert injector.counts["disconnect"] > 3
    assert sum(result.attempts for result in results) == 10 + injector.counts["disconnect"]
    assert state.recorded() == [f"r{index}" for index in range(10)]


# kind -> (runs of the tool, what the call raises)
MATRIX: dict[FaultKind, tuple[int, str | None]] = {
    "drop_request": (0, "Connection closed"),
    "drop_response": (1, "Connection closed"),
    "duplicate": (2, None),
    "disconnect": (0, "Connection closed"),
    "delay": (1, None),
    "corrupt": (1, "timed out"),
}


@asynccontextmanager
async def real_transport(kind: str, state_dir: Path) -> AsyncIterator[tuple[Callable[[], Transport], State]]:
    """A transport factory to the test server over ``kind``, and the server's state."""
    if kind == "stdio":
        yield (lambda: stdio_client(stdio_params(state_dir))), State(state_dir)
        return
    state = State()
    server = build_server(state)
    if kind == "memory":
        yield (lambda: InMemoryTransport(server)), state
        return
    async with http_server(server) as url:
        yield (lambda: streamable_http_client(url)), state


@pytest.mark.parametrize("transport", ["memory", "stdio", "http"])
@pytest.mark.parametrize("kind", MATRIX)
async def test_each_kind_on_each_transport(kind: FaultKind, transport: str, tmp_path: Path) -> None:
    runs, raises = MATRIX[kind]
    probabilities: dict[str, Any] = {kind: 1.0}
    injector = FaultInjector(FaultPlan(seed=1, delay_s=(0.05, 0.05), **probabilities))
    async with real_transport(transport, tmp_path) as (connect, state):
        async with Client(injector.wrap(connect())) as client:
            start = trio.current_time()
            if raises is None:
                await record_call(client, "x", timeout=10)
            else:
                with pytest.raises(MCPError, match=raises):
                    await record_call(client, "x", timeout=1)
            elapsed = trio.current_time() - start
            if raises != "Connection closed":
                await client.list_tools()  # the connection is still up
        with trio.fail_after(5):
            while len(state.recorded()) < runs:  # a duplicate's second run may trail its answer
                await trio.sleep(0.01)
    assert state.recorded() == ["x"] * runs
    assert injector.counts[kind] == 1
    assert sum(injector.counts.values()) == 1
    if kind == "delay":
        assert elapsed >= 0.05


# --- chunk messages (corrupt_chunk, CHUNK_METHODS) -------------------------------------------


class _ReadParams(RequestParams):
    id: str
    index: int


class _WriteParams(RequestParams):
    id: str
    index: int
    data: str
    sha256: str


class _Read(Request[_ReadParams, Literal["rmcp/transfer/read"]]):
    method: Literal["rmcp/transfer/read"] = "rmcp/transfer/read"
    params: _ReadParams


class _Write(Request[_WriteParams, Literal["rmcp/transfer/write"]]):
    method: Literal["rmcp/transfer/write"] = "rmcp/transfer/write"
    params: _WriteParams


class _Answer(BaseModel):
    model_config = ConfigDict(extra="allow")


def chunk_server(payload: bytes, chunk_size: int, written: dict[int, bytes]) -> MCPServer:
    """A real MCP server that serves ``rmcp/transfer/read`` of ``payload`` and stores verified
    ``rmcp/transfer/write`` chunks in ``written``, refusing a chunk that fails its SHA-256 as
    docs/protocol.md section 9 says (the injector's own tests: no RMCP middleware involved)."""
    server = build_server(State())
    lowlevel = server._lowlevel_server  # pyright: ignore[reportPrivateUsage]

    async def read(_ctx: Any, params: _ReadParams) -> dict[str, Any]:
        if not 0 <= params.index * chunk_size <= len(payload):
            raise MCPError(code=TRANSFER_NOT_FOUND_CODE, message="no such chunk")
        chunk = payload[params.index * chunk_size : (params.index + 1) * chunk_size]
        return {
            "id": params.id,
            "index": params.index,
            "data": encode_chunk(chunk),
            "sha256": sha256_hex(chunk),
        }

    async def write(_ctx: Any, params: _WriteParams) -> dict[str, Any]:
        data = decode_chunk(params.data, params.sha256)
        if data is None:
            raise MCPError(code=CHUNK_INVALID_CODE, message="chunk does not match its SHA-256")
        written[params.index] = data
        return {"id": params.id, "index": params.index}

    lowlevel.add_request_handler(METHOD_READ, _ReadParams, read)
    lowlevel.add_request_handler(METHOD_WRITE, _WriteParams, write)
    return server


async def send_chunk_request(client: Client, method: str, params: dict[str, Any]) -> dict[str, Any]:
    request = (
        _Read(params=_ReadParams(**params))
        if method == METHOD_READ
        else _Write(params=_WriteParams(**params))
    )
    answer = await client.session.send_request(request, _Answer)
    return answer.model_extra or {}


async def test_corrupt_chunk_damages_the_data_of_read_answers_so_only_the_sha256_tells(
    tmp_path: Path,
) -> None:
    payload = os.urandom(40_000)
    handle = handle_for("t1", payload, 4096)
    log = tmp_path / "faults.jsonl"
    injector = FaultInjector(FaultPlan(seed=3, corrupt_chunk=0.5, methods=CHUNK_METHODS), log=log)
    async with Client(injector.wrap(InMemoryTransport(chunk_server(payload, 4096, {})))) as client:
        verified = 0
        for index in range(handle.chunk_count):
            answer = await send_chunk_request(client, METHOD_READ, {"id": "t1", "index": index})
            # The answer parses and its data is base64; the bytes just differ from the handle's.
            assert base64.b64decode(answer["data"], validate=True)
            verified += decode_chunk(answer["data"], handle.chunks[index]) is not None
        assert not (await record_call(client, "not a chunk")).is_error  # other methods draw no fault
    damaged = injector.counts["corrupt_chunk"]
    assert 0 < damaged < handle.chunk_count
    assert verified == handle.chunk_count - damaged
    assert sum(injector.counts.values()) == damaged
    assert {event.method for event in injector.events} == {METHOD_READ}
    assert all(event.detail.startswith("chunk ") for event in injector.events)
    assert [json.loads(line)["kind"] for line in log.read_text().splitlines()] == ["corrupt_chunk"] * damaged


async def test_corrupt_chunk_damages_written_chunks_and_the_server_refuses_them() -> None:
    payload = os.urandom(20_000)
    handle = handle_for("up", payload, 4096)
    written: dict[int, bytes] = {}
    injector = FaultInjector(FaultPlan(seed=1, corrupt_chunk=1.0, methods={METHOD_WRITE}))
    async with Client(injector.wrap(InMemoryTransport(chunk_server(b"", 4096, written)))) as client:
        for index in range(handle.chunk_count):
            chunk = payload[index * 4096 : (index + 1) * 4096]
            params = {"id": "up", "index": index, "data": encode_chunk(chunk), "sha256": handle.chunks[index]}
            with pytest.raises(MCPError) as refused:
                await send_chunk_request(client, METHOD_WRITE, params)
            assert refused.value.error.code == CHUNK_INVALID_CODE
    assert written == {}
    assert injector.counts["corrupt_chunk"] == handle.chunk_count


async def test_corrupt_chunk_leaves_error_answers_alone_uncounted() -> None:
    injector = FaultInjector(FaultPlan(corrupt_chunk=1.0, methods=CHUNK_METHODS))
    async with Client(injector.wrap(InMemoryTransport(chunk_server(b"", 4096, {})))) as client:
        bad = {"id": "up", "index": 0, "data": "!!!!", "sha256": sha256_hex(b"")}
        with pytest.raises(MCPError):
            await send_chunk_request(client, METHOD_WRITE, bad)  # not base64: not a chunk to damage
        with pytest.raises(MCPError):
            await send_chunk_request(client, METHOD_READ, {"id": "x", "index": -1})  # an error answer
    assert injector.counts["corrupt_chunk"] == 0


def test_corrupted_base64_always_decodes_to_other_bytes() -> None:
    """Whatever the position drawn, the damaged character's bits all count (no padding bits)."""
    for size in range(1, 40):
        payload = bytes(range(size))
        data = encode_chunk(payload)
        for seed in range(30):
            connection = _Connection(FaultPlan(seed=seed), lambda *_: None, 1, None)
            message = JSONRPCResponse(jsonrpc="2.0", id=1, result={"index": 0, "data": data})
            damaged = _damaged_chunk(SessionMessage(message), connection, 1, "result")
            assert damaged is not None
            damaged_data = cast("Any", damaged[0].message).result["data"]
            assert base64.b64decode(damaged_data, validate=True) != payload
