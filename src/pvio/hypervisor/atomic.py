"""A real compare-and-swap on shared memory, from Python: libatomic through ctypes.

Theory of operation
-------------------
A grant entry's first four bytes (flags, domid) are written by two parties at once: the
granting domain ends access by swapping flags to 0 only if GTF_reading/GTF_writing are
clear, and the hypervisor pins an entry by setting those bits only if the entry still
permits the mapper.  Both must be atomic read-modify-writes on memory that two processes
map, or a revoke can slip between the hypervisor's check and its store (the page would
then be reused while mapped).  Python has no atomic instruction of its own.

pvio calls ``__atomic_compare_exchange_4`` in libatomic (gcc's runtime library, Debian
package libatomic1, installed with gcc).  On x86-64 it is a ``lock cmpxchg`` on the
address, which is atomic between processes sharing the page, and a full barrier.
Clearing bits needs no compare: ``__atomic_fetch_and_4`` (a ``lock and``, or a
``lock cmpxchg`` loop inside libatomic) does it in one call, as Xen's
``gnttab_clear_flags`` clears GTF_reading/GTF_writing with an atomic bit clear.  A call
through ctypes costs about half a microsecond untyped (``pvio bench hypervisor``
reports it).

Rejected: a PyPI package for atomics (one more dependency that wraps the same builtin);
a design in which only the hypervisor writes the flags (every end_foreign_access would
become a hypercall round trip, and Xen's C granters could no longer share the table);
a lock in shared memory (a dead holder would wedge the other side).

The 32-bit word is used, as Xen does, so that flags and domid are checked together: a
granter cannot re-target an entry between the hypervisor's check and its pin.
"""

from __future__ import annotations

import ctypes
from typing import Any

from pvio.abi.native import libatomic

__all__ = ["AtomicWords"]

_ATOMIC_SEQ_CST = 5


class AtomicWords:
    """Atomic 32-bit compare-and-swap at byte offsets of a writable buffer (e.g. an mmap).

    The buffer stays exported while this object lives; call `release()` before closing it.
    One thread at a time: the calls share one address holder (`_where`).
    """

    def __init__(self, buf: Any) -> None:
        self._anchor: Any = (ctypes.c_char * len(memoryview(buf))).from_buffer(buf)
        self._base = ctypes.addressof(self._anchor)
        self._size = len(self._anchor)
        lib = libatomic()
        self._cas = getattr(lib, "__atomic_compare_exchange_4")
        self._fetch_and = getattr(lib, "__atomic_fetch_and_4")
        self._expected = ctypes.c_uint32(0)
        self._expected_ptr = ctypes.c_void_p(ctypes.addressof(self._expected))
        #: the word's address, set before each call (untyped calls: see libatomic)
        self._where = ctypes.c_void_p(0)

    def cmpxchg32(self, offset: int, old: int, new: int) -> int:
        """Atomically: if word == old, word = new.  Returns the value found (== old on success)."""
        if offset < 0 or offset + 4 > self._size or offset % 4:
            raise ValueError(f"cmpxchg32 at bad offset {offset}")
        self._expected.value = old
        self._where.value = self._base + offset
        self._cas(self._where, self._expected_ptr, new & 0xFFFFFFFF, _ATOMIC_SEQ_CST, _ATOMIC_SEQ_CST)
        return self._expected.value

    def fetch_and32(self, offset: int, mask: int) -> int:
        """Atomically: word &= mask.  Returns the value found before."""
        if offset < 0 or offset + 4 > self._size or offset % 4:
            raise ValueError(f"fetch_and32 at bad offset {offset}")
        self._where.value = self._base + offset
        found: int = self._fetch_and(self._where, mask & 0xFFFFFFFF, _ATOMIC_SEQ_CST)
        return found

    def release(self) -> None:
        self._anchor = None
        self._base = 0
        self._size = 0
