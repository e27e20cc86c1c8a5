"""The hypervisor client conformance suite, in the manner of trio's ``check_*`` suites.

Every implementation of the `pvio.hypervisor.client.Domain` interface (the daemon over
its socket, the in-process core) must pass every ``check_*`` here.  Each check is an
async function taking a `DomainFactory`: ``await make("name", transport="map")``
returns a new connected domain.  The caller owns teardown (and checks afterwards that
the hypervisor's tables are empty).  Checks are parametrised by transport where both
must behave the same.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from pvio.abi import event_channel as ev
from pvio.abi import grant_table as gt
from pvio.abi.layout import Layout
from pvio.abi.lguest import LGUEST_DMA
from pvio.hypervisor import wire
from pvio.hypervisor.client import CopySeg, Domain
from pvio.hypervisor.domain import SHAREABLE_FRAME_BASE
from pvio.hypervisor.errors import GrantError, HypercallError
from pvio.hypervisor.wire import Op


class DomainFactory(Protocol):
    def __call__(
        self, name: str, *, transport: str = "map", nr_pages: int = 4096, domid: int | None = None
    ) -> Awaitable[Domain]: ...


TRANSPORTS = ("map", "copy")


def _fail(msg: str) -> AssertionError:
    return AssertionError(msg)


async def _expect_rc(coro: Awaitable[Any], rc: int) -> None:
    try:
        await coro
    except HypercallError as exc:
        if exc.rc != rc:
            raise _fail(f"expected rc {rc}, got {exc.rc}") from exc
        return
    raise _fail(f"expected rc {rc}, got success")


async def check_domains(make: DomainFactory) -> None:
    a = await make("alpha", nr_pages=64)
    b = await make("beta", nr_pages=32)
    assert a.domid != b.domid and a.domid > 0 and b.domid > 0
    assert len(a.memory) == 64 * 4096 and len(b.memory) == 32 * 4096
    a.frame(3)[:5] = b"hello"
    assert bytes(a.frame(3)[:5]) == b"hello"
    frames = a.alloc_pages(4)
    assert len(set(frames)) == 4
    a.free_pages(frames)
    size = await a.query_size()
    assert size["status"] == gt.GNTST_okay and size["nr_frames"] == 1 and size["max_nr_frames"] == 64
    denied = await b.hypercall([Op(wire.HYPERVISOR_grant_table_op, gt.GNTTABOP_query_size, 1, gt.GNTTAB_QUERY_SIZE.pack(dom=a.domid))])
    assert gt.GNTTAB_QUERY_SIZE.unpack(denied[0].args)["status"] == gt.GNTST_permission_denied


async def check_grant_map_rw(make: DomainFactory, transport: str) -> None:
    """B maps A's pages read-write: sees A's bytes; A sees B's after the unmap."""
    a = await make("granter")
    b = await make("mapper", transport=transport)
    frames = a.alloc_pages(3)
    for i, f in enumerate(frames):
        a.frame(f)[:] = bytes([i + 1]) * 4096
    refs = await a.grant_access(b.domid, frames)
    assert all(r >= gt.GNTTAB_NR_RESERVED_ENTRIES for r in refs)
    maps = await b.map_grants(a.domid, refs)
    assert [m.status for m in maps] == [gt.GNTST_okay] * 3
    for i, m in enumerate(maps):
        assert m.view is not None and bytes(m.view) == bytes([i + 1]) * 4096
        assert a.gnttab.flags(m.ref) & (gt.GTF_reading | gt.GTF_writing) == gt.GTF_reading | gt.GTF_writing
        m.view[:4] = b"back"
    await b.unmap_grants(maps)
    assert all(m.view is None for m in maps)
    for f, r in zip(frames, refs, strict=True):
        assert bytes(a.frame(f)[:4]) == b"back"
        assert not a.gnttab.query_foreign_access(r)
    assert a.end_access(refs) == [True, True, True]


