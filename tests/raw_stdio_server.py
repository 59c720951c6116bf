"""A tiny MCP server over stdio that speaks raw JSON-RPC (no SDK import: it starts in ~30 ms).

Use it with ``protocol="legacy"``. Tools: ``echo`` answers at once, ``wait`` answers after
``--wait-s`` seconds (from a thread, so later requests are still served meanwhile).

Options:
    --stubborn: ignore SIGTERM and stdin EOF, so that only SIGKILL ends the process.
    --invalid-refresh: every tools/list after the first returns a tool without a name.
    --pid-file PATH: write the process id there at start.
    --non-utf8-echo: echo's answer carries a byte that is not UTF-8 (a corrupt line).
    --half-line: adds tool ``half``, which writes the first half of its answer's line, then
        the whole process hangs (reads nothing, answers nothing, not even a ping) until killed.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

_write_lock = threading.Lock()


def _send(message: dict[str, Any]) -> None:
    with _write_lock:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stubborn", action="store_true")
    parser.add_argument("--invalid-refresh", action="store_true")
    parser.add_argument("--wait-s", type=float, default=0.5)
    parser.add_argument("--pid-file", type=Path)
    parser.add_argument("--non-utf8-echo", action="store_true")
    parser.add_argument("--half-line", action="store_true")
    options = parser.parse_args()
    if options.pid_file is not None:
        options.pid_file.write_text(str(__import__("os").getpid()))
    if options.stubborn:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    names = ("echo", "wait", "half") if options.half_line else ("echo", "wait")
    tools = [{"name": name, "inputSchema": {"type": "object"}} for name in names]
    listings = 0
    for line in sys.stdin:
        request = json.loads(line)
        method, request_id = request.get("method"), request.get("id")
        if request_id is None:
            continue  # a notification
        if method == "initialize":
            result: dict[str, Any] = {
                "protocolVersion": request["params"]["protocolVersion"],
                "capabilities": {"tools": {}},
                "serverInfo": {"name": "raw", "version": "0"},
            }
        elif method == "tools/list":
            listings += 1
            invalid = options.invalid_refresh and listings > 1
            result = {"tools": [{"inputSchema": {"type": "object"}}] if invalid else tools}
        elif method == "tools/call":
            name = request["params"]["name"]
            answer = {
                "jsonrpc": "2.0",
                "id": request_id,
                "result": {"content": [{"type": "text", "text": name}]},
            }
            if name == "wait":
                threading.Timer(options.wait_s, _send, (answer,)).start()
            elif name == "half":
                line = json.dumps(answer)
                with _write_lock:
                    sys.stdout.write(line[: len(line) // 2])
                    sys.stdout.flush()
                    while True:  # hung: SIGTERM's default action still ends it
                        time.sleep(3600)
            elif options.non_utf8_echo:
                line = json.dumps(answer).encode().replace(b'"text": "echo"', b'"text": "\xff"')
                with _write_lock:
                    sys.stdout.buffer.write(line + b"\n")
                    sys.stdout.flush()
            else:
                _send(answer)
            continue
        else:
            _send(
                {"jsonrpc": "2.0", "id": request_id, "error": {"code": -32601, "message": "Method not found"}}
            )
            continue
        _send({"jsonrpc": "2.0", "id": request_id, "result": result})
    if options.stubborn:
        while True:
            time.sleep(3600)


if __name__ == "__main__":
    main()
