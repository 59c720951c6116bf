"""``rmcp bench``: JSON shape and exit codes against real servers (stdio and in memory).

Tiny call counts, no timing assertions: the figures are the benchmark's business, these tests
check that the command measures the three clients and refuses bad input with exit code 3.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import pytest
import trio
from _http import serve_http
from conftest import PYTHON, processes_naming, stdio_args
from mcp_test_server import build_server

from rmcp_actors.cli import main

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"

SIDE_KEYS = {"calls", "calls_per_s", "median_us", "p99_us", "block_calls_per_s"}


def write_config(tmp_path: Path) -> Path:
    """An rmcp.toml with the test server over stdio, named ``test``."""
    config = tmp_path / "rmcp.toml"
    args = ", ".join(json.dumps(arg) for arg in stdio_args())
    config.write_text(
        f'[servers.test]\ntransport = "stdio"\ncommand = {json.dumps(PYTHON)}\nargs = [{args}]\n'
    )
    return config


def bench_json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict[str, object]:
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)
    assert isinstance(report, dict)
    return report  # pyright: ignore[reportUnknownVariableType]


def check_shape(report: dict[str, object], *, transport: str, calls: int) -> None:
    assert report["transport"] == transport
    clients = report["clients"]
    assert isinstance(clients, dict)
    assert set(clients) == {"raw", "raw2", "rmcp"}  # pyright: ignore[reportUnknownArgumentType]
    for side in clients.values():  # pyright: ignore[reportUnknownVariableType]
        assert set(side) == SIDE_KEYS  # pyright: ignore[reportUnknownArgumentType]
        assert side["calls"] == calls
        assert side["calls_per_s"] > 0
        assert side["p99_us"] >= side["median_us"] > 0
    for key in ("ratio_rmcp_raw", "control_raw2_raw", "added_median_us", "added_p99_us"):
        assert isinstance(report[key], float)


def test_stdio_server_from_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    argv = ["--config", str(config), "bench", "test", "echo", "--args", '{"text": "hi"}']
    report = bench_json(capsys, [*argv, "--calls", "6", "--blocks", "2", "--json"])
    check_shape(report, transport="stdio", calls=6)
    assert report["server"] == "test"
    assert report["tool"] == "echo"
    assert report["blocks"] == 2


@contextmanager
def http_server_in_a_thread() -> Iterator[str]:
    """The test server over Streamable HTTP on 127.0.0.1, served by its own trio.run in a thread
    (``rmcp bench`` runs trio.run itself, in the test's thread); yields its URL."""
    started: queue.Queue[tuple[str, trio.CancelScope, trio.lowlevel.TrioToken]] = queue.Queue()

    async def serve() -> None:
        with trio.CancelScope() as scope:
            async with serve_http(build_server()) as handle:
                started.put((handle.url, scope, trio.lowlevel.current_trio_token()))
                await trio.sleep_forever()

    thread = threading.Thread(target=trio.run, args=(serve,), daemon=True)
    thread.start()
    url, scope, token = started.get(timeout=30)
    try:
        yield url
    finally:
        trio.from_thread.run_sync(scope.cancel, trio_token=token)
        thread.join(timeout=30)


def test_http_server_from_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "rmcp.toml"
    with http_server_in_a_thread() as url:
        config.write_text(f'[servers.web]\ntransport = "http"\nurl = "{url}"\n')
        argv = [
            "--config",
            str(config),
            "bench",
            "web",
            "echo",
            "--args",
            '{"text": "hi"}',
            "--transport",
            "http",
        ]
        report = bench_json(capsys, [*argv, "--calls", "4", "--blocks", "2", "--json"])
    check_shape(report, transport="http", calls=4)


def test_in_memory_server_concurrent(capsys: pytest.CaptureFixture[str]) -> None:
    # No --config and no rmcp.toml in the working directory: an in-memory run needs none.
    argv = ["bench", "local", "add", "--args", '{"a": 1, "b": 2}', "--server", "mcp_test_server:build_server"]
    report = bench_json(capsys, [*argv, "--calls", "12", "--blocks", "3", "--concurrency", "2", "--json"])
    check_shape(report, transport="memory", calls=12)
    assert report["concurrency"] == 2


def test_table_output(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "local", "echo", "-a", '{"text": "x"}', "--server", "mcp_test_server:build_server"]
    assert main([*argv, "--calls", "4", "--blocks", "2"]) == 0
    out = capsys.readouterr().out
    assert "rmcp/raw throughput" in out
    assert "raw2" in out


def test_tool_error_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "bench",
        "local",
        "fail",
        "--args",
        '{"reason": "nope"}',
        "--server",
        "mcp_test_server:build_server",
    ]
    assert main([*argv, "--calls", "2", "--blocks", "1"]) == 1
    err = capsys.readouterr().err
    assert "[local/fail] the tool answered with an error: Error executing tool fail: nope" in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["nowhere", "echo"], "unknown server 'nowhere' (configured servers: test)"),
        (["test", "echo", "--args", "{not json"], "--args is not valid JSON"),
        (["test", "echo", "--args", "[1, 2]"], "--args must be a JSON object"),
        (["test", "echo", "--transport", "memory"], "--transport memory needs --server module:attribute"),
        (["test", "echo", "--transport", "http"], "configured with transport 'stdio', not 'http'"),
        (["test", "echo", "--server", "no_such_module:app"], "cannot import 'no_such_module'"),
        (["test", "echo", "--server", "mcp_test_server:State"], "not an mcp MCPServer"),
        (["test", "echo", "--server", "mcp_test_server:ledger_reconciler"], "must take no arguments"),
        (["test", "echo", "--server", "mcp_test_server"], "--server must be module:attribute"),
        (["test", "echo", "--calls", "3", "--blocks", "2", "--concurrency", "2"], "--calls (3) must be"),
    ],
)
def test_bad_input_exits_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    config = write_config(tmp_path)
    assert main(["--config", str(config), "bench", *extra]) == 3
    assert message in " ".join(capsys.readouterr().err.split())


