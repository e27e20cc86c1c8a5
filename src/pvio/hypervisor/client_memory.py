"""A domain's own memory and the grant table through which it offers it to others.

Theory of operation
-------------------
`MemoryClient` holds what the domain owns: its memory (the memfd the hypervisor created
with the domain, mapped once; frames are 4 KiB slices of it), a free list of those
frames (`PageAllocator`, sans-IO), the *shareable pages* it asked for, and its grant
table.

Everything here is local except three hypercalls.  Allocating and freeing frames is a
free list; granting and ending access write grant entries in the table, which is shared
memory the hypervisor reads (`pvio.hypervisor.granting.GrantRefs` keeps the entries and
their free list, with the atomic compare-and-swap that end_foreign_access needs).  The
hypercalls are PVIO_DOMCTL_alloc_shareable, GNTTABOP_setup_table (to grow the table
before granting more references than it holds) and GNTTABOP_query_size.

A shareable page is a one-page memfd of its own, numbered from SHAREABLE_FRAME_BASE, so
that another domain can map it live without receiving the rest of this domain's memory:
shared rings go there, and a copy-transport backend maps them live too (see
`pvio.hypervisor.client_mapping`).

Ending access to a reference another domain still maps cannot finish now: the reference
is deferred, and this part retries from the event loop (after 10 ms, doubling up to
1 s) until the mapper lets go; then the reference is freed and the caller's
`on_freed(ref)` runs (Linux's gnttab_add_deferred retries from a timer the same way).

Deliberately not here: reaching other domains' memory (`client_mapping`), and lguest's
physical address space, which adds shared regions above this memory (`client_lguest`).
"""

from __future__ import annotations

import asyncio
import mmap
import os
from collections.abc import Callable, Sequence

from pvio.abi import grant_table as gt
from pvio.abi.grant_table import DOMID_SELF
from pvio.hypervisor import wire
from pvio.hypervisor.atomic import AtomicWords
from pvio.hypervisor.client_channel import Hypercalls
from pvio.hypervisor.domain import PAGE_SHIFT, PAGE_SIZE, SHAREABLE_FRAME_BASE
from pvio.hypervisor.errors import GrantError
from pvio.hypervisor.granting import GrantRefs, NoSpace
from pvio.hypervisor.wire import Op

#: Retries of end_foreign_access for references still mapped (seconds).
DEFERRED_FIRST_RETRY = 0.01
DEFERRED_MAX_RETRY = 1.0


class PageAllocator:
    """The domain's own frames: a free list (sans-IO)."""

    def __init__(self, nr_pages: int) -> None:
        self._free = list(range(nr_pages - 1, -1, -1))

    def alloc(self, n: int) -> list[int]:
        if n > len(self._free):
            raise NoSpace(f"{n} pages wanted, {len(self._free)} free")
        out = self._free[-n:] if n else []
        del self._free[len(self._free) - n :]
        return out[::-1]

    def free(self, frames: Sequence[int]) -> None:
        self._free.extend(frames)

    @property
    def free_count(self) -> int:
        return len(self._free)


def close_mmap(mm: mmap.mmap) -> None:
    """Close a mapping; if a caller still holds a view of it, the GC closes it later."""
    try:
        mm.close()
    except BufferError:
        pass


