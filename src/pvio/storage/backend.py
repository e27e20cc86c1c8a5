"""The one block-backend contract: `BlockBackend`, its description `BackendInfo`, and the
vectored form blkback uses.

Theory of operation
-------------------
A disk, to every part of pvio that serves one, is a range of bytes with a handful of
operations.  `BlockBackend` is that contract, as a `typing.Protocol` of async methods:
the NBD server (`pvio.nbd.server_asyncio`) serves any backend without knowing what it is;
blkback (`pvio.blk.backend`) moves granted pages to and from one; the lguest Launcher
serves its guests' disks from one.  pvio's backends: a raw file or block device
(`pvio.storage.rawfile.RawFile`), memory (`MemoryBackend`, here, for tests), another NBD
server (`pvio.nbd.client_asyncio.NbdClient`, which is how blkback serves qcow2 through
qemu-nbd), a guest's blkfront (`pvio.blk.frontend.BlkFront`, which is how a guest's disk
becomes an NBD export) and an lguest guest's disk.

A backend is described once by a frozen `BackendInfo`: size, read-only, the block-size
constraints it wants clients to honour, and which optional operations it really
implements.  The NBD server derives the transmission flags it advertises from that
description and nothing else, so a flag is set exactly when the operation works; blkback
derives `feature-discard` and `physical-sector-size` from it the same way.

Callers validate every request against `BackendInfo` before calling a backend: a backend
may assume offsets and lengths are in range and aligned, and that it is never written to
when read-only.  Backends report failure by raising `OSError` with an errno
(`StorageError` for the storage's own failures); the NBD server turns that into the wire
error, blkback into BLKIF_RSP_ERROR.

Vectored I/O (`VectoredBackend`: `readv`/`writev` between the backend and a list of
memoryviews, which in blkback's map transport are the guest's granted pages themselves)
is offered by backends that can do it without a copy (`RawFile`, `MemoryBackend`);
`vectored(backend)` gives any other backend that form with one copy.

Deliberately not here: caching, request merging, or any notion of a connection.
"""

from __future__ import annotations

import dataclasses
import errno
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

#: The block-size constraints a backend has unless it says otherwise: any byte range
#: (minimum 1), 4 KiB preferred — the defaults the NBD protocol gives a server that sends
#: no NBD_INFO_BLOCK_SIZE — and at most NBD's "portable" maximum payload (32 MiB).
DEFAULT_MIN_BLOCK = 1
DEFAULT_PREFERRED_BLOCK = 4096
DEFAULT_MAX_BLOCK = 1 << 25


class StorageError(OSError):
    """The storage failed (or cannot be opened): an I/O error with an errno and a reason."""


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# T:750 What serves a disk
# `BlockBackend` is the whole contract between storage and whatever serves it — the NBD
# server, blkback, the lguest Launcher: `info` (size, read-only, block-size constraints,
# which optional operations really work) and async read, write (with FUA), flush, trim and
# write_zeroes.  The caller validates every request against `info` first, so a backend
# never sees an out-of-range or unaligned request.  pvio ships a raw file, a memory backend
# for tests, and `NbdClient` (which makes any NBD server a backend); pvio's blkfront
# implements the same protocol, which is how a guest's disk becomes an NBD export.
# :T


@dataclass(frozen=True)
class BackendInfo:
    """A backend's size, access, block-size constraints and optional operations."""

    size: int
    read_only: bool = False
    min_block: int = DEFAULT_MIN_BLOCK
    preferred_block: int = DEFAULT_PREFERRED_BLOCK
    max_block: int = DEFAULT_MAX_BLOCK
    can_flush: bool = True
    can_fua: bool = True
    can_trim: bool = False
    can_write_zeroes: bool = False
    #: Every connection sees the others' completed writes and flushes (one shared cache).
    can_multi_conn: bool = True

    def __post_init__(self) -> None:
        # The NBD_INFO_BLOCK_SIZE rules, checked here so that a backend cannot make the
        # server advertise constraints a client must reject.
        if self.size < 0 or self.size >= 1 << 63:
            raise ValueError(f"size {self.size} out of range")
        if not _is_power_of_two(self.min_block) or self.min_block > 1 << 16:
            raise ValueError(f"min_block {self.min_block}: a power of 2 up to 64 KiB")
        if not _is_power_of_two(self.preferred_block) or self.preferred_block < max(
            self.min_block, 512
        ):
            raise ValueError(f"preferred_block {self.preferred_block}: a power of 2 >= max(min, 512)")
        if self.max_block != 0xFFFFFFFF and (
            self.max_block % self.min_block
            or self.max_block < min(self.preferred_block, self.size)
            or self.max_block > 0xFFFFFFFF
        ):
            raise ValueError(f"max_block {self.max_block}: a multiple of min >= preferred")
        if self.read_only and (self.can_trim or self.can_write_zeroes):
            raise ValueError("a read-only backend cannot trim or write zeroes")


@runtime_checkable
class BlockBackend(Protocol):
    """The storage behind an export.  All offsets/lengths are pre-validated by the caller."""

    @property
    def info(self) -> BackendInfo: ...

    async def read(self, offset: int, length: int) -> bytes | bytearray: ...

    async def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None: ...

    async def flush(self) -> None: ...

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        """Only called when `info.can_trim`; the range may read back as anything after."""
        ...

    async def write_zeroes(
        self, offset: int, length: int, fua: bool = False, may_trim: bool = True
    ) -> None:
        """Only called when `info.can_write_zeroes`; the range reads back as zeroes."""
        ...