async def check_map_readonly(make: DomainFactory, transport: str) -> None:
    a = await make("granter")
    b = await make("mapper", transport=transport)
    (frame,) = a.alloc_pages(1)
    a.frame(frame)[:3] = b"abc"
    (ref,) = await a.grant_access(b.domid, [frame], readonly=True)
    (m,) = await b.map_grants(a.domid, [ref], readonly=True)
    assert m.view is not None and m.view.readonly and bytes(m.view[:3]) == b"abc"
    assert a.gnttab.flags(ref) & (gt.GTF_reading | gt.GTF_writing) == gt.GTF_reading
    (w,) = await b.map_grants(a.domid, [ref], readonly=False, strict=False)
    assert w.status == gt.GNTST_general_error, "write map of a read-only grant"
    try:
        await b.map_grants(a.domid, [ref])
    except GrantError as exc:
        assert exc.status == gt.GNTST_general_error
    else:
        raise _fail("strict map of a read-only grant did not raise")
    await b.unmap_grants([m])
    assert a.gnttab.flags(ref) == gt.GTF_permit_access | gt.GTF_readonly
    assert a.end_access([ref]) == [True]


async def check_map_refused(make: DomainFactory, transport: str) -> None:
    """No grant, a grant for someone else, a bad ref, a bad domain: Xen's statuses."""
    a = await make("granter")
    b = await make("mapper", transport=transport)
    c = await make("other")
    frames = a.alloc_pages(2)
    (for_c,) = await a.grant_access(c.domid, frames[:1])
    free_ref = a.gnttab.alloc_grant_references(1).head  # allocated, never granted
    res = await b.map_grants(a.domid, [free_ref, for_c, 1 << 20], strict=False)
    assert [m.status for m in res] == [gt.GNTST_general_error, gt.GNTST_general_error, gt.GNTST_bad_gntref]
    (bad_dom,) = await b.map_grants(0x7000, [for_c], strict=False)
    assert bad_dom.status == gt.GNTST_bad_domain
    assert all(m.view is None for m in res)
    # The granter's entry is untouched: no in-use bits from failed maps.
    assert a.gnttab.flags(for_c) == gt.GTF_permit_access
    # Unmapping a handle that does not exist.
    replies = await b.hypercall([Op(wire.HYPERVISOR_grant_table_op, gt.GNTTABOP_unmap_grant_ref, 1, gt.GNTTAB_UNMAP_GRANT_REF.pack(handle=12345))])
    assert gt.GNTTAB_UNMAP_GRANT_REF.unpack(replies[0].args)["status"] == gt.GNTST_bad_handle
    # A malformed op (args not a multiple of the struct) is -EINVAL, and others still run.
    replies = await b.hypercall(
        [
            Op(wire.HYPERVISOR_grant_table_op, gt.GNTTABOP_map_grant_ref, 2, b"\0" * 33),
            Op(wire.HYPERVISOR_grant_table_op, gt.GNTTABOP_query_size, 1, gt.GNTTAB_QUERY_SIZE.pack(dom=gt.DOMID_SELF)),
            Op(0x1234, 0, 0, b""),
        ]
    )
    assert replies[0].rc == -errno.EINVAL and replies[1].rc == 0 and replies[2].rc == -errno.ENOSYS
    assert c.end_access([]) == []


async def check_end_access_while_mapped(make: DomainFactory, transport: str) -> None:
    a = await make("granter")
    b = await make("mapper", transport=transport)
    (frame,) = a.alloc_pages(1)
    (ref,) = await a.grant_access(b.domid, [frame])
    maps = await b.map_grants(a.domid, [ref])
    freed: list[int] = []
    before = a.gnttab.free_count
    assert a.end_access([ref], on_freed=freed.append) == [False]
    assert a.gnttab.flags(ref) & gt.GTF_permit_access, "revoked while mapped"
    assert a.gnttab.poll_deferred() == 0 and freed == []
    await b.unmap_grants(maps)
    # The granter's event loop retries on its own: the reference comes back.
    for _ in range(300):
        if freed:
            break
        await asyncio.sleep(0.005)
    assert freed == [ref] and not a.gnttab.deferred
    assert a.gnttab.flags(ref) == 0 and a.gnttab.free_count == before + 1
    # After the revoke a new map fails.
    (m,) = await b.map_grants(a.domid, [ref], strict=False)
    assert m.status == gt.GNTST_general_error


