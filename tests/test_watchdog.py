"""The watchdog on its own (MockClock): stall reports, silent owners, the in-flight registry.

The end-to-end tests against real servers (a stuck call named in the log, a hung stdio server
restarted, a slow one left alone) are in ``tests/test_watchdog_servers.py``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import attrs
import pytest
import trio
import trio.testing

from rmcp_actors.runtime import (
    CheckNow,
    ComponentRegistry,
    HealthStatus,
    InFlight,
    StallReport,
    Watchdog,
    WorkItem,
    WorkRegistry,
)

STALL_S = 8.0


@attrs.define(eq=False)
class Job:
    """A unit of work as the call path would record it."""

    key: str
    what: str
    started_at: float
    state: str = "sent"

    def work_item(self, owner: str, now: float) -> WorkItem:
        return WorkItem(self.key, owner, self.what, self.state, now - self.started_at, 1)


@attrs.define
class FakeLiveness:
    """An owner whose sign of life the test controls; counts the watchdog's hung checks."""

    messages: int = 0
    checks: list[float] = attrs.Factory(list[float])

    def activity(self) -> int:
        return self.messages

    def suspect_hung(self, silent_s: float) -> None:
        self.checks.append(silent_s)


@asynccontextmanager
async def running(watchdog: Watchdog) -> AsyncIterator[Watchdog]:
    async with trio.open_nursery() as nursery:
        await nursery.start(watchdog.run)
        yield watchdog
        nursery.cancel_scope.cancel()


def make_watchdog(
    work: WorkRegistry,
    components: ComponentRegistry | None = None,
    *,
    on_stall: Callable[[StallReport], None] | None = None,
    restart_hung: bool = True,
) -> Watchdog:
    return Watchdog(
        "watchdog",
        work,
        components or ComponentRegistry(),
        stall_s=STALL_S,
        restart_hung=restart_hung,
        on_stall=on_stall,
    )


