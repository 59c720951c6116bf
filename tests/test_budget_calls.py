"""The retry budget and max_attempts = 0 on the call path, against real RMCP servers in memory."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing
from mcp_test_server import State, build_server

from rmcp_actors import (
    PolicyOverrides,
    RetryOverrides,
    RMCPNackError,
    RMCPSupervisor,
    ServerSpec,
    ToolOverrides,
)
from rmcp_actors.config import CircuitBreakerOverrides, RetryBudgetOverrides
from rmcp_actors.flow.budget import MEMORY_S
from rmcp_actors.server import install
from rmcp_actors.stores import MemoryStore

NO_BREAKER = CircuitBreakerOverrides(mode="disabled")
# For the tests of what ends a call at its deadline: a budget that cannot run out first.
AMPLE_BUDGET = RetryBudgetOverrides(min_per_s=1000.0)


class DownStore:
    """A dedup store that fails every claim: the server NACKs each attempt `unavailable`
    (retryable, the tool did not run) and counts the attempts it received."""

    def __init__(self) -> None:
        self.inner = MemoryStore(clock=trio.current_time)
        self.received = 0

    @property
    def durable(self) -> bool:
        return False

    async def begin(self, key: str, **kwargs: Any) -> Any:
        self.received += 1
        raise OSError("the store is down")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def always_failing() -> tuple[Any, DownStore]:
    store = DownStore()
    store_any: Any = store
    return build_server(State(), store=store_any), store


@pytest.mark.parametrize("min_per_s", [3.0, 0.0])
async def test_total_failure_sends_at_most_the_budget(
    min_per_s: float, autojump_clock: trio.testing.MockClock
) -> None:
    """1,000 calls at 100/s to a server that refuses every attempt, each allowed to retry until
    its deadline: the attempts the server received stay within (1 + ratio) x offered plus the
    time deposits, not max_attempts x offered."""
    app, store = always_failing()
    ratio, offered = 0.2, 1000
    policy = PolicyOverrides(
        timeout_s=5.0,
        retry=RetryOverrides(max_attempts=0, base_delay_s=0.01, max_delay_s=0.05),
        retry_budget=RetryBudgetOverrides(ratio=ratio, min_per_s=min_per_s),
        circuit_breaker=NO_BREAKER,
    )
    errors: list[RMCPNackError] = []
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("down", app, overrides=policy))
        started = trio.current_time()

        async def one(index: int) -> None:
            with pytest.raises(RMCPNackError) as caught:
                await sup.call("down", "echo", {"text": str(index)})
            errors.append(caught.value)

        async with trio.open_nursery() as nursery:
            for index in range(offered):
                nursery.start_soon(one, index)
                await trio.sleep(0.01)
        duration = trio.current_time() - started
        budget = sup.statistics().budgets[0]
    bound = (1 + ratio) * offered + min_per_s * (duration + MEMORY_S)
    figures = f"{store.received} attempts for {offered} calls in {duration:.1f} s (bound {bound:.0f})"
    assert offered < store.received <= bound, figures
    if min_per_s == 0:
        assert store.received <= 1.2 * offered, figures
    assert len(errors) == offered
    assert all(error.code == "unavailable" and not error.may_have_executed for error in errors)
    exhausted = [error for error in errors if "retry budget" in str(error)]
    assert len(exhausted) >= offered * 0.7, figures
    assert budget.refused >= len(exhausted)
    assert budget.retries == store.received - offered


async def test_max_attempts_0_retries_until_the_deadline(autojump_clock: trio.testing.MockClock) -> None:
    app, store = always_failing()
    policy = PolicyOverrides(
        retry=RetryOverrides(max_attempts=0, base_delay_s=0.1, max_delay_s=0.5),
        retry_budget=AMPLE_BUDGET,
        circuit_breaker=NO_BREAKER,
    )
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("down", app, overrides=policy))
        started = trio.current_time()
        with pytest.raises(RMCPNackError, match="deadline") as caught:
            await sup.call("down", "echo", {"text": "x"}, timeout=10)
        elapsed = trio.current_time() - started
    assert 10 - 0.5 <= elapsed <= 10
    assert store.received > 10
    assert caught.value.code == "unavailable"
    assert caught.value.may_have_executed is False


async def test_against_a_deduplicating_server_the_default_retries_until_the_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """max_attempts unset: an RMCP server that deduplicates makes retries safe, so the call keeps
    trying within its deadline (and the budget) instead of stopping after three attempts."""
    app, store = always_failing()
    policy = PolicyOverrides(
        retry=RetryOverrides(base_delay_s=0.1, max_delay_s=0.5),
        retry_budget=AMPLE_BUDGET,
        circuit_breaker=NO_BREAKER,
    )
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("down", app, overrides=policy))
        with pytest.raises(RMCPNackError, match="deadline"):
            await sup.call("down", "record", {"label": "x"}, timeout=5)
    assert store.received > 3


async def test_an_empty_budget_ends_the_call_with_its_last_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    app, store = always_failing()
    policy = PolicyOverrides(
        retry=RetryOverrides(max_attempts=0),
        retry_budget=RetryBudgetOverrides(ratio=0.0, min_per_s=0.0),
        circuit_breaker=NO_BREAKER,
    )
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("down", app, overrides=policy))
        started = trio.current_time()
        with pytest.raises(RMCPNackError, match="retry budget") as caught:
            await sup.call("down", "echo", {"text": "x"}, timeout=30)
        assert trio.current_time() - started < 0.1
    assert store.received == 1
    assert caught.value.code == "unavailable"
    assert caught.value.may_have_executed is False


async def test_a_tool_with_its_own_budget_does_not_spend_the_servers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    app, store = always_failing()
    policy = PolicyOverrides(
        retry=RetryOverrides(max_attempts=0, base_delay_s=0.001, max_delay_s=0.001),
        retry_budget=RetryBudgetOverrides(ratio=0.0, min_per_s=0.0),
        circuit_breaker=NO_BREAKER,
    )
    tools = {"echo": ToolOverrides(retry_budget=RetryBudgetOverrides(ratio=0.0, min_per_s=1.0))}
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("down", app, overrides=policy, tools=tools))
        with pytest.raises(RMCPNackError, match="retry budget"):
            await sup.call("down", "echo", {"text": "x"}, timeout=30)
        echo_attempts = store.received
        with pytest.raises(RMCPNackError, match="retry budget"):
            await sup.call("down", "record", {"label": "x"}, timeout=30)
    # echo's own reserve (1/s x 10 s) paid its retries; the server's empty budget paid none.
    assert echo_attempts == 1 + int(1.0 * MEMORY_S)
    assert store.received - echo_attempts == 1


async def test_retrying_until_the_deadline_ends_with_the_last_answer_not_a_timeout(
    state: State, autojump_clock: trio.testing.MockClock
) -> None:
    """A server busy with another call NACKs `overloaded` with retry_after_ms = 100: after the
    attempt at 0.4 s, one at 0.5 s would have 30 ms left, too little for a tool that is not safe
    to repeat. The call ends then with the server's refusal, not with a bare "too little time"."""
    app = install(build_server(state), store=MemoryStore(clock=trio.current_time), max_in_flight=1)
    policy = PolicyOverrides(
        retry=RetryOverrides(max_attempts=0, base_delay_s=0.0, max_delay_s=0.0),
        retry_budget=AMPLE_BUDGET,
        circuit_breaker=NO_BREAKER,
    )
    async with RMCPSupervisor.open() as sup, trio.open_nursery() as nursery:
        await sup.add_server(ServerSpec.in_memory("busy", app, overrides=policy))
        nursery.start_soon(sup.call, "busy", "block_unsafe", {"label": "hog", "seconds": 100})
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(RMCPNackError, match="no time is left") as caught:
            await sup.call("busy", "record", {"label": "refused"}, timeout=0.53)
        nursery.cancel_scope.cancel()
    assert (caught.value.code, caught.value.may_have_executed) == ("overloaded", False)
    assert "after 5 attempt(s)" in str(caught.value)
    assert "refused" not in state.ledger
