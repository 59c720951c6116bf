"""Tests of rmcp_actors.config: loading, validation with key paths, and policy layering."""

from __future__ import annotations

import pathlib
import pickle
import re
import tomllib
from typing import Any, Generic, Never

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st
from mcp.client.streamable_http import DEFAULT_MAX_SSE_EVENT_SIZE

from rmcp_actors.config import (
    CallPolicy,
    PolicyOverrides,
    ReconnectOverrides,
    ReconnectPolicy,
    RetryOverrides,
    RetryPolicy,
    RMCPConfig,
    RuntimeSettings,
    ServerPolicy,
    ServerSpec,
    ToolOverrides,
)
from rmcp_actors.config._checks import int_at_least, number
from rmcp_actors.config._keys import V, policy_group, policy_key, policy_table, policy_variant, resolve
from rmcp_actors.config._load import Schema, load_tables
from rmcp_actors.config._policy import _EveryLevel, _ServerLevel, _ToolLevel
from rmcp_actors.errors import RMCPConfigError

EXAMPLE_TOML = """
[runtime]
max_queue = 10000          # pending calls in all (int > 0)
overflow = "wait"          # or "reject"
max_restarts = 5
restart_period_s = 30
max_concurrency = 1024

[defaults]
timeout_s = 60
connect_timeout_s = 10
max_concurrency = 16
retry = { max_attempts = 3, base_delay_s = 0.1, max_delay_s = 10 }
reconnect = { base_delay_s = 0.1, max_delay_s = 30 }
when_disconnected = "wait"
trust_annotations = true

[servers.time]
transport = "stdio"
protocol = "auto"
command = "python3"
args = ["-m", "mcp_server_time", "--local-timezone", "UTC"]
env = {}
cwd = "/tmp"
max_concurrency = 4

[servers.time.tools.get_current_time]
timeout_s = 5
retry = { max_attempts = 5 }
idempotent = true
"""


def write(tmp_path: pathlib.Path, text: str, name: str = "rmcp.toml") -> pathlib.Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def stdio_server(**extra: Any) -> dict[str, Any]:
    return {"transport": "stdio", "command": "python3", **extra}


def config_error(data: Any) -> RMCPConfigError:
    with pytest.raises(RMCPConfigError) as info:
        RMCPConfig.from_dict(data)
    return info.value


# ------------------------------------------------------------------------------------------
# The example file
# ------------------------------------------------------------------------------------------


def test_example_toml_loads(tmp_path: pathlib.Path) -> None:
    config = RMCPConfig.from_toml(write(tmp_path, EXAMPLE_TOML))

    assert config.runtime == RuntimeSettings(
        max_queue=10000, overflow="wait", max_restarts=5, restart_period_s=30.0, max_concurrency=1024
    )
    spec = config.servers["time"]
    assert spec.name == "time"
    assert spec.transport == "stdio"
    assert spec.protocol == "auto"
    assert spec.command == "python3"
    assert spec.args == ("-m", "mcp_server_time", "--local-timezone", "UTC")
    assert spec.env == {}
    assert spec.cwd == "/tmp"
    assert spec.overrides.max_concurrency == 4
    assert spec.describe() == "python3 -m mcp_server_time --local-timezone UTC"


def test_example_toml_resolves(tmp_path: pathlib.Path) -> None:
    config = RMCPConfig.from_toml(write(tmp_path, EXAMPLE_TOML))
    spec = config.servers["time"]

    assert config.call_policy(spec, "get_current_time") == CallPolicy(
        timeout_s=5.0,
        retry=RetryPolicy(max_attempts=5, base_delay_s=0.1, max_delay_s=10.0),
        idempotent=True,
        trust_annotations=True,
        max_concurrency=4,
    )
    assert config.call_policy(spec, "convert_time") == CallPolicy(
        timeout_s=60.0,
        retry=RetryPolicy(max_attempts=3, base_delay_s=0.1, max_delay_s=10.0),
        idempotent=None,
        trust_annotations=True,
        max_concurrency=4,
    )
    assert config.server_policy(spec) == ServerPolicy(
        timeout_s=60.0,
        connect_timeout_s=10.0,
        max_concurrency=4,
        retry=RetryPolicy(max_attempts=3),
        reconnect=ReconnectPolicy(),
        when_disconnected="wait",
        trust_annotations=True,
    )


def test_empty_config_has_builtin_defaults() -> None:
    config = RMCPConfig.from_dict({})
    assert config == RMCPConfig()
    assert config.runtime == RuntimeSettings()
    assert config.servers == {}
    spec = ServerSpec.stdio("s", "cmd")
    policy = config.server_policy(spec)
    assert (policy.timeout_s, policy.connect_timeout_s, policy.max_concurrency) == (60.0, 10.0, 16)
    assert policy.retry == RetryPolicy(max_attempts=None, base_delay_s=0.1, max_delay_s=10.0)
    assert policy.reconnect == ReconnectPolicy(base_delay_s=0.1, max_delay_s=30.0)
    assert policy.when_disconnected == "wait"
    assert policy.trust_annotations is True


def test_from_dict_equals_from_toml(tmp_path: pathlib.Path) -> None:
    from_file = RMCPConfig.from_toml(write(tmp_path, EXAMPLE_TOML))
    from_dict = RMCPConfig.from_dict(tomllib.loads(EXAMPLE_TOML))
    assert from_dict == from_file
    assert hash(from_dict) == hash(from_file)


