"""lguest guests and Launchers as domain processes over pvio's hypervisor: what both read
(the spec's settings, MAC policy, the rendezvous files).  The Launcher is in
`pvio.domains.lguest_launcher`, the guest in `pvio.domains.lguest_guest`.

Theory of operation
-------------------
For each lguest domain the toolstack starts two processes (`pvio.domains.run`):
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
push arrives (`pvio.domains.netpath`); a disk request is staged in guest memory and its
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
takes the size from the rendezvous file.  The config's ``misbehave`` is fault injection: a list
of rule breaks the guest commits once it is up (`MISBEHAVIOURS`, see `Guest._misbehave`).

Unplug (`pvio unplug`, T:897): the Launcher takes requests on ``<state_dir>/lguest/
<guest>.control`` (named in its rendezvous file); the guest looks for REMOVED devices
every REMOVAL_POLL seconds.  Not here: adding a device to a running guest, and a
Launcher restart while its guest runs (the guest would have to re-attach).  Rejected:
putting the guest's RAM in a region the Launcher can map (lguest's Launcher could see
all guest memory; here it sees only the device pages, and data moves only by DMA).
"""
from __future__ import annotations

import asyncio
import json
import logging
import struct
import time
import zlib
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pvio.domains.lguest_aio import GuestThread
from pvio.domains.spec import DomainSpec, parse_size, pid_alive
from pvio.lguest.dma import (
    PAGE_SIZE,
    LguestError,
)
from pvio.lguest.net import (
    ETH_DATA_LEN,
    check_mtu,
)

#: The rule breaks an lguest guest can commit on purpose (its config's ``misbehave``), to
#: see the hypervisor refuse each and the Launcher fail the device while others carry on.
MISBEHAVIOURS = ("block-bad-dma", "block-bad-key", "console-past-memory", "runt-frames",
                 "oversized-frames", "flood", "lan-bad-dma")

log = logging.getLogger("pvio.domains.lguest")

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
    misbehave: list[str] = field(default_factory=list)

    @classmethod
    def from_spec(cls, spec: DomainSpec) -> LguestSettings:
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
            misbehave=[str(m) for m in cfg.get("misbehave", [])],
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


# -- the worker thread ---------------------------------------------------------------------


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
