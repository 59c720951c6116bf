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

import re
from typing import Any, Generic, Literal, Never

import attrs

from .._transfer import DEFAULT_CHUNK_SIZE, DEFAULT_THRESHOLD, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE
from ..errors import RMCPConfigError
from ._checks import boolean, int_at_least, is_number, number, one_of, optional, string
from ._keys import V, policy_group, policy_key, policy_table, policy_variant

__all__ = [
    "BreakerMode",
    "BreakerProbe",
    "CallPolicy",
    "CircuitBreakerOverrides",
    "CircuitBreakerPolicy",
    "HedgeOverrides",
    "HedgePolicy",
    "Overflow",
    "PolicyOverrides",
    "ReconnectOverrides",
    "RateLimitOverrides",
    "RateLimitPolicy",
    "ReconnectPolicy",
    "RetryBudgetOverrides",
    "RetryBudgetPolicy",
    "RetryOverrides",
    "RetryPolicy",
    "RuntimeSettings",
    "ServerPolicy",
    "TaskMode",
    "ToolOverrides",
    "TransferOverrides",
    "TransferPolicy",
    "WhenDisconnected",
]

Overflow = Literal["wait", "reject"]
WhenDisconnected = Literal["wait", "fail"]
BreakerMode = Literal["enabled", "disabled", "metrics_only"]
BreakerProbe = Literal["call", "ping", "tools_list"]
TaskMode = bool | Literal["auto"]


def _check_delays(base: object, maximum: object) -> None:
    if is_number(base) and is_number(maximum) and maximum < base:
        raise RMCPConfigError(f"must be at least base_delay_s ({base}), got {maximum}", path="max_delay_s")


