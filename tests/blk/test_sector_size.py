"""Disks with 4 KiB logical sectors: `sector-size` 4096, 512-byte units on the ring.

As Xen's reconciled blkif.h (and Linux) has it: `sectors` and every sector number stay
in 512-byte units; blkback refuses what is not whole 4 KiB sectors; blkfront sends only
whole sectors, reading and modifying around anything smaller.
"""

from __future__ import annotations

import os
from pathlib import Path

from blk.pair import asynctest, blk_pair, make_image
from blk.test_hostile_frontend import raw_front, rw
from blk.test_xenbus import BE, FE, attach, world
from pvio.abi.blkif import (
    ABI_NATIVE,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
)
from pvio.blk.request import build_discard
from pvio.domains.xen_guest import detach_disk

MiB = 1 << 20


@asynctest
async def test_blkback_refuses_partial_logical_sectors(tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.img", MiB)
    before = img.read_bytes()
    async with raw_front(img, sector_size=4096) as f:
        g = f.grant()
        for raw in (
            rw(BLKIF_OP_WRITE, 1, 1, (g, 0, 7)),  # starts inside a 4 KiB sector
            rw(BLKIF_OP_WRITE, 2, 8, (g, 0, 3)),  # half a sector
            rw(BLKIF_OP_WRITE, 3, 8, (g, 4, 7)),  # the second half
            rw(BLKIF_OP_READ, 4, 8, (g, 1, 7)),
            build_discard(ABI_NATIVE, 5, 8, 4),
        ):
            assert await f.status(raw) == BLKIF_RSP_ERROR, raw[:1]
        assert await f.status(rw(BLKIF_OP_READ, 6, 8, (g, 0, 7))) == BLKIF_RSP_OKAY
    assert img.read_bytes() == before


@asynctest
async def test_blkfront_sends_whole_sectors_only(tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.img", 4 * MiB)
    expect = bytearray(img.read_bytes())
    async with blk_pair(img, sector_size=4096) as p:
        assert p.front.unit == 4096 and p.front.info.min_block == 4096
        for offset, n in ((100, 1000), (4096 - 512, 1024), (8192, 4096), (12345, 70000), (0, 512)):
            data = os.urandom(n)
            await p.front.write(offset, data)
            expect[offset : offset + n] = data
            assert await p.front.read(offset, n) == data
        assert p.back.stats.err_req == 0 and p.back.info.sector_size == 4096
    assert img.read_bytes() == bytes(expect)


@asynctest
async def test_sector_size_through_xenstore(tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.img", 4 * MiB + 1000)  # a tail that is not a whole sector
    async with world(tmp_path, img, spec_extra="sector-size=4096, ") as w:
        assert await w.read(f"{BE}/logical-block-size") == "4096"
        d = await attach(w)
        assert await w.read(f"{BE}/sector-size") == "4096"
        assert await w.read(f"{BE}/physical-sector-size") == "4096"
        assert await w.read(f"{BE}/sectors") == str(4 * MiB // 512)  # 512-byte units, whole 4 KiB sectors
        assert await w.read(f"{FE}/feature-large-sector-size") is None  # deprecated: not written
        assert d.front.unit == 4096 and d.front.info.size == 4 * MiB
        await d.front.write(100, b"x" * 10)
        assert await d.front.read(96, 16) == bytes(img.read_bytes()[96:100]) + b"x" * 10 + bytes(
            img.read_bytes()[110:112])
        await detach_disk(d)
