"""`RawFile`: a raw image file (or block device) as a `VectoredBackend`, never blocking the
event loop.  blkback, the NBD server and the lguest Launcher all serve images with it.

Theory of operation
-------------------
The event loop that serves rings, XenStore and NBD clients must never wait for a disk.
A transfer first tries ``preadv``/``pwritev`` with ``RWF_NOWAIT`` inline: when the data is
in the page cache (a hot image) that is one system call and no thread hop; when it is
not, the kernel says EAGAIN at once and the transfer goes to a small thread pool with a
plain ``preadv``/``pwritev`` (a file system without buffered NOWAIT writes is remembered
and not asked again).  FUA writes use ``RWF_DSYNC`` in the pool; FLUSH is ``fdatasync``
in the pool.  TRIM punches a hole and WRITE_ZEROES zeroes a range with ``fallocate(2)``
(`pvio.abi.native`), falling back to writing zeroes where the file system cannot.

The vectored calls move bytes straight between the file and the caller's memoryviews —
in blkback's map transport, the guest's granted pages — with no copy by Python.  Partial
transfers are continued until complete; what lies past the end of a file that shrank
under us reads as zeroes, as QEMU's raw driver does.

Served over NBD, a read of 64 KiB or more is *lent* (`pvio.storage.lent`): read into a
buffer from the file's `pvio.storage.buffers.BufferPool` and sent from there, the buffer
going back to the pool when the reply has left or been copied, instead of a new buffer
allocated and zeroed for every read.

Where the file system refuses buffered NOWAIT writes (ext4 does), a write of whole pages
is still made inline while `pvio.storage.dirty.WriteGate` says the kernel will not
throttle it (the dirty pages are well under the level where balance_dirty_pages pauses
writers, and no inline write has been slow lately); otherwise it takes the pool.

The pool is batched: one thread hop per request costs more than a 4 KiB pwrite itself (a
future, a wake-up of a worker, a wake-up of the loop through its self-pipe).  Calls made
in one turn of the loop go to the pool together, split over the workers so that a slow
disk still sees them in parallel (what reaches the pool is what would block), and each
share's results come back with one wake-up of the loop.

Alternatives rejected: io_uring (4 KiB random writes through liburing from PyPI: 1.07x the
pool, since ext4's buffered writes go to io_uring's worker threads too); mmap (page
faults would block the loop, and a truncated file would SIGBUS the process); a thread per
request (thread hops dominate at 4 KiB).  `pvio bench` compares this file, served over
NBD and through blkback, with qemu-nbd on the same file.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import functools
import os
import stat
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from pvio.abi.native import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    fallocate,
)
from pvio.storage.backend import DEFAULT_MAX_BLOCK, BackendInfo, StorageError
from pvio.storage.buffers import BufferPool
from pvio.storage.dirty import WriteGate, voluntary_switches
from pvio.storage.lent import Lent, LentDone
from pvio.storage.lock import lock_image

_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
_RWF_DSYNC = getattr(os, "RWF_DSYNC", 0)
_NOT_SUPPORTED = (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
#: One per process: the kernel's dirty state is the whole system's (`pvio.storage.dirty`)
_GATE: WriteGate | None = None


def write_gate() -> WriteGate:
    global _GATE
    if _GATE is None:
        _GATE = WriteGate()
    return _GATE

# T:760 A raw file without blocking the event loop
# Reads first try `preadv(..., RWF_NOWAIT)` inline: if the data is in the page cache that
# is one system call and done; otherwise the kernel says EAGAIN at once and the read goes
# to a small thread pool.  Writes do the same with `pwritev` where the file system allows
# it; where it does not (ext4), a write of whole pages is made inline while the kernel's
# dirty pages are far from the level where it throttles writers (`WriteGate`).  FUA
# writes use RWF_DSYNC, FLUSH is fdatasync, TRIM punches a hole and WRITE_ZEROES zeroes
# a range with fallocate(2) — all in the pool, so a slow disk stalls only the
# requests waiting for it.  blkback, the NBD server and the lguest Launcher share this file.
# :T

_Call = tuple[Callable[..., object], tuple[object, ...], "asyncio.Future[object]"]
_Result = tuple["asyncio.Future[object]", object, BaseException | None]


def _complete(results: list[_Result]) -> None:
    for fut, value, exc in results:
        if fut.done():
            continue
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(value)


def _advance(bufs: list[memoryview], n: int) -> list[memoryview]:
    """Drop the first `n` bytes from a list of buffers (after a partial transfer)."""
    while bufs and n >= len(bufs[0]):
        n -= len(bufs[0])
        bufs = bufs[1:]
    if bufs and n:
        bufs = [bufs[0][n:], *bufs[1:]]
    return bufs


def _image_size(fd: int, st: os.stat_result) -> int:
    return os.lseek(fd, 0, os.SEEK_END) if stat.S_ISBLK(st.st_mode) else st.st_size


class RawFile:
    """A raw image file or block device served as a disk (see the module docstring)."""

    def __init__(
        self, path: str | os.PathLike[str], *, read_only: bool = False, workers: int = 4, nowait: bool = True,
        lock: bool = True,
    ) -> None:
        self.path = os.fspath(path)
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        try:
            self.fd = os.open(self.path, flags)
        except OSError as e:
            raise StorageError(e.errno, f"cannot open disk image {self.path}: {e.strerror}") from None
        st = os.fstat(self.fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            os.close(self.fd)
            raise StorageError(errno.EINVAL, f"{self.path} is not a file or block device")
        if lock:  # as QEMU does: a writer has the image alone (`pvio.storage.lock`)
            try:
                lock_image(self.fd, self.path, write=not read_only)
            except OSError:
                os.close(self.fd)
                raise
        self._info = BackendInfo(
            size=_image_size(self.fd, st),
            read_only=read_only,
            preferred_block=max(512, min(st.st_blksize, 4096)),
            max_block=DEFAULT_MAX_BLOCK,
            can_trim=not read_only,
            can_write_zeroes=not read_only,
            can_multi_conn=True,  # one fd, one page cache: every connection sees every write
        )
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pvio-rawfile")
        self._workers = workers
        self._batch: list[_Call] = []
        #: the loop the pool answers on, kept while it lives (get_running_loop() is a getpid())
        self._loop: asyncio.AbstractEventLoop | None = None
        self._nowait_read = nowait and bool(_RWF_NOWAIT)
        self._nowait_write = nowait and bool(_RWF_NOWAIT) and not read_only
        #: where NOWAIT writes are refused: whole-page writes inline while the kernel is calm
        self._gate: WriteGate | None = write_gate() if nowait and not read_only else None
        #: the buffers of large reads lent to the NBD server, used again (`read_lent`)
        self.buffers = BufferPool()
        self._punch_ok = True
        self._zero_range_ok = True
        #: transfers done inline with RWF_NOWAIT, writes let through by the gate, pool jobs
        self.nowait = 0
        self.gated = 0
        self.pool_jobs = 0

    @property
    def info(self) -> BackendInfo:
        return self._info

    @property
    def gate(self) -> WriteGate | None:
        """The write gate this image's inline writes go through (None: never inline)."""
        return self._gate

    @property
    def size(self) -> int:
        return self._info.size

    def refresh_size(self) -> int:
        """Re-read the image's size (after the file or device grew); returns it."""
        size = _image_size(self.fd, os.fstat(self.fd))
        self._info = dataclasses.replace(self._info, size=size)
        return size

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self._info.size:
            raise StorageError(errno.EINVAL, f"{offset}+{length} is outside the disk ({self._info.size})")

    # --- the thread pool, batched ----------------------------------------------------------

    async def _in_pool(self, fn: Callable[..., object], *args: object) -> object:
        loop = self._loop
        if loop is None or loop.is_closed():
            loop = self._loop = asyncio.get_running_loop()
        fut: asyncio.Future[object] = loop.create_future()
        self._batch.append((fn, args, fut))
        if len(self._batch) == 1:
            loop.call_soon(self._submit_batch, loop)
        return await fut

    def _submit_batch(self, loop: asyncio.AbstractEventLoop) -> None:
        batch, self._batch = self._batch, []
        shares = min(len(batch), self._workers)
        for i in range(shares):
            self.pool_jobs += 1
            self._pool.submit(self._run_share, loop, batch[i::shares])

    @staticmethod
    def _run_share(loop: asyncio.AbstractEventLoop, share: list[_Call]) -> None:
        results: list[_Result] = []
        for fn, args, fut in share:
            try:
                results.append((fut, fn(*args), None))
            except BaseException as exc:  # handed to the awaiting coroutine
                results.append((fut, None, exc))
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
            loop.call_soon_threadsafe(_complete, results)

    # --- read ---------------------------------------------------------------------------------

    def transfer_now(self, offset: int, buffers: Sequence[memoryview], write: bool) -> bool:
        """The transfer of `readv`/`writev` (not FUA) made at once if it cannot block
        (RWF_NOWAIT): True when done, False when it would block (use those then).  For
        callers that would otherwise make a task per transfer only to find it done."""
        total = sum(len(b) for b in buffers)
        self._check(offset, total)
        if write and self._info.read_only:
            raise StorageError(errno.EROFS, f"{self.path} is read-only")
        if not total:
            return True
        if write and not self._nowait_write:
            return self._gated_write(offset, buffers, total)
        if not (self._nowait_write if write else self._nowait_read):
            return False
        try:
            if write:
                done = os.pwritev(self.fd, buffers, offset, _RWF_NOWAIT) == total
            else:
                done = os.preadv(self.fd, buffers, offset, _RWF_NOWAIT) == total
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno not in _NOT_SUPPORTED:
                raise
            if write:
                self._nowait_write = False
            else:
                self._nowait_read = False
            return False
        if done:
            self.nowait += 1
        return done  # a short transfer: the awaiting way does it whole

    def _gated_write(self, offset: int, buffers: Sequence[memoryview], total: int) -> bool:
        """A plain pwritev on the event loop if the gate allows it; True when done."""
        gate = self._gate
        if gate is None or not gate.open(offset, total):
            return False
        start = time.perf_counter()
        before = voluntary_switches()
        done = os.pwritev(self.fd, buffers, offset) == total
        gate.took(time.perf_counter() - start, lambda: voluntary_switches() != before)
        if done:
            self.gated += 1
        return done  # a short write: the pool writes the same bytes again, whole

    async def readv(self, offset: int, buffers: Sequence[memoryview]) -> None:
        total = sum(len(b) for b in buffers)
        self._check(offset, total)
        if not total:
            return
        if self._nowait_read:
            try:
                if os.preadv(self.fd, buffers, offset, _RWF_NOWAIT) == total:
                    self.nowait += 1
                    return
            except BlockingIOError:
                pass
            except OSError as exc:
                if exc.errno not in _NOT_SUPPORTED:
                    raise
                self._nowait_read = False
        await self._in_pool(self._readv, offset, list(buffers))

    def _readv(self, offset: int, bufs: list[memoryview]) -> None:
        while bufs:
            n = os.preadv(self.fd, bufs, offset)
            if n == 0:  # the file shrank under us: what is beyond its end reads as zeroes
                for b in bufs:
                    b[:] = bytes(len(b))
                return
            offset += n
            bufs = _advance(bufs, n)

    async def read(self, offset: int, length: int) -> bytearray:
        buf = bytearray(length)
        await self.readv(offset, [memoryview(buf)])
        return buf  # a bytearray: handed to the socket as is, never copied again

    # T:765 A large read lent from a buffer used again
    # Served over NBD, a 1 MiB READ used to cost a fresh 1 MiB bytearray: pages faulted in
    # and zeroed before the file's bytes overwrote them, most of the server's time.  As a
    # `Lending` backend (`pvio.storage.lent`) the file reads into a buffer from its
    # `BufferPool` and lends it; the NBD server sends it straight from there and releases
    # it, which puts the buffer back for the next read.
    # :T
    def submit_read_lent(self, offset: int, length: int, done: LentDone) -> bool:
        """The read made at once if it cannot block (RWF_NOWAIT), its bytes lent to `done`;
        False if it would block (then `read_lent`)."""
        buf = self.buffers.take(length)
        view = memoryview(buf)[:length]
        try:
            started = self.transfer_now(offset, [view], write=False)
        except BaseException:
            self.buffers.give(buf)
            raise
        if not started:
            self.buffers.give(buf)
            return False
        done(None, self._lend(buf, view))
        return True

    async def read_lent(self, offset: int, length: int) -> Lent:
        """`length` bytes at `offset`, lent from a pooled buffer until released."""
        buf = self.buffers.take(length)
        view = memoryview(buf)[:length]
        await self.readv(offset, [view])  # failed or cancelled: the buffer is dropped (a worker may hold it)
        return self._lend(buf, view)

    def _lend(self, buf: bytearray, view: memoryview) -> Lent:
        return Lent([view], functools.partial(self.buffers.give, buf))

    # --- write --------------------------------------------------------------------------------

    async def writev(self, offset: int, buffers: Sequence[memoryview], fua: bool = False) -> None:
        if self._info.read_only:
            raise StorageError(errno.EROFS, f"{self.path} is read-only")
        total = sum(len(b) for b in buffers)
        self._check(offset, total)
        if not total and not fua:
            return
        if self._nowait_write and not fua:
            try:
                if os.pwritev(self.fd, buffers, offset, _RWF_NOWAIT) == total:
                    self.nowait += 1
                    return  # a partial write is harmless: the pool writes the same bytes again
            except BlockingIOError:
                pass
            except OSError as exc:
                if exc.errno not in _NOT_SUPPORTED:
                    raise
                self._nowait_write = False  # buffered RWF_NOWAIT writes: not on this fs
        if not self._nowait_write and not fua and self._gated_write(offset, buffers, total):
            return
        await self._in_pool(self._writev, offset, list(buffers), fua)

    def _writev(self, offset: int, bufs: list[memoryview], fua: bool) -> None:
        flags = _RWF_DSYNC if fua else 0
        wrote = bool(bufs)
        while bufs:
            n = os.pwritev(self.fd, bufs, offset, flags)
            offset += n
            bufs = _advance(bufs, n)
        if fua and (not flags or not wrote):  # no RWF_DSYNC, or nothing written with it
            os.fdatasync(self.fd)

    async def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        await self.writev(offset, [memoryview(data)], fua)

    async def flush(self) -> None:
        if not self._info.read_only:
            await self._in_pool(os.fdatasync, self.fd)

    # --- trim and zeroes ----------------------------------------------------------------------

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self._check(offset, length)
        await self._in_pool(self._trim, offset, length, fua)

    def _trim(self, offset: int, length: int, fua: bool) -> None:
        if self._punch_ok and length:
            try:
                fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
            except OSError as exc:
                if exc.errno not in _NOT_SUPPORTED:
                    raise
                self._punch_ok = False  # trim is advisory: doing nothing is correct
        if fua:
            os.fdatasync(self.fd)

    async def write_zeroes(
        self, offset: int, length: int, fua: bool = False, may_trim: bool = True
    ) -> None:
        self._check(offset, length)
        await self._in_pool(self._write_zeroes, offset, length, fua, may_trim)

    def _write_zeroes(self, offset: int, length: int, fua: bool, may_trim: bool) -> None:
        if length:
            modes = []
            if may_trim and self._punch_ok:
                modes.append(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)
            if self._zero_range_ok:
                modes.append(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE)
            for mode in modes:
                try:
                    fallocate(self.fd, mode, offset, length)
                    break
                except OSError as exc:
                    if exc.errno not in _NOT_SUPPORTED:
                        raise
                    if mode & FALLOC_FL_PUNCH_HOLE:
                        self._punch_ok = False
                    else:
                        self._zero_range_ok = False
            else:
                chunk = bytes(min(length, 1 << 20))
                end = offset + length
                while offset < end:
                    n = min(len(chunk), end - offset)
                    offset += os.pwrite(self.fd, chunk[:n], offset)
        if fua:
            os.fdatasync(self.fd)

    # --- lifetime -----------------------------------------------------------------------------

    def close_now(self) -> None:
        """Close from synchronous code (waits for the pool's running jobs)."""
        self._pool.shutdown(wait=True)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    async def close(self) -> None:
        self.close_now()


def create_sparse_image(path: str | os.PathLike[str], size: int) -> None:
    """Create a sparse raw image of `size` bytes if it does not exist (never truncates)."""
    fd = os.open(os.fspath(path), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
