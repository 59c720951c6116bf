"""A property over random sagas: whatever fails where, every ledger ends fully applied or fully
compensated, and no step or compensation runs twice.

Each example runs a whole runtime (``trio.run``) against a real in-memory MCP server with RMCP
installed, under MockClock.
"""

from __future__ import annotations

from collections import Counter

import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_transactions import Boom, Ledger, ledger_server, step

from rmcp_actors import RMCPCompensationError, RMCPSupervisor, ServerSpec, TransactionState


@st.composite
def sagas(draw: st.DrawFn) -> tuple[int, int | None, int | None, bool, frozenset[int]]:
    steps = draw(st.integers(1, 6))
    failing = draw(st.none() | st.integers(0, steps - 1))
    pivot = draw(st.none() | st.integers(0, steps - 1))
    raise_after = draw(st.booleans())
    # Compensations that fail once (the tool reports it): reported, never run twice.
    undo_failures = draw(st.frozensets(st.integers(0, steps - 1), max_size=2))
    return steps, failing, pivot, raise_after, undo_failures


async def run_saga(
    steps: int, failing: int | None, pivot: int | None, raise_after: bool, undo_failures: frozenset[int]
) -> tuple[Ledger, TransactionState, BaseException | None]:
    ledger = Ledger()
    labels = [f"s{index}" for index in range(steps)]
    if failing is not None:
        ledger.failing.add(labels[failing])
    for index in undo_failures:
        ledger.undo_failures[labels[index]] = 1
    raised: BaseException | None = None
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(ServerSpec.in_memory("ledger", ledger_server(ledger)))
        tx = sup.transaction("saga", continue_on_compensation_failure=True)
        try:
            async with tx:
                for index, label in enumerate(labels):
                    await step(tx, label, pivot=index == pivot)
                if raise_after:
                    raise Boom("after the last step")
        except (Boom, RMCPCompensationError) as error:
            raised = error
    return ledger, tx.state, raised


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sagas())
def test_every_saga_ends_fully_applied_or_fully_compensated(
    saga: tuple[int, int | None, int | None, bool, frozenset[int]],
) -> None:
    steps, failing, pivot, raise_after, undo_failures = saga
    ledger, state, raised = trio.run(run_saga, *saga, clock=trio.testing.MockClock(autojump_threshold=0))
    runs = Counter(ledger.entries)
    assert all(count == 1 for count in runs.values()), ledger.entries  # nothing ran twice
    applied = [entry.removeprefix("do ") for entry in ledger.entries if entry.startswith("do ")]
    undone = [entry.removeprefix("undo ") for entry in ledger.entries if entry.startswith("undo ")]
    ran = failing if failing is not None else steps  # the steps before the failing one ran
    assert applied == [f"s{index}" for index in range(ran)]
    aborted = failing is not None or raise_after
    past_pivot = pivot is not None and pivot < ran
    if not aborted or past_pivot:
        assert state is TransactionState.COMMITTED
        assert undone == []
        return
    # Fully compensated, in reverse order, except compensations that failed (and are reported).
    failed = sorted((index for index in undo_failures if index < ran), reverse=True)
    assert undone == [f"s{index}" for index in reversed(range(ran)) if index not in failed]
    if failed:
        assert state is TransactionState.COMPENSATION_FAILED
        assert isinstance(raised, RMCPCompensationError)
        assert raised.failed_steps == tuple(failed)
    else:
        assert state is TransactionState.COMPENSATED
        assert isinstance(raised, Boom)
