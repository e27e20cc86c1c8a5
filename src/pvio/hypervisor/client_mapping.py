"""Reaching other domains' grants: map, unmap and copy, in the map and copy transports.

Theory of operation
-------------------
`MappingClient` is a backend's side of the grant table.  Everything is batched:
`map_grants` of N references is one GNTTABOP_map_grant_ref op with N structs (one round
trip, whatever N), `unmap_grants` and `copy` likewise.  Which transport a domain uses is
chosen when the domain is created, and the hypervisor enforces it.

*map* — after the hypervisor has validated and pinned a grant, the mapper receives the
granter's memory fd (once per granter, asked for in the same batch as the first map) and
reaches the granted frame through its own shared mapping of it (`_Foreign`);
`map_grants` returns 4 KiB memoryviews of the granter's real pages (read-only views for
read-only maps).  This is the fast path.  Threat model: the mapper holds the granter's
*whole* memory fd, so the grant rules (only granted frames, read-only when granted
read-only, nothing after unmap -- views are released) hold for every driver that uses
this library, but a malicious mapper process could reach all of the granter's memory.
Use it for a trusted driver domain, as Xen deployments trust dom0.

*copy* — the mapper never receives another domain's memory (the hypervisor refuses the
fd).  Every byte moves by GNTTABOP_copy, performed by the hypervisor with its bounds
checks, so a misbehaving or malicious backend can touch only what was granted, and only
in the granted direction.  `map_grants` still works, as a bounce buffer: the grant is
pinned with GNTTABOP_map_grant_ref (so the granter cannot revoke it meanwhile) and
copied into a page of the mapper's own memory in the same batch; `unmap_grants` copies
writable bounce pages back before unmapping.  Those views are snapshots, not live
shared memory.

In both, a granted *shareable page* (`MemoryClient.alloc_shareable_pages`, where rings
live) is mapped live through that one page's own fd, and nothing else of the granter
comes with it (read-only grants are mapped PROT_READ).

When a granter dies, the hypervisor pushes PVIO_PUSH_domain_dead; its memory mapping is
dropped as soon as the last of its grants is unmapped (`domain_dead`).

Deliberately not here: granting our own pages (`client_memory`), and the hypervisor's
checks, which are the only ones that count (`pvio.hypervisor.grant_table`).
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from pvio.abi import grant_table as gt
from pvio.abi.grant_table import DOMID_SELF
from pvio.abi.layout import Layout
from pvio.hypervisor import wire
from pvio.hypervisor.client_channel import Hypercalls, check
from pvio.hypervisor.client_memory import MemoryClient, close_mmap
from pvio.hypervisor.domain import PAGE_SHIFT, PAGE_SIZE, SHAREABLE_FRAME_BASE
from pvio.hypervisor.errors import GrantError, HypercallError
from pvio.hypervisor.wire import Op


@dataclass(eq=False)
class GrantMapping:
    """One mapped grant: `view` is the page (None if `status` is not GNTST_okay)."""

    domid: int
    ref: int
    readonly: bool
    status: int
    handle: int = -1
    view: memoryview | None = None
    bounce_frame: int = -1  # copy transport: the local page holding the snapshot
    frame: int = -1  # the granted frame (from dev_bus_addr)
    page_mm: mmap.mmap | None = None  # a shareable page mapped on its own

    @property
    def live(self) -> bool:
        """True if `view` is the granter's page itself, False for a bounce copy."""
        return self.status == gt.GNTST_okay and self.bounce_frame < 0


_COPY = gt.GNTTAB_COPY.packer


class CopySeg(NamedTuple):
    """One GNTTABOP_copy: each side a grant reference of `domid` or a frame of ours (a
    named tuple: a 1 MiB copy is 256 of them, built per request)."""

    source: int
    dest: int
    length: int
    source_offset: int = 0
    dest_offset: int = 0
    source_domid: int = DOMID_SELF
    dest_domid: int = DOMID_SELF
    flags: int = 0

    @classmethod
    def from_grant(
        cls, domid: int, ref: int, frame: int, length: int = PAGE_SIZE, grant_offset: int = 0, frame_offset: int = 0
    ) -> CopySeg:
        return cls(ref, frame, length, grant_offset, frame_offset, domid, DOMID_SELF, gt.GNTCOPY_source_gref)

    @classmethod
    def to_grant(
        cls, frame: int, domid: int, ref: int, length: int = PAGE_SIZE, frame_offset: int = 0, grant_offset: int = 0
    ) -> CopySeg:
        return cls(frame, ref, length, frame_offset, grant_offset, DOMID_SELF, domid, gt.GNTCOPY_dest_gref)

    def pack(self) -> bytes:
        return _COPY.pack(self.source, self.source_domid, self.source_offset, self.dest, self.dest_domid,
                          self.dest_offset, self.length, self.flags, 0)


