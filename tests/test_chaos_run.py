"""``run_chaos`` and ``rmcp chaos``: the same side-effecting calls made three ways under faults,
in memory (the CI-sized run through the command line) and over stdio (a smaller one)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Literal

import prefork
import pytest
import trio

from rmcp_actors import RMCPNetworkError
from rmcp_actors.cli import main
from rmcp_actors.testing import FaultPlan, Ledger, run_chaos
from rmcp_actors.testing._fault_streams import decide  # pyright: ignore[reportPrivateUsage]
from rmcp_actors.testing.chaos import WAYS, ChaosReport, WayName, WayReport, _Tally  # pyright: ignore[reportPrivateUsage]
from rmcp_actors.testing.faults import FaultKind

KEYS = ["succeeded", "failed", "unknown", "side_effects", "duplicates", "lost", "p50_ms", "p99_ms"]
CHAOS_PROGRAM = Path(__file__).with_name("chaos_server_program.py")


def test_duplicates_count_extra_runs_and_lost_counts_reports_the_ledger_contradicts() -> None:
    tally = _Tally()
    reports: list[tuple[str, Literal["succeeded", "failed", "unknown"]]] = [
        ("ran once", "succeeded"),
        ("ran twice", "succeeded"),
        ("ran thrice, maybe", "unknown"),
        ("said ran, did not", "succeeded"),
        ("said not run, ran", "failed"),
        ("said not run, did not", "failed"),
        ("maybe, did not", "unknown"),
    ]
    for label, report in reports:
        tally.add(label, report, 0.001)
    runs = {"ran once": 1, "ran twice": 2, "ran thrice, maybe": 3, "said not run, ran": 1}
    assert tally.measure(runs) == WayReport(
        succeeded=3,
        failed=2,
        unknown=2,
        side_effects=7,
        duplicates=3,
        lost=2,
        p50_ms=1.0,
        p99_ms=1.0,
    )


def check_shape(report: dict[str, Any], calls: int) -> None:
    assert list(report) == ["ways", "config", "faults"]
    assert list(report["ways"]) == list(WAYS)
    for figures in report["ways"].values():
        assert list(figures) == KEYS
        assert figures["succeeded"] + figures["failed"] + figures["unknown"] == calls
        assert figures["p50_ms"] <= figures["p99_ms"]


# A few seconds alone; the 3 ways reconnect about 150 times in all on a loaded CI machine.
@pytest.mark.timeout(300)
def test_rmcp_chaos_200_calls_under_lost_answers_and_connections(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["chaos", "--calls", "200", "--faults", "drop_response=0.2,disconnect=0.05", "--json"])
    out = capsys.readouterr().out
    report = json.loads(out)

    assert code == 0, out
    check_shape(report, 200)
    rmcp, naive, raw = (report["ways"][name] for name in ("rmcp", "naive_retry", "raw"))
    # rmcp_actors: every call at most once, and every report true to the ledger.
    assert rmcp["duplicates"] == 0
    assert rmcp["lost"] == 0
    assert rmcp["succeeded"] <= rmcp["side_effects"] <= rmcp["succeeded"] + rmcp["unknown"]
    # The raw ways, under the same faults, report calls that ran as failed, and the naive
    # loop runs calls twice.
    assert raw["lost"] > 0
    assert naive["duplicates"] > 0
    assert all(report["faults"][name]["drop_response"] > 0 for name in WAYS)
    assert report["config"]["faults"] == "drop_response=0.2,disconnect=0.05"


# Over stdio, every lost answer restarts a server process. The seed puts exactly one fault on
# each way's first connection (its third call) and none on the second, whatever the interleaving:
# a fault is drawn per (connection, k-th call).
ONE_FAULT_SEED = 128


def warm_command(zygote: str) -> Any:
    """The chaos server forked warm from the tests' zygote (see prefork.py)."""

    def command(ledger: Path, store: Path | None) -> list[str]:
        options = ["--store", str(store)] if store is not None else ["--plain"]
        return prefork.command(zygote, "program", str(CHAOS_PROGRAM), "--ledger", str(ledger), *options)

    return command


def test_the_seed_puts_one_fault_on_the_first_connection_only() -> None:
    plan = FaultPlan(seed=ONE_FAULT_SEED, drop_response=0.05)
    first = [k for k in range(1, 41) if decide(plan, 1, k).kind is not None]
    second = [k for k in range(1, 41) if decide(plan, 2, k).kind is not None]
    assert (first, second) == ([3], [])