def test_missing_config_exits_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(tmp_path / "absent.toml"), "bench", "test", "echo"]) == 3
    assert "no config file at" in capsys.readouterr().err


def load_plot() -> ModuleType:
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module("plot")


def test_readme_table_is_the_results_files() -> None:
    """README's table of figures is plot.py's output from benchmarks/results: never typed by hand.

    After rerunning a benchmark, ``python benchmarks/plot.py --readme`` brings it back in step.
    """
    plot = load_plot()
    readme = (BENCHMARKS.parent / "README.md").read_text()
    start = readme.index(plot.TABLE_START) + len(plot.TABLE_START)
    end = readme.index(plot.TABLE_END)
    assert readme[start:end].strip() == plot.table().strip()


def test_table_reads_other_scripts_results_defensively(tmp_path: Path) -> None:
    plot = load_plot()
    (tmp_path / "chaos.json").write_text(json.dumps({"ways": {"rmcp": {"duplicates": 0, "lost": 0}}}))
    (tmp_path / "scale.json").write_text(
        json.dumps(
            {
                "mode": "full",
                "figures": {
                    "calls": 10000,
                    "verdicts": {"pending_goal": {"bytes": 4096, "measured": 3900.4}, "map_goal": "?"},
                    "throughput": {"ratios": {"rmcp/raw": 0.7}},
                },
            }
        )
    )
    (tmp_path / "large_payloads.json").write_text("not json")
    (tmp_path / "alternatives.json").write_text(json.dumps({"figures": {"overhead": {"rows": "?"}}}))
    text = plot.table(tmp_path)
    assert "| rmcp | - | - | - | - | 0 | 0 | - | - |" in text
    assert "| a call pending at the server, rmcp - raw (B) | 3,900 | 4,096 |" in text
    assert "| a call queued in the scheduler, beyond its task (B) | - | - |" in text
    assert "| a sup.map item not started (B) | - | - |" in text
    assert "| calls/s at 10,000 callers, zero-cost server, rmcp / raw | 0.70 | - |" in text


def test_table_skips_a_scale_file_without_verdicts(tmp_path: Path) -> None:
    plot = load_plot()
    (tmp_path / "scale.json").write_text(json.dumps({"figures": {"pending": {"rmcp": 1}}}))
    assert "concurrent pending calls" not in plot.table(tmp_path)


@pytest.mark.parametrize(
    ("tool", "code", "message"),
    [
        # -32000: the server may have run the tool; never "refused" (4).
        pytest.param("busy", 2, "server is busy"),
        # -32602: refused before running.
        ("invalid_params", 4, "no such argument shape"),
        # Not listed: the command is wrong.
        pytest.param("no_such_tool", 3, "does not list tool 'no_such_tool'"),
    ],
)
def test_a_failing_call_exits_with_the_code_of_its_outcome(
    capsys: pytest.CaptureFixture[str], tool: str, code: int, message: str
) -> None:
    argv = [
        "bench",
        "local",
        tool,
        "--server",
        "mcp_test_server:build_server",
        "--calls",
        "2",
        "--blocks",
        "1",
    ]
    assert main(argv) == code
    assert message in " ".join(capsys.readouterr().err.split())