def test_http_server_in_toml(tmp_path: pathlib.Path) -> None:
    text = """
    [servers.remote]
    transport = "http"
    url = "https://example.com/mcp"
    headers = { Authorization = "Bearer x" }
    protocol = "2025-11-25"
    when_disconnected = "fail"
    """
    config = RMCPConfig.from_toml(write(tmp_path, text))
    spec = config.servers["remote"]
    assert spec == ServerSpec.http(
        "remote",
        "https://example.com/mcp",
        headers={"Authorization": "Bearer x"},
        protocol="2025-11-25",
        overrides=PolicyOverrides(when_disconnected="fail"),
    )
    assert config.server_policy(spec).when_disconnected == "fail"
    assert spec.describe() == "https://example.com/mcp"


def test_max_sse_event_bytes_defaults_to_the_sdks_limit_and_loads_per_server(tmp_path: pathlib.Path) -> None:
    text = """
    [defaults]
    max_sse_event_bytes = 4_000_000
    [servers.remote]
    transport = "http"
    url = "https://example.com/mcp"
    max_sse_event_bytes = 8_000_000
    """
    config = RMCPConfig.from_toml(write(tmp_path, text))
    assert config.server_policy(config.servers["remote"]).max_sse_event_bytes == 8_000_000
    assert config.server_policy(ServerSpec.http("other", "https://x/")).max_sse_event_bytes == 4_000_000
    assert RMCPConfig().server_policy(ServerSpec.http("o", "https://x/")).max_sse_event_bytes == (
        DEFAULT_MAX_SSE_EVENT_SIZE
    )
    with pytest.raises(RMCPConfigError) as caught:
        RMCPConfig.from_dict(
            {"servers": {"r": {"transport": "http", "url": "https://x/", "max_sse_event_bytes": 0}}}
        )
    assert caught.value.path == "servers.r.max_sse_event_bytes"


# ------------------------------------------------------------------------------------------
# Layering
# ------------------------------------------------------------------------------------------


def test_partial_retry_in_defaults_keeps_builtin_rest() -> None:
    config = RMCPConfig.from_dict(
        {"defaults": {"retry": {"max_attempts": 7}}, "servers": {"a": stdio_server()}}
    )
    assert config.server_policy(config.servers["a"]).retry == RetryPolicy(
        max_attempts=7, base_delay_s=0.1, max_delay_s=10.0
    )


def test_partial_retry_at_each_level() -> None:
    config = RMCPConfig.from_dict(
        {
            "defaults": {"retry": {"max_attempts": 7, "max_delay_s": 20}},
            "servers": {
                "a": stdio_server(
                    retry={"base_delay_s": 0.5},
                    tools={"t": {"retry": {"max_delay_s": 4}}, "u": {"timeout_s": 2}},
                )
            },
        }
    )
    spec = config.servers["a"]
    assert config.server_policy(spec).retry == RetryPolicy(max_attempts=7, base_delay_s=0.5, max_delay_s=20.0)
    assert config.call_policy(spec, "t").retry == RetryPolicy(
        max_attempts=7, base_delay_s=0.5, max_delay_s=4.0
    )
    u = config.call_policy(spec, "u")
    assert u.retry == RetryPolicy(max_attempts=7, base_delay_s=0.5, max_delay_s=20.0)
    assert u.timeout_s == 2.0


def test_server_overrides_defaults_and_tool_overrides_server() -> None:
    config = RMCPConfig.from_dict(
        {
            "defaults": {"timeout_s": 30, "trust_annotations": False, "reconnect": {"max_delay_s": 5}},
            "servers": {
                "a": stdio_server(timeout_s=20, reconnect={"base_delay_s": 1}, tools={"t": {"timeout_s": 3}}),
                "b": stdio_server(),
            },
        }
    )
    a, b = config.servers["a"], config.servers["b"]
    assert config.server_policy(a).timeout_s == 20.0
    assert config.server_policy(a).reconnect == ReconnectPolicy(base_delay_s=1.0, max_delay_s=5.0)
    assert config.server_policy(b).timeout_s == 30.0
    assert config.call_policy(a, "t").timeout_s == 3.0
    assert config.call_policy(a, "other").timeout_s == 20.0
    assert config.call_policy(b, "t").timeout_s == 30.0
    assert config.call_policy(a, "t").trust_annotations is False


def test_layered_delays_conflict_is_rejected_with_path() -> None:
    error = config_error(
        {
            "defaults": {"retry": {"base_delay_s": 2}},
            "servers": {"a": stdio_server(tools={"t": {"retry": {"max_delay_s": 1}}})},
        }
    )
    assert error.path == "servers.a.tools.t.retry.max_delay_s"
    assert "base_delay_s" in str(error)


