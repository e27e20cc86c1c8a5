"""Ring memory as pages, and the ring's slots as views into them.

A ring of 2**order pages is granted page by page, so the mapping a back end gets may be
scattered: page 1 need not follow page 0 in its address space.  `RingMemory` takes either
one contiguous memoryview or a sequence of 4 KiB page views, and `SlotViews` precomputes,
once, a view for every slot: a plain memoryview slice when the slot lies within one page
(the fast path: every slot of a contiguous ring, and most slots of a scattered one), or a
`SplitSlot` of two slices when it straddles a page boundary (x86_32 blkif: 108-byte
requests and 12-byte responses do).  Reading a slot is then ``view.tobytes()`` (a copy,
as RING_COPY_REQUEST makes) and writing it ``view[:] = data``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from pvio.abi.ring import MAX_RING_PAGE_ORDER, SRING_RING_OFFSET, XEN_PAGE_SIZE


class SlotView(Protocol):
    """What the ring needs of a slot: copy it out, overwrite it whole."""

    def tobytes(self) -> bytes: ...

    def __setitem__(self, key: slice, value: bytes) -> None: ...

    def __len__(self) -> int: ...


class SplitSlot:
    """A slot that straddles two pages: the tail of one page and the head of the next."""

    __slots__ = ("_first", "_n", "_second")

    def __init__(self, first: memoryview, second: memoryview) -> None:
        self._first = first
        self._second = second
        self._n = len(first)

    def tobytes(self) -> bytes:
        return self._first.tobytes() + self._second.tobytes()

    def __setitem__(self, key: slice, value: bytes) -> None:
        if key != slice(None):
            raise TypeError("a SplitSlot is written whole (slot[:] = data)")
        if len(value) != len(self):
            raise ValueError(f"slot holds {len(self)} bytes, got {len(value)}")
        n = self._n
        self._first[:] = value[:n]
        self._second[:] = value[n:]

    def __len__(self) -> int:
        return self._n + len(self._second)


def _as_bytes_view(mem: memoryview | bytearray) -> memoryview:
    view = memoryview(mem)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    if view.readonly:
        raise ValueError("ring memory must be writable")
    return view


class RingMemory:
    """The 2**order pages of a shared ring, contiguous or not.

    `pages` is one writable buffer of 1, 2, 4, 8 or 16 pages (alone or as the only item
    of a sequence), or a sequence of that many writable 4 KiB page buffers (each
    page-aligned in its own mapping).
    """

    __slots__ = ("nbytes", "order", "pages")

    def __init__(self, pages: memoryview | bytearray | Sequence[memoryview | bytearray]) -> None:
        if isinstance(pages, memoryview | bytearray) or len(pages) == 1:
            whole = _as_bytes_view(pages if isinstance(pages, memoryview | bytearray)
                                   else pages[0])
            views = [whole]
            nbytes = len(whole)
        else:
            views = [_as_bytes_view(p) for p in pages]
            for i, p in enumerate(views):
                if len(p) != XEN_PAGE_SIZE:
                    raise ValueError(f"ring page {i} is {len(p)} bytes, not {XEN_PAGE_SIZE}")
            nbytes = XEN_PAGE_SIZE * len(views)
        npages, rem = divmod(nbytes, XEN_PAGE_SIZE)
        if rem or npages == 0 or npages & (npages - 1) or npages > 1 << MAX_RING_PAGE_ORDER:
            raise ValueError(
                f"a ring is 1..{1 << MAX_RING_PAGE_ORDER} pages (a power of two), got "
                f"{nbytes} bytes"
            )
        self.pages: list[memoryview] = views
        self.nbytes = nbytes
        self.order = npages.bit_length() - 1

    @property
    def contiguous(self) -> bool:
        return len(self.pages) == 1

    @property
    def header(self) -> memoryview:
        """The first page (the sring header lives at its start)."""
        return self.pages[0]

    def view(self, offset: int, length: int) -> SlotView:
        """A view of bytes [offset, offset+length): one slice, or a SplitSlot at a seam."""
        if offset < 0 or length <= 0 or offset + length > self.nbytes:
            raise ValueError(f"bytes {offset}..{offset + length} outside the ring memory")
        if self.contiguous:
            return self.pages[0][offset : offset + length]
        page, at = divmod(offset, XEN_PAGE_SIZE)
        if at + length <= XEN_PAGE_SIZE:
            return self.pages[page][at : at + length]
        if length > XEN_PAGE_SIZE:  # pragma: no cover - entries are far smaller than a page
            raise ValueError("a slot may straddle at most one page boundary")
        head = XEN_PAGE_SIZE - at
        return SplitSlot(self.pages[page][at:], self.pages[page + 1][: length - head])

    def tobytes(self) -> bytes:
        """All of the ring's bytes, in ring order (tests and debugging)."""
        return b"".join(p.tobytes() for p in self.pages)


def slot_views(memory: RingMemory, entry_size: int, nr_ents: int, size: int) -> list[SlotView]:
    """A view of the first `size` bytes of each of the `nr_ents` slots."""
    return [memory.view(SRING_RING_OFFSET + i * entry_size, size) for i in range(nr_ents)]


def write_run(area: memoryview, first: int, entries: Sequence[bytes], nr_ents: int,
              entry_size: int) -> None:
    """Write whole-slot `entries` (each exactly `entry_size` bytes) from slot `first` on.

    One store per run of consecutive slots (at most two, because of the wrap).
    """
    i, n = 0, len(entries)
    while i < n:
        k = min(n - i, nr_ents - first)
        start = first * entry_size
        area[start : start + k * entry_size] = b"".join(entries[i : i + k])
        i += k
        first = 0
