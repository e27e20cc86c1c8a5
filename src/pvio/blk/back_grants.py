"""blkback's way into a frontend's pages: batched maps (kept when persistent) or copies.

Theory of operation
-------------------
`BackGrants` is the part of blkback that holds grant mappings.  `map` maps every
(ref, read-only) key of a batch that is not mapped yet with ONE GNTTABOP_map_grant_ref
(`strict=False`: a bad grant fails only its own key) and returns each key's mapping
(None where it failed).  With persistent grants (feature-persistent, map transport
only) each reference is mapped once, read-write, whatever the request — as Linux's
blkback maps persistent grants — so one mapping serves the page as a READ's target, a
WRITE's source and an indirect page alike; a reference the frontend granted read-only
gets a read-only mapping (a second batch, only then), which serves no READ.  A good
mapping is kept, up to `limit`, and later batches find it there — in the steady state
no hypercall at all.  What is not kept is `unmap`ped by the caller when its I/O is done.

Kept mappings a frontend has stopped using are let go (`purge`, Linux blkback's
purge_persistent_gnt with its xen_blkif_pgrant_timeout of 60 s): the engine calls it
when no request is in flight, and the frontend, whose own purge revokes only grants
no backend maps, can then take those pages back.

`fetch` reads whole pages the frontend granted — an indirect request's segment pages —
and returns a private copy of each (None where the grant is bad): through a read-only
mapping (kept, when persistent) in the map transport, through one GNTTABOP_copy into
bounce pages in the copy transport.  The copy is what gets parsed, so a frontend that
rewrites its indirect page while blkback works changes nothing blkback sees.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from operator import itemgetter

from pvio.abi import grant_table as gt
from pvio.abi.blkif import BLKIF_OP_INDIRECT, BLKIF_RSP_ERROR, SECTOR_SIZE
from pvio.blk.request import (
    BlkifRequest,
    BlkifRequestError,
    DiskInfo,
    Segment,
    check_indirect,
    parse_indirect_segments,
)
from pvio.hypervisor.client import CopySeg, Domain, GrantMapping
from pvio.hypervisor.domain import PAGE_SIZE
from pvio.hypervisor.errors import GrantError, HypercallError
from pvio.hypervisor.granting import NoSpace

log = logging.getLogger(__name__)

#: a mapping's key: (grant ref, read-only)
Key = tuple[int, bool]


class BackGrants:
    """The grant mappings of one blkback ring (see the module notes)."""

    def __init__(
        self, domain: Domain, frontend_domid: int, *, persistent: bool, limit: int, on_op: Callable[[], None]
    ) -> None:
        self.domain = domain
        self.frontend_domid = frontend_domid
        self.persistent = persistent and domain.transport == "map"
        self.limit = limit
        self.on_op = on_op  # one grant hypercall batch was made (counted in the statistics)
        self.kept: dict[Key, GrantMapping] = {}  # (read-write ones only: (ref, False))
        self.pages: dict[int, memoryview] = {}  # ref -> its kept mapping's page
        self.last_used: dict[int, float] = {}  # ref -> when its kept mapping last served a batch

    def kept_views(self, segments: tuple[Segment, ...], now: float, whole: bool = False) -> list[memoryview] | None:
        """Each segment's bytes in a kept mapping, when every one is kept -- the steady
        state of persistent grants, found in one pass -- else None (then `map`).  With
        `whole` (every segment is a whole page) they are the kept pages themselves,
        shared: the caller must not release them."""
        pages = self.pages
        if not pages:
            return None
        if whole:
            return self._kept_pages(segments, now)
        views = []
        for gref, first, last in segments:
            page = pages.get(gref)
            if page is None:
                return None
            views.append(page[first * SECTOR_SIZE : (last + 1) * SECTOR_SIZE])
        self.last_used.update(dict.fromkeys(map(itemgetter(0), segments), now))
        return views

    def _kept_pages(self, segments: tuple[Segment, ...], now: float) -> list[memoryview] | None:
        grefs = list(map(itemgetter(0), segments))
        try:
            views = list(map(self.pages.__getitem__, grefs))
        except KeyError:
            return None
        self.last_used.update(dict.fromkeys(grefs, now))
        return views

    async def map(self, keys: list[Key]) -> tuple[dict[Key, GrantMapping | None], list[GrantMapping]]:
        """Each key's mapping (kept or fresh; None if it failed), and the fresh ones not
        kept (to unmap)."""
        if self.persistent:
            return await self._map_persistent(keys)
        missing = list(dict.fromkeys(keys))
        self.on_op()
        maps = await self.domain.map_grants(
            self.frontend_domid, [r for r, _ in missing], [ro for _, ro in missing], strict=False
        )
        found: dict[Key, GrantMapping | None] = {}
        transient: list[GrantMapping] = []
        for key, m in zip(missing, maps, strict=True):
            found[key] = m if m.status == gt.GNTST_okay and m.view is not None else None
            transient.append(m)
        return found, transient

    async def _map_persistent(self, keys: list[Key]) -> tuple[dict[Key, GrantMapping | None], list[GrantMapping]]:
        kept = self.kept
        refs = list(dict.fromkeys(r for r, _ in keys))
        now = time.monotonic()
        self.last_used.update(dict.fromkeys(refs, now))
        by_ref = {r: kept[(r, False)] for r in refs if (r, False) in kept}
        transient: list[GrantMapping] = []
        missing = [r for r in refs if r not in by_ref]
        if missing:
            self.on_op()
            maps = await self.domain.map_grants(self.frontend_domid, missing, False, strict=False)
            denied = []
            for r, m in zip(missing, maps, strict=True):
                if m.status != gt.GNTST_okay or m.view is None:
                    denied.append(r)  # granted read-only (or not at all)
                elif len(kept) < self.limit:
                    kept[(r, False)] = by_ref[r] = m
                    self.pages[r] = m.view
                else:
                    by_ref[r] = m
                    transient.append(m)
            if denied:
                self.on_op()
                ro = await self.domain.map_grants(self.frontend_domid, denied, True, strict=False)
                for r, m in zip(denied, ro, strict=True):
                    by_ref[r] = m
                    transient.append(m)
        found: dict[Key, GrantMapping | None] = {}
        for r, readonly in keys:
            got = by_ref.get(r)
            usable = got is not None and got.status == gt.GNTST_okay and got.view is not None
            found[(r, readonly)] = got if usable and got is not None and (readonly or not got.readonly) else None
        return found, [m for m in transient if m.status == gt.GNTST_okay]

    async def unmap(self, transient: list[GrantMapping]) -> None:
        if transient:
            self.on_op()
            await self.domain.unmap_grants(transient)

    async def fetch(self, refs: list[int]) -> list[bytes | None]:
        """A private copy of each granted page (None where the grant is bad)."""
        if not refs:
            return []
        if self.domain.transport == "copy":
            return await self._fetch_by_copy(refs)
        found, transient = await self.map([(r, True) for r in refs])
        try:
            out: list[bytes | None] = []
            for r in refs:
                m = found[(r, True)]
                out.append(bytes(m.view[:PAGE_SIZE]) if m is not None and m.view is not None else None)
            return out
        finally:
            await self.unmap(transient)

    async def _fetch_by_copy(self, refs: list[int]) -> list[bytes | None]:
        frames = self.domain.alloc_pages(len(refs))
        try:
            self.on_op()
            statuses = await self.domain.copy(
                [CopySeg.from_grant(self.frontend_domid, r, f, PAGE_SIZE) for r, f in zip(refs, frames, strict=True)]
            )
            return [
                bytes(self.domain.frame(f)) if st == gt.GNTST_okay else None
                for f, st in zip(frames, statuses, strict=True)
            ]
        finally:
            self.domain.free_pages(frames)

    # T:655 Indirect requests: the segments live in pages of their own
    # An INDIRECT request carries no segments in its slot: it names up to 8 indirect
    # pages (read-only grants), each holding 512 struct blkif_request_segment.  blkback
    # checks what the slot says first — indirect_op READ or WRITE, 1 to the advertised
    # feature-max-indirect-segments segments (256, as Linux) — then fetches the pages of
    # every indirect request of the batch with one map or copy, reads the segments from
    # its own copy of them, and from there treats the request as the READ or WRITE it
    # describes: every segment checked, the range checked, and one response carrying
    # the indirect_op.  An indirect page that cannot be mapped fails its request only.
    # :T
    async def read_indirect(
        self, reqs: list[BlkifRequest | BlkifRequestError], disk: DiskInfo
    ) -> list[BlkifRequest | BlkifRequestError]:
        """Check INDIRECT requests' headers, fetch their pages (one batch), read the segments."""
        out: list[BlkifRequest | BlkifRequestError] = []
        refs: list[int] = []
        for r in reqs:
            if isinstance(r, BlkifRequest) and r.operation == BLKIF_OP_INDIRECT:
                try:
                    check_indirect(r, disk)
                except BlkifRequestError as e:
                    r = e
                else:
                    refs.extend(r.indirect_grefs)
            out.append(r)
        try:
            pages = await self.fetch(refs)
        except (OSError, HypercallError, GrantError, NoSpace) as e:
            log.warning("blkback d%d: indirect pages: %s", self.frontend_domid, e)
            pages = [None] * len(refs)
        i = 0
        for k, r in enumerate(out):
            if isinstance(r, BlkifRequest) and r.operation == BLKIF_OP_INDIRECT:
                mine = pages[i : i + len(r.indirect_grefs)]
                i += len(r.indirect_grefs)
                if any(p is None for p in mine):
                    out[k] = BlkifRequestError(r, BLKIF_RSP_ERROR, "indirect_grefs", "an indirect page is not granted")
                else:
                    out[k] = parse_indirect_segments(r, [p for p in mine if p is not None])
        return out

    async def purge(self, older_than: float) -> int:
        """Unmap kept mappings unused for `older_than` seconds (none may be in use now)."""
        limit = time.monotonic() - older_than
        stale = [k for k in self.kept if self.last_used.get(k[0], 0.0) <= limit]
        if not stale:
            return 0
        maps = [self.kept.pop(k) for k in stale]
        for ref, _ in stale:
            self.last_used.pop(ref, None)
            self.pages.pop(ref, None)
        await self.unmap(maps)
        return len(maps)

    async def release(self) -> None:
        """Unmap every kept mapping (the ring is going away)."""
        if self.kept:
            kept, self.kept = list(self.kept.values()), {}
            self.last_used.clear()
            self.pages.clear()
            await self.domain.unmap_grants(kept)
