"""A conformance suite every `BlockBackend` must pass (reusable by any backend's tests).

`check_backend(backend)` exercises a writable backend through its whole contract, within
the block-size constraints it advertises: data written reads back (at the start, the end
and unaligned places when the minimum block allows), concurrent writes to distinct ranges
all land, FUA writes and FLUSH succeed, zero-length requests are harmless, WRITE_ZEROES
reads back as zeroes (with and without permission to trim), TRIM succeeds where offered,
and `readv`/`writev` (where offered) agree with `read`/`write`.  It raises AssertionError naming the
first broken promise.  It writes over the whole device: never point it at data you want.
"""

from __future__ import annotations

import asyncio
import os

from pvio.storage.backend import BackendInfo, BlockBackend, VectoredBackend


def _span(info: BackendInfo, want: int) -> int:
    """`want` rounded down to the backend's minimum block (at least one block)."""
    return max(info.min_block, want - want % info.min_block)


async def check_backend(backend: BlockBackend) -> None:
    info = backend.info
    assert isinstance(info, BackendInfo), "info is not a BackendInfo"
    assert not info.read_only, "the conformance suite writes: give it a writable backend"
    lo = info.min_block
    size = info.size - info.size % lo
    assert size >= 4 * 65536, "give the suite at least 256 KiB"

    async def roundtrip(offset: int, length: int, what: str) -> None:
        data = os.urandom(length)
        await backend.write(offset, data)
        got = await backend.read(offset, length)
        assert bytes(got) == data, f"{what}: {length} bytes at {offset} did not read back"

    # Start, end and (when the minimum block allows) unaligned places.
    await roundtrip(0, _span(info, 4096), "first block")
    await roundtrip(size - lo, lo, "last block")
    if lo == 1:
        await roundtrip(4095, 2, "across a 4 KiB boundary")
        await roundtrip(65537, 70001, "unaligned start and length")
    await roundtrip(65536, _span(info, min(info.max_block, 1 << 17)), "a large request")

    # Zero-length requests are legal NBD and must be harmless.
    assert bytes(await backend.read(lo, 0)) == b"", "zero-length read returned data"
    await backend.write(lo, b"")

    # Concurrent writes to distinct ranges all land.
    chunk = _span(info, 4096)
    blocks = [os.urandom(chunk) for _ in range(32)]
    await asyncio.gather(*(backend.write(i * chunk, b) for i, b in enumerate(blocks)))
    got = await asyncio.gather(*(backend.read(i * chunk, chunk) for i in range(32)))
    assert [bytes(g) for g in got] == blocks, "concurrent writes were lost or mixed up"

    if info.can_fua:
        await backend.write(0, blocks[1], fua=True)
        assert bytes(await backend.read(0, chunk)) == blocks[1], "FUA write did not land"
    if info.can_flush:
        await backend.flush()

    if info.can_write_zeroes:
        for may_trim in (True, False):
            await backend.write(0, blocks[2])
            await backend.write_zeroes(0, chunk, may_trim=may_trim)
            assert bytes(await backend.read(0, chunk)) == bytes(chunk), (
                f"write_zeroes(may_trim={may_trim}) did not read back as zeroes"
            )
    if info.can_trim:
        await backend.trim(chunk, chunk)
        await backend.write(chunk, blocks[3])
        assert bytes(await backend.read(chunk, chunk)) == blocks[3], "write after trim was lost"

    if isinstance(backend, VectoredBackend):
        buf = bytearray(chunk + 16)
        await backend.readv(chunk, [memoryview(buf)[8 : 8 + chunk]])
        assert buf[8 : 8 + chunk] == blocks[3] and buf[:8] == bytes(8) == buf[-8:], (
            "readv wrote outside its buffer or read the wrong bytes"
        )
        if (chunk // 2) % lo == 0:
            half = chunk // 2
            pieces = [memoryview(blocks[0][:half]), memoryview(blocks[0][half:])]
            await backend.writev(0, pieces)
            assert bytes(await backend.read(0, chunk)) == blocks[0], "writev of two pieces did not land"
            split = [memoryview(bytearray(half)), memoryview(bytearray(chunk - half))]
            await backend.readv(0, split)
            assert b"".join(bytes(p) for p in split) == blocks[0], "readv into two pieces read wrong bytes"
