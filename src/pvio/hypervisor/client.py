"""The client library a domain uses: memory, grants, mappings, copies, events, lguest.

Theory of operation
-------------------
`Domain` is what a frontend or backend holds.  It is the same class whatever carries its
hypercalls: a `Channel` is either the asyncio adapter over the hypercall socket
(`pvio.hypervisor.aio`) or the in-process one (`pvio.hypervisor.inprocess`) that calls a
`Hypervisor` core in the same process; one conformance suite
(`pvio.testing.hypervisor`) runs against both.

Everything that can be batched is: `map_grants` of N references is one
GNTTABOP_map_grant_ref op with N structs (one round trip, whatever N), `unmap_grants`
and `copy` likewise.  Everything that needs no hypervisor is local: allocating the
domain's own pages, granting and ending access (the table is shared memory), and
notifying a bound event channel (one eventfd write).

Two data transports, chosen when the domain is created
------------------------------------------------------
*map* — after the hypervisor has validated and pinned a grant, the mapper receives the
granter's memory fd (once per granter) and reaches the granted frame through its own
shared mapping; `map_grants` returns 4 KiB memoryviews of the granter's real pages
(read-only views for read-only maps).  This is the fast path.  Threat model: the mapper
holds the granter's *whole* memory fd, so the grant rules (only granted frames, read-
only when granted read-only, nothing after unmap — views are released) hold for every
driver that uses this library, but a malicious mapper process could reach all of the
granter's memory.  Use it for a trusted driver domain, as Xen deployments trust dom0.

*copy* — the mapper never receives another domain's memory (the hypervisor refuses the
fd).  Every byte moves by GNTTABOP_copy, performed by the hypervisor with its bounds
checks, so a misbehaving or malicious backend can touch only what was granted, and
only in the granted direction.  `map_grants` still works, as a bounce buffer: the grant
is pinned with GNTTABOP_map_grant_ref (so the granter cannot revoke it meanwhile) and
copied into a page of the mapper's own memory in the same batch; `unmap_grants` copies
writable bounce pages back before unmapping.  Those views are snapshots, not live
shared memory.

Shared rings need live memory in both transports, so they go in *shareable pages*
(`alloc_shareable_pages`): each is a one-page memfd of its own, and a domain that maps a
grant of one receives that page's fd and nothing else (read-only grants are mapped
PROT_READ).  So a copy-transport backend maps its ring live and still never holds the
frontend's memory; only the pages the frontend chose to make shareable are exposed, and
only while granted and mapped.
"""

from __future__ import annotations

import asyncio
import errno
import mmap
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from pvio.abi import event_channel as ev
from pvio.abi import grant_table as gt
from pvio.abi.grant_table import DOMID_SELF
from pvio.abi.lguest import LHCALL_BIND_DMA, LHCALL_SEND_DMA
from pvio.hypervisor import wire
from pvio.hypervisor.atomic import AtomicWords
from pvio.hypervisor.client_core import EventPorts
from pvio.hypervisor.domain import PAGE_SHIFT, PAGE_SIZE, SHAREABLE_FRAME_BASE
from pvio.hypervisor.errors import GrantError, HypercallError
from pvio.hypervisor.granting import GrantRefs, NoSpace
from pvio.hypervisor.wire import Op

__all__ = [
    "Channel",
    "CopySeg",
    "Domain",
    "GrantMapping",
    "LguestRegion",
    "NoSpace",
]


#: Retries of end_foreign_access for references still mapped (seconds).
DEFERRED_FIRST_RETRY = 0.01
DEFERRED_MAX_RETRY = 1.0


class Channel(Protocol):
    """What carries a domain's hypercalls and wakes it (socket or in-process)."""

    async def call(self, ops: list[Op]) -> list[Op]:
        """Run a batch; one reply op (rc, args, fds) per request op."""
        ...

    def start(self, on_push: Callable[[Op], None]) -> None: ...

    def add_reader(self, fd: int, callback: Callable[..., None], *args: object) -> None: ...

    def remove_reader(self, fd: int) -> None: ...

    async def close(self) -> None: ...


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