BENCH_RECORD = ["--args", '{"label": "x"}', "--calls", "100000"]


def test_ctrl_c_exits_130_and_stops_the_servers(tmp_path: Path) -> None:
    config = tmp_path / "rmcp.toml"
    args = ", ".join(json.dumps(arg) for arg in stdio_args("--state-dir", str(tmp_path)))
    config.write_text(
        f'[servers.test]\ntransport = "stdio"\ncommand = {json.dumps(PYTHON)}\nargs = [{args}]\n'
    )
    program = subprocess.Popen(
        [PYTHON, "-m", "rmcp_actors", "-c", str(config), "bench", "test", "record", *BENCH_RECORD],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    ledger = tmp_path / "ledger"
    deadline = time.monotonic() + 60
    while not (ledger.exists() and len(ledger.read_text().splitlines()) >= 5):  # the benchmark runs
        assert program.poll() is None, program.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    program.send_signal(signal.SIGINT)
    out, err = program.communicate(timeout=60)
    assert program.returncode == 130, err
    assert "Traceback" not in err
    assert "interrupted" in err
    assert out == ""
    assert processes_naming(str(tmp_path)) == {}  # its three servers are gone


def test_error_messages_are_shown_as_written(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "local", "no_such_tool", "--server", "mcp_test_server:build_server", "--calls", "2"]
    assert main([*argv, "--blocks", "1"]) == 3
    err = " ".join(capsys.readouterr().err.split())
    assert "error: [local/no_such_tool] server 'local' does not list tool" in err
    assert "\\[" not in err


def test_a_server_that_never_answers_exits_4_within_its_connect_timeout(tmp_path: Path) -> None:
    # A program that starts and never speaks MCP; its argv names tmp_path, to find it afterwards.
    config = tmp_path / "rmcp.toml"
    silent = [PYTHON, "-c", "import time; time.sleep(300)", str(tmp_path)]
    config.write_text(
        f'[servers.silent]\ntransport = "stdio"\ncommand = {json.dumps(silent[0])}\n'
        f"args = {json.dumps(silent[1:])}\nconnect_timeout_s = 1\n"
    )
    program = subprocess.Popen(
        [
            PYTHON,
            "-m",
            "rmcp_actors",
            "-c",
            str(config),
            "bench",
            "silent",
            "echo",
            "--calls",
            "2",
            "--blocks",
            "1",
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, err = program.communicate(timeout=30)
    finally:
        program.kill()
        left = processes_naming(str(tmp_path))
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert program.returncode == 4, err
    assert "handshake" in err
    assert left == {}


def test_bench_opens_no_journal_and_recovers_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A config shared with a program that runs transactions: a benchmark must not run its
    # compensations (recover_on_open) nor create its journal, as every other command.
    config = write_config(tmp_path)
    journal = tmp_path / "journal.sqlite"
    config.write_text(
        f"[transactions]\njournal = {json.dumps(str(journal))}\nrecover_on_open = true\n\n"
        + config.read_text()
    )
    argv = ["--config", str(config), "bench", "test", "echo", "--args", '{"text": "hi"}']
    bench_json(capsys, [*argv, "--calls", "2", "--blocks", "1", "--json"])
    assert not journal.exists()


def test_table_shows_the_transfer_benchmark_and_its_verdicts(tmp_path: Path) -> None:
    plot = load_plot()
    figures = {
        "payload_bytes": 50 << 20,
        "rows": {
            "result/stdio": {
                "raw": {"error": "timed out after 180 s"},
                "rmcp_p4": {"wall_s": 1.234, "peak_mib": 61.2},
                "rmcp_p4_file": {"error": "boom"},
            }
        },
        "goals": {
            "result_stdio_wall_s": {"value": 1.234, "goal": "< 2 s", "passed": True},
            "resume_resent_chunks": {"value": None, "goal": "< 2", "passed": None},
        },
    }
    (tmp_path / "transfer.json").write_text(json.dumps({"mode": "quick", "figures": figures}))
    text = plot.table(tmp_path)
    assert "| variant | result/stdio |" in text
    assert "| raw mcp.Client, inline | timed out |" in text
    assert "| rmcp chunked, parallel 4 | 1.23 s, 61 MiB |" in text
    assert "| rmcp parallel 4, to a file | failed |" in text
    assert "| rmcp chunked, parallel 1 | - |" in text
    assert "| result_stdio_wall_s | 1.23 | < 2 s | PASS |" in text
    assert "| resume_resent_chunks | - | < 2 | not measured |" in text
    (tmp_path / "transfer.json").write_text(json.dumps({"figures": {"rows": "?"}}))
    assert "in chunks" not in plot.table(tmp_path)
