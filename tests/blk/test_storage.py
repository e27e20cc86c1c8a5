"""Raw image storage: vectored I/O into memoryviews, bounds, read-only, discard."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pvio.blk.storage import RawFileStorage, StorageError, _advance, create_sparse_image


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    create_sparse_image(p, 1 << 20)
    return p


def test_sparse_image_is_sparse_and_never_truncated(image: Path) -> None:
    assert image.stat().st_size == 1 << 20
    assert image.stat().st_blocks == 0
    with pytest.raises(FileExistsError):
        create_sparse_image(image, 10)


def test_writev_then_readv_into_separate_pages(image: Path) -> None:
    s = RawFileStorage(image)
    pages = [memoryview(bytearray(os.urandom(4096))) for _ in range(3)]
    s.writev(8192, [pages[0][512:], pages[1], pages[2][:1024]])
    s.flush()
    out = [memoryview(bytearray(4096)) for _ in range(2)]
    s.readv(8192, [out[0][:3584], out[1][:4096]])
    want = bytes(pages[0][512:]) + bytes(pages[1])
    assert bytes(out[0][:3584]) + bytes(out[1]) == want[: 3584 + 4096]
    raw = image.read_bytes()
    assert raw[8192 : 8192 + 3584 + 4096 + 1024] == want + bytes(pages[2][:1024])
    s.close()


def test_bounds_and_read_only(image: Path) -> None:
    s = RawFileStorage(image, read_only=True)
    with pytest.raises(StorageError):
        s.readv((1 << 20) - 512, [memoryview(bytearray(1024))])
    with pytest.raises(StorageError):
        s.writev(0, [memoryview(b"x" * 512)])
    s.close()
    assert image.read_bytes() == bytes(1 << 20)


def test_missing_image_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="cannot open disk image"):
        RawFileStorage(tmp_path / "nope.img")


def test_discard_punches_a_hole(image: Path) -> None:
    s = RawFileStorage(image)
    if not s.supports_discard:
        pytest.fail("fallocate(PUNCH_HOLE) should be available on Linux")
    s.writev(0, [memoryview(b"\xff" * 65536)])
    s.flush()
    s.discard(4096, 8192)
    data = image.read_bytes()
    assert data[:4096] == b"\xff" * 4096 and data[4096:12288] == bytes(8192)
    assert data[12288:65536] == b"\xff" * (65536 - 12288)
    s.close()


def test_advance() -> None:
    bufs = [memoryview(b"abc"), memoryview(b"defg"), memoryview(b"h")]
    assert [bytes(b) for b in _advance(bufs, 0)] == [b"abc", b"defg", b"h"]
    assert [bytes(b) for b in _advance(bufs, 3)] == [b"defg", b"h"]
    assert [bytes(b) for b in _advance(bufs, 5)] == [b"fg", b"h"]
    assert _advance(bufs, 8) == []
