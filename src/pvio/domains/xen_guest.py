"""The guest domain process: blkfront for each disk, each exported over NBD (role "guest").

`main(spec)` connects to the hypervisor as `spec.domid`, opens the XenStore connection
the toolstack handed over, and for each `spec.disks` entry reads the frontend directory
(`backend`, `backend-id`), runs a blkfront through the XenBus handshake until Connected,
and serves it with an `NbdServer` on the disk's `nbd_socket`, export name = the vdev
name; every vif gets a netfront and a TAP in ``pvio-<name>`` (`pvio.domains.xen_net`).
The status file then says ``ready`` with each disk's NBD URI, each vif, and the vifs
whose backend refused them (``vif_failures``).  Cancelled
(SIGTERM): the NBD servers drain and close, every vbd goes Closing → Closed with its
backend, the grants end, and the domain leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from dataclasses import dataclass

from pvio.abi.xenbus import XenbusState as S
from pvio.blk.frontend import DEFAULT_INDIRECT_SEGMENTS, BlkFront
from pvio.blk.xenbus_frontend import BlkfrontDevice, BlkfrontEnd
from pvio.domains.role import become_domain, open_xenstore, report_status
from pvio.domains.spec import DiskSpecJSON, DomainSpec
from pvio.domains.xen_console import DEFAULT_SHELL, start_console
from pvio.domains.xen_net import GuestNet, attach_guest_vifs, detach_guest_vifs
from pvio.domains.xen_pages import open_ring_xenstore, uses_ring
from pvio.hypervisor.client import Domain
from pvio.nbd.address import nbd_uri_for_socket, tcp_uri
from pvio.nbd.server_asyncio import NbdServer
from pvio.nbd.tls import server_context
from pvio.xenstore.client import AsyncClient

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 30.0
CLOSE_TIMEOUT = 10.0




@dataclass
class GuestDisk:
    vdev: str
    devid: int
    front: BlkFront
    end: BlkfrontEnd
    driver: BlkfrontDevice
    server: NbdServer | None = None
    nbd_uri: str = ""
    nbd_tcp_uri: str = ""


async def attach_disk(
    dom: Domain, xs: AsyncClient, vdev: str, devid: int, *, ring_order: int = 0, persistent: bool = True,
    queues: int = 1, indirect_segments: int = DEFAULT_INDIRECT_SEGMENTS,
) -> GuestDisk:
    """Run blkfront for /local/domain/<domid>/device/vbd/<devid> until it is Connected."""
    node = f"/local/domain/{dom.domid}/device/vbd/{devid}"
    backend = (await xs.read(f"{node}/backend")).decode()
    backend_id = int((await xs.read(f"{node}/backend-id")).decode())
    front = BlkFront(dom, backend_id, want_indirect_segments=indirect_segments)
    driver = BlkfrontDevice(front, want_ring_order=ring_order, want_persistent=persistent, want_queues=queues)
    end = BlkfrontEnd(xs, node, backend, driver)
    await end.start()
    await asyncio.wait_for(driver.connected.wait(), CONNECT_TIMEOUT)
    return GuestDisk(vdev, devid, front, end, driver)


async def export_disk(disk: GuestDisk, nbd_socket: str, tcp_port: int = 0, tls_creds: str = "") -> None:
    """Serve the disk over NBD on a UNIX socket and, with `tcp_port`, on localhost TCP
    (TLS with `tls_creds`, QEMU's x509 directory; without, plain TCP: the toolstack
    allows that only with --nbd-tcp-insecure)."""
    tls = server_context(tls_creds) if tcp_port and tls_creds else None
    disk.server = NbdServer({disk.vdev: disk.front})
    disk.front.open()
    await disk.server.listen_unix(nbd_socket)
    disk.nbd_uri = nbd_uri_for_socket(nbd_socket, disk.vdev)
    if tcp_port:
        host, port = await disk.server.listen_tcp("127.0.0.1", tcp_port, tls=tls)
        disk.nbd_tcp_uri = tcp_uri(port, disk.vdev, tls_creds, host)


async def detach_disk(disk: GuestDisk) -> None:
    """Orderly close: NBD drained, Closing → Closed with the backend, grants ended."""
    if disk.server is not None:
        await disk.server.close()
        disk.front.release()
        disk.server = None
    with contextlib.suppress(Exception):
        await disk.front.flush()
    with contextlib.suppress(Exception):
        await disk.end.close()
        await disk.end.wait_state(S.Closed, timeout=CLOSE_TIMEOUT)
    await disk.end.stop()
    await disk.front.close(force=True)


async def main(spec: DomainSpec) -> None:
    dom = await become_domain(spec)
    xs: AsyncClient | None = None
    disks: list[GuestDisk] = []
    console = None
    nets: list[GuestNet] = []
    watcher = vif_watcher = None
    try:
        if uses_ring(spec):  # with its console, when the toolstack gave it one
            xs, _, page = await open_ring_xenstore(spec, dom)
            console = start_console(dom, page, spec.extra.get("console_shell", DEFAULT_SHELL))
        else:
            xs = await open_xenstore(spec, dom)
        ring_order = int(spec.extra.get("ring_order", 0))  # Linux blkfront's default
        persistent = bool(spec.extra.get("persistent_grants", True))
        more = {"queues": int(spec.extra.get("queues", 1)),
                "indirect_segments": int(spec.extra.get("indirect_segments", DEFAULT_INDIRECT_SEGMENTS))}
        for d in spec.disks:
            disk = await attach_disk(dom, xs, d.vdev, d.devid, ring_order=ring_order, persistent=persistent, **more)
            disks.append(disk)
            sock = d.nbd_socket or os.path.join(spec.state_dir, f"{spec.name}-{d.vdev}.sock")
            await export_disk(disk, sock, d.nbd_tcp_port, d.nbd_tls_creds)
        vif_queues = {devid: int(v.get("queues", 1)) for devid, v in enumerate(spec.extra.get("vifs", []))}
        vif_failures: dict[int, str] = {}
        nets = await attach_guest_vifs(dom, xs, spec.name, vif_queues,  # device/vif/*: pvio.domains.xen_net
                                       failed=vif_failures)
        # vbds the toolstack adds later (pvio block-attach) are attached and exported too,
        # and vifs it removes (pvio unplug) go
        from pvio.domains.xen_hotplug import VbdWatcher, VifWatcher

        watcher = VbdWatcher(dom, xs, disks, state_dir=spec.state_dir, name=spec.name, ring_order=ring_order,
                             persistent=persistent, **more)
        await watcher.start()
        vif_watcher = VifWatcher(dom, xs, nets, name=spec.name, failures=vif_failures)
        await vif_watcher.start()
        # refreshed once a second: blkfront's counters for `pvio bench blk`
        await report_status(spec, dom.domid, lambda: status(disks) | {
            "vifs": [n.status() for n in nets],
            "vif_failures": {str(k): v for k, v in vif_failures.items()},
        })
    finally:
        if vif_watcher is not None:
            await vif_watcher.stop()
        with contextlib.suppress(Exception):
            await detach_guest_vifs(nets)
        if watcher is not None:
            await watcher.stop()
        for disk in disks:
            with contextlib.suppress(Exception):
                await detach_disk(disk)
        with contextlib.suppress(Exception):
            if xs is not None:
                await xs.close()
        if console is not None:
            console.stop()
        await dom.close()


def status(disks: list[GuestDisk]) -> dict[str, object]:
    return {
        "disks": [
            {
                "vdev": d.vdev,
                "devid": d.devid,
                "nbd_uri": d.nbd_uri,
                "nbd_tcp_uri": d.nbd_tcp_uri,
                "sectors": d.front.disk.sectors if d.front.disk else 0,
                "mode": "ro" if d.front.disk and d.front.disk.read_only else "rw",
                "statistics": dataclasses.asdict(d.front.stats),
            }
            for d in disks
        ],
    }


__all__ = ["DiskSpecJSON", "GuestDisk", "attach_disk", "detach_disk", "export_disk", "main"]
