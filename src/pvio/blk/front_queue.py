"""One ring of a blkfront: its pages, event channel, shadows and request ids.

Theory of operation
-------------------
A vbd has one ring, or — with multi-queue (`multi-queue-num-queues`) — several, each
a complete io/ring.h ring with its own event channel and its own request ids, as Linux's
blkfront keeps one `blkfront_ring_info` per hardware queue.  `FrontQueue` is that ring:
`setup` allocates its shareable pages, initialises and grants them and allocates the
port; `put` writes a request into a free slot and `push` publishes what was put
(RING_PUSH_REQUESTS_AND_CHECK_NOTIFY, a kick only when the backend asked);
`responses` drains what the backend answered, with the final check; `teardown` gives
the ring up.  What a request means — its pages, its caller — is `pvio.blk.frontend`'s.

Requests are pushed once per turn of the event loop, after everything the turn put, and
also as they go: once the READs put since the last push reach `EARLY_PUSH_READ_PAGES`
pages, or the WRITEs `EARLY_PUSH_WRITE_PAGES` (`put_pages`), they are pushed at once, so
that blkback starts on them while the guest parses and puts the rest of the commands one
socket read brought.  At 8 pages each, through `pvio bench blk` (map), 4 KiB random
reads at QD32 gained about 40% against 32 pages, and 4 KiB random writes about 50%
against a push per turn (docs/blk.md's levers table); at 24 or 32 pages the writes
gained nothing: a turn seldom puts that many.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from pvio.abi.blkif import BlkifABI
from pvio.blk.front_grants import FrontGrants
from pvio.blk.shadow import ShadowTable
from pvio.hypervisor.client import Domain
from pvio.hypervisor.domain import PAGE_SIZE
from pvio.ring import FrontRing, SharedRing

log = logging.getLogger(__name__)


@dataclass
class BlkfrontStats:
    requests: int = 0
    notify_sent: int = 0
    notify_received: int = 0
    pushes: int = 0
    reissued: int = 0
    grant_waits: int = 0


class RequestIds(asyncio.Semaphore):
    """One per free shadow, so per free ring slot; `try_acquire` takes one without
    waiting, and only when no one is waiting already (first come, first served)."""

    def try_acquire(self) -> bool:
        # none free, or others wait for one (locked(), without its generator when no one waits)
        if self._value <= 0 or (self._waiters and self.locked()):
            return False
        self._value -= 1  # what acquire() does when nothing is waited for
        return True

    def free_now(self) -> int:
        """How many `try_acquire` would get now."""
        return 0 if self.locked() else self._value


#: READ pages put since the last push at which they are pushed at once (0: never early);
#: ``PVIO_BLK_EARLY_PUSH_PAGES`` sets it, for measurements
EARLY_PUSH_READ_PAGES = int(os.environ.get("PVIO_BLK_EARLY_PUSH_PAGES", "8"))
#: the same for WRITEs (``PVIO_BLK_EARLY_PUSH_WRITE_PAGES``; 0: never early)
EARLY_PUSH_WRITE_PAGES = int(os.environ.get("PVIO_BLK_EARLY_PUSH_WRITE_PAGES", "8"))


class FrontQueue:
    """One ring of a blkfront (see the module notes)."""

    def __init__(self, index: int, nr_ents: int) -> None:
        self.index = index
        self.nr_ents = nr_ents
        self.shadows = ShadowTable(nr_ents)
        self.ids = RequestIds(nr_ents)
        self.ring: FrontRing | None = None
        self.port = -1
        self.ring_refs: list[int] = []
        self.push_scheduled = False
        self.read_pages = 0  # pages of the READs put since the last push
        self.write_pages = 0  # and of the WRITEs

    def put_pages(self, pages: int, read: bool) -> bool:
        """`pages` of a READ (or a WRITE) were put: True when they are to be pushed at once."""
        if read:
            self.read_pages += pages
            return 0 < EARLY_PUSH_READ_PAGES <= self.read_pages
        self.write_pages += pages
        return 0 < EARLY_PUSH_WRITE_PAGES <= self.write_pages

    async def setup(
        self, domain: Domain, backend_domid: int, abi: BlkifABI, order: int, on_event: Callable[[int], None]
    ) -> dict[str, str]:
        """Allocate, initialise and grant the ring, allocate its port; its keys."""
        frames = await domain.alloc_shareable_pages(1 << order)
        ring = FrontRing.init(SharedRing.for_blkif([domain.frame(f) for f in frames], abi))
        if ring.nr_ents != self.nr_ents:  # pragma: no cover - geometry is fixed by abi/order
            raise ValueError("ring geometry mismatch")
        refs = await domain.grant_access(backend_domid, frames)
        self.port = await domain.alloc_unbound(backend_domid)
        domain.set_handler(self.port, on_event)
        self.ring, self.ring_refs = ring, refs
        keys = {"event-channel": str(self.port)}
        if order == 0:
            keys["ring-ref"] = str(refs[0])
        else:
            keys.update((f"ring-ref{i}", str(ref)) for i, ref in enumerate(refs))
        return keys

    def responses(self) -> Iterator[bytes]:
        """Every response published, then RING_FINAL_CHECK_FOR_RESPONSES (raises RingBroken)."""
        ring = self.ring
        if ring is None:
            return
        while True:
            yield from ring.take_responses()
            if not ring.final_check_for_responses():
                return

    def push(self, domain: Domain) -> bool:
        """Publish what was put; True when the backend was kicked (raises RingBroken)."""
        self.read_pages = self.write_pages = 0
        ring = self.ring
        if ring is None:
            return False
        if ring.push_requests_and_check_notify():
            domain.notify(self.port)
            return True
        return False

    async def teardown(self, domain: Domain) -> None:
        """Close the port and end the ring's grants (the backend's mappings go with it)."""
        self.ring = None
        if self.port >= 0:
            try:
                await domain.close_port(self.port)
            except Exception as e:
                log.info("blkfront: closing port %d: %s", self.port, e)
            self.port = -1
        if self.ring_refs:
            domain.end_access(self.ring_refs)
            self.ring_refs = []


def pick(queues: list[FrontQueue]) -> FrontQueue:
    """The first ring with a free slot (so a batch stays on one ring and one kick), or
    the one with the most free slots."""
    for q in queues:
        if q.shadows.free:
            return q
    return max(queues, key=lambda q: q.shadows.free)


def write_indirect(
    domain: Domain, grants: FrontGrants, raw: bytes, refs: list[int], frames: list[int], grant: bool,
) -> None:
    """Write the packed segments into the indirect pages; grant those read-only (not pooled)."""
    mem = domain.memory
    for k, (ref, frame) in enumerate(zip(refs, frames, strict=True)):
        chunk = raw[k * PAGE_SIZE : (k + 1) * PAGE_SIZE]
        mem[frame * PAGE_SIZE : frame * PAGE_SIZE + len(chunk)] = chunk
        if grant:
            grants.grant(ref, frame, True)
