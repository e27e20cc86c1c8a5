"""The synchronous drivers in a worker thread, their hypercalls on an asyncio loop."""

from __future__ import annotations

import asyncio
import errno

import pytest

from pvio.abi.lguest import LGUEST_DEVICE_T_BLOCK, LGUEST_DEVICE_T_NET
from pvio.domains.lguest_aio import GuestThread, LguestDisk, ThreadedDmaPort
from pvio.lguest.allocator import Allocator
from pvio.lguest.block import MAX_REQUEST_BYTES, BlockDevice, BlockDriver
from pvio.lguest.bus import Bus, DeviceDriver, DeviceTable, LguestDevice
from pvio.lguest.dma import PAGE_SIZE, DmaError, LguestError
from pvio.lguest.net import BROADCAST, NetDriver, lan_features
from pvio.testing.lguest_world import AsyncDomainClient, DomainPort, Lan, LguestWorld, new_guest


def _disk_guest(image: bytearray) -> tuple[DeviceTable, DomainPort, BlockDevice]:
    """A guest with one block device, served by its Launcher from `image`."""
    table = DeviceTable(64)
    slot = table.add(LGUEST_DEVICE_T_BLOCK)
    guest, launcher = new_guest(LguestWorld(), "g", table)
    device = BlockDevice(slot, len(image))
    device.setup(launcher.port)
    launcher.serve(slot, device, MAX_REQUEST_BYTES, image=image)
    return table, guest, device


async def _block_scenario() -> None:
    table, guest, _ = _disk_guest(bytearray(1 << 20))
    loop = asyncio.get_running_loop()
    port = ThreadedDmaPort(AsyncDomainClient(guest), loop, timeout=5)
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
            await thread.call(port.bind_dma, table.slots[0].addr + 2, 0x1000, 1, 2)
        assert derr.value.errno == errno.EINVAL
    finally:
        thread.close()


def test_block_driver_in_a_thread() -> None:
    asyncio.run(asyncio.wait_for(_block_scenario(), 30))


async def _net_scenario() -> None:
    lan = Lan(LguestWorld())
    loop = asyncio.get_running_loop()
    guests, ports, nets, threads, buses = [], [], [], [], []
    for i in range(2):
        table = DeviceTable(64)
        slot = table.add(LGUEST_DEVICE_T_NET, features=lan_features(lan.owner.claim()))
        guest, _ = new_guest(lan.world, f"g{i}", table)
        lan.join(guest, slot.addr)
        port = ThreadedDmaPort(AsyncDomainClient(guest), loop, timeout=5)
        bus = Bus(port, table.top_pfn, table.total_pages)
        alloc = Allocator(PAGE_SIZE, 64 * PAGE_SIZE)
        found: list[NetDriver] = []
        thread = GuestThread(f"g{i}")
        await thread.call(bus.scan)
        await thread.call(bus.register_driver, LGUEST_DEVICE_T_NET,
                          lambda d, a=alloc, f=found: f.append(NetDriver(d, a)) or f[-1])
        await thread.call(found[0].open)
        guests.append(guest)
        ports.append(port)
        nets.append(found[0])
        threads.append(thread)
        buses.append(bus)

    def send(net: NetDriver, port: ThreadedDmaPort, frame: bytes) -> list[int]:
        net.queue([frame])
        batch = net.stage()
        results = port.send_dma_many(batch.sends)  # one hypercall batch, from the thread
        net.account(batch, results)
        return results

    try:
        f = BROADCAST + nets[0].mac + b"\x08\x06" + b"\x01" * 46
        assert await threads[0].call(send, nets[0], ports[0], f) == [len(f)]
        for irq in guests[1].take_irqs():
            await threads[1].call(buses[1].interrupt, irq)
        assert nets[1].take_frames() == [f] and nets[0].stats.tx_packets == 1
    finally:
        for t in threads:
            t.close()


def test_net_drivers_in_threads() -> None:
    asyncio.run(asyncio.wait_for(_net_scenario(), 30))


async def _disk_scenario() -> None:
    image = bytearray(1 << 20)
    table, guest, device = _disk_guest(image)
    loop = asyncio.get_running_loop()
    client = AsyncDomainClient(guest)
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

        def on_irq(_irq: int) -> None:  # on the loop, as the guest process does
            drivers[0].interrupt()
            disk.completed()

        client.set_irq_handler(on_irq)
        assert disk.size == 1 << 20
        data = bytes(range(256)) * 800  # 200 KiB: four 64 KiB requests
        await disk.write(4096, data)
        assert bytes(image[4096 : 4096 + len(data)]) == data
        assert await disk.read(4096, len(data)) == data
        await disk.flush()
        with pytest.raises(OSError) as exc:
            await disk.read(1000, 512)  # not sector-aligned
        assert exc.value.errno == errno.EINVAL
        with pytest.raises(OSError):
            await disk.write((1 << 20) - 512, b"x" * 1024)  # past the end
        assert device.stats.refused_writes == 0  # refused before it reached the wire
        del image[512 * 1024 :]  # the image shrank under the Launcher
        with pytest.raises(OSError) as exc:
            await disk.read(768 * 1024, 4096)
        assert exc.value.errno == errno.EIO
        assert await disk.read(0, 512) == bytes(512)  # and the disk still works
    finally:
        thread.close()


def test_lguest_disk_for_an_export() -> None:
    asyncio.run(asyncio.wait_for(_disk_scenario(), 30))
