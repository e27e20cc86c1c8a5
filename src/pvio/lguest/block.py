"""lguest's block device: the guest driver (lguest_blk.c) and the Launcher's server.

Theory of operation
-------------------
The device owns one page holding `struct lguest_block_page` (type, sector, bytes,
result, num_sectors).  The Launcher writes num_sectors once.  The guest has one request
in flight: it writes type, sector and bytes, clears result, and SEND_DMAs to the page's
address — with the data for a write, or an empty "ping" for a read, whose data comes
back into the one-entry reply buffer the guest bound at the same key.  The Launcher
copies the request page out once, moves the bytes (the Launcher process from a
`pvio.storage.rawfile.RawFile`, off its event loop; tests from memory), writes result
(1 ok, 2 error: ``1 + (bytes != len)`` as lguest computed it) and then fills the reply
buffer, which raises the guest's interrupt.

What pvio changes from lguest, deliberately: a request lguest's Launcher treated as fatal
(an offset past the end, no reply buffer, a write running past the end — lguest wrote,
truncated the file back and killed the guest) is answered with result 2 and counted, and
a write past the end never touches the image.  The guest driver splits its buffer into
page-bounded sections itself (lguest asked the block layer to) and refuses requests
that would need more than 16.

The Launcher's side is sans-IO: `BlockDevice.request` copies the request out and checks
it, returning a `BlockIO` (what to move); the caller moves the bytes however it can, and
`BlockDevice.finish` writes the result and returns the reply's payload.  `serve` does all
three against an image in memory (a bytearray, or an mmap of a file).

Not here: the guest's disk as async reads and writes for an NBD export
(`pvio.domains.lguest_aio.LguestDisk`, an adapter over `BlockDriver`) and any queueing:
one request at a time is the protocol.
"""

from __future__ import annotations

import errno
import mmap
import struct
from dataclasses import dataclass, field

from pvio.abi.fault import Fault
from pvio.abi.lguest import (
    LGUEST_BLOCK_PAGE,
    LGUEST_BLOCK_READ,
    LGUEST_BLOCK_RESULT_ERROR,
    LGUEST_BLOCK_RESULT_OK,
    LGUEST_BLOCK_RESULT_PENDING,
    LGUEST_BLOCK_WRITE,
    LGUEST_MAX_DMA_SECTIONS,
    LGUEST_SECTOR_SIZE,
)
from pvio.lguest.allocator import Allocator
from pvio.lguest.bus import DeviceSlot, LguestDevice
from pvio.lguest.dma import DMA_SIZE, PAGE_SIZE, LauncherPort, LguestError, build_dma, page_sections

#: A whole disk in memory, as `BlockDevice.serve` takes it (an mmap of a file will do).
DiskImage = bytearray | memoryview | mmap.mmap

#: The largest request: 16 sections of one page each.
MAX_REQUEST_BYTES = LGUEST_MAX_DMA_SECTIONS * PAGE_SIZE
_RESULT = struct.Struct("<i")
_RESULT_OFFSET = LGUEST_BLOCK_PAGE.offset("result")
_USED_LEN = struct.Struct("<I")


@dataclass(frozen=True)
class BlockCompletion:
    """A finished request as the guest sees it."""

    type: int
    sector: int
    nbytes: int
    ok: bool
    data: bytes = b""  # a successful read's data


@dataclass
class BlockDriverStatistics:
    reads: int = 0
    writes: int = 0
    errors: int = 0  # requests completed with result 2
    spurious_irqs: int = 0


