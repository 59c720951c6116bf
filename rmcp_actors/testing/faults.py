# pyright: strict
"""Fault injection for any MCP client transport: seeded, reproducible, logged and counted.

A :class:`FaultPlan` says which faults happen and how often; a :class:`FaultInjector` applies
one to every connection it wraps, either a transport handed to a raw ``mcp.Client``
(:meth:`FaultInjector.wrap`) or every (re)connection rmcp_actors makes to a server
(:meth:`FaultInjector.spec`). See docs/testing.md for the user guide.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, Literal, cast, final

import anyio
import attrs

from ..errors import RMCPConfigError
from ._fault_streams import TransportStreams, faulty_transport

if TYPE_CHECKING:
    from ..config import ServerSpec

__all__ = ["CHUNK_METHODS", "FAULT_KINDS", "FaultEvent", "FaultInjector", "FaultKind", "FaultPlan"]

FaultKind = Literal[
    "drop_request", "drop_response", "delay", "duplicate", "disconnect", "corrupt", "kill", "corrupt_chunk"
]

FAULT_KINDS: Final[tuple[FaultKind, ...]] = (
    "drop_request",
    "drop_response",
    "delay",
    "duplicate",
    "disconnect",
    "corrupt",
    "kill",
    "corrupt_chunk",
)

CHUNK_METHODS: Final = frozenset({"rmcp/transfer/read", "rmcp/transfer/write"})
"""The requests that carry the chunks of transfers (and whose answers do): ``methods`` of a plan
that hits chunks only, so the calls themselves and the handshake go through."""


def _probability(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or math.isnan(value)
        or not 0.0 <= value <= 1.0
    ):
        raise RMCPConfigError(f"must be a probability from 0 to 1, got {value!r}", path=attribute.name)


def _to_float(value: Any) -> Any:
    # 0 and 1 are probabilities too; a bool is not (the validator refuses it).
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _check_seed(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RMCPConfigError(f"must be an integer, got {value!r}", path=attribute.name)


def _to_range(value: Any) -> Any:
    if isinstance(value, Iterable) and not isinstance(value, str | bytes):
        return tuple(_to_float(item) for item in value)  # pyright: ignore[reportUnknownVariableType]
    return value


def _check_range(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    bounds = cast("tuple[object, ...]", value) if isinstance(value, tuple) else ()
    if (
        len(bounds) != 2
        or not all(isinstance(b, float) and math.isfinite(b) and b >= 0 for b in bounds)
        or bounds[0] > bounds[1]  # pyright: ignore[reportOperatorIssue]
    ):
        raise RMCPConfigError(
            f"must be (low, high) in seconds with 0 <= low <= high, got {value!r}", path=attribute.name
        )


def _to_methods(value: Any) -> Any:
    if value is None or isinstance(value, str | bytes) or not isinstance(value, Iterable):
        return value  # None is "every request"; a lone string is refused by the validator
    return frozenset(cast("Iterable[object]", value))


# Requests only a server sends (MCP's ServerRequest but ping): the injector sits on the client's
# side and draws faults on the client's requests, so a plan naming one would inject nothing.
_SERVER_REQUESTS: Final = frozenset({"sampling/createMessage", "elicitation/create", "roots/list"})


def _check_methods(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, frozenset) or not all(
        isinstance(method, str) and method
        for method in value  # pyright: ignore[reportUnknownVariableType]
    ):
        raise RMCPConfigError(
            f"must be a set of JSON-RPC method names such as {{'tools/call'}}, or None for every "
            f"request, got {value!r}",
            path=attribute.name,
        )
    if server_requests := sorted(_SERVER_REQUESTS.intersection(cast("frozenset[str]", value))):
        raise RMCPConfigError(
            f"{', '.join(server_requests)}: requests the server sends to the client, which never "
            "draw faults (faults hit the client's requests and their answers); name the client's "
            "request that leads to them, such as 'tools/call'",
            path=attribute.name,
        )


def _check_bool(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, bool):
        raise RMCPConfigError(f"must be true or false, got {value!r}", path=attribute.name)


def _probability_field() -> Any:
    return attrs.field(default=0.0, converter=_to_float, validator=_probability)


@final
@attrs.frozen
class FaultPlan:
    """Which faults to inject, and how often: one probability per kind, drawn per request.

    Only requests whose method is in ``methods`` draw faults (``tools/call`` by default, so
    that the handshake and tool listing go through). For the k-th such request of the n-th
    connection, each kind is drawn from a random generator seeded with ``(seed, kind, n, k)``:
    the same seed gives the same faults at the same places on every run, whatever the
    interleaving of concurrent calls. Probability 0 never happens, 1 always does.

    Attributes:
        seed: Seeds every draw.
        drop_request: The request never reaches the server (it did not run).
        drop_response: The server ran the request; its answer never reaches the client.
        delay: The request is held for ``uniform(*delay_s)`` seconds before it is delivered.
        delay_s: The range of a delay, in seconds.
        duplicate: The request is delivered twice (at-least-once delivery), the second time
            as a copy with a JSON-RPC id of its own: the server runs it twice unless it
            deduplicates; the client gets the original's answer (the copy's is swallowed).
        disconnect: The connection breaks as the client writes the request: the write fails
            (the client knows nothing left) and the connection ends.
        corrupt: The answer is replaced by a line that does not parse: the client's transport
            passes on a parse error, and the call waits for an answer that never comes
            (until its deadline).
        kill: stdio only: the server process is killed with SIGKILL right after it was handed
            the request (it may or may not have run it); the connection ends with the
            process, and a runtime restarts it by reconnecting.
        corrupt_chunk: A chunk of a chunked transfer (docs/protocol.md section 9) arrives
            damaged: one character of the base64 ``data`` of an ``rmcp/transfer/write``
            request, or of the answer to an ``rmcp/transfer/read``, is replaced by another.
            The message still parses; only the chunk's SHA-256 shows the damage (the server
            refuses the written chunk, the client reads the chunk again). A message without
            a chunk (an error answer, another method) is left alone and not counted. Use
            with ``methods=CHUNK_METHODS``.
        methods: The JSON-RPC methods whose requests draw faults; None for every request
            (``initialize`` included). The client's requests only: a request the server sends
            (``sampling/createMessage``, ``elicitation/create``, ``roots/list``) is refused.
        silent: Whether a dropped request or answer leaves the connection up. False (the
            default) ends the connection after the loss, as a stream transport does when it
            loses a message; True leaves it up, so the call waits until its deadline (to
            test timeouts).

    Raises:
        RMCPConfigError: A value is invalid; ``path`` names the attribute.
    """

    seed: int = attrs.field(default=0, validator=_check_seed)
    drop_request: float = _probability_field()
    drop_response: float = _probability_field()
    delay: float = _probability_field()
    delay_s: tuple[float, float] = attrs.field(
        default=(0.01, 0.1), converter=_to_range, validator=_check_range
    )
    duplicate: float = _probability_field()
    disconnect: float = _probability_field()
    corrupt: float = _probability_field()
    kill: float = _probability_field()
    corrupt_chunk: float = _probability_field()
    methods: frozenset[str] | None = attrs.field(
        default=frozenset({"tools/call"}), converter=_to_methods, validator=_check_methods
    )
    silent: bool = attrs.field(default=False, validator=_check_bool)

    @classmethod
    def parse(cls, text: str, *, seed: int = 0, **options: Any) -> FaultPlan:
        """Build a plan from ``kind=probability`` pairs, the syntax of ``rmcp chaos --faults``.

        Example: ``FaultPlan.parse("drop_response=0.2,disconnect=0.05", seed=1)``. Besides the
        kinds, ``delay_s=LOW:HIGH`` sets the delay range and ``silent=true`` the silent drops.

        Args:
            text: Comma-separated ``key=value`` pairs; empty for no faults.
            seed: The plan's seed.
            **options: Other attributes (``methods``, ``delay_s``, ``silent``...), overridden
                by ``text``.

        Returns:
            The validated plan.

        Raises:
            RMCPConfigError: An unknown kind (the message lists the kinds), a pair without
                ``=``, or a value that is not a number from 0 to 1.
        """
        values: dict[str, Any] = {**options, "seed": seed}
        for pair in (part.strip() for part in text.split(",")):
            if not pair:
                continue
            key, equals, raw = (piece.strip() for piece in pair.partition("="))
            if not equals:
                raise RMCPConfigError(f"expected kind=probability, got {pair!r}", path=key)
            if key == "delay_s":
                low, colon, high = raw.partition(":")
                values[key] = (_number(low, key), _number(high if colon else low, key))
            elif key == "silent":
                if raw.lower() not in ("true", "false", "1", "0"):
                    raise RMCPConfigError(f"must be true or false, got {raw!r}", path=key)
                values[key] = raw.lower() in ("true", "1")
            elif key in FAULT_KINDS:
                values[key] = _number(raw, key)
            else:
                raise RMCPConfigError(
                    f"unknown fault kind {key!r}; the kinds are {', '.join(FAULT_KINDS)} "
                    "(and delay_s=LOW:HIGH, silent=true)",
                    path=key,
                )
        return cls(**values)

    def probability(self, kind: FaultKind) -> float:
        """The probability of ``kind``.

        Raises:
            RMCPConfigError: ``kind`` is not one of :data:`FAULT_KINDS`.
        """
        if kind not in FAULT_KINDS:
            raise RMCPConfigError(f"unknown fault kind {kind!r}; the kinds are {', '.join(FAULT_KINDS)}")
        probability: float = getattr(self, kind)
        return probability

    @property
    def active(self) -> bool:
        """Whether any fault can happen."""
        return any(self.probability(kind) > 0 for kind in FAULT_KINDS)

    def describe(self) -> str:
        """The plan's nonzero faults in :meth:`parse` syntax, e.g. ``drop_response=0.2``
        (``none`` without faults); the seed is not included."""
        pairs = [f"{kind}={self.probability(kind):g}" for kind in FAULT_KINDS if self.probability(kind) > 0]
        if self.delay > 0:
            pairs.append(f"delay_s={self.delay_s[0]:g}:{self.delay_s[1]:g}")
        if self.silent:
            pairs.append("silent=true")
        return ",".join(pairs) or "none"


def _number(raw: str, key: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise RMCPConfigError(f"expected a number, got {raw!r}", path=key) from None


@final
@attrs.frozen
class FaultEvent:
    """One injected fault.

    Attributes:
        kind: One of :data:`FAULT_KINDS`.
        method: The JSON-RPC method of the request it hit (``"tools/call"``).
        request_id: The JSON-RPC id of that request on its connection.
        connection: Which connection of the injector (1 for the first it wrapped).
        ordinal: Which fault-drawing request of that connection (1 for the first).
        time: When it happened, on the event loop's clock (seconds).
        detail: What else there is to say: the delay in seconds, the pid killed.
    """

    kind: FaultKind
    method: str
    request_id: int | str
    connection: int
    ordinal: int
    time: float
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        """The event as a JSON-ready dict (a line of the injector's log)."""
        return attrs.asdict(self)


@final
@attrs.define(eq=False)
class FaultInjector:
    """Applies a :class:`FaultPlan` to transports: each one wrapped is a new connection.

    Use :meth:`wrap` around a transport given to a raw ``mcp.Client``, or :meth:`spec` to have
    rmcp_actors wrap every connection (and reconnection) it makes to a server. Every fault is
    recorded in :attr:`events`, counted in :attr:`counts` and, with ``log``, appended to a file
    as one JSON line.

    Args:
        plan: The faults to inject.
        log: A file to append one JSON line per fault to (see :meth:`FaultEvent.as_dict`).
    """

    plan: FaultPlan = attrs.field(validator=attrs.validators.instance_of(FaultPlan))
    log: str | os.PathLike[str] | None = attrs.field(default=None, kw_only=True)
    _events: list[FaultEvent] = attrs.field(factory=list[FaultEvent], init=False, repr=False)
    _counts: dict[FaultKind, int] = attrs.field(
        factory=lambda: dict.fromkeys(FAULT_KINDS, 0), init=False, repr=False
    )
    _connections: int = attrs.field(default=0, init=False, repr=False)

    @property
    def counts(self) -> Mapping[FaultKind, int]:
        """How many faults of each kind happened, every kind included (zeros too)."""
        return MappingProxyType(self._counts)

    @property
    def events(self) -> Sequence[FaultEvent]:
        """Every fault injected so far, in order."""
        return tuple(self._events)

    @property
    def connections(self) -> int:
        """How many connections were wrapped so far."""
        return self._connections

    def wrap(
        self, transport: AbstractAsyncContextManager[TransportStreams]
    ) -> AbstractAsyncContextManager[TransportStreams]:
        """Wrap an MCP client transport so that its requests and answers suffer the plan's faults.

        ``transport`` is any async context manager yielding ``(read_stream, write_stream)``:
        ``stdio_client(params)``, ``streamable_http_client(url)``, ``InMemoryTransport(server)``.
        The result is one too: pass it to ``mcp.Client``. Each entry is a new connection.

        The ``kill`` fault needs the server's process: it works with
        :func:`rmcp_actors.testing.stdio_client` (a drop-in for the SDK's, and what rmcp_actors
        uses for stdio servers); entering a wrapped transport that spawned no process it can
        see, with ``kill`` above 0, raises RMCPConfigError.

        Args:
            transport: The un-entered transport.

        Returns:
            The un-entered wrapped transport.
        """
        return faulty_transport(self.plan, transport, connect=self._next_connection, record=self._record)

    def spec(self, spec: ServerSpec) -> ServerSpec:
        """``spec`` with faults: rmcp_actors wraps each connection to it with this injector.

        Args:
            spec: A server spec (stdio, http, or memory with ``wire="jsonrpc"``).

        Returns:
            The same spec with its ``faults`` attribute set to this injector.

        Raises:
            RMCPConfigError: The spec uses the direct in-memory wire (it has no transport to
                wrap), or the plan kills and the server is not stdio.
        """
        return attrs.evolve(spec, faults=self)

    def _next_connection(self) -> int:
        """Number a new connection (for the wrapped streams)."""
        self._connections += 1
        return self._connections

    def _record(
        self,
        kind: FaultKind,
        method: str,
        request_id: int | str,
        connection: int,
        ordinal: int,
        detail: str = "",
    ) -> None:
        """Count, keep and log one fault (for the wrapped streams)."""
        event = FaultEvent(kind, method, request_id, connection, ordinal, anyio.current_time(), detail)
        self._events.append(event)
        self._counts[kind] += 1
        if self.log is not None:
            # One short line per fault, appended: a test run injects dozens, not millions.
            with open(self.log, "a", encoding="utf-8") as log:
                log.write(json.dumps(event.as_dict()) + "\n")

    def summary(self) -> str:
        """One line for reports: the plan, the seed, the connections and the counts."""
        counts = ", ".join(f"{kind} {count}" for kind, count in self._counts.items())
        return (
            f"faults {self.plan.describe()} (seed {self.plan.seed}) over {self._connections} "
            f"connection(s): {counts}"
        )
