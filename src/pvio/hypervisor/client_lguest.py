"""A domain's lguest client: shared regions, BIND_DMA/SEND_DMA, interrupts.

Theory of operation
-------------------
`LguestClient` is what an lguest guest or Launcher domain asks of the hypervisor's
`pvio.hypervisor.lguest_dma` (which states the DMA rules).  The domain's lguest physical
address space is its memory from address 0, plus the shared regions it created or
attached above that (`lguest_region`: lguest's --sharenet file, here a memfd the
hypervisor hands to each domain that attaches it -- only to the permitted ones once its
creator has permitted any -- mapped once); `phys` resolves an address in that space to
a view, as a driver resolves a key or a lguest_dma section.

LHCALL_BIND_DMA and LHCALL_SEND_DMA go to the hypervisor as they went to the Host, one
op each; `send_dma_many` batches several sends into one round trip.  An interrupt comes
back as a PVIO_PUSH_irq push (an irq raised several times before the hypervisor next
sends the domain its pushes arrives once, as lguest kept one pending bit per irq).  `on_irq` hands it to the
handler set with `set_irq_handler`, if any, and wakes every `wait_irq` waiter; nothing
is kept afterwards, so a domain that takes a million interrupts holds no more than one
that took none.

Deliberately not here: what the Launcher or a driver does with the interrupt, and the
DMA rules themselves (`pvio.lguest.dma`, applied by the hypervisor, not by the client).
"""

from __future__ import annotations

import asyncio
import mmap
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pvio.abi.lguest import LHCALL_BIND_DMA, LHCALL_SEND_DMA
from pvio.hypervisor import wire
from pvio.hypervisor.client_channel import Hypercalls
from pvio.hypervisor.client_memory import MemoryClient, close_mmap
from pvio.hypervisor.domain import PAGE_SIZE
from pvio.hypervisor.wire import Op
from pvio.trace import TRACE


@dataclass
class LguestRegion:
    """A region shared by several domains, attached at `base` in this domain's space."""

    region_id: int
    base: int
    nr_pages: int
    view: memoryview


