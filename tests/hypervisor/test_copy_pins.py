"""GNTTABOP_copy's pins, against the hypervisor core: a copy pins each granted side for
the op alone (GTF_reading, and GTF_writing for a destination) and leaves the entry as
it found it, as Xen's acquire_grant_for_copy / release_grant_for_copy do; an entry a map
holds keeps the map's bits; every refusal leaves the entry and the memory alone."""

from __future__ import annotations

import mmap
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pvio.abi import grant_table as gt
from pvio.hypervisor.atomic import AtomicWords
from pvio.hypervisor.core import Hypervisor
from pvio.hypervisor.domain import PAGE_SIZE, DomainRecord
from pvio.hypervisor.grant_table import _end_copy_pin, pin_for_copy
from pvio.hypervisor.wire import Op
from pvio.testing.hypervisor import FakePlatform

PERMIT = gt.GTF_permit_access


def world() -> tuple[Hypervisor, DomainRecord, DomainRecord]:
    hv = Hypervisor(FakePlatform(), lambda fd: fd)
    return hv, hv.create_domain("granter", 8, max_grant_frames=1), hv.create_domain("copier", 8, max_grant_frames=1)


def grant(d: DomainRecord, ref: int, flags: int, domid: int, frame: int) -> None:
    struct.pack_into("<HHI", d.gnttab, ref * 8, flags, domid, frame)


def flags_of(d: DomainRecord, ref: int) -> int:
    return int(struct.unpack_from("<H", d.gnttab, ref * 8)[0])


def copy(hv: Hypervisor, caller: DomainRecord, *ops: dict[str, int]) -> list[int]:
    args = b"".join(gt.GNTTAB_COPY.pack(**o) for o in ops)
    (reply,) = hv.execute(caller.domid, [Op(20, gt.GNTTABOP_copy, len(ops), args)])
    assert reply.rc == 0
    return [gt.GNTTAB_COPY.unpack(reply.args[i * 40 : (i + 1) * 40])["status"] for i in range(len(ops))]


def into_grant(granter: DomainRecord, ref: int, frame: int, length: int = PAGE_SIZE) -> dict[str, int]:
    """Copy the copier's own `frame` into `granter`'s grant `ref`."""
    return dict(source_u=frame, source_domid=gt.DOMID_SELF, dest_u=ref, dest_domid=granter.domid, len=length,
                flags=gt.GNTCOPY_dest_gref)


def from_grant(granter: DomainRecord, ref: int, frame: int) -> dict[str, int]:
    return dict(source_u=ref, source_domid=granter.domid, dest_u=frame, dest_domid=gt.DOMID_SELF, len=PAGE_SIZE,
                flags=gt.GNTCOPY_source_gref)


def test_a_copy_leaves_the_entry_as_it_found_it() -> None:
    hv, g, c = world()
    grant(g, 1, PERMIT, c.domid, 3)
    grant(g, 2, PERMIT | gt.GTF_readonly, c.domid, 4)
    c.frame_view(5)[:] = b"w" * PAGE_SIZE
    g.frame_view(4)[:] = b"r" * PAGE_SIZE
    assert copy(hv, c, into_grant(g, 1, 5), from_grant(g, 2, 6)) == [gt.GNTST_okay, gt.GNTST_okay]
    assert bytes(g.frame_view(3)) == b"w" * PAGE_SIZE and bytes(c.frame_view(6)) == b"r" * PAGE_SIZE
    assert (flags_of(g, 1), flags_of(g, 2)) == (PERMIT, PERMIT | gt.GTF_readonly) and not g.active