# ------------------------------------------------------------------------------------------
# Bad configs name the key
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "path", "words"),
    [
        pytest.param({"bogus": 1}, "bogus", "unknown key", id="unknown-top-level"),
        pytest.param({"runtime": {"max_queu": 1}}, "runtime.max_queu", "did you mean 'max_queue'", id="typo"),
        pytest.param(
            {"servers": {"time": stdio_server(bogus=1)}}, "servers.time.bogus", "unknown key", id="server"
        ),
        pytest.param(
            {"servers": {"time": stdio_server(tools={"t": {"bogus": 1}})}},
            "servers.time.tools.t.bogus",
            "unknown key",
            id="tool",
        ),
        pytest.param(
            {"servers": {"time": stdio_server(tools={"t": {"connect_timeout_s": 2}})}},
            "servers.time.tools.t.connect_timeout_s",
            "cannot be set per tool",
            id="connect-timeout-per-tool",
        ),
        pytest.param(
            {"servers": {"time": stdio_server(retry={"max_attempts": "3"})}},
            "servers.time.retry.max_attempts",
            "expected an integer",
            id="wrong-type-str",
        ),
        pytest.param(
            {"servers": {"time": stdio_server(retry={"max_attempts": 2.5})}},
            "servers.time.retry.max_attempts",
            "expected an integer",
            id="wrong-type-float",
        ),
        pytest.param(
            {"defaults": {"trust_annotations": "yes"}},
            "defaults.trust_annotations",
            "expected true or false",
            id="wrong-type-bool",
        ),
        pytest.param(
            {"runtime": {"max_queue": True}}, "runtime.max_queue", "expected an integer", id="bool-as-int"
        ),
        pytest.param(
            {"servers": {"time": stdio_server(retry={"max_attempts": -1})}},
            "servers.time.retry.max_attempts",
            "at least 0",
            id="negative-attempts",
        ),
        pytest.param(
            {"servers": {"time": stdio_server(timeout_s=-1)}},
            "servers.time.timeout_s",
            "greater than 0",
            id="negative-timeout",
        ),
        pytest.param({"runtime": {"max_queue": -5}}, "runtime.max_queue", "at least 1", id="negative-queue"),
        pytest.param(
            {"runtime": {"max_concurrency": 0}},
            "runtime.max_concurrency",
            "at least 1",
            id="zero-concurrency",
        ),
        pytest.param(
            {"defaults": {"reconnect": {"base_delay_s": -0.1}}},
            "defaults.reconnect.base_delay_s",
            "negative",
            id="negative-delay",
        ),
        pytest.param(
            {"servers": {"time": {"transport": "grpc", "command": "x"}}},
            "servers.time.transport",
            "unknown transport 'grpc'",
            id="unknown-transport",
        ),
        pytest.param(
            {"servers": {"time": {"transport": "memory"}}},
            "servers.time.transport",
            "ServerSpec.in_memory",
            id="memory-in-file",
        ),
        pytest.param(
            {"servers": {"time": {"command": "x"}}},
            "servers.time.transport",
            "missing",
            id="missing-transport",
        ),
        pytest.param(
            {"servers": {"web": {"transport": "http"}}},
            "servers.web.url",
            "needs a url",
            id="http-without-url",
        ),
        pytest.param(
            {"servers": {"web": {"transport": "http", "url": "ftp://example.com"}}},
            "servers.web.url",
            "http:// or https://",
            id="http-bad-url",
        ),
        pytest.param(
            {"servers": {"time": {"transport": "stdio"}}},
            "servers.time.command",
            "needs a command",
            id="stdio-without-command",
        ),
        pytest.param(
            {"servers": {"time": stdio_server(url="http://example.com")}},
            "servers.time.url",
            "only for the 'http' transport",
            id="url-on-stdio",
        ),
        pytest.param(
            {"runtime": {"overflow": "drop"}}, "runtime.overflow", "'wait' or 'reject'", id="bad-overflow"
        ),
        pytest.param(
            {"defaults": {"when_disconnected": "retry"}},
            "defaults.when_disconnected",
            "'wait' or 'fail'",
            id="bad-when-disconnected",
        ),
        pytest.param(
            {"servers": {"time": stdio_server(protocol="latest")}},
            "servers.time.protocol",
            "protocol version",
            id="bad-protocol-word",
        ),
        pytest.param(
            {"servers": {"time": stdio_server(protocol="2025-13-40")}},
            "servers.time.protocol",
            "protocol version",
            id="bad-protocol-date",
        ),
        pytest.param(
            {"servers": {"time": stdio_server(args="-m server")}},
            "servers.time.args",
            "list of strings",
            id="args-string",
        ),
        pytest.param(
            {"servers": {"time": stdio_server(env={"A": 1})}},
            "servers.time.env.A",
            "expected a string",
            id="env-value",
        ),
        pytest.param({"servers": {"time": 5}}, "servers.time", "table", id="server-not-table"),
        pytest.param({"runtime": []}, "runtime", "table", id="runtime-not-table"),
        pytest.param(
            {"servers": {"time": stdio_server(tools={"t": 5})}},
            "servers.time.tools.t",
            "table",
            id="tool-not-table",
        ),
        pytest.param(
            {"defaults": {"retry": {"base_delay_s": 5, "max_delay_s": 1}}},
            "defaults.retry.max_delay_s",
            "at least base_delay_s",
            id="max-below-base",
        ),
    ],
)
def test_bad_config_names_the_key(data: dict[str, Any], path: str, words: str) -> None:
    error = config_error(data)
    assert error.path == path
    assert str(error).startswith(f"{path}: ")
    assert words in str(error)


def test_several_problems_make_one_error() -> None:
    error = config_error({"runtime": {"max_queue": "x", "overflow": "drop"}, "bogus": 1})
    message = str(error)
    assert error.path in {"runtime.max_queue", "runtime.overflow", "bogus"}
    for key in ("runtime.max_queue", "runtime.overflow", "bogus"):
        assert key in message
    assert "2 more" in message


def test_top_level_must_be_a_mapping() -> None:
    error = config_error([1, 2])
    assert error.path == ""
    assert "mapping" in str(error)