class MemoryClient:
    """A domain's memory, frames, shareable pages and grant table (see the module notes)."""

    def __init__(self, calls: Hypercalls, nr_pages: int, mem_fd: int, gnttab_fd: int, max_grant_frames: int) -> None:
        self._calls = calls
        self.nr_pages = nr_pages
        self.mem_fd = mem_fd
        self._mm = mmap.mmap(mem_fd, nr_pages * PAGE_SIZE)
        self.memory = memoryview(self._mm)
        self.pages = PageAllocator(nr_pages)
        self._shareable: dict[int, tuple[mmap.mmap, memoryview]] = {}
        self.gnttab_fd = gnttab_fd
        self._gnt_mm = mmap.mmap(gnttab_fd, max_grant_frames * PAGE_SIZE)
        self._gnt_view = memoryview(self._gnt_mm)
        self._atomic = AtomicWords(self._gnt_view)
        self.gnttab = GrantRefs(self._gnt_view, self._atomic, 1, max_grant_frames)
        self._deferred_timer: asyncio.TimerHandle | None = None
        self.closed = False

    # -- frames ----------------------------------------------------------------------------

    def frame(self, frame: int) -> memoryview:
        """The page of one of our frames (memory or shareable)."""
        if frame >= SHAREABLE_FRAME_BASE and frame in self._shareable:
            return self._shareable[frame][1]
        if not 0 <= frame < self.nr_pages:
            raise IndexError(f"frame {frame} outside memory")
        return self.memory[frame << PAGE_SHIFT : (frame + 1) << PAGE_SHIFT]

    async def alloc_shareable_pages(self, n: int) -> list[int]:
        """N pages that another domain can map without reaching the rest of our memory.

        Each is a one-page memfd of its own (frame numbers from SHAREABLE_FRAME_BASE).
        Put shared rings here: a backend of either transport maps them live.
        """
        args = wire.PVIO_SHAREABLE.pack(nr_frames=n)
        op = Op(wire.PVIO_HYPERVISOR_domctl, wire.PVIO_DOMCTL_alloc_shareable, 1, args)
        reply = await self._calls.one(op, "PVIO_DOMCTL_alloc_shareable")
        first: int = wire.PVIO_SHAREABLE.unpack(reply.args)["first_frame"]
        frames = list(range(first, first + len(reply.fds)))
        for frame, fd in zip(frames, reply.fds, strict=True):
            try:
                mm = mmap.mmap(fd, PAGE_SIZE)
            finally:
                os.close(fd)
            self._shareable[frame] = (mm, memoryview(mm))
        return frames

    # -- granting (local, plus setup_table to grow) ----------------------------------------

    async def grow_grant_table(self, count: int) -> None:
        """Make sure `count` references can be allocated (GNTTABOP_setup_table if needed)."""
        extra = self.gnttab.frames_to_grow(count)
        if not extra:
            return
        nr = self.gnttab.nr_frames + extra
        args = gt.GNTTAB_SETUP_TABLE.pack(dom=DOMID_SELF, nr_frames=nr)
        op = Op(wire.HYPERVISOR_grant_table_op, gt.GNTTABOP_setup_table, 1, args)
        reply = await self._calls.one(op, "GNTTABOP_setup_table")
        status = gt.GNTTAB_SETUP_TABLE.unpack(reply.args)["status"]
        if status != gt.GNTST_okay:
            raise GrantError(status, "GNTTABOP_setup_table", "nr_frames")
        self.gnttab.grow(nr)

    async def grant_access(self, domid: int, frames: Sequence[int], readonly: bool = False) -> list[int]:
        """Grant `domid` access to our `frames`; returns the references."""
        await self.grow_grant_table(len(frames))
        return [self.gnttab.grant_foreign_access(domid, f, readonly) for f in frames]

    def end_access(self, refs: Sequence[int], on_freed: Callable[[int], None] | None = None) -> list[bool]:
        """End access to each ref; False where it is still mapped (freed when unmapped).

        A reference still mapped is retried from the event loop (after 10 ms, backing off
        to 1 s) until the mapping ends; then it is freed and `on_freed(ref)` runs.
        """
        done = [self.gnttab.end_foreign_access(ref, on_freed) for ref in refs]
        if not all(done):
            self._schedule_deferred(DEFERRED_FIRST_RETRY)
        return done

    def _schedule_deferred(self, delay: float) -> None:
        if self._deferred_timer is None and not self.closed:
            loop = asyncio.get_running_loop()
            self._deferred_timer = loop.call_later(delay, self._retry_deferred, delay)

    def _retry_deferred(self, delay: float) -> None:
        self._deferred_timer = None
        self.gnttab.poll_deferred()
        if self.gnttab.deferred:
            self._schedule_deferred(min(delay * 2, DEFERRED_MAX_RETRY))

    async def query_size(self, dom: int = DOMID_SELF) -> dict[str, int]:
        """GNTTABOP_query_size: the grant table's nr_frames and max_nr_frames."""
        args = gt.GNTTAB_QUERY_SIZE.pack(dom=dom)
        op = Op(wire.HYPERVISOR_grant_table_op, gt.GNTTABOP_query_size, 1, args)
        return gt.GNTTAB_QUERY_SIZE.unpack((await self._calls.one(op, "GNTTABOP_query_size")).args)

    # -- the end ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop retrying deferred references (the domain is leaving)."""
        self.closed = True
        if self._deferred_timer is not None:
            self._deferred_timer.cancel()
            self._deferred_timer = None

    def close(self) -> None:
        """Unmap everything and close the memory and grant-table fds."""
        self.stop()
        for mm, view in self._shareable.values():
            view.release()
            close_mmap(mm)
        self._shareable.clear()
        self._atomic.release()
        self._gnt_view.release()
        close_mmap(self._gnt_mm)
        self.memory.release()
        close_mmap(self._mm)
        os.close(self.mem_fd)
        os.close(self.gnttab_fd)
