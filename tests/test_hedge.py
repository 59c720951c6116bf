"""Hedging alone (rmcp_actors/flow/hedge.py): the latency sketch and the race, on MockClock."""

from __future__ import annotations

import anyio
import pytest
import trio
import trio.testing

from rmcp_actors.flow.hedge import LatencySketch, parse_percentile, race


class Retryable(Exception):
    pass


class Final(Exception):
    pass


def is_retryable(error: Exception) -> bool:
    return isinstance(error, Retryable)


@pytest.mark.parametrize(("text", "quantile"), [("p50", 0.5), ("p95", 0.95), ("p99", 0.99), ("p99.9", 0.999)])
def test_percentile_names(text: str, quantile: float) -> None:
    assert parse_percentile(text) == pytest.approx(quantile)


@pytest.mark.parametrize("text", ["p0", "p100", "95", "p", "P95", "p-5", "p95 ", "p9x"])
def test_percentile_names_out_of_range(text: str) -> None:
    with pytest.raises(ValueError, match="must be a latency percentile"):
        parse_percentile(text)


def test_sketch_quantiles_are_nearest_rank_over_the_recent_ring() -> None:
    sketch = LatencySketch(size=100)
    assert sketch.quantile(0.95) is None
    for ms in range(1, 101):
        sketch.record(ms / 1000)
    assert sketch.quantile(0.5) == pytest.approx(0.050)
    assert sketch.quantile(0.95) == pytest.approx(0.095)
    assert sketch.quantile(0.999) == pytest.approx(0.100)
    for _ in range(100):  # the tool got slow: the ring forgets the fast past
        sketch.record(2.0)
    assert sketch.quantile(0.5) == 2.0
    assert sketch.count == 200


class Attempts:
    """Attempts that take the given seconds (or raise), recording what ran and what was cancelled."""

    def __init__(self, *outcomes: tuple[float, str | Exception]) -> None:
        self.outcomes = outcomes
        self.started: list[tuple[int, float]] = []
        self.cancelled: list[int] = []
        self.hedges_asked = 0

    async def __call__(self, index: int) -> str:
        self.started.append((index, trio.current_time()))
        seconds, outcome = self.outcomes[index]
        try:
            await trio.sleep(seconds)
        except trio.Cancelled:
            self.cancelled.append(index)
            raise
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def may_hedge(self) -> bool:
        self.hedges_asked += 1
        return True


async def test_a_hedge_beats_a_slow_first_attempt(autojump_clock: trio.testing.MockClock) -> None:
    attempts = Attempts((10.0, "slow"), (0.1, "fast"))
    start = trio.current_time()
    result = await race(
        attempts, delay_s=1.0, max_hedges=1, may_hedge=attempts.may_hedge, retryable=is_retryable
    )
    assert result == "fast"
    assert trio.current_time() - start == pytest.approx(1.1)
    assert attempts.started == [(0, start), (1, pytest.approx(start + 1.0))]
    assert attempts.cancelled == [0]


async def test_a_fast_first_attempt_sends_no_hedge(autojump_clock: trio.testing.MockClock) -> None:
    attempts = Attempts((0.5, "first"), (0.1, "hedge"))
    result = await race(
        attempts, delay_s=1.0, max_hedges=1, may_hedge=attempts.may_hedge, retryable=is_retryable
    )
    assert (result, attempts.hedges_asked, len(attempts.started)) == ("first", 0, 1)


async def test_no_hedge_without_permission(autojump_clock: trio.testing.MockClock) -> None:
    attempts = Attempts((10.0, "first"), (0.1, "hedge"))
    result = await race(attempts, delay_s=1.0, max_hedges=1, may_hedge=lambda: False, retryable=is_retryable)
    assert (result, len(attempts.started)) == ("first", 1)


async def test_hedges_start_one_delay_apart(autojump_clock: trio.testing.MockClock) -> None:
    attempts = Attempts((10.0, "a"), (10.0, "b"), (0.5, "c"))
    start = trio.current_time()
    result = await race(
        attempts, delay_s=1.0, max_hedges=2, may_hedge=attempts.may_hedge, retryable=is_retryable
    )
    assert result == "c"
    assert [index for index, _ in attempts.started] == [0, 1, 2]
    assert [at - start for _, at in attempts.started] == pytest.approx([0.0, 1.0, 2.0])
    assert sorted(attempts.cancelled) == [0, 1]


async def test_a_retryable_failure_leaves_the_race_to_the_others(
    autojump_clock: trio.testing.MockClock,
) -> None:
    attempts = Attempts((3.0, Retryable("lost")), (5.0, "hedge"))
    assert (
        await race(attempts, delay_s=1.0, max_hedges=1, may_hedge=attempts.may_hedge, retryable=is_retryable)
        == "hedge"
    )


async def test_when_all_fail_the_worst_failure_is_raised(autojump_clock: trio.testing.MockClock) -> None:
    attempts = Attempts((3.0, Retryable("not sent")), (1.0, Retryable("lost")))
    with pytest.raises(Retryable, match="lost"):
        await race(
            attempts,
            delay_s=1.0,
            max_hedges=1,
            may_hedge=attempts.may_hedge,
            retryable=is_retryable,
            worst=lambda error: 1 if "lost" in str(error) else 0,
        )


async def test_a_first_attempt_failing_before_the_delay_is_not_hedged(
    autojump_clock: trio.testing.MockClock,
) -> None:
    attempts = Attempts((0.5, Retryable("lost")), (0.1, "hedge"))
    start = trio.current_time()
    with pytest.raises(Retryable):
        await race(attempts, delay_s=1.0, max_hedges=1, may_hedge=attempts.may_hedge, retryable=is_retryable)
    assert (trio.current_time() - start, attempts.hedges_asked) == (pytest.approx(0.5), 0)


async def test_a_final_error_is_an_answer_and_wins(autojump_clock: trio.testing.MockClock) -> None:
    attempts = Attempts((10.0, "slow"), (0.1, Final("refused")))
    with pytest.raises(Final, match="refused"):
        await race(attempts, delay_s=1.0, max_hedges=1, may_hedge=attempts.may_hedge, retryable=is_retryable)
    assert attempts.cancelled == [0]


async def test_cancelling_the_caller_cancels_every_attempt(autojump_clock: trio.testing.MockClock) -> None:
    attempts = Attempts((10.0, "a"), (10.0, "b"))
    with trio.move_on_after(2.0) as scope:
        await race(attempts, delay_s=1.0, max_hedges=1, may_hedge=attempts.may_hedge, retryable=is_retryable)
    assert scope.cancelled_caught
    assert sorted(attempts.cancelled) == [0, 1]


async def test_runs_under_asyncio_too() -> None:
    async def attempt(index: int) -> int:
        await anyio.sleep(0.2 if index == 0 else 0.0)
        return index

    def main() -> int:
        return anyio.run(
            lambda: race(attempt, delay_s=0.01, max_hedges=1, may_hedge=lambda: True, retryable=is_retryable),
            backend="asyncio",
        )

    assert await trio.to_thread.run_sync(main) == 1
