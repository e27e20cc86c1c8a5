"""lguest's DMA on the drivers' side (pvio.lguest.dma), and the hypervisor applying its
rules (pvio.hypervisor.lguest_rules, tested in tests/hypervisor) to in-process domains."""

from __future__ import annotations

import errno
import struct

import pytest

from pvio.abi.fault import Fault
from pvio.abi.lguest import LGUEST_DEVICE_S_FAILED, LGUEST_DMA, LGUEST_MAX_DMA
from pvio.hypervisor.lguest_rules import DmaSection, parse_dma
from pvio.lguest.dma import DMA_SIZE, PAGE_SIZE, DmaError, LguestError, build_dma, page_sections
from pvio.testing.lguest_world import DomainPort, LguestWorld, build_guest

MEM = 64 * PAGE_SIZE


def test_golden_bytes_of_a_two_section_dma() -> None:
    raw = build_dma([(0x1000, 512), (0x2F00, 256)], used_len=7)
    assert len(raw) == DMA_SIZE == 100
    assert raw[:4] == struct.pack("<I", 7)
    assert raw[4:12] == struct.pack("<II", 0x1000, 0x2F00)
    assert raw[12:68] == bytes(56)
    assert raw[68:72] == struct.pack("<HH", 512, 256)
    assert raw[72:] == bytes(28)
    buf = parse_dma(raw, memory_size=MEM)  # and the hypervisor reads what was built
    assert buf.used_len == 7
    assert buf.sections == (DmaSection(0x1000, 512), DmaSection(0x2F00, 256))
    assert buf.capacity == 768


@pytest.mark.parametrize(
    ("sections", "field"),
    [
        ([(i * PAGE_SIZE, 1) for i in range(17)], "len"),  # more than sixteen
        ([(0x1000, 0)], "len"),  # would end the list early
        ([(0x1F00, 0x200)], "addr"),  # crosses a page
    ],
)
def test_build_dma_refuses_what_the_host_would(sections: list[tuple[int, int]], field: str) -> None:
    with pytest.raises(DmaError) as exc:
        build_dma(sections)
    assert exc.value.fault is Fault.LOCAL and exc.value.field == field
    assert len(build_dma([(i * PAGE_SIZE, PAGE_SIZE) for i in range(16)])) == DMA_SIZE


def test_page_sections_split_at_page_boundaries() -> None:
    assert page_sections(0x1F00, 0x300) == [(0x1F00, 0x100), (0x2000, 0x200)]
    assert page_sections(0x1000, 0x2000) == [(0x1000, 0x1000), (0x2000, 0x1000)]


# -- the hypervisor applying them, domains in one process -------------------------------

BASE = 16 * PAGE_SIZE  # where both domains attach their shared page


def _shared(world: LguestWorld) -> tuple[DomainPort, DomainPort]:
    """Two domains of 16 pages that share one page at BASE (a LAN page, say)."""
    a, b = world.domain("a", 16), world.domain("b", 16)
    region = a.create_region(1, BASE)
    b.attach_region(region, BASE)
    return a, b


def test_a_broken_rule_at_a_device_key_fails_that_device_only() -> None:
    rig = build_guest(LguestWorld(), "g", disk=bytearray(64 * 1024))
    assert rig.console is not None and rig.console_device is not None
    blk = rig.table.slots[1]
    rig.port.write(0x1000, build_dma([(0x2000, 16)]))
    with pytest.raises(DmaError) as exc:
        rig.port.send_dma(blk.addr + 2, 0x1000)  # not a multiple of 4
    assert exc.value.errno == errno.EINVAL and exc.value.fault is Fault.REMOTE
    # The hypervisor told the Launcher bound at that key; it failed the device and
    # unbound its buffer, so the key reaches nobody now.
    assert rig.status(blk.index) & LGUEST_DEVICE_S_FAILED and rig.launcher.violations == 1
    assert rig.world.lguest.violations == 1
    assert rig.port.send_dma(blk.addr, 0x1000) == 0
    # The console is another device and still works.
    rig.console.put_chars(b"still here")
    assert rig.console_device.take_output() == b"still here"
    assert not rig.status(0) & LGUEST_DEVICE_S_FAILED


def test_a_dma_struct_past_memory_is_refused() -> None:
    world = LguestWorld()
    a, _ = _shared(world)
    with pytest.raises(DmaError) as exc:
        a.send_dma(BASE, 16 * PAGE_SIZE - 50)  # runs off the top of RAM
    assert exc.value.errno == errno.EINVAL


