"""Fuzzing the hypervisor core with a hostile domain: only granted memory ever changes.

The granter's table is random bytes; the hostile domain sends random batches of
GNTTABOP_map_grant_ref / unmap / copy / transfer / unmap_and_replace and lguest
SEND_DMA with random buffers.  Whatever happens: no exception escapes, every status is
one of Xen's, the granter's memory changes only in frames its table granted writable
to the hostile domain, a bystander's memory never changes, and after teardown the
tables are empty.
"""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from pvio.abi import grant_table as gt
from pvio.abi.lguest import LGUEST_DMA, LHCALL_SEND_DMA
from pvio.hypervisor import wire
from pvio.hypervisor.core import Hypervisor
from pvio.hypervisor.domain import PAGE_SIZE
from pvio.hypervisor.wire import Op
from pvio.testing.hypervisor import FakePlatform

GNTST = set(range(gt.GNTST_no_space, 1))


NR_PAGES = 4
ENTRIES = 64

_u = st.integers


def _entry(hostile: int) -> st.SearchStrategy[bytes]:
    flags = st.sampled_from([0, 1, 1 | 4, 1 | 8, 1 | 16, 2, 3, 1 | 4 | 8]) | _u(0, 0xFFFF)
    domid = st.sampled_from([hostile, hostile + 1, 0]) | _u(0, 0xFFFF)
    frame = _u(0, NR_PAGES + 1) | _u(0, 0xFFFFFFFF)
    return st.builds(lambda f, d, fr: struct.pack("<HHI", f, d, fr), flags, domid, frame)


def _grant_ops(granter: int, hostile: int) -> st.SearchStrategy[Op]:
    ref = _u(0, ENTRIES + 2) | _u(0, 0xFFFFFFFF)
    dom = st.sampled_from([granter, hostile, gt.DOMID_SELF, 0x7000])
    small = _u(0, PAGE_SIZE + 2)
    maps = st.builds(
        lambda fl, r, d: Op(20, gt.GNTTABOP_map_grant_ref, 1, gt.GNTTAB_MAP_GRANT_REF.pack(flags=fl, ref=r, dom=d)),
        st.sampled_from([2, 2 | 4, 0, 1]),
        ref,
        dom,
    )
    unmaps = st.builds(
        lambda h: Op(20, gt.GNTTABOP_unmap_grant_ref, 1, gt.GNTTAB_UNMAP_GRANT_REF.pack(handle=h)), _u(0, 5)
    )
    copies = st.builds(
        lambda su, sd, so, du, dd, do, ln, fl: Op(
            20,
            gt.GNTTABOP_copy,
            1,
            gt.GNTTAB_COPY.pack(
                source_u=su, source_domid=sd, source_offset=so, dest_u=du, dest_domid=dd, dest_offset=do, len=ln, flags=fl
            ),
        ),
        ref,
        dom,
        small,
        ref,
        dom,
        small,
        small,
        _u(0, 3),
    )
    transfers = st.builds(
        lambda m, d, r: Op(20, gt.GNTTABOP_transfer, 1, gt.GNTTAB_TRANSFER.pack(mfn=m, domid=d, ref=r)),
        _u(0, NR_PAGES + 1),
        dom,
        ref,
    )
    replaces = st.builds(
        lambda h, a: Op(20, gt.GNTTABOP_unmap_and_replace, 1, gt.GNTTAB_UNMAP_AND_REPLACE.pack(handle=h, new_addr=a)),
        _u(0, 5),
        _u(0, 1 << 20),
    )
    return st.one_of(maps, unmaps, copies, transfers, replaces)


def _writable_frames(table: bytes, hostile: int) -> set[int]:
    out = set()
    for ref in range(ENTRIES):
        flags, domid, frame = struct.unpack_from("<HHI", table, ref * 8)
        permitted = flags & gt.GTF_type_mask == gt.GTF_permit_access and domid == hostile
        if permitted and not flags & gt.GTF_readonly:
            out.add(frame)
        if flags == gt.GTF_accept_transfer and domid == hostile:
            out.add(frame)  # the granter accepts a page from the hostile domain there
    return out


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_hostile_grant_ops_touch_only_granted_memory(data: st.DataObject) -> None:
    platform = FakePlatform()
    hv = Hypervisor(platform, lambda fd: fd)
    granter = hv.create_domain("granter", NR_PAGES, max_grant_frames=1)
    bystander = hv.create_domain("bystander", NR_PAGES, max_grant_frames=1)
    hostile = hv.create_domain("hostile", NR_PAGES, max_grant_frames=1)
    table = b"".join(data.draw(st.lists(_entry(hostile.domid), min_size=ENTRIES, max_size=ENTRIES)))
    granter.gnttab[: len(table)] = table
    for d, byte in ((granter, 0x11), (bystander, 0x22), (hostile, 0x33)):
        d.memory[:] = bytes([byte]) * len(d.memory)
    writable = _writable_frames(table, hostile.domid)
    batches = data.draw(st.lists(st.lists(_grant_ops(granter.domid, hostile.domid), max_size=6), max_size=4))
    for ops in batches:
        for op, reply in zip(ops, hv.execute(hostile.domid, ops), strict=True):
            assert reply.rc == 0
            status = struct.unpack_from("<h", reply.args, _status_offset(op.cmd))[0]
            assert status in GNTST, status
    for frame in range(NR_PAGES):
        if frame not in writable:
            assert bytes(granter.frame_view(frame)) == b"\x11" * PAGE_SIZE, f"frame {frame} changed"
    assert bytes(bystander.memory) == b"\x22" * len(bystander.memory)
    hv.destroy_domain(hostile.domid)
    assert not granter.active, "pins left after the mapper died"
    for ref in range(ENTRIES):
        before = struct.unpack_from("<H", table, ref * 8)[0]
        after = struct.unpack_from("<H", granter.gnttab, ref * 8)[0]
        assert after & ~(gt.GTF_reading | gt.GTF_writing) == before & ~(gt.GTF_reading | gt.GTF_writing) or (
            before & gt.GTF_type_mask == gt.GTF_accept_transfer
        )
    hv.destroy_domain(granter.domid)
    hv.destroy_domain(bystander.domid)
    assert hv.is_empty() and not platform.open


