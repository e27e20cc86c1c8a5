"""The lguest bus: the descriptor page, the guest's scan, driver matching, status bits.

Theory of operation
-------------------
The Launcher describes a guest's devices in one page of `struct lguest_device_desc`
(LGUEST_MAX_DEVICES entries) placed just above the top of the guest's RAM; each device's
own pages follow.  `DeviceTable` is the Launcher's side: it lays the pages out, builds
the descriptor page's bytes, and reads and sets the status bits the guest writes back.

`Bus` is the guest's side (drivers/lguest/lguest_bus.c): it copies the descriptor page
once, refuses nonsense entries (unknown type, pages outside memory, no pages or too
many), matches each remaining entry to the driver registered for its type, probes it,
and records the outcome in the status bits.  The bits move only as `STATUS_TABLE`
allows; anything not in the table is an error.  Interrupt `index + 1` belongs to device
`index` (interrupt 0 is the timer).

What this deliberately does not do: sysfs, hotplug of new devices after the scan (the
seed removed hotplug as untested), or any I/O: memory is read and written through a
`DmaPort` (guest) or a `LauncherPort` (Launcher).

Alternatives rejected: keeping the status as a Python attribute and writing it out at
the end (the Launcher reads the bits to see how far setup got, even if the guest dies
half way, so each bit is written as it is earned); trusting the descriptor page (the
guest copies it once and validates, exactly as the Launcher validates the guest's DMA).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from pvio.abi.fault import Fault
from pvio.abi.lguest import (
    LGUEST_DEVICE_DESC,
    LGUEST_DEVICE_S_ACKNOWLEDGE,
    LGUEST_DEVICE_S_DRIVER,
    LGUEST_DEVICE_S_DRIVER_OK,
    LGUEST_DEVICE_S_FAILED,
    LGUEST_DEVICE_S_REMOVED,
    LGUEST_DEVICE_S_REMOVED_ACK,
    LGUEST_DEVICE_T_BLOCK,
    LGUEST_DEVICE_T_CONSOLE,
    LGUEST_DEVICE_T_NET,
    LGUEST_MAX_DEVICES,
    LGUEST_PAGE_SIZE,
)
from pvio.lguest.dma import DmaPort, LauncherPort, LguestError

PAGE_SIZE = LGUEST_PAGE_SIZE
DESC_SIZE = LGUEST_DEVICE_DESC.size
KNOWN_TYPES = (LGUEST_DEVICE_T_CONSOLE, LGUEST_DEVICE_T_NET, LGUEST_DEVICE_T_BLOCK)
#: pvio's bound on one device's pages (lguest's Launcher gave 1; 256 pages = 1 MiB).
MAX_DEVICE_PAGES = 256
_STATUS = struct.Struct("<H")
_STATUS_OFFSET = LGUEST_DEVICE_DESC.offset("status")


class BusError(LguestError):
    """A descriptor or a status change the bus refuses."""


# -- the status bits --------------------------------------------------------------------


class BusEvent(enum.Enum):
    FOUND = "found"
    DRIVER_MATCHED = "driver matched"
    PROBE_OK = "probe ok"
    PROBE_FAILED = "probe failed"
    REFUSED = "refused"
    DEVICE_FAILED = "device failed"
    HOST_FAILED = "host failed"
    HOST_REMOVED = "host removed"
    REMOVED_ACKED = "removed acked"


@dataclass(frozen=True)
class Transition:
    requires: int  # every one of these bits must be set
    forbids: int  # none of these may be set
    sets: int  # the bit this event sets (bits are only ever set)
    who: str  # "guest" or "host": the only side allowed to do it
    seed: str  # what the seed's code does


A = LGUEST_DEVICE_S_ACKNOWLEDGE
D = LGUEST_DEVICE_S_DRIVER
OK = LGUEST_DEVICE_S_DRIVER_OK
F = LGUEST_DEVICE_S_FAILED
R = LGUEST_DEVICE_S_REMOVED
RA = LGUEST_DEVICE_S_REMOVED_ACK

# T:820 The guest scans the bus: status bits as a table
# The guest copies the descriptor page once and walks it (scan_devices): type 0 means
# no device; anything else is ACKNOWLEDGEd.  A device whose descriptor makes no sense
# (unknown type, pages outside memory, no pages, too many) is refused: counted, and
# marked FAILED so the Launcher can see where setup stopped.  Matching is by type; the
# bus sets DRIVER before calling the driver's probe and DRIVER_OK if the probe succeeds,
# FAILED if not.  The host sets only REMOVED, to unplug (the guest answers REMOVED_ACK
# once its driver has let go), and FAILED when the guest broke the DMA rules on that
# device.  Every change goes through STATUS_TABLE:
#
#   event           requires        forbids            sets         who    seed
#   FOUND           -               ACK                ACKNOWLEDGE  guest  scan_devices/add_lguest_device
#   DRIVER_MATCHED  ACK             DRIVER|FAILED      DRIVER       guest  lguest_dev_probe, before probe
#   PROBE_OK        ACK|DRIVER      DRIVER_OK|FAILED   DRIVER_OK    guest  probe returned 0
#   PROBE_FAILED    ACK|DRIVER      DRIVER_OK|FAILED   FAILED       guest  probe returned an error
#   REFUSED         ACK             DRIVER|FAILED      FAILED       guest  device_register failed
#   DEVICE_FAILED   ACK|DRIVER_OK   FAILED             FAILED       guest  (pvio) the host broke the protocol
#   HOST_FAILED     -               FAILED             FAILED       host   (pvio) the guest broke the DMA rules
#   HOST_REMOVED    -               REMOVED            REMOVED      host   "the Host can set REMOVED"
#   REMOVED_ACKED   REMOVED         REMOVED_ACK        REMOVED_ACK  guest  "driver has been told"
#
# Interrupt index + 1 belongs to device index: interrupt 0 is the timer.
# :T
STATUS_TABLE: dict[BusEvent, Transition] = {
    BusEvent.FOUND: Transition(0, A, A, "guest", "scan_devices: type != 0"),
    BusEvent.DRIVER_MATCHED: Transition(A, D | F, D, "guest", "lguest_dev_probe: before probe"),
    BusEvent.PROBE_OK: Transition(A | D, OK | F, OK, "guest", "probe returned 0"),
    BusEvent.PROBE_FAILED: Transition(A | D, OK | F, F, "guest", "probe returned an error"),
    BusEvent.REFUSED: Transition(A, D | F, F, "guest", "device_register failed"),
    BusEvent.DEVICE_FAILED: Transition(A | OK, F, F, "guest", "the host broke the protocol"),
    BusEvent.HOST_FAILED: Transition(0, F, F, "host", "the guest broke the DMA rules"),
    BusEvent.HOST_REMOVED: Transition(0, R, R, "host", "the Host can set REMOVED"),
    BusEvent.REMOVED_ACKED: Transition(R, RA, RA, "guest", "driver has been told"),
}


def next_status(status: int, event: BusEvent, *, who: str = "guest") -> int:
    """The status after `event`, or BusError if the table does not allow it."""
    t = STATUS_TABLE[event]
    if who != t.who:
        raise BusError(f"{event.value} is the {t.who}'s to do", fault=Fault.LOCAL, field="status")
    if status & t.requires != t.requires or status & t.forbids:
        raise BusError(f"{event.value} not allowed from status {status:#x}",
                       fault=Fault.LOCAL, field="status")
    return status | t.sets


def irq_of(index: int) -> int:
    """lgdev_irq: a device's interrupt is its index + 1."""
    return index + 1


