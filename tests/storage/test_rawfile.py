"""The one raw file: vectored I/O into memoryviews, the NOWAIT fast path and the batched pool,
bounds, read-only, trim and zeroes, a file that shrinks, and the backend conformance suite."""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

from pvio.storage.backend import BlockBackend, MemoryBackend, StorageError, VectoredBackend
from pvio.storage.rawfile import RawFile, _advance, create_sparse_image
from pvio.testing.backend_conformance import check_backend


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    create_sparse_image(p, 1 << 20)
    return p


def test_backends_satisfy_the_protocol(image: Path) -> None:
    raw = RawFile(image)
    assert isinstance(raw, BlockBackend) and isinstance(raw, VectoredBackend)
    raw.close_now()
    assert isinstance(MemoryBackend(4096), VectoredBackend)


def test_sparse_image_is_sparse_and_never_truncated(image: Path) -> None:
    assert image.stat().st_size == 1 << 20
    assert image.stat().st_blocks == 0
    with pytest.raises(FileExistsError):
        create_sparse_image(image, 10)


@pytest.mark.parametrize("nowait", [True, False])
def test_writev_then_readv_into_separate_pages(image: Path, nowait: bool) -> None:
    async def main() -> None:
        s = RawFile(image, nowait=nowait)
        pages = [memoryview(bytearray(os.urandom(4096))) for _ in range(3)]
        await s.writev(8192, [pages[0][512:], pages[1], pages[2][:1024]])
        await s.flush()
        out = [memoryview(bytearray(4096)) for _ in range(2)]
        await s.readv(8192, [out[0][:3584], out[1][:4096]])
        want = bytes(pages[0][512:]) + bytes(pages[1])
        assert bytes(out[0][:3584]) + bytes(out[1]) == want[: 3584 + 4096]
        raw = image.read_bytes()
        assert raw[8192 : 8192 + 3584 + 4096 + 1024] == want + bytes(pages[2][:1024])
        # The fast path is taken exactly when it is allowed (the page cache holds the image).
        assert (s.nowait > 0) == nowait
        await s.close()

    run(main())


def test_a_batch_of_pool_jobs_completes_together(image: Path) -> None:
    async def main() -> None:
        s = RawFile(image, nowait=False, workers=2)
        data = [os.urandom(4096) for _ in range(16)]
        await asyncio.gather(*(s.write(i * 4096, d) for i, d in enumerate(data)))
        # Sixteen writes made in one turn of the loop: split over the two workers, not 16 hops.
        assert s.pool_jobs == 2
        got = await asyncio.gather(*(s.read(i * 4096, 4096) for i in range(16)))
        assert [bytes(g) for g in got] == data
        await s.close()

    run(main())


def test_bounds_and_read_only(image: Path) -> None:
    async def main() -> None:
        s = RawFile(image, read_only=True)
        with pytest.raises(StorageError):
            await s.readv((1 << 20) - 512, [memoryview(bytearray(1024))])
        with pytest.raises(StorageError) as e:
            await s.writev(0, [memoryview(b"x" * 512)])
        assert e.value.errno == errno.EROFS
        assert s.info.read_only and not s.info.can_trim
        await s.close()

    run(main())
    assert image.read_bytes() == bytes(1 << 20)


def test_missing_image_and_a_directory_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="cannot open disk image"):
        RawFile(tmp_path / "nope.img")
    with pytest.raises(StorageError, match="not a file or block device"):
        RawFile(tmp_path, read_only=True)


def test_trim_zeroes_fua_and_a_file_that_shrinks(image: Path) -> None:
    async def main() -> None:
        raw = RawFile(image)
        data = os.urandom(1 << 19)
        await raw.write(12345, data)
        await raw.write(0, b"fua", fua=True)
        assert await raw.read(12345, 1 << 19) == data
        await raw.write_zeroes(12345, 100)
        await raw.write_zeroes(20000, 100, may_trim=False)
        await raw.trim(1 << 19, 4096 * 4)
        assert await raw.read(12345, 100) == bytes(100)
        assert await raw.read(20000, 100) == bytes(100)
        assert await raw.read(1 << 19, 4096) == bytes(4096)
        assert await raw.read(0, 3) == b"fua"
        # The file shrinking under the disk: what is past its new end reads as zeroes.
        os.truncate(image, 12445 + 10)
        page = bytearray(b"\xff" * 4096)
        await raw.readv(12445, [memoryview(page)])
        assert page[:10] == data[100:110] and page[10:] == bytes(4086)
        os.truncate(image, 1 << 20)
        await raw.close()

    run(main())


def test_trim_punches_a_hole(image: Path) -> None:
    async def main() -> None:
        s = RawFile(image)
        await s.write(0, b"\xff" * 65536)
        await s.flush()
        await s.trim(4096, 8192)
        await s.close()

    run(main())
    data = image.read_bytes()
    assert data[:4096] == b"\xff" * 4096 and data[4096:12288] == bytes(8192)
    assert data[12288:65536] == b"\xff" * (65536 - 12288)


def test_refresh_size_after_the_image_grew(image: Path) -> None:
    s = RawFile(image)
    os.truncate(image, 2 << 20)
    assert s.info.size == 1 << 20
    assert s.refresh_size() == 2 << 20 and s.info.size == 2 << 20
    s.close_now()


def test_conformance(image: Path) -> None:
    async def main() -> None:
        raw = RawFile(image)
        await check_backend(raw)
        await raw.close()

    run(main())


def test_advance() -> None:
    bufs = [memoryview(b"abc"), memoryview(b"defg"), memoryview(b"h")]
    assert [bytes(b) for b in _advance(bufs, 0)] == [b"abc", b"defg", b"h"]
    assert [bytes(b) for b in _advance(bufs, 3)] == [b"defg", b"h"]
    assert [bytes(b) for b in _advance(bufs, 5)] == [b"fg", b"h"]
    assert _advance(bufs, 8) == []


def test_transfer_now_moves_hot_data_at_once_and_says_when_it_cannot(image: Path, tmp_path: Path) -> None:
    async def main() -> None:
        s = RawFile(image)
        await s.writev(0, [memoryview(bytearray(16384))])  # blocks allocated (a hole may block)
        data = memoryview(bytearray(os.urandom(8192)))
        # Buffered NOWAIT writes are the file system's to offer (ext4 on Linux 6.18 does
        # not): where it refuses, the write waits for writev, and that is remembered.
        if not s.transfer_now(4096, [data[:4096], data[4096:]], True):
            assert not s._nowait_write
            await s.writev(4096, [data])
        nowait = s.nowait
        out = [memoryview(bytearray(4096)) for _ in range(2)]
        assert s.transfer_now(4096, out, False)  # the page cache has it
        assert b"".join(bytes(o) for o in out) == bytes(data) and s.nowait == nowait + 1
        with pytest.raises(StorageError):
            s.transfer_now((1 << 20) - 512, [memoryview(bytearray(4096))], False)  # past the end
        await s.close()
        # Without NOWAIT (or where the file system refuses it) nothing moves: the caller
        # takes readv/writev, which may block in the pool.
        slow = RawFile(image, nowait=False)
        assert not slow.transfer_now(0, [memoryview(bytearray(4096))], False)
        await slow.close()
        ro = RawFile(image, read_only=True)
        with pytest.raises(StorageError) as info:
            ro.transfer_now(0, [memoryview(bytearray(512))], True)
        assert info.value.errno == errno.EROFS
        await ro.close()

    run(main())
