"""The dedup store protocol shared by the server extension and every store.

A store keeps one record per idempotency key. A record is created ``STARTED`` (owned by
one server instance) just before the tool runs, and becomes ``COMPLETED`` (holding the
encoded result) or ``IN_DOUBT`` (the run was cut short: it may or may not have had its
effect). Records expire ``ttl_s`` after they were created or, for a run that outlived that,
after its outcome was recorded; a ``STARTED`` record whose owner is alive never expires (a
second claim of its key would run the tool again).

Owners: every server instance has an ``instance_id`` and keeps a lease alive in the store
with :meth:`DedupStore.renew_owner`. A ``STARTED`` record whose owner's lease has lapsed
(or whose owner process is known to be gone) is reported with ``owner_alive=False``: the
server answers ``in_doubt`` for it, never runs the tool again.
"""

from __future__ import annotations

import enum
from typing import Protocol, runtime_checkable

import attrs

__all__ = ["BeginOutcome", "DedupRecord", "DedupStore", "OwnerInfo", "RecordState"]


class RecordState(enum.Enum):
    """Where one idempotency key stands."""

    STARTED = "started"
    COMPLETED = "completed"
    IN_DOUBT = "in_doubt"


@attrs.frozen(kw_only=True)
class OwnerInfo:
    """The server instance that claims records, as stored beside its lease."""

    instance_id: str
    pid: int
    host: str


@attrs.frozen(kw_only=True)
class DedupRecord:
    """One key's record as read from a store."""

    key: str
    fingerprint: str
    tool: str
    state: RecordState
    owner: str
    owner_alive: bool
    result: bytes | None
    created_at: float
    expires_at: float


@attrs.frozen(kw_only=True)
class BeginOutcome:
    """What :meth:`DedupStore.begin` did: claimed the key, or found it taken."""

    claimed: bool
    existing: DedupRecord | None


@runtime_checkable
class DedupStore(Protocol):
    """What the RMCP server side needs from a store. All methods are safe to call
    concurrently from many tasks; none blocks the event loop.

    Failures are raised as :class:`~rmcp_actors.RMCPStoreError` (the backend's own error as
    ``__cause__``), :class:`~rmcp_actors.RMCPStoreClosedError` after :meth:`aclose`, and
    :class:`~rmcp_actors.RMCPUnknownOwnerError` (also a ``LookupError``) from
    :meth:`renew_owner` for an owner the store does not know. The server bounds every call by
    its ``store_timeout_s``.
    """

    @property
    def durable(self) -> bool:
        """Whether records survive a restart of the server process."""
        ...

    async def register_owner(self, owner: OwnerInfo, lease_s: float) -> None:
        """Record ``owner`` as alive for ``lease_s`` seconds."""
        ...

    async def renew_owner(self, instance_id: str, lease_s: float) -> None:
        """Extend the lease of a registered owner by ``lease_s`` from now."""
        ...

    async def release_owner(self, instance_id: str) -> None:
        """Mark the owner as gone (clean shutdown); its unfinished records become in doubt."""
        ...

    async def begin(self, key: str, *, fingerprint: str, tool: str, owner: str) -> BeginOutcome:
        """Atomically claim ``key`` as ``STARTED`` by ``owner``, unless a live record exists.

        An expired record is replaced as if absent. When the key is taken, nothing changes
        and the existing record is returned.
        """
        ...

    async def complete(self, key: str, *, owner: str, result: bytes) -> None:
        """Store the result of the run ``owner`` started; durable once this returns."""
        ...

    async def mark_in_doubt(self, key: str, *, owner: str) -> None:
        """Record that the run ``owner`` started was cut short without a result."""
        ...

    async def get(self, key: str) -> DedupRecord | None:
        """Return the live record of ``key``, or None when absent or expired."""
        ...

    async def purge_expired(self) -> int:
        """Delete expired records; return how many were deleted."""
        ...

    async def aclose(self) -> None:
        """Release the store's resources; further calls fail."""
        ...
