"""Compile pvio's hottest modules with mypyc into the build `pvio.compiled` loads.

    python tools/compile.py            # build into src/pvio/_compiled (PVIO_COMPILED_DIR)
    python tools/compile.py --check    # exit 1 unless the build is there and fresh

The modules are `pvio.compiled.MODULES`; their sources are left untouched (mypyc's C and
objects go to a temporary folder, the extensions and a manifest of the sources' hashes to
the build folder, which replaces the old one whole).  Needs mypy (which ships mypyc),
a C compiler and Python's headers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))

from pvio import compiled  # noqa: E402


def build(out: Path) -> None:
    from mypyc.build import mypycify
    from setuptools import setup

    suffix = str(sysconfig.get_config_var("EXT_SUFFIX"))
    with tempfile.TemporaryDirectory(prefix="pvio-mypyc-") as tmp:
        work, lib = Path(tmp) / "work", Path(tmp) / "lib"
        cwd = os.getcwd()
        os.chdir(SRC)  # mypyc names modules by their paths: pvio/blk/frontend.py
        try:
            paths = [str(compiled.source_path(m).relative_to(SRC)) for m in compiled.MODULES]
            extensions = mypycify(paths, opt_level="3", target_dir=str(work / "c"))
            setup(name="pvio-compiled", ext_modules=extensions, script_args=[
                "-q", "build_ext", "--build-lib", str(lib), "--build-temp", str(work / "o")])
        finally:
            os.chdir(cwd)
        manifest = {
            "soabi": compiled.soabi(),
            "sources": {m: compiled.source_hash(compiled.source_path(m)) for m in compiled.MODULES},
            "extensions": {m: m.replace(".", "/") + suffix for m in compiled.MODULES},
            # mypyc's shared library: the modules' code, which each extension imports
            "support": {p.name[: -len(suffix)]: p.name for p in lib.glob("*" + suffix)},
        }
        for rel in [*manifest["extensions"].values(), *manifest["support"].values()]:
            if not (lib / rel).exists():
                raise SystemExit(f"mypyc built no {rel}")
        (lib / compiled.MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        staged = out.with_name(out.name + ".new")
        shutil.rmtree(staged, ignore_errors=True)
        shutil.copytree(lib, staged)
        shutil.rmtree(out, ignore_errors=True)
        staged.rename(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only say whether the build is fresh")
    args = parser.parse_args()
    out = compiled.build_dir()
    if not args.check:
        build(out)
    files, reason = compiled.check(out)
    print(f"{out}: {reason}" + (f" ({len(compiled.MODULES)} modules)" if files else ""))
    return 0 if files else 1


if __name__ == "__main__":
    sys.exit(main())
