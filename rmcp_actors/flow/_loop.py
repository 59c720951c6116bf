"""The running event loop's primitives the call path uses on every call, found once.

anyio finds the backend again on every call of its functions (a context-variable and
``sniffio`` look-up): ``anyio.current_time()`` costs about 2.5x ``trio.current_time()``,
``anyio.lowlevel.checkpoint_if_cancelled()`` 2.7x trio's, and ``anyio.move_on_at`` wraps a
trio cancel scope in one of its own. Under trio the call path uses trio's, which anyio's
delegate to (same values, same scopes: MockClock still drives them); under any other backend
it uses anyio's.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import final

import anyio
import anyio.lowlevel
import trio
import trio.lowlevel

__all__ = ["EventLoop"]


def _trio_move_on_at(deadline: float) -> trio.CancelScope:
    return trio.CancelScope(deadline=deadline)


@final
class EventLoop:
    """The clock, cancellation check and deadline scope of the loop running when it is built.

    Attributes:
        clock: The loop's clock, as :func:`anyio.current_time`.
        checkpoint_if_cancelled: As :func:`anyio.lowlevel.checkpoint_if_cancelled`.
        move_on_at: As :func:`anyio.move_on_at` (a scope that swallows its own deadline).
    """

    __slots__ = ("checkpoint_if_cancelled", "clock", "move_on_at")

    def __init__(self) -> None:
        self.clock: Callable[[], float]
        self.checkpoint_if_cancelled: Callable[[], Awaitable[None]]
        self.move_on_at: Callable[[float], trio.CancelScope | anyio.CancelScope]
        try:
            trio.lowlevel.current_root_task()
        except RuntimeError:
            # Another backend, or built outside any loop: anyio finds it on each call.
            self.clock = anyio.current_time
            self.checkpoint_if_cancelled = anyio.lowlevel.checkpoint_if_cancelled
            self.move_on_at = anyio.move_on_at
        else:
            self.clock = trio.current_time
            self.checkpoint_if_cancelled = trio.lowlevel.checkpoint_if_cancelled
            self.move_on_at = _trio_move_on_at
