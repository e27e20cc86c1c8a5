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
are written back.  A frame arriving while the transmit ring is full is held and the
TAP is not read until answers free slots (`_TxFeeder`), as Linux's netfront stops its
queue.  A vif the toolstack adds while the guest runs (`pvio network-attach`) is
attached the same way, by `attach_guest_vif`, when `VifWatcher` sees it appear.

Offloads cross both TAPs: each is opened with IFF_VNET_HDR, and once the frontend's
features are known TUNSETOFFLOAD lets the kernel hand it partial checksums and (when
both ends take GSO) TCP segments of up to GSO_MAX_SIZE bytes.  A segment travels as one
netif frame with its GSO extra-info -- one request per 64 KiB, not per 1514 bytes --
and `pvio.net.offload` turns netif's flags into the virtio_net_hdr and back.

Multi-queue (`pvio.net.multiqueue`): the driver domain's TAP is always opened with
IFF_MULTI_QUEUE and gets one fd per netback queue when the frontend connects
(`open_queue`); the guest's TAP is multi-queue when its vif got several queues (the
vif spec's ``queues=N``, pvio's own key).  On both sides the kernel's tun driver spreads
the flows it sends over the fds, and the frames read from fd i take queue i's ring;
frames a ring carries are written through its own fd.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import functools
import logging
import os
import subprocess
from collections.abc import Callable, Mapping, Sequence

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
    open_queue,
)
from pvio.hypervisor.client import Domain
from pvio.net.backend import NetbackQueue
from pvio.net.frontend import BackendFeatures, NetFront, RxMeta
from pvio.net.offload import VNET_HDR_SIZE, parse_vnet_header, vnet_parts
from pvio.net.slots import FrameParts, TxFrame
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

    def write_parts(self, parts: Sequence[bytes | bytearray | memoryview]) -> bool:
        try:
            os.writev(self.fd, parts)
        except BlockingIOError:
            return False
        return True


def vnet_tap(tap: TapInterface) -> VnetTap:
    return VnetTap(tap.netns, tap.ifname, tap.fd, tap.mac, tap.address, tap.nocsum, tap.multi_queue)


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
    """A vif's end in the driver domain: TAP vif<domid>.<devid> on the vif's bridge, one
    TAP queue (fd) per netback queue."""

    def __init__(self, config: VifConfig, tap: TapInterface) -> None:
        self.config = config
        self.tap = tap  # the first queue's fd: the interface lives as long as it does
        self.queues: list[NetbackQueue] = []
        self.dropped = 0
        #: one per TAP queue, the first on `tap`; frames read from links[i] go to queues[i]
        self.links = [TapLink(tap, self._reader(0))]

    @property
    def link(self) -> TapLink:
        return self.links[0]

    def _reader(self, index: int) -> Callable[[Frame], None]:
        def from_tap(raw: Frame) -> None:
            self._from_tap(raw, index)

        return from_tap

    def _from_tap(self, raw: Frame, index: int) -> None:
        queues = self.queues
        queue = queues[index] if index < len(queues) else None
        try:
            gso, csum_blank = parse_vnet_header(raw)
        except ValueError:
            gso, csum_blank, queue = None, False, None
        if queue is None or not queue.transmit(memoryview(raw)[VNET_HDR_SIZE:], gso, csum_blank):
            self.dropped += 1

    def deliver(self, data: FrameParts, frame: TxFrame, queue: int) -> None:
        parts = vnet_parts(data, frame.gso, frame.csum_blank, bool(frame.flags & n.NETTXF_data_validated))
        if parts is None:  # a blank checksum nobody can finish (xen-netback drops it too)
            self.dropped += 1
            return
        # Written through the fd of the queue that carried it: tun's flow steering then
        # sends the flow's replies out of that fd, into the same queue's receive ring.
        links = self.links
        (links[queue] if queue < len(links) else links[0]).send_parts(parts)

    def attach(self, queues: Sequence[NetbackQueue]) -> None:
        self.queues = list(queues)
        self._tap_queues(max(1, len(queues)))
        if queues:
            f = queues[0].features
            set_offload(self.tap, tso4=f.sg and f.gso_tcpv4, tso6=f.sg and f.gso_tcpv6)

    def _tap_queues(self, count: int) -> None:
        """As many TAP queues as netback queues: more fds opened, or the extra closed (a
        queue nobody reads would swallow the flows the kernel steers to it)."""
        while len(self.links) > count:
            link = self.links.pop()
            link.stop()
            link.tap.close_device()
        while len(self.links) < count:
            link = TapLink(open_queue(self.tap), self._reader(len(self.links)))
            link.start(asyncio.get_running_loop())
            self.links.append(link)

    async def close(self) -> None:
        for link in self.links[1:]:
            link.stop()
            link.tap.close_device()
        self.links[0].stop()
        self.tap.close()


