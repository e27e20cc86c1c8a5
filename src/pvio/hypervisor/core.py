"""The hypervisor core: the domain table and the dispatch of batched hypercalls.

Theory of operation
-------------------
`Hypervisor` is synchronous and does no I/O of its own: the adapter
(`pvio.hypervisor.daemon`, or `pvio.hypervisor.inprocess`) hands it decoded ops for a
domain and gets back replies (rc, argument structs with OUT fields, descriptors to pass)
and, from `take_pushes`, messages to send to other domains.  Memory and eventfds come
from the injected `Platform`.

A batch runs op by op, in order, like a Xen multicall: each op's failure is in its own
rc or GNTST status and never stops the others.  Argument structs are unpacked into
dicts (a copy), so nothing a domain changes later can reach an op in flight.

Domain teardown (`destroy_domain`, called when a domain's connection closes) is the
one place where everything a domain holds is given back, in this order: its mappings of
others are unmapped (pins released), its ports closed with the peers told, its DMA
bindings and region attachments dropped, and the release hooks run (XenStore fires
@releaseDomain from one).  Its own grants die with it: a dying domain's table is no
longer honoured.  If other domains still map its pages, it stays a zombie, memory
intact, until the last of those mappings is unmapped, as a dying Xen domain waits for
its pages to be released; nothing of a zombie is ever handed to anyone new.

Everything a domain makes the hypervisor hold is charged to `Accounts` before it is
made and given back when it goes: its memfds, its ports' eventfds, its shareable frames
and regions, and the pages of each; a request past a bound fails with that bound's errno
(see `pvio.hypervisor.accounts`) and nothing else changes.

Domain ids are allocated upward from 1 and not reused until they wrap, so that a stale
domid in someone's hands does not name a new domain; 0 is given only on request (the
control/driver domain, the only privileged one).
"""

from __future__ import annotations

import errno
import logging
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pvio.abi import event_channel as ev
from pvio.abi import grant_table as gt
from pvio.abi.grant_table import DOMID_FIRST_RESERVED, DOMID_INVALID, DOMID_SELF
from pvio.abi.layout import Layout, scalar_names
from pvio.abi.lguest import LHCALL_BIND_DMA, LHCALL_SEND_DMA
from pvio.hypervisor import wire
from pvio.hypervisor.accounts import BOUND_ERRNOS, Accounts, HostLimits, RefusalLog
from pvio.hypervisor.atomic import AtomicWords
from pvio.hypervisor.domain import (
    DEFAULT_MAX_GRANT_FRAMES,
    MAX_DOMAIN_PAGES,
    MAX_GRANT_FRAMES_LIMIT,
    MAX_SHAREABLE_FRAMES,
    PAGE_SIZE,
    SHAREABLE_FRAME_BASE,
    DomainRecord,
    FrameRule,
    Platform,
    Region,
)
from pvio.hypervisor.dominfo import getdomaininfo
from pvio.hypervisor.errors import HypercallError
from pvio.hypervisor.event_channel import EventChannels
from pvio.hypervisor.grant_table import GrantTables
from pvio.hypervisor.lguest_dma import LguestDma
from pvio.hypervisor.wire import Op
from pvio.trace import TRACE

log = logging.getLogger("pvio.hypervisor")

_U64 = struct.Struct("<Q")
MAX_REGION_PAGES = 1024
#: Shared regions one domain may have attached at once.
MAX_REGIONS_PER_DOMAIN = 8


@dataclass
class Push:
    """A message for domain `domid` (sent by the adapter as a FRAME_PUSH)."""

    domid: int
    op: Op


@dataclass
class Reply:
    rc: int
    args: bytes
    fds: list[int] = field(default_factory=list)


