"""The server side's cheap proof that the SDK accepts a ``tools/call`` (``_params``) against
the SDK's own validation: it must never accept what the SDK refuses, and it must accept the
calls real clients send (or it buys nothing)."""

from __future__ import annotations

import random
from typing import Any

import mcp
import pytest
from mcp.server.mcpserver import MCPServer
from mcp_types.methods import validate_client_request
from mcp_types.version import KNOWN_PROTOCOL_VERSIONS
from pydantic import ValidationError

from rmcp_actors.server import _params, install
from rmcp_actors.server._params import surely_accepted

MODERN = "2026-07-28"
CAPABILITIES = "io.modelcontextprotocol/clientCapabilities"
INFO = "io.modelcontextprotocol/clientInfo"
VERSION = "io.modelcontextprotocol/protocolVersion"
LOG_LEVEL = "io.modelcontextprotocol/logLevel"
ABSENT = object()

NAMES: list[Any] = ["echo", "", 5, None, True, b"echo", ["echo"], 1.5]
ARGUMENTS: list[Any] = [ABSENT, None, {}, {"text": "ok"}, {1: "a"}, [], "x", {"a": {"b": [1, None]}}, 3]
TOKENS: list[Any] = [ABSENT, "t", 1, 0, True, 1.5, None, [], {}, -3, 2**70]
CAPABILITY_VALUES: list[Any] = [
    ABSENT,
    {},
    {"sampling": {}},
    {"sampling": 5},
    None,
    [],
    {"roots": {"listChanged": True}},
    {"roots": {"listChanged": 1}},
    {"roots": {"listChanged": "yes"}},
    {"roots": {"listChanged": 2}},
    {"roots": {"listChanged": 1.0}},
    {"experimental": {"x": {"y": float("nan")}}},
    {"experimental": {"x": 5}},
    {"experimental": {"x": {"y": (1, 2)}}},
    {"elicitation": {"form": {}}},
    {"elicitation": "form"},
    {"extensions": {"io.modelcontextprotocol/tasks": {}}},
]
INFO_VALUES: list[Any] = [
    ABSENT,
    None,
    {"name": "a", "version": "1"},
    {"name": "a"},
    {"name": 1, "version": "1"},
    {"name": "a", "version": "1", "websiteUrl": 5},
    {"name": "a", "version": "1", "website_url": 5},
    {"name": "a", "version": 1},
    {"name": "a", "version": True},
    "mcp",
]
VERSION_VALUES: list[Any] = [ABSENT, MODERN, 5, None, ""]
LOG_LEVELS: list[Any] = [ABSENT, "info", "loud", None, 3]
EXTRAS: list[Any] = [
    {},
    {"task": {"ttl": 5}},
    {"task": {"ttl": "x"}},
    {"task": None},
    {"requestState": 5},
    {"requestState": "s"},
    {"inputResponses": {}},
    {"inputResponses": 5},
    {"foo": 1},
    {7: 1},
    {"meta": 5},
]


def pick(rng: random.Random, values: list[Any]) -> Any:
    return rng.choice(values)


def put(target: dict[Any, Any], key: Any, value: Any) -> None:
    if value is not ABSENT:
        target[key] = value


def random_params(rng: random.Random) -> dict[Any, Any]:
    params: dict[Any, Any] = {}
    if rng.random() < 0.95:
        put(params, "name", pick(rng, NAMES))
    put(params, "arguments", pick(rng, ARGUMENTS))
    shape = rng.random()
    if shape < 0.1:
        params["_meta"] = rng.choice([None, 5, [], "x"])
    elif shape < 0.95:
        meta: dict[Any, Any] = {"rmcp": {"version": "0.2", "request_id": "r"}}
        put(meta, "progressToken", pick(rng, TOKENS))
        put(meta, CAPABILITIES, pick(rng, CAPABILITY_VALUES))
        put(meta, INFO, pick(rng, INFO_VALUES))
        put(meta, VERSION, pick(rng, VERSION_VALUES))
        put(meta, LOG_LEVEL, pick(rng, LOG_LEVELS))
        if rng.random() < 0.05:
            meta[3] = "x"
        params["_meta"] = meta
    params.update(pick(rng, EXTRAS))
    return params


