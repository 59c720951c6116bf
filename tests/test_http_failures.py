"""Streamable HTTP failures as real servers produce them, each mapped to what the caller is owed."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import httpx2
import pytest
import trio
from _http import call_across_a_restart, serve_http
from _http_faults import MemoryEventStore, require_bearer, typescript_session_errors
from conftest import FAST_RECOVERY
from mcp.server.mcpserver import MCPServer
from mcp.shared._httpx_utils import stream_within_origin
from mcp_test_server import State, build_server

from rmcp_actors import (
    ConnectionState,
    LifecycleEvent,
    PolicyOverrides,
    RequestState,
    RMCPConfig,
    RMCPError,
    RMCPNetworkError,
    RMCPOutcomeUnknownError,
    RMCPResultValidationError,
    RMCPSupervisor,
    RMCPTimeoutAfterSendError,
    RMCPTimeoutError,
    ServerSpec,
)
from rmcp_actors.client._failures import Evidence
from rmcp_actors.client._http_evidence import _RecordingClient, current_evidence  # pyright: ignore[reportPrivateUsage]

FAIL_FAST = PolicyOverrides(
    reconnect=FAST_RECOVERY.reconnect, retry=FAST_RECOVERY.retry, when_disconnected="fail"
)


async def wait_for_state(sup: RMCPSupervisor, state: ConnectionState) -> None:
    with trio.fail_after(10):
        while sup.servers()["web"] is not state:
            await trio.sleep(0.01)


@pytest.mark.parametrize("with_id", [True, False], ids=["id-null", "id-absent"])
async def test_typescript_servers_400_for_an_unknown_session_reconnects_and_sends_again(
    server: MCPServer, state: State, with_id: bool
) -> None:
    wrap = partial(typescript_session_errors, with_id=with_id)
    async with serve_http(server, wrap=wrap) as http:
        # HTTP 400 {-32000, "Bad Request: No valid session ID provided"}: nothing ran.
        result, connects = await call_across_a_restart(http, http.url, "record", {"label": "after"})
    assert result.text == "recorded after"
    assert connects == 2
    assert state.ledger == ["after"]


async def test_restarted_server_behind_a_same_origin_redirect_gets_a_new_session(
    server: MCPServer, state: State
) -> None:
    # ".../mcp/" is redirected (Starlette, 307) to ".../mcp", and the SDK follows it with a
    # second send. Only the first hop's 307 was recorded, so the 404 "Session not found" of a
    # restarted server was never read as a refusal and the server was never reconnected.
    async with serve_http(server) as http:
        result, connects = await call_across_a_restart(http, http.url + "/", "record", {"label": "after"})
    assert result.text == "recorded after"
    assert connects == 2
    assert state.ledger == ["after"]


async def test_a_refused_hop_after_a_redirect_is_not_read_as_not_sent() -> None:
    # Something answered the first hop, so the request was delivered: a refused second hop
    # cannot prove that nothing ran (see _RecordingClient).
    def handler(request: httpx2.Request) -> httpx2.Response:
        if request.url.path == "/mcp/":
            return httpx2.Response(307, headers={"location": "/mcp"})
        raise httpx2.ConnectError("refused", request=request)

    evidence = Evidence()
    token = current_evidence.set(evidence)
    try:
        async with _RecordingClient(transport=httpx2.MockTransport(handler)) as client:
            with pytest.raises(httpx2.ConnectError):
                async with stream_within_origin(client, "POST", "http://127.0.0.1:1/mcp/", json={}):
                    pass
    finally:
        current_evidence.reset(token)
    assert (evidence.status, evidence.refused) == (307, None)


@pytest.mark.parametrize("when_disconnected", ["fail", "wait"])
async def test_connection_refused_is_not_sent_never_outcome_unknown(
    server: MCPServer, state: State, when_disconnected: str
) -> None:
    overrides = FAIL_FAST if when_disconnected == "fail" else FAST_RECOVERY
    async with serve_http(server) as http, RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.http("web", http.url, protocol="legacy", overrides=overrides))
        assert (await sup.call("web", "echo", {"text": "up"})).text == "up"
        await http.stop()
        with pytest.raises((RMCPNetworkError, RMCPTimeoutError)) as caught:
            await sup.call("web", "record", {"label": "down"}, timeout=1)
    assert not isinstance(caught.value, RMCPOutcomeUnknownError)
    assert caught.value.may_have_executed is False
    if when_disconnected == "fail":
        assert isinstance(caught.value, RMCPNetworkError)
    assert state.ledger == []


async def test_waiting_for_an_unreachable_server_times_out_saying_why(
    server: MCPServer, state: State
) -> None:
    async with serve_http(server) as http, RMCPSupervisor.open() as sup:
        url = http.url.replace("http://", "http://alice:pw-s3cret@") + "?token=qs-s3cret"
        await sup.add_server(ServerSpec.http("web", url, protocol="legacy", overrides=FAST_RECOVERY))
        await http.stop()
        # The first attempt is refused (nothing sent); the call then waits for a reconnect,
        # refused again and again until its deadline.
        with pytest.raises(RMCPTimeoutError) as caught:
            await sup.call("web", "record", {"label": "down"}, timeout=1)
        failed_connects = sup.statistics().connections[0].failed_connects
    message = str(caught.value)
    assert not isinstance(caught.value, RMCPTimeoutAfterSendError)
    assert caught.value.may_have_executed is False
    assert "nothing was sent" in message
    assert "unreachable" in message
    assert "ConnectError" in message
    assert failed_connects > 0
    assert "pw-s3cret" not in message
    assert "qs-s3cret" not in message
    assert "http://alice:***@127.0.0.1" in message
    assert RequestState.SENT not in [event.state for event in caught.value.lifecycle]
    assert state.ledger == []


async def test_an_attempt_whose_connection_was_refused_records_no_sent_step(
    server: MCPServer, state: State
) -> None:
    events: list[LifecycleEvent] = []
    async with serve_http(server) as http, RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.http("web", http.url, protocol="legacy", overrides=FAIL_FAST))
        ok = await sup.call("web", "echo", {"text": "up"})
        await http.stop()
        with pytest.raises(RMCPNetworkError) as caught:
            await sup.call("web", "record", {"label": "down"}, timeout=5, on_lifecycle=events.append)
    # Sent on a live server, the step is there (recorded when the POST started writing).
    assert [event.state for event in ok.lifecycle] == [
        RequestState.QUEUED,
        RequestState.SENT,
        RequestState.ANSWERED,
    ]
    # The POST could not open a connection: nothing was written, so no attempt was "sent".
    assert caught.value.may_have_executed is False
    assert RequestState.SENT not in [event.state for event in caught.value.lifecycle]
    assert RequestState.SENT not in [event.state for event in events]
    assert caught.value.lifecycle[-1].state is RequestState.FAILED
    assert state.ledger == []


def signal_priming_sent(primed: trio.Event) -> Callable[[Any], Any]:
    """A middleware that sets ``primed`` once the SSE response to a ``tools/call`` POST has
    written an event with an id (the SDK's priming event, which makes the stream resumable) to
    the connection."""

    def wrap(app: Any) -> Any:
        async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] != "http" or scope["method"] != "POST":
                await app(scope, receive, send)
                return
            request_body = bytearray()

            async def observed_receive() -> dict[str, Any]:
                message = await receive()
                request_body.extend(message.get("body", b""))
                return message

            async def observed_send(message: dict[str, Any]) -> None:
                await send(message)
                body = message.get("body", b"")
                if (
                    message["type"] == "http.response.body"
                    and b"id:" in body
                    and b'"tools/call"' in request_body
                ):
                    primed.set()

            await app(scope, observed_receive, observed_send)

        return asgi

    return wrap


async def test_sse_resumability_server_killed_mid_call_is_a_lost_answer(
    server: MCPServer, state: State
) -> None:
    """The SDK reconnects the response stream, gives up ("reconnection attempts were
    exhausted"): an idempotent call is sent again once the server is back."""
    primed = trio.Event()
    async with (
        serve_http(
            server, event_store=MemoryEventStore(), retry_interval=20, wrap=signal_priming_sent(primed)
        ) as http,
        RMCPSupervisor.open() as sup,
    ):
        await sup.add_server(ServerSpec.http("web", http.url, protocol="legacy", overrides=FAST_RECOVERY))
        results = []
        async with trio.open_nursery() as nursery:

            async def call() -> None:
                results.append(
                    await sup.call("web", "block_idempotent", {"label": "job", "seconds": 30}, timeout=20)
                )

            nursery.start_soon(call)
            with trio.fail_after(10):
                # Killed before the priming event left, the stream is not resumable: a
                # different failure (a retry on the same session, refused while down).
                await primed.wait()
                while "job" not in state.started:
                    await trio.sleep(0.005)
            await http.stop()
            # Restarted before the SDK gave up, its stream reconnection would reach the new
            # server: wait until the session is reported lost.
            with trio.fail_after(10):
                while sup.servers()["web"] is ConnectionState.READY:
                    await trio.sleep(0.005)
            await http.restart()
        [result] = results
    assert result.text == "done job"
    assert result.attempts == 2


async def test_sse_resumability_kill_of_an_unsafe_call_is_outcome_unknown(
    server: MCPServer, state: State
) -> None:
    primed = trio.Event()
    async with (
        serve_http(
            server, event_store=MemoryEventStore(), retry_interval=20, wrap=signal_priming_sent(primed)
        ) as http,
        RMCPSupervisor.open() as sup,
    ):
        await sup.add_server(ServerSpec.http("web", http.url, protocol="legacy", overrides=FAST_RECOVERY))
        async with trio.open_nursery() as nursery:

            async def kill_when_started() -> None:
                with trio.fail_after(10):
                    # The stream's priming event (its id makes the stream resumable) has left.
                    await primed.wait()
                    while "order" not in state.started:
                        await trio.sleep(0.005)
                await http.stop()

            nursery.start_soon(kill_when_started)
            with pytest.raises(RMCPOutcomeUnknownError) as caught:
                await sup.call("web", "block_unsafe", {"label": "order", "seconds": 30}, timeout=20)
    assert caught.value.may_have_executed is True
    assert "reconnection attempts were exhausted" in str(caught.value)


async def test_a_result_larger_than_the_sse_event_limit_names_the_limit(state: State) -> None:
    app = MCPServer("big")

    @app.tool()
    async def big(size: int) -> str:
        state.record("big")
        return "x" * size

    async with serve_http(app) as http, RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.http("web", http.url, protocol="legacy", overrides=FAST_RECOVERY))
        with pytest.raises(
            RMCPResultValidationError, match=r"1,048,576 bytes.*max_sse_event_bytes"
        ) as caught:
            await sup.call("web", "big", {"size": 1_100_000}, timeout=20)
        assert (await sup.call("web", "big", {"size": 10})).text == "x" * 10
        connects = sup.statistics().connections[0].connects
    assert caught.value.may_have_executed is True
    assert state.ledger == ["big", "big"]  # ran once, not retried
    assert connects == 1


async def test_max_sse_event_bytes_raises_the_limit(state: State) -> None:
    app = MCPServer("big")

    @app.tool()
    async def big(size: int) -> str:
        state.record("big")
        return "x" * size

    config = RMCPConfig.from_dict({"defaults": {"max_sse_event_bytes": 5_000_000}})
    async with serve_http(app) as http, RMCPSupervisor.open(config) as sup:
        await sup.add_server(ServerSpec.http("web", http.url, protocol="legacy", overrides=FAST_RECOVERY))
        assert len((await sup.call("web", "big", {"size": 1_100_000}, timeout=20)).text) == 1_100_000
        # The text travels twice in one event (content and structured content).
        with pytest.raises(RMCPResultValidationError, match=r"5,000,000 bytes.*max_sse_event_bytes"):
            await sup.call("web", "big", {"size": 2_600_000}, timeout=20)
    assert state.ledger == ["big", "big"]


@pytest.mark.parametrize("status", [401, 403])
async def test_401_or_403_at_connect_says_so_with_the_url(server: MCPServer, status: int) -> None:
    async with serve_http(server, wrap=require_bearer("good", status)) as http, RMCPSupervisor.open() as sup:
        url = http.url.replace("http://", "http://alice:hunter2@")
        with pytest.raises(RMCPNetworkError) as caught:
            await sup.add_server(ServerSpec.http("web", url, overrides=FAST_RECOVERY))
    message = str(caught.value)
    assert f"HTTP {status}" in message
    assert "http://alice:***@127.0.0.1" in message
    assert "hunter2" not in message


def _tool_calls_answered_as(status: int, content_type: bytes) -> Callable[[Any], Any]:
    """A gateway that lets tools/call reach the server (the tool runs) and then replaces the
    server's answer with ``status`` and a body of ``content_type`` (a proxy's page, a 202)."""

    def wrap(app: Any) -> Any:
        async def wrapped(scope: dict[str, object], receive: object, send: object) -> None:
            if scope["type"] != "http" or scope["method"] != "POST":
                await app(scope, receive, send)  # type: ignore[operator]
                return
            messages: list[dict[str, object]] = []
            while True:
                message = await receive()  # type: ignore[operator]
                messages.append(message)
                if not message.get("more_body"):
                    break
            body = b"".join(m.get("body", b"") for m in messages)  # type: ignore[misc]
            replayed = iter(messages)

            async def replay() -> object:
                return next(replayed, {"type": "http.disconnect"})

            if b'"tools/call"' not in body:
                await app(scope, replay, send)  # type: ignore[operator]
                return
            swallowed: list[object] = []

            async def swallow(message: object) -> None:
                swallowed.append(message)

            await app(scope, replay, swallow)  # type: ignore[operator]
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [(b"content-type", content_type)],
                }
            )  # type: ignore[operator]
            await send(
                {"type": "http.response.body", "body": b"" if status == 202 else b"<html>gateway</html>"}
            )  # type: ignore[operator]

        return wrapped

    return wrap


