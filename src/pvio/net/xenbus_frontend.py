"""netfront's XenBus side: one vif's handshake, from the backend's features to the engine.

`NetfrontDevice` is the FrontendDriver of a `pvio.xenbus.Frontend` end:

- publish (with the switch to Initialised, one transaction): read the backend's
  features (`parse_backend_features`: a backend that only flips pages is refused), set
  up both rings of each queue (`NetFront.setup_rings`, once: a retried transaction
  writes the same keys), and write tx-ring-ref, rx-ring-ref, event-channel,
  request-rx-copy, feature-rx-notify and the accepted features -- with multi-queue
  (the guest wants n > 1 queues and the backend offers more than one: the smaller of
  the two) multi-queue-num-queues and each queue's ring keys under queue-<i>/
  (`pvio.net.keys.frontend_keys`);
- finalize (the backend is Connected): the interface may carry frames (`connected`);
- disconnect (the backend closed): the rings are given up;
- recovery (`NetfrontEnd`): a driver domain that restarted is met with new rings.

The vif's MAC is read from the frontend directory's `mac` (written by the toolstack).
`attach_vif` gives up as soon as the backend closes instead of connecting (its hotplug
failed: ``hotplug-error`` says why), not only after CONNECT_TIMEOUT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from pvio.abi.xenbus import XenbusState as S
from pvio.blk.xenbus_backend import read_keys
from pvio.hypervisor.client import Domain
from pvio.net.frontend import NetFront, RxMeta
from pvio.net.keys import BACKEND_FEATURE_KEYS, frontend_keys, parse_backend_features
from pvio.net.multiqueue import select_queue
from pvio.net.slots import FrameParts, Gso
from pvio.xenbus import Frontend, XenbusDevice
from pvio.xenstore.client import AsyncClient

log = logging.getLogger(__name__)


class NetfrontDevice:
    """The FrontendDriver of one vif (see the module notes)."""

    def __init__(self, front: NetFront, *, want_queues: int = 1) -> None:
        #: the first queue (the only one without multi-queue)
        self.front = front
        #: every queue, `front` first: as many as were negotiated at the last publish
        self.fronts = [front]
        self.want_queues = want_queues
        self.connected = asyncio.Event()
        self.connections = 0
        self._keys: dict[str, str] | None = None
        self._multi_queue_written = False

    async def publish(self, dev: XenbusDevice, tx: int) -> None:
        if self._keys is None:
            features = parse_backend_features(await read_keys(dev.xs, dev.otherend, BACKEND_FEATURE_KEYS, tx))
            self._set_queues(max(1, min(self.want_queues, features.max_queues)))
            self._keys = frontend_keys([await f.setup_rings(features) for f in self.fronts])
        if len(self.fronts) == 1 and self._multi_queue_written:
            # an earlier connection had several queues: a stale count would mislead netback
            with contextlib.suppress(Exception):
                await dev.xs.rm(f"{dev.nodename}/multi-queue-num-queues", tx)
        for k, v in self._keys.items():
            await dev.xs.write(f"{dev.nodename}/{k}", v, tx)
        self._multi_queue_written = len(self.fronts) > 1

    def _set_queues(self, n: int) -> None:
        """n queues from now on: the first is kept, the others made or dropped (closed)."""
        first = self.front
        while len(self.fronts) < n:
            self.fronts.append(NetFront(first.domain, first.backend_domid, first.on_frame,
                                        queue_id=len(self.fronts)))
        del self.fronts[n:]

    async def finalize(self, dev: XenbusDevice) -> None:
        self.connections += 1
        self.connected.set()
        log.info("netfront %s: connected, %d queue(s)", dev.nodename, len(self.fronts))

    async def resize(self, dev: XenbusDevice) -> None:
        pass  # a vif has no size

    async def disconnect(self, dev: XenbusDevice) -> None:
        await self._close()

    async def suspend(self) -> None:
        """The backend died (a new one is starting): give the rings up, publish anew."""
        await self._close()

    async def _close(self) -> None:
        self.connected.clear()
        for front in self.fronts:
            await front.close()
        self._keys = None


class NetfrontEnd(Frontend):
    """The frontend's handshake, plus recovery from a driver domain that restarted: as
    blkfront's (`pvio.blk.xenbus_frontend.BlkfrontEnd`), a frontend Connected that sees
    its backend in InitWait starts over (Initialising), and one Closed by a backend that
    is back reconnects."""

    driver: NetfrontDevice

    def __init__(self, xs: AsyncClient, nodename: str, otherend: str, driver: NetfrontDevice) -> None:
        super().__init__(xs, nodename, otherend, driver)
        self.recoveries = 0

    async def kick(self) -> None:
        mine = await self.dev.read_state()
        other = await self.dev.otherend_state()
        if mine is S.Connected and other is S.InitWait:
            log.warning("netfront %s: backend restarted, renegotiating", self.dev.nodename)
            self.recoveries += 1
            await self.driver.suspend()
            await self.dev.switch_state(S.Initialising)
        elif mine is S.Closed and other is S.InitWait and not self.done.is_set():
            log.warning("netfront %s: a backend is back, reconnecting", self.dev.nodename)
            self.recoveries += 1
            await self.reconnect()
        await super().kick()




CONNECT_TIMEOUT = 30.0


class GuestVif:
    """A guest's vif through the handshake: the engine(s), its XenBus end, its MAC and MTU."""

    def __init__(self, devid: int, front: NetFront, end: NetfrontEnd, driver: NetfrontDevice,
                 mac: bytes, mtu: int) -> None:
        self.devid = devid
        self.front = front
        self.end = end
        self.driver = driver
        self.mac = mac
        self.mtu = mtu

    @property
    def fronts(self) -> list[NetFront]:
        """Every queue's engine (`front` is the first)."""
        return self.driver.fronts

    def send(self, frame: bytes | memoryview, gso: Gso | None = None, csum_blank: bool = False) -> bool:
        """Send on the queue of the frame's flow (`select_queue`, as Linux's netfront)."""
        fronts = self.driver.fronts
        return fronts[select_queue(frame, len(fronts))].send(frame, gso, csum_blank)


