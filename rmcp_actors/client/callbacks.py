# pyright: strict
"""Requests and notifications from a server: sampling, elicitation, roots, logs, list changes.

A :class:`ServerCallbacks` is configured per server (``ServerSpec.*(callbacks=...)``). It is
turned into the SDK ``Client``'s callbacks here, each wrapped so that a callback that raises
answers the server with a JSON-RPC error (and is logged) instead of reaching the SDK, whose
legacy path would turn it into an error with code 0 and whose 2026-07-28 input-required driver
would fail the tool call itself with it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Final, TypeAlias, TypedDict, cast, final

import anyio
import attrs
import mcp_types as types
from mcp import Client, MCPError
from mcp.client.session import (
    ClientRequestContext,
    ElicitationFnT,
    IncomingMessage,
    ListRootsFnT,
    LoggingFnT,
    MessageHandlerFnT,
    SamplingFnT,
)
from mcp_types import (
    CreateMessageRequestParams,
    CreateMessageResult,
    CreateMessageResultWithTools,
    ElicitRequestFormParams,
    ElicitRequestParams,
    ElicitResult,
    ErrorData,
    LoggingLevel,
    LoggingMessageNotificationParams,
    Root,
    Tool,
)
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS

from ..errors import RMCPConfigError

__all__ = [
    "ElicitationHandler",
    "ListChangedHandler",
    "LogHandler",
    "ProgressCallback",
    "RootsProvider",
    "SamplingHandler",
    "ServerCallbacks",
    "ToolsChangedHandler",
    "apply_log_level",
    "client_options",
    "elicitation_defaults",
    "notify_roots_changed",
]

_logger = logging.getLogger("rmcp_actors")

SamplingHandler: TypeAlias = Callable[
    [CreateMessageRequestParams], Awaitable[CreateMessageResult | CreateMessageResultWithTools | ErrorData]
]
"""Answers ``sampling/createMessage``: the server asks the client's model for a completion."""

ElicitationHandler: TypeAlias = Callable[[ElicitRequestParams], Awaitable[ElicitResult | ErrorData]]
"""Answers ``elicitation/create``, in form mode (``ElicitRequestFormParams``: fill the requested
schema) or URL mode (``ElicitRequestURLParams``: send the user to ``url``)."""

RootsProvider: TypeAlias = Callable[[], Awaitable[Iterable[Root | str]]]
"""Gives the client's roots (``Root`` objects or ``file://`` URIs) when the server asks
(``roots/list``)."""

LogHandler: TypeAlias = Callable[[LoggingMessageNotificationParams], Awaitable[None]]
"""Receives the server's log messages (``notifications/message``)."""

ListChangedHandler: TypeAlias = Callable[[], Awaitable[None]]
"""Called when the server says its resources (or prompts) changed."""

ToolsChangedHandler: TypeAlias = Callable[[Mapping[str, Tool]], Awaitable[None]]
"""Called with the server's tools once the cache was refreshed after a tools list change."""

ProgressCallback: TypeAlias = Callable[[float, float | None, str | None], Awaitable[None]]
"""Receives one call's progress: ``progress``, ``total`` (or None) and ``message`` (or None)."""

RefreshTools: TypeAlias = Callable[[], Awaitable[Mapping[str, Tool] | None]]

# Syslog's order (RFC 5424), lowest first.
_LEVELS: Final[tuple[LoggingLevel, ...]] = (
    "debug",
    "info",
    "notice",
    "warning",
    "error",
    "critical",
    "alert",
    "emergency",
)
_LIST_CHANGED: Final = (types.ResourceListChangedNotification, types.PromptListChangedNotification)


def _root_list(items: Iterable[Root | str]) -> tuple[Root, ...]:
    if isinstance(items, str):
        raise TypeError("roots must be a list of roots (or file:// URIs), not a single string")
    return tuple(item if isinstance(item, Root) else Root(uri=cast(Any, item)) for item in items)


