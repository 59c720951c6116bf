"""Auth against a real protected Streamable HTTP server: the SDK's resource server (a token
verifier, 401 without a token, 403 without the scope) behind a small OAuth authorization server
of the test's own (tests/_auth_server.py), on 127.0.0.1."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import stat
import tomllib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx2
import pytest
import trio
from _auth_server import Authority, protected_server
from _http import HTTPServerHandle, serve_http
from conftest import FAST_RECOVERY
from mcp.client.auth import OAuthClientProvider
from mcp.client.auth.extensions.client_credentials import ClientCredentialsOAuthProvider
from mcp.shared.auth import OAuthClientMetadata, OAuthToken
from pydantic import AnyUrl

from rmcp_actors import (
    AuthConfig,
    EnvBearerAuth,
    FileTokenStorage,
    LoopbackCallback,
    MemoryTokenStorage,
    PolicyOverrides,
    RMCPAuthError,
    RMCPConfig,
    RMCPConfigError,
    RMCPNetworkError,
    RMCPSupervisor,
    ServerSpec,
)
from rmcp_actors.config import CircuitBreakerOverrides

SECRET = "cc-secret-4f1d9a7e2b"
# One failure would open a breaker that counted it: a refused credential must not.
TRIGGER_HAPPY = PolicyOverrides(
    reconnect=FAST_RECOVERY.reconnect,
    retry=FAST_RECOVERY.retry,
    circuit_breaker=CircuitBreakerOverrides(failure_threshold=1, min_calls=1),
)


@asynccontextmanager
async def protected(
    authority: Authority, *, required_scopes: list[str] | None = None
) -> AsyncIterator[tuple[HTTPServerHandle, Any]]:
    server = protected_server(authority, required_scopes=required_scopes)
    async with serve_http(server, wrap=authority.app) as http:
        yield http, server


def origin(http: HTTPServerHandle) -> str:
    return http.url.rsplit("/mcp", 1)[0]


def configured(http: HTTPServerHandle, auth: dict[str, Any]) -> ServerSpec:
    """The server as a configuration file names it (added later, by the test)."""
    config = RMCPConfig.from_dict({"servers": {"web": {"transport": "http", "url": http.url, "auth": auth}}})
    return config.servers["web"]


def client_credentials_spec(http: HTTPServerHandle) -> ServerSpec:
    """The server with the client credentials ``svc``/``SECRET``, token kept in memory."""
    auth = ClientCredentialsOAuthProvider(http.url, MemoryTokenStorage(), "svc", SECRET, issuer=origin(http))
    return ServerSpec.http("web", http.url, auth=auth, overrides=TRIGGER_HAPPY)


def breaker_failures(sup: RMCPSupervisor) -> int:
    return sum(stats.window_failures + stats.opens for stats in sup.statistics().breakers)


# -- bearer -------------------------------------------------------------------------------------


async def test_a_bearer_token_from_the_environment_gets_in(monkeypatch: pytest.MonkeyPatch) -> None:
    authority = Authority()
    async with protected(authority) as (http, server):
        monkeypatch.setenv("WEB_TOKEN", authority.mint("ops"))
        spec = configured(http, {"method": "bearer", "token_env": "WEB_TOKEN"})
        async with RMCPSupervisor.open() as sup:
            await sup.add_server(spec)
            assert (await sup.call("web", "echo", {"text": "one"})).text == "one"
            # Read at each request: a rotated token is used without reconnecting.
            monkeypatch.setenv("WEB_TOKEN", authority.mint("ops"))
            assert (await sup.call("web", "echo", {"text": "two"})).text == "two"
    assert server.ran == ["one", "two"]


async def test_an_unset_token_variable_is_an_auth_error_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WEB_TOKEN", raising=False)
    authority = Authority()
    async with protected(authority) as (http, _server):
        spec = configured(http, {"method": "bearer", "token_env": "WEB_TOKEN"})
        async with RMCPSupervisor.open() as sup:
            with pytest.raises(
                RMCPAuthError, match=r"'WEB_TOKEN' \(servers\.web\.auth\.token_env\) is not set"
            ):
                await sup.add_server(spec)


@pytest.mark.parametrize(
    ("status", "words"), [(401, r"HTTP 401 .*check the spec's auth"), (403, r"HTTP 403 .*scopes")]
)
async def test_a_refused_token_at_connect_is_an_auth_error_that_says_what_to_do(
    monkeypatch: pytest.MonkeyPatch, status: int, words: str
) -> None:
    authority = Authority()
    async with protected(authority) as (http, _server):
        token = "not-a-token-authority-knows" if status == 401 else authority.mint("ops", scopes=["read"])
        monkeypatch.setenv("WEB_TOKEN", token)
        spec = configured(http, {"method": "bearer", "token_env": "WEB_TOKEN"})
        async with RMCPSupervisor.open() as sup:
            with pytest.raises(RMCPAuthError, match=words) as caught:
                await sup.add_server(spec)
    error = caught.value
    assert isinstance(error, RMCPNetworkError)  # add_server callers catching that still do
    assert error.may_have_executed is False
    assert token not in str(error)


async def test_a_revoked_token_mid_run_is_an_auth_error_not_retried_not_a_breaker_fault(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    authority = Authority()
    async with protected(authority) as (http, server):
        monkeypatch.setenv("WEB_TOKEN", authority.mint("ops"))
        spec = configured(http, {"method": "bearer", "token_env": "WEB_TOKEN"})
        spec = ServerSpec.http("web", http.url, auth=spec.auth, overrides=TRIGGER_HAPPY)
        async with RMCPSupervisor.open() as sup:
            await sup.add_server(spec)
            assert (await sup.call("web", "echo", {"text": "before"})).text == "before"
            authority.revoke_all()
            for _ in range(3):  # a counted fault would open the breaker at the first
                with pytest.raises(RMCPAuthError, match=r"HTTP 401.*did not run.*not retried") as caught:
                    await sup.call("web", "echo", {"text": "after"})
                assert caught.value.may_have_executed is False
                assert [event.state.value for event in caught.value.lifecycle].count("sent") == 1
            assert breaker_failures(sup) == 0
    assert server.ran == ["before"]


# -- OAuth client credentials ---------------------------------------------------------------------


async def test_client_credentials_from_config_end_to_end(monkeypatch: pytest.MonkeyPatch) -> None:
    authority = Authority(clients={"svc": SECRET})
    monkeypatch.setenv("WEB_SECRET", SECRET)
    async with protected(authority) as (http, server):
        spec = configured(
            http,
            {
                "method": "client_credentials",
                "client_id": "svc",
                "client_secret_env": "WEB_SECRET",
                "issuer": origin(http),
                "scope": "mcp",
                "token_store": "memory",
            },
        )
        async with RMCPSupervisor.open() as sup:
            await sup.add_server(spec)
            results = [await sup.call("web", "echo", {"text": str(i)}) for i in range(3)]
    assert [r.text for r in results] == ["0", "1", "2"]
    assert authority.grants == ["client_credentials"]  # one token, kept across calls
    assert server.ran == ["0", "1", "2"]


async def test_an_expired_token_is_replaced_inside_the_call_and_nothing_counts_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Tokens announced as expiring at once: before each request the provider finds its token
    # expired, the server answers 401, and the provider gets a new one and sends it again.
    authority = Authority(clients={"svc": SECRET}, expires_in=0)
    async with protected(authority) as (http, server), RMCPSupervisor.open() as sup:
        await sup.add_server(client_credentials_spec(http))
        results = [await sup.call("web", "echo", {"text": str(i)}) for i in range(3)]
        assert breaker_failures(sup) == 0
    assert [r.attempts for r in results] == [1, 1, 1]
    assert len(authority.grants) >= 4  # the handshake's token, then one per expired token
    assert server.ran == ["0", "1", "2"]


async def test_a_client_whose_credentials_were_revoked_gets_an_auth_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    authority = Authority(clients={"svc": SECRET})
    async with protected(authority) as (http, server), RMCPSupervisor.open() as sup:
        await sup.add_server(client_credentials_spec(http))
        assert (await sup.call("web", "echo", {"text": "before"})).text == "before"
        authority.revoke_all()
        del authority.clients["svc"]
        with pytest.raises(RMCPAuthError, match=r"auth flow failed: OAuthTokenError") as caught:
            await sup.call("web", "echo", {"text": "after"})
        assert caught.value.may_have_executed is False
        # The failed flow ended the session; the reconnects are refused too, and a call
        # meanwhile says so at once rather than waiting out its deadline for them.
        with (
            trio.fail_after(2),
            pytest.raises(RMCPAuthError, match=r"auth flow failed.*keeps reconnecting") as later,
        ):
            await sup.call("web", "echo", {"text": "later"}, timeout=30)
        assert later.value.may_have_executed is False
        assert breaker_failures(sup) == 0
    assert server.ran == ["before"]
    assert SECRET not in str(caught.value)


async def refused(sup: RMCPSupervisor, authority: Authority) -> None:
    """Revoke the client's credentials until the reconnects are refused too."""
    assert (await sup.call("web", "echo", {"text": "before"})).text == "before"
    authority.revoke_all()
    del authority.clients["svc"]
    with pytest.raises(RMCPAuthError):
        await sup.call("web", "echo", {"text": "refused"})
    with trio.fail_after(2), pytest.raises(RMCPAuthError, match="keeps reconnecting"):
        await sup.call("web", "echo", {"text": "refused"}, timeout=30)


