"""A guest's devices at run time: vbds and vifs the toolstack adds or removes.

Theory of operation
-------------------
`xl block-attach` writes a vbd's frontend and backend directories into XenStore while
the guest runs; the guest's xenbus sees a new directory under its ``device/vbd`` and
probes a blkfront for it.  `VbdWatcher` is that for a pvio guest: it watches
``/local/domain/<domid>/device/vbd``, and for every device directory it does not serve
yet it runs a blkfront through the handshake (`pvio.domains.xen_guest.attach_disk`)
and exports it over NBD on ``<state_dir>/<name>-<vdev>.sock`` (export name = vdev
name, read from the backend's `dev` key).  The status file lists it from then on.

A disk is in use while its NBD export has clients: a toolstack removal (`online` = 0,
Closing) is then refused by the frontend (`BlkfrontDevice.in_use`).  Otherwise the
frontend closes with the backend; when the device's directory is gone, the watcher
stops the export and forgets the disk.  A backend that grew the disk (online resize)
makes the export advertise the new size to every new NBD connection (NBD has no way to
tell a connected client).

A vif comes as a vbd does (`VifWatcher`, after `xl network-attach` or `pvio
network-attach`): a new directory under ``device/vif`` in state Initialising gets a
netfront through the handshake and a TAP ``eth<devid>`` in ``pvio-<name>`` (the
namespace made now if the guest had no vif; `pvio.domains.xen_net.attach_guest_vif`); one
that fails is recorded with why, and not tried again.  A vif goes as Linux's netfront
goes: the toolstack's removal closes
both ends (the backend Closing with `online` = 0, netfront Closed), and once the
toolstack has removed the device's directory the netfront stops and its TAP in
``pvio-<name>`` is removed -- with the namespace when it was the guest's last vif
(another vif inherits the namespace otherwise).  The status file stops listing it.

Deliberately not here: writing XenStore for the toolstack (`pvio block-attach` and
`pvio unplug` do).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os

from pvio.abi.xenbus import XenbusState as S
from pvio.domains.xen_guest import GuestDisk, attach_disk, export_disk
from pvio.domains.xen_net import GuestNet, attach_guest_vif
from pvio.hypervisor.client import Domain
from pvio.nbd.server_asyncio import NbdServer
from pvio.xenstore.client import AsyncClient, WatchStream
from pvio.xenstore.errors import XsError

log = logging.getLogger(__name__)


def serve_resizes(disk: GuestDisk) -> None:
    """Whoever connects to the export after an online resize is told the new size."""

    def refresh() -> None:
        server = disk.server
        if server is not None and disk.vdev in server.exports:
            server.exports[disk.vdev] = dataclasses.replace(server.exports[disk.vdev], info=disk.front.info)

    disk.driver.on_resize = refresh
    disk.driver.in_use = lambda: disk.server.connections if disk.server is not None else 0


class _DeviceWatcher:
    """Watch the guest's device/<kind> and `scan` it on every change."""

    def __init__(self, dom: Domain, xs: AsyncClient, kind: str, name: str) -> None:
        self.dom = dom
        self.xs = xs
        self.name = name
        self.root = f"/local/domain/{dom.domid}/device/{kind}"
        self._task: asyncio.Task[None] | None = None

    async def scan(self) -> None:
        raise NotImplementedError

    async def present(self) -> set[int]:
        """The devids under device/<kind>; none when the directory itself is gone.  Any
        other failure (xenstored restarting) raises: no device is forgotten for it."""
        try:
            return {int(d) for d in await self.xs.directory(self.root) if d.isdigit()}
        except XsError as e:
            if e.errno != "ENOENT":
                raise
            return set()

    async def new_device(self, devid: int) -> str | None:
        """The backend path of device `devid` if it is new and written completely (the
        frontend Initialising, its backend named); None until then."""
        node = f"{self.root}/{devid}"
        state = await self.xs.read_or(f"{node}/state", None)
        backend = await self.xs.read_or(f"{node}/backend", None)
        if state != str(int(S.Initialising)).encode() or backend is None:
            return None  # not written completely yet, or not a new device: the next event
        return backend.decode()

    async def start(self) -> None:
        stream = await self.xs.watch(self.root)
        self._task = asyncio.get_running_loop().create_task(self._run(stream))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self, stream: WatchStream) -> None:
        try:
            async for _ in stream:
                stream.drain()
                try:
                    await self.scan()
                except Exception:
                    log.exception("guest %s: scanning %s", self.name, self.root)
        finally:
            with contextlib.suppress(Exception):
                await stream.close()


