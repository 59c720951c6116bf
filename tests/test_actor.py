"""Actors and reply slots: ask/reply, one-shot answers, inbox backpressure, restart keeps the inbox."""

from __future__ import annotations

import functools
import pickle
from collections.abc import Callable

import anyio
import attrs
import pytest
import trio
import trio.testing

from rmcp_actors import RMCPActorStoppedError
from rmcp_actors.runtime import Actor, ActorStatistics, ChildSpec, ReplySlot, RestartIntensity, Supervisor


class Boom(Exception):
    pass


@attrs.frozen
class Add:
    amount: int
    reply: ReplySlot[int]


@attrs.frozen
class Divide:
    by: int
    reply: ReplySlot[int]


@attrs.frozen
class Explode:
    pass


Message = Add | Divide | Explode


@attrs.define(eq=False)
class Counter(Actor[Message]):
    total: int = 0
    handled: int = 0

    async def handle(self, message: Message) -> None:
        self.handled += 1
        match message:
            case Add(amount, reply):
                self.total += amount
                reply.set(self.total)
            case Divide(by, reply):
                if by == 0:
                    reply.fail(ZeroDivisionError("by zero"))
                else:
                    reply.set(self.total // by)
            case Explode():
                raise Boom("explode")


async def test_reply_slot_set_then_wait_returns_value() -> None:
    slot = ReplySlot[int]()
    assert not slot.done
    slot.set(42)
    assert slot.done
    assert await slot.wait() == 42


async def test_reply_slot_none_is_a_legal_answer() -> None:
    slot = ReplySlot[None]()
    slot.set(None)
    assert await slot.wait() is None


async def test_reply_slot_wait_blocks_until_answered(autojump_clock: trio.testing.MockClock) -> None:
    slot = ReplySlot[str]()
    got: list[str] = []

    async def waiter() -> None:
        got.append(await slot.wait())

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await anyio.sleep(1)
        assert got == []
        slot.set("hello")
    assert got == ["hello"]


async def test_reply_slot_fail_raises_the_error() -> None:
    slot = ReplySlot[int]()
    error = Boom("nope")
    slot.fail(error)
    assert slot.done
    with pytest.raises(Boom) as caught:
        await slot.wait()
    assert caught.value is error


async def test_reply_slot_answers_at_most_once() -> None:
    slot = ReplySlot[int]()
    slot.set(1)
    with pytest.raises(RuntimeError, match="already answered"):
        slot.set(2)
    with pytest.raises(RuntimeError, match="already answered"):
        slot.fail(Boom())
    assert await slot.wait() == 1

    failed = ReplySlot[int]()
    failed.fail(Boom())
    with pytest.raises(RuntimeError, match="already answered"):
        failed.set(3)


async def test_ask_gets_the_reply_and_the_error() -> None:
    counter = Counter("counter")
    async with anyio.create_task_group() as tg:
        await tg.start(counter.run)
        assert await counter.ask(functools.partial(Add, 5)) == 5
        assert await counter.ask(functools.partial(Add, 3)) == 8
        assert await counter.ask(functools.partial(Divide, 2)) == 4
        with pytest.raises(ZeroDivisionError):
            await counter.ask(functools.partial(Divide, 0))
        tg.cancel_scope.cancel()
    assert counter.total == 8


async def test_send_nowait_raises_would_block_when_inbox_full() -> None:
    counter = Counter("counter", inbox_size=2)
    slots = [ReplySlot[int]() for _ in range(3)]
    counter.send_nowait(Add(1, slots[0]))
    counter.send_nowait(Add(1, slots[1]))
    assert counter.statistics() == ActorStatistics(name="counter", inbox_used=2, inbox_size=2)
    with pytest.raises(anyio.WouldBlock):
        counter.send_nowait(Add(1, slots[2]))
    assert counter.statistics().inbox_used == 2


async def test_send_waits_while_inbox_full(autojump_clock: trio.testing.MockClock) -> None:
    counter = Counter("counter", inbox_size=1)
    first, second = ReplySlot[int](), ReplySlot[int]()
    await counter.send(Add(1, first))
    with anyio.move_on_after(10) as blocked:
        await counter.send(Add(1, second))
    assert blocked.cancelled_caught
    assert counter.statistics().inbox_used == 1

    async with anyio.create_task_group() as tg:
        await tg.start(counter.run)
        # Once the actor drains the inbox the same send goes through.
        with anyio.fail_after(10):
            await counter.send(Add(1, second))
            assert await second.wait() == 2
        tg.cancel_scope.cancel()
    assert await first.wait() == 1


async def test_default_handle_is_not_implemented() -> None:
    actor = Actor[int]("plain")
    with pytest.raises(NotImplementedError, match="Actor must override handle"):
        await actor.handle(1)


async def test_supervised_actor_restarts_and_keeps_its_inbox(autojump_clock: trio.testing.MockClock) -> None:
    counter = Counter("counter", inbox_size=8)
    supervisor = Supervisor(
        "sup",
        children=[ChildSpec("counter", counter.run)],
        intensity=RestartIntensity(backoff_base_s=0.5),
    )
    async with anyio.create_task_group() as tg:
        await tg.start(supervisor.run)
        reply = ReplySlot[int]()
        # Queued together: the crash happens while the Add still waits in the inbox.
        counter.send_nowait(Explode())
        counter.send_nowait(Add(7, reply))
        with anyio.fail_after(10):
            assert await reply.wait() == 7
        stats = supervisor.statistics()
        assert stats.children[0].restarts == 1
        assert stats.children[0].last_error == "Boom: explode"
        await supervisor.stop()
    assert counter.handled == 2


@attrs.frozen
class Stall:
    """Handled until ``release`` is set, then crashes the actor."""

    release: anyio.Event
    reply: ReplySlot[int]


@attrs.define(eq=False)
class Staller(Actor[Add | Stall]):
    total: int = 0

    async def handle(self, message: Add | Stall) -> None:
        match message:
            case Add(amount, reply):
                self.total += amount
                reply.set(self.total)
            case Stall(release):
                await release.wait()
                raise Boom("crash while handling")


async def test_ask_fails_promptly_for_in_flight_and_queued_when_the_actor_crashes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    staller = Staller("staller", inbox_size=8)
    # A restart far in the future: the asks must fail long before the actor is back.
    supervisor = Supervisor(
        "sup",
        children=[ChildSpec("staller", staller.run)],
        intensity=RestartIntensity(backoff_base_s=1000, backoff_max_s=1000),
    )
    release = anyio.Event()
    errors: dict[str, RMCPActorStoppedError] = {}
    failed_at: dict[str, float] = {}

    async def ask(label: str, make: Callable[[ReplySlot[int]], Add | Stall]) -> None:
        with pytest.raises(RMCPActorStoppedError) as caught:
            await staller.ask(make)
        errors[label] = caught.value
        failed_at[label] = anyio.current_time()

    async with anyio.create_task_group() as tg:
        await tg.start(supervisor.run)
        tg.start_soon(ask, "in_flight", functools.partial(Stall, release))
        await trio.testing.wait_all_tasks_blocked()
        tg.start_soon(ask, "queued", functools.partial(Add, 5))
        await trio.testing.wait_all_tasks_blocked()
        crashed_at = anyio.current_time()
        release.set()
        await trio.testing.wait_all_tasks_blocked()
        assert failed_at == {"in_flight": crashed_at, "queued": crashed_at}
        assert errors["in_flight"].may_have_executed
        assert not errors["queued"].may_have_executed
        assert errors["queued"].actor == "staller"
        assert "Boom: crash while handling" in errors["queued"].message
        # Not running during the restart backoff: an ask fails at once.
        with pytest.raises(RMCPActorStoppedError, match="not running"):
            await staller.ask(functools.partial(Add, 1))
        # Once restarted, the queued request the asker was told failed is never handled.
        with anyio.fail_after(2000):
            while not supervisor.statistics().children[0].running:
                await anyio.sleep(1)
        assert await staller.ask(functools.partial(Add, 2)) == 2
        await supervisor.stop()
    assert staller.total == 2


async def test_ask_fails_when_the_actor_is_stopped(autojump_clock: trio.testing.MockClock) -> None:
    staller = Staller("staller", inbox_size=1)
    release = anyio.Event()
    outcomes: list[bool] = []
    stopped_at = 0.0

    async def ask(make: Callable[[ReplySlot[int]], Add | Stall]) -> None:
        with pytest.raises(RMCPActorStoppedError, match="stopped") as caught:
            await staller.ask(make)
        outcomes.append(caught.value.may_have_executed)

    async with anyio.create_task_group() as tg:
        async with anyio.create_task_group() as actor_group:
            await actor_group.start(staller.run)
            tg.start_soon(ask, functools.partial(Stall, release))  # in flight
            await trio.testing.wait_all_tasks_blocked()
            tg.start_soon(ask, functools.partial(Add, 1))  # fills the inbox
            await trio.testing.wait_all_tasks_blocked()
            tg.start_soon(ask, functools.partial(Add, 2))  # waits for room in the inbox
            await trio.testing.wait_all_tasks_blocked()
            stopped_at = anyio.current_time()
            actor_group.cancel_scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert anyio.current_time() == stopped_at
    assert sorted(outcomes) == [False, False, True]


async def test_ask_to_an_actor_that_never_ran_fails_at_once(autojump_clock: trio.testing.MockClock) -> None:
    counter = Counter("idle")
    with anyio.fail_after(1):
        with pytest.raises(RMCPActorStoppedError, match="'idle' is not running") as caught:
            await counter.ask(functools.partial(Add, 1))
    assert not caught.value.may_have_executed
    assert counter.statistics().inbox_used == 0


def test_actor_stopped_error_pickles_with_its_fields() -> None:
    error = RMCPActorStoppedError("gone", actor="connection:time", server="time", may_have_executed=True)
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is RMCPActorStoppedError
    assert (copy.message, copy.actor, copy.server, copy.may_have_executed) == (
        "gone",
        "connection:time",
        "time",
        True,
    )
