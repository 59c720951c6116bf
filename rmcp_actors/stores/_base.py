"""The dedup store protocol shared by the server extension and every store.

A store keeps one record per idempotency key. A record is created ``STARTED`` (owned by
one server instance: the *claim*), is marked *entered* just before the tool is called, and
becomes ``COMPLETED`` (holding the encoded result) or ``IN_DOUBT`` (the run was cut short: it
may or may not have had its effect). Records expire ``ttl_s`` after they were created or,
for a run that outlived that, after its outcome was recorded; a ``STARTED`` record whose owner
is alive never expires (a second claim of its key would run the tool again).

Owners: every server instance has an ``instance_id`` and keeps a lease alive in the store
with :meth:`DedupStore.renew_owner`. A ``STARTED`` record whose owner's lease has lapsed
(or whose owner process is known to be gone) is reported with ``owner_alive=False``. If its
tool was entered, the server answers ``in_doubt`` for it and never runs the tool again. If
not, the tool never ran: :meth:`DedupStore.begin` takes the claim over (atomically, so that
exactly one claimant wins, and the old owner, should it only have been paused, can no longer
enter: :meth:`DedupStore.mark_entered` fails for it).

A claim whose tool refused the call without doing anything (rate limited) is released
(:meth:`DedupStore.release`): the record is deleted, and the key is as if never claimed.

A run of a tool that a second run cannot harm (declared idempotent or read-only) may skip the
claim: its outcome is recorded ``COMPLETED`` in one write (:meth:`DedupStore.record`) where
no live record exists.

An in-doubt key can be settled by what a reconciler found out
(:meth:`DedupStore.resolve_in_doubt`): the run happened (its result is stored as
``COMPLETED``), or it did not (the key is claimed again, the tool runs now).
"""

from __future__ import annotations

import enum
from typing import Protocol, cast, runtime_checkable

import attrs

from .._transfer import TransferHandle

__all__ = [
    "AbortingStore",
    "BeginOutcome",
    "BlobStore",
    "DedupRecord",
    "DedupStore",
    "ImmediateStore",
    "OwnerInfo",
    "RecordState",
    "TaskCreation",
    "TaskRecord",
    "TaskState",
    "TaskStore",
    "WOULD_WAIT",
    "TransferConflict",
    "WouldWait",
    "immediate",
    "records_now",
]


class RecordState(enum.Enum):
    """Where one idempotency key stands."""

    STARTED = "started"
    COMPLETED = "completed"
    IN_DOUBT = "in_doubt"
    ABORTED = "aborted"
    """A tombstone: a lookup found the key never ran; it never will (see :class:`AbortingStore`)."""


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
    entered: bool = True
    """Whether the claimant called the tool. Records written before stores knew of this mark
    read True: a claim that may have run is in doubt, never run again."""

    @property
    def in_doubt(self) -> bool:
        """Whether the run of this record may or may not have had its effect, and will never
        record a result by itself: marked in doubt, or entered by an owner that is gone."""
        return self.state is RecordState.IN_DOUBT or (
            self.state is RecordState.STARTED and self.entered and not self.owner_alive
        )


@attrs.frozen(kw_only=True)
class BeginOutcome:
    """What :meth:`DedupStore.begin` did: claimed the key, or found it taken."""

    claimed: bool
    existing: DedupRecord | None
    taken_over: bool = False
    """Claimed over a ``STARTED`` record that was never entered (its owner gone, or the
    claimant itself)."""