async def check_copy(make: DomainFactory, transport: str) -> None:
    a = await make("granter")
    b = await make("copier", transport=transport)
    ga, gb = a.alloc_pages(2)
    a.frame(ga)[:] = b"\x11" * 4096
    ro, rw = await a.grant_access(b.domid, [ga]), await a.grant_access(b.domid, [gb])
    (ro_ref,), (rw_ref,) = ro, rw
    a.end_access([ro_ref])
    (ro_ref,) = await a.grant_access(b.domid, [ga], readonly=True)
    (local,) = b.alloc_pages(1)
    b.frame(local)[:] = b"\x22" * 4096
    statuses = await b.copy(
        [
            CopySeg.from_grant(a.domid, ro_ref, local, length=100, grant_offset=10, frame_offset=20),
            CopySeg.to_grant(local, a.domid, rw_ref, length=4096),
            CopySeg.from_grant(a.domid, ro_ref, local, length=2, grant_offset=4095),  # crosses a page
            CopySeg.to_grant(local, a.domid, ro_ref, length=8),  # write into a read-only grant
            CopySeg.from_grant(a.domid, ro_ref, b.nr_pages + 5, length=8),  # local frame outside memory
            CopySeg(local, local, 8, source_domid=a.domid),  # a frame of another domain, no grant
        ]
    )
    assert statuses == [
        gt.GNTST_okay,
        gt.GNTST_okay,
        gt.GNTST_bad_copy_arg,
        gt.GNTST_general_error,
        gt.GNTST_bad_page,
        gt.GNTST_permission_denied,
    ], statuses
    view = bytes(b.frame(local))
    assert view[:20] == b"\x22" * 20 and view[20:120] == b"\x11" * 100 and view[120:] == b"\x22" * (4096 - 120)
    assert bytes(a.frame(gb)[:20]) == b"\x22" * 20 and bytes(a.frame(gb)[20:120]) == b"\x11" * 100
    assert bytes(a.frame(ga)) == b"\x11" * 4096, "read-only grant was written"
    assert not a.gnttab.query_foreign_access(ro_ref) and not a.gnttab.query_foreign_access(rw_ref)
    assert a.end_access([ro_ref, rw_ref]) == [True, True]


async def check_batch_352(make: DomainFactory, transport: str) -> None:
    """352 grants (a blkif ring's worth of indirect segments) map in one round trip."""
    a = await make("granter", nr_pages=1024)
    b = await make("mapper", transport=transport, nr_pages=1024)
    frames = a.alloc_pages(352)
    for f in frames:
        a.frame(f)[:4] = f.to_bytes(4, "little")
    refs = await a.grant_access(b.domid, frames)
    assert a.gnttab.nr_frames == 1
    before = b.round_trips
    maps = await b.map_grants(a.domid, refs, readonly=True)
    assert b.round_trips - before == 1
    assert [bytes(m.view[:4]) if m.view is not None else b"" for m in maps] == [f.to_bytes(4, "little") for f in frames]
    before = b.round_trips
    await b.unmap_grants(maps)
    assert b.round_trips - before == 1
    assert a.end_access(refs) == [True] * 352
    # Mixed directions in one batch (a backend serving reads and writes together).
    ro_refs = await a.grant_access(b.domid, frames[:2], readonly=True)
    rw_refs = await a.grant_access(b.domid, frames[2:4])
    before = b.round_trips
    maps = await b.map_grants(a.domid, ro_refs + rw_refs, readonly=[True, False, False, True], strict=False)
    assert b.round_trips - before == 1
    assert [m.status for m in maps] == [gt.GNTST_okay, gt.GNTST_general_error, gt.GNTST_okay, gt.GNTST_okay]
    assert [m.view.readonly for m in maps if m.view is not None] == [True, False, True]
    await b.unmap_grants(maps)
    assert a.end_access(ro_refs + rw_refs) == [True] * 4


