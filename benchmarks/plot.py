"""Plots and the README's table of figures, from the results files in ``benchmarks/results/``.

Usage::

    python benchmarks/plot.py            # a PNG beside each results file there is
    python benchmarks/plot.py --table    # print the README's table (Markdown) from the JSON
    python benchmarks/plot.py --readme   # rewrite that table in README.md, between its markers

Reads ``alternatives.json`` (``alternatives.py``), ``large_payloads.json`` (``large_payloads.py
--json``), and, when present, ``scale.json``, ``chaos.json`` and ``transfer.json`` (written by
other scripts: read defensively, a missing key leaves its bar or row out). No figure is typed by
hand: the README's table is this script's output, so rerunning a benchmark and then ``plot.py
--readme`` keeps the two in step (``make bench`` does both).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import RESULTS, ROOT, dig, read_results

README = ROOT / "README.md"
TABLE_START = "<!-- benchmarks-table: start (python benchmarks/plot.py --readme) -->"
TABLE_END = "<!-- benchmarks-table: end -->"
CLIENTS = ("raw", "raw2", "tenacity", "stamina", "rmcp")
FAULT_CLIENTS = ("raw", "tenacity", "stamina", "rmcp")
FAULT_MEASURES = ("duplicates", "extra_runs", "lost", "wrongly_reported", "reported_unknown")
CHAOS_WAYS = ("raw", "naive_retry", "rmcp")
CHAOS_MEASURES = ("duplicates", "lost", "unknown", "failed")
MIB = 1 << 20


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _figures(document: dict[str, Any] | None) -> Any:
    """The figures of a results file: under ``figures`` in the shared layout, else the whole."""
    if document is None:
        return None
    return document.get("figures", document)


def _mode_label(document: dict[str, Any]) -> str:
    """``full run, 2026-11-30, load 0.4``; a quick run is marked as a placeholder."""
    mode = document.get("mode")
    label = "quick run: a placeholder, not for quoting" if mode == "quick" else f"{mode or 'unlabelled'} run"
    date = str(document.get("date", ""))[:10]
    load = _number(dig(document, "machine", "load_average", 0))
    return ", ".join(part for part in (label, date, f"load {load:.1f}" if load is not None else "") if part)


# -- PNGs ---------------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grouped_bars(axes: Any, groups: list[str], series: dict[str, list[float | None]], ylabel: str) -> None:
    """Bars of each series side by side within each group; a missing value leaves a gap."""
    width = 0.8 / max(1, len(series))
    for index, (name, values) in enumerate(series.items()):
        positions = [group + (index - (len(series) - 1) / 2) * width for group in range(len(groups))]
        heights = [value if value is not None else 0.0 for value in values]
        bars = axes.bar(positions, heights, width, label=name)
        for bar, value in zip(bars, values, strict=True):
            if value is not None:
                text = f"{value:.0f}" if value.is_integer() or abs(value) >= 10 else f"{value:.2f}"
                axes.annotate(
                    text,
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
    axes.set_xticks(range(len(groups)), groups)
    axes.set_ylabel(ylabel)
    axes.legend(fontsize=8)


def plot_alternatives(document: dict[str, Any], out: Path) -> list[Path]:
    plt = _pyplot()
    written: list[Path] = []
    figures = _figures(document)
    rows = dig(figures, "overhead", "rows", default=[])
    if isinstance(rows, list) and rows:
        groups = [f"{dig(row, 'transport')} x{dig(row, 'callers')}" for row in rows]
        ratios = {
            name: [_number(dig(row, "clients", name, "ratio_to_raw")) for row in rows]
            for name in CLIENTS
            if name != "raw"
        }
        sequential = [row for row in rows if dig(row, "callers") == 1]
        added = {
            name: [_number(dig(row, "clients", name, "added_latency_us")) for row in sequential]
            for name in CLIENTS
            if name != "raw"
        }
        fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
        _grouped_bars(left, groups, ratios, "throughput / raw's (1.0 = as fast as raw)")
        left.axhline(1.0, color="grey", linewidth=0.8)
        left.set_title("Throughput against raw mcp.Client (no faults)")
        _grouped_bars(
            right, [f"{dig(row, 'transport')} x1" for row in sequential], added, "median latency added (µs)"
        )
        right.axhline(0.0, color="grey", linewidth=0.8)
        right.set_title("Latency added to a sequential call")
        fig.suptitle(f"benchmarks/alternatives.py ({_mode_label(document)})", fontsize=9)
        fig.tight_layout()
        written.append(out / "alternatives_overhead.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    clients = dig(figures, "faults", "clients", default={})
    if isinstance(clients, dict) and clients:
        names = [name for name in FAULT_CLIENTS if name in clients]
        series = {
            measure: [_number(dig(clients, name, measure)) for name in names] for measure in FAULT_MEASURES
        }
        fig, axes = plt.subplots(figsize=(9, 4.5))
        _grouped_bars(axes, names, series, "logical calls")
        faults = dig(figures, "faults", default={})
        axes.set_title(
            f"{dig(faults, 'calls')} side-effecting calls per client, server killed after the tool ran "
            f"(p={dig(faults, 'swallow_probability')}, seed {dig(faults, 'seed')})",
            fontsize=10,
        )
        fig.suptitle(f"benchmarks/alternatives.py ({_mode_label(document)})", fontsize=9)
        fig.tight_layout()
        written.append(out / "alternatives_faults.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def plot_large_payloads(document: dict[str, Any], out: Path) -> list[Path]:
    rows = dig(_figures(document), "rows", default=[])
    if not isinstance(rows, list) or not rows:
        return []
    plt = _pyplot()
    fig, axes_pair = plt.subplots(1, 2, figsize=(12, 4.5))
    for axes, direction in zip(axes_pair, ("result", "argument"), strict=True):
        chosen = [row for row in rows if dig(row, "direction") == direction]
        groups = [_size(dig(row, "size_bytes")) for row in chosen]
        series = {
            "rmcp (sup.call)": [_number(dig(row, "speedup_rmcp_raw")) for row in chosen],
            "linear transport alone": [_number(dig(row, "speedup_linear_raw")) for row in chosen],
            "raw2 (control)": [_number(dig(row, "control_raw2_raw")) for row in chosen],
        }
        _grouped_bars(axes, groups, series, "speedup over the SDK's stdio client")
        axes.axhline(1.0, color="grey", linewidth=0.8)
        if direction == "result":  # 1x at 1 KiB to tens of x at 20 MiB
            axes.set_yscale("log")
        axes.set_title(f"large {direction}s over stdio")
    fig.suptitle(f"benchmarks/large_payloads.py ({_mode_label(document)})", fontsize=9)
    fig.tight_layout()
    path = out / "large_payloads.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def _size(value: Any) -> str:
    size = _number(value)
    if size is None:
        return "?"
    return f"{size / MIB:g} MiB" if size >= MIB else f"{size / 1024:g} KiB"


_MEMORY_WORDS = ("byte", "kib", "memory", "rss")


def _unit(key: str) -> float:
    """Bytes per unit of a figure named ``key`` (``..._kib`` -> 1024)."""
    key = key.lower()
    return 1024.0 if "kib" in key else 1000.0 if "kb" in key.split("_") else 1.0


def _memory_figures(figures: Any) -> dict[str, float]:
    """Bytes per pending call by client (rmcp / raw / floor...), wherever scale.json keeps them:
    the first dict, under a key naming memory or bytes, whose values for "rmcp" and at least one
    other name are numbers (or dicts holding one number under a key naming memory or bytes)."""
    for path, node in _dicts(figures, ""):
        found: dict[str, float] = {}
        for name, value in node.items():
            number, unit = _number(value), _unit(path)
            if number is None and isinstance(value, dict):
                for key, inner in value.items():  # pyright: ignore[reportUnknownVariableType]
                    if any(word in str(key).lower() for word in _MEMORY_WORDS) and _number(inner) is not None:
                        number, unit = _number(inner), _unit(str(key))  # pyright: ignore[reportUnknownArgumentType]
                        break
            elif not any(word in path.lower() for word in _MEMORY_WORDS):
                number = None  # a bare number under a key that does not say it is memory
            if number is not None:
                found[str(name)] = number * unit
        if "rmcp" in found and len(found) >= 2:
            return found
    return {}


def _dicts(node: Any, path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every dict in ``node`` with the dotted key path that leads to it."""
    if isinstance(node, dict):
        yield path, node  # pyright: ignore[reportReturnType]
        for key, value in node.items():  # pyright: ignore[reportUnknownVariableType]
            yield from _dicts(value, f"{path}.{key}")
    elif isinstance(node, list):
        for value in node:  # pyright: ignore[reportUnknownVariableType]
            yield from _dicts(value, path)


