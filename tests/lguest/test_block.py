"""lguest's block device: the guest driver and the Launcher's server, both ends in one process."""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pvio.abi.lguest import (
    LGUEST_BLOCK_PAGE,
    LGUEST_BLOCK_READ,
    LGUEST_BLOCK_WRITE,
    LGUEST_DEVICE_S_ACKNOWLEDGE,
    LGUEST_DEVICE_S_DRIVER,
    LGUEST_DEVICE_S_DRIVER_OK,
    LGUEST_DEVICE_S_FAILED,
    LGUEST_DMA,
)
from pvio.lguest.block import MAX_REQUEST_BYTES, BlockCompletion
from pvio.lguest.dma import PAGE_SIZE, DmaError, LguestError, build_dma
from pvio.testing.lguest_world import InProcessLguest, LguestWorld, build_guest

DISK = 256 * 1024


def _rig(image: bytearray | mmap.mmap | None = None) -> InProcessLguest:
    return build_guest(LguestWorld(), "g", disk=bytearray(DISK) if image is None else image, console=False)


def _complete(rig: InProcessLguest) -> BlockCompletion:
    assert rig.run_interrupts() == 1
    assert rig.block is not None
    (done,) = rig.block.take_completions()
    return done


def test_probe_binds_the_reply_buffer_and_reads_the_size() -> None:
    rig = _rig()
    assert rig.block is not None
    assert rig.block.num_sectors == DISK // 512
    ok = LGUEST_DEVICE_S_ACKNOWLEDGE | LGUEST_DEVICE_S_DRIVER | LGUEST_DEVICE_S_DRIVER_OK
    assert rig.status(0) == ok
    assert rig.world.bindings() == 2  # the guest's reply buffer, the Launcher's request buffer


def test_write_then_read_back() -> None:
    rig = _rig()
    blk = rig.block
    assert blk is not None
    data = os.urandom(3 * PAGE_SIZE + 512)
    blk.write(10, data)
    assert blk.busy
    done = _complete(rig)
    assert done == BlockCompletion(LGUEST_BLOCK_WRITE, 10, len(data), True)
    assert rig.block_device is not None
    assert rig.launcher.served[rig.block_device.slot.irq].image[10 * 512 : 10 * 512 + len(data)] == data
    blk.read(10, len(data))
    done = _complete(rig)
    assert done.ok and done.data == data and not blk.busy
    page = LGUEST_BLOCK_PAGE.unpack(rig.port.read(blk.page, LGUEST_BLOCK_PAGE.size))
    assert page["type"] == LGUEST_BLOCK_READ and page["result"] == 1 and page["bytes"] == len(data)


def test_largest_request_is_sixteen_pages() -> None:
    rig = _rig()
    blk = rig.block
    assert blk is not None
    blk.write(0, b"\xab" * MAX_REQUEST_BYTES)
    assert _complete(rig).ok
    with pytest.raises(LguestError) as exc:
        blk.write(0, b"\xab" * (MAX_REQUEST_BYTES + 512))
    assert exc.value.field == "bytes"
    with pytest.raises(LguestError):
        blk.read(0, 100)  # not whole sectors


def test_one_request_in_flight() -> None:
    rig = _rig()
    blk = rig.block
    assert blk is not None
    blk.read(0, 512)
    with pytest.raises(LguestError) as exc:
        blk.read(1, 512)
    assert exc.value.errno == errno.EBUSY
    _complete(rig)
    blk.read(1, 512)