async def check_table_growth(make: DomainFactory) -> None:
    a = await make("granter", nr_pages=2048)
    b = await make("peer")
    frames = a.alloc_pages(1200)
    refs = await a.grant_access(b.domid, frames)
    assert a.gnttab.nr_frames == 3 and len(set(refs)) == 1200
    size = await a.query_size()
    assert size["nr_frames"] == 3
    (m,) = await b.map_grants(a.domid, [max(refs)], readonly=True)
    await b.unmap_grants([m])
    replies = await a.hypercall([Op(wire.HYPERVISOR_grant_table_op, gt.GNTTABOP_setup_table, 1, gt.GNTTAB_SETUP_TABLE.pack(dom=gt.DOMID_SELF, nr_frames=65))])
    assert gt.GNTTAB_SETUP_TABLE.unpack(replies[0].args)["status"] == gt.GNTST_general_error
    fired: list[int] = []
    a.gnttab.request_free_callback(lambda: fired.append(1), a.gnttab.free_count + 10)
    a.end_access(refs[:5])
    assert fired == []
    a.end_access(refs[5:])
    assert fired == [1]


async def check_transfer(make: DomainFactory) -> None:
    a = await make("giver")
    b = await make("taker")
    (page,) = a.alloc_pages(1)
    a.frame(page)[:] = b"\x5a" * 4096
    (slot,) = b.alloc_pages(1)
    refs = b.gnttab.alloc_grant_references(1)
    ref = b.gnttab.claim_grant_reference(refs)
    b.gnttab.grant_foreign_transfer_ref(ref, a.domid, slot)
    args = gt.GNTTAB_TRANSFER.pack(mfn=page, domid=b.domid, ref=ref) + gt.GNTTAB_TRANSFER.pack(mfn=page, domid=b.domid, ref=ref)
    (reply,) = await a.hypercall([Op(wire.HYPERVISOR_grant_table_op, gt.GNTTABOP_transfer, 2, args)])
    first = gt.GNTTAB_TRANSFER.unpack(reply.args, 0)["status"]
    second = gt.GNTTAB_TRANSFER.unpack(reply.args, gt.GNTTAB_TRANSFER.size)["status"]
    assert (first, second) == (gt.GNTST_okay, gt.GNTST_general_error)
    assert b.gnttab.end_foreign_transfer_ref(ref) == slot
    assert bytes(b.frame(slot)) == b"\x5a" * 4096 and bytes(a.frame(page)) == bytes(4096)
    b.gnttab.free_grant_reference(ref)


async def _connected_pair(a: Domain, b: Domain) -> tuple[int, int]:
    pa = await a.alloc_unbound(b.domid)
    pb = await b.bind_interdomain(a.domid, pa)
    # The PORT_BOUND push reaches `a` through its event loop.
    for _ in range(100):
        if a.ports.ports[pa].tx_fd >= 0:
            break
        await asyncio.sleep(0.001)
    return pa, pb


