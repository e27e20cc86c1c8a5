"""A hostile frontend's BLKIF_OP_INDIRECT requests: every check Linux blkback makes.

Linux blkback (`dispatch_rw_block_io`, `xen_blkbk_parse_indirect`) refuses an indirect
request whose indirect_op is not READ or WRITE, whose segment count is 0 or above the
advertised feature-max-indirect-segments, whose indirect pages cannot be mapped, whose
segments leave their page, or whose range leaves the disk — each answered
BLKIF_RSP_ERROR with the indirect_op as the response's operation, nothing written, and
the ring serving the next request.  A backend that does not offer indirect requests
answers BLKIF_RSP_EOPNOTSUPP.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from blk.pair import asynctest, make_image
from blk.test_hostile_frontend import RawFront, raw_front
from pvio.abi.blkif import (
    ABI_NATIVE,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_INDIRECT,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
)
from pvio.blk.request import Segment, build_indirect, pack_segments
from pvio.hypervisor.domain import PAGE_SIZE

MiB = 1 << 20
SIZE = 1 * MiB
MAX = 256


def indirect_page(f: RawFront, segs: list[tuple[int, int, int]], *, to: int | None = None) -> int:
    """A fresh page holding `segs`, granted read-only; its grant reference."""
    (frame,) = f.dom.alloc_pages(1)
    raw = pack_segments([Segment(*s) for s in segs])
    f.dom.memory[frame * PAGE_SIZE : frame * PAGE_SIZE + len(raw)] = raw
    return f.dom.gnttab.grant_foreign_access(to if to is not None else f.backend_domid, frame, True)


def ind(op: int, req_id: int, sector: int, nseg: int, *grefs: int) -> bytes:
    return build_indirect(ABI_NATIVE, op, req_id, sector, nseg, list(grefs))


@pytest.mark.parametrize("transport", ["map", "copy", "map-persistent"])
@asynctest
async def test_indirect_validations_answer_in_band(tmp_path: Path, transport: str) -> None:
    img = make_image(tmp_path / "d.img", SIZE)
    before = img.read_bytes()
    mode, _, pers = transport.partition("-")
    async with raw_front(img, transport=mode, persistent=bool(pers), indirect=MAX) as f:
        f.dom.memory[f.page * PAGE_SIZE : (f.page + 1) * PAGE_SIZE] = b"\xaa" * PAGE_SIZE
        data = f.grant(readonly=True)
        good = indirect_page(f, [(data, 0, 7)] * 16)  # 16 segments: 64 KiB from one page
        foreign = indirect_page(f, [(data, 0, 7)] * 16, to=f.other.domid)
        bad_bounds = indirect_page(f, [(data, 0, 7)] * 15 + [(data, 3, 8)])
        reversed_ = indirect_page(f, [(data, 0, 7)] * 15 + [(data, 5, 4)])
        missing_data = indirect_page(f, [(data, 0, 7)] * 15 + [(7777, 0, 7)])
        last = SIZE // 512
        cases = {
            "indirect_op FLUSH": (ind(BLKIF_OP_FLUSH_DISKCACHE, 1, 0, 16, good), BLKIF_OP_FLUSH_DISKCACHE),
            "indirect_op INDIRECT": (ind(BLKIF_OP_INDIRECT, 2, 0, 16, good), BLKIF_OP_INDIRECT),
            "indirect_op unknown": (ind(99, 3, 0, 16, good), 99),
            "0 segments": (ind(BLKIF_OP_WRITE, 4, 0, 0, good), BLKIF_OP_WRITE),
            "more than advertised": (ind(BLKIF_OP_WRITE, 5, 0, MAX + 1, good, good), BLKIF_OP_WRITE),
            "far more than 8 pages hold": (ind(BLKIF_OP_WRITE, 6, 0, 65535, good), BLKIF_OP_WRITE),
            "indirect page not granted": (ind(BLKIF_OP_WRITE, 7, 0, 16, 7777), BLKIF_OP_WRITE),
            "indirect page for another domain": (ind(BLKIF_OP_WRITE, 8, 0, 16, foreign), BLKIF_OP_WRITE),
            "segment past its page": (ind(BLKIF_OP_WRITE, 9, 0, 16, bad_bounds), BLKIF_OP_WRITE),
            "first_sect > last_sect": (ind(BLKIF_OP_WRITE, 10, 0, 16, reversed_), BLKIF_OP_WRITE),
            "data grant missing": (ind(BLKIF_OP_WRITE, 11, 0, 16, missing_data), BLKIF_OP_WRITE),
            "past the end of the disk": (ind(BLKIF_OP_WRITE, 12, last - 64, 16, good), BLKIF_OP_WRITE),
            "read into a read-only grant": (ind(BLKIF_OP_READ, 13, 0, 16, good), BLKIF_OP_READ),
        }
        for name, (raw, op) in cases.items():
            ((rid, rop, status),) = await f.send(raw)
            assert (rop, status) == (op, BLKIF_RSP_ERROR), name
            # the ring keeps going
            w = f.grant()
            assert await f.status(build_indirect(ABI_NATIVE, BLKIF_OP_READ, 100, 8, 12, [
                indirect_page(f, [(w, 0, 7)] * 12)])) == BLKIF_RSP_OKAY, name
        # all of them in one batch
        got = await f.send(*(raw for raw, _ in cases.values()))
        assert [s for _, _, s in got] == [BLKIF_RSP_ERROR] * len(cases)
        assert f.back.broken is None
        assert img.read_bytes() == before, "a refused indirect request wrote to the disk"
        # the good one: 16 pages of 0xaa at sector 16, one response, operation WRITE
        # (the reads above filled the page from the disk)
        f.dom.memory[f.page * PAGE_SIZE : (f.page + 1) * PAGE_SIZE] = b"\xaa" * PAGE_SIZE
        ((rid, rop, status),) = await f.send(ind(BLKIF_OP_WRITE, 200, 16, 16, good))
        assert (rid, rop, status) == (200, BLKIF_OP_WRITE, BLKIF_RSP_OKAY)
        assert f.back.stats.wr_req == 1 and f.back.stats.wr_sect == 128
    after = img.read_bytes()
    assert after[16 * 512 : 16 * 512 + 64 * 1024] == b"\xaa" * (64 * 1024)
    assert after[: 16 * 512] == before[: 16 * 512]


@asynctest
async def test_indirect_not_offered_is_eopnotsupp(tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.img", SIZE)
    async with raw_front(img, indirect=0) as f:
        data = f.grant(readonly=True)
        page = indirect_page(f, [(data, 0, 7)] * 16)
        ((_, op, status),) = await f.send(ind(BLKIF_OP_WRITE, 1, 0, 16, page))
        assert (op, status) == (BLKIF_OP_WRITE, BLKIF_RSP_EOPNOTSUPP)


@asynctest
async def test_two_indirect_pages_and_a_rewritten_page(tmp_path: Path) -> None:
    """600 segments span two indirect pages; the backend reads its own copy of them."""
    img = make_image(tmp_path / "d.img", 4 * MiB, fill=False)
    async with raw_front(img, indirect=1024) as f:
        f.dom.memory[f.page * PAGE_SIZE : (f.page + 1) * PAGE_SIZE] = b"\x5a" * PAGE_SIZE
        data = f.grant(readonly=True)
        segs = [(data, 0, 0)] * 600  # 600 × 512 bytes
        raw = pack_segments([Segment(*s) for s in segs])
        frames = f.dom.alloc_pages(2)
        for k, frame in enumerate(frames):
            chunk = raw[k * PAGE_SIZE : (k + 1) * PAGE_SIZE]
            f.dom.memory[frame * PAGE_SIZE : frame * PAGE_SIZE + len(chunk)] = chunk
        refs = [f.dom.gnttab.grant_foreign_access(f.backend_domid, fr, True) for fr in frames]
        assert await f.status(ind(BLKIF_OP_WRITE, 1, 0, 600, *refs)) == BLKIF_RSP_OKAY
        # a third gref beyond what 600 segments need is ignored, as Linux copies only INDIRECT_PAGES(n)
        assert await f.status(ind(BLKIF_OP_WRITE, 2, 0, 600, *refs, 7777)) == BLKIF_RSP_OKAY
    assert img.read_bytes()[: 600 * 512] == b"\x5a" * (600 * 512)
