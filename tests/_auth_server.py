"""Test helper: an OAuth authorization server and a protected MCP server, both in-process.

The MCP server is the SDK's own resource server: an ``MCPServer`` with a ``token_verifier`` and
``AuthSettings`` (``RequireAuthMiddleware`` answers 401 without a valid token, 403 without the
required scope). The authorization server is a small Starlette app of ours in front of it (the
SDK's own token endpoint has no client-credentials grant): protected resource metadata,
authorization server metadata, ``/register``, ``/authorize`` (approves at once and redirects)
and ``/token`` (client_credentials, authorization_code with PKCE S256, refresh_token). It issues
opaque random tokens, keeps every grant it served in ``grants``, and can revoke tokens.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from typing import Any
from urllib.parse import unquote, urlencode

import attrs
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import MCPServer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

__all__ = ["Authority", "protected_server"]

REQUIRED_SCOPE = "mcp"
_AS_PATHS = frozenset({"/register", "/authorize", "/token"})


@attrs.define(eq=False)
class _Code:
    client_id: str
    challenge: str
    redirect_uri: str
    scopes: list[str]


@attrs.define(eq=False)
class Authority:
    """The authorization server's state, and its ``TokenVerifier`` for the MCP server.

    Attributes:
        clients: Registered clients: id -> secret (None for a public client).
        expires_in: The ``expires_in`` the token endpoint announces; the token itself stays valid
            here for an hour, so 0 makes the client refresh before its next request.
        refreshed_expires_in: The ``expires_in`` of a token got with a refresh token (None: the
            same as ``expires_in``).
        scopes: The scopes every token gets (unless the request asks for fewer).
        grants: Every grant the token endpoint served, in order.
        calls: Every request made to the authorization server, as ``"METHOD /path"``.
    """

    clients: dict[str, str | None] = attrs.Factory(dict[str, str | None])
    expires_in: int = 3600
    refreshed_expires_in: int | None = None
    scopes: list[str] = attrs.Factory(lambda: [REQUIRED_SCOPE])
    grants: list[str] = attrs.Factory(list[str])
    calls: list[str] = attrs.Factory(list[str])
    _access: dict[str, AccessToken] = attrs.Factory(dict[str, AccessToken])
    _refresh: dict[str, tuple[str, list[str]]] = attrs.Factory(dict[str, tuple[str, list[str]]])
    _codes: dict[str, _Code] = attrs.Factory(dict[str, _Code])

    # -- the resource server's view ---------------------------------------------------------

    async def verify_token(self, token: str) -> AccessToken | None:
        """The SDK's ``TokenVerifier`` protocol: the token's record, if it is live."""
        return self._access.get(token)

    def mint(self, client_id: str, scopes: list[str] | None = None) -> str:
        """An access token issued out of band (a bearer token an operator hands out)."""
        token = secrets.token_urlsafe(24)
        self._access[token] = AccessToken(
            token=token,
            client_id=client_id,
            scopes=self.scopes if scopes is None else scopes,
            expires_at=int(time.time()) + 3600,
        )
        return token

    def grant_refresh(self, client_id: str, scopes: list[str] | None = None) -> str:
        """A refresh token issued earlier (by a previous run of the client)."""
        refresh_token = secrets.token_urlsafe(24)
        self._refresh[refresh_token] = (client_id, self.scopes if scopes is None else scopes)
        return refresh_token

    def revoke_all(self) -> None:
        """Revoke every access and refresh token (a credential leak, an admin's reset)."""
        self._access.clear()
        self._refresh.clear()

    def live_tokens(self) -> list[str]:
        return list(self._access)

    # -- the authorization server -----------------------------------------------------------

    def app(self, mcp_app: Any) -> Any:
        """The authorization server's routes in front of ``mcp_app`` (the MCP server, which
        keeps its own lifespan: a mounted app's would not run)."""
        routes = Starlette(
            routes=[
                Route("/.well-known/oauth-protected-resource{rest:path}", self._resource_metadata),
                Route("/.well-known/oauth-authorization-server{rest:path}", self._server_metadata),
                Route("/register", self._register, methods=["POST"]),
                Route("/authorize", self._authorize, methods=["GET"]),
                Route("/token", self._token, methods=["POST"]),
            ]
        )

        async def dispatch(scope: dict[str, Any], receive: Any, send: Any) -> None:
            path = scope.get("path", "")
            if scope["type"] == "http" and (path.startswith("/.well-known/") or path in _AS_PATHS):
                await routes(scope, receive, send)
            else:
                await mcp_app(scope, receive, send)

        return dispatch

    def _origin(self, request: Request) -> str:
        self.calls.append(f"{request.method} {request.url.path}")
        return f"{request.url.scheme}://{request.url.netloc}"

    async def _resource_metadata(self, request: Request) -> Response:
        origin = self._origin(request)
        return JSONResponse(
            {
                "resource": f"{origin}/mcp",
                "authorization_servers": [origin],
                "scopes_supported": [REQUIRED_SCOPE],
            }
        )

    async def _server_metadata(self, request: Request) -> Response:
        origin = self._origin(request)
        return JSONResponse(
            {
                "issuer": origin,
                "authorization_endpoint": f"{origin}/authorize",
                "token_endpoint": f"{origin}/token",
                "registration_endpoint": f"{origin}/register",
                "response_types_supported": ["code"],
                "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials"],
                "code_challenge_methods_supported": ["S256"],
                "token_endpoint_auth_methods_supported": [
                    "client_secret_basic",
                    "client_secret_post",
                    "none",
                ],
                "scopes_supported": [REQUIRED_SCOPE],
            }
        )

    async def _register(self, request: Request) -> Response:
        self._origin(request)
        metadata = await request.json()
        client_id = f"dyn-{secrets.token_hex(4)}"
        self.clients[client_id] = None
        return JSONResponse({**metadata, "client_id": client_id, "token_endpoint_auth_method": "none"}, 201)

    async def _authorize(self, request: Request) -> Response:
        self._origin(request)
        params = request.query_params
        client_id = params["client_id"]
        if client_id not in self.clients or params.get("code_challenge_method") != "S256":
            return JSONResponse({"error": "invalid_request"}, 400)
        code = secrets.token_urlsafe(16)
        requested = params.get("scope")
        self._codes[code] = _Code(
            client_id,
            params["code_challenge"],
            params["redirect_uri"],
            requested.split() if requested else self.scopes,
        )
        query = urlencode({"code": code, "state": params.get("state", "")})
        return RedirectResponse(f"{params['redirect_uri']}?{query}", 302)

    async def _token(self, request: Request) -> Response:
        self._origin(request)
        form = await request.form()
        client_id, secret = _client_credentials(request, form)
        if client_id is None or client_id not in self.clients or self.clients[client_id] != secret:
            return JSONResponse({"error": "invalid_client"}, 401)
        grant = str(form.get("grant_type"))
        if grant == "client_credentials":
            if secret is None:
                return JSONResponse({"error": "unauthorized_client"}, 400)
            requested = form.get("scope")
            scopes = str(requested).split() if requested else self.scopes
            self.grants.append(grant)
            return JSONResponse(self._issue(client_id, scopes, refresh=False))
        if grant == "authorization_code":
            code = self._codes.pop(str(form.get("code")), None)
            verifier = str(form.get("code_verifier", ""))
            challenge = (
                base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
            )
            if code is None or code.client_id != client_id or code.challenge != challenge:
                return JSONResponse({"error": "invalid_grant"}, 400)
            self.grants.append(grant)
            return JSONResponse(self._issue(client_id, code.scopes, refresh=True))
        if grant == "refresh_token":
            record = self._refresh.pop(str(form.get("refresh_token")), None)
            if record is None or record[0] != client_id:
                return JSONResponse({"error": "invalid_grant"}, 400)
            self.grants.append(grant)
            refreshed = self._issue(client_id, record[1], refresh=True)
            if self.refreshed_expires_in is not None:
                refreshed["expires_in"] = self.refreshed_expires_in
            return JSONResponse(refreshed)
        return JSONResponse({"error": "unsupported_grant_type"}, 400)

    def _issue(self, client_id: str, scopes: list[str], *, refresh: bool) -> dict[str, Any]:
        token = self.mint(client_id, scopes)
        answer: dict[str, Any] = {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": self.expires_in,
            "scope": " ".join(scopes),
        }
        if refresh:
            refresh_token = secrets.token_urlsafe(24)
            self._refresh[refresh_token] = (client_id, scopes)
            answer["refresh_token"] = refresh_token
        return answer


def _client_credentials(request: Request, form: Any) -> tuple[str | None, str | None]:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("basic "):
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        return unquote(user), unquote(password)
    client_id = form.get("client_id")
    secret = form.get("client_secret")
    return (str(client_id) if client_id else None), (str(secret) if secret else None)


def protected_server(authority: Authority, *, required_scopes: list[str] | None = None) -> MCPServer:
    """An MCP server that requires a token the authority issued, with ``required_scopes`` (default
    ``["mcp"]``). Tools: ``echo`` (records every run in ``server.ran``)."""
    server = MCPServer(
        "protected",
        token_verifier=authority,
        auth=AuthSettings(
            # Not served by the SDK here (no resource_server_url): our app serves the metadata.
            issuer_url="http://127.0.0.1",  # pyright: ignore[reportArgumentType]
            resource_server_url=None,
            required_scopes=[REQUIRED_SCOPE] if required_scopes is None else required_scopes,
        ),
    )
    ran: list[str] = []

    @server.tool()
    def echo(text: str) -> str:
        ran.append(text)
        return text

    server.ran = ran  # type: ignore[attr-defined]
    return server
