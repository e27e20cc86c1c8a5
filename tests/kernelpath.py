"""The kernel's path to an NBD export: nbdfuse → loop device → ext4 → e2fsck.

Shared by the NBD export's tests and `pvio up`'s end-to-end tests.  Every loop device,
mount and nbdfuse process is removed even when the check fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path


def sh(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def kernel_path_missing() -> str | None:
    """Why the kernel path cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root"
    if not os.path.exists("/dev/fuse") or not os.path.exists("/dev/loop-control"):
        return "needs /dev/fuse and loop devices"
    missing = [t for t in ("nbdfuse", "losetup", "mkfs.ext4", "e2fsck", "fusermount3") if not shutil.which(t)]
    return f"not installed: {missing}" if missing else None


def ext4_round_trip(uri: str, work: Path, files: int = 8, file_size: int = 3 << 20) -> None:
    """mkfs.ext4 on the export through nbdfuse and a loop device, write files, umount,
    `e2fsck -fn` must be clean, mount again read-only and read the files back."""
    fuse_dir = work / "fuse"
    mnt = work / "mnt"
    fuse_dir.mkdir()
    mnt.mkdir()
    fuse = subprocess.Popen(["nbdfuse", str(fuse_dir), uri], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    loop_dev = ""
    mounted = False
    try:
        node = fuse_dir / "nbd"
        deadline = time.monotonic() + 20
        while not node.exists():
            assert fuse.poll() is None, fuse.stdout.read() if fuse.stdout else ""
            assert time.monotonic() < deadline, "nbdfuse did not come up"
            time.sleep(0.05)
        loop_dev = sh("losetup", "--find", "--show", str(node)).stdout.strip()
        sh("mkfs.ext4", "-q", "-F", loop_dev)
        sh("mount", loop_dev, str(mnt))
        mounted = True
        payload = os.urandom(file_size)
        for i in range(files):
            (mnt / f"file{i}").write_bytes(payload[i:] + payload[:i])
        (mnt / "dir").mkdir()
        (mnt / "dir" / "hello").write_text("hello from pvio\n")
        os.sync()
        sh("umount", str(mnt))
        mounted = False
        sh("e2fsck", "-fn", loop_dev)
        sh("mount", "-o", "ro", loop_dev, str(mnt))
        mounted = True
        assert (mnt / "dir" / "hello").read_text() == "hello from pvio\n"
        for i in range(files):
            assert (mnt / f"file{i}").read_bytes() == payload[i:] + payload[:i]
    finally:
        if mounted:
            sh("umount", str(mnt), check=False)
        if loop_dev:
            sh("losetup", "-d", loop_dev, check=False)
        sh("fusermount3", "-u", str(fuse_dir), check=False)
        try:
            fuse.wait(10)
        except subprocess.TimeoutExpired:
            fuse.kill()
            fuse.wait(5)
        if fuse.stdout is not None:
            fuse.stdout.close()
