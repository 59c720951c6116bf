"""How many non-idempotent calls end with an unknown outcome under heavy chaos, and why.

Usage::

    python benchmarks/chaos_unknowns.py [--calls 2000] [--concurrency 16] [--seed 1]
                                        [--reconcile] [--json PATH]

The chaos harness of ``tests/test_chaos.py``: the test server (``tests/mcp_test_server.py``)
with a SQLite dedup store, behind the stdio relay that swallows a ``tools/call`` answer and
SIGKILLs the server with probability 0.2; the runtime reconnects by itself (a new relay and a
new server process each time, forked warm by ``tests/prefork.py``). Every call is
``record(label)``, a side effect appended to a ledger on disk, one label per logical call,
retried up to 12 times.

At the end the script prints, from the callers' outcomes and the ledger:

* ``succeeded``: calls that returned a result;
* ``in_doubt``: calls the server answered NACK ``in_doubt`` (a run started and never recorded);
* ``lost``: other unknown outcomes (every attempt lost its answer, or the retry budget ran out);
* ``not run at all``: unknown calls whose label is not in the ledger (the tool never ran);
* ``duplicates``: labels in the ledger more than once (at-most-once broken: must be 0).

``--reconcile`` starts the server with a reconciler for ``record`` that looks the label up in
the ledger (``tests/mcp_test_server.py --reconcile-record``; only on code that has reconcilers).
The ``tests`` directory used is the one beside the imported ``rmcp_actors`` package, so that
``PYTHONPATH`` selects the code measured, server included.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import trio

import rmcp_actors
from rmcp_actors import (
    PolicyOverrides,
    ReconnectOverrides,
    RetryOverrides,
    RMCPError,
    RMCPOutcomeUnknownError,
    RMCPSupervisor,
    ServerSpec,
)
from rmcp_actors.config import CircuitBreakerOverrides, RetryBudgetOverrides
from rmcp_actors.testing import relay_command

TESTS = Path(rmcp_actors.__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))
import prefork  # noqa: E402  (from the tests directory of the code measured)

SWALLOW_PROBABILITY = 0.2
# As tests/test_chaos.py: 12 attempts, short backoff, a retry budget that never binds first.
# The circuit breaker is off: 16 calls cut by each kill trip it, and the calls it then refuses
# (nothing sent) would hide the figure measured here, what the dedup store makes of a kill.
CHAOS_RECOVERY = PolicyOverrides(
    circuit_breaker=CircuitBreakerOverrides(mode="disabled"),
    retry=RetryOverrides(max_attempts=12, base_delay_s=0.01, max_delay_s=0.05),
    retry_budget=RetryBudgetOverrides(ratio=11.0, min_per_s=100.0),
    reconnect=ReconnectOverrides(base_delay_s=0.02, max_delay_s=0.2),
)
CALL_TIMEOUT_S = 120


async def run(calls: int, concurrency: int, seed: int, reconcile: bool, state_dir: Path) -> dict[str, Any]:
    socket_path = str(state_dir / "zygote.sock")
    zygote = prefork.start_zygote(socket_path)
    try:
        server_options = ["--state-dir", str(state_dir), "--rmcp-store", str(state_dir / "rmcp.sqlite")]
        if reconcile:
            server_options.append("--reconcile-record")
        server = prefork.command(socket_path, "server", *server_options)
        relay_argv = relay_command(
            server, swallow_probability=SWALLOW_PROBABILITY, seed=seed, log=state_dir / "faults"
        )
        relay = prefork.command(socket_path, "relay", *relay_argv[2:])
        spec = ServerSpec.stdio("chaos", relay[0], relay[1:], overrides=CHAOS_RECOVERY)
        labels = [f"order-{index}" for index in range(calls)]
        pending = iter(labels)
        succeeded: set[str] = set()
        in_doubt: set[str] = set()
        lost: dict[str, str] = {}
        failed: dict[str, str] = {}

        async def caller(sup: RMCPSupervisor) -> None:
            for label in pending:
                try:
                    # The label as the key: the store's records can be read back per call.
                    await sup.call(
                        "chaos", "record", {"label": label}, idempotency_key=label, timeout=CALL_TIMEOUT_S
                    )
                except RMCPOutcomeUnknownError as error:
                    if "in_doubt" in str(error):
                        in_doubt.add(label)
                    else:
                        lost[label] = str(error).split(" (request_id=")[0]
                except RMCPError as error:
                    failed[label] = f"{type(error).__name__}: {error}"
                else:
                    succeeded.add(label)

        started = time.perf_counter()
        async with RMCPSupervisor.open() as sup:
            await sup.add_server(spec)
            async with trio.open_nursery() as nursery:
                for _ in range(concurrency):
                    nursery.start_soon(caller, sup)
            lives = sup.statistics().connections[0].connects
        elapsed = time.perf_counter() - started
    finally:
        assert zygote.stdin is not None
        zygote.stdin.close()
        zygote.wait(timeout=30)
    ledger_file = state_dir / "ledger"
    ledger = Counter(ledger_file.read_text().splitlines() if ledger_file.exists() else [])
    faults_file = state_dir / "faults"
    faults = len(faults_file.read_text().splitlines()) if faults_file.exists() else 0
    unknown = in_doubt | set(lost)
    (state_dir / "in_doubt").write_text("".join(f"{label}\n" for label in sorted(in_doubt)))
    return {
        "rmcp_actors": str(TESTS.parent / "rmcp_actors"),
        "calls": calls,
        "concurrency": concurrency,
        "seed": seed,
        "reconcile": reconcile,
        "elapsed_s": round(elapsed, 1),
        "faults": faults,
        "server_lives": lives,
        "succeeded": len(succeeded),
        "in_doubt": len(in_doubt),
        "in_doubt_not_run": sum(label not in ledger for label in in_doubt),
        "lost": len(lost),
        "lost_not_run": sum(label not in ledger for label in lost),
        "lost_kinds": dict(Counter(lost.values()).most_common(3)),
        "failed": len(failed),
        "failed_examples": sorted(set(failed.values()))[:3],
        "unknown": len(unknown),
        "unknown_share": round(len(unknown) / calls, 4),
        "not_run_at_all": sum(label not in ledger for label in unknown),
        "duplicates": sum(count > 1 for count in ledger.values()),
        "succeeded_not_in_ledger": sum(label not in ledger for label in succeeded),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--reconcile", action="store_true", help="the server reconciles record through its ledger"
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--keep", type=Path, help="keep the ledger, fault log and store in this directory")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="chaos-unknowns-") as directory:
        state_dir = options.keep or Path(directory)
        state_dir.mkdir(parents=True, exist_ok=True)
        figures = trio.run(
            run, options.calls, options.concurrency, options.seed, options.reconcile, state_dir
        )
    for name, value in figures.items():
        print(f"{name:24} {value}")
    if options.json is not None:
        options.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
