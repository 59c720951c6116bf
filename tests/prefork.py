"""A warm fork server for test programs that restart often (the chaos tests' server and relay).

Every fault in the chaos tests restarts the stdio server and its relay, and each new process
spent most of its ~0.7 s (1.5 s on a loaded machine) importing the MCP SDK. Here one "zygote"
process imports everything once; a stdio command is then a tiny stdlib-only *shim*
(``python -I -S prefork.py shim SOCKET KIND ARGS...``, ~20 ms) that hands its stdin, stdout and
stderr to the zygote over a Unix socket (SEQPACKET: one request is one message). The zygote
forks a child that runs KIND's ``main`` on those descriptors: the very program the test would
have spawned, already imported, holding nothing else of the zygote's.

The shim stands for the child as far as its parent can tell:

- it exits with the child's status (a child killed by a signal kills the shim by the same
  signal), so the SDK and the relay see the server's exit;
- a shim that dies, of SIGKILL included, takes the child with it: the zygote watches the
  shim's pidfd and SIGKILLs the child at once. The relay's "kill the server" therefore still
  kills the process that ran the tool, a few milliseconds later at most: a crash schedule
  that a real server could have had too.

The child's pid is the one the server reports (``pid`` tool, the store's owner pid), so a test
that kills the server by pid kills the child, and the shim follows.

Run as ``python prefork.py zygote SOCKET``; it prints ``ready`` once it listens, and stops
(SIGKILLing its children) when its stdin closes.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

__all__ = ["command", "start_zygote"]

_THIS_FILE = Path(__file__).resolve()
_MAX_REQUEST = 1 << 20


def command(socket_path: str, kind: str, *args: str) -> list[str]:
    """The argv of a shim that runs ``kind`` (``"server"``, ``"relay"`` or ``"program"``)
    with ``args``."""
    return [sys.executable, "-I", "-S", str(_THIS_FILE), "shim", socket_path, kind, *args]


def _run_server(args: list[str]) -> int:
    import mcp_test_server  # already imported by the zygote: free

    sys.argv = ["mcp_test_server.py", *args]
    mcp_test_server.main()
    return 0


def _run_relay(args: list[str]) -> int:
    from rmcp_actors.testing import stdio_relay

    return stdio_relay.main(args)


def _run_program(args: list[str]) -> int:
    """Run the Python file ``args[0]`` as ``__main__`` with ``args`` as its argv (the
    transaction crash tests' client program: rmcp_actors is already imported)."""
    import runpy

    sys.argv = list(args)
    runpy.run_path(args[0], run_name="__main__")
    return 0


_KINDS: dict[str, Callable[[list[str]], int]] = {
    "server": _run_server,
    "relay": _run_relay,
    "program": _run_program,
}


# The shim: stdlib only, it runs with -I -S to start in milliseconds.


def _shim(socket_path: str, kind: str, args: list[str]) -> None:
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    connection.connect(socket_path)
    request = json.dumps({"kind": kind, "args": args, "cwd": os.getcwd(), "env": dict(os.environ)})
    socket.send_fds(connection, [request.encode()], [0, 1, 2])
    # The child holds the pipes now: the shim must not keep them open (EOF would never come).
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    status = b""
    while not status.endswith(b"\n") and (chunk := connection.recv(64)):
        status += chunk
    what, _, number = status.decode().strip().partition(" ")
    if what == "signal":
        if int(number) != signal.SIGKILL:
            # SIGKILL cannot be caught, and signal.signal refuses it (EINVAL): the shim would
            # exit 1 instead of being killed like its child.
            signal.signal(int(number), signal.SIG_DFL)
        os.kill(os.getpid(), int(number))
    os._exit(int(number) if what == "exit" else 1)


# The zygote.


def _zygote(socket_path: str) -> None:
    sys.path.insert(0, str(_THIS_FILE.parent))
    # What every child needs, imported once here: that is the whole point.
    import mcp_test_server  # noqa: F401

    import rmcp_actors.stores.sqlite  # noqa: F401
    from rmcp_actors.testing import stdio_relay  # noqa: F401

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(socket_path)
    listener.listen(64)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, "accept")
    selector.register(sys.stdin, selectors.EVENT_READ, "stdin")
    # child pid -> (connection to its shim, child pidfd, shim pidfd or None once it died)
    children: dict[int, tuple[socket.socket, int, int | None]] = {}
    print("ready", flush=True)
    try:
        while True:
            for key, _ in selector.select():
                tag = key.data
                if tag == "stdin":
                    if not os.read(sys.stdin.fileno(), 4096):
                        return
                elif tag == "accept":
                    connection, _ = listener.accept()
                    child = _spawn(connection, listener, selector)
                    if child is not None:
                        pid, child_fd, shim_fd = child
                        children[pid] = (connection, child_fd, shim_fd)
                        selector.register(child_fd, selectors.EVENT_READ, ("child", pid))
                        if shim_fd is not None:
                            selector.register(shim_fd, selectors.EVENT_READ, ("shim", pid))
                elif tag[0] == "shim":
                    # The shim died (killed): its child dies with it, as the real process would.
                    pid = tag[1]
                    connection, child_fd, shim_fd = children[pid]
                    assert shim_fd is not None
                    selector.unregister(shim_fd)
                    os.close(shim_fd)
                    children[pid] = (connection, child_fd, None)
                    os.kill(pid, signal.SIGKILL)
                else:
                    pid = tag[1]
                    connection, child_fd, shim_fd = children.pop(pid)
                    _, status = os.waitpid(pid, 0)
                    for fd in (child_fd, shim_fd):
                        if fd is not None:
                            selector.unregister(fd)
                            os.close(fd)
                    if os.WIFSIGNALED(status):
                        report = f"signal {os.WTERMSIG(status)}"
                    else:
                        report = f"exit {os.WEXITSTATUS(status)}"
                    with contextlib.suppress(OSError):  # the shim is gone already
                        connection.sendall(report.encode() + b"\n")
                    connection.close()
    finally:
        for pid in children:
            os.kill(pid, signal.SIGKILL)
        for pid in children:
            os.waitpid(pid, 0)
        os.unlink(socket_path)


