"""blkfront and blkback, both ends in one process, over the in-process hypervisor."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from blk.pair import asynctest, blk_pair, make_image
from pvio.abi.blkif import ABI_NATIVE, ABI_X86_32_BLKIF, BLKIF_OP_WRITE_BARRIER
from pvio.testing.backend_conformance import check_backend

MiB = 1 << 20


@pytest.mark.parametrize("transport", ["map", "copy"])
@pytest.mark.parametrize("abi", [ABI_NATIVE, ABI_X86_32_BLKIF], ids=["native", "x86_32"])
@pytest.mark.parametrize("order", [0, 1])
@asynctest
async def test_roundtrip(tmp_path: Path, transport: str, abi: object, order: int) -> None:
    img = make_image(tmp_path / "d.img", 4 * MiB)
    async with blk_pair(img, transport=transport, abi=abi, ring_order=order) as p:  # type: ignore[arg-type]
        data = os.urandom(200 * 1024 + 512)
        await p.front.write(1234 * 512, data)
        assert await p.front.read(1234 * 512, len(data)) == data
        await p.front.flush()
        with open(img, "rb") as f:
            f.seek(1234 * 512)
            assert f.read(len(data)) == data
        # many requests in flight at once
        blocks = [os.urandom(4096) for _ in range(100)]
        await asyncio.gather(*(p.front.write(i * 8192, b) for i, b in enumerate(blocks)))
        got = await asyncio.gather(*(p.front.read(i * 8192, 4096) for i in range(100)))
        assert got == blocks
        st = p.back.stats
        assert st.wr_req >= 100 and st.rd_req >= 100 and st.f_req == 1
        assert st.requests / st.batches > 1.5, "requests were not batched"


@pytest.mark.parametrize("transport", ["map", "copy"])
@asynctest
async def test_conformance(tmp_path: Path, transport: str) -> None:
    img = make_image(tmp_path / "d.img", 2 * MiB, fill=False)
    async with blk_pair(img, transport=transport) as p:
        await check_backend(p.front)


@asynctest
async def test_unaligned(tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.img", 1 * MiB)
    ref = bytearray(img.read_bytes())
    async with blk_pair(img) as p:
        for off, n in [(1, 10), (511, 2), (4095, 70001), (65537, 3)]:
            d = os.urandom(n)
            await p.front.write(off, d)
            ref[off : off + n] = d
            assert await p.front.read(off, n) == d
        assert await p.front.read(0, len(ref)) == bytes(ref)
    assert img.read_bytes() == bytes(ref)


@asynctest
async def test_read_only_disk_refuses_writes(tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.img", 1 * MiB)
    before = img.read_bytes()
    async with blk_pair(img, read_only=True) as p:
        assert p.front.info.read_only
        with pytest.raises(OSError):
            await p.front.write(0, b"x" * 512)
        assert await p.front.read(0, 4096) == before[:4096]
    assert img.read_bytes() == before


@asynctest
async def test_notification_avoidance(tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.img", 4 * MiB)
    async with blk_pair(img) as p:
        async def worker(k: int) -> None:
            for i in range(40):
                await p.front.read(((k * 40 + i) * 4096) % (4 * MiB), 4096)
        await asyncio.gather(*(worker(k) for k in range(32)))
        st = p.back.stats
        n = st.requests
        assert n >= 1280
        ratio = (st.notify_sent + p.front.stats.notify_sent) / n
        print(f"notifications per request: {ratio:.3f}")
        assert ratio < 0.5


@asynctest
async def test_reconnect_reissues_in_flight(tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.img", 4 * MiB)
    async with blk_pair(img) as p:
        data = [os.urandom(4096) for _ in range(64)]
        writes = [asyncio.ensure_future(p.front.write(i * 4096, d)) for i, d in enumerate(data)]
        await asyncio.sleep(0)
        await p.reconnect_backend()
        assert p.front.stats.reissued > 0, "nothing was in flight at the reconnect"
        await asyncio.gather(*writes)
        got = await asyncio.gather(*(p.front.read(i * 4096, 4096) for i in range(64)))
        assert got == data


@asynctest
async def test_trim_of_the_whole_disk(tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.img", 64 * MiB)
    async with blk_pair(img) as p:
        assert p.front.info.can_trim
        await p.front.trim(0, 64 * MiB)  # one request, no data pages, no grants
        await p.front.trim(4096, 8192)
        assert await p.front.read(0, 8192) == bytes(8192)
        await p.front.write(0, b"x" * 4096)
        assert p.back.stats.ds_req == 2
    assert img.read_bytes()[:4096] == b"x" * 4096


@asynctest
async def test_copy_backend_out_of_bounce_pages_answers_in_error(tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.img", 4 * MiB)
    async with blk_pair(img, transport="copy") as p:
        hoard = p.back_dom.alloc_pages(p.back_dom.pages.free_count)  # nothing left to bounce into
        with pytest.raises(OSError):
            await p.front.read(0, 4096)
        p.back_dom.free_pages(hoard)
        assert len(await p.front.read(0, 4096)) == 4096  # and the ring goes on


@asynctest
async def test_copy_backend_out_of_bounce_pages_answers_a_barrier_in_error(tmp_path: Path) -> None:
    """A WRITE_BARRIER with data finds no bounce page: that request fails, not the ring."""
    img = make_image(tmp_path / "d.img", 4 * MiB)
    async with blk_pair(img, transport="copy") as p:
        hoard = p.back_dom.alloc_pages(p.back_dom.pages.free_count)
        with pytest.raises(OSError):
            await p.front._issue(BLKIF_OP_WRITE_BARRIER, 0, b"b" * 4096, 4096)
        p.back_dom.free_pages(hoard)
        assert p.back.broken is None
        assert len(await p.front.read(0, 4096)) == 4096  # and the ring goes on


@pytest.mark.parametrize("transport", ["map", "copy"])
@asynctest
async def test_persistent_grants(tmp_path: Path, transport: str) -> None:
    img = make_image(tmp_path / "d.img", 4 * MiB)
    async with blk_pair(img, transport=transport, persistent=True) as p:
        assert p.back.persistent == (transport == "map")
        await check_backend(p.front)
        before = p.back.stats.grant_ops
        blocks = [os.urandom(4096) for _ in range(64)]
        for _ in range(3):
            await asyncio.gather(*(p.front.write(i * 4096, b) for i, b in enumerate(blocks)))
            got = await asyncio.gather(*(p.front.read(i * 4096, 4096) for i in range(64)))
            assert got == blocks
        if transport == "map":
            # the pool's pages are mapped once and kept: no hypercall per batch any more
            assert p.back.stats.grant_ops - before <= 4
        # recovery keeps the pool: the new backend maps the same grants again
        writes = [asyncio.ensure_future(p.front.write(i * 4096, b)) for i, b in enumerate(reversed(blocks))]
        await asyncio.sleep(0)
        await p.reconnect_backend()
        await asyncio.gather(*writes)
        got = await asyncio.gather(*(p.front.read(i * 4096, 4096) for i in range(64)))
        assert got == blocks[::-1]
