"""Large buffers used again: a READ's bytes or a WRITE's payload without a fresh allocation.

Theory of operation
-------------------
A server that answers a 1 MiB READ with a new ``bytearray(1 << 20)`` pays for the memory
every time: glibc hands out fresh pages for a block that size, the kernel faults them in
one by one and Python zeroes them, before the disk's bytes overwrite the zeroes.  Served
over NBD from a file, that allocation was most of the server's time for 1 MiB reads; a
1 MiB WRITE's payload buffer cost the same.

`BufferPool` keeps the buffers of finished transfers and hands them out again.  Sizes
are rounded up to a multiple of 64 KiB, so that transfers of nearby lengths share
buffers while no buffer is more than 64 KiB larger than what it holds (a server's bound
on the bytes a client keeps in flight stays nearly what it says); a caller uses the
first `length` bytes of what it gets.  The pool is bounded (`max_bytes` in all, nothing
over `max_size` kept), so a client that reads once with 32 MiB commands does not leave
the process holding them.  A buffer is given back only when nothing can still use it:
the owner of a read that failed or was cancelled (a worker thread may be finishing it)
drops the buffer instead.

The bytes a buffer held before are never sent or written: a read fills its whole length
or fails, and a payload is used only once all of it has arrived.
The pool belongs to one event loop and is not thread-safe.
"""

from __future__ import annotations

#: The smallest size class: smaller transfers are cheap to allocate
MIN_SIZE = 64 << 10
#: Larger buffers are not kept
MAX_SIZE = 8 << 20
#: Bytes kept in all
MAX_BYTES = 64 << 20


def size_class(length: int) -> int:
    """The size of a buffer for `length` bytes: a multiple of `MIN_SIZE`, at least one."""
    return max(MIN_SIZE, -(-length // MIN_SIZE) * MIN_SIZE)


class BufferPool:
    """Buffers by size class, kept while they fit the bounds (see the module notes)."""

    def __init__(self, max_bytes: int = MAX_BYTES, max_size: int = MAX_SIZE) -> None:
        self.max_bytes = max_bytes
        self.max_size = max_size
        self._free: dict[int, list[bytearray]] = {}
        self.kept = 0  # bytes in the free lists
        self.reused = 0  # buffers handed out again
        self.allocated = 0  # buffers made

    def take(self, length: int) -> bytearray:
        """A buffer of at least `length` bytes (its contents are old data, or zeroes)."""
        size = size_class(length)
        free = self._free.get(size)
        if free:
            self.kept -= size
            self.reused += 1
            return free.pop()
        self.allocated += 1
        return bytearray(size)

    def give(self, buf: bytearray) -> None:
        """`buf` (from `take`) is no longer in use by anyone."""
        size = len(buf)
        if size > self.max_size or size % MIN_SIZE or self.kept + size > self.max_bytes:
            return  # not ours to keep, or the pool is full: let it go
        self._free.setdefault(size, []).append(buf)
        self.kept += size
