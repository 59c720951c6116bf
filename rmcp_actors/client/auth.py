# pyright: strict
"""Authentication for HTTP servers: token stores, a bearer token from the environment, the
loopback redirect of the OAuth authorization code flow, and the auth a configuration names.

The OAuth flows themselves are the SDK's (``mcp.client.auth``): ``OAuthClientProvider``
(authorization code with PKCE, dynamic registration, pre-registration, client ID metadata
documents) and ``ClientCredentialsOAuthProvider`` / ``PrivateKeyJWTOAuthProvider``. They are
``httpx2.Auth`` objects: they refresh an expired token and answer a 401 with a new one inside
the HTTP request, so a call sees only the final answer. This module supplies what they leave to
the application: where tokens are kept (:class:`FileTokenStorage`, :class:`MemoryTokenStorage`,
both the SDK's ``TokenStorage`` protocol) and how the user's browser comes back
(:class:`LoopbackCallback`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any, Final, final
from urllib.parse import parse_qs, urlsplit

import anyio
import anyio.abc
import attrs
import httpx2
from mcp.client.auth import OAuthClientProvider, OAuthFlowError, TokenStorage
from mcp.client.auth.extensions.client_credentials import ClientCredentialsOAuthProvider
from mcp.shared.auth import (
    AuthorizationCodeResult,
    OAuthClientInformationFull,
    OAuthClientMetadata,
    OAuthToken,
)
from pydantic import AnyUrl

from ..config import ServerSpec
from ..config._auth import AuthConfig
from ..errors import RMCPAuthError

__all__ = [
    "EnvBearerAuth",
    "FileTokenStorage",
    "LoopbackCallback",
    "MemoryTokenStorage",
    "default_token_dir",
    "resolve_auth",
]

_APP_DIR: Final = "rmcp_actors"
_SAFE_NAME: Final = re.compile(r"[^A-Za-z0-9_.-]+")
# The callback request line and headers of a browser's redirect; anything longer is not one.
_MAX_CALLBACK_BYTES: Final = 16 * 1024


def default_token_dir() -> Path:
    """Where the file token store keeps tokens by default: the user's data directory.

    ``$XDG_DATA_HOME/rmcp_actors/tokens`` (``~/.local/share/...``) on Linux and other Unix,
    ``~/Library/Application Support/rmcp_actors/tokens`` on macOS,
    ``%LOCALAPPDATA%\\rmcp_actors\\tokens`` on Windows.
    """
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / _APP_DIR / "tokens"


@final
class MemoryTokenStorage:
    """Tokens and client registration kept in memory (the SDK's ``TokenStorage`` protocol):
    gone with the process, so a new process authorizes again."""

    def __init__(self) -> None:
        self._tokens: OAuthToken | None = None
        self._client_info: OAuthClientInformationFull | None = None

    async def get_tokens(self) -> OAuthToken | None:
        """The stored tokens, if any."""
        return self._tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        """Store the tokens."""
        self._tokens = tokens

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        """The stored client registration, if any."""
        return self._client_info

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        """Store the client registration."""
        self._client_info = client_info

    def __repr__(self) -> str:
        return f"MemoryTokenStorage(tokens={'set' if self._tokens else 'none'})"


@final
class FileTokenStorage:
    """Tokens and client registration in one JSON file (the SDK's ``TokenStorage`` protocol).

    The file is readable by its owner only (mode 0600, in a 0700 directory) and replaced
    atomically on every write, so a crash never leaves half a token behind. A token's expiry is
    kept as a point in time and given back as the seconds left, so a token read by a later
    process is not mistaken for a fresh one.

    Args:
        path: The file. :meth:`for_server` picks one per server under :func:`default_token_dir`.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @classmethod
    def for_server(
        cls, name: str, url: str, directory: str | os.PathLike[str] | None = None
    ) -> FileTokenStorage:
        """The store of one server: a file named after the server and a digest of its URL (tokens
        are bound to the server that accepts them), under ``directory`` or
        :func:`default_token_dir`."""
        digest = hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]
        base = Path(directory) if directory is not None else default_token_dir()
        return cls(base / f"{_SAFE_NAME.sub('_', name)}-{digest}.json")

    def _read(self) -> dict[str, Any]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        try:
            data = json.loads(text)
        except ValueError:
            return {}  # a damaged file: authorize again rather than fail every connection
        return data if isinstance(data, dict) else {}  # pyright: ignore[reportUnknownVariableType]

    def _write(self, data: dict[str, Any]) -> None:
        directory = self.path.parent
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        # mkstemp creates the file 0600 before anything is written to it.
        fd, temporary = tempfile.mkstemp(prefix=".tokens-", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                json.dump(data, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    async def get_tokens(self) -> OAuthToken | None:
        """The stored tokens, with ``expires_in`` counted from now; None if there are none."""
        record = self._read().get("tokens")
        if not isinstance(record, dict):
            return None
        fields: dict[str, Any] = dict(record)  # pyright: ignore[reportUnknownArgumentType]
        expires_at = fields.pop("expires_at", None)
        if isinstance(expires_at, int | float):
            fields["expires_in"] = max(0, int(expires_at - time.time()))
        try:
            return OAuthToken.model_validate(fields)
        except ValueError:
            return None

    async def set_tokens(self, tokens: OAuthToken) -> None:
        """Store the tokens (replacing the file atomically)."""
        record = tokens.model_dump(mode="json", exclude_none=True)
        if tokens.expires_in is not None:
            record["expires_at"] = time.time() + tokens.expires_in
            del record["expires_in"]
        data = self._read()
        data["tokens"] = record
        # Small and local: a thread hop would cost more than the write.
        self._write(data)

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        """The stored client registration, if any."""
        record = self._read().get("client_info")
        if not isinstance(record, dict):
            return None
        try:
            return OAuthClientInformationFull.model_validate(record)
        except ValueError:
            return None

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        """Store the client registration (replacing the file atomically)."""
        data = self._read()
        data["client_info"] = client_info.model_dump(mode="json", exclude_none=True)
        self._write(data)

    def __repr__(self) -> str:
        return f"FileTokenStorage({str(self.path)!r})"


@final
class EnvBearerAuth(httpx2.Auth):
    """``Authorization: Bearer <token>`` with the token read from an environment variable at each
    request, so a rotated token is used without reconnecting. Its repr names the variable, never
    the token.

    Args:
        variable: The environment variable holding the token.
    """

    def __init__(self, variable: str) -> None:
        self.variable = variable

    def auth_flow(self, request: httpx2.Request) -> Generator[httpx2.Request, httpx2.Response, None]:
        """Add the header (none while the variable is unset: the server then answers 401)."""
        token = os.environ.get(self.variable)
        if token:
            request.headers["Authorization"] = f"Bearer {token.strip()}"
        yield request

    def __repr__(self) -> str:
        return f"EnvBearerAuth({self.variable!r})"


def _print_url(url: str) -> None:
    print(f"Open this URL in a browser to authorize the MCP client:\n{url}", file=sys.stderr, flush=True)


@final
@attrs.define(eq=False)
class LoopbackCallback:
    """The redirect and callback of the OAuth authorization code flow for a command-line client:
    show the authorization URL, then take the browser's redirect on a loopback port (RFC 8252).

    Pass :meth:`redirect_handler` and :meth:`callback_handler` to the SDK's
    ``OAuthClientProvider``; the listener opens before the URL is shown, so a fast redirect is
    not missed.

    Args:
        redirect_uri: The loopback URL registered for the client, e.g.
            ``http://127.0.0.1:33418/callback``.
        open_url: Shows the URL to the user; the default prints it to stderr. ``webbrowser.open``
            opens it instead.
    """

    redirect_uri: str
    open_url: Callable[[str], object] = _print_url
    _listener: anyio.abc.Listener[anyio.abc.SocketStream] | None = attrs.field(default=None, init=False)

    async def redirect_handler(self, authorization_url: str) -> None:
        """Listen on the redirect URI's port, then show ``authorization_url``."""
        parts = urlsplit(self.redirect_uri)
        if self._listener is not None:
            await self._listener.aclose()
        self._listener = await anyio.create_tcp_listener(
            local_host=parts.hostname or "127.0.0.1", local_port=parts.port or 80
        )
        self.open_url(authorization_url)

    async def callback_handler(self) -> AuthorizationCodeResult:
        """Wait for the browser's redirect and return its ``code``, ``state`` and ``iss``.

        Raises:
            OAuthFlowError: The authorization server redirected with an error (the user
                refused, ...), or :meth:`redirect_handler` was not called first.
        """
        listener = self._listener
        if listener is None:
            raise OAuthFlowError("the redirect handler did not run before the callback handler")
        self._listener = None
        expected_path = urlsplit(self.redirect_uri).path or "/"
        outcome: list[AuthorizationCodeResult | OAuthFlowError] = []
        async with listener, anyio.create_task_group() as task_group:

            async def serve_one(stream: anyio.abc.SocketStream) -> None:
                async with stream:
                    target = await _request_target(stream)
                    parts = urlsplit(target or "")
                    if target is None or parts.path != expected_path:
                        await stream.send(_response(404, "Not the authorization callback."))
                        return
                    query = {key: values[0] for key, values in parse_qs(parts.query).items()}
                    if "error" in query or "code" not in query:
                        why = query.get("error_description") or query.get("error") or "no code"
                        await stream.send(_response(400, f"Authorization failed: {why}"))
                        outcome.append(OAuthFlowError(f"the authorization server redirected with: {why}"))
                    else:
                        await stream.send(_response(200, "Authorization received; you may close this page."))
                        code, state, iss = query["code"], query.get("state"), query.get("iss")
                        outcome.append(AuthorizationCodeResult(code=code, state=state, iss=iss))
                    task_group.cancel_scope.cancel()

            task_group.start_soon(listener.serve, serve_one)
        result = outcome[0]
        if isinstance(result, OAuthFlowError):
            raise result
        return result


async def _request_target(stream: anyio.abc.SocketStream) -> str | None:
    """The target of the HTTP request on ``stream`` (``/callback?code=...``), or None."""
    data = b""
    while b"\r\n" not in data and len(data) < _MAX_CALLBACK_BYTES:
        try:
            data += await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            return None
    words = data.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
    return words[1] if len(words) == 3 and words[0] == "GET" else None


def _response(status: int, text: str) -> bytes:
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found"}[status]
    body = text.encode("utf-8")
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


def _secret_from_env(spec: ServerSpec, key: str, variable: str) -> str:
    value = os.environ.get(variable)
    if not value:
        raise RMCPAuthError(
            f"the environment variable {variable!r} (servers.{spec.name}.auth.{key}) is not set or empty: "
            "set it to the secret and add the server again",
            server=spec.name,
        )
    return value.strip()


def _storage(spec: ServerSpec, config: AuthConfig) -> TokenStorage:
    if config.token_store == "memory":
        return MemoryTokenStorage()
    assert spec.url is not None  # an auth is only valid on an http spec
    return FileTokenStorage.for_server(spec.name, spec.url, config.token_dir)


@final
class _PreRegistered:
    """A token store that answers with a pre-registered client's record until one is stored."""

    def __init__(self, inner: TokenStorage, client_info: OAuthClientInformationFull) -> None:
        self._inner = inner
        self._client_info = client_info

    async def get_tokens(self) -> OAuthToken | None:
        return await self._inner.get_tokens()

    async def set_tokens(self, tokens: OAuthToken) -> None:
        await self._inner.set_tokens(tokens)

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return await self._inner.get_client_info() or self._client_info

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        await self._inner.set_client_info(client_info)


class _AuthorizationCode(OAuthClientProvider):
    """The SDK's provider, reading a stored token's expiry: the SDK's own start leaves a token
    loaded from the store without one, so an expired token would be sent, refused with 401 and
    answered with a whole new authorization (a person asked again) instead of a refresh."""

    async def _initialize(self) -> None:
        await super()._initialize()
        _restore_expiry(self)


class _ClientCredentials(ClientCredentialsOAuthProvider):
    """The SDK's client-credentials provider, reading a stored token's expiry (see above)."""

    async def _initialize(self) -> None:
        await super()._initialize()
        _restore_expiry(self)


def _restore_expiry(provider: OAuthClientProvider) -> None:
    tokens = provider.context.current_tokens
    if tokens is not None and tokens.expires_in is not None:
        provider.context.update_token_expiry(tokens)


def resolve_auth(spec: ServerSpec) -> httpx2.Auth | None:
    """The ``httpx2.Auth`` to connect to ``spec`` with: its own auth object as is, or the one its
    :class:`~rmcp_actors.AuthConfig` describes, with secrets read from the environment now.

    Call it once per server and keep the result: an OAuth provider holds the tokens it got.

    Raises:
        RMCPAuthError: An environment variable the config names is not set.
    """
    config = spec.auth
    if not isinstance(config, AuthConfig):
        return config
    assert spec.url is not None  # an auth is only valid on an http spec
    if config.method == "bearer":
        assert config.token_env is not None  # validated by AuthConfig
        _secret_from_env(spec, "token_env", config.token_env)
        return EnvBearerAuth(config.token_env)
    if config.method == "basic":
        assert config.username is not None
        assert config.password_env is not None
        return httpx2.BasicAuth(config.username, _secret_from_env(spec, "password_env", config.password_env))
    method = config.token_endpoint_auth_method or "client_secret_basic"
    if config.method == "client_credentials":
        assert config.client_id is not None
        assert config.client_secret_env is not None
        return _ClientCredentials(
            server_url=spec.url,
            storage=_storage(spec, config),
            client_id=config.client_id,
            client_secret=_secret_from_env(spec, "client_secret_env", config.client_secret_env),
            token_endpoint_auth_method=method,
            scope=config.scope,
            issuer=config.issuer,
        )
    redirect_uri = config.effective_redirect_uri
    secret = (
        _secret_from_env(spec, "client_secret_env", config.client_secret_env)
        if config.client_secret_env is not None
        else None
    )
    storage = _storage(spec, config)
    if config.client_id is not None:
        storage = _PreRegistered(
            storage,
            OAuthClientInformationFull(
                client_id=config.client_id,
                client_secret=secret,
                redirect_uris=[AnyUrl(redirect_uri)],
                token_endpoint_auth_method=method if secret is not None else "none",
                scope=config.scope,
            ),
        )
    callback = LoopbackCallback(redirect_uri)
    return _AuthorizationCode(
        server_url=spec.url,
        client_metadata=OAuthClientMetadata(
            redirect_uris=[AnyUrl(redirect_uri)],
            client_name=config.client_name or "rmcp_actors",
            scope=config.scope,
            token_endpoint_auth_method="none",
        ),
        storage=storage,
        redirect_handler=callback.redirect_handler,
        callback_handler=callback.callback_handler,
        client_metadata_url=config.client_metadata_url,
    )
