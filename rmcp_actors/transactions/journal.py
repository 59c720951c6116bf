# pyright: strict
"""The transaction journal: the records a transaction writes before it acts, and the
protocol every journal (memory, SQLite) implements.

Write-ahead: a step's intent is durable before the step is sent, its outcome before the next
step starts, a state before the transaction acts on it. After a crash the records of a
transaction say exactly which steps may have run, with which keys, and how each is undone.
Records are msgspec Structs, tagged, so a journal stores each as one JSON object.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, Literal, Protocol, runtime_checkable

import msgspec

from ._model import TransactionState, TransactionSummary

__all__ = [
    "CompensationDone",
    "CompensationSpec",
    "CompensationStarted",
    "Journal",
    "JournalRecord",
    "StateChanged",
    "StepDone",
    "StepIntent",
    "StepOutcome",
    "StepResolved",
    "TransactionBegun",
    "decode_record",
    "encode_record",
    "summarize",
]

StepOutcome = Literal["succeeded", "failed", "unknown"]


class CompensationSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A journaled ``Compensation``."""

    server: str
    tool: str
    arguments: dict[str, Any] | None = None


class TransactionBegun(msgspec.Struct, frozen=True, kw_only=True, tag="begun"):
    """A transaction was created (state ``initiated``)."""

    transaction_id: str
    name: str
    at: float
    timeout_s: float | None = None
    #: Resources declared up front: (name, shared).
    resources: tuple[tuple[str, bool], ...] = ()
    compensate_parallel: bool = False
    continue_on_compensation_failure: bool = False


class StateChanged(msgspec.Struct, frozen=True, kw_only=True, tag="state"):
    """The transaction moved to ``state`` (written before it acts on the new state)."""

    transaction_id: str
    at: float
    state: str  # a TransactionState value
    reason: str | None = None


class StepIntent(msgspec.Struct, frozen=True, kw_only=True, tag="step"):
    """Step ``step`` is about to be sent with ``idempotency_key``."""

    transaction_id: str
    step: int
    at: float
    server: str
    tool: str
    arguments: dict[str, Any] | None
    idempotency_key: str
    pivot: bool = False
    compensate_unknown: bool = True
    #: The compensation when it was given as a value; one computed from the result is in
    #: ``StepDone.compensation``.
    compensation: CompensationSpec | None = None
    #: The compensation is a function of the step's result (so a step whose outcome is
    #: unknown cannot be compensated: it goes in doubt instead).
    compensation_from_result: bool = False


class StepDone(msgspec.Struct, frozen=True, kw_only=True, tag="step_done"):
    """Step ``step`` ended: it ran (``succeeded`` or ``failed`` by the tool's own report), or
    its outcome is ``unknown``; a step that surely did not run is recorded with ``ran=False``."""

    transaction_id: str
    step: int
    at: float
    outcome: StepOutcome
    ran: bool | None = None
    attempts: int = 0
    #: The result as JSON (content, structured content, is_error), for replay and history.
    result: msgspec.Raw | None = None
    error: str | None = None
    compensation: CompensationSpec | None = None
    #: Learned by asking the server (an RMCP lookup) after the step's own answer was lost.
    looked_up: bool = False


class StepResolved(msgspec.Struct, frozen=True, kw_only=True, tag="resolved"):
    """An operator said whether an in-doubt step ran."""

    transaction_id: str
    step: int
    at: float
    ran: bool


class CompensationStarted(msgspec.Struct, frozen=True, kw_only=True, tag="compensation"):
    """The compensation of step ``step`` is about to be sent with ``idempotency_key``."""

    transaction_id: str
    step: int
    at: float
    idempotency_key: str


class CompensationDone(msgspec.Struct, frozen=True, kw_only=True, tag="compensation_done"):
    """The compensation of step ``step`` ended."""

    transaction_id: str
    step: int
    at: float
    succeeded: bool
    attempts: int = 0
    error: str | None = None
    #: It failed because the tool ran and reported an error: an RMCP server keeps that result
    #: under its key, so the next run takes a new key. Any other failure (cut short, not
    #: sent) keeps the key, so that a run whose outcome is unknown is replayed, not repeated.
    tool_failed: bool = False


JournalRecord = (
    TransactionBegun
    | StateChanged
    | StepIntent
    | StepDone
    | StepResolved
    | CompensationStarted
    | CompensationDone
)


class _StoredStepDone(StepDone, frozen=True, kw_only=True, tag="step_done"):
    """``StepDone`` as decoded: msgspec cannot decode ``Raw | None``, so ``result`` is read
    as ``Raw`` (JSON ``null`` for ``None``) and ``decode_record`` turns it back."""

    result: msgspec.Raw = msgspec.Raw(b"null")  # pyright: ignore[reportIncompatibleVariableOverride]


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(
    TransactionBegun
    | StateChanged
    | StepIntent
    | _StoredStepDone
    | StepResolved
    | CompensationStarted
    | CompensationDone
)


def encode_record(record: JournalRecord) -> bytes:
    """One record as a JSON object (its ``type`` tag included)."""
    return _encoder.encode(record)


def decode_record(data: bytes | str) -> JournalRecord:
    """The record ``encode_record`` wrote.

    Raises:
        msgspec.DecodeError: ``data`` is not a journal record.
    """
    record = _decoder.decode(data)
    if isinstance(record, _StoredStepDone):
        fields = msgspec.structs.asdict(record)
        if bytes(record.result) == b"null":
            fields["result"] = None
        return StepDone(**fields)
    return record


@runtime_checkable
class Journal(Protocol):
    """What transactions need from a journal. Safe to call from many tasks at once.

    Failures are raised as :class:`~rmcp_actors.RMCPStoreError` (the backend's error as
    ``__cause__``), and :class:`~rmcp_actors.RMCPStoreClosedError` after :meth:`aclose`.
    """

    @property
    def durable(self) -> bool:
        """Whether records survive a crash of the process."""
        ...

    async def append(self, record: JournalRecord) -> None:
        """Add ``record``; it is durable once this returns (records appended concurrently
        share one commit)."""
        ...

    async def read(self, transaction_id: str) -> list[JournalRecord]:
        """Every record of one transaction, in the order appended (empty when unknown)."""
        ...

    async def summaries(self, states: Collection[TransactionState] | None = None) -> list[TransactionSummary]:
        """The transactions in ``states`` (all when ``None``), oldest first."""
        ...

    async def aclose(self) -> None:
        """Release the journal's resources; further calls fail."""
        ...


def summarize(records: list[JournalRecord]) -> TransactionSummary:
    """The summary of one transaction from its records (the first is its ``TransactionBegun``).

    Raises:
        ValueError: ``records`` does not start with a ``TransactionBegun``.
    """
    if not records or not isinstance(begun := records[0], TransactionBegun):
        raise ValueError("a transaction's records start with its TransactionBegun")
    state = TransactionState.INITIATED
    steps = 0
    for record in records:
        if isinstance(record, StateChanged):
            state = TransactionState(record.state)
        elif isinstance(record, StepIntent):
            steps = max(steps, record.step + 1)
    return TransactionSummary(
        transaction_id=begun.transaction_id,
        name=begun.name,
        state=state,
        started_at=begun.at,
        updated_at=records[-1].at,
        steps=steps,
    )
