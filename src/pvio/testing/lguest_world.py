"""lguest guests, their Launchers and their LANs in one process, over the real hypervisor.

Theory of operation
-------------------
`LguestWorld` runs pvio's hypervisor core (`pvio.hypervisor.core.Hypervisor`, the one
the daemon runs) in this process on a `FakePlatform` (memory as bytearrays), as the
hypervisor's own tests do, and gives each domain a synchronous `DomainPort`: the
`DmaPort` lguest's drivers expect, whose BIND_DMA and SEND_DMA are encoded as the
wire's ops and executed by the core, and whose memory is the domain's lguest physical
space (its RAM and the regions it attached).  Every DMA rule a test meets is the
hypervisor's; nothing here checks a key or a buffer.

The domains are laid out as `pvio up` lays out an lguest guest (the Launcher and guest
processes): `build_guest` creates the guest's domain and its Launcher's; the Launcher
creates the device region (descriptor page, then the console's and block device's
pages) permitted to its guest alone, binds one receive buffer per device and serves it
with pvio.lguest's device logic through `HvLauncherPort` (`InProcessLauncher`).  A `Lan`
is a one-page region created by a small owner domain, declared to carry frames
(`lan_frame_rule`) and attached by each member as its network device's page, always
the last device.  The host's peer on a LAN (lguest's --tunnet) is a NetDriver in the
owner's domain, promiscuous in the slot after the guests' (`Lan.add_host`), as the
Launcher that owns a LAN runs it.

The one thing that differs from processes is scheduling.  Pushes are delivered at the
end of the hypercall that caused them, synchronously: a Launcher handles its
interrupts at once (as lguest's Launcher ran while its guest waited), so a guest's
request has been served when its SEND_DMA returns; a guest's interrupts wait in its
port until the test runs them (`InProcessLguest.run_interrupts`), or go to a handler
(`DomainPort.on_irq`), which an asyncio user schedules on its loop
(`AsyncDomainClient`, `net_path`).

Rejected: `pvio.hypervisor.inprocess` (the core behind asyncio channels, with real
memfds) for these tests: lguest's drivers are synchronous, so every driver call would
need a worker thread and a running loop, for no rule the core does not already apply
here.  The processes themselves are tested by tests/domains/test_lguest_processes.py.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pvio.abi.fault import Fault
from pvio.abi.lguest import (
    GUEST_VIOLATION_IRQ,
    LGUEST_DEVICE_F_RANDOMNESS,
    LGUEST_DEVICE_T_BLOCK,
    LGUEST_DEVICE_T_CONSOLE,
    LGUEST_DEVICE_T_NET,
    LGUEST_IRQS,
    LHCALL_BIND_DMA,
    LHCALL_SEND_DMA,
    VIOLATION_IRQ_BASE,
)
from pvio.domains.netpath import PENDING_LIMIT, RETRY_DELAY, NetPath
from pvio.domains.tap import TapInterface
from pvio.hypervisor import wire
from pvio.hypervisor.core import Hypervisor, Reply
from pvio.hypervisor.domain import DomainRecord
from pvio.hypervisor.errors import HypercallError
from pvio.hypervisor.lguest_dma import LguestDma
from pvio.hypervisor.wire import Op
from pvio.lguest.allocator import Allocator
from pvio.lguest.block import MAX_REQUEST_BYTES, BlockDevice, BlockDriver, DiskImage
from pvio.lguest.bus import Bus, DeviceDriver, DeviceSlot, DeviceTable, LguestDevice
from pvio.lguest.console import CONSOLE_BUFFER, ConsoleDevice, ConsoleDriver
from pvio.lguest.dma import DMA_SIZE, PAGE_SIZE, DmaError, LguestError, build_dma, page_sections
from pvio.lguest.launcher import HvLauncherPort, take_received
from pvio.lguest.net import ETH_DATA_LEN, LanPage, NetDriver, lan_features, lan_frame_rule
from pvio.testing.hypervisor import FakePlatform

#: A Launcher's own memory: its transmit buffer and one receive buffer per device.
LAUNCHER_PAGES = 40


class LguestWorld:
    """The hypervisor core and every lguest domain of a test, in this process."""

    def __init__(self) -> None:
        self.platform = FakePlatform()
        self.hv = Hypervisor(self.platform, lambda fd: fd)
        self._ports: dict[int, DomainPort] = {}
        self._pumping = False

    def domain(self, name: str, nr_pages: int) -> DomainPort:
        d = self.hv.create_domain(name, nr_pages)
        port = DomainPort(self, d.domid, name)
        self._ports[d.domid] = port
        return port

    def destroy(self, port: DomainPort) -> None:
        """The domain's connection closed: the core tears it down."""
        self.hv.destroy_domain(port.domid)
        self._ports.pop(port.domid, None)
        self.pump()

    def execute(self, port: DomainPort, ops: list[Op]) -> list[Reply]:
        """One batch of `port`'s hypercalls; the pushes they caused are delivered
        before this returns."""
        replies = self.hv.execute(port.domid, ops)
        self.pump()
        return replies

    def pump(self) -> None:
        """Deliver interrupts until none is left (a handler's hypercalls push more)."""
        if self._pumping:
            return  # a handler's hypercall: the loop below takes what it pushed
        self._pumping = True
        try:
            while self.hv.has_pushes():
                for push in self.hv.take_pushes():
                    port = self._ports.get(push.domid)
                    if port is not None and push.op.cmd == wire.PVIO_PUSH_irq:
                        port.raise_irq(wire.PVIO_PUSH_IRQ.unpack(push.op.args)["irq"])
        finally:
            self._pumping = False

    def bindings(self) -> int:
        """BIND_DMAs held by all domains."""
        return sum(len(d.dma) for d in self.hv.domains.values())

    @property
    def lguest(self) -> LguestDma:
        """The core's DMA state: its counters and its clock (a seam for flood tests)."""
        return self.hv.lguest


