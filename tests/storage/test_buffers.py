"""BufferPool: size classes, reuse, and the bounds on what it keeps; RawFile's lent reads."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from pvio.storage.backend import StorageError
from pvio.storage.buffers import MAX_SIZE, MIN_SIZE, BufferPool, size_class
from pvio.storage.lent import Lending, Lent
from pvio.storage.rawfile import RawFile


def test_size_classes_are_multiples_of_the_minimum() -> None:
    assert size_class(0) == size_class(1) == size_class(MIN_SIZE) == MIN_SIZE
    assert size_class(MIN_SIZE + 1) == 2 * MIN_SIZE
    assert size_class(1 << 20) == 1 << 20
    assert size_class((1 << 20) + 1) == (1 << 20) + MIN_SIZE
    assert all(n <= size_class(n) < n + MIN_SIZE for n in range(MIN_SIZE, 3 << 20, 4099))


def test_a_buffer_given_back_is_taken_again() -> None:
    pool = BufferPool()
    a = pool.take(1 << 20)
    assert len(a) == 1 << 20 and pool.allocated == 1
    pool.give(a)
    assert pool.kept == 1 << 20
    b = pool.take((1 << 20) - 5)  # the same class
    assert b is a and pool.reused == 1 and pool.kept == 0
    assert pool.take(4096) is not a  # another class: a new buffer


def test_the_pool_keeps_no_more_than_its_bounds() -> None:
    pool = BufferPool(max_bytes=3 * MIN_SIZE)
    bufs = [pool.take(MIN_SIZE) for _ in range(5)]
    for b in bufs:
        pool.give(b)
    assert pool.kept == 3 * MIN_SIZE  # two let go
    big = pool.take(MAX_SIZE + 1)
    pool.give(big)  # larger than anything kept
    pool.give(bytearray(MIN_SIZE + 1))  # not one of the pool's sizes
    assert pool.kept == 3 * MIN_SIZE


@pytest.fixture
def raw(tmp_path: Path) -> RawFile:
    p = tmp_path / "disk.img"
    p.write_bytes(os.urandom(4 << 20))
    return RawFile(p)


def test_rawfile_lends_reads_and_takes_its_buffers_back(raw: RawFile, tmp_path: Path) -> None:
    data = (tmp_path / "disk.img").read_bytes()

    async def main() -> None:
        assert isinstance(raw, Lending)
        a = await raw.read_lent(4096, 1 << 20)
        assert b"".join(a.views) == data[4096 : 4096 + (1 << 20)]
        a.release()
        got: list[Lent] = []
        assert raw.submit_read_lent(8192, (1 << 20) - 100, lambda exc, d: got.append(d))  # type: ignore[arg-type]
        assert b"".join(got[0].views) == data[8192 : 8192 + (1 << 20) - 100]
        assert raw.buffers.reused == 1  # the first read's buffer
        got[0].release()
        with pytest.raises(StorageError):  # beyond the end: refused, nothing kept out of the pool
            await raw.read_lent((4 << 20) - 10, 4096)
        await raw.close()

    asyncio.run(main())


def test_rawfile_without_nowait_lends_through_the_pool_only(tmp_path: Path) -> None:
    p = tmp_path / "disk.img"
    p.write_bytes(os.urandom(1 << 20))

    async def main() -> None:
        raw = RawFile(p, nowait=False)
        assert not raw.submit_read_lent(0, 1 << 16, lambda exc, d: None)  # would have to wait
        assert raw.buffers.kept == 1 << 16  # the buffer it took is back
        lent = await raw.read_lent(0, 1 << 16)
        assert b"".join(lent.views) == p.read_bytes()[: 1 << 16] and raw.pool_jobs == 1
        lent.release()
        await raw.close()

    asyncio.run(main())
