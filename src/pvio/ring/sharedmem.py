"""Every load and store of a shared ring index, and every ordering point, in one place.

Theory of operation
-------------------
Two processes share ring pages.  Each writes its own producer (or consumer) index and its
own event index, and reads the peer's.  Three kinds of ordering are needed, and io/ring.h
names them after the Linux barriers:

``acquire`` (after loading a peer's index)
    later loads and stores stay after that load: we read the entries a producer index
    covers only after reading the index (the consumer half of ``xen_rmb``), and we reuse a
    slot only after seeing that its old contents were consumed.
``release`` (before storing our index)
    earlier loads and stores stay before that store: the peer sees the entries before the
    producer index that publishes them (``xen_wmb``), and does not see a slot as free until
    we have copied it out.
``full`` (between a store of ours and a load of the peer's)
    the store is visible to the peer before the load reads: ``xen_mb`` in
    RING_PUSH_*_AND_CHECK_NOTIFY and RING_FINAL_CHECK_*.  Without it both ends can each
    miss the other's update and both go to sleep: the lost wake-up.

Platform memory-model assumption
--------------------------------
Shared memory is ordinary write-back memory mapped (``MAP_SHARED``) in both processes, and
every index is a naturally aligned 32-bit word, loaded and stored with one instruction:
`memoryview.cast("I")` element access compiles to a single 4-byte ``mov``/``ldr``/``str``
(CPython copies the item with a fixed-size ``memcpy``), so a peer never sees half an index.
Each index is loaded once into a local by the caller; nothing re-reads a peer field after
validating it.  (``struct.unpack_from("<I")`` is *not* used for indices: CPython assembles
little-endian standard-size integers byte by byte, which could tear.)

* **x86-64** (TSO): loads are not reordered with loads, stores not with stores, and loads
  not with later stores; only a store followed by a load may be reordered (through the
  store buffer).  So ``acquire`` and ``release`` need only a *compiler* barrier, and CPython
  gives that for free: each memoryview access is a separate C call made by the
  interpreter, through pointers the C compiler cannot see past, in program order.  Entry
  copies may be ``memcpy`` with ``rep movsb``: the SDM (8.2.4) keeps string-operation
  stores ordered with other stores, and glibc uses non-temporal stores only for copies
  of megabytes (and fences them); a ring's copies are at most 64 KiB.  The ``full``
  barrier needs a real store-load fence.
* **arm64** (and anything else): every ordering point needs a barrier instruction, so
  ``acquire`` and ``release`` call the fence too (``dmb ishld`` / ``dmb ish`` would do;
  libatomic may give the full ``dmb ish`` for every order: stronger, never weaker).

Where the fence comes from
--------------------------
Python has no fence.  pvio calls ``atomic_thread_fence`` in GCC's libatomic (the
``libatomic1`` package, part of every GCC toolchain, well kept with the compiler) through
ctypes.  Its out-of-line definition is sequentially consistent whatever order it is
passed: on x86-64 it disassembles to ``lock orq $0,(%rsp)``, a full barrier; on arm64 it
is a ``dmb``.  Its cost (``pvio bench ring`` prints a fence table) is that of one
ctypes call, about 0.25 µs, paid once per push and once per final check, not per entry.

Alternatives rejected:

* a system call (``os.getppid()``, about the same cost): entering the kernel is not
  architecturally a memory barrier on either platform (x86 ``syscall`` is not a serialising
  instruction; arm64 exception entry is a context synchronisation event, not a ``dmb``),
  so it would work by accident of the kernel's code path.
* ``membarrier(2)``: a documented barrier, but slower (IPIs, or an RCU grace period) and
  aimed at other threads of the caller, not at the caller's own store-load order.
* the ``atomics`` PyPI package: a full-featured cffi wrapper with a compiled extension,
  much more than one fence needs and less widely maintained than libatomic.
* machine code written into an executable mapping through ctypes: smallest and fastest,
  but fragile under W^X policies and hard to review.

What this module deliberately is not: a general atomics library.  It has exactly the
operations io/ring.h and the XenStore/console byte rings need, each named for its use.
"""

from __future__ import annotations

import platform
from collections.abc import Callable

from pvio.abi.native import LIBATOMIC, libatomic
from pvio.abi.ring import SRING_REQ_EVENT, SRING_REQ_PROD, SRING_RSP_EVENT, SRING_RSP_PROD

__all__ = [
    "FENCE_LIBRARY",
    "ByteRingIndices",
    "PageWord",
    "SringIndices",
    "acquire_fence",
    "full_fence",
    "release_fence",
]

