"""The auth client scenarios (``auth/*``): OAuth against the suite's authorization server.

Each scenario's server answers 401 (with a ``WWW-Authenticate`` that may point at its protected
resource metadata). The client gets a token with the SDK's OAuth providers given to rmcp_actors
as ``ServerSpec.http(auth=...)``: discovery, dynamic registration or a client ID metadata document
(CIMD) or the pre-registered credentials in ``context``, PKCE, the token request, scope step-up.
Then it lists the tools and calls each with no arguments.

The suite's authorization endpoint approves at once and redirects to the client's redirect URI,
so the "user" here is headless: it fetches the authorization URL and reads the code from the
redirect's ``Location`` instead of listening on the redirect URI (what ``LoopbackCallback`` does
for a real user).
"""

from __future__ import annotations

import sys
import warnings
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx2
from client_core import SERVER, connected
from mcp.client.auth import OAuthClientProvider
from mcp.client.auth.extensions.client_credentials import (
    ClientCredentialsOAuthProvider,
    PrivateKeyJWTOAuthProvider,
    SignedJWTParameters,
)
from mcp.client.auth.extensions.identity_assertion import IdentityAssertionOAuthProvider
from mcp.shared.auth import AuthorizationCodeResult, OAuthClientInformationFull, OAuthClientMetadata
from pydantic import AnyUrl

from rmcp_actors import MemoryTokenStorage, RMCPAuthError

# The suite checks that a client uses this URL as its client id where the authorization server
# supports client ID metadata documents (auth/basic-cimd); it never fetches it.
CIMD_URL = "https://conformance-test.local/client-metadata.json"
REDIRECT_URI = "http://localhost:3000/callback"


class HeadlessUser:
    """Approves every authorization request: fetches the URL, keeps the redirect's parameters."""

    def __init__(self) -> None:
        self._result: AuthorizationCodeResult | None = None

    async def redirect_handler(self, authorization_url: str) -> None:
        async with httpx2.AsyncClient() as client:
            response = await client.get(authorization_url, follow_redirects=False)
        location = response.headers.get("location")
        if location is None:
            raise RuntimeError(f"the authorization endpoint answered {response.status_code}, not a redirect")
        query = {key: values[0] for key, values in parse_qs(urlsplit(location).query).items()}
        if "code" not in query:
            raise RuntimeError(f"the authorization endpoint redirected without a code: {location}")
        self._result = AuthorizationCodeResult(
            code=query["code"], state=query.get("state"), iss=query.get("iss")
        )

    async def callback_handler(self) -> AuthorizationCodeResult:
        result, self._result = self._result, None
        if result is None:
            raise RuntimeError("no authorization code: the redirect handler did not run")
        return result


async def _authorization_code(url: str, context: dict[str, Any]) -> httpx2.Auth:
    user = HeadlessUser()
    storage = MemoryTokenStorage()
    if "client_id" in context:
        # Pre-registered: the store starts with the client's record, so nothing registers.
        await storage.set_client_info(
            OAuthClientInformationFull(
                client_id=context["client_id"],
                client_secret=context.get("client_secret"),
                redirect_uris=[AnyUrl(REDIRECT_URI)],
                token_endpoint_auth_method="client_secret_basic" if context.get("client_secret") else "none",
            )
        )
    return OAuthClientProvider(
        server_url=url,
        client_metadata=OAuthClientMetadata(
            client_name="rmcp-actors-conformance",
            redirect_uris=[AnyUrl(REDIRECT_URI)],
            grant_types=["authorization_code", "refresh_token"],
        ),
        storage=storage,
        redirect_handler=user.redirect_handler,
        callback_handler=user.callback_handler,
        client_metadata_url=CIMD_URL,
    )


async def _cross_app_access(url: str, context: dict[str, Any]) -> httpx2.Auth:
    """SEP-990: the enterprise IdP's ID token is exchanged at the IdP for an ID-JAG (RFC 8693, leg
    1, the deployment's part), which the SDK's provider presents to the MCP authorization server
    (RFC 7523, leg 2). The provider takes that server as configuration; a deployment knows it, and
    this program reads it once from the server's protected resource metadata."""
    parts = urlsplit(url)
    metadata_url = f"{parts.scheme}://{parts.netloc}/.well-known/oauth-protected-resource{parts.path}"
    async with httpx2.AsyncClient() as client:
        issuer = (await client.get(metadata_url)).json()["authorization_servers"][0]

    async def id_jag(audience: str, resource: str) -> str:
        async with httpx2.AsyncClient() as client:
            response = await client.post(
                context["idp_token_endpoint"],
                data={
                    "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
                    "subject_token": context["idp_id_token"],
                    "subject_token_type": "urn:ietf:params:oauth:token-type:id_token",
                    "requested_token_type": "urn:ietf:params:oauth:token-type:id-jag",
                    "audience": audience,
                    "resource": resource,
                    "client_id": context["idp_client_id"],
                },
            )
        response.raise_for_status()
        return str(response.json()["access_token"])

    return IdentityAssertionOAuthProvider(
        url,
        MemoryTokenStorage(),
        context["client_id"],
        context["client_secret"],
        issuer,
        id_jag,
        token_endpoint_auth_method="client_secret_basic",
    )


async def provider_for(url: str, scenario: str, context: dict[str, Any]) -> httpx2.Auth:
    """The SDK auth provider that plays ``scenario``."""
    # No issuer is known before discovery here (the suite names none): the SDK warns about it.
    warnings.simplefilter("ignore")
    if scenario == "auth/client-credentials-basic":
        return ClientCredentialsOAuthProvider(
            url, MemoryTokenStorage(), context["client_id"], context["client_secret"]
        )
    if scenario == "auth/client-credentials-jwt":
        signing = SignedJWTParameters(
            issuer=context["client_id"],
            subject=context["client_id"],
            signing_key=context["private_key_pem"],
            signing_algorithm=context.get("signing_algorithm", "ES256"),
        )
        return PrivateKeyJWTOAuthProvider(
            url, MemoryTokenStorage(), context["client_id"], signing.create_assertion_provider()
        )
    if scenario == "auth/cross-app-access-complete-flow":
        return await _cross_app_access(url, context)
    return await _authorization_code(url, context)


async def run(url: str, scenario: str, context: dict[str, Any]) -> None:
    """Connect with the scenario's OAuth provider, list the tools and call each."""
    try:
        async with connected(url, auth=await provider_for(url, scenario, context)) as sup:
            for tool in await sup.list_tools(SERVER):
                await sup.call(SERVER, tool.name, {})
    except RMCPAuthError as error:
        # Some scenarios expect the client to give up (a resource that does not match, a server
        # that keeps asking for scopes): say why, and fail.
        print(f"conformance client: {error}", file=sys.stderr)
        raise SystemExit(1) from None
