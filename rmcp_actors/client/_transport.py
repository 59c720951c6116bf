"""Build the SDK client for a ServerSpec, with a transport whose death can be observed.

The SDK wakes every waiting request with ``MCPError(-32000)`` when a transport's read stream
ends, but it does not tell the owner of the ``Client``. The connection actor needs to know at
once (to fail fast or wait, and to reconnect), so stream-backed transports are wrapped: the
read stream reports its end through a callback.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from types import TracebackType
from typing import Any, Final, Self, cast
from urllib.parse import unquote, urlsplit, urlunsplit

import anyio
import httpx2
from mcp import Client, StdioServerParameters
from mcp.client._memory import InMemoryTransport
from mcp.client.extension import advertise
from mcp.client.streamable_http import streamable_http_client
from mcp.server import Server
from mcp.server.mcpserver import MCPServer
from mcp.shared._stream_protocols import ReadStream, WriteStream
from mcp.shared.message import SessionMessage
from mcp_types import JSONRPCRequest
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS

from .._protocol import EXTENSION_ID, PROTOCOL_VERSION
from .._redact import URLMaskingFilter
from ..config import ServerSpec
from ._http_evidence import recording_http_client
from ._sent import request_handed_over
from ._stdio import stdio_client
from ._tasks import TasksExtension
from .auth import resolve_auth
from .callbacks import RefreshTools, client_options

__all__ = ["ClosedCallback", "Traffic", "build_client", "client_mode"]

ClosedCallback = Callable[[], None]
# Loggers that print a request's URL: httpx2 at INFO for every request, the SDK at DEBUG.
_URL_LOGGERS: Final = ("httpx2", "mcp.client.streamable_http")
_Streams = tuple[ReadStream[SessionMessage | Exception], WriteStream[SessionMessage]]


class _ClosedOnExit:
    """``async with`` support for the stream wrappers below: leaving the block closes them."""

    async def aclose(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class Traffic:
    """Messages received from a server, counted by its read stream: the sign of life the
    watchdog reads (a counter, because a clock read per message would cost more)."""

    __slots__ = ("received",)

    def __init__(self) -> None:
        self.received = 0


class _ObservedReadStream(_ClosedOnExit):
    """A read stream that calls ``on_closed`` when the peer's side ends, before the dispatcher
    sees the end (and wakes every waiting request with "Connection closed"), and counts what
    it receives in ``traffic``."""

    def __init__(
        self, inner: ReadStream[SessionMessage | Exception], on_closed: ClosedCallback, traffic: Traffic
    ) -> None:
        self._inner = inner
        self._on_closed = on_closed
        self._traffic = traffic

    async def receive(self) -> SessionMessage | Exception:
        try:
            message = await self._inner.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._on_closed()
            raise
        self._traffic.received += 1
        return message

    async def aclose(self) -> None:
        await self._inner.aclose()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> SessionMessage | Exception:
        # receive()'s body, not a call of it: the dispatcher reads every message through here,
        # and one coroutine less per message is ~0.4 us.
        try:
            message = await self._inner.receive()
        except anyio.EndOfStream:
            self._on_closed()
            raise StopAsyncIteration from None
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._on_closed()
            raise
        self._traffic.received += 1
        return message

    @property
    def last_context(self) -> Any:
        # The dispatcher reads this (via getattr) for every message: a property, not
        # __getattr__, because the fallback path costs an AttributeError each time.
        return getattr(self._inner, "last_context", None)


class _ObservedWriteStream(_ClosedOnExit):
    """A write stream that calls ``on_closed`` when the transport no longer takes messages, and
    tells the sending attempt when it took its request (see ``_sent``) unless ``hands_over`` is
    False.

    The dispatcher turns a failed write into the same ``MCPError(-32000, "Connection closed")``
    as a server's own error in that range; the classifier trusts it only when the transport is
    known to be gone, so the flag must be set before the dispatcher raises, not when the read
    side notices the end some scheduling steps later.
    """

    def __init__(
        self, inner: WriteStream[SessionMessage], on_closed: ClosedCallback, *, hands_over: bool
    ) -> None:
        self._inner = inner
        self._on_closed = on_closed
        self._hands_over = hands_over

    async def send(self, item: SessionMessage, /) -> None:
        try:
            await self._inner.send(item)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._on_closed()
            raise  # the transport was gone: nothing was taken
        except BaseException:
            # Interrupted while sending (cancelled): a memory stream may have delivered it.
            if self._hands_over and isinstance(item.message, JSONRPCRequest):
                request_handed_over()
            raise
        if self._hands_over and isinstance(item.message, JSONRPCRequest):
            request_handed_over()

    async def aclose(self) -> None:
        await self._inner.aclose()


@asynccontextmanager
async def _observed(
    transport: AbstractAsyncContextManager[_Streams],
    on_closed: ClosedCallback,
    traffic: Traffic,
    *,
    writes: bool = True,
) -> AsyncGenerator[_Streams]:
    """The transport's streams, both sides observed; ``writes`` False for HTTP, whose request
    leaves when its POST writes (see ``_http_evidence``), not when the stream takes it."""
    async with transport as (read_stream, write_stream):
        yield (
            _ObservedReadStream(read_stream, on_closed, traffic),
            _ObservedWriteStream(write_stream, on_closed, hands_over=writes),
        )


def _credentials_out_of_url(url: str) -> tuple[str, httpx2.BasicAuth | None]:
    """``url`` without its ``user:password@`` part, and that part as HTTP Basic auth.

    httpx sends a URL's user info as Basic auth anyway, but logs the URL as written (password
    included) for every request, as does the SDK: moved out of the URL, it is sent and never
    printed.
    """
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, None
    host = parts.netloc.rpartition("@")[2]
    auth = httpx2.BasicAuth(unquote(parts.username or ""), unquote(parts.password or ""))
    return urlunsplit(parts._replace(netloc=host)), auth


def _mask_urls_in_logs() -> None:
    """Mask secret query values in the request URLs these loggers print (idempotent)."""
    for name in _URL_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, URLMaskingFilter) for f in logger.filters):
            logger.addFilter(URLMaskingFilter())


@asynccontextmanager
async def _http_transport(
    url: str, headers: dict[str, str] | None, max_sse_event_bytes: int, auth: httpx2.Auth | None
) -> AsyncGenerator[_Streams]:
    _mask_urls_in_logs()
    url, url_auth = _credentials_out_of_url(url)
    auth = auth or url_auth  # ServerSpec refuses both at once
    async with AsyncExitStack() as stack:
        http_client = await stack.enter_async_context(recording_http_client(headers, auth))
        yield await stack.enter_async_context(
            streamable_http_client(url, http_client=http_client, max_sse_event_size=max_sse_event_bytes)
        )


def client_mode(protocol: str) -> str:
    """Map a spec's ``protocol`` (validated by ServerSpec) to the SDK's ``mode``.

    A handshake-era version (``2025-11-25`` and older) is spoken through the initialize
    handshake, which offers the newest handshake version the SDK knows.
    """
    return "legacy" if protocol in HANDSHAKE_PROTOCOL_VERSIONS else protocol


def build_client(
    spec: ServerSpec,
    on_closed: ClosedCallback,
    *,
    max_sse_event_bytes: int,
    traffic: Traffic | None = None,
    refresh_tools: RefreshTools | None = None,
    auth: httpx2.Auth | None = None,
) -> Client:
    """Return an un-entered ``mcp.Client`` for ``spec``.

    Args:
        spec: The server to reach.
        on_closed: Called (synchronously, at most a few times) when the transport's read side
            ends. The direct in-memory wire has no transport and never calls it.
        max_sse_event_bytes: Largest server-sent event accepted (http only).
        traffic: Counts the messages received (the direct wire, with no transport, counts none).
        refresh_tools: Refreshes the connection's tool cache when the server says its tools
            changed; None to ignore that notification.
        auth: The HTTP client's auth, from :func:`~rmcp_actors.client.auth.resolve_auth` (kept
            by the caller across connections: an OAuth provider holds its tokens); None resolves
            ``spec.auth`` here.

    Returns:
        The client; the caller enters it with ``async with``.
    """
    mode = client_mode(spec.protocol)
    traffic = traffic if traffic is not None else Traffic()
    options = client_options(spec.callbacks, spec.name, refresh_tools or _no_refresh)
    extensions = [advertise(EXTENSION_ID, {"version": PROTOCOL_VERSION}), TasksExtension()]
    if spec.transport == "stdio":
        assert spec.command is not None  # validated by ServerSpec
        params = StdioServerParameters(
            command=spec.command,
            args=list(spec.args),
            env=dict(spec.env) if spec.env is not None else None,
            cwd=spec.cwd,
        )
        return Client(
            _observed(_with_faults(spec, stdio_client(params)), on_closed, traffic),
            mode=mode,
            extensions=extensions,
            **options,
        )
    if spec.transport == "http":
        assert spec.url is not None  # validated by ServerSpec
        headers = dict(spec.headers) if spec.headers is not None else None
        if auth is None:
            auth = resolve_auth(spec)
        transport = _http_transport(spec.url, headers, max_sse_event_bytes, auth)
        return Client(
            _observed(_with_faults(spec, transport), on_closed, traffic, writes=False),
            mode=mode,
            extensions=extensions,
            **options,
        )
    # ServerSpec validated that a memory spec holds an MCPServer or a low-level Server.
    server = cast("MCPServer[Any] | Server[Any]", spec.server)
    if spec.wire == "direct":
        return Client(server, mode=mode, extensions=extensions, **options)
    return Client(
        _observed(_with_faults(spec, InMemoryTransport(server)), on_closed, traffic),
        mode=mode,
        extensions=extensions,
        **options,
    )


def _with_faults(
    spec: ServerSpec, transport: AbstractAsyncContextManager[_Streams]
) -> AbstractAsyncContextManager[_Streams]:
    """``transport`` wrapped by the spec's fault injector, if it has one (tests): inside the
    observed streams, so that the connection sees a fault's cut as it sees a real one."""
    return transport if spec.faults is None else spec.faults.wrap(transport)


async def _no_refresh() -> None:
    return None
