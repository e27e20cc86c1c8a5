"""Compile and run small C programs against the Xen headers (gcc, /usr/include/xen).

Used by the layout probe and the C/Python differential tests.  A missing compiler or
header is a test failure with the install command in the message, never a skip: these
tests are what proves pvio's bytes are Xen's.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

XEN_INCLUDE = Path("/usr/include/xen")
INSTALL_HINT = "apt-get install gcc gcc-multilib libxen-dev"


def require_toolchain(m32: bool = False) -> None:
    if shutil.which("gcc") is None:
        raise AssertionError(f"gcc not found: {INSTALL_HINT}")
    if not (XEN_INCLUDE / "io" / "ring.h").exists():
        raise AssertionError(f"Xen headers not found in {XEN_INCLUDE}: {INSTALL_HINT}")


def build(source: str, out_dir: Path, name: str, *, m32: bool = False) -> Path:
    """Compile `source` to an executable in `out_dir` and return its path."""
    require_toolchain(m32)
    src = out_dir / f"{name}.c"
    exe = out_dir / name
    src.write_text(source)
    cmd = ["gcc", "-std=gnu11", "-O2", "-Wall", "-Werror", "-o", str(exe), str(src)]
    if m32:
        cmd.insert(1, "-m32")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"gcc failed ({' '.join(cmd)}):\n{proc.stderr}\n{INSTALL_HINT}")
    return exe


def run(exe: Path, *args: str, timeout: float = 60) -> str:
    proc = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{exe.name} exited {proc.returncode}: {proc.stderr}")
    return proc.stdout
