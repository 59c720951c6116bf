"""Actors: a name, a bounded inbox and a loop that handles one message at a time.

An actor owns its state; other tasks talk to it only through its inbox, so the state needs no
locks. The inbox is bounded so a slow actor pushes back on its senders instead of growing
without limit. Request/response goes through :meth:`Actor.ask` with a one-shot
:class:`ReplySlot` carried inside the message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

import anyio
import anyio.abc
import attrs
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

__all__ = ["Actor", "ActorStatistics", "ReplySlot"]

T = TypeVar("T")
M = TypeVar("M")


@attrs.define(eq=False)
class ReplySlot(Generic[T]):
    """One-shot reply slot: the answer to one request, set once by the actor, awaited by the asker.

    :meth:`set` and :meth:`fail` never block, so an actor can answer without being slowed down
    by the asker; each slot takes exactly one answer.
    """

    _event: anyio.Event = attrs.field(factory=anyio.Event, init=False)
    # A 1-tuple rather than the bare value so that ``None`` stays a legal answer.
    _value: tuple[T] | None = attrs.field(default=None, init=False)
    _error: BaseException | None = attrs.field(default=None, init=False)

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
        self._check_unanswered()
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


@attrs.frozen
class ActorStatistics:
    """A snapshot of an actor's inbox.

    Attributes:
        name: The actor's name.
        inbox_used: Messages waiting in the inbox.
        inbox_size: The inbox capacity.
    """

    name: str
    inbox_used: int
    inbox_size: int


@attrs.define(eq=False)
class Actor(Generic[M]):
    """Base class: an actor has a name, a bounded inbox of messages ``M`` and a :meth:`run` loop.

    Subclasses override :meth:`handle`. The inbox outlives :meth:`run`, so a supervisor can
    restart the actor without losing the messages still queued. ``inbox_size`` is keyword-only
    so that subclasses can declare mandatory attributes of their own.

    Attributes:
        name: Name used in statistics and errors.
        inbox_size: Messages the inbox holds before :meth:`send` waits.
    """

    name: str
    inbox_size: int = attrs.field(default=64, kw_only=True)
    _send: MemoryObjectSendStream[M] = attrs.field(init=False)
    _receive: MemoryObjectReceiveStream[M] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._send, self._receive = anyio.create_memory_object_stream[M](self.inbox_size)

    async def send(self, message: M) -> None:
        """Put a message in the inbox, waiting while it is full (backpressure).

        Args:
            message: The message to deliver.
        """
        await self._send.send(message)

    def send_nowait(self, message: M) -> None:
        """Put a message in the inbox without waiting.

        Args:
            message: The message to deliver.

        Raises:
            anyio.WouldBlock: The inbox is full.
        """
        self._send.send_nowait(message)

    async def ask(self, make: Callable[[ReplySlot[T]], M]) -> T:
        """Send a request and wait for its reply.

        Args:
            make: Builds the message around a fresh reply slot, which the actor answers.

        Returns:
            The value the actor set on the slot.

        Raises:
            BaseException: The error the actor failed the slot with.
        """
        slot = ReplySlot[T]()
        await self.send(make(slot))
        return await slot.wait()

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Handle messages one at a time, forever.

        Args:
            task_status: Told ``started()`` once the actor accepts messages.

        Raises:
            Exception: Whatever :meth:`handle` raises; the actor's supervisor decides what follows.
        """
        task_status.started()
        async for message in self._receive:
            await self.handle(message)

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
            The actor's name, the messages waiting and the inbox capacity.
        """
        return ActorStatistics(
            name=self.name,
            inbox_used=self._send.statistics().current_buffer_used,
            inbox_size=self.inbox_size,
        )