#: C11 memory_order values, as libatomic's atomic_thread_fence takes them.
_MEMORY_ORDER_ACQUIRE = 2
_MEMORY_ORDER_RELEASE = 3
_MEMORY_ORDER_SEQ_CST = 5

#: Machines with x86's TSO memory model, where only store-load needs a fence.
_TSO_MACHINES = frozenset({"x86_64", "amd64", "i386", "i486", "i586", "i686"})


FENCE_LIBRARY = LIBATOMIC
_atomic_thread_fence: Callable[[int], None] = libatomic().atomic_thread_fence
_TSO = platform.machine().lower() in _TSO_MACHINES


def _compiler_barrier_only() -> None:
    """On TSO machines: nothing to do, CPython's call boundaries already order accesses."""


def _acquire_fence() -> None:
    _atomic_thread_fence(_MEMORY_ORDER_ACQUIRE)


def _release_fence() -> None:
    _atomic_thread_fence(_MEMORY_ORDER_RELEASE)


def full_fence() -> None:
    """A store-load (sequentially consistent) fence: xen_mb()."""
    _atomic_thread_fence(_MEMORY_ORDER_SEQ_CST)


#: Loads before the fence stay before every later load and store.
acquire_fence: Callable[[], None] = _compiler_barrier_only if _TSO else _acquire_fence
#: Every earlier load and store stays before later stores.
release_fence: Callable[[], None] = _compiler_barrier_only if _TSO else _release_fence

_W_REQ_PROD = SRING_REQ_PROD // 4
_W_REQ_EVENT = SRING_REQ_EVENT // 4
_W_RSP_PROD = SRING_RSP_PROD // 4
_W_RSP_EVENT = SRING_RSP_EVENT // 4
_MASK = 0xFFFF_FFFF


def _words(header: memoryview, nbytes: int) -> memoryview:
    """The first `nbytes` of `header` as native 32-bit words (aligned single accesses)."""
    view = header.cast("B") if header.format != "B" else header
    if view.readonly:
        raise ValueError("shared ring memory must be writable")
    if len(view) < nbytes:
        raise ValueError(f"shared index area needs {nbytes} bytes, got {len(view)}")
    return view[:nbytes].cast("I")


class SringIndices:
    """The four indices of a `struct name##_sring` header (io/ring.h).

    The front writes req_prod and rsp_event and reads the other two; the back the reverse.
    Methods are named for the macro step they implement.
    """

    __slots__ = ("_w",)

    def __init__(self, header: memoryview) -> None:
        self._w = _words(header, 16)

    # -- SHARED_RING_INIT --------------------------------------------------------------

    def init(self, start: int) -> None:
        """req_prod = rsp_prod = start; req_event = rsp_event = start + 1.

        Done by the front before it advertises the ring (grant reference and event channel
        in XenStore); the release fence makes the values visible before that advertisement.
        """
        w = self._w
        w[_W_REQ_PROD] = start & _MASK
        w[_W_RSP_PROD] = start & _MASK
        w[_W_REQ_EVENT] = (start + 1) & _MASK
        w[_W_RSP_EVENT] = (start + 1) & _MASK
        release_fence()  # the peer sees an initialised header before anything we publish next

    # -- the front ---------------------------------------------------------------------

    def load_rsp_prod(self) -> int:
        """Front: read the back's response producer index once."""
        prod: int = self._w[_W_RSP_PROD]
        acquire_fence()  # front reads responses only /after/ the rsp_prod that covers them
        return prod

    def push_req_prod(self, new: int) -> None:
        """RING_PUSH_REQUESTS."""
        release_fence()  # back sees requests /before/ updated producer index
        self._w[_W_REQ_PROD] = new

    def push_req_prod_and_load_req_event(self, new: int) -> int:
        """RING_PUSH_REQUESTS_AND_CHECK_NOTIFY's shared-memory half: returns req_event."""
        w = self._w
        release_fence()  # back sees requests /before/ updated producer index
        w[_W_REQ_PROD] = new
        full_fence()  # back sees new requests /before/ we check req_event
        event: int = w[_W_REQ_EVENT]
        return event

    def set_rsp_event_and_load_rsp_prod(self, event: int) -> int:
        """RING_FINAL_CHECK_FOR_RESPONSES's shared-memory half: returns rsp_prod."""
        w = self._w
        w[_W_RSP_EVENT] = event
        full_fence()  # back sees our new rsp_event /before/ we re-read rsp_prod
        prod: int = w[_W_RSP_PROD]
        acquire_fence()  # front reads responses only /after/ the rsp_prod that covers them
        return prod

    # -- the back ----------------------------------------------------------------------

    def load_req_prod(self) -> int:
        """Back: read the front's request producer index once."""
        prod: int = self._w[_W_REQ_PROD]
        acquire_fence()  # back reads requests only /after/ the req_prod that covers them
        return prod

    def push_rsp_prod(self, new: int) -> None:
        """RING_PUSH_RESPONSES."""
        release_fence()  # front sees resps /before/ updated producer index
        self._w[_W_RSP_PROD] = new

    def push_rsp_prod_and_load_rsp_event(self, new: int) -> int:
        """RING_PUSH_RESPONSES_AND_CHECK_NOTIFY's shared-memory half: returns rsp_event."""
        w = self._w
        release_fence()  # front sees resps /before/ updated producer index
        w[_W_RSP_PROD] = new
        full_fence()  # front sees new resps /before/ we check rsp_event
        event: int = w[_W_RSP_EVENT]
        return event

    def set_req_event_and_load_req_prod(self, event: int) -> int:
        """RING_FINAL_CHECK_FOR_REQUESTS's shared-memory half: returns req_prod."""
        w = self._w
        w[_W_REQ_EVENT] = event
        full_fence()  # front sees our new req_event /before/ we re-read req_prod
        prod: int = w[_W_REQ_PROD]
        acquire_fence()  # back reads requests only /after/ the req_prod that covers them
        return prod

    # -- inspection (tests, debugging): plain loads, no ordering promised -------------

    def snapshot(self) -> tuple[int, int, int, int]:
        """(req_prod, req_event, rsp_prod, rsp_event) as they are now."""
        w = self._w
        return (w[_W_REQ_PROD], w[_W_REQ_EVENT], w[_W_RSP_PROD], w[_W_RSP_EVENT])


