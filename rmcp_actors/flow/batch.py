"""Batches: many calls of one tool over a stream of arguments, results streamed back (``sup.map``).

A :class:`Batch` owns a task group of ``concurrency`` workers. Each worker takes the next item
from the input (lazily: a generator of a million items is never materialised), makes the call,
and leaves ``(index, outcome)`` for the consumer. A worker takes an item only while fewer than
a bound of items are started and not yet yielded (twice the concurrency, or the reorder window
in input order), so memory is bounded whatever the length of the input, and a consumer that
falls behind slows the batch down instead of growing a buffer. The task group lives exactly as
long as the ``async with`` block: leaving it, by a ``break``, an exception or a cancellation,
cancels the calls in flight and joins every worker, as trio's rules for structured concurrency
require (an iterator alone could not: nothing would close it when a consumer stops iterating).
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any, final

import anyio
import anyio.lowlevel
import attrs
from anyio.abc import TaskGroup

from ..errors import RMCPArgumentError, RMCPError, UnknownServerError
from ..result import CallResult

__all__ = ["Batch", "BatchStatistics", "ItemCall", "KeyFunction"]

#: One call of the batch: ``(arguments, idempotency_key)`` to a result, or an RMCPError raised.
ItemCall = Callable[[Mapping[str, Any] | None, str | None], Awaitable[CallResult]]
#: Gives an item's idempotency key, so that a rerun of the batch replays finished items
#: (``None``: a fresh key for that item).
KeyFunction = Callable[[Any], str | None]

_Outcome = tuple[int, CallResult | RMCPError]
_NOT_ENTERED = (
    "a batch runs inside its own block: use `async with sup.map(...) as results:` and then "
    "`async for index, outcome in results:` in that block"
)


@final
@attrs.frozen
class BatchStatistics:
    """A snapshot of a batch's progress (see :meth:`Batch.statistics`).

    Attributes:
        concurrency: Calls the batch runs at once, at most.
        window: In input order, the reorder window (items started and not yet yielded, at
            most); ``None`` in completion order.
        started: Items taken from the input and handed to the call path.
        completed: Items whose call ended (with a result or an error).
        yielded: Outcomes the consumer received.
        peak_outstanding: The most items started and not yet yielded at any moment: the
            memory bound in items (``concurrency`` in flight plus those waiting to be yielded).
        exhausted: The input has no more items (or the batch stopped taking them).
    """

    concurrency: int
    window: int | None
    started: int
    completed: int
    yielded: int
    peak_outstanding: int
    exhausted: bool


@final
class Batch:
    """The running batch of ``sup.map``: an async context manager and an async iterator.

    Not constructed directly: ``RMCPSupervisor.map`` returns one. Use it as::

        async with sup.map("server", "tool", arguments) as results:
            async for index, outcome in results:
                ...  # outcome: a CallResult, or the RMCPError that item's call raised

    Entering the block starts the workers; leaving it (at the end of the input, on ``break``,
    on an exception or a cancellation) cancels the calls still in flight, waits for every
    worker, and closes the input iterator (a generator's ``finally`` runs then). Iterating
    outside the block raises ``RuntimeError``.

    Outcomes come in completion order (at most ``2 * concurrency`` items started and not yet
    yielded: those in flight and those waiting for the consumer), or in input order when
    ``ordered``: then at most ``window`` items are started and not yet yielded, so a slow item
    holds back at most ``window - 1`` finished ones, and no item more than ``window - 1``
    places after the oldest not yet yielded starts until that one is yielded (the batch runs
    below its concurrency while it waits). One task iterates at a time.
    """

    def __init__(
        self,
        call: ItemCall,
        arguments: Iterable[Mapping[str, Any] | None] | AsyncIterable[Mapping[str, Any] | None],
        *,
        concurrency: int,
        ordered: bool = False,
        window: int | None = None,
        key: KeyFunction | None = None,
    ) -> None:
        kind = type(arguments).__name__
        if isinstance(arguments, (Mapping, str, bytes)):
            raise RMCPArgumentError(
                f"arguments must be an iterable of argument mappings, one per call, not a "
                f"{kind}; for one call use sup.call()"
            )
        if not isinstance(concurrency, int) or concurrency < 1:  # pyright: ignore[reportUnnecessaryIsInstance]
            raise RMCPArgumentError(f"concurrency must be a positive integer, got {concurrency!r}")
        if window is not None and (not isinstance(window, int) or window < 1):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise RMCPArgumentError(f"window must be a positive integer, got {window!r}")
        if window is not None and not ordered:
            raise RMCPArgumentError("window applies to ordered=True only; completion order needs none")
        if key is not None and not callable(key):
            raise RMCPArgumentError(f"key must be a function of an item giving its key, got {key!r}")
        self._sync_items: Iterator[Mapping[str, Any] | None] | None = None
        self._async_items: AsyncIterator[Mapping[str, Any] | None] | None = None
        if isinstance(arguments, AsyncIterable):
            self._async_items = aiter(arguments)
        elif isinstance(arguments, Iterable):  # pyright: ignore[reportUnnecessaryIsInstance]
            self._sync_items = iter(arguments)
        else:
            raise RMCPArgumentError(
                f"arguments must be an iterable (or async iterable) of argument mappings, got {kind}"
            )
        self._call = call
        self._key = key
        self._ordered = ordered
        self._window = (window if window is not None else 2 * concurrency) if ordered else None
        # In input order more workers than the window could only wait for it.
        self._concurrency = concurrency if self._window is None else min(concurrency, self._window)
        # Items started and not yet yielded, at most: the memory bound. In completion order,
        # the calls in flight plus as many outcomes waiting for the consumer.
        self._bound = self._window if self._window is not None else 2 * concurrency
        self._next_index = 0
        self._next_yield = 0
        self._completed = 0
        self._yielded = 0
        self._peak_outstanding = 0
        self._exhausted = False
        self._failure: BaseException | None = None
        self._state = "new"
        self._task_group: TaskGroup | None = None
        self._workers = 0
        # Completion order: outcomes in the order they came. Input order: by index, each
        # waiting for the ones before it (at most window - 1 of them).
        self._ready: deque[_Outcome] = deque()
        self._early: dict[int, CallResult | RMCPError] = {}
        # Set for the consumer when it waits for an outcome, for workers when they wait for
        # room under the bound.
        self._outcome_arrived: anyio.Event | None = None
        self._room: anyio.Event | None = None
        self._input_lock: anyio.Lock | None = None

    def statistics(self) -> BatchStatistics:
        """Return a snapshot of the batch's progress."""
        return BatchStatistics(
            concurrency=self._concurrency,
            window=self._window,
            started=self._next_index,
            completed=self._completed,
            yielded=self._yielded,
            peak_outstanding=self._peak_outstanding,
            exhausted=self._exhausted,
        )

    async def __aenter__(self) -> Batch:
        if self._state != "new":
            raise RuntimeError("a batch runs once: call sup.map() again for another run")
        self._state = "running"
        if self._async_items is not None:
            # An async generator refuses a second __anext__ while one is running.
            self._input_lock = anyio.Lock()
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        self._task_group = task_group
        self._workers = self._concurrency
        for _ in range(self._concurrency):
            task_group.start_soon(self._work)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        assert self._task_group is not None
        self._state = "closed"
        self._exhausted = True
        self._task_group.cancel_scope.cancel()
        # The body's own exception is not the task group's to wrap in an exception group: it
        # propagates as it is once the workers (cancelled above) are joined.
        await self._task_group.__aexit__(None, None, None)
        self._ready.clear()
        self._early.clear()
        await self._close_input()

    def __aiter__(self) -> Batch:
        return self

    async def __anext__(self) -> tuple[int, CallResult | RMCPError]:
        if self._state != "running":
            raise RuntimeError(_NOT_ENTERED if self._state == "new" else "the batch's block was left")
        # With an outcome ready this returns without yielding to the scheduler (one task
        # switch less per item); the workers cannot be starved, as they run whenever the
        # consumer waits, which it must after at most ``bound`` outcomes.
        await anyio.lowlevel.checkpoint_if_cancelled()
        while True:
            if self._ordered:
                if self._next_yield in self._early:
                    index = self._next_yield
                    outcome = self._early.pop(index)
                    self._next_yield += 1
                    return self._yield(index, outcome)
            elif self._ready:
                return self._yield(*self._ready.popleft())
            if self._workers == 0:
                # Every worker has ended: the input is done (or the batch failed, and in input
                # order the items after the one that failed it are dropped).
                failure, self._failure = self._failure, None
                raise failure if failure is not None else StopAsyncIteration
            if self._outcome_arrived is None:
                self._outcome_arrived = anyio.Event()
            await self._outcome_arrived.wait()

    def _yield(self, index: int, outcome: CallResult | RMCPError) -> tuple[int, CallResult | RMCPError]:
        self._yielded += 1
        self._wake_workers()
        return index, outcome

    def _wake_workers(self) -> None:
        room, self._room = self._room, None
        if room is not None:
            room.set()

    def _wake_consumer(self) -> None:
        arrived, self._outcome_arrived = self._outcome_arrived, None
        if arrived is not None:
            arrived.set()

    async def _work(self) -> None:
        try:
            while True:
                while self._next_index - self._yielded >= self._bound and not self._exhausted:
                    if self._room is None:
                        self._room = anyio.Event()
                    await self._room.wait()
                if self._exhausted:
                    return
                if self._sync_items is not None:
                    taken = self._take_sync()
                else:
                    taken = await self._take_async()
                if taken is None:
                    return
                index, item = taken
                outcome = await self._run(index, item)
                if outcome is None:
                    return
                if self._ordered:
                    self._early[index] = outcome
                    if index == self._next_yield:
                        self._wake_consumer()
                else:
                    self._ready.append((index, outcome))
                    self._wake_consumer()
        finally:
            self._workers -= 1
            if self._workers == 0:
                self._wake_consumer()

    def _take_sync(self) -> tuple[int, Mapping[str, Any] | None] | None:
        """The next item and its index, or None when the input ended or failed."""
        assert self._sync_items is not None
        try:
            item = next(self._sync_items)
        except StopIteration:
            self._exhausted = True
            return None
        except Exception as error:
            # The input itself failed: the batch's error, raised once the items already
            # started have been yielded.
            self._fail(error)
            return None
        return self._started(item)

    async def _take_async(self) -> tuple[int, Mapping[str, Any] | None] | None:
        """As :meth:`_take_sync`, for an async iterator, one ``__anext__`` at a time."""
        assert self._async_items is not None
        assert self._input_lock is not None
        async with self._input_lock:
            if self._exhausted:
                return None
            try:
                item = await anext(self._async_items)
            except StopAsyncIteration:
                self._exhausted = True
                return None
            except Exception as error:
                self._fail(error)
                return None
        return self._started(item)

    def _started(self, item: Mapping[str, Any] | None) -> tuple[int, Mapping[str, Any] | None]:
        index = self._next_index
        self._next_index += 1
        self._peak_outstanding = max(self._peak_outstanding, self._next_index - self._yielded)
        return index, item

    async def _run(self, index: int, item: Mapping[str, Any] | None) -> CallResult | RMCPError | None:
        """One item's outcome; None when its failure is the batch's (then the batch stops)."""
        try:
            if item is not None and not isinstance(item, Mapping):  # pyright: ignore[reportUnnecessaryIsInstance]
                raise RMCPArgumentError(
                    f"item {index} of the batch is a {type(item).__name__}, not a mapping of "
                    "arguments (or None); nothing was sent for it"
                )
            idempotency_key = self._key(item) if self._key is not None else None
            if idempotency_key is not None and not isinstance(idempotency_key, str):  # pyright: ignore[reportUnnecessaryIsInstance]
                # The key function's bug, not this item's: every item would get the same.
                self._fail(
                    RMCPArgumentError(
                        f"key(item) must return a str (or None for a fresh key), got "
                        f"{type(idempotency_key).__name__} for item {index}: fix the key function"
                    )
                )
                return None
            outcome: CallResult | RMCPError = await self._call(item, idempotency_key)
        except UnknownServerError as error:
            # The server was removed during the batch: no later item can run either.
            self._fail(error)
            return None
        except RMCPError as error:
            outcome = error
        except Exception as error:
            # A key function that raised, or a bug: not one item's bad input, so the batch's.
            self._fail(error)
            return None
        finally:
            self._completed += 1
        return outcome

    def _fail(self, error: BaseException) -> None:
        """Stop taking items; the consumer gets the outcomes already started, then ``error``."""
        if self._failure is None:
            self._failure = error
        self._exhausted = True
        # Workers waiting for room end now: in input order the consumer may never make room
        # again (the failed item is a gap it cannot pass).
        self._wake_workers()

    async def _close_input(self) -> None:
        # The batch owns the iterator it took from the input: a generator left half-consumed
        # by an early exit is closed here, deterministically, not by the garbage collector.
        if self._async_items is not None:
            aclose: Callable[[], Awaitable[object]] | None = getattr(self._async_items, "aclose", None)
            if aclose is not None:
                await aclose()
        elif self._sync_items is not None:
            close: Callable[[], object] | None = getattr(self._sync_items, "close", None)
            if close is not None:
                close()