async def check_event_channels(make: DomainFactory) -> None:
    a = await make("front")
    b = await make("back")
    pa, pb = await _connected_pair(a, b)
    assert a.ports.ports[pa].tx_fd >= 0
    st = await a.evtchn_status(pa)
    assert (st["status"], st["u_dom"], st["u_port"]) == (ev.EVTCHNSTAT_interdomain, b.domid, pb)
    # bind_interdomain raises one event on the new port (lost-notification fix-up).
    await asyncio.wait_for(b.wait_event(pb), 5)
    got: list[int] = []
    b.set_handler(pb, got.append)
    a.notify(pa)
    await asyncio.wait_for(b.wait_event(pb), 5)
    assert got == [pb]
    b.notify(pb)
    await asyncio.wait_for(a.wait_event(pa), 5)
    # Masked: the event is pending, delivered on unmask.
    b.mask(pb)
    a.notify(pa)
    await asyncio.sleep(0.02)
    assert got == [pb] and b.ports.ports[pb].pending
    b.unmask(pb)
    assert got == [pb, pb] and not b.ports.ports[pb].pending
    # Sending on a port one does not own, through the hypervisor.
    await _expect_rc(b.send_via_hypervisor(pb + 100), -errno.EINVAL)
    await _expect_rc(a.evtchn_status(pa, dom=b.domid), -errno.EPERM)
    await _expect_rc(b.bind_interdomain(a.domid, pa), -errno.EINVAL)  # already bound
    # Close one end: the peer's port goes back to unbound and is told.
    waiter = asyncio.ensure_future(b.wait_event(pb))
    await a.close_port(pa)
    await asyncio.wait_for(waiter, 5)
    st = await b.evtchn_status(pb)
    assert (st["status"], st["u_dom"]) == (ev.EVTCHNSTAT_unbound, a.domid)
    for _ in range(100):
        if b.ports.ports[pb].tx_fd < 0:
            break
        await asyncio.sleep(0.001)
    assert b.ports.ports[pb].tx_fd < 0
    await b.close_port(pb)
    assert (await b.evtchn_status(pb))["status"] == ev.EVTCHNSTAT_closed


async def check_control_domain_ports(make: DomainFactory) -> None:
    """Domain 0 allocates a guest's port for itself (a toolstack's xenstore channel)."""
    d0 = await make("control", domid=0)
    g = await make("guest")
    args = ev.EVTCHN_ALLOC_UNBOUND.pack(dom=g.domid, remote_dom=0)
    (reply,) = await d0.hypercall([Op(wire.HYPERVISOR_event_channel_op, ev.EVTCHNOP_alloc_unbound, 1, args)])
    assert reply.rc == 0 and not reply.fds
    port = ev.EVTCHN_ALLOC_UNBOUND.unpack(reply.args)["port"]
    for _ in range(500):
        if port in g.ports.ports:
            break
        await asyncio.sleep(0.002)
    assert port in g.ports.ports, "the guest was not told of its new port"
    st = await g.evtchn_status(port)
    assert (st["status"], st["u_dom"]) == (ev.EVTCHNSTAT_unbound, 0)
    p0 = await d0.bind_interdomain(g.domid, port)
    await asyncio.wait_for(d0.wait_event(p0), 5)  # the event binding raises on the new port
    d0.notify(p0)
    await asyncio.wait_for(g.wait_event(port), 5)
    for _ in range(500):
        if g.ports.ports[port].tx_fd >= 0:
            break
        await asyncio.sleep(0.002)
    g.notify(port)
    await asyncio.wait_for(d0.wait_event(p0), 5)
    # An unprivileged domain may not do this for another.
    args = ev.EVTCHN_ALLOC_UNBOUND.pack(dom=d0.domid, remote_dom=g.domid)
    (reply,) = await g.hypercall([Op(wire.HYPERVISOR_event_channel_op, ev.EVTCHNOP_alloc_unbound, 1, args)])
    assert reply.rc == -errno.EPERM


async def check_domain_death(make: DomainFactory, transport: str) -> None:
    """A granter dies mid-mapping: the mapper's views stay safe, its ports are told."""
    a = await make("granter")
    b = await make("mapper", transport=transport)
    (frame,) = a.alloc_pages(1)
    a.frame(frame)[:4] = b"live"
    (ref,) = await a.grant_access(b.domid, [frame])
    maps = await b.map_grants(a.domid, [ref])
    pb = await b.alloc_unbound(a.domid)
    pa = await a.bind_interdomain(b.domid, pb)
    assert pa > 0
    await a.close()
    await asyncio.wait_for(b.wait_event(pb), 5)
    st = await b.evtchn_status(pb)
    assert (st["status"], st["u_dom"]) == (ev.EVTCHNSTAT_unbound, a.domid)
    assert maps[0].view is not None and bytes(maps[0].view[:4]) == b"live"
    maps[0].view[:4] = b"safe"  # writes into the dead domain's memory, nobody else's
    (again,) = await b.map_grants(a.domid, [ref], strict=False)
    assert again.status == gt.GNTST_bad_domain
    assert await b.unmap_grants(maps) == [gt.GNTST_okay]