async def attach_vif(dom: Domain, xs: AsyncClient, devid: int,
                     on_frame: Callable[[FrameParts, RxMeta], None], *, queues: int = 1) -> GuestVif:
    """Run netfront for /local/domain/<domid>/device/vif/<devid> until it is Connected,
    with up to `queues` queues (Linux: the xen_netfront.max_queues parameter)."""
    node = f"/local/domain/{dom.domid}/device/vif/{devid}"
    backend = (await xs.read(f"{node}/backend")).decode()
    backend_id = int((await xs.read(f"{node}/backend-id")).decode())
    mac = bytes.fromhex((await xs.read(f"{node}/mac")).decode().replace(":", ""))
    mtu = int((await xs.read_or(f"{node}/mtu", b"1500") or b"1500").decode())
    front = NetFront(dom, backend_id, on_frame)
    driver = NetfrontDevice(front, want_queues=queues)
    end = NetfrontEnd(xs, node, backend, driver)
    await end.start()
    try:
        await _until_connected(end, driver, backend)
    except BaseException:
        await end.stop()
        await front.close()
        raise
    return GuestVif(devid, front, end, driver, mac, mtu)


async def _until_connected(end: NetfrontEnd, driver: NetfrontDevice, backend: str) -> None:
    """Connected, or OSError as soon as the backend refuses the vif (it closes: its
    hotplug failed, say) -- not only after CONNECT_TIMEOUT."""
    waits = [asyncio.ensure_future(driver.connected.wait()),
             asyncio.ensure_future(end.wait_state(S.Closed, timeout=2 * CONNECT_TIMEOUT))]
    try:
        done, _ = await asyncio.wait(waits, timeout=CONNECT_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
    if waits[0] in done:
        return
    if not done:
        raise TimeoutError(f"{end.dev.nodename}: not connected after {CONNECT_TIMEOUT:.0f} s")
    why = await end.dev.xs.read_or(f"{backend}/hotplug-error", None)
    raise OSError(f"{end.dev.nodename}: the backend refused it" + (f" ({why.decode(errors='replace')})" if why else ""))


async def detach_vif(vif: GuestVif, timeout: float = 10.0) -> None:
    """Orderly close: Closing → Closed with the backend, the rings given up."""
    with contextlib.suppress(Exception):
        await vif.end.close()
        await vif.end.wait_state(S.Closed, timeout=timeout)
    await vif.end.stop()
    for front in vif.fronts:
        await front.close()


__all__ = ["GuestVif", "NetfrontDevice", "NetfrontEnd", "attach_vif", "detach_vif"]
