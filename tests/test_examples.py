"""The examples run as a user runs them: as scripts, in a subprocess."""

from __future__ import annotations

import subprocess
from collections import Counter
from pathlib import Path

from conftest import PYTHON

EXAMPLES = Path(__file__).parent.parent / "examples"


def ledger_runs(path: Path) -> Counter[str]:
    """How many times each item was appended to a ledger."""
    return Counter(path.read_text().splitlines())


def row(output: str, label: str) -> list[str]:
    """The values of the demo's table row named ``label``."""
    [line] = [line for line in output.splitlines() if line.startswith(label)]
    return line[len(label) :].split()


def test_exactly_once_demo(tmp_path: Path) -> None:
    # A seconds-long subprocess: a blocking run keeps the test simple, and nothing else runs.
    # 9-13 s on the 2-core machine with other work on it, 17 s beside another pytest: the
    # timeout only guards against a hang.
    demo = subprocess.run(
        [PYTHON, str(EXAMPLES / "exactly_once.py"), "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert demo.returncode == 0, demo.stderr
    items = {f"order-{number:02d}" for number in range(20)}
    raw, rmcp = ledger_runs(tmp_path / "raw" / "ledger"), ledger_runs(tmp_path / "rmcp" / "ledger")

    # rmcp_actors: each order created exactly once, although answers were lost.
    assert rmcp == Counter(items)
    assert (tmp_path / "rmcp" / "answers-lost").read_text().count("\n") > 0
    # The naive retry of raw MCP created some orders twice (the relay's seed makes it repeatable).
    assert set(raw) == items
    assert max(raw.values()) >= 2
    # The table reports what the ledgers say.
    assert row(demo.stdout, "side effects run") == [str(raw.total()), str(rmcp.total())]
    assert row(demo.stdout, "calls run twice (or more)") == [
        str(sum(count > 1 for count in raw.values())),
        "0",
    ]
    assert "each order created exactly once" in demo.stdout