@pytest.mark.parametrize(
    "text",
    [
        "[runtime]\nmax_queue = 0\n",
        "[servers.time]\ntransport = 'stdio'\ncommand = 'x'\nbogus = 1\n",
        "[servers.time]\ntransport = 'nope'\n",
    ],
)
def test_toml_errors_are_config_errors(tmp_path: pathlib.Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(RMCPConfigError) as info:
        RMCPConfig.from_toml(path)
    assert info.value.path
    assert str(path) in str(info.value)


def test_unknown_key_error_from_toml(tmp_path: pathlib.Path) -> None:
    text = EXAMPLE_TOML.replace("idempotent = true", "idempotent = true\nconnect_timeout_s = 2")
    with pytest.raises(RMCPConfigError) as info:
        RMCPConfig.from_toml(write(tmp_path, text))
    assert info.value.path == "servers.time.tools.get_current_time.connect_timeout_s"


def test_missing_file(tmp_path: pathlib.Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(RMCPConfigError, match="not found") as info:
        RMCPConfig.from_toml(missing)
    assert str(missing) in str(info.value)
    assert info.value.__cause__ is None


def test_toml_syntax_error(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "[runtime\nmax_queue = 1\n")
    with pytest.raises(RMCPConfigError, match="invalid TOML") as info:
        RMCPConfig.from_toml(path)
    assert str(path) in str(info.value)


def test_from_toml_accepts_str_path(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "[runtime]\noverflow = 'reject'\n")
    assert RMCPConfig.from_toml(str(path)).runtime.overflow == "reject"


# ------------------------------------------------------------------------------------------
# Python-constructed objects are validated too
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "path"),
    [
        (lambda: RetryPolicy(max_attempts=-1), "max_attempts"),
        (lambda: RetryPolicy(base_delay_s=-1), "base_delay_s"),
        (lambda: RetryPolicy(base_delay_s=5, max_delay_s=1), "max_delay_s"),
        (lambda: RetryOverrides(base_delay_s=5, max_delay_s=1), "max_delay_s"),
        (lambda: RetryOverrides(max_attempts="3"), "max_attempts"),  # type: ignore[arg-type]
        (lambda: ReconnectPolicy(base_delay_s=2, max_delay_s=1), "max_delay_s"),
        (lambda: ReconnectOverrides(max_delay_s=-1), "max_delay_s"),
        (lambda: RuntimeSettings(max_queue=0), "max_queue"),
        (lambda: RuntimeSettings(overflow="drop"), "overflow"),  # type: ignore[arg-type]
        (lambda: RuntimeSettings(restart_period_s=0), "restart_period_s"),
        (lambda: RuntimeSettings(max_restarts=-1), "max_restarts"),
        (lambda: PolicyOverrides(timeout_s=0), "timeout_s"),
        (lambda: PolicyOverrides(max_concurrency=0), "max_concurrency"),
        (lambda: PolicyOverrides(when_disconnected="later"), "when_disconnected"),  # type: ignore[arg-type]
        (lambda: PolicyOverrides(retry={"max_attempts": 2}), "retry"),  # type: ignore[arg-type]
        (lambda: ToolOverrides(timeout_s=-3), "timeout_s"),
        (lambda: ToolOverrides(idempotent="yes"), "idempotent"),  # type: ignore[arg-type]
        (lambda: ServerSpec.stdio("", "cmd"), "name"),
        (lambda: ServerSpec.stdio("s", ""), "command"),
        (lambda: ServerSpec.stdio("s", "cmd", "abc"), "args"),
        (lambda: ServerSpec.stdio("s", "cmd", protocol="v2"), "protocol"),
        (lambda: ServerSpec.http("s", "example.com/mcp"), "url"),
        (lambda: ServerSpec.in_memory("s", None), "server"),
        (lambda: ServerSpec.in_memory("s", object(), wire="tcp"), "wire"),  # type: ignore[arg-type]
        (lambda: ServerSpec(name="s", transport="ws", url="ws://x"), "transport"),  # type: ignore[arg-type]
        (lambda: ServerSpec(name="s", transport="http", url="http://x", command="c"), "command"),
        (lambda: ServerSpec.stdio("s", "cmd", tools={"t": {"timeout_s": 1}}), "tools.t"),  # type: ignore[dict-item]
        (lambda: RMCPConfig(servers={"a": ServerSpec.stdio("b", "cmd")}), "servers.a.name"),
        (
            lambda: RMCPConfig(
                defaults=PolicyOverrides(retry=RetryOverrides(base_delay_s=3)),
                servers={
                    "a": ServerSpec.stdio(
                        "a", "cmd", overrides=PolicyOverrides(retry=RetryOverrides(max_delay_s=2))
                    )
                },
            ),
            "servers.a.retry.max_delay_s",
        ),
    ],
)
def test_python_objects_are_validated(build: Any, path: str) -> None:
    with pytest.raises(RMCPConfigError) as info:
        build()
    assert info.value.path == path