# gnttab_copy's value fields in order: source.{u, domid, offset}, dest.{u, domid, offset},
# len, flags, status.  The copy transport's hot path packs its ops with these two, without
# a CopySeg each (a 1 MiB request is 256 ops, each way).
def pack_from_grant(domid: int, ref: int, frame: int, length: int, grant_offset: int) -> bytes:
    """The packed CopySeg.from_grant (our frame at offset 0)."""
    return _COPY.pack(ref, domid, grant_offset, frame, DOMID_SELF, 0, length, gt.GNTCOPY_source_gref, 0)


def pack_to_grant(frame: int, domid: int, ref: int, length: int, grant_offset: int) -> bytes:
    """The packed CopySeg.to_grant (our frame at offset 0)."""
    return _COPY.pack(frame, DOMID_SELF, 0, ref, domid, grant_offset, length, gt.GNTCOPY_dest_gref, 0)


@dataclass
class _Foreign:
    """The map transport's view of another domain's memory (one mmap per granter)."""

    mm: mmap.mmap
    view: memoryview
    maps: int = 0
    dead: bool = False


# Batches are built and read with the layouts' precompiled Structs (positional fields in
# the order of the quoted C structs): this is the hot path of every block request.
_MAP = gt.GNTTAB_MAP_GRANT_REF.packer  # host_addr, flags, ref, dom, status, handle, dev_bus_addr
_UNMAP = gt.GNTTAB_UNMAP_GRANT_REF.packer  # host_addr, dev_bus_addr, handle, status


def _map_op(domid: int, refs: Sequence[int], readonly: Sequence[bool]) -> Op:
    rw, ro = gt.GNTMAP_host_map, gt.GNTMAP_host_map | gt.GNTMAP_readonly
    args = b"".join([_MAP.pack(0, ro if r else rw, ref, domid, 0, 0, 0) for ref, r in zip(refs, readonly, strict=True)])
    return Op(wire.HYPERVISOR_grant_table_op, gt.GNTTABOP_map_grant_ref, len(refs), args)


def _unmap_op(handles: Sequence[int]) -> Op:
    args = b"".join([_UNMAP.pack(0, 0, h, 0) for h in handles])
    return Op(wire.HYPERVISOR_grant_table_op, gt.GNTTABOP_unmap_grant_ref, len(handles), args)


def _copy_op(segs: Sequence[CopySeg]) -> Op:
    return Op(wire.HYPERVISOR_grant_table_op, gt.GNTTABOP_copy, len(segs), b"".join([s.pack() for s in segs]))


def _statuses(op: Op, lay: Layout) -> list[int]:
    """Every op's `status` member, read in place from the answered structs."""
    status = lay.member("status")
    after = lay.size - status.offset - status.size
    only_status = struct.Struct(f"{lay.byte_order}{status.offset}x{status.code}{after}x")
    if len(op.args) < op.count * lay.size:
        raise ValueError(f"{lay.name}: {len(op.args)} bytes answer {op.count} ops")
    return [s for (s,) in only_status.iter_unpack(op.args[: op.count * lay.size])]