def sdk_accepts(version: str, params: dict[Any, Any]) -> bool:
    try:
        validate_client_request("tools/call", version, params)
    except ValidationError:
        return False
    return True


@pytest.mark.parametrize("version", KNOWN_PROTOCOL_VERSIONS)
def test_the_shortcut_never_accepts_what_the_sdk_refuses(version: str) -> None:
    rng = random.Random(f"rmcp-params-{version}")
    shortcut = accepted = 0
    for _ in range(4000):
        params = random_params(rng)
        # Twice: the second look may answer from what the first remembered.
        for _ in range(2):
            surely = surely_accepted(version, params)
            if surely:
                assert sdk_accepts(version, params), params
                shortcut += 1
        accepted += sdk_accepts(version, params)
    # It proves a good share of what the SDK accepts, not only the trivial cases.
    assert shortcut >= accepted // 2 > 0


@pytest.mark.parametrize("version", KNOWN_PROTOCOL_VERSIONS)
def test_the_calls_clients_send_take_the_shortcut(version: str) -> None:
    meta: dict[str, Any] = {"rmcp": {"version": "0.2", "request_id": "r"}, "progressToken": 3}
    if version == MODERN:
        meta |= {VERSION: MODERN, INFO: {"name": "mcp", "version": "0.1.0"}, CAPABILITIES: {}}
    params = {"_meta": meta, "name": "echo", "arguments": {"text": "ok"}}
    assert sdk_accepts(version, params)
    assert surely_accepted(version, params)


def test_a_remembered_part_is_told_apart_from_one_equal_in_python() -> None:
    """``True == 1`` in Python, and a remembered value is looked up by its JSON encoding."""
    base = {"name": "echo", "_meta": {VERSION: MODERN, CAPABILITIES: {}}}
    good = {**base, "_meta": {**base["_meta"], INFO: {"name": "a", "version": "1"}}}
    bad = {**base, "_meta": {**base["_meta"], INFO: {"name": "a", "version": 1}}}
    assert surely_accepted(MODERN, good)
    assert not surely_accepted(MODERN, bad)
    assert not sdk_accepts(MODERN, bad)


def test_remembered_parts_are_bounded() -> None:
    for index in range(3 * _params._MAX_REMEMBERED):  # pyright: ignore[reportPrivateUsage]
        info = {"name": f"client-{index}", "version": "1"}
        assert surely_accepted(
            MODERN, {"name": "echo", "_meta": {VERSION: MODERN, CAPABILITIES: {}, INFO: info}}
        )
    assert len(_params._remembered) <= _params._MAX_REMEMBERED  # pyright: ignore[reportPrivateUsage]


async def send_raw(client: mcp.Client, params: dict[str, Any]) -> Any:
    """A ``tools/call`` as a wire dict, stamped as the client stamps its own requests."""
    session = client.session
    data: dict[str, Any] = {"method": "tools/call", "params": params}
    options: Any = {}
    session._stamp(data, options)  # pyright: ignore[reportPrivateUsage]
    return await session._dispatcher.send_raw_request("tools/call", data["params"], options)  # pyright: ignore[reportPrivateUsage]


async def test_a_call_the_sdk_refuses_is_refused_as_before_and_claims_nothing() -> None:
    """A keyed call whose params the SDK refuses (arguments not an object) gets the SDK's own
    INVALID_PARAMS, and its key stays free: the shortcut said "ask the SDK", which refused."""
    app = MCPServer("t")
    runs: list[str] = []

    @app.tool()
    async def echo(text: str) -> str:
        runs.append(text)
        return text

    install(app)
    meta: Any = {"rmcp": {"version": "0.2", "request_id": "r", "attempt": 1, "idempotency_key": "k"}}
    async with mcp.Client(app) as client:
        with pytest.raises(mcp.MCPError) as refused:
            await send_raw(client, {"name": "echo", "arguments": ["ok"], "_meta": meta})
        assert refused.value.error.code == -32602
        result = await client.call_tool("echo", {"text": "ok"}, meta=meta)
    assert result.meta is not None
    assert result.meta["rmcp"]["ack"] is True
    assert result.meta["rmcp"]["duplicate"] is False
    assert runs == ["ok"]