# T:850 Block, guest side: one request in flight
# The guest driver binds a one-entry reply buffer at its page's address and keeps one
# request in flight.  A request names type, sector and bytes in the shared page and
# clears result; its data buffer is split at page boundaries into at most sixteen
# sections (so a request is at most 64 KiB).  A write sends those sections; a read
# points the bound reply buffer at them and sends an empty "ping" DMA, just to wake the
# Launcher.  The interrupt means result is no longer 0: 1 is success, 2 failure.  Then
# the reply buffer's used_len goes back to 0, ready for the next request.
# :T
class BlockDriver:
    """The guest's lguest block driver (`/dev/lgba`)."""

    def __init__(self, device: LguestDevice, alloc: Allocator) -> None:
        self.device = device
        self.port = device.port
        self.page = device.phys_addr
        self.reply_dma = alloc.alloc_unsplit(DMA_SIZE)
        self.send_dma = alloc.alloc_unsplit(DMA_SIZE)
        self.data = alloc.alloc_pages(LGUEST_MAX_DMA_SECTIONS)
        self.stats = BlockDriverStatistics()
        self._in_flight: tuple[int, int, int] | None = None  # type, sector, bytes
        self._done: list[BlockCompletion] = []
        # An empty reply buffer until a read points it at data: len[0] == 0.
        self.port.write(self.reply_dma, build_dma([]))
        fields = LGUEST_BLOCK_PAGE.unpack(self.port.read(self.page, LGUEST_BLOCK_PAGE.size))
        self.num_sectors: int = fields["num_sectors"]
        self.port.bind_dma(self.page, self.reply_dma, 1, device.irq)

    @property
    def busy(self) -> bool:
        return self._in_flight is not None

    def _check(self, sector: int, nbytes: int) -> None:
        if self._in_flight is not None:
            raise LguestError("a request is in flight", fault=Fault.LOCAL, field="req",
                              err=errno.EBUSY)
        if nbytes <= 0 or nbytes % LGUEST_SECTOR_SIZE or nbytes > MAX_REQUEST_BYTES:
            raise LguestError(f"{nbytes} bytes", fault=Fault.LOCAL, field="bytes")
        if not 0 <= sector <= 0xFFFFFFFF:
            raise LguestError(f"sector {sector}", fault=Fault.LOCAL, field="sector")

    def _setup(self, type_: int, sector: int, nbytes: int) -> bytes:
        head = LGUEST_BLOCK_PAGE.pack(type=type_, sector=sector, bytes=nbytes,
                                      result=LGUEST_BLOCK_RESULT_PENDING)
        # type, sector, bytes and result; num_sectors is the Launcher's.
        self.port.write(self.page, head[:_RESULT_OFFSET + 4])
        self._in_flight = (type_, sector, nbytes)
        return build_dma(page_sections(self.data, nbytes))

    def write(self, sector: int, data: bytes) -> None:
        """do_write: the data goes with the SEND_DMA."""
        self._send(*self.stage_write(sector, data))

    def read(self, sector: int, nbytes: int) -> None:
        """do_read: the reply buffer points at our data pages; an empty DMA pings."""
        self._send(*self.stage_read(sector, nbytes))

    def stage_write(self, sector: int, data: bytes) -> tuple[int, int]:
        """A write's request page and DMA, in memory; the (key, dma) of its SEND_DMA,
        for a caller that makes the hypercall itself (then `refused` if it fails)."""
        self._check(sector, len(data))
        self.port.write(self.data, data)
        self.port.write(self.send_dma, self._setup(LGUEST_BLOCK_WRITE, sector, len(data)))
        return self.page, self.send_dma

    def stage_read(self, sector: int, nbytes: int) -> tuple[int, int]:
        """A read's request page and reply buffer, in memory; (key, dma) as above."""
        self._check(sector, nbytes)
        self.port.write(self.reply_dma, self._setup(LGUEST_BLOCK_READ, sector, nbytes))
        self.port.write(self.send_dma, build_dma([]))
        return self.page, self.send_dma

    def refused(self) -> None:
        """The staged request's SEND_DMA was refused (the device has FAILED): nothing
        is in flight any more."""
        self._in_flight = None
        self.stats.errors += 1

    def _send(self, key: int, dma: int) -> None:
        try:
            self.port.send_dma(key, dma)
        except LguestError:
            self.refused()
            raise

    def interrupt(self) -> None:
        """lgb_irq: finish the request once the Launcher has written a result."""
        if self._in_flight is None:
            self.stats.spurious_irqs += 1
            return
        result = _RESULT.unpack(self.port.read(self.page + _RESULT_OFFSET, 4))[0]
        if result == LGUEST_BLOCK_RESULT_PENDING:
            self.stats.spurious_irqs += 1
            return
        type_, sector, nbytes = self._in_flight
        ok = result == LGUEST_BLOCK_RESULT_OK
        data = b""
        if type_ == LGUEST_BLOCK_READ:
            self.stats.reads += 1
            if ok:
                data = self.port.read(self.data, nbytes)
        else:
            self.stats.writes += 1
        if not ok:
            self.stats.errors += 1
        self._done.append(BlockCompletion(type_, sector, nbytes, ok, data))
        self._in_flight = None
        # Reset incoming DMA for next time, and stop pointing it at our data.
        self.port.write(self.reply_dma, build_dma([]))

    def take_completions(self) -> list[BlockCompletion]:
        done, self._done = self._done, []
        return done

    def remove(self) -> None:
        self.port.unbind_dma(self.page, self.reply_dma)


@dataclass
class BlockDeviceStatistics:
    reads: int = 0
    writes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    errors: int = 0  # requests answered with result 2
    refused_writes: int = 0  # writes past the end, refused without touching the image
    no_reply_buffer: int = 0
    stray_keys: int = 0  # SEND_DMAs to a key of ours that is not the page