async def test_a_stall_is_reported_naming_the_stuck_call(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    work = WorkRegistry()
    in_flight = work.track("docs")
    reports: list[StallReport] = []
    caplog.set_level(logging.WARNING, logger="rmcp_actors.watchdog")
    async with running(make_watchdog(work, on_stall=reports.append)) as watchdog:
        stuck = Job("req-1", "search", trio.current_time())
        in_flight.begin(stuck)
        await trio.sleep(STALL_S - 0.1)
        assert reports == []
        await trio.sleep(STALL_S / 4 + 0.1)
        assert len(reports) == 1
        report = reports[0]
        assert report.in_flight == 1
        assert STALL_S <= report.stalled_for_s <= STALL_S * 1.25
        (item,) = report.oldest
        assert (item.key, item.owner, item.what, item.state) == ("req-1", "docs", "search", "sent")
        assert item.age_s == pytest.approx(report.stalled_for_s)
        logged = [r for r in caplog.records if r.name == "rmcp_actors.watchdog"]
        assert len(logged) == 1
        assert logged[0].levelno == logging.WARNING
        text = logged[0].getMessage()
        assert "docs/search request req-1: sent, age" in text
        assert text.count("\n") >= 2, "the report is a readable multi-line dump"
        stats = watchdog.statistics()
        assert stats.stalled
        assert stats.stalls == 1
        assert stats.last_report == report


async def test_no_report_while_calls_complete(autojump_clock: trio.testing.MockClock) -> None:
    work = WorkRegistry()
    in_flight = work.track("docs")
    reports: list[StallReport] = []
    async with running(make_watchdog(work, on_stall=reports.append)) as watchdog:
        # Always one call in flight, and one completes every second: busy, never stalled.
        for n in range(int(STALL_S * 10)):
            job = Job(f"req-{n}", "search", trio.current_time())
            in_flight.begin(job)
            await trio.sleep(1.0)
            in_flight.end(job)
        # A slow call among them does not stall anything while others complete.
        slow = Job("slow", "search", trio.current_time())
        in_flight.begin(slow)
        for n in range(int(STALL_S * 3)):
            job = Job(f"more-{n}", "search", trio.current_time())
            in_flight.begin(job)
            await trio.sleep(1.0)
            in_flight.end(job)
        assert reports == []
        assert await watchdog.ask(CheckNow) is None
        assert watchdog.statistics().stalls == 0
        assert watchdog.statistics().completed == in_flight.completed == int(STALL_S * 13)


async def test_a_lasting_stall_is_reported_every_stall_s_then_ends(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    work = WorkRegistry()
    in_flight = work.track("docs")
    reports: list[StallReport] = []
    caplog.set_level(logging.INFO, logger="rmcp_actors.watchdog")
    async with running(make_watchdog(work, on_stall=reports.append)) as watchdog:
        stuck = Job("req-1", "search", trio.current_time())
        in_flight.begin(stuck)
        await trio.sleep(STALL_S * 4 + 0.1)
        assert 3 <= len(reports) <= 4
        ages = [report.oldest[0].age_s for report in reports]
        assert ages == sorted(ages)
        assert ages[-1] - ages[0] >= STALL_S * 2
        in_flight.end(stuck)
        await trio.sleep(STALL_S / 4 + 0.1)
        stats = watchdog.statistics()
        assert not stats.stalled
        assert stats.stalls == 1
        assert stats.last_report == reports[-1], "the last report is kept after the stall ended"
        assert any("stall over" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)


async def test_the_oldest_calls_across_owners_come_first(autojump_clock: trio.testing.MockClock) -> None:
    work = WorkRegistry()
    first, second = work.track("a"), work.track("b")
    async with running(make_watchdog(work)) as watchdog:
        for n in range(15):
            first.begin(Job(f"a{n}", "t", trio.current_time()))
            await trio.sleep(0.01)
            second.begin(Job(f"b{n}", "t", trio.current_time()))
            await trio.sleep(0.01)
        await trio.sleep(STALL_S * 1.25 + 0.1)
        report = await watchdog.ask(CheckNow)
    assert report is not None
    assert report.in_flight == 30
    assert [item.key for item in report.oldest] == [f"{o}{n}" for n in range(5) for o in "ab"]
    assert "... and 20 more" in report.describe()


async def test_a_silent_owner_is_asked_whether_it_hung_once_per_stall_s(
    autojump_clock: trio.testing.MockClock,
) -> None:
    work = WorkRegistry()
    silent, chatty = FakeLiveness(), FakeLiveness()
    silent_calls = work.track("silent", silent)
    chatty_calls = work.track("chatty", chatty)
    async with running(make_watchdog(work)) as watchdog:
        silent_calls.begin(Job("s", "t", trio.current_time()))
        chatty_calls.begin(Job("c", "t", trio.current_time()))
        for _ in range(int(STALL_S * 3)):
            chatty.messages += 1  # e.g. progress notifications: it is alive, only slow
            await trio.sleep(1.0)
        assert chatty.checks == []
        assert 2 <= len(silent.checks) <= 3
        assert all(silent_s >= STALL_S for silent_s in silent.checks)
        assert watchdog.statistics().hung_checks == len(silent.checks)
        report = await watchdog.ask(CheckNow)
        assert report is not None
        assert [owner for owner, _ in report.silent] == ["silent"]


async def test_an_owner_with_nothing_in_flight_is_never_silent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    work = WorkRegistry()
    idle = FakeLiveness()
    work.track("idle", idle)
    async with running(make_watchdog(work)) as watchdog:
        await trio.sleep(STALL_S * 5)
        assert idle.checks == []
        assert watchdog.statistics().stalls == 0


async def test_restart_hung_off_only_reports(autojump_clock: trio.testing.MockClock) -> None:
    work = WorkRegistry()
    silent = FakeLiveness()
    work.track("silent", silent).begin(Job("s", "t", trio.current_time()))
    reports: list[StallReport] = []
    async with running(make_watchdog(work, on_stall=reports.append, restart_hung=False)):
        await trio.sleep(STALL_S * 2)
    assert silent.checks == []
    assert reports
    assert reports[0].silent[0][0] == "silent"


async def test_the_report_shows_every_component_and_survives_broken_ones(
    autojump_clock: trio.testing.MockClock,
) -> None:
    @attrs.frozen
    class LimiterStatistics:
        name: str
        rate: float
        waiting: int

    def broken() -> object:
        raise RuntimeError("boom")

    components = ComponentRegistry()
    components.register("limiter", "docs", lambda: LimiterStatistics("docs", 2.5, 3), server="docs")
    components.register("breaker", "docs", broken, server="docs")
    work = WorkRegistry()
    work.track("docs").begin(Job("req-1", "search", trio.current_time()))

    def bad_callback(report: StallReport) -> None:
        raise ValueError("user bug")

    async with running(make_watchdog(work, components, on_stall=bad_callback)) as watchdog:
        await trio.sleep(STALL_S * 1.25 + 0.1)
        report = watchdog.statistics().last_report
    assert report is not None
    limiter, breaker = report.components
    assert limiter.statistics == LimiterStatistics("docs", 2.5, 3)
    assert breaker.status is HealthStatus.FAILING
    assert breaker.reason is not None
    assert "boom" in breaker.reason
    text = report.describe()
    assert "limiter docs [ok] rate=2.5, waiting=3" in text
    assert "breaker docs [failing: statistics() raised RuntimeError: boom]" in text


async def test_an_untracked_owner_leaves_the_watch(autojump_clock: trio.testing.MockClock) -> None:
    work = WorkRegistry()
    removed = work.track("removed", FakeLiveness())
    removed.begin(Job("r", "t", trio.current_time()))
    work.untrack(removed)
    async with running(make_watchdog(work)) as watchdog:
        await trio.sleep(STALL_S * 2)
        assert watchdog.statistics().stalls == 0
        assert watchdog.statistics().in_flight == 0


def test_in_flight_tracking_is_plain_bookkeeping() -> None:
    in_flight = InFlight("docs")
    jobs = [Job(str(n), "t", 0.0) for n in range(3)]
    for job in jobs[::2]:
        in_flight.begin(job)
    in_flight.begin(jobs[1])
    assert [item.key for item in in_flight.oldest(1.0, 10)] == ["0", "2", "1"]
    in_flight.end(jobs[1])
    assert len(in_flight) == 2
    assert in_flight.completed == 1
    assert [item.key for item in in_flight.oldest(1.0, 10)] == ["0", "2"]
