"""Shared by the device-layer tests: build the layer and the C peers, run a hypervisor.

The layer (native/, `make`) and its ASan/UBSan build (`make asan`) are built once per
session; each C peer is built twice, plainly and under ASan/UBSan, and a run under the
sanitizers preloads libasan first (the sanitized program and the sanitized layer share
that one runtime).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

NATIVE = Path(__file__).resolve().parents[2] / "native"
HERE = Path(__file__).resolve().parent
VARIANTS = ("plain", "asan")
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]


def build_layer() -> None:
    proc = subprocess.run(["make", "-s", "-C", str(NATIVE), "all", "asan"], capture_output=True, text=True)
    if proc.returncode:
        raise AssertionError(f"make -C native failed:\n{proc.stdout}{proc.stderr}\n(apt-get install gcc libxen-dev)")


def library(variant: str) -> Path:
    return NATIVE / "build" / ("libpvio-xen-asan.so" if variant == "asan" else "libpvio-xen.so")


def build_peer(name: str, out: Path, variant: str, libs: list[str]) -> Path:
    exe = out / f"{name}-{variant}"
    cmd = ["gcc", "-std=gnu11", "-O1", "-g", "-Wall", "-Wextra", "-Werror", "-o", str(exe), str(HERE / f"{name}.c")]
    if variant == "asan":
        cmd += SANITIZE
    proc = subprocess.run([*cmd, *libs, "-lpthread"], capture_output=True, text=True)
    if proc.returncode:
        raise AssertionError(f"gcc failed: {' '.join(cmd)}\n{proc.stderr}")
    return exe


def preload(variant: str) -> str:
    lib = str(library(variant))
    if variant != "asan":
        return lib
    asan = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    return f"{os.path.realpath(asan)}:{lib}"


def domain_env(socket_path: Path, domid: int, variant: str, transport: str = "map") -> dict[str, str]:
    return os.environ | {
        "PVIO_HYPERVISOR_SOCKET": str(socket_path),
        "PVIO_DOMID": str(domid),
        "PVIO_TRANSPORT": transport,
        "LD_PRELOAD": preload(variant),
        "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0:exitcode=99",
        "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
    }


@contextlib.contextmanager
def hypervisor(tmp: Path) -> Iterator[Path]:
    """`pvio hypervisor` on a socket in `tmp`, stopped (SIGTERM, then waited) at the end."""
    path = tmp / "hv.sock"
    log = (tmp / "hypervisor.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "pvio", "hypervisor", "--socket", str(path)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
                s.connect(str(path))
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"pvio hypervisor did not start: {(tmp / 'hypervisor.log').read_text()}")
            time.sleep(0.05)
        yield path
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def check_output(proc: subprocess.CompletedProcess[str] | subprocess.Popen[str], out: str, err: str = "") -> list[str]:
    """The "ok NAME" lines of a peer that exited 0; else an AssertionError with its output."""
    if proc.returncode != 0 or "FAIL" in out:
        raise AssertionError(f"{proc.args} exited {proc.returncode}:\n{out}\n{err}")
    return [line.split()[1] for line in out.splitlines() if line.startswith("ok ")]
