"""lguest guests and Launchers as domain processes over pvio's hypervisor.

Theory of operation
-------------------
For each lguest domain the toolstack starts two processes (`pvio.toolstack.domain`):
the *Launcher* (role ``lguest-launcher``, lguest's host-side user process) and the
*guest* (role ``lguest-guest``).  Each becomes a domain of `pvio hypervisor`.  The guest's
RAM is its domain memory, private to it; everything the two must both see lives in
lguest regions the hypervisor shares between domains:

* the *device region*, created by the Launcher: the descriptor page at guest pfn
  ``top_pfn`` (the top of the guest's RAM, see below) and the console's and block
  device's pages after it.  The guest attaches it at ``top_pfn``; the Launcher attaches it above its own small memory and
  translates addresses by a constant;
* the *LAN region*, one page of MAC slots per LAN, created by the Launcher of the LAN's
  first member (lowest guest domid in `extra["lan_members"]`), attached by every guest on
  the LAN as its network device's page (always the last device, just after the device
  region).  A guest's slot is its position in the sorted member list: the toolstack
  decided the membership, so the slots are claimed without any race, and the Launcher
  tells the guest its slot in the descriptor's features, as lguest did.

Only the domains meant to attach a region may (PVIO_LGUEST_region_permit): the device
region its guest, the LAN region the LAN's members; a guest cannot reach another guest's
device pages by guessing a region id.  Members find the regions through rendezvous files in ``<state_dir>/lguest/``:
``<guest>.launcher.json`` (written by the guest's Launcher: region id, top_pfn, page
counts, its pid and domid) and ``lan-<lan>.json`` (written by the LAN's owner).  A reader
accepts a file only if the writer's pid is alive and, for the Launcher file, the domid
is the one its spec names; so a file left by an earlier run is never trusted.

Device keys are addresses in the device region, so the hypervisor's rule (a key in a
region two domains share is the same key for both) carries the guest's SEND_DMA to the
buffers its Launcher bound at the same key, and the Launcher's SEND_DMA back to the
guest's bound reply buffers.  The Launcher binds one buffer per device (a block
request's sixteen pages, one console chunk), so requests are served in order; an empty
SEND_DMA (a block read) still raises the Launcher's interrupt.  The console gets a page
(key 0 would be private to the guest here).  Network frames go guest to guest through
the LAN region; no Launcher is on their path.

Both sides run lguest's synchronous driver and device code (`pvio.lguest`): setup and
the console in one worker thread (`GuestThread`) whose hypercalls go to the asyncio
loop, interrupts handed to the thread.  The data paths of the network and block devices
stay on the event loop: frames from the TAP are staged into transmit buffers and sent
as one batch of SEND_DMAs, awaited there, and a receive interrupt is handled where its
push arrives (`pvio.lguest.netpath`); a disk request is staged in guest memory and its
SEND_DMA awaited, the Launcher serves it on its loop, and the completion is taken where
the interrupt arrives.  Both touch only memory between hypercalls, and hand-offs between
threads cost more than the work.  The guest process joins its net driver to a TAP
in netns ``pvio-<name>``, exports its disk over NBD (export ``lgba``), and runs a shell in
that namespace behind its console driver.  The Launcher serves the host end of the
console (`pvio console NAME`) on ``extra["console_socket"]``: bytes typed there cross the
DMA into the guest's console buffer, and what the guest's shell prints crosses back.

Bad input: the hypervisor refuses a SEND_DMA or BIND_DMA that breaks the rules
(`pvio.lguest.dma`) and tells the domains bound at that key with a violation interrupt
(`VIOLATION_IRQ_BASE` + their irq); the Launcher then marks that device FAILED in the
descriptor page and stops serving it.  The network device is different: its keys are
on the LAN page, where the Launcher binds nothing, so the hypervisor tells the guest's
supervisor (the creator of the device region, permitted to that guest alone) with
`GUEST_VIOLATION_IRQ`, and the Launcher marks the network device FAILED.  The LAN's
frame rules (ETH_HLEN..ETH_HLEN + MTU bytes, at most FLOOD_DROPS_PER_SECOND drops a
second) are declared to the hypervisor by the LAN's owner (PVIO_LGUEST_region_frames)
and kept there, so runts, oversized frames and floods are refused and reported like any
broken DMA rule.  The guest's driver checks the status on every transmit batch, every
receive interrupt and once a second, and lets go of a FAILED device (clears its MAC
slot, unbinds its buffers).  Every other guest and device carries on.  A hostile guest
that ignores FAILED is not fenced off the LAN: its frames still have to pass the frame
rules and the flood limit, and each break is refused.

Specs (``extra``), as the toolstack writes them::

    {"name": "g1-launcher", "domid": 3, "role": "lguest-launcher", "nr_pages": 4096,
     "hypervisor_socket": "/run/pvio/hv.sock", "xenstore_fd": -1,
     "state_dir": "/run/pvio", "status_file": "/run/pvio/g1-launcher.status",
     "extra": {"config": {"name": "g1", "type": "lguest",
                          "disk": {"target": "g1-disk.img", "size": "64M"},
                          "net": {"lan": "lan0", "address": "10.0.0.1/24", "mtu": 1500},
                          "console": true},
               "launcher_domid": 3, "guest_domid": 4,
               "lan_members": [{"name": "g1", "domid": 4}, {"name": "g2", "domid": 6}],
               "console_socket": "/run/pvio/g1.console",
               "nbd_socket": "/run/pvio/g1.nbd"}}

    {"name": "g1", "domid": 4, "role": "lguest-guest", ... same "extra" ...}

The guest's RAM is decided by the Launcher, as in lguest: ``extra["guest_nr_pages"]``
if given, else the config's ``memory``, else the toolstack's default; the guest process
takes the size from the rendezvous file.  ``extra["hostile"]`` is for tests only: a list
of rule breaks the guest commits once it is up (see `Guest._misbehave`).

Unplug (`pvio unplug`, T:897): the Launcher takes requests on ``<state_dir>/lguest/
<guest>.control`` (named in its rendezvous file); the guest looks for REMOVED devices
every REMOVAL_POLL seconds.  Not here: adding a device to a running guest, and a
Launcher restart while its guest runs (the guest would have to re-attach).  Rejected:
putting the guest's RAM in a region the Launcher can map (lguest's Launcher could see
all guest memory; here it sees only the device pages, and data moves only by DMA).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import json
import logging
import os
import struct
import time
import zlib
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pvio.abi.lguest import (
    LGUEST_DEVICE_F_RANDOMNESS,
    LGUEST_DEVICE_S_FAILED,
    LGUEST_DEVICE_T_BLOCK,
    LGUEST_DEVICE_T_CONSOLE,
    LGUEST_DEVICE_T_NET,
)
from pvio.lguest.aio import GuestThread, LguestDisk, ThreadedDmaPort
from pvio.lguest.block import MAX_REQUEST_BYTES, BlockDevice, BlockDriver
from pvio.lguest.bus import Bus, DeviceDriver, DeviceSlot, DeviceTable, LguestDevice
from pvio.lguest.console import CONSOLE_BUFFER, ConsoleDevice, ConsoleDriver
from pvio.lguest.dma import (
    DMA_SIZE,
    GUEST_VIOLATION_IRQ,
    LGUEST_IRQS,
    PAGE_SIZE,
    VIOLATION_IRQ_BASE,
    LguestError,
    build_dma,
    page_sections,
)
from pvio.lguest.guest import Allocator
from pvio.lguest.net import (
    ETH_DATA_LEN,
    NetDriver,
    check_mtu,
    lan_features,
    lan_frame_rule,
    peer_key,
)
from pvio.lguest.netpath import NetPath
from pvio.lguest.storage import FileStorage
from pvio.storage.backend import BackendInfo
from pvio.toolstack.spec import DomainSpec, pid_alive, write_status

log = logging.getLogger("pvio.lguest.process")

#: The Launcher's own memory: its receive and send buffers (pages).
LAUNCHER_PAGES = 96
#: NBD export name of a guest's lguest disk.
EXPORT_NAME = "lgba"
#: How long a process waits for its peer's rendezvous file (seconds).
RENDEZVOUS_TIMEOUT = 30.0
#: Console output held for a `pvio console` client that does not read, before dropping.
CLIENT_BUFFER_LIMIT = 1 << 20
#: How often the guest looks for devices its Launcher marked REMOVED (seconds).
REMOVAL_POLL = 0.2
#: How long `pvio unplug` waits for the guest's REMOVED_ACK (seconds).
UNPLUG_TIMEOUT = 10.0
#: Console output the guest retries while its Launcher's buffer is busy (seconds).
CONSOLE_RETRY = 2.0
_U32 = struct.Struct("<I")


# -- the spec's settings -----------------------------------------------------------------


@dataclass
class LguestSettings:
    """What both processes read from a spec's `extra`."""

    guest_name: str
    state_dir: Path
    launcher_domid: int
    guest_domid: int
    guest_nr_pages: int
    disk_target: str = ""
    disk_size: int = 0
    lan: str = ""
    address: str = ""
    mac: bytes = b""
    mtu: int = ETH_DATA_LEN
    console: bool = True
    lan_members: list[tuple[str, int]] = field(default_factory=list)
    lan_host: str = ""  # the host's address on the LAN (CIDR), if it is a peer
    lan_host_mac: bytes = b""
    console_socket: str = ""
    nbd_socket: str = ""
    hostile: list[str] = field(default_factory=list)

    @classmethod
    def from_spec(cls, spec: DomainSpec) -> LguestSettings:
        from pvio.toolstack.config import parse_size

        extra = spec.extra
        cfg: dict[str, Any] = dict(extra.get("config") or {})
        name = str(cfg.get("name") or extra.get("guest_name") or spec.name)
        guest_domid = int(extra.get("guest_domid", spec.domid))
        s = cls(
            guest_name=name,
            state_dir=Path(spec.state_dir),
            launcher_domid=int(extra.get("launcher_domid", spec.domid)),
            guest_domid=guest_domid,
            guest_nr_pages=_guest_pages(spec, cfg),
            console=bool(cfg.get("console", True)),
            console_socket=str(extra.get("console_socket", "")),
            nbd_socket=str(extra.get("nbd_socket", "")),
            hostile=[str(h) for h in extra.get("hostile", [])],
        )
        disk = cfg.get("disk")
        if isinstance(disk, dict) and disk.get("target"):
            target = Path(str(disk["target"]))
            s.disk_target = str(target if target.is_absolute() else s.state_dir / target)
            s.disk_size = parse_size(disk.get("size", 64 << 20))
        net = cfg.get("net")
        if isinstance(net, dict) and net.get("address"):
            s.lan = str(net.get("lan", "lan0"))
            s.address = str(net["address"])
            mac = str(net.get("mac", ""))
            s.mac = bytes.fromhex(mac.replace(":", "")) if mac else default_mac(guest_domid)
            s.mtu = check_mtu(int(net.get("mtu", ETH_DATA_LEN)))
            members = extra.get("lan_members") or [{"name": name, "domid": guest_domid}]
            s.lan_members = sorted(((str(m["name"]), int(m["domid"])) for m in members), key=lambda m: m[1])
            host = extra.get("lan_host") or {}
            s.lan_host = str(host.get("address", ""))
            host_mac = str(host.get("mac", ""))
            s.lan_host_mac = bytes.fromhex(host_mac.replace(":", "")) if host_mac else host_mac_of(s.lan)
        return s

    @property
    def lan_slot(self) -> int:
        for i, (_, domid) in enumerate(self.lan_members):
            if domid == self.guest_domid:
                return i
        raise LguestError(f"guest d{self.guest_domid} is not in lan_members", field="lan_members")

    @property
    def lan_owner(self) -> bool:
        return bool(self.lan_members) and self.lan_members[0][1] == self.guest_domid