def plot_scale(document: dict[str, Any], out: Path) -> list[Path]:
    memory = _memory_figures(_figures(document))
    if not memory:
        return []
    plt = _pyplot()
    fig, axes = plt.subplots(figsize=(7, 4.5))
    names = list(memory)
    bars = axes.bar(names, [memory[name] for name in names])
    for bar, name in zip(bars, names, strict=True):
        axes.annotate(
            f"{memory[name]:,.0f}",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
        )
    axes.set_ylabel("bytes per pending call")
    axes.set_title("Memory per pending call")
    fig.suptitle(f"benchmarks/results/scale.json ({_mode_label(document)})", fontsize=9)
    fig.tight_layout()
    path = out / "scale.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def _chaos_ways(document: dict[str, Any]) -> dict[str, Any]:
    ways = dig(document, "ways")
    if not isinstance(ways, dict):
        ways = dig(_figures(document), "ways")
    return ways if isinstance(ways, dict) else {}  # pyright: ignore[reportUnknownVariableType]


def plot_chaos(document: dict[str, Any], out: Path) -> list[Path]:
    ways = _chaos_ways(document)
    if not ways:
        return []
    plt = _pyplot()
    names = [name for name in CHAOS_WAYS if name in ways] + [name for name in ways if name not in CHAOS_WAYS]
    series = {measure: [_number(dig(ways, name, measure)) for name in names] for measure in CHAOS_MEASURES}
    fig, axes = plt.subplots(figsize=(8, 4.5))
    _grouped_bars(axes, names, series, "calls")
    axes.set_title("rmcp chaos: per way")
    fig.suptitle(f"benchmarks/results/chaos.json ({_mode_label(document)})", fontsize=9)
    fig.tight_layout()
    path = out / "chaos.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


