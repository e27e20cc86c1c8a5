"""blkfront uses indirect descriptors when blkback offers them, in every transport and ABI."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from blk.pair import asynctest, blk_pair, make_image
from pvio.abi.blkif import ABI_NATIVE, ABI_X86_32_BLKIF, BlkifABI

MiB = 1 << 20


@pytest.mark.parametrize("abi", [ABI_NATIVE, ABI_X86_32_BLKIF], ids=lambda a: a.name)
@pytest.mark.parametrize("transport", ["map", "copy", "map-persistent"])
@asynctest
async def test_large_transfers_go_indirect(tmp_path: Path, transport: str, abi: BlkifABI) -> None:
    img = make_image(tmp_path / "d.img", 4 * MiB, fill=False)
    data = os.urandom(MiB)
    mode, _, pers = transport.partition("-")
    async with blk_pair(img, transport=mode, abi=abi, persistent=bool(pers)) as p:
        assert p.front.max_indirect_segments == 32  # Linux blkfront's default, under blkback's 256
        assert p.front.max_request_bytes == 128 * 1024
        await p.front.write(512 * 1024 + 512, data)  # sector-aligned, not page-aligned
        assert await p.front.read(512 * 1024 + 512, MiB) == data
        assert p.back.stats.wr_req == 8 and p.back.stats.rd_req == 8  # 1 MiB in 128 KiB requests
        assert p.back.stats.err_req == 0 and p.back.broken is None
    assert img.read_bytes()[512 * 1024 + 512 : 512 * 1024 + 512 + MiB] == data


@asynctest
async def test_more_segments_when_asked_and_none_when_not_offered(tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.img", 4 * MiB, fill=False)
    data = os.urandom(MiB)
    async with blk_pair(img, want_indirect=1024, indirect=256) as p:
        assert p.front.max_indirect_segments == 256
        await p.front.write(0, data)
        assert p.back.stats.wr_req == 1
        assert await p.front.read(0, MiB) == data
    async with blk_pair(img, indirect=0) as p:
        assert p.front.max_indirect_segments == 0
        assert p.front.max_request_bytes == 11 * 4096
        assert await p.front.read(0, MiB) == data
        assert p.back.stats.rd_req == -(-MiB // (11 * 4096))
