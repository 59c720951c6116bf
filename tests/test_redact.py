"""Secrets never shown: URL passwords and tokens, headers, env values and secret-looking arguments
are masked in ServerSpec/RMCPConfig reprs, descriptions and connection errors, while the real
values are what the connection uses."""

from __future__ import annotations

import io
import logging
import string
import sys
from pathlib import Path
from typing import Any

import httpx2
import pytest
import trio
from _http import serve_http
from conftest import PYTHON, stdio_args
from hypothesis import given
from hypothesis import strategies as st
from mcp.server.mcpserver import MCPServer

from rmcp_actors import PolicyOverrides, RMCPConfig, RMCPNetworkError, RMCPSupervisor, ServerSpec
from rmcp_actors._redact import MASK, URLMaskingFilter, mask_args, mask_url, scrub

# Secrets start with a marker no repr or message contains by chance.
secrets = st.text(alphabet=string.ascii_letters + string.digits, min_size=8, max_size=40).map(
    lambda s: "Zq9" + s
)


def shown(spec: ServerSpec) -> str:
    """Everything the library may show of a spec."""
    return "\n".join([repr(spec), str(spec), spec.describe(), repr(RMCPConfig(servers={spec.name: spec}))])


@given(password=secrets, token=secrets, header=secrets)
def test_http_spec_masks_url_password_query_token_and_headers(password: str, token: str, header: str) -> None:
    url = f"https://alice:{password}@example.com:8443/mcp?token={token}&page=2"
    spec = ServerSpec.http("web", url, headers={"Authorization": f"Bearer {header}", "X-Tenant": header})
    text = shown(spec) + spec.redact(f"connect to {url} failed with header {header}")
    for secret in (password, token, header):
        assert secret not in text
    assert "https://alice:***@example.com:8443/mcp?token=***&page=2" in text
    assert spec.url == url
    assert spec.headers == {"Authorization": f"Bearer {header}", "X-Tenant": header}


@given(flag_value=secrets, spaced=secrets, env_value=secrets, assigned=secrets)
def test_stdio_spec_masks_secret_arguments_and_env(
    flag_value: str, spaced: str, env_value: str, assigned: str
) -> None:
    args = ["-m", "server", f"--token={flag_value}", "--api-key", spaced, f"API_SECRET={assigned}"]
    spec = ServerSpec.stdio("s", "python3", args, env={"HOME": env_value})
    text = shown(spec) + spec.redact(f"exec failed: {' '.join(args)} with {env_value}")
    for secret in (flag_value, spaced, env_value, assigned):
        assert secret not in text
    assert spec.describe() == "python3 -m server --token=*** --api-key *** API_SECRET=***"
    assert spec.args == tuple(args)
    assert spec.env == {"HOME": env_value}


@pytest.mark.parametrize(
    "token",
    [
        "sk-proj-abcdefghijklmnopqrstuvwxyz012345",
        "ghp_abcdefghijklmnopqrstuvwxyz0123456789",
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
        "AKIAABCDEFGHIJKLMNOP",
        "a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0",
    ],
)
def test_token_looking_arguments_are_masked(token: str) -> None:
    spec = ServerSpec.stdio("s", "server", ["--verbose", token, f"--header=Bearer {token}"])
    assert token not in shown(spec)
    assert token not in spec.redact(f"it said {token}")
    assert spec.describe().startswith("server --verbose ***")


@pytest.mark.parametrize(
    "args",
    [
        ["-m", "mcp_server_time", "--local-timezone", "UTC"],
        ["--port", "8080", "--host", "127.0.0.1", "/srv/data/files", "--verbose"],
        ["run", "--directory", "/home/me/src/mcp-server-git", "mcp-server-git", "--repository", "."],
        ["--monkey", "patch", "--keyboard-layout", "fr"],
        # Paths with digits in them are paths, not keys.
        ["/work/wt/round3/tests/mcp_test_server.py", "--db", "/var/lib/app2/data/v1/store.sqlite"],
    ],
)
def test_ordinary_arguments_are_shown_as_written(args: list[str]) -> None:
    assert mask_args(args) == tuple(args)


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("http://localhost:8000/mcp", "http://localhost:8000/mcp"),
        ("https://u:p%40ss@host/mcp", "https://u:***@host/mcp"),
        ("https://ghp_abcdefghijklmnopqrstuvwx@github.com/x", "https://***@github.com/x"),
        ("https://h/mcp?api_key=abc&access_token=def&x=1", "https://h/mcp?api_key=***&access_token=***&x=1"),
        ("http://[::1]:9000/mcp?sig=zz", "http://[::1]:9000/mcp?sig=***"),
    ],
)
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked


