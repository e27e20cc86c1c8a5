"""A guest's own memory bookkeeping: where its drivers put their buffers.

A real guest kernel allocates its DMA buffers with kmalloc; a pvio guest is a Python
object whose drivers need guest-physical addresses for the same purpose.  `Allocator`
hands out addresses in the guest's RAM, never past the top (the descriptor page), with
page-aligned allocations for anything that must not straddle pages needlessly.  It is
a bump allocator: lguest's drivers allocate at probe and open time and keep their
buffers for the device's life, so nothing is ever freed piecemeal.
"""

from __future__ import annotations

from pvio.abi.fault import Fault
from pvio.lguest.dma import PAGE_SIZE, LguestError


class Allocator:
    """Bump allocation of guest-physical addresses in [start, end)."""

    def __init__(self, start: int, end: int) -> None:
        if not 0 <= start <= end:
            raise LguestError(f"bad range {start:#x}..{end:#x}", fault=Fault.LOCAL, field="start")
        self._next = start
        self.end = end

    def alloc(self, size: int, *, align: int = 8) -> int:
        addr = -(-self._next // align) * align
        if size <= 0 or addr + size > self.end:
            raise LguestError(f"cannot allocate {size} bytes", fault=Fault.LOCAL, field="size")
        self._next = addr + size
        return addr

    def alloc_pages(self, count: int) -> int:
        return self.alloc(count * PAGE_SIZE, align=PAGE_SIZE)

    def alloc_unsplit(self, size: int) -> int:
        """`size` (<= a page) bytes that do not cross a page boundary."""
        addr = self.alloc(1, align=8)
        if addr % PAGE_SIZE + size > PAGE_SIZE:
            addr = -(-addr // PAGE_SIZE) * PAGE_SIZE
        self._next = addr
        return self.alloc(size, align=8)
