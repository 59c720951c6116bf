"""Exactly once: a naive retry loop over raw MCP against rmcp_actors, on a server that crashes.

Run with ``python examples/exactly_once.py`` (about 10 s; ``--workdir DIR`` keeps the files).

Both sides (run at the same time) make the same 20 logical calls to ``create_order``
(``examples/order_server.py``), each with its own item, through the fault-injecting relay of
``rmcp_actors.testing``: with probability 0.25 it swallows a tool's answer and SIGKILLs the
server, after the order was created. Then:

- raw MCP (``mcp.Client``) with a naive retry loop reconnects and sends the call again, and
  the order is created twice;
- rmcp_actors reconnects and sends the call again with the same idempotency key, and the RMCP
  server (a ``SQLiteStore`` survives the crash) replays the stored answer instead.

Every figure printed is measured: side effects from the servers' ledgers, lost answers from
the relay's log.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import attrs
import trio
from mcp import Client, StdioServerParameters

from rmcp_actors import (
    Outcome,
    PolicyOverrides,
    ReconnectOverrides,
    RetryOverrides,
    RMCPOutcomeUnknownError,
    RMCPSupervisor,
    ServerSpec,
)
from rmcp_actors.testing import relay_command

LOGICAL_CALLS = 20
SWALLOW_PROBABILITY = 0.25
# Every crash starts a new relay and server; each life draws from the seed and the faults
# logged so far, so a run sees the same faults every time it is repeated. Each restart costs
# about a second of imports: this seed loses 7 answers per side in 20 calls, two of them to a
# retry (an order the naive loop creates three times, a replay lost again), and 16 server
# starts in all.
SEED = 1
RAW_MAX_ATTEMPTS = 5
# Each attempt after a crash waits for a new server process (under a second each).
CALL_TIMEOUT_S = 30

ORDER_SERVER = Path(__file__).with_name("order_server.py")

# A server restart is the real cost of a lost answer; keep the backoff around it short.
RMCP_POLICY = PolicyOverrides(
    retry=RetryOverrides(max_attempts=8, base_delay_s=0.01, max_delay_s=0.1),
    reconnect=ReconnectOverrides(base_delay_s=0.02, max_delay_s=0.5),
)


@attrs.frozen
class Tally:
    """What one side of the demo measured (``None``: the side has no such notion)."""

    logical_calls: int
    side_effects: int
    run_twice: int
    answers_lost: int
    duplicates_replayed: int | None
    succeeded: int
    unknown: int | None


def relayed_order_server(workdir: Path, *, store: Path | None) -> list[str]:
    """The argv of the order server (keeping its files in ``workdir``) behind the relay."""
    server = [sys.executable, str(ORDER_SERVER), "--ledger", str(workdir / "ledger")]
    if store is not None:
        server += ["--store", str(store)]
    return relay_command(
        server, swallow_probability=SWALLOW_PROBABILITY, seed=SEED, log=workdir / "answers-lost"
    )


def measure(
    workdir: Path, items: list[str], *, succeeded: int, duplicates_replayed: int | None, unknown: int | None
) -> Tally:
    """Read a side's ledger and relay log into a Tally, with what its caller counted."""
    ledger_file, log_file = workdir / "ledger", workdir / "answers-lost"
    runs = Counter(ledger_file.read_text().splitlines() if ledger_file.exists() else [])
    return Tally(
        logical_calls=len(items),
        side_effects=sum(runs.values()),
        run_twice=sum(1 for count in runs.values() if count > 1),
        answers_lost=len(log_file.read_text().splitlines()) if log_file.exists() else 0,
        succeeded=succeeded,
        duplicates_replayed=duplicates_replayed,
        unknown=unknown,
    )


async def raw_mcp_with_naive_retry(workdir: Path, items: list[str]) -> Tally:
    """Call ``create_order`` for each item over raw MCP; on any error, reconnect and call again."""
    argv = relayed_order_server(workdir, store=None)
    params = StdioServerParameters(command=argv[0], args=argv[1:])
    succeeded = 0
    current, failures = 0, 0
    while current < len(items):
        try:
            async with Client(params) as client:
                while current < len(items):
                    await client.call_tool(
                        "create_order", {"item": items[current]}, read_timeout_seconds=CALL_TIMEOUT_S
                    )
                    succeeded += 1
                    current, failures = current + 1, 0
        except Exception:  # the naive part: whatever failed, send the same call again
            failures += 1
            if failures == RAW_MAX_ATTEMPTS:
                current, failures = current + 1, 0
    return measure(workdir, items, succeeded=succeeded, duplicates_replayed=None, unknown=None)


