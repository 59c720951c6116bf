"""``rmcp chaos`` as a benchmark: the three ways under the issue's faults, into the results files.

Usage::

    python benchmarks/chaos.py [--quick] [--calls N] [--concurrency C] [--seed S]
                               [--faults SPEC] [--transport memory|stdio] [--json PATH]

Runs :func:`rmcp_actors.testing.run_chaos` (what ``rmcp chaos --json`` prints) with 2,000 calls
(``--quick``: 200) under ``drop_response=0.2,disconnect=0.05``, seed 1, and writes the report to
``benchmarks/results/chaos.json`` in the shared layout (``_results.py``: mode, command, date,
machine), where ``plot.py`` draws it and puts it in the README's table. The counts depend a
little on the interleaving of concurrent calls, not only on the seed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import get_args

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import RESULTS, write_results

from rmcp_actors.testing import FaultPlan, run_chaos
from rmcp_actors.testing.chaos import ChaosTransport

ISSUE_FAULTS = "drop_response=0.2,disconnect=0.05"


def main() -> None:
    parser = argparse.ArgumentParser(description="rmcp chaos into benchmarks/results/chaos.json")
    parser.add_argument("--quick", action="store_true", help="200 calls instead of 2,000")
    parser.add_argument("--calls", type=int, default=None)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--faults", default=ISSUE_FAULTS)
    parser.add_argument("--transport", choices=get_args(ChaosTransport), default="memory")
    parser.add_argument("--json", type=Path, default=RESULTS / "chaos.json")
    options = parser.parse_args()
    calls = options.calls if options.calls is not None else (200 if options.quick else 2000)
    plan = FaultPlan.parse(options.faults, seed=options.seed)
    report = trio.run(lambda: run_chaos(calls, options.concurrency, faults=plan, transport=options.transport))
    document = report.to_json()
    for name, way in document["ways"].items():
        print(f"{name:12} {way}")
    print(f"wrote {write_results('chaos', document, quick=options.quick, path=options.json)}")
    if not report.rmcp_exactly_once:
        sys.exit("the rmcp way ran a call twice or reported one wrongly")


if __name__ == "__main__":
    main()
