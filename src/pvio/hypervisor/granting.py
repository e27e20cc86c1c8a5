"""The granting domain's side of the grant table: references, the free list, access.

Theory of operation
-------------------
This is Linux's gnttab.c for a pvio domain, over the domain's shared table (a
memoryview of grant_entry_v1) and with no I/O: growing the table needs a
GNTTABOP_setup_table round trip, which the client (`pvio.hypervisor.client_memory`) makes
and then reports here with `grow`.

References 0..7 are reserved (GNTTAB_NR_RESERVED_ENTRIES: console, xenstore); the rest
form a free list threaded through a Python list, head `free_head`, length
`free_count`.  `alloc_grant_references(n)` detaches n references as a private list
(`RefList`) from which `claim_grant_reference` takes one at a time;
`free_grant_references` gives a private list back.  Free callbacks
(`request_free_callback`) run when at least their count of references is free again,
as blkfront uses them to restart its queue.

Granting writes frame and domid first, then the flags (GTF_permit_access, and
GTF_readonly): x86-64 does not reorder stores with other stores, so the hypervisor
cannot see the flags before the frame (the platform assumption, as in Xen's wmb() which
is a compiler barrier only on x86).  Ending access is an atomic compare-and-swap of the
flags to 0 that fails while GTF_reading/GTF_writing are set (`pvio.hypervisor.atomic`).
Where Linux's old `gnttab_end_foreign_access` printed "leaking g.e. and page still in
use!", pvio keeps the reference on a deferred list and frees it (and calls the caller's
`on_freed`, e.g. to give the page back) the first time a retry finds the mapping gone:
`poll_deferred` is run by every allocation that finds the free list short and by a
timer the client (`MemoryClient.end_access`) keeps while references are deferred.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from pvio.abi.grant_table import (
    GNTTAB_NR_RESERVED_ENTRIES,
    GRANT_ENTRY_V1,
    GRANT_ENTRY_V1_DOMID,
    GRANT_ENTRY_V1_FLAGS,
    GRANT_ENTRY_V1_FRAME,
    GREFS_PER_GRANT_FRAME,
    GTF_accept_transfer,
    GTF_permit_access,
    GTF_reading,
    GTF_readonly,
    GTF_transfer_committed,
    GTF_transfer_completed,
    GTF_writing,
)
from pvio.hypervisor.atomic import AtomicWords

GNTTAB_LIST_END = 0xFFFFFFFF

# The fields of grant_entry_v1 (pvio.abi.grant_table), one at a time; the first word
# (flags | domid << 16) is what the compare-and-swap works on.
_FLAGS = struct.Struct("<" + GRANT_ENTRY_V1.member("flags").code)
_DOMID = struct.Struct("<" + GRANT_ENTRY_V1.member("domid").code)
_U32 = struct.Struct("<I")
_ENTRY = GRANT_ENTRY_V1.size


class NoSpace(Exception):
    """No free grant reference (and the table cannot grow): -ENOSPC in Linux."""


@dataclass
class RefList:
    """A private list of references from `alloc_grant_references` (Linux's gref_head)."""

    head: int
    count: int


class GrantRefs:
    def __init__(self, table: memoryview, atomic: AtomicWords, nr_frames: int, max_frames: int) -> None:
        self._table = table
        self._atomic = atomic
        self.max_frames = max_frames
        self.nr_frames = 0
        self._next: list[int] = []
        self.free_head = GNTTAB_LIST_END
        self.free_count = 0
        self._callbacks: list[tuple[int, Callable[[], None]]] = []
        #: refs whose end_foreign_access found them mapped: ref -> on_freed
        self.deferred: dict[int, Callable[[int], None] | None] = {}
        self._next = [GNTTAB_LIST_END] * GNTTAB_NR_RESERVED_ENTRIES
        self.nr_frames = 0
        self.grow(nr_frames)

    @property
    def nr_entries(self) -> int:
        return self.nr_frames * GREFS_PER_GRANT_FRAME

    # -- the free list ---------------------------------------------------------

    def frames_to_grow(self, count: int) -> int:
        """How many more table frames `count` references need (0 if enough are free)."""
        short = count - self.free_count
        if short <= 0:
            return 0
        extra = -(-short // GREFS_PER_GRANT_FRAME)
        if self.nr_frames + extra > self.max_frames:
            raise NoSpace(f"{count} references need more than {self.max_frames} frames")
        return extra

    def grow(self, new_nr_frames: int) -> None:
        """The table now has `new_nr_frames` frames (after GNTTABOP_setup_table)."""
        if new_nr_frames <= self.nr_frames:
            return
        first = max(self.nr_entries, GNTTAB_NR_RESERVED_ENTRIES)
        last = new_nr_frames * GREFS_PER_GRANT_FRAME
        self._next.extend(range(len(self._next) + 1, last + 1))
        self._next[last - 1] = self.free_head
        self.free_head = first
        self.free_count += last - first
        self.nr_frames = new_nr_frames
        self._check_free_callbacks()

    def _take(self, count: int) -> int:
        if count <= 0 or self.free_count < count:
            if self.deferred:
                self.poll_deferred()
            if count <= 0 or self.free_count < count:
                raise NoSpace(f"{count} references wanted, {self.free_count} free")
        head = ref = self.free_head
        for _ in range(count - 1):
            ref = self._next[ref]
        self.free_head = self._next[ref]
        self._next[ref] = GNTTAB_LIST_END
        self.free_count -= count
        return head

    def _put(self, ref: int) -> None:
        self._next[ref] = self.free_head
        self.free_head = ref
        self.free_count += 1

    def alloc_grant_references(self, count: int) -> RefList:
        return RefList(self._take(count), count)

    @staticmethod
    def empty_grant_references(refs: RefList) -> bool:
        return refs.head == GNTTAB_LIST_END

    def claim_grant_reference(self, refs: RefList) -> int:
        ref = refs.head
        if ref == GNTTAB_LIST_END:
            raise NoSpace("private reference list is empty")
        refs.head = self._next[ref]
        refs.count -= 1
        self._next[ref] = GNTTAB_LIST_END
        return ref

    def release_grant_reference(self, ref: int, refs: RefList) -> None:
        self._next[ref] = refs.head
        refs.head = ref
        refs.count += 1

    def free_grant_references(self, refs: RefList) -> None:
        while refs.head != GNTTAB_LIST_END:
            ref = refs.head
            refs.head = self._next[ref]
            self._put(ref)
        refs.count = 0
        self._check_free_callbacks()

    def free_grant_reference(self, ref: int) -> None:
        self._check_ref(ref)
        self._put(ref)
        self._check_free_callbacks()

    @property
    def waiters(self) -> int:
        """Free callbacks waiting for references (whoever takes some now jumps their queue)."""
        return len(self._callbacks)

    def request_free_callback(self, callback: Callable[[], None], count: int) -> None:
        """Call `callback` once, when at least `count` references are free."""
        self._callbacks.append((count, callback))
        self._check_free_callbacks()

    def cancel_free_callback(self, callback: Callable[[], None]) -> None:
        self._callbacks = [(n, cb) for n, cb in self._callbacks if cb is not callback]

    def _check_free_callbacks(self) -> None:
        ready = [(n, cb) for n, cb in self._callbacks if n <= self.free_count]
        if ready:
            self._callbacks = [(n, cb) for n, cb in self._callbacks if n > self.free_count]
            for _, cb in ready:
                cb()

    # -- granting ------------------------------------------------------------------

    def _check_ref(self, ref: int) -> None:
        if not 0 <= ref < self.nr_entries:
            raise ValueError(f"grant reference {ref} outside the table")

    # T:320 Granting a page, and taking it back
    # The granting domain fills frame and domid, then sets the flags last; the
    # hypervisor reads them in the opposite order.  To take the page back it swaps the
    # flags to 0 only while GTF_reading/GTF_writing are clear.  If the page is still
    # mapped the swap is refused and the reference waits on a deferred list, retried
    # until the mapping ends: only then are the reference and the page reused.
    # :T
    def grant_foreign_access_ref(self, ref: int, domid: int, frame: int, readonly: bool = False) -> None:
        self._check_ref(ref)
        off = ref * _ENTRY
        _U32.pack_into(self._table, off + GRANT_ENTRY_V1_FRAME, frame)
        _DOMID.pack_into(self._table, off + GRANT_ENTRY_V1_DOMID, domid)
        # Ordering point: frame and domid above are visible before the flags (x86 TSO).
        _FLAGS.pack_into(self._table, off + GRANT_ENTRY_V1_FLAGS, GTF_permit_access | (GTF_readonly if readonly else 0))

    def grant_foreign_access(self, domid: int, frame: int, readonly: bool = False) -> int:
        ref = self._take(1)
        self.grant_foreign_access_ref(ref, domid, frame, readonly)
        return ref

    def flags(self, ref: int) -> int:
        value: int = _FLAGS.unpack_from(self._table, ref * _ENTRY + GRANT_ENTRY_V1_FLAGS)[0]
        return value

    def query_foreign_access(self, ref: int) -> bool:
        """True while the entry is mapped (GTF_reading or GTF_writing)."""
        return bool(self.flags(ref) & (GTF_reading | GTF_writing))

    def end_foreign_access_ref(self, ref: int) -> bool:
        """Revoke the grant unless it is in use; True if revoked."""
        self._check_ref(ref)
        off = ref * _ENTRY
        word: int = _U32.unpack_from(self._table, off)[0]
        while True:
            if word & (GTF_reading | GTF_writing):
                return False
            found = self._atomic.cmpxchg32(off, word, word & 0xFFFF0000)
            if found == word:
                return True
            word = found

    def end_foreign_access(self, ref: int, on_freed: Callable[[int], None] | None = None) -> bool:
        """Revoke and free `ref` now (True), or as soon as its mapping ends (False)."""
        if self.end_foreign_access_ref(ref):
            self._put(ref)
            if on_freed is not None:
                on_freed(ref)
            self._check_free_callbacks()
            return True
        self.deferred[ref] = on_freed
        return False

    def poll_deferred(self) -> int:
        """Retry the deferred references; returns how many were freed."""
        freed = 0
        for ref, on_freed in list(self.deferred.items()):
            if self.end_foreign_access_ref(ref):
                del self.deferred[ref]
                self._put(ref)
                if on_freed is not None:
                    on_freed(ref)
                freed += 1
        if freed:
            self._check_free_callbacks()
        return freed

    # -- transfers ---------------------------------------------------------------------

    def grant_foreign_transfer_ref(self, ref: int, domid: int, frame: int) -> None:
        """Accept a page from `domid` into our `frame` (pvio: the frame to receive into)."""
        self._check_ref(ref)
        off = ref * _ENTRY
        _U32.pack_into(self._table, off + GRANT_ENTRY_V1_FRAME, frame)
        _DOMID.pack_into(self._table, off + GRANT_ENTRY_V1_DOMID, domid)
        _FLAGS.pack_into(self._table, off + GRANT_ENTRY_V1_FLAGS, GTF_accept_transfer)

    def end_foreign_transfer_ref(self, ref: int) -> int | None:
        """0 if nothing came (entry cleared), the frame if a page arrived, None if in flight."""
        off = ref * _ENTRY
        word: int = _U32.unpack_from(self._table, off)[0]
        while not word & GTF_transfer_committed:
            found = self._atomic.cmpxchg32(off, word, word & 0xFFFF0000)
            if found == word:
                return 0
            word = found
        if not word & GTF_transfer_completed:
            return None
        frame: int = _U32.unpack_from(self._table, off + 4)[0]
        _FLAGS.pack_into(self._table, off + GRANT_ENTRY_V1_FLAGS, 0)
        return frame
