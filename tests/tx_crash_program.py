"""The client program of the transaction crash tests: runs one saga, or recovers, and can die
(SIGKILL) at a chosen journal append.

Usage (forked warm by ``prefork.py``'s ``program`` kind, or run with this interpreter)::

    tx_crash_program.py run|recover ZYGOTE_SOCKET STATE_DIR STEPS FAIL_AT PIVOT

``run`` opens a transaction of STEPS steps against the stdio test server (RMCP, SQLite dedup
store, ledger file in STATE_DIR): step ``i`` records ``step<i>`` in the ledger, its
compensation records ``undo<i>``. With ``FAIL_AT`` = ``i`` (not ``-1``) the block raises
before step ``i``, so the saga compensates. With ``PIVOT`` = ``1`` the last step is the pivot
(recovery finishes it forward once its intent is journaled). ``recover`` runs ``sup.recover()``.

``RMCP_TX_CRASH=before:N`` / ``after:N`` in the environment SIGKILLs the process just before
the N-th journal append of the process is made, or just after it is committed: a crash at that
journal point, in the middle of whatever the runtime does next.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import trio

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import prefork
from conftest import FAST_RECOVERY

from rmcp_actors import Compensation, RMCPSupervisor
from rmcp_actors.config import RMCPConfig, ServerSpec, TransactionSettings
from rmcp_actors.stores import SQLiteJournal
from rmcp_actors.transactions.journal import JournalRecord

SERVER = "ledger"
CRASH_VARIABLE = "RMCP_TX_CRASH"


class Abort(Exception):
    """The saga's own failure before a step."""


def config(zygote: str, state_dir: Path) -> RMCPConfig:
    """The runtime of every life of the program (and of the test's final recovery)."""
    server = prefork.command(
        zygote, "server", "--state-dir", str(state_dir), "--rmcp-store", str(state_dir / "dedup.db")
    )
    return RMCPConfig(
        servers={SERVER: ServerSpec.stdio(SERVER, server[0], server[1:], overrides=FAST_RECOVERY)},
        transactions=TransactionSettings(journal=str(state_dir / "journal.db")),
    )


def install_crash(spec: str) -> None:
    """Die by SIGKILL at the journal point ``spec`` (``before:N`` / ``after:N``)."""
    when, _, number = spec.partition(":")
    target = int(number)
    append = SQLiteJournal.append
    count = 0

    def die() -> None:
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    async def crashing_append(self: SQLiteJournal, record: JournalRecord) -> None:
        nonlocal count
        count += 1
        if count == target and when == "before":
            die()
        await append(self, record)
        if count == target and when == "after":
            die()

    SQLiteJournal.append = crashing_append  # type: ignore[method-assign]


async def run(sup: RMCPSupervisor, steps: int, fail_at: int, pivot: bool) -> None:
    tx = sup.transaction("crash")
    try:
        async with tx:
            for step in range(steps):
                if step == fail_at:
                    raise Abort(f"before step {step}")
                await tx.call(
                    SERVER,
                    "record",
                    {"label": f"step{step}"},
                    compensate=Compensation(SERVER, "record", {"label": f"undo{step}"}),
                    pivot=pivot and step == steps - 1,
                )
    except Abort:
        pass
    print(f"finished {tx.state.value}", flush=True)


async def main(mode: str, zygote: str, state_dir: Path, steps: int, fail_at: int, pivot: bool) -> None:
    async with RMCPSupervisor.open(config(zygote, state_dir)) as sup:
        if mode == "run":
            await run(sup, steps, fail_at, pivot)
        else:
            print(f"recovered {await sup.recover()!r}", flush=True)


if __name__ == "__main__":
    if crash := os.environ.get(CRASH_VARIABLE):
        install_crash(crash)
    mode, zygote, state_dir, steps, fail_at, pivot = sys.argv[1:7]
    trio.run(main, mode, zygote, Path(state_dir), int(steps), int(fail_at), pivot == "1")
