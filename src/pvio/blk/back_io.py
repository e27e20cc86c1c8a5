"""blkback's disk work: one validated request's bytes between the guest's pages and the disk.

`disk_io` awaits the disk (`VectoredBackend`: readv/writev/flush/trim).  `disk_io_now` is
the short way for a READ or a WRITE (not FUA) when the disk offers ``transfer_now``
(`pvio.storage.rawfile.RawFile` does): the transfer is made at once when it cannot
block -- the page cache holds the data, or takes the write -- with no task and no
future, and the request goes the awaiting way only when it would block.  A failure
answers that request with BLKIF_RSP_ERROR; nothing is raised.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pvio.abi.blkif import BLKIF_RSP_ERROR, BLKIF_RSP_OKAY
from pvio.blk.request import DiskIO
from pvio.storage.backend import VectoredBackend

log = logging.getLogger("pvio.blk.backend")

#: copy transport: a batch of large requests is worked in parts of about this many pages,
#: each answered when its own data has moved (`in_parts`)
PIECE_PAGES = int(os.environ.get("PVIO_BLK_PIECE_PAGES", "128"))
#: map transport: the same, in smaller parts (`PVIO_BLK_MAP_PIECE_PAGES`; 0: whole batches)
MAP_PIECE_PAGES = int(os.environ.get("PVIO_BLK_MAP_PIECE_PAGES", "32"))

#: `RawFile.transfer_now(offset, buffers, write)`: True when done, False when it would block.
TransferNow = Callable[[int, Sequence[memoryview], bool], bool]


@dataclass
class Work:
    """A validated data request and where its bytes are while it runs."""

    io: DiskIO
    status: int = BLKIF_RSP_OKAY
    buffers: list[memoryview] | None = None
    shared: bool = False  # the buffers are kept mappings' pages themselves: not released
    frames: list[int] | None = None  # copy transport: local bounce pages

    def __init__(self, io: DiskIO, status: int = BLKIF_RSP_OKAY, buffers: list[memoryview] | None = None,
                 shared: bool = False, frames: list[int] | None = None) -> None:
        # written out, not generated: compiled (see `pvio.blk.request.BlkifRequest`)
        self.io = io
        self.status = status
        self.buffers = buffers
        self.shared = shared
        self.frames = frames


def in_parts(group: list[DiskIO], pages: int) -> list[list[DiskIO]]:
    """`group` cut, in order, into parts of at most `pages` pages (a larger request alone).

    A batch is worked part by part, each answered (and the frontend kicked, if it asked)
    when its data has moved, so the frontend already sends the first answers on while
    blkback reads the rest: the two processes overlap instead of taking turns with the
    whole batch.  In the copy transport the hypervisor copies one part meanwhile, too.
    Parts of 32 pages (two 64 KiB requests, one of the 128 KiB requests a 1 MiB read
    becomes) for the map transport with persistent grants, where a part needs no map of
    its own; a batch of 4 KiB requests at queue depth 32 is still one part.  `pages` 0:
    the whole group."""
    if pages <= 0:
        return [group] if group else []
    parts: list[list[DiskIO]] = []
    size = 0
    for io in group:
        n = len(io.segments)
        if not parts or size + n > pages:
            parts.append([])
            size = 0
        parts[-1].append(io)
        size += n
    return parts


async def disk_io(disk: VectoredBackend, w: Work, frontend_domid: int) -> None:
    io = w.io
    try:
        if io.kind == "read":
            assert w.buffers is not None
            await disk.readv(io.offset, w.buffers)
        elif io.kind == "write":
            assert w.buffers is not None
            await disk.writev(io.offset, w.buffers)
            if io.postflush:
                await disk.flush()
        elif io.kind == "flush":
            await disk.flush()
        elif io.kind == "discard":
            await disk.trim(io.offset, io.length)
    except OSError as e:
        log.warning("blkback d%d: %s failed: %s", frontend_domid, io.request.op_name, e)
        w.status = BLKIF_RSP_ERROR


def disk_io_now(now: TransferNow, w: Work, frontend_domid: int) -> bool:
    """Do `w` at once if it is a READ or plain WRITE that will not block; True if done
    (successfully or answered in error), False if it must take `disk_io`."""
    io = w.io
    if w.buffers is None or io.kind not in ("read", "write") or io.postflush:
        return False
    try:
        return now(io.offset, w.buffers, io.kind == "write")
    except OSError as e:
        log.warning("blkback d%d: %s failed: %s", frontend_domid, io.request.op_name, e)
        w.status = BLKIF_RSP_ERROR
        return True
