"""What an export serves: the `BlockBackend` protocol and its description, `BackendInfo`.

Theory of operation
-------------------
An NBD export (and, later, a blkfront disk) is a range of bytes with a handful of
operations.  `BlockBackend` is that contract, as a `typing.Protocol` of async methods, so
that the NBD server never knows what it serves: a raw file (`pvio.export.rawfile`), memory
(`MemoryBackend`, here, for tests), another NBD server (`pvio.export.nbd_client.NbdClient`
implements the protocol too, which is how an export can be proxied), or pvio's blkfront.

A backend is described once by a frozen `BackendInfo`: size, read-only, the block-size
constraints it wants clients to honour, and which optional operations it really
implements.  The NBD server derives the transmission flags it advertises from that
description and nothing else, so a flag is set exactly when the operation works.

Callers (the server) validate every request against `BackendInfo` before calling a
backend: a backend may assume offsets and lengths are in range and aligned, and that it
is never written to when read-only.  Backends report failure by raising `OSError` with an
errno; the server turns that into the wire error (EIO, ENOSPC, EPERM).

Deliberately not here: caching, request merging, or any notion of a connection.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from pvio.export.nbd_wire import NBD_DEFAULT_MIN_BLOCK, NBD_DEFAULT_PREFERRED_BLOCK

#: The largest single read or write pvio's backends accept unless they say otherwise: the
#: NBD protocol's "portable" maximum payload (32 MiB).
DEFAULT_MAX_BLOCK = 1 << 25


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# T:750 What an export serves
# `BlockBackend` is the whole contract between the NBD server and storage: `info` (size,
# read-only, block-size constraints, which optional operations really work) and async
# read, write (with FUA), flush, trim and write_zeroes.  The server validates every request
# against `info` before calling, so a backend never sees an out-of-range or unaligned
# request.  pvio ships a raw-file backend, a memory backend for tests, and `NbdClient`
# (which makes any NBD server a backend); pvio's blkfront disk implements the same
# protocol, which is how a guest's disk becomes an NBD export.
# :T


@dataclass(frozen=True)
class BackendInfo:
    """A backend's size, access, block-size constraints and optional operations."""

    size: int
    read_only: bool = False
    min_block: int = NBD_DEFAULT_MIN_BLOCK
    preferred_block: int = NBD_DEFAULT_PREFERRED_BLOCK
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
class ReadIntoBackend(BlockBackend, Protocol):
    """A backend that can also read straight into a caller's buffer (zero-copy into a
    granted page); `RawFileBackend` and `MemoryBackend` can."""

    async def read_into(self, offset: int, buf: memoryview) -> None: ...


class MemoryBackend:
    """A `BlockBackend` in a bytearray: for tests, and as the simplest correct backend.

    `fail_at` makes any access touching that byte offset raise EIO (a failing sector).
    """

    def __init__(
        self,
        size: int,
        *,
        read_only: bool = False,
        min_block: int = NBD_DEFAULT_MIN_BLOCK,
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

    async def read_into(self, offset: int, buf: memoryview) -> None:
        self._check(offset, len(buf))
        buf[:] = self.data[offset : offset + len(buf)]

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