@dataclass(frozen=True)
class BlockIO:
    """One checked request: what the Launcher must move before `BlockDevice.finish`."""

    write: bool
    offset: int
    length: int  # bytes to move; -1: refused (answered with an error, the image untouched)
    asked: int  # the request's `bytes`
    data: bytes = b""  # a write's data


@dataclass
class BlockDevice:
    """The Launcher's block device for a disk of `size` bytes, one request at a time."""

    slot: DeviceSlot
    size: int
    stats: BlockDeviceStatistics = field(default_factory=BlockDeviceStatistics)
    _answered_ok: bool = False

    def setup(self, port: LauncherPort) -> None:
        """Tell the guest the disk's size (num_sectors = size / 512)."""
        sectors = self.size // LGUEST_SECTOR_SIZE
        port.write(self.slot.addr, LGUEST_BLOCK_PAGE.pack(num_sectors=sectors))

    # T:860 Block, Launcher side: serve one request, refuse what is wrong
    # The Launcher wakes on the guest's SEND_DMA to the page's key and copies the request
    # page out once.  A write stores the data that came with the DMA; a read takes
    # `bytes` (at most sixteen pages) from the image and delivers it into the reply
    # buffer the guest bound at the same key.  The result is lguest's
    # `1 + (bytes != len)`: 1 when exactly the requested bytes moved.  Where lguest's
    # Launcher exited (an offset past the end, no reply buffer) or wrote, truncated the
    # image back and killed the guest (a write running past the end), pvio answers
    # result 2, counts it, and leaves the image untouched.  The result is written before
    # the reply is delivered, because delivering raises the guest's interrupt.
    # :T
    def request(self, port: LauncherPort, key: int, data: bytes) -> BlockIO | None:
        """The request the guest's SEND_DMA to `key` carries, checked (None for a stray
        key: nothing to answer)."""
        if key != self.slot.addr:
            self.stats.stray_keys += 1
            return None
        req = LGUEST_BLOCK_PAGE.unpack(port.read(self.slot.addr, LGUEST_BLOCK_PAGE.size))
        offset = req["sector"] * LGUEST_SECTOR_SIZE
        asked = req["bytes"]
        if req["type"] == LGUEST_BLOCK_WRITE:
            self.stats.writes += 1
            if offset < self.size and len(data) <= self.size - offset:
                return BlockIO(True, offset, len(data), asked, data)
            self.stats.refused_writes += 1
            return BlockIO(True, offset, -1, asked)
        if req["type"] == LGUEST_BLOCK_READ:
            self.stats.reads += 1
            if offset < self.size:
                return BlockIO(False, offset, min(asked, MAX_REQUEST_BYTES, self.size - offset), asked)
        return BlockIO(False, offset, -1, asked)

    def finish(self, port: LauncherPort, io: BlockIO, moved: bytes | int | None) -> bytes:
        """The bytes moved for `io` (a read's data, a write's count; None: the storage
        failed): write the result and return the payload to deliver at the page's key."""
        payload = moved if isinstance(moved, bytes) else b""
        length = -1 if io.length < 0 or moved is None else len(moved) if isinstance(moved, bytes) else moved
        if length >= 0:
            if io.write:
                self.stats.bytes_written += length
            else:
                self.stats.bytes_read += length
        result = LGUEST_BLOCK_RESULT_ERROR if length < 0 else 1 + (io.asked != length)
        if result != LGUEST_BLOCK_RESULT_OK:
            self.stats.errors += 1
        self._result(port, result)
        self._answered_ok = result == LGUEST_BLOCK_RESULT_OK
        return payload if length >= 0 else b""

    def serve(self, port: LauncherPort, key: int, data: bytes, image: DiskImage) -> bytes | None:
        """`request`, the bytes moved in `image` (the whole disk in memory), `finish`."""
        io = self.request(port, key, data)
        if io is None:
            return None
        moved: bytes | int | None = None
        if io.length >= 0:
            end = io.offset + io.length
            if io.write:
                image[io.offset : end] = io.data
                moved = io.length
            else:
                moved = bytes(image[io.offset : end])
        return self.finish(port, io, moved)

    def no_reply_buffer(self, port: LauncherPort) -> None:
        """The reply found no buffer: the guest broke the protocol.  The result becomes
        an error, and the caller still raises the interrupt.  (Under pvio's hypervisor
        that is an empty SEND_DMA to the page's key, which reaches only a free buffer
        bound there: a guest that unbound its reply buffer, or never freed it, hears
        nothing, and waits by its own doing.)"""
        self.stats.no_reply_buffer += 1
        if self._answered_ok:
            self.stats.errors += 1
        self._result(port, LGUEST_BLOCK_RESULT_ERROR)

    def _result(self, port: LauncherPort, result: int) -> None:
        port.write(self.slot.addr + _RESULT_OFFSET, _RESULT.pack(result))
