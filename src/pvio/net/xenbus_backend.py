"""netback's XenBus side: the driver domain's vif devices, from XenStore to the engine.

Theory of operation
-------------------
`NetbackService` watches ``/local/domain/<own>/backend/vif``; every
``<frontend-domid>/<devid>`` directory under it is one vif.  For each it reads the keys
the toolstack wrote (`mac`, `bridge`, `script`, `handle`, `type`, `ip`, `rate`,
`frontend`, `frontend-id`), asks `open_host` for the vif's host end (in a driver domain
process: a TAP ``vif<domid>.<devid>`` on a bridge, `pvio.domains.xen_net`; in tests, a
list), and runs a `pvio.xenbus.Backend` end whose driver is a `NetbackDevice`:

- probe (with the switch to InitWait, one transaction): netback's feature keys
  (`pvio.net.keys.BACKEND_FEATURES`) and ``hotplug-status = connected`` -- the host end
  is attached before the probe, which is what Xen's hotplug script reports (a vif with
  a `script` had it written by the script, `pvio.domains.xen_vif_script`);
- connect (with the switch to Connected): the number of queues
  (`parse_num_queues`: 0 or more than multi-queue-max-queues is refused with
  dev_fatal, as Linux's xen-netback refuses it), each queue's ring keys -- at the top
  for one queue, under ``queue-<i>/`` for several -- checked (`parse_frontend_rings`),
  one `NetbackQueue` per queue attached to its rings, and all of them handed to the
  host end (`VifHost.attach`), which wires each queue's frames both ways;
- disconnect: the queues let the rings go; the host end stays for a reconnection;
- removal (the directory went, or the end unregistered: Closed with ``online`` = 0):
  the host end is closed (its script run ``offline``) and ``hotplug-status`` removed,
  as Linux's netback_remove does -- what `pvio unplug` waits for.

A frontend that breaks the protocol on any queue has its whole vif disabled (every
queue's `NetbackQueue.disabled`, as Linux's xenvif_fatal_tx_err disables the vif) and
reported with dev_fatal on that device only.  Statistics, every queue's added up, are
published under each backend directory's ``statistics/`` at most once a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from pvio.abi.xenbus import XenbusState
from pvio.blk.keys import read_bool, read_uint
from pvio.blk.xenbus_backend import read_keys
from pvio.hypervisor.client import Domain
from pvio.net.backend import NetbackQueue
from pvio.net.keys import (
    BACKEND_FEATURES,
    FRONTEND_RING_KEYS,
    QUEUE_RING_KEYS,
    parse_frontend_rings,
    parse_num_queues,
    parse_rate,
)
from pvio.net.multiqueue import total_stats
from pvio.net.slots import FrameParts, TxFrame
from pvio.xenbus import Backend, XenbusDevice
from pvio.xenbus.service import BackendService, Served
from pvio.xenstore.client import AsyncClient

log = logging.getLogger(__name__)

VIF_KEYS = ("mac", "bridge", "script", "handle", "type", "ip", "rate", "mtu", "vifname", "frontend",
            "frontend-id")


@dataclass(frozen=True)
class VifConfig:
    """The backend directory's keys as the toolstack wrote them (libxl's names)."""

    path: str
    frontend: str
    frontend_id: int
    devid: int
    mac: bytes
    bridge: str = ""
    script: str = ""
    ip: str = ""
    rate: str = ""
    mtu: int = 1500
    type: str = "vif"
    #: the name the vif's end in the driver domain is given instead (xl's `vifname`)
    vifname: str = ""

    @property
    def ifname(self) -> str:
        """Xen's name for the vif's end in the driver domain: vif<domid>.<devid>.  (A
        hotplug script is handed this name and renames the interface to `vifname`.)"""
        return f"vif{self.frontend_id}.{self.devid}"

    @property
    def host_ifname(self) -> str:
        """The name the interface ends up with: `vifname` if given, else `ifname`."""
        return self.vifname or self.ifname


def parse_mac(text: str) -> bytes:
    parts = text.strip().split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"bad MAC {text!r}")
    mac = bytes(int(p, 16) for p in parts)
    if mac[0] & 1:
        raise ValueError(f"MAC {text} is a multicast address")
    return mac


async def read_vif_config(xs: AsyncClient, path: str) -> VifConfig:
    v = await read_keys(xs, path, VIF_KEYS)
    if "mac" not in v or "frontend-id" not in v:
        raise OSError(errno.ENOENT, f"{path}: mac or frontend-id is missing")
    return VifConfig(
        path=path,
        frontend=v.get("frontend", ""),
        frontend_id=read_uint(v, "frontend-id", 0xFFFF),
        devid=read_uint(v, "handle", 0xFFFF, default=int(path.rsplit("/", 1)[1])),
        mac=parse_mac(v["mac"]),
        bridge=v.get("bridge", ""),
        script=v.get("script", ""),
        ip=v.get("ip", ""),
        rate=v.get("rate", ""),
        mtu=read_uint(v, "mtu", 65535, default=1500),
        type=v.get("type", "vif"),
        vifname=v.get("vifname", ""),
    )


class VifHost(Protocol):
    """A vif's end in the driver domain: frames from the guest go in (`deliver`, with the
    index of the queue that carried them), frames for the guest come out through the
    queues `attach` was given (none: the frontend is not connected)."""

    def deliver(self, data: FrameParts, frame: TxFrame, queue: int) -> None: ...
    def attach(self, queues: Sequence[NetbackQueue]) -> None: ...
    async def close(self) -> None: ...


OpenHost = Callable[[VifConfig], Awaitable[VifHost]]


class NetbackDevice:
    """The BackendDriver of one vif: probe, connect, disconnect (see the module notes)."""

    def __init__(self, domain: Domain, config: VifConfig, host: VifHost) -> None:
        self.domain = domain
        self.config = config
        self.host = host
        #: one per queue the frontend connected (none while it is not connected)
        self.queues: list[NetbackQueue] = []
        self._ring_keys: list[dict[str, str]] | None = None
        self._fatal: set[asyncio.Task[None]] = set()
        self._mcast_watch: asyncio.Task[None] | None = None

    @property
    def queue(self) -> NetbackQueue | None:
        """The first queue (the only one without multi-queue)."""
        return self.queues[0] if self.queues else None

    async def probe(self, dev: XenbusDevice, tx: int) -> None:
        for k, v in BACKEND_FEATURES.items():
            await dev.xs.write(f"{dev.nodename}/{k}", v, tx)
        if not self.config.script:  # a hotplug script wrote it itself
            await dev.xs.write(f"{dev.nodename}/hotplug-status", "connected", tx)

    # T:1080 netback connects a vif of several queues
    # A frontend that asked for n > 1 queues wrote multi-queue-num-queues and, for each
    # queue, its ring grants and ports under queue-<i>/; one queue keeps them at the top.
    # netback refuses 0 or more than it offered (the frontend's fault: dev_fatal, this vif
    # only), then attaches one NetbackQueue per ring pair -- the same engine as a
    # single-queue vif's -- and hands them all to the host end, whose multi-queue TAP
    # gives each queue the flows the kernel steers to that queue's fd.
    # :T
    async def connect(self, dev: XenbusDevice, tx: int) -> bool:
        if await dev.read_state(dev.otherend, tx) is not XenbusState.Initialised:
            return False
        top = await read_keys(dev.xs, dev.otherend, FRONTEND_RING_KEYS, tx)
        n = parse_num_queues(top, int(BACKEND_FEATURES["multi-queue-max-queues"]))
        dirs = [top] if n == 1 else [
            await read_keys(dev.xs, f"{dev.otherend}/queue-{i}", QUEUE_RING_KEYS, tx) for i in range(n)
        ]
        values = [top, *dirs]
        if not self.queues or self._ring_keys != values:
            await self._drop_queues()
            rings = [parse_frontend_rings(top, None if n == 1 else d) for d in dirs]
            rate = parse_rate(self.config.rate) if self.config.rate else None
            queues: list[NetbackQueue] = []
            try:
                for i, r in enumerate(rings):
                    queue = NetbackQueue(self.domain, self.config.frontend_id, self._deliver_from(i),
                                         on_broken=lambda e: self._on_broken(dev, e), rate=rate)
                    await queue.connect(r)
                    queues.append(queue)
            except BaseException:
                for queue in queues:
                    await queue.disconnect()
                raise
            self.queues, self._ring_keys = queues, values
            self.host.attach(queues)
        if self._mcast_watch is None:
            self._mcast_watch = asyncio.get_running_loop().create_task(self._watch_multicast_control(dev))
        return True

    async def _watch_multicast_control(self, dev: XenbusDevice) -> None:
        """xen_mcast_ctrl_changed: ``request-multicast-control`` is watched while the vif
        is connected, so a frontend may ask for the filter (or drop it) at any time."""
        path = f"{dev.otherend}/request-multicast-control"
        try:
            stream = await dev.xs.watch(path)
        except Exception as e:  # pragma: no cover - the store went away
            log.info("netback: cannot watch %s: %s", path, e)
            return
        try:
            async for _ in stream:  # the first event comes at once: the value now
                values = await read_keys(dev.xs, dev.otherend, ("request-multicast-control",))
                on = read_bool(values, "request-multicast-control")  # as parse_frontend_rings reads it
                for queue in self.queues:
                    queue.set_multicast_control(on)
        except Exception as e:  # pragma: no cover - the store went away
            log.info("netback: watching %s: %s", path, e)
        finally:
            with contextlib.suppress(Exception):
                await stream.close()

    def _deliver_from(self, index: int) -> Callable[[FrameParts, TxFrame], None]:
        host = self.host

        def deliver(data: FrameParts, frame: TxFrame) -> None:
            host.deliver(data, frame, index)

        return deliver

    async def disconnect(self, dev: XenbusDevice) -> None:
        await self._drop_queues()

    async def _drop_queues(self) -> None:
        queues, self.queues, self._ring_keys = self.queues, [], None
        watch, self._mcast_watch = self._mcast_watch, None
        if watch is not None:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
        if queues:
            self.host.attach([])
            for queue in queues:
                await queue.disconnect()

    def _on_broken(self, dev: XenbusDevice, e: BaseException) -> None:
        for queue in self.queues:  # the whole vif is disabled, not one queue of it
            if queue.disabled is None:
                queue.disable(e)
        if self._fatal:
            return  # reported already, by the queue that broke first

        async def fatal() -> None:
            with contextlib.suppress(Exception):
                await dev.dev_fatal(errno.EPROTO, f"vif disabled: {e}")

        task = asyncio.get_running_loop().create_task(fatal())
        self._fatal.add(task)
        task.add_done_callback(self._fatal.discard)


class NetbackService(BackendService[NetbackDevice]):
    """Every vif under /local/domain/<domid>/backend/vif, served by one driver domain."""

    def __init__(self, domain: Domain, xs: AsyncClient, open_host: OpenHost) -> None:
        super().__init__(xs, f"/local/domain/{domain.domid}/backend/vif")
        self.domain = domain
        self.open_host = open_host

    async def _add(self, path: str) -> None:
        try:
            config = await read_vif_config(self.xs, path)
        except OSError:
            return  # the toolstack has not finished writing: the next event retries
        except ValueError as e:
            self.failed[path] = str(e)
            return
        try:
            host = await self.open_host(config)
        except Exception as e:
            self.failed[path] = str(e)
            log.warning("netback: %s: %s", path, e)
            dev = XenbusDevice(self.xs, path, config.frontend)
            with contextlib.suppress(Exception):
                await self.xs.write(f"{path}/hotplug-status", "error")
                await dev.dev_fatal(errno.EIO, f"attaching {config.host_ifname}: {e}")
            return
        driver = NetbackDevice(self.domain, config, host)
        end = Backend(self.xs, path, config.frontend, driver)
        await self._serve(Served(path, end, driver))
        log.info("netback: serving %s as %s", path, config.host_ifname)

    async def _close(self, vif: Served[NetbackDevice]) -> None:
        await vif.driver.disconnect(vif.end.dev)
        await vif.driver.host.close()
        with contextlib.suppress(Exception):  # as Linux's netback_remove: nothing is attached now
            await self.xs.rm(f"{vif.path}/hotplug-status")
        log.info("netback: %s removed", vif.path)

    def _stats_keys(self, vif: Served[NetbackDevice]) -> dict[str, str] | None:
        queues = vif.driver.queues
        if not queues:
            return None
        return total_stats([q.stats for q in queues]).as_keys() | {"queues": str(len(queues))}


__all__ = ["NetbackDevice", "NetbackService", "OpenHost", "VifConfig", "VifHost", "parse_mac", "read_vif_config"]
