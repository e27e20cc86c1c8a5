"""pvio's NBD export driven by the clients users have: QEMU, libnbd, fio and the kernel.

Every test serves a real raw file with `RawFile` from an `NbdServer` in a thread,
runs the external tool against it, and checks the file itself afterwards.  The kernel
test (nbdfuse → loop → ext4) needs root, /dev/fuse and loop devices; it cleans up every
mount, loop device and fuse process even when it fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernelpath import ext4_round_trip, kernel_path_missing
from nbd.helpers import ServerThread
from pvio.storage.backend import BlockBackend
from pvio.storage.rawfile import RawFile

SIZE = 64 << 20
RO_SIZE = 4 << 20
TOOL_TIMEOUT = 60


def need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (tools/install.sh installs them)")


def sh(*args: str, check: bool = True, timeout: float = TOOL_TIMEOUT) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def images(tmp_path: Path) -> tuple[Path, Path]:
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(SIZE)
    ro = tmp_path / "ro.img"
    ro.write_bytes(bytes(range(256)) * (RO_SIZE // 256))
    return disk, ro


@pytest.fixture
def server(tmp_path: Path, images: tuple[Path, Path]) -> Iterator[ServerThread]:
    disk, ro = images

    async def exports() -> dict[str, BlockBackend]:
        return {"disk": RawFile(disk), "ro": RawFile(ro, read_only=True)}

    with ServerThread(exports, str(tmp_path / "nbd.sock"), descriptions={"disk": "scratch"}) as thread:
        yield thread


# --- QEMU ----------------------------------------------------------------------------------


def test_qemu_img_info(server: ServerThread) -> None:
    need("qemu-img")
    info = json.loads(sh("qemu-img", "info", "--output=json", server.uri("disk")).stdout)
    assert info["virtual-size"] == SIZE and info["format"] == "raw"
    info = json.loads(sh("qemu-img", "info", "--output=json", server.uri("ro")).stdout)
    assert info["virtual-size"] == RO_SIZE


# Non-overlapping (offset, length, pattern): unaligned starts, ends and lengths.
PATTERNS = [
    (1, 511, 0x11),
    (4095, 2, 0x22),
    (65537, 70001, 0x33),
    (1 << 20, 1 << 20, 0x44),
    (SIZE - 7, 7, 0x55),
    (3 << 20 | 123, 3 * 65536 + 17, 0x66),
]


def test_qemu_io_patterns_at_unaligned_offsets(server: ServerThread, images: tuple[Path, Path]) -> None:
    need("qemu-io")
    cmds: list[str] = []
    for off, n, pat in PATTERNS:
        cmds += ["-c", f"write -P {pat:#x} {off} {n}"]
    cmds += ["-c", "flush"]
    for off, n, pat in PATTERNS:
        cmds += ["-c", f"read -P {pat:#x} {off} {n}"]
    out = sh("qemu-io", "-f", "raw", *cmds, server.uri("disk")).stdout
    assert "Pattern verification failed" not in out and out.count("read ") == len(PATTERNS)
    # The image itself, byte for byte.
    data = images[0].read_bytes()
    expect = bytearray(SIZE)
    for off, n, pat in PATTERNS:
        expect[off : off + n] = bytes([pat]) * n
    assert data == expect


def test_qemu_io_aio_and_zeroes(server: ServerThread, images: tuple[Path, Path]) -> None:
    need("qemu-io")
    sh(
        "qemu-io", "-f", "raw",
        "-c", "aio_write -P 0x77 0 1M",
        "-c", "aio_write -P 0x78 1M 1M",
        "-c", "aio_flush",
        "-c", "write -z 4096 8192",
        "-c", "discard 1M 65536",
        server.uri("disk"),
    )  # fmt: skip
    data = images[0].read_bytes()
    assert data[:4096] == b"\x77" * 4096 and data[4096:12288] == bytes(8192)
    assert data[12288 : 1 << 20] == b"\x77" * ((1 << 20) - 12288)
    assert data[(1 << 20) + 65536 : 2 << 20] == b"\x78" * ((1 << 20) - 65536)


def test_qemu_img_convert_both_ways(server: ServerThread, tmp_path: Path) -> None:
    need("qemu-img", "qemu-io")
    src = tmp_path / "src.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(src), str(SIZE))
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0xab 12345 1M", "-c", "write -P 0xcd 40M 3M", str(src))
    sh("qemu-img", "convert", "-n", "-f", "qcow2", "-O", "raw", str(src), server.uri("disk"))
    sh("qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(src), server.uri("disk"))
    back = tmp_path / "back.raw"
    sh("qemu-img", "convert", "-f", "raw", "-O", "raw", server.uri("disk"), str(back))
    sh("qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(src), str(back))


# --- libnbd --------------------------------------------------------------------------------------


def test_nbdinfo_and_list(server: ServerThread) -> None:
    need("nbdinfo")
    info = json.loads(sh("nbdinfo", "--json", server.uri("disk")).stdout)
    (export,) = info["exports"]
    assert export["export-size"] == SIZE and export["description"] == "scratch"
    assert export["is_read_only"] is False and export["can_flush"] and export["can_fua"]
    assert export["can_trim"] and export["can_zero"] and export["can_multi_conn"]
    assert export["block_size_minimum"] == 1 and export["block_size_preferred"] == 4096
    info = json.loads(sh("nbdinfo", "--json", server.uri("ro")).stdout)
    assert info["exports"][0]["is_read_only"] is True and info["exports"][0]["can_trim"] is False
    listed = json.loads(sh("nbdinfo", "--json", "--list", server.uri()).stdout)
    assert [e["export-name"] for e in listed["exports"]] == ["disk", "ro"]
    # The default export (empty name) is the first one.
    assert json.loads(sh("nbdinfo", "--json", server.uri()).stdout)["exports"][0]["export-size"] == SIZE


def test_nbdcopy_in_and_out(server: ServerThread, tmp_path: Path, images: tuple[Path, Path]) -> None:
    need("nbdcopy")
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(SIZE // 4) + bytes(SIZE // 2) + os.urandom(SIZE // 4))
    sh("nbdcopy", "--flush", str(src), server.uri("disk"))
    assert images[0].read_bytes() == src.read_bytes()
    out = tmp_path / "out.img"
    sh("nbdcopy", "--connections=4", "--requests=16", server.uri("disk"), str(out))
    assert out.read_bytes() == src.read_bytes()


# --- fio -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("bs", "size"), [("4k", "8m"), ("64k", "32m")])
def test_fio_random_writes_verify_crc32c(server: ServerThread, bs: str, size: str) -> None:
    need("fio")
    proc = sh(
        "fio", "--name=verify", "--ioengine=nbd", f"--uri={server.uri()}",
        "--rw=randwrite", f"--bs={bs}", f"--size={size}", "--iodepth=16",
        "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0",
        "--output-format=json",
        timeout=120,
    )  # fmt: skip
    job = json.loads(proc.stdout[proc.stdout.index("{") :])["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["total_ios"] > 0 and job["read"]["total_ios"] == job["write"]["total_ios"]


# --- read-only -------------------------------------------------------------------------------------


def test_read_only_export_refuses_real_clients(server: ServerThread, images: tuple[Path, Path]) -> None:
    need("qemu-io", "nbdcopy")
    before = images[1].read_bytes()
    proc = sh("qemu-io", "-f", "raw", "-c", "write -P 0x1 0 512", server.uri("ro"), check=False)
    assert proc.returncode != 0 or "failed" in proc.stdout + proc.stderr
    sh("qemu-io", "-r", "-f", "raw", "-c", "read -P 0x00 0 1", "-c", "read -P 0x01 1 1", server.uri("ro"))
    proc = sh("nbdcopy", str(images[0]), server.uri("ro"), check=False)
    assert proc.returncode != 0
    assert images[1].read_bytes() == before


# --- the kernel ----------------------------------------------------------------------------------


@pytest.mark.root
def test_kernel_ext4_through_nbdfuse_and_loop(server: ServerThread, tmp_path: Path) -> None:
    reason = kernel_path_missing()
    if reason:
        pytest.skip(reason)
    ext4_round_trip(server.uri("disk"), tmp_path)
