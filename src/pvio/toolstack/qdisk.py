"""QEMU's qdisk as the backend of a pvio guest's disk: xl's ``backendtype=qdisk``.

Theory of operation
-------------------
A disk given with ``backendtype=qdisk`` is served not by pvio's blkback but by Debian's
unmodified QEMU (`/usr/libexec/xen-qemu-system-i386`, package qemu-system-xen), the
block backend that grew out of Xen's ``xen_disk.c``.  pvio does what libxl does for a
qdisk in a driver domain (libxl_dm.c `libxl__spawn_qdisk_backend`):

- one QEMU per guest, as its own backend domain: domid ``QDISK_DOMID_BASE + guest``,
  INTRODUCEd to XenStore with its directory (`xslayout.domain_add`) and
  ``device-model/<guest>``, which it owns (QEMU records its state there);
- the disk's directories as libxl writes them for a qdisk: the frontend as for any vbd,
  the backend under ``/local/domain/<qemu>/backend/qdisk/<guest>/<devid>`` owned by the
  QEMU domain, ``params`` as ``<fmt>:<path>`` (``aio:`` for raw; QEMU serves qcow2
  itself, so no qemu-nbd is started for it);
- QEMU started with libxl's arguments (``-xen-domid <guest> -xen-attach -M xenpv``...)
  under `pvio run`'s arrangement: the /dev/xen device layer preloaded (copy transport:
  QEMU never holds the guest's memory; it maps the ring page and moves data with
  GRANT_COPY) and a XenStore connection relayed as the QEMU domain
  (`pvio.toolstack.run_cli.XenStoreRelay`); then pvio up waits for
  ``device-model/<guest>/state`` = ``running``;
- the guest's blkfront finds its backend in its frontend directory, as with blkback, and
  goes through the XenBus handshake with QEMU.

Supervision: a QEMU that dies is restarted (its backend directories written again at
state Initialising; its XenStore domain stays, since a domain released and introduced
again loses the permission entries that name it; the guest's blkfront sees the backend
start over and renegotiates, re-issuing what was in flight, as it does when the driver
domain restarts).  At shutdown the guests close their vbds first (QEMU goes
Closed with them), then each QEMU is stopped and its domain released.

A guest that dies and is restarted gets a new QEMU with it, as libxl makes a new device
model when it recreates a domain (`stop_guest`, `start_guest`).

Deliberately not here: QEMU as domain 0 (the driver domain is), and read-only qdisks,
which Debian's QEMU 7.2 cannot realize (pvio up refuses them with the reason).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pvio.toolstack import xslayout
from pvio.toolstack.children import Child, UpError
from pvio.toolstack.paths import StatePaths
from pvio.toolstack.run_cli import XenStoreRelay, domain_environment, preload_library

if TYPE_CHECKING:
    from pvio.toolstack.config import XenDisk
    from pvio.xenstore.client import AsyncClient

QEMU_BINARY = "/usr/libexec/xen-qemu-system-i386"
#: The QEMU serving guest N's qdisks is domain QDISK_DOMID_BASE + N.
QDISK_DOMID_BASE = 1000
RUNNING_TIMEOUT = 30.0
#: libxl__device_disk_string_of_format
PARAMS_PREFIX = {"raw": "aio", "qcow2": "qcow2", "qcow": "qcow", "vhd": "vhd", "qed": "qed"}

Transact = Callable[[list[xslayout.XsOp]], Awaitable[None]]


def wants_qemu(disk: XenDisk) -> bool:
    return disk.spec.backendtype == "qdisk"


def qdisk_params(fmt: str, target: str) -> str:
    """`params` as libxl writes it for a qdisk: ``aio:/path`` for raw, ``qcow2:/path``..."""
    return f"{PARAMS_PREFIX.get(fmt, fmt)}:{target}"


def qemu_argv(guest: int) -> list[str]:
    """libxl__spawn_qdisk_backend's command line."""
    return [QEMU_BINARY, "-xen-domid", str(guest), "-xen-attach", "-name", f"domain-{guest}", "-nographic",
            "-M", "xenpv", "-monitor", "/dev/null", "-serial", "/dev/null", "-parallel", "/dev/null"]


