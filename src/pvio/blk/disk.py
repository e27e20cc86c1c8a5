"""The disk behind blkback, as blkback calls it: async vectored I/O over any storage.

Theory of operation
-------------------
blkback's engine moves data between granted pages (memoryviews) and a disk.  Two kinds
of disk exist:

- `ThreadedDisk` wraps a blocking `pvio.blk.storage.Storage` (a raw image): every
  readv/writev/flush runs in a small thread pool, so the event loop that serves the
  ring and XenStore never waits for the disk, and the bytes go straight between the
  page views and the file (preadv/pwritev, zero copy).
- `BackendDisk` wraps an async `pvio.export.backend.BlockBackend` — in practice an
  `NbdClient` connected to qemu-nbd (qcow2 and other formats) or to an NBD server on
  another machine.  NBD moves bytes over a socket anyway; the views are filled from
  (or joined into) the payload, one copy.

`open_disk(params, read_only)` picks one from the `params` key: an ``nbd://`` or
``nbd+unix://`` URI opens an NBD client, anything else is a raw image path.

Deliberately not here: caching, request merging, formats (qcow2 is qemu's job).
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from pvio.blk.storage import RawFileStorage, Storage, StorageError
from pvio.export.backend import BlockBackend


class Disk(Protocol):
    """What blkback's engine needs: async I/O between a disk and page views."""

    size: int
    read_only: bool
    sector_size: int
    physical_sector_size: int
    supports_discard: bool

    async def readv(self, offset: int, buffers: Sequence[memoryview]) -> None: ...
    async def writev(self, offset: int, buffers: Sequence[memoryview]) -> None: ...
    async def flush(self) -> None: ...
    async def discard(self, offset: int, length: int) -> None: ...
    async def close(self) -> None: ...


NoWait = Callable[[int, Sequence[memoryview]], bool]


class ThreadedDisk:
    """A blocking `Storage` served from a thread pool (so a slow disk never stalls the loop).

    A transfer that cannot block — a read of cached data, a write the page cache
    absorbs — is done at once on the loop with RWF_NOWAIT (`readv_nowait`), saving the
    thread hop (two wake-ups) that dominates a 4 KiB request; the rest go to the pool.
    """

    def __init__(self, storage: Storage, *, threads: int = 4, nowait: bool = True) -> None:
        self.storage = storage
        self.size = storage.size
        self.read_only = storage.read_only
        self.sector_size = storage.sector_size
        self.physical_sector_size = storage.physical_sector_size
        self.supports_discard = storage.supports_discard
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="blkback-io")
        self._readv_nowait: NoWait | None = getattr(storage, "readv_nowait", None) if nowait else None
        self._writev_nowait: NoWait | None = getattr(storage, "writev_nowait", None) if nowait else None
        #: transfers done without the thread pool
        self.nowait = 0

    async def readv(self, offset: int, buffers: Sequence[memoryview]) -> None:
        if self._readv_nowait is not None and self._readv_nowait(offset, buffers):
            self.nowait += 1
            return
        await asyncio.get_running_loop().run_in_executor(self._pool, self.storage.readv, offset, buffers)

    async def writev(self, offset: int, buffers: Sequence[memoryview]) -> None:
        if self._writev_nowait is not None and self._writev_nowait(offset, buffers):
            self.nowait += 1
            return
        await asyncio.get_running_loop().run_in_executor(self._pool, self.storage.writev, offset, buffers)

    async def flush(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._pool, self.storage.flush)

    async def discard(self, offset: int, length: int) -> None:
        await asyncio.get_running_loop().run_in_executor(self._pool, self.storage.discard, offset, length)

    async def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.storage.close()


class BackendDisk:
    """An async `BlockBackend` (an NbdClient, or a MemoryBackend in tests) as a Disk."""

    sector_size = 512

    def __init__(self, backend: BlockBackend) -> None:
        self.backend = backend
        info = backend.info
        self.size = info.size
        self.read_only = info.read_only
        self.physical_sector_size = max(512, min(info.preferred_block, 4096))
        self.supports_discard = info.can_trim

    async def readv(self, offset: int, buffers: Sequence[memoryview]) -> None:
        total = sum(len(b) for b in buffers)
        data = await self.backend.read(offset, total)
        if len(data) != total:
            raise StorageError(errno.EIO, f"short read at {offset}: {len(data)} of {total}")
        pos = 0
        for b in buffers:
            b[:] = data[pos : pos + len(b)]
            pos += len(b)

    async def writev(self, offset: int, buffers: Sequence[memoryview]) -> None:
        if self.read_only:
            raise StorageError(errno.EROFS, "the disk is read-only")
        await self.backend.write(offset, b"".join(buffers))

    async def flush(self) -> None:
        if self.backend.info.can_flush:
            await self.backend.flush()

    async def discard(self, offset: int, length: int) -> None:
        if not self.supports_discard:
            raise StorageError(errno.EOPNOTSUPP, "discard is not supported")
        await self.backend.trim(offset, length)

    async def close(self) -> None:
        close = getattr(self.backend, "close", None)
        if close is not None:
            await close()


def is_nbd_uri(params: str) -> bool:
    return params.startswith(("nbd://", "nbd+unix://"))


async def open_disk(params: str, *, read_only: bool, threads: int = 4) -> Disk:
    """The disk named by a vbd's `params`: a raw image path or an NBD URI."""
    if is_nbd_uri(params):
        from pvio.export.nbd_client_asyncio import NbdClient

        try:
            client = await NbdClient.connect(params)
        except (OSError, TimeoutError) as e:
            raise StorageError(errno.EIO, f"cannot reach {params}: {e}") from None
        disk = BackendDisk(client)
        disk.read_only = disk.read_only or read_only
        return disk
    return ThreadedDisk(RawFileStorage(params, read_only=read_only), threads=threads)