class DomainPort:
    """One domain's synchronous port: `DmaPort` plus regions, over the core."""

    def __init__(self, world: LguestWorld, domid: int, name: str) -> None:
        self.world = world
        self.domid = domid
        self.name = name
        self.on_irq: Callable[[int], None] | None = None
        self._irqs: list[int] = []

    @property
    def domain(self) -> DomainRecord:
        return self.world.hv.domains[self.domid]

    # -- memory ---------------------------------------------------------------------

    def view(self, addr: int, length: int) -> memoryview:
        """A live view of [addr, addr+length) of the domain's lguest physical space."""
        try:
            _, mem, off = LguestDma.resolve(self.domain, addr, length)
        except HypercallError as exc:
            raise LguestError(str(exc), fault=Fault.LOCAL, field="addr", err=errno.EFAULT) from exc
        return mem[off : off + length]

    def read(self, addr: int, length: int) -> bytes:
        return bytes(self.view(addr, length))

    def write(self, addr: int, data: bytes | memoryview) -> None:
        self.view(addr, len(data))[:] = data

    # -- lguest's hypercalls ----------------------------------------------------------

    def lhcall(self, cmd: int, a1: int, a2: int, a3: int = 0) -> tuple[int, int]:
        """(rc, ret) of one LHCALL, as the wire answers it."""
        args = wire.PVIO_LHCALL.pack(arg1=a1, arg2=a2, arg3=a3)
        (reply,) = self.world.execute(self, [Op(wire.PVIO_HYPERVISOR_lguest, cmd, 1, args)])
        return reply.rc, 0 if reply.rc else int(wire.PVIO_LHCALL.unpack(reply.args)["ret"])

    def _checked(self, cmd: int, a1: int, a2: int, a3: int = 0) -> int:
        rc, ret = self.lhcall(cmd, a1, a2, a3)
        if rc:
            raise DmaError(f"refused by the hypervisor: {errno.errorcode.get(-rc, rc)}", err=-rc)
        return ret

    def bind_dma(self, key: int, dmas: int, count: int, irq: int) -> None:
        self._checked(LHCALL_BIND_DMA, key, dmas, (count << 8) | irq)

    def unbind_dma(self, key: int, dmas: int) -> None:
        self._checked(LHCALL_BIND_DMA, key, dmas, 0)

    def send_dma(self, key: int, dma: int) -> int:
        return self._checked(LHCALL_SEND_DMA, key, dma)

    def send_dma_many(self, sends: Sequence[tuple[int, int]]) -> list[int]:
        """Several SEND_DMAs in one batch: each one's bytes copied, or -errno."""
        ops = [Op(wire.PVIO_HYPERVISOR_lguest, LHCALL_SEND_DMA, 1, wire.PVIO_LHCALL.pack(arg1=k, arg2=d))
               for k, d in sends]
        return [r.rc if r.rc else int(wire.PVIO_LHCALL.unpack(r.args)["ret"])
                for r in self.world.execute(self, ops)]

    # -- regions ------------------------------------------------------------------------

    def _region(self, cmd: int, **fields: int) -> bytes:
        lay = wire.PVIO_LGUEST_FRAMES if cmd == wire.PVIO_LGUEST_region_frames else wire.PVIO_LGUEST_REGION
        (reply,) = self.world.execute(self, [Op(wire.PVIO_HYPERVISOR_lguest, cmd, 1, lay.pack(**fields))])
        if reply.rc:
            raise HypercallError(reply.rc, "lguest region", next(iter(fields)))
        return reply.args

    def create_region(self, nr_pages: int, base: int) -> int:
        args = self._region(wire.PVIO_LGUEST_region_create, nr_pages=nr_pages, base=base)
        region_id: int = wire.PVIO_LGUEST_REGION.unpack(args)["region_id"]
        return region_id

    def attach_region(self, region_id: int, base: int) -> None:
        self._region(wire.PVIO_LGUEST_region_attach, region_id=region_id, base=base)

    def permit(self, region_id: int, peer: int) -> None:
        self._region(wire.PVIO_LGUEST_region_permit, region_id=region_id, peer=peer)

    def frames(self, region_id: int, min_len: int, max_len: int, flood: int) -> None:
        self._region(wire.PVIO_LGUEST_region_frames, region_id=region_id, min_len=min_len,
                     max_len=max_len, flood=flood)

    # -- interrupts ---------------------------------------------------------------------

    def raise_irq(self, irq: int) -> None:
        if self.on_irq is not None:
            self.on_irq(irq)
        elif irq not in self._irqs:  # one pending bit per interrupt, as lguest had
            self._irqs.append(irq)

    def take_irqs(self) -> list[int]:
        irqs, self._irqs = self._irqs, []
        return irqs


