"""Transactions against a real stdio subprocess server with RMCP installed (real time).

The server's ledger is a file in its state directory, so the test reads what the process did.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import FAST_RECOVERY, PYTHON, stdio_args

from rmcp_actors import Compensation, Outcome, RMCPSupervisor, ServerSpec, TransactionState
from rmcp_actors.stores import MemoryJournal
from rmcp_actors.transactions.journal import CompensationSpec, StateChanged, StepIntent, TransactionBegun


class Refused(Exception):
    pass


def ledger(state_dir: Path) -> list[str]:
    path = state_dir / "ledger"
    return path.read_text().splitlines() if path.exists() else []


async def test_a_saga_over_stdio_compensates_in_reverse_and_its_keys_replay(
    tmp_path: Path,
) -> None:
    spec = ServerSpec.stdio(
        "test",
        PYTHON,
        stdio_args("--state-dir", str(tmp_path), "--rmcp-store", "memory"),
        overrides=FAST_RECOVERY,
    )
    journal = MemoryJournal()
    async with RMCPSupervisor.open(journal=journal) as sup:
        await sup.add_server(spec)
        tx = sup.transaction("order")
        with pytest.raises(Refused):  # noqa: PT012
            async with tx:
                for label in ("seat", "card"):
                    await tx.call(
                        "test",
                        "record",
                        {"label": label},
                        compensate=Compensation("test", "record", {"label": f"undo {label}"}),
                    )
                result = await tx.call("test", "fail", {"reason": "no tickets left"})
                if result.outcome is Outcome.FAILED:
                    raise Refused(result.text)
        assert tx.state is TransactionState.COMPENSATED
        assert ledger(tmp_path) == ["seat", "card", "undo card", "undo seat"]
        # Every step and compensation sent again with its key is replayed by the server.
        for index, label in enumerate(("seat", "card")):
            again = await sup.call("test", "record", {"label": label}, idempotency_key=f"{tx.id}:{index}")
            assert again.duplicate is True
            undo = await sup.call(
                "test", "record", {"label": f"undo {label}"}, idempotency_key=f"{tx.id}:{index}:compensate"
            )
            assert undo.duplicate is True
        assert ledger(tmp_path) == ["seat", "card", "undo card", "undo seat"]
        assert (await sup.recover()).total == 0
        [summary] = await sup.transactions()
        assert (summary.state, summary.steps) == (TransactionState.COMPENSATED, 3)


async def test_recovery_over_stdio_compensates_an_abandoned_saga(tmp_path: Path) -> None:
    spec = ServerSpec.stdio(
        "test",
        PYTHON,
        stdio_args("--state-dir", str(tmp_path), "--rmcp-store", "memory"),
        overrides=FAST_RECOVERY,
    )
    journal = MemoryJournal()
    tx_id = "abandoned"
    records = [
        TransactionBegun(transaction_id=tx_id, name="order", at=1.0),
        StateChanged(transaction_id=tx_id, at=1.0, state="in_progress"),
        StepIntent(
            transaction_id=tx_id,
            step=0,
            at=2.0,
            server="test",
            tool="record",
            arguments={"label": "seat"},
            idempotency_key=f"{tx_id}:0",
            compensation=CompensationSpec(server="test", tool="record", arguments={"label": "undo seat"}),
        ),
    ]
    for record in records:
        await journal.append(record)
    async with RMCPSupervisor.open(journal=journal) as sup:
        await sup.add_server(spec)
        # The program that died had sent its step (its outcome never reached the journal).
        await sup.call("test", "record", {"label": "seat"}, idempotency_key=f"{tx_id}:0")
        report = await sup.recover()
        assert report.compensated == (tx_id,)
        assert (await sup.recover()).total == 0
    assert ledger(tmp_path) == ["seat", "undo seat"]


def test_saga_example() -> None:
    example = Path(__file__).parent.parent / "examples" / "saga.py"
    run = subprocess.run([PYTHON, str(example)], capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    assert "the transaction is compensated" in run.stdout
    ledger = run.stdout.split("ledger:")[1].split()
    assert " ".join(ledger) == (
        "seat reserved on LH123 card charged 90 EUR card refunded 90 EUR seat released (R-LH123-12A)"
    )
