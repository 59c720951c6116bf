"""Supervisor semantics: strategies, restart types, intensity, escalation, cancellation, shutdown order."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import anyio
import anyio.abc
import attrs
import pytest
import trio
import trio.testing

from rmcp_actors.errors import RMCPSupervisorError
from rmcp_actors.runtime import (
    ChildSpec,
    ChildStatistics,
    Restart,
    RestartIntensity,
    Strategy,
    Supervisor,
    SupervisorStatistics,
)

# Long enough for any restart to finish: the backoff is at most 1 s by default.
SETTLE_S = 5.0


class Boom(Exception):
    pass


@attrs.define(eq=False)
class Harness:
    """Children that record their lifecycle in ``events`` and end when the test tells them to."""

    events: list[str] = attrs.field(factory=list[str])
    settle_s: float = SETTLE_S
    _triggers: dict[str, anyio.Event] = attrs.field(factory=dict[str, anyio.Event])
    _crash: dict[str, bool] = attrs.field(factory=dict[str, bool])
    _changed: anyio.Event = attrs.field(factory=anyio.Event)

    def spec(self, name: str, restart: Restart = Restart.PERMANENT) -> ChildSpec:
        return ChildSpec(name, functools.partial(self._child, name), restart=restart)

    def specs(self, *names: str) -> list[ChildSpec]:
        return [self.spec(name) for name in names]

    async def crash(self, name: str) -> None:
        self._crash[name] = True
        self._triggers[name].set()
        await anyio.sleep(self.settle_s)

    async def exit(self, name: str) -> None:
        self._crash[name] = False
        self._triggers[name].set()
        await anyio.sleep(self.settle_s)

    async def until(self, count: int) -> None:
        """Wait until ``count`` events have been recorded (for real-time backends)."""
        with anyio.fail_after(5):
            while len(self.events) < count:
                await self._changed.wait()

    def take(self) -> list[str]:
        events = list(self.events)
        self.events.clear()
        return events

    async def _child(self, name: str, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        trigger = self._triggers[name] = anyio.Event()
        self._record(f"start:{name}")
        task_status.started()
        try:
            await trigger.wait()
        except anyio.get_cancelled_exc_class():
            self._record(f"stop:{name}")
            raise
        if self._crash[name]:
            raise Boom(name)

    def _record(self, event: str) -> None:
        self.events.append(event)
        self._changed.set()
        self._changed = anyio.Event()


def running(stats: SupervisorStatistics) -> dict[str, bool]:
    return {child.name: child.running for child in stats.children}


@pytest.mark.parametrize("strategy", [Strategy.ONE_FOR_ALL, Strategy.REST_FOR_ONE])
async def test_starts_in_order_and_stops_in_reverse(
    autojump_clock: trio.testing.MockClock, strategy: Strategy
) -> None:
    harness = Harness()
    supervisor = Supervisor("sup", strategy, children=harness.specs("a", "b", "c"))
    async with anyio.create_task_group() as tg:
        await tg.start(supervisor.run)
        assert harness.take() == ["start:a", "start:b", "start:c"]
        assert running(supervisor.statistics()) == {"a": True, "b": True, "c": True}
        await supervisor.stop()
        assert harness.take() == ["stop:c", "stop:b", "stop:a"]
    assert running(supervisor.statistics()) == {"a": False, "b": False, "c": False}


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        (Strategy.ONE_FOR_ONE, ["start:b"]),
        (Strategy.ONE_FOR_ALL, ["stop:d", "stop:c", "stop:a", "start:a", "start:b", "start:c", "start:d"]),
        (Strategy.REST_FOR_ONE, ["stop:d", "stop:c", "start:b", "start:c", "start:d"]),
    ],
)
async def test_strategy_restarts_the_right_children_in_order(
    autojump_clock: trio.testing.MockClock, strategy: Strategy, expected: list[str]
) -> None:
    harness = Harness()
    supervisor = Supervisor("sup", strategy=strategy, children=harness.specs("a", "b", "c", "d"))
    async with anyio.create_task_group() as tg:
        await tg.start(supervisor.run)
        harness.take()
        await harness.crash("b")
        assert harness.take() == expected
        stats = supervisor.statistics()
        assert all(child.running for child in stats.children)
        assert stats.restarts_in_window == 1
        restarted = {event.removeprefix("start:") for event in expected if event.startswith("start:")}
        assert {child.name: child.restarts for child in stats.children} == {
            name: int(name in restarted) for name in "abcd"
        }
        assert stats.children[1] == ChildStatistics(name="b", running=True, restarts=1, last_error="Boom: b")
        await supervisor.stop()


async def test_one_for_all_drops_temporary_siblings(autojump_clock: trio.testing.MockClock) -> None:
    harness = Harness()
    children = [harness.spec("a"), harness.spec("tmp", Restart.TEMPORARY), harness.spec("c")]
    supervisor = Supervisor("sup", strategy=Strategy.ONE_FOR_ALL, children=children)
    async with anyio.create_task_group() as tg:
        await tg.start(supervisor.run)
        harness.take()
        await harness.crash("a")
        assert harness.take() == ["stop:c", "stop:tmp", "start:a", "start:c"]
        assert [child.name for child in supervisor.statistics().children] == ["a", "c"]
        await supervisor.stop()


@pytest.mark.parametrize(
    ("restart", "crash", "restarted"),
    [
        (Restart.PERMANENT, False, True),
        (Restart.PERMANENT, True, True),
        (Restart.TRANSIENT, False, False),
        (Restart.TRANSIENT, True, True),
        (Restart.TEMPORARY, False, False),
        (Restart.TEMPORARY, True, False),
    ],
)
async def test_restart_types(
    autojump_clock: trio.testing.MockClock, restart: Restart, crash: bool, restarted: bool
) -> None:
    harness = Harness()
    supervisor = Supervisor("sup", children=[harness.spec("a"), harness.spec("x", restart)])
    async with anyio.create_task_group() as tg:
        await tg.start(supervisor.run)
        harness.take()
        await (harness.crash("x") if crash else harness.exit("x"))
        assert harness.take() == (["start:x"] if restarted else [])
        names = [child.name for child in supervisor.statistics().children]
        assert names == (["a", "x"] if restarted else ["a"])
        assert running(supervisor.statistics())["a"]
        await supervisor.stop()


async def test_intensity_exceeded_escalates_with_the_last_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    harness = Harness()
    raised: list[Boom] = []

    async def flaky(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        task_status.started()
        await anyio.sleep(1)
        raised.append(Boom(f"failure {len(raised)}"))
        raise raised[-1]

    supervisor = Supervisor(
        "sup",
        children=[harness.spec("a"), ChildSpec("flaky", flaky), harness.spec("c")],
        intensity=RestartIntensity(max_restarts=2, period_s=30),
    )
    with pytest.raises(RMCPSupervisorError) as caught:
        await supervisor.run()
    error = caught.value
    assert error.actor == "flaky"
    assert "'flaky' failed 3 times in 30" in str(error)
    assert len(raised) == 3
    assert error.__cause__ is raised[-1]
    # Everyone else was stopped (side by side: one_for_one) before the error surfaced.
    events = harness.take()
    assert events[:2] == ["start:a", "start:c"]
    assert sorted(events[2:]) == ["stop:a", "stop:c"]
    assert not any(running(supervisor.statistics()).values())


async def test_failures_spread_over_more_than_the_period_do_not_escalate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    failures = 0

    async def slow_flaky(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        nonlocal failures
        task_status.started()
        await anyio.sleep(6)
        failures += 1
        raise Boom("again")

    supervisor = Supervisor(
        "sup",
        children=[ChildSpec("slow", slow_flaky)],
        intensity=RestartIntensity(max_restarts=2, period_s=10),
    )
    async with anyio.create_task_group() as tg:
        await tg.start(supervisor.run)
        await anyio.sleep(100)
        # At most two failures ever fall within one 10 s window.
        assert supervisor.statistics().restarts_in_window <= 2
        await supervisor.stop()
    assert failures >= 15
    assert supervisor.statistics().children[0].restarts == failures


async def test_escalation_reaches_the_parent_as_a_child_crash(autojump_clock: trio.testing.MockClock) -> None:
    harness = Harness()
    bad_starts = 0

    async def bad(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        nonlocal bad_starts
        bad_starts += 1
        task_status.started()
        await anyio.sleep(1)
        raise Boom("bad")

    child = Supervisor("child", children=[ChildSpec("bad", bad)], intensity=RestartIntensity(max_restarts=1))
    parent = Supervisor(
        "parent",
        children=[harness.spec("sibling"), ChildSpec("child", child.run)],
        intensity=RestartIntensity(max_restarts=1),
    )
    with pytest.raises(RMCPSupervisorError) as caught:
        await parent.run()
    assert caught.value.actor == "child"
    inner = caught.value.__cause__
    assert isinstance(inner, RMCPSupervisorError)
    assert inner.actor == "bad"
    assert isinstance(inner.__cause__, Boom)
    # The parent restarted the child supervisor once; each of its two runs restarted "bad" once.
    assert bad_starts == 4
    assert harness.take() == ["start:sibling", "stop:sibling"]


@pytest.mark.parametrize("strategy", list(Strategy))
async def test_cancelling_run_stops_children_and_propagates(
    autojump_clock: trio.testing.MockClock, strategy: Strategy
) -> None:
    harness = Harness()
    supervisor = Supervisor("sup", strategy, children=harness.specs("a", "b", "c"))
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            await tg.start(supervisor.run)
            scope.cancel()
    assert scope.cancelled_caught
    events = harness.take()
    assert events[:3] == ["start:a", "start:b", "start:c"]
    if strategy is Strategy.ONE_FOR_ONE:
        # Independent children stop side by side, in no particular order.
        assert sorted(events[3:]) == ["stop:a", "stop:b", "stop:c"]
    else:
        assert events[3:] == ["stop:c", "stop:b", "stop:a"]
    assert not any(running(supervisor.statistics()).values())


async def test_cancel_during_child_start_propagates(
    autojump_clock: trio.testing.MockClock,
) -> None:
    harness = Harness()
    events: list[str] = []

    async def slow_start(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        try:
            await anyio.sleep(60)
        except anyio.get_cancelled_exc_class():
            events.append("slow cancelled")
            raise
        task_status.started()

    supervisor = Supervisor("sup", children=[harness.spec("a"), ChildSpec("slow", slow_start)])
    start = anyio.current_time()
    with anyio.move_on_after(1) as scope:
        await supervisor.run()
    assert scope.cancelled_caught
    assert anyio.current_time() - start == pytest.approx(1)
    assert events == ["slow cancelled"]
    assert harness.take() == ["start:a", "stop:a"]


async def test_start_and_terminate_dynamic_children(autojump_clock: trio.testing.MockClock) -> None:
    harness = Harness()
    supervisor = Supervisor("sup", children=harness.specs("a"))
    async with anyio.create_task_group() as tg:
        await tg.start(supervisor.run)
        await supervisor.start_child(harness.spec("d"))
        assert harness.take() == ["start:a", "start:d"]
        assert running(supervisor.statistics()) == {"a": True, "d": True}
        with pytest.raises(ValueError, match="already has a child named 'd'"):
            await supervisor.start_child(harness.spec("d"))

        await harness.crash("d")
        assert harness.take() == ["start:d"]

        await supervisor.terminate_child("d")
        assert harness.take() == ["stop:d"]
        assert running(supervisor.statistics()) == {"a": True}
        with pytest.raises(KeyError):
            await supervisor.terminate_child("d")
        await supervisor.stop()
    with pytest.raises(RMCPSupervisorError, match="not running"):
        await supervisor.start_child(harness.spec("late"))


async def test_terminate_child_with_a_spec_stops_only_the_child_started_from_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    harness = Harness()
    supervisor = Supervisor("sup", children=[])
    async with anyio.create_task_group() as tg:
        await tg.start(supervisor.run)
        old = harness.spec("d")
        await supervisor.start_child(old)
        await supervisor.terminate_child("d")
        new = harness.spec("d")
        await supervisor.start_child(new)
        assert harness.take() == ["start:d", "stop:d", "start:d"]
        # The old owner's cleanup: the name now belongs to a child started from another spec.
        with pytest.raises(KeyError):
            await supervisor.terminate_child("d", spec=old)
        assert running(supervisor.statistics()) == {"d": True}
        await supervisor.terminate_child("d", spec=new)
        assert harness.take() == ["stop:d"]
        await supervisor.stop()


async def test_start_child_failure_propagates_and_siblings_keep_running(
    autojump_clock: trio.testing.MockClock,
) -> None:
    harness = Harness()
    attempts = 0

    async def cannot_connect(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        nonlocal attempts
        attempts += 1
        await anyio.sleep(1)
        raise ConnectionRefusedError("no server")

    supervisor = Supervisor("sup", children=harness.specs("a", "b"))
    async with anyio.create_task_group() as tg:
        await tg.start(supervisor.run)
        harness.take()
        with pytest.raises(ConnectionRefusedError, match="no server"):
            await supervisor.start_child(ChildSpec("conn", cannot_connect))
        await anyio.sleep(SETTLE_S)
        assert attempts == 1
        assert running(supervisor.statistics()) == {"a": True, "b": True}
        assert supervisor.statistics().restarts_in_window == 0
        # The supervisor still supervises.
        await harness.crash("b")
        assert harness.take() == ["start:b"]
        await supervisor.stop()


async def test_start_child_caller_cancelled_removes_the_child(autojump_clock: trio.testing.MockClock) -> None:
    harness = Harness()
    events: list[str] = []

    async def slow_start(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        try:
            await anyio.sleep(60)
        except anyio.get_cancelled_exc_class():
            events.append("slow cancelled")
            raise
        task_status.started()

    supervisor = Supervisor("sup", children=harness.specs("a"))
    async with anyio.create_task_group() as tg:
        await tg.start(supervisor.run)
        with anyio.move_on_after(1) as scope:
            await supervisor.start_child(ChildSpec("slow", slow_start))
        assert scope.cancelled_caught
        await anyio.sleep(SETTLE_S)
        assert events == ["slow cancelled"]
        assert running(supervisor.statistics()) == {"a": True}
        await supervisor.stop()


async def test_static_child_failing_start_is_a_crash(
    autojump_clock: trio.testing.MockClock,
) -> None:
    attempts = 0

    async def fails_first(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise ConnectionRefusedError("not yet")
        task_status.started()
        await anyio.sleep_forever()

    supervisor = Supervisor("sup", children=[ChildSpec("conn", fails_first)])
    async with anyio.create_task_group() as tg:
        await tg.start(supervisor.run)
        await anyio.sleep(SETTLE_S)
        assert attempts == 2
        stats = supervisor.statistics()
        assert stats.children == (
            ChildStatistics(
                name="conn", running=True, restarts=1, last_error="ConnectionRefusedError: not yet"
            ),
        )
        await supervisor.stop()


@pytest.mark.parametrize(
    ("strategy", "quick_stops_at"),
    # In order, the quick child waits for the stubborn one's timeout; side by side, it does not.
    [(Strategy.REST_FOR_ONE, 2), (Strategy.ONE_FOR_ALL, 2), (Strategy.ONE_FOR_ONE, 0)],
)
async def test_shutdown_timeout_bounds_wait_not_join(
    autojump_clock: trio.testing.MockClock, strategy: Strategy, quick_stops_at: float
) -> None:
    log: list[tuple[str, float]] = []

    def record(event: str) -> None:
        log.append((event, anyio.current_time()))

    async def quick(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        task_status.started()
        try:
            await anyio.sleep_forever()
        finally:
            record("quick stopped")

    async def stubborn(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        task_status.started()
        try:
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.sleep(6)
            record("stubborn cleaned up")

    supervisor = Supervisor(
        "sup",
        strategy,
        children=[ChildSpec("quick", quick), ChildSpec("stubborn", stubborn, shutdown_timeout_s=2)],
    )
    async with anyio.create_task_group() as tg:
        await tg.start(supervisor.run)
        record("stop called")
        await supervisor.stop()
        record("stop returned")
    record("joined")
    stop_at = log[0][1]
    assert [(event, at - stop_at) for event, at in log] == [
        ("stop called", 0),
        ("quick stopped", pytest.approx(quick_stops_at)),
        ("stubborn cleaned up", pytest.approx(6)),
        ("stop returned", pytest.approx(6)),
        ("joined", pytest.approx(6)),
    ]


async def _asyncio_tree(events: list[str], snapshots: list[SupervisorStatistics]) -> None:
    # Real time under asyncio: wait for the observable outcome rather than for a guessed duration.
    harness = Harness(events, settle_s=0)
    child = Supervisor("child", children=harness.specs("c1", "c2"))
    root = Supervisor(
        "root",
        strategy=Strategy.REST_FOR_ONE,
        children=[harness.spec("r1"), ChildSpec("child", child.run)],
        intensity=RestartIntensity(backoff_base_s=0),
    )
    async with anyio.create_task_group() as tg:
        await tg.start(root.run)
        await harness.until(3)
        await harness.crash("c1")
        await harness.until(4)
        await harness.crash("r1")
        await harness.until(9)
        snapshots.append(root.statistics())
        await root.stop()


def test_supervisor_tree_runs_under_asyncio() -> None:
    events: list[str] = []
    snapshots: list[SupervisorStatistics] = []
    anyio.run(_asyncio_tree, events, snapshots, backend="asyncio")
    assert events == [
        "start:r1",
        "start:c1",
        "start:c2",
        # child supervisor, one_for_one: only c1
        "start:c1",
        # root, rest_for_one: r1 and the child supervisor after it
        "stop:c2",
        "stop:c1",
        "start:r1",
        "start:c1",
        "start:c2",
        "stop:c2",
        "stop:c1",
        "stop:r1",
    ]
    assert [(child.name, child.restarts) for child in snapshots[0].children] == [("r1", 1), ("child", 1)]


def _names(children: Sequence[ChildStatistics]) -> list[str]:
    return [child.name for child in children]


async def test_statistics_before_and_after_run(autojump_clock: trio.testing.MockClock) -> None:
    harness = Harness()
    supervisor = Supervisor("sup", strategy=Strategy.REST_FOR_ONE, children=harness.specs("a", "b"))
    assert supervisor.statistics() == SupervisorStatistics(
        name="sup", strategy=Strategy.REST_FOR_ONE, children=(), restarts_in_window=0
    )
    async with anyio.create_task_group() as tg:
        await tg.start(supervisor.run)
        assert _names(supervisor.statistics().children) == ["a", "b"]
        await harness.crash("a")
        assert supervisor.statistics().restarts_in_window == 1
        await anyio.sleep(30)
        assert supervisor.statistics().restarts_in_window == 0
        await supervisor.stop()
    await supervisor.stop()


async def test_duplicate_static_names_are_rejected() -> None:
    harness = Harness()
    with pytest.raises(ValueError, match="duplicate child names"):
        await Supervisor("sup", children=harness.specs("a", "a")).run()


async def test_start_child_cancelled_as_the_child_starts_takes_the_child_along() -> None:
    supervisor = Supervisor("s")
    async with anyio.create_task_group() as task_group:
        await task_group.start(supervisor.run)
        caller_scope = anyio.CancelScope()

        async def child(*, task_status: anyio.abc.TaskStatus[None]) -> None:
            caller_scope.cancel()  # the caller's deadline fires...
            task_status.started()  # ...in the same instant the child reports ready
            await anyio.sleep_forever()

        with caller_scope:
            await supervisor.start_child(ChildSpec("c", child))
        assert caller_scope.cancelled_caught
        assert supervisor.statistics().children == ()
        await supervisor.stop()


async def test_a_starting_child_may_start_a_sibling(autojump_clock: trio.testing.MockClock) -> None:
    harness = Harness()
    supervisor = Supervisor("sup")

    async def parent(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        # Its start needs a sibling first: the supervisor must not be locked by our own start.
        await supervisor.start_child(harness.spec("sibling"))
        task_status.started()
        await anyio.sleep_forever()

    async with anyio.create_task_group() as tg:
        await tg.start(supervisor.run)
        with anyio.fail_after(SETTLE_S):
            await supervisor.start_child(ChildSpec("parent", parent))
        assert running(supervisor.statistics()) == {"sibling": True, "parent": True}
        await supervisor.stop()


async def test_a_restarting_child_may_start_a_sibling(autojump_clock: trio.testing.MockClock) -> None:
    harness = Harness()
    supervisor = Supervisor("sup", children=harness.specs("a"))
    lives = 0

    async def helper_starter(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        nonlocal lives
        lives += 1
        # Every life, restarts included, brings up a helper of its own before it is ready.
        await supervisor.start_child(harness.spec(f"helper{lives}", Restart.TEMPORARY))
        task_status.started()
        await anyio.sleep(10)
        raise Boom("again")

    async with anyio.create_task_group() as tg:
        await tg.start(supervisor.run)
        await supervisor.start_child(ChildSpec("starter", helper_starter))
        with anyio.fail_after(SETTLE_S + 10):
            while lives < 2:
                await anyio.sleep(1)
        await anyio.sleep(1)
        assert running(supervisor.statistics()) == {
            "a": True,
            "helper1": True,
            "starter": True,
            "helper2": True,
        }
        await supervisor.stop()


async def test_start_child_does_not_wait_for_a_sibling_restart_backoff(
    autojump_clock: trio.testing.MockClock,
) -> None:
    harness = Harness(settle_s=0)
    supervisor = Supervisor(
        "sup",
        children=harness.specs("a"),
        intensity=RestartIntensity(backoff_base_s=100, backoff_max_s=100),
    )
    async with anyio.create_task_group() as tg:
        await tg.start(supervisor.run)
        # A backoff of zero is possible but unlikely: draw until the restart really waits.
        while True:
            await harness.crash("a")
            await trio.testing.wait_all_tasks_blocked()
            if not running(supervisor.statistics())["a"]:
                break
        before = anyio.current_time()
        await supervisor.start_child(harness.spec("b"))
        assert anyio.current_time() == before
        assert running(supervisor.statistics()) == {"a": False, "b": True}
        await supervisor.stop()


async def test_start_child_stopped_by_a_one_for_all_restart_is_a_supervisor_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A sibling's crash restarts every child while "slow" is still starting: the supervisor
    # stopped it, so start_child must say so, not blame the child for never calling started().
    crash = anyio.Event()
    lives = 0

    async def crasher(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        nonlocal lives
        lives += 1
        task_status.started()
        if lives > 1:
            await anyio.sleep_forever()
        await crash.wait()
        raise Boom("crasher")

    async def slow_start(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        await anyio.sleep(10)
        task_status.started()
        await anyio.sleep_forever()

    supervisor = Supervisor("sup", Strategy.ONE_FOR_ALL, children=[ChildSpec("crasher", crasher)])
    caught: list[BaseException] = []
    async with anyio.create_task_group() as tg:
        await tg.start(supervisor.run)

        async def add() -> None:
            try:
                await supervisor.start_child(ChildSpec("slow", slow_start))
            except Exception as error:
                caught.append(error)

        tg.start_soon(add)
        await trio.testing.wait_all_tasks_blocked()
        crash.set()
        await anyio.sleep(SETTLE_S)
        assert len(caught) == 1
        assert isinstance(caught[0], RMCPSupervisorError), repr(caught[0])
        assert caught[0].actor == "slow"
        assert "start it again" in str(caught[0])
        # Only the crasher was restarted; the stopped newcomer is gone, not restarted behind the caller.
        assert running(supervisor.statistics()) == {"crasher": True}
        assert lives == 2
        await supervisor.stop()


async def test_one_for_one_restart_of_a_slow_starter_does_not_hold_up_a_sibling(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Independent children restart independently: "fast" crashes while "slow" takes 100 s to
    # come back, and must not stay down behind it.
    crash = anyio.Event()
    lives = {"slow": 0, "fast": 0}
    back_at: dict[str, float] = {}
    crashed_at: dict[str, float] = {}

    def child(name: str, restart_start_s: float) -> ChildSpec:
        async def run(*, task_status: anyio.abc.TaskStatus[None]) -> None:
            lives[name] += 1
            if lives[name] > 1:
                await anyio.sleep(restart_start_s)
                back_at[name] = anyio.current_time()
                task_status.started()
                await anyio.sleep_forever()
            task_status.started()
            await crash.wait()
            if name == "fast":
                await anyio.sleep(1)  # crashes second, while the slow one is restarting
            crashed_at[name] = anyio.current_time()
            raise Boom(name)

        return ChildSpec(name, run)

    supervisor = Supervisor(
        "sup",
        Strategy.ONE_FOR_ONE,
        children=[child("slow", 100), child("fast", 0)],
        intensity=RestartIntensity(backoff_base_s=0.001, backoff_max_s=0.001),
    )
    async with anyio.create_task_group() as tg:
        await tg.start(supervisor.run)
        crash.set()
        await anyio.sleep(10)  # within the restart window (30 s)
        # The fast one is back within its backoff; the slow one is still starting, not running.
        assert back_at["fast"] - crashed_at["fast"] <= 0.001
        stats = supervisor.statistics()
        assert running(stats) == {"slow": False, "fast": True}
        assert stats.restarts_in_window == 2  # both restarts counted as the crashes came
        await anyio.sleep(100)
        assert back_at["slow"] - crashed_at["slow"] == pytest.approx(100, abs=0.001)
        stats = supervisor.statistics()
        assert running(stats) == {"slow": True, "fast": True}
        assert [child.restarts for child in stats.children] == [1, 1]
        await supervisor.stop()


async def _crash_into_a_long_backoff(harness: Harness, supervisor: Supervisor, name: str) -> None:
    # A backoff of zero is possible but unlikely: draw until the restart really waits.
    while True:
        await harness.crash(name)
        await trio.testing.wait_all_tasks_blocked()
        if not running(supervisor.statistics())[name]:
            return


@pytest.mark.parametrize("how", ["terminate", "stop", "cancel"])
async def test_a_one_for_one_restart_waiting_out_its_backoff_ends_with_the_child(
    autojump_clock: trio.testing.MockClock, how: str
) -> None:
    # The backoff runs in the child's own next incarnation: terminating the child, stopping or
    # cancelling the supervisor ends it at once, and nothing is started after.
    harness = Harness(settle_s=0)
    supervisor = Supervisor(
        "sup",
        children=harness.specs("a", "b"),
        intensity=RestartIntensity(backoff_base_s=100, backoff_max_s=100),
    )
    before = anyio.current_time()
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            await tg.start(supervisor.run)
            await _crash_into_a_long_backoff(harness, supervisor, "a")
            harness.take()
            before = anyio.current_time()
            if how == "terminate":
                await supervisor.terminate_child("a")
                assert anyio.current_time() == before
                await anyio.sleep(200)
                assert running(supervisor.statistics()) == {"b": True}
                await supervisor.stop()
            elif how == "stop":
                await supervisor.stop()
            else:
                scope.cancel()
    assert anyio.current_time() - before == (200 if how == "terminate" else 0)
    assert scope.cancelled_caught is (how == "cancel")
    assert harness.take() == ["stop:b"]
    assert not any(running(supervisor.statistics()).values())


async def test_one_for_one_intensity_counts_every_crash_while_restarts_wait(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Crashes of independent children are counted as they come, even while earlier restarts
    # are still in their backoff: the third crash within the window escalates.
    harness = Harness(settle_s=0)
    supervisor = Supervisor(
        "sup",
        children=harness.specs("a", "b", "c"),
        intensity=RestartIntensity(max_restarts=2, backoff_base_s=100, backoff_max_s=100),
    )
    escalations: list[RMCPSupervisorError] = []

    async def run(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        try:
            await supervisor.run(task_status=task_status)
        except RMCPSupervisorError as error:
            escalations.append(error)

    async with anyio.create_task_group() as tg:
        await tg.start(run)
        for name in ("a", "b", "c"):
            await harness.crash(name)
    assert anyio.current_time() == 0  # no backoff was waited out first
    [escalation] = escalations
    assert escalation.actor == "c"
    assert "failed 3 times" in str(escalation)
    assert isinstance(escalation.__cause__, Boom)
    assert harness.take() == ["start:a", "start:b", "start:c"]  # a and b never came back
    assert not any(running(supervisor.statistics()).values())
