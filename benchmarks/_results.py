"""Results files of the benchmarks: ``benchmarks/results/<name>.json``, written and read here.

Every file is one JSON object::

    {"name": "alternatives", "mode": "quick" | "full", "command": "python benchmarks/...",
     "date": "2026-11-30T18:00:00+00:00", "machine": {...}, "figures": {...}}

``mode`` says whether the figures come from a smoke run (``--quick``, a placeholder) or a full run
on an idle machine; ``command`` reproduces them. ``plot.py`` and the README table read the files
through :func:`read_results`, which never fails on a file written by another script: a missing
file or key reads as absent.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

from _measure import finite

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = RESULTS.parents[1]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _commit() -> str | None:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def machine() -> dict[str, Any]:
    """What the figures depend on: interpreter, CPU, load when the run ended, code measured."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "load_average": [round(value, 2) for value in load] if load else None,
        "mcp": version("mcp"),
        "commit": _commit(),
    }


def command(argv: list[str] | None = None) -> str:
    """The command line that ran this script, relative to the repository root."""
    argv = sys.argv if argv is None else argv
    script = Path(argv[0]).resolve()
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    return shlex.join(["python", str(shown), *argv[1:]])


def write_results(name: str, figures: dict[str, Any], *, quick: bool, path: Path | None = None) -> Path:
    """Write ``figures`` to ``path`` (default ``benchmarks/results/<name>.json``) with the run's
    mode, command, date and machine; return the path."""
    path = path if path is not None else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "name": name,
        "mode": "quick" if quick else "full",
        "command": command(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "figures": figures,
    }
    path.write_text(json.dumps(finite(document), indent=2) + "\n")
    return path


def read_results(name: str, directory: Path = RESULTS) -> dict[str, Any] | None:
    """The results file ``<name>.json`` as a dict, or None when it is absent or unreadable."""
    try:
        document = json.loads((directory / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None


def dig(document: Any, *keys: str | int, default: Any = None) -> Any:
    """``document[k1][k2]...``, or ``default`` where a key is missing or a value has another type."""
    for key in keys:
        try:
            document = document[key]
        except (KeyError, IndexError, TypeError):
            return default
    return document