class VbdWatcher(_DeviceWatcher):
    """Attach and export the vbds that appear under the guest's device/vbd (module notes)."""

    def __init__(
        self, dom: Domain, xs: AsyncClient, disks: list[GuestDisk], *, state_dir: str, name: str,
        **attach_kw: object,
    ) -> None:
        super().__init__(dom, xs, "vbd", name)
        self.disks = disks  # shared with the status file's writer
        self.state_dir = state_dir
        self.attach_kw = attach_kw
        self.failed: set[int] = set()

    async def start(self) -> None:
        for d in self.disks:
            serve_resizes(d)
        await super().start()

    async def scan(self) -> None:
        present = await self.present()
        for disk in [d for d in self.disks if d.devid not in present]:
            await self._forget(disk)  # the toolstack removed the directories
        served = {d.devid for d in self.disks}
        for devid in sorted(present - served - self.failed):
            await self._attach(devid)

    async def _attach(self, devid: int) -> None:
        backend = await self.new_device(devid)
        if backend is None:
            return
        vdev = (await self.xs.read_or(f"{backend}/dev", b"") or b"").decode() or f"d{devid}"
        try:
            disk = await attach_disk(self.dom, self.xs, vdev, devid, **self.attach_kw)  # type: ignore[arg-type]
            sock = os.path.join(self.state_dir, f"{self.name}-{vdev}.sock")
            await export_disk(disk, sock)
        except Exception as e:
            log.warning("guest %s: attaching vbd %d: %s", self.name, devid, e)
            self.failed.add(devid)
            return
        serve_resizes(disk)
        self.disks.append(disk)
        log.info("guest %s: %s attached, exported at %s", self.name, vdev, disk.nbd_uri)

    async def _forget(self, disk: GuestDisk) -> None:
        self.disks.remove(disk)
        server: NbdServer | None = disk.server
        if server is not None:
            with contextlib.suppress(Exception):
                await server.close()
            disk.server = None
        with contextlib.suppress(Exception):
            await disk.end.stop()
        with contextlib.suppress(Exception):
            await disk.front.close(force=True)
        log.info("guest %s: %s removed", self.name, disk.vdev)


class VifWatcher(_DeviceWatcher):
    """Attach the vifs that appear under device/vif, forget those whose directory the
    toolstack removed (module notes)."""

    def __init__(self, dom: Domain, xs: AsyncClient, nets: list[GuestNet], *, name: str,
                 failures: dict[int, str] | None = None) -> None:
        super().__init__(dom, xs, "vif", name)
        self.nets = nets  # shared with the status file's writer
        self.failures = failures if failures is not None else {}  # vifs never attached, and why

    async def scan(self) -> None:
        present = await self.present()
        for devid in set(self.failures) - present:
            del self.failures[devid]
        for net in [n for n in self.nets if n.vif.devid not in present]:
            await forget_vif(self.nets, net)
            log.info("guest %s: vif %d removed (%s)", self.name, net.vif.devid, net.tap.ifname)
        served = {n.vif.devid for n in self.nets}
        for devid in sorted(present - served - set(self.failures)):
            await self._attach(devid)

    async def _attach(self, devid: int) -> None:
        if await self.new_device(devid) is None:
            return
        try:
            net = await attach_guest_vif(self.dom, self.xs, self.name, devid, self.nets)
        except Exception as e:
            log.warning("guest %s: attaching vif %d: %s", self.name, devid, e)
            self.failures[devid] = str(e)
            return
        log.info("guest %s: vif %d attached as %s in %s", self.name, devid, net.tap.ifname, net.tap.netns)


async def forget_vif(nets: list[GuestNet], net: GuestNet) -> None:
    """netfront_remove: the vif's netfront stops and its TAP goes; the namespace goes
    with the guest's last vif, or passes to one that stays."""
    nets.remove(net)
    net.link.stop()
    with contextlib.suppress(Exception):
        await net.vif.end.stop()
    with contextlib.suppress(Exception):
        await net.vif.front.close()
    if net.owns_netns and not nets:
        await asyncio.to_thread(net.tap.close)
        return
    net.tap.close_device()
    if net.owns_netns:
        nets[0].owns_netns = True
