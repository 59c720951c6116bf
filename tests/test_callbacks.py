"""Requests and notifications from the server (``ServerCallbacks``) and ``on_progress`` per call,
against a real server in memory and over stdio (tests/callbacks_server.py)."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import mcp_types as types
import pytest
import trio
import trio.lowlevel
import trio.testing
from _http import serve_http
from callbacks_server import DEFAULTS_SCHEMA, build_server
from conftest import FAST_RECOVERY, durable_store
from mcp import MCPError
from mcp.server.mcpserver import Context

from rmcp_actors import (
    FastRMCP,
    Outcome,
    PolicyOverrides,
    RMCPConfigError,
    RMCPServerError,
    RMCPSupervisor,
    RMCPTimeoutAfterSendError,
    ServerCallbacks,
    ServerSpec,
)
from rmcp_actors.client.callbacks import elicitation_defaults

# The server side of sampling, roots and logging is deprecated in 2026-07-28 (SEP-2577).
pytestmark = pytest.mark.filterwarnings("ignore::mcp.shared.exceptions.MCPDeprecationWarning")

SERVER_SCRIPT = str(Path(__file__).with_name("callbacks_server.py"))
Where = Literal["memory", "stdio", "http"]
# The ctx.session requests need a handshake-era protocol (2026-07-28 has no back-channel).
LEGACY = "2025-11-25"


def spec(
    where: Literal["memory", "stdio"], callbacks: ServerCallbacks | None, *, protocol: str = LEGACY
) -> ServerSpec:
    if where == "memory":
        return ServerSpec.in_memory("cb", build_server(), protocol=protocol, callbacks=callbacks)
    return ServerSpec.stdio(
        "cb", sys.executable, [SERVER_SCRIPT], protocol=protocol, overrides=FAST_RECOVERY, callbacks=callbacks
    )


@asynccontextmanager
async def connected(
    where: Where, callbacks: ServerCallbacks | None, *, protocol: str = LEGACY
) -> AsyncIterator[RMCPSupervisor]:
    if where != "http":
        async with RMCPSupervisor.open() as sup:
            await sup.add_server(spec(where, callbacks, protocol=protocol))
            yield sup
        return
    # The server's requests travel on the SSE stream of the tools/call POST.
    async with serve_http(build_server()) as http, RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.http("cb", http.url, protocol=protocol, callbacks=callbacks))
        yield sup


def text(result: Any) -> str:
    return result.content[0].text


class Model:
    """A sampling callback standing in for the client's model: answers ``re: <prompt>``."""

    def __init__(self) -> None:
        self.seen: list[types.CreateMessageRequestParams] = []

    async def __call__(self, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
        self.seen.append(params)
        prompt = params.messages[0].content
        assert isinstance(prompt, types.TextContent)
        return types.CreateMessageResult(
            role="assistant", content=types.TextContent(type="text", text=f"re: {prompt.text}"), model="stub"
        )


async def accept_empty(params: types.ElicitRequestParams) -> types.ElicitResult:
    del params
    return types.ElicitResult(action="accept", content={})


async def ignore_log(params: types.LoggingMessageNotificationParams) -> None:
    del params


# -- what the client advertises ------------------------------------------------------------


@pytest.mark.parametrize(
    ("callbacks", "expected"),
    [
        (None, {"sampling": False, "elicitation": False, "roots": False}),
        (
            ServerCallbacks(on_log=ignore_log),
            {"sampling": False, "elicitation": False, "roots": False},
        ),
        (ServerCallbacks(sampling=Model()), {"sampling": True, "elicitation": False, "roots": False}),
        (ServerCallbacks(elicitation=accept_empty), {"sampling": False, "elicitation": True, "roots": False}),
        (ServerCallbacks(roots=["file:///srv"]), {"sampling": False, "elicitation": False, "roots": True}),
        (
            ServerCallbacks(sampling=Model(), elicitation=accept_empty, roots=["file:///srv"]),
            {"sampling": True, "elicitation": True, "roots": True},
        ),
    ],
    ids=["none", "log-only", "sampling", "elicitation", "roots", "all"],
)
async def test_capabilities_follow_the_callbacks(
    callbacks: ServerCallbacks | None, expected: dict[str, bool]
) -> None:
    async with connected("memory", callbacks) as sup:
        result = await sup.call("cb", "capabilities")
    assert result.structured_content == expected


# -- sampling ------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["memory", "stdio", "http"])
async def test_sampling_reaches_the_callback(where: Where) -> None:
    model = Model()
    async with connected(where, ServerCallbacks(sampling=model)) as sup:
        result = await sup.call("cb", "ask_model", {"prompt": "hello"})
    assert result.outcome is Outcome.SUCCEEDED
    assert text(result) == "re: hello"
    assert len(model.seen) == 1
    assert model.seen[0].max_tokens == 50


async def test_sampling_on_the_2026_protocol_goes_through_input_required() -> None:
    # No back-channel on 2026-07-28: the server answers "input required", the SDK asks the
    # callback and retries the call with the answer, within one sup.call.
    model = Model()
    async with connected("memory", ServerCallbacks(sampling=model), protocol="auto") as sup:
        result = await sup.call("cb", "ask_model_resolved", {"prompt": "modern"})
        protocol = sup.statistics().connections[0].protocol_version
    assert protocol == "2026-07-28"
    assert text(result) == "re: modern"
    assert len(model.seen) == 1


async def test_without_a_sampling_callback_the_server_gets_an_error() -> None:
    # The server's tool re-raises the client's JSON-RPC error as its own answer.
    async with connected("memory", None) as sup:
        with pytest.raises(RMCPServerError, match="Sampling not supported"):
            await sup.call("cb", "ask_model", {"prompt": "hello"})


@pytest.mark.parametrize("where", ["memory", "stdio"])
async def test_a_raising_callback_answers_an_error_and_keeps_the_connection(
    where: Where, caplog: pytest.LogCaptureFixture
) -> None:
    calls = 0

    async def broken(params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
        nonlocal calls
        calls += 1
        raise RuntimeError("model offline, token=sk-secret")

    errors: list[RMCPServerError] = []
    async with connected(where, ServerCallbacks(sampling=broken)) as sup:
        for prompt in ("a", "b"):
            # The server's tool saw a JSON-RPC error and re-raises it as its own answer.
            with pytest.raises(RMCPServerError) as caught:
                await sup.call("cb", "ask_model", {"prompt": prompt})
            errors.append(caught.value)
        after = await sup.call("cb", "steps", {"count": 1})
        generation = sup.statistics().connections[0].generation
    assert calls == 2
    for error in errors:
        assert error.code == types.INTERNAL_ERROR
        assert "the client's sampling callback failed (RuntimeError)" in str(error)
        assert "sk-secret" not in str(error)  # the exception's text stays in the client's log
    assert after.outcome is Outcome.SUCCEEDED
    assert generation == 1  # never reconnected
    logged = [r for r in caplog.records if r.name == "rmcp_actors" and r.levelno == logging.ERROR]
    assert len(logged) == 2
    assert all(isinstance(r.exc_info and r.exc_info[1], RuntimeError) for r in logged)


async def test_a_hanging_callback_ends_with_the_call_that_caused_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Bounded by the call: its cancel reaches the server's tool, whose cancelled request
    # cancels the callback; the connection goes on.
    state: list[str] = []

    async def hang(params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
        state.append("asked")
        try:
            await trio.sleep_forever()
        finally:
            state.append("cancelled")

    async with connected("memory", ServerCallbacks(sampling=hang)) as sup:
        with pytest.raises(RMCPTimeoutAfterSendError):
            await sup.call("cb", "ask_model", {"prompt": "a"}, timeout=1)
        with trio.fail_after(5):
            while state != ["asked", "cancelled"]:
                await trio.sleep(0.01)
        after = await sup.call("cb", "steps", {"count": 1})
    assert after.outcome is Outcome.SUCCEEDED


async def test_a_callback_raising_mcperror_chooses_the_error() -> None:
    async def refuse(params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
        raise MCPError(code=-1, message="User rejected sampling request")

    async with connected("memory", ServerCallbacks(sampling=refuse)) as sup:
        with pytest.raises(RMCPServerError, match="User rejected sampling request") as caught:
            await sup.call("cb", "ask_model", {"prompt": "a"})
    assert caught.value.code == -1


async def test_a_raising_callback_on_the_2026_protocol_is_a_server_error() -> None:
    # The SDK's input-required driver calls the callback inside call_tool, where the user's
    # exception would escape sup.call as is. Wrapped, it is the JSON-RPC error the SDK raises
    # for a declined input request, and the connection goes on.
    async def broken(params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
        raise RuntimeError("model offline")

    async with connected("memory", ServerCallbacks(sampling=broken), protocol="auto") as sup:
        with pytest.raises(RMCPServerError, match=r"the client's sampling callback failed \(RuntimeError\)"):
            await sup.call("cb", "ask_model_resolved", {"prompt": "modern"})
        after = await sup.call("cb", "steps", {"count": 1})
    assert after.outcome is Outcome.SUCCEEDED


# -- elicitation -----------------------------------------------------------------------------


def test_elicitation_defaults_reads_each_property_default() -> None:
    assert elicitation_defaults(DEFAULTS_SCHEMA) == {
        "name": "John Doe",
        "age": 30,
        "score": 95.5,
        "status": "active",
        "verified": True,
    }
    assert elicitation_defaults({"type": "object"}) == {}
    assert elicitation_defaults({"properties": {"x": {"type": "string"}}}) == {}


@pytest.mark.parametrize("where", ["memory", "stdio", "http"])
async def test_an_accepted_form_gets_the_schema_defaults(where: Where) -> None:
    seen: list[types.ElicitRequestParams] = []

    async def answer_name_only(params: types.ElicitRequestParams) -> types.ElicitResult:
        seen.append(params)
        return types.ElicitResult(action="accept", content={"name": "Ann"})

    async with connected(where, ServerCallbacks(elicitation=answer_name_only)) as sup:
        result = await sup.call("cb", "ask_user")
    answer = json.loads(text(result))
    assert answer == {
        "action": "accept",
        "content": {"name": "Ann", "age": 30, "score": 95.5, "status": "active", "verified": True},
    }
    assert isinstance(seen[0], types.ElicitRequestFormParams)
    assert seen[0].requested_schema == DEFAULTS_SCHEMA


async def test_defaults_are_left_out_when_disabled_or_declined() -> None:
    async def decline(params: types.ElicitRequestParams) -> types.ElicitResult:
        return types.ElicitResult(action="decline")

    for callbacks, expected in (
        (
            ServerCallbacks(elicitation=accept_empty, apply_elicitation_defaults=False),
            {"action": "accept", "content": {}},
        ),
        (ServerCallbacks(elicitation=decline), {"action": "decline", "content": None}),
    ):
        async with connected("memory", callbacks) as sup:
            result = await sup.call("cb", "ask_user")
        assert json.loads(text(result)) == expected


async def test_url_elicitation_reaches_the_callback() -> None:
    seen: list[types.ElicitRequestParams] = []

    async def consent(params: types.ElicitRequestParams) -> types.ElicitResult:
        seen.append(params)
        return types.ElicitResult(action="accept")

    async with connected("memory", ServerCallbacks(elicitation=consent)) as sup:
        result = await sup.call("cb", "ask_url")
    assert text(result) == "accept"
    assert isinstance(seen[0], types.ElicitRequestURLParams)
    assert (seen[0].url, seen[0].elicitation_id) == ("https://example.com/login", "login-1")


# -- roots -----------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["memory", "stdio", "http"])
async def test_a_static_list_of_roots(where: Where) -> None:
    home = types.Root.model_validate({"uri": "file:///home/me", "name": "home"})
    roots = ServerCallbacks(roots=["file:///srv/data", home])
    async with connected(where, roots) as sup:
        result = await sup.call("cb", "client_roots")
    assert result.structured_content == {"result": ["file:///srv/data", "file:///home/me"]}


async def test_roots_from_a_function_are_asked_at_each_request() -> None:
    current = ["file:///a"]

    async def provide() -> list[str]:
        return list(current)

    async with connected("memory", ServerCallbacks(roots=provide)) as sup:
        first = await sup.call("cb", "client_roots")
        current.append("file:///b")
        second = await sup.call("cb", "client_roots")
    assert first.structured_content == {"result": ["file:///a"]}
    assert second.structured_content == {"result": ["file:///a", "file:///b"]}


async def test_roots_on_the_2026_protocol() -> None:
    async with connected("memory", ServerCallbacks(roots=["file:///x"]), protocol="auto") as sup:
        result = await sup.call("cb", "client_roots_resolved")
    assert result.structured_content == {"result": ["file:///x"]}


def test_roots_must_be_a_list_not_a_string() -> None:
    with pytest.raises(TypeError, match="not a single string"):
        ServerCallbacks(roots="file:///x")


# -- logs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("where", "protocol"),
    [("memory", LEGACY), ("stdio", LEGACY), ("http", LEGACY), ("memory", "auto")],
    ids=["memory", "stdio", "http", "2026"],
)
async def test_log_messages_reach_on_log_from_the_level_asked(where: Where, protocol: str) -> None:
    received: list[types.LoggingMessageNotificationParams] = []

    async def on_log(params: types.LoggingMessageNotificationParams) -> None:
        received.append(params)

    callbacks = ServerCallbacks(on_log=on_log, log_level="info")
    async with connected(where, callbacks, protocol=protocol) as sup:
        await sup.call("cb", "shout", {"text": "hi"})
        with trio.fail_after(5):
            while len(received) < 2:
                await trio.sleep(0.01)
    assert [(m.level, m.data, m.logger) for m in received] == [
        ("info", "info: hi", "shout"),
        ("warning", "warning: hi", "shout"),
    ]


# -- list changes ----------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["memory", "stdio", "http"])
async def test_a_tools_list_change_refreshes_the_cache(where: Where) -> None:
    refreshed = trio.Event()
    seen_tools: list[Mapping[str, types.Tool]] = []
    others: list[str] = []

    async def on_tools_changed(tools: Mapping[str, types.Tool]) -> None:
        seen_tools.append(tools)
        refreshed.set()

    async def on_resources_changed() -> None:
        others.append("resources")

    async def on_prompts_changed() -> None:
        others.append("prompts")

    callbacks = ServerCallbacks(
        on_tools_changed=on_tools_changed,
        on_resources_changed=on_resources_changed,
        on_prompts_changed=on_prompts_changed,
    )
    async with connected(where, callbacks) as sup:
        assert "extra" not in [tool.name for tool in await sup.list_tools("cb")]
        await sup.call("cb", "grow", {"name": "extra"})
        with trio.fail_after(5):
            await refreshed.wait()
            while len(others) < 2:
                await trio.sleep(0.01)
        # The cache, not a fresh listing: the new tool can be called at once.
        assert "extra" in [tool.name for tool in await sup.list_tools("cb")]
        result = await sup.call("cb", "extra", {"text": "new"})
    assert text(result) == "new"
    assert "extra" in seen_tools[0]
    assert sorted(others) == ["prompts", "resources"]


async def test_the_cache_is_refreshed_without_any_callback() -> None:
    async with connected("memory", None) as sup:
        await sup.call("cb", "grow", {"name": "extra"})
        with trio.fail_after(5):
            while "extra" not in [tool.name for tool in await sup.list_tools("cb")]:
                await trio.sleep(0.01)
        assert text(await sup.call("cb", "extra", {"text": "x"})) == "x"


async def test_a_raising_list_changed_callback_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    async def broken(tools: Mapping[str, types.Tool]) -> None:
        raise RuntimeError("bug")

    async with connected("memory", ServerCallbacks(on_tools_changed=broken)) as sup:
        await sup.call("cb", "grow", {"name": "extra"})
        with trio.fail_after(5):
            while not any(r.name == "rmcp_actors" and r.exc_info for r in caplog.records):
                await trio.sleep(0.01)
        assert text(await sup.call("cb", "extra", {"text": "x"})) == "x"


# -- progress --------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["memory", "stdio", "http"])
async def test_on_progress_receives_each_notification(where: Where) -> None:
    received: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        received.append((progress, total, message))

    async with connected(where, None, protocol="auto") as sup:
        result = await sup.call("cb", "steps", {"count": 3}, on_progress=on_progress)
    assert text(result) == "3 steps"
    assert received == [(1, 3, "step 1"), (2, 3, "step 2"), (3, 3, "step 3")]


async def test_on_progress_survives_a_retry(tmp_path: Path) -> None:
    # The first attempt reports its progress, then the server process dies; the tool is
    # read-only, so the call is retried on the next connection with the same callback.
    received: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        received.append((progress, total, message))

    marker = tmp_path / "died"
    async with connected("stdio", None) as sup:
        result = await sup.call(
            "cb", "steps_then_die", {"count": 2, "marker": str(marker)}, on_progress=on_progress, timeout=30
        )
    assert marker.exists()
    assert result.attempts == 2
    assert received == [(1, 2, "step 1"), (2, 2, "step 2")] * 2


async def test_a_raising_on_progress_changes_nothing(caplog: pytest.LogCaptureFixture) -> None:
    async def broken(progress: float, total: float | None, message: str | None) -> None:
        raise RuntimeError("bug")

    async with connected("memory", None) as sup:
        result = await sup.call("cb", "steps", {"count": 2}, on_progress=broken)
    assert result.outcome is Outcome.SUCCEEDED
    assert sum(1 for r in caplog.records if r.exc_info and isinstance(r.exc_info[1], RuntimeError)) == 2


# -- configuration ---------------------------------------------------------------------------


def test_every_factory_takes_callbacks() -> None:
    callbacks = ServerCallbacks(sampling=Model())
    specs = [
        ServerSpec.stdio("a", "prog", callbacks=callbacks),
        ServerSpec.http("b", "http://127.0.0.1:1/mcp", callbacks=callbacks),
        ServerSpec.in_memory("c", build_server(), callbacks=callbacks),
    ]
    assert all(s.callbacks is callbacks for s in specs)
    assert ServerSpec.stdio("a", "prog", callbacks=callbacks) == specs[0]
    assert ServerSpec.stdio("a", "prog", callbacks=ServerCallbacks(sampling=Model())) != specs[0]
    assert ServerSpec.stdio("a", "prog").callbacks is None


def test_callbacks_must_be_server_callbacks() -> None:
    with pytest.raises(RMCPConfigError) as caught:
        ServerSpec.stdio("a", "prog", callbacks={"sampling": None})  # pyright: ignore[reportArgumentType]
    assert caught.value.path == "callbacks"


def test_an_unknown_log_level_is_a_config_error() -> None:
    with pytest.raises(RMCPConfigError, match="must be one of") as caught:
        ServerCallbacks(on_log=ignore_log, log_level="warn")  # pyright: ignore[reportArgumentType]
    assert caught.value.path == "log_level"


async def test_roots_changed_is_sent_only_on_handshake_era_connections() -> None:
    async with connected("memory", ServerCallbacks(roots=["file:///x"])) as sup:
        assert await sup.roots_changed("cb")
    async with connected("memory", ServerCallbacks(roots=["file:///x"]), protocol="auto") as sup:
        assert not await sup.roots_changed("cb")


async def test_on_progress_with_an_ack_timeout_sees_the_tools_progress(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # With ack_timeout_s against an RMCP server that ACKs early, the attempt already listens to
    # progress (any progress is the ACK): the caller's callback gets every notification too.
    app = FastRMCP("progress", store=durable_store())

    @app.tool()
    async def steps(ctx: Context) -> str:
        for value in (0.5, 1.0):
            await ctx.report_progress(value, 1.0, f"at {value}")
        return "done"

    received: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        received.append((progress, total, message))

    policy = PolicyOverrides(ack_timeout_s=1)
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("p", app, overrides=policy))
        result = await sup.call("p", "steps", on_progress=on_progress)
    assert result.lifecycle[2].detail is not None
    assert result.lifecycle[2].detail.startswith("early")
    assert [entry for entry in received if entry[2] and entry[2].startswith("at ")] == [
        (0.5, 1.0, "at 0.5"),
        (1.0, 1.0, "at 1.0"),
    ]