@pytest.mark.parametrize(("status", "content_type"), [(200, b"text/html"), (202, b"text/plain")])
async def test_an_accepted_request_answered_oddly_may_have_run(status: int, content_type: bytes) -> None:
    # The SDK maps "200 with an unexpected content type" and "202 for a request" to
    # INVALID_REQUEST (-32600). The classifier calls it ANSWERED and RMCPServerError treats
    # -32600 as "did not run" (may_have_executed=False), though the server accepted and ran
    # the tool: the worst kind of misreport for a non-idempotent call.
    state = State()
    async with (
        serve_http(
            build_server(state), json_response=True, wrap=_tool_calls_answered_as(status, content_type)
        ) as http,
        RMCPSupervisor.open() as sup,
    ):
        await sup.add_server(ServerSpec.http("web", http.url, protocol="legacy"))
        with pytest.raises(RMCPError) as caught:
            await sup.call("web", "record", {"label": "x"}, timeout=10)
    assert state.ledger == ["x"]  # it ran
    assert caught.value.may_have_executed is True, caught.value


async def test_an_http_server_behind_the_environments_proxy_is_reachable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The SDK's default HTTP client honours HTTP(S)_PROXY / NO_PROXY (httpx trust_env). The
    # recording client (_http_evidence.recording_http_client) passes transport=..., and httpx
    # then ignores the environment's proxies ("allow_env_proxies = trust_env and transport is
    # None"): every user behind a corporate proxy loses HTTP servers. Here the "proxy" is the
    # MCP server itself (hypercorn serves absolute-form targets), the URL's host does not resolve.
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)

    def as_origin(app: Any) -> Any:
        # What a forward proxy does: the absolute-form target becomes an origin request.
        async def wrapped(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] == "http":
                path = scope["path"]
                if "://" in path:
                    path = "/" + path.split("://", 1)[1].split("/", 1)[1]
                headers = [(k, v) for k, v in scope["headers"] if k != b"host"]
                scope = {
                    **scope,
                    "path": path,
                    "raw_path": path.encode(),
                    "headers": [*headers, (b"host", f"127.0.0.1:{scope['server'][1]}".encode())],
                }
            await app(scope, receive, send)

        return wrapped

    async with serve_http(build_server(State()), wrap=as_origin) as http:
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{http.port}")
        async with RMCPSupervisor.open() as sup:
            await sup.add_server(ServerSpec.http("web", "http://mcp.invalid/mcp", protocol="legacy"))
            result = await sup.call("web", "echo", {"text": "via proxy"}, timeout=10)
    assert result.text == "via proxy"


