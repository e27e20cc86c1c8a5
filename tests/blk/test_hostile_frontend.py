"""A hostile frontend against pvio's blkback: every validation answers in-band.

The frontend here is hand-made: it lays out its own ring and writes raw request bytes
(`build_request` with any values at all), so every check of blkback is reached exactly
as a C frontend would reach it.  Each bad request must get its error status, nothing may
be written to the disk, and the ring must keep serving the good request that follows.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blk.pair import asynctest, make_image
from pvio.abi.blkif import (
    ABI_NATIVE,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_INDIRECT,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_OP_WRITE_BARRIER,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
)
from pvio.blk.backend import BlkbackRing
from pvio.blk.keys import parse_frontend_ring
from pvio.blk.request import Segment, build_request, parse_response
from pvio.hypervisor.client import Domain
from pvio.hypervisor.domain import PAGE_SIZE
from pvio.hypervisor.inprocess import InProcessHypervisor
from pvio.ring import FrontRing, SharedRing
from pvio.storage.rawfile import RawFile

MiB = 1 << 20
SIZE = 1 * MiB


@dataclass
class RawFront:
    """A frontend that writes whatever bytes it likes into its ring."""

    dom: Domain
    other: Domain  # a third domain, for grants made out to someone else
    back: BlkbackRing
    front: FrontRing
    port: int
    backend_domid: int
    page: int  # a data page of ours

    def grant(self, readonly: bool = False, to: int | None = None) -> int:
        return self.dom.gnttab.grant_foreign_access(to if to is not None else self.backend_domid, self.page, readonly)

    async def send(self, *requests: bytes) -> list[tuple[int, int, int]]:
        self.front.put_requests(list(requests))
        if self.front.push_requests_and_check_notify():
            self.dom.notify(self.port)
        got: list[tuple[int, int, int]] = []
        while len(got) < len(requests):
            got += [parse_response(ABI_NATIVE, r) for r in self.front.take_responses()]
            if len(got) < len(requests) and not self.front.final_check_for_responses():
                await asyncio.wait_for(self.dom.wait_event(self.port), 5)
        return got

    async def status(self, request: bytes) -> int:
        ((_, _, status),) = await self.send(request)
        return status


@asynccontextmanager
async def raw_front(
    image: Path, *, read_only: bool = False, transport: str = "map", persistent: bool = False,
    indirect: int = 0, sector_size: int = 512,
) -> AsyncIterator[RawFront]:
    hv = InProcessHypervisor()
    bdom = await hv.create_domain("driver", 1024, transport=transport)
    fdom = await hv.create_domain("guest", 256)
    other = await hv.create_domain("other", 64)
    disk = RawFile(image, read_only=read_only)
    frames = await fdom.alloc_shareable_pages(1)
    front = FrontRing.init(SharedRing.for_blkif([fdom.frame(frames[0])], ABI_NATIVE))
    refs = await fdom.grant_access(bdom.domid, frames)
    port = await fdom.alloc_unbound(bdom.domid)
    back = BlkbackRing(
        bdom, fdom.domid, disk, persistent=persistent, max_indirect_segments=indirect, sector_size=sector_size
    )
    await back.connect(parse_frontend_ring({"ring-ref": str(refs[0]), "event-channel": str(port)}))
    (page,) = fdom.alloc_pages(1)
    try:
        yield RawFront(fdom, other, back, front, port, bdom.domid, page)
    finally:
        await back.disconnect()
        for d in (fdom, other, bdom):
            await d.close()
        await disk.close()


def rw(op: int, req_id: int, sector: int, *segs: tuple[int, int, int], nr: int | None = None) -> bytes:
    raw = build_request(ABI_NATIVE, op, req_id, sector, [Segment(*s) for s in segs])
    if nr is not None:  # lie about nr_segments
        raw = bytes([raw[0], nr]) + raw[2:]
    return raw


@pytest.mark.parametrize("transport", ["map", "copy", "map-persistent"])
@asynctest
async def test_every_validation_answers_in_band(tmp_path: Path, transport: str) -> None:
    img = make_image(tmp_path / "d.img", SIZE)
    before = img.read_bytes()
    persistent = transport.endswith("persistent")
    async with raw_front(img, transport=transport.split("-")[0], persistent=persistent) as f:
        f.dom.memory[f.page * PAGE_SIZE : (f.page + 1) * PAGE_SIZE] = b"\xaa" * PAGE_SIZE
        ok = f.grant(readonly=True)
        ro = f.grant(readonly=True)
        foreign = f.grant(to=f.other.domid)
        unused = 7777
        last = SIZE // 512
        cases = {
            "unknown operation": (rw(99, 1, 0, (ok, 0, 7)), BLKIF_RSP_EOPNOTSUPP),
            "indirect (not offered)": (rw(BLKIF_OP_INDIRECT, 2, 0, (ok, 0, 7)), BLKIF_RSP_EOPNOTSUPP),
            "write, 0 segments": (rw(BLKIF_OP_WRITE, 3, 0), BLKIF_RSP_ERROR),
            "read, 0 segments": (rw(BLKIF_OP_READ, 4, 0), BLKIF_RSP_ERROR),
            "12 segments": (rw(BLKIF_OP_WRITE, 5, 0, *[(ok, 0, 0)] * 11, nr=12), BLKIF_RSP_ERROR),
            "first_sect > last_sect": (rw(BLKIF_OP_WRITE, 6, 0, (ok, 5, 4)), BLKIF_RSP_ERROR),
            "last_sect past the page": (rw(BLKIF_OP_WRITE, 7, 0, (ok, 0, 8)), BLKIF_RSP_ERROR),
            "past the end of the disk": (rw(BLKIF_OP_WRITE, 8, last - 7, (ok, 0, 7), (ok, 0, 0)), BLKIF_RSP_ERROR),
            "sector number far beyond": (rw(BLKIF_OP_WRITE, 9, 2**63, (ok, 0, 7)), BLKIF_RSP_ERROR),
            "missing grant": (rw(BLKIF_OP_WRITE, 10, 0, (ok, 0, 7), (unused, 0, 7)), BLKIF_RSP_ERROR),
            "grant for another domain": (rw(BLKIF_OP_WRITE, 11, 0, (foreign, 0, 7)), BLKIF_RSP_ERROR),
            "read-only grant for a read": (rw(BLKIF_OP_READ, 12, 0, (ro, 0, 7)), BLKIF_RSP_ERROR),
            "barrier with a missing grant": (rw(BLKIF_OP_WRITE_BARRIER, 13, 0, (unused, 0, 7)), BLKIF_RSP_ERROR),
        }
        for name, (raw, want) in cases.items():
            got = await f.send(raw)
            assert got[0][2] == want, name
            # the ring keeps going: a good read right after
            w = f.grant()
            assert await f.status(rw(BLKIF_OP_READ, 100, 8, (w, 0, 7))) == BLKIF_RSP_OKAY, name
            f.dom.gnttab.end_foreign_access(w)
        # all the bad ones in one batch too
        got = await f.send(*(raw for raw, _ in cases.values()))
        assert sorted(s for _, _, s in got) == sorted(want for _, want in cases.values())
        assert f.back.stats.err_req == 2 * len(cases)
        assert f.back.broken is None
        assert img.read_bytes() == before, "a refused request wrote to the disk"
        # a WRITE from a read-only grant is fine (the data only leaves the guest)
        f.dom.memory[f.page * PAGE_SIZE : (f.page + 1) * PAGE_SIZE] = b"\xaa" * PAGE_SIZE
        assert await f.status(rw(BLKIF_OP_WRITE, 200, 16, (ro, 0, 7))) == BLKIF_RSP_OKAY
        assert await f.status(rw(BLKIF_OP_FLUSH_DISKCACHE, 201, 0)) == BLKIF_RSP_OKAY
        assert await f.status(rw(BLKIF_OP_WRITE_BARRIER, 202, 0)) == BLKIF_RSP_OKAY
    after = img.read_bytes()
    assert after[16 * 512 : 24 * 512] == b"\xaa" * 4096
    assert after[: 16 * 512] == before[: 16 * 512] and after[24 * 512 :] == before[24 * 512 :]


@asynctest
async def test_read_only_disk_refuses_writes_in_band(tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.img", SIZE)
    before = img.read_bytes()
    async with raw_front(img, read_only=True) as f:
        g = f.grant(readonly=True)
        assert await f.status(rw(BLKIF_OP_WRITE, 1, 0, (g, 0, 7))) == BLKIF_RSP_ERROR
        assert await f.status(rw(BLKIF_OP_WRITE_BARRIER, 2, 0, (g, 0, 7))) == BLKIF_RSP_ERROR
        w = f.grant()
        assert await f.status(rw(BLKIF_OP_READ, 3, 0, (w, 0, 7))) == BLKIF_RSP_OKAY
        assert bytes(f.dom.memory[f.page * PAGE_SIZE : f.page * PAGE_SIZE + 4096]) == before[:4096]
    assert img.read_bytes() == before


@asynctest
async def test_impossible_index_breaks_that_ring_only(tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.img", SIZE)
    img2 = make_image(tmp_path / "e.img", SIZE)
    async with raw_front(img) as f, raw_front(img2) as g:
        broken: list[BaseException] = []
        f.back.on_broken = broken.append
        # req_prod far beyond anything the ring can hold
        f.front.sring.indices.push_req_prod(1000)
        f.dom.notify(f.port)
        for _ in range(100):
            if broken:
                break
            await asyncio.sleep(0.01)
        assert broken and f.back.broken is not None
        assert not f.back.connected
        w = g.grant()
        assert await g.status(rw(BLKIF_OP_READ, 1, 0, (w, 0, 7))) == BLKIF_RSP_OKAY


@asynctest
async def test_garbage_requests_never_crash(tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.img", SIZE)
    before = img.read_bytes()
    async with raw_front(img, read_only=True) as f:
        for _ in range(20):
            batch = [os.urandom(ABI_NATIVE.request.size) for _ in range(8)]
            got = await f.send(*batch)
            assert len(got) == 8
        assert f.back.broken is None
    assert img.read_bytes() == before


# A hostile frontend as a property: any batch of any request bytes gets exactly one
# response per request, each with a valid status, the ring is never broken by slot
# contents, and a read-only disk is never written.

_requests = st.lists(
    st.one_of(
        st.binary(min_size=ABI_NATIVE.request.size, max_size=ABI_NATIVE.request.size),
        st.builds(
            lambda op, n, sector, segs: rw(op, 1, sector, *segs, nr=n),
            st.sampled_from([0, 1, 2, 3, 4, 5, 6, 200]),
            st.integers(0, 255),
            st.integers(0, 2**64 - 1),
            st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 255), st.integers(0, 255)), max_size=11),
        ),
    ),
    min_size=1,
    max_size=16,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=_requests)
def test_any_batch_is_answered_and_writes_nothing(tmp_path: Path, batch: list[bytes]) -> None:
    img = tmp_path / "ro.img"
    if not img.exists():
        make_image(img, SIZE)
    before = img.read_bytes()

    async def body() -> None:
        async with raw_front(img, read_only=True) as f:
            got = await f.send(*batch)
            assert len(got) == len(batch)
            assert all(s in (BLKIF_RSP_OKAY, BLKIF_RSP_ERROR, BLKIF_RSP_EOPNOTSUPP) for _, _, s in got)
            assert f.back.broken is None

    asyncio.run(asyncio.wait_for(body(), 30))
    assert img.read_bytes() == before
