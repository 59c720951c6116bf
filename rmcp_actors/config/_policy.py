# pyright: strict
"""Policy keys, each declared once, and the policy classes built from them.

To add a key, add one line to the group whose tables it may be written in:

- :class:`_EveryLevel`: ``[defaults]``, a server and a tool (resolved into both policies);
- :class:`_ServerLevel`: ``[defaults]`` and a server (resolved into :class:`ServerPolicy`);
- :class:`_ToolLevel`: a tool only (resolved into :class:`CallPolicy`).

A scalar key is ``name: T | V = policy_key(built_in_default, validator)`` (write ``T | None``
when "unset" is itself a resolved value, as for ``ack_timeout_s``). A nested table is
``name: _Group[V] = policy_table(_Group)`` over a group of its own keys with a resolved and an
overrides variant (see ``retry``). The loader, layering, hints and error paths follow.
"""

from __future__ import annotations

from typing import Generic, Literal, Never

import attrs

from ..errors import RMCPConfigError
from ._checks import boolean, int_at_least, is_number, number, one_of
from ._keys import V, policy_group, policy_key, policy_table, policy_variant

__all__ = [
    "CallPolicy",
    "Overflow",
    "PolicyOverrides",
    "ReconnectOverrides",
    "ReconnectPolicy",
    "RetryOverrides",
    "RetryPolicy",
    "RuntimeSettings",
    "ServerPolicy",
    "ToolOverrides",
    "WhenDisconnected",
]

Overflow = Literal["wait", "reject"]
WhenDisconnected = Literal["wait", "fail"]


def _check_delays(base: object, maximum: object) -> None:
    if is_number(base) and is_number(maximum) and maximum < base:
        raise RMCPConfigError(f"must be at least base_delay_s ({base}), got {maximum}", path="max_delay_s")


# --------------------------------------------------------------------------------------------
# Nested tables
# --------------------------------------------------------------------------------------------


@policy_group()
@attrs.frozen(slots=False)  # a variant derives from several groups
class _RetryKeys(Generic[V]):
    max_attempts: int | V = policy_key(
        3, int_at_least(1), "Attempts in all, including the first (at least 1)."
    )
    base_delay_s: float | V = policy_key(
        0.1, number(positive=False), "Delay before the first retry; doubles with each retry (not negative)."
    )
    max_delay_s: float | V = policy_key(
        10.0, number(positive=False), "Upper bound of the delay between attempts (at least base_delay_s)."
    )

    def __attrs_post_init__(self) -> None:
        _check_delays(self.base_delay_s, self.max_delay_s)


@policy_variant
class RetryPolicy(_RetryKeys[Never]):
    """How a failed call is retried (fully resolved)."""


@policy_variant
class RetryOverrides(_RetryKeys[None]):
    """A partial retry table: each ``None`` inherits from the level above."""


@policy_group()
@attrs.frozen(slots=False)  # a variant derives from several groups
class _ReconnectKeys(Generic[V]):
    base_delay_s: float | V = policy_key(
        0.1, number(positive=False), "Delay before the first reconnect attempt; doubles each time."
    )
    max_delay_s: float | V = policy_key(
        30.0, number(positive=False), "Upper bound of the delay between reconnect attempts."
    )

    def __attrs_post_init__(self) -> None:
        _check_delays(self.base_delay_s, self.max_delay_s)


@policy_variant
class ReconnectPolicy(_ReconnectKeys[Never]):
    """How a lost connection is re-established (fully resolved)."""


@policy_variant
class ReconnectOverrides(_ReconnectKeys[None]):
    """A partial reconnect table: each ``None`` inherits from the level above."""


# --------------------------------------------------------------------------------------------
# The policy keys, grouped by the tables they may be written in
# --------------------------------------------------------------------------------------------


