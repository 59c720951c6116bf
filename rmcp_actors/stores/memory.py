"""The in-memory dedup store: a bounded LRU with a TTL, for a single server process.

Records die with the process, so a client must not retry an ambiguous call across a server
restart against it (``durable`` is False). Nothing here does I/O: the methods are async only
to satisfy :class:`~rmcp_actors.stores.DedupStore`, and each runs without a checkpoint, so
every operation is atomic with respect to other tasks.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import final

import anyio.lowlevel
import attrs

from .._transfer import TransferHandle
from ..errors import RMCPConfigError, RMCPStoreClosedError, RMCPUnknownOwnerError
from ._base import (
    BeginOutcome,
    DedupRecord,
    OwnerInfo,
    RecordState,
    TaskCreation,
    TaskRecord,
    TaskState,
    TransferConflict,
)
from ._blobs import (
    DEFAULT_MAX_BLOB_BYTES,
    DEFAULT_UPLOAD_TTL_S,
    blob_cap_error,
    check_blob_limits,
    same_layout,
    unknown_transfer,
)

__all__ = ["MemoryStore"]

#: Records purge_expired() checks between two checkpoints.
_PURGE_BATCH = 1_000


@attrs.define(eq=False)
class _Entry:
    fingerprint: str
    tool: str
    state: RecordState
    owner: str
    result: bytes | None
    created_at: float
    expires_at: float
    entered: bool = False


@attrs.define(eq=False)
class _Transfer:
    handle: TransferHandle
    key: str | None
    scope: str
    sealed: bool
    opened_at: float
    chunks: dict[int, bytes] = attrs.Factory(dict[int, bytes])


def _own_entered(entry: _Entry, owner: str) -> bool:
    """An entered run of ``owner`` itself: in doubt when none of its tasks runs it (the
    server knows; the store does not)."""
    return entry.state is RecordState.STARTED and entry.entered and entry.owner == owner


@final
class MemoryStore:
    """A dedup store held in this process's memory: least recently used records go first.

    When the store is full, the least recently used ``COMPLETED`` or ``IN_DOUBT`` record (or
    any expired one) is evicted to make room. A ``STARTED`` record is never evicted, because
    losing it would let a duplicate run the tool a second time; when every record is
    ``STARTED``, the store grows past ``max_entries`` until some of them finish.

    Args:
        max_entries: How many records to keep before evicting.
        ttl_s: How long a record lives, counted from its creation.
        clock: The time source for expiries and leases, in seconds; ``time.monotonic`` by
            default. Tests pass ``trio.current_time`` to run under a mock clock.
        max_blob_bytes: The most bytes of transfer chunks held at once (see
            :class:`~rmcp_actors.stores.BlobStore`); 1 GiB by default.
        upload_ttl_s: How long an upload (a transfer without a key) lives after it was last
            opened; an hour by default.

    Raises:
        RMCPConfigError: When ``max_entries``, ``ttl_s``, ``max_blob_bytes`` or
            ``upload_ttl_s`` is not positive.
    """

    def __init__(
        self,
        *,
        max_entries: int = 100_000,
        ttl_s: float = 86_400.0,
        clock: Callable[[], float] | None = None,
        max_blob_bytes: int = DEFAULT_MAX_BLOB_BYTES,
        upload_ttl_s: float = DEFAULT_UPLOAD_TTL_S,
    ) -> None:
        if max_entries <= 0:
            raise RMCPConfigError(
                f"must be a positive number of records, got {max_entries!r}", path="max_entries"
            )
        if not ttl_s > 0:
            raise RMCPConfigError(f"must be a positive number of seconds, got {ttl_s!r}", path="ttl_s")
        check_blob_limits(max_blob_bytes, upload_ttl_s)
        self._max_entries = max_entries
        self._ttl_s = ttl_s
        self._clock = clock or time.monotonic
        self._records: OrderedDict[str, _Entry] = OrderedDict()
        # Tasks in creation order (tasks/list pages through them), and the live task of each key.
        self._tasks: dict[str, TaskRecord] = {}
        self._task_keys: dict[str, str] = {}
        # instance_id -> lease expiry. A released owner keeps its entry, as in SQLiteStore, for
        # ttl_s after its lease: a late renewal must find it released, not revive it.
        self._owner_leases: dict[str, float] = {}
        self._released_owners: set[str] = set()
        # Owners are pruned when their number doubles: a server restarting all day registers a
        # new instance each time, and only those of the last ttl_s can still matter.
        self._owners_after_prune = 0
        self._transfers: dict[str, _Transfer] = {}
        self._max_blob_bytes = max_blob_bytes
        self._upload_ttl_s = upload_ttl_s
        self._blob_bytes = 0
        self._closed = False

    @property
    def durable(self) -> bool:
        """Always False: records are lost when the process exits."""
        return False

    @property
    def ttl_s(self) -> float:
        """How long a record lives, counted from its creation."""
        return self._ttl_s

    async def register_owner(self, owner: OwnerInfo, lease_s: float) -> None:
        """Record ``owner`` as alive for ``lease_s`` seconds."""
        self._check_open()
        now = self._clock()
        self._owner_leases[owner.instance_id] = now + lease_s
        self._released_owners.discard(owner.instance_id)
        if len(self._owner_leases) > 2 * self._owners_after_prune + 16:
            self._prune_owners(now)

    async def renew_owner(self, instance_id: str, lease_s: float) -> None:
        """Extend the lease of a registered owner by ``lease_s`` from now.

        A released owner stays released: renewing it does nothing.

        Raises:
            RMCPUnknownOwnerError: When the owner was never registered.
        """
        self._check_open()
        if instance_id not in self._owner_leases:
            raise RMCPUnknownOwnerError(
                f"owner {instance_id!r} is not registered: call register_owner first", operation="renew_owner"
            )
        if instance_id not in self._released_owners:
            self._owner_leases[instance_id] = self._clock() + lease_s

    async def release_owner(self, instance_id: str) -> None:
        """Mark the owner as gone; its unfinished records read ``owner_alive=False``."""
        self._check_open()
        if instance_id in self._owner_leases:
            self._released_owners.add(instance_id)

    async def begin(
        self, key: str, *, fingerprint: str, tool: str, owner: str, entered: bool = False
    ) -> BeginOutcome:
        """Claim ``key`` as ``STARTED`` by ``owner``, unless a live record exists; with
        ``entered``, claimed already entered, unless ``owner``'s lease lapsed."""
        return self.begin_now(key, fingerprint=fingerprint, tool=tool, owner=owner, entered=entered)

    def begin_now(
        self, key: str, *, fingerprint: str, tool: str, owner: str, entered: bool = False
    ) -> BeginOutcome:
        """:meth:`begin`, which never waits."""
        self._check_open()
        now = self._clock()
        existing = self._live_entry(key, now)
        if existing is not None and not self._claimable(existing, fingerprint, owner, now):
            return BeginOutcome(claimed=False, existing=self._to_record(key, existing, now))
        if entered and not self._owner_alive(owner, now):
            return BeginOutcome(claimed=False, existing=None)
        return self._put(key, existing, fingerprint, tool, RecordState.STARTED, owner, now, entered=entered)

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
        """Record ``key`` as ``ABORTED`` (never run, never to run) where :meth:`begin` would
        claim it, or, with ``in_doubt``, over an in-doubt record of this ``fingerprint``."""
        self._check_open()
        now = self._clock()
        existing = self._live_entry(key, now)
        if existing is not None and not (
            self._claimable(existing, fingerprint, owner, now)
            or (
                in_doubt
                and existing.fingerprint == fingerprint
                and (self._to_record(key, existing, now).in_doubt or _own_entered(existing, owner))
                and doubted_owner in (None, existing.owner)
            )
        ):
            return BeginOutcome(claimed=False, existing=self._to_record(key, existing, now))
        return self._put(key, existing, fingerprint, tool, RecordState.ABORTED, owner, now)

    def _claimable(self, existing: _Entry, fingerprint: str, owner: str, now: float) -> bool:
        """Whether a claim of ``owner`` may replace ``existing``: a claim of the same call that
        never entered its tool, by ``owner`` itself or by an owner that is gone."""
        return (
            existing.state is RecordState.STARTED
            and not existing.entered
            and existing.fingerprint == fingerprint
            and (existing.owner == owner or not self._owner_alive(existing.owner, now))
        )

    def _put(
        self,
        key: str,
        existing: _Entry | None,
        fingerprint: str,
        tool: str,
        state: RecordState,
        owner: str,
        now: float,
        *,
        entered: bool = False,
    ) -> BeginOutcome:
        """Store a fresh record of ``key`` in ``state`` (over ``existing``, if any)."""
        if existing is None:
            self._make_room(now)
        self._records[key] = _Entry(
            fingerprint=fingerprint,
            tool=tool,
            state=state,
            owner=owner,
            result=None,
            created_at=now,
            expires_at=now + self._ttl_s,
            entered=entered,
        )
        return BeginOutcome(claimed=True, existing=None, taken_over=existing is not None)

    async def record(
        self, key: str, *, fingerprint: str, tool: str, owner: str, result: bytes
    ) -> DedupRecord | None:
        """Write ``key`` as ``COMPLETED`` with ``result``, unclaimed, where :meth:`begin` would
        claim it (None); else return the live record, changing nothing."""
        return self.record_now(key, fingerprint=fingerprint, tool=tool, owner=owner, result=result)

    def record_now(
        self, key: str, *, fingerprint: str, tool: str, owner: str, result: bytes
    ) -> DedupRecord | None:
        """:meth:`record`, which never waits."""
        self._check_open()
        now = self._clock()
        existing = self._live_entry(key, now)
        if existing is not None and not self._claimable(existing, fingerprint, owner, now):
            return self._to_record(key, existing, now)
        self._put(key, existing, fingerprint, tool, RecordState.COMPLETED, owner, now, entered=True)
        self._records[key].result = result
        return None

    async def mark_entered(self, key: str, *, owner: str) -> bool:
        """Mark the claim of ``key`` by ``owner`` as entered; False when it is not ``STARTED``
        by ``owner`` (taken over) or ``owner``'s lease lapsed: the tool must not be called then."""
        return self.mark_entered_now(key, owner=owner)

    def mark_entered_now(self, key: str, *, owner: str) -> bool:
        """:meth:`mark_entered`, which never waits."""
        self._check_open()
        entry = self._claimed_entry(key, owner)
        # An owner past its lease reads as gone: entered now, its claim would be in doubt at
        # once, and a reconciler finding no effect yet would let another claimant run it too.
        if entry is None or not self._owner_alive(owner, self._clock()):
            return False
        entry.entered = True
        return True

    async def resolve_in_doubt(self, key: str, *, owner: str, fingerprint: str, result: bytes | None) -> bool:
        """Settle an in-doubt ``key``: ``COMPLETED`` with ``result``, or, with None, claimed
        anew by ``owner``. False, changing nothing, unless the record is in doubt (or an
        entered claim of ``owner`` itself) with this ``fingerprint``."""
        self._check_open()
        now = self._clock()
        entry = self._live_entry(key, now)
        if entry is None or entry.fingerprint != fingerprint:
            return False
        if entry.state is RecordState.STARTED:
            if not entry.entered or (entry.owner != owner and self._owner_alive(entry.owner, now)):
                return False
        elif entry.state is not RecordState.IN_DOUBT:
            return False
        entry.owner = owner
        entry.expires_at = max(entry.expires_at, now + self._ttl_s)
        if result is None:
            entry.state, entry.entered = RecordState.STARTED, False
        else:
            entry.state, entry.result = RecordState.COMPLETED, result
        return True

    async def complete(self, key: str, *, owner: str, result: bytes) -> None:
        """Store the result of the run ``owner`` started.

        Does nothing when ``key`` is no longer ``STARTED`` by ``owner`` (it expired and was
        claimed again, or was already finished).
        """
        self.complete_now(key, owner=owner, result=result)

    def complete_now(self, key: str, *, owner: str, result: bytes) -> bool:
        """:meth:`complete`, which never waits (always True)."""
        self._check_open()
        entry = self._claimed_entry(key, owner)
        if entry is not None:
            entry.state = RecordState.COMPLETED
            entry.result = result
            # A run that outlived the TTL must not expire the moment it is recorded.
            entry.expires_at = max(entry.expires_at, self._clock() + self._ttl_s)
        return True

    async def mark_in_doubt(self, key: str, *, owner: str) -> None:
        """Record that the run ``owner`` started was cut short; no-op unless it is ``STARTED``."""
        self._check_open()
        entry = self._claimed_entry(key, owner)
        if entry is not None:
            entry.state = RecordState.IN_DOUBT
            entry.expires_at = max(entry.expires_at, self._clock() + self._ttl_s)

    async def release(self, key: str, *, owner: str) -> bool:
        """Delete the ``STARTED`` record of ``key`` claimed by ``owner`` (its tool refused and
        did nothing); False, changing nothing, unless it is ``STARTED`` by ``owner``."""
        self._check_open()
        if self._claimed_entry(key, owner) is None:
            return False
        del self._records[key]
        return True

    async def get(self, key: str) -> DedupRecord | None:
        """Return the live record of ``key``, or None when absent or expired."""
        return self.get_now(key)

    def get_now(self, key: str) -> DedupRecord | None:
        """:meth:`get`, which never waits."""
        self._check_open()
        now = self._clock()
        entry = self._live_entry(key, now)
        return None if entry is None else self._to_record(key, entry, now)

    async def purge_expired(self) -> int:
        """Delete expired records and tasks, transfers past their lifetime (a result's once its
        key has no live record or task, an upload's ``upload_ttl_s`` after it was last opened), and
        owners whose lease ended more than ``ttl_s`` ago and that have no records left; return
        how many records, tasks and transfers were deleted.

        Checks at most 1,000 records between two checkpoints, so that purging a large store
        does not hold up the event loop's other tasks.
        """
        self._check_open()
        keys = list(self._records)
        deleted = 0
        for start in range(0, len(keys), _PURGE_BATCH):
            now = self._clock()
            for key in keys[start : start + _PURGE_BATCH]:
                # Other tasks ran since the snapshot: the key may be gone, or claimed anew.
                entry = self._records.get(key)
                if entry is not None and self._expired(entry, now):
                    del self._records[key]
                    deleted += 1
            await anyio.lowlevel.checkpoint()
        now = self._clock()
        for task_id in [task_id for task_id, task in self._tasks.items() if self._task_expired(task, now)]:
            self._drop_task(task_id)
            deleted += 1
        deleted += self._purge_transfers(now)
        self._prune_owners(self._clock())
        return deleted

    async def aclose(self) -> None:
        """Drop every record; further calls raise :class:`~rmcp_actors.RMCPStoreClosedError`."""
        self._closed = True
        self._records.clear()
        self._tasks.clear()
        self._task_keys.clear()
        self._owner_leases.clear()
        self._released_owners.clear()
        self._transfers.clear()
        self._blob_bytes = 0

    async def create_task(self, task: TaskRecord, *, ttl_s: float) -> TaskCreation:
        """Write ``task`` unless its key is held by a live task, which is returned instead."""
        self._check_open()
        now = self._clock()
        if task.key is not None:
            holder = self._task_keys.get(task.key)
            existing = None if holder is None else self._live_task(holder, now)
            if existing is not None:
                return TaskCreation(created=False, task=existing)
            if holder is not None and holder in self._tasks:
                self._drop_task(holder)
            self._task_keys[task.key] = task.task_id
        stored = attrs.evolve(
            task, state=TaskState.WORKING, created_clock=now, expires_at=now + ttl_s, ttl_s=ttl_s
        )
        self._tasks[task.task_id] = stored
        return TaskCreation(created=True, task=self._with_owner(stored, now))

    async def get_task(self, task_id: str) -> TaskRecord | None:
        """Return the live task ``task_id``, or None. Changes nothing (an expired task stays
        until the next purge)."""
        self._check_open()
        return self._live_task(task_id, self._clock())

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
        """Record the end of ``owner``'s run of a ``WORKING`` task; False when it is no longer
        ``WORKING`` (cancelled) or not ``owner``'s."""
        self._check_open()
        task = self._tasks.get(task_id)
        if task is None or task.state is not TaskState.WORKING or task.owner != owner:
            return False
        now = self._clock()
        self._tasks[task_id] = attrs.evolve(
            task,
            state=state,
            result=result,
            message=message,
            updated_at=updated_at,
            # Past its lifetime (a long run), it lives one lifetime from now.
            expires_at=task.expires_at if task.expires_at > now else now + task.ttl_s,
        )
        return True

    async def cancel_task(self, task_id: str, *, message: str, updated_at: str) -> TaskRecord | None:
        """Mark a ``WORKING`` task ``CANCELLED``; return it as it stands, or None."""
        self._check_open()
        now = self._clock()
        task = self._live_task(task_id, now)
        if task is None or task.state is not TaskState.WORKING:
            return task
        cancelled = attrs.evolve(task, state=TaskState.CANCELLED, message=message, updated_at=updated_at)
        self._tasks[task_id] = cancelled
        return cancelled

    async def list_tasks(self, scope: str, *, offset: int, limit: int) -> list[TaskRecord]:
        """The live tasks of ``scope``, oldest first, from ``offset``, at most ``limit``."""
        self._check_open()
        now = self._clock()
        live = [
            self._with_owner(task, now)
            for task in self._tasks.values()
            if task.scope == scope and not self._task_expired(task, now)
        ]
        return live[offset : offset + limit]

    async def open_transfer(
        self, handle: TransferHandle, *, key: str | None, scope: str, sealed: bool
    ) -> list[int]:
        """Create transfer ``handle.id``, or find it, and return the indices of its chunks held.

        Opening a sealed transfer again with the same layout resumes it (an upload's lifetime
        starts over). An unsealed one is the output of a run cut short: opening it again starts
        it over, without its chunks, since a new run may produce other bytes.

        Raises:
            TransferConflict: The id is held, sealed, with another layout, or by another scope.
            RMCPStoreError: A sealed ``handle`` alone is larger than ``max_blob_bytes``.
        """
        self._check_open()
        now = self._clock()
        # Nothing else purges a server's memory store: each new transfer clears out the dead ones.
        self._purge_transfers(now)
        existing = self._live_transfer(handle.id, now)
        if existing is not None:
            if existing.scope != scope:
                raise TransferConflict(f"transfer {handle.id!r} belongs to another scope")
            if existing.sealed:
                if not same_layout(existing.handle, handle):
                    raise TransferConflict(f"transfer {handle.id!r} is held with another layout")
                existing.opened_at = now
                return sorted(existing.chunks)
            self._drop_transfer(handle.id)
        if sealed and handle.size > self._max_blob_bytes:
            raise blob_cap_error("open_transfer", self._blob_bytes, handle.size, self._max_blob_bytes)
        self._transfers[handle.id] = _Transfer(
            handle=handle, key=key, scope=scope, sealed=sealed, opened_at=now
        )
        return []

    async def write_chunk(self, transfer_id: str, index: int, data: bytes) -> None:
        """Store chunk ``index``; the first bytes written for an index stay (the caller
        verified them against the handle, so a second write carries the same ones).

        Raises:
            TransferConflict: The store does not hold the transfer (never opened, expired).
            RMCPStoreError: The chunk would take the store past ``max_blob_bytes``.
        """
        self._check_open()
        now = self._clock()
        transfer = self._live_transfer(transfer_id, now)
        if transfer is None:
            raise unknown_transfer(transfer_id)
        if index in transfer.chunks:
            return
        if self._blob_bytes + len(data) > self._max_blob_bytes:
            # Room held by dead transfers is not a reason to refuse.
            self._purge_transfers(now)
        if self._blob_bytes + len(data) > self._max_blob_bytes:
            raise blob_cap_error("write_chunk", self._blob_bytes, len(data), self._max_blob_bytes)
        transfer.chunks[index] = data
        self._blob_bytes += len(data)

    async def seal_transfer(self, handle: TransferHandle) -> None:
        """Record the final layout of a result transfer; sealing it again with the same layout
        does nothing.

        Raises:
            TransferConflict: The store does not hold the transfer, or holds it sealed with
                another layout.
        """
        self._check_open()
        transfer = self._live_transfer(handle.id, self._clock())
        if transfer is None:
            raise unknown_transfer(handle.id)
        if transfer.sealed and not same_layout(transfer.handle, handle):
            raise TransferConflict(f"transfer {handle.id!r} is sealed with another layout")
        transfer.handle, transfer.sealed = handle, True

    async def get_transfer(self, transfer_id: str, *, scope: str) -> TransferHandle | None:
        """The sealed handle of a transfer of ``scope``, or None."""
        self._check_open()
        transfer = self._live_transfer(transfer_id, self._clock())
        if transfer is None or transfer.scope != scope or not transfer.sealed:
            return None
        return transfer.handle

    async def read_chunk(self, transfer_id: str, index: int, *, scope: str) -> bytes | None:
        """Chunk ``index`` of a transfer of ``scope``, or None when not held."""
        self._check_open()
        transfer = self._live_transfer(transfer_id, self._clock())
        if transfer is None or transfer.scope != scope:
            return None
        return transfer.chunks.get(index)

    async def delete_transfer(self, transfer_id: str) -> None:
        """Forget a transfer and free its chunks' bytes; an unknown id is no error."""
        self._check_open()
        if transfer_id in self._transfers:
            self._drop_transfer(transfer_id)

    def _live_transfer(self, transfer_id: str, now: float) -> _Transfer | None:
        """The transfer ``transfer_id`` unless it is an upload past its lifetime. A result's
        chunks stay readable until a purge finds its key's record gone: they must outlive it."""
        transfer = self._transfers.get(transfer_id)
        if transfer is None or (transfer.key is None and self._upload_expired(transfer, now)):
            return None
        return transfer

    def _upload_expired(self, transfer: _Transfer, now: float) -> bool:
        return transfer.opened_at + self._upload_ttl_s <= now

    def _transfer_gone(self, transfer: _Transfer, now: float) -> bool:
        if transfer.key is None:
            return self._upload_expired(transfer, now)
        entry = self._records.get(transfer.key)
        if entry is not None and not self._expired(entry, now):
            return False
        task = self._tasks.get(transfer.key)
        return task is None or self._task_expired(task, now)

    def _purge_transfers(self, now: float) -> int:
        gone = [tid for tid, transfer in self._transfers.items() if self._transfer_gone(transfer, now)]
        for transfer_id in gone:
            self._drop_transfer(transfer_id)
        return len(gone)

    def _drop_transfer(self, transfer_id: str) -> None:
        transfer = self._transfers.pop(transfer_id)
        self._blob_bytes -= sum(len(chunk) for chunk in transfer.chunks.values())

    def _live_task(self, task_id: str, now: float) -> TaskRecord | None:
        task = self._tasks.get(task_id)
        if task is None or self._task_expired(task, now):
            return None
        return self._with_owner(task, now)

    def _task_expired(self, task: TaskRecord, now: float) -> bool:
        """Past its lifetime, unless it is a run whose owner is alive (as a record's claim)."""
        if task.expires_at > now:
            return False
        return task.state is not TaskState.WORKING or not self._owner_alive(task.owner, now)

    def _with_owner(self, task: TaskRecord, now: float) -> TaskRecord:
        return attrs.evolve(task, owner_alive=self._owner_alive(task.owner, now))

    def _drop_task(self, task_id: str) -> None:
        task = self._tasks.pop(task_id)
        if task.key is not None and self._task_keys.get(task.key) == task_id:
            del self._task_keys[task.key]

    def _check_open(self) -> None:
        if self._closed:
            raise RMCPStoreClosedError("this MemoryStore was closed: create a new store")

    def _live_entry(self, key: str, now: float) -> _Entry | None:
        """The unexpired entry of ``key``, marked as the most recently used."""
        entry = self._records.get(key)
        if entry is None:
            return None
        if self._expired(entry, now):
            del self._records[key]
            return None
        self._records.move_to_end(key)
        return entry

    def _expired(self, entry: _Entry, now: float) -> bool:
        """Past its TTL, unless it is a run whose owner is still alive: a run outliving the
        TTL must not let another caller claim the key and run the tool again."""
        if entry.expires_at > now:
            return False
        return entry.state is not RecordState.STARTED or not self._owner_alive(entry.owner, now)

    def _owner_alive(self, owner: str, now: float) -> bool:
        lease_expires_at = self._owner_leases.get(owner)
        return lease_expires_at is not None and lease_expires_at > now and owner not in self._released_owners

    def _prune_owners(self, now: float) -> None:
        cutoff = now - self._ttl_s
        on_record = {entry.owner for entry in self._records.values()}
        on_record.update(task.owner for task in self._tasks.values())
        for instance_id, lease_expires_at in list(self._owner_leases.items()):
            if lease_expires_at <= cutoff and instance_id not in on_record:
                del self._owner_leases[instance_id]
                self._released_owners.discard(instance_id)
        self._owners_after_prune = len(self._owner_leases)

    def _claimed_entry(self, key: str, owner: str) -> _Entry | None:
        entry = self._records.get(key)
        if entry is None or entry.owner != owner or entry.state is not RecordState.STARTED:
            return None
        self._records.move_to_end(key)
        return entry

    def _make_room(self, now: float) -> None:
        while len(self._records) >= self._max_entries:
            victim = next(
                (
                    key
                    for key, entry in self._records.items()
                    if entry.state is not RecordState.STARTED or self._expired(entry, now)
                ),
                None,
            )
            if victim is None:
                # Every record is a run in progress: exceed the bound rather than lose one.
                return
            del self._records[victim]

    def _to_record(self, key: str, entry: _Entry, now: float) -> DedupRecord:
        return DedupRecord(
            key=key,
            fingerprint=entry.fingerprint,
            tool=entry.tool,
            state=entry.state,
            owner=entry.owner,
            owner_alive=self._owner_alive(entry.owner, now),
            result=entry.result,
            created_at=entry.created_at,
            expires_at=entry.expires_at,
            entered=entry.entered,
        )