def _guest_pages(spec: DomainSpec, cfg: dict[str, Any]) -> int:
    """The guest's RAM in pages: `extra["guest_nr_pages"]`, else the config's `memory`,
    else the guest spec's nr_pages (the Launcher's spec: the toolstack's default)."""
    from pvio.toolstack.config import parse_size

    if "guest_nr_pages" in spec.extra:
        return int(spec.extra["guest_nr_pages"])
    if cfg.get("memory"):
        return parse_size(cfg["memory"]) // PAGE_SIZE
    return spec.nr_pages if spec.role == "lguest-guest" else DomainSpec.nr_pages


def host_mac_of(lan: str) -> bytes:
    """The host's MAC on LAN `lan`: locally administered, derived from the name."""
    h = zlib.crc32(lan.encode())
    return bytes([0x02, 0x70, 0x76, 0x68, (h >> 8) & 0xFF, h & 0xFF])


def default_mac(domid: int) -> bytes:
    """A locally administered unicast MAC derived from the guest's domid."""
    return bytes([0x02, 0x70, 0x76, 0x69, (domid >> 8) & 0xFF, domid & 0xFF])


# -- rendezvous files ----------------------------------------------------------------------


def rendezvous_dir(state_dir: Path) -> Path:
    return state_dir / "lguest"