async def test_a_server_that_accepts_the_credentials_again_is_reconnected_to() -> None:
    authority = Authority(clients={"svc": SECRET})
    async with protected(authority) as (http, server), RMCPSupervisor.open() as sup:
        await sup.add_server(client_credentials_spec(http))
        await refused(sup, authority)
        authority.clients["svc"] = SECRET
        # The reconnect loop goes on with the same provider: the next connect gets in.
        with trio.fail_after(10):
            while True:
                with contextlib.suppress(RMCPAuthError):
                    assert (await sup.call("web", "echo", {"text": "again"})).text == "again"
                    break
                await trio.sleep(0.05)
    assert server.ran == ["before", "again"]


async def test_a_refusal_is_forgotten_once_a_reconnect_fails_for_another_reason() -> None:
    # Refused, then the server went down (and its credentials were fixed meanwhile): a call waits
    # for the reconnect (when_disconnected = "wait") instead of failing at once with the stale
    # auth error of an earlier connect.
    authority = Authority(clients={"svc": SECRET})
    async with protected(authority) as (http, server), RMCPSupervisor.open() as sup:
        await sup.add_server(client_credentials_spec(http))
        await refused(sup, authority)
        await http.stop()
        with trio.fail_after(10):
            while "ConnectError" not in (sup.statistics().connections[0].last_error or ""):
                await trio.sleep(0.02)
        authority.clients["svc"] = SECRET
        async with trio.open_nursery() as nursery:
            results: list[str] = []

            async def call() -> None:
                results.append((await sup.call("web", "echo", {"text": "up"}, timeout=20)).text)

            nursery.start_soon(call)
            await trio.sleep(0.3)
            await http.restart()
        assert results == ["up"]
    assert server.ran == ["before", "up"]


