"""The retry budget alone (rmcp_actors/flow/budget.py), on a hand-driven clock."""

from __future__ import annotations

import math

import pytest

from rmcp_actors.flow.budget import MEMORY_S, RetryBudget


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_starts_with_the_quiet_reserve_and_time_refills_it_at_min_per_s() -> None:
    clock = Clock()
    budget = RetryBudget(0.2, 3.0, clock=clock)
    assert budget.statistics().balance == 3.0 * MEMORY_S
    for _ in range(30):
        assert budget.withdraw_retry()
    assert not budget.withdraw_retry()
    clock.now = 1.0
    # 3 tokens per second, less what faded meanwhile: 30 * (1 - e^-0.1) = 2.85.
    assert budget.statistics().balance == pytest.approx(3 * MEMORY_S * (1 - math.exp(-0.1)))
    assert [budget.withdraw_retry() for _ in range(3)] == [True, True, False]
    stats = budget.statistics()
    assert (stats.retries, stats.hedges, stats.refused, stats.first_attempts) == (32, 0, 2, 0)


def test_first_attempts_buy_retries_at_the_ratio() -> None:
    budget = RetryBudget(0.25, 0.0, clock=Clock())
    for _ in range(3):
        budget.deposit()
    assert not budget.withdraw_hedge()  # 0.75 of a token: not a whole one
    budget.deposit()
    assert budget.withdraw_hedge()
    assert not budget.withdraw_retry()
    stats = budget.statistics()
    assert (stats.first_attempts, stats.hedges, stats.retries, stats.refused) == (4, 1, 0, 2)


@pytest.mark.parametrize(
    ("ratio", "min_per_s", "calls_per_s"),
    [(0.2, 3.0, 100.0), (0.2, 3.0, 5.0), (0.5, 0.0, 50.0), (0.2, 0.0, 1000.0)],
)
def test_total_failure_sends_at_most_the_budgeted_attempts(
    ratio: float, min_per_s: float, calls_per_s: float
) -> None:
    """1,000 calls, each retrying at once for as long as the budget lets it (max_attempts = 0)."""
    clock = Clock()
    budget = RetryBudget(ratio, min_per_s, clock=clock)
    offered = 1000
    attempts = 0
    for _ in range(offered):
        clock.now += 1 / calls_per_s
        budget.deposit()
        attempts += 1
        while budget.withdraw_retry():
            attempts += 1
    duration = clock.now
    bound = (1 + ratio) * offered + min_per_s * (duration + MEMORY_S)
    assert attempts <= bound
    # Not vacuous: the budget is spent, not hoarded (what faded is the only gap).
    assert attempts >= offered + 0.9 * (ratio * offered + min_per_s * duration)


def test_healthy_traffic_does_not_bank_a_retry_storm() -> None:
    clock = Clock()
    budget = RetryBudget(0.2, 3.0, clock=clock)
    for _ in range(360_000):  # an hour at 100 calls/s, no failure
        clock.now += 0.01
        budget.deposit()
    # About ten seconds' worth of deposits, not 72,000 tokens.
    balance = budget.statistics().balance
    assert balance == pytest.approx((0.2 * 100 + 3.0) * MEMORY_S, rel=0.01)


def test_refuses_negative_settings() -> None:
    with pytest.raises(ValueError, match="must not be negative"):
        RetryBudget(-0.1, 3.0)