def test_server_spec_factories() -> None:
    stdio = ServerSpec.stdio(
        "time",
        "python3",
        ["-m", "mcp_server_time"],
        env={"TZ": "UTC"},
        cwd=pathlib.Path("/tmp"),
        tools={"get_current_time": ToolOverrides(idempotent=True)},
    )
    assert stdio.transport == "stdio"
    assert stdio.args == ("-m", "mcp_server_time")
    assert stdio.cwd == "/tmp"
    assert stdio.env == {"TZ": "UTC"}
    assert stdio.protocol == "auto"
    assert stdio.describe() == "python3 -m mcp_server_time"
    assert stdio.tools["get_current_time"].idempotent is True

    http = ServerSpec.http("web", "http://localhost:8000/mcp", protocol="legacy")
    assert (http.transport, http.url, http.protocol, http.headers) == (
        "http",
        "http://localhost:8000/mcp",
        "legacy",
        None,
    )
    assert http.describe() == "http://localhost:8000/mcp"

    server = object()
    memory = ServerSpec.in_memory("mem", server, wire="direct", protocol="2026-07-28")
    assert (memory.transport, memory.server, memory.wire, memory.protocol) == (
        "memory",
        server,
        "direct",
        "2026-07-28",
    )
    assert memory.describe() == "in-memory server mem"
    assert memory == ServerSpec.in_memory("mem", server, wire="direct", protocol="2026-07-28")
    assert memory != ServerSpec.in_memory("mem", object(), wire="direct", protocol="2026-07-28")


def test_describe_quotes_arguments() -> None:
    spec = ServerSpec.stdio("s", "my tool", ["a b", "c"])
    assert spec.describe() == "'my tool' 'a b' c"


def test_mappings_are_frozen_copies() -> None:
    env = {"A": "1"}
    tools = {"t": ToolOverrides(timeout_s=1)}
    spec = ServerSpec.stdio("s", "cmd", env=env, tools=tools)
    env["A"] = "2"
    tools["u"] = ToolOverrides()
    assert spec.env == {"A": "1"}
    assert set(spec.tools) == {"t"}
    with pytest.raises(TypeError):
        spec.env["B"] = "x"  # type: ignore[index]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        spec.command = "other"  # type: ignore[misc]
    config = RMCPConfig(servers={"s": spec})
    with pytest.raises(TypeError):
        config.servers["x"] = spec  # type: ignore[index]
    assert hash(spec) == hash(
        ServerSpec.stdio("s", "cmd", env={"A": "1"}, tools={"t": ToolOverrides(timeout_s=1)})
    )


def test_call_policy_for_server_outside_config() -> None:
    config = RMCPConfig(defaults=PolicyOverrides(timeout_s=9))
    spec = ServerSpec.in_memory(
        "mem", object(), tools={"t": ToolOverrides(retry=RetryOverrides(max_attempts=1))}
    )
    policy = config.call_policy(spec, "t")
    assert policy.timeout_s == 9
    assert policy.retry.max_attempts == 1


# ------------------------------------------------------------------------------------------
# Property: resolution takes the most specific non-None value
# ------------------------------------------------------------------------------------------

maybe_timeout = st.none() | st.floats(min_value=0.01, max_value=1000)
maybe_attempts = st.none() | st.integers(min_value=1, max_value=20)
# base delays all sit below every max delay, so any layering is valid.
maybe_base = st.none() | st.floats(min_value=0, max_value=1)
maybe_max = st.none() | st.floats(min_value=1, max_value=100)
maybe_bool = st.none() | st.booleans()

retry_layers = st.builds(
    RetryOverrides, max_attempts=maybe_attempts, base_delay_s=maybe_base, max_delay_s=maybe_max
)
policy_layers = st.builds(
    PolicyOverrides,
    timeout_s=maybe_timeout,
    connect_timeout_s=maybe_timeout,
    max_concurrency=st.none() | st.integers(min_value=1, max_value=100),
    retry=retry_layers,
    reconnect=st.builds(ReconnectOverrides, base_delay_s=maybe_base, max_delay_s=maybe_max),
    when_disconnected=st.none() | st.sampled_from(["wait", "fail"]),
    trust_annotations=maybe_bool,
)
tool_layers = st.builds(ToolOverrides, timeout_s=maybe_timeout, retry=retry_layers, idempotent=maybe_bool)


def most_specific(builtin: Any, *layers: Any) -> Any:
    for value in reversed(layers):
        if value is not None:
            return value
    return builtin


@given(defaults=policy_layers, server=policy_layers, tool=tool_layers)
def test_resolution_takes_most_specific_value(
    defaults: PolicyOverrides, server: PolicyOverrides, tool: ToolOverrides
) -> None:
    spec = ServerSpec.stdio("s", "cmd", overrides=server, tools={"t": tool})
    config = RMCPConfig(defaults=defaults, servers={"s": spec})
    resolved = config.server_policy(spec)
    builtin = ServerPolicy(
        timeout_s=60.0,
        connect_timeout_s=10.0,
        max_concurrency=16,
        retry=RetryPolicy(),
        reconnect=ReconnectPolicy(),
        when_disconnected="wait",
        trust_annotations=True,
    )
    for name in (
        "timeout_s",
        "connect_timeout_s",
        "max_concurrency",
        "when_disconnected",
        "trust_annotations",
    ):
        assert getattr(resolved, name) == most_specific(
            getattr(builtin, name), getattr(defaults, name), getattr(server, name)
        )
    for name in ("base_delay_s", "max_delay_s"):
        assert getattr(resolved.reconnect, name) == most_specific(
            getattr(builtin.reconnect, name),
            getattr(defaults.reconnect, name),
            getattr(server.reconnect, name),
        )

    call = config.call_policy(spec, "t")
    assert call.timeout_s == most_specific(
        builtin.timeout_s, defaults.timeout_s, server.timeout_s, tool.timeout_s
    )
    for name in ("max_attempts", "base_delay_s", "max_delay_s"):
        expected = most_specific(
            getattr(builtin.retry, name),
            getattr(defaults.retry, name),
            getattr(server.retry, name),
            getattr(tool.retry, name),
        )
        assert getattr(call.retry, name) == expected
        assert getattr(resolved.retry, name) == most_specific(
            getattr(builtin.retry, name), getattr(defaults.retry, name), getattr(server.retry, name)
        )
    assert call.idempotent == tool.idempotent
    assert call.trust_annotations == resolved.trust_annotations


