"""The compiled build (`pvio.compiled`): used only while every source it was made from is
unchanged, never with PVIO_PURE=1, and really used by the run of the suite that says so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from pvio import compiled


def _fake_build(root: Path) -> dict[str, object]:
    """A build folder whose manifest matches today's sources (empty files as extensions)."""
    manifest: dict[str, object] = {
        "soabi": compiled.soabi(),
        "sources": {m: compiled.source_hash(compiled.source_path(m)) for m in compiled.MODULES},
        "extensions": {m: m.replace(".", "/") + ".so" for m in compiled.MODULES},
        "support": {"abc__mypyc": "abc__mypyc.so"},
    }
    for rel in [*manifest["extensions"].values(), "abc__mypyc.so"]:  # type: ignore[attr-defined]
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).touch()
    (root / compiled.MANIFEST).write_text(json.dumps(manifest))
    return manifest


def _rewrite(root: Path, manifest: dict[str, object]) -> None:
    (root / compiled.MANIFEST).write_text(json.dumps(manifest))


def test_a_build_is_used_only_while_it_matches_every_source(tmp_path: Path) -> None:
    manifest = _fake_build(tmp_path)
    files, reason = compiled.check(tmp_path)
    assert reason == "compiled"  # first: a matching build is taken
    assert set(files) == {*compiled.MODULES, "abc__mypyc"}
    assert files["pvio.blk.frontend"] == tmp_path / "pvio/blk/frontend.so"

    sources = dict(manifest["sources"])  # type: ignore[call-overload]
    sources["pvio.blk.frontend"] = "0" * 64  # built from another frontend.py
    _rewrite(tmp_path, {**manifest, "sources": sources})
    files, reason = compiled.check(tmp_path)
    assert files == {} and reason == "stale: pvio/blk/frontend.py changed"

    _rewrite(tmp_path, {**manifest, "soabi": "cpython-399-x86_64-linux-gnu"})
    assert compiled.check(tmp_path) == ({}, f"built for cpython-399-x86_64-linux-gnu, this is {compiled.soabi()}")

    del sources["pvio.blk.frontend"]
    _rewrite(tmp_path, {**manifest, "sources": sources})
    assert compiled.check(tmp_path)[1] == "stale: built from another list of modules"

    _rewrite(tmp_path, manifest)
    (tmp_path / "abc__mypyc.so").unlink()
    assert compiled.check(tmp_path)[1].startswith("incomplete: ")

    (tmp_path / compiled.MANIFEST).write_text("{not json")
    assert compiled.check(tmp_path)[1].startswith("unreadable manifest: ")
    # Valid JSON of the wrong shape is unreadable too, never an exception at `import pvio`.
    for wrong in ([], {"soabi": compiled.soabi(), "sources": manifest["sources"]},
                  {**manifest, "extensions": {}}, {**manifest, "sources": 7}):
        _rewrite(tmp_path, wrong)  # type: ignore[arg-type]
        files, reason = compiled.check(tmp_path)
        assert files == {} and reason.startswith("unreadable manifest: "), (wrong, reason)
    assert compiled.check(tmp_path / "nowhere") == ({}, "no build")


def _imported_from(env: dict[str, str]) -> list[str]:
    code = ("import pvio.blk.frontend, pvio.nbd.server; from pvio import compiled; "
            "print(compiled.status().describe()); print(pvio.blk.frontend.__file__)")
    env = {**env, "PYTHONPATH": str(compiled.PACKAGE_DIR.parent)}  # this pvio, wherever it is
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def test_pvio_pure_and_a_stale_build_run_the_sources(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PVIO_PURE", "PVIO_COMPILED_DIR")}
    manifest = _fake_build(tmp_path)  # empty extensions: loading one would fail loudly
    sources = dict(manifest["sources"])  # type: ignore[call-overload]
    sources["pvio.nbd.server"] = "0" * 64
    _rewrite(tmp_path, {**manifest, "sources": sources})
    described, file = _imported_from({**env, "PVIO_COMPILED_DIR": str(tmp_path)})
    assert described == "pure Python (stale: pvio/nbd/server.py changed)"
    assert file.endswith("/pvio/blk/frontend.py")
    described, file = _imported_from({**env, "PVIO_PURE": "1"})
    assert described == "pure Python (PVIO_PURE=1)" and file.endswith("/pvio/blk/frontend.py")


def test_this_run_uses_the_build_it_was_asked_to() -> None:
    # tools/test.sh runs the suite on the compiled build (PVIO_EXPECT_COMPILED=1), then
    # the compiled modules' own tests on their sources (PVIO_PURE=1).
    import pvio.blk.frontend

    status = compiled.status()
    if os.environ.get("PVIO_PURE") == "1":
        assert not status.active and pvio.blk.frontend.__file__.endswith(".py")
    elif os.environ.get("PVIO_EXPECT_COMPILED") == "1":
        assert status.active, status.reason
        assert str(pvio.blk.frontend.__file__).endswith(str(sysconfig.get_config_var("EXT_SUFFIX")))
    else:
        pytest.skip("neither PVIO_PURE=1 nor PVIO_EXPECT_COMPILED=1: tools/test.sh sets one")


def _generated_init(cls: type) -> bool:
    """Whether `cls.__init__` is one dataclasses wrote (compiled from '<string>' at import)."""
    code = getattr(cls.__init__, "__code__", None)
    return code is not None and code.co_filename == "<string>"


def test_the_records_made_once_a_request_write_their_init_out() -> None:
    # A dataclass's generated __init__ runs as Python even in a compiled module (docs/testing.md).
    from dataclasses import dataclass

    from pvio.blk.back_io import Work
    from pvio.blk.request import BlkifRequest, DiskInfo, DiskIO
    from pvio.blk.shadow import Pending, Shadow
    from pvio.nbd.events import Command

    @dataclass
    class Generated:
        x: int

    assert _generated_init(Generated) and _generated_init(DiskInfo)  # first: the check sees one
    for cls in (BlkifRequest, DiskIO, Work, Shadow, Pending, Command):
        assert not _generated_init(cls), cls.__name__
