"""blkfront's engine: a guest's disk as a queue of blkif requests over a shared ring.

Theory of operation
-------------------
`BlkFront` is the guest end of one vbd, without XenStore (the XenBus side,
`pvio.blk.xenbus_frontend`, writes the keys this engine produces and reads the
backend's).  It does what Linux's xen-blkfront does:

- `setup_ring()` allocates 2**order *shareable* pages for each ring (so a backend of
  either transport maps them live), initialises them (SHARED_RING_INIT), grants them to
  the backend's domain and allocates an unbound event channel for it; it returns the
  XenStore keys (ring-ref / ring-refN + ring-page-order, event-channel, protocol) to
  write in one transaction.  With multi-queue (`set_queues(n)`, n > 1: the smaller of
  what the guest wants and the backend's multi-queue-max-queues) there are n rings
  (`pvio.blk.front_queue`), their keys under queue-0/ … queue-<n-1>/ and
  multi-queue-num-queues beside them; a request goes to the ring with the most free
  slots.
- `connect(disk)` takes the backend's `BackendDisk` (sectors, info, features) and opens
  the queue.
- Each I/O is split into requests of at most 11 segments — or, when the backend offers
  indirect descriptors (feature-max-indirect-segments), of up to
  `want_indirect_segments` (32, Linux's default) in one BLKIF_OP_INDIRECT whose
  segments sit in indirect pages granted read-only; each segment is one page of the
  guest's own memory, granted to the backend with one grant reference claimed in
  advance (read-only when the backend only reads it: a WRITE).  Segments never cross a
  page.  The request's exact bytes and its grants are kept in a shadow
  (`pvio.blk.shadow`) whose index is the request id.
- Requests issued in one turn of the loop are pushed together: one kick at most, only
  if the backend asked (req_event).  A request waits for a free shadow (a ring slot),
  for a grant free callback when the table runs dry, and, with persistent grants, for
  pooled pages once the pool holds a full ring's (what blkback keeps mapped).
- Responses are consumed from the event channel's handler, then
  RING_FINAL_CHECK_FOR_RESPONSES; each is matched to its shadow — an unknown id, a
  duplicate, a wrong operation or an impossible rsp_prod marks the device broken: every
  waiting caller gets EIO, and so does every later call.  The grants end (deferred
  while the backend still has them mapped; the pages are reused only when freed).
- Recovery (blkif_recover): `suspend()` takes the ring away (on a backend that died, or
  on request), `setup_ring()` makes a new one, and after the new backend connects
  `resume()` puts every shadow still in flight back into the ring with its original
  bytes and grants.  Callers wait through this and see no error; a write whose
  response never came is simply written again.
- Persistent grants (feature-persistent, when both ends say so — the backend says it
  with Connected): data pages stay granted read-write and are reused by later requests,
  so a backend that keeps their mappings needs no hypercall in the steady state; every
  PURGE_INTERVAL seconds the pooled grants the backend no longer maps are revoked and
  freed (Linux's purge_persistent_grants).
- `BlockBackend` (`pvio.blk.front_io`): `read`/`write`/`flush`/`trim` of any offset
  and length, so the NBD export serves the disk directly; a READ's data may be lent in
  its pages (`pvio.storage.lent`), which go back to the pool when the loan ends.

Alternatives rejected: a bounce buffer per request (the guest's own pages are granted
directly; the data is copied once, between the caller's bytes and those pages)."""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import time
from collections.abc import Callable