class Hypervisor:
    def __init__(
        self,
        platform: Platform,
        dup: Callable[[int], int],
        *,
        limits: HostLimits | None = None,
        close_dup: Callable[[int], None] | None = None,
    ) -> None:
        self.platform = platform
        #: Duplicates of our descriptors for a reply or push; the adapter closes them
        #: once sent, and `close_dup` closes those that cannot be (their domain died).
        self.dup = dup
        self.close_dup = close_dup if close_dup is not None else platform.close_fd
        self.accounts = Accounts(limits if limits is not None else HostLimits())
        self.refusals = RefusalLog(log)
        self.domains: dict[int, DomainRecord] = {}
        self.zombies: dict[int, DomainRecord] = {}
        self.regions: dict[int, Region] = {}
        self._next_domid = 1
        self._next_region = 1
        #: Called with the domid of each domain torn down (XenStore's @releaseDomain).
        self.release_hooks: list[Callable[[int], None]] = []
        self.grants = GrantTables(self.domains.get)
        self.evtchn = EventChannels(self.domains.get, platform, dup, self.accounts, self.close_dup)
        self.lguest = LguestDma(self.regions)
        self._pushes: list[Push] = []
        self._grant_ops: dict[int, tuple[Layout, Callable[[DomainRecord, dict[str, Any]], Any]]] = {
            gt.GNTTABOP_map_grant_ref: (gt.GNTTAB_MAP_GRANT_REF, self.grants.map_grant_ref),
            gt.GNTTABOP_unmap_grant_ref: (gt.GNTTAB_UNMAP_GRANT_REF, self._unmap),
            gt.GNTTABOP_setup_table: (gt.GNTTAB_SETUP_TABLE, self.grants.setup_table),
            gt.GNTTABOP_dump_table: (gt.GNTTAB_DUMP_TABLE, self.grants.dump_table),
            gt.GNTTABOP_transfer: (gt.GNTTAB_TRANSFER, self.grants.transfer),
            gt.GNTTABOP_query_size: (gt.GNTTAB_QUERY_SIZE, self.grants.query_size),
            gt.GNTTABOP_unmap_and_replace: (gt.GNTTAB_UNMAP_AND_REPLACE, self._unmap_and_replace),
        }
        self._evtchn_ops: dict[int, tuple[Layout, Callable[[DomainRecord, dict[str, Any]], Any]]] = {
            ev.EVTCHNOP_alloc_unbound: (ev.EVTCHN_ALLOC_UNBOUND, self.evtchn.alloc_unbound),
            ev.EVTCHNOP_bind_interdomain: (ev.EVTCHN_BIND_INTERDOMAIN, self.evtchn.bind_interdomain),
            ev.EVTCHNOP_send: (ev.EVTCHN_SEND, self.evtchn.send),
            ev.EVTCHNOP_close: (ev.EVTCHN_CLOSE, self.evtchn.close),
            ev.EVTCHNOP_status: (ev.EVTCHN_STATUS, self.evtchn.status),
            ev.EVTCHNOP_unmask: (ev.EVTCHN_UNMASK, self.evtchn.unmask),
        }

    # -- domains ----------------------------------------------------------------

    def create_domain(
        self,
        name: str,
        nr_pages: int,
        *,
        max_grant_frames: int = DEFAULT_MAX_GRANT_FRAMES,
        transport: str = "map",
        domid: int | None = None,
    ) -> DomainRecord:
        if not 0 < nr_pages <= MAX_DOMAIN_PAGES:
            raise HypercallError(-errno.EINVAL, f"nr_pages {nr_pages}", "nr_pages")
        if not 0 < max_grant_frames <= MAX_GRANT_FRAMES_LIMIT:
            raise HypercallError(-errno.EINVAL, "max_grant_frames", "max_grant_frames")
        if transport not in ("map", "copy"):
            raise HypercallError(-errno.EINVAL, f"transport {transport!r}", "flags")
        if domid is None:
            domid = self._alloc_domid()
        elif domid in self.domains or domid in self.zombies or domid >= DOMID_FIRST_RESERVED:
            raise HypercallError(-errno.EEXIST, f"domid {domid} is taken", "domid")
        try:
            self.accounts.charge_domain(domid, name, nr_pages + max_grant_frames)
        except HypercallError as exc:
            self.refusals.refused(exc)
            raise
        try:
            mem_fd, memory = self.platform.new_memory(nr_pages, f"pvio-d{domid}-memory")
            try:
                gnt_fd, gnttab = self.platform.new_memory(max_grant_frames, f"pvio-d{domid}-gnttab")
            except BaseException:
                self.platform.free_memory(mem_fd, memory)
                raise
        except BaseException:
            self.accounts.release_domain(nr_pages + max_grant_frames)
            raise
        d = DomainRecord(domid, name, nr_pages, mem_fd, memory, gnt_fd, gnttab, max_grant_frames)
        d.gnttab_atomic = AtomicWords(gnttab)
        d.transport = transport
        d.max_evtchn_port = self.accounts.max_evtchn_port(domid)
        self.domains[domid] = d
        log.info("created d%d %r: %d pages, %s transport", domid, name, nr_pages, transport)
        return d

    def _alloc_domid(self) -> int:
        for _ in range(DOMID_FIRST_RESERVED):
            domid = self._next_domid
            self._next_domid = domid + 1 if domid + 1 < DOMID_FIRST_RESERVED else 1
            if domid not in self.domains and domid not in self.zombies:
                return domid
        raise HypercallError(-errno.ENOSPC, "no free domid")

    def lookup(self, domid: int) -> DomainRecord | None:
        return self.domains.get(domid)

    # T:390 Tearing a domain down
    # When a domain's connection closes, everything it holds is given back: its mappings
    # of other domains' grants are unmapped (their GTF_reading/writing cleared), its
    # event channels closed (each peer's port becomes unbound and is signalled), its DMA
    # bindings and shared regions dropped, and the release hooks run (XenStore's
    # @releaseDomain).  If others still map its pages it lingers as a zombie until they
    # unmap; its memory is never reused, so their views stay valid and harmless.  The
    # test suite checks after every scenario that all of this left the tables empty.
    # :T
    def destroy_domain(self, domid: int) -> None:
        d = self.domains.pop(domid, None)
        if d is None:
            return
        d.dying = True
        granters = {rec.granter for rec in d.maptrack.values()}
        self.grants.unmap_all(d)
        for granter in granters:
            self._reap(granter)
        self.evtchn.close_all(d)
        d.dma.clear()
        for region in list(d.regions.values()):
            self._detach_region(d, region)
        self._pushes = [p for p in self._pushes if p.domid != domid]
        self.lguest.forget(domid)
        for other in self.domains.values():
            # The control domain hears of every death (the toolstack's @releaseDomain);
            # mappers of the dead domain's memory or grants hear of it to drop their
            # mappings (xenstored maps every domain's XenStore page: Xen's VIRQ_DOM_EXC).
            if domid in other.mem_fds_given or other.domid == 0 or any(
                    rec.granter is d for rec in other.maptrack.values()):
                other.mem_fds_given.discard(domid)
                args = wire.PVIO_PUSH_DOMAIN.pack(domid=domid)
                self._pushes.append(
                    Push(other.domid, Op(wire.PVIO_HYPERVISOR_push, wire.PVIO_PUSH_domain_dead, 1, args))
                )
        for hook in list(self.release_hooks):
            try:
                hook(domid)
            except Exception:  # a hook's bug must not stop the teardown
                log.exception("release hook failed for d%d", domid)
        if d.foreign_maps:
            self.zombies[domid] = d
            log.info("d%d is a zombie: %d pages still mapped", domid, d.foreign_maps)
        else:
            self._free(d)

    def _free(self, d: DomainRecord) -> None:
        if d.gnttab_atomic is not None:
            d.gnttab_atomic.release()
            d.gnttab_atomic = None
        d.active.clear()
        self.platform.free_memory(d.mem_fd, d.memory)
        self.platform.free_memory(d.gnttab_fd, d.gnttab)
        for fd, view in d.shareable.values():
            self.platform.free_memory(fd, view)
        self.accounts.release_fds(d, len(d.shareable))
        self.accounts.release_pages(d, len(d.shareable))
        self.accounts.release_domain(d.nr_pages + d.max_grant_frames)
        d.shareable.clear()
        log.info("freed d%d", d.domid)

    def _reap(self, granter: DomainRecord) -> None:
        if granter.dying and granter.foreign_maps == 0 and self.zombies.pop(granter.domid, None) is not None:
            self._free(granter)

    def _unmap(self, caller: DomainRecord, op: dict[str, Any]) -> None:
        rec = self.grants.unmap_grant_ref(caller, op)
        if rec is not None:
            self._reap(rec.granter)

    def _unmap_and_replace(self, caller: DomainRecord, op: dict[str, Any]) -> None:
        rec = self.grants.unmap_and_replace(caller, op)
        if rec is not None:
            self._reap(rec.granter)

    def is_empty(self) -> bool:
        """No domain, zombie, region, queued push or charge left (the leak check)."""
        return not (self.domains or self.zombies or self.regions or self._pushes) and self.accounts.is_empty()

    def has_pushes(self) -> bool:
        return bool(self._pushes or self.evtchn.pushes or self.lguest.pushes)

    def take_pushes(self) -> list[Push]:
        out = self._pushes
        self._pushes = []
        for p in self.evtchn.pushes:
            args = wire.PVIO_PUSH_PORT.pack(port=p.port, remote_dom=p.remote_dom, remote_port=p.remote_port)
            if p.allocated:
                cmd = wire.PVIO_PUSH_port_alloc
            else:
                cmd = wire.PVIO_PUSH_port_bound if p.bound else wire.PVIO_PUSH_port_unbound
            out.append(Push(p.domid, Op(wire.PVIO_HYPERVISOR_push, cmd, 1, args, nr_fds=len(p.fds), fds=p.fds)))
        self.evtchn.pushes.clear()
        raised: set[tuple[int, int]] = set()
        for irq in self.lguest.pushes:
            # An irq raised twice before its domain ran is one interrupt (lguest kept a
            # pending bit per irq): a batch that fills six buffers pushes it once.
            if (irq.domid, irq.irq) in raised:
                continue
            raised.add((irq.domid, irq.irq))
            args = wire.PVIO_PUSH_IRQ.pack(irq=irq.irq)
            out.append(Push(irq.domid, Op(wire.PVIO_HYPERVISOR_push, wire.PVIO_PUSH_irq, 1, args)))
        self.lguest.pushes.clear()
        live: list[Push] = []
        for push in out:
            if push.domid in self.domains:
                live.append(push)
            else:  # its domain died meanwhile: the descriptors it carried are ours to close
                for fd in push.op.fds:
                    self.close_dup(fd)
        return live

    # -- hypercalls ---------------------------------------------------------------

    def execute(self, domid: int, ops: list[Op]) -> list[Reply]:
        """Run a batch for domain `domid`, op by op; one reply per op."""
        d = self.domains.get(domid)
        if d is None:
            return [Reply(-errno.ESRCH, b"") for _ in ops]
        d.hypercall_frames += 1
        d.hypercall_ops += len(ops)
        t0 = time.monotonic_ns() if TRACE.on else 0  # a batch, as `pvio trace` shows it
        replies = [self._execute_one(d, op) for op in ops]
        if t0:
            TRACE.span(f"hypercall batch: {', '.join(sorted({wire.op_name(op) for op in ops}))}",
                       "hypervisor", t0, args={"domid": domid, "ops": len(ops)})
        return replies

    def _execute_one(self, d: DomainRecord, op: Op) -> Reply:
        try:
            if op.hypercall == wire.HYPERVISOR_grant_table_op:
                return self._grant_op(d, op)
            if op.hypercall == wire.HYPERVISOR_event_channel_op:
                return self._single(d, op, self._evtchn_ops)
            if op.hypercall == wire.PVIO_HYPERVISOR_domctl:
                return self._domctl(d, op)
            if op.hypercall == wire.PVIO_HYPERVISOR_lguest:
                return self._lguest(d, op)
            return Reply(-errno.ENOSYS, op.args)
        except HypercallError as exc:
            if exc.rc in BOUND_ERRNOS:
                self.refusals.refused(exc)
            else:
                log.debug("d%d: %s", d.domid, exc)
            return Reply(exc.rc, op.args)
        except OSError as exc:  # out of descriptors or memory: the op fails, we go on
            log.warning("d%d: %s", d.domid, exc)
            return Reply(-(exc.errno or errno.EIO), op.args)

    def _grant_op(self, d: DomainRecord, op: Op) -> Reply:
        if op.cmd == gt.GNTTABOP_copy:  # the copy transport's hot path: no dict per op
            if op.count > wire.MAX_OPS or len(op.args) != op.count * gt.GNTTAB_COPY.size:
                return Reply(-errno.EINVAL, op.args)
            return Reply(0, self.grants.copy_batch(d, op.args))
        entry = self._grant_ops.get(op.cmd)
        if entry is None:
            return Reply(-errno.ENOSYS, op.args)
        layout, handler = entry
        if op.count > wire.MAX_OPS or len(op.args) != op.count * layout.size:
            return Reply(-errno.EINVAL, op.args)
        # The hot path of a batch: the layout's precompiled Struct, one dict per op.
        names = scalar_names(layout)
        packer = layout.packer
        out: list[bytes] = []
        extra: list[bytes] = []
        for values in packer.iter_unpack(op.args):
            args = dict(zip(names, values, strict=True))
            result = handler(d, args)
            out.append(packer.pack(*[args[n] for n in names]))
            if op.cmd == gt.GNTTABOP_setup_table:
                extra.append(b"".join(_U64.pack(f) for f in result))
        return Reply(0, b"".join(out) + b"".join(extra))

    def _single(
        self, d: DomainRecord, op: Op, table: dict[int, tuple[Layout, Callable[[DomainRecord, dict[str, Any]], Any]]]
    ) -> Reply:
        entry = table.get(op.cmd)
        if entry is None:
            return Reply(-errno.ENOSYS, op.args)
        layout, handler = entry
        if op.count != 1 or len(op.args) != layout.size:
            return Reply(-errno.EINVAL, op.args)
        args = layout.unpack(op.args)
        fds = handler(d, args) or []
        return Reply(0, layout.pack(**args), list(fds))

    def _domctl(self, d: DomainRecord, op: Op) -> Reply:
        if op.cmd == wire.PVIO_DOMCTL_alloc_shareable:
            return self._alloc_shareable(d, op)
        if op.cmd == wire.PVIO_DOMCTL_page_fd:
            return self._page_fd(d, op)
        if op.cmd == wire.PVIO_DOMCTL_getdomaininfo:
            return Reply(*getdomaininfo(d, self.domains, self.zombies, op.count, op.args))
        if op.cmd != wire.PVIO_DOMCTL_memory_fd:
            return Reply(-errno.ENOSYS, op.args)
        lay = wire.PVIO_MEMORY_FD
        if op.count != 1 or len(op.args) != lay.size:
            return Reply(-errno.EINVAL, op.args)
        args = lay.unpack(op.args)
        target = d if args["domid"] in (DOMID_SELF, d.domid) else self.domains.get(args["domid"])
        if target is None:
            return Reply(-errno.ESRCH, op.args)
        # Who may hold another domain's memory: the domain itself, and a map-transport
        # domain that currently maps at least one of its grants (asked after the map, in
        # the same batch).  A copy-transport domain never receives another's memory.
        if target is not d:
            if d.transport != "map":
                return Reply(-errno.EPERM, op.args)
            if not any(rec.granter is target for rec in d.maptrack.values()):
                return Reply(-errno.EPERM, op.args)
            d.mem_fds_given.add(target.domid)
        args["nr_pages"] = target.nr_pages
        return Reply(0, lay.pack(**args), [self.dup(target.mem_fd)])

    def _alloc_shareable(self, d: DomainRecord, op: Op) -> Reply:
        lay = wire.PVIO_SHAREABLE
        if op.count != 1 or len(op.args) != lay.size:
            return Reply(-errno.EINVAL, op.args)
        a = lay.unpack(op.args)
        n = a["nr_frames"]
        if not 0 < n <= min(wire.MAX_FDS, MAX_SHAREABLE_FRAMES - len(d.shareable)):
            return Reply(-errno.ENOSPC, op.args)
        self.accounts.charge_fds(d, n)
        try:
            self.accounts.charge_pages(d, n)
        except HypercallError:
            self.accounts.release_fds(d, n)
            raise
        first = SHAREABLE_FRAME_BASE + len(d.shareable)
        fds: list[int] = []
        try:
            for frame in range(first, first + n):
                fd, view = self.platform.new_memory(1, f"pvio-d{d.domid}-frame-{frame:#x}")
                d.shareable[frame] = (fd, view)
                fds.append(self.dup(fd))
        except BaseException:
            # The frames made so far stay the domain's (charged, freed with it); the
            # reply carries none of them, so the rest of the charge is given back.
            for fd in fds:
                self.close_dup(fd)
            made = len(d.shareable) - (first - SHAREABLE_FRAME_BASE)
            self.accounts.release_fds(d, n - made)
            self.accounts.release_pages(d, n - made)
            raise
        a["first_frame"] = first
        return Reply(0, lay.pack(**a), fds)

    # A shareable page's fd goes to the domain that maps it now (either transport): it is
    # that one page and nothing else, so the copy transport's promise holds.  For a
    # read-only map it is a read-only open of the page (where the platform can make one),
    # so the mapper cannot map it writable behind the grant's back.
    def _page_fd(self, d: DomainRecord, op: Op) -> Reply:
        lay = wire.PVIO_PAGE_FD
        if op.count > wire.MAX_FDS or len(op.args) != op.count * lay.size:
            return Reply(-errno.EINVAL, op.args)
        out = []
        fds = []
        mapped = {(rec.granter.domid, rec.ref): rec for rec in d.maptrack.values()}
        try:
            for i in range(op.count):
                a = lay.unpack(op.args, i * lay.size)
                rec = mapped.get((a["domid"], a["ref"]))
                if rec is None or rec.frame not in rec.granter.shareable:
                    a["status"] = -errno.EINVAL
                else:
                    a["status"] = 0
                    fds.append(self.dup(rec.granter.shareable[rec.frame][0]))
                    if rec.readonly and hasattr(self.platform, "make_readonly"):
                        self.platform.make_readonly(fds[-1])  # on failure, closed below
                out.append(lay.pack(**a))
        except BaseException:  # out of room for the descriptors: none is sent
            for fd in fds:
                self.close_dup(fd)
            raise
        return Reply(0, b"".join(out), fds)

    def _lguest(self, d: DomainRecord, op: Op) -> Reply:
        if op.cmd in (LHCALL_BIND_DMA, LHCALL_SEND_DMA):
            lay = wire.PVIO_LHCALL
            if op.count != 1 or len(op.args) != lay.size:
                return Reply(-errno.EINVAL, op.args)
            a = lay.unpack(op.args)
            bindings = [b for other in self.domains.values() for b in other.dma]
            try:
                if op.cmd == LHCALL_BIND_DMA:
                    self.lguest.bind_dma(d, a["arg1"], a["arg2"], a["arg3"] >> 8, a["arg3"] & 0xFF)
                else:
                    a["ret"] = self.lguest.send_dma(d, a["arg1"], a["arg2"], bindings)
            except HypercallError:
                self.lguest.violation(d, a["arg1"], bindings)
                raise
            return Reply(0, lay.pack(**a))
        if op.cmd == wire.PVIO_LGUEST_region_permit:
            lay = wire.PVIO_LGUEST_REGION
            if op.count != 1 or len(op.args) != lay.size:
                return Reply(-errno.EINVAL, op.args)
            a = lay.unpack(op.args)
            found = self.regions.get(a["region_id"])
            if found is None:
                return Reply(-errno.ENOENT, op.args)
            if found.creator != d.domid:
                return Reply(-errno.EPERM, op.args)
            if found.permitted is None:
                found.permitted = set()
            found.permitted.add(a["peer"])
            return Reply(0, op.args)
        if op.cmd == wire.PVIO_LGUEST_region_frames:
            flay = wire.PVIO_LGUEST_FRAMES
            if op.count != 1 or len(op.args) != flay.size:
                return Reply(-errno.EINVAL, op.args)
            f = flay.unpack(op.args)
            found = self.regions.get(f["region_id"])
            if found is None:
                return Reply(-errno.ENOENT, op.args)
            if found.creator != d.domid:
                return Reply(-errno.EPERM, op.args)
            if f["min_len"] > f["max_len"]:
                return Reply(-errno.EINVAL, op.args)
            found.frames = FrameRule(f["min_len"], f["max_len"], f["flood"])
            return Reply(0, op.args)
        if op.cmd in (wire.PVIO_LGUEST_region_create, wire.PVIO_LGUEST_region_attach):
            lay = wire.PVIO_LGUEST_REGION
            if op.count != 1 or len(op.args) != lay.size:
                return Reply(-errno.EINVAL, op.args)
            a = lay.unpack(op.args)
            if op.cmd == wire.PVIO_LGUEST_region_create:
                if not 0 < a["nr_pages"] <= MAX_REGION_PAGES:
                    return Reply(-errno.EINVAL, op.args)
                if len(d.regions) >= MAX_REGIONS_PER_DOMAIN:
                    raise HypercallError(-errno.ENOSPC, "too many regions", "region_id")
                fd, view = self._new_region_memory(d, a["nr_pages"])
                region = Region(self._next_region, a["nr_pages"], fd, view, creator=d.domid, charged_to=d)
                self._next_region += 1
                self.regions[region.region_id] = region
                a["region_id"] = region.region_id
            else:
                found = self.regions.get(a["region_id"])
                if found is None:
                    return Reply(-errno.ENOENT, op.args)
                if found.permitted is not None and d.domid not in found.permitted | {found.creator}:
                    return Reply(-errno.EPERM, op.args)
                region = found
                a["nr_pages"] = region.nr_pages
            try:
                fd = self.dup(region.fd)
                try:
                    self._attach_region(d, region, a["base"])
                except BaseException:
                    self.close_dup(fd)
                    raise
            except BaseException:
                if not region.attached:
                    self._drop_region(region)
                raise
            return Reply(0, lay.pack(**a), [fd])
        return Reply(-errno.ENOSYS, op.args)

    def _attach_region(self, d: DomainRecord, region: Region, base: int) -> None:
        end = base + region.nr_pages * PAGE_SIZE
        if base % PAGE_SIZE or base < d.nr_pages * PAGE_SIZE or end > 1 << 32:
            raise HypercallError(-errno.EINVAL, f"region base {base:#x}", "base")
        if region.region_id in d.regions:
            raise HypercallError(-errno.EEXIST, "region already attached", "region_id")
        if len(d.regions) >= MAX_REGIONS_PER_DOMAIN:
            raise HypercallError(-errno.ENOSPC, "too many regions", "region_id")
        for other in d.regions.values():
            obase = other.attached[d.domid]
            if base < obase + other.nr_pages * PAGE_SIZE and obase < end:
                raise HypercallError(-errno.EINVAL, "region overlaps another", "base")
        region.attached[d.domid] = base
        d.regions[region.region_id] = region
        d.dma_sections.clear()  # addresses above memory now resolve differently

    def _detach_region(self, d: DomainRecord, region: Region) -> None:
        region.attached.pop(d.domid, None)
        d.regions.pop(region.region_id, None)
        d.dma_sections.clear()
        if not region.attached:
            self._drop_region(region)

    def _new_region_memory(self, d: DomainRecord, nr_pages: int) -> tuple[int, memoryview]:
        self.accounts.charge_fds(d, 1)
        try:
            self.accounts.charge_pages(d, nr_pages)
        except HypercallError:
            self.accounts.release_fds(d, 1)
            raise
        try:
            return self.platform.new_memory(nr_pages, "pvio-lguest-region")
        except BaseException:
            self.accounts.release_fds(d, 1)
            self.accounts.release_pages(d, nr_pages)
            raise

    def _drop_region(self, region: Region) -> None:
        self.regions.pop(region.region_id, None)
        self.platform.free_memory(region.fd, region.view)
        if region.charged_to is not None:
            self.accounts.release_fds(region.charged_to, 1)
            self.accounts.release_pages(region.charged_to, region.nr_pages)
            region.charged_to = None


__all__ = ["DOMID_INVALID", "Hypervisor", "Push", "Reply"]