def test_refusals_touch_neither_the_entry_nor_the_memory() -> None:
    hv, g, c = world()
    grant(g, 1, PERMIT | gt.GTF_readonly, c.domid, 3)  # read-only: not a destination
    grant(g, 2, PERMIT, c.domid + 1, 3)  # granted to another domain
    grant(g, 3, PERMIT, c.domid, 999)  # a frame outside the granter's memory
    g.frame_view(3)[:] = b"g" * PAGE_SIZE
    c.frame_view(5)[:] = b"w" * PAGE_SIZE
    statuses = copy(hv, c, into_grant(g, 1, 5), into_grant(g, 2, 5), into_grant(g, 3, 5),
                    into_grant(g, 1, 5, PAGE_SIZE + 1), into_grant(g, 64 * 8, 5))
    assert statuses == [gt.GNTST_general_error] * 3 + [gt.GNTST_bad_copy_arg, gt.GNTST_bad_gntref]
    assert bytes(g.frame_view(3)) == b"g" * PAGE_SIZE
    assert [flags_of(g, r) for r in (1, 2, 3)] == [PERMIT | gt.GTF_readonly, PERMIT, PERMIT] and not g.active


def test_one_entry_on_both_sides_of_a_copy() -> None:
    hv, g, c = world()
    grant(g, 1, PERMIT, c.domid, 3)
    g.frame_view(3)[:8] = b"abcdefgh"
    op = dict(source_u=1, source_domid=g.domid, source_offset=0, dest_u=1, dest_domid=g.domid, dest_offset=8,
              len=8, flags=gt.GNTCOPY_source_gref | gt.GNTCOPY_dest_gref)
    assert copy(hv, c, op) == [gt.GNTST_okay]
    assert bytes(g.frame_view(3)[:16]) == b"abcdefghabcdefgh" and flags_of(g, 1) == PERMIT


def test_a_mapped_entry_keeps_its_maps_bits_through_a_copy() -> None:
    hv, g, c = world()
    grant(g, 1, PERMIT, c.domid, 3)
    mapping = gt.GNTTAB_MAP_GRANT_REF.pack(flags=gt.GNTMAP_host_map, ref=1, dom=g.domid)
    (reply,) = hv.execute(c.domid, [Op(20, gt.GNTTABOP_map_grant_ref, 1, mapping)])
    handle = gt.GNTTAB_MAP_GRANT_REF.unpack(reply.args)["handle"]
    assert flags_of(g, 1) == PERMIT | gt.GTF_reading | gt.GTF_writing
    assert copy(hv, c, into_grant(g, 1, 5)) == [gt.GNTST_okay]
    assert flags_of(g, 1) == PERMIT | gt.GTF_reading | gt.GTF_writing  # the map still holds it
    unmap = gt.GNTTAB_UNMAP_GRANT_REF.pack(handle=handle)
    hv.execute(c.domid, [Op(20, gt.GNTTABOP_unmap_grant_ref, 1, unmap)])
    assert flags_of(g, 1) == PERMIT and not g.active


def test_the_pin_bits_are_cleared_alone() -> None:
    """The end of a copy clears GTF_reading/GTF_writing with one atomic AND: what the
    granter wrote to the word meanwhile (here another domid and GTF_readonly) stays."""
    _hv, g, c = world()
    grant(g, 1, PERMIT, c.domid, 3)
    frame, clear = pin_for_copy(g, 1, c.domid, readonly=False)
    assert (frame, flags_of(g, 1)) == (3, PERMIT | gt.GTF_reading | gt.GTF_writing)
    struct.pack_into("<HH", g.gnttab, 8, PERMIT | gt.GTF_readonly | gt.GTF_reading | gt.GTF_writing, 77)
    _end_copy_pin(g, 1, clear, False)
    assert struct.unpack_from("<HH", g.gnttab, 8) == (PERMIT | gt.GTF_readonly, 77)


def test_fetch_and_answers_the_old_word_and_checks_its_offset() -> None:
    mm = mmap.mmap(-1, 4096)
    words = AtomicWords(mm)
    struct.pack_into("<I", mm, 8, 0xABCD001F)
    assert words.fetch_and32(8, 0xFFFFFFF0) == 0xABCD001F
    assert struct.unpack_from("<I", mm, 8)[0] == 0xABCD0010
    for bad in (-4, 4094, 4096, 6):
        with pytest.raises(ValueError):
            words.fetch_and32(bad, 0)
    words.release()
    mm.close()


