"""The Xen network device's two ends in the real world: a vif's TAP on a host bridge in
the driver domain, and a TAP in the guest's namespace.

Theory of operation
-------------------
Driver domain: a `pvio.net.xenbus_backend.NetbackService` whose host end for each vif
is `TapVifHost`: a TAP named as Xen names it, ``vif<domid>.<devid>``,
in the driver domain's network namespace (the host's), with Xen's backend MAC
fe:ff:ff:ff:ff:ff (so the bridge never takes the guest's address for itself) and the
vif's MTU, attached to the vif's `bridge` -- created if missing, as Xen's vif-bridge
script expects it to exist.  That is the built-in attach, for a vif with no `script`;
one that names a script has it run as Xen runs it (`pvio.domains.xen_vif_script`).
Frames the guest transmits are written into the TAP; frames the TAP gives are queued
for the guest (`NetbackQueue.transmit`).

Guest (`attach_guest_vifs`): for each ``device/vif/<devid>`` of the guest, netfront runs
through the handshake (`pvio.net.xenbus_frontend.attach_vif`; a vif whose backend
refuses it -- its hotplug script failed -- is recorded and the others carry on; one the
toolstack removes later goes with `pvio.domains.xen_hotplug.VifWatcher`), and its end is a TAP
``eth<devid>`` in the guest's namespace ``pvio-<name>`` (`pvio.domains.tap.create_tap`)
with the vif's MAC, MTU and the address the toolstack wrote as the backend's `ip`.
Frames the namespace's stack sends are netfront's transmits; frames netfront receives
are written back.  A frame arriving while the transmit ring is full is dropped and
counted (a real NIC's queue overflowing), never waited for on the TAP's reader.

Offloads cross both TAPs: each is opened with IFF_VNET_HDR, and once the frontend's
features are known TUNSETOFFLOAD lets the kernel hand it partial checksums and (when
both ends take GSO) TCP segments of up to GSO_MAX_SIZE bytes.  A segment travels as one
netif frame with its GSO extra-info -- one request per 64 KiB, not per 1514 bytes --
and `pvio.net.offload` turns netif's flags into the virtio_net_hdr and back.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import logging
import os
import subprocess

from pvio.abi import linux_if as lif
from pvio.abi import netif as n
from pvio.domains.tap import (
    Frame,
    TapError,
    TapInterface,
    TapLink,
    add_tap,
    create_host_tap,
    create_tap,
)
from pvio.hypervisor.client import Domain
from pvio.net.backend import NetbackQueue
from pvio.net.frontend import BackendFeatures, RxMeta
from pvio.net.offload import VNET_HDR_SIZE, parse_vnet_header, vnet_header
from pvio.net.slots import TxFrame
from pvio.net.xenbus_backend import VifConfig
from pvio.net.xenbus_frontend import GuestVif, attach_vif, detach_vif
from pvio.xenstore.client import AsyncClient

log = logging.getLogger(__name__)

#: The MAC Xen's hotplug scripts give a vif's end in the driver domain
BACKEND_MAC = bytes.fromhex("feffffffffff")
#: The largest GSO frame the TAPs are given, so that a frame and its Ethernet header fit
#: a netif frame's 16-bit length (Linux's netfront: XEN_NETIF_MAX_TX_SIZE - MAX_TCP_HEADER)
GSO_MAX_SIZE = 62000


class VnetTap(TapInterface):
    """A TAP whose frames are read and written whole, virtio_net_hdr first: the header
    carries the checksum and GSO state netif's flags and extra-info carry on the rings."""

    def read_frame(self) -> Frame | None:
        try:
            return os.read(self.fd, 65536 + VNET_HDR_SIZE + 64)
        except BlockingIOError:
            return None

    def write_frame(self, frame: Frame) -> bool:
        try:
            os.write(self.fd, frame)
        except BlockingIOError:
            return False
        return True


def vnet_tap(tap: TapInterface) -> VnetTap:
    return VnetTap(tap.netns, tap.ifname, tap.fd, tap.mac, tap.address, tap.nocsum)


def set_offload(tap: TapInterface, *, tso4: bool, tso6: bool) -> None:
    """What the kernel may hand this TAP: partial checksums always, TCP segments of up to
    GSO_MAX_SIZE when the other end takes GSO."""
    flags = lif.TUN_F_CSUM | (lif.TUN_F_TSO4 if tso4 else 0) | (lif.TUN_F_TSO6 if tso6 else 0)
    fcntl.ioctl(tap.fd, lif.TUNSETOFFLOAD, flags)
    where = ["-n", tap.netns] if tap.netns else []
    _ip(*where, "link", "set", "dev", tap.ifname, "gso_max_size", str(GSO_MAX_SIZE), check=False)


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

    def _from_tap(self, raw: Frame) -> None:
        queue = self.queue
        try:
            gso, csum_blank = parse_vnet_header(raw)
        except ValueError:
            gso, csum_blank, queue = None, False, None
        if queue is None or not queue.transmit(bytes(raw[VNET_HDR_SIZE:]), gso, csum_blank):
            self.dropped += 1

    def deliver(self, data: bytes, frame: TxFrame) -> None:
        hdr = vnet_header(data, frame.gso, frame.csum_blank, bool(frame.flags & n.NETTXF_data_validated))
        if hdr is None:  # a blank checksum nobody can finish (xen-netback drops it too)
            self.dropped += 1
            return
        self.link.send(hdr + data)

    def attach(self, queue: NetbackQueue | None) -> None:
        self.queue = queue
        if queue is not None:
            f = queue.features
            set_offload(self.tap, tso4=f.sg and f.gso_tcpv4, tso6=f.sg and f.gso_tcpv6)

    async def close(self) -> None:
        self.link.stop()
        self.tap.close()


