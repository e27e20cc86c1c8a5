"""The Launcher's port when the Launcher is a domain: device pages shared, replies by DMA.

Theory of operation
-------------------
Under pvio's hypervisor a Launcher is a domain like its guest, with a little memory of
its own.  It creates a region holding the descriptor page and the device pages; the
guest attaches that region at the top of its RAM and the Launcher above its own memory,
so a guest address in the region is a Launcher address minus a constant (`delta`).  A
device key is an address in the region, so it is one key for both: the Launcher binds
one receive buffer at each device's key, the guest's SEND_DMA lands there, and the
Launcher's own SEND_DMA to the same key reaches the buffer the guest bound.

`HvLauncherPort` is the `LauncherPort` the device logic (`pvio.lguest.block`,
`console`, `bus`) sees there: reads and writes are translated and confined to the
region (the guest's RAM is out of the Launcher's reach, and asking for it is refused),
and `deliver` is the Launcher's SEND_DMA, staged in a transmit buffer of its memory.
`take_received` empties a device's receive buffer.  Both only move bytes through the
`DmaPort` they are given: a worker thread's port over the asyncio client in a Launcher
process, or a synchronous port over the hypervisor core in process (`pvio.testing`).

Rejected: letting the Launcher map the guest's RAM (lguest's Launcher could; here data
moves only by DMA, and the Launcher sees only the pages the two share).
"""

from __future__ import annotations

import errno
import struct

from pvio.lguest.block import MAX_REQUEST_BYTES
from pvio.lguest.dma import DMA_SIZE, DmaPort, LguestError, build_dma, page_sections

_U32 = struct.Struct("<I")


class HvLauncherPort:
    """`LauncherPort` for a Launcher domain: the device region and its own SEND_DMA.

    Guest addresses are translated by `delta` into the Launcher's view of the device
    region; anything else (the guest's RAM) is out of its reach and refused."""

    def __init__(self, port: DmaPort, delta: int, lo: int, hi: int, tx_dma: int, tx_buf: int,
                 irq_keys: dict[int, int]) -> None:
        self.port = port
        self.delta = delta
        self.lo, self.hi = lo, hi  # guest addresses of the device region
        self.tx_dma = tx_dma
        self.tx_buf = tx_buf
        self.irq_keys = irq_keys

    def _check(self, addr: int, length: int) -> int:
        if not (self.lo <= addr and addr + length <= self.hi):
            raise LguestError(f"{addr:#x}+{length} is not in the device region", field="addr",
                              err=errno.EFAULT)
        return addr + self.delta

    def read(self, addr: int, length: int) -> bytes:
        return self.port.read(self._check(addr, length), length)

    def write(self, addr: int, data: bytes | memoryview) -> None:
        self.port.write(self._check(addr, len(data)), data)

    def deliver(self, key: int, data: bytes) -> int | None:
        n = self.port.send_dma(*self.stage(key, data, self.tx_buf, self.tx_dma))
        return None if data and n == 0 else n

    def stage(self, key: int, data: bytes, buf: int, dma: int) -> tuple[int, int]:
        """`data` (at most 64 KiB) into `buf` and its lguest_dma at `dma`, both in the
        Launcher's memory; the (key, dma) of the SEND_DMA that delivers it."""
        data = data[:MAX_REQUEST_BYTES]
        if data:
            self.port.write(buf, data)
        self.port.write(dma, build_dma(page_sections(buf, len(data))))
        return self._check(key, 4), dma

    def trigger_irq(self, irq: int) -> None:
        key = self.irq_keys.get(irq)
        if key is not None:
            self.deliver(key, b"")


def take_received(port: DmaPort, rx_dma: int) -> bytes:
    """What the guest sent into the receive buffer whose lguest_dma is at `rx_dma` (in
    the Launcher's memory, one run of pages as `page_sections` laid it out); the buffer
    is free again (used_len 0) when this returns."""
    raw = port.read(rx_dma, DMA_SIZE)
    used: int = _U32.unpack_from(raw)[0]
    if not used:
        return b""
    first: int = _U32.unpack_from(raw, 4)[0]
    data = b"".join(port.read(a, n) for a, n in page_sections(first, used))
    port.write(rx_dma, _U32.pack(0))
    return data