# -- OAuth authorization code -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def browser(nursery: trio.Nursery, visited: list[str]) -> Callable[[str], None]:
    """A user who approves at once: opens the authorization URL and follows its redirect to the
    loopback callback, as a browser would."""

    async def visit(url: str) -> None:
        visited.append(url)
        async with httpx2.AsyncClient() as client:
            approval = await client.get(url)
            assert approval.status_code == 302
            callback = await client.get(approval.headers["location"])
            assert callback.status_code == 200

    return lambda url: nursery.start_soon(visit, url)


async def test_authorization_code_with_pkce_stores_tokens_and_refreshes_them(tmp_path: Path) -> None:
    # The first token is announced as expired at once: the next request refreshes it first.
    authority = Authority(expires_in=0, refreshed_expires_in=3600)
    redirect_uri = f"http://127.0.0.1:{free_port()}/callback"
    store = FileTokenStorage(tmp_path / "tokens" / "web.json")
    visited: list[str] = []
    async with protected(authority) as (http, server), trio.open_nursery() as nursery:
        callback = LoopbackCallback(redirect_uri, open_url=browser(nursery, visited))
        auth = OAuthClientProvider(
            http.url,
            OAuthClientMetadata(redirect_uris=[AnyUrl(redirect_uri)], client_name="test", scope="mcp"),
            store,
            redirect_handler=callback.redirect_handler,
            callback_handler=callback.callback_handler,
        )
        async with RMCPSupervisor.open() as sup:
            await sup.add_server(ServerSpec.http("web", http.url, auth=auth, overrides=TRIGGER_HAPPY))
            results = [await sup.call("web", "echo", {"text": str(i)}) for i in range(2)]
            assert breaker_failures(sup) == 0
    assert [r.text for r in results] == ["0", "1"]
    assert len(visited) == 1  # the user was asked once
    assert "code_challenge_method=S256" in visited[0]
    assert authority.grants == ["authorization_code", "refresh_token"]
    assert server.ran == ["0", "1"]
    # The store holds the latest token, readable by its owner only.
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    stored = await store.get_tokens()
    assert stored is not None
    assert stored.access_token in authority.live_tokens()
    assert (await store.get_client_info()) is not None