# transfer.py's variants, in the order its rows show them.
TRANSFER_VARIANTS = {
    "raw": "raw mcp.Client, inline",
    "raw_linear": "raw, linear stdio transport",
    "rmcp_p1": "rmcp chunked, parallel 1",
    "rmcp_p4": "rmcp chunked, parallel 4",
    "rmcp_p4_file": "rmcp parallel 4, to a file",
}


def plot_transfer(document: dict[str, Any], out: Path) -> list[Path]:
    rows = dig(_figures(document), "rows", default={})
    if not isinstance(rows, dict) or not rows:
        return []
    plt = _pyplot()
    fig, axes_pair = plt.subplots(1, 2, figsize=(12, 4.5))
    groups = [str(row) for row in rows]
    for axes, key, ylabel in zip(
        axes_pair,
        ("wall_s", "peak_mib"),
        ("wall time (s, log)", "peak client memory over baseline (MiB)"),
        strict=True,
    ):
        series = {
            label: [_number(dig(rows, row, variant, key)) for row in groups]
            for variant, label in TRANSFER_VARIANTS.items()
        }
        _grouped_bars(axes, groups, series, ylabel)
        if key == "wall_s":
            axes.set_yscale("log")
    payload = _number(dig(_figures(document), "payload_bytes")) or 0
    fig.suptitle(
        f"benchmarks/transfer.py, {payload / (1 << 20):g} MiB ({_mode_label(document)}); "
        "a missing bar: timed out or failed",
        fontsize=9,
    )
    fig.tight_layout()
    path = out / "transfer.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def _transfer_table(document: dict[str, Any]) -> list[str]:
    figures = _figures(document)
    rows = dig(figures, "rows", default={})
    if not isinstance(rows, dict) or not rows:
        return []

    def cell(row: str, variant: str) -> str:
        measured = dig(rows, row, variant, default=None)
        if not isinstance(measured, dict):
            return "-"
        if "error" in measured:
            return "timed out" if "timed out" in str(measured["error"]) else "failed"
        text = f"{_fmt(measured.get('wall_s'), '.2f')} s, {_fmt(measured.get('peak_mib'), '.0f')} MiB"
        heap = _number(measured.get("traced_peak_mib"))
        return text if heap is None else f"{text} (heap {heap:.0f})"

    header = ["variant", *(str(row) for row in rows)]
    body = [[label, *(cell(row, variant) for row in rows)] for variant, label in TRANSFER_VARIANTS.items()]
    goals = dig(figures, "goals", default={})
    goal_rows = [
        [str(name), _fmt(dig(goal, "value"), ".3g"), str(dig(goal, "goal")), _verdict(dig(goal, "passed"))]
        for name, goal in (goals.items() if isinstance(goals, dict) else ())
    ]
    payload = _number(dig(figures, "payload_bytes")) or 0
    title = (
        f"{payload / (1 << 20):g} MiB in chunks: wall time, peak client RSS over its baseline "
        "(and peak Python heap, tracemalloc)"
    )
    return [
        _heading(title, document),
        "",
        *_markdown(header, body),
        "",
        *_markdown(["goal", "measured", "target", "verdict"], goal_rows),
    ]


