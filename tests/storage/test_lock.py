"""Image locks as QEMU takes them: a writer has the image alone, between pvio's disks and
against QEMU's own tools (qemu-io)."""

from __future__ import annotations

import errno
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from pvio.storage.backend import StorageError
from pvio.storage.lock import conflict
from pvio.storage.rawfile import RawFile, create_sparse_image


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    create_sparse_image(p, 1 << 20)
    return p


def test_a_writer_has_the_image_alone(image: Path) -> None:
    writer = RawFile(image)
    for read_only in (False, True):
        with pytest.raises(StorageError) as e:
            RawFile(image, read_only=read_only)
        assert e.value.errno == errno.EBUSY and "in use" in str(e.value)
    writer.close_now()
    again = RawFile(image)  # released with the file description
    again.close_now()


def test_readers_share_and_keep_writers_out(image: Path) -> None:
    readers = [RawFile(image, read_only=True) for _ in range(3)]
    with pytest.raises(StorageError):
        RawFile(image)
    for r in readers:
        r.close_now()
    RawFile(image).close_now()


def test_without_lock_nothing_is_checked(image: Path) -> None:
    a = RawFile(image)
    b = RawFile(image, lock=False)  # as the tests' own readers of an image do
    a.close_now()
    b.close_now()


@pytest.mark.skipif(shutil.which("qemu-io") is None, reason="needs qemu-io")
def test_qemu_io_sees_a_pvio_writer_and_pvio_sees_qemu(image: Path) -> None:
    disk = RawFile(image)
    r = subprocess.run(["qemu-io", "-f", "raw", "-c", "write 0 512", str(image)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "lock" in (r.stdout + r.stderr), r.stdout + r.stderr
    disk.close_now()
    # QEMU holding the image: pvio's writer is refused until it lets go.
    qemu = subprocess.Popen(["qemu-io", "-f", "raw", "-c", "sleep 30000", str(image)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        probe = RawFile(image, read_only=True, lock=False)
        deadline = time.monotonic() + 20
        while conflict(probe.fd, write=True) is None:
            assert qemu.poll() is None and time.monotonic() < deadline, "qemu-io never took its locks"
            time.sleep(0.02)
        probe.close_now()
        with pytest.raises(StorageError) as e:
            RawFile(image)
        assert e.value.errno == errno.EBUSY
    finally:
        qemu.kill()
        qemu.wait()
    RawFile(image).close_now()