def launcher_file(state_dir: Path, guest: str) -> Path:
    return rendezvous_dir(state_dir) / f"{guest}.launcher.json"


def lan_file(state_dir: Path, lan: str) -> Path:
    return rendezvous_dir(state_dir) / f"lan-{lan}.json"


def control_socket(state_dir: Path, guest: str) -> Path:
    """Where guest `guest`'s Launcher takes requests (`pvio unplug`)."""
    return rendezvous_dir(state_dir) / f"{guest}.control"


async def wait_rendezvous(path: Path, accept: Callable[[dict[str, Any]], bool],
                          timeout: float = RENDEZVOUS_TIMEOUT) -> dict[str, Any]:
    """Wait for `path` to hold JSON written by a live process that `accept` accepts."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            data = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            data = None
        if isinstance(data, dict) and pid_alive(data.get("pid")) and accept(data):
            return data
        if time.monotonic() > deadline:
            raise TimeoutError(f"no live rendezvous at {path}")
        await asyncio.sleep(0.05)


def _log_failure(fut: Future[Any] | asyncio.Future[Any]) -> None:
    if fut.cancelled():
        return
    exc = fut.exception()
    if exc is not None:
        log.warning("lguest worker: %s", exc)


def _submit(thread: GuestThread, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
    """Queue `fn` on the worker now (in call order), logging any failure."""
    fut = asyncio.get_running_loop().run_in_executor(thread.pool, fn, *args)
    fut.add_done_callback(_log_failure)
    return fut


# -- the Launcher --------------------------------------------------------------------------


class HvLauncherPort:
    """`LauncherPort` for a Launcher domain: the device region and its own SEND_DMA.

    Guest addresses are translated by `delta` into the Launcher's view of the device
    region; anything else (the guest's RAM) is out of its reach and refused."""

    def __init__(self, port: ThreadedDmaPort, delta: int, lo: int, hi: int, tx_dma: int, tx_buf: int,
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


@dataclass
class _Served:
    """One device the Launcher serves: its slot, its logic and its receive buffer."""

    slot: DeviceSlot
    device: BlockDevice | ConsoleDevice
    rx_dma: int
    failed: bool = False
    removed: bool = False  # unplugged: the guest acknowledged, nothing more is served


class Launcher:
    """lguest's Launcher for one guest, as a domain process."""

    def __init__(self, spec: DomainSpec) -> None:
        self.spec = spec
        self.s = LguestSettings.from_spec(spec)
        self.table = DeviceTable(self.s.guest_nr_pages)
        self.thread = GuestThread("lguest-launcher")
        self.served: dict[int, _Served] = {}  # by irq
        self.net_index: int | None = None  # the network device's slot (its page is the LAN's)
        self.net_failed = False
        self.storage: FileStorage | None = None
        self.console: ConsoleDevice | None = None
        self.clients: set[asyncio.StreamWriter] = set()
        self.violations = 0
        self.output_dropped = 0
        self._pending_input = bytearray()
        self._input_scheduled = False
        self._server: asyncio.AbstractServer | None = None
        self.host_path: NetPath | None = None  # the host's peer on the LAN (T:896)
        self.slots: dict[str, DeviceSlot] = {}  # "console", "block", "net" -> descriptor slot
        self._control: asyncio.AbstractServer | None = None

    # T:895 The Launcher as a domain: device pages shared, requests served by DMA
    # The Launcher is a domain with a little memory of its own.  It asks the hypervisor
    # for a region holding the descriptor page and the device pages, lays the devices
    # out there (console and block, each with a page; the network device last, whose
    # page is the LAN region), and writes where they are into a rendezvous file.  The
    # guest attaches the same region at the top of its RAM, so a key in a device page is
    # one key for both: the Launcher binds one receive buffer at each device's key, the
    # guest's SEND_DMA lands there and raises the Launcher's interrupt, and the device
    # logic of T:860 and T:870 runs (the block device's on the event loop, the
    # console's in the Launcher's worker thread), answering with its own SEND_DMA to the
    # same key, which reaches the reply buffer the guest bound.  A
    # guest that breaks the DMA rules on a device's key has its SEND_DMA refused by the
    # hypervisor, which raises a violation interrupt here; the Launcher marks that
    # device FAILED and no longer serves it.  Breaks on the LAN page (bad DMA at a peer's
    # key, a runt or oversized frame, a flood past the limit this Launcher declared if
    # it owns the LAN) reach it as GUEST_VIOLATION_IRQ: it is the supervisor of its
    # guest, and it marks the network device FAILED.
    # :T
    async def start(self) -> None:
        from pvio.hypervisor import aio

        s = self.s
        loop = asyncio.get_running_loop()
        host_peer = bool(s.lan and s.lan_owner and s.lan_host)
        mem_pages = LAUNCHER_PAGES + (NetDriver.memory_pages(s.mtu) if host_peer else 0)
        self.dom = await aio.connect(self.spec.hypervisor_socket, self.spec.name, mem_pages,
                                     domid=self.spec.domid)
        self.port = ThreadedDmaPort(self.dom, loop)
        cons = self.table.add(LGUEST_DEVICE_T_CONSOLE, num_pages=1) if s.console else None
        blk = (self.table.add(LGUEST_DEVICE_T_BLOCK, features=LGUEST_DEVICE_F_RANDOMNESS)
               if s.disk_target else None)
        net = (self.table.add(LGUEST_DEVICE_T_NET, features=lan_features(s.lan_slot), num_pages=1)
               if s.lan else None)
        self.net_index = net.index if net is not None else None
        self.slots = {kind: slot for kind, slot in (("console", cons), ("block", blk), ("net", net))
                      if slot is not None}
        top = self.table.descriptor_addr
        dev_end = net.addr if net is not None else self.table.total_pages * PAGE_SIZE
        dev_pages = (dev_end - top) // PAGE_SIZE
        base = max(top, mem_pages * PAGE_SIZE)
        region = await self.dom.lguest_region(dev_pages, base)
        await self.dom.lguest_region_permit(region.region_id, s.guest_domid)  # and nobody else
        lan_region = 0
        if net is not None and s.lan_owner:
            lan_region = (await self.dom.lguest_region(1, base + dev_pages * PAGE_SIZE)).region_id
            for _, member in s.lan_members:
                await self.dom.lguest_region_permit(lan_region, member)
            await self.dom.lguest_region_frames(lan_region, *lan_frame_rule(s.mtu))
        alloc = Allocator(0, mem_pages * PAGE_SIZE)
        tx_dma = alloc.alloc_unsplit(DMA_SIZE)
        tx_buf = alloc.alloc_pages(MAX_REQUEST_BYTES // PAGE_SIZE)
        # The block device's replies have buffers of their own: they are sent from the
        # event loop, the console's from the worker thread.
        self.block_tx = (alloc.alloc_pages(MAX_REQUEST_BYTES // PAGE_SIZE), alloc.alloc_unsplit(DMA_SIZE))
        irq_keys = {slot.irq: slot.addr for slot in (cons, blk) if slot is not None}
        self.lport = HvLauncherPort(self.port, base - top, top, dev_end, tx_dma, tx_buf, irq_keys)
        self.lport.write(top, self.table.descriptor_page())
        self.dom.set_irq_handler(self._on_irq)
        if blk is not None:
            self.storage = _open_image(s.disk_target, s.disk_size)
            device = BlockDevice(blk, self.storage)
            device.setup(self.lport)
            await self._serve(blk, device, alloc, MAX_REQUEST_BYTES)
        if cons is not None:
            self.console = ConsoleDevice(cons)
            await self._serve(cons, self.console, alloc, CONSOLE_BUFFER)
            if s.console_socket:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(s.console_socket)
                self._server = await asyncio.start_unix_server(self._client, s.console_socket)
        control = control_socket(s.state_dir, s.guest_name)
        control.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(control)
        self._control = await asyncio.start_unix_server(self._control_client, str(control))
        me = {"pid": os.getpid(), "launcher_domid": self.dom.domid, "guest_domid": s.guest_domid}
        if lan_region and net is not None and host_peer:
            await self._start_host_peer(net, base + dev_pages * PAGE_SIZE, alloc)
        if lan_region:
            write_status(lan_file(s.state_dir, s.lan), **me, region_id=lan_region)
        write_status(
            launcher_file(s.state_dir, s.guest_name),
            **me, region_id=region.region_id, top_pfn=self.table.top_pfn,
            dev_pages=dev_pages, total_pages=self.table.total_pages,
            net_pfn=net.pfn if net is not None else 0,
            console_socket=s.console_socket if self._server is not None else "",
            control_socket=str(control))

    # T:896 The host as one more peer on the LAN
    # With `[lan.<name>] host = CIDR`, the Launcher that owns a LAN joins it for the host,
    # as lguest's --tunnet did: it takes the slot after the guests', publishes a MAC
    # with the promiscuous bit (so frames for addresses beyond the LAN come to it),
    # binds eight receive buffers of its own memory at that slot's key and runs the
    # same driver and frame path as a guest (T:885, T:899), ending in a TAP named
    # pvio-<name> in the host's namespace.  The host reaches the guests and they reach
    # it; nothing else of the host is exposed to them.
    # :T
    async def _start_host_peer(self, net: DeviceSlot, lan_base: int, alloc: Allocator) -> None:
        from pvio.domains.tap import create_host_tap
        from pvio.lguest.bus import LguestDevice
        from pvio.lguest.netpath import NetPath

        s = self.s
        slot = len(s.lan_members)
        device = LguestDevice(net.index, LGUEST_DEVICE_T_NET, lan_features(slot), 1, lan_base // PAGE_SIZE,
                              self.port, None)
        driver = NetDriver(device, alloc, s.lan_host_mac, mtu=s.mtu)
        await self.thread.call(functools.partial(driver.open, promisc=True))
        loop = asyncio.get_running_loop()
        tap = await loop.run_in_executor(
            None, lambda: create_host_tap(f"pvio-{s.lan}", address=s.lan_host, mac=driver.mac, mtu=s.mtu,
                                          nocsum=driver.nocsum))
        self.host_path = NetPath(driver, self.dom, tap)
        self.host_path.start(loop)

    # T:897 Unplug: REMOVED, then REMOVED_ACK
    # `pvio unplug NAME DEVICE` asks the Launcher, on its control socket, to take a device
    # away.  The Launcher sets REMOVED in the device's status (the bus table allows it
    # once), then waits for the guest: the guest notices within a fifth of a second,
    # stops what feeds the device (its TAP, its NBD export, its shell), lets its driver
    # go (the network driver clears its MAC slot and unbinds its buffers) and answers
    # REMOVED_ACK.  Only then does the Launcher stop serving the device and unbind its
    # buffer; a guest that never acknowledges keeps a device marked REMOVED, and the
    # request says so.
    # :T
    async def unplug(self, kind: str, timeout: float = UNPLUG_TIMEOUT) -> dict[str, Any]:
        from pvio.lguest.bus import RA, BusError, R

        slot = self.slots.get(kind)
        if slot is None:
            return {"error": f"{self.s.guest_name} has no {kind} device (it has: {', '.join(self.slots) or 'none'})"}
        if self.table.status(self.lport, slot.index) & R:
            return {"error": f"the {kind} device was removed already"}
        try:
            self.table.remove(self.lport, slot.index)
        except BusError as exc:
            return {"error": f"{kind} device: {exc.reason}"}
        deadline = time.monotonic() + timeout
        while not (status := self.table.status(self.lport, slot.index)) & RA:
            if time.monotonic() > deadline:
                return {"error": f"the guest did not acknowledge REMOVED within {timeout:g} s "
                                 f"(status {status:#x}); the device stays removed"}
            await asyncio.sleep(0.02)
        served = self.served.get(slot.irq)
        if served is not None and not served.removed:
            served.removed = True
            with contextlib.suppress(Exception):
                await self.dom.unbind_dma(slot.addr + self.lport.delta, served.rx_dma)
        assert status & R
        return {"ok": True, "device": kind, "index": slot.index, "status": status}

    async def _control_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One request per line, JSON: {"unplug": "console" | "block" | "net"}."""
        try:
            while line := await reader.readline():
                try:
                    request = json.loads(line)
                    kind = request["unplug"] if isinstance(request, dict) else None
                    if not isinstance(kind, str):
                        raise ValueError("expected {\"unplug\": DEVICE}")
                    reply = await self.unplug(kind)
                except (ValueError, KeyError) as exc:
                    reply = {"error": f"bad request: {exc}"}
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except ValueError:  # a line longer than the reader's limit: not a request
            with contextlib.suppress(ConnectionError):
                writer.write(json.dumps({"error": "request too long"}).encode() + b"\n")
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _serve(self, slot: DeviceSlot, device: BlockDevice | ConsoleDevice, alloc: Allocator,
                     size: int) -> None:
        buf = alloc.alloc_pages(-(-size // PAGE_SIZE))
        rx_dma = alloc.alloc_unsplit(DMA_SIZE)
        self.port.write(rx_dma, build_dma(page_sections(buf, size)))
        await self.dom.bind_dma(slot.addr + self.lport.delta, rx_dma, 1, slot.irq)
        self.served[slot.irq] = _Served(slot, device, rx_dma)

    def _on_irq(self, irq: int) -> None:
        if self.host_path is not None and irq == self.host_path.net.device.irq:
            self.host_path.interrupt()  # the host peer's frames, on the loop (T:899)
            return
        served = self.served.get(irq)
        if served is not None and isinstance(served.device, BlockDevice):
            if not (served.failed or served.removed):
                asyncio.ensure_future(self._serve_block(served, served.device)).add_done_callback(_log_failure)
            return
        _submit(self.thread, self._irq_in_thread, irq).add_done_callback(self._after_irq)

    async def _serve_block(self, served: _Served, device: BlockDevice) -> None:
        """A block request, on the event loop: the request copied out of the receive
        buffer, served from the image (page-cache reads and writes: one request at a
        time, as the protocol has it), and the reply's SEND_DMA awaited."""
        data = self._take(served)
        payload = device.serve(self.lport, served.slot.addr, data)
        if payload is None:
            return
        buf, dma = self.block_tx
        n = await self.dom.send_dma(*self.lport.stage(served.slot.addr, payload, buf, dma))
        if payload and n == 0:
            device.no_reply_buffer(self.lport)
            await self.dom.send_dma(*self.lport.stage(served.slot.addr, b"", buf, dma))  # the interrupt

    def _take(self, served: _Served) -> bytes:
        """What the guest sent into a device's receive buffer; the buffer is free again."""
        raw = self.port.read(served.rx_dma, DMA_SIZE)
        used = _U32.unpack_from(raw)[0]
        if not used:
            return b""
        data = b"".join(self.port.read(a, n) for a, n in page_sections(_first_addr(raw), used))
        self.port.write(served.rx_dma, _U32.pack(0))
        return data

    def _irq_in_thread(self, irq: int) -> bytes:
        """Runs in the worker: serve the device whose buffer the guest just filled."""
        if irq == GUEST_VIOLATION_IRQ:
            # The guest broke the rules at a key in a region this Launcher is not bound
            # at: its LAN page, so its network device.  Marked FAILED once; the guest's
            # driver sees it and stops (lguest's bus).
            if self.net_index is not None and not self.net_failed:
                self.violations += 1
                self.net_failed = True
                self.table.fail(self.lport, self.net_index)
            return b""
        if irq >= VIOLATION_IRQ_BASE:
            served = self.served.get(irq - VIOLATION_IRQ_BASE)
            if served is not None and not served.failed:
                self.violations += 1
                served.failed = True
                self.table.fail(self.lport, served.slot.index)
                self.port.unbind_dma(served.slot.addr + self.lport.delta, served.rx_dma)
            return b""
        served = self.served.get(irq)
        if served is None or served.failed or served.removed:
            return b""
        data = self._take(served)
        if not data and isinstance(served.device, ConsoleDevice):
            return b""
        served.device.handle_output(self.lport, served.slot.addr, data)
        if isinstance(served.device, ConsoleDevice):
            return served.device.take_output()
        return b""

    def _after_irq(self, fut: asyncio.Future[Any]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return
        out: bytes = fut.result()
        for w in list(self.clients):
            if not out:
                break
            if w.transport.get_write_buffer_size() > CLIENT_BUFFER_LIMIT:
                self.output_dropped += len(out)  # a client that does not read loses output
                continue
            w.write(out)

    # -- the console's host end --------------------------------------------------------------

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.clients.add(writer)
        try:
            while data := await reader.read(4096):
                self._pending_input += data
                self._schedule_input(0)
        except ConnectionError:
            pass
        finally:
            self.clients.discard(writer)
            writer.close()

    def _schedule_input(self, delay: float) -> None:
        if self._input_scheduled or not self._pending_input:
            return
        self._input_scheduled = True
        loop = asyncio.get_running_loop()
        loop.call_later(delay, self._push_input)

    def _push_input(self) -> None:
        chunk = bytes(self._pending_input[:CONSOLE_BUFFER])
        fut = _submit(self.thread, self._input_in_thread, chunk)
        fut.add_done_callback(self._input_done)

    def _input_in_thread(self, chunk: bytes) -> int:
        served = self.served.get(self.console.slot.irq) if self.console else None
        if self.console is None or served is None or served.failed:
            return len(chunk)  # nobody to give it to: drop
        return self.console.input(self.lport, chunk)

    def _input_done(self, fut: asyncio.Future[Any]) -> None:
        self._input_scheduled = False
        n = 0 if fut.cancelled() or fut.exception() is not None else int(fut.result())
        del self._pending_input[:n]
        self._schedule_input(0 if n else 0.005)

    def statistics(self) -> dict[str, Any]:
        """Violations, FAILED devices, console output dropped, each device's counters."""
        return {
            "violations": self.violations,
            "failed": sorted([sv.slot.index for sv in self.served.values() if sv.failed]
                             + ([self.net_index] if self.net_failed and self.net_index is not None else [])),
            "console_output_dropped": self.output_dropped,
            "devices": {str(sv.slot.index): vars(sv.device.stats).copy() for sv in self.served.values()},
            **({"host_peer": {"interface": self.host_path.tap.ifname, "address": self.host_path.tap.address,
                              "net": vars(self.host_path.net.stats).copy()}}
               if self.host_path is not None else {}),
        }

    async def stop(self) -> None:
        if self._control is not None:
            self._control.close()
            _unlink(control_socket(self.s.state_dir, self.s.guest_name))
        if self.host_path is not None:
            self.host_path.stop()
            self.host_path.tap.close()  # the host's interface goes with it
        if self._server is not None:
            self._server.close()
        for w in list(self.clients):
            w.close()
        with contextlib.suppress(FileNotFoundError):
            if self.s.console_socket:
                os.unlink(self.s.console_socket)
        for path in (launcher_file(self.s.state_dir, self.s.guest_name), lan_file(self.s.state_dir, self.s.lan)):
            _remove_if_mine(path)
        await asyncio.get_running_loop().run_in_executor(None, self.thread.close)
        if getattr(self, "dom", None) is not None:
            await self.dom.close()
        if self.storage is not None:
            self.storage.close()


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _first_addr(raw: bytes) -> int:
    addr: int = _U32.unpack_from(raw, 4)[0]
    return addr


def _remove_if_mine(path: Path) -> None:
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def _open_image(path: str, size: int) -> FileStorage:
    """The disk image, created sparse with `size` bytes if it does not exist."""
    p = Path(path)
    if not p.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "xb") as f:
            f.truncate(size)
    return FileStorage(p)


async def launcher_main(spec: DomainSpec) -> None:
    """Entry point of role ``lguest-launcher`` (see the module notes)."""
    launcher = Launcher(spec)
    try:
        await launcher.start()
        status: dict[str, Any] = {"ready": True, "role": spec.role, "domid": launcher.dom.domid,
                                  "guest": launcher.s.guest_name}
        write_status(spec.status_file, **status)
        while True:
            await asyncio.sleep(1.0)
            status["stats"] = launcher.statistics()
            write_status(spec.status_file, **status)
    finally:
        await asyncio.shield(launcher.stop())


# -- the guest -----------------------------------------------------------------------------


class DiskBackend:
    """A guest's `LguestDisk` as an NBD `BlockBackend` (whole sectors, no FUA)."""

    def __init__(self, disk: LguestDisk) -> None:
        self.disk = disk
        self._info = BackendInfo(disk.size, min_block=512, can_fua=False)

    @property
    def info(self) -> BackendInfo:
        return self._info

    async def read(self, offset: int, length: int) -> bytes:
        return await self.disk.read(offset, length)

    async def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        await self.disk.write(offset, data)

    async def flush(self) -> None:
        await self.disk.flush()

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        raise OSError(errno.EOPNOTSUPP, "lguest's block protocol has no discard")

    async def write_zeroes(self, offset: int, length: int, fua: bool = False, may_trim: bool = True) -> None:
        raise OSError(errno.EOPNOTSUPP, "lguest's block protocol has no write-zeroes")


class Guest:
    """An lguest guest as a domain process: bus, drivers, TAP, NBD, console shell."""

    def __init__(self, spec: DomainSpec) -> None:
        self.spec = spec
        self.s = LguestSettings.from_spec(spec)
        self.thread = GuestThread("lguest-guest")
        self.block: BlockDriver | None = None
        self.console: ConsoleDriver | None = None
        self.net: NetDriver | None = None
        self.disk: LguestDisk | None = None
        self.tap: Any = None
        self.path: NetPath | None = None  # the network device's frames (T:899)
        self.nbd: Any = None
        self.shell: Any = None
        self.console_dropped = 0
        self.refused = 0  # hypercalls the hypervisor refused (DmaError)
        self.hostile_results: dict[str, str] = {}  # tests only: each rule break's outcome
        self._net_closing = False

    # T:898 The guest as a domain: scan, probe, and the real world's ends
    # The guest process becomes a domain whose memory is its RAM, reads its Launcher's
    # rendezvous file, attaches the device region at the top of its RAM (and the LAN
    # region as the network device's page), then does what lguest's guest kernel did:
    # scan the bus, probe a driver per device, open the network device.  The console
    # driver runs in one worker thread, its interrupts queued to that thread in order;
    # the disk's requests and the network's frames stay on the event loop.  The ends: frames from a TAP in netns pvio-<name> become the net driver's
    # transmits and received frames go back to the TAP; the disk is exported over NBD;
    # a shell inside the namespace is the console's user, its output sent by SEND_DMA
    # (retried while the Launcher's one buffer is busy).
    # :T
    async def start(self) -> None:
        from pvio.hypervisor import aio

        s = self.s
        loop = asyncio.get_running_loop()
        info = await wait_rendezvous(launcher_file(s.state_dir, s.guest_name),
                                     lambda d: int(d.get("launcher_domid", -1)) == s.launcher_domid
                                     and int(d.get("guest_domid", -1)) == s.guest_domid)
        # The Launcher decides the guest's RAM, as lguest's did: all of it lies below the
        # descriptor page.
        top_pfn = int(info["top_pfn"])
        s.guest_nr_pages = top_pfn
        self.dom = await aio.connect(self.spec.hypervisor_socket, self.spec.name, top_pfn,
                                     domid=self.spec.domid)
        await self.dom.lguest_region(int(info["dev_pages"]), top_pfn * PAGE_SIZE, int(info["region_id"]))
        if s.lan and info.get("net_pfn"):
            owner = s.lan_members[0][1]
            lan = await wait_rendezvous(lan_file(s.state_dir, s.lan),
                                        lambda d: int(d.get("guest_domid", -1)) == owner)
            await self.dom.lguest_region(1, int(info["net_pfn"]) * PAGE_SIZE, int(lan["region_id"]))
        self.port = ThreadedDmaPort(self.dom, loop)
        self.bus = Bus(self.port, top_pfn, int(info["total_pages"]))
        self.alloc = Allocator(PAGE_SIZE, s.guest_nr_pages * PAGE_SIZE)
        self.dom.set_irq_handler(self._on_irq)
        await self.thread.call(self._probe_all)
        if self.net is not None:
            await self._start_net()
        if self.block is not None:
            self.disk = LguestDisk(self.block, self.dom)
            if s.nbd_socket:
                from pvio.nbd.server_asyncio import NbdServer

                self.nbd = NbdServer({EXPORT_NAME: DiskBackend(self.disk)})
                await self.nbd.listen_unix(s.nbd_socket)
        if self.console is not None:
            self._start_shell()
        if s.hostile:
            await self.thread.call(self._misbehave)

    def _probe_all(self) -> None:
        def probe_console(dev: LguestDevice) -> DeviceDriver:
            self.console = ConsoleDriver(dev, self.alloc)
            return self.console

        def probe_block(dev: LguestDevice) -> DeviceDriver:
            self.block = BlockDriver(dev, self.alloc)
            return self.block

        def probe_net(dev: LguestDevice) -> DeviceDriver:
            self.net = NetDriver(dev, self.alloc, self.s.mac, mtu=self.s.mtu)
            self.net.open()
            return self.net

        self.bus.register_driver(LGUEST_DEVICE_T_CONSOLE, probe_console)
        self.bus.register_driver(LGUEST_DEVICE_T_BLOCK, probe_block)
        self.bus.register_driver(LGUEST_DEVICE_T_NET, probe_net)
        self.bus.scan()

    async def _start_net(self) -> None:
        from pvio.domains.tap import create_tap
        from pvio.lguest.netpath import NetPath

        net = self.net
        assert net is not None
        loop = asyncio.get_running_loop()
        self.tap = await loop.run_in_executor(
            None, lambda: create_tap(self.s.guest_name, address=self.s.address, mac=net.mac, mtu=self.s.mtu,
                                     nocsum=net.nocsum))
        self.path = NetPath(net, self.dom, self.tap, failed=self._net_failed)
        self.path.start(loop)

    def _net_failed(self) -> bool:
        """Has the Launcher marked the network device FAILED?  Then the driver lets go
        of the device (clears its MAC slot, unbinds its buffers, in the worker thread
        as that waits for a hypercall) once, and nothing more is sent or received on it,
        as lguest's bus did.  On the event loop: the status is a byte of memory."""
        net = self.net
        if net is None:
            return True
        if not self.bus.status(net.device.index) & LGUEST_DEVICE_S_FAILED:
            return False
        if net.is_open and not self._net_closing:
            self._net_closing = True
            _submit(self.thread, self._close_net)
        return True

    def _close_net(self) -> None:
        assert self.net is not None
        with contextlib.suppress(LguestError):
            self.net.close()

    def _on_irq(self, irq: int) -> None:
        if irq >= LGUEST_IRQS:
            return  # a violation notice: only Launchers act on those
        if self.path is not None and irq == self.path.net.device.irq:
            self.path.interrupt()  # on the loop: see T:899
            return
        if self.disk is not None and self.block is not None and irq == self.block.device.irq:
            self.block.interrupt()  # memory reads: the result, a read's data
            self.disk.completed()
            return
        fut = _submit(self.thread, self._irq_in_thread, irq)
        fut.add_done_callback(self._after_irq)

    def _irq_in_thread(self, irq: int) -> tuple[int, bytes]:
        self.bus.interrupt(irq)
        typed = (self.console.take_input()
                 if self.console is not None and irq == self.console.device.irq else b"")
        return irq, typed

    def _after_irq(self, fut: asyncio.Future[Any]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return
        _, typed = fut.result()
        if typed and self.shell is not None and self.shell.master >= 0:
            with contextlib.suppress(OSError):
                os.write(self.shell.master, typed)

    def _start_shell(self) -> None:
        from pvio.domains.console import GuestShell
        from pvio.domains.tap import netns_name

        assert self.console is not None
        argv = ["sh", "-i"]
        if self.net is not None:
            argv = ["ip", "netns", "exec", netns_name(self.s.guest_name), *argv]
        guest = self

        class _Shell(GuestShell):
            def _readable(self) -> None:
                try:
                    data = os.read(self.master, 4096)
                except BlockingIOError:
                    return
                except OSError:
                    data = b""
                if not data:
                    self._stop_reading()
                    return
                _submit(guest.thread, guest._put_chars, data)

        self.shell = _Shell(self.console, argv)
        env_shell = self.shell
        env_shell.start(asyncio.get_running_loop())

    def _put_chars(self, data: bytes) -> None:
        """Console output, 256 bytes per SEND_DMA, retried while the Launcher is busy."""
        assert self.console is not None
        for i in range(0, len(data), CONSOLE_BUFFER):
            chunk = data[i : i + CONSOLE_BUFFER]
            deadline = time.monotonic() + CONSOLE_RETRY
            while self.console.send_chunk(chunk) == 0:
                if time.monotonic() > deadline or self.bus.status(self.console.device.index) & LGUEST_DEVICE_S_FAILED:
                    self.console_dropped += len(chunk)
                    break
                time.sleep(0.001)

    async def unplug_removed(self) -> list[int]:
        """Devices the Launcher marked REMOVED (T:897): stop what feeds each (the TAP,
        whose interface goes while the namespace stays until the guest stops; the NBD
        export; the shell), then let the drivers go and answer REMOVED_ACK (the bus's
        poll_removals, in the worker thread: the network driver unbinds its buffers)."""
        from pvio.lguest.bus import RA, R

        pending = [i for i in self.bus.devices if self.bus.status(i) & (R | RA) == R]
        if not pending:
            return []
        for i in pending:
            if self.net is not None and i == self.net.device.index:
                self._end_net()
            if self.block is not None and i == self.block.device.index:
                await self._end_disk()
            if self.console is not None and i == self.console.device.index:
                self._end_console()
        gone: list[int] = await self.thread.call(self.bus.poll_removals)
        return gone

    # The real world's end of each device, let go on unplug and on stop.

    def _end_net(self) -> None:
        """The frame path and the TAP interface (its namespace stays: see `stop`)."""
        if self.path is not None:
            self.path.stop()
            self.path = None
        if self.tap is not None:
            self.tap.close_device()

    async def _end_disk(self) -> None:
        """The NBD export (in-flight commands are answered first, up to a second)."""
        if self.nbd is not None:
            await self.nbd.close(1.0)
            self.nbd = None
        self.disk = None

    def _end_console(self) -> None:
        """The shell behind the console."""
        if self.shell is not None:
            self.shell.stop()
            self.shell = None

    def _misbehave(self) -> None:
        """Tests only: break lguest's DMA rules on purpose (extra["hostile"])."""
        bad = self.alloc.alloc_unsplit(DMA_SIZE)
        for what in self.s.hostile:
            try:
                if what == "block-bad-dma" and self.block is not None:
                    # a section that crosses a page
                    self.port.write(bad, build_dma([]))
                    raw = bytearray(build_dma([]))
                    struct.pack_into("<I", raw, 4, PAGE_SIZE - 8)
                    struct.pack_into("<H", raw, 4 + 4 * 16, 64)
                    self.port.write(bad, bytes(raw))
                    self.port.send_dma(self.block.page, bad)
                elif what == "block-bad-key" and self.block is not None:
                    self.port.send_dma(self.block.page + 2, bad)
                elif what == "console-past-memory" and self.console is not None:
                    raw = bytearray(build_dma([]))
                    struct.pack_into("<I", raw, 4, 0xFFFF0000)
                    struct.pack_into("<H", raw, 4 + 4 * 16, 16)
                    self.port.write(bad, bytes(raw))
                    self.port.send_dma(self.console.key, bad)
                elif what in ("runt-frames", "oversized-frames", "flood") and self.net is not None:
                    # Straight to every peer's key, past the driver's own checks: runts
                    # (6 bytes), frames of 1600 bytes, or a flood of 4096 broadcasts.
                    net = self.net
                    frame = {"runt-frames": b"\xff" * 6, "oversized-frames": b"\xff" * 1600,
                             "flood": b"\xff" * 12 + b"\x88\xb5" + bytes(100)}[what]
                    buf = self.alloc.alloc_pages(1) if len(frame) > net.frame_len else net.tx_buf
                    self.port.write(buf, frame)
                    self.port.write(bad, build_dma(page_sections(buf, len(frame))))
                    peers = [i for i in range(len(self.s.lan_members)) if i != net.me]
                    if what == "flood":  # batches of 256 SEND_DMAs, one round trip each
                        sends = [(peer_key(net.peer_phys, p), bad) for p in peers] * (256 // max(1, len(peers)))
                        for _ in range(16):
                            worst = min(self.port.send_dma_many(sends))
                            if worst < 0:
                                raise LguestError("flood refused", err=-worst)
                    for _ in range(20 if what != "flood" else 0):
                        for peer in peers:
                            self.port.send_dma(peer_key(net.peer_phys, peer), bad)
                elif what == "lan-bad-dma" and self.net is not None:
                    # a section past the end of memory, at a peer's key
                    raw = bytearray(build_dma([]))
                    struct.pack_into("<I", raw, 4, 0xFFFF0000)
                    struct.pack_into("<H", raw, 4 + 4 * 16, 16)
                    self.port.write(bad, bytes(raw))
                    peer = 1 if self.net.me == 0 else 0
                    self.port.send_dma(peer_key(self.net.peer_phys, peer), bad)
                self.hostile_results[what] = "accepted"
            except LguestError as exc:
                self.refused += 1
                self.hostile_results[what] = errno.errorcode.get(exc.errno, str(exc.errno))

    async def stop(self) -> None:
        from pvio.domains.tap import remove_namespace

        self._end_console()
        self._end_net()
        if self.tap is not None:
            await asyncio.get_running_loop().run_in_executor(None, remove_namespace, self.tap.netns)
        await self._end_disk()
        await asyncio.get_running_loop().run_in_executor(None, self.thread.close)
        if getattr(self, "dom", None) is not None:
            await self.dom.close()

    def statistics(self) -> dict[str, Any]:
        out: dict[str, Any] = {"refused": self.refused, "console_dropped": self.console_dropped,
                               "bus_refused": self.bus.stats.refused}
        if self.hostile_results:
            out["hostile"] = dict(self.hostile_results)
        if self.net is not None:
            out["net"] = vars(self.net.stats).copy()
            out["net_open"] = self.net.is_open
            if self.path is not None:
                out["net_tx_batches"] = self.path.tx_batches
                out["net_tap_dropped"] = self.path.tx_dropped
        return out


async def guest_main(spec: DomainSpec) -> None:
    """Entry point of role ``lguest-guest`` (see the module notes)."""
    guest = Guest(spec)
    try:
        await guest.start()
        status = {"ready": True, "role": spec.role, "domid": guest.dom.domid}
        if guest.tap is not None:
            status["netns"] = guest.tap.netns
        if guest.nbd is not None:
            status["nbd"] = f"nbd+unix:///{EXPORT_NAME}?socket={guest.s.nbd_socket}"
        indices = list(guest.bus.devices)  # removed devices leave bus.devices
        status["devices"] = {str(i): guest.bus.status(i) for i in indices}
        write_status(spec.status_file, **status)
        ticks = 0
        while True:
            await asyncio.sleep(REMOVAL_POLL)
            if await guest.unplug_removed() and guest.nbd is None:
                status.pop("nbd", None)
            ticks += 1
            if ticks * REMOVAL_POLL < 1.0:
                continue
            ticks = 0
            if guest.net is not None:
                guest._net_failed()  # let go of a FAILED network device
            status["stats"] = guest.statistics()
            status["devices"] = {str(i): guest.bus.status(i) for i in indices}
            write_status(spec.status_file, **status)
    finally:
        await asyncio.shield(guest.stop())