def _spawn(
    connection: socket.socket, listener: socket.socket, selector: selectors.BaseSelector
) -> tuple[int, int, int | None] | None:
    """Fork a child for the shim on ``connection``; return its pid and the pidfds to watch."""
    message, fds, _, _ = socket.recv_fds(connection, _MAX_REQUEST, 3)
    credentials = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    shim_pid = struct.unpack("3i", credentials)[0]
    request = json.loads(message)
    try:
        # Before the fork: a shim already dead must not leave a child running unwatched.
        shim_fd: int | None = os.pidfd_open(shim_pid)
    except ProcessLookupError:
        shim_fd = None
    pid = os.fork()
    if pid == 0:
        selector.close()
        listener.close()
        connection.close()
        _child(request, fds)
    for fd in fds:
        os.close(fd)
    child_fd = os.pidfd_open(pid)
    if shim_fd is None:
        os.kill(pid, signal.SIGKILL)
    return pid, child_fd, shim_fd


def _child(request: dict[str, object], fds: list[int]) -> None:
    code = 1
    try:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        # Nothing of the zygote's (other shims' sockets, pidfds) may outlive it in the child.
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))
        os.chdir(str(request["cwd"]))
        env = request["env"]
        assert isinstance(env, dict)
        os.environ.clear()
        os.environ.update({str(name): str(value) for name, value in env.items()})
        args = request["args"]
        assert isinstance(args, list)
        code = _KINDS[str(request["kind"])]([str(arg) for arg in args])
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        # Never back into the zygote's loop or its exit handlers.
        os._exit(code)


def start_zygote(socket_path: str) -> subprocess.Popen[bytes]:
    """Start a zygote listening on ``socket_path``; close its stdin to stop it."""
    process = subprocess.Popen(
        [sys.executable, str(_THIS_FILE), "zygote", socket_path],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert process.stdout is not None
    if process.stdout.readline() != b"ready\n":
        process.kill()
        raise RuntimeError("the prefork zygote did not start; see its stderr above")
    return process


if __name__ == "__main__":
    if sys.argv[1] == "shim":
        _shim(sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        _zygote(sys.argv[2])