@pytest.mark.timeout(120)
async def test_run_chaos_over_stdio_with_one_lost_answer_per_way(zygote: str, tmp_path: Path) -> None:
    done: dict[str, int] = {}
    report: ChaosReport = await run_chaos(
        12,
        4,
        faults=FaultPlan(drop_response=0.05),
        seed=ONE_FAULT_SEED,
        transport="stdio",
        workdir=tmp_path,
        progress=lambda way, count: done.__setitem__(way, count),
        server_command=warm_command(zygote),
    )
    check_shape(report.to_json(), 12)
    assert done == dict.fromkeys(WAYS, 12)
    assert all(report.faults[name]["drop_response"] == 1 for name in WAYS)
    assert report.config["seed"] == ONE_FAULT_SEED
    raw, naive, rmcp = (report.ways[name] for name in WAYS)
    # The answer lost ran its call: raw MCP reports it failed (lost), and so is every other
    # call in flight when the connection went, each counted lost if it had run.
    assert raw.lost >= 1
    assert raw.duplicates == 0
    # The naive loop sent the call whose answer was lost again: it ran twice.
    assert naive.duplicates >= 1
    assert naive.succeeded == 12
    # rmcp_actors retried it with its key, and the durable store replayed it.
    assert (rmcp.succeeded, rmcp.side_effects, rmcp.duplicates, rmcp.lost) == (12, 12, 0, 0)
    # Each way's ledger and store are where it was asked to keep them.
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(WAYS)
    assert (tmp_path / "rmcp" / "rmcp.sqlite").exists()


def test_exit_1_when_the_rmcp_way_ran_a_call_twice(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clean = WayReport(1, 0, 0, 1, 0, 0, 1.0, 1.0)
    twice = WayReport(1, 0, 0, 2, 1, 0, 1.0, 1.0)

    async def fake_run_chaos(*_args: Any, **_options: Any) -> ChaosReport:
        await trio.lowlevel.checkpoint()
        ways: dict[WayName, WayReport] = {"raw": clean, "naive_retry": clean, "rmcp": twice}
        faults: dict[WayName, dict[FaultKind, int]] = {name: {} for name in WAYS}
        return ChaosReport(ways=ways, config={"calls": 1, "faults": "none"}, faults=faults)

    # The report is what run_chaos measured; this test is about the exit status it leads to.
    monkeypatch.setattr("rmcp_actors.cli.chaos.run_chaos", fake_run_chaos)
    assert main(["chaos", "--calls", "1", "--faults", "none"]) == 1
    assert "1 duplicate run(s)" in capsys.readouterr().out


def test_table_and_verdict_without_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["chaos", "--calls", "20", "--concurrency", "2", "--faults", "none"]) == 0
    captured = capsys.readouterr()
    assert "raw MCP" in captured.out
    assert "naive retry" in captured.out
    assert "side effects" in captured.out
    assert "no call ran twice" in captured.out
    # The progress bars go to stderr, away from the results.
    assert "20/20" in captured.err


def test_a_bad_faults_option_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["chaos", "--faults", "drop_everything=0.5"]) == 3
    err = capsys.readouterr().err
    assert "drop_everything" in err
    assert "drop_response" in err


def test_help_shows_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["chaos", "--help"]) == 0
    assert "rmcp chaos --calls 2000 --faults drop_response=0.2,disconnect=0.05" in capsys.readouterr().out


def test_kill_needs_the_stdio_transport(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["chaos", "--calls", "5", "--faults", "kill=0.1"]) == 3
    assert "--transport stdio" in capsys.readouterr().err


async def test_a_server_that_cannot_start_ends_the_run_with_its_error(tmp_path: Path) -> None:
    def broken(_ledger: Path, _store: Path | None) -> list[str]:
        return [str(tmp_path / "no-such-server")]

    with trio.fail_after(60), pytest.raises(RMCPNetworkError, match="20 times in a row") as caught:
        await run_chaos(5, 1, transport="stdio", workdir=tmp_path, server_command=broken)
    assert "no-such-server" in str(caught.value.__cause__)


# A terminal's Ctrl-C: SIGINT with Python's default handler (a shell that started the test run in
# the background may have left SIGINT ignored, and a child inherits that).
CTRL_C_PROGRAM = """
import runpy, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.argv = ["rmcp", "chaos", "--calls", "100000", "--json"]
runpy.run_module("rmcp_actors", run_name="__main__")
"""


def test_ctrl_c_aborts_with_130_not_the_exit_status_of_a_failed_run(tmp_path: Path) -> None:
    # Exit 1 means "the rmcp way ran a call twice or reported one wrongly": an interrupted run
    # must not say so. It exits 130 with "Aborted.", as the other commands do.
    environment = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(Path(__file__).parents[1])}
    process = subprocess.Popen(
        [sys.executable, "-c", CTRL_C_PROGRAM],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not (ledgers := list(tmp_path.glob("rmcp-chaos-*/raw/ledger.sqlite"))):
            assert time.monotonic() < deadline, "the run did not start"
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            time.sleep(0.05)
        with Ledger(ledgers[0]) as book:
            while book.total() == 0:  # calls are being made
                assert time.monotonic() < deadline, "no call ran"
                time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert (process.returncode, stdout) == (130, "")
    assert "Aborted." in stderr
    assert "Traceback" not in stderr