@runtime_checkable
class DedupStore(Protocol):
    """What the RMCP server side needs from a store. All methods are safe to call
    concurrently from many tasks; none blocks the event loop.

    Failures are raised as :class:`~rmcp_actors.RMCPStoreError` (the backend's own error as
    ``__cause__``), :class:`~rmcp_actors.RMCPStoreClosedError` after :meth:`aclose`, and
    :class:`~rmcp_actors.RMCPUnknownOwnerError` (also a ``LookupError``) from
    :meth:`renew_owner` for an owner the store does not know. The server bounds every call by
    its ``store_timeout_s``.

    A store that can often claim or record without waiting implements
    :class:`ImmediateStore` as well: the server's hot path then needs no timeout scope.
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

    async def begin(
        self, key: str, *, fingerprint: str, tool: str, owner: str, entered: bool = False
    ) -> BeginOutcome:
        """Atomically claim ``key`` as ``STARTED`` by ``owner``, unless a live record exists.

        An expired record is replaced as if absent, and so is a ``STARTED`` record with the same
        ``fingerprint`` that was never entered, when its owner is gone or is ``owner`` itself
        (an owner claims again only a key none of its tasks holds). When the key is taken,
        nothing changes and the existing record is returned.

        With ``entered``, the claim is written already marked entered, in the same write: what
        :meth:`begin` then :meth:`mark_entered` would do, for a server that sends nothing
        between the two (no early ACK). As :meth:`mark_entered` does, it then claims nothing
        when ``owner`` reads as gone (its lease lapsed, or it was released), and returns
        ``BeginOutcome(claimed=False, existing=None)``.
        """
        ...

    async def record(
        self, key: str, *, fingerprint: str, tool: str, owner: str, result: bytes
    ) -> DedupRecord | None:
        """Atomically write ``key`` as ``COMPLETED`` by ``owner`` with ``result``, unclaimed: the
        outcome of a run no claim preceded (a tool declared idempotent or read-only). Written
        wherever :meth:`begin` would claim the key (absent or expired, or a ``STARTED`` record
        with this ``fingerprint`` never entered whose owner is gone or is ``owner``), in one
        write, durable as :meth:`complete` is once this returns; None then. Otherwise nothing
        changes and the existing live record is returned.

        The server uses it only when the store has it: a store without it gets every run
        claimed first.
        """
        ...

    async def mark_entered(self, key: str, *, owner: str) -> bool:
        """Mark the claim of ``key`` by ``owner`` as entered: its tool is about to be called.

        Durable as a claim is (a crash of any process keeps it). Returns False, changing
        nothing, when ``key`` is no longer ``STARTED`` by ``owner`` (another claimant took it
        over), or when ``owner`` reads as gone (its lease lapsed or it was released: entered,
        the claim would be in doubt at once): the tool must not be called then.
        """
        ...

    async def resolve_in_doubt(self, key: str, *, owner: str, fingerprint: str, result: bytes | None) -> bool:
        """Settle an in-doubt ``key`` (see :attr:`DedupRecord.in_doubt`; an entered
        ``STARTED`` record of ``owner`` itself counts, as in :meth:`begin`) with the same
        ``fingerprint``: with ``result``, it becomes ``COMPLETED`` with that result (the run
        happened); with None, it is claimed ``STARTED`` (not entered) by ``owner`` (the run
        did not happen: the tool runs now).

        Atomic across every user of the store: of concurrent calls, at most one returns True.
        Returns False, changing nothing, when the record is absent, not in doubt, or of
        another fingerprint.
        """
        ...

    async def complete(self, key: str, *, owner: str, result: bytes) -> None:
        """Store the result of the run ``owner`` started; durable once this returns."""
        ...

    async def mark_in_doubt(self, key: str, *, owner: str) -> None:
        """Record that the run ``owner`` started was cut short without a result."""
        ...

    async def release(self, key: str, *, owner: str) -> bool:
        """Delete the ``STARTED`` record of ``key`` claimed by ``owner``, entered or not: its
        tool refused the call and did nothing (JSON-RPC ``-32023``), so the key is free again
        and the next attempt claims it as if it were new.

        Atomic across every user of the store: another caller sees the claim or no record,
        never anything between. Returns False, changing nothing, when ``key`` is not
        ``STARTED`` by ``owner``.
        """
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


@runtime_checkable
class AbortingStore(DedupStore, Protocol):
    """A dedup store that can also settle a key as never run: what a server needs to answer
    lookups (``_meta.rmcp.lookup``). A server whose store lacks :meth:`abort` does not
    advertise the ``lookup`` feature."""

    @property
    def ttl_s(self) -> float:
        """How long a record lives after its creation: a lookup later than that finds no
        record whether or not the tool ran (servers advertise it)."""
        ...

    async def abort(
        self,
        key: str,
        *,
        fingerprint: str,
        tool: str,
        owner: str,
        in_doubt: bool = False,
        doubted_owner: str | None = None,
    ) -> BeginOutcome:
        """Atomically record ``key`` as ``ABORTED`` (owned by ``owner``, with ``fingerprint``
        and ``tool``): its tool did not run and, while the record lives, never will.

        Done wherever :meth:`begin` would claim the key (absent or expired, or a ``STARTED``
        record with this fingerprint never entered whose owner is gone or is ``owner``), and,
        with ``in_doubt``, also on an in-doubt record with this fingerprint, or an entered
        ``STARTED`` one of ``owner`` itself, as in :meth:`resolve_in_doubt` (a reconciler found
        that its run did not happen); with ``doubted_owner`` as well, only while that record's
        owner is still ``doubted_owner`` (the run the reconciler was asked about: a claim taken
        since, by another process sharing the store, is another run the verdict says nothing
        of). Returns ``claimed=True`` when it wrote the tombstone;
        otherwise nothing changes and the existing record is returned.
        """
        ...


class TaskState(enum.Enum):
    """Where a task stands in a store (see :class:`TaskStore`). A ``WORKING`` task whose owner
    is gone reads as in doubt (:attr:`TaskRecord.in_doubt`): nothing writes that."""

    WORKING = "working"
    COMPLETED = "completed"
    """The tool returned a result (an ``isError`` one included)."""
    FAILED = "failed"
    """The tool raised a JSON-RPC error, or its run was stopped by the server (in doubt)."""
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        """Whether the task can no longer change."""
        return self is not TaskState.WORKING


@attrs.frozen(kw_only=True)
class TaskRecord:
    """One task as a store keeps it: a ``tools/call`` run in the background (MCP tasks)."""

    task_id: str
    key: str | None
    """The scoped idempotency key the task was created for (at most one live task per key),
    or None for a call without a key."""
    scope: str
    """The principal's scope (the prefix of :func:`~rmcp_actors.server.store_key`): only
    callers of that scope may see the task."""
    fingerprint: str
    tool: str
    state: TaskState
    owner: str
    """The server instance running (or that ran) the task."""
    result: bytes | None = None
    """The encoded outcome of a finished run (a result or a JSON-RPC error)."""
    message: str | None = None
    """Why the task ended as it did, for a reader (``statusMessage``)."""
    created_at: str
    """When the task was created, ISO 8601 (wall clock, whatever the store's clock)."""
    updated_at: str
    """When its state last changed, ISO 8601."""
    created_clock: float = 0.0
    """Creation time on the store's clock: the base of the lifetime."""
    expires_at: float = 0.0
    """When the task is gone, on the store's clock (``WORKING`` with a live owner: never)."""
    ttl_s: float = 0.0
    """The lifetime asked for at creation; a run finishing later keeps the task as long again."""
    owner_alive: bool = True

    @property
    def in_doubt(self) -> bool:
        """A run that never recorded an outcome and never will: ``WORKING``, owner gone."""
        return self.state is TaskState.WORKING and not self.owner_alive


class WouldWait(enum.Enum):
    """The answer of an ``ImmediateStore`` method that returns a record or None, when it would
    have to wait: nothing was done, call the async method (the only member: :data:`WOULD_WAIT`)."""

    WOULD_WAIT = "would_wait"


WOULD_WAIT = WouldWait.WOULD_WAIT
"""See :class:`WouldWait`; compare with ``is``."""


class ImmediateStore(DedupStore, Protocol):
    """A dedup store that can often answer the hot path's three calls at once.

    Each ``*_now`` method does what its async counterpart does, as atomically and as
    durably (a result is on disk when :meth:`complete_now` returns True, in a durable store),
    when it can do so without waiting for anything: no lock held by another connection or
    process, no worker thread, no network. Otherwise it changes nothing and returns None
    (False for :meth:`complete_now`), and the server calls the async method. Errors are
    raised as the async methods raise them.

    The server calls these on the event loop's thread and bounds none of them by its
    ``store_timeout_s``: each must return within tens of microseconds, or blocked briefly on
    one local commit. A cancel scope per call costs ~9 µs under asyncio and ~12 µs under trio,
    and a worker-thread hop ~55 µs, against a few µs for the work itself
    (``docs/design.md``, "Server-side per-call cost").

    :meth:`record_now` and :meth:`get_now` came later: the server uses them only when the class
    defines both (:func:`records_now`), and the other three whenever it defines those.

    The server uses these methods only when the store's class defines them: a wrapper that
    forwards attributes with ``__getattr__`` is called through its async methods. A subclass
    that overrides an async method must override its ``*_now`` counterpart too (to return None).
    """

    def begin_now(
        self, key: str, *, fingerprint: str, tool: str, owner: str, entered: bool = False
    ) -> BeginOutcome | None:
        """:meth:`DedupStore.begin`, at once; None when it would wait."""
        ...

    def mark_entered_now(self, key: str, *, owner: str) -> bool | None:
        """:meth:`DedupStore.mark_entered`, at once; None when it would wait."""
        ...

    def complete_now(self, key: str, *, owner: str, result: bytes) -> bool:
        """:meth:`DedupStore.complete`, at once; True when done, False when it would wait."""
        ...

    def record_now(
        self, key: str, *, fingerprint: str, tool: str, owner: str, result: bytes
    ) -> DedupRecord | WouldWait | None:
        """:meth:`DedupStore.record`, at once (as durably: fsynced in a durable store); its
        answer, or :data:`WOULD_WAIT` when it would wait (nothing written).

        Optional, with :meth:`get_now` (see :func:`records_now`)."""
        ...

    def get_now(self, key: str) -> DedupRecord | WouldWait | None:
        """:meth:`DedupStore.get`, at once; :data:`WOULD_WAIT` when it would wait."""
        ...


def immediate(store: DedupStore) -> ImmediateStore | None:
    """``store`` when its class implements :class:`ImmediateStore`, else None (attributes
    forwarded by an instance's ``__getattr__`` do not count)."""
    kind = type(store)
    if all(callable(getattr(kind, name, None)) for name in ("begin_now", "mark_entered_now", "complete_now")):
        return cast(ImmediateStore, store)
    return None


def records_now(store: DedupStore) -> ImmediateStore | None:
    """``store`` when its class implements :meth:`ImmediateStore.record_now` and
    :meth:`ImmediateStore.get_now` besides the other three, else None (as :func:`immediate`)."""
    kind = type(store)
    if immediate(store) is not None and all(
        callable(getattr(kind, name, None)) for name in ("record_now", "get_now")
    ):
        return cast(ImmediateStore, store)
    return None


@attrs.frozen(kw_only=True)
class TaskCreation:
    """What :meth:`TaskStore.create_task` did: created the task, or found its key's task."""

    created: bool
    task: TaskRecord
    """The new task, or the live task that already holds the key (its fingerprint may differ:
    a conflict for the caller to report)."""


@runtime_checkable
class TaskStore(DedupStore, Protocol):
    """A dedup store that also keeps tasks: what a server needs to run tool calls as MCP tasks.

    Task records share the store's owners and leases (a ``WORKING`` task whose owner is gone is
    in doubt) and its purge. Reads never change a task.
    """

    @property
    def ttl_s(self) -> float:
        """The longest lifetime a task may be given (the store's record TTL)."""
        ...

    async def create_task(self, task: TaskRecord, *, ttl_s: float) -> TaskCreation:
        """Atomically write ``task`` (``WORKING``, living ``ttl_s`` from now: the store sets its
        clock fields) unless its ``key`` (not None) is held by a live task, which is returned
        instead, unchanged."""
        ...

    async def get_task(self, task_id: str) -> TaskRecord | None:
        """Return the live task ``task_id``, or None when absent or expired. A pure read."""
        ...

    async def finish_task(
        self,
        task_id: str,
        *,
        owner: str,
        state: TaskState,
        result: bytes | None,
        message: str | None,
        updated_at: str,
    ) -> bool:
        """Record the end of ``owner``'s run of a ``WORKING`` task: ``state`` (terminal) with
        ``result``. Returns False, changing nothing, when the task is no longer ``WORKING`` (it
        was cancelled) or not ``owner``'s. A run that outlived the task's lifetime keeps it that
        long again from now."""
        ...

    async def cancel_task(self, task_id: str, *, message: str, updated_at: str) -> TaskRecord | None:
        """Mark a ``WORKING`` task ``CANCELLED`` (a terminal one is left as it is); return the
        task as it now stands, or None when absent or expired."""
        ...

    async def list_tasks(self, scope: str, *, offset: int, limit: int) -> list[TaskRecord]:
        """The live tasks of ``scope``, oldest first, from ``offset``, at most ``limit``."""
        ...


class TransferConflict(LookupError):
    """An upload was opened again under an existing id with another layout (chunk size, count
    or hashes): the server answers ``-32030``."""


@runtime_checkable
class BlobStore(Protocol):
    """Chunked payloads of RMCP transfers (docs/protocol.md section 9), kept beside the dedup
    records: the chunks of large results (tied to the idempotency key whose stored result holds
    their handle, and kept at least as long as that key's record) and of uploaded arguments.

    A transfer is opened, its chunks are written (in any order, each at most once per index:
    writing an index again with the same bytes is a no-op), and a result transfer, whose layout
    is known only once the tool's output has been read, is sealed with its handle. Chunks are
    stored as separate pieces (SQLite: one row per chunk), never as one giant value. A durable
    store has a chunk on disk when :meth:`write_chunk` returns. Failures are raised as in
    :class:`DedupStore`; a write that would take the store past its size cap raises
    :class:`~rmcp_actors.RMCPStoreError` with ``operation="write_chunk"`` and stores nothing.
    """

    async def open_transfer(
        self, handle: TransferHandle, *, key: str | None, scope: str, sealed: bool
    ) -> list[int]:
        """Create transfer ``handle.id`` (or find it) and return the sorted indices of the chunks
        it holds. ``key`` ties a result transfer to its idempotency key (None for an upload): the
        store key of its dedup record (as given to :meth:`DedupStore.begin`), or the task id of a
        run as a task (:class:`TaskStore`), whose record or task it outlives;
        ``scope`` is the caller's principal scope (reads from another scope find nothing).
        ``sealed=False`` opens a result being produced, whose ``handle`` is provisional (its id and
        chunk size count) until :meth:`seal_transfer`.

        Raises:
            TransferConflict: the id exists, sealed, with another layout.
        """
        ...

    async def write_chunk(self, transfer_id: str, index: int, data: bytes) -> None:
        """Store chunk ``index`` (the caller has verified it against the handle)."""
        ...

    async def seal_transfer(self, handle: TransferHandle) -> None:
        """Record the final layout of a result transfer opened with ``sealed=False``."""
        ...

    async def get_transfer(self, transfer_id: str, *, scope: str) -> TransferHandle | None:
        """The sealed handle of a transfer, or None (unknown, expired, unsealed, other scope)."""
        ...

    async def read_chunk(self, transfer_id: str, index: int, *, scope: str) -> bytes | None:
        """Chunk ``index`` of a transfer, or None when the store does not hold it."""
        ...

    async def delete_transfer(self, transfer_id: str) -> None:
        """Forget a transfer and its chunks (a result that was never stored, say)."""
        ...