async def open_vif_host(config: VifConfig) -> TapVifHost:
    """The built-in hotplug: the TAP, the bridge (created if missing), the attach."""
    def work() -> TapInterface:
        bridge = config.bridge or "xenbr0"
        ensure_bridge(bridge)
        name = config.host_ifname  # xl's vifname, as Xen's vif-bridge renames to it
        tap = vnet_tap(create_host_tap(name, address="", mac=BACKEND_MAC, mtu=config.mtu,
                                       nocsum=True, multi_queue=True))
        try:
            _ip("link", "set", "dev", name, "master", bridge)
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
    #: with multi-queue, the links of the TAP's other queues (queue i is more[i - 1])
    more: list[TapLink] = dataclasses.field(default_factory=list)
    #: the bridge and the name of the vif's end in the driver domain, as the toolstack
    #: wrote them in the backend directory (for `pvio list`)
    bridge: str = ""
    backend_ifname: str = ""

    @property
    def links(self) -> list[TapLink]:
        return [self.link, *self.more]

    def status(self) -> dict[str, object]:
        return {
            "devid": self.vif.devid,
            "mac": self.vif.mac.hex(":"),
            "mtu": self.vif.mtu,
            "address": self.address,
            "netns": self.tap.netns,
            "ifname": self.tap.ifname,
            "bridge": self.bridge,
            "backend_ifname": self.backend_ifname,
            "queues": len(self.vif.fronts),
            "queue_frames": [[f.stats.tx_frames, f.stats.rx_frames] for f in self.vif.fronts],
            "dropped": self.dropped,
            "statistics": _total_front_stats(self.vif),
        }


def _total_front_stats(vif: GuestVif) -> dict[str, int]:
    total: dict[str, int] = {}
    for front in vif.fronts:
        for k, v in dataclasses.asdict(front.stats).items():
            total[k] = total.get(k, 0) + v
    return total


# T:1032 A full transmit ring holds the TAP, it does not drop
# The kernel picked the queue (the TAP fd a frame was read from); the frame goes onto that
# queue's transmit ring.  When the ring has no room, the frame is held and the TAP is
# no longer read: the kernel keeps the next frames in the TAP's queue, and TCP's own
# limits on what a socket may have queued slow the sender, as Linux's netfront stops
# its transmit queue when the ring is nearly full.  Dropping instead loses whole 64 KiB
# segments, and every loss halves a TCP sender's window.  The answers that free slots
# call the feeder back (`tx_room_waiters`), which sends the held frame and reads the TAP again.
# :T
class _TxFeeder:
    """Frames read from one TAP queue, onto its netfront's transmit ring."""

    def __init__(self, net: GuestNet, index: int, link: TapLink) -> None:
        self.net = net
        self.index = index
        self.link = link
        self.held: Frame | None = None
        link.on_frame = self.from_tap

    def _front(self) -> NetFront:
        fronts = self.net.vif.fronts
        return fronts[self.index] if self.index < len(fronts) else fronts[0]

    def _offer(self, raw: Frame) -> bool:
        """True if the frame is on the ring or dropped; False if it waits for room."""
        try:
            gso, csum_blank = parse_vnet_header(raw)
            front = self._front()
            if front.send(memoryview(raw)[VNET_HDR_SIZE:], gso, csum_blank):
                return True
            if front.broken is None:
                return False
        except Exception:  # a broken device, a frame netif cannot carry: dropped
            pass
        self.net.dropped += 1
        return True

    def from_tap(self, raw: Frame) -> None:
        if not self._offer(raw):
            self.held = raw
            self.link.pause()
            self._front().tx_room_waiters.append(self.room)

    def room(self) -> None:
        if self.held is None:
            return
        if self._offer(self.held):
            self.held = None
            self.link.resume()
        else:
            self._front().tx_room_waiters.append(self.room)