class LguestClient:
    """A domain's lguest regions, DMA hypercalls and interrupts (see the module notes)."""

    def __init__(self, calls: Hypercalls, memory: MemoryClient, domid: int) -> None:
        self._calls = calls
        self._memory = memory
        self._domid = domid
        self.regions: dict[int, LguestRegion] = {}
        self._region_mms: list[mmap.mmap] = []
        self._irq_handler: Callable[[int], None] | None = None
        self._irq_waiters: list[asyncio.Future[int]] = []

    # -- the address space -----------------------------------------------------------------

    async def lguest_region(self, nr_pages: int, base: int, region_id: int = 0) -> LguestRegion:
        """Create (region_id 0) or attach a region shared with other domains at `base`."""
        cmd = wire.PVIO_LGUEST_region_attach if region_id else wire.PVIO_LGUEST_region_create
        args = wire.PVIO_LGUEST_REGION.pack(region_id=region_id, nr_pages=nr_pages, base=base)
        reply = await self._calls.one(Op(wire.PVIO_HYPERVISOR_lguest, cmd, 1, args), "lguest region")
        info = wire.PVIO_LGUEST_REGION.unpack(reply.args)
        try:
            mm = mmap.mmap(reply.fds[0], info["nr_pages"] * PAGE_SIZE)
        finally:
            for fd in reply.fds:
                os.close(fd)
        self._region_mms.append(mm)
        region = LguestRegion(info["region_id"], base, info["nr_pages"], memoryview(mm))
        self.regions[region.region_id] = region
        return region

    async def lguest_region_permit(self, region_id: int, peer: int) -> None:
        """Let domain `peer` attach a region this domain created (then only permitted
        domains may)."""
        args = wire.PVIO_LGUEST_REGION.pack(region_id=region_id, peer=peer)
        op = Op(wire.PVIO_HYPERVISOR_lguest, wire.PVIO_LGUEST_region_permit, 1, args)
        await self._calls.one(op, "lguest region permit")

    async def lguest_region_frames(self, region_id: int, min_len: int, max_len: int, flood: int) -> None:
        """Declare that keys in a region this domain created carry frames of
        min_len..max_len bytes, and that more than `flood` drops a second from one
        sender is a flood (PVIO_LGUEST_region_frames)."""
        args = wire.PVIO_LGUEST_FRAMES.pack(region_id=region_id, min_len=min_len, max_len=max_len, flood=flood)
        op = Op(wire.PVIO_HYPERVISOR_lguest, wire.PVIO_LGUEST_region_frames, 1, args)
        await self._calls.one(op, "lguest region frames")

    def phys(self, addr: int, length: int) -> memoryview:
        """A view of [addr, addr+length) of this domain's lguest physical space."""
        memory = self._memory
        if addr >= 0 and addr + length <= memory.nr_pages * PAGE_SIZE:
            return memory.memory[addr : addr + length]
        for r in self.regions.values():
            if r.base <= addr and addr + length <= r.base + r.nr_pages * PAGE_SIZE:
                return r.view[addr - r.base : addr - r.base + length]
        raise IndexError(f"address {addr:#x}+{length} outside d{self._domid}")

    # -- DMA -------------------------------------------------------------------------------

    async def _lhcall(self, cmd: int, a1: int, a2: int, a3: int = 0) -> int:
        args = wire.PVIO_LHCALL.pack(arg1=a1, arg2=a2, arg3=a3)
        t0 = time.monotonic_ns() if TRACE.on else 0
        reply = await self._calls.one(Op(wire.PVIO_HYPERVISOR_lguest, cmd, 1, args), f"LHCALL {cmd}")
        ret: int = wire.PVIO_LHCALL.unpack(reply.args)["ret"]
        if t0:  # the round trip, as this domain sees it (the hypervisor traces its batch)
            TRACE.span("lguest SEND_DMA" if cmd == LHCALL_SEND_DMA else "lguest BIND_DMA", "lguest", t0,
                       args={"key": a1, "dma": a2, "ret": ret})
        return ret

    async def bind_dma(self, key: int, dmas: int, count: int, irq: int) -> None:
        """BIND_DMA: offer `count` lguest_dma buffers at `dmas` on `key`, raising `irq`."""
        await self._lhcall(LHCALL_BIND_DMA, key, dmas, (count << 8) | irq)

    async def unbind_dma(self, key: int, dmas: int) -> None:
        """BIND_DMA with irq 0: withdraw the buffers at `dmas` from `key`."""
        await self._lhcall(LHCALL_BIND_DMA, key, dmas, 0)

    async def send_dma(self, key: int, dma: int) -> int:
        """SEND_DMA; returns the bytes copied (also written into the dma's used_len)."""
        return await self._lhcall(LHCALL_SEND_DMA, key, dma)

    async def send_dma_many(self, sends: Sequence[tuple[int, int]]) -> list[int]:
        """Several SEND_DMA(key, dma) in one batch (one round trip): for each, the bytes
        copied, or the -errno it was refused with."""
        ops = [
            Op(wire.PVIO_HYPERVISOR_lguest, LHCALL_SEND_DMA, 1, wire.PVIO_LHCALL.pack(arg1=k, arg2=d))
            for k, d in sends
        ]
        t0 = time.monotonic_ns() if TRACE.on else 0
        out: list[int] = []
        for reply in await self._calls.batch(ops):
            out.append(reply.rc if reply.rc else int(wire.PVIO_LHCALL.unpack(reply.args)["ret"]))
        if t0:
            TRACE.span("lguest SEND_DMA batch", "lguest", t0, args={"sends": len(ops), "bytes": sum(max(n, 0) for n in out)})
        return out

    # -- interrupts ------------------------------------------------------------------------

    def set_irq_handler(self, handler: Callable[[int], None] | None) -> None:
        """Run `handler(irq)` from the event loop on each interrupt (None: no handler)."""
        self._irq_handler = handler

    async def wait_irq(self) -> int:
        """Wait for the next interrupt; returns its number."""
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._irq_waiters.append(fut)
        return await fut

    def on_irq(self, irq: int) -> None:
        """A PVIO_PUSH_irq: tell the handler and the waiters, and keep nothing."""
        if TRACE.on:
            TRACE.instant("lguest irq", "lguest", args={"irq": irq})
        if self._irq_handler is not None:
            self._irq_handler(irq)
        waiters, self._irq_waiters = self._irq_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(irq)

    # -- the end ---------------------------------------------------------------------------

    def close(self) -> None:
        """Release every region's view and mapping."""
        for r in self.regions.values():
            r.view.release()
        for mm in self._region_mms:
            close_mmap(mm)
        self._region_mms.clear()
        self.regions.clear()