@dataclass
class CopySeg:
    """One GNTTABOP_copy: each side a grant reference of `domid` or a frame of ours."""

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
        # gnttab_copy's value fields in order: source.{u, domid, offset},
        # dest.{u, domid, offset}, len, flags, status.
        return _COPY.pack(
            self.source,
            self.source_domid,
            self.source_offset,
            self.dest,
            self.dest_domid,
            self.dest_offset,
            self.length,
            self.flags,
            0,
        )


@dataclass
class LguestRegion:
    region_id: int
    base: int
    nr_pages: int
    view: memoryview


@dataclass
class _Foreign:
    """The map transport's view of another domain's memory (one mmap per granter)."""

    mm: mmap.mmap
    view: memoryview
    maps: int = 0
    dead: bool = False


class PageAllocator:
    """The domain's own frames: a free list (sans-IO)."""

    def __init__(self, nr_pages: int) -> None:
        self._free = list(range(nr_pages - 1, -1, -1))

    def alloc(self, n: int) -> list[int]:
        if n > len(self._free):
            raise NoSpace(f"{n} pages wanted, {len(self._free)} free")
        out = self._free[-n:] if n else []
        del self._free[len(self._free) - n :]
        return out[::-1]

    def free(self, frames: Sequence[int]) -> None:
        self._free.extend(frames)

    @property
    def free_count(self) -> int:
        return len(self._free)


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
    return Op(wire.HYPERVISOR_grant_table_op, gt.GNTTABOP_copy, len(segs), b"".join(s.pack() for s in segs))


def _statuses(op: Op, lay_status_offset: int, size: int) -> list[int]:
    return [
        int.from_bytes(op.args[i * size + lay_status_offset : i * size + lay_status_offset + 2], "little", signed=True)
        for i in range(op.count)
    ]


def _check(reply: Op, what: str) -> Op:
    if reply.rc:
        for fd in reply.fds:
            os.close(fd)
        raise HypercallError(reply.rc, what)
    return reply


