"""blkfront's XenBus side: one vbd of a guest, from XenStore to the engine and back.

Theory of operation
-------------------
`BlkfrontDevice` is the `pvio.xenbus.FrontendDriver` of one vbd; `BlkfrontEnd` runs
the frontend's handshake table for it.

- publish (with the switch to Initialised, ONE transaction, retried on EAGAIN by the
  client): `BlkFront.setup_ring()` — done once per connection even if the transaction
  is retried — and its keys: ring-ref(s) (+ ring-page-order), event-channel, protocol.
  The ring order is the smaller of what the guest wants and the backend's
  max-ring-page-order, and so is the number of rings (`want_queues` and
  multi-queue-max-queues, read as Linux's blkfront reads it: absent or bad means 1).  feature-persistent=1 says the frontend can use persistent
  grants (Linux's talk_to_blkback writes its capability the same way).
- finalize (the backend is Connected): the backend's keys, checked by
  `pvio.blk.keys.parse_backend_disk`, open the queue — or, after a reconnection,
  re-issue every request still in flight (`BlkFront.resume`).  Persistent grants are
  used when the backend's feature-persistent says so: Linux's blkback writes it only
  with Connected, so it is read here, as blkfront_gather_backend_features does; data
  pages then stay granted and are reused, and the backend keeps them mapped.  So are
  feature-max-indirect-segments (written at probe) and the disk's properties.
- resize (the backend rewrote Connected): the new size is read, and `on_resize` tells
  whoever serves the disk (the guest's NBD export).
- disconnect (the backend closed the device): the queue stops and the ring is given up.
  When the toolstack removed the device (`online` = 0 on the backend) the disk is
  closed; otherwise the backend cannot serve it (blkback could not open the image, say,
  and said so with dev_fatal): the requests in flight fail with EIO, and new ones at
  once, until a backend connects again.  Either way no caller waits for a backend that
  said it will not answer.
- removal while in use: when the toolstack asks the backend to close (`online` = 0,
  Closing) and the disk is in use (`in_use()`: the guest's NBD export has clients),
  the frontend refuses as Linux's blkfront does — `error` "16 Device in use; refusing
  to close" (xenbus_dev_error) and no state change — and the toolstack undoes its
  request.

Recovery: a backend whose domain died leaves its `state` at Connected; the new backend
probes and writes InitWait.  `BlkfrontEnd` sees (Connected, InitWait) — a pair the
plain table ignores — suspends the queue and goes back to Initialising, and the table
does the rest: publish a new ring, the backend connects, finalize re-issues the
shadows.  If no backend has reconnected RECONNECT_TIMEOUT seconds after the queue was
suspended, the requests fail with EIO as above (the device stays recoverable).  An
explicit suspend/resume (`BlkfrontEnd.renegotiate`) goes through Closing
and Closed with the live backend, then starts over the same way.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Callable

from pvio.abi.ring import MAX_RING_PAGE_ORDER
from pvio.abi.xenbus import XenbusState as S
from pvio.blk.frontend import BlkFront
from pvio.blk.keys import parse_backend_disk, read_uint
from pvio.blk.xenbus_backend import read_keys
from pvio.xenbus import Frontend, XenbusDevice
from pvio.xenstore.client import AsyncClient

log = logging.getLogger(__name__)

#: How long requests wait for a backend to come back after the old one died (seconds);
#: pvio up restarts a driver domain in a second or two.
RECONNECT_TIMEOUT = 30.0

BACKEND_DISK_KEYS = (
    "sectors", "info", "sector-size", "physical-sector-size",
    "feature-flush-cache", "feature-barrier", "feature-discard",
    "feature-max-indirect-segments", "feature-persistent",
)


class BlkfrontDevice:
    """The FrontendDriver of one vbd (see the module notes)."""

    def __init__(
        self, front: BlkFront, *, want_ring_order: int = 0, want_persistent: bool = True, want_queues: int = 1
    ) -> None:
        self.front = front
        self.want_ring_order = want_ring_order
        self.want_queues = want_queues
        self.want_persistent = want_persistent
        self._keys: dict[str, str] | None = None
        self.connected = asyncio.Event()
        self.connections = 0
        self._backstop: asyncio.TimerHandle | None = None
        #: the disk has users that a removal would cut off (refuse it while > 0)
        self.in_use: Callable[[], int] = lambda: 0
        #: the backend published a new size
        self.on_resize: Callable[[], None] | None = None

    # The handshake: keys in one transaction, the disk's properties on Connected.
    # blkfront publishes its ring the moment the backend is in InitWait: the ring is set
    # up once (a retried transaction writes the same keys again, it does not allocate a
    # second ring), and ring-ref, event-channel, protocol and the switch to Initialised
    # share one transaction, so blkback's watch fires when everything is there.  blkback
    # maps the ring, binds the port and, in its own transaction, writes sectors, info and
    # the features with Connected; blkfront reads them through parse_backend_disk (the
    # backend's strings are hostile input too) and opens the queue.
    async def publish(self, dev: XenbusDevice, tx: int) -> None:
        if self._keys is None:
            if self.front.disk is None:  # the first connection: the order may still change
                raw = await dev.xs.read_or(f"{dev.otherend}/max-ring-page-order", b"0", tx)
                try:
                    back_max = read_uint({"o": (raw or b"0").decode()}, "o", MAX_RING_PAGE_ORDER)
                except ValueError:
                    back_max = 0
                raw = await dev.xs.read_or(f"{dev.otherend}/multi-queue-max-queues", b"1", tx)
                try:
                    back_queues = max(1, read_uint({"q": (raw or b"1").decode()}, "q", 0xFFFF_FFFF))
                except ValueError:
                    back_queues = 1
                self.front.set_ring_order(min(self.want_ring_order, back_max), min(self.want_queues, back_queues))
            self._keys = await self.front.setup_ring()
            if self.want_persistent:
                self._keys["feature-persistent"] = "1"
        for k, v in self._keys.items():
            await dev.xs.write(f"{dev.nodename}/{k}", v, tx)

    async def finalize(self, dev: XenbusDevice) -> None:
        disk = parse_backend_disk(await read_keys(dev.xs, dev.otherend, BACKEND_DISK_KEYS))
        self._keys = None  # this ring is in use: the next publish makes a new one
        self.front.set_persistent(self.want_persistent and disk.feature_persistent)
        if self.front.disk is None:
            self.front.connect(disk)
        else:
            n = self.front.resume(disk)
            log.warning("blkfront %s: reconnected, %d requests re-issued", dev.nodename, n)
        self.connections += 1
        self.connected.set()
        self._stop_backstop()

    async def resize(self, dev: XenbusDevice) -> None:
        disk = parse_backend_disk(await read_keys(dev.xs, dev.otherend, BACKEND_DISK_KEYS))
        if self.front.disk is not None and disk.sectors != self.front.disk.sectors:
            log.info("blkfront %s: resized to %d sectors", dev.nodename, disk.sectors)
            self.front.disk = disk
            if self.on_resize is not None:
                self.on_resize()

    async def disconnect(self, dev: XenbusDevice) -> None:
        self.connected.clear()
        online = await dev.xs.read_or(f"{dev.otherend}/online", b"1")
        if online == b"0":  # removed by the toolstack: fail the callers
            await self.front.close(force=True)
        else:
            we_closed = await dev.read_state() is S.Closing  # a renegotiation of ours
            await self.front.suspend()
            if not we_closed:
                self.front.fail_in_flight(f"the backend closed {dev.otherend}")
        self._keys = None

    async def suspend(self) -> None:
        """The backend died (a new one is starting): requests wait for it, at most
        RECONNECT_TIMEOUT seconds."""
        self.connected.clear()
        await self.front.suspend()
        self._keys = None
        self._stop_backstop()
        self._backstop = asyncio.get_running_loop().call_later(
            RECONNECT_TIMEOUT, self.front.fail_in_flight,
            f"no backend came back within {RECONNECT_TIMEOUT:.0f} s")

    def _stop_backstop(self) -> None:
        if self._backstop is not None:
            self._backstop.cancel()
            self._backstop = None


class BlkfrontEnd(Frontend):
    """The frontend's handshake, plus recovery from a backend that died (module notes)."""

    driver: BlkfrontDevice

    def __init__(self, xs: AsyncClient, nodename: str, otherend: str, driver: BlkfrontDevice) -> None:
        super().__init__(xs, nodename, otherend, driver)
        self.recoveries = 0

    async def kick(self) -> None:
        mine = await self.dev.read_state()
        other = await self.dev.otherend_state()
        if mine is S.Connected and other is S.Closing and await self._refuse_removal():
            return
        if mine is S.Connected and other is S.InitWait:
            # A new backend: the old one died with our requests.  Start over.
            log.warning("blkfront %s: backend restarted, renegotiating", self.dev.nodename)
            self.recoveries += 1
            await self.driver.suspend()
            await self.dev.switch_state(S.Initialising)
        elif mine is S.Closed and other is S.InitWait and self.driver.front.broken is None:
            # A backend that closed the device (it could not serve it) is back: start
            # over, as Linux's xenbus_reset_frontend does.  A disk the toolstack removed
            # is closed for good (broken) and stays so.
            log.warning("blkfront %s: a backend is back, reconnecting", self.dev.nodename)
            self.recoveries += 1
            await self.reconnect()
        await super().kick()

    async def _refuse_removal(self) -> bool:
        """blkback_changed's Closing case: a removal of a disk in use is refused."""
        if await self.dev.xs.read_or(f"{self.dev.otherend}/online", b"1") != b"0":
            return False
        users = self.driver.in_use()
        if not users:
            return False
        log.warning("blkfront %s: removal refused, %d users", self.dev.nodename, users)
        await self.dev.dev_error(errno.EBUSY, "Device in use; refusing to close")
        return True

    async def renegotiate(self, timeout: float = 30.0) -> None:
        """Explicit suspend/resume with a live backend: Closing, Closed, then start over."""
        await self.close()
        await self.wait_state(S.Closed, timeout=timeout)
        await self.reconnect()
        await self.kick()
        await self.wait_state(S.Connected, timeout=timeout)