SERVER_VARIANTS = {"memory": "MemoryStore", "sqlite": "SQLiteStore", "plain2": "plain2 (control)"}


def _server_overhead_table(document: dict[str, Any]) -> list[str]:
    """The RMCP server side against a plain MCPServer: throughput ratio and added server CPU."""
    rows = dig(_figures(document), "rows", default=[])
    if not isinstance(rows, list) or not rows:
        return []
    callers = [str(dig(row, "callers")) for row in rows]
    header = [
        "server",
        *(f"calls/s vs plain, x{count}" for count in callers),
        *(f"added server CPU µs/call, x{count}" for count in callers),
    ]

    def added(row: Any, variant: str) -> str:
        mine = _number(dig(row, "variants", variant, "server_cpu_us_per_call"))
        plain = _number(dig(row, "variants", "plain", "server_cpu_us_per_call"))
        return "-" if mine is None or plain is None else f"{mine - plain:+.0f}"

    def ratio(row: Any, variant: str) -> str:
        key = ("control_plain2_plain",) if variant == "plain2" else ("ratios", variant)
        return _fmt(dig(row, *key), ".3f")

    body = [
        [label, *(ratio(row, variant) for row in rows), *(added(row, variant) for row in rows)]
        for variant, label in SERVER_VARIANTS.items()
    ]
    goal_rows = [
        [
            f"{dig(goal, 'label')} x{dig(row, 'callers')}",
            _fmt(dig(goal, "measured"), "+.0f" if dig(goal, "at_most") else ".3f"),
            f"{'<=' if dig(goal, 'at_most') else '>='} {dig(goal, 'goal')}",
            _verdict(dig(goal, "met")) + (" (within noise)" if dig(goal, "within_noise") else ""),
        ]
        for row in rows
        for goal in dig(row, "goals", default=[])
    ]
    title = "The RMCP server side over a plain MCPServer, stdio, the echo tool"
    return [
        _heading(title, document),
        "",
        *_markdown(header, body),
        "",
        *_markdown(["goal", "measured", "target", "verdict"], goal_rows),
    ]


def _verdict(passed: Any) -> str:
    if passed is None:
        return "not measured"
    return ("PASS" if passed else "MISS") if isinstance(passed, bool) else "-"


PLOTS = {
    "alternatives": plot_alternatives,
    "large_payloads": plot_large_payloads,
    "scale": plot_scale,
    "chaos": plot_chaos,
    "transfer": plot_transfer,
}


# -- the README table ------------------------------------------------------------------------


def _fmt(value: Any, spec: str = ".2f") -> str:
    number = _number(value)
    return "-" if number is None else format(number, spec)


def _markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _heading(title: str, document: dict[str, Any]) -> str:
    command = document.get("command")
    reproduce = f"`{command}`" if isinstance(command, str) else "(the file records no command)"
    return f"**{title}** ({_mode_label(document)}): {reproduce}"


