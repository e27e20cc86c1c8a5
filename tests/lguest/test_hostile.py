"""Hostile guests, fuzzed: nothing a guest writes or sends crashes the hypervisor or a
Launcher device, reaches another guest's memory, or stops another guest."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pvio.abi.lguest import LGUEST_BLOCK_PAGE, LGUEST_DMA
from pvio.lguest.dma import DMA_SIZE, PAGE_SIZE, DmaError
from pvio.testing.lguest_world import Lan, LguestWorld, build_guest

FUZZ = settings(max_examples=150, deadline=None)
DISK = 64 * 1024


@FUZZ
@given(st.binary(min_size=DMA_SIZE, max_size=DMA_SIZE), st.integers(0, 300 * PAGE_SIZE),
       st.integers(0, 300 * PAGE_SIZE))
def test_any_send_dma_is_refused_or_bounded(raw: bytes, key: int, addr: int) -> None:
    world = LguestWorld()
    lan = Lan(world)
    bad = build_guest(world, "bad", lan=lan, disk=bytearray(DISK))
    good = build_guest(world, "good", lan=lan, disk=bytearray(DISK))
    assert bad.net is not None and good.net is not None
    bad.net.open()
    good.net.open()
    addr = min(addr, bad.table.ram_pages * PAGE_SIZE - DMA_SIZE)
    bad.port.write(addr, raw)
    try:
        used = bad.port.send_dma(key, addr)
    except DmaError:
        pass
    else:
        assert 0 <= used <= 16 * PAGE_SIZE
    bad.run_interrupts()
    good.run_interrupts()
    good.net.take_frames()
    # The good guest still works, whatever happened to the bad one.
    assert good.block is not None
    good.block.write(0, b"ok" * 256)
    good.run_interrupts()
    (done,) = good.block.take_completions()
    assert done.ok


@FUZZ
@given(st.binary(min_size=LGUEST_BLOCK_PAGE.size, max_size=LGUEST_BLOCK_PAGE.size),
       st.binary(max_size=3 * PAGE_SIZE))
def test_any_block_request_gets_a_result_and_never_grows_the_image(page: bytes, data: bytes) -> None:
    storage = bytearray(DISK)
    rig = build_guest(LguestWorld(), "g", disk=storage, console=False)
    assert rig.block is not None and rig.block_device is not None
    blk = rig.block
    rig.port.write(blk.page, page[:16])  # type, sector, bytes, result: all the guest's
    rig.port.write(0x10000, data)
    sections = [(0x10000 + i, min(PAGE_SIZE, len(data) - i)) for i in range(0, len(data), PAGE_SIZE)]
    rig.port.write(blk.send_dma, LGUEST_DMA.pack(addr=[a for a, _ in sections],
                                                  len=[n for _, n in sections]))
    rig.port.send_dma(blk.page, blk.send_dma)
    req = LGUEST_BLOCK_PAGE.unpack(rig.port.read(blk.page, LGUEST_BLOCK_PAGE.size))
    assert req["result"] in (1, 2)
    assert len(storage) == DISK
    offset = req["sector"] * 512
    if req["type"] == 1 and offset + len(data) <= DISK and req["result"] == 1:
        assert bytes(storage[offset : offset + len(data)]) == data
    elif req["type"] != 1:
        assert storage == bytearray(DISK)
    # The driver's own next request still works.
    rig.port.take_irqs()
    blk.write(1, b"z" * 512)
    rig.run_interrupts()
    assert blk.take_completions()[-1].ok
