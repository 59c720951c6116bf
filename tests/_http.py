"""Test helper: serve an ``MCPServer`` over Streamable HTTP in-process with hypercorn's trio worker.

Usage::

    async with serve_http(app) as server:
        async with mcp.Client(server.url) as client:
            ...
        await server.stop()  # the server "dies": listener closed, connections dropped
        await server.restart()  # serves again on the same port (same URL)

Each (re)start builds a fresh Starlette app from ``app.streamable_http_app(...)``, because a
``StreamableHTTPSessionManager`` can only be run once; session state therefore does not survive
``stop()``/``restart()``, which is what a real server restart looks like to a client.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import attrs
import trio
from conftest import FAST_RECOVERY
from hypercorn.config import Config
from hypercorn.trio import serve
from mcp.server.mcpserver import MCPServer

from rmcp_actors import CallResult, RMCPSupervisor, ServerSpec

__all__ = ["HTTPServerHandle", "call_across_a_restart", "serve_http"]

_HOST = "127.0.0.1"
_STOP_TIMEOUT = 2.0
_log = logging.getLogger("tests.http.hypercorn")
_log.setLevel(logging.WARNING)


@attrs.define(eq=False)
class HTTPServerHandle:
    """A running (or stopped) in-process Streamable HTTP server; see :func:`serve_http`."""

    url: str
    port: int
    _app: MCPServer = attrs.field(repr=False, alias="app")
    _json_response: bool = attrs.field(repr=False, alias="json_response")
    _stateless: bool = attrs.field(repr=False, alias="stateless")
    _nursery: trio.Nursery = attrs.field(repr=False, alias="nursery")
    # Put in front of the SDK's app on each (re)start, to play a server the SDK does not ship.
    _wrap: Callable[[Any], Any] | None = attrs.field(default=None, repr=False, alias="wrap")
    _app_options: dict[str, Any] = attrs.field(factory=dict[str, Any], repr=False, alias="app_options")
    _cancel_scope: trio.CancelScope | None = attrs.field(default=None, repr=False, init=False)
    _done: trio.Event | None = attrs.field(default=None, repr=False, init=False)

    @property
    def running(self) -> bool:
        return self._done is not None and not self._done.is_set()

    async def stop(self) -> None:
        """Stop serving now: cancel hypercorn outright (no graceful drain).

        The listening socket is closed and every open connection is closed without waiting for
        in-flight requests, so clients see the connection drop. Idempotent.
        """
        if self._cancel_scope is not None:
            self._cancel_scope.cancel()
        if self._done is not None:
            with trio.fail_after(_STOP_TIMEOUT):
                await self._done.wait()
        self._cancel_scope = None

    async def restart(self) -> None:
        """Serve again on the same port (a fresh session manager; old sessions are gone)."""
        if self.running:
            raise RuntimeError("server is still running; call stop() first")
        await self._start(self.port)

    async def _start(self, port: int) -> None:
        cancel_scope = trio.CancelScope()
        done = trio.Event()
        self._cancel_scope = cancel_scope
        self._done = done
        binds: list[str] = await self._nursery.start(partial(self._serve_once, port, cancel_scope, done))
        bound_port = int(binds[0].rsplit(":", 1)[1])
        if port == 0:
            self.port = bound_port
            self.url = f"http://{_HOST}:{bound_port}/mcp"
        elif bound_port != port:  # pragma: no cover - cannot happen with an explicit bind
            raise RuntimeError(f"asked for port {port}, hypercorn bound {bound_port}")

    async def _serve_once(
        self,
        port: int,
        cancel_scope: trio.CancelScope,
        done: trio.Event,
        *,
        task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        # A StreamableHTTPSessionManager runs only once, so every (re)start needs a new Starlette app.
        asgi = self._app.streamable_http_app(
            json_response=self._json_response, stateless_http=self._stateless, host=_HOST, **self._app_options
        )
        if self._wrap is not None:
            asgi = self._wrap(asgi)
        try:
            with cancel_scope:
                await serve(asgi, _config(port), task_status=task_status)  # pyright: ignore[reportArgumentType]
        finally:
            done.set()


def _config(port: int) -> Config:
    config = Config()
    config.bind = [f"{_HOST}:{port}"]
    config.accesslog = None
    config.errorlog = _log  # "Running on ..." goes to a quiet logger instead of stderr
    config.graceful_timeout = 0.1
    # Long past any pause between a client's requests on a loaded machine: hypercorn closing an
    # idle connection just as the client reuses it fails that POST with "Server disconnected
    # without sending a response" (a handshake's tools/list once, under a full parallel run at
    # 1 s). stop() cancels hypercorn outright, so idle connections never delay a test.
    config.keep_alive_timeout = 60.0
    return config


@asynccontextmanager
async def serve_http(
    app: MCPServer,
    *,
    json_response: bool = False,
    stateless: bool = False,
    wrap: Callable[[Any], Any] | None = None,
    **app_options: Any,
) -> AsyncIterator[HTTPServerHandle]:
    """Serve ``app`` at ``http://127.0.0.1:<os-chosen port>/mcp`` for the duration of the block.

    ``wrap`` is an ASGI middleware put in front of the SDK's app; ``app_options`` go to
    ``streamable_http_app`` (e.g. ``event_store``, ``retry_interval``).
    """
    async with trio.open_nursery() as nursery:
        handle = HTTPServerHandle(
            url="",
            port=0,
            app=app,
            json_response=json_response,
            stateless=stateless,
            nursery=nursery,
            wrap=wrap,
            app_options=app_options,
        )
        await handle._start(0)  # pyright: ignore[reportPrivateUsage]
        try:
            yield handle
        finally:
            with trio.CancelScope(shield=True):
                await handle.stop()


async def call_across_a_restart(
    http: HTTPServerHandle, url: str, tool: str, arguments: dict[str, Any]
) -> tuple[CallResult, int]:
    """Call ``echo`` once, restart the server (it forgets every session), then call ``tool``.

    Returns:
        The second call's result, and how many connects the runtime made in all.
    """
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.http("web", url, protocol="legacy", overrides=FAST_RECOVERY))
        assert (await sup.call("web", "echo", {"text": "before"})).text == "before"
        await http.stop()
        await http.restart()
        result = await sup.call("web", tool, arguments, timeout=10)
        return result, sup.statistics().connections[0].connects