from pvio.abi.blkif import (
    ABI_NATIVE,
    BLKIF_MAX_SEGMENTS_PER_REQUEST,
    BLKIF_OP_DISCARD,
    BLKIF_OP_NAMES,
    BLKIF_OP_READ,
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
    SECTOR_SIZE,
    BlkifABI,
)
from pvio.abi.grant_table import GREFS_PER_GRANT_FRAME
from pvio.blk.errors import DeviceBroken, DeviceBusy
from pvio.blk.front_grants import PURGE_INTERVAL, FrontGrants
from pvio.blk.front_io import FrontBlockIO
from pvio.blk.front_queue import BlkfrontStats, FrontQueue, pick, write_indirect
from pvio.blk.keys import BackendDisk
from pvio.blk.polling import PollWindow
from pvio.blk.request import (
    Segment,
    build_discard,
    build_indirect,
    build_request,
    indirect_pages,
    indirect_pages_for,
    pack_page_segments,
    page_segments,
    parse_response,
)
from pvio.blk.shadow import (
    BackendProtocolError,
    Pending,
    Shadow,
    Submitted,
    page_runs,
    status_error,
)
from pvio.hypervisor.client import Domain
from pvio.hypervisor.domain import PAGE_SIZE
from pvio.ring import RingBroken
from pvio.storage.lent import Lent
from pvio.trace import CURRENT_FLOW, TRACE, flow_id

log = logging.getLogger(__name__)


#: Segments an indirect request carries at most unless told otherwise (Linux blkfront's
#: max_indirect_segments default)
DEFAULT_INDIRECT_SEGMENTS = 32