@given(defaults=policy_layers, server=policy_layers, tool=tool_layers)
def test_python_and_dict_configs_agree(
    defaults: PolicyOverrides, server: PolicyOverrides, tool: ToolOverrides
) -> None:
    def table(obj: Any) -> dict[str, Any]:
        return attrs.asdict(obj, filter=lambda _a, v: v is not None and v != {})

    data = {
        "defaults": table(defaults),
        "servers": {
            "s": {"transport": "stdio", "command": "cmd", **table(server), "tools": {"t": table(tool)}}
        },
    }
    spec = ServerSpec.stdio("s", "cmd", overrides=server, tools={"t": tool})
    assert RMCPConfig.from_dict(data) == RMCPConfig(defaults=defaults, servers={"s": spec})


# ------------------------------------------------------------------------------------------
# Property: whatever the input, the loader returns a config or raises RMCPConfigError
# ------------------------------------------------------------------------------------------

KEY_NAMES = sorted(
    {
        f.name
        for cls in (RMCPConfig, RuntimeSettings, PolicyOverrides, RetryOverrides, ToolOverrides)
        for f in attrs.fields(cls)
    }
    | {
        "transport",
        "command",
        "args",
        "env",
        "cwd",
        "url",
        "headers",
        "protocol",
        "tools",
        "time",
        "t",
        "bogus",
    }
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-5, max_value=5)
    | st.floats(allow_nan=True)
    | st.sampled_from(
        ["stdio", "http", "memory", "wait", "reject", "fail", "auto", "2025-11-25", "http://x", ""]
    )
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(KEY_NAMES) | st.integers(0, 2), inner, max_size=4)
    ),
    max_leaves=12,
)


@given(data=st.dictionaries(st.sampled_from(KEY_NAMES), values, max_size=4))
def test_loader_only_raises_config_errors(data: dict[str, Any]) -> None:
    error: RMCPConfigError | None = None
    try:
        RMCPConfig.from_dict(data)
    except RMCPConfigError as exc:
        error = exc
    if error is not None:
        assert str(error)


@given(
    data=st.fixed_dictionaries(
        {
            "servers": st.dictionaries(
                st.sampled_from(["time", "web"]),
                st.dictionaries(st.sampled_from(KEY_NAMES), values, max_size=5),
            )
        }
    )
)
def test_loader_only_raises_config_errors_for_servers(data: dict[str, Any]) -> None:
    error: RMCPConfigError | None = None
    try:
        RMCPConfig.from_dict(data)
    except RMCPConfigError as exc:
        error = exc
    if error is not None:
        assert error.path.startswith("servers.")


# ------------------------------------------------------------------------------------------
# Regressions: keys that the hand-written tables used to miss, paths of odd keys
# ------------------------------------------------------------------------------------------


def test_per_server_ack_timeout_loads_from_toml(tmp_path: pathlib.Path) -> None:
    text = EXAMPLE_TOML.replace("max_concurrency = 4", "max_concurrency = 4\nack_timeout_s = 2.5")
    config = RMCPConfig.from_toml(write(tmp_path, text))
    spec = config.servers["time"]
    assert spec.overrides.ack_timeout_s == 2.5
    assert config.server_policy(spec).ack_timeout_s == 2.5
    assert config.call_policy(spec, "convert_time").ack_timeout_s == 2.5


@pytest.mark.parametrize(
    ("data", "path"),
    [
        pytest.param({"": 1}, '""', id="top-level"),
        pytest.param({"runtime": {"": 1}}, 'runtime.""', id="runtime"),
        pytest.param({"servers": {"time": stdio_server(**{"": 1})}}, 'servers.time.""', id="server"),
        pytest.param({"servers": {"a b": stdio_server(bogus=1)}}, 'servers."a b".bogus', id="quoted-name"),
        pytest.param(
            {"servers": {"a.b": stdio_server(tools={"t": {"connect_timeout_s": 1}})}},
            'servers."a.b".tools.t.connect_timeout_s',
            id="dotted-name",
        ),
    ],
)
def test_odd_keys_have_toml_paths(data: dict[str, Any], path: str) -> None:
    error = config_error(data)
    assert error.path == path
    assert str(error).startswith(f"{path}: ")


@pytest.mark.parametrize(
    ("data", "path", "words"),
    [
        pytest.param(
            {"servers": {"a": stdio_server(idempotent=True)}},
            "servers.a.idempotent",
            "cannot be set on the server, set it per tool",
            id="tool-key-on-server",
        ),
        pytest.param(
            {"defaults": {"idempotent": True}},
            "defaults.idempotent",
            "cannot be set in [defaults], set it per tool",
            id="tool-key-in-defaults",
        ),
    ],
)
def test_misplaced_key_says_where_it_belongs(data: dict[str, Any], path: str, words: str) -> None:
    error = config_error(data)
    assert error.path == path
    assert words in str(error)


