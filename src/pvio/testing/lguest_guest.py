"""Whole lguest guests in one process: Launcher devices, bus, drivers, and the DMA double.

`Lan` is a LAN page shared by in-process guests (its owner claims slots);
`build_guest` lays out a guest's devices the way the Launcher does, boots its bus and
probes its drivers, and returns an `InProcessLguest` whose `run_interrupts()` plays the
part of the guest's interrupt handler.  Used by the tests and by the TAP test's frame
switch; end-to-end runs put the same pieces in separate processes around the
hypervisor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

from pvio.abi.lguest import (
    LGUEST_DEVICE_F_RANDOMNESS,
    LGUEST_DEVICE_T_BLOCK,
    LGUEST_DEVICE_T_CONSOLE,
    LGUEST_DEVICE_T_NET,
)
from pvio.domains.tap import TapInterface, TapLink
from pvio.lguest.block import BlockDevice, BlockDriver
from pvio.lguest.bus import Bus, DeviceDriver, DeviceTable, LguestDevice
from pvio.lguest.console import ConsoleDevice, ConsoleDriver
from pvio.lguest.dma import PAGE_SIZE
from pvio.lguest.guest import Allocator
from pvio.lguest.net import ETH_DATA_LEN, HostNetPeer, LanPage, NetDriver, lan_features
from pvio.lguest.storage import Storage
from pvio.testing.lguest_dma import InProcessDmaHost, InProcessGuest, SharedPages


class Lan:
    """A LAN page mapped into in-process guests, with its owner's slot book."""

    def __init__(self, num_pages: int = 1) -> None:
        self.pages = SharedPages(num_pages)
        self.owner = LanPage(self.pages.data)
        self.host_peer: HostNetPeer | None = None
        self._guests: list[tuple[int, InProcessGuest, int]] = []  # slot, guest, page address

    def add_host_peer(self, host: InProcessDmaHost, mac: bytes) -> HostNetPeer:
        """The host joins the LAN (lguest's --tunnet): a slot, a key, every guest reachable."""
        peer = HostNetPeer(self.owner, mac)
        host.bind_launcher(self.pages, 4 * peer.slot, peer)
        for slot, guest, addr in self._guests:
            peer.attach(slot, guest.launcher, addr)
        self.host_peer = peer
        return peer

    def joined(self, slot: int, guest: InProcessGuest, addr: int) -> None:
        self._guests.append((slot, guest, addr))
        if self.host_peer is not None:
            self.host_peer.attach(slot, guest.launcher, addr)


@dataclass
class InProcessLguest:
    """A guest and its Launcher in one object."""

    guest: InProcessGuest
    table: DeviceTable
    bus: Bus
    alloc: Allocator
    block: BlockDriver | None = None
    console: ConsoleDriver | None = None
    net: NetDriver | None = None
    block_device: BlockDevice | None = None
    console_device: ConsoleDevice | None = None
    lan_slot: int | None = None
    handled: int = field(default=0)

    def run_interrupts(self) -> int:
        """Deliver pending interrupts to the drivers until none are left."""
        n = 0
        while irqs := self.guest.take_irqs():
            for irq in irqs:
                self.bus.interrupt(irq)
                n += 1
        self.handled += n
        return n


def build_guest(
    host: InProcessDmaHost,
    name: str,
    *,
    ram_pages: int = 256,
    disk: Storage | None = None,
    console: bool = True,
    console_page: bool = False,
    lan: Lan | None = None,
    mac: bytes = b"",
    mtu: int = ETH_DATA_LEN,
) -> InProcessLguest:
    table = DeviceTable(ram_pages)
    cons_slot = (table.add(LGUEST_DEVICE_T_CONSOLE, num_pages=1 if console_page else 0)
                 if console else None)
    blk_slot = (table.add(LGUEST_DEVICE_T_BLOCK, features=LGUEST_DEVICE_F_RANDOMNESS)
                if disk is not None else None)
    lan_slot = None
    net_slot = None
    if lan is not None:
        lan_slot = lan.owner.claim()
        net_slot = table.add(LGUEST_DEVICE_T_NET, features=lan_features(lan_slot),
                             num_pages=lan.pages.size // PAGE_SIZE)
    guest = host.new_guest(name, table)
    if lan is not None and net_slot is not None and lan_slot is not None:
        guest.memory.map_shared(net_slot.pfn, lan.pages)
        lan.joined(lan_slot, guest, net_slot.addr)
    rig = InProcessLguest(guest, table, Bus(guest, table.top_pfn, table.total_pages),
                          Allocator(PAGE_SIZE, ram_pages * PAGE_SIZE), lan_slot=lan_slot)
    if cons_slot is not None:
        rig.console_device = ConsoleDevice(cons_slot)
        guest.attach(cons_slot.index, rig.console_device)
    if blk_slot is not None and disk is not None:
        rig.block_device = BlockDevice(blk_slot, disk)
        rig.block_device.setup(guest.launcher)
        guest.attach(blk_slot.index, rig.block_device)

    def probe_console(dev: LguestDevice) -> DeviceDriver:
        rig.console = ConsoleDriver(dev, rig.alloc)
        return rig.console

    def probe_block(dev: LguestDevice) -> DeviceDriver:
        rig.block = BlockDriver(dev, rig.alloc)
        return rig.block

    def probe_net(dev: LguestDevice) -> DeviceDriver:
        rig.net = NetDriver(dev, rig.alloc, mac, mtu=mtu)
        return rig.net

    rig.bus.scan()
    rig.bus.register_driver(LGUEST_DEVICE_T_CONSOLE, probe_console)
    rig.bus.register_driver(LGUEST_DEVICE_T_BLOCK, probe_block)
    rig.bus.register_driver(LGUEST_DEVICE_T_NET, probe_net)
    return rig


class TapSwitchboard:
    """In-process guests on one LAN, each joined to a TAP: the kernel's frames become
    driver transmits, and whatever a driver receives is written to its TAP.  With
    `host`, the LAN's host peer is joined to a TAP of its own too."""

    def __init__(self, rigs: list[InProcessLguest], taps: list[TapInterface],
                 host: tuple[HostNetPeer, TapInterface] | None = None) -> None:
        self.rigs = rigs
        self.links = [TapLink(tap, partial(self.from_tap, i)) for i, tap in enumerate(taps)]
        self.host_peer: HostNetPeer | None = None
        self.host_link: TapLink | None = None
        if host is not None:
            self.host_peer = host[0]
            self.host_link = TapLink(host[1], self.from_host_tap)

    def all_links(self) -> list[TapLink]:
        return self.links + ([self.host_link] if self.host_link is not None else [])

    def from_tap(self, i: int, frame: bytes | memoryview) -> None:
        net = self.rigs[i].net
        if net is not None:
            net.transmit(frame)
        self.pump()

    def from_host_tap(self, frame: bytes | memoryview) -> None:
        if self.host_peer is not None:
            self.host_peer.transmit(bytes(frame))  # the host's TAP hands out bytes: no copy
        self.pump()

    def pump(self) -> None:
        for rig, link in zip(self.rigs, self.links, strict=True):
            rig.run_interrupts()
            if rig.net is not None:
                for frame in rig.net.take_frames():
                    link.send(frame)
        if self.host_peer is not None and self.host_link is not None:
            for frame in self.host_peer.take_frames():
                self.host_link.send(frame)
