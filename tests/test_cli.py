"""The ``rmcp`` command against real stdio servers: exit codes, JSON shapes, batch resume.

``rmcp_actors.cli.main`` runs each command in-process (it runs its own ``trio.run``, so these
are plain sync tests) against servers forked warm from a zygote (``prefork.py``): each command
spawns its servers the way a user's ``rmcp`` does, without paying the SDK's import each time.
One test runs ``python -m rmcp_actors`` as a program, to see the real exit code of Ctrl-C.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import prefork
import pytest
from conftest import processes_naming

from rmcp_actors.cli import main
from rmcp_actors.testing import relay_command

ROOT = Path(__file__).resolve().parents[1]
# Quick reconnects: a relay that swallows an answer kills its server, and the runtime
# reconnects (a new relay and server) before the next line of a batch.
FAST = "reconnect = { base_delay_s = 0.02, max_delay_s = 0.2 }\n"


def server_argv(zygote: str, *options: str) -> list[str]:
    """``tests/mcp_test_server.py OPTIONS`` over stdio, forked warm."""
    return prefork.command(zygote, "server", *options)


def relayed_argv(zygote: str, server: list[str], **options: Any) -> list[str]:
    """``server`` behind the fault-injecting stdio relay, forked warm."""
    return prefork.command(zygote, "relay", *relay_command(server, **options)[2:])


def server_table(name: str, argv: list[str], extra: str = "", *, connect_timeout_s: float = 10) -> str:
    """A ``[servers.NAME]`` table running ``argv`` over stdio."""
    return (
        f'[servers.{name}]\ntransport = "stdio"\ncommand = {json.dumps(argv[0])}\n'
        f"args = {json.dumps(argv[1:])}\nconnect_timeout_s = {connect_timeout_s}\n{FAST}{extra}\n"
    )


def unreachable_table(name: str, tmp_path: Path) -> str:
    """A server whose program does not exist: it never answers the handshake."""
    return server_table(name, [sys.executable, str(tmp_path / "no_such_server.py")], connect_timeout_s=1)


def write_config(path: Path, *tables: str) -> Path:
    path.write_text("\n".join(tables))
    return path


def rmcp(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    """Run ``rmcp ARGV`` in this process: its exit code, stdout and stderr."""
    capsys.readouterr()
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def rmcp_json(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, dict[str, Any]]:
    """Run ``rmcp ARGV --json``: its exit code and the one JSON object it printed."""
    code, out, _ = rmcp(capsys, *argv, "--json")
    return code, json.loads(out)


def results(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def ledger(state_dir: Path) -> list[str]:
    path = state_dir / "ledger"
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.parametrize("command", ["check", "servers", "tools", "call", "batch"])
def test_help_shows_an_example(capsys: pytest.CaptureFixture[str], command: str) -> None:
    code, out, _ = rmcp(capsys, command, "--help")
    assert code == 0
    assert f"Example: rmcp {command}" in out or f"Example: rmcp --config rmcp.toml {command}" in out


# rmcp check


def test_check_shows_each_value_and_the_layer_that_set_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = write_config(
        tmp_path / "rmcp.toml",
        "[defaults]\ntimeout_s = 30\n",
        '[servers.a]\ntransport = "stdio"\ncommand = "never-started"\nmax_concurrency = 4\n',
        "[servers.a.tools.t]\ntimeout_s = 5\nidempotent = true\nretry = { max_attempts = 2 }\n",
    )

    code, report = rmcp_json(capsys, "--config", config, "check")
    assert code == 0
    assert report["valid"] is True
    server = report["servers"]["a"]
    assert server["transport"] == "stdio"
    assert server["target"] == "never-started"
    assert server["policy"]["timeout_s"] == 30
    assert server["policy"]["max_concurrency"] == 4
    assert server["set_in"]["timeout_s"] == "defaults"
    assert server["set_in"]["max_concurrency"] == "server"
    assert server["set_in"]["retry.base_delay_s"] == "built-in"
    tool = server["tools"]["t"]
    assert tool["policy"]["timeout_s"] == 5
    assert tool["policy"]["idempotent"] is True
    assert tool["policy"]["retry"]["max_attempts"] == 2
    assert tool["set_in"]["retry.max_attempts"] == "tool"
    assert tool["set_in"]["retry.base_delay_s"] == "built-in"
    assert report["runtime"]["max_queue"] == 10000

    code, out, _ = rmcp(capsys, "--config", config, "check")
    assert code == 0
    assert "config is valid" in out
    assert "server a" in out
    assert "defaults" in out


def test_a_bad_config_names_the_key_path_and_exits_3(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_config(
        tmp_path / "bad.toml",
        '[servers.a]\ntransport = "stdio"\ncommand = "x"\nretry = { max_attempts = -1 }\n',
    )
    code, out, err = rmcp(capsys, "--config", config, "check")
    assert code == 3
    assert "servers.a.retry.max_attempts" in err
    assert out == ""

    code, report = rmcp_json(capsys, "--config", config, "check")
    assert code == 3
    assert report["outcome"] == "usage_error"
    assert report["error"]["type"] == "RMCPConfigError"
    assert report["error"]["path"] == "servers.a.retry.max_attempts"

    # RMCP_CONFIG is read when --config is not given; a missing default says how to name one.
    monkeypatch.setenv("RMCP_CONFIG", str(tmp_path / "absent.toml"))
    code, _, err = rmcp(capsys, "check")
    assert code == 3
    assert "absent.toml" in err
    monkeypatch.delenv("RMCP_CONFIG")
    monkeypatch.chdir(tmp_path)
    code, _, err = rmcp(capsys, "check")
    assert code == 3
    assert "--config" in err
    assert "RMCP_CONFIG" in err

    (tmp_path / "broken.toml").write_text("[servers.a\n")
    code, _, err = rmcp(capsys, "--config", tmp_path / "broken.toml", "check")
    assert code == 3
    assert "invalid TOML" in err


# rmcp servers, rmcp tools


def test_servers_reports_each_server_and_exits_4_when_one_is_unreachable(
    capsys: pytest.CaptureFixture[str], zygote: str, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path / "rmcp.toml",
        server_table("plain", server_argv(zygote)),
        server_table("deduped", server_argv(zygote, "--rmcp-store", "memory")),
        unreachable_table("gone", tmp_path),
    )

    code, report = rmcp_json(capsys, "-c", config, "servers")
    assert code == 4
    assert report["outcome"] == "refused"
    plain, deduped, gone = (report["servers"][name] for name in ("plain", "deduped", "gone"))
    assert plain["reachable"] is True
    assert plain["state"] == "ready"
    assert plain["rmcp"] is None
    assert plain["protocol_version"]
    assert plain["tools"] >= 10
    assert plain["error"] is None
    assert deduped["rmcp"]["version"]
    assert "dedup" in deduped["rmcp"]["features"]
    assert deduped["tools"] == plain["tools"]
    assert gone["reachable"] is False
    assert gone["state"] == "unreachable"
    assert gone["error"]["type"] == "RMCPNetworkError"
    assert "no_such_server.py" in gone["error"]["message"]

    code, out, err = rmcp(capsys, "-c", config, "servers")
    assert code == 4
    assert "unreachable" in out
    assert "gone" in err


def test_tools_says_which_tools_are_safe_to_repeat_and_why(
    capsys: pytest.CaptureFixture[str], zygote: str, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path / "rmcp.toml",
        server_table("plain", server_argv(zygote)),
        "[servers.plain.tools.add]\nidempotent = true\n",
    )

    code, report = rmcp_json(capsys, "-c", config, "tools", "plain")
    assert code == 0
    assert report["server"] == "plain"
    assert report["rmcp"] is None
    tools = report["tools"]
    assert tools["echo"]["safe_to_repeat"] is True
    assert tools["echo"]["safe_because"] == "annotation: readOnlyHint"
    assert tools["echo"]["annotations"] == {"readOnlyHint": True}
    assert tools["echo"]["description"] == "Return the text."
    assert tools["add"]["safe_to_repeat"] is True
    assert tools["add"]["safe_because"] == "config: idempotent = true"
    assert tools["record"]["safe_to_repeat"] is False
    assert tools["echo"]["input_schema"]["properties"]["text"]["type"] == "string"

    code, out, _ = rmcp(capsys, "-c", config, "tools", "plain")
    assert code == 0
    assert "block_idempotent" in out

    code, _, err = rmcp(capsys, "-c", config, "tools", "nope")
    assert code == 3
    assert "no server named 'nope'" in err
    assert "configured: plain" in err


# rmcp call: one exit code per outcome, each from a real cause


def test_call_exit_codes_0_1_3_4_and_json_shapes(
    capsys: pytest.CaptureFixture[str], zygote: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A shared config may name a journal to recover: a command must not touch it.
    journal = tmp_path / "journal.sqlite"
    config = write_config(
        tmp_path / "rmcp.toml",
        f"[transactions]\njournal = {json.dumps(str(journal))}\nrecover_on_open = true\n",
        server_table("plain", server_argv(zygote)),
        unreachable_table("gone", tmp_path),
    )

    code, out, _ = rmcp(capsys, "-c", config, "call", "plain", "echo", "--args", '{"text": "hello"}')
    assert (code, out) == (0, "hello\n")
    assert not journal.exists()
    monkeypatch.setattr(sys, "stdin", io.StringIO('{"text": "from stdin"}'))
    code, out, _ = rmcp(capsys, "-c", config, "call", "plain", "echo", "--args", "-")
    assert (code, out) == (0, "from stdin\n")

    code, record = rmcp_json(
        capsys, "-c", config, "call", "plain", "add", "-a", '{"a": 1, "b": 2}', "-k", "k-1"
    )
    assert code == 0
    assert record["outcome"] == "succeeded"
    assert record["exit_code"] == 0
    assert record["is_error"] is False
    assert record["structured"] == {"result": 3}
    assert record["content"] == [{"type": "text", "text": "3"}]
    assert record["idempotency_key"] == "k-1"
    assert record["attempts"] == 1
    assert record["duplicate"] is False
    assert record["request_id"]
    assert (record["server"], record["tool"]) == ("plain", "add")

    # 1: the tool ran and reported an error.
    code, record = rmcp_json(capsys, "-c", config, "call", "plain", "fail", "-a", '{"reason": "no stock"}')
    assert code == 1
    assert record["outcome"] == "tool_error"
    assert record["is_error"] is True
    assert "no stock" in record["text"]

    # 3: the command is wrong; the message says where.
    code, _, err = rmcp(capsys, "-c", config, "call", "plain", "echo", "--args", '{"text": ')
    assert code == 3
    assert "--args is not valid JSON" in err
    assert "column" in err
    code, _, err = rmcp(capsys, "-c", config, "call", "plain", "echo", "--args", "[1]")
    assert code == 3
    assert "JSON object" in err
    code, record = rmcp_json(capsys, "-c", config, "call", "plain", "no_such_tool")
    assert code == 3
    assert record["error"]["type"] == "UnknownToolError"
    assert "echo" in record["error"]["message"]  # it lists the tools there are
    code, _, err = rmcp(capsys, "-c", config, "call", "nope", "echo")
    assert code == 3
    assert "configured: gone, plain" in err
    code, _, err = rmcp(
        capsys, "-c", config, "call", "plain", "echo", "--timeout", "-1", "-a", '{"text": "x"}'
    )
    assert code == 3
    assert "timeout" in err

    # 4: nothing ran, because the server cannot be reached...
    code, record = rmcp_json(capsys, "-c", config, "call", "gone", "echo", "-a", '{"text": "x"}')
    assert code == 4
    assert record["outcome"] == "refused"
    assert record["error"]["type"] == "RMCPNetworkError"
    assert record["error"]["may_have_executed"] is False
    # ... or because it refused the request before running the tool (-32602).
    code, record = rmcp_json(capsys, "-c", config, "call", "plain", "invalid_params")
    assert code == 4
    assert record["error"]["type"] == "RMCPServerError"


def test_call_exits_2_when_the_answer_is_lost_after_the_tool_ran(
    capsys: pytest.CaptureFixture[str], zygote: str, tmp_path: Path
) -> None:
    # The relay lets the tool run, then swallows its answer and kills the server: the call
    # may have run, and `record` is not safe to repeat on a plain MCP server.
    server = server_argv(zygote, "--state-dir", str(tmp_path))
    config = write_config(
        tmp_path / "rmcp.toml", server_table("lossy", relayed_argv(zygote, server, swallow_probability=1.0))
    )

    code, record = rmcp_json(capsys, "-c", config, "call", "lossy", "record", "-a", '{"label": "order-1"}')
    assert code == 2
    assert record["outcome"] == "unknown"
    assert record["error"]["type"] == "RMCPOutcomeUnknownError"
    assert record["error"]["may_have_executed"] is True
    assert record["attempts"] == 1
    assert record["idempotency_key"]
    assert ledger(tmp_path) == ["order-1"]  # it did run, once

    code, _, err = rmcp(capsys, "-c", config, "call", "lossy", "record", "-a", '{"label": "order-2"}')
    assert code == 2
    assert "may have run" in err
    assert "--idempotency-key" in err


# rmcp batch


def test_batch_resumes_sending_only_what_did_not_finish_with_the_same_keys(
    capsys: pytest.CaptureFixture[str], zygote: str, tmp_path: Path
) -> None:
    store = ["--state-dir", str(tmp_path), "--rmcp-store", str(tmp_path / "rmcp.sqlite")]
    server = server_argv(zygote, *store)
    # First run: an RMCP server behind a relay that loses about half the answers (killing the
    # server each time), and one attempt per call, so that lost answers stay unknown.
    lossy = write_config(
        tmp_path / "lossy.toml",
        server_table(
            "orders",
            relayed_argv(zygote, server, swallow_probability=0.5, seed=3, log=tmp_path / "faults"),
            "retry = { max_attempts = 1 }\n",
        ),
    )
    direct = write_config(tmp_path / "direct.toml", server_table("orders", server))
    labels = [f"order-{index}" for index in range(8)]
    batch_input = tmp_path / "orders.jsonl"
    batch_input.write_text("".join(json.dumps({"label": label}) + "\n" for label in labels))
    out = tmp_path / "orders.results.jsonl"

    code, _, err = rmcp(capsys, "-c", lossy, "batch", "orders", "record", batch_input, "-n", "1")
    first = results(out)
    outcomes = Counter(record["outcome"] for record in first)
    assert code == 2, err
    assert outcomes["unknown"] > 0, outcomes
    assert outcomes["succeeded"] > 0, outcomes
    assert outcomes["unknown"] + outcomes["succeeded"] == len(labels)
    assert [record["line"] for record in first] == list(range(1, len(labels) + 1))
    assert sorted(ledger(tmp_path)) == sorted(labels)  # every line ran once, answered or not

    code, _, err = rmcp(capsys, "-c", direct, "batch", "orders", "record", batch_input, "-n", "1")
    second = results(out)
    assert code == 0, err
    assert f"{outcomes['unknown']} succeeded, {outcomes['succeeded']} skipped" in err
    assert [record["outcome"] for record in second] == ["succeeded"] * len(labels)
    for before, after in zip(first, second, strict=True):
        assert after["key"] == before["key"]
        if before["outcome"] == "succeeded":
            assert after == before  # not sent again: the same record, the same request id
        else:
            # Sent again with its key: the server replayed the run it had, not a new one.
            assert after["duplicate"] is True
            assert after["idempotency_key"] == before["key"]
            assert after["text"] == f"recorded {labels[after['line'] - 1]}"
    assert sorted(ledger(tmp_path)) == sorted(labels)  # nothing ran twice

    # A third run has nothing left to send.
    code, _, err = rmcp(capsys, "-c", direct, "batch", "orders", "record", batch_input)
    assert code == 0
    assert f"{len(labels)} skipped" in err
    assert results(out) == second


def test_batch_reports_bad_lines_and_takes_keys_from_a_field(
    capsys: pytest.CaptureFixture[str], zygote: str, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path / "rmcp.toml",
        server_table("plain", server_argv(zygote, "--state-dir", str(tmp_path))),
        unreachable_table("gone", tmp_path),
    )
    batch_input = tmp_path / "in.jsonl"
    lines = [
        '{"label": "a", "id": "order-a"}',
        "",
        "not json",
        "[1, 2]",
        '{"label": "b"}',
        '{"label": "c", "id": 7}',
    ]
    batch_input.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"

    code, _, err = rmcp(
        capsys, "-c", config, "batch", "plain", "record", batch_input, "--key", "id", "-o", out
    )
    assert code == 3, err
    records = {record["line"]: record for record in results(out)}
    assert sorted(records) == [1, 3, 4, 5, 6]  # the blank line is no call
    assert records[1]["outcome"] == "succeeded"
    assert records[1]["key"] == records[1]["idempotency_key"] == "order-a"
    assert records[6]["key"] == "7"
    assert records[3]["outcome"] == "usage_error"
    assert "line 3: not valid JSON" in records[3]["error"]["message"]
    assert "JSON object" in records[4]["error"]["message"]
    assert "'id' is missing" in records[5]["error"]["message"]
    assert sorted(ledger(tmp_path)) == ["a", "c"]

    # Fixed lines are sent on the next run; the finished ones are not.
    lines[2], lines[3], lines[4] = '{"label": "d", "id": "d"}', "", '{"label": "b", "id": "b"}'
    batch_input.write_text("\n".join(lines) + "\n")
    code, _, err = rmcp(
        capsys, "-c", config, "batch", "plain", "record", batch_input, "--key", "id", "-o", out
    )
    assert code == 0, err
    assert sorted(ledger(tmp_path)) == ["a", "b", "c", "d"]
    # One result per line, in input order; the line now blank has none.
    assert [record["line"] for record in results(out)] == [1, 3, 5, 6]

    # Bad input loses nothing: each is refused before anything is sent.
    code, _, err = rmcp(capsys, "-c", config, "batch", "plain", "record", tmp_path / "absent.jsonl")
    assert code == 3
    assert "no input file" in err
    code, _, err = rmcp(capsys, "-c", config, "batch", "plain", "no_such_tool", batch_input, "-o", out)
    assert code == 3
    assert "does not list tool 'no_such_tool'" in err
    assert sorted(ledger(tmp_path)) == ["a", "b", "c", "d"]
    code, _, err = rmcp(capsys, "-c", config, "batch", "gone", "record", batch_input)
    assert code == 4
    assert "nothing was sent" in err
    assert not (tmp_path / "in.results.jsonl").exists()


def test_ctrl_c_leaves_whole_lines_and_a_rerun_finishes_the_rest(
    capsys: pytest.CaptureFixture[str], zygote: str, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "rmcp.toml", server_table("plain", server_argv(zygote)))
    batch_input = tmp_path / "work.jsonl"
    batch_input.write_text("".join(json.dumps({"seconds": 0.2, "n": n}) + "\n" for n in range(12)))
    out = tmp_path / "work.results.jsonl"
    program = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rmcp_actors",
            "-c",
            str(config),
            "batch",
            "plain",
            "work",
            str(batch_input),
            "-n",
            "1",
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not (out.exists() and len(out.read_text().splitlines()) >= 3):
        assert program.poll() is None, program.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    program.send_signal(signal.SIGINT)
    _, err = program.communicate(timeout=60)

    text = out.read_text()
    assert program.returncode == 130, err
    assert f"interrupted after {len(text.splitlines())} result line(s)" in err
    assert "resume" in err
    assert text.endswith("\n")
    before = [json.loads(line) for line in text.splitlines()]  # every line whole
    assert 3 <= len(before) < 12
    assert {record["outcome"] for record in before} == {"succeeded"}

    code, _, err = rmcp(capsys, "-c", config, "batch", "plain", "work", batch_input, "-n", "4")
    after = results(out)
    assert code == 0, err
    assert f"{len(before)} skipped" in err
    assert [record["line"] for record in after] == list(range(1, 13))
    assert {record["outcome"] for record in after} == {"succeeded"}
    finished = {record["line"]: record for record in before}
    assert all(record == finished[record["line"]] for record in after if record["line"] in finished)


def test_batch_lines_refused_by_an_open_breaker_exit_4_unless_one_is_unknown(
    capsys: pytest.CaptureFixture[str], zygote: str, tmp_path: Path
) -> None:
    # One failure opens the tool's breaker: the lines after it are refused without being sent.
    config = write_config(
        tmp_path / "rmcp.toml",
        server_table(
            "plain", server_argv(zygote), "circuit_breaker = { failure_threshold = 1, open_s = 60 }\n"
        ),
    )
    batch_input = tmp_path / "in.jsonl"
    batch_input.write_text("{}\n{}\n{}\n")

    # -32000 from the server: it may have run (unknown), and it counts as the server's fault.
    code, out, err = rmcp(capsys, "-c", config, "batch", "plain", "busy", batch_input, "-n", "1", "-o", "-")
    records = [json.loads(line) for line in out.splitlines()]
    assert code == 2, err
    assert [record["outcome"] for record in records] == ["unknown", "refused", "refused"]
    assert records[1]["error"]["type"] == "RMCPCircuitOpenError"
    assert records[1]["error"]["may_have_executed"] is False
    assert records[1]["attempts"] == 0
    assert "1 unknown, 2 refused" in err

    # Refusals alone (-32602: the tool did not run) exit 4.
    code, out, _ = rmcp(capsys, "-c", config, "batch", "plain", "invalid_params", batch_input, "-o", "-")
    assert code == 4
    assert {json.loads(line)["outcome"] for line in out.splitlines()} == {"refused"}


def test_batch_resumes_after_a_results_line_cut_short(
    capsys: pytest.CaptureFixture[str], zygote: str, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path / "rmcp.toml", server_table("plain", server_argv(zygote, "--state-dir", str(tmp_path)))
    )
    batch_input = tmp_path / "in.jsonl"
    out = tmp_path / "in.results.jsonl"
    batch_input.write_text('{"label": "a"}\n{"label": "b"}\n')
    assert rmcp(capsys, "-c", config, "batch", "plain", "record", batch_input)[0] == 0
    # The machine stopped in the middle of writing a third line (rmcp itself writes whole lines).
    finished = out.read_text()
    out.write_text(finished + '{"line": 3, "key": "rmcp-ba')
    batch_input.write_text('{"label": "a"}\n{"label": "b"}\n{"label": "c"}\n')

    code, _, err = rmcp(capsys, "-c", config, "batch", "plain", "record", batch_input)
    assert code == 0, err
    assert "1 unreadable line(s)" in err
    assert "1 succeeded, 2 skipped" in err
    assert [record["line"] for record in results(out)] == [1, 2, 3]
    assert out.read_text().startswith(finished)
    assert sorted(ledger(tmp_path)) == ["a", "b", "c"]


def test_batch_with_a_key_field_skips_finished_calls_that_moved_to_another_line(
    capsys: pytest.CaptureFixture[str], zygote: str, tmp_path: Path
) -> None:
    # `record` is not safe to repeat on a plain MCP server: sending a finished line again runs it twice.
    config = write_config(
        tmp_path / "rmcp.toml", server_table("plain", server_argv(zygote, "--state-dir", str(tmp_path)))
    )
    batch_input = tmp_path / "in.jsonl"
    out = tmp_path / "in.results.jsonl"
    batch_input.write_text('{"label": "a", "id": "a"}\n{"label": "b", "id": "b"}\n')
    assert rmcp(capsys, "-c", config, "batch", "plain", "record", batch_input, "--key", "id")[0] == 0

    # A line added at the top: the finished calls moved down a line, their keys did not.
    batch_input.write_text(
        '{"label": "c", "id": "c"}\n{"label": "a", "id": "a"}\n{"label": "b", "id": "b"}\n'
    )
    code, _, err = rmcp(capsys, "-c", config, "batch", "plain", "record", batch_input, "--key", "id")
    assert code == 0, err
    assert sorted(ledger(tmp_path)) == ["a", "b", "c"]  # nothing ran twice
    assert "1 succeeded, 2 skipped" in err
    after = results(out)
    assert [(record["line"], record["key"], record["outcome"]) for record in after] == [
        (1, "c", "succeeded"),
        (2, "a", "succeeded"),
        (3, "b", "succeeded"),
    ]

    # Another call with a finished call's key is not that call: it is sent, not given its result.
    with batch_input.open("a") as file:
        file.write('{"label": "d", "id": "a"}\n')
    code, _, err = rmcp(capsys, "-c", config, "batch", "plain", "record", batch_input, "--key", "id")
    assert code == 0, err
    assert "1 succeeded, 3 skipped" in err
    assert sorted(ledger(tmp_path)) == ["a", "b", "c", "d"]
    assert results(out)[3]["text"] == "recorded d"


def test_the_final_rewrite_keeps_the_results_file_mode(
    capsys: pytest.CaptureFixture[str], zygote: str, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "rmcp.toml", server_table("plain", server_argv(zygote)))
    batch_input = tmp_path / "in.jsonl"
    out = tmp_path / "in.results.jsonl"
    batch_input.write_text('{"text": "a"}\n')
    umask = os.umask(0o022)
    try:
        assert rmcp(capsys, "-c", config, "batch", "plain", "echo", batch_input)[0] == 0
        assert out.stat().st_mode & 0o777 == 0o644  # as any new file: others may read the results
        out.chmod(0o640)
        batch_input.write_text('{"text": "a"}\n{"text": "b"}\n')
        assert rmcp(capsys, "-c", config, "batch", "plain", "echo", batch_input)[0] == 0
        assert out.stat().st_mode & 0o777 == 0o640  # the mode its owner gave it
    finally:
        os.umask(umask)
    assert [record["text"] for record in results(out)] == ["a", "b"]
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".in.results")] == []


def test_batch_results_of_another_tool_are_not_this_tools(
    capsys: pytest.CaptureFixture[str], zygote: str, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "rmcp.toml", server_table("plain", server_argv(zygote)))
    batch_input = tmp_path / "in.jsonl"
    out = tmp_path / "in.results.jsonl"
    batch_input.write_text('{"text": "hello", "id": "k1"}\n')
    assert rmcp(capsys, "-c", config, "batch", "plain", "echo", batch_input, "--key", "id")[0] == 0

    # The same input and keys, another tool, the same default results file.
    code, _, err = rmcp(capsys, "-c", config, "batch", "plain", "length", batch_input, "--key", "id")
    assert code == 0, err
    assert "1 succeeded" in err
    [record] = results(out)
    assert (record["tool"], record["text"]) == ("length", "5")


def test_batch_an_unknown_calls_key_stays_with_its_call_when_lines_move(
    capsys: pytest.CaptureFixture[str], zygote: str, tmp_path: Path
) -> None:
    server = server_argv(zygote, "--state-dir", str(tmp_path))
    lossy = write_config(
        tmp_path / "lossy.toml", server_table("plain", relayed_argv(zygote, server, swallow_probability=1.0))
    )
    direct = write_config(tmp_path / "direct.toml", server_table("plain", server))
    batch_input = tmp_path / "in.jsonl"
    out = tmp_path / "in.results.jsonl"
    batch_input.write_text('{"label": "a", "id": "a"}\n')
    code, _, err = rmcp(capsys, "-c", lossy, "batch", "plain", "record", batch_input, "--key", "id")
    assert code == 2, err
    assert results(out)[0]["outcome"] == "unknown"

    # A line added at the top takes the unknown call's line number, not its key: reused for
    # other arguments, that key would make an RMCP server refuse both calls as conflicts.
    batch_input.write_text('{"label": "c", "id": "c"}\n{"label": "a", "id": "a"}\n')
    code, _, err = rmcp(capsys, "-c", direct, "batch", "plain", "record", batch_input, "--key", "id")
    assert code == 0, err
    assert [(record["line"], record["key"], record["idempotency_key"]) for record in results(out)] == [
        (1, "c", "c"),
        (2, "a", "a"),
    ]


BLOCK_A_MINUTE = ["--args", '{"label": "x", "seconds": 60}']


def test_sigterm_stops_the_servers_as_ctrl_c_does(tmp_path: Path) -> None:
    # Not forked warm: the server's own command line names tmp_path, to find it afterwards.
    server = [sys.executable, str(ROOT / "tests" / "mcp_test_server.py"), "--state-dir", str(tmp_path)]
    config = write_config(tmp_path / "rmcp.toml", server_table("plain", server))
    program = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rmcp_actors",
            "-c",
            str(config),
            "call",
            "plain",
            "block_unsafe",
            *BLOCK_A_MINUTE,
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    started = tmp_path / "x.started"
    deadline = time.monotonic() + 60
    while not started.exists():  # the tool is running
        assert program.poll() is None, program.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    program.send_signal(signal.SIGTERM)
    _, err = program.communicate(timeout=60)
    left = processes_naming(str(tmp_path))
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert program.returncode == 143, err
    assert "terminated" in err
    assert left == {}  # stopped with the command, not left to finish the tool