def test_every_key_records_its_tables() -> None:
    def tables(cls: Any) -> dict[str, set[str]]:
        return {f.name: set(f.metadata["rmcp_actors.policy_key"].tables) for f in attrs.fields(cls)}

    assert tables(PolicyOverrides)["max_concurrency"] == {"defaults", "server"}
    assert tables(ToolOverrides)["timeout_s"] == {"defaults", "server", "tool"}
    assert tables(CallPolicy)["idempotent"] == {"tool"}


# ------------------------------------------------------------------------------------------
# Adding a key is one line: a group with one more key, through the same machinery
# ------------------------------------------------------------------------------------------


@policy_group()
@attrs.frozen(slots=False)
class _QuotaKeys(Generic[V]):
    rate: float | V = policy_key(50.0, number(positive=True), "Calls per second.")
    burst: int | V = policy_key(50, int_at_least(1), "Calls allowed at once.")


@policy_variant
class QuotaPolicy(_QuotaKeys[Never]):
    """A resolved token bucket."""


@policy_variant
class QuotaOverrides(_QuotaKeys[None]):
    """A partial token bucket."""


@policy_group("defaults", "server", "tool")
@attrs.frozen(slots=False)
class _EveryLevelPlus(_EveryLevel[V]):
    # The additions: a nested table and a scalar, one line each.
    quota: _QuotaKeys[V] = policy_table(_QuotaKeys, "Token bucket of the calls.")
    hedge_after_s: float | V = policy_key(1.5, number(positive=True), "Delay before a hedged attempt.")


@policy_variant
class _PlusOverrides(_EveryLevelPlus[None], _ServerLevel[None]):
    """[defaults] and server layers with the new keys."""


@policy_variant
class _PlusToolOverrides(_EveryLevelPlus[None], _ToolLevel[None]):
    """Tool layers with the new keys."""


@policy_variant
class _PlusServerPolicy(_EveryLevelPlus[Never], _ServerLevel[Never]):
    """Resolved server policy with the new keys."""


@policy_variant
class _PlusCallPolicy(_EveryLevelPlus[Never], _ToolLevel[Never]):
    """Resolved call policy with the new keys."""


PLUS = Schema(_PlusOverrides, _PlusToolOverrides, _PlusServerPolicy, _PlusCallPolicy)


def test_a_new_key_loads_from_every_table_and_layers() -> None:
    data = {
        "defaults": {"quota": {"rate": 10}, "hedge_after_s": 3},
        "servers": {
            "a": stdio_server(quota={"burst": 5}, tools={"t": {"quota": {"rate": 2}, "hedge_after_s": 0.5}}),
            "b": stdio_server(),
        },
    }
    tables = load_tables(data, PLUS)
    a, b = tables.servers["a"], tables.servers["b"]

    def call(server: Any, tool: str) -> _PlusCallPolicy:
        layers = [tables.defaults, server.overrides, *([server.tools[tool]] if tool in server.tools else [])]
        return resolve(_PlusCallPolicy, layers, f"servers.x.tools.{tool}")

    assert call(a, "t").quota == QuotaPolicy(rate=2.0, burst=5)
    assert call(a, "t").hedge_after_s == 0.5
    assert call(a, "other").quota == QuotaPolicy(rate=10.0, burst=5)
    assert call(b, "t").quota == QuotaPolicy(rate=10.0, burst=50)
    assert call(b, "t").hedge_after_s == 3.0
    server = resolve(_PlusServerPolicy, [tables.defaults, a.overrides], "servers.a")
    assert (server.quota, server.max_concurrency) == (QuotaPolicy(rate=10.0, burst=5), 16)
    assert resolve(_PlusServerPolicy, [], "") == _PlusServerPolicy()
    assert _PlusServerPolicy().quota == QuotaPolicy(rate=50.0, burst=50)
    assert _PlusOverrides().quota == QuotaOverrides()
    assert "quota: Token bucket of the calls." in (_PlusToolOverrides.__doc__ or "")


@pytest.mark.parametrize(
    ("data", "path", "words"),
    [
        pytest.param({"defaults": {"quota": {"rate": 0}}}, "defaults.quota.rate", "greater than 0"),
        pytest.param(
            {"servers": {"a": stdio_server(quota={"burst": "x"})}},
            "servers.a.quota.burst",
            "expected an integer",
        ),
        pytest.param(
            {"servers": {"a": stdio_server(tools={"t": {"quota": {"bogus": 1}}})}},
            "servers.a.tools.t.quota.bogus",
            "allowed keys here: rate, burst",
        ),
        pytest.param(
            {"servers": {"a": stdio_server(tools={"t": {"quoat": {}}})}},
            "servers.a.tools.t.quoat",
            "did you mean 'quota'",
        ),
        pytest.param(
            {"servers": {"a": stdio_server(hedge_after_s=-1)}},
            "servers.a.hedge_after_s",
            "greater than 0",
        ),
    ],
)
def test_a_new_key_has_error_paths(data: dict[str, Any], path: str, words: str) -> None:
    with pytest.raises(RMCPConfigError) as info:
        load_tables(data, PLUS)
    assert info.value.path == path
    assert words in str(info.value)


def test_public_policies_do_not_see_the_test_keys() -> None:
    assert "quota" not in attrs.fields_dict(PolicyOverrides)
    assert "quota" not in attrs.fields_dict(CallPolicy)


