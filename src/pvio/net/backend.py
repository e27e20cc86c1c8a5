"""netback's engine: one vif queue's two rings, from the guest's frames to the host and back.

Theory of operation
-------------------
`NetbackQueue` serves one connected vif queue (one transmit ring, one receive ring, and
one event channel for both, or one each with feature-split-event-channels); a vif of
several queues has one `NetbackQueue` each (`pvio.net.multiqueue`).  Like blkback it
never sees XenStore: the XenBus side (`pvio.net.xenbus_backend`) reads the frontend's
keys with `pvio.net.keys` and hands it a `FrontendRings`.

Transmit (guest → host), one turn:

1. take every request the tx ring offers (each copied out of shared memory once) and
   sort them into frames with `pvio.net.slots.parse_tx`, which makes xen-netback's checks;
2. fetch every slot of every good frame: through the pages kept mapped (map transport)
   or with ONE batched GNTTABOP_copy into netback's own pages (a grant the frontend did
   not give fails only its frame: NETIF_RSP_ERROR);
3. hand each frame to `deliver` in pieces -- in the map transport the live views of its
   slots, so the host end writes them to the TAP with no copy by Python -- and only then
   answer every slot (extra-info slots NETIF_RSP_NULL) and push with
   RING_PUSH_RESPONSES_AND_CHECK_NOTIFY: once answered, the frontend reuses the pages.

Receive (host → guest): `transmit(frame)` queues a frame (bounded: a full queue drops,
as Linux's rx_queue_max does).  A turn takes as many queued frames as the posted receive
buffers can hold, lays them out with `rx_layout`, and moves them with ONE GNTTABOP_copy
from netback's pages into the guest's buffers.  When the head frame needs more buffers
than are posted, netback sets rx req_event = req_cons + needed (the final check, with a
count) and sleeps until the frontend posts that many: notification avoidance on the
receive ring's requests, as on the transmit ring's.  A frontend that leaves its receive
ring empty for `rx_stall_timeout` seconds has its carrier turned off and its queue
dropped (xenvif_rx_stalled); carrier comes back when buffers do.

Multicast control (``request-multicast-control``, as Linux's xen-netback): the
frontend's MCAST_ADD/DEL extra-info requests keep a list of the groups it wants (at most
XEN_NETBK_MCAST_MAX; an ADD past it is answered NETIF_RSP_ERROR), and once it asked for
control `transmit` drops a multicast frame for a group not on the list -- broadcast
always passes (xenvif_start_xmit filters only PACKET_MULTICAST).

A frontend that breaks the protocol (a `NetifFatal` from the parser, an impossible
index) disables this vif only: `disabled` names why, `on_broken` tells the XenBus side
(dev_fatal, and `disable` for the vif's other queues, as Linux disables the whole vif),
the loop stops, and every other vif of the driver domain carries on.

Alternatives rejected: mapping the transmit grants (Linux maps all but the header; in
Python a batched copy costs one round trip either way, and a copy leaves nothing mapped
when a frontend misbehaves); one copy per frame (the batch is the unit).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

from pvio.abi import netif as n
from pvio.abi.ring import XEN_PAGE_SIZE
from pvio.hypervisor.client import Domain, GrantMapping
from pvio.hypervisor.errors import HypercallError
from pvio.net.pages import GuestPages
from pvio.net.slots import (
    FrameParts,
    Gso,
    NetifFatal,
    RxFrame,
    TxFrame,
    parse_tx,
    rx_layout,
    rx_responses,
    rx_slots_needed,
)
from pvio.ring import BackRing, RingBroken, SharedRing

_RXREQ = n.RX_REQUEST.packer

log = logging.getLogger(__name__)

#: Frames queued for the guest before netback drops (Linux: rx_queue_max, in bytes)
DEFAULT_RX_QUEUE_MAX = 512
#: Seconds without receive buffers before the carrier goes off (Linux: rx_stall_timeout)
DEFAULT_RX_STALL_TIMEOUT = 60.0
#: The multicast groups a frontend may list (Linux: XEN_NETBK_MCAST_MAX)
XEN_NETBK_MCAST_MAX = 64
BROADCAST = b"\xff" * 6


@dataclass
class NetbackStats:
    """What the queue did, and what the batching and notification avoidance achieved."""

    tx_frames: int = 0
    tx_bytes: int = 0
    tx_slots: int = 0
    tx_gso: int = 0
    tx_dropped: int = 0
    tx_batches: int = 0
    rx_frames: int = 0
    rx_bytes: int = 0
    rx_slots: int = 0
    rx_dropped: int = 0
    rx_batches: int = 0
    rx_stalls: int = 0
    notify_sent: int = 0
    notify_received: int = 0
    grant_ops: int = 0

    def as_keys(self) -> dict[str, str]:
        keys = {f.name: str(getattr(self, f.name)) for f in fields(self)}
        frames = max(self.tx_frames + self.rx_frames, 1)
        keys["notify_per_frame"] = f"{self.notify_sent / frames:.3f}"
        keys["tx_frames_per_batch"] = f"{self.tx_frames / max(self.tx_batches, 1):.3f}"
        return keys


@dataclass(frozen=True)
class FrontendRings:
    """What netback needs to connect a queue: both rings' grants and the port."""

    tx_ring_ref: int
    rx_ring_ref: int
    event_channel: int  # the only port, or the transmit ring's with split channels
    #: feature-split-event-channels: the receive ring's own port (-1: one port for both)
    event_channel_rx: int = -1
    rx_notify: bool = True
    sg: bool = False
    gso_tcpv4: bool = False
    gso_tcpv6: bool = False
    #: request-multicast-control: only the groups the frontend listed reach it
    multicast_control: bool = False


