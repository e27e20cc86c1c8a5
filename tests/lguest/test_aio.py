"""The synchronous drivers in a worker thread, their hypercalls on an asyncio loop."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pytest

from pvio.abi.lguest import LGUEST_DEVICE_T_BLOCK, LGUEST_DEVICE_T_NET
from pvio.lguest.aio import GuestThread, LguestDisk, ThreadedDmaPort
from pvio.lguest.block import BlockDevice, BlockDriver
from pvio.lguest.bus import Bus, DeviceDriver, DeviceTable, LguestDevice
from pvio.lguest.dma import PAGE_SIZE, DmaError, LguestError
from pvio.lguest.guest import Allocator
from pvio.lguest.net import BROADCAST, NetDriver, lan_features
from pvio.lguest.storage import MemoryStorage
from pvio.testing.lguest_dma import InProcessDmaHost, InProcessGuest
from pvio.testing.lguest_guest import Lan


@dataclass
class RefusedByHypervisor(Exception):
    """Shaped like the hypervisor client's HypercallError: a negative errno in rc."""

    rc: int
    field: str = "key"


class FakeAsyncClient:
    """An asyncio client over the in-process host (the test forwards interrupts)."""

    def __init__(self, guest: InProcessGuest) -> None:
        self.guest = guest
        self.after_send: Callable[[], Awaitable[None]] | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def bind_dma(self, key: int, dmas: int, count: int, irq: int) -> None:
        try:
            self.guest.bind_dma(key, dmas, count, irq)
        except DmaError as exc:
            raise RefusedByHypervisor(-exc.errno, exc.field) from exc

    async def unbind_dma(self, key: int, dmas: int) -> None:
        self.guest.unbind_dma(key, dmas)

    async def send_dma(self, key: int, dma: int) -> int:
        try:
            used = self.guest.send_dma(key, dma)
        except DmaError as exc:
            raise RefusedByHypervisor(-exc.errno, exc.field) from exc
        if self.after_send is not None:  # interrupts are delivered later, on the loop
            task = asyncio.get_running_loop().create_task(self.after_send())
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        return used

    def phys(self, addr: int, length: int) -> memoryview:
        return self.guest.memory.view(addr, length)


async def _block_scenario() -> None:
    host = InProcessDmaHost()
    table = DeviceTable(64)
    slot = table.add(LGUEST_DEVICE_T_BLOCK)
    guest = host.new_guest("g", table)
    device = BlockDevice(slot, MemoryStorage(1 << 20))
    device.setup(guest.launcher)
    guest.attach(slot.index, device)
    loop = asyncio.get_running_loop()
    port = ThreadedDmaPort(FakeAsyncClient(guest), loop, timeout=5)
    thread = GuestThread()
    try:
        bus = Bus(port, table.top_pfn, table.total_pages)
        alloc = Allocator(PAGE_SIZE, 64 * PAGE_SIZE)
        drivers: list[BlockDriver] = []

        def probe(dev: LguestDevice) -> DeviceDriver:
            drivers.append(BlockDriver(dev, alloc))
            return drivers[-1]

        await thread.call(bus.scan)
        await thread.call(bus.register_driver, LGUEST_DEVICE_T_BLOCK, probe)
        (blk,) = drivers
        await thread.call(blk.write, 8, b"threads" * 512 + b"\0" * 512)
        for irq in guest.take_irqs():  # the loop forwards interrupts to the thread
            await thread.call(bus.interrupt, irq)
        (done,) = blk.take_completions()
        assert done.ok
        await thread.call(blk.read, 8, 4096)
        for irq in guest.take_irqs():
            await thread.call(bus.interrupt, irq)
        (done,) = blk.take_completions()
        assert done.data[:14] == b"threadsthreads"
        # A hypercall from the loop's own thread is refused, not a deadlock.
        with pytest.raises(LguestError) as exc:
            port.send_dma(blk.page, blk.send_dma)
        assert exc.value.errno == errno.EDEADLK
        # A refusal by the hypervisor becomes a DmaError with its errno.
        with pytest.raises(DmaError) as derr:
            await thread.call(port.bind_dma, slot.addr + 2, 0x1000, 1, 2)
        assert derr.value.errno == errno.EINVAL and derr.value.field == "key"
    finally:
        thread.close()


