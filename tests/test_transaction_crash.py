"""Crash recovery: a program running a saga is SIGKILLed at a journal point chosen by
hypothesis (just before an append, or just after its commit), then a new process recovers.

The saga (``tx_crash_program.py``) runs 3 or 4 steps against a stdio RMCP server with a SQLite
dedup store; each step and each compensation appends a label to a ledger file, a side effect
that survives every crash. After recovery, every transaction of the journal is terminal and
the ledger shows the saga fully applied (every step once, no compensation) or fully
compensated (each step at most once, and undone), never a step or a compensation twice. A
crash during recovery is recovered again.

The programs are forked from a warm zygote (``prefork.py``), so a life costs tens of
milliseconds of imports instead of a second.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections import Counter
from pathlib import Path

import attrs
import prefork
import pytest
import trio
import tx_crash_program
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rmcp_actors import RMCPSupervisor, TransactionState
from rmcp_actors.stores import SQLiteJournal
from rmcp_actors.transactions import TERMINAL_STATES

PROGRAM = str(Path(tx_crash_program.__file__).resolve())
# Appends of a saga of 4 steps that compensates all of them, with room to spare: a point past
# the last append means "no crash", which is a case too.
MOST_APPENDS = 16
LIFE_TIMEOUT_S = 60


@attrs.frozen
class Saga:
    """What the program's saga does: ``steps`` steps, an exception before step ``fail_at``
    (none when -1 or past the last), the last step a pivot or not."""

    steps: int
    fail_at: int
    pivot: bool

    def argv(self) -> list[str]:
        return [str(self.steps), str(self.fail_at), "1" if self.pivot else "0"]


def life(zygote: str, state_dir: Path, mode: str, saga: Saga, crash: str | None) -> int:
    """Run one life of the program; return its exit status (-9 when it crashed)."""
    env = dict(os.environ)
    env.pop(tx_crash_program.CRASH_VARIABLE, None)
    if crash is not None:
        env[tx_crash_program.CRASH_VARIABLE] = crash
    argv = prefork.command(zygote, "program", PROGRAM, mode, zygote, str(state_dir), *saga.argv())
    completed = subprocess.run(
        argv, env=env, timeout=LIFE_TIMEOUT_S, capture_output=True, text=True, check=False
    )
    assert completed.returncode in (0, -signal.SIGKILL), completed.stderr
    return completed.returncode


def ledger(state_dir: Path) -> list[str]:
    path = state_dir / "ledger"
    return path.read_text().splitlines() if path.exists() else []


async def recover_and_read(zygote: str, state_dir: Path) -> dict[str, TransactionState]:
    """Recover in this process; return every transaction's state as the journal tells."""
    async with RMCPSupervisor.open(tx_crash_program.config(zygote, state_dir)) as sup:
        await sup.recover()
    journal = SQLiteJournal(state_dir / "journal.db")
    try:
        return {summary.transaction_id: summary.state for summary in await journal.summaries()}
    finally:
        await journal.aclose()


def check_ledger(labels: list[str], steps: int, state: TransactionState) -> None:
    counts = Counter(labels)
    assert all(count == 1 for count in counts.values()), f"a side effect ran twice: {labels}"
    applied = {label for label in counts if label.startswith("step")}
    undone = {label.removeprefix("undo") for label in counts if label.startswith("undo")}
    if state is TransactionState.COMMITTED:
        assert labels == [f"step{index}" for index in range(steps)], labels
    else:
        assert state is TransactionState.COMPENSATED, (state, labels)
        # Every step that ran is undone; a compensation may have run for a step that did not
        # (its outcome was unknown): compensations tolerate that.
        assert {label.removeprefix("step") for label in applied} <= undone, labels


crash_points = st.tuples(st.sampled_from(["before", "after"]), st.integers(1, MOST_APPENDS)).map(
    lambda point: f"{point[0]}:{point[1]}"
)


@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    saga=st.builds(Saga, steps=st.integers(3, 4), fail_at=st.integers(-1, 3), pivot=st.booleans()),
    crash=crash_points,
    recovery_crash=st.none() | crash_points,
)
def test_a_saga_killed_at_any_journal_point_is_recovered_whole(
    zygote: str,
    tmp_path_factory: pytest.TempPathFactory,
    saga: Saga,
    crash: str,
    recovery_crash: str | None,
) -> None:
    state_dir = tmp_path_factory.mktemp("saga")
    life(zygote, state_dir, "run", saga, crash)
    if recovery_crash is not None:
        life(zygote, state_dir, "recover", saga, recovery_crash)
    states = trio.run(recover_and_read, zygote, state_dir)
    assert len(states) <= 1
    for state in states.values():
        assert state in TERMINAL_STATES
        check_ledger(ledger(state_dir), saga.steps, state)
    if not states:
        # Killed before the transaction's first record: nothing may have run.
        assert ledger(state_dir) == []


# A saga that runs two steps, fails before the third and compensates both journals 12 records:
# begun, in_progress, 2 x (intent, done), compensating, 2 x (compensation started, done),
# compensated. Every one of those points, before and after, deterministically.
COMPENSATING_SAGA = Saga(steps=3, fail_at=2, pivot=False)
COMPENSATING_SAGA_APPENDS = 12


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_compensating_saga_killed_at_every_journal_point_is_compensated(
    zygote: str, tmp_path_factory: pytest.TempPathFactory, when: str
) -> None:
    for point in range(1, COMPENSATING_SAGA_APPENDS + 1):
        state_dir = tmp_path_factory.mktemp("compensating")
        assert life(zygote, state_dir, "run", COMPENSATING_SAGA, f"{when}:{point}") == -signal.SIGKILL
        states = trio.run(recover_and_read, zygote, state_dir)
        labels = ledger(state_dir)
        if when == "before" and point == 1:
            assert (states, labels) == ({}, [])
            continue
        assert list(states.values()) == [TransactionState.COMPENSATED], (point, labels)
        check_ledger(labels, COMPENSATING_SAGA.steps, TransactionState.COMPENSATED)
    # One append past the last is no crash: the saga compensated by itself.
    state_dir = tmp_path_factory.mktemp("compensating")
    assert life(zygote, state_dir, "run", COMPENSATING_SAGA, f"{when}:{COMPENSATING_SAGA_APPENDS + 1}") == 0
    assert ledger(state_dir) == ["step0", "step1", "undo1", "undo0"]


def test_a_recovery_killed_between_sending_a_compensation_and_journaling_it_is_recovered(
    zygote: str, tmp_path: Path
) -> None:
    """The program dies after both steps (``StepDone`` of step 1 is append 6); recovery dies
    after sending the compensation of step 1, before its ``CompensationDone`` (append 3 of
    recovery: ``compensating``, ``CompensationStarted``, then that one). The next recovery sends
    it again with the same key: the server replays it, the ledger shows it once."""
    assert life(zygote, tmp_path, "run", COMPENSATING_SAGA, "after:6") == -signal.SIGKILL
    assert ledger(tmp_path) == ["step0", "step1"]
    assert life(zygote, tmp_path, "recover", COMPENSATING_SAGA, "before:3") == -signal.SIGKILL
    assert ledger(tmp_path) == ["step0", "step1", "undo1"]
    states = trio.run(recover_and_read, zygote, tmp_path)
    assert list(states.values()) == [TransactionState.COMPENSATED]
    assert ledger(tmp_path) == ["step0", "step1", "undo1", "undo0"]