async def test_a_stored_expired_token_is_refreshed_without_asking_the_user_again(tmp_path: Path) -> None:
    # A later run of a CLI: its token store holds an expired token and a refresh token.
    authority = Authority(clients={"cli": None})
    async with protected(authority) as (http, server):
        spec = configured(
            http,
            {
                "method": "authorization_code",
                "client_id": "cli",
                "scope": "mcp",
                "redirect_uri": f"http://127.0.0.1:{free_port()}/callback",
                "token_dir": str(tmp_path),
            },
        )
        store = FileTokenStorage.for_server("web", http.url, tmp_path)
        refresh_token = authority.grant_refresh("cli")
        await store.set_tokens(OAuthToken(access_token="expired", expires_in=0, refresh_token=refresh_token))
        async with RMCPSupervisor.open() as sup:
            await sup.add_server(spec)
            assert (await sup.call("web", "echo", {"text": "again"})).text == "again"
    assert authority.grants == ["refresh_token"]  # no authorization_code: nobody was asked
    assert "GET /authorize" not in authority.calls
    assert server.ran == ["again"]
    stored = await store.get_tokens()
    assert stored is not None
    assert stored.access_token in authority.live_tokens()


async def test_the_loopback_callback_reports_a_refusal() -> None:
    redirect_uri = f"http://127.0.0.1:{free_port()}/callback"
    callback = LoopbackCallback(redirect_uri, open_url=lambda _url: None)
    await callback.redirect_handler("https://as.example/authorize?x=1")
    async with trio.open_nursery() as nursery:

        async def user_says_no() -> None:
            async with httpx2.AsyncClient() as client:
                await client.get(f"{redirect_uri[: -len('/callback')]}/favicon.ico")
                refused = await client.get(f"{redirect_uri}?error=access_denied&state=s")
            assert refused.status_code == 400

        nursery.start_soon(user_says_no)
        with pytest.raises(Exception, match="access_denied"):
            await callback.callback_handler()


# -- secrets stay out of reprs and logs ---------------------------------------------------------