@given(
    host=st.sampled_from(["example.com", "127.0.0.1", "[::1]", "mcp.internal"]),
    port=st.none() | st.integers(1, 65535),
    path=st.lists(st.text(alphabet=string.ascii_lowercase + "-_", min_size=1, max_size=8), max_size=3),
    query=st.lists(
        st.tuples(st.sampled_from(["page", "lang", "q", "v"]), st.text(string.ascii_lowercase, max_size=6)),
        max_size=3,
    ),
)
def test_urls_without_secrets_are_shown_as_written(
    host: str, port: int | None, path: list[str], query: list[tuple[str, str]]
) -> None:
    url = f"https://{host}{f':{port}' if port else ''}/{'/'.join(path)}"
    if query:
        url += "?" + "&".join(f"{k}={v}" for k, v in query)
    assert mask_url(url) == url
    assert ServerSpec.http("web", url).describe() == url


def test_url_password_is_scrubbed_encoded_and_decoded() -> None:
    spec = ServerSpec.http("web", "https://u:p%40ssw0rd@host/mcp")
    assert spec.redact("a p%40ssw0rd b p@ssw0rd c") == f"a {MASK} b {MASK} c"


def test_a_quoted_url_is_masked_whole_even_with_short_secrets() -> None:
    url = "https://u:pw@example.com/mcp?token=abc"
    spec = ServerSpec.http("web", url)
    message = spec.redact(f"Client error '401 Unauthorized' for url '{url}'")
    assert message == "Client error '401 Unauthorized' for url 'https://u:***@example.com/mcp?token=***'"


def test_short_values_are_masked_in_reprs_but_not_scrubbed_from_prose() -> None:
    spec = ServerSpec.stdio("s", "cmd", env={"DEBUG": "on"})
    assert "'on'" not in repr(spec)
    assert scrub("connection lost", ["on"]) == "connection lost"


def test_config_from_toml_repr_masks(tmp_path: Path) -> None:
    path = tmp_path / "rmcp.toml"
    path.write_text(
        """
        [servers.remote]
        transport = "http"
        url = "https://bob:hunter2hunter2@example.com/mcp"
        headers = { Authorization = "Bearer top-secret-value" }

        [servers.local]
        transport = "stdio"
        command = "server"
        args = ["--password", "correct-horse-battery"]
        env = { GITHUB_TOKEN = "gho_1234567890abcdefghij" }
        """,
        encoding="utf-8",
    )
    text = repr(RMCPConfig.from_toml(path))
    for secret in ("hunter2hunter2", "top-secret-value", "correct-horse-battery", "gho_1234567890abcdefghij"):
        assert secret not in text


# ------------------------------------------------------------------------------------------
# Connection errors, and the real values on the wire
# ------------------------------------------------------------------------------------------


async def test_stdio_connect_error_masks_secrets() -> None:
    spec = ServerSpec.stdio(
        "ghost",
        "/nonexistent/mcp-server-ghost",
        ["--token=Zq9tokenvalue123", "--api-key", "Zq9apikeyvalue456"],
        env={"DB_PASSWORD": "Zq9envvalue789"},
    )
    async with RMCPSupervisor.open() as sup:
        with pytest.raises(RMCPNetworkError) as caught:
            await sup.add_server(spec)
    message = str(caught.value)
    assert "/nonexistent/mcp-server-ghost --token=*** --api-key ***" in message
    for secret in ("Zq9tokenvalue123", "Zq9apikeyvalue456", "Zq9envvalue789"):
        assert secret not in message


async def test_http_connect_error_masks_url_password_and_token() -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connection refused
        url = f"http://alice:Zq9password1@127.0.0.1:{port}/mcp?token=Zq9querytoken2"
        spec = ServerSpec.http(
            "web",
            url,
            headers={"Authorization": "Bearer Zq9header3"},
            overrides=PolicyOverrides(connect_timeout_s=5),
        )
        async with RMCPSupervisor.open() as sup:
            with pytest.raises(RMCPNetworkError) as caught:
                await sup.add_server(spec)
    message = str(caught.value)
    assert f"alice:***@127.0.0.1:{port}/mcp?token=***" in message
    for secret in ("Zq9password1", "Zq9querytoken2", "Zq9header3"):
        assert secret not in message


async def test_masked_headers_and_arguments_still_reach_the_server(server: MCPServer, tmp_path: Path) -> None:
    token = "sk-Zq9abcdefghijklmnopqrstuv"
    state_dir = tmp_path / token
    state_dir.mkdir()
    async with serve_http(server) as http, RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.http("web", http.url, headers={"Authorization": f"Bearer {token}"}))
        assert (await sup.call("web", "header", {"name": "Authorization"})).text == f"Bearer {token}"
        spec = ServerSpec.stdio("local", PYTHON, stdio_args("--state-dir", str(state_dir)))
        await sup.add_server(spec)
        await sup.call("local", "record", {"label": "x"})
        assert token not in spec.describe()
        assert token not in repr(sup.statistics())
    assert any(state_dir.iterdir())