def _check_level(_inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
    # Checked here, not at each connect: an unknown level would fail every connection.
    if value not in _LEVELS:
        raise RMCPConfigError(f"must be one of {', '.join(_LEVELS)}, got {value!r}", path=attribute.name)


def _to_roots(value: Iterable[Root | str] | RootsProvider | None) -> tuple[Root, ...] | RootsProvider | None:
    if value is None or callable(value):
        return value
    return _root_list(value)


@final
@attrs.frozen
class ServerCallbacks:
    """What the client does when a server asks it something or tells it something.

    Each request kind is advertised to the server only when its callback is set: a server
    that sees no ``sampling``, ``elicitation`` or ``roots`` capability does not ask (the Node
    reference servers do not even list the tools that would).

    A callback that raises answers the server with a JSON-RPC error (an ``MCPError`` it raises
    keeps its code and message; anything else is ``-32603`` with the exception's type, never its
    message, which may hold secrets) and is logged to the ``rmcp_actors`` logger: the
    connection and the call that caused the request go on. Callbacks run in the SDK's tasks:
    keep them short or bounded.

    Attributes:
        sampling: Answers ``sampling/createMessage``.
        elicitation: Answers ``elicitation/create`` in form and URL modes (the SDK advertises
            both once it is set; a URL request can be declined).
        apply_elicitation_defaults: When a form elicitation is accepted, fill in each field the
            answer omits from the requested schema's ``default`` (SEP-1034, as the official
            conformance suite checks).
        roots: The client's roots: a list of ``Root`` or ``file://`` URIs, or an async
            function returning them (asked again at each ``roots/list``).
        on_log: Receives the server's log messages.
        log_level: The lowest level passed to ``on_log``: sent with each request on the
            2026-07-28 protocol, as ``logging/setLevel`` at connect on older ones when the
            server offers logging, and applied to what arrives anyway.
        on_tools_changed: Called with the tools after the cache was refreshed because the
            server said its tools changed (the refresh happens with or without it).
        on_resources_changed: Called when the server says its resources changed.
        on_prompts_changed: Called when the server says its prompts changed.

    """

    sampling: SamplingHandler | None = None
    elicitation: ElicitationHandler | None = None
    apply_elicitation_defaults: bool = True
    roots: tuple[Root, ...] | RootsProvider | None = attrs.field(
        default=None, converter=_to_roots, hash=False
    )
    on_log: LogHandler | None = None
    log_level: LoggingLevel = attrs.field(default="info", validator=_check_level)
    on_tools_changed: ToolsChangedHandler | None = None
    on_resources_changed: ListChangedHandler | None = None
    on_prompts_changed: ListChangedHandler | None = None


class ClientOptions(TypedDict):
    """The keyword arguments of ``mcp.Client`` that carry the callbacks."""

    sampling_callback: SamplingFnT | None
    elicitation_callback: ElicitationFnT | None
    list_roots_callback: ListRootsFnT | None
    logging_callback: LoggingFnT | None
    log_level: LoggingLevel | None
    message_handler: MessageHandlerFnT


def elicitation_defaults(schema: Mapping[str, Any]) -> dict[str, Any]:
    """The ``default`` of each property of an elicitation's requested schema, by field name."""
    properties = schema.get("properties")
    if not isinstance(properties, Mapping):
        return {}
    defaults: dict[str, Any] = {}
    for name, prop in cast("Mapping[str, object]", properties).items():
        if isinstance(prop, Mapping) and "default" in prop:
            defaults[name] = cast("Mapping[str, Any]", prop)["default"]
    return defaults


def _failure(kind: str, server: str, error: Exception) -> ErrorData:
    if isinstance(error, MCPError):
        return error.error
    _logger.error(
        "the %s callback of server %r raised; the server gets an error", kind, server, exc_info=error
    )
    return ErrorData(
        code=types.INTERNAL_ERROR,
        message=f"the client's {kind} callback failed ({type(error).__name__})",
    )


def _sampling(handler: SamplingHandler, server: str) -> SamplingFnT:
    async def sampling(
        context: ClientRequestContext, params: CreateMessageRequestParams
    ) -> CreateMessageResult | CreateMessageResultWithTools | ErrorData:
        del context
        try:
            return await handler(params)
        except Exception as error:
            return _failure("sampling", server, error)

    return sampling


def _elicitation(handler: ElicitationHandler, server: str, apply_defaults: bool) -> ElicitationFnT:
    async def elicitation(
        context: ClientRequestContext, params: ElicitRequestParams
    ) -> ElicitResult | ErrorData:
        del context
        try:
            result = await handler(params)
        except Exception as error:
            return _failure("elicitation", server, error)
        if (
            apply_defaults
            and isinstance(result, ElicitResult)
            and result.action == "accept"
            and isinstance(params, ElicitRequestFormParams)
        ):
            defaults = elicitation_defaults(params.requested_schema)
            if defaults:
                return result.model_copy(update={"content": {**defaults, **(result.content or {})}})
        return result

    return elicitation


def _roots(roots: tuple[Root, ...] | RootsProvider, server: str) -> ListRootsFnT:
    if isinstance(roots, tuple):
        fixed = list(cast("tuple[Root, ...]", roots))

        async def list_fixed_roots(context: ClientRequestContext) -> types.ListRootsResult | ErrorData:
            del context
            return types.ListRootsResult(roots=fixed)

        return list_fixed_roots

    async def list_roots(context: ClientRequestContext) -> types.ListRootsResult | ErrorData:
        del context
        try:
            return types.ListRootsResult(roots=list(_root_list(await roots())))
        except Exception as error:
            return _failure("roots", server, error)

    return list_roots


def _logging(handler: LogHandler, server: str, level: LoggingLevel) -> LoggingFnT:
    lowest = _LEVELS.index(level)

    async def on_log(params: LoggingMessageNotificationParams) -> None:
        # Filtered here too: a server without the logging capability takes no level.
        if _LEVELS.index(params.level) < lowest:
            return
        try:
            await handler(params)
        except Exception:
            _logger.exception("the on_log callback of server %r raised; the message is dropped", server)

    return on_log


async def _notify(handler: Callable[..., Awaitable[None]], name: str, server: str, *args: object) -> None:
    try:
        await handler(*args)
    except Exception:
        _logger.exception("the %s callback of server %r raised", name, server)


def _message_handler(
    callbacks: ServerCallbacks | None, server: str, refresh_tools: RefreshTools
) -> MessageHandlerFnT:
    on_tools_changed = callbacks.on_tools_changed if callbacks is not None else None
    on_resources_changed = callbacks.on_resources_changed if callbacks is not None else None
    on_prompts_changed = callbacks.on_prompts_changed if callbacks is not None else None

    async def handle(message: IncomingMessage) -> None:
        # Runs in a task of the SDK's dispatcher (spawned per notification), so waiting for the
        # refresh here holds nothing else up.
        if isinstance(message, types.ToolListChangedNotification):
            tools = await refresh_tools()
            if tools is not None and on_tools_changed is not None:
                await _notify(on_tools_changed, "on_tools_changed", server, tools)
        elif isinstance(message, _LIST_CHANGED):
            if isinstance(message, types.ResourceListChangedNotification):
                handler, name = on_resources_changed, "on_resources_changed"
            else:
                handler, name = on_prompts_changed, "on_prompts_changed"
            if handler is not None:
                await _notify(handler, name, server)

    return handle


def client_options(
    callbacks: ServerCallbacks | None, server: str, refresh_tools: RefreshTools
) -> ClientOptions:
    """The ``mcp.Client`` keyword arguments for a server's callbacks.

    A request kind without a callback is passed as ``None``: the SDK then leaves its
    capability out of the handshake (and answers a server that asks anyway with an error).

    Args:
        callbacks: The server's callbacks, or None.
        server: The server's name, for the logs.
        refresh_tools: Refreshes the connection's tool cache (after a tools list change);
            returns the tools, or None when the refresh failed.
    """
    options = ClientOptions(
        sampling_callback=None,
        elicitation_callback=None,
        list_roots_callback=None,
        logging_callback=None,
        log_level=None,
        message_handler=_message_handler(callbacks, server, refresh_tools),
    )
    if callbacks is None:
        return options
    if callbacks.sampling is not None:
        options["sampling_callback"] = _sampling(callbacks.sampling, server)
    if callbacks.elicitation is not None:
        options["elicitation_callback"] = _elicitation(
            callbacks.elicitation, server, callbacks.apply_elicitation_defaults
        )
    if callbacks.roots is not None:
        options["list_roots_callback"] = _roots(callbacks.roots, server)
    if callbacks.on_log is not None:
        options["logging_callback"] = _logging(callbacks.on_log, server, callbacks.log_level)
        options["log_level"] = callbacks.log_level
    return options


async def apply_log_level(client: Client, callbacks: ServerCallbacks | None, server: str) -> None:
    """Ask a handshake-era server for log messages from ``callbacks.log_level`` up, when
    ``on_log`` is set and the server offers logging (2026-07-28 requests carry the level
    instead, see ``client_options``).

    A refusal is logged and ignored: the server then sends what it sends by default.
    """
    if callbacks is None or callbacks.on_log is None:
        return
    if (
        client.protocol_version not in HANDSHAKE_PROTOCOL_VERSIONS
        or client.server_capabilities.logging is None
    ):
        return
    try:
        # The request itself, not the SDK's deprecated helper, which warns on every connect.
        request = types.SetLevelRequest(params=types.SetLevelRequestParams(level=callbacks.log_level))
        await client.session.send_request(request, types.EmptyResult)
    except MCPError as error:
        _logger.warning("server %r refused logging/setLevel %s: %s", server, callbacks.log_level, error)


async def notify_roots_changed(client: Client) -> bool:
    """Send ``notifications/roots/list_changed`` on a handshake-era connection.

    Returns:
        Whether it was sent: the 2026-07-28 protocol has no such notification (a server asks
        for the roots when it needs them), and a transport that just closed takes nothing (the
        next connection's server asks for the roots anew).
    """
    if client.protocol_version not in HANDSHAKE_PROTOCOL_VERSIONS:
        return False
    try:
        await client.session.send_notification(types.RootsListChangedNotification())
    except (MCPError, anyio.ClosedResourceError, anyio.BrokenResourceError):
        return False
    return True