# -- the Launcher's side ---------------------------------------------------------------


@dataclass(frozen=True)
class DeviceSlot:
    """One device as the Launcher laid it out."""

    index: int
    type: int
    features: int
    num_pages: int
    pfn: int

    @property
    def addr(self) -> int:
        return self.pfn * PAGE_SIZE

    @property
    def end(self) -> int:
        return self.addr + self.num_pages * PAGE_SIZE

    @property
    def irq(self) -> int:
        return irq_of(self.index)


class DeviceTable:
    """The Launcher's device descriptors for one guest (lguest.c new_dev_desc)."""

    def __init__(self, ram_pages: int) -> None:
        if ram_pages <= 0:
            raise BusError("a guest needs memory", fault=Fault.LOCAL, field="ram_pages")
        self.ram_pages = ram_pages
        self.top_pfn = ram_pages  # the descriptor page: just above the top of RAM
        self._next_pfn = ram_pages + 1
        self.slots: list[DeviceSlot] = []

    # T:810 The Launcher lays out the devices
    # A guest's devices are described by the Launcher, not discovered.  Above the top of
    # the guest's RAM goes one page of `struct lguest_device_desc` (up to 16 of them);
    # above that, each device's own pages: the block device's request page, the network
    # device's page of MAC slots.  A device's DMA keys are addresses inside its pages,
    # so two devices can never use the same key.  The console has no page: it uses the
    # fixed key 0.  The guest will write status bits into this page as it probes; the
    # Launcher reads them to see how far each device got.
    # :T
    def add(self, device_type: int, *, features: int = 0, num_pages: int = 1) -> DeviceSlot:
        if len(self.slots) >= LGUEST_MAX_DEVICES:
            raise BusError(f"more than {LGUEST_MAX_DEVICES} devices", fault=Fault.LOCAL,
                           field="type")
        pfn = 0
        if num_pages:
            pfn = self._next_pfn
            self._next_pfn += num_pages
        slot = DeviceSlot(len(self.slots), device_type, features, num_pages, pfn)
        self.slots.append(slot)
        return slot

    @property
    def descriptor_addr(self) -> int:
        return self.top_pfn * PAGE_SIZE

    @property
    def total_pages(self) -> int:
        return self._next_pfn

    def descriptor_page(self) -> bytes:
        page = bytearray(PAGE_SIZE)
        for s in self.slots:
            LGUEST_DEVICE_DESC.pack_into(page, s.index * DESC_SIZE, type=s.type,
                                         features=s.features, status=0,
                                         num_pages=s.num_pages, pfn=s.pfn)
        return bytes(page)

    def status(self, port: LauncherPort, index: int) -> int:
        raw = port.read(self.descriptor_addr + index * DESC_SIZE + _STATUS_OFFSET, 2)
        value: int = _STATUS.unpack(raw)[0]
        return value

    def remove(self, port: LauncherPort, index: int) -> None:
        """Unplug: the host sets REMOVED; the guest will answer REMOVED_ACK."""
        self._host_event(port, index, BusEvent.HOST_REMOVED)

    def fail(self, port: LauncherPort, index: int) -> bool:
        """The guest broke the rules on this device: mark it FAILED (once)."""
        status = self.status(port, index)  # guest memory: one copy, checked and used
        if status & F:
            return False
        self._host_event(port, index, BusEvent.HOST_FAILED, status)
        return True

    def failed(self, port: LauncherPort, index: int) -> bool:
        return bool(self.status(port, index) & F)

    def reset(self, port: LauncherPort) -> None:
        """The guest starts over (it died and is started again): every device's status
        goes back to 0, as for a new guest; a device unplugged stays unplugged (REMOVED
        and its acknowledgement kept: a new guest's scan passes it by)."""
        for s in self.slots:
            at = self.descriptor_addr + s.index * DESC_SIZE + _STATUS_OFFSET
            status = self.status(port, s.index)
            port.write(at, _STATUS.pack(status & (R | RA) if status & R else 0))

    def _host_event(self, port: LauncherPort, index: int, event: BusEvent,
                    status: int | None = None) -> None:
        if status is None:
            status = self.status(port, index)
        status = next_status(status, event, who="host")
        port.write(self.descriptor_addr + index * DESC_SIZE + _STATUS_OFFSET, _STATUS.pack(status))


