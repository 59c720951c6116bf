"""Hedging: a second attempt of a slow call, raced against the first; the first answer wins.

A hedge is sent only for a tool that is safe to repeat (or to a server that deduplicates,
where the hedge carries the same idempotency key and coalesces with the first attempt), only
after a delay (fixed, or a percentile of the tool's recent latency), and only with a token
from the retry budget. :func:`race` runs the attempts in a task group inside the call, so
nothing outlives the call: the winner cancels the others (the SDK then sends
``notifications/cancelled``), and a cancelled caller cancels them all.
"""

from __future__ import annotations

import math
import re
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar, final

import anyio

__all__ = ["LatencySketch", "ToolHedge", "parse_percentile", "race"]

T = TypeVar("T")

# The same names the config accepts (config/_policy.py checks them at load).
_PERCENTILE = re.compile(r"p(\d{1,2}(?:\.\d+)?)")


def parse_percentile(text: str) -> float:
    """Return the quantile a percentile name says, as a fraction (``"p95"`` -> 0.95).

    Raises:
        ValueError: ``text`` is not a percentile name such as ``"p50"``, ``"p95"``, ``"p99.9"``.
    """
    match = _PERCENTILE.fullmatch(text)
    percent = float(match.group(1)) if match is not None else math.nan
    if not 0 < percent < 100:
        raise ValueError(f"must be a latency percentile such as 'p50', 'p95' or 'p99.9', got {text!r}")
    return percent / 100


@final
class LatencySketch:
    """The latencies of a tool's recent answered attempts: a ring of the last ``size``.

    Bounded in memory and in cost: recording is O(1); a quantile sorts the ring, and the sorted
    copy is kept until ``size // 16`` new samples arrived, so a hedged call pays about one sort
    per sixteen calls. A ring (not a decaying histogram) because the question is "how slow is
    this tool lately", and the last few hundred answers say it exactly.

    Args:
        size: Latencies kept (the most recent).
    """

    __slots__ = ("_count", "_ring", "_size", "_sorted", "_stale_after")

    def __init__(self, size: int = 256) -> None:
        if size < 1:
            raise ValueError(f"size must be at least 1, got {size}")
        self._size = size
        self._ring: list[float] = []
        self._count = 0
        self._sorted: list[float] = []
        self._stale_after = 0

    @property
    def count(self) -> int:
        """Latencies recorded so far (not only those still kept)."""
        return self._count

    def record(self, seconds: float) -> None:
        """Record the latency of one answered attempt."""
        if self._count < self._size:
            self._ring.append(seconds)
        else:
            self._ring[self._count % self._size] = seconds
        self._count += 1

    def quantile(self, q: float) -> float | None:
        """The ``q`` quantile (0..1) of the kept latencies (nearest rank); None when empty."""
        if not self._ring:
            return None
        if self._count >= self._stale_after:
            self._sorted = sorted(self._ring)
            self._stale_after = self._count + max(1, self._size // 16)
        ordered = self._sorted
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


@final
class ToolHedge:
    """How one tool is hedged: its delay, and the latencies a percentile delay is read from.

    With ``delay`` (a percentile), no hedge is sent before ``min_samples`` latencies were seen,
    unless ``delay_s`` is set too: then it is the delay until then.

    Args:
        delay_s: Seconds before a hedge (the fallback of a percentile ``delay``).
        delay: A percentile of the tool's recent latencies, e.g. ``"p95"``.
        max_hedges: Hedges a call may send beside its first attempt.
        min_samples: Latencies seen before a percentile ``delay`` applies.
    """

    __slots__ = ("delay_s", "max_hedges", "min_samples", "quantile", "sketch")

    def __init__(
        self, *, delay_s: float | None, delay: str | None, max_hedges: int, min_samples: int
    ) -> None:
        self.delay_s = delay_s
        self.max_hedges = max_hedges
        self.min_samples = min_samples
        self.quantile = parse_percentile(delay) if delay is not None else None
        self.sketch = LatencySketch() if self.quantile is not None else None

    def delay(self) -> float | None:
        """Seconds to wait before hedging a call now; None: send no hedge."""
        sketch = self.sketch
        if sketch is None or self.quantile is None or sketch.count < self.min_samples:
            return self.delay_s
        return sketch.quantile(self.quantile)


class _Race(Generic[T]):
    """The shared state of one race: its outcome, its failures, and who is still running."""

    __slots__ = ("changed", "error", "failures", "results", "running")

    def __init__(self) -> None:
        self.results: list[T] = []
        self.error: Exception | None = None
        self.failures: list[Exception] = []
        self.running = 0
        self.changed = anyio.Event()

    @property
    def decided(self) -> bool:
        return bool(self.results) or self.error is not None

    @property
    def over(self) -> bool:
        return self.running == 0 or self.decided

    def wake(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()


async def race(
    attempt: Callable[[int], Awaitable[T]],
    *,
    delay_s: float,
    max_hedges: int,
    may_hedge: Callable[[], bool],
    retryable: Callable[[Exception], bool],
    worst: Callable[[Exception], int] = lambda _: 0,
) -> T:
    """Run ``attempt(0)``; while it has not ended, start ``attempt(1)`` after ``delay_s``, and so on.

    The first attempt to end with a result, or with an exception that is not ``retryable`` (an
    answer too), wins: the others are cancelled and its result is returned (or its exception
    raised). A retryable failure of one attempt leaves the others running; when all of them
    failed, the ``worst`` of the failures is raised (the highest; the first among equals), for
    the caller's retry loop to handle. No hedge starts once every attempt so far has failed:
    that is the retry loop's to decide, with its backoff.

    Args:
        attempt: Sends attempt number ``index`` (0 is the first, the rest are hedges).
        delay_s: Seconds between one attempt's start and the next hedge.
        max_hedges: Hedges at most.
        may_hedge: Asked just before each hedge; False stops hedging (e.g. no budget left).
        retryable: Whether an attempt's exception leaves the race to the others.
        worst: Ranks retryable failures; the highest is raised when every attempt failed.

    Returns:
        The winning attempt's result.
    """
    state: _Race[T] = _Race()

    async def run(index: int) -> None:
        try:
            result = await attempt(index)
        except Exception as error:
            if retryable(error):
                state.failures.append(error)
            elif not state.decided:
                state.error = error
                group.cancel_scope.cancel()
        else:
            if not state.decided:
                state.results.append(result)
                group.cancel_scope.cancel()
        finally:
            state.running -= 1
            state.wake()

    async with anyio.create_task_group() as group:
        state.running = 1
        group.start_soon(run, 0)
        for index in range(1, max_hedges + 1):
            with anyio.move_on_after(delay_s):
                while not state.over:
                    await state.changed.wait()
            if state.over or not may_hedge():
                break
            state.running += 1
            group.start_soon(run, index)
        while not state.over:
            await state.changed.wait()
    if state.error is not None:
        raise state.error
    if state.results:
        return state.results[0]
    raise max(state.failures, key=worst)
