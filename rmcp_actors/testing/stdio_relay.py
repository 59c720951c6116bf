"""A fault-injecting relay between an MCP client and a stdio MCP server.

Usage::

    python -m rmcp_actors.testing.stdio_relay [--swallow-probability P] [--seed N]
        [--skip-first N] [--log FILE] -- CMD [ARGS...]

The relay spawns ``CMD ARGS...`` and forwards newline-delimited JSON-RPC between its own
stdin/stdout and the server's, byte for byte; the server's stderr is the relay's. With
probability P it swallows the server's answer to a ``tools/call`` and kills the server with
SIGKILL: the tool ran, and the client never hears. It is the crash that makes an outcome
unknown, reproducible on demand.

The relay lives and dies with the server. When the server exits for any reason (a swallow
included), the relay reaps it and exits nonzero: the server's status, or 128 + the signal
number, or 1 for a server that exited 0 unasked. When the client closes the relay's stdin,
the relay closes the server's stdin, kills the server if it is still running 2 s later, and
exits 0.

JSON-RPC batches (dropped from MCP in 2025-06-18) pass through but are never swallowed.

A runtime restarts a killed server through a new relay. With a fixed ``--seed`` alone every
server life would draw the same sequence (the k-th answer of every life lost, or with an
unlucky seed every first answer, retries included, forever); with ``--log`` as well, each life
is seeded with the seed and the number of faults already logged, so lives differ and a whole
run is still reproducible.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from collections.abc import Sequence
from typing import Any, cast

import attrs
import trio

__all__ = ["main"]

# The MCP shutdown sequence: close the server's stdin, give it this long, then kill it.
_SERVER_EXIT_GRACE_S = 2.0

# A server that exits right after answering leaves the answer in the pipe: the client still
# gets it, unless draining takes longer than this.
_DRAIN_GRACE_S = 0.5

_USAGE = "python -m rmcp_actors.testing.stdio_relay [options] -- CMD [ARGS...]"

_RequestId = int | str


@attrs.frozen
class _Options:
    command: tuple[str, ...]
    swallow_probability: float
    seed: int | None
    skip_first: int
    log: str | None


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _parse_args(argv: Sequence[str]) -> _Options:
    parser = argparse.ArgumentParser(
        prog="stdio_relay",
        usage=_USAGE,
        description="Relay an MCP stdio server, swallowing some tools/call answers and killing the server.",
    )
    parser.add_argument(
        "--swallow-probability",
        type=_probability,
        default=0.0,
        metavar="P",
        help="chance (0..1) that a tools/call answer is swallowed and the server killed (default 0)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        metavar="N",
        help="seed of the fault RNG, combined with the faults already in --log (default: random)",
    )
    parser.add_argument(
        "--skip-first",
        type=_count,
        default=0,
        metavar="N",
        help="never swallow any of the first N tools/call answers (default 0)",
    )
    parser.add_argument("--log", metavar="FILE", help="append one JSON line per injected fault to FILE")
    # The server's own options must not be read as the relay's: everything after "--" is the
    # server's command line, untouched by argparse.
    own, command = list(argv), []
    if "--" in own:
        split = own.index("--")
        own, command = own[:split], own[split + 1 :]
    namespace, unknown = parser.parse_known_args(own)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (the server command goes after --)")
    if not command:
        parser.error("the server command is missing: end the options with -- CMD [ARGS...]")
    return _Options(
        command=tuple(command),
        swallow_probability=namespace.swallow_probability,
        seed=namespace.seed,
        skip_first=namespace.skip_first,
        log=namespace.log,
    )


class _LineSplitter:
    """Cuts a byte stream into lines: a message may span many reads, and a read many messages."""

    def __init__(self) -> None:
        self._partial = bytearray()

    def feed(self, data: bytes | bytearray) -> list[bytes]:
        """Return the lines that ``data`` completes, without their ``\\n``."""
        # Only the new bytes are searched, so a large message costs linear time.
        if b"\n" not in data:
            self._partial += data
            return []
        lines = bytes(data).split(b"\n")
        lines[0] = bytes(self._partial) + lines[0]
        self._partial = bytearray(lines.pop())
        return lines

    def rest(self) -> bytes:
        """The unterminated tail left when the stream ended."""
        return bytes(self._partial)


def _parse(line: bytes) -> dict[str, Any] | None:
    """The JSON object on ``line``, or None for anything else (the relay forwards it anyway)."""
    try:
        message = json.loads(line)
    except ValueError:
        return None
    return cast("dict[str, Any]", message) if isinstance(message, dict) else None


def _request_id(message: dict[str, Any]) -> _RequestId | None:
    request_id = message.get("id")
    if isinstance(request_id, bool) or not isinstance(request_id, int | str):
        return None
    return request_id


def _exit_status(returncode: int) -> int:
    """The relay's status for a server that exited on its own: never 0, signals as a shell shows them."""
    if returncode < 0:
        return 128 - returncode
    return returncode or 1


