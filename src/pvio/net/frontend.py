"""netfront's engine: a guest's network interface as two rings of granted pages.

Theory of operation
-------------------
`NetFront` is the guest end of one vif queue, without XenStore (the XenBus side,
`pvio.net.xenbus_frontend`, writes the keys `setup_rings` returns and reads the
backend's features).  It does what Linux's xen-netfront does, with one deliberate
difference in how grants live:

- `setup_rings(features)` allocates one shareable page for each ring (so netback maps
  exactly those pages live), initialises them, grants them, allocates one unbound event
  channel for both rings (or one each, event-channel-tx/-rx, when the backend offers
  split event channels), and returns the keys: tx-ring-ref, rx-ring-ref, the port(s),
  request-rx-copy, feature-rx-notify, feature-sg and the GSO features
  it accepts (only those the backend offered).
- Each ring id owns one page of the guest's memory, granted once when the rings are
  set up and kept for the connection: transmit pages read-only, receive pages
  writable.  netback copies (GNTTABOP_copy) or, trusted with the map transport, keeps
  them mapped; either way a page whose response came back is free to reuse at once.
  Linux grants and revokes per slot; here
  a frame costs no grant-table operation at all on the guest's side.
- `send(frame, gso, csum_blank)` cuts a frame into page-sized slots (more_data on all
  but the last, the GSO extra-info after the first when the backend accepts GSO), copies
  the bytes into the ids' pages, and pushes once per turn of the event loop with
  RING_PUSH_REQUESTS_AND_CHECK_NOTIFY.  No free ids: `send` returns False, and
  `tx_room_waiters` are called when answers free some (or `wait_tx_room` waits): the TAP
  reader's back-pressure, as Linux's netfront stops its queue rather than drop.
- Receive buffers are posted ahead: every free slot of the rx ring holds a request whose
  id is its ring index (as Linux's netfront), reposted as soon as its response is
  consumed, and netback is kicked only if it asked (feature-rx-notify: it asks for as
  many buffers as its next frame needs).
- The event channel's handler drains both rings' responses, then makes both final
  checks.  Received slots are gathered into frames (more_data, the GSO extra) and
  handed to `on_frame` in pieces: views of the receive pages, valid during the call
  (the buffers are posted again after it), so the guest's TAP writes them with no copy.
  A backend that answers an id not in flight, says a piece lies outside
  its page, or publishes an impossible rsp_prod breaks the device (`broken`), and
  nothing crashes.

Recovery: when the driver domain restarts, the XenBus side (`NetfrontEnd`) closes the
rings and calls `setup_rings` again for the new backend; frames in flight are lost, as
on a real wire, and TCP sends them again.

Multi-queue: a `NetFront` is one queue.  A vif of several queues is several of them,
each with its own rings, pages and ports (`queue_id` says which; a received frame's
`RxMeta.queue` names the queue it came on); the XenBus side lays their keys out under
queue-<i>/ (`pvio.net.multiqueue`).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from pvio.abi import netif as n
from pvio.abi.ring import XEN_PAGE_SIZE
from pvio.hypervisor.client import Domain
from pvio.net.backend import rx_ring, tx_ring
from pvio.net.slots import FrameParts, Gso
from pvio.ring import FrontRing, RingBroken

log = logging.getLogger(__name__)

_TXREQ = n.TX_REQUEST.packer
_TXRSP = n.TX_RESPONSE.packer
_RXREQ = n.RX_REQUEST.packer
_RXRSP = n.RX_RESPONSE.packer
_EXTRA = n.EXTRA_GSO.packer
_TX_MORE = n.NETTXF_more_data

#: The largest frame netfront sends: a 64 KiB GSO segment (as Linux's GSO_MAX_SIZE)
MAX_FRAME = n.XEN_NETIF_MAX_TX_SIZE
#: transmit slots put since the last push at which they are pushed at once (0: never):
#: a whole 64 KiB GSO frame (16 pages and its extra-info); ``PVIO_NET_EARLY_PUSH_SLOTS``
EARLY_PUSH_TX_SLOTS = int(os.environ.get("PVIO_NET_EARLY_PUSH_SLOTS", "17"))


@dataclass
class NetfrontStats:
    tx_frames: int = 0
    tx_bytes: int = 0
    tx_slots: int = 0
    tx_errors: int = 0
    rx_frames: int = 0
    rx_bytes: int = 0
    rx_errors: int = 0
    pushes: int = 0
    notify_sent: int = 0
    notify_received: int = 0


@dataclass(frozen=True)
class BackendFeatures:
    """The backend's feature-* keys, as netfront reads them (absent = 0)."""

    sg: bool = False
    gso_tcpv4: bool = False
    gso_tcpv6: bool = False
    rx_copy: bool = True
    multicast_control: bool = False
    split_event_channels: bool = False
    #: multi-queue-max-queues: the most queues the backend serves
    max_queues: int = 1


