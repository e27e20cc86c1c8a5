"""pvio's hottest modules compiled with mypyc, used only while they match their sources.

Theory of operation
-------------------
The per-request work of the block path (the NBD export, blkfront, the shared ring,
blkback, the raw file) is Python; the same typed modules compiled with mypyc into C
extensions spend about a fifth less CPU on a 4 KiB read (docs/blk.md, the levers
table).  The Python sources stay the reference: the compiled build is made from them
(`tools/compile.py`), the test suite runs against both, and a process uses the build
only while it is *fresh*.

The network device's modules are not compiled: compiled, netback and netfront moved no
figure of `pvio bench net` (docs/net.md), whose path is bound by the kernel's TAP and
bridge work and by waking processes, not by Python's own work.

A build is a folder, ``_compiled/`` inside the package (``PVIO_COMPILED_DIR`` names
another), holding one extension per module, mypyc's shared library, and ``manifest.json``:
the interpreter it was built for (``SOABI``) and the SHA-256 of every source it was
compiled from.  `activate()`, called when ``pvio`` is imported, compares the manifest with
the sources beside this file; if every hash matches (and ``PVIO_PURE`` is not ``1``) it
puts a finder first on ``sys.meta_path`` that loads those modules from the build.  One
changed source makes the whole build unused, not just that module: compiled modules call
one another directly in C, so a mix of old compiled code and new Python would run neither
version.  Nothing is ever loaded from a stale build, and the sources themselves never sit
next to an extension that could shadow them.

`status()` says which it is, for `pvio bench` (results record it) and the tests.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

#: The modules compiled, in the order of a request's path.  A module belongs here when
#: its work is per request and it compiles (`RequestIds` in blk/front_queue.py subclasses
#: asyncio.Semaphore, which mypyc's native classes cannot).
MODULES: tuple[str, ...] = (
    "pvio.nbd.wire",
    "pvio.nbd.requests",
    "pvio.nbd.server",
    "pvio.nbd.replies",
    "pvio.nbd.server_asyncio",
    "pvio.blk.request",
    "pvio.blk.shadow",
    "pvio.blk.polling",
    "pvio.blk.front_grants",
    "pvio.blk.front_io",
    "pvio.blk.frontend",
    "pvio.ring.sring",
    "pvio.blk.back_grants",
    "pvio.blk.back_io",
    "pvio.blk.backend",
    "pvio.storage.dirty",
    "pvio.storage.rawfile",
)

PACKAGE_DIR = Path(__file__).resolve().parent
MANIFEST = "manifest.json"


def build_dir() -> Path:
    """Where the compiled build lives (``PVIO_COMPILED_DIR``, else ``_compiled/`` here)."""
    return Path(os.environ.get("PVIO_COMPILED_DIR") or PACKAGE_DIR / "_compiled")


def source_path(module: str) -> Path:
    """The Python source of one of pvio's modules."""
    return PACKAGE_DIR.joinpath(*module.split(".")[1:]).with_suffix(".py")


def source_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def soabi() -> str:
    return str(sysconfig.get_config_var("SOABI"))


@dataclass(frozen=True)
class Status:
    """Whether this process runs the compiled build, and if not, why."""

    active: bool
    reason: str  # "compiled", or why not: "PVIO_PURE=1", "no build", "stale: ..."
    modules: tuple[str, ...] = ()

    def describe(self) -> str:
        return f"compiled ({len(self.modules)} modules, mypyc)" if self.active else f"pure Python ({self.reason})"


def check(build: Path, sources: Sequence[str] = MODULES) -> tuple[dict[str, Path], str]:
    """The extension file of each module of a fresh build, or ({}, why it is not used).
    Never raises: whatever is wrong with a build, `import pvio` runs the sources."""
    try:
        return _check(build, sources)
    except FileNotFoundError:
        return {}, "no build"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return {}, f"unreadable manifest: {exc!r}"


def _check(build: Path, sources: Sequence[str]) -> tuple[dict[str, Path], str]:
    manifest = json.loads((build / MANIFEST).read_text())
    if manifest.get("soabi") != soabi():
        return {}, f"built for {manifest.get('soabi')}, this is {soabi()}"
    hashes: dict[str, str] = manifest.get("sources", {})
    if sorted(hashes) != sorted(sources):
        return {}, "stale: built from another list of modules"
    files: dict[str, Path] = {}
    for module in sources:
        try:
            if source_hash(source_path(module)) != hashes[module]:
                return {}, f"stale: {source_path(module).relative_to(PACKAGE_DIR.parent)} changed"
        except OSError as exc:
            return {}, f"stale: {exc}"
        files[module] = build / str(manifest["extensions"][module])
    for name, rel in manifest.get("support", {}).items():
        files[str(name)] = build / str(rel)
    missing = [str(f) for f in files.values() if not f.exists()]
    if missing:
        return {}, f"incomplete: {missing[0]} is missing"
    return files, "compiled"


class _Finder(importlib.abc.MetaPathFinder):
    """Finds the compiled extension of each module of a fresh build."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        file = self.files.get(fullname)
        if file is None:
            return None
        loader = importlib.machinery.ExtensionFileLoader(fullname, str(file))
        return importlib.util.spec_from_file_location(fullname, file, loader=loader)


_status = Status(False, "not activated")


# T:695 The same code, compiled
# Everything a 4 KiB request runs through, from the NBD socket to the disk and back, is
# in the modules of `MODULES`; compiled with mypyc they spend about a fifth less CPU on
# a 4 KiB read.  The Python is still what runs the tests first and what a reader reads: a
# build is used only while every source it was made from is unchanged, and PVIO_PURE=1
# runs without it.
# :T
def activate() -> Status:
    """Use the compiled build for the rest of this process if it is fresh (once)."""
    global _status
    if any(isinstance(f, _Finder) for f in sys.meta_path):
        return _status
    if os.environ.get("PVIO_PURE") == "1":
        _status = Status(False, "PVIO_PURE=1")
        return _status
    files, reason = check(build_dir())
    if not files:
        _status = Status(False, reason)
        return _status
    sys.meta_path.insert(0, _Finder(files))
    _status = Status(True, reason, MODULES)
    return _status


def status() -> Status:
    """What `activate()` found."""
    return _status
