"""The byte rings of the XenStore and console shared pages, sans-IO.

Theory of operation
-------------------
A `ByteRing` is one direction of a byte stream through shared memory: a power-of-two
array of bytes and two free-running 32-bit indices, `cons` (written by the consumer) and
`prod` (written by the producer); a byte's position is ``index & (size - 1)``
(MASK_XENSTORE_IDX, MASK_XENCONS_IDX).  The producer calls `write` (as much as fits, the
count is returned), the consumer `read` (what is there, up to a limit).  A connection end
is a `ByteRingPair` of the ring it transmits on and the ring it receives from:
`xenstore_guest` / `xenstore_server` over a xenstore_domain_interface page, and
`console_guest` / `console_backend` over a xencons_interface page.

The peer is hostile: every call reads both indices once and checks ``prod - cons <= size``
(mod 2**32); anything else is a broken ring, raised as `RingBroken` with
``wire_error=XENSTORE_ERROR_RINGIDX``, and the ring refuses further use.  Data is copied
in or out in at most two slices (the wrap), never past the array.

What this deliberately does not do: framing (XenStore messages are built on top by the
xenstore layer), notification (the caller kicks the event channel whenever a call moved
an index, as xenstored and Linux do), or the reconnection handshake itself: the page's
`server_features`, `connection` and `error` words are reached through `xenstore_control`,
and what they mean is the xenstore layer's business (`pvio.xenstore.ring`).
"""

from __future__ import annotations

from dataclasses import dataclass

from pvio.abi.console import XENCONS_IN_SIZE, XENCONS_INTERFACE, XENCONS_OUT_SIZE
from pvio.abi.layout import Layout
from pvio.abi.ring import RING_IDX_MASK
from pvio.abi.xs_wire import XENSTORE_DOMAIN_INTERFACE, XENSTORE_ERROR_RINGIDX, XENSTORE_RING_SIZE
from pvio.ring.errors import RingBroken
from pvio.ring.sharedmem import ByteRingIndices, PageWord

_M = RING_IDX_MASK


def mask_xenstore_idx(idx: int) -> int:
    """MASK_XENSTORE_IDX(idx): ((idx) & (XENSTORE_RING_SIZE-1))."""
    return idx & (XENSTORE_RING_SIZE - 1)


# T:260 The byte rings
# XenStore and the console do not use request slots: each direction is a stream of bytes
# in a power-of-two array, with a producer and a consumer index that run free like
# RING_IDX.  The producer copies in as much as fits (size - (prod - cons)), in at most two
# pieces because of the wrap, then publishes prod; the consumer copies out what is there
# and publishes cons.  The same rules as the slot ring hold: each index read once, checked
# (prod - cons may never exceed the size: XENSTORE_ERROR_RINGIDX), data copied before the
# index that covers it is published, and a broken ring refuses further use.
# :T
class ByteRing:
    """One direction of a byte ring: `data` (power-of-two length) and its cons/prod words.

    `index_area` is the memory holding the indices, `cons_offset`/`prod_offset` their byte
    offsets within it.  The producer end calls `write`, the consumer end `read`.
    """

    __slots__ = ("_broken", "_data", "_idx", "_mask", "name", "size")

    def __init__(self, data: memoryview, index_area: memoryview, cons_offset: int,
                 prod_offset: int, *, name: str = "byte ring") -> None:
        view = data.cast("B") if data.format != "B" else data
        size = len(view)
        if size == 0 or size & (size - 1):
            raise ValueError(f"a byte ring's size must be a power of two, not {size}")
        if view.readonly:
            raise ValueError("byte ring memory must be writable")
        self._data = view
        self.size = size
        self._mask = size - 1
        self._idx = ByteRingIndices(index_area, cons_offset, prod_offset)
        self._broken: RingBroken | None = None
        self.name = name

    @property
    def broken(self) -> RingBroken | None:
        return self._broken

    def _used(self, cons: int, prod: int) -> int:
        if self._broken is not None:
            raise self._broken.again()
        used = (prod - cons) & _M
        if used > self.size:
            self._broken = RingBroken(self.name, "prod - cons > ring size", "prod",
                                      {"cons": cons, "prod": prod, "size": self.size},
                                      wire_error=XENSTORE_ERROR_RINGIDX)
            raise self._broken.again()
        return used

    # -- producer side -------------------------------------------------------------

    def writable(self) -> int:
        """Free bytes, as the producer sees them now."""
        cons, prod = self._idx.load_for_producer()
        return self.size - self._used(cons, prod)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Copy in as much of `data` as fits, publish it, return how many bytes."""
        cons, prod = self._idx.load_for_producer()
        n = min(len(data), self.size - self._used(cons, prod))
        if n == 0:
            return 0
        src = memoryview(data).cast("B") if isinstance(data, memoryview) else data
        start = prod & self._mask
        first = min(n, self.size - start)
        self._data[start : start + first] = src[:first]
        if n > first:
            self._data[: n - first] = src[first:n]
        self._idx.publish_prod((prod + n) & _M)
        return n

    # -- consumer side ---------------------------------------------------------------

    def readable(self) -> int:
        """Bytes waiting, as the consumer sees them now."""
        cons, prod = self._idx.load_for_consumer()
        return self._used(cons, prod)

    def read(self, max_bytes: int | None = None) -> bytes:
        """Copy out (and consume) what is there, up to `max_bytes`."""
        cons, prod = self._idx.load_for_consumer()
        n = self._used(cons, prod)
        if max_bytes is not None:
            n = min(n, max(max_bytes, 0))
        if n == 0:
            return b""
        start = cons & self._mask
        first = min(n, self.size - start)
        out = self._data[start : start + first].tobytes()
        if n > first:
            out += self._data[: n - first].tobytes()
        self._idx.publish_cons((cons + n) & _M)
        return out


@dataclass(frozen=True)
class ByteRingPair:
    """One end of a byte-ring connection: where it writes (`tx`) and reads (`rx`)."""

    tx: ByteRing
    rx: ByteRing


def _page_ring(page: memoryview, lay: Layout, data: str, size: int, name: str) -> ByteRing:
    """The byte ring `data` of a shared page laid out as `lay` (with `<data>_cons` and
    `<data>_prod` indices)."""
    view = page.cast("B") if page.format != "B" else page
    if len(view) < lay.size:
        raise ValueError(f"{lay.name} needs {lay.size} bytes")
    start = lay.offset(data)
    return ByteRing(view[start : start + size], view, lay.offset(f"{data}_cons"),
                    lay.offset(f"{data}_prod"), name=name)


def _xs_rings(page: memoryview) -> tuple[ByteRing, ByteRing]:
    lay = XENSTORE_DOMAIN_INTERFACE
    return (_page_ring(page, lay, "req", XENSTORE_RING_SIZE, "xenstore req ring"),
            _page_ring(page, lay, "rsp", XENSTORE_RING_SIZE, "xenstore rsp ring"))


def xenstore_guest(page: memoryview) -> ByteRingPair:
    """The guest's end of a xenstore_domain_interface page: writes req, reads rsp."""
    req, rsp = _xs_rings(page)
    return ByteRingPair(tx=req, rx=rsp)


