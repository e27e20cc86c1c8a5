"""lguest's DMA rules (pvio.lguest.dma) and the in-process host that applies them."""

from __future__ import annotations

import errno
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pvio.abi.lguest import LGUEST_DEVICE_T_BLOCK, LGUEST_DEVICE_T_CONSOLE, LGUEST_DMA
from pvio.lguest.bus import DeviceTable
from pvio.lguest.dma import (
    DMA_SIZE,
    MAX_BINDINGS,
    PAGE_SIZE,
    DmaError,
    DmaSection,
    Fault,
    build_dma,
    check_bind,
    check_key,
    page_sections,
    parse_dma,
    scatter,
)
from pvio.testing.lguest_dma import GuestMemory, InProcessDmaHost, SharedPages

MEM = 64 * PAGE_SIZE
FUZZ = settings(max_examples=200, deadline=None)


def test_golden_bytes_of_a_two_section_dma() -> None:
    raw = build_dma([(0x1000, 512), (0x2F00, 256)], used_len=7)
    assert len(raw) == DMA_SIZE == 100
    assert raw[:4] == struct.pack("<I", 7)
    assert raw[4:12] == struct.pack("<II", 0x1000, 0x2F00)
    assert raw[12:68] == bytes(56)
    assert raw[68:72] == struct.pack("<HH", 512, 256)
    assert raw[72:] == bytes(28)
    buf = parse_dma(raw, memory_size=MEM)
    assert buf.used_len == 7
    assert buf.sections == (DmaSection(0x1000, 512), DmaSection(0x2F00, 256))
    assert buf.capacity == 768


def test_a_zero_length_ends_the_list() -> None:
    raw = LGUEST_DMA.pack(addr=[0x1000, 0x2000, 0x3000], len=[10, 0, 30])
    assert parse_dma(raw, memory_size=MEM).sections == (DmaSection(0x1000, 10),)


def test_sixteen_full_sections() -> None:
    raw = LGUEST_DMA.pack(addr=[i * PAGE_SIZE for i in range(16)], len=[PAGE_SIZE] * 16)
    assert parse_dma(raw, memory_size=MEM).capacity == 16 * PAGE_SIZE
    with pytest.raises(DmaError):
        build_dma([(i * PAGE_SIZE, 1) for i in range(17)])


@pytest.mark.parametrize(
    ("addr", "length", "field"),
    [
        (0x1F00, 0x200, "addr[0]"),  # crosses a page
        (0x1000, PAGE_SIZE + 1, "addr[0]"),  # longer than a page
        (MEM - 16, 32, "addr[0]"),  # crosses the top (and a page)
        (MEM, 4, "addr[0]"),  # past the end of memory
        (0xFFFFFFF0, 8, "addr[0]"),  # far past, no wrap-around
    ],
)
def test_bad_sections_are_refused(addr: int, length: int, field: str) -> None:
    raw = LGUEST_DMA.pack(addr=[addr], len=[length])
    with pytest.raises(DmaError) as exc:
        parse_dma(raw, memory_size=MEM)
    assert exc.value.field == field
    assert exc.value.fault is Fault.GUEST


def test_a_section_ending_exactly_at_the_top_is_fine() -> None:
    raw = LGUEST_DMA.pack(addr=[MEM - 16], len=[16])
    assert parse_dma(raw, memory_size=MEM).capacity == 16


def test_keys() -> None:
    ranges = [(0x10000, 0x11000)]
    check_key(0, ranges)  # the console
    check_key(0x10000, ranges)
    check_key(0x10FFC, ranges)
    with pytest.raises(DmaError, match="multiple of 4"):
        check_key(0x10002, ranges)
    with pytest.raises(DmaError, match="no device"):
        check_key(0x11000, ranges)
    with pytest.raises(DmaError, match="no device"):
        check_key(0x4000, ranges)


def test_bind_arguments() -> None:
    check_bind(1, 1)
    check_bind(8, 31)
    for count, irq in [(0, 1), (0x10000, 1), (1, 0), (1, 32)]:
        with pytest.raises(DmaError):
            check_bind(count, irq)


def test_page_sections_split_at_page_boundaries() -> None:
    assert page_sections(0x1F00, 0x300) == [(0x1F00, 0x100), (0x2000, 0x200)]
    assert page_sections(0x1000, 0x2000) == [(0x1000, 0x1000), (0x2000, 0x1000)]


@FUZZ
@given(st.binary(min_size=DMA_SIZE, max_size=DMA_SIZE), st.integers(1, 1 << 20))
def test_parse_dma_never_crashes_and_only_passes_valid_sections(raw: bytes, mem: int) -> None:
    try:
        buf = parse_dma(raw, memory_size=mem)
    except DmaError as exc:
        assert exc.fault is Fault.GUEST and exc.field
        return
    assert len(buf.sections) <= 16
    for s in buf.sections:
        assert 0 < s.length <= PAGE_SIZE
        assert s.addr // PAGE_SIZE == (s.addr + s.length - 1) // PAGE_SIZE
        assert s.addr + s.length <= mem


@FUZZ
@given(st.integers(0, 1 << 20), st.lists(st.integers(1, PAGE_SIZE), max_size=16))
def test_scatter_covers_exactly_min_of_data_and_capacity(data_len: int, lens: list[int]) -> None:
    sections = [DmaSection(i * PAGE_SIZE, n) for i, n in enumerate(lens)]
    pieces = list(scatter(data_len, sections))
    assert sum(n for _, _, n in pieces) == min(data_len, sum(lens))
    offset = 0
    for section, off, n in pieces:
        assert off == offset and 0 < n <= section.length
        offset += n


# -- the in-process host ---------------------------------------------------------------


