"""blkback's engine: one device's ring, from the frontend's requests to the disk and back.

Theory of operation
-------------------
`BlkbackRing` serves one connected vbd.  It never sees XenStore: the XenBus side
(`pvio.blk.xenbus_backend`) reads the frontend's keys with `pvio.blk.keys` and hands
this engine a `FrontendRing` (ring refs, order, port, ABI); the engine maps the ring
live, binds the event channel and runs until it is stopped or the ring is broken.

One turn of the loop (QEMU's xen-block dataplane and Linux blkback's, in Python):

1. take a batch of requests off the ring — each copied out of shared memory once —
   no more than the in-flight bound allows;
2. parse and validate each (`pvio.blk.request`); a refused request is answered
   BLKIF_RSP_ERROR / BLKIF_RSP_EOPNOTSUPP at once, and the ring keeps going;
3. move the data of all the batch's data requests together: in the map transport
   ONE batched GNTTABOP_map_grant_ref for every segment of the batch (read-only maps for
   WRITE — the data flows out of the guest — writable for READ), then preadv/pwritev
   straight between the granted pages and the image in a thread pool (zero copy), then
   ONE batched unmap (transfers that cannot block — RWF_NOWAIT — run on the loop and
   skip the thread hop); in the copy transport ONE batched GNTTABOP_copy brings WRITE data
   into local bounce pages, and after the reads ONE batched GNTTABOP_copy takes READ
   data back out.  A grant that fails (missing, another domain's, read-only for a READ)
   fails only its own request, with BLKIF_RSP_ERROR, before anything is written;
4. barriers and FLUSH_DISKCACHE: the batch is cut at the barrier; everything before it
   completes (drain), the disk is flushed, the barrier's write runs, and is flushed
   again (QEMU's presync/postsync);
5. responses go into the ring together and are published with
   RING_PUSH_RESPONSES_AND_CHECK_NOTIFY: the frontend is kicked only if it asked
   (rsp_event) — and before sleeping, RING_FINAL_CHECK_FOR_REQUESTS closes the race
   with a frontend that pushed meanwhile.

Batches overlap: a batch's I/O runs as its own task while the loop takes the next one,
up to `max_in_flight` requests in all.  A frontend that publishes an impossible index
(`RingBroken`) breaks this ring only: the engine stops, `broken` names the error and
`on_broken` tells the XenBus side (which reports it with dev_fatal); other devices of
the same driver domain are untouched.  Nothing a frontend sends raises out of the loop.

Statistics are Linux blkback's (oo_req, rd_req, wr_req, f_req, ds_req, rd_sect,
wr_sect) plus what the notification avoidance and batching achieve (notifications sent
and received, batches, grant operations): `BlkbackStats.as_keys()` is what the XenBus
side publishes under the backend directory's ``statistics/``.

Indirect descriptors (`max_indirect_segments`, advertised as
feature-max-indirect-segments): an INDIRECT request's header is checked first
(`check_indirect`), then the indirect pages of every such request of the batch are
fetched together — one map (or copy) — and their segments parsed from the copies
(`pvio.blk.back_grants.BackGrants.fetch`); from there it is a READ or WRITE like any
other.  In the copy transport bounce pages are bounded (`bounce_pages`): a batch whose
segments need more is moved in pieces that fit.

Alternatives rejected: mapping per request (a round trip each: the batch is the unit); a
response per request pushed at once (io/ring.h is batching; large requests are answered in
parts, `in_parts`).  Persistent grants stay mapped, up to `persistent_limit`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import replace
from typing import Any

from pvio.abi import grant_table as gt
from pvio.abi.blkif import BLKIF_OP_INDIRECT, BLKIF_RSP_ERROR, BLKIF_RSP_OKAY, SECTOR_SIZE, BlkifABI
from pvio.blk.back_grants import BackGrants
from pvio.blk.back_io import MAP_PIECE_PAGES, PIECE_PAGES, Work, disk_io, disk_io_now, in_parts
from pvio.blk.back_stats import BlkbackStats
from pvio.blk.keys import FrontendRing
from pvio.blk.polling import backend_window_us, poll_for
from pvio.blk.request import (
    BlkifRequest,
    BlkifRequestError,
    DiskInfo,
    DiskIO,
    build_response,
    parse_request,
    validate,
)
from pvio.hypervisor.client import Domain, GrantMapping, pack_from_grant, pack_to_grant
from pvio.hypervisor.errors import GrantError, HypercallError
from pvio.hypervisor.granting import NoSpace
from pvio.ring import BackRing, RingBroken, SharedRing
from pvio.storage.backend import VectoredBackend
from pvio.trace import TRACE, flow_id

log = logging.getLogger(__name__)

#: Requests a device may have in flight at once (blkback's pending requests).
DEFAULT_MAX_IN_FLIGHT = 64
#: feature-max-indirect-segments: Linux blkback's MAX_INDIRECT_SEGMENTS (one indirect page)
MAX_INDIRECT_SEGMENTS = 256
#: copy transport: bounce pages one ring may hold at once (8 MiB)
DEFAULT_BOUNCE_PAGES = 2048
#: persistent grants unused this long are unmapped (Linux's xen_blkif_pgrant_timeout)
PGRANT_TIMEOUT = 60.0
#: persistent mappings one ring keeps (Linux's xen_blkif_max_pgrants: a 32-slot ring of
#: 32-segment indirect requests and their indirect pages, 32 × 33)
MAX_PGRANTS = 1056


class BlkbackRing:
    """blkback for one connected device (see the module notes)."""

    def __init__(
        self,
        domain: Domain,
        frontend_domid: int,
        disk: VectoredBackend,
        *,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        feature_barrier: bool = True,
        feature_flush_cache: bool = True,
        on_broken: Callable[[BaseException], None] | None = None,
        persistent: bool = False,
        persistent_limit: int = MAX_PGRANTS,
        max_indirect_segments: int = 0,
        sector_size: int = SECTOR_SIZE,
        poll_window_us: int | None = None,  # None: by transport (`backend_window_us`)
        bounce_pages: int = DEFAULT_BOUNCE_PAGES,
        pgrant_timeout: float = PGRANT_TIMEOUT,
    ) -> None:
        self.domain = domain
        self.frontend_domid = frontend_domid
        self._taken: dict[int, int] = {}  # request id -> when it was taken (while tracing)
        self._ring_ref = 0
        self.disk = disk
        self.max_in_flight = max_in_flight
        self.poll_window_us = backend_window_us(domain.transport) if poll_window_us is None else poll_window_us
        self.info = DiskInfo(
            sectors=disk.info.size // sector_size * sector_size // SECTOR_SIZE,
            read_only=disk.info.read_only,
            feature_flush_cache=feature_flush_cache,
            feature_barrier=feature_barrier,
            feature_discard=disk.info.can_trim,
            max_indirect_segments=max_indirect_segments,
            sector_size=sector_size,
        )
        self.on_broken = on_broken
        self.stats = BlkbackStats()
        self.broken: BaseException | None = None
        self.abi: BlkifABI | None = None
        self.port = -1
        #: feature-persistent: keep data mappings (map transport only), up to the limit
        self.grants = BackGrants(domain, frontend_domid, persistent=persistent, limit=persistent_limit,
                                 on_op=self._count_op)
        self.persistent = self.grants.persistent
        self.pgrant_timeout = pgrant_timeout
        self._purge_timer: asyncio.TimerHandle | None = None
        #: copy transport: bounce pages free now (waiters wait on _bounce_free)
        self._bounce = max(min(bounce_pages, domain.nr_pages // 2), MAX_INDIRECT_SEGMENTS)
        self._bounce_free = asyncio.Condition()
        self._ring: BackRing | None = None
        self._ring_maps: list[GrantMapping] = []
        self._wake = asyncio.Event()
        self._in_flight = 0
        self._batches: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    # T:620 blkback attaches: the ring mapped live, the event channel bound
    # When the frontend is Initialised, the XenBus side reads ring-ref(s), event-channel
    # and protocol (pvio.blk.keys) and calls `connect`.  The ring's pages are mapped with
    # one batched map — writable, live (they are shareable pages, so even a copy-
    # transport backend maps them directly) — and become a BackRing with the ABI the
    # frontend's `protocol` key chose: x86_32 frontends have 108-byte requests and the
    # engine reads them with that layout.  The frontend's unbound port is bound with
    # EVTCHNOP_bind_interdomain; its handler only sets a flag that wakes the loop.
    # :T
    async def connect(self, ring: FrontendRing) -> None:
        """Map the ring, bind the event channel, and start serving."""
        maps = await self.domain.map_grants(self.frontend_domid, list(ring.ring_refs), False)
        if not all(m.live and m.view is not None for m in maps):
            await self.domain.unmap_grants(maps)
            raise ValueError("the ring pages are not shareable: they cannot be mapped live")
        self._ring_maps = maps
        pages = [m.view for m in maps if m.view is not None]
        try:
            self._ring = BackRing(SharedRing.for_blkif(pages, ring.abi))
            self.port = await self.domain.bind_interdomain(self.frontend_domid, ring.event_channel)
        except BaseException:
            await self.domain.unmap_grants(maps)
            self._ring_maps = []
            raise
        self.abi = ring.abi
        self._ring_ref = ring.ring_refs[0]  # the first ref names the ring in trace flows
        self.domain.set_handler(self.port, self._on_event)
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._run(), name="blkback")
        if self.persistent:
            self._purge_timer = loop.call_later(self.pgrant_timeout / 2, self._purge)

    def _purge(self) -> None:
        """Let go of persistent mappings unused for pgrant_timeout, when nothing is in flight."""
        self._purge_timer = None
        if self._stopping or self._ring is None:
            return
        if self._in_flight == 0 and not self._batches:
            self._start_task(self._purge_grants())
        self._purge_timer = asyncio.get_running_loop().call_later(self.pgrant_timeout / 2, self._purge)

    async def _purge_grants(self) -> None:
        try:
            n = await self.grants.purge(self.pgrant_timeout)
        except (OSError, HypercallError) as e:
            log.info("blkback d%d: unmapping unused persistent grants: %s", self.frontend_domid, e)
            return
        if n:
            log.debug("blkback d%d: %d unused persistent grants unmapped", self.frontend_domid, n)

    def _start_task(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = (self._task.get_loop() if self._task else asyncio.get_running_loop()).create_task(coro)  # no getpid()
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    def set_size(self, size: int) -> None:
        """The disk was resized: requests are checked against the new end from now on."""
        ss = self.info.sector_size
        self.info = replace(self.info, sectors=size // ss * ss // SECTOR_SIZE)

    def _count_op(self) -> None:
        self.stats.grant_ops += 1

    def _on_event(self, port: int) -> None:
        self.stats.notify_received += 1
        self._wake.set()

    @property
    def connected(self) -> bool:
        return self._task is not None and not self._task.done()

    def occupancy(self) -> tuple[int, int]:
        """(slots in use, nr_ents) of the ring now, for `pvio top`; (0, 0) unconnected or broken."""
        ring = self._ring
        return (0, 0) if ring is None or ring.broken is not None else (ring.occupancy(), ring.nr_ents)

    async def wait_stopped(self) -> None:
        if self._task is not None:
            await asyncio.shield(self._task)

    # T:640 The loop: batches, a bound, and the final check
    # The loop takes every request the ring offers, up to the in-flight bound, as one
    # batch, starts that batch's work as a task and comes straight back for more: disk
    # I/O of one batch overlaps the next batch's mapping.  When nothing is left it keeps
    # looking for a short window (`pvio.blk.polling`: what comes meanwhile needed no
    # kick), then asks for a kick with RING_FINAL_CHECK_FOR_REQUESTS (req_event =
    # req_cons + 1, a full fence, req_prod read again) and sleeps only if that still
    # finds nothing.  At the
    # bound it counts oo_req (Linux's "out of requests") and waits for a batch to finish.
    # :T
    async def _run(self) -> None:
        ring = self._ring
        assert ring is not None
        try:
            while not self._stopping:
                room = self.max_in_flight - self._in_flight
                if room <= 0:
                    self.stats.oo_req += 1
                    await self._wait()
                    continue
                raws = ring.take_requests(room)
                if raws:
                    await self._take_batch(raws)
                    continue
                if await poll_for(lambda: self._stopping or bool(ring.unconsumed_requests()), self.poll_window_us):
                    continue  # came while we looked: no kick was needed (pvio.blk.polling)
                if ring.final_check_for_requests():
                    continue
                await self._wait()
        except RingBroken as e:
            self._set_broken(e)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # pragma: no cover - a bug: fail this device, not the domain
            log.exception("blkback d%d: the engine failed", self.frontend_domid)
            self._set_broken(e)

    async def _wait(self) -> None:
        await self._wake.wait()
        self._wake.clear()

    def _set_broken(self, e: BaseException) -> None:
        if self.broken is None:
            self.broken = e
            log.warning("blkback d%d: ring broken: %s", self.frontend_domid, e)
            if self.on_broken is not None:
                self.on_broken(e)

    async def _take_batch(self, raws: list[bytes]) -> None:
        """Parse and validate a batch; answer refusals; start the data work."""
        assert self.abi is not None
        self.stats.batches += 1
        refused: list[bytes] = []
        group: list[DiskIO] = []
        reqs: list[BlkifRequest | BlkifRequestError] = [parse_request(self.abi, raw) for raw in raws]
        if any(isinstance(r, BlkifRequest) and r.operation == BLKIF_OP_INDIRECT for r in reqs):
            reqs = await self.grants.read_indirect(reqs, self.info)
        for req in reqs:
            try:
                if isinstance(req, BlkifRequestError):
                    raise req
                io = validate(req, self.info)
            except BlkifRequestError as e:
                log.debug("blkback d%d: refused: %s", self.frontend_domid, e)
                self.stats.err_req += 1
                refused.append(build_response(self.abi, e.request.id, e.request.response_op, e.status))
                continue
            if TRACE.on:
                self._taken[req.id] = time.monotonic_ns()
            if io.preflush:
                # A barrier or flush: everything before it (this batch's group included)
                # completes first.
                if group:
                    self._start(group)
                    group = []
                await self._drain()
                self._in_flight += 1
                self._finish(await self._barrier(io))
                self._in_flight -= 1
                continue
            group.append(io)
        if refused:
            self._respond(refused)
        if group:
            self._start(group)

    def _start(self, group: list[DiskIO]) -> None:
        self._in_flight += len(group)
        copy = self.domain.transport == "copy"  # mapped: parts only where they cost no map each
        for part in in_parts(group, PIECE_PAGES if copy else MAP_PIECE_PAGES if self.persistent else 0):
            self._start_task(self._run_group(part))

    async def _drain(self) -> None:
        while self._batches:
            await asyncio.gather(*list(self._batches), return_exceptions=True)

    async def _run_group(self, group: list[DiskIO]) -> None:
        try:
            works = [Work(io) for io in group]
            try:
                await self._do_data(works)
            except (OSError, HypercallError, GrantError, NoSpace) as e:
                # The hypervisor refused the batch, or no bounce pages are left: every
                # request of the batch is answered, in error, rather than left hanging.
                log.warning("blkback d%d: batch failed: %s", self.frontend_domid, e)
                for w in works:
                    w.status = BLKIF_RSP_ERROR
            self._finish(works)
        finally:
            self._in_flight -= len(group)
            self._wake.set()

    # T:660 Moving the data: one map for a part of the batch, then the disk
    # A batch of large requests is worked in parts of a few dozen pages (`in_parts`; mapped, with
    # persistent grants only), each answered when its data has moved, so the frontend sends the
    # first answers on while blkback reads the rest.  Every segment of every data request in a part
    # is mapped by ONE GNTTABOP_map_grant_ref: read-only where the request is a WRITE, writable
    # where it is a READ (so a READ into a page the guest granted read-only fails at the map, as in
    # Linux).  Each mapping's status is checked against its own request: a bad grant fails that
    # request with BLKIF_RSP_ERROR before any byte moves.  The surviving requests' segments become
    # memoryviews onto the guest's pages — byte `first_sect*512` to `(last_sect+1)*512` of each —
    # and go to preadv/pwritev: at once on the loop when the transfer cannot block (RWF_NOWAIT: the
    # page cache has it), otherwise in the thread pool, all requests of the part at once.  Then ONE
    # unmap.  In the copy transport the same shape uses GNTTABOP_copy batches and local bounce pages
    # instead of maps, and the hypervisor copies one part while blkback reads the next.
    # :T
    async def _do_data(self, works: list[Work]) -> None:
        data = [w for w in works if w.io.segments]
        if self.domain.transport == "copy":
            await self._data_by_copy(data)
        elif data:
            await self._data_by_map(data)
        others = [w for w in works if not w.io.segments]
        if others:
            await asyncio.gather(*(self._disk_io(w) for w in others))

    async def _data_by_map(self, works: list[Work]) -> None:
        """Map what is not mapped yet (ONE batch), do the I/O, unmap what is not kept.

        With persistent grants (feature-persistent) a mapping is kept, keyed by (ref,
        read-only), up to `persistent_limit`, and used again by later requests: in the
        steady state a batch costs no hypercall at all, and a request whose every page
        is kept is found in one pass (`kept_views`).
        """
        transient: list[GrantMapping] = []
        try:
            when = time.monotonic()
            grants = self.grants
            slow = []
            for w in works:
                w.buffers = grants.kept_views(w.io.segments, when, whole=w.io.request.whole_pages)
                w.shared = w.buffers is not None and w.io.request.whole_pages  # the kept pages themselves
                if w.buffers is None:
                    slow.append(w)
            keys: list[tuple[int, bool]] = []
            for w in slow:
                write = w.io.kind == "write"
                keys.extend([(seg.gref, write) for seg in w.io.segments])
            found, transient = await grants.map(keys) if slow else ({}, [])
            i = 0
            for w in slow:
                mine = [found[k] for k in keys[i : i + len(w.io.segments)]]
                i += len(w.io.segments)
                views = [m.view for m in mine if m is not None and m.view is not None]
                if len(views) != len(mine):
                    w.status = BLKIF_RSP_ERROR
                    continue
                w.buffers = [v[first * SECTOR_SIZE : (last + 1) * SECTOR_SIZE]
                             for v, (_, first, last) in zip(views, w.io.segments, strict=True)]
            now = getattr(self.disk, "transfer_now", None)
            waiting = [w for w in works if w.status == BLKIF_RSP_OKAY
                       and not (now is not None and disk_io_now(now, w, self.frontend_domid))]
            if waiting:
                await asyncio.gather(*(self._disk_io(w) for w in waiting))
        finally:
            for w in works:
                for b in () if w.shared else w.buffers or ():
                    b.release()
                w.buffers = None
            await self.grants.unmap(transient)

    async def _data_by_copy(self, works: list[Work]) -> None:
        """Move the works' data through bounce pages, in pieces that fit the bound."""
        piece: list[Work] = []
        size = 0
        for w in works:
            n = len(w.io.segments)
            if piece and size + n > self._bounce:
                await self._copy_piece(piece, size)
                piece, size = [], 0
            piece.append(w)
            size += n
        if piece:
            await self._copy_piece(piece, size)

    async def _copy_piece(self, works: list[Work], nframes: int) -> None:
        async with self._bounce_free:
            await self._bounce_free.wait_for(lambda: self._bounce >= nframes)
            self._bounce -= nframes
        try:
            await self._copy_through(works, nframes)
        finally:
            async with self._bounce_free:
                self._bounce += nframes
                self._bounce_free.notify_all()

    async def _copy_through(self, works: list[Work], nframes: int) -> None:
        frames = self.domain.alloc_pages(nframes)
        try:
            pos = 0
            for w in works:
                n = len(w.io.segments)
                w.frames = frames[pos : pos + n]
                pos += n
                w.buffers = [
                    self.domain.frame(f)[: seg.length] for f, seg in zip(w.frames, w.io.segments, strict=True)
                ]
            writes = [w for w in works if w.io.kind == "write"]
            if writes:
                await self._copy(writes, inbound=True)
            now = getattr(self.disk, "transfer_now", None)
            waiting = [w for w in works if w.status == BLKIF_RSP_OKAY
                       and not (now is not None and disk_io_now(now, w, self.frontend_domid))]
            if waiting:
                await asyncio.gather(*(self._disk_io(w) for w in waiting))
            reads = [w for w in works if w.io.kind == "read" and w.status == BLKIF_RSP_OKAY]
            if reads:
                await self._copy(reads, inbound=False)
        finally:
            for w in works:
                for b in w.buffers or ():
                    b.release()
                w.buffers = None
            self.domain.free_pages(frames)

    async def _copy(self, works: list[Work], *, inbound: bool) -> None:
        """One GNTTABOP_copy for every segment of `works` (into or out of the guest)."""
        ops: list[bytes] = []
        owners: list[Work] = []
        dom = self.frontend_domid
        for w in works:
            assert w.frames is not None
            for f, seg in zip(w.frames, w.io.segments, strict=True):
                if inbound:
                    ops.append(pack_from_grant(dom, seg.gref, f, seg.length, seg.offset))
                else:
                    ops.append(pack_to_grant(f, dom, seg.gref, seg.length, seg.offset))
                owners.append(w)
        self.stats.grant_ops += 1
        statuses = await self.domain.copy_packed(b"".join(ops))
        for w, status in zip(owners, statuses, strict=True):
            if status != gt.GNTST_okay:
                w.status = BLKIF_RSP_ERROR

    async def _disk_io(self, w: Work) -> None:
        await disk_io(self.disk, w, self.frontend_domid)

    async def _barrier(self, io: DiskIO) -> list[Work]:
        """WRITE_BARRIER / FLUSH_DISKCACHE: flush, the write (if any), flush."""
        w = Work(io)
        try:
            await self.disk.flush()
        except OSError:
            w.status = BLKIF_RSP_ERROR
            return [w]
        if io.segments:
            try:
                await self._do_data([w])
            except (OSError, HypercallError, GrantError, NoSpace) as e:
                # As in _run_group: the barrier is answered in error, the ring goes on.
                log.warning("blkback d%d: barrier failed: %s", self.frontend_domid, e)
                w.status = BLKIF_RSP_ERROR
        return [w]

    # T:670 Answering: responses in a batch, a kick only when asked
    # Finished requests are counted (rd_req, wr_sect, ...) and their responses written
    # into the ring together; RING_PUSH_RESPONSES_AND_CHECK_NOTIFY publishes rsp_prod and
    # says whether the frontend's rsp_event lies in the range just published — only then
    # is the event channel kicked.  A frontend that keeps many requests in flight and
    # drains responses in a loop therefore hears far less than one kick per request.
    # :T
    def _finish(self, works: Sequence[Work]) -> None:
        assert self.abi is not None
        out = []
        st = self.stats
        for w in works:
            io = w.io
            if w.status != BLKIF_RSP_OKAY:
                st.err_req += 1
            elif io.kind == "read":
                st.rd_req += 1
                st.rd_sect += io.sectors
            elif io.kind == "write":
                st.wr_req += 1
                st.wr_sect += io.sectors
                if io.preflush:
                    st.f_req += 1
            elif io.kind == "flush":
                st.f_req += 1
            elif io.kind == "discard":
                st.ds_req += 1
            out.append(build_response(self.abi, io.request.id, io.request.response_op, w.status))
            if TRACE.on and (taken := self._taken.pop(io.request.id, 0)):
                TRACE.span(f"blkback {io.kind}", "blk", taken,
                           args={"sector": io.request.sector_number, "bytes": io.length, "status": w.status},
                           flow=flow_id(self.frontend_domid, self._ring_ref, io.request.id, io.request.sector_number))
        self._respond(out)

    def _respond(self, responses: list[bytes]) -> None:
        ring = self._ring
        if ring is None or ring.broken is not None:
            return
        try:
            ring.put_responses(responses)
            if ring.push_responses_and_check_notify():
                self.stats.notify_sent += 1
                self.domain.notify(self.port)
        except RingBroken as e:
            self._set_broken(e)
        except (OSError, HypercallError) as e:  # the frontend's port is gone (domain died)
            log.info("blkback d%d: cannot notify: %s", self.frontend_domid, e)

    # -- teardown ---------------------------------------------------------------------

    async def disconnect(self) -> None:
        """Stop taking requests, finish those in flight, unmap the ring, close the port."""
        self._stopping = True
        self._wake.set()
        if self._purge_timer is not None:
            self._purge_timer.cancel()
            self._purge_timer = None
        if self._task is not None:
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await self._drain()
        self._task = None
        self._ring = None
        if self.port >= 0:
            try:
                await self.domain.close_port(self.port)
            except (OSError, HypercallError):
                pass
            self.port = -1
        try:
            await self.grants.release()
        except (OSError, HypercallError):
            pass
        if self._ring_maps:
            try:
                await self.domain.unmap_grants(self._ring_maps)
            except (OSError, HypercallError):
                pass
            self._ring_maps = []


__all__ = ["DEFAULT_MAX_IN_FLIGHT", "MAX_INDIRECT_SEGMENTS", "BlkbackRing", "BlkbackStats"]
