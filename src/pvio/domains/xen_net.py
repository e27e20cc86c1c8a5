"""The Xen network device's two ends in the real world: a vif's TAP on a host bridge in
the driver domain, and a TAP in the guest's namespace.

Theory of operation
-------------------
Driver domain (`start_netback`): a `pvio.net.xenbus_backend.NetbackService` whose host
end for each vif is `TapVifHost`: a TAP named as Xen names it, ``vif<domid>.<devid>``,
in the driver domain's network namespace (the host's), with Xen's backend MAC
fe:ff:ff:ff:ff:ff (so the bridge never takes the guest's address for itself) and the
vif's MTU, attached to the vif's `bridge` -- created if missing, as Xen's vif-bridge
script expects it to exist (here the built-in attach stands in for that script; the
`script` key is kept but not run).  Frames the guest transmits are written into the
TAP; frames the TAP gives are queued for the guest (`NetbackQueue.transmit`).

Guest (`attach_guest_vifs`): for each ``device/vif/<devid>`` of the guest, netfront runs
through the handshake (`pvio.net.xenbus_frontend.attach_vif`), and its end is a TAP
``eth<devid>`` in the guest's namespace ``pvio-<name>`` (`pvio.domains.tap.create_tap`)
with the vif's MAC, MTU and the address the toolstack wrote as the backend's `ip`.
Frames the namespace's stack sends are netfront's transmits; frames netfront receives
are written back.  A frame arriving while the transmit ring is full is dropped and
counted (a real NIC's queue overflowing), never waited for on the TAP's reader.

What this does not do yet: vnet headers on the TAPs (so no GSO or checksum offload
crosses the TAP: frames are MTU-sized with checksums done), rate limiting, running Xen's
own vif-bridge script.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import subprocess

from pvio.domains.tap import Frame, TapError, TapInterface, TapLink, create_host_tap, create_tap
from pvio.hypervisor.client import Domain
from pvio.net.backend import NetbackQueue
from pvio.net.frontend import RxMeta
from pvio.net.slots import TxFrame
from pvio.net.xenbus_backend import NetbackService, VifConfig
from pvio.net.xenbus_frontend import GuestVif, attach_vif, detach_vif
from pvio.xenstore.client import AsyncClient

log = logging.getLogger(__name__)

#: The MAC Xen's hotplug scripts give a vif's end in the driver domain
BACKEND_MAC = bytes.fromhex("feffffffffff")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise TapError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def ensure_bridge(name: str) -> bool:
    """Bridge `name` exists and is up afterwards; True if it was created now."""
    created = False
    if not os.path.exists(f"/sys/class/net/{name}"):
        _ip("link", "add", "name", name, "type", "bridge")
        created = True
    elif not os.path.exists(f"/sys/class/net/{name}/bridge"):
        raise TapError(f"{name} exists and is not a bridge")
    _ip("link", "set", "dev", name, "up")
    return created


class TapVifHost:
    """A vif's end in the driver domain: TAP vif<domid>.<devid> on the vif's bridge."""

    def __init__(self, config: VifConfig, tap: TapInterface) -> None:
        self.config = config
        self.tap = tap
        self.queue: NetbackQueue | None = None
        self.dropped = 0
        self.link = TapLink(tap, self._from_tap)

    def _from_tap(self, frame: Frame) -> None:
        queue = self.queue
        if queue is None or not queue.transmit(bytes(frame)):
            self.dropped += 1

    def deliver(self, data: bytes, frame: TxFrame) -> None:
        self.link.send(data)

    def attach(self, queue: NetbackQueue | None) -> None:
        self.queue = queue

    async def close(self) -> None:
        self.link.stop()
        self.tap.close()


async def open_vif_host(config: VifConfig) -> TapVifHost:
    """The built-in hotplug: the TAP, the bridge (created if missing), the attach."""
    def work() -> TapInterface:
        bridge = config.bridge or "xenbr0"
        ensure_bridge(bridge)
        tap = create_host_tap(config.ifname, address="", mac=BACKEND_MAC, mtu=config.mtu)
        try:
            _ip("link", "set", "dev", config.ifname, "master", bridge)
        except BaseException:
            tap.close()
            raise
        return tap

    tap = await asyncio.to_thread(work)
    host = TapVifHost(config, tap)
    host.link.start(asyncio.get_running_loop())
    return host


async def start_netback(dom: Domain, xs: AsyncClient) -> NetbackService:
    service = NetbackService(dom, xs, open_vif_host)
    await service.start()
    return service


@dataclasses.dataclass
class GuestNet:
    """One vif in the guest: netfront and its TAP in the guest's namespace."""

    vif: GuestVif
    tap: TapInterface
    link: TapLink
    address: str
    dropped: int = 0

    def status(self) -> dict[str, object]:
        return {
            "devid": self.vif.devid,
            "mac": self.vif.mac.hex(":"),
            "mtu": self.vif.mtu,
            "address": self.address,
            "netns": self.tap.netns,
            "ifname": self.tap.ifname,
            "dropped": self.dropped,
            "statistics": dataclasses.asdict(self.vif.front.stats),
        }


async def attach_guest_vifs(dom: Domain, xs: AsyncClient, name: str) -> list[GuestNet]:
    """netfront for every device/vif of this guest, each ending in a TAP in pvio-<name>.

    Only the first vif gets the namespace (``create_tap`` makes it); a guest has one
    vif here (more need TAPs added to the same namespace: not done yet)."""
    try:
        devids = sorted(int(d) for d in await xs.directory(f"/local/domain/{dom.domid}/device/vif"))
    except Exception:
        return []
    out: list[GuestNet] = []
    for devid in devids[:1]:
        holder: list[GuestNet] = []

        def to_tap(data: bytes, meta: RxMeta, holder: list[GuestNet] = holder) -> None:
            if holder:
                holder[0].link.send(data)

        vif = await attach_vif(dom, xs, devid, to_tap)
        backend = (await xs.read(f"/local/domain/{dom.domid}/device/vif/{devid}/backend")).decode()
        address = (await xs.read_or(f"{backend}/ip", b"") or b"").decode()
        tap = await asyncio.to_thread(create_tap, name, address=address, mac=vif.mac,
                                      ifname=f"eth{devid}", mtu=vif.mtu)
        net = GuestNet(vif, tap, TapLink(tap, lambda f: None), address)

        def from_tap(frame: Frame, net: GuestNet = net) -> None:
            try:
                if not net.vif.front.send(frame):
                    net.dropped += 1
            except Exception:  # a broken device: frames go nowhere
                net.dropped += 1

        net.link.on_frame = from_tap
        net.link.start(asyncio.get_running_loop())
        holder.append(net)
        out.append(net)
        log.info("netfront: vif %d up in %s as %s (%s)", devid, tap.netns, tap.ifname, address)
    return out


async def detach_guest_vifs(nets: list[GuestNet]) -> None:
    for net in nets:
        net.link.stop()
        with contextlib.suppress(Exception):
            await detach_vif(net.vif)
        net.tap.close()


__all__ = [
    "BACKEND_MAC",
    "GuestNet",
    "TapVifHost",
    "attach_guest_vifs",
    "detach_guest_vifs",
    "ensure_bridge",
    "open_vif_host",
    "start_netback",
]