# -- the guest's side ------------------------------------------------------------------


@dataclass
class LguestDevice:
    """A device the guest found on the bus (struct lguest_device + its descriptor)."""

    index: int
    type: int
    features: int
    num_pages: int
    pfn: int
    port: DmaPort
    bus: Bus | None  # None: a device the host made for itself (its peer on a LAN)

    @property
    def irq(self) -> int:
        return irq_of(self.index)

    @property
    def phys_addr(self) -> int:
        return self.pfn * PAGE_SIZE

    def fail(self) -> None:
        """The driver gives up on this device (the host broke the protocol)."""
        if self.bus is not None:
            self.bus.set_status(self.index, BusEvent.DEVICE_FAILED)


class DeviceDriver(Protocol):
    """A probed driver: told of its interrupt and of removal."""

    def interrupt(self) -> None: ...

    def remove(self) -> None: ...


#: A driver's probe: returns the driver for `device` or raises LguestError.
Probe = Callable[[LguestDevice], DeviceDriver]


@dataclass
class BusStatistics:
    refused: int = 0  # nonsense descriptors
    probe_failures: int = 0
    spurious_irqs: int = 0  # interrupts for no probed device
    removed: int = 0


@dataclass
class Bus:
    """The guest's lguest bus over the descriptor page at `top_pfn`."""

    port: DmaPort
    top_pfn: int
    memory_pages: int  # the guest's whole address space, for checking descriptors
    devices: dict[int, LguestDevice] = field(default_factory=dict)
    drivers: dict[int, DeviceDriver] = field(default_factory=dict)
    stats: BusStatistics = field(default_factory=BusStatistics)
    _probes: dict[int, Probe] = field(default_factory=dict)

    @property
    def descriptor_addr(self) -> int:
        return self.top_pfn * PAGE_SIZE

    def status(self, index: int) -> int:
        value: int = _STATUS.unpack(self.port.read(self._status_addr(index), 2))[0]
        return value

    def set_status(self, index: int, event: BusEvent) -> int:
        # Read-modify-write of the live field: the host may have set REMOVED or FAILED
        # meanwhile.  A device the host already failed stays failed.
        status = self.status(index)
        if STATUS_TABLE[event].sets == F and status & F:
            return status
        status = next_status(status, event)
        self.port.write(self._status_addr(index), _STATUS.pack(status))
        return status

    def _status_addr(self, index: int) -> int:
        return self.descriptor_addr + index * DESC_SIZE + _STATUS_OFFSET

    def check_descriptor(self, fields: dict[str, int]) -> None:
        """Refuse a descriptor that makes no sense; BusError says which field."""
        dtype, pages, pfn = fields["type"], fields["num_pages"], fields["pfn"]
        if dtype not in KNOWN_TYPES:
            raise BusError(f"unknown device type {dtype}", field="type")
        if dtype == LGUEST_DEVICE_T_CONSOLE and pages == 0:
            return  # the console has no page: it uses key 0
        if not 1 <= pages <= MAX_DEVICE_PAGES:
            raise BusError(f"num_pages {pages} not in 1..{MAX_DEVICE_PAGES}", field="num_pages")
        if pfn <= self.top_pfn or pfn + pages > self.memory_pages:
            raise BusError(f"pages {pfn:#x}+{pages} outside device memory", field="pfn")

    def scan(self) -> list[LguestDevice]:
        """scan_devices(): find, acknowledge and check every descriptor."""
        page = self.port.read(self.descriptor_addr, LGUEST_MAX_DEVICES * DESC_SIZE)
        found: list[LguestDevice] = []
        for index in range(LGUEST_MAX_DEVICES):
            fields = LGUEST_DEVICE_DESC.unpack(page, index * DESC_SIZE)
            if fields["type"] == 0 or fields["status"] & R:  # none, or unplugged before
                continue
            self.set_status(index, BusEvent.FOUND)
            try:
                self.check_descriptor(fields)
            except BusError:
                self.stats.refused += 1
                self.set_status(index, BusEvent.REFUSED)
                continue
            dev = LguestDevice(index, fields["type"], fields["features"], fields["num_pages"],
                               fields["pfn"], self.port, self)
            self.devices[index] = dev
            found.append(dev)
            if dev.type in self._probes:
                self._probe(dev, self._probes[dev.type])
        return found

    def register_driver(self, device_type: int, probe: Probe) -> list[DeviceDriver]:
        """register_lguest_driver(): probe every unclaimed device of this type."""
        self._probes[device_type] = probe
        probed: list[DeviceDriver] = []
        for dev in self.devices.values():
            if dev.type == device_type and dev.index not in self.drivers:
                driver = self._probe(dev, probe)
                if driver is not None:
                    probed.append(driver)
        return probed

    def _probe(self, dev: LguestDevice, probe: Probe) -> DeviceDriver | None:
        self.set_status(dev.index, BusEvent.DRIVER_MATCHED)
        try:
            driver = probe(dev)
        except LguestError:
            self.stats.probe_failures += 1
            self.set_status(dev.index, BusEvent.PROBE_FAILED)
            return None
        if self.status(dev.index) & F:  # the host failed it while it was probed
            self.stats.probe_failures += 1
            driver.remove()
            return None
        self.drivers[dev.index] = driver
        self.set_status(dev.index, BusEvent.PROBE_OK)
        return driver

    def interrupt(self, irq: int) -> DeviceDriver | None:
        """Hand interrupt `irq` to the driver of device irq - 1."""
        driver = self.drivers.get(irq - 1)
        if driver is None:
            self.stats.spurious_irqs += 1
            return None
        driver.interrupt()
        return driver

    def poll_removals(self) -> list[int]:
        """Let go of every device the host marked REMOVED; answer REMOVED_ACK."""
        gone: list[int] = []
        for index in list(self.devices):
            status = self.status(index)
            if status & R and not status & RA:
                driver = self.drivers.pop(index, None)
                if driver is not None:
                    driver.remove()
                del self.devices[index]
                self.set_status(index, BusEvent.REMOVED_ACKED)
                self.stats.removed += 1
                gone.append(index)
        return gone