async def check_lguest_dma(make: DomainFactory) -> None:
    """Two guests on a shared region: BIND_DMA on a key there, SEND_DMA from the other."""
    a = await make("guest-a", nr_pages=16)
    b = await make("guest-b", nr_pages=16)
    base = 0x100000
    region = await a.lguest_region(1, base)
    rb = await b.lguest_region(0, base + 0x10000, region.region_id)
    key_a, key_b = base + 8, base + 0x10000 + 8  # the same key through each attachment
    # a binds two receive buffers of two sections each.
    dmas = 0x2000
    rx = 0x3000
    for i in range(2):
        LGUEST_DMA.pack_into(
            a.memory, dmas + i * LGUEST_DMA.size, used_len=0, addr=(rx + i * 0x100, rx + 0x800 + i * 0x100), len=(16, 64)
        )
    await a.bind_dma(key_a, dmas, 2, irq=5)
    # b sends 40 bytes in two sections.
    b.memory[0x1000:0x1000 + 40] = bytes(range(40))
    LGUEST_DMA.pack_into(b.memory, 0x2000, used_len=0, addr=(0x1000, 0x1000 + 10), len=(10, 30))
    irq = asyncio.ensure_future(a.wait_irq())
    assert await b.send_dma(key_b, 0x2000) == 40
    assert await asyncio.wait_for(irq, 5) == 5
    assert LGUEST_DMA.unpack(b.memory, 0x2000)["used_len"] == 40
    assert LGUEST_DMA.unpack(a.memory, dmas)["used_len"] == 40
    assert bytes(a.memory[rx : rx + 16]) + bytes(a.memory[rx + 0x800 : rx + 0x800 + 24]) == bytes(range(40))
    # Second buffer next, then none free: used_len 0 for the sender.
    assert await b.send_dma(key_b, 0x2000) == 40
    assert LGUEST_DMA.unpack(a.memory, dmas + LGUEST_DMA.size)["used_len"] == 40
    assert await b.send_dma(key_b, 0x2000) == 0
    # Rules: a key not a multiple of 4, a section crossing a page, 17 sections, outside memory.
    await _expect_rc(b.send_dma(key_b + 2, 0x2000), -errno.EINVAL)
    LGUEST_DMA.pack_into(b.memory, 0x2100, addr=(0x1FF0,), len=(32,))
    await _expect_rc(b.send_dma(key_b, 0x2100), -errno.EINVAL)
    LGUEST_DMA.pack_into(b.memory, 0x2200, addr=(0x20_0000,), len=(4,))
    await _expect_rc(b.send_dma(key_b, 0x2200), -errno.EINVAL)
    await _expect_rc(a.bind_dma(0x7FFF_0000, dmas, 1, 3), -errno.EINVAL)
    # A private key reaches nobody; the shared region is visible to both.
    assert await b.send_dma(0x100, 0x2000) == 0
    rb.view[:4] = b"LAN!"
    assert bytes(region.view[:4]) == b"LAN!" and bytes(b.phys(base + 0x10000, 4)) == b"LAN!"
    await a.unbind_dma(key_a, dmas)
    LGUEST_DMA.pack_into(a.memory, dmas, used_len=0, addr=(rx,), len=(16,))
    assert await b.send_dma(key_b, 0x2000) == 0