async def test_secrets_never_reach_reprs_or_logs(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    authority = Authority(clients={"svc": SECRET})
    bearer = authority.mint("ops")
    monkeypatch.setenv("WEB_TOKEN", bearer)
    monkeypatch.setenv("WEB_SECRET", SECRET)
    async with protected(authority) as (http, _server):
        bearer_spec = configured(http, {"method": "bearer", "token_env": "WEB_TOKEN"})
        cc_spec = configured(
            http,
            {
                "method": "client_credentials",
                "client_id": "svc",
                "client_secret_env": "WEB_SECRET",
                "issuer": origin(http),
                "token_store": "memory",
            },
        )
        basic = ServerSpec.http("basic", http.url, auth=httpx2.BasicAuth("u", SECRET))
        async with RMCPSupervisor.open() as sup:
            await sup.add_server(bearer_spec)
            await sup.add_server(ServerSpec.http("cc", http.url, auth=cc_spec.auth))
            await sup.call("web", "echo", {"text": "x"})
            await sup.call("cc", "echo", {"text": "y"})
            shown = " ".join(
                [
                    repr(bearer_spec),
                    repr(cc_spec),
                    repr(basic),
                    bearer_spec.describe(),
                    repr(sup.statistics()),
                ]
            )
    issued = authority.live_tokens()
    for secret in [SECRET, bearer, *issued]:
        assert secret not in shown
        assert secret not in caplog.text
    assert "WEB_TOKEN" in repr(bearer_spec)  # the variable's name is what a reader needs


# -- the ServerSpec field ---------------------------------------------------------------------


def test_redact_masks_the_values_of_the_variables_an_auth_config_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WEB_TOKEN", "tok-5b1e77c2")
    spec = ServerSpec.http(
        "a", "http://127.0.0.1:1/mcp", auth=AuthConfig(method="bearer", token_env="WEB_TOKEN")
    )
    assert (
        spec.redact("Illegal header value b'Bearer tok-5b1e77c2\\n'")
        == "Illegal header value b'Bearer ***\\n'"
    )


def test_auth_is_http_only_compared_by_identity_and_masked() -> None:
    auth = EnvBearerAuth("T")
    spec = ServerSpec.http("a", "http://127.0.0.1:1/mcp", auth=auth)
    assert spec == ServerSpec.http("a", "http://127.0.0.1:1/mcp", auth=auth)
    assert spec != ServerSpec.http("a", "http://127.0.0.1:1/mcp", auth=EnvBearerAuth("T"))
    assert "BasicAuth>" in repr(
        ServerSpec.http("a", "http://127.0.0.1:1/mcp", auth=httpx2.BasicAuth("u", "pw-1234"))
    )
    assert "pw-1234" not in repr(
        ServerSpec.http("a", "http://127.0.0.1:1/mcp", auth=httpx2.BasicAuth("u", "pw-1234"))
    )
    with pytest.raises(RMCPConfigError, match="only for the 'http' transport") as caught:
        ServerSpec(name="a", transport="stdio", command="x", auth=auth)
    assert caught.value.path == "auth"
    with pytest.raises(RMCPConfigError, match=r"expected an httpx2\.Auth"):
        ServerSpec.http("a", "http://127.0.0.1:1/mcp", auth="Bearer abc")  # type: ignore[arg-type]
    with pytest.raises(RMCPConfigError, match="keep one"):
        ServerSpec.http("a", "http://u:p@127.0.0.1:1/mcp", auth=auth)


# -- configuration errors name the key --------------------------------------------------------


def config_error(auth: Any, transport: str = "http") -> RMCPConfigError:
    server: dict[str, Any] = {"transport": transport, "auth": auth}
    server.update({"url": "http://127.0.0.1:1/mcp"} if transport == "http" else {"command": "x"})
    with pytest.raises(RMCPConfigError) as caught:
        RMCPConfig.from_dict({"servers": {"web": server}})
    return caught.value


@pytest.mark.parametrize(
    ("auth", "path", "words"),
    [
        ({"method": "bearer", "token": "sk-live-abcdef0123456789"}, "servers.web.auth.token", "token_env"),
        (
            {"method": "client_credentials", "client_id": "c", "client_secret": "hunter2hunter2"},
            "servers.web.auth.client_secret",
            "client_secret_env",
        ),
        (
            {"method": "basic", "username": "u", "password": "hunter2hunter2"},
            "servers.web.auth.password",
            "password_env",
        ),
        ({"method": "bearer"}, "servers.web.auth.token_env", "needs 'token_env'"),
        (
            {"method": "bearer", "token_env": "sk-live-abcdef0123456789"},
            "servers.web.auth.token_env",
            "name an environment variable",
        ),
        ({"method": "bearer", "token_env": "T", "scope": "x"}, "servers.web.auth.scope", "does not apply"),
        ({"method": "magic"}, "servers.web.auth.method", "must be one of"),
        ({"method": "client_credentials", "client_id": "c"}, "servers.web.auth.client_secret_env", "needs"),
        (
            {"method": "authorization_code", "redirect_uri": "https://example.com/cb"},
            "servers.web.auth.redirect_uri",
            "loopback",
        ),
        ({"method": "bearer", "token_env": "T", "tokn_env": "T"}, "servers.web.auth.tokn_env", "unknown key"),
        (
            {"method": "bearer", "token_env": "T", "token_store": "disk"},
            "servers.web.auth.token_store",
            "must be one of",
        ),
    ],
)
def test_auth_config_errors_name_the_key_and_never_quote_a_secret(
    auth: dict[str, Any], path: str, words: str
) -> None:
    error = config_error(auth)
    assert error.path == path
    assert words in str(error)
    for key in ("token", "client_secret", "password", "token_env"):
        if (key in auth and key != "token_env") or auth.get(key, "").startswith("sk-"):
            assert auth[key] not in str(error)


def test_auth_on_a_stdio_server_is_refused() -> None:
    error = config_error({"method": "bearer", "token_env": "T"}, transport="stdio")
    assert error.path == "servers.web.auth"


def test_an_auth_config_loads_as_a_value() -> None:
    config = RMCPConfig.from_dict(
        {
            "servers": {
                "web": {
                    "transport": "http",
                    "url": "http://h/mcp",
                    "auth": {"method": "bearer", "token_env": "T"},
                }
            }
        }
    )
    assert config.servers["web"].auth == AuthConfig(method="bearer", token_env="T")


# -- the file token store -----------------------------------------------------------------------


async def test_the_file_store_is_private_atomic_and_keeps_the_expiry(tmp_path: Path) -> None:
    store = FileTokenStorage.for_server("web", "https://mcp.example.com/mcp", tmp_path / "dir")
    assert await store.get_tokens() is None
    await store.set_tokens(OAuthToken(access_token="at-1", expires_in=3600, refresh_token="rt-1"))
    await store.set_tokens(OAuthToken(access_token="at-2", expires_in=3600, refresh_token="rt-2"))
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.path.parent.stat().st_mode) == 0o700
    assert os.listdir(store.path.parent) == [store.path.name]  # no temporary file left behind
    tokens = await store.get_tokens()
    assert tokens is not None
    assert (tokens.access_token, tokens.refresh_token) == ("at-2", "rt-2")
    assert tokens.expires_in is not None
    assert 3590 <= tokens.expires_in <= 3600
    # Another server's tokens live in another file.
    other = FileTokenStorage.for_server("web", "https://other.example.com/mcp", tmp_path / "dir")
    assert other.path != store.path
    store.path.write_text("{not json", encoding="utf-8")
    assert await store.get_tokens() is None  # damaged: authorize again rather than fail


def test_the_readme_configures_an_oauth_server() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    [block] = re.findall(r"```toml\n(.*?)```", readme, re.S)
    auth = RMCPConfig.from_dict(tomllib.loads(block)).servers["api"].auth
    assert auth == AuthConfig(
        method="client_credentials",
        client_id="reporting",
        client_secret_env="API_SECRET",
        scope="mcp",
        issuer="https://auth.example.com",
    )
