"""io/ring.h front and back rings over shared memory, sans-IO.

Theory of operation
-------------------
`SharedRing` is the shared page(s): the 64-byte header of four free-running 32-bit indices
and an array of `nr_ents` slots of `entry_size` bytes (the C union of request and
response), `nr_ents` being __CONST_RING_SIZE of the memory.  `FrontRing` and `BackRing`
are the two ends' private state (req_prod_pvt/rsp_cons and rsp_prod_pvt/req_cons, as in
DEFINE_RING_TYPES) plus the macros of io/ring.h as methods:

=====================================  =============================================
io/ring.h                              pvio
=====================================  =============================================
SHARED_RING_INIT                       SharedRing.init()
XEN_FRONT_RING_INIT / FRONT_RING_ATTACH  FrontRing.init(sring) / FrontRing(sring, start)
BACK_RING_INIT / BACK_RING_ATTACH      BackRing(sring) / BackRing(sring, start)
RING_SIZE                              .nr_ents
RING_FREE_REQUESTS, RING_FULL          FrontRing.free_requests(), .full()
RING_HAS_UNCONSUMED_RESPONSES          FrontRing.unconsumed_responses()
RING_HAS_UNCONSUMED_REQUESTS           BackRing.unconsumed_requests()
RING_COPY_REQUEST + req_cons++         BackRing.get_request(), .take_requests(n)
RING_COPY_RESPONSE + rsp_cons++        FrontRing.get_response(), .take_responses(n)
RING_GET_REQUEST = ... (write)         FrontRing.put_request(b), .put_requests(list)
RING_GET_RESPONSE = ... (write)        BackRing.put_response(b), .put_responses(list)
RING_PUSH_REQUESTS[_AND_CHECK_NOTIFY]  FrontRing.push_requests[_and_check_notify]()
RING_PUSH_RESPONSES[_AND_CHECK_NOTIFY] BackRing.push_responses[_and_check_notify]()
RING_FINAL_CHECK_FOR_REQUESTS          BackRing.final_check_for_requests()
RING_FINAL_CHECK_FOR_RESPONSES         FrontRing.final_check_for_responses()
RING_REQUEST_CONS_OVERFLOW             BackRing.request_cons_overflow(cons)
RING_REQUEST_PROD_OVERFLOW             checked on every read of req_prod
RING_RESPONSE_PROD_OVERFLOW            checked on every read of rsp_prod
=====================================  =============================================

Entries travel as `bytes` of exactly the request or response size: the ring neither
knows nor parses what is inside (blkfront/blkback do, with `pvio.abi.blkif`).  Getting an
entry copies it out of shared memory, once; the peer cannot change it afterwards.

The peer is hostile.  Every producer index read from shared memory is read once, through
`pvio.ring.sharedmem`, and validated before any slot is touched: a back end never
consumes more requests than the front published or than there are free response slots
(the XEN_RING_NR_UNCONSUMED_REQUESTS bound), a front end never consumes responses to
requests it has not published.  An impossible index raises `RingBroken` naming the values
and marks the ring broken: every later call raises it again.  Local misuse (a request of
the wrong size, a put into a full ring) raises `RingUsageError` and leaves the ring as it
was.  The checks are a little stricter than io/ring.h's *_PROD_OVERFLOW macros, which
accept a producer index that moved backwards; a peer that does so is broken too.

What this deliberately does not do: notify (the caller owns the event channel and is
told when to kick it), wait, lock (an end belongs to one thread, as in C), allocate ids,
or interpret entries.  Alternatives rejected:
a ring class per protocol (the ring is generic over sizes; blkif is `for_blkif`), and
reading entries through struct formats here (a second declaration of the layouts).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

from pvio.abi.blkif import ABI_NATIVE, BlkifABI
from pvio.abi.ring import RING_IDX_MASK, SRING_HEADER, SRING_RING_OFFSET, const_ring_size
from pvio.ring.errors import RingBroken, RingUsageError
from pvio.ring.notify import notify_needed
from pvio.ring.sharedmem import SringIndices
from pvio.ring.slots import RingMemory, SlotView, slot_views, write_run

_M = RING_IDX_MASK

PagesLike = memoryview | bytearray | Sequence[memoryview | bytearray]


# T:210 The shared ring, seen from Python
# A SharedRing is the ring's memory and its geometry: the pages (one contiguous buffer, or
# 2**order page views that may be scattered because each was granted separately), the
# entry size (sizeof the C union of request and response) and so the number of slots.
# Slot i lives at byte 64 + i*entry_size of the ring, and a precomputed view per slot
# makes a slot that straddles two pages cost the same to the code above as any other.
# The front initialises the header (SHARED_RING_INIT: both producers 0, both events 1)
# before it advertises the ring; the back only ever attaches.  All four indices run free
# and wrap at 2**32: a slot is `index & (nr_ents - 1)`, a count is a difference mod 2**32.
# :T
class SharedRing:
    """The shared memory of one ring: header indices and `nr_ents` slots.

    `pages`: a writable buffer of 2**order pages, or a sequence of 2**order page buffers
    (order 0..4).  `entry_size` is sizeof(union name##_sring_entry); `req_size` and
    `rsp_size` are the request's and response's sizes (each at most `entry_size`).
    """

    __slots__ = ("area", "entry_size", "indices", "memory", "nr_ents", "req_size",
                 "req_views", "rsp_size", "rsp_views")

    def __init__(self, pages: PagesLike, *, entry_size: int, req_size: int, rsp_size: int) -> None:
        if not 0 < req_size <= entry_size or not 0 < rsp_size <= entry_size:
            raise ValueError(f"request ({req_size}) and response ({rsp_size}) sizes must be "
                             f"positive and fit the entry ({entry_size})")
        self.memory = RingMemory(pages)
        self.entry_size = entry_size
        self.req_size = req_size
        self.rsp_size = rsp_size
        self.nr_ents = const_ring_size(entry_size, self.memory.nbytes)
        if self.nr_ents == 0:
            raise ValueError(f"no {entry_size}-byte entry fits {self.memory.nbytes} bytes")
        self.indices = SringIndices(self.memory.header)
        self.req_views: list[SlotView] = slot_views(self.memory, entry_size, self.nr_ents,
                                                    req_size)
        self.rsp_views: list[SlotView] = slot_views(self.memory, entry_size, self.nr_ents,
                                                    rsp_size)
        #: The slot array as one view when the memory is contiguous: the fast path writes
        #: runs of whole-slot entries with one store.  None for scattered pages.
        self.area: memoryview | None = None
        if self.memory.contiguous:
            self.area = self.memory.pages[0][
                SRING_RING_OFFSET : SRING_RING_OFFSET + self.nr_ents * entry_size
            ]

    @classmethod
    def for_blkif(cls, pages: PagesLike, abi: BlkifABI = ABI_NATIVE) -> SharedRing:
        """A blkif ring (`abi` from the frontend's `protocol` key)."""
        return cls(pages, entry_size=abi.entry_size, req_size=abi.request.size,
                   rsp_size=abi.response.size)

    @property
    def order(self) -> int:
        return self.memory.order

    def init(self, start: int = 0) -> None:
        """SHARED_RING_INIT: producers `start`, events `start + 1`, pvt and pad zeroed.

        `start` other than 0 begins the indices elsewhere (tests start near 2**32 to wrap).
        """
        header = self.memory.header
        header[SRING_HEADER.offset("pvt") : SRING_RING_OFFSET] = bytes(
            SRING_RING_OFFSET - SRING_HEADER.offset("pvt")
        )
        self.indices.init(start)

    def snapshot(self) -> tuple[int, int, int, int]:
        """(req_prod, req_event, rsp_prod, rsp_event), for tests and debugging."""
        return self.indices.snapshot()

    def __repr__(self) -> str:
        rp, re, sp, se = self.snapshot()
        return (f"<SharedRing order={self.order} nr_ents={self.nr_ents} req_prod={rp:#x} "
                f"req_event={re:#x} rsp_prod={sp:#x} rsp_event={se:#x}>")


class _End:
    """What both ends share: geometry, and the broken flag."""

    __slots__ = ("_area", "_broken", "_entry_size", "_mask", "_name", "nr_ents", "sring")

    def __init__(self, sring: SharedRing, name: str) -> None:
        self.sring = sring
        self.nr_ents = sring.nr_ents  # RING_SIZE
        self._mask = sring.nr_ents - 1
        self._area = sring.area
        self._entry_size = sring.entry_size
        self._broken: RingBroken | None = None
        self._name = name

    def _batch(self, entries: Iterable[bytes], room: int, size: int, what: str) -> list[bytes]:
        """Up to `room` of `entries`, all checked to be `size` bytes before any is written."""
        if isinstance(entries, list):
            batch = entries if len(entries) <= room else entries[:room]
        else:
            batch = list(itertools.islice(entries, room))
        if batch and set(map(len, batch)) != {size}:
            bad = next(len(e) for e in batch if len(e) != size)
            raise RingUsageError(f"{what} is {bad} bytes, not {size}")
        return batch

    def _copy_out(self, views: list[SlotView], first: int, count: int) -> list[bytes]:
        """Copy `count` entries out of shared memory, from ring index `first` on.

        Iterating over a slice of the precomputed slot views is the fastest way CPython
        offers (faster than one bulk copy then slicing it), contiguous or scattered.
        """
        s = first & self._mask
        e = s + count
        if e <= self.nr_ents:
            return [v.tobytes() for v in views[s:e]]
        return [v.tobytes() for v in views[s:]] + [v.tobytes() for v in views[: e - self.nr_ents]]

    def _copy_in(self, views: list[SlotView], first: int, batch: list[bytes],
                 size: int) -> None:
        """Write `batch` into the slots from ring index `first` on.

        Fast path: whole-slot entries into contiguous memory go in one store per run of
        consecutive slots.  Otherwise one store per slot (a SplitSlot does two).
        """
        n = len(batch)
        s = first & self._mask
        if self._area is not None and size == self._entry_size and n > 1:
            write_run(self._area, s, batch, self.nr_ents, size)
            return
        head = self.nr_ents - s
        if n <= head:
            for view, entry in zip(views[s : s + n], batch, strict=True):
                view[:] = entry
            return
        for view, entry in zip(views[s:], batch[:head], strict=True):
            view[:] = entry
        for view, entry in zip(views[: n - head], batch[head:], strict=True):
            view[:] = entry

    @property
    def broken(self) -> RingBroken | None:
        """The error that broke the ring, or None while it is usable."""
        return self._broken

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise self._broken.again()

    def _break(self, check: str, field: str, **values: int) -> RingBroken:
        self._broken = RingBroken(self._name, check, field, values)
        return self._broken.again()


class FrontRing(_End):
    """The front end: produces requests, consumes responses (name##_front_ring)."""

    __slots__ = ("_req_published", "_req_views", "_rsp_views", "_sidx", "req_prod_pvt",
                 "req_size", "rsp_cons")

    def __init__(self, sring: SharedRing, start: int = 0) -> None:
        """FRONT_RING_ATTACH(r, s, start, size): the private indices begin at `start`."""
        super().__init__(sring, "front ring")
        self.req_prod_pvt = start & _M
        self.rsp_cons = start & _M
        self.req_size = sring.req_size
        self._sidx = sring.indices
        self._req_views = sring.req_views
        self._rsp_views = sring.rsp_views
        #: The req_prod we last published: RING_PUSH_*'s __old, kept privately so the peer
        #: cannot rewrite it.
        self._req_published = start & _M

    @classmethod
    def init(cls, sring: SharedRing, start: int = 0) -> FrontRing:
        """XEN_FRONT_RING_INIT: SHARED_RING_INIT then FRONT_RING_INIT."""
        sring.init(start)
        return cls(sring, start)

    # -- requests ----------------------------------------------------------------------

    def free_requests(self) -> int:
        """RING_FREE_REQUESTS."""
        return self.nr_ents - ((self.req_prod_pvt - self.rsp_cons) & _M)

    def full(self) -> bool:
        """RING_FULL."""
        return self.free_requests() == 0

    # T:220 Producing requests
    # The front writes a request into the slot at its private req_prod_pvt and counts it;
    # nothing is visible to the back yet.  Only a push publishes: it stores req_prod, and
    # the release fence before that store is what guarantees the back, once it sees the new
    # index, also sees every request below it.  The front never has more than nr_ents
    # requests outstanding (RING_FULL); io/ring.h leaves that to the caller, pvio refuses.
    # Batching is the point of the design: put many requests, push once, and at most one
    # notification follows.
    # :T
    def put_request(self, request: bytes) -> None:
        """Write one request at req_prod_pvt and advance it (not yet visible: push)."""
        self._check_usable()
        if len(request) != self.req_size:
            raise RingUsageError(f"request is {len(request)} bytes, not {self.req_size}")
        if self.free_requests() == 0:
            raise RingUsageError("front ring is full (RING_FULL)")
        pvt = self.req_prod_pvt
        self._req_views[pvt & self._mask][:] = request
        self.req_prod_pvt = (pvt + 1) & _M

    def put_requests(self, requests: Iterable[bytes]) -> int:
        """Write as many of `requests` as there are free slots; returns how many.

        Every request taken is checked to be request-sized before any is written.
        """
        self._check_usable()
        pvt = self.req_prod_pvt
        free = self.nr_ents - ((pvt - self.rsp_cons) & _M)
        batch = self._batch(requests, free, self.req_size, "request")
        self._copy_in(self._req_views, pvt, batch, self.req_size)
        self.req_prod_pvt = (pvt + len(batch)) & _M
        return len(batch)

    def push_requests(self) -> None:
        """RING_PUSH_REQUESTS: publish req_prod_pvt."""
        self._check_usable()
        new = self.req_prod_pvt
        self._sidx.push_req_prod(new)
        self._req_published = new

    def push_requests_and_check_notify(self) -> bool:
        """RING_PUSH_REQUESTS_AND_CHECK_NOTIFY: publish, and say whether to notify the back."""
        self._check_usable()
        old = self._req_published
        new = self.req_prod_pvt
        event = self._sidx.push_req_prod_and_load_req_event(new)
        self._req_published = new
        return notify_needed(old, new, event)

    # -- responses ---------------------------------------------------------------------

    def _validated_responses(self, rsp_prod: int) -> int:
        """How many responses `rsp_prod` makes available, or break the ring."""
        cons = self.rsp_cons
        avail = (rsp_prod - cons) & _M
        if avail > self.nr_ents:
            raise self._break("RING_RESPONSE_PROD_OVERFLOW", "rsp_prod", rsp_prod=rsp_prod,
                              rsp_cons=cons, nr_ents=self.nr_ents)
        if avail > ((self._req_published - cons) & _M):
            raise self._break("responses beyond published requests", "rsp_prod",
                              rsp_prod=rsp_prod, rsp_cons=cons, req_prod=self._req_published)
        return avail

    def unconsumed_responses(self) -> int:
        """RING_HAS_UNCONSUMED_RESPONSES (validated)."""
        self._check_usable()
        return self._validated_responses(self._sidx.load_rsp_prod())

    def get_response(self) -> bytes | None:
        """Copy out the next response and consume it, or None if there is none."""
        got = self.take_responses(1)
        return got[0] if got else None

    def take_responses(self, max_count: int | None = None) -> list[bytes]:
        """Copy out and consume up to `max_count` (default: all) available responses."""
        self._check_usable()
        avail = self._validated_responses(self._sidx.load_rsp_prod())
        if max_count is not None and max_count < avail:
            avail = max(max_count, 0)
        cons = self.rsp_cons
        out = self._copy_out(self._rsp_views, cons, avail)
        self.rsp_cons = (cons + avail) & _M
        return out

    def final_check_for_responses(self, need: int = 1) -> bool:
        """RING_FINAL_CHECK_FOR_RESPONSES: True if responses are pending (do not sleep).

        Otherwise rsp_event is set to ask for a notification on the very next response.
        With `need` above 1 the question is "are `need` responses pending", and the
        notification is asked for when the `need`-th arrives (a netfront reclaiming its
        transmit slots when half of those in flight are done, as Linux's did:
        rsp_event = prod + ((req_prod - prod) >> 1) + 1).
        """
        self._check_usable()
        if self._validated_responses(self._sidx.load_rsp_prod()) >= need:
            return True
        prod = self._sidx.set_rsp_event_and_load_rsp_prod((self.rsp_cons + need) & _M)
        return self._validated_responses(prod) >= need

    def __repr__(self) -> str:
        return (f"<FrontRing req_prod_pvt={self.req_prod_pvt:#x} rsp_cons={self.rsp_cons:#x} "
                f"nr_ents={self.nr_ents}{' BROKEN' if self._broken else ''}>")


class BackRing(_End):
    """The back end: consumes requests, produces responses (name##_back_ring)."""

    __slots__ = ("_req_views", "_rsp_published", "_rsp_views", "_sidx", "req_cons",
                 "rsp_prod_pvt", "rsp_size")

    def __init__(self, sring: SharedRing, start: int = 0) -> None:
        """BACK_RING_ATTACH(r, s, start, size) (BACK_RING_INIT when `start` is 0).

        The shared header is left alone: the front initialised it.
        """
        super().__init__(sring, "back ring")
        self.rsp_prod_pvt = start & _M
        self.req_cons = start & _M
        self.rsp_size = sring.rsp_size
        self._sidx = sring.indices
        self._req_views = sring.req_views
        self._rsp_views = sring.rsp_views
        self._rsp_published = start & _M

    # T:240 Consuming requests, trusting nothing
    # The back reads req_prod once, into a local, and before touching any slot checks that
    # the value is possible: at most nr_ents requests beyond the last response
    # (RING_REQUEST_PROD_OVERFLOW), and not behind what was already consumed.  A front that
    # breaks this gets its ring marked broken: RingBroken names the values, and the ring
    # refuses further use, so the back can tear down that one device and carry on with the
    # others.  Of a good index, the back takes no more than it has room to answer
    # (XEN_RING_NR_UNCONSUMED_REQUESTS' min), and copies each request out of shared
    # memory (RING_COPY_REQUEST): what it validates later is what it acts on.
    # :T
    def _validated_requests(self, req_prod: int) -> int:
        """XEN_RING_NR_UNCONSUMED_REQUESTS for `req_prod`, after the overflow checks."""
        pvt = self.rsp_prod_pvt
        cons = self.req_cons
        published = (req_prod - pvt) & _M
        if published > self.nr_ents:
            raise self._break("RING_REQUEST_PROD_OVERFLOW", "req_prod", req_prod=req_prod,
                              rsp_prod_pvt=pvt, nr_ents=self.nr_ents)
        consumed = (cons - pvt) & _M
        if consumed > published:
            raise self._break("req_prod moved backwards", "req_prod", req_prod=req_prod,
                              req_cons=cons, rsp_prod_pvt=pvt)
        return min(published - consumed, self.nr_ents - consumed)

    def unconsumed_requests(self) -> int:
        """RING_HAS_UNCONSUMED_REQUESTS (validated)."""
        self._check_usable()
        return self._validated_requests(self._sidx.load_req_prod())

    def request_cons_overflow(self, cons: int) -> bool:
        """RING_REQUEST_CONS_OVERFLOW: would consuming index `cons` overrun the responses?"""
        return ((cons - self.rsp_prod_pvt) & _M) >= self.nr_ents

    def get_request(self) -> bytes | None:
        """Copy out the next request and consume it, or None if there is none."""
        got = self.take_requests(1)
        return got[0] if got else None

    def take_requests(self, max_count: int | None = None) -> list[bytes]:
        """Copy out and consume up to `max_count` (default: all) available requests."""
        self._check_usable()
        avail = self._validated_requests(self._sidx.load_req_prod())
        if max_count is not None and max_count < avail:
            avail = max(max_count, 0)
        cons = self.req_cons
        out = self._copy_out(self._req_views, cons, avail)
        self.req_cons = (cons + avail) & _M
        return out

    # -- responses ---------------------------------------------------------------------

    def pending_responses(self) -> int:
        """Requests consumed but not yet answered (req_cons - rsp_prod_pvt)."""
        return (self.req_cons - self.rsp_prod_pvt) & _M

    def occupancy(self) -> int:
        """Slots in use now: requests the front published that have no response yet
        (req_prod - rsp_prod_pvt), for statistics.  A look, not a consumption: an
        impossible req_prod is not judged here (the next take does that) but clamped to
        nr_ents."""
        return min((self._sidx.load_req_prod() - self.rsp_prod_pvt) & _M, self.nr_ents)

    def put_response(self, response: bytes) -> None:
        """Write one response at rsp_prod_pvt and advance it (not yet visible: push)."""
        self._check_usable()
        if len(response) != self.rsp_size:
            raise RingUsageError(f"response is {len(response)} bytes, not {self.rsp_size}")
        if self.pending_responses() == 0:
            raise RingUsageError("no consumed request is waiting for a response")
        pvt = self.rsp_prod_pvt
        self._rsp_views[pvt & self._mask][:] = response
        self.rsp_prod_pvt = (pvt + 1) & _M

    def put_responses(self, responses: Iterable[bytes]) -> int:
        """Write as many of `responses` as there are consumed requests; returns how many.

        Every response taken is checked to be response-sized before any is written.
        """
        self._check_usable()
        pvt = self.rsp_prod_pvt
        room = (self.req_cons - pvt) & _M
        batch = self._batch(responses, room, self.rsp_size, "response")
        self._copy_in(self._rsp_views, pvt, batch, self.rsp_size)
        self.rsp_prod_pvt = (pvt + len(batch)) & _M
        return len(batch)

    def push_responses(self) -> None:
        """RING_PUSH_RESPONSES: publish rsp_prod_pvt."""
        self._check_usable()
        new = self.rsp_prod_pvt
        self._sidx.push_rsp_prod(new)
        self._rsp_published = new

    def push_responses_and_check_notify(self) -> bool:
        """RING_PUSH_RESPONSES_AND_CHECK_NOTIFY: publish, and say whether to notify the front."""
        self._check_usable()
        old = self._rsp_published
        new = self.rsp_prod_pvt
        event = self._sidx.push_rsp_prod_and_load_rsp_event(new)
        self._rsp_published = new
        return notify_needed(old, new, event)

    # T:250 The final check, and why it needs a fence
    # Before going to sleep the back must ask for a notification (req_event = req_cons+1)
    # and then look once more, because the front may have pushed in between.  The front
    # does the mirror image: store req_prod, then load req_event.  Each side stores, then
    # loads what the other stored.  Any CPU may let a load overtake an earlier store to a
    # different address (x86's store buffer does), and then both can read the stale value:
    # the back sleeps, the front sees an old req_event and does not notify, and the ring
    # stalls for ever.  A store-load fence between the two steps, on both sides, rules that
    # out: sharedmem's full_fence, a locked instruction from libatomic.
    # :T
    def final_check_for_requests(self, need: int = 1) -> bool:
        """RING_FINAL_CHECK_FOR_REQUESTS: True if requests are pending (do not sleep).

        Otherwise req_event is set to ask for a notification on the very next request.
        With `need` above 1 the question is "are `need` requests pending", and the
        notification is asked for when the `need`-th arrives (xen-netback waiting for
        enough receive buffers for a frame: req_event = req_cons + need).
        """
        self._check_usable()
        if self._validated_requests(self._sidx.load_req_prod()) >= need:
            return True
        prod = self._sidx.set_req_event_and_load_req_prod((self.req_cons + need) & _M)
        return self._validated_requests(prod) >= need

    def __repr__(self) -> str:
        return (f"<BackRing rsp_prod_pvt={self.rsp_prod_pvt:#x} req_cons={self.req_cons:#x} "
                f"nr_ents={self.nr_ents}{' BROKEN' if self._broken else ''}>")