async def check_table_ops(make: DomainFactory) -> None:
    """dump_table, unmap_and_replace and the privilege rules of the table queries."""
    a = await make("granter")
    b = await make("mapper")

    def gnttab(cmd: int, lay: Layout, **fields: int) -> Op:
        return Op(wire.HYPERVISOR_grant_table_op, cmd, 1, lay.pack(**fields))

    replies = await a.hypercall(
        [
            gnttab(gt.GNTTABOP_dump_table, gt.GNTTAB_DUMP_TABLE, dom=gt.DOMID_SELF),
            gnttab(gt.GNTTABOP_dump_table, gt.GNTTAB_DUMP_TABLE, dom=b.domid),
            gnttab(gt.GNTTABOP_setup_table, gt.GNTTAB_SETUP_TABLE, dom=b.domid, nr_frames=1),
            gnttab(gt.GNTTABOP_query_size, gt.GNTTAB_QUERY_SIZE, dom=0x7000),
        ]
    )
    assert [r.rc for r in replies] == [0, 0, 0, 0]
    assert gt.GNTTAB_DUMP_TABLE.unpack(replies[0].args)["status"] == gt.GNTST_okay
    assert gt.GNTTAB_DUMP_TABLE.unpack(replies[1].args)["status"] == gt.GNTST_permission_denied
    assert gt.GNTTAB_SETUP_TABLE.unpack(replies[2].args)["status"] == gt.GNTST_permission_denied
    assert gt.GNTTAB_QUERY_SIZE.unpack(replies[3].args)["status"] == gt.GNTST_permission_denied
    # setup_table answers the table's frame list after the struct.
    (reply,) = await a.hypercall([gnttab(gt.GNTTABOP_setup_table, gt.GNTTAB_SETUP_TABLE, dom=gt.DOMID_SELF, nr_frames=2)])
    assert reply.args[gt.GNTTAB_SETUP_TABLE.size :] == (0).to_bytes(8, "little") + (1).to_bytes(8, "little")
    # unmap_and_replace: bad handle, bad new address, then a good one.
    (frame,) = a.alloc_pages(1)
    (ref,) = await a.grant_access(b.domid, [frame])
    (m,) = await b.map_grants(a.domid, [ref])
    replies = await b.hypercall(
        [
            gnttab(gt.GNTTABOP_unmap_and_replace, gt.GNTTAB_UNMAP_AND_REPLACE, handle=m.handle + 1000),
            gnttab(gt.GNTTABOP_unmap_and_replace, gt.GNTTAB_UNMAP_AND_REPLACE, handle=m.handle, new_addr=(b.nr_pages + 1) << 12),
            gnttab(gt.GNTTABOP_unmap_and_replace, gt.GNTTAB_UNMAP_AND_REPLACE, handle=m.handle, new_addr=0),
        ]
    )
    statuses = [gt.GNTTAB_UNMAP_AND_REPLACE.unpack(r.args)["status"] for r in replies]
    assert statuses == [gt.GNTST_bad_handle, gt.GNTST_general_error, gt.GNTST_okay]
    assert not a.gnttab.query_foreign_access(ref)
    assert await b.unmap_grants([m]) == [gt.GNTST_bad_handle]
    assert a.end_access([ref]) == [True]


async def check_limits(make: DomainFactory) -> None:
    """Per-domain limits answer in-band: DMA bindings, regions, memory size."""
    a = await make("guest", nr_pages=16)
    LGUEST_DMA.pack_into(a.memory, 0x1000, addr=(0x2000,), len=(16,))
    for i in range(32):
        await a.bind_dma(0x3000 + 4 * i, 0x1000, 1, irq=1)
    await _expect_rc(a.bind_dma(0x3000 + 4 * 32, 0x1000, 1, irq=1), -errno.ENOSPC)
    base = 0x100000
    for i in range(8):
        await a.lguest_region(1, base + i * 0x1000)
    try:
        await a.lguest_region(1, base + 8 * 0x1000)
    except HypercallError as exc:
        assert exc.rc == -errno.ENOSPC
    else:
        raise _fail("a ninth region was attached")
    try:
        await make("huge", nr_pages=1 << 30)
    except HypercallError as exc:
        assert exc.rc == -errno.EINVAL
    else:
        raise _fail("a domain of 4 TiB was created")


