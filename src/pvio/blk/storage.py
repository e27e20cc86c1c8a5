"""Storage behind blkback: raw image files, with vectored I/O straight into guest pages.

Theory of operation
-------------------
blkback hands storage a list of memoryviews — in the map transport these are windows
onto the granted pages of the guest's memory itself — and storage moves the bytes with
one preadv/pwritev system call, so a request's data is never copied by Python (zero
copy).  The calls block; blkback runs them in a thread pool so that a slow disk never
stalls the ring or XenStore.  Partial transfers are retried until complete; a short read
inside the disk (the image shrank under us) is an I/O error, not silent zeroes.

Formats other than raw, and storage on other machines, are reached through NBD
(qemu-nbd / qemu-storage-daemon / any NBD server) by an NBD-backed storage with the same
interface.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import stat
from collections.abc import Sequence
from typing import Protocol

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


class StorageError(OSError):
    """An I/O failure of the storage: blkback answers BLKIF_RSP_ERROR."""


class Storage(Protocol):
    """What blkback needs from a disk.  Blocking calls: run them off the event loop."""

    size: int  # bytes
    read_only: bool
    sector_size: int
    physical_sector_size: int
    supports_discard: bool

    def readv(self, offset: int, buffers: Sequence[memoryview]) -> None: ...
    def writev(self, offset: int, buffers: Sequence[memoryview]) -> None: ...
    def flush(self) -> None: ...
    def discard(self, offset: int, length: int) -> None: ...
    def close(self) -> None: ...


def _libc_fallocate() -> ctypes._NamedFuncPointer | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        fn = ctypes.CDLL(name, use_errno=True).fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


_FALLOCATE = _libc_fallocate()

#: preadv2/pwritev2 flag: fail with EAGAIN rather than block (Linux >= 4.14; 0 if absent).
_NOWAIT: int = getattr(os, "RWF_NOWAIT", 0)


class RawFileStorage:
    """A raw disk image (or block device) opened once; every transfer is one syscall."""

    sector_size = 512

    def __init__(self, path: str | os.PathLike[str], *, read_only: bool = False):
        self.path = os.fspath(path)
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        try:
            self.fd = os.open(self.path, flags)
        except OSError as e:
            raise StorageError(e.errno, f"cannot open disk image {self.path}: {e.strerror}") from None
        st = os.fstat(self.fd)
        if stat.S_ISBLK(st.st_mode):
            self.size = os.lseek(self.fd, 0, os.SEEK_END)
        elif stat.S_ISREG(st.st_mode):
            self.size = st.st_size
        else:
            os.close(self.fd)
            raise StorageError(errno.EINVAL, f"{self.path} is not a file or block device")
        self.read_only = read_only
        self.physical_sector_size = max(512, min(st.st_blksize, 4096))
        self.supports_discard = _FALLOCATE is not None and stat.S_ISREG(st.st_mode) and not read_only

    def refresh_size(self) -> int:
        """Re-read the image's size (after the file or device grew); returns it."""
        st = os.fstat(self.fd)
        self.size = os.lseek(self.fd, 0, os.SEEK_END) if stat.S_ISBLK(st.st_mode) else st.st_size
        return self.size

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or offset + length > self.size:
            raise StorageError(errno.EINVAL, f"{offset}+{length} is outside the disk ({self.size})")

    def readv(self, offset: int, buffers: Sequence[memoryview]) -> None:
        total = sum(len(b) for b in buffers)
        self._check(offset, total)
        bufs = list(buffers)
        while bufs:
            n = os.preadv(self.fd, bufs, offset)
            if n == 0:
                raise StorageError(errno.EIO, f"short read at {offset} in {self.path}")
            offset += n
            bufs = _advance(bufs, n)

    def readv_nowait(self, offset: int, buffers: Sequence[memoryview]) -> bool:
        """Read only if it cannot block (preadv2 RWF_NOWAIT: the data is in the page
        cache); True if done, False if the caller must use `readv` (from a thread)."""
        if not _NOWAIT:
            return False
        total = sum(len(b) for b in buffers)
        self._check(offset, total)
        try:
            return os.preadv(self.fd, buffers, offset, _NOWAIT) == total
        except OSError:  # EAGAIN: not cached; EOPNOTSUPP: not on this file
            return False

    def writev_nowait(self, offset: int, buffers: Sequence[memoryview]) -> bool:
        """Write only if it cannot block (pwritev2 RWF_NOWAIT); True if all was written.
        A partial write is harmless: `writev` writes the same bytes again."""
        if not _NOWAIT or self.read_only:
            return False
        total = sum(len(b) for b in buffers)
        self._check(offset, total)
        try:
            return os.pwritev(self.fd, buffers, offset, _NOWAIT) == total
        except OSError:
            return False

    def writev(self, offset: int, buffers: Sequence[memoryview]) -> None:
        if self.read_only:
            raise StorageError(errno.EROFS, f"{self.path} is read-only")
        total = sum(len(b) for b in buffers)
        self._check(offset, total)
        bufs = list(buffers)
        while bufs:
            n = os.pwritev(self.fd, bufs, offset)
            offset += n
            bufs = _advance(bufs, n)

    def flush(self) -> None:
        if not self.read_only:
            os.fdatasync(self.fd)

    def discard(self, offset: int, length: int) -> None:
        if not self.supports_discard or _FALLOCATE is None:
            raise StorageError(errno.EOPNOTSUPP, "discard is not supported")
        self._check(offset, length)
        if _FALLOCATE(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
            err = ctypes.get_errno()
            raise StorageError(err, f"discard failed: {os.strerror(err)}")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _advance(bufs: list[memoryview], n: int) -> list[memoryview]:
    """Drop the first `n` bytes from a list of buffers (after a partial transfer)."""
    while bufs and n >= len(bufs[0]):
        n -= len(bufs[0])
        bufs = bufs[1:]
    if bufs and n:
        bufs = [bufs[0][n:], *bufs[1:]]
    return bufs


def create_sparse_image(path: str | os.PathLike[str], size: int) -> None:
    """Create a sparse raw image of `size` bytes if it does not exist (never truncates)."""
    fd = os.open(os.fspath(path), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