def test_write_past_the_end_is_refused_without_changing_the_image() -> None:
    storage = bytearray(DISK)
    rig = _rig(storage)
    assert rig.block is not None and rig.block_device is not None
    before = bytes(storage)
    rig.block.write(DISK // 512 - 1, b"x" * 1024)  # last sector + one past the end
    done = _complete(rig)
    assert not done.ok
    assert bytes(storage) == before and len(storage) == DISK
    assert rig.block_device.stats.refused_writes == 1
    rig.block.write(DISK // 512, b"x" * 512)  # wholly past the end
    assert not _complete(rig).ok
    assert bytes(storage) == before
    # ...and the device still serves good requests.
    rig.block.write(DISK // 512 - 1, b"y" * 512)
    assert _complete(rig).ok


def test_read_at_and_past_the_end() -> None:
    rig = _rig()
    assert rig.block is not None
    rig.block.read(DISK // 512 - 1, 1024)  # only half is there: bytes != len, result 2
    assert not _complete(rig).ok
    rig.block.read(DISK // 512 + 5, 512)
    assert not _complete(rig).ok
    assert rig.block_device is not None and rig.block_device.stats.errors == 2


def test_file_storage(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(DISK))
    with open(image, "r+b") as f, mmap.mmap(f.fileno(), 0) as storage:
        rig = _rig(storage)
        assert rig.block is not None
        rig.block.write(7, b"pvio" * 256)
        assert _complete(rig).ok
        rig.block.write(DISK // 512 - 1, b"z" * 4096)
        assert not _complete(rig).ok
        storage.flush()
        rig.launcher.served.clear()  # the mmap is closed next
    assert image.stat().st_size == DISK
    assert image.read_bytes()[7 * 512 : 7 * 512 + 1024] == b"pvio" * 256


def test_hostile_guest_requests_get_in_band_errors() -> None:
    rig = _rig()
    blk, dev = rig.block, rig.block_device
    assert blk is not None and dev is not None
    port = rig.port
    # An unknown request type.
    port.write(blk.page, LGUEST_BLOCK_PAGE.pack(type=7, sector=0, bytes=512)[:16])
    port.write(blk.send_dma, build_dma([]))
    port.send_dma(blk.page, blk.send_dma)
    assert rig.run_interrupts() == 1
    assert LGUEST_BLOCK_PAGE.unpack(port.read(blk.page, 20))["result"] == 2
    # A sector so large that sector * 512 overflows 32 bits.
    port.write(blk.page, LGUEST_BLOCK_PAGE.pack(type=1, sector=0xFFFFFFFF, bytes=512)[:16])
    port.write(blk.send_dma, build_dma([(0x1000, 512)]))
    port.send_dma(blk.page, blk.send_dma)
    assert LGUEST_BLOCK_PAGE.unpack(port.read(blk.page, 20))["result"] == 2
    # No reply buffer bound: still an answer (result 2), not a crash.  (The interrupt
    # the Launcher then raises is an empty SEND_DMA to the key, which reaches only a
    # bound buffer: a guest that unbound its own gets none.)
    port.unbind_dma(blk.page, blk.reply_dma)
    port.write(blk.page, LGUEST_BLOCK_PAGE.pack(type=0, sector=0, bytes=512)[:16])
    port.send_dma(blk.page, blk.send_dma)
    assert dev.stats.no_reply_buffer == 1
    assert LGUEST_BLOCK_PAGE.unpack(port.read(blk.page, 20))["result"] == 2
    # A DMA section crossing a page: refused by the hypervisor, which tells the
    # Launcher bound at that key; it marks the device FAILED.
    port.write(blk.send_dma, LGUEST_DMA.pack(addr=[0x1FF8], len=[16]))
    with pytest.raises(DmaError):
        port.send_dma(blk.page, blk.send_dma)
    assert rig.status(0) & LGUEST_DEVICE_S_FAILED


def test_a_stray_key_inside_the_page_reaches_nobody() -> None:
    rig = _rig()
    assert rig.block is not None and rig.block_device is not None
    rig.port.write(rig.block.send_dma, build_dma([]))
    # The Launcher binds only the page's first word: another key of the page finds no
    # buffer; the device logic would count one if it were ever handed one.
    assert rig.port.send_dma(rig.block.page + 8, rig.block.send_dma) == 0
    assert rig.block_device.request(rig.launcher.port, rig.block.page + 8, b"") is None
    assert rig.block_device.stats.stray_keys == 1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, DISK // 512 + 4), st.integers(1, 24)),
                min_size=1, max_size=12))
def test_random_requests_match_a_model_disk(ops: list[tuple[bool, int, int]]) -> None:
    storage = bytearray(DISK)
    rig = _rig(storage)
    model = bytearray(DISK)
    assert rig.block is not None
    for n, (is_write, sector, sectors) in enumerate(ops):
        nbytes = sectors * 512
        inside = sector * 512 + nbytes <= DISK
        if is_write:
            data = bytes([n + 1]) * nbytes
            rig.block.write(sector, data)
            if inside:
                model[sector * 512 : sector * 512 + nbytes] = data
        else:
            rig.block.read(sector, nbytes)
        done = _complete(rig)
        assert done.ok == inside
        if not is_write and inside:
            assert done.data == bytes(model[sector * 512 : sector * 512 + nbytes])
    assert storage == model


def test_block_page_golden_bytes() -> None:
    raw = LGUEST_BLOCK_PAGE.pack(type=1, sector=0x01020304, bytes=4096, result=2,
                                 num_sectors=0xA0B0C0D0)
    assert raw == bytes.fromhex("01000000" "04030201" "00100000" "02000000" "d0c0b0a0")


def test_a_refused_request_leaves_nothing_in_flight() -> None:
    rig = _rig()
    blk = rig.block
    assert blk is not None
    blk.page += 2  # the driver's key breaks a rule: the hypervisor refuses its SEND_DMA
    with pytest.raises(DmaError):
        blk.read(0, 512)
    assert not blk.busy and blk.stats.errors == 1
    assert rig.status(0) & LGUEST_DEVICE_S_FAILED  # and its Launcher was told