async def check_shareable_pages(make: DomainFactory, transport: str) -> None:
    """A ring page in a shareable frame is mapped live in both transports."""
    a = await make("frontend")
    b = await make("backend", transport=transport)
    ring, data = await a.alloc_shareable_pages(2)
    assert ring >= SHAREABLE_FRAME_BASE and data == ring + 1
    a.frame(ring)[:4] = b"ring"
    (ring_ref,) = await a.grant_access(b.domid, [ring])
    (ro_ref,) = await a.grant_access(b.domid, [data], readonly=True)
    (m,) = await b.map_grants(a.domid, [ring_ref])
    (ro,) = await b.map_grants(a.domid, [ro_ref], readonly=True)
    assert m.live and ro.live and m.view is not None and ro.view is not None
    assert bytes(m.view[:4]) == b"ring"
    a.frame(ring)[4:8] = b"live"  # no unmap, no copy: the backend sees it at once
    assert bytes(m.view[4:8]) == b"live"
    m.view[8:12] = b"back"
    assert bytes(a.frame(ring)[8:12]) == b"back"
    assert ro.view.readonly
    a.frame(data)[:2] = b"ro"
    assert bytes(ro.view[:2]) == b"ro"
    # GNTTABOP_copy reaches shareable frames too.
    (local,) = b.alloc_pages(1)
    assert await b.copy([CopySeg.from_grant(a.domid, ring_ref, local, length=12)]) == [gt.GNTST_okay]
    assert bytes(b.frame(local)[:12]) == b"ringliveback"
    if transport == "copy":
        ask = Op(wire.PVIO_HYPERVISOR_domctl, wire.PVIO_DOMCTL_memory_fd, 1, wire.PVIO_MEMORY_FD.pack(domid=a.domid))
        (reply,) = await b.hypercall([ask])
        assert reply.rc == -errno.EPERM, "a copy-transport domain got the granter's memory"
    # Asking for the fd of a page one does not map is refused.
    (reply,) = await b.hypercall(
        [Op(wire.PVIO_HYPERVISOR_domctl, wire.PVIO_DOMCTL_page_fd, 1, wire.PVIO_PAGE_FD.pack(domid=a.domid, ref=ring_ref + 7))]
    )
    assert wire.PVIO_PAGE_FD.unpack(reply.args)["status"] == -errno.EINVAL and not reply.fds
    await b.unmap_grants([m, ro])
    assert [m.view, m.page_mm] == [None, None]
    assert a.end_access([ring_ref, ro_ref]) == [True, True]


class FakePlatform:
    """Memory as bytearrays, eventfds as numbers: the core needs nothing more."""

    def __init__(self) -> None:
        self.next_fd = 1000
        self.open: set[int] = set()
        self.signals: list[int] = []
        #: Raised by new_eventfd when set (to play a process out of descriptors).
        self.eventfd_error: OSError | None = None

    def _fd(self) -> int:
        self.next_fd += 1
        self.open.add(self.next_fd)
        return self.next_fd

    def new_memory(self, nr_pages: int, name: str) -> tuple[int, memoryview]:
        return self._fd(), memoryview(bytearray(nr_pages * 4096))

    def free_memory(self, fd: int, view: memoryview) -> None:
        self.open.discard(fd)

    def new_eventfd(self) -> int:
        if self.eventfd_error is not None:
            raise self.eventfd_error
        return self._fd()

    def signal(self, fd: int) -> None:
        self.signals.append(fd)

    def close_fd(self, fd: int) -> None:
        self.open.discard(fd)


#: Every check, with whether it takes a transport.
CHECKS: dict[str, tuple[Callable[..., Awaitable[None]], bool]] = {
    "domains": (check_domains, False),
    "grant_map_rw": (check_grant_map_rw, True),
    "map_readonly": (check_map_readonly, True),
    "map_refused": (check_map_refused, True),
    "end_access_while_mapped": (check_end_access_while_mapped, True),
    "copy": (check_copy, True),
    "batch_352": (check_batch_352, True),
    "table_growth": (check_table_growth, False),
    "transfer": (check_transfer, False),
    "event_channels": (check_event_channels, False),
    "domain_death": (check_domain_death, True),
    "lguest_dma": (check_lguest_dma, False),
    "table_ops": (check_table_ops, False),
    "limits": (check_limits, False),
    "shareable_pages": (check_shareable_pages, True),
    "control_domain_ports": (check_control_domain_ports, False),
}