def test_compare_and_swap_carries_all_32_bits() -> None:
    """The atomics are called untyped (plain ints): words and values with the top bit
    set must pass whole, and a swap that finds another word must leave it."""
    mm = mmap.mmap(-1, 4096)
    words = AtomicWords(mm)
    struct.pack_into("<I", mm, 12, 0x80000001)
    assert words.cmpxchg32(12, 0x80000001, 0xFFFF0003) == 0x80000001
    assert words.cmpxchg32(12, 0x80000001, 5) == 0xFFFF0003
    assert struct.unpack_from("<I", mm, 12)[0] == 0xFFFF0003
    words.release()
    mm.close()


@settings(max_examples=300, deadline=None)
@given(
    flags=st.sampled_from([PERMIT, PERMIT | gt.GTF_readonly, PERMIT | gt.GTF_reading, 0, gt.GTF_accept_transfer,
                           PERMIT | gt.GTF_reading | gt.GTF_writing]),
    to_other=st.booleans(),
    granted_frame=st.sampled_from([3, 7, 8, 999]),
    ref=st.sampled_from([1, 511, 512, 2**32 + 1]),
    local=st.sampled_from([5, 7, 8, 2**40]),
    length=st.sampled_from([0, 8, PAGE_SIZE]),
    offsets=st.sampled_from([(0, 0), (8, 100), (PAGE_SIZE - 8, 0)]),
    into=st.booleans(),
    mapped=st.booleans(),
)
def test_the_copy_transports_shortcut_decides_as_the_general_path(
        flags: int, to_other: bool, granted_frame: int, ref: int, local: int, length: int,
        offsets: tuple[int, int], into: bool, mapped: bool) -> None:
    """A copy between the caller's own frame and a grant takes a shortcut in the
    hypervisor (`_copy_with_grant`); whatever the entry, frame, bounds or map, it ends
    as the op decided one side at a time does: same status, entry, pins and bytes."""
    ends = []
    for shortcut in (True, False):
        hv, g, c = world()
        grant(g, 1, flags, c.domid + 1 if to_other else c.domid, granted_frame)
        grant(g, 511, PERMIT, c.domid, 4)
        for d in (g, c):
            for frame in range(8):
                d.frame_view(frame)[:] = bytes([d.domid * 16 + frame]) * PAGE_SIZE
        if mapped and flags == PERMIT and not to_other and granted_frame < 8:
            mapping = gt.GNTTAB_MAP_GRANT_REF.pack(flags=gt.GNTMAP_host_map, ref=1, dom=g.domid)
            hv.execute(c.domid, [Op(20, gt.GNTTABOP_map_grant_ref, 1, mapping)])
        goff, loff = offsets
        op = into_grant(g, ref, local, length) if into else from_grant(g, ref, local)
        op.update(len=length, source_offset=loff if into else goff, dest_offset=goff if into else loff)
        if shortcut:
            (status,) = copy(hv, c, op)
        elif length > PAGE_SIZE - max(offsets):
            status = gt.GNTST_bad_copy_arg  # checked before either side, in copy_batch
        else:
            status = hv.grants._copy_one(c, op["source_u"], op["source_domid"], op["source_offset"], op["dest_u"],
                                         op["dest_domid"], op["dest_offset"], op["len"], op["flags"])
        ends.append((status, bytes(g.gnttab[:8 * 512]), bytes(g.memory[: 8 * PAGE_SIZE]),
                     bytes(c.memory[: 8 * PAGE_SIZE]), {r: (a.pins_ro, a.pins_rw) for r, a in g.active.items()}))
    assert ends[0] == ends[1]
