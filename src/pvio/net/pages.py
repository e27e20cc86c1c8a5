"""How netback moves a frame's bytes to and from the frontend's granted pages.

`GuestPages` is netback's data mover for one vif, in either transport:

* map (a trusted driver domain): netfront grants each slot's page once for the whole
  connection, so the same few hundred references come back frame after frame; each page
  is mapped the first time it is seen and kept (`views`), and from then on frames move
  by plain memory copies, with no hypercall in the steady state;
* copy: every batch is ONE GNTTABOP_copy, through netback's own pages.

A page the frontend did not grant (or not in the needed direction) fails only its own
frame.  Everything mapped is unmapped by `unmap_all` (at disconnect, or when a frontend
cycles through more references than PERSISTENT_LIMIT).
"""

from __future__ import annotations

import logging

from pvio.abi import grant_table as gt
from pvio.abi import netif as n
from pvio.abi.ring import XEN_PAGE_SIZE
from pvio.hypervisor.client import CopySeg, Domain, GrantMapping
from pvio.hypervisor.errors import GrantError, HypercallError
from pvio.net.slots import FrameParts, TxFrame

log = logging.getLogger(__name__)

#: Data pages kept mapped per vif (both rings' pages, with room for a frontend's churn)
PERSISTENT_LIMIT = 4 * (n.NET_TX_RING_SIZE + n.NET_RX_RING_SIZE)


class GuestPages:
    """One vif's frontend pages, as netback reaches them (see the module notes)."""

    def __init__(self, domain: Domain, frontend_domid: int) -> None:
        self.domain = domain
        self.frontend_domid = frontend_domid
        self.persistent = domain.transport == "map"
        self.mapped: dict[tuple[int, bool], GrantMapping] = {}
        #: the live views of `mapped`, by grant reference: transmit (read-only) pages
        #: and receive (writable) pages
        self._ro: dict[int, memoryview] = {}
        self._rw: dict[int, memoryview] = {}
        self.grant_ops = 0  # map and copy hypercall batches

    # T:1045 Persistent mappings in the map transport
    # netfront grants each ring slot's page once, for the whole connection, so the same
    # few hundred grant references come back frame after frame.  A driver domain trusted
    # with the map transport keeps each page mapped the first time it sees it (transmit
    # pages read-only, receive pages writable) and from then on moves frames with plain
    # memory copies: no hypercall at all in the steady state.  In the copy transport every
    # batch is one GNTTABOP_copy instead.
    # :T
    async def views(self, grefs: list[int], readonly: bool) -> list[memoryview | None]:
        """Live views of the frontend's pages `grefs` (read-only: transmit pages,
        writable: receive pages), mapped once and kept; None where the frontend did not
        grant the page so."""
        cache = self._ro if readonly else self._rw
        try:  # the steady state: every page already mapped
            return list(map(cache.__getitem__, grefs))
        except KeyError:
            pass
        missing = list(dict.fromkeys(r for r in grefs if r not in cache))
        if missing:
            if len(self.mapped) + len(missing) > PERSISTENT_LIMIT:
                await self.unmap_all()  # a frontend cycling through grants: start over
                cache = self._ro if readonly else self._rw
                missing = list(dict.fromkeys(grefs))
            self.grant_ops += 1
            maps = await self.domain.map_grants(self.frontend_domid, missing, readonly, strict=False)
            for ref, m in zip(missing, maps, strict=True):
                if m.status == gt.GNTST_okay and m.view is not None:
                    self.mapped[(ref, readonly)] = m
                    cache[ref] = m.view
        return [cache.get(r) for r in grefs]

    async def unmap_all(self) -> None:
        maps, self.mapped = list(self.mapped.values()), {}
        self._ro, self._rw = {}, {}
        if maps:
            try:
                await self.domain.unmap_grants(maps)
            except (OSError, HypercallError):
                pass

    async def fetch(self, frames: list[TxFrame]) -> list[FrameParts | None]:
        """Every slot of `frames`, by persistent mappings or ONE GNTTABOP_copy; None
        where a grant failed.  With persistent mappings a frame is its slots' live views
        (no copy: valid until the slots are answered); copied, one bytes object."""
        if self.persistent:
            views = await self.views([s[0] for f in frames for s in f.slots], True)
            out: list[FrameParts | None] = []
            k = 0
            for f in frames:
                mine = views[k : k + len(f.slots)]
                k += len(mine)
                if None in mine:
                    out.append(None)
                else:
                    out.append([v[offset : offset + size]  # type: ignore[index]
                                for v, (_g, offset, _f, _i, size) in zip(mine, f.slots, strict=True)])
            return out
        nslots = sum(len(f.slots) for f in frames)
        pages = self.domain.alloc_pages(nslots)
        try:
            segs = []
            k = 0
            for f in frames:
                for gref, offset, _flags, _id, size in f.slots:
                    segs.append(CopySeg.from_grant(self.frontend_domid, gref, pages[k], size,
                                                   grant_offset=offset))
                    k += 1
            self.grant_ops += 1
            try:
                statuses = await self.domain.copy(segs)
            except (OSError, HypercallError, GrantError) as e:
                log.warning("netback d%d: tx copy failed: %s", self.frontend_domid, e)
                return [None] * len(frames)
            out = []
            k = 0
            for f in frames:
                got = statuses[k : k + len(f.slots)]
                if any(st != gt.GNTST_okay for st in got):
                    out.append(None)
                else:
                    out.append([b"".join(self.domain.frame(pages[k + j])[: s[4]]
                                         for j, s in enumerate(f.slots))])
                k += len(f.slots)
            return out
        finally:
            self.domain.free_pages(pages)

    async def put(self, grefs: list[int], pieces: list[memoryview]) -> list[int]:
        """Write each piece at offset 0 of its granted page (`grefs`, in step): by
        persistent mappings, or through netback's own pages and ONE GNTTABOP_copy.  A
        GNTST status each."""
        if self.persistent:
            views = await self.views(grefs, False)
            if None not in views:
                for view, data in zip(views, pieces, strict=True):
                    view[: len(data)] = data  # type: ignore[index]
                return [gt.GNTST_okay] * len(views)
            out = []
            for view, data in zip(views, pieces, strict=True):
                if view is None:
                    out.append(gt.GNTST_general_error)
                else:
                    view[: len(data)] = data
                    out.append(gt.GNTST_okay)
            return out
        pages = self.domain.alloc_pages(len(pieces))
        try:
            mem = self.domain.memory
            segs = []
            for page, gref, data in zip(pages, grefs, pieces, strict=True):
                base = page * XEN_PAGE_SIZE
                mem[base : base + len(data)] = data
                segs.append(CopySeg.to_grant(page, self.frontend_domid, gref, len(data)))
            self.grant_ops += 1
            try:
                return await self.domain.copy(segs)
            except (OSError, HypercallError, GrantError) as e:
                log.warning("netback d%d: rx copy failed: %s", self.frontend_domid, e)
                return [gt.GNTST_general_error] * len(segs)
        finally:
            self.domain.free_pages(pages)


__all__ = ["PERSISTENT_LIMIT", "GuestPages"]