def _fraction_below_one(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    number(positive=True)(_inst, attribute, value)
    if value >= 1:
        raise RMCPConfigError(f"must be below 1, got {value}", path=attribute.name)


def _fraction_up_to_one(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    number(positive=True)(_inst, attribute, value)
    if value > 1:
        raise RMCPConfigError(f"must be at most 1, got {value}", path=attribute.name)


def _patterns(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, tuple):
        raise RMCPConfigError(f"expected a list of regular expressions, got {value!r}", path=attribute.name)
    for index, pattern in enumerate(value):  # pyright: ignore[reportUnknownVariableType, reportUnknownArgumentType]
        if not isinstance(pattern, str):
            raise RMCPConfigError(f"expected a string, got {pattern!r}", path=f"{attribute.name}.{index}")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise RMCPConfigError(
                f"not a valid regular expression ({exc}): {pattern!r}", path=f"{attribute.name}.{index}"
            ) from None


_PERCENTILE = re.compile(r"p(\d{1,2}(\.\d+)?)")


def _percentile(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    match = _PERCENTILE.fullmatch(value) if isinstance(value, str) else None
    if match is None or not 0 < float(match.group(1)) < 100:
        raise RMCPConfigError(
            f"must be a latency percentile such as 'p50', 'p95' or 'p99.9', got {value!r}",
            path=attribute.name,
        )


def _task_mode(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, bool) and value != "auto":
        raise RMCPConfigError(f"must be true, false or 'auto', got {value!r}", path=attribute.name)


# --------------------------------------------------------------------------------------------
# Nested tables
# --------------------------------------------------------------------------------------------


@policy_group()
@attrs.frozen(slots=False)  # a variant derives from several groups
class _RetryKeys(Generic[V]):
    max_attempts: int | None = policy_key(
        None,
        int_at_least(0),
        "Attempts in all, including the first; 0 retries until the deadline (bounded by the "
        "retry budget); unset means 0 against an RMCP server that deduplicates, else 3.",
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


@policy_group()
@attrs.frozen(slots=False)  # a variant derives from several groups
class _RateLimitKeys(Generic[V]):
    rate: float | None = policy_key(
        None,
        number(positive=True),
        "Calls per second (greater than 0); unset means no fixed rate: the limiter engages only "
        "once the server signals rate limiting.",
    )
    burst: int | None = policy_key(
        None,
        int_at_least(1),
        "Tokens the bucket holds (at least 1); unset means the rate, rounded (at least 1).",
    )
    adaptive: bool | V = policy_key(
        True, boolean, "Whether the rate adapts to the server's rate-limit signals (AIMD)."
    )
    decrease: float | V = policy_key(
        0.5, _fraction_below_one, "Factor the rate is multiplied by on a rate-limit signal (0 < x < 1)."
    )
    min_rate: float | V = policy_key(0.1, number(positive=True), "Lowest rate adaptation goes to (calls/s).")
    recover_per_s: float | None = policy_key(
        None,
        number(positive=True),
        "Calls/s the rate regains per second without a signal, up to the ceiling (the configured "
        "rate, or the rate before the first cut); unset means 5 % of the ceiling per second.",
    )
    error_patterns: tuple[str, ...] | V = policy_key(
        (),
        _patterns,
        "Regular expressions (case-insensitive search) over the text of a tool's error result "
        "that mark it as a rate-limit refusal (opt-in); a group named 'seconds' gives the wait.",
    )


@policy_variant
class RateLimitPolicy(_RateLimitKeys[Never]):
    """A token bucket of calls, adapted to the server's rate-limit signals (fully resolved)."""


@policy_variant
class RateLimitOverrides(_RateLimitKeys[None]):
    """A partial rate_limit table: each ``None`` inherits from the level above."""


@policy_group()
@attrs.frozen(slots=False)  # a variant derives from several groups
class _CircuitBreakerKeys(Generic[V]):
    failure_threshold: int | V = policy_key(
        5, int_at_least(1), "Consecutive failures that open the breaker (at least 1)."
    )
    failure_ratio: float | V = policy_key(
        0.5, _fraction_up_to_one, "Share of failures over window_s that opens it, once min_calls were seen."
    )
    min_calls: int | V = policy_key(10, int_at_least(1), "Calls in the window before failure_ratio applies.")
    window_s: float | V = policy_key(
        30.0, number(positive=True), "Sliding window of failure_ratio, in seconds."
    )
    open_s: float | V = policy_key(30.0, number(positive=True), "First open period, in seconds.")
    max_open_s: float | V = policy_key(
        300.0, number(positive=True), "Longest open period (it doubles at each re-open), in seconds."
    )
    half_open_probes: int | V = policy_key(
        1, int_at_least(1), "Calls let through while half-open; they all succeed to close it."
    )
    slow_call_s: float | V = policy_key(
        0.0, number(positive=False), "A call slower than this counts as a failure; 0 turns it off."
    )
    mode: BreakerMode | V = policy_key(
        "enabled",
        one_of("enabled", "disabled", "metrics_only"),
        "'enabled', 'disabled', or 'metrics_only' (tracks and reports its state, never rejects).",
    )
    probe: BreakerProbe | V = policy_key(
        "call",
        one_of("call", "ping", "tools_list"),
        "What tests a half-open server: a user's 'call', or a 'ping' / 'tools_list' sent by the breaker.",
    )

    def __attrs_post_init__(self) -> None:
        if is_number(self.open_s) and is_number(self.max_open_s) and self.max_open_s < self.open_s:
            raise RMCPConfigError(
                f"must be at least open_s ({self.open_s}), got {self.max_open_s}", path="max_open_s"
            )


@policy_variant
class CircuitBreakerPolicy(_CircuitBreakerKeys[Never]):
    """When calls to a failing server or tool stop being sent (fully resolved)."""


@policy_variant
class CircuitBreakerOverrides(_CircuitBreakerKeys[None]):
    """A partial circuit_breaker table: each ``None`` inherits from the level above."""


@policy_group()
@attrs.frozen(slots=False)  # a variant derives from several groups
class _RetryBudgetKeys(Generic[V]):
    ratio: float | V = policy_key(
        0.2, number(positive=False), "Retries and hedges allowed per first attempt (not negative)."
    )
    min_per_s: float | V = policy_key(
        3.0, number(positive=False), "Retries and hedges allowed per second whatever the traffic."
    )


@policy_variant
class RetryBudgetPolicy(_RetryBudgetKeys[Never]):
    """The share of retries and hedges a server may be sent (fully resolved)."""


@policy_variant
class RetryBudgetOverrides(_RetryBudgetKeys[None]):
    """A partial retry_budget table: each ``None`` inherits from the level above."""


@policy_group()
@attrs.frozen(slots=False)  # a variant derives from several groups
class _HedgeKeys(Generic[V]):
    delay_s: float | None = policy_key(
        None, number(positive=False), "Seconds before a second attempt is sent beside a slow first one."
    )
    delay: str | None = policy_key(
        None,
        _percentile,
        "The delay as a percentile of the tool's observed latency, e.g. 'p95' (instead of delay_s).",
    )
    max_hedges: int | V = policy_key(1, int_at_least(1), "Extra attempts a call may run beside its first.")
    min_samples: int | V = policy_key(
        20, int_at_least(1), "Latencies observed before a percentile delay applies (no hedge until then)."
    )


@policy_variant
class HedgePolicy(_HedgeKeys[Never]):
    """Hedged attempts for tools safe to repeat; on when delay_s or delay is set (fully resolved)."""


@policy_variant
class HedgeOverrides(_HedgeKeys[None]):
    """A partial hedge table: each ``None`` inherits from the level above."""


def _chunk_size(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    int_at_least(MIN_CHUNK_SIZE)(_inst, attribute, value)
    if value > MAX_CHUNK_SIZE:
        raise RMCPConfigError(
            f"must be at most {MAX_CHUNK_SIZE} bytes (16 MiB), got {value}", path=attribute.name
        )


def _parallel(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    int_at_least(1)(_inst, attribute, value)
    if value > _MAX_PARALLEL:
        raise RMCPConfigError(f"must be at most {_MAX_PARALLEL}, got {value}", path=attribute.name)


# More chunk requests in flight than this only queue on the one connection they share.
_MAX_PARALLEL = 64


@policy_group()
@attrs.frozen(slots=False)  # a variant derives from several groups
class _TransferKeys(Generic[V]):
    chunk_size: int | V = policy_key(
        DEFAULT_CHUNK_SIZE,
        _chunk_size,
        "Bytes per chunk asked for (4 KiB to 16 MiB); over streamable HTTP the client asks for "
        "less when a chunk's base64 would not fit max_sse_event_bytes.",
    )
    parallel: int | V = policy_key(4, _parallel, "Chunk requests in flight at once per payload (1 to 64).")
    threshold: int | V = policy_key(
        DEFAULT_THRESHOLD,
        int_at_least(0),
        "Bytes above which a result item or a string argument moves in chunks (only with a "
        "server advertising the 'transfer' feature).",
    )
    max_bytes_per_s: int | V = policy_key(
        0, int_at_least(0), "Bandwidth cap of one call's chunks, in bytes per second; 0 means none."
    )


@policy_variant
class TransferPolicy(_TransferKeys[Never]):
    """How large payloads move in chunks (fully resolved; docs/protocol.md section 9)."""


@policy_variant
class TransferOverrides(_TransferKeys[None]):
    """A partial transfer table: each ``None`` inherits from the level above."""


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
    rate_limit: _RateLimitKeys[V] = policy_table(
        _RateLimitKeys, "Token bucket of the calls, adapted to rate-limit signals (see RateLimitPolicy)."
    )
    circuit_breaker: _CircuitBreakerKeys[V] = policy_table(
        _CircuitBreakerKeys, "When calls stop being sent to a failing dependency (see CircuitBreakerPolicy)."
    )
    retry_budget: _RetryBudgetKeys[V] = policy_table(
        _RetryBudgetKeys, "The share of retries and hedges (see RetryBudgetPolicy)."
    )
    hedge: _HedgeKeys[V] = policy_table(_HedgeKeys, "Hedged attempts (see HedgePolicy).")
    task: TaskMode | V = policy_key(
        "auto",
        _task_mode,
        "Whether calls run as tasks (polled to their result, followed across reconnects): true "
        "when the server supports it for the tool, false never asked for, 'auto' when the tool "
        "requires it (execution.taskSupport = 'required'). On 2026-07-28 the server decides.",
    )
    transfer: _TransferKeys[V] = policy_table(
        _TransferKeys, "Chunked transfer of large results and arguments (see TransferPolicy)."
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
    max_concurrency: int | None = policy_key(
        None,
        int_at_least(1),
        "Calls to this tool in flight at once (at least 1), within the server's max_concurrency; "
        "unset means only the server's limit applies.",
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
        stall_s: Seconds of work waiting with nothing completing before the watchdog reports a
            stall, and of silence (not even a ping answered) before a hung server is restarted.
        restart_hung: Whether the watchdog reconnects a server that answers nothing for stall_s.
        priority_aging_s: A waiting call gains one priority level per this many seconds waited,
            so a steady stream of higher priorities never starves it (greater than 0).
        task_store: Path of the SQLite file keeping which task each idempotency key created,
            so that a new process resumes a batch's tasks; ``None`` keeps them in memory.

    Raises:
        RMCPConfigError: A value is out of range; ``path`` is the field name.
    """

    max_queue: int = attrs.field(default=10000, validator=int_at_least(1))
    overflow: Overflow = attrs.field(default="wait", validator=one_of("wait", "reject"))
    max_restarts: int = attrs.field(default=5, validator=int_at_least(0))
    restart_period_s: float = attrs.field(default=30.0, validator=number(positive=True))
    max_concurrency: int = attrs.field(default=1024, validator=int_at_least(1))
    stall_s: float = attrs.field(default=30.0, validator=number(positive=True))
    restart_hung: bool = attrs.field(default=True, validator=boolean)
    priority_aging_s: float = attrs.field(default=5.0, validator=number(positive=True))
    task_store: str | None = attrs.field(default=None, validator=optional(string))


JournalSync = Literal["normal", "full"]


@attrs.frozen
class TransactionSettings:
    """Settings of transactions (the ``[transactions]`` table).

    Attributes:
        journal: Path of the SQLite write-ahead journal; ``None`` keeps the journal in memory,
            so ``recover()`` only finds transactions of this process (nothing survives a crash).
        synchronous: ``"normal"`` (a committed record survives a crash of the process; the
            default) or ``"full"`` (it also survives a power loss: every group commit waits
            for the disk).
        recover_on_open: Whether ``RMCPSupervisor.open()`` recovers incomplete transactions
            of the journal before it yields.
        compensation_timeout_s: Seconds one compensation may take, retries included, before
            it is reported failed (greater than 0).
        lock_timeout_s: Seconds a transaction waits for a resource when it has no deadline of
            its own (greater than 0).

    Raises:
        RMCPConfigError: A value is out of range; ``path`` is the field name.
    """

    journal: str | None = attrs.field(default=None, validator=optional(string))
    synchronous: JournalSync = attrs.field(default="normal", validator=one_of("normal", "full"))
    recover_on_open: bool = attrs.field(default=False, validator=boolean)
    compensation_timeout_s: float = attrs.field(default=60.0, validator=number(positive=True))
    lock_timeout_s: float = attrs.field(default=60.0, validator=number(positive=True))