@runtime_checkable
class Submitting(Protocol):
    """A backend with a short way for a READ or WRITE that need not wait (blkfront has
    one, `pvio.blk.front_io`): the request is started in the caller's own turn of the
    event loop and `done(error, data)` is called when it completes -- (None, a READ's
    bytes or b"") or (the exception, b"").  False means it was not started: the caller
    uses the awaitable `read`/`write` instead, which wait for whatever was missing."""

    def submit_read(self, offset: int, length: int,
                    done: Callable[[BaseException | None, bytes | bytearray], None]) -> bool: ...

    def submit_write(self, offset: int, data: bytes | memoryview,
                     done: Callable[[BaseException | None, bytes | bytearray], None]) -> bool: ...


@runtime_checkable
class VectoredBackend(BlockBackend, Protocol):
    """A backend that moves bytes straight between itself and the caller's buffers (a
    granted page, say): one system call per transfer and no copy by Python."""

    async def readv(self, offset: int, buffers: Sequence[memoryview]) -> None: ...

    async def writev(self, offset: int, buffers: Sequence[memoryview], fua: bool = False) -> None: ...

    async def close(self) -> None: ...


def physical_sector_size(info: BackendInfo) -> int:
    """The sector size a Xen frontend is told is efficient (`physical-sector-size`)."""
    return max(512, min(info.preferred_block, 4096))


class FlatVectored:
    """Any `BlockBackend` as a `VectoredBackend`, with one copy per transfer (an NbdClient:
    NBD moves the bytes over a socket anyway)."""

    def __init__(self, backend: BlockBackend, *, read_only: bool = False) -> None:
        self.backend = backend
        self._read_only = read_only

    @property
    def info(self) -> BackendInfo:
        info = self.backend.info
        if self._read_only and not info.read_only:
            info = dataclasses.replace(info, read_only=True, can_trim=False, can_write_zeroes=False)
        return info

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        return await self.backend.read(offset, length)

    async def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        await self.backend.write(offset, data, fua)

    async def readv(self, offset: int, buffers: Sequence[memoryview]) -> None:
        total = sum(len(b) for b in buffers)
        data = await self.backend.read(offset, total)
        if len(data) != total:
            raise StorageError(errno.EIO, f"short read at {offset}: {len(data)} of {total}")
        pos = 0
        for b in buffers:
            b[:] = data[pos : pos + len(b)]
            pos += len(b)

    async def writev(self, offset: int, buffers: Sequence[memoryview], fua: bool = False) -> None:
        if self._read_only:
            raise StorageError(errno.EROFS, "the disk is read-only")
        await self.backend.write(offset, b"".join(buffers), fua)

    async def flush(self) -> None:
        if self.backend.info.can_flush:
            await self.backend.flush()

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await self.backend.trim(offset, length, fua)

    async def write_zeroes(
        self, offset: int, length: int, fua: bool = False, may_trim: bool = True
    ) -> None:
        await self.backend.write_zeroes(offset, length, fua, may_trim)

    async def close(self) -> None:
        close = getattr(self.backend, "close", None)
        if close is not None:
            result = close()
            if hasattr(result, "__await__"):
                await result


def vectored(backend: BlockBackend) -> VectoredBackend:
    """`backend` itself when it is vectored, else wrapped in `FlatVectored`."""
    if isinstance(backend, VectoredBackend):
        return backend
    return FlatVectored(backend)


class MemoryBackend:
    """A `BlockBackend` in a bytearray: for tests, and as the simplest correct backend.

    `fail_at` makes any access touching that byte offset raise EIO (a failing sector).
    """

    def __init__(
        self,
        size: int,
        *,
        read_only: bool = False,
        min_block: int = DEFAULT_MIN_BLOCK,
        max_block: int = DEFAULT_MAX_BLOCK,
        fail_at: int | None = None,
    ) -> None:
        self.data = bytearray(size)
        self._info = BackendInfo(
            size=size,
            read_only=read_only,
            min_block=min_block,
            preferred_block=max(4096, min_block),
            max_block=max_block,
            can_trim=not read_only,
            can_write_zeroes=not read_only,
        )
        self.fail_at = fail_at
        self.flushes = 0

    @property
    def info(self) -> BackendInfo:
        return self._info

    def _check(self, offset: int, length: int) -> None:
        if self.fail_at is not None and offset <= self.fail_at < offset + max(length, 1):
            raise OSError(errno.EIO, "injected media error")

    async def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        return bytes(self.data[offset : offset + length])

    async def readv(self, offset: int, buffers: Sequence[memoryview]) -> None:
        for buf in buffers:
            self._check(offset, len(buf))
            buf[:] = self.data[offset : offset + len(buf)]
            offset += len(buf)

    async def writev(self, offset: int, buffers: Sequence[memoryview], fua: bool = False) -> None:
        for buf in buffers:
            await self.write(offset, buf, fua)
            offset += len(buf)

    async def close(self) -> None:
        pass

    async def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        self._check(offset, len(data))
        self.data[offset : offset + len(data)] = data

    async def flush(self) -> None:
        self.flushes += 1

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self._check(offset, length)
        self.data[offset : offset + length] = bytes(length)

    async def write_zeroes(
        self, offset: int, length: int, fua: bool = False, may_trim: bool = True
    ) -> None:
        self._check(offset, length)
        self.data[offset : offset + length] = bytes(length)
