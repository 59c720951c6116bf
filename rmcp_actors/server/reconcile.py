"""Reconcilers: a tool's own way to tell whether an in-doubt run happened.

A key is in doubt when its tool was entered and the run never recorded a result (its server
died, or the run outlived ``max_execution_s``). The server alone cannot tell whether the effect
exists; the tool's domain often can (look the order up by its reference, read the ledger). A
reconciler declared for a tool is asked, with the arguments and key of the in-doubt run, when a
retry of that key arrives:

* :meth:`Reconciliation.did_run` with the result: stored as the key's result and replayed
  (``duplicate: true``), now and on every later retry;
* :meth:`Reconciliation.did_not_run`: the key is claimed again and the tool runs now;
* :meth:`Reconciliation.unknown` (or None): the key stays in doubt (NACK ``in_doubt``).

A reconciler must answer ``did_not_run`` only when the effect cannot appear later. The run's
owner reads as gone, but that is read from a lease: an owner on another host that was paused
past its lease (or cut off from the store) may still be in the middle of the run, and an effect
handed to another system (a request in flight) may still land. A reconciler that raises or
exceeds ``reconcile_timeout_s`` leaves the key in doubt.
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from typing import Any, Protocol, final

import attrs

__all__ = ["InDoubtRun", "Reconciler", "Reconciliation"]


@final
@attrs.frozen(kw_only=True)
class InDoubtRun:
    """The run a reconciler is asked about.

    Attributes:
        tool: The tool's name.
        arguments: The call's arguments (the same for every attempt: the key's fingerprint
            covers them).
        idempotency_key: The key the client sent (not scoped to its principal).
        principal: The authenticated principal the key is scoped to (as
            ``mcp.server.request_state.authenticated_principal`` gives it), None when the
            caller is not authenticated. Two principals may send the same key: a reconciler
            looking the run up by its key must look within this principal, or it may report
            (and so replay) another principal's run.
    """

    tool: str
    arguments: Mapping[str, Any]
    idempotency_key: str
    principal: str | None = None


@final
@attrs.frozen
class Reconciliation:
    """A reconciler's answer; build it with :meth:`did_run`, :meth:`did_not_run` or
    :meth:`unknown`.

    Attributes:
        ran: True (the run happened), False (it did not), None (cannot tell).
        result: For ``ran=True``: what the tool returned, as the tool itself would return it
            (on an ``MCPServer`` any value its tool may return, converted as the SDK converts
            it; on a low-level ``Server`` a ``CallToolResult``).
    """

    ran: bool | None
    result: Any = None

    @classmethod
    def did_run(cls, result: Any) -> Reconciliation:
        """The run happened and gave ``result``: store it for the key and replay it."""
        return cls(True, result)

    @classmethod
    def did_not_run(cls) -> Reconciliation:
        """The run had no effect and cannot have one later: run the tool now."""
        return cls(False)

    @classmethod
    def unknown(cls) -> Reconciliation:
        """Cannot tell: the key stays in doubt."""
        return cls(None)


class Reconciler(Protocol):
    """An async function asked about an in-doubt run of one tool: ``async def look_up(run:
    InDoubtRun) -> Reconciliation | None``, where None means "cannot tell"."""

    def __call__(self, run: InDoubtRun, /) -> Awaitable[Reconciliation | None]: ...
