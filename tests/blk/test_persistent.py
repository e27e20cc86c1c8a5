"""Persistent grants as Linux negotiates them, and their purge on both ends."""

from __future__ import annotations

import os
from pathlib import Path

from blk.pair import asynctest, blk_pair, make_image
from pvio.blk.request import Segment
from pvio.hypervisor.domain import PAGE_SIZE

MiB = 1 << 20


@asynctest
async def test_unused_persistent_grants_are_purged(tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.img", 4 * MiB, fill=False)
    data = os.urandom(512 * 1024)
    async with blk_pair(img, persistent=True) as p:
        await p.front.write(0, data)  # 4 indirect requests at once: a burst of pages
        pool = len(p.front.grants.pool)
        assert pool >= 128 and p.back.grants.kept and p.back.stats.grant_ops > 0
        # The backend still maps every one of them: the frontend's purge keeps them all.
        assert p.front.grants.purge() == 0 and len(p.front.grants.pool) == pool
        # The backend lets go of mappings unused for 0 s (Linux: 60 s), then the frontend
        # takes the pages back (purge_persistent_grants).
        kept = len(p.back.grants.kept)
        assert await p.back.grants.purge(0) == kept and not p.back.grants.kept
        assert p.front.grants.purge() == pool and not p.front.grants.pool
        assert p.front.grants.pool_size == 0
        # I/O goes on, with fresh persistent grants.
        assert await p.front.read(0, len(data)) == data
        assert p.front.grants.pool


@asynctest
async def test_persistence_given_up_at_reconnection(tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.img", 4 * MiB, fill=False)
    async with blk_pair(img, persistent=True) as p:
        await p.front.write(0, b"\x11" * 65536)
        assert p.front.grants.pool
        p.front.set_persistent(False)  # a new backend without feature-persistent
        assert not p.front.grants.pool
        await p.reconnect_backend()
        await p.front.write(0, b"\x22" * 65536)
        assert not p.front.grants.pool and not p.back.persistent
        assert await p.front.read(0, 65536) == b"\x22" * 65536



@asynctest
async def test_one_read_write_mapping_per_persistent_grant(tmp_path: Path) -> None:
    """Reads, writes and indirect pages share one mapping per reference (Linux maps
    persistent grants read-write): after the first pass no grant hypercall is made."""
    img = make_image(tmp_path / "d.img", 4 * MiB, fill=False)
    data = os.urandom(MiB)
    async with blk_pair(img, persistent=True) as p:
        await p.front.write(0, data)
        assert await p.front.read(0, MiB) == data
        refs = {r for r, _ in p.front.grants.pool}
        assert {r for r, _ in p.back.grants.kept} <= refs and all(not ro for _, ro in p.back.grants.kept)
        ops = p.back.stats.grant_ops
        for _ in range(3):
            await p.front.write(0, data)
            assert await p.front.read(0, MiB) == data
        assert p.back.stats.grant_ops == ops


@asynctest
async def test_kept_views_are_the_guest_pages_or_nothing(tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.img", 4 * MiB, fill=False)
    async with blk_pair(img, persistent=True) as p:
        await p.front.write(0, os.urandom(64 * 1024))
        kept = p.back.grants.kept
        ref, frame = next((r, f) for r, f in p.front.grants.pool if (r, False) in kept)
        views = p.back.grants.kept_views((Segment(ref, 1, 2),), 5.0)
        assert views is not None and len(views[0]) == 1024  # sectors 1..2 of the page
        base = frame * PAGE_SIZE
        p.front.domain.memory[base + 512 : base + 1536] = b"x" * 1024
        assert bytes(views[0]) == b"x" * 1024  # the guest's page itself, not a copy
        assert p.back.grants.last_used[ref] == 5.0
        views[0].release()
        # Whole pages: the kept page itself, not a slice of it (the caller must not release it).
        pages = p.back.grants.kept_views((Segment(ref, 0, 7),), 7.0, whole=True)
        assert pages is not None and pages[0] is kept[(ref, False)].view and len(pages[0]) == PAGE_SIZE
        assert p.back.grants.last_used[ref] == 7.0
        # One page not kept: no views at all (the caller maps the batch instead).
        unknown = max(r for r, _ in kept) + 1000
        assert p.back.grants.kept_views((Segment(ref, 0, 7), Segment(unknown, 0, 7)), 6.0) is None
        assert p.back.grants.kept_views((Segment(ref, 0, 7), Segment(unknown, 0, 7)), 6.0, whole=True) is None
