"""``rmcp batch SERVER TOOL FILE.jsonl``: one call per input line through ``sup.map``, results
as JSONL, resumable.

Every line's call carries an idempotency key that a rerun computes again (from ``--key FIELD``,
or derived from the server, tool, line number and arguments), and every result line records it.
A rerun reads the results file first: a line whose last result is final (``succeeded`` or
``tool_error``) is skipped; any other line is sent again with the same key, so an RMCP server
replays a call that ran instead of running it twice. Each result line is written whole and
flushed before the next, with Ctrl-C held off in between, so an interrupted run leaves a file
the next run can read.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Annotated, Any, Final, cast

import attrs
import trio
import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from ..errors import RMCPError
from ..result import CallResult
from ._app import OUTCOME_NAMES, ExitCode, app, fail, load_config, stderr
from ._connect import connect, require_server, run
from ._outcomes import call_record, error_exit_code, error_record

__all__ = ["batch", "derived_key"]

_FINAL: Final = frozenset({OUTCOME_NAMES[ExitCode.SUCCEEDED], OUTCOME_NAMES[ExitCode.TOOL_ERROR]})
_UNKNOWN: Final = OUTCOME_NAMES[ExitCode.OUTCOME_UNKNOWN]
_CODE_OF: Final = {name: code for code, name in OUTCOME_NAMES.items()}
# The batch's exit code is its most pressing line's: 2 and 4 first (a rerun makes progress),
# then 3 (fix the input), then 1 (final results the caller reads in the file).
_URGENCY: Final = (ExitCode.OUTCOME_UNKNOWN, ExitCode.REFUSED, ExitCode.USAGE, ExitCode.TOOL_ERROR)


def derived_key(server: str, tool: str, line: int, arguments: dict[str, Any]) -> str:
    """The idempotency key of an input line without ``--key``: the same for the same line
    of the same batch, whatever run computes it, and new when the line's arguments change."""
    canonical = json.dumps(
        [server, tool, line, arguments], sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return "rmcp-batch-" + hashlib.sha256(canonical.encode()).hexdigest()[:32]


def _arguments_digest(arguments: dict[str, Any]) -> str:
    """What tells two lines' calls apart beyond their key: the canonical JSON of the arguments."""
    canonical = json.dumps(arguments, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def _default_out(path: Path) -> Path:
    stem = path.name.removesuffix(".jsonl")
    return path.with_name(f"{stem}.results.jsonl")


def _previous_results(out: Path) -> tuple[dict[int, dict[str, Any]], int]:
    """The last result of each line in an earlier run's file, and how many lines were unreadable."""
    last: dict[int, dict[str, Any]] = {}
    unreadable = 0
    if not out.exists():
        return last, unreadable
    with out.open("rb") as file:
        for raw in file:
            try:
                record: object = json.loads(raw)
            except ValueError:
                unreadable += 1
                continue
            line = cast("dict[str, Any]", record).get("line") if isinstance(record, dict) else None
            if isinstance(line, int):
                last[line] = cast("dict[str, Any]", record)
            else:
                unreadable += 1
    return last, unreadable


def _ends_mid_line(path: Path) -> bool:
    if not path.exists() or path.stat().st_size == 0:
        return False
    with path.open("rb") as file:
        file.seek(-1, os.SEEK_END)
        return file.read(1) != b"\n"


@attrs.define
class _Run:
    """One run of a batch: where results go, what is left to send, and the counts so far."""

    server: str
    tool: str
    key_field: str | None
    out_path: Path | None
    previous: dict[int, dict[str, Any]]
    progress: Progress
    task: Any = None
    counts: dict[str, int] = attrs.Factory(lambda: dict.fromkeys([*OUTCOME_NAMES.values(), "skipped"], 0))
    codes: set[ExitCode] = attrs.Factory(set[ExitCode])
    written: int = 0
    out: IO[str] | None = None
    # Lines handed to sup.map, by their index in the batch; keys by the arguments' identity
    # until sup.map asks for them (right after taking the item).
    lines: dict[int, tuple[int, str, str]] = attrs.Factory(dict[int, tuple[int, str, str]])
    keys: dict[int, str] = attrs.Factory(dict[int, str])
    # The input's line numbers that hold a call (not blank), once the input was read through.
    present: set[int] = attrs.Factory(set[int])
    # The earlier runs' final results by key: a call keeps its --key when lines are added or
    # removed above it, and must not run again because its line number changed.
    finished: dict[str, dict[str, Any]] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        # Results of another server or tool (the same file, the same --key) are not this batch's.
        self.previous = {
            line: record
            for line, record in self.previous.items()
            if (record.get("server"), record.get("tool")) in ((self.server, self.tool), (None, None))
        }
        self.finished = {
            record["key"]: record
            for record in self.previous.values()
            if record.get("outcome") in _FINAL and isinstance(record.get("key"), str)
        }

    @trio.lowlevel.enable_ki_protection
    def write(self, record: dict[str, Any], *, skipped: bool = False) -> None:
        """Append one result line and flush it; Ctrl-C waits until the line is whole."""
        assert self.out is not None
        self.out.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.out.flush()
        self.written += 1
        code = ExitCode(record["exit_code"])
        self.codes.add(code)
        self.counts["skipped" if skipped else OUTCOME_NAMES[code]] += 1
        self.progress.advance(self.task)

    def invalid(self, line: int, message: str) -> None:
        self.write(
            {
                "line": line,
                "key": None,
                "outcome": OUTCOME_NAMES[ExitCode.USAGE],
                "exit_code": int(ExitCode.USAGE),
                "error": {
                    "type": "InputError",
                    "message": f"line {line}: {message}",
                    "may_have_executed": False,
                },
            }
        )

    def key_of(self, line: int, arguments: dict[str, Any]) -> str | None:
        """The line's key, or None (after writing why) when ``--key`` names no usable value."""
        if self.key_field is None:
            return derived_key(self.server, self.tool, line, arguments)
        value = arguments.get(self.key_field)
        if isinstance(value, str) and value:
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        shown = "is missing" if self.key_field not in arguments else f"is {json.dumps(value)}"
        self.invalid(
            line, f"the key field {self.key_field!r} {shown}; it must be a non-empty string or an integer"
        )
        return None

    def items(self, path: Path) -> Iterator[dict[str, Any]]:
        """The arguments of each line still to send, in file order; lines that finished in an
        earlier run are counted as skipped, bad lines get a ``usage_error`` result."""
        index = 0
        with path.open("rb") as file:
            for line, raw in enumerate(file, start=1):
                if not raw.strip():
                    continue
                self.present.add(line)
                try:
                    arguments: object = json.loads(raw)
                except UnicodeDecodeError as exc:
                    self.invalid(line, f"not UTF-8 text ({exc.reason})")
                    continue
                except json.JSONDecodeError as exc:
                    self.invalid(line, f"not valid JSON: {exc.msg} at column {exc.colno}")
                    continue
                if not isinstance(arguments, dict):
                    self.invalid(line, f"expected a JSON object of arguments, got {type(arguments).__name__}")
                    continue
                arguments = cast("dict[str, Any]", arguments)
                key = self.key_of(line, arguments)
                if key is None:
                    continue
                previous = self.previous.get(line)
                done = self.finished.get(key)
                if previous is not None and previous.get("outcome") in _FINAL and previous.get("key") == key:
                    done = previous
                if done is not None and done is previous:
                    self.counts["skipped"] += 1
                    self.codes.add(_CODE_OF[done["outcome"]])
                    self.progress.advance(self.task)
                    continue
                digest = _arguments_digest(arguments)
                if done is not None and done.get("arguments_sha256") == digest:
                    # The same call finished on another line of an earlier run (lines were
                    # added or removed above it): this line takes its result.
                    self.write({**done, "line": line}, skipped=True)
                    continue
                if (
                    previous is not None
                    and previous.get("outcome") == _UNKNOWN
                    and isinstance(previous.get("key"), str)
                    and previous.get("arguments_sha256") == digest
                ):
                    # The call may have run under that key: only the same key lets an RMCP
                    # server replay it rather than run it again (even if --key changed since).
                    # Other arguments on this line number are another call (lines moved, or
                    # the line was edited): the old key would make them a conflict.
                    key = previous["key"]
                self.lines[index] = (line, key, digest)
                self.keys[id(arguments)] = key
                index += 1
                yield arguments

    def open(self) -> None:
        """Open the results for appending (stdout without a file); exit 3 if it cannot be."""
        if self.out_path is None:
            self.out = typer.get_text_stream("stdout")
            return
        try:
            torn = _ends_mid_line(self.out_path)
            self.out = self.out_path.open("a", encoding="utf-8")
            if torn:
                # A line cut short (the machine stopped mid-write) must not swallow the next.
                self.out.write("\n")
        except OSError as exc:
            raise fail(f"cannot write the results to {str(self.out_path)!r}: {exc.strerror or exc}") from None

    def close(self) -> None:
        if self.out is not None and self.out_path is not None:
            self.out.close()

    def key_for(self, arguments: dict[str, Any]) -> str:
        return self.keys.pop(id(arguments))

    def record(self, index: int, outcome: CallResult | RMCPError) -> None:
        line, key, digest = self.lines.pop(index)
        body = call_record(outcome) if isinstance(outcome, CallResult) else error_record(outcome)
        self.write({"line": line, "key": key, **body, "arguments_sha256": digest})

    def exit_code(self) -> ExitCode:
        return next((code for code in _URGENCY if code in self.codes), ExitCode.SUCCEEDED)

    def summary(self) -> str:
        shown = ", ".join(f"{count} {name}" for name, count in self.counts.items() if count)
        return shown or "no lines"


def _compact(out: Path, present: set[int]) -> None:
    """Rewrite the results as one line per input line (its last result), in input order.

    Lines no longer in the input (blank now, or past its end) lose their results. Written to a
    temporary file then renamed over the results: an interruption leaves the old file whole.
    """
    last, _ = _previous_results(out)
    handle, temporary = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        # mkstemp makes the file private (0600): the results keep the mode they had.
        os.fchmod(handle, out.stat().st_mode & 0o7777)
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            for line in sorted(last.keys() & present):
                file.write(json.dumps(last[line], ensure_ascii=False) + "\n")
            # On disk before the rename: after a power cut the rename may survive without
            # the data, and an empty file would have replaced every finished result.
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, out)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _count_lines(path: Path) -> int:
    with path.open("rb") as file:
        return sum(1 for raw in file if raw.strip())


@app.command()
def batch(
    ctx: typer.Context,
    server: Annotated[str, typer.Argument(help="The server's name, as in the config.", show_default=False)],
    tool: Annotated[str, typer.Argument(help="The tool's name, as the server lists it.", show_default=False)],
    file: Annotated[
        Path,
        typer.Argument(help="JSON Lines: one object of the tool's arguments per line.", show_default=False),
    ],
    concurrency: Annotated[
        int | None,
        typer.Option(
            "--concurrency", "-n", min=1, help="Calls at once (default: the server's max_concurrency)."
        ),
    ] = None,
    key: Annotated[
        str | None,
        typer.Option(
            "--key",
            help="Take each line's idempotency key from this field of its arguments (a string or an "
            "integer; it is sent too). Default: derived from the server, tool, line number and arguments.",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Where results go, one JSON line per input line (default: FILE with .results.jsonl). "
            "- for stdout (then nothing is resumed).",
            show_default=False,
        ),
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option(
            "--timeout",
            "-t",
            help="Seconds for each line's call (default: the tool's timeout_s).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Call a tool once per line of a JSON Lines file; results as JSON Lines; resumable.

    Run it again after an interruption or with lines whose outcome was unknown: lines that
    finished are skipped, the others are sent again with the same idempotency key (an RMCP
    server replays a call that ran instead of running it twice). Exits 0 when every line
    succeeded, else with the most pressing line's code: 2 (unknown), 4 (refused), 3 (a bad
    line), 1 (tool errors).

    Example: [bold]rmcp batch orders create_order orders.jsonl --key order_id -n 8[/]
    """
    config = load_config(ctx)
    require_server(config, server)
    if not file.is_file():
        raise fail(f"no input file at {str(file)!r}")
    to_stdout = out is not None and str(out) == "-"
    out_path = None if to_stdout else (out if out is not None else _default_out(file))
    if out_path is not None and out_path.exists() and out_path.resolve() == file.resolve():
        raise fail(f"--out {str(out_path)!r} is the input file; name another file for the results")
    previous: dict[int, dict[str, Any]] = {}
    if out_path is not None:
        previous, unreadable = _previous_results(out_path)
        if unreadable:
            stderr().print(f"{unreadable} unreadable line(s) in {out_path} ignored", highlight=False)
    console = stderr()
    progress = Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not console.is_terminal,
    )
    try:
        total = _count_lines(file)
    except OSError as exc:
        raise fail(f"cannot read {str(file)!r}: {exc.strerror or exc}") from None
    state = _Run(server, tool, key, out_path, previous, progress)

    async def perform() -> None:
        async with connect(config, [server]) as connected:
            error = connected.failures.get(server)
            if error is not None:
                raise fail(f"cannot connect to {server!r}: {error}; nothing was sent", ExitCode.REFUSED)
            try:
                results = connected.supervisor.map(
                    server,
                    tool,
                    state.items(file),
                    concurrency=concurrency,
                    key=state.key_for,
                    timeout=timeout,
                )
            except RMCPError as error:
                raise fail(str(error), error_exit_code(error), error_type=type(error).__name__) from None
            # Opened only now: a batch that cannot start leaves no results file behind.
            state.open()
            async with results:
                try:
                    async for index, outcome in results:
                        state.record(index, outcome)
                except RMCPError as error:
                    # The batch's own failure (the server was removed), not one line's.
                    raise fail(str(error), error_exit_code(error), error_type=type(error).__name__) from None

    where = "stdout" if out_path is None else str(out_path)
    try:
        with progress:
            state.task = progress.add_task(f"{server}/{tool}", total=total)
            run(
                perform,
                interrupted=lambda: (
                    f"after {state.written} result line(s) in {where}; run the same command again "
                    "to resume (finished lines are skipped, the others sent again with their keys)"
                ),
            )
    finally:
        state.close()
    if out_path is not None:
        _compact(out_path, state.present)
    code = state.exit_code()
    stderr().print(f"{server}/{tool}: {state.summary()}; results in {where}", highlight=False)
    raise typer.Exit(int(code))