#: The host end of a queue: a frame from the guest, in pieces valid during the call only
Deliver = Callable[[FrameParts, TxFrame], None]


def tx_ring(pages: memoryview) -> SharedRing:
    return SharedRing(pages, entry_size=n.TX_ENTRY_SIZE, req_size=n.TX_REQUEST.size,
                      rsp_size=n.TX_RESPONSE.size)


def rx_ring(pages: memoryview) -> SharedRing:
    return SharedRing(pages, entry_size=n.RX_ENTRY_SIZE, req_size=n.RX_REQUEST.size,
                      rsp_size=n.RX_RESPONSE.size)


class NetbackQueue:
    """netback for one connected vif queue (see the module notes)."""

    def __init__(
        self,
        domain: Domain,
        frontend_domid: int,
        deliver: Deliver,
        *,
        on_broken: Callable[[BaseException], None] | None = None,
        rx_queue_max: int = DEFAULT_RX_QUEUE_MAX,
        rx_stall_timeout: float = DEFAULT_RX_STALL_TIMEOUT,
        rate: tuple[int, float] | None = None,
    ) -> None:
        self.domain = domain
        self.frontend_domid = frontend_domid
        self.deliver = deliver
        self.on_broken = on_broken
        self.rx_queue_max = rx_queue_max
        self.rx_stall_timeout = rx_stall_timeout
        #: the credit scheduler: (bytes, per seconds) the guest may send (libxl's `rate`)
        self.rate = rate
        self._credit = float(rate[0]) if rate else 0.0
        self._credit_at = 0.0
        self.stats = NetbackStats()
        #: why the vif is disabled (the frontend broke the protocol), or None
        self.disabled: BaseException | None = None
        #: carrier: off while the frontend leaves its receive ring empty too long
        self.carrier = True
        #: the groups the frontend asked for, in order, duplicates kept (fe_mcast_addr)
        self.multicast: list[bytes] = []
        self.features = FrontendRings(0, 0, 0)
        self.port = -1
        #: the receive ring's port: `port` itself unless the event channels are split
        self.rx_port = -1
        self._tx: BackRing | None = None
        self._rx: BackRing | None = None
        self._maps: list[GrantMapping] = []
        #: the frontend's data pages: kept mapped (map transport) or copied (GuestPages)
        self.pages = GuestPages(domain, frontend_domid)
        self._rxq: collections.deque[RxFrame] = collections.deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    # T:1010 netback attaches to a vif's two rings
    # A vif has a transmit ring and a receive ring, each one page the frontend granted,
    # and (without split event channels) one event channel for both.  netback maps both
    # pages live with one batched map, binds the port, and runs one loop that serves
    # both rings: the guest's frames out of the transmit ring, the host's frames into the
    # receive ring's buffers.
    # :T
    async def connect(self, rings: FrontendRings) -> None:
        refs = [rings.tx_ring_ref, rings.rx_ring_ref]
        maps = await self.domain.map_grants(self.frontend_domid, refs, False)
        if not all(m.live and m.view is not None for m in maps):
            await self.domain.unmap_grants(maps)
            raise ValueError("the ring pages are not shareable: they cannot be mapped live")
        self._maps = maps
        try:
            assert maps[0].view is not None and maps[1].view is not None
            self._tx = BackRing(tx_ring(maps[0].view))
            self._rx = BackRing(rx_ring(maps[1].view))
            self.port = await self.domain.bind_interdomain(self.frontend_domid, rings.event_channel)
            self.rx_port = self.port
            if rings.event_channel_rx >= 0:
                self.rx_port = await self.domain.bind_interdomain(self.frontend_domid, rings.event_channel_rx)
        except BaseException:
            await self.domain.unmap_grants(maps)
            self._maps = []
            raise
        self.features = rings
        self.domain.set_handler(self.port, self._on_event)
        if self.rx_port != self.port:
            self.domain.set_handler(self.rx_port, self._on_event)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="netback")

    def _on_event(self, port: int) -> None:
        self.stats.notify_received += 1
        self._wake.set()

    @property
    def connected(self) -> bool:
        return self._task is not None and not self._task.done()

    # -- the host's frames, for the guest ------------------------------------------------

    def transmit(self, data: bytes | memoryview, gso: Gso | None = None, csum_blank: bool = False) -> bool:
        """Queue a frame for the guest; False if it was dropped (queue full, vif down)."""
        if not self.carrier and self.disabled is None and self._rx is not None:
            try:
                self.carrier = self._rx.unconsumed_requests() > 0  # buffers are back
            except RingBroken as e:
                self._disable(e)
        if self.disabled is not None or not self.carrier or self._rx is None:
            self.stats.rx_dropped += 1
            return False
        if len(self._rxq) >= self.rx_queue_max or not self._mcast_wanted(data):
            self.stats.rx_dropped += 1
            return False
        if gso is not None and not (self.features.gso_tcpv4 if gso.type == n.XEN_NETIF_GSO_TYPE_TCPV4
                                    else self.features.gso_tcpv6):
            self.stats.rx_dropped += 1  # the frontend cannot take it (the host's TAP offloads
            return False  # follow the frontend's features, so only a misuse gets here)
        if len(data) > XEN_PAGE_SIZE and not self.features.sg:
            self.stats.rx_dropped += 1
            return False
        self._rxq.append(RxFrame(data, gso, csum_blank))
        self._wake.set()
        return True

    def set_multicast_control(self, on: bool) -> None:
        """The frontend changed ``request-multicast-control`` while connected
        (xen_mcast_ctrl_changed); the list of groups it gave is kept either way."""
        self.features = replace(self.features, multicast_control=on)

    def _mcast_wanted(self, data: bytes | memoryview) -> bool:
        """xenvif_mcast_match: with multicast control on, a multicast (not broadcast)
        destination must be one of the frontend's groups."""
        dest = bytes(data[:6])
        if not self.features.multicast_control or not dest[:1] or not dest[0] & 1 or dest == BROADCAST:
            return True
        return dest in self.multicast

    # -- the loop ---------------------------------------------------------------------

    # T:1050 One loop for both rings, and when it may sleep
    # Each turn serves the transmit ring (everything published) and then the receive ring
    # (as many queued frames as the posted buffers hold).  It sleeps only when both final
    # checks say so: on the transmit ring req_event = req_cons + 1 ("wake me at the next
    # frame"), on the receive ring req_event = req_cons + the head frame's slot count
    # ("wake me when there is room for it") -- so a frontend posting buffers one at a time
    # does not wake netback for each.
    # :T
    async def _run(self) -> None:
        tx, rx = self._tx, self._rx
        assert tx is not None and rx is not None
        try:
            while not self._stopping:
                busy = False
                raws = tx.take_requests()
                if raws:
                    await self._tx_batch(raws)
                    busy = True
                    if self.rate is not None:
                        await self._spend_credit()
                if self.disabled is not None:
                    return
                if self._rxq and await self._rx_batch():
                    busy = True
                if busy or tx.final_check_for_requests():
                    continue
                if self._rxq:
                    need = rx_slots_needed(len(self._rxq[0].data), self._rxq[0].gso is not None)
                    if rx.final_check_for_requests(need):
                        continue
                    await self._wait_for_buffers()
                    continue
                await self._wait()
        except (RingBroken, NetifFatal) as e:
            self._disable(e)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # pragma: no cover - a bug: fail this vif, not the domain
            log.exception("netback d%d: the engine failed", self.frontend_domid)
            self._disable(e)

    # T:1055 The credit scheduler: a vif's rate
    # A vif may be given a rate (libxl's `rate=10Mb/s`, optionally `@50ms`): like Linux's
    # netback, the guest earns `bytes` of credit every `seconds`, up to one window's worth,
    # and every frame it sends spends its length.  A batch that leaves the credit below
    # zero makes netback stop reading the transmit ring until the windows that follow
    # have paid it back -- the frontend's ring fills and it stops sending, so the guest
    # is slowed where it sends, not dropped further on.
    # :T
    async def _spend_credit(self) -> None:
        assert self.rate is not None
        size, window = self.rate
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._credit_at:
            self._credit = min(float(size), self._credit + (now - self._credit_at) * size / window)
        self._credit_at = now
        if self._credit < 0:
            await asyncio.sleep(-self._credit * window / size)

    async def _wait(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
        except TimeoutError:
            return False
        self._wake.clear()
        return True

    async def _wait_for_buffers(self) -> None:
        """The head frame waits for receive buffers; too long, and the carrier goes off."""
        if await self._wait(self.rx_stall_timeout if self.carrier else None):
            return
        if self.carrier:
            log.warning("netback d%d: receive ring stalled: carrier off", self.frontend_domid)
            self.stats.rx_stalls += 1
            self.stats.rx_dropped += len(self._rxq)
            self._rxq.clear()
            self.carrier = False

    def disable(self, e: BaseException) -> None:
        """Disable this queue from outside: another queue of its vif broke the protocol."""
        self._disable(e)
        self._wake.set()

    def _disable(self, e: BaseException) -> None:
        if self.disabled is None:
            self.disabled = e
            self.carrier = False
            self.stats.rx_dropped += len(self._rxq)
            self._rxq.clear()
            log.warning("netback d%d: vif disabled: %s", self.frontend_domid, e)
            if self.on_broken is not None:
                self.on_broken(e)

    # -- transmit ---------------------------------------------------------------------

    async def _tx_batch(self, raws: list[bytes]) -> None:
        st = self.stats
        st.tx_batches += 1
        batch = parse_tx(raws)
        responses = list(batch.immediate)
        st.tx_dropped += batch.dropped
        good: list[tuple[TxFrame, FrameParts]] = []
        data_frames = [f for f in batch.frames if f.slots]
        for f in batch.frames:
            if not f.slots:  # multicast control only
                responses.extend(f.responses(self._apply_mcast(f)))
        if data_frames:
            fetched = await self.pages.fetch(data_frames)
            self.stats.grant_ops = self.pages.grant_ops
            for f, data in zip(data_frames, fetched, strict=True):
                responses.extend(f.responses(data is not None))
                if data is None:
                    st.tx_dropped += 1
                    continue
                self._apply_mcast(f)
                good.append((f, data))
        # Delivered before answered: a frame's pieces may be views of its slots' pages.
        self._deliver(good)
        self._respond_tx(responses)
        if batch.fatal is not None:
            raise batch.fatal  # the frames before the fault went through; the vif stops

    def _apply_mcast(self, f: TxFrame) -> bool:
        """xenvif_mcast_add/del; False when an ADD found the list full (-ENOSPC)."""
        ok = True
        for op, addr in f.mcast:
            if op == n.XEN_NETIF_EXTRA_TYPE_MCAST_ADD:
                if len(self.multicast) >= XEN_NETBK_MCAST_MAX:
                    log.warning("netback d%d: too many multicast addresses", self.frontend_domid)
                    ok = False
                else:
                    self.multicast.append(addr)
            elif addr in self.multicast:
                self.multicast.remove(addr)  # the first match only, as Linux
        return ok

    def _deliver(self, good: list[tuple[TxFrame, FrameParts]]) -> None:
        st = self.stats
        for f, data in good:
            length = f.length
            st.tx_frames += 1
            st.tx_bytes += length
            self._credit -= length
            st.tx_slots += len(f.slots)
            if f.gso is not None:
                st.tx_gso += 1
            try:
                self.deliver(data, f)
            except Exception:  # pragma: no cover - the host side's bug, not the guest's
                log.exception("netback d%d: delivering a frame failed", self.frontend_domid)

    def _respond_tx(self, responses: list[bytes]) -> None:
        self._respond(self._tx, responses, self.port)

    def _respond(self, ring: BackRing | None, responses: list[bytes], port: int) -> None:
        if ring is None or not responses:
            return
        ring.put_responses(responses)
        if ring.push_responses_and_check_notify():
            self.stats.notify_sent += 1
            try:
                self.domain.notify(port)
            except (OSError, HypercallError) as e:  # the frontend's port is gone
                log.info("netback d%d: cannot notify: %s", self.frontend_domid, e)

    # -- receive ----------------------------------------------------------------------

    async def _rx_batch(self) -> bool:
        """Move as many queued frames as the posted buffers hold; False if none fit."""
        rx = self._rx
        assert rx is not None
        avail = rx.unconsumed_requests()
        if avail and not self.carrier and self.disabled is None:
            self.carrier = True  # buffers are back
        take: list[RxFrame] = []
        need = 0
        while self._rxq:
            f = self._rxq[0]
            k = rx_slots_needed(len(f.data), f.gso is not None)
            if need + k > avail:
                break
            take.append(self._rxq.popleft())
            need += k
        if not take:
            return False
        self.stats.rx_batches += 1
        reqs = list(_RXREQ.iter_unpack(b"".join(rx.take_requests(need))))  # (id, _pad, gref)
        grefs, pieces = rx_layout(take, reqs)
        statuses = await self.pages.put(grefs, pieces)
        self.stats.grant_ops = self.pages.grant_ops
        responses, whole = rx_responses(take, reqs, statuses)
        st = self.stats
        st.rx_slots += len(reqs)
        for f, ok in zip(take, whole, strict=True):
            if ok:
                st.rx_frames += 1
                st.rx_bytes += len(f.data)
            else:
                st.rx_dropped += 1
        self._respond(rx, responses, self.rx_port)
        return True

    # -- teardown ---------------------------------------------------------------------

    async def disconnect(self) -> None:
        """Stop, unmap both rings, close the port; queued frames are dropped."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self._tx = self._rx = None
        self._rxq.clear()
        self.multicast.clear()  # xenvif_mcast_addr_list_free
        await self.pages.unmap_all()
        for port in {self.port, self.rx_port} - {-1}:
            try:
                await self.domain.close_port(port)
            except (OSError, HypercallError):
                pass
        self.port = self.rx_port = -1
        if self._maps:
            try:
                await self.domain.unmap_grants(self._maps)
            except (OSError, HypercallError):
                pass
            self._maps = []


__all__ = ["DEFAULT_RX_QUEUE_MAX", "XEN_NETBK_MCAST_MAX", "FrontendRings", "NetbackQueue", "NetbackStats", "RxFrame"]