def xenstore_server(page: memoryview) -> ByteRingPair:
    """xenstored's end of a xenstore_domain_interface page: reads req, writes rsp."""
    req, rsp = _xs_rings(page)
    return ByteRingPair(tx=rsp, rx=req)


def _cons_rings(page: memoryview) -> tuple[ByteRing, ByteRing]:
    lay = XENCONS_INTERFACE
    return (_page_ring(page, lay, "in", XENCONS_IN_SIZE, "console in ring"),
            _page_ring(page, lay, "out", XENCONS_OUT_SIZE, "console out ring"))


def console_guest(page: memoryview) -> ByteRingPair:
    """The guest's end of a xencons_interface page: writes out, reads in."""
    inp, out = _cons_rings(page)
    return ByteRingPair(tx=out, rx=inp)


def console_backend(page: memoryview) -> ByteRingPair:
    """The console daemon's end of a xencons_interface page: reads out, writes in."""
    inp, out = _cons_rings(page)
    return ByteRingPair(tx=inp, rx=out)


@dataclass(frozen=True)
class XenstoreControl:
    """The signalling words of a xenstore_domain_interface page, and the reset of its
    four indices that a ring reconnection ends with (docs/misc/xenstore-ring.txt)."""

    server_features: PageWord
    connection: PageWord
    error: PageWord
    indices: tuple[PageWord, ...]

    def empty_rings(self) -> None:
        """Both queues empty: every index back to 0 (only while the guest waits with
        `connection` = XENSTORE_RECONNECT, so it reads none of them meanwhile)."""
        for word in self.indices:
            word.store(0)


def xenstore_control(page: memoryview) -> XenstoreControl:
    """The `server_features`, `connection` and `error` words of a XenStore page."""
    view = page.cast("B") if page.format != "B" else page
    lay = XENSTORE_DOMAIN_INTERFACE
    if len(view) < lay.size:
        raise ValueError(f"{lay.name} needs {lay.size} bytes")
    return XenstoreControl(
        PageWord(view, lay.offset("server_features")),
        PageWord(view, lay.offset("connection")),
        PageWord(view, lay.offset("error")),
        tuple(PageWord(view, lay.offset(f)) for f in ("req_cons", "req_prod", "rsp_cons", "rsp_prod")),
    )