class MappingClient:
    """A domain's mappings and copies of other domains' grants (see the module notes)."""

    def __init__(self, calls: Hypercalls, memory: MemoryClient, transport: str) -> None:
        self._calls = calls
        self._memory = memory
        self.transport = transport
        self._foreign: dict[int, _Foreign] = {}

    # -- mapping ---------------------------------------------------------------------------

    # T:350 Batched mapping for a backend, in two transports
    # A backend maps all the grants of a request (or of many requests) with one call:
    # one frame, one GNTTABOP_map_grant_ref op with N structs.  In the map transport the
    # same frame asks for the granter's memory fd the first time (the hypervisor gives it
    # only to a map-transport domain that now maps one of that domain's grants), and the
    # views are slices of one shared mapping of it.  In the copy transport the domain
    # never holds another's memory: the same frame pins the grants and has the
    # hypervisor copy each granted page into a local bounce page.  A granted shareable
    # page (where rings live) is mapped live in both, through that one page's own fd.
    # :T
    async def map_grants(
        self, domid: int, refs: Sequence[int], readonly: bool | Sequence[bool] = False, *, strict: bool = True
    ) -> list[GrantMapping]:
        """Map N grant references of `domid` in one round trip.

        `readonly` is one flag for all, or one per ref (a backend batching requests of
        both directions).  Returns one GrantMapping per ref.  With `strict`, any failure
        unmaps the rest and raises GrantError naming the first bad ref.
        """
        if not refs:
            return []
        ro = [readonly] * len(refs) if isinstance(readonly, bool) else [bool(r) for r in readonly]
        if len(ro) != len(refs):
            raise ValueError(f"{len(ro)} readonly flags for {len(refs)} refs")
        if self.transport == "copy":
            out = await self._map_by_copy(domid, refs, ro)
        else:
            out = await self._map_direct(domid, refs, ro)
        shareable = [m for m in out if m.status == gt.GNTST_okay and m.frame >= SHAREABLE_FRAME_BASE]
        if shareable:
            await self._map_shareable(shareable)
        if strict:
            await self._raise_on_failure(out, "GNTTABOP_map_grant_ref")
        return out

    async def _map_direct(self, domid: int, refs: Sequence[int], readonly: list[bool]) -> list[GrantMapping]:
        ops = [_map_op(domid, refs, readonly)]
        foreign = self._foreign.get(domid)
        if foreign is None or foreign.dead:
            ops.append(Op(wire.PVIO_HYPERVISOR_domctl, wire.PVIO_DOMCTL_memory_fd, 1, wire.PVIO_MEMORY_FD.pack(domid=domid)))
        replies = await self._calls.batch(ops)
        map_reply = check(replies[0], "GNTTABOP_map_grant_ref")
        if len(replies) > 1:
            fd_reply = replies[1]
            if fd_reply.rc == 0 and fd_reply.fds:
                info = wire.PVIO_MEMORY_FD.unpack(fd_reply.args)
                try:
                    mm = mmap.mmap(fd_reply.fds[0], info["nr_pages"] * PAGE_SIZE)
                finally:
                    for fd in fd_reply.fds:
                        os.close(fd)
                foreign = _Foreign(mm, memoryview(mm))
                self._foreign[domid] = foreign
            else:
                for fd in fd_reply.fds:
                    os.close(fd)
        if len(map_reply.args) != len(refs) * _MAP.size:
            raise HypercallError(-errno.EPROTO, "GNTTABOP_map_grant_ref reply of the wrong size")
        out: list[GrantMapping] = []
        fview = foreign.view if foreign is not None else None
        for ref, r_o, (_, _, _, _, status, handle, bus) in zip(
            refs, readonly, _MAP.iter_unpack(map_reply.args), strict=True
        ):
            m = GrantMapping(domid, ref, r_o, status, handle, frame=bus >> PAGE_SHIFT)
            if status == gt.GNTST_okay and m.frame >= SHAREABLE_FRAME_BASE:
                pass  # mapped on its own by _map_shareable
            elif status == gt.GNTST_okay:
                if foreign is None or fview is None or bus + PAGE_SIZE > len(fview):
                    m.status = gt.GNTST_general_error  # pragma: no cover - a broken hypervisor
                else:
                    view = fview[bus : bus + PAGE_SIZE]
                    m.view = view.toreadonly() if r_o else view
                    foreign.maps += 1
            out.append(m)
        return out

    async def _map_shareable(self, ms: list[GrantMapping]) -> None:
        """Map granted shareable pages live, each through its own one-page fd."""
        lay = wire.PVIO_PAGE_FD
        args = b"".join(lay.pack(domid=m.domid, ref=m.ref) for m in ms)
        (reply,) = await self._calls.batch([Op(wire.PVIO_HYPERVISOR_domctl, wire.PVIO_DOMCTL_page_fd, len(ms), args)])
        check(reply, "PVIO_DOMCTL_page_fd")
        fds = list(reply.fds)
        failed = []
        for i, m in enumerate(ms):
            status = lay.unpack(reply.args, i * lay.size)["status"] if len(reply.args) >= (i + 1) * lay.size else -1
            if status != 0 or not fds:
                failed.append(m)
                continue
            fd = fds.pop(0)
            try:
                prot = mmap.PROT_READ if m.readonly else mmap.PROT_READ | mmap.PROT_WRITE
                m.page_mm = mmap.mmap(fd, PAGE_SIZE, prot=prot)
            finally:
                os.close(fd)
            view = memoryview(m.page_mm)
            m.view = view.toreadonly() if m.readonly else view
            if m.bounce_frame >= 0:
                self._memory.pages.free([m.bounce_frame])
                m.bounce_frame = -1
        for fd in fds:
            os.close(fd)
        if failed:  # pragma: no cover - the hypervisor broke its promise
            await self._calls.batch([_unmap_op([m.handle for m in failed])])
            for m in failed:
                m.status, m.handle, m.view = gt.GNTST_general_error, -1, None

    async def _raise_on_failure(self, out: list[GrantMapping], what: str) -> None:
        bad = next((m for m in out if m.status != gt.GNTST_okay), None)
        if bad is None:
            return
        await self.unmap_grants([m for m in out if m.status == gt.GNTST_okay])
        raise GrantError(bad.status, what, f"ref {bad.ref}")

    async def _map_by_copy(self, domid: int, refs: Sequence[int], readonly: list[bool]) -> list[GrantMapping]:
        frames = self._memory.pages.alloc(len(refs))
        segs = [CopySeg.from_grant(domid, ref, f) for ref, f in zip(refs, frames, strict=True)]
        replies = await self._calls.batch([_map_op(domid, refs, readonly), _copy_op(segs)])
        map_reply = check(replies[0], "GNTTABOP_map_grant_ref")
        copy_reply = check(replies[1], "GNTTABOP_copy")
        copy_status = _statuses(copy_reply, gt.GNTTAB_COPY)
        out = []
        for i, (ref, (_, _, _, _, status, handle, bus)) in enumerate(
            zip(refs, _MAP.iter_unpack(map_reply.args), strict=True)
        ):
            m = GrantMapping(domid, ref, readonly[i], status, handle, bounce_frame=frames[i], frame=bus >> PAGE_SHIFT)
            if m.status == gt.GNTST_okay and copy_status[i] != gt.GNTST_okay:
                m.status = copy_status[i]
                await self._calls.batch([_unmap_op([m.handle])])
            if m.status == gt.GNTST_okay:
                view = self._memory.frame(frames[i])
                m.view = view.toreadonly() if readonly[i] else view
            else:
                self._memory.pages.free([frames[i]])
                m.bounce_frame = -1
            out.append(m)
        return out

    async def unmap_grants(self, mappings: Sequence[GrantMapping]) -> list[int]:
        """Unmap in one round trip; the views are released.  Returns GNTST statuses."""
        live = [m for m in mappings if m.status == gt.GNTST_okay and m.handle >= 0]
        if not live:
            return []
        ops = []
        if self.transport == "copy":
            back = [
                CopySeg.to_grant(m.bounce_frame, m.domid, m.ref) for m in live if not m.readonly and m.bounce_frame >= 0
            ]
            if back:
                ops.append(_copy_op(back))
        ops.append(_unmap_op([m.handle for m in live]))
        replies = await self._calls.batch(ops)
        reply = check(replies[-1], "GNTTABOP_unmap_grant_ref")
        statuses = _statuses(reply, gt.GNTTAB_UNMAP_GRANT_REF)
        for m in live:
            if m.view is not None:
                m.view.release()
                m.view = None
            if m.page_mm is not None:
                close_mmap(m.page_mm)
                m.page_mm = None
            m.handle = -1
            if m.bounce_frame >= 0:
                self._memory.pages.free([m.bounce_frame])
                m.bounce_frame = -1
            foreign = self._foreign.get(m.domid) if m.frame < SHAREABLE_FRAME_BASE else None
            if foreign is not None and self.transport == "map":
                foreign.maps -= 1
                if foreign.dead and foreign.maps <= 0:
                    self._drop_foreign(m.domid)
        return statuses

    def _drop_foreign(self, domid: int) -> None:
        foreign = self._foreign.pop(domid, None)
        if foreign is None:
            return
        foreign.view.release()
        close_mmap(foreign.mm)

    # -- copying ---------------------------------------------------------------------------

    async def copy(self, segs: Sequence[CopySeg]) -> list[int]:
        """GNTTABOP_copy, batched: one round trip; returns a GNTST status per segment."""
        return await self.copy_packed(_copy_op(segs).args)

    async def copy_packed(self, args: bytes) -> list[int]:
        """`copy` of ops already packed (`pack_from_grant`, `pack_to_grant`, CopySeg.pack)."""
        count, rest = divmod(len(args), gt.GNTTAB_COPY.size)
        if rest:
            raise ValueError(f"{len(args)} bytes are not whole gnttab_copy structs")
        if not count:
            return []
        op = Op(wire.HYPERVISOR_grant_table_op, gt.GNTTABOP_copy, count, args)
        reply = await self._calls.one(op, "GNTTABOP_copy")
        return _statuses(reply, gt.GNTTAB_COPY)

    # -- the granter's death and ours ------------------------------------------------------

    def domain_dead(self, domid: int) -> None:
        """PVIO_PUSH_domain_dead: drop `domid`'s memory once nothing of it is mapped."""
        foreign = self._foreign.get(domid)
        if foreign is not None:
            foreign.dead = True
            if foreign.maps <= 0:
                self._drop_foreign(domid)

    def close(self) -> None:
        """Drop every granter's memory mapping (the domain is leaving)."""
        for domid in list(self._foreign):
            self._drop_foreign(domid)