def table(directory: Path = RESULTS) -> str:
    """The README's tables of the latest figures, each under the command that reproduces it."""
    blocks: list[list[str]] = []
    alternatives = read_results("alternatives", directory)
    figures = _figures(alternatives)
    rows = dig(figures, "overhead", "rows", default=[])
    if alternatives is not None and isinstance(rows, list) and rows:
        groups = [f"{dig(row, 'transport')} x{dig(row, 'callers')}" for row in rows]
        sequential = [row for row in rows if dig(row, "callers") == 1]
        header = ["client", *(f"calls/s vs raw, {group}" for group in groups)]
        header += [f"added µs, {dig(row, 'transport')} x1" for row in sequential]
        body = [
            [
                f"{name} (control)" if name == "raw2" else name,
                *(_fmt(dig(row, "clients", name, "ratio_to_raw"), ".3f") for row in rows),
                *(_fmt(dig(row, "clients", name, "added_latency_us"), "+.0f") for row in sequential),
            ]
            for name in CLIENTS
            if name != "raw"
        ]
        blocks.append([_heading("No faults, the no-op tool", alternatives), "", *_markdown(header, body)])
    faults = dig(figures, "faults", default={})
    clients = dig(faults, "clients", default={})
    if alternatives is not None and isinstance(clients, dict) and clients:
        header = [
            "client",
            "succeeded",
            "failed",
            "unknown",
            "duplicates",
            "extra runs",
            "lost",
            "reported wrongly",
        ]
        keys = (
            "reported_succeeded",
            "reported_failed",
            "reported_unknown",
            "duplicates",
            "extra_runs",
            "lost",
        )
        body = [
            [name, *(_fmt(dig(clients, name, key), ".0f") for key in (*keys, "wrongly_reported"))]
            for name in FAULT_CLIENTS
            if name in clients
        ]
        title = (
            f"{dig(faults, 'calls')} side-effecting calls, answer lost and server killed with "
            f"p = {dig(faults, 'swallow_probability')} (seed {dig(faults, 'seed')})"
        )
        blocks.append([_heading(title, alternatives), "", *_markdown(header, body)])
    large = read_results("large_payloads", directory)
    large_rows = dig(_figures(large), "rows", default=[])
    if large is not None and isinstance(large_rows, list) and large_rows:
        results = [row for row in large_rows if dig(row, "direction") == "result"]
        header = ["large result over stdio", *(_size(dig(row, "size_bytes")) for row in results)]
        body = [
            ["rmcp / raw (speedup)", *(_fmt(dig(row, "speedup_rmcp_raw")) for row in results)],
            ["linear transport alone / raw", *(_fmt(dig(row, "speedup_linear_raw")) for row in results)],
            ["raw2 / raw (control)", *(_fmt(dig(row, "control_raw2_raw")) for row in results)],
        ]
        blocks.append([_heading("Large results", large), "", *_markdown(header, body)])
    server = read_results("server_overhead", directory)
    if server is not None and (server_block := _server_overhead_table(server)):
        blocks.append(server_block)
    transfer = read_results("transfer", directory)
    if transfer is not None and (transfer_block := _transfer_table(transfer)):
        blocks.append(transfer_block)
    scale = read_results("scale", directory)
    verdicts = dig(_figures(scale), "verdicts", default=None)
    if scale is not None and isinstance(verdicts, dict):
        rows = (
            ("a call pending at the server, rmcp - raw (B)", "pending_goal"),
            ("a call queued in the scheduler, beyond its task (B)", "queued_goal"),
            ("a sup.map item not started (B)", "map_goal"),
        )
        body = [
            [label, _fmt(dig(verdicts, key, "measured"), ",.0f"), _fmt(dig(verdicts, key, "bytes"), ",.0f")]
            for label, key in rows
        ]
        ratio = dig(_figures(scale), "throughput", "ratios", "rmcp/raw")
        calls = dig(_figures(scale), "calls", default=0)
        body.append([f"calls/s at {calls:,} callers, zero-cost server, rmcp / raw", _fmt(ratio), "-"])
        title = f"{calls:,} concurrent pending calls (traced bytes per call)"
        blocks.append([_heading(title, scale), "", *_markdown(["figure", "measured", "goal"], body)])
    chaos = read_results("chaos", directory)
    ways = _chaos_ways(chaos) if chaos is not None else {}
    if chaos is not None and ways:
        keys = ("succeeded", "failed", "unknown", "side_effects", "duplicates", "lost", "p50_ms", "p99_ms")
        body = [[str(name), *(_fmt(dig(way, key), "g") for key in keys)] for name, way in ways.items()]
        blocks.append([_heading("rmcp chaos", chaos), "", *_markdown(["way", *keys], body)])
    if not blocks:
        return "(no results yet: run the benchmarks, then python benchmarks/plot.py --readme)"
    return "\n\n".join("\n".join(block) for block in blocks)


def update_readme(readme: Path = README, directory: Path = RESULTS) -> bool:
    """Replace the table between the markers in ``readme``; return whether it changed."""
    text = readme.read_text()
    start, end = text.find(TABLE_START), text.find(TABLE_END)
    if start < 0 or end < start:
        raise SystemExit(f"{readme}: the markers {TABLE_START!r} ... {TABLE_END!r} are missing")
    updated = text[: start + len(TABLE_START)] + "\n" + table(directory) + "\n" + text[end:]
    if updated != text:
        readme.write_text(updated)
    return updated != text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--table", action="store_true", help="print the README's table and exit")
    group.add_argument("--readme", action="store_true", help="also rewrite the table in README.md")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the results directory")
    options = parser.parse_args()
    if options.table:
        print(table(options.results))
        return
    for name, plot in PLOTS.items():
        document = read_results(name, options.results)
        if document is None:
            print(f"{name}.json: absent, skipped")
            continue
        for path in plot(document, options.results):
            print(f"wrote {path}")
    if options.readme:
        changed = update_readme(README, options.results)
        print(f"README.md table {'updated' if changed else 'already up to date'}")


if __name__ == "__main__":
    main()
