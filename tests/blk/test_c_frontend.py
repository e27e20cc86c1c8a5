"""A C frontend built from Xen's io/ring.h and io/blkif.h drives pvio's blkback.

tests/c/blkfront.c shares a pvio guest domain's memory and grant table, lays out the
ring and grants pages itself, and writes requests with the real macros and structs
(BLKIF_OP_INDIRECT with struct blkif_request_indirect included); this harness
does the domain and event-channel plumbing (XenStore is not needed to prove the ABI)
and checks the disk image afterwards.  Native and 32-bit (gcc -m32, protocol
x86_32-abi) builds; and two programs at once, each on its own ring of one disk (the
rings of a multi-queue device, each served by its own blkback engine).  The C ring
lives in ordinary guest memory, which only a map-transport backend can map live: a
copy-transport backend must refuse it.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from blk.pair import make_image
from cprobe import build
from pvio.abi.blkif import ABI_NATIVE, ABI_X86_32_BLKIF
from pvio.blk.backend import MAX_INDIRECT_SEGMENTS, BlkbackRing
from pvio.blk.keys import FrontendRing
from pvio.hypervisor.client import Domain
from pvio.hypervisor.inprocess import InProcessHypervisor
from pvio.storage.rawfile import RawFile

SOURCE = Path(__file__).resolve().parents[1] / "c" / "blkfront.c"


@pytest.fixture(scope="module")
def exes(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, Path]:
    out = tmp_path_factory.mktemp("c-blkfront")
    src = SOURCE.read_text()
    return {False: build(src, out, "blkfront"), True: build(src, out, "blkfront32", m32=True)}


async def _run(exe: Path, args: list[str], fds: list[int], env: dict[str, str] | None = None) -> str:
    proc = await asyncio.create_subprocess_exec(
        str(exe), *args, pass_fds=fds, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=os.environ | (env or {}),
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, err.decode()
    return out.decode().strip()


@pytest.mark.parametrize("transport", ["map", "copy"])
@pytest.mark.parametrize("m32", [False, True], ids=["native", "m32"])
def test_c_frontend_drives_blkback(exes: dict[bool, Path], tmp_path: Path, transport: str, m32: bool) -> None:
    img = make_image(tmp_path / "d.img", 1 << 20, fill=False)

    async def body() -> None:
        hv = InProcessHypervisor()
        bdom = await hv.create_domain("driver", 1024, transport=transport)
        fdom = await hv.create_domain("c-guest", 256)
        disk = RawFile(img)
        back = BlkbackRing(bdom, fdom.domid, disk, max_indirect_segments=MAX_INDIRECT_SEGMENTS)
        try:
            head = fdom.gnttab.alloc_grant_references(17)
            refs = [fdom.gnttab.claim_grant_reference(head) for _ in range(17)]
            frames = fdom.alloc_pages(17)
            port = await fdom.alloc_unbound(bdom.domid)
            common = [str(fdom.memory_fd), str(fdom.nr_pages), str(fdom.gnttab_fd), str(bdom.domid)]
            lists = [",".join(map(str, refs)), ",".join(map(str, frames))]
            fds = [fdom.memory_fd, fdom.gnttab_fd]
            out = await _run(exes[m32], ["init", *common, "-1", "-1", *lists], fds)
            abi = ABI_X86_32_BLKIF if m32 else ABI_NATIVE
            assert out == f"ring {refs[0]} {abi.ring_size(0)}"
            ring = FrontendRing((refs[0],), 0, port, abi)
            if transport == "copy":
                # A copy-transport backend maps only shareable pages live; the C program's
                # ring is in ordinary memory, so the backend must refuse it, not copy it.
                with pytest.raises(ValueError, match="shareable"):
                    await back.connect(ring)
                return
            await back.connect(ring)
            for _ in range(100):  # the PORT_BOUND push brings the backend's eventfd
                st = fdom.ports.ports[port]
                if st.tx_fd >= 0:
                    break
                await asyncio.sleep(0.01)
            fdom.channel.remove_reader(st.rx_fd)  # the C program waits on it
            evt = [str(st.tx_fd), str(st.rx_fd)]
            out = await _run(exes[m32], ["io", *common, *evt, *lists], [*fds, st.tx_fd, st.rx_fd])
            assert out == "ok"
            assert back.stats.wr_req == 6 and back.stats.rd_req == 5 and back.stats.err_req == 2
            assert back.stats.f_req == 1 and back.broken is None
        finally:
            await back.disconnect()
            await fdom.close()
            await bdom.close()
            await disk.close()

    asyncio.run(asyncio.wait_for(body(), 60))
    if transport == "copy":
        assert img.read_bytes() == bytes(1 << 20)
        return
    data = img.read_bytes()
    for i in range(1, 5):
        assert data[(i - 1) * 4096 : i * 4096] == bytes([0x10 + i]) * 4096
    for s in range(11):  # sectors 1..6 of each page, contiguous on the disk
        start = (100 + 6 * s) * 512
        assert data[start : start + 6 * 512] == bytes([0x40 + s]) * (6 * 512)
    assert data[(100 + 66) * 512 : (100 + 67) * 512] == bytes(512)
    for s in range(40):  # the indirect write: 40 whole pages, pages 1..15 in turn
        start = (512 + 8 * s) * 512
        assert data[start : start + 4096] == bytes([0x60 + 1 + s % 15]) * 4096


def test_c_frontends_drive_two_queues_of_one_disk(exes: dict[bool, Path], tmp_path: Path) -> None:
    """Multi-queue as blkback serves it: two rings, each with its own event channel and
    engine, one disk; a C frontend on each ring (BLKFRONT_BASE apart), concurrently."""
    img = make_image(tmp_path / "d.img", 1 << 20, fill=False)
    bases = (0, 1024)

    async def queue(fdom: Domain, bdom: Domain, disk: RawFile, base: int) -> BlkbackRing:
        back = BlkbackRing(bdom, fdom.domid, disk, max_indirect_segments=MAX_INDIRECT_SEGMENTS)
        head = fdom.gnttab.alloc_grant_references(17)
        refs = [fdom.gnttab.claim_grant_reference(head) for _ in range(17)]
        frames = fdom.alloc_pages(17)
        port = await fdom.alloc_unbound(bdom.domid)
        common = [str(fdom.memory_fd), str(fdom.nr_pages), str(fdom.gnttab_fd), str(bdom.domid)]
        lists = [",".join(map(str, refs)), ",".join(map(str, frames))]
        fds = [fdom.memory_fd, fdom.gnttab_fd]
        await _run(exes[False], ["init", *common, "-1", "-1", *lists], fds)
        await back.connect(FrontendRing((refs[0],), 0, port, ABI_NATIVE))
        for _ in range(100):
            st = fdom.ports.ports[port]
            if st.tx_fd >= 0:
                break
            await asyncio.sleep(0.01)
        fdom.channel.remove_reader(st.rx_fd)
        evt = [str(st.tx_fd), str(st.rx_fd)]
        out = await _run(exes[False], ["io", *common, *evt, *lists], [*fds, st.tx_fd, st.rx_fd],
                         env={"BLKFRONT_BASE": str(base)})
        assert out == "ok", (base, out)
        return back

    async def body() -> None:
        hv = InProcessHypervisor()
        bdom = await hv.create_domain("driver", 1024)
        fdom = await hv.create_domain("c-guest", 256)
        disk = RawFile(img)
        backs: list[BlkbackRing] = []
        try:
            backs = list(await asyncio.gather(*(queue(fdom, bdom, disk, b) for b in bases)))
            for back in backs:
                assert back.stats.wr_req == 6 and back.stats.rd_req == 5 and back.stats.err_req == 2
            assert backs[0].port != backs[1].port
        finally:
            for back in backs:
                await back.disconnect()
            await fdom.close()
            await bdom.close()
            await disk.close()

    asyncio.run(asyncio.wait_for(body(), 60))
    data = img.read_bytes()
    for base in bases:
        for i in range(1, 5):
            start = (base + 8 * (i - 1)) * 512
            assert data[start : start + 4096] == bytes([0x10 + i]) * 4096, base
        for s in range(40):
            start = (base + 512 + 8 * s) * 512
            assert data[start : start + 4096] == bytes([0x60 + 1 + s % 15]) * 4096, base