def test_a_key_declared_twice_is_refused() -> None:
    @policy_group("tool")
    @attrs.frozen(slots=False)
    class _Twice(Generic[V]):
        timeout_s: float | V = policy_key(1.0, number(positive=True), "Again.")

    with pytest.raises(TypeError, match="'timeout_s' is declared twice"):

        @policy_variant
        class _Clash(_EveryLevel[None], _Twice[None]):
            """Two groups declaring one key."""


def test_a_group_must_say_its_tables() -> None:
    @attrs.frozen(slots=False)
    class _Unmarked(Generic[V]):
        extra: float | V = policy_key(1.0, number(positive=True), "Extra.")

    with pytest.raises(TypeError, match="not marked with @policy_group"):

        @policy_variant
        class _Bad(_Unmarked[None]):
            """A group without tables."""


def test_config_and_policies_pickle(tmp_path: pathlib.Path) -> None:
    config = RMCPConfig.from_toml(write(tmp_path, EXAMPLE_TOML))
    spec = config.servers["time"]
    assert pickle.loads(pickle.dumps(config)) == config
    for policy in (config.server_policy(spec), config.call_policy(spec, "get_current_time")):
        assert pickle.loads(pickle.dumps(policy)) == policy


# ------------------------------------------------------------------------------------------
# Flow-control keys (issue 8): every table, layered; tenants; runtime watchdog settings
# ------------------------------------------------------------------------------------------


def test_flow_keys_load_from_every_table_and_layer() -> None:
    config = RMCPConfig.from_dict(
        {
            "runtime": {"stall_s": 12, "restart_hung": False, "priority_aging_s": 2},
            "tenants": {"interactive": 10, "batch": 0.5},
            "defaults": {"rate_limit": {"rate": 50}, "circuit_breaker": {"failure_threshold": 3}},
            "servers": {
                "s": stdio_server(
                    retry_budget={"ratio": 0.1},
                    hedge={"delay": "p95"},
                    tools={
                        "t": {
                            "rate_limit": {
                                "burst": 5,
                                "error_patterns": ["rate limit", r"retry in (?P<seconds>\d+)"],
                            },
                            "circuit_breaker": {"mode": "metrics_only", "probe": "ping"},
                            "max_concurrency": 2,
                            "retry": {"max_attempts": 0},
                        }
                    },
                )
            },
        }
    )
    spec = config.servers["s"]
    tool = config.call_policy(spec, "t")
    other = config.call_policy(spec, "other")
    server = config.server_policy(spec)
    assert config.runtime.stall_s == 12.0
    assert config.runtime.restart_hung is False
    assert config.tenants == {"interactive": 10.0, "batch": 0.5}
    assert (tool.rate_limit.rate, tool.rate_limit.burst) == (50.0, 5)
    assert tool.rate_limit.error_patterns == ("rate limit", r"retry in (?P<seconds>\d+)")
    assert (other.rate_limit.rate, other.rate_limit.burst) == (50.0, None)
    assert tool.circuit_breaker.failure_threshold == 3
    assert tool.circuit_breaker.mode == "metrics_only"
    assert server.circuit_breaker.mode == "enabled"
    assert server.retry_budget.ratio == 0.1
    assert tool.retry_budget.min_per_s == 3.0
    assert tool.hedge.delay == "p95"
    assert server.hedge.delay_s is None
    assert (tool.max_concurrency, tool.retry.max_attempts, other.retry.max_attempts) == (2, 0, None)


@pytest.mark.parametrize(
    ("data", "path", "words"),
    [
        pytest.param({"tenants": {"a": 0}}, "tenants.a", "greater than 0", id="zero-weight"),
        pytest.param({"tenants": {"a": "x"}}, "tenants.a", "expected a number", id="str-weight"),
        pytest.param(
            {"defaults": {"rate_limit": {"error_patterns": ["("]}}},
            "defaults.rate_limit.error_patterns.0",
            "not a valid regular expression",
            id="bad-regex",
        ),
        pytest.param(
            {"defaults": {"rate_limit": {"decrease": 1}}},
            "defaults.rate_limit.decrease",
            "below 1",
            id="decrease",
        ),
        pytest.param(
            {"defaults": {"circuit_breaker": {"mode": "on"}}},
            "defaults.circuit_breaker.mode",
            "one of",
            id="mode",
        ),
        pytest.param(
            {"defaults": {"circuit_breaker": {"open_s": 60, "max_open_s": 30}}},
            "defaults.circuit_breaker.max_open_s",
            "at least open_s",
            id="max-open",
        ),
        pytest.param(
            {"defaults": {"hedge": {"delay": "95%"}}}, "defaults.hedge.delay", "percentile", id="pct"
        ),
        pytest.param({"runtime": {"stall_s": 0}}, "runtime.stall_s", "greater than 0", id="stall"),
    ],
)
def test_flow_keys_have_error_paths(data: dict[str, Any], path: str, words: str) -> None:
    error = config_error(data)
    assert error.path == path
    assert words in str(error)


def test_the_readme_configuration_loads() -> None:
    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    [block] = re.findall(r"```toml\n(.*?)```", readme, re.S)
    config = RMCPConfig.from_dict(tomllib.loads(block))
    spec = config.servers["time"]
    assert config.tenants == {"interactive": 10.0, "batch": 1.0}
    assert config.transactions.journal == "transactions.sqlite"
    assert config.transactions.recover_on_open
    assert config.call_policy(spec, "get_current_time").max_concurrency == 2
    assert config.server_policy(spec).circuit_breaker.failure_threshold == 5