class ByteRingIndices:
    """The cons/prod pair of one direction of a XenStore or console byte ring.

    The producer writes prod and reads cons; the consumer the reverse.  As in Xen's own
    implementations both ends read both indices from shared memory on each call, so a ring
    reset (XENSTORE_RECONNECT) needs no private state to be forgotten.
    """

    __slots__ = ("_cons", "_prod", "_w")

    def __init__(self, index_area: memoryview, cons_offset: int, prod_offset: int) -> None:
        end = max(cons_offset, prod_offset) + 4
        if cons_offset % 4 or prod_offset % 4:
            raise ValueError("byte ring indices must be 32-bit aligned")
        self._w = _words(index_area, end)
        self._cons = cons_offset // 4
        self._prod = prod_offset // 4

    def load_for_producer(self) -> tuple[int, int]:
        """(cons, prod) as the producer reads them, before writing data."""
        w = self._w
        cons: int = w[self._cons]
        prod: int = w[self._prod]
        acquire_fence()  # we write data /after/ reading the consumer index (slot is free)
        return cons, prod

    def publish_prod(self, new: int) -> None:
        release_fence()  # consumer sees the data /before/ the new producer index
        self._w[self._prod] = new

    def load_for_consumer(self) -> tuple[int, int]:
        """(cons, prod) as the consumer reads them, before reading data."""
        w = self._w
        cons: int = w[self._cons]
        prod: int = w[self._prod]
        acquire_fence()  # we read data /after/ reading the producer index that covers it
        return cons, prod

    def publish_cons(self, new: int) -> None:
        release_fence()  # producer sees free space only /after/ we copied the data out
        self._w[self._cons] = new


class PageWord:
    """One 32-bit control word of a shared page that is not a ring index: the
    `server_features`, `connection` and `error` fields of xenstore_domain_interface.

    A load is followed by the acquire fence (what the word announces is read after it),
    a store preceded by the release fence (what it announces is written before it): the
    server empties the rings *before* it sets `connection` back to XENSTORE_CONNECTED,
    and the guest reads the rings only *after* it has seen that.
    """

    __slots__ = ("_i", "_w")

    def __init__(self, area: memoryview, offset: int) -> None:
        if offset % 4:
            raise ValueError("a shared word must be 32-bit aligned")
        self._w = _words(area, offset + 4)
        self._i = offset // 4

    def load(self) -> int:
        value: int = self._w[self._i]
        acquire_fence()
        return value

    def store(self, value: int) -> None:
        release_fence()
        self._w[self._i] = value & _MASK