@dataclass
class RxMeta:
    """How a received frame came: its checksum state and GSO segment size."""

    flags: int = 0
    gso: Gso | None = None
    #: the queue (ring pair) the frame came on
    queue: int = 0

    @property
    def csum_blank(self) -> bool:
        return bool(self.flags & n.NETRXF_csum_blank)


class NetfrontBroken(Exception):
    """The backend broke the protocol: the device is unusable until set up again."""


@dataclass
class _RxPartial:
    pieces: list[bytes | memoryview] = field(default_factory=list)
    meta: RxMeta = field(default_factory=RxMeta)
    error: bool = False
    want_extra: bool = False
    started: bool = False
    more: bool = False


class NetFront:
    """The guest end of one vif queue (see the module notes)."""

    def __init__(self, domain: Domain, backend_domid: int,
                 on_frame: Callable[[FrameParts, RxMeta], None], *, queue_id: int = 0) -> None:
        self.domain = domain
        self.backend_domid = backend_domid
        self.on_frame = on_frame
        #: which queue of its vif this is (0 without multi-queue)
        self.queue_id = queue_id
        self.stats = NetfrontStats()
        self.features = BackendFeatures()
        self.broken: NetfrontBroken | None = None
        self.port = -1
        self.rx_port = -1  # with split event channels: the receive ring's own port
        self._tx: FrontRing | None = None
        self._rx: FrontRing | None = None
        self._ring_frames: list[int] = []
        self._ring_refs: list[int] = []
        self._tx_pages: list[int] = []
        self._tx_views: list[memoryview] = []  # each id's page
        self._tx_refs: list[int] = []
        self._rx_pages: list[int] = []
        self._rx_refs: list[int] = []
        self._tx_free: list[int] = []
        self._tx_busy: set[int] = set()
        self._partial = _RxPartial()
        self._push_scheduled = False
        self._tx_unpushed = 0  # slots put since the last push
        self._room = asyncio.Event()
        #: called once when transmit slots may have come free (answers, a new backend,
        #: a break): a TAP reader held by back-pressure waits here
        self.tx_room_waiters: list[Callable[[], None]] = []

    # T:1020 netfront sets up its rings and its pages
    # netfront owns both rings: two shareable pages, initialised and granted to the
    # backend's domain, and one event channel.  Each of the 256 transmit ids and 256
    # receive slots owns a page of the guest's memory, granted here once (transmit pages
    # read-only: netback only reads them) -- so sending a frame is writing bytes and a
    # request, never a grant operation.  All receive buffers are posted before the keys
    # are even published, so the first frame netback has finds room.
    # :T
    async def setup_rings(self, features: BackendFeatures) -> dict[str, str]:
        """Set up both rings (again, after `close`: a new backend; frames that were in
        flight are lost, as on a wire) and return the keys to publish."""
        if self._tx is not None:
            await self.close()
        self.features = features
        self.broken = None
        self._partial = _RxPartial()
        self._tx_busy = set()
        dom = self.domain
        await dom.grow_grant_table(2 + n.NET_TX_RING_SIZE + n.NET_RX_RING_SIZE)
        frames = await dom.alloc_shareable_pages(2)
        self._tx = FrontRing.init(tx_ring(dom.frame(frames[0])))
        self._rx = FrontRing.init(rx_ring(dom.frame(frames[1])))
        self._ring_frames = frames
        self._ring_refs = await dom.grant_access(self.backend_domid, frames)
        self._tx_pages = dom.alloc_pages(n.NET_TX_RING_SIZE)
        self._tx_views = [dom.frame(page) for page in self._tx_pages]
        self._tx_refs = await dom.grant_access(self.backend_domid, self._tx_pages, readonly=True)
        self._rx_pages = dom.alloc_pages(n.NET_RX_RING_SIZE)
        self._rx_refs = await dom.grant_access(self.backend_domid, self._rx_pages)
        self._tx_free = list(range(n.NET_TX_RING_SIZE - 1, -1, -1))
        self.port = await dom.alloc_unbound(self.backend_domid)
        dom.set_handler(self.port, self._on_event)
        self.rx_port = self.port
        if features.split_event_channels:
            self.rx_port = await dom.alloc_unbound(self.backend_domid)
            dom.set_handler(self.rx_port, self._on_event)
        self._post_rx()
        self._tx_room_back()
        keys = {
            "tx-ring-ref": str(self._ring_refs[0]),
            "rx-ring-ref": str(self._ring_refs[1]),
            "request-rx-copy": "1",
            "feature-rx-notify": "1",
            "feature-sg": "1" if features.sg else "0",
            "feature-gso-tcpv4": "1" if features.gso_tcpv4 else "0",
            "feature-gso-tcpv6": "1" if features.gso_tcpv6 else "0",
        }
        if self.rx_port != self.port:
            keys["event-channel-tx"] = str(self.port)
            keys["event-channel-rx"] = str(self.rx_port)
        else:
            keys["event-channel"] = str(self.port)
        return keys

    # -- transmit -----------------------------------------------------------------------

    def tx_room(self) -> int:
        """Slots a frame may use now (free ids, and free ring slots)."""
        tx = self._tx
        return 0 if tx is None else min(len(self._tx_free), tx.free_requests())

    async def wait_tx_room(self, slots: int = 1) -> None:
        while self.broken is None and self.tx_room() < slots:
            self._room.clear()
            await self._room.wait()
        if self.broken is not None:
            raise self.broken

    # T:1030 netfront sends a frame
    # A frame of up to 64 KiB becomes one slot per page: the first slot's `size` is the
    # whole length (netback subtracts the later slots' sizes to find the first's own),
    # more_data joins them, and a GSO frame carries an extra-info slot after the first
    # with the segment size the backend should cut it into.  Requests of many frames are
    # pushed together at the end of the event loop's turn: one req_prod store and at most
    # one kick, only if netback asked (req_event); but once a turn has put a large
    # frame's worth of slots (`EARLY_PUSH_TX_SLOTS`) they are pushed at once, so netback
    # starts on them while netfront copies the next frame.
    # :T
    def send(self, frame: bytes | memoryview, gso: Gso | None = None, csum_blank: bool = False) -> bool:
        """Put one frame on the transmit ring; False if there are not enough free ids."""
        if self.broken is not None:
            raise self.broken
        tx = self._tx
        if tx is None:
            return False
        frame = memoryview(frame)  # its pages are sliced, not copied
        length = len(frame)
        if not 0 < length <= MAX_FRAME:
            raise ValueError(f"a frame is 1..{MAX_FRAME} bytes, not {length}")
        pieces = -(-length // XEN_PAGE_SIZE)
        if pieces > 1 and not self.features.sg:
            raise ValueError(f"the backend does not take multi-slot frames ({length} bytes)")
        use_gso = gso is not None and (
            (gso.type == n.XEN_NETIF_GSO_TYPE_TCPV4 and self.features.gso_tcpv4)
            or (gso.type == n.XEN_NETIF_GSO_TYPE_TCPV6 and self.features.gso_tcpv6))
        slots = pieces + (1 if use_gso else 0)
        if pieces > len(self._tx_free) or slots > tx.free_requests():
            return False
        views = self._tx_views
        refs = self._tx_refs
        free = self._tx_free
        ids = free[-pieces:]  # free ids, and their pages, for the frame's pieces
        del free[-pieces:]
        self._tx_busy.update(ids)
        off = 0
        for i in ids:
            chunk = frame[off : off + XEN_PAGE_SIZE]
            views[i][: len(chunk)] = chunk
            off += XEN_PAGE_SIZE
        # the first slot's size is the whole frame's; the last's is what is left of it
        i = ids[0]
        flags = _TX_MORE if pieces > 1 else 0
        if csum_blank:
            flags |= n.NETTXF_csum_blank | n.NETTXF_data_validated
        if use_gso:
            flags |= n.NETTXF_extra_info
        reqs = [_TXREQ.pack(refs[i], 0, flags, i, length)]
        if use_gso:
            # The extra-info takes a ring slot but no id (its response is NETIF_RSP_NULL)
            assert gso is not None
            extra = n.EXTRA_GSO.pack(type=n.XEN_NETIF_EXTRA_TYPE_GSO, size=gso.size, gso_type=gso.type)
            reqs.append(extra + bytes(n.TX_REQUEST.size - len(extra)))
        if pieces > 1:
            reqs += [_TXREQ.pack(refs[i], 0, _TX_MORE, i, XEN_PAGE_SIZE) for i in ids[1:-1]]
            i = ids[-1]
            reqs.append(_TXREQ.pack(refs[i], 0, 0, i, length - (pieces - 1) * XEN_PAGE_SIZE))
        try:
            tx.put_requests(reqs)
        except RingBroken as e:
            self._break(str(e))
            raise self.broken from e  # type: ignore[misc]
        self.stats.tx_frames += 1
        self.stats.tx_bytes += length
        self.stats.tx_slots += slots
        self._tx_unpushed += slots
        if 0 < EARLY_PUSH_TX_SLOTS <= self._tx_unpushed:
            self._push()
        else:
            self._schedule_push()
        return True

    def _schedule_push(self) -> None:
        if not self._push_scheduled:
            self._push_scheduled = True
            asyncio.get_running_loop().call_soon(self._push, True)

    def _push(self, scheduled: bool = False) -> None:
        if scheduled:  # an early push leaves the scheduled one for what the turn puts next
            self._push_scheduled = False
        self._tx_unpushed = 0
        if self.broken is not None:
            return
        kick: set[int] = set()
        try:
            for ring, port in ((self._tx, self.port), (self._rx, self.rx_port)):
                if ring is not None and ring.push_requests_and_check_notify():
                    kick.add(port)
        except RingBroken as e:
            self._break(str(e))
            return
        self.stats.pushes += 1
        for port in kick:
            self.stats.notify_sent += 1
            try:
                self.domain.notify(port)
            except OSError as e:  # pragma: no cover - the port is gone
                log.info("netfront: cannot notify: %s", e)

    # -- receive ------------------------------------------------------------------------

    def _post_rx(self) -> None:
        """Fill every free rx slot; a buffer's id is its ring index (as Linux's netfront),
        so the buffer a response used is known from where it sits in the ring."""
        rx = self._rx
        if rx is None:
            return
        free = rx.free_requests()
        if not free:
            return
        mask = rx.nr_ents - 1
        first = rx.req_prod_pvt
        ids = [(first + k) & mask for k in range(free)]
        rx.put_requests([_RXREQ.pack(i, 0, self._rx_refs[i]) for i in ids])
        self._schedule_push_now_or_later()

    def _schedule_push_now_or_later(self) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # pragma: no cover - set up outside a loop
            return
        self._schedule_push()

    def _on_event(self, port: int) -> None:
        self.stats.notify_received += 1
        self.poll()

    # T:1075 netfront asks for transmit completions by the half
    # A transmit response only gives a slot back, and nothing waits for one slot: netfront
    # asks to be woken when half of the requests in flight are answered (rsp_event that
    # far ahead, as Linux's netfront long did), and takes whatever answers are there
    # whenever it wakes for anything else, such as the receive ring.  A sender blocked
    # on a full ring is woken when half of it is free.
    # :T
    def poll(self) -> None:
        """Consume both rings' responses (the interrupt handler)."""
        tx, rx = self._tx, self._rx
        if self.broken is not None or tx is None or rx is None:
            return
        try:
            while True:
                self._tx_done(tx.take_responses())
                self._rx_done(rx.take_responses())
                self._post_rx()
                half = max(1, (tx.nr_ents - tx.free_requests()) // 2)  # of those in flight
                if not (tx.final_check_for_responses(half) | rx.final_check_for_responses()):
                    break
        except (RingBroken, NetfrontBroken) as e:
            self._break(str(e))

    def _tx_done(self, raws: list[bytes]) -> None:
        if not raws:
            return
        for raw in raws:
            i, status = _TXRSP.unpack(raw)
            if status == n.NETIF_RSP_NULL:
                continue  # an extra-info slot's: no id of its own
            if i not in self._tx_busy:
                raise NetfrontBroken(f"tx response for id {i}, which is not in flight")
            self._tx_busy.discard(i)
            self._tx_free.append(i)
            if status not in (n.NETIF_RSP_OKAY, n.NETIF_RSP_NULL):
                self.stats.tx_errors += 1
        self._tx_room_back()

    def _tx_room_back(self) -> None:
        self._room.set()
        if self.tx_room_waiters:
            waiters, self.tx_room_waiters = self.tx_room_waiters, []
            for waiter in waiters:
                waiter()

    # T:1070 netfront joins received slots into frames
    # Responses come in the order netback filled the buffers: a frame's first piece (its
    # flags say more_data, extra_info, the checksum state), its GSO extra if any, then
    # the other pieces.  Each piece's status is its length; netfront copies it out of the
    # id's page (checked to lie within the page) and puts the buffer straight back on the
    # ring.  A piece in error drops its whole frame, as Linux's netfront does.
    # :T
    def _rx_done(self, raws: list[bytes]) -> None:
        rx = self._rx
        assert rx is not None
        p = self._partial
        mem = self.domain.memory
        mask = rx.nr_ents - 1
        index = rx.rsp_cons - len(raws)
        for raw in raws:
            expected = index & mask
            index += 1
            if p.want_extra:  # the buffer at this index is simply posted again
                etype, eflags, size, gso_type, _pad, _feat = _EXTRA.unpack_from(raw)
                if etype == n.XEN_NETIF_EXTRA_TYPE_GSO:
                    p.meta.gso = Gso(size, gso_type)
                p.want_extra = bool(eflags & n.XEN_NETIF_EXTRA_FLAG_MORE)
            else:
                i, offset, flags, status = _RXRSP.unpack(raw)
                if i != expected:
                    raise NetfrontBroken(f"rx response at index {expected} names id {i}")
                if not p.started:
                    p.started = True
                    p.meta = RxMeta(flags)
                    p.want_extra = bool(flags & n.NETRXF_extra_info)
                if status < 0:
                    p.error = True
                else:
                    if offset + status > XEN_PAGE_SIZE:
                        raise NetfrontBroken(f"rx response id {i}: {offset}+{status} is outside its page")
                    base = self._rx_pages[i] * XEN_PAGE_SIZE + offset
                    p.pieces.append(mem[base : base + status])
                p.more = bool(flags & n.NETRXF_more_data)
            # A frame ends with its last data piece, and its extras read (a one-piece GSO
            # frame's extra comes after its only data response).
            if p.more or p.want_extra:
                continue
            self._partial = _RxPartial()
            self._deliver(p)
            p = self._partial
        if p.pieces:  # a frame not finished in this batch: its buffers are posted again
            p.pieces = [bytes(piece) for piece in p.pieces]

    def _deliver(self, p: _RxPartial) -> None:
        if p.error:
            self.stats.rx_errors += 1
            return
        p.meta.queue = self.queue_id
        self.stats.rx_frames += 1
        self.stats.rx_bytes += sum(len(piece) for piece in p.pieces)
        try:
            self.on_frame(p.pieces, p.meta)
        except Exception:  # pragma: no cover - the guest side's bug
            log.exception("netfront: delivering a frame failed")

    def _break(self, reason: str) -> None:
        if self.broken is None:
            log.warning("netfront: device broken: %s", reason)
            self.broken = NetfrontBroken(reason)
            self._tx_room_back()

    # -- teardown -------------------------------------------------------------------------

    async def close(self) -> None:
        """Give both rings up, end every grant, free the pages."""
        self._tx = self._rx = None
        for port in {self.port, self.rx_port} - {-1}:
            try:
                await self.domain.close_port(port)
            except Exception as e:
                log.info("netfront: closing port %d: %s", port, e)
        self.port = self.rx_port = -1
        dom = self.domain
        pages = dict(zip(self._tx_refs + self._rx_refs, self._tx_pages + self._rx_pages, strict=True))

        def freed(ref: int) -> None:
            frame = pages.pop(ref, None)
            if frame is not None:
                dom.free_pages([frame])

        if pages:
            dom.end_access(list(pages), freed)
        if self._ring_refs:
            dom.end_access(self._ring_refs)
        self._tx_refs, self._rx_refs, self._ring_refs = [], [], []
        self._tx_pages, self._rx_pages, self._ring_frames = [], [], []
        self._tx_views = []
        if self.broken is None:
            self.broken = NetfrontBroken("the device is closed")
        self._room.set()


__all__ = ["BackendFeatures", "NetFront", "NetfrontBroken", "NetfrontStats", "RxMeta"]