async def open_vif_host(config: VifConfig) -> TapVifHost:
    """The built-in hotplug: the TAP, the bridge (created if missing), the attach."""
    def work() -> TapInterface:
        bridge = config.bridge or "xenbr0"
        ensure_bridge(bridge)
        tap = vnet_tap(create_host_tap(config.ifname, address="", mac=BACKEND_MAC, mtu=config.mtu,
                                       nocsum=True))
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


@dataclasses.dataclass
class GuestNet:
    """One vif in the guest: netfront and its TAP in the guest's namespace."""

    vif: GuestVif
    tap: TapInterface
    link: TapLink
    address: str
    dropped: int = 0
    owns_netns: bool = True  # the guest's first TAP made pvio-<name>; the others are added

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


async def attach_guest_vifs(dom: Domain, xs: AsyncClient, name: str,
                            failed: dict[int, str] | None = None) -> list[GuestNet]:
    """netfront for every device/vif of this guest, each ending in a TAP eth<devid> in
    pvio-<name> (the first makes the namespace, the others are added to it); a vif that
    cannot connect is left out, with why in `failed`."""
    try:
        devids = sorted(int(d) for d in await xs.directory(f"/local/domain/{dom.domid}/device/vif"))
    except Exception:
        return []
    out: list[GuestNet] = []
    for devid in devids:
        holder: list[GuestNet] = []

        def to_tap(data: bytes, meta: RxMeta, holder: list[GuestNet] = holder) -> None:
            if not holder:
                return
            hdr = vnet_header(data, meta.gso, meta.csum_blank, bool(meta.flags & n.NETRXF_data_validated))
            if hdr is None:
                holder[0].dropped += 1
            else:
                holder[0].link.send(hdr + data)

        try:
            vif = await attach_vif(dom, xs, devid, to_tap)
        except Exception as e:
            log.warning("netfront: vif %d not attached: %s", devid, e)
            if failed is not None:
                failed[devid] = str(e)
            continue
        backend = (await xs.read(f"/local/domain/{dom.domid}/device/vif/{devid}/backend")).decode()
        address = (await xs.read_or(f"{backend}/ip", b"") or b"").decode()
        if out:
            tap = vnet_tap(await asyncio.to_thread(add_tap, out[0].tap.netns, address=address, mac=vif.mac,
                                                   ifname=f"eth{devid}", mtu=vif.mtu, nocsum=True))
        else:
            tap = vnet_tap(await asyncio.to_thread(create_tap, name, address=address, mac=vif.mac,
                                                   ifname=f"eth{devid}", mtu=vif.mtu, nocsum=True))
        features: BackendFeatures = vif.front.features
        await asyncio.to_thread(set_offload, tap, tso4=features.sg and features.gso_tcpv4,
                                tso6=features.sg and features.gso_tcpv6)
        net = GuestNet(vif, tap, TapLink(tap, lambda f: None), address, owns_netns=not out)

        def from_tap(raw: Frame, net: GuestNet = net) -> None:
            try:
                gso, csum_blank = parse_vnet_header(raw)
                if not net.vif.front.send(raw[VNET_HDR_SIZE:], gso, csum_blank):
                    net.dropped += 1
            except Exception:  # a broken device, a frame netif cannot carry: dropped
                net.dropped += 1

        net.link.on_frame = from_tap
        net.link.start(asyncio.get_running_loop())
        holder.append(net)
        out.append(net)
        log.info("netfront: vif %d up in %s as %s (%s)", devid, tap.netns, tap.ifname, address)
    return out


async def detach_guest_vifs(nets: list[GuestNet]) -> None:
    for net in reversed(nets):  # the namespace's owner last
        net.link.stop()
        with contextlib.suppress(Exception):
            await detach_vif(net.vif)
        if net.owns_netns:
            net.tap.close()
        else:
            net.tap.close_device()


__all__ = [
    "BACKEND_MAC",
    "GuestNet",
    "TapVifHost",
    "attach_guest_vifs",
    "detach_guest_vifs",
    "ensure_bridge",
    "open_vif_host",
]