class AsyncDomainClient:
    """The asyncio face of a `DomainPort`, shaped like the hypervisor client's `Domain`
    (refusals raise HypercallError; each call yields to the loop as a round trip would;
    interrupts go to `set_irq_handler`'s handler from the loop, never inside a call)."""

    def __init__(self, port: DomainPort) -> None:
        self.port = port

    async def _lhcall(self, cmd: int, a1: int, a2: int, a3: int = 0) -> int:
        rc, ret = self.port.lhcall(cmd, a1, a2, a3)
        await asyncio.sleep(0)
        if rc:
            raise HypercallError(rc, f"LHCALL {cmd}")
        return ret

    async def bind_dma(self, key: int, dmas: int, count: int, irq: int) -> None:
        await self._lhcall(LHCALL_BIND_DMA, key, dmas, (count << 8) | irq)

    async def unbind_dma(self, key: int, dmas: int) -> None:
        await self._lhcall(LHCALL_BIND_DMA, key, dmas, 0)

    async def send_dma(self, key: int, dma: int) -> int:
        return await self._lhcall(LHCALL_SEND_DMA, key, dma)

    async def send_dma_many(self, sends: Sequence[tuple[int, int]]) -> list[int]:
        out = self.port.send_dma_many(sends)
        await asyncio.sleep(0)
        return out

    def phys(self, addr: int, length: int) -> memoryview:
        return self.port.view(addr, length)

    def set_irq_handler(self, handler: Callable[[int], None] | None) -> None:
        if handler is None:
            self.port.on_irq = None
            return
        loop = asyncio.get_running_loop()

        def later(irq: int) -> None:
            loop.call_soon(handler, irq)

        self.port.on_irq = later