def test_binding_limits_and_unbind() -> None:
    world = LguestWorld()
    a, _ = _shared(world)
    for i in range(LGUEST_MAX_DMA):
        a.bind_dma(BASE + 4 * (i % 8), 0x1000 + i * DMA_SIZE, 1, 2)
    with pytest.raises(DmaError) as exc:
        a.bind_dma(BASE, 0x9000, 1, 2)
    assert exc.value.errno == errno.ENOSPC
    a.bind_dma(BASE, 0x1000, 1, 0)  # irq 0 is an unbind
    assert world.bindings() == LGUEST_MAX_DMA - 1
    a.bind_dma(BASE, 0x1000, 1, 2)
    a.unbind_dma(BASE, 0x1000)
    assert world.bindings() == LGUEST_MAX_DMA - 1
    world.destroy(a)  # a domain's bindings go with it
    assert world.bindings() == 0


def test_a_key_in_private_memory_reaches_nobody() -> None:
    world = LguestWorld()
    a, b = _shared(world)
    b.write(0x1000, build_dma([(0x3000, 64)]))
    b.bind_dma(0x4000, 0x1000, 1, 2)  # the same address in both: private to each
    a.write(0x3000, b"secret")
    a.write(0x1000, build_dma([(0x3000, 6)]))
    assert a.send_dma(0x4000, 0x1000) == 0
    assert b.take_irqs() == [] and b.read(0x3000, 6) == bytes(6)
    # ...and the same send at a shared key would have arrived.
    b.bind_dma(BASE, 0x1000, 1, 2)
    assert a.send_dma(BASE, 0x1000) == 6 and b.read(0x3000, 6) == b"secret"


def test_shared_keys_reach_the_other_domain_only_into_free_buffers() -> None:
    world = LguestWorld()
    a, b = _shared(world)
    b.write(0x1000, build_dma([(0x3FF0, 16), (0x5000, 100)]))  # two sections
    b.bind_dma(BASE + 8, 0x1000, 1, 3)
    a.write(0x2000, bytes(range(50)))
    a.write(0x1000, build_dma([(0x2000, 50)]))
    assert a.send_dma(BASE + 8, 0x1000) == 50
    assert struct.unpack("<I", a.read(0x1000, 4))[0] == 50  # the sender's used_len
    assert struct.unpack("<I", b.read(0x1000, 4))[0] == 50  # the receiver's
    assert b.read(0x3FF0, 16) + b.read(0x5000, 34) == bytes(range(50))
    assert b.take_irqs() == [3]
    # The buffer is used: the next send copies nothing until b frees it.
    assert a.send_dma(BASE + 8, 0x1000) == 0
    assert b.take_irqs() == []
    b.write(0x1000, struct.pack("<I", 0))
    assert a.send_dma(BASE + 8, 0x1000) == 50
    # A sender never reaches its own buffers.
    a.bind_dma(BASE + 12, 0x1000 + DMA_SIZE, 1, 4)
    a.write(0x1000 + DMA_SIZE, build_dma([(0x6000, 64)]))
    assert a.send_dma(BASE + 12, 0x1000) == 0 and a.take_irqs() == []


def test_a_receivers_bad_buffer_is_the_receivers_fault() -> None:
    world = LguestWorld()
    a, b = _shared(world)
    b.bind_dma(BASE, 0x1000, 1, 3)
    b.write(0x1000, LGUEST_DMA.pack(addr=[0x1FFF], len=[2]))  # crosses a page: invalid
    a.write(0x1000, build_dma([(0x2000, 4)]))
    assert a.send_dma(BASE, 0x1000) == 0
    assert world.lguest.bad_buffers == 1 and world.lguest.violations == 0


def test_a_domains_view_is_its_ram_and_its_regions() -> None:
    world = LguestWorld()
    a, b = _shared(world)
    a.write(BASE + 6, b"shared")
    assert b.read(BASE + 6, 6) == b"shared"
    a.write(BASE - 2, b"ab")  # the top of a's RAM: private
    assert b.read(BASE - 2, 2) == b"\0\0"
    with pytest.raises(LguestError) as exc:
        a.read(BASE - 2, 4)  # straddles RAM and the region: two memories
    assert exc.value.errno == errno.EFAULT
    with pytest.raises(LguestError):
        a.read(BASE + PAGE_SIZE, 1)  # above everything a has