def _status_offset(cmd: int) -> int:
    lay = {
        gt.GNTTABOP_map_grant_ref: gt.GNTTAB_MAP_GRANT_REF,
        gt.GNTTABOP_unmap_grant_ref: gt.GNTTAB_UNMAP_GRANT_REF,
        gt.GNTTABOP_copy: gt.GNTTAB_COPY,
        gt.GNTTABOP_transfer: gt.GNTTAB_TRANSFER,
        gt.GNTTABOP_unmap_and_replace: gt.GNTTAB_UNMAP_AND_REPLACE,
    }[cmd]
    return lay.offset("status")


@settings(max_examples=200, deadline=None)
@given(
    raw_dma=st.binary(min_size=LGUEST_DMA.size, max_size=LGUEST_DMA.size),
    sections=st.lists(st.tuples(_u(0, 4000), _u(0, 2 * PAGE_SIZE)), max_size=17),
    key=_u(0, 3 * PAGE_SIZE) | _u(0, 0xFFFFFFFF),
    dma_addr=_u(0, 4 * PAGE_SIZE) | _u(0, 0xFFFFFFFF),
)
def test_hostile_send_dma_touches_only_bound_buffers(
    raw_dma: bytes, sections: list[tuple[int, int]], key: int, dma_addr: int
) -> None:
    platform = FakePlatform()
    hv = Hypervisor(platform, lambda fd: fd)
    rx = hv.create_domain("rx", NR_PAGES)
    tx = hv.create_domain("tx", NR_PAGES)
    by = hv.create_domain("bystander", NR_PAGES)
    rx.memory[:] = b"\x11" * len(rx.memory)
    by.memory[:] = b"\x22" * len(by.memory)
    base = 0x100000
    region_op = Op(wire.PVIO_HYPERVISOR_lguest, wire.PVIO_LGUEST_region_create, 1, wire.PVIO_LGUEST_REGION.pack(nr_pages=1, base=base))
    (reply,) = hv.execute(rx.domid, [region_op])
    region_id = wire.PVIO_LGUEST_REGION.unpack(reply.args)["region_id"]
    attach = Op(wire.PVIO_HYPERVISOR_lguest, wire.PVIO_LGUEST_region_attach, 1, wire.PVIO_LGUEST_REGION.pack(region_id=region_id, base=base))
    hv.execute(tx.domid, [attach])
    # rx binds one buffer: two sections inside page 2.
    LGUEST_DMA.pack_into(rx.memory, 0x1000, used_len=0, addr=(0x2000, 0x2800), len=(100, 200))
    hv.lguest.bind_dma(rx, base + 8, 0x1000, 1, 5)
    # tx's buffer: random bytes, or random sections.
    if sections:
        addrs = tuple(a for a, _ in sections[:16])
        lens = tuple(min(n, 0xFFFF) for _, n in sections[:16])
        LGUEST_DMA.pack_into(tx.memory, 0x1000, used_len=0, addr=addrs, len=lens)
        send_addr = 0x1000
        send_key = base + 8
    else:
        if dma_addr + LGUEST_DMA.size <= len(tx.memory):
            tx.memory[dma_addr : dma_addr + LGUEST_DMA.size] = raw_dma
        send_addr = dma_addr
        send_key = key
    op = Op(wire.PVIO_HYPERVISOR_lguest, LHCALL_SEND_DMA, 1, wire.PVIO_LHCALL.pack(arg1=send_key, arg2=send_addr))
    (reply,) = hv.execute(tx.domid, [op])
    assert reply.rc in (0, -22)
    changed = [i for i in range(len(rx.memory)) if rx.memory[i] != 0x11]
    allowed = set(range(0x1000, 0x1004)) | set(range(0x2000, 0x2064)) | set(range(0x2800, 0x28C8))
    allowed |= set(range(0x1004, 0x1000 + LGUEST_DMA.size))  # the dma struct rx wrote itself
    assert set(changed) <= allowed
    assert bytes(by.memory) == b"\x22" * len(by.memory)
    for d in (rx, tx, by):
        hv.destroy_domain(d.domid)
    hv.take_pushes()
    assert hv.is_empty() and not platform.open