@given(
    values=st.lists(
        st.text(alphabet=string.ascii_letters + string.digits + "-_.:/@", min_size=4), min_size=1
    ),
    filler=st.lists(st.text(max_size=10), min_size=1),
)
def test_scrub_leaves_no_secret(values: list[str], filler: list[str]) -> None:
    text = "".join(f"{f}{v}" for f, v in zip(filler * len(values), values, strict=False))
    scrubbed = scrub(text, values)
    for value in values:
        assert value not in scrubbed


@pytest.mark.parametrize(
    ("secret", "quoted"),
    [
        ("Bearer Zq9token\n", "Illegal header value b'Bearer Zq9token\\n'"),  # h11, bytes repr
        ("Zq9token\t", "value 'Zq9token\\t' rejected"),  # a str repr
        ("  Zq9token\r\n", "sent Zq9token to the server"),  # only the stripped core
        ("Zq9tökenvalue", "b'Zq9t\\xc3\\xb6kenvalue'"),  # bytes repr of non-ASCII
    ],
)
def test_scrub_masks_the_escaped_forms_and_the_stripped_core(secret: str, quoted: str) -> None:
    scrubbed = scrub(f"error: {quoted}", [secret])
    assert "Zq9" not in scrubbed, scrubbed
    assert MASK in scrubbed


def test_url_masking_filter_masks_query_tokens_and_leaves_other_records_alone() -> None:
    url = httpx2.URL("http://127.0.0.1:8000/mcp?token=qs-s3cret&page=2")
    fmt = 'HTTP Request: %s %s "%s %d %s"'
    record = logging.LogRecord(
        "httpx2", logging.INFO, __file__, 1, fmt, ("POST", url, "HTTP/1.1", 200, "OK"), None
    )
    assert URLMaskingFilter().filter(record) is True
    assert (
        record.getMessage()
        == 'HTTP Request: POST http://127.0.0.1:8000/mcp?token=***&page=2 "HTTP/1.1 200 OK"'
    )
    args = ("GET", httpx2.URL("http://127.0.0.1:8000/mcp?page=2"), "HTTP/1.1", 200, "OK")
    plain = logging.LogRecord("httpx2", logging.INFO, __file__, 1, fmt, args, None)
    assert URLMaskingFilter().filter(plain) is True
    assert (plain.msg, plain.args) == (fmt, args)


def test_url_masking_filter_masks_a_logged_traceback_and_keeps_it_readable() -> None:
    url = "http://127.0.0.1:8000/mcp?token=qs-s3cret&page=2"
    try:
        raise RuntimeError(f"Client error '403 Forbidden' for url '{url}'")
    except RuntimeError:
        exc_info = sys.exc_info()
    record = logging.LogRecord("httpx2", logging.ERROR, __file__, 1, "GET stream error", (), exc_info)
    assert URLMaskingFilter().filter(record) is True
    printed = logging.Formatter().format(record)
    assert "qs-s3cret" not in printed
    assert "Traceback (most recent call last)" in printed
    assert (
        "RuntimeError: Client error '403 Forbidden' for url 'http://127.0.0.1:8000/mcp?token=***" in printed
    )
    # A traceback without a secret URL is left to the handler's own formatter.
    try:
        raise RuntimeError("plain")
    except RuntimeError:
        plain_info = sys.exc_info()
    plain = logging.LogRecord("httpx2", logging.ERROR, __file__, 1, "boom", (), plain_info)
    assert URLMaskingFilter().filter(plain) is True
    assert (plain.exc_info, plain.exc_text) == (plain_info, None)


async def test_a_query_token_never_reaches_a_log_record_through_a_logged_traceback(
    server: MCPServer, caplog: pytest.LogCaptureFixture
) -> None:
    # The SDK logs "GET stream error" with exc_info=True; httpx2's HTTPStatusError says
    # "... for url 'http://...?token=...'", and that traceback was printed unmasked by any handler.
    def forbid_get(app: Any) -> Any:
        async def wrapped(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] == "http" and scope["method"] == "GET":
                await send({"type": "http.response.start", "status": 403, "headers": []})
                await send({"type": "http.response.body", "body": b""})
                return
            await app(scope, receive, send)

        return wrapped

    caplog.set_level(logging.DEBUG)
    async with serve_http(server, wrap=forbid_get) as http, RMCPSupervisor.open() as sup:
        url = http.url + "?token=qs-s3cret&page=2"
        await sup.add_server(ServerSpec.http("web", url, protocol="legacy"))
        assert (await sup.call("web", "echo", {"text": "hi"})).text == "hi"
        with trio.fail_after(5):
            while not any(r.getMessage() == "GET stream error" for r in caplog.records):
                await trio.sleep(0.01)
    handler = logging.StreamHandler(io.StringIO())
    printed = [handler.format(record) for record in caplog.records]
    assert any("GET stream error" in line and "HTTPStatusError" in line for line in printed)
    assert not [line for line in printed if "qs-s3cret" in line]