def _guest(host: InProcessDmaHost, name: str = "g"):  # type: ignore[no-untyped-def]
    table = DeviceTable(16)
    table.add(LGUEST_DEVICE_T_CONSOLE, num_pages=0)
    table.add(LGUEST_DEVICE_T_BLOCK)
    return host.new_guest(name, table)


def test_guest_memory_with_shared_pages() -> None:
    shared = SharedPages(1)
    a, b = GuestMemory(8 * PAGE_SIZE), GuestMemory(8 * PAGE_SIZE)
    a.map_shared(3, shared)
    b.map_shared(5, shared)
    a.write(3 * PAGE_SIZE - 2, b"wxyz")  # two private bytes, two shared
    assert b.read(5 * PAGE_SIZE, 2) == b"yz"
    assert b.read(3 * PAGE_SIZE - 2, 2) == b"\0\0"
    with pytest.raises(DmaError):
        a.read(8 * PAGE_SIZE - 1, 2)


def test_violations_are_counted_and_fail_the_device() -> None:
    host = InProcessDmaHost()
    g = _guest(host)
    blk = g.table.slots[1]
    g.write(0x1000, build_dma([(0x2000, 16)]))
    with pytest.raises(DmaError) as exc:
        g.send_dma(blk.addr + 2, 0x1000)
    assert exc.value.field == "key"
    assert g.stats.violations == 1
    assert g.table.failed(g.launcher, blk.index)
    # The failed device refuses everything after, with EIO.
    with pytest.raises(DmaError) as exc:
        g.send_dma(blk.addr, 0x1000)
    assert exc.value.errno == errno.EIO
    # The console is a different device and still works (nothing attached: 0 copied).
    assert g.send_dma(0, 0x1000) == 0


def test_a_dma_struct_past_memory_is_refused() -> None:
    host = InProcessDmaHost()
    g = _guest(host)
    with pytest.raises(DmaError) as exc:
        g.send_dma(0, g.memory.size - 50)
    assert exc.value.field == "dma" and exc.value.errno == errno.EFAULT


def test_binding_limits_and_unbind() -> None:
    host = InProcessDmaHost()
    g = _guest(host)
    key = g.table.slots[1].addr
    for i in range(MAX_BINDINGS):
        g.bind_dma(key + 4 * (i % 8), 0x1000 + i * DMA_SIZE, 1, 2)
    g.bind_dma(key, 0x1000, 1, 0)  # irq 0 is an unbind
    assert host.bindings() == MAX_BINDINGS - 1
    g.bind_dma(key, 0x1000, 1, 2)
    with pytest.raises(DmaError):
        g.bind_dma(key, 0x9000, 1, 2)
    assert g.table.failed(g.launcher, 1)  # the 33rd binding failed the device
    g.unbind_dma(key, 0x1000)
    assert host.bindings() == MAX_BINDINGS - 1
    host.drop_guest(g)
    assert host.bindings() == 0


def test_a_guest_cannot_reach_another_guests_private_key() -> None:
    host = InProcessDmaHost()
    a, b = _guest(host, "a"), _guest(host, "b")
    key = b.table.slots[1].addr  # same address in both guests: private to each
    b.write(0x1000, build_dma([(0x3000, 64)]))
    b.bind_dma(key, 0x1000, 1, 2)
    a.write(0x3000, b"secret")
    a.write(0x1000, build_dma([(0x3000, 6)]))
    assert a.send_dma(key, 0x1000) == 0  # went to a's own (absent) Launcher device
    assert b.take_irqs() == [] and b.read(0x3000, 6) == bytes(6)


def test_shared_keys_reach_the_other_guest_only_into_free_buffers() -> None:
    host = InProcessDmaHost()
    shared = SharedPages(1)
    guests = []
    for name in "ab":
        table = DeviceTable(16)
        slot = table.add(2, num_pages=1)
        g = host.new_guest(name, table)
        g.memory.map_shared(slot.pfn, shared)
        guests.append((g, slot))
    (a, sa), (b, sb) = guests
    b.write(0x1000, build_dma([(0x3FF0, 16), (0x5000, 100)]))  # two sections
    b.bind_dma(sb.addr + 8, 0x1000, 1, 3)
    a.write(0x2000, bytes(range(50)))
    a.write(0x1000, build_dma([(0x2000, 50)]))
    assert a.send_dma(sa.addr + 8, 0x1000) == 50
    assert struct.unpack("<I", a.read(0x1000, 4))[0] == 50  # the sender's used_len
    assert struct.unpack("<I", b.read(0x1000, 4))[0] == 50  # the receiver's
    assert b.read(0x3FF0, 16) + b.read(0x5000, 34) == bytes(range(50))
    assert b.take_irqs() == [3]
    # The buffer is used: the next send copies nothing until b frees it.
    assert a.send_dma(sa.addr + 8, 0x1000) == 0
    assert b.stats.no_buffer == 1
    b.write(0x1000, struct.pack("<I", 0))
    assert a.send_dma(sa.addr + 8, 0x1000) == 50


def test_a_receivers_bad_buffer_is_the_receivers_fault() -> None:
    host = InProcessDmaHost()
    shared = SharedPages(1)
    rigs = []
    for name in "ab":
        table = DeviceTable(16)
        slot = table.add(2, num_pages=1)
        g = host.new_guest(name, table)
        g.memory.map_shared(slot.pfn, shared)
        rigs.append((g, slot))
    (a, sa), (b, sb) = rigs
    b.bind_dma(sb.addr, 0x1000, 1, 3)
    b.write(0x1000, LGUEST_DMA.pack(addr=[0x1FFF], len=[2]))  # crosses a page: invalid
    a.write(0x1000, build_dma([(0x2000, 4)]))
    assert a.send_dma(sa.addr, 0x1000) == 0
    assert b.stats.receiver_errors == 1 and a.stats.violations == 0