@attrs.define
class _Relay:
    options: _Options
    process: trio.Process
    server_stdin: trio.abc.SendStream
    server_stdout: trio.abc.ReceiveStream
    client_out: trio.abc.SendStream
    rng: random.Random
    pending_calls: set[_RequestId] = attrs.Factory(set[_RequestId])
    answered_calls: int = 0
    stopping: bool = False
    server_output_done: trio.Event = attrs.Factory(trio.Event)

    async def client_to_server(self, client_in: trio.abc.ReceiveStream) -> None:
        splitter = _LineSplitter()
        while data := await client_in.receive_some():
            # Track before forwarding: the answer cannot come before the server has the request.
            for line in splitter.feed(data):
                self._track(line)
            try:
                await self.server_stdin.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return  # the server is gone or going: watch_server ends the relay
        await self.stop_server()

    async def server_to_client(self) -> None:
        splitter = _LineSplitter()
        try:
            while data := await self.server_stdout.receive_some():
                forwarded: list[bytes] = []
                for line in splitter.feed(data):
                    swallowed = self._swallowed(line)
                    if swallowed is not None:
                        await self._send_to_client(b"".join(forwarded))
                        await self._inject_fault(swallowed)
                        return
                    forwarded.append(line + b"\n")
                if not await self._send_to_client(b"".join(forwarded)):
                    return
            await self._send_to_client(splitter.rest())
        finally:
            self.server_output_done.set()

    async def watch_server(self, cancel_scope: trio.CancelScope) -> None:
        await self.process.wait()
        # server_to_client is done once it forwarded the server's last words, or once it wrote
        # the log line of the fault that killed the server.
        with trio.move_on_after(_DRAIN_GRACE_S):
            await self.server_output_done.wait()
        cancel_scope.cancel()

    async def stop_server(self) -> None:
        """The client is gone: close the server's stdin, and kill the server if it lingers."""
        if self.stopping:
            return
        self.stopping = True
        await self.server_stdin.aclose()
        with trio.move_on_after(_SERVER_EXIT_GRACE_S):
            await self.process.wait()
        if self.process.returncode is None:
            self.process.kill()

    def exit_status(self) -> int:
        assert self.process.returncode is not None, "the relay exits after its server"
        return 0 if self.stopping else _exit_status(self.process.returncode)

    def _track(self, line: bytes) -> None:
        message = _parse(line)
        if message is None or message.get("method") != "tools/call":
            return
        request_id = _request_id(message)
        if request_id is not None:
            self.pending_calls.add(request_id)

    def _swallowed(self, line: bytes) -> _RequestId | None:
        """The id of the tools/call answer on ``line`` if the dice say to swallow it, else None."""
        if not self.pending_calls:
            return None  # nothing to swallow: spare the parse
        message = _parse(line)
        if message is None or "method" in message or ("result" not in message and "error" not in message):
            return None
        request_id = _request_id(message)
        if request_id not in self.pending_calls:
            return None
        self.pending_calls.remove(request_id)
        self.answered_calls += 1
        if self.answered_calls <= self.options.skip_first:
            return None
        return request_id if self.rng.random() < self.options.swallow_probability else None

    async def _send_to_client(self, data: bytes) -> bool:
        """Forward ``data``; False when the client stopped reading (then the server is stopped)."""
        if not data:
            return True
        try:
            await self.client_out.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await self.stop_server()
            return False
        return True

    async def _inject_fault(self, request_id: _RequestId) -> None:
        self.process.kill()
        if self.options.log is None:
            return
        record = {"event": "swallowed", "id": request_id, "pid": self.process.pid}
        async with await trio.open_file(self.options.log, "a") as log:
            await log.write(json.dumps(record) + "\n")


def _life_seed(seed: int | None, log: str | None) -> str | None:
    """The RNG seed of this server life: the seed and the faults logged by earlier lives."""
    if seed is None:
        return None
    try:
        with open(log or os.devnull, "rb") as earlier:
            lives = sum(1 for _ in earlier)
    except FileNotFoundError:
        lives = 0
    return f"{seed}:{lives}"


async def _run(options: _Options) -> int:
    # The server stays in the relay's process group, so a signal to the group (Ctrl-C, the MCP
    # SDK's kill escalation) reaches both.
    try:
        process = await trio.lowlevel.open_process(
            list(options.command), stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
    except OSError as error:
        print(f"stdio_relay: cannot start {options.command[0]!r}: {error}", file=sys.stderr)
        return 127
    assert process.stdin is not None
    assert process.stdout is not None
    try:
        # Duplicates, so that closing the streams leaves fds 0 and 1 to the interpreter.
        async with (
            trio.lowlevel.FdStream(os.dup(0)) as client_in,
            trio.lowlevel.FdStream(os.dup(1)) as client_out,
            process.stdin,
            process.stdout,
        ):
            relay = _Relay(
                options=options,
                process=process,
                server_stdin=process.stdin,
                server_stdout=process.stdout,
                client_out=client_out,
                rng=random.Random(_life_seed(options.seed, options.log)),
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(relay.client_to_server, client_in)
                nursery.start_soon(relay.server_to_client)
                nursery.start_soon(relay.watch_server, nursery.cancel_scope)
            return relay.exit_status()
    finally:
        # Only an error or an interrupt gets here with the server alive; never leave it behind.
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the relay; return its exit status (see the module docstring).

    Args:
        argv: The command line after the program name; ``sys.argv[1:]`` when None.

    Returns:
        0 when the client closed the relay's stdin; otherwise nonzero, derived from the
        server's exit status.
    """
    options = _parse_args(sys.argv[1:] if argv is None else argv)
    return trio.run(_run, options)


if __name__ == "__main__":
    sys.exit(main())
