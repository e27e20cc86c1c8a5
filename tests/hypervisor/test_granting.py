"""The granting domain's side, sans-IO: free list, reserved entries, callbacks, flags."""

from __future__ import annotations

import mmap
import struct
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pvio.abi import grant_table as gt
from pvio.hypervisor.atomic import AtomicWords
from pvio.hypervisor.client_core import EventPorts
from pvio.hypervisor.granting import GrantRefs, NoSpace


@pytest.fixture
def table() -> Iterator[tuple[mmap.mmap, GrantRefs]]:
    mm = mmap.mmap(-1, 4 * 4096)
    atomic = AtomicWords(mm)
    yield mm, GrantRefs(memoryview(mm), atomic, 1, 4)
    atomic.release()


def test_reserved_entries_and_free_list(table: tuple[mmap.mmap, GrantRefs]) -> None:
    _, g = table
    assert g.free_count == 512 - gt.GNTTAB_NR_RESERVED_ENTRIES
    refs = g.alloc_grant_references(3)
    got = [g.claim_grant_reference(refs) for _ in range(3)]
    assert got == [8, 9, 10] and g.empty_grant_references(refs)
    with pytest.raises(NoSpace):
        g.claim_grant_reference(refs)
    for r in got:
        g.free_grant_reference(r)
    assert g.free_count == 504


def test_private_list_returned(table: tuple[mmap.mmap, GrantRefs]) -> None:
    _, g = table
    refs = g.alloc_grant_references(11)
    assert g.free_count == 493
    g.claim_grant_reference(refs)
    g.free_grant_references(refs)
    assert g.free_count == 503


def test_growth_and_limits(table: tuple[mmap.mmap, GrantRefs]) -> None:
    _, g = table
    assert g.frames_to_grow(504) == 0
    assert g.frames_to_grow(505) == 1
    assert g.frames_to_grow(504 + 3 * 512) == 3
    with pytest.raises(NoSpace):
        g.frames_to_grow(504 + 3 * 512 + 1)
    with pytest.raises(NoSpace):
        g.alloc_grant_references(505)
    g.grow(2)
    refs = g.alloc_grant_references(1000)
    seen = set()
    while not g.empty_grant_references(refs):
        seen.add(g.claim_grant_reference(refs))
    assert len(seen) == 1000 and min(seen) >= 8 and max(seen) < 1024


def test_free_callbacks(table: tuple[mmap.mmap, GrantRefs]) -> None:
    _, g = table
    refs = g.alloc_grant_references(504)
    calls: list[str] = []
    g.request_free_callback(lambda: calls.append("two"), 2)
    g.request_free_callback(lambda: calls.append("one"), 1)
    r = g.claim_grant_reference(refs)
    g.free_grant_reference(r)
    assert calls == ["one"]
    g.free_grant_reference(g.claim_grant_reference(refs))
    assert calls == ["one", "two"]


def test_grant_writes_flags_last_and_end(table: tuple[mmap.mmap, GrantRefs]) -> None:
    mm, g = table
    ref = g.grant_foreign_access(7, 0x1234, readonly=True)
    assert struct.unpack_from("<HHI", mm, ref * 8) == (gt.GTF_permit_access | gt.GTF_readonly, 7, 0x1234)
    # A mapping sets GTF_reading: ending is refused and deferred.
    struct.pack_into("<H", mm, ref * 8, gt.GTF_permit_access | gt.GTF_readonly | gt.GTF_reading)
    freed: list[int] = []
    assert not g.end_foreign_access(ref, freed.append)
    assert g.poll_deferred() == 0
    struct.pack_into("<H", mm, ref * 8, gt.GTF_permit_access | gt.GTF_readonly)
    assert g.poll_deferred() == 1 and freed == [ref]
    assert struct.unpack_from("<H", mm, ref * 8)[0] == 0


def test_deferred_refs_are_retried_when_short(table: tuple[mmap.mmap, GrantRefs]) -> None:
    mm, g = table
    refs = g.alloc_grant_references(504)
    held = [g.claim_grant_reference(refs) for _ in range(504)]
    g.grant_foreign_access_ref(held[0], 1, 0)
    struct.pack_into("<H", mm, held[0] * 8, gt.GTF_permit_access | gt.GTF_writing)
    assert not g.end_foreign_access(held[0])
    with pytest.raises(NoSpace):
        g.alloc_grant_references(1)
    struct.pack_into("<H", mm, held[0] * 8, gt.GTF_permit_access)
    assert g.alloc_grant_references(1).head == held[0]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "free"]), st.integers(1, 40)), max_size=60))
def test_free_list_model(steps: list[tuple[str, int]]) -> None:
    """The free list against a set: never hands out a ref twice, never loses one."""
    mm = mmap.mmap(-1, 2 * 4096)
    atomic = AtomicWords(mm)
    g = GrantRefs(memoryview(mm), atomic, 1, 2)
    held: list[int] = []
    for action, n in steps:
        if action == "alloc":
            try:
                refs = g.alloc_grant_references(n)
            except NoSpace:
                assert g.free_count < n
                continue
            while not g.empty_grant_references(refs):
                held.append(g.claim_grant_reference(refs))
        else:
            for r in held[:n]:
                g.free_grant_reference(r)
            del held[:n]
        assert len(set(held)) == len(held)
        assert all(8 <= r < 512 for r in held)
        assert g.free_count + len(held) == 504
    atomic.release()


def test_event_port_state_table() -> None:
    ports = EventPorts()
    ports.add(3, rx_fd=-1)
    assert ports.event(3)
    ports.mask(3)
    assert not ports.event(3) and ports.ports[3].pending
    assert ports.unmask(3) and not ports.ports[3].pending
    assert not ports.unmask(3)
    assert not ports.event(99)
    assert ports.set_tx(3, 10) == -1 and ports.set_tx(3, 11) == 10
    assert ports.remove(3) == [11] and ports.remove(3) == []