class BlkFront(FrontBlockIO):
    """The guest end of one vbd (see the module notes)."""

    def __init__(
        self,
        domain: Domain,
        backend_domid: int,
        *,
        ring_order: int = 0,
        abi: BlkifABI = ABI_NATIVE,
        handle: int = 0,
        want_indirect_segments: int = DEFAULT_INDIRECT_SEGMENTS,
    ) -> None:
        self.domain = domain
        self.backend_domid = backend_domid
        self.ring_order = ring_order
        self.abi = abi
        self.handle = handle
        self.nr_ents = abi.ring_size(ring_order)
        self.queues = [FrontQueue(0, self.nr_ents)]
        self.stats = BlkfrontStats()
        self.disk: BackendDisk | None = None
        self.broken: DeviceBroken | None = None
        #: why no backend serves the disk now (it closed the device, or none came back in
        #: time): requests fail with EIO at once instead of waiting, until one connects
        self.unavailable: str | None = None
        self.users = 0
        self._running = asyncio.Event()  # set while requests may be put into the ring
        self._rmw = asyncio.Lock()
        self.on_broken: Callable[[DeviceBroken], None] | None = None
        #: feature-persistent: data pages stay granted (read-write) and are reused
        self.persistent = False
        #: segments of one indirect request: the smaller of ours and the backend's
        #: feature-max-indirect-segments, 0 (direct requests only) when that is <= 11
        self.want_indirect_segments = want_indirect_segments
        self.max_indirect_segments = 0
        self._purger: asyncio.TimerHandle | None = None
        self.grants = FrontGrants(domain, backend_domid, on_wait=self._grant_wait, check=self._check_broken)
        #: before the response handler sleeps, it polls (`pvio.blk.polling`)
        self._window = PollWindow(lambda: any([self._poll(q, arm=False) for q in self.queues]),
                                  self._outstanding, self.poll)

    def set_ring_order(self, order: int, queues: int | None = None) -> None:
        """Choose the rings' size (and number) before the first `setup_ring`."""
        if self.in_flight() or any(q.ring is not None for q in self.queues):
            raise RuntimeError("the ring geometry is fixed once the rings exist")
        self.ring_order = order
        self.nr_ents = self.abi.ring_size(order)
        n = len(self.queues) if queues is None else queues
        if n < 1:
            raise ValueError("a vbd has at least one queue")
        self.queues = [FrontQueue(i, self.nr_ents) for i in range(n)]

    def in_flight(self) -> list[Shadow]:
        return [s for q in self.queues for s in q.shadows.in_flight()]

    @property
    def port(self) -> int:
        """The first ring's event channel (the only one without multi-queue)."""
        return self.queues[0].port

    # T:610 blkfront sets up its ring and says where it is
    # The frontend owns the ring: 2**order pages of its own memory, allocated shareable so
    # that the backend maps exactly those pages live and nothing else; SHARED_RING_INIT
    # sets both producers to 0 and both events to 1.  Each page is granted to the backend
    # domain (writable: the backend writes responses), an unbound event channel is
    # allocated for the backend to bind, and the keys that tell the backend where all
    # this is — ring-ref (or ring-refN with ring-page-order), event-channel, protocol —
    # are returned to be written in one XenStore transaction with the switch to
    # Initialised (pvio.blk.xenbus_frontend), so blkback's watch fires only when all of
    # it is there.  blkback answers, in its own transaction, with Connected and the
    # disk's sectors, info and features, which blkfront reads (checked: they are hostile
    # input too) before it opens the queue.
    # :T
    async def setup_ring(self) -> dict[str, str]:
        """Allocate, initialise and grant the ring; allocate the port; return the keys."""
        per_request = max(BLKIF_MAX_SEGMENTS_PER_REQUEST, self.want_indirect_segments)
        per_request += indirect_pages(self.want_indirect_segments)
        gnttab = self.domain.gnttab  # as many as the table can hold: claims wait beyond that
        room = gnttab.free_count + (gnttab.max_frames - gnttab.nr_frames) * GREFS_PER_GRANT_FRAME
        n = len(self.queues)
        want = n * (self.nr_ents * per_request + (1 << self.ring_order))
        await self.domain.grow_grant_table(min(room, want))
        keys = {"protocol": self.abi.protocol}
        if self.ring_order:
            keys["ring-page-order"] = str(self.ring_order)
        if n > 1:
            keys["multi-queue-num-queues"] = str(n)
        for q in self.queues:
            mine = await q.setup(self.domain, self.backend_domid, self.abi, self.ring_order,
                                 functools.partial(self._on_event, q))
            keys.update((f"queue-{q.index}/{k}" if n > 1 else k, v) for k, v in mine.items())
        return keys

    def connect(self, disk: BackendDisk) -> None:
        """The backend is Connected: open the queue for `disk`."""
        if disk.sector_size != SECTOR_SIZE:
            log.info("blkfront: sector-size %d; requests stay in 512-byte units", disk.sector_size)
        self.disk = disk
        self._negotiate(disk)
        self._running.set()

    def _negotiate(self, disk: BackendDisk) -> None:
        n = min(disk.max_indirect_segments, self.want_indirect_segments)
        self.max_indirect_segments = n if n > BLKIF_MAX_SEGMENTS_PER_REQUEST else 0
        segs = max(BLKIF_MAX_SEGMENTS_PER_REQUEST, n)  # the pool: full rings' pages (32 × 33, as blkback keeps)
        self.grants.cap = sum(q.nr_ents for q in self.queues) * (segs + indirect_pages_for(segs))
        if self.persistent and self._purger is None:
            self._purger = asyncio.get_running_loop().call_later(PURGE_INTERVAL, self._purge)

    def set_persistent(self, on: bool) -> None:
        """Use persistent grants from now on, or stop (the pool's grants end)."""
        self.persistent = on
        if not on:
            self.grants.release_pool()

    def _purge(self) -> None:
        self._purger = None
        if self.broken is None and self.persistent:
            if n := self.grants.purge():
                log.debug("blkfront: %d unused persistent grants purged", n)
            self._purger = asyncio.get_running_loop().call_later(PURGE_INTERVAL, self._purge)

    @property
    def max_request_bytes(self) -> int:
        return max(BLKIF_MAX_SEGMENTS_PER_REQUEST, self.max_indirect_segments) * PAGE_SIZE

    def disk_if_connected(self) -> BackendDisk | None:
        return self.disk

    def _disk(self) -> BackendDisk:
        if self.disk is None:
            raise OSError(errno.ENXIO, "blkfront: not connected")
        return self.disk

    # -- issuing requests ---------------------------------------------------------------

    # T:630 One request: a shadow, a grant per page, into the ring
    # A request waits for a free id (a shadow, and so a ring slot: there are exactly as
    # many as the ring has slots) and for grant references: when the table is dry it
    # registers a free callback and sleeps until references come back.  Each page of
    # data is one segment, sectors 0..n-1 of its own page, granted read-only for a WRITE
    # (the backend only reads it) and writable for a READ.  The request's exact bytes are
    # kept in the shadow, for the response's checks and for re-issue after recovery.
    # Many requests made in one turn of the event loop are pushed with one
    # RING_PUSH_REQUESTS_AND_CHECK_NOTIFY.
    # :T
    async def _issue(
        self,
        operation: int,
        sector: int,
        payload: bytes | memoryview | None,
        nbytes: int,
        read_into: memoryview | None = None,
        want_bytes: bool = False,
        lend: bool = False,
        pages: list[tuple[int, int]] | None = None,
    ) -> bytes | Lent:
        """One request for `nbytes` (a multiple of 512, up to `max_request_bytes`) at
        `sector`; returns the data of a READ made with `want_bytes`, or lent (`lend`), else
        b"".  `pages`: pooled pages taken for it already (given back if it never starts)."""
        self._check_broken()
        # A discard names sectors, it carries no data: no pages, no grants.
        npages = 0 if operation == BLKIF_OP_DISCARD else -(-nbytes // PAGE_SIZE)
        # More than 11 pages: one INDIRECT request, its segments in pages of their own.
        nind = indirect_pages_for(npages)
        queues = self.queues
        q = queues[0] if len(queues) == 1 else pick(queues)
        # Pooled pages before the slot, as a lent READ of several requests takes them (taken
        # in two orders, pages and slots could each be held by someone waiting for the other).
        pooled = pages if pages is not None or not self.persistent else await self.grants.take_pooled(npages + nind)
        try:
            await q.ids.acquire()
        except BaseException:
            self.grants.put_back(pooled, (), self.persistent)
            raise
        try:
            await self._wait_running()
            if pooled is not None:
                grefs, frames = [r for r, _ in pooled], [f for _, f in pooled]
            else:
                grefs = await self.grants.claim(npages + nind)
                frames = self.domain.alloc_pages(npages + nind)
        except BaseException:
            q.ids.release()
            self.grants.put_back(pooled, (), self.persistent)
            raise
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        pending = Pending(fut, frames[:npages], nbytes, read_into, pooled, want_bytes, lend)
        shadow = self._shadow(q, operation, sector, payload, nbytes, npages, nind, grefs, frames, pending)
        self.stats.requests += 1
        t0 = time.monotonic_ns() if TRACE.on else 0
        self._put(q, shadow, npages, operation == BLKIF_OP_READ)
        status = await fut
        if TRACE.on and t0:  # the request's hop in this domain; blkback names it alike
            flow = flow_id(self.domain.domid, q.ring_refs[0] if q.ring_refs else 0, shadow.id, sector)
            if (flows := CURRENT_FLOW.get()) is not None:
                flows.append(flow)
            TRACE.span(f"blkfront {BLKIF_OP_NAMES.get(shadow.operation)}", "blk", t0,
                       args={"sector": sector, "bytes": nbytes, "status": status, "queue": q.index}, flow=flow)
        if status != BLKIF_RSP_OKAY:
            raise status_error(shadow, status)
        return pending.data

    def _shadow(
        self, q: FrontQueue, operation: int, sector: int, payload: bytes | memoryview | None, nbytes: int,
        npages: int, nind: int, grefs: list[int], frames: list[int], pending: Pending,
    ) -> Shadow:
        """Grant the pages (unless pooled), write the payload and indirect pages, and
        build the request into a shadow of `q`."""
        if pending.pooled is None:
            readonly = operation != BLKIF_OP_READ
            for ref, frame in zip(grefs[:npages], frames[:npages], strict=True):
                self.grants.grant(ref, frame, readonly)
        segs: list[Segment] = []
        if nind:  # the segments go into the indirect pages, packed straight from the references
            raw = pack_page_segments(grefs[:npages], nbytes)
            write_indirect(self.domain, self.grants, raw, grefs[npages:], frames[npages:], pending.pooled is None)
        else:
            segs = page_segments(grefs[:npages], nbytes)
        if payload is not None:
            mem = self.domain.memory
            for pos, start, n in page_runs(frames[:npages], nbytes):
                mem[start : start + n] = payload[pos : pos + n]
        if operation == BLKIF_OP_DISCARD:
            return q.shadows.alloc(
                operation, sector,
                lambda i: build_discard(self.abi, i, sector, nbytes // SECTOR_SIZE, handle=self.handle),
                (), pending,
            )
        if nind:
            ind = grefs[npages:]
            return q.shadows.alloc(
                operation, sector,
                lambda i: build_indirect(self.abi, operation, i, sector, npages, ind, self.handle),
                tuple(grefs), pending,
            )
        return q.shadows.alloc(operation, sector, lambda i: build_request(
            self.abi, operation, i, sector, segs, self.handle), tuple(grefs), pending)

    # T:635 The short way: a request put in the caller's own turn of the loop
    # An NBD READ or WRITE that fits one request (an INDIRECT one too: 64 KiB is 16
    # pages) and needs no waiting -- a free id, enough persistent pages in the pool (or
    # free grant references and pages), the ring running, tracing off -- is put into
    # the ring by `submit` at once, and its response calls the caller back from the
    # event handler: no task, no future, no coroutine per request.  Anything else (the first requests, before
    # the pool has pages; a full ring; a device not running) says False, and the
    # caller takes the awaiting way, `_issue`, which waits for what is missing.
    # :T
    def room(self, requests: int, npages: int) -> bool:
        """Whether `requests` requests of `npages` pages each surely go into the ring now."""
        if self.broken is not None or self.unavailable is not None or not self._running.is_set() or TRACE.on:
            return False
        nind = indirect_pages_for(npages)
        if (nind and npages > self.max_indirect_segments) or (
                self.persistent and (len(self.grants.pool) < (npages + nind) * requests or self.grants.pool_waiters)):
            return False
        return requests == 1 or (self.persistent and len(self.queues) == 1
                                 and self.queues[0].ids.free_now() >= requests)

    def _submit(self, operation: int, sector: int, payload: bytes | memoryview | None, nbytes: int,
                done: Submitted, read_into: memoryview | None = None, lend: bool = False) -> bool:
        npages = -(-nbytes // PAGE_SIZE)
        if not self.room(1, npages):
            return False
        nind = indirect_pages_for(npages)
        queues = self.queues
        q = queues[0] if len(queues) == 1 else pick(queues)
        if not q.ids.try_acquire():
            return False
        pooled: list[tuple[int, int]] | None = None
        if self.persistent:
            pooled = self.grants.take_from_pool(npages + nind)
            grefs, frames = [r for r, _ in pooled], [f for _, f in pooled]
        else:
            got = self.grants.claim_now(npages + nind)
            if got is None:
                q.ids.release()
                return False
            grefs, frames = got
        want_bytes = operation == BLKIF_OP_READ and read_into is None and not lend
        pending = Pending(None, frames[:npages], nbytes, read_into, pooled, want_bytes, lend, done=done)
        shadow = self._shadow(q, operation, sector, payload, nbytes, npages, nind, grefs, frames, pending)
        self.stats.requests += 1
        self._put(q, shadow, npages, operation == BLKIF_OP_READ)
        return True

    async def _wait_running(self) -> None:
        while not self._running.is_set():
            self._check_broken()
            await self._running.wait()
        self._check_broken()
        if self.unavailable is not None:
            raise OSError(errno.EIO, f"blkfront: no backend serves the disk: {self.unavailable}")

    def fail_in_flight(self, reason: str) -> int:
        """No backend will answer for now: every request in flight fails with EIO, and
        new ones at once, until a backend connects again (`resume`); returns how many
        failed.  What was acknowledged stays acknowledged; the device is not broken."""
        if self.unavailable is None:
            log.warning("blkfront: failing requests: %s", reason)
        self.unavailable = reason
        failed = 0
        for q in self.queues:
            for shadow in q.shadows.in_flight():
                self._complete(q, shadow.id, shadow.operation, BLKIF_RSP_ERROR)
                failed += 1
        self._running.set()  # wake the waiters: they fail now
        return failed

    def _grant_wait(self) -> None:
        self.stats.grant_waits += 1

    def _put(self, q: FrontQueue, shadow: Shadow, pages: int, read: bool) -> None:
        ring = q.ring
        assert ring is not None
        try:
            ring.put_request(shadow.request)
        except RingBroken as e:
            self._break(str(e))
            return
        if q.put_pages(pages, read):  # enough for blkback to start on (front_queue)
            self._push(q)  # a push already scheduled stays so, for what the turn puts next
        elif not q.push_scheduled:
            q.push_scheduled = True
            asyncio.get_running_loop().call_soon(self._push, q, True)

    def _push(self, q: FrontQueue, scheduled: bool = False) -> None:
        if scheduled:
            q.push_scheduled = False
        if self.broken is not None or not self._running.is_set():
            return
        try:
            self.stats.pushes += 1
            if q.push(self.domain):
                self.stats.notify_sent += 1
            self._settle(q)
        except RingBroken as e:
            self._break(str(e))
        except OSError as e:  # pragma: no cover - the port is gone: recovery will follow
            log.info("blkfront: cannot notify: %s", e)

    # T:680 Responses: the interrupt handler's loop and its final check
    # The event channel's handler consumes every response published, then asks for the
    # next kick with RING_FINAL_CHECK_FOR_RESPONSES and loops if more came meanwhile.
    # Each response is matched to its shadow by id; an id out of range, one not in
    # flight, or an operation that is not the request's proves the backend broken, as
    # does an rsp_prod beyond the requests published (RingBroken): the device is marked
    # broken and every caller fails with EIO instead of waiting for ever.  A READ's data
    # is copied out of the pages, then the grants end; a page goes back to the allocator
    # only when its grant is really free (a backend may still have it mapped).
    # :T
    def _outstanding(self) -> int:
        return sum(q.nr_ents - q.shadows.free for q in self.queues)

    def _on_event(self, q: FrontQueue, port: int) -> None:
        self.stats.notify_received += 1
        self._poll(q, arm=False)
        self._settle(q)

    def _settle(self, q: FrontQueue) -> None:
        """Requests in flight and no window looking: poll for a while (a shallow queue)
        or arm the event (the final check) -- nothing is left unwatched."""
        if self._window.active or not self._outstanding():
            return
        self._window.start()
        if not self._window.active:
            self._poll(q)

    def poll(self) -> None:
        """Consume every available response of every ring (the interrupt handler)."""
        for q in self.queues:
            self._poll(q)

    def _poll(self, q: FrontQueue, arm: bool = True) -> bool:
        """Consume q's responses, then (`arm`) the final check; True if there were any."""
        if self.broken is not None or q.ring is None:
            return False
        got = False
        try:
            for raw in q.responses() if arm else q.ring.take_responses():
                got = True
                self._complete(q, *parse_response(self.abi, raw))
        except (RingBroken, BackendProtocolError) as e:
            self._break(str(e))
        return got

    def _complete(self, q: FrontQueue, req_id: int, operation: int, status: int) -> None:
        shadow = q.shadows.complete(req_id, operation)
        pending: Pending = shadow.cookie
        q.ids.release()
        if pending.lend and status == BLKIF_RSP_OKAY:  # the pages come back when the loan ends
            pooled, grefs = pending.pooled, shadow.grefs
            pending.lend_data(self.domain.memory, lambda: self.grants.put_back(pooled, grefs, self.persistent))
        else:
            if status == BLKIF_RSP_OKAY:
                pending.copy_data(self.domain.memory)
            self.grants.put_back(pending.pooled, shadow.grefs, self.persistent)
        if pending.done is not None:
            pending.done(None if status == BLKIF_RSP_OKAY else status_error(shadow, status), pending.data)
        elif pending.future is not None and not pending.future.done():
            pending.future.set_result(status)
        elif isinstance(pending.data, Lent):  # its caller is gone
            pending.data.release()

    def _check_broken(self) -> None:
        if self.broken is not None:
            raise DeviceBroken(self.broken.reason)

    def _break(self, reason: str) -> None:
        if self.broken is not None:
            return
        log.warning("blkfront: device broken: %s", reason)
        self.broken = DeviceBroken(reason)
        self._running.set()  # wake waiters so they see the error
        for q in self.queues:
            for shadow in q.shadows.reset():
                pending: Pending = shadow.cookie
                if pending.done is not None:
                    pending.done(DeviceBroken(reason), b"")
                elif pending.future is not None and not pending.future.done():
                    pending.future.set_exception(DeviceBroken(reason))
        if self.on_broken is not None:
            self.on_broken(self.broken)

    # -- recovery ----------------------------------------------------------------------

    # T:690 Recovery: the shadows are the memory of what to send again
    # When the backend goes away (its domain died, or the guest suspends), `suspend`
    # stops the queue and gives the ring up: the port is closed and the ring's grants end
    # (the backend's mappings are gone with its domain).  A new ring and port are set up
    # and advertised; when the new backend is Connected, `resume` writes every shadow
    # still in flight into the new ring, byte for byte as first sent — same id, same
    # grants, the data pages untouched — and pushes.  The callers' futures never noticed:
    # their requests simply complete later.  A write that had reached the disk is
    # written again, which is harmless; one that had not is now done.
    # :T
    async def suspend(self) -> None:
        """Stop the queue and drop the ring (blkfront_resume's first half)."""
        self._running.clear()
        self.poll()  # whatever the old backend completed still counts
        for q in self.queues:
            await q.teardown(self.domain)

    def resume(self, disk: BackendDisk | None = None) -> int:
        """After the backend reconnected: re-issue every request in flight; returns how many."""
        if disk is not None:
            self.disk = disk
            self._negotiate(disk)
        self.unavailable = None
        reissued = 0
        for q in self.queues:
            assert q.ring is not None, "setup_ring() first"
            shadows = q.shadows.in_flight()
            if shadows:
                q.ring.put_requests([s.request for s in shadows])
                reissued += len(shadows)
        self.stats.reissued += reissued
        self._running.set()
        for q in self.queues:
            self._push(q)
        return reissued

    # -- users and teardown ----------------------------------------------------------------

    def open(self) -> None:
        """A user (an export) holds the disk: close is refused until `release`."""
        self.users += 1

    def release(self) -> None:
        self.users = max(0, self.users - 1)

    async def close(self, *, force: bool = False) -> None:
        """Give the ring up and end its grants; refused while the disk has users."""
        if self.users > 0 and not force:
            raise DeviceBusy(self.users)
        if self.in_flight() and self.broken is None:
            self._break("closed with requests in flight")
        await self.suspend()
        if self.broken is None:  # from now on every call fails instead of waiting
            self.broken = DeviceBroken("the disk is closed")
            self._running.set()
        if self._purger is not None:
            self._purger.cancel()
            self._purger = None
        self.set_persistent(False)  # the pool's grants end, and so do those of pages lent now