def test_block_driver_in_a_thread() -> None:
    asyncio.run(asyncio.wait_for(_block_scenario(), 30))


async def _net_scenario() -> None:
    host = InProcessDmaHost()
    lan = Lan()
    loop = asyncio.get_running_loop()
    guests, nets, threads, buses = [], [], [], []
    for i in range(2):
        table = DeviceTable(64)
        slot_no = lan.owner.claim()
        slot = table.add(LGUEST_DEVICE_T_NET, features=lan_features(slot_no))
        guest = host.new_guest(f"g{i}", table)
        guest.memory.map_shared(slot.pfn, lan.pages)
        port = ThreadedDmaPort(FakeAsyncClient(guest), loop, timeout=5)
        bus = Bus(port, table.top_pfn, table.total_pages)
        alloc = Allocator(PAGE_SIZE, 64 * PAGE_SIZE)
        found: list[NetDriver] = []
        thread = GuestThread(f"g{i}")
        await thread.call(bus.scan)
        await thread.call(bus.register_driver, LGUEST_DEVICE_T_NET,
                          lambda d, a=alloc, f=found: f.append(NetDriver(d, a)) or f[-1])
        await thread.call(found[0].open)
        guests.append(guest)
        nets.append(found[0])
        threads.append(thread)
        buses.append(bus)
    try:
        f = BROADCAST + nets[0].mac + b"\x08\x06" + b"\x01" * 46
        assert await threads[0].call(nets[0].transmit, f) == 1
        for irq in guests[1].take_irqs():
            await threads[1].call(buses[1].interrupt, irq)
        assert nets[1].take_frames() == [f]
    finally:
        for t in threads:
            t.close()


def test_net_drivers_in_threads() -> None:
    asyncio.run(asyncio.wait_for(_net_scenario(), 30))


async def _disk_scenario() -> None:
    host = InProcessDmaHost()
    table = DeviceTable(64)
    slot = table.add(LGUEST_DEVICE_T_BLOCK)
    guest = host.new_guest("g", table)
    storage = MemoryStorage(1 << 20)
    device = BlockDevice(slot, storage)
    device.setup(guest.launcher)
    guest.attach(slot.index, device)
    loop = asyncio.get_running_loop()
    client = FakeAsyncClient(guest)
    port = ThreadedDmaPort(client, loop, timeout=5)
    thread = GuestThread()
    try:
        bus = Bus(port, table.top_pfn, table.total_pages)
        alloc = Allocator(PAGE_SIZE, 64 * PAGE_SIZE)
        drivers: list[BlockDriver] = []
        await thread.call(bus.scan)
        await thread.call(bus.register_driver, LGUEST_DEVICE_T_BLOCK,
                          lambda d: drivers.append(BlockDriver(d, alloc)) or drivers[-1])
        disk = LguestDisk(drivers[0], client)  # the disk's requests run on the loop

        async def deliver_interrupts() -> None:
            for _irq in guest.take_irqs():
                drivers[0].interrupt()  # on the loop, as the guest process does
            disk.completed()

        client.after_send = deliver_interrupts
        assert disk.size == 1 << 20
        data = bytes(range(256)) * 800  # 200 KiB: four 64 KiB requests
        await disk.write(4096, data)
        assert bytes(storage.data[4096 : 4096 + len(data)]) == data
        assert await disk.read(4096, len(data)) == data
        await disk.flush()
        with pytest.raises(OSError) as exc:
            await disk.read(1000, 512)  # not sector-aligned
        assert exc.value.errno == errno.EINVAL
        with pytest.raises(OSError):
            await disk.write((1 << 20) - 512, b"x" * 1024)  # past the end
        assert device.stats.refused_writes == 0  # refused before it reached the wire
        del storage.data[512 * 1024 :]  # the image shrank under the Launcher
        with pytest.raises(OSError) as exc:
            await disk.read(768 * 1024, 4096)
        assert exc.value.errno == errno.EIO
        assert await disk.read(0, 512) == bytes(512)  # and the disk still works
    finally:
        thread.close()


def test_lguest_disk_for_an_export() -> None:
    asyncio.run(asyncio.wait_for(_disk_scenario(), 30))