@policy_group("defaults", "server", "tool")
@attrs.frozen(slots=False)  # a variant derives from several groups
class _EveryLevel(Generic[V]):
    timeout_s: float | V = policy_key(
        60.0, number(positive=True), "Deadline of one logical call, in seconds (greater than 0)."
    )
    retry: _RetryKeys[V] = policy_table(_RetryKeys, "How a failed call is retried (see RetryPolicy).")
    ack_timeout_s: float | None = policy_key(
        None,
        number(positive=True),
        "Seconds a call may go without the server's early ACK before it is treated as lost (only "
        "against an RMCP server advertising early_ack with a durable store, and not over HTTP); "
        "unset means no ACK timeout.",
    )
    trust_annotations: bool | V = policy_key(
        True, boolean, "Whether tool annotations (e.g. idempotentHint) are believed."
    )


@policy_group("defaults", "server")
@attrs.frozen(slots=False)  # a variant derives from several groups
class _ServerLevel(Generic[V]):
    connect_timeout_s: float | V = policy_key(
        10.0, number(positive=True), "Deadline of one connection attempt, in seconds (greater than 0)."
    )
    max_concurrency: int | V = policy_key(16, int_at_least(1), "Calls in flight to one server (at least 1).")
    reconnect: _ReconnectKeys[V] = policy_table(
        _ReconnectKeys, "How a lost connection is re-established (see ReconnectPolicy)."
    )
    when_disconnected: WhenDisconnected | V = policy_key(
        "wait", one_of("wait", "fail"), "'wait' for the connection or 'fail' at once."
    )
    max_sse_event_bytes: int | V = policy_key(
        1024 * 1024,
        int_at_least(1),
        "Largest server-sent event accepted over streamable HTTP, in bytes (the SDK's default, "
        "1 MiB); a larger answer fails with RMCPResultValidationError (http only).",
    )


@policy_group("tool")
@attrs.frozen(slots=False)  # a variant derives from several groups
class _ToolLevel(Generic[V]):
    # ``None`` is a resolved value: the config does not say, the tool's annotations may.
    idempotent: bool | None = policy_key(
        None,
        boolean,
        "Whether the tool is safe to repeat; None means not said (the tool's annotations may "
        "then decide, see trust_annotations).",
    )


@policy_variant
class PolicyOverrides(_EveryLevel[None], _ServerLevel[None]):
    """Policy keys allowed in ``[defaults]`` and in a server table; ``None`` inherits."""


@policy_variant
class ToolOverrides(_EveryLevel[None], _ToolLevel[None]):
    """Policy keys allowed in a tool table; ``None`` inherits from the server."""


@policy_variant
class ServerPolicy(_EveryLevel[Never], _ServerLevel[Never]):
    """The resolved policy of one server (built by :meth:`RMCPConfig.server_policy`)."""


@policy_variant
class CallPolicy(_EveryLevel[Never], _ToolLevel[Never]):
    """The resolved policy of calls to one tool of one server (built by
    :meth:`RMCPConfig.call_policy`)."""


@attrs.frozen
class RuntimeSettings:
    """Settings of the runtime as a whole (the ``[runtime]`` table).

    Attributes:
        max_queue: Pending calls allowed in all (at least 1).
        overflow: What a call does when the queue is full: ``"wait"`` or ``"reject"``.
        max_restarts: Restarts of a failing actor allowed within ``restart_period_s``.
        restart_period_s: Window of the restart intensity, in seconds (greater than 0).
        max_concurrency: Calls in flight across all servers (at least 1).

    Raises:
        RMCPConfigError: A value is out of range; ``path`` is the field name.
    """

    max_queue: int = attrs.field(default=10000, validator=int_at_least(1))
    overflow: Overflow = attrs.field(default="wait", validator=one_of("wait", "reject"))
    max_restarts: int = attrs.field(default=5, validator=int_at_least(0))
    restart_period_s: float = attrs.field(default=30.0, validator=number(positive=True))
    max_concurrency: int = attrs.field(default=1024, validator=int_at_least(1))