# -- the Launcher -------------------------------------------------------------------------


@dataclass
class _Served:
    slot: DeviceSlot
    device: BlockDevice | ConsoleDevice
    rx_dma: int
    failed: bool = False
    image: DiskImage | None = None  # a block device's disk, in memory


class InProcessLauncher:
    """A guest's Launcher as a domain: the device region, served by DMA.

    What the Launcher process does on an interrupt, done at once: a violation notice
    marks the device FAILED (and unbinds its buffer); a filled receive buffer is taken
    and handed to the device's logic, whose reply is the Launcher's own SEND_DMA."""

    def __init__(self, world: LguestWorld, name: str, table: DeviceTable, guest: DomainPort) -> None:
        self.table = table
        net = next((s for s in table.slots if s.type == LGUEST_DEVICE_T_NET), None)
        self.net_index = net.index if net is not None else None
        top = table.descriptor_addr
        dev_end = net.addr if net is not None else table.total_pages * PAGE_SIZE
        self.domain = world.domain(f"{name}-launcher", LAUNCHER_PAGES)
        base = max(top, LAUNCHER_PAGES * PAGE_SIZE)
        self.region = self.domain.create_region((dev_end - top) // PAGE_SIZE, base)
        self.domain.permit(self.region, guest.domid)  # and nobody else
        self.alloc = Allocator(0, LAUNCHER_PAGES * PAGE_SIZE)
        tx_dma = self.alloc.alloc_unsplit(DMA_SIZE)
        tx_buf = self.alloc.alloc_pages(MAX_REQUEST_BYTES // PAGE_SIZE)
        irq_keys = {s.irq: s.addr for s in table.slots if s.type != LGUEST_DEVICE_T_NET}
        self.port = HvLauncherPort(self.domain, base - top, top, dev_end, tx_dma, tx_buf, irq_keys)
        self.port.write(top, table.descriptor_page())
        self.served: dict[int, _Served] = {}  # by irq
        self.net_failed = False
        self.violations = 0
        self.domain.on_irq = self._on_irq

    def serve(self, slot: DeviceSlot, device: BlockDevice | ConsoleDevice, size: int,
              image: DiskImage | None = None) -> None:
        """Bind one receive buffer of `size` bytes at the device's key (a block device
        serves `image`, its whole disk in memory: a bytearray or an mmap of a file)."""
        buf = self.alloc.alloc_pages(-(-size // PAGE_SIZE))
        rx_dma = self.alloc.alloc_unsplit(DMA_SIZE)
        self.domain.write(rx_dma, build_dma(page_sections(buf, size)))
        self.domain.bind_dma(slot.addr + self.port.delta, rx_dma, 1, slot.irq)
        self.served[slot.irq] = _Served(slot, device, rx_dma, image=image)

    def _on_irq(self, irq: int) -> None:
        if irq == GUEST_VIOLATION_IRQ:  # the guest broke a rule on its LAN page
            if self.net_index is not None and not self.net_failed:
                self.violations += 1
                self.net_failed = True
                self.table.fail(self.port, self.net_index)
            return
        if irq >= VIOLATION_IRQ_BASE:  # ... or at a key this Launcher is bound at
            served = self.served.get(irq - VIOLATION_IRQ_BASE)
            if served is not None and not served.failed:
                self.violations += 1
                served.failed = True
                self.table.fail(self.port, served.slot.index)
                self.domain.unbind_dma(served.slot.addr + self.port.delta, served.rx_dma)
            return
        served = self.served.get(irq)
        if served is None or served.failed:
            return
        data = take_received(self.domain, served.rx_dma)
        device = served.device
        if isinstance(device, ConsoleDevice):
            device.handle_output(self.port, served.slot.addr, data)
            return
        assert served.image is not None
        payload = device.serve(self.port, served.slot.addr, data, served.image)
        if payload is not None and self.port.deliver(served.slot.addr, payload) is None:
            device.no_reply_buffer(self.port)
            self.port.trigger_irq(served.slot.irq)


# -- guests and LANs -------------------------------------------------------------------------


def _transmit(port: DomainPort, net: NetDriver, frames: Sequence[bytes | memoryview]) -> int:
    """Queue `frames` and send every batch until the queue is empty (a full receiver's
    frames are retried at once, TX_RETRIES times); the SEND_DMAs made."""
    net.queue(frames)
    sent = 0
    while batch := net.stage():
        net.account(batch, port.send_dma_many(batch.sends))
        sent += len(batch.sends)
    return sent


@dataclass
class InProcessLguest:
    """A guest domain, its Launcher and the drivers its bus probed."""

    world: LguestWorld
    port: DomainPort
    launcher: InProcessLauncher
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
        """Deliver pending interrupts to the drivers until none are left (violation
        notices, raised in every domain bound at a key someone broke, are for Launchers:
        a guest ignores them as the guest process does)."""
        n = 0
        while irqs := self.port.take_irqs():
            for irq in irqs:
                if irq < LGUEST_IRQS:
                    self.bus.interrupt(irq)
                    n += 1
        self.handled += n
        return n

    def status(self, index: int) -> int:
        """Device `index`'s status bits, as its Launcher reads them."""
        return self.table.status(self.launcher.port, index)

    def transmit(self, *frames: bytes | memoryview) -> int:
        """Frames through the network driver's batches; the SEND_DMAs made."""
        assert self.net is not None
        return _transmit(self.port, self.net, frames)


@dataclass
class HostPeer:
    """The host on a LAN: a NetDriver in the LAN owner's domain (lguest's --tunnet)."""

    port: DomainPort
    net: NetDriver

    def run_interrupts(self) -> int:
        n = len(self.port.take_irqs())
        if n:
            self.net.interrupt()
        return n

    def transmit(self, *frames: bytes | memoryview) -> int:
        return _transmit(self.port, self.net, frames)


class Lan:
    """A LAN page: a region its owner creates, declares to carry frames, and lets each
    member attach as its network device's page; the owner keeps the slot book."""

    def __init__(self, world: LguestWorld, *, mtu: int = ETH_DATA_LEN, frames: bool = True) -> None:
        self.world = world
        self.mtu = mtu
        self.domain = world.domain("lan-owner", NetDriver.memory_pages(mtu) + 1)
        self.base = self.domain.domain.nr_pages * PAGE_SIZE
        self.region = self.domain.create_region(1, self.base)
        if frames:
            self.domain.frames(self.region, *lan_frame_rule(mtu))
        self.owner = LanPage(self.domain.view(self.base, PAGE_SIZE))

    def join(self, guest: DomainPort, addr: int) -> None:
        self.domain.permit(self.region, guest.domid)
        guest.attach_region(self.region, addr)

    def add_host(self, mac: bytes) -> HostPeer:
        """The host joins in the next free slot, promiscuous, as lguest's Launcher did."""
        slot = self.owner.claim()
        device = LguestDevice(0, LGUEST_DEVICE_T_NET, lan_features(slot), 1, self.base // PAGE_SIZE,
                              self.domain, None)
        net = NetDriver(device, Allocator(0, self.base), mac, mtu=self.mtu)
        net.open(promisc=True)
        return HostPeer(self.domain, net)


def new_guest(world: LguestWorld, name: str, table: DeviceTable) -> tuple[DomainPort, InProcessLauncher]:
    """A guest domain whose RAM is `table`'s, and its Launcher, whose device region
    (the descriptor page written) the guest has attached at the top of its RAM."""
    guest = world.domain(name, table.ram_pages)
    launcher = InProcessLauncher(world, name, table, guest)
    guest.attach_region(launcher.region, table.descriptor_addr)
    return guest, launcher


def build_guest(
    world: LguestWorld,
    name: str,
    *,
    ram_pages: int = 256,
    disk: DiskImage | None = None,
    console: bool = True,
    lan: Lan | None = None,
    mac: bytes = b"",
) -> InProcessLguest:
    """A guest laid out as the Launcher lays it out (console and block pages in the
    device region, the network device's page the LAN's), its bus scanned and its
    drivers probed.  The network driver is not opened."""
    table = DeviceTable(ram_pages)
    cons_slot = table.add(LGUEST_DEVICE_T_CONSOLE, num_pages=1) if console else None
    blk_slot = (table.add(LGUEST_DEVICE_T_BLOCK, features=LGUEST_DEVICE_F_RANDOMNESS)
                if disk is not None else None)
    lan_slot = lan.owner.claim() if lan is not None else None
    net_slot = (table.add(LGUEST_DEVICE_T_NET, features=lan_features(lan_slot), num_pages=1)
                if lan_slot is not None else None)
    guest, launcher = new_guest(world, name, table)
    if lan is not None and net_slot is not None:
        lan.join(guest, net_slot.addr)
    rig = InProcessLguest(world, guest, launcher, table, Bus(guest, table.top_pfn, table.total_pages),
                          Allocator(PAGE_SIZE, ram_pages * PAGE_SIZE), lan_slot=lan_slot)
    if cons_slot is not None:
        rig.console_device = ConsoleDevice(cons_slot)
        launcher.serve(cons_slot, rig.console_device, CONSOLE_BUFFER)
    if blk_slot is not None and disk is not None:
        rig.block_device = BlockDevice(blk_slot, len(disk))
        rig.block_device.setup(launcher.port)
        launcher.serve(blk_slot, rig.block_device, MAX_REQUEST_BYTES, image=disk)

    def probe_console(dev: LguestDevice) -> DeviceDriver:
        rig.console = ConsoleDriver(dev, rig.alloc)
        return rig.console

    def probe_block(dev: LguestDevice) -> DeviceDriver:
        rig.block = BlockDriver(dev, rig.alloc)
        return rig.block

    def probe_net(dev: LguestDevice) -> DeviceDriver:
        rig.net = NetDriver(dev, rig.alloc, mac, mtu=lan.mtu if lan is not None else ETH_DATA_LEN)
        return rig.net

    rig.bus.scan()
    rig.bus.register_driver(LGUEST_DEVICE_T_CONSOLE, probe_console)
    rig.bus.register_driver(LGUEST_DEVICE_T_BLOCK, probe_block)
    rig.bus.register_driver(LGUEST_DEVICE_T_NET, probe_net)
    return rig


def net_path(peer: InProcessLguest | HostPeer, tap: TapInterface, loop: asyncio.AbstractEventLoop, *,
             pending_limit: int = PENDING_LIMIT, retry_delay: float = RETRY_DELAY) -> NetPath:
    """`peer`'s network device joined to `tap` by the frame path the domain processes
    run (pvio.domains.netpath), its interrupts taken on `loop`; started."""
    assert peer.net is not None
    path = NetPath(peer.net, AsyncDomainClient(peer.port), tap, pending_limit=pending_limit,
                   retry_delay=retry_delay)
    irq = peer.net.device.irq

    def on_irq(n: int) -> None:
        if n == irq:
            loop.call_soon(path.interrupt)

    peer.port.on_irq = on_irq
    path.start(loop)
    return path