async def attach_guest_vifs(dom: Domain, xs: AsyncClient, name: str,
                            queues: Mapping[int, int] | None = None,
                            failed: dict[int, str] | None = None) -> list[GuestNet]:
    """netfront for every device/vif of this guest (`attach_guest_vif`).  `queues` says
    how many queues a vif asks for, by devid (default 1).  A vif that cannot connect is
    left out, with why in `failed`."""
    try:
        devids = sorted(int(d) for d in await xs.directory(f"/local/domain/{dom.domid}/device/vif"))
    except Exception:
        return []
    out: list[GuestNet] = []
    for devid in devids:
        try:
            await attach_guest_vif(dom, xs, name, devid, out, (queues or {}).get(devid, 1))
        except Exception as e:
            log.warning("netfront: vif %d not attached: %s", devid, e)
            if failed is not None:
                failed[devid] = str(e)
    return out


async def attach_guest_vif(dom: Domain, xs: AsyncClient, name: str, devid: int, nets: list[GuestNet],
                           queues: int = 1) -> GuestNet:
    """netfront for device/vif/<devid>, ending in a TAP eth<devid> in pvio-<name> (the
    guest's first vif makes the namespace, the others join the one `nets` have); added to
    `nets`.  A vif that got several queues has a multi-queue TAP, one fd per queue."""
    holder: list[GuestNet] = []

    def to_tap(data: FrameParts, meta: RxMeta) -> None:
        if not holder:
            return
        net = holder[0]
        parts = vnet_parts(data, meta.gso, meta.csum_blank, bool(meta.flags & n.NETRXF_data_validated))
        if parts is None:
            net.dropped += 1
        else:  # into the TAP queue of the ring it came on
            (net.more[meta.queue - 1] if 0 < meta.queue <= len(net.more) else net.link).send_parts(parts)

    vif = await attach_vif(dom, xs, devid, to_tap, queues=queues)
    links: list[TapLink] = []
    tap: TapInterface | None = None
    try:
        backend = (await xs.read(f"/local/domain/{dom.domid}/device/vif/{devid}/backend")).decode()
        address = (await xs.read_or(f"{backend}/ip", b"") or b"").decode()
        bridge = (await xs.read_or(f"{backend}/bridge", b"") or b"").decode()
        host_ifname = (await xs.read_or(f"{backend}/vifname", b"") or b"").decode() or f"vif{dom.domid}.{devid}"
        mq = len(vif.fronts) > 1
        make = functools.partial(add_tap, nets[0].tap.netns) if nets else functools.partial(create_tap, name)
        tap = vnet_tap(await asyncio.to_thread(make, address=address, mac=vif.mac, ifname=f"eth{devid}",
                                               mtu=vif.mtu, nocsum=True, multi_queue=mq))
        features: BackendFeatures = vif.front.features
        await asyncio.to_thread(set_offload, tap, tso4=features.sg and features.gso_tcpv4,
                                tso6=features.sg and features.gso_tcpv6)
        links.append(TapLink(tap, lambda f: None))
        for _ in vif.fronts[1:]:
            links.append(TapLink(await asyncio.to_thread(open_queue, tap), lambda f: None))
    except BaseException:
        for link in links[1:]:
            link.tap.close_device()
        if tap is not None:
            await asyncio.to_thread(tap.close if not nets else tap.close_device)
        with contextlib.suppress(Exception):
            await detach_vif(vif)
        raise
    net = GuestNet(vif, tap, links[0], address, owns_netns=not nets, more=links[1:], bridge=bridge,
                   backend_ifname=host_ifname)
    for i, link in enumerate(net.links):
        _TxFeeder(net, i, link)
        link.start(asyncio.get_running_loop())
    holder.append(net)
    nets.append(net)
    log.info("netfront: vif %d up in %s as %s (%s), %d queue(s)", devid, tap.netns, tap.ifname, address,
             len(vif.fronts))
    return net


async def detach_guest_vifs(nets: list[GuestNet]) -> None:
    for net in reversed(nets):  # the namespace's owner last
        for link in net.links:
            link.stop()
        with contextlib.suppress(Exception):
            await detach_vif(net.vif)
        for link in net.more:
            link.tap.close_device()
        if net.owns_netns:
            net.tap.close()
        else:
            net.tap.close_device()


__all__ = [
    "BACKEND_MAC",
    "GuestNet",
    "TapVifHost",
    "attach_guest_vif",
    "attach_guest_vifs",
    "detach_guest_vifs",
    "ensure_bridge",
    "open_vif_host",
]
