"""The wire structs of RMCP: decoding never crashes, encoding round-trips, fingerprints are canonical."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rmcp_actors._protocol import (
    InvalidMeta,
    RequestMeta,
    ServerSettings,
    decode_request_meta,
    decode_response_meta,
    decode_server_settings,
    encode_request_meta,
    fingerprint,
)

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=20,
)
FIELDS = st.sampled_from(
    ["version", "request_id", "idempotency_key", "attempt", "timeout_ms", "retry_count", "expect_ack", "x"]
)


@given(st.one_of(JSON, st.dictionaries(FIELDS, JSON)))
def test_any_json_as_request_meta_decodes_or_is_invalid(raw: Any) -> None:
    try:
        decoded = decode_request_meta({"rmcp": raw})
    except InvalidMeta:
        return
    assert isinstance(decoded, RequestMeta)
    assert decoded.attempt_number >= 1


@given(JSON)
def test_any_json_as_response_meta_or_settings_never_raises(raw: Any) -> None:
    decode_response_meta({"rmcp": raw})
    decode_server_settings(raw)


def test_absent_meta_is_none() -> None:
    assert decode_request_meta(None) is None
    assert decode_request_meta({"progressToken": 1}) is None


@given(
    st.text(min_size=1),
    st.one_of(st.none(), st.text(min_size=1)),
    st.integers(min_value=1, max_value=10**6),
)
def test_request_meta_round_trips(request_id: str, key: str | None, attempt: int) -> None:
    meta = RequestMeta(request_id=request_id, idempotency_key=key, attempt=attempt, timeout_ms=5)
    assert decode_request_meta(dict(encode_request_meta(meta))) == meta


def test_old_protocol_fields_give_the_attempt_and_the_key() -> None:
    old = decode_request_meta({"rmcp": {"request_id": "r", "retry_count": 2, "expect_ack": True}})
    assert old is not None
    assert (old.attempt_number, old.dedup_key) == (3, "r")
    unkeyed = decode_request_meta({"rmcp": {"request_id": "r"}})
    assert unkeyed is not None
    assert unkeyed.dedup_key is None


@pytest.mark.parametrize(
    "bad",
    [{"request_id": "r", "retry_count": -1}, {"request_id": "r", "attempt": True}, {"request_id": None}],
)
def test_out_of_range_or_mistyped_fields_are_invalid(bad: dict[str, Any]) -> None:
    with pytest.raises(InvalidMeta):
        decode_request_meta({"rmcp": bad})


@given(st.dictionaries(st.text(), JSON, max_size=6))
def test_fingerprint_ignores_key_order(arguments: dict[str, Any]) -> None:
    reordered = dict(reversed(list(arguments.items())))
    assert fingerprint("tool", arguments) == fingerprint("tool", reordered)


def test_fingerprint_tells_tools_and_arguments_apart() -> None:
    assert fingerprint("a", {"x": 1}) != fingerprint("b", {"x": 1})
    assert fingerprint("a", {"x": 1}) != fingerprint("a", {"x": 2})
    assert fingerprint("a", None) == fingerprint("a", {})


def test_settings_are_advertised_with_every_field() -> None:
    settings = ServerSettings(features=["dedup"], durable=True, instance_id="i", early_ack=False)
    decoded = decode_server_settings(
        {"version": "0.2", "features": ["dedup"], "durable": True, "instance_id": "i"}
    )
    assert decoded == settings
    assert settings.dedup


def test_a_nack_is_a_nack_however_its_numbers_are_written() -> None:
    written_by_javascript = {
        "rmcp": {
            "ack": False,
            "processed": False,
            "code": "overloaded",
            "retryable": True,
            "retry_after_ms": 100.0,
        }
    }
    nack = decode_response_meta(written_by_javascript)
    assert nack is not None
    assert (nack.ack, nack.code, nack.retryable, nack.retry_after_ms) == (False, "overloaded", True, 100)
    garbled = decode_response_meta({"rmcp": {"ack": False, "code": 7, "retry_after_ms": "soon"}})
    assert garbled is not None
    assert (garbled.ack, garbled.code, garbled.retryable) == (False, "unknown", False)
    assert decode_response_meta({"rmcp": {"ack": "maybe"}}) is None


def test_an_object_without_a_version_is_not_an_advertisement() -> None:
    assert decode_server_settings({}) is None
    assert decode_server_settings({"features": ["dedup"]}) is None