def _tool_calls_redirected(status: int, location: bytes) -> Callable[[Any], Any]:
    """POST/Redirect/GET: a server (or a gateway in front of it) that runs tools/call and then
    answers ``status`` with ``location`` instead of the result."""

    def wrap(app: Any) -> Any:
        async def wrapped(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] != "http" or scope["method"] != "POST":
                await app(scope, receive, send)
                return
            body = b""
            while True:
                message = await receive()
                body += message.get("body", b"")
                if not message.get("more_body"):
                    break
            replayed = False

            async def replay() -> dict[str, Any]:
                nonlocal replayed
                if replayed:
                    await trio.sleep_forever()
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}

            if b'"tools/call"' not in body:
                await app(scope, replay, send)
                return

            async def discard(message: dict[str, Any]) -> None:
                del message

            await app(scope, replay, discard)  # the tool runs; its answer is replaced
            headers = [(b"location", location)]
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": b""})

        return wrapped

    return wrap


@pytest.mark.parametrize(
    ("status", "location"),
    [
        (303, b"/result"),  # See Other: the SDK would have to GET
        (302, b"/result"),  # httpx turns a redirected POST into a GET for 301/302/303
        (307, b"http://elsewhere.invalid/mcp"),  # method kept, but another origin
    ],
)
async def test_a_post_the_server_processed_then_redirected_with_303_may_have_run(
    status: int, location: bytes
) -> None:
    # The SDK does not follow these and resolves the request with MCPError(-32600, "Redirect to
    # ... not followed"). Read as the server's answer, RMCPServerError(-32600) said
    # may_have_executed=False, though the tool ran (it is in the ledger).
    state = State()
    async with (
        serve_http(
            build_server(state), json_response=True, wrap=_tool_calls_redirected(status, location)
        ) as http,
        RMCPSupervisor.open() as sup,
    ):
        await sup.add_server(ServerSpec.http("web", http.url, protocol="legacy", overrides=FAST_RECOVERY))
        with pytest.raises(RMCPOutcomeUnknownError) as caught:
            await sup.call("web", "record", {"label": "x"}, timeout=10)
    assert state.ledger == ["x"]  # it ran, once: not safe to repeat, so not sent again
    assert caught.value.may_have_executed is True, caught.value
    assert "not followed" in str(caught.value)