async def with_rmcp_actors(workdir: Path, items: list[str]) -> Tally:
    """Call ``create_order`` for each item through rmcp_actors and the RMCP server on SQLite."""
    argv = relayed_order_server(workdir, store=workdir / "rmcp.sqlite")
    spec = ServerSpec.stdio("orders", argv[0], argv[1:], overrides=RMCP_POLICY)
    succeeded = duplicates = unknown = 0
    async with RMCPSupervisor.open() as sup:
        await sup.add_server(spec)
        for item in items:
            try:
                result = await sup.call("orders", "create_order", {"item": item}, timeout=CALL_TIMEOUT_S)
            except RMCPOutcomeUnknownError:
                # Not retried blindly: the caller is told the order may exist, and checks.
                unknown += 1
                continue
            succeeded += int(result.outcome is Outcome.SUCCEEDED)
            duplicates += int(result.duplicate)
    return measure(workdir, items, succeeded=succeeded, duplicates_replayed=duplicates, unknown=unknown)


def table(raw: Tally, rmcp: Tally) -> str:
    """The two tallies side by side, one measure per row."""
    rows = [
        ("logical calls", "logical_calls"),
        ("side effects run", "side_effects"),
        ("calls run twice (or more)", "run_twice"),
        ("answers lost (server killed)", "answers_lost"),
        ("duplicates replayed", "duplicates_replayed"),
        ("calls succeeded", "succeeded"),
        ("outcome unknown", "unknown"),
    ]
    lines = [f"{'':30}{'raw MCP + retry':>17}{'rmcp_actors':>13}"]
    for label, field in rows:
        values = ["-" if (value := getattr(tally, field)) is None else str(value) for tally in (raw, rmcp)]
        lines.append(f"{label:30}{values[0]:>17}{values[1]:>13}")
    return "\n".join(lines)


async def main(workdir: Path) -> int:
    """Run both sides in ``workdir`` and print the table; return 1 if rmcp_actors ran a call twice."""
    items = [f"order-{number:02d}" for number in range(LOGICAL_CALLS)]
    print(
        f"{LOGICAL_CALLS} create_order calls; the relay loses an answer and kills the server "
        f"with p={SWALLOW_PROBABILITY} (seed {SEED})\n"
    )
    tallies: dict[str, Tally] = {}

    async def run_side(name: str, side: Callable[[Path, list[str]], Awaitable[Tally]]) -> None:
        (workdir / name).mkdir()
        tallies[name] = await side(workdir / name, items)

    # The sides share nothing (own servers, ledgers and relay logs): run at once, each waits
    # on its own server restarts.
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_side, "raw", raw_mcp_with_naive_retry)
        nursery.start_soon(run_side, "rmcp", with_rmcp_actors)
    raw, rmcp = tallies["raw"], tallies["rmcp"]
    print(table(raw, rmcp))
    print(f"\nraw MCP: {raw.run_twice} of {raw.logical_calls} orders created more than once.")
    if rmcp.run_twice:
        print(f"rmcp_actors: {rmcp.run_twice} orders created more than once: a bug, please report it.")
        return 1
    if rmcp.side_effects == rmcp.logical_calls:
        verdict = "each order created exactly once"
    else:
        verdict = f"no order created twice; {rmcp.unknown} outcome(s) unknown, reported to the caller"
    print(f"rmcp_actors: {verdict}; {rmcp.duplicates_replayed} lost answers replayed from the store.")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Naive retries over raw MCP against rmcp_actors.")
    parser.add_argument("--workdir", type=Path, help="an empty or new directory to keep the files in")
    options = parser.parse_args()
    if options.workdir is not None:
        options.workdir.mkdir(parents=True, exist_ok=True)
        sys.exit(trio.run(main, options.workdir))
    with tempfile.TemporaryDirectory(prefix="exactly-once-") as temporary:
        sys.exit(trio.run(main, Path(temporary)))
