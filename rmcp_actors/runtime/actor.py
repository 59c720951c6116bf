"""Actors: a name, a bounded inbox and a loop that handles one message at a time.

An actor owns its state; other tasks talk to it only through its inbox, so the state needs no
locks. The inbox is bounded so a slow actor pushes back on its senders instead of growing
without limit. Request/response goes through :meth:`Actor.ask` with a one-shot
:class:`ReplySlot` carried inside the message.

An ask never outlives its actor (Erlang's monitored ``gen_server:call``): when the actor
crashes or stops, every ask waiting on it fails at once with
:class:`~rmcp_actors.errors.RMCPActorStoppedError`, and an ask to an actor that is not running
fails without waiting. Messages sent with :meth:`Actor.send` stay in the inbox across a restart;
the queued requests of failed asks are skipped, since their askers were told they never ran.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

import anyio
import anyio.abc
import attrs
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ..errors import RMCPActorStoppedError

__all__ = ["Actor", "ActorStatistics", "ReplySlot"]

T = TypeVar("T")
M = TypeVar("M")


@attrs.define(eq=False)
class ReplySlot(Generic[T]):
    """One-shot reply slot: the answer to one request, set once by the actor, awaited by the asker.

    :meth:`set` and :meth:`fail` never block, so an actor can answer without being slowed down
    by the asker; each slot takes exactly one answer. An answer to a request whose actor was
    already reported stopped (see :meth:`abandon`) is dropped: nobody waits for it.
    """

    _event: anyio.Event = attrs.field(factory=anyio.Event, init=False)
    # A 1-tuple rather than the bare value so that ``None`` stays a legal answer.
    _value: tuple[T] | None = attrs.field(default=None, init=False)
    _error: BaseException | None = attrs.field(default=None, init=False)
    _abandoned: bool = attrs.field(default=False, init=False)

    @property
    def done(self) -> bool:
        """Whether the slot has been answered (by :meth:`set` or :meth:`fail`)."""
        return self._event.is_set()

    def set(self, value: T) -> None:
        """Answer the request with a value.

        Args:
            value: The reply that :meth:`wait` returns.

        Raises:
            RuntimeError: The slot was already answered.
        """
        if self._abandoned:
            return
        self._check_unanswered()
        self._value = (value,)
        self._event.set()

    def fail(self, error: BaseException) -> None:
        """Answer the request with an error.

        Args:
            error: The exception that :meth:`wait` raises.

        Raises:
            RuntimeError: The slot was already answered.
        """
        if self._abandoned:
            return
        self._check_unanswered()
        self._error = error
        self._event.set()

    def abandon(self, error: BaseException) -> None:
        """Fail the request on the actor's behalf because it can no longer answer.

        Does nothing if the slot was answered; once abandoned, the actor's own answer, should
        it still come, is dropped instead of raising.

        Args:
            error: The exception that :meth:`wait` raises.
        """
        if self._event.is_set():
            return
        self._abandoned = True
        self._error = error
        self._event.set()

    async def wait(self) -> T:
        """Wait for the answer.

        Returns:
            The value given to :meth:`set`.

        Raises:
            BaseException: The error given to :meth:`fail`.
        """
        await self._event.wait()
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value[0]

    def _check_unanswered(self) -> None:
        if self._event.is_set():
            raise RuntimeError("reply slot already answered")


_Envelope = tuple[M, ReplySlot[Any] | None]


@attrs.frozen
class ActorStatistics:
    """A snapshot of an actor's inbox.

    Attributes:
        name: The actor's name.
        inbox_used: Messages waiting in the inbox.
        inbox_size: The inbox capacity.
        pending_asks: Asks waiting for an answer (queued or being handled).
        oldest_ask_s: How long the oldest of them has waited, or ``None`` when there is none:
            what the watchdog shows of an actor that callers wait on.
    """

    name: str
    inbox_used: int
    inbox_size: int
    # Keyword-only with defaults, so that subclasses keep declaring mandatory fields.
    pending_asks: int = attrs.field(default=0, kw_only=True)
    oldest_ask_s: float | None = attrs.field(default=None, kw_only=True)


@attrs.define(eq=False)
class Actor(Generic[M]):
    """Base class: an actor has a name, a bounded inbox of messages ``M`` and a :meth:`run` loop.

    Subclasses override :meth:`handle`. The inbox outlives :meth:`run`, so a supervisor can
    restart the actor without losing the messages still queued (but not the requests of asks,
    which fail when the actor stops: see the module docstring). ``inbox_size`` is keyword-only
    so that subclasses can declare mandatory attributes of their own.

    Attributes:
        name: Name used in statistics and errors.
        inbox_size: Messages the inbox holds before :meth:`send` waits.
    """

    name: str
    inbox_size: int = attrs.field(default=64, kw_only=True)
    # Each message travels with the reply slot of the ask that sent it (None for a plain send).
    _send: MemoryObjectSendStream[_Envelope[M]] = attrs.field(init=False)
    _receive: MemoryObjectReceiveStream[_Envelope[M]] = attrs.field(init=False)
    _running: bool = attrs.field(default=False, init=False)
    # Asks not yet answered, queued or in flight, with when they were asked: failed at once
    # when the actor stops.
    _pending: dict[ReplySlot[Any], float] = attrs.field(factory=dict[ReplySlot[Any], float], init=False)
    _in_flight: ReplySlot[Any] | None = attrs.field(default=None, init=False)
    # Asks waiting for room in a full inbox, woken when the actor stops.
    _blocked: dict[ReplySlot[Any], anyio.CancelScope] = attrs.field(
        factory=dict[ReplySlot[Any], anyio.CancelScope], init=False
    )

    def __attrs_post_init__(self) -> None:
        self._send, self._receive = anyio.create_memory_object_stream[_Envelope[M]](self.inbox_size)

    async def send(self, message: M) -> None:
        """Put a message in the inbox, waiting while it is full (backpressure).

        Args:
            message: The message to deliver.
        """
        await self._send.send((message, None))

    def send_nowait(self, message: M) -> None:
        """Put a message in the inbox without waiting.

        Args:
            message: The message to deliver.

        Raises:
            anyio.WouldBlock: The inbox is full.
        """
        self._send.send_nowait((message, None))

    async def ask(self, make: Callable[[ReplySlot[T]], M]) -> T:
        """Send a request and wait for its reply.

        Args:
            make: Builds the message around a fresh reply slot, which the actor answers.

        Returns:
            The value the actor set on the slot.

        Raises:
            RMCPActorStoppedError: The actor is not running, or stopped or crashed before it
                answered (``may_have_executed`` says whether it had started on the request).
            BaseException: The error the actor failed the slot with.
        """
        if not self._running:
            raise RMCPActorStoppedError(
                f"actor {self.name!r} is not running (stopped, or restarting after a crash); "
                "ask again once it has started",
                actor=self.name,
            )
        slot = ReplySlot[T]()
        envelope = (make(slot), slot)
        self._pending[slot] = anyio.current_time()
        try:
            try:
                self._send.send_nowait(envelope)
            except anyio.WouldBlock:
                with anyio.CancelScope() as sending:
                    self._blocked[slot] = sending
                    try:
                        await self._send.send(envelope)
                    finally:
                        del self._blocked[slot]
            return await slot.wait()
        finally:
            self._pending.pop(slot, None)

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Handle messages one at a time, forever.

        Args:
            task_status: Told ``started()`` once the actor accepts messages.

        Raises:
            Exception: Whatever :meth:`handle` raises; the actor's supervisor decides what follows.
        """
        self._running = True
        crash: Exception | None = None
        try:
            task_status.started()
            async for message, slot in self._receive:
                if slot is not None:
                    if slot.done:
                        continue  # its asker was told the actor stopped before handling it
                    self._in_flight = slot
                await self.handle(message)
                self._in_flight = None
        except Exception as exc:
            crash = exc
            raise
        finally:
            self._running = False
            self._fail_pending(crash)

    def _fail_pending(self, crash: Exception | None) -> None:
        how = f"crashed ({type(crash).__name__}: {crash})" if crash is not None else "stopped"
        for slot in self._pending:
            in_flight = slot is self._in_flight
            done = (
                "while handling this request, which may have had effects"
                if in_flight
                else "before handling this request, which will not be handled"
            )
            error = RMCPActorStoppedError(
                f"actor {self.name!r} {how} {done}; ask again once it has restarted",
                actor=self.name,
                may_have_executed=in_flight,
            )
            error.__cause__ = crash
            slot.abandon(error)
        self._pending.clear()
        self._in_flight = None
        for sending in self._blocked.values():
            sending.cancel()

    async def handle(self, message: M) -> None:
        """Handle one message; subclasses override this.

        Args:
            message: The message taken from the inbox.

        Raises:
            NotImplementedError: The subclass did not override it.
        """
        raise NotImplementedError(f"{type(self).__name__} must override handle()")

    def statistics(self) -> ActorStatistics:
        """Return a snapshot of the inbox.

        Returns:
            The actor's name, the messages waiting, the inbox capacity and the asks waiting.
        """
        # Asks are kept in the order they were made: the first is the oldest.
        oldest = next(iter(self._pending.values()), None)
        return ActorStatistics(
            name=self.name,
            inbox_used=self._send.statistics().current_buffer_used,
            inbox_size=self.inbox_size,
            pending_asks=len(self._pending),
            oldest_ask_s=None if oldest is None else anyio.current_time() - oldest,
        )