@dataclass
class QemuBackend:
    """The QEMU serving one guest's qdisks, and what it was given."""

    guest: int
    guest_name: str
    domid: int
    disks: list[tuple[XenDisk, list[xslayout.XsOp]]] = field(default_factory=list)
    child: Child | None = None
    relay: XenStoreRelay | None = None
    tmp: str = ""
    crashes: list[float] = field(default_factory=list)

    @property
    def device_model(self) -> str:
        return f"/local/domain/{self.domid}/device-model/{self.guest}"


class QdiskBackends:
    """Every guest's QEMU, for one pvio up."""

    def __init__(self, paths: StatePaths, say: Callable[[str], None]) -> None:
        self.paths = paths
        self.say = say
        self.backends: dict[int, QemuBackend] = {}

    async def add_disk(self, xs: AsyncClient, transact: Transact, guest: int, guest_name: str, disk: XenDisk) -> None:
        """Write a qdisk's directories (making its QEMU's domain first, once)."""
        if not os.access(QEMU_BINARY, os.X_OK):
            raise UpError(f"backendtype=qdisk needs QEMU's Xen backend {QEMU_BINARY} "
                          "(apt-get install --no-install-recommends qemu-system-xen)")
        if disk.spec.read_only:
            # QEMU 7.2's xen-block asks its read-only block node for write permission and
            # fails to realize the device ("Block node is read-only"): say so now.
            raise UpError(f"{guest_name} {disk.spec.vdev.name}: access=ro with backendtype=qdisk is refused by "
                          "Debian's QEMU 7.2 (its xen-block cannot realize a read-only disk); serve it with "
                          "pvio's blkback (backendtype=phy, the default)")
        be = self.backends.get(guest)
        if be is None:
            be = self.backends[guest] = QemuBackend(guest, guest_name, QDISK_DOMID_BASE + guest)
            await self._make_domain(xs, transact, be)
        ops = xslayout.vbd_add(guest, disk.spec, qdisk_params(disk.spec.format, disk.spec.target),
                               backend_domid=be.domid, backend_kind="qdisk")
        be.disks.append((disk, ops))
        await transact(ops)

    async def _make_domain(self, xs: AsyncClient, transact: Transact, be: QemuBackend) -> None:
        await xs.introduce(be.domid)
        await transact([*xslayout.domain_add(be.domid, f"qemu-{be.guest_name}"),
                        xslayout.XsOp("mkdir", be.device_model),
                        xslayout.XsOp("set_perms", be.device_model, perms=(f"n{be.domid}",))])

    async def start(self, xs: AsyncClient) -> None:
        """Start every QEMU and wait until each says it runs."""
        for be in self.backends.values():
            await self._start(xs, be)

    async def _start(self, xs: AsyncClient, be: QemuBackend) -> None:
        be.tmp = tempfile.mkdtemp(prefix=f"pvio-qdisk-d{be.domid}-")
        be.relay = XenStoreRelay(self.paths.xenstored_control, be.domid, Path(be.tmp) / "xenstored.sock")
        await be.relay.start()
        env = domain_environment({}, self.paths, be.domid, "copy", f"qemu-{be.guest_name}", preload_library(),
                                 str(be.relay.path))
        env["XEN_QEMU_CONSOLE_LIMIT"] = "1048576"  # libxl__set_qemu_env_for_xsa_180
        argv = ["env", *(f"{k}={v}" for k, v in env.items()), *qemu_argv(be.guest)]
        name = f"qdisk-{be.guest_name}"  # `pvio list` shows it among the services
        if be.child is None:
            be.child = Child(name, argv, self.paths.log(name))
        be.child.argv = argv  # a new relay each time
        await be.child.start()
        deadline = time.monotonic() + RUNNING_TIMEOUT
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                if (await xs.read(f"{be.device_model}/state")).decode() == "running":
                    return
            if not be.child.running:
                break
            await asyncio.sleep(0.05)
        raise UpError(f"QEMU for {be.guest_name}'s qdisks did not start; see {be.child.log_path}")

    async def supervise(self, xs: AsyncClient, transact: Transact) -> bool:
        """Restart a QEMU that died (its guest's blkfront reconnects to the new one);
        True if one was, so that what `pvio list` shows is written again."""
        restarted = False
        for be in self.backends.values():
            if be.child is None or be.child.running:
                continue
            code = be.child.proc.returncode if be.child.proc else None
            now = time.monotonic()
            be.crashes = [t for t in be.crashes if now - t < 60.0] + [now]
            if len(be.crashes) > 5:
                continue
            be.child.restarts += 1
            restarted = True
            self.say(f"pvio up: QEMU for {be.guest_name} exited (status {code}); restarting it "
                     f"(restart #{be.child.restarts}; log {be.child.log_path})")
            # The XenStore domain stays (released and introduced again, it would lose the
            # guest's permission entries that name it); only its process starts over.
            await self._stop_process(be)
            with contextlib.suppress(Exception):
                await xs.rm(f"{be.device_model}/state")
            for disk, ops in be.disks:
                # The backend directory only: the guest's frontend stays as it is, and
                # its blkfront sees the backend start over.
                be_path = xslayout.backend_path(be.domid, be.guest, disk.spec.vdev.number, "qdisk")
                await transact([op for op in ops if op.path == be_path or op.path.startswith(be_path + "/")])
            try:
                await self._start(xs, be)
            except UpError as e:
                self.say(f"pvio up: {e}")
            else:
                self.say(f"pvio up: QEMU for {be.guest_name} is back")
        return restarted

    async def stop_guest(self, xs: AsyncClient, guest: int) -> None:
        """The guest died and is being made again (libxl destroys and recreates its
        devices, and a new device model with them): its QEMU stops -- which lets go of
        the dead guest's pages -- and its backend directories go; `add_disk` writes them
        again and `start_guest` starts a new QEMU.  Its XenStore domain stays."""
        be = self.backends.get(guest)
        if be is None:
            return
        await self._stop_process(be)
        with contextlib.suppress(Exception):
            await xs.rm(f"{be.device_model}/state")
        with contextlib.suppress(Exception):
            await xs.rm(f"/local/domain/{be.domid}/backend/qdisk/{guest}")
        be.disks.clear()

    async def start_guest(self, xs: AsyncClient, guest: int) -> None:
        if (be := self.backends.get(guest)) is not None:
            await self._start(xs, be)

    async def _release(self, xs: AsyncClient, be: QemuBackend) -> None:
        await self._stop_process(be)
        with contextlib.suppress(Exception):
            await xs.rm(f"/local/domain/{be.domid}")
        with contextlib.suppress(Exception):
            await xs.release(be.domid)

    async def _stop_process(self, be: QemuBackend) -> None:
        if be.child is not None:
            await be.child.stop(10.0)
        if be.relay is not None:
            await be.relay.close()
            be.relay = None
        if be.tmp:
            shutil.rmtree(be.tmp, ignore_errors=True)
            be.tmp = ""

    async def stop(self, xs: AsyncClient | None) -> None:
        """After the guests closed their vbds: stop every QEMU, release its domain."""
        for be in self.backends.values():
            if xs is None:
                if be.child is not None:
                    await be.child.stop(10.0)
                continue
            await self._release(xs, be)

    def processes(self) -> list[Child]:
        return [be.child for be in self.backends.values() if be.child is not None]


def table_rows(status: dict[str, Any]) -> list[tuple[str, ...]]:
    """`pvio list`'s rows for the QEMUs serving qdisks: backend domain and process."""
    from pvio.domains.spec import pid_alive

    guests = {d["name"]: d["domid"] for d in status.get("domains", [])}
    rows: list[tuple[str, ...]] = []
    for svc in status.get("services", []):
        guest = svc["name"].removeprefix("qdisk-")
        if svc["name"].startswith("qdisk-") and guest in guests:
            state = "running" if pid_alive(svc.get("pid")) else "dead"
            rows.append((svc["name"], str(QDISK_DOMID_BASE + guests[guest]), str(svc["pid"]),
                         "qdisk backend (QEMU)", state, f"{guest}'s qdisk disks"))
    return rows