class Domain:
    """A pvio domain's handle on the hypervisor (see the module notes)."""

    def __init__(
        self,
        channel: Channel,
        domid: int,
        name: str,
        nr_pages: int,
        transport: str,
        mem_fd: int,
        gnttab_fd: int,
        max_grant_frames: int,
    ) -> None:
        self.channel = channel
        self.domid = domid
        self.name = name
        self.nr_pages = nr_pages
        self.transport = transport
        self._mem_fd = mem_fd
        self._mm = mmap.mmap(mem_fd, nr_pages * PAGE_SIZE)
        self.memory = memoryview(self._mm)
        self._gnt_fd = gnttab_fd
        self._gnt_mm = mmap.mmap(gnttab_fd, max_grant_frames * PAGE_SIZE)
        self._gnt_view = memoryview(self._gnt_mm)
        self._atomic = AtomicWords(self._gnt_view)
        self.gnttab = GrantRefs(self._gnt_view, self._atomic, 1, max_grant_frames)
        self.pages = PageAllocator(nr_pages)
        self.ports = EventPorts()
        self._waiters: dict[int, list[asyncio.Future[None]]] = {}
        self._foreign: dict[int, _Foreign] = {}
        self.regions: dict[int, LguestRegion] = {}
        self._shareable: dict[int, tuple[mmap.mmap, memoryview]] = {}
        self._region_mms: list[mmap.mmap] = []
        self._irq_handler: Callable[[int], None] | None = None
        self._irq_waiters: list[asyncio.Future[int]] = []
        self.dead_domains: set[int] = set()
        #: Called with a domid when that domain is torn down (domain 0 hears of all).
        self.on_domain_dead: Callable[[int], None] | None = None
        #: Hypercall round trips made (one per batch).
        self.round_trips = 0
        self._sends: set[asyncio.Future[None]] = set()
        self._deferred_timer: asyncio.TimerHandle | None = None
        self.closed = False
        channel.start(self._on_push)

    @property
    def gnttab_fd(self) -> int:
        """The grant table's memfd (for a C granter sharing this domain's table)."""
        return self._gnt_fd

    @property
    def memory_fd(self) -> int:
        """This domain's memory memfd."""
        return self._mem_fd

    # -- own memory ----------------------------------------------------------------

    def frame(self, frame: int) -> memoryview:
        if frame >= SHAREABLE_FRAME_BASE and frame in self._shareable:
            return self._shareable[frame][1]
        if not 0 <= frame < self.nr_pages:
            raise IndexError(f"frame {frame} outside memory")
        return self.memory[frame << PAGE_SHIFT : (frame + 1) << PAGE_SHIFT]

    async def alloc_shareable_pages(self, n: int) -> list[int]:
        """N pages that another domain can map without reaching the rest of our memory.

        Each is a one-page memfd of its own (frame numbers from SHAREABLE_FRAME_BASE).
        Put shared rings here: a backend of either transport maps them live.
        """
        args = wire.PVIO_SHAREABLE.pack(nr_frames=n)
        (reply,) = await self._call([Op(wire.PVIO_HYPERVISOR_domctl, wire.PVIO_DOMCTL_alloc_shareable, 1, args)])
        _check(reply, "PVIO_DOMCTL_alloc_shareable")
        first: int = wire.PVIO_SHAREABLE.unpack(reply.args)["first_frame"]
        frames = list(range(first, first + len(reply.fds)))
        for frame, fd in zip(frames, reply.fds, strict=True):
            try:
                mm = mmap.mmap(fd, PAGE_SIZE)
            finally:
                os.close(fd)
            self._shareable[frame] = (mm, memoryview(mm))
        return frames

    def alloc_pages(self, n: int) -> list[int]:
        return self.pages.alloc(n)

    def free_pages(self, frames: Sequence[int]) -> None:
        self.pages.free(frames)

    # -- raw hypercalls -----------------------------------------------------------------

    async def hypercall(self, ops: list[Op]) -> list[Op]:
        """Send a raw batch (a multicall); one reply op per op."""
        return await self._call(ops)

    async def _call(self, ops: list[Op]) -> list[Op]:
        self.round_trips += 1
        return await self.channel.call(ops)

    # -- granting (local, plus setup_table to grow) ---------------------------------------

    async def grow_grant_table(self, count: int) -> None:
        """Make sure `count` references can be allocated (GNTTABOP_setup_table if needed)."""
        extra = self.gnttab.frames_to_grow(count)
        if not extra:
            return
        nr = self.gnttab.nr_frames + extra
        args = gt.GNTTAB_SETUP_TABLE.pack(dom=DOMID_SELF, nr_frames=nr)
        (reply,) = await self._call(
            [Op(wire.HYPERVISOR_grant_table_op, gt.GNTTABOP_setup_table, 1, args)]
        )
        _check(reply, "GNTTABOP_setup_table")
        status = gt.GNTTAB_SETUP_TABLE.unpack(reply.args)["status"]
        if status != gt.GNTST_okay:
            raise GrantError(status, "GNTTABOP_setup_table", "nr_frames")
        self.gnttab.grow(nr)

    async def grant_access(self, domid: int, frames: Sequence[int], readonly: bool = False) -> list[int]:
        """Grant `domid` access to our `frames`; returns the references."""
        await self.grow_grant_table(len(frames))
        return [self.gnttab.grant_foreign_access(domid, f, readonly) for f in frames]

    def end_access(self, refs: Sequence[int], on_freed: Callable[[int], None] | None = None) -> list[bool]:
        """End access to each ref; False where it is still mapped (freed when unmapped).

        A reference still mapped is retried from the event loop (after 10 ms, backing off
        to 1 s) until the mapping ends; then it is freed and `on_freed(ref)` runs.
        """
        done = [self.gnttab.end_foreign_access(ref, on_freed) for ref in refs]
        if not all(done):
            self._schedule_deferred(DEFERRED_FIRST_RETRY)
        return done

    def _schedule_deferred(self, delay: float) -> None:
        if self._deferred_timer is None and not self.closed:
            loop = asyncio.get_running_loop()
            self._deferred_timer = loop.call_later(delay, self._retry_deferred, delay)

    def _retry_deferred(self, delay: float) -> None:
        self._deferred_timer = None
        self.gnttab.poll_deferred()
        if self.gnttab.deferred:
            self._schedule_deferred(min(delay * 2, DEFERRED_MAX_RETRY))

    async def query_size(self, dom: int = DOMID_SELF) -> dict[str, int]:
        args = gt.GNTTAB_QUERY_SIZE.pack(dom=dom)
        (reply,) = await self._call([Op(wire.HYPERVISOR_grant_table_op, gt.GNTTABOP_query_size, 1, args)])
        return gt.GNTTAB_QUERY_SIZE.unpack(_check(reply, "GNTTABOP_query_size").args)

    # -- mapping -------------------------------------------------------------------------------

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
        replies = await self._call(ops)
        map_reply = _check(replies[0], "GNTTABOP_map_grant_ref")
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
        (reply,) = await self._call([Op(wire.PVIO_HYPERVISOR_domctl, wire.PVIO_DOMCTL_page_fd, len(ms), args)])
        _check(reply, "PVIO_DOMCTL_page_fd")
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
                self.pages.free([m.bounce_frame])
                m.bounce_frame = -1
        for fd in fds:
            os.close(fd)
        if failed:  # pragma: no cover - the hypervisor broke its promise
            await self._call([_unmap_op([m.handle for m in failed])])
            for m in failed:
                m.status, m.handle, m.view = gt.GNTST_general_error, -1, None

    async def _raise_on_failure(self, out: list[GrantMapping], what: str) -> None:
        bad = next((m for m in out if m.status != gt.GNTST_okay), None)
        if bad is None:
            return
        await self.unmap_grants([m for m in out if m.status == gt.GNTST_okay])
        raise GrantError(bad.status, what, f"ref {bad.ref}")

    async def _map_by_copy(self, domid: int, refs: Sequence[int], readonly: list[bool]) -> list[GrantMapping]:
        frames = self.pages.alloc(len(refs))
        segs = [CopySeg.from_grant(domid, ref, f) for ref, f in zip(refs, frames, strict=True)]
        replies = await self._call([_map_op(domid, refs, readonly), _copy_op(segs)])
        map_reply = _check(replies[0], "GNTTABOP_map_grant_ref")
        copy_reply = _check(replies[1], "GNTTABOP_copy")
        copy_status = _statuses(copy_reply, gt.GNTTAB_COPY.offset("status"), gt.GNTTAB_COPY.size)
        out = []
        for i, (ref, (_, _, _, _, status, handle, bus)) in enumerate(
            zip(refs, _MAP.iter_unpack(map_reply.args), strict=True)
        ):
            m = GrantMapping(domid, ref, readonly[i], status, handle, bounce_frame=frames[i], frame=bus >> PAGE_SHIFT)
            if m.status == gt.GNTST_okay and copy_status[i] != gt.GNTST_okay:
                m.status = copy_status[i]
                await self._call([_unmap_op([m.handle])])
            if m.status == gt.GNTST_okay:
                view = self.frame(frames[i])
                m.view = view.toreadonly() if readonly[i] else view
            else:
                self.pages.free([frames[i]])
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
        replies = await self._call(ops)
        reply = _check(replies[-1], "GNTTABOP_unmap_grant_ref")
        statuses = _statuses(reply, gt.GNTTAB_UNMAP_GRANT_REF.offset("status"), gt.GNTTAB_UNMAP_GRANT_REF.size)
        for m in live:
            if m.view is not None:
                m.view.release()
                m.view = None
            if m.page_mm is not None:
                _close_mmap(m.page_mm)
                m.page_mm = None
            m.handle = -1
            if m.bounce_frame >= 0:
                self.pages.free([m.bounce_frame])
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
        try:
            foreign.mm.close()
        except BufferError:  # a caller kept a slice: the GC closes it
            pass

    # -- copying ---------------------------------------------------------------------------------

    async def copy(self, segs: Sequence[CopySeg]) -> list[int]:
        """GNTTABOP_copy, batched: one round trip; returns a GNTST status per segment."""
        if not segs:
            return []
        (reply,) = await self._call([_copy_op(segs)])
        return _statuses(_check(reply, "GNTTABOP_copy"), gt.GNTTAB_COPY.offset("status"), gt.GNTTAB_COPY.size)

    # -- event channels ---------------------------------------------------------------------------

    async def _evtchn(self, cmd: int, args: bytes) -> Op:
        (reply,) = await self._call([Op(wire.HYPERVISOR_event_channel_op, cmd, 1, args)])
        return _check(reply, f"EVTCHNOP {cmd}")

    async def alloc_unbound(self, remote_dom: int) -> int:
        reply = await self._evtchn(
            ev.EVTCHNOP_alloc_unbound, ev.EVTCHN_ALLOC_UNBOUND.pack(dom=DOMID_SELF, remote_dom=remote_dom)
        )
        port: int = ev.EVTCHN_ALLOC_UNBOUND.unpack(reply.args)["port"]
        self._add_port(port, reply.fds[0])
        return port

    async def bind_interdomain(self, remote_dom: int, remote_port: int) -> int:
        reply = await self._evtchn(
            ev.EVTCHNOP_bind_interdomain,
            ev.EVTCHN_BIND_INTERDOMAIN.pack(remote_dom=remote_dom, remote_port=remote_port),
        )
        port: int = ev.EVTCHN_BIND_INTERDOMAIN.unpack(reply.args)["local_port"]
        self._add_port(port, reply.fds[0], reply.fds[1])
        return port

    def _add_port(self, port: int, rx_fd: int, tx_fd: int = -1) -> None:
        for fd in self.ports.remove(port):
            self.channel.remove_reader(fd)
            os.close(fd)
        self.ports.add(port, rx_fd, tx_fd)
        self.channel.add_reader(rx_fd, self._on_eventfd, port, rx_fd)

    # The hot path of an event: notify() writes 1 to the peer port's eventfd, one system
    # call and no hypervisor.  The receiving loop has the port's eventfd registered with
    # add_reader; when it fires, the count is drained (the pending bit as the kernel sees
    # it) and, unless the port is masked, the handler runs right there in the callback.
    def notify(self, port: int) -> None:
        st = self.ports.ports.get(port)
        if st is None:
            raise HypercallError(-errno.EINVAL, f"d{self.domid} has no port {port}", "port")
        if st.tx_fd < 0:
            # Bound, but the PORT_BOUND push has not been read yet: ask the hypervisor.
            task = asyncio.ensure_future(self.send_via_hypervisor(port))
            self._sends.add(task)
            task.add_done_callback(self._sends.discard)
            return
        os.eventfd_write(st.tx_fd, 1)

    async def send_via_hypervisor(self, port: int) -> None:
        await self._evtchn(ev.EVTCHNOP_send, ev.EVTCHN_SEND.pack(port=port))

    def _on_eventfd(self, port: int, fd: int) -> None:
        try:
            os.eventfd_read(fd)
        except OSError:
            return
        self._deliver(port)

    def _deliver(self, port: int) -> None:
        st = self.ports.ports.get(port)
        if st is None:
            return
        if st.masked:
            st.pending = True
            return
        if st.handler is not None:
            st.handler(port)
        woke = False
        if self._waiters:
            for fut in self._waiters.pop(port, ()):
                if not fut.done():
                    fut.set_result(None)
                    woke = True
        if not woke:
            st.latched = True

    def set_handler(self, port: int, handler: Callable[[int], None] | None) -> None:
        self.ports.ports[port].handler = handler

    async def wait_event(self, port: int) -> None:
        """Wait for an event on `port`; returns at once if one came since the last wait."""
        if port not in self.ports.ports:
            raise HypercallError(-errno.EINVAL, f"d{self.domid} has no port {port}", "port")
        st = self.ports.ports[port]
        if st.latched:  # an event came while nobody waited: it is not lost
            st.latched = False
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(port, []).append(fut)
        await fut

    def mask(self, port: int) -> None:
        self.ports.mask(port)

    def unmask(self, port: int) -> None:
        if self.ports.unmask(port):
            self._deliver(port)

    async def close_port(self, port: int) -> None:
        await self._evtchn(ev.EVTCHNOP_close, ev.EVTCHN_CLOSE.pack(port=port))
        self._forget_port(port)

    def _forget_port(self, port: int) -> None:
        for fd in self.ports.remove(port):
            self.channel.remove_reader(fd)
            os.close(fd)
        for fut in self._waiters.pop(port, []):
            if not fut.done():
                fut.cancel()

    async def evtchn_status(self, port: int, dom: int = DOMID_SELF) -> dict[str, int]:
        reply = await self._evtchn(ev.EVTCHNOP_status, ev.EVTCHN_STATUS.pack(dom=dom, port=port))
        return ev.EVTCHN_STATUS.unpack(reply.args)

    # -- pushes from the hypervisor ------------------------------------------------------------

    def _on_push(self, op: Op) -> None:
        if op.cmd == wire.PVIO_PUSH_port_bound and op.fds:
            p = wire.PVIO_PUSH_PORT.unpack(op.args)
            old = self.ports.set_tx(p["port"], op.fds[0])
            for fd in op.fds[1:]:
                os.close(fd)
            if old >= 0:
                os.close(old)
        elif op.cmd == wire.PVIO_PUSH_port_alloc and op.fds:
            p = wire.PVIO_PUSH_PORT.unpack(op.args)
            for fd in op.fds[1:]:
                os.close(fd)
            self._add_port(p["port"], op.fds[0])
        elif op.cmd == wire.PVIO_PUSH_port_unbound:
            p = wire.PVIO_PUSH_PORT.unpack(op.args)
            old = self.ports.set_tx(p["port"], -1)
            if old >= 0:
                os.close(old)
        elif op.cmd == wire.PVIO_PUSH_irq:
            irq: int = wire.PVIO_PUSH_IRQ.unpack(op.args)["irq"]
            if self._irq_handler is not None:
                self._irq_handler(irq)
            waiters, self._irq_waiters = self._irq_waiters, []
            for fut in waiters:
                if not fut.done():
                    fut.set_result(irq)
        elif op.cmd == wire.PVIO_PUSH_domain_dead:
            domid: int = wire.PVIO_PUSH_DOMAIN.unpack(op.args)["domid"]
            self.dead_domains.add(domid)
            if self.on_domain_dead is not None:
                self.on_domain_dead(domid)
            foreign = self._foreign.get(domid)
            if foreign is not None:
                foreign.dead = True
                if foreign.maps <= 0:
                    self._drop_foreign(domid)
        else:
            for fd in op.fds:
                os.close(fd)

    # -- lguest ------------------------------------------------------------------------------------

    async def lguest_region(self, nr_pages: int, base: int, region_id: int = 0) -> LguestRegion:
        """Create (region_id 0) or attach a region shared with other domains at `base`."""
        cmd = wire.PVIO_LGUEST_region_attach if region_id else wire.PVIO_LGUEST_region_create
        args = wire.PVIO_LGUEST_REGION.pack(region_id=region_id, nr_pages=nr_pages, base=base)
        (reply,) = await self._call([Op(wire.PVIO_HYPERVISOR_lguest, cmd, 1, args)])
        _check(reply, "lguest region")
        info = wire.PVIO_LGUEST_REGION.unpack(reply.args)
        try:
            mm = mmap.mmap(reply.fds[0], info["nr_pages"] * PAGE_SIZE)
        finally:
            for fd in reply.fds:
                os.close(fd)
        self._region_mms.append(mm)
        region = LguestRegion(info["region_id"], base, info["nr_pages"], memoryview(mm))
        self.regions[region.region_id] = region
        return region

    async def lguest_region_permit(self, region_id: int, peer: int) -> None:
        """Let domain `peer` attach a region this domain created (then only permitted
        domains may)."""
        args = wire.PVIO_LGUEST_REGION.pack(region_id=region_id, peer=peer)
        (reply,) = await self._call([Op(wire.PVIO_HYPERVISOR_lguest, wire.PVIO_LGUEST_region_permit, 1, args)])
        _check(reply, "lguest region permit")

    async def lguest_region_frames(self, region_id: int, min_len: int, max_len: int, flood: int) -> None:
        """Declare that keys in a region this domain created carry frames of
        min_len..max_len bytes, and that more than `flood` drops a second from one
        sender is a flood (PVIO_LGUEST_region_frames)."""
        args = wire.PVIO_LGUEST_FRAMES.pack(region_id=region_id, min_len=min_len, max_len=max_len, flood=flood)
        (reply,) = await self._call([Op(wire.PVIO_HYPERVISOR_lguest, wire.PVIO_LGUEST_region_frames, 1, args)])
        _check(reply, "lguest region frames")

    def phys(self, addr: int, length: int) -> memoryview:
        """A view of [addr, addr+length) of this domain's lguest physical space."""
        if addr >= 0 and addr + length <= self.nr_pages * PAGE_SIZE:
            return self.memory[addr : addr + length]
        for r in self.regions.values():
            if r.base <= addr and addr + length <= r.base + r.nr_pages * PAGE_SIZE:
                return r.view[addr - r.base : addr - r.base + length]
        raise IndexError(f"address {addr:#x}+{length} outside d{self.domid}")

    async def _lhcall(self, cmd: int, a1: int, a2: int, a3: int = 0) -> int:
        args = wire.PVIO_LHCALL.pack(arg1=a1, arg2=a2, arg3=a3)
        (reply,) = await self._call([Op(wire.PVIO_HYPERVISOR_lguest, cmd, 1, args)])
        ret: int = wire.PVIO_LHCALL.unpack(_check(reply, f"LHCALL {cmd}").args)["ret"]
        return ret

    async def bind_dma(self, key: int, dmas: int, count: int, irq: int) -> None:
        await self._lhcall(LHCALL_BIND_DMA, key, dmas, (count << 8) | irq)

    async def unbind_dma(self, key: int, dmas: int) -> None:
        await self._lhcall(LHCALL_BIND_DMA, key, dmas, 0)

    async def send_dma(self, key: int, dma: int) -> int:
        """SEND_DMA; returns the bytes copied (also written into the dma's used_len)."""
        return await self._lhcall(LHCALL_SEND_DMA, key, dma)

    async def send_dma_many(self, sends: Sequence[tuple[int, int]]) -> list[int]:
        """Several SEND_DMA(key, dma) in one batch (one round trip): for each, the bytes
        copied, or the -errno it was refused with."""
        ops = [Op(wire.PVIO_HYPERVISOR_lguest, LHCALL_SEND_DMA, 1, wire.PVIO_LHCALL.pack(arg1=k, arg2=d))
               for k, d in sends]
        out: list[int] = []
        for reply in await self._call(ops):
            out.append(reply.rc if reply.rc else int(wire.PVIO_LHCALL.unpack(reply.args)["ret"]))
        return out

    def set_irq_handler(self, handler: Callable[[int], None] | None) -> None:
        self._irq_handler = handler

    async def wait_irq(self) -> int:
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._irq_waiters.append(fut)
        return await fut

    # -- the end ------------------------------------------------------------------------------------

    async def close(self) -> None:
        """Leave: the hypervisor tears the domain down when the channel closes."""
        if self.closed:
            return
        self.closed = True
        if self._deferred_timer is not None:
            self._deferred_timer.cancel()
            self._deferred_timer = None
        for port in list(self.ports.ports):
            self._forget_port(port)
        await self.channel.close()
        for domid in list(self._foreign):
            self._drop_foreign(domid)
        for r in self.regions.values():
            r.view.release()
        for mm in self._region_mms:
            _close_mmap(mm)
        self.regions.clear()
        for mm, view in self._shareable.values():
            view.release()
            _close_mmap(mm)
        self._shareable.clear()
        self._atomic.release()
        self._gnt_view.release()
        _close_mmap(self._gnt_mm)
        self.memory.release()
        _close_mmap(self._mm)
        os.close(self._mem_fd)
        os.close(self._gnt_fd)


def _close_mmap(mm: mmap.mmap) -> None:
    try:
        mm.close()
    except BufferError:  # a caller kept a view: the GC closes it
        pass


async def create_domain(
    channel: Channel,
    name: str,
    nr_pages: int,
    *,
    transport: str = "map",
    max_grant_frames: int = 64,
    domid: int | None = None,
) -> Domain:
    """Become a new domain over `channel` (PVIO_DOMCTL_createdomain)."""
    from pvio.hypervisor.session import createdomain_op

    (reply,) = await channel.call([createdomain_op(name, nr_pages, max_grant_frames, transport, domid)])
    _check(reply, "PVIO_DOMCTL_createdomain")
    a = wire.PVIO_CREATEDOMAIN.unpack(reply.args)
    return Domain(channel, a["domid"], name, nr_pages, transport, reply.fds[0], reply.fds[1], max_grant_frames)
