"""blkfront's `BlockBackend` calls: any offset and length, as requests the ring carries.

Theory of operation
-------------------
`FrontBlockIO` is the half of `pvio.blk.frontend.BlkFront` that an export calls:
`read`/`read_into`/`write`/`flush`/`trim`/`write_zeroes` of any offset and length.  A
transfer is cut into requests of at most `max_request_bytes` (11 pages, or the
indirect segments negotiated: 32 pages by default, as Linux's blkfront), issued
together, each waiting for its own response.  The short way (`submit_read`,
`submit_write`) puts a transfer into the ring in the caller's turn of the loop, with a
callback for its completion -- one request, or all the requests of a larger one at
once (`room` says whether they surely fit) -- and says False when anything would have
to wait.  Ranges that are not whole logical
sectors (`unit`: 512 bytes, or the disk's `sector-size`) are read whole and, for a
write, modified and written back under a lock (read-modify-write), so a backend never
sees a request that is not whole sectors.
"""

from __future__ import annotations

import asyncio
import errno
import functools
from collections.abc import Coroutine, Sequence
from typing import Any

from pvio.abi.blkif import (
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_OP_WRITE_BARRIER,
    SECTOR_SIZE,
)
from pvio.blk.front_grants import FrontGrants
from pvio.blk.keys import BackendDisk
from pvio.blk.request import indirect_pages_for
from pvio.blk.shadow import Submitted
from pvio.hypervisor.domain import PAGE_SIZE
from pvio.storage.backend import BackendInfo
from pvio.storage.lent import Lent, LentDone


class FrontBlockIO:
    """BlockBackend's calls over `_issue` (see the module notes)."""

    _rmw: asyncio.Lock
    persistent: bool
    grants: FrontGrants

    # -- what BlkFront provides ------------------------------------------------------

    @property
    def max_request_bytes(self) -> int:
        raise NotImplementedError

    def _disk(self) -> BackendDisk:
        raise NotImplementedError

    async def _issue(
        self,
        operation: int,
        sector: int,
        payload: bytes | memoryview | None,
        nbytes: int,
        read_into: memoryview | None = None,
        want_bytes: bool = False,
        lend: bool = False,
        pages: list[tuple[int, int]] | None = None,
    ) -> bytes | Lent:
        raise NotImplementedError

    def _submit(self, operation: int, sector: int, payload: bytes | memoryview | None, nbytes: int,
                done: Submitted, read_into: memoryview | None = None, lend: bool = False) -> bool:
        raise NotImplementedError

    def room(self, requests: int, npages: int) -> bool:
        raise NotImplementedError

    @property
    def info(self) -> BackendInfo:
        disk = self._disk()
        return BackendInfo(
            size=disk.size,
            read_only=disk.read_only,
            min_block=self.unit,
            preferred_block=max(4096, disk.physical_sector_size),
            can_flush=disk.feature_flush_cache or disk.feature_barrier,
            can_fua=disk.feature_flush_cache or disk.feature_barrier,
            can_trim=disk.feature_discard and not disk.read_only,
        )

    @property
    def unit(self) -> int:
        """The smallest transfer: the disk's logical sector (`sector-size`)."""
        return max(SECTOR_SIZE, self._disk().sector_size)

    # -- BlockBackend ------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        if 0 < length <= self.max_request_bytes and not (offset | length) % self.unit:
            # The common case (one request): the data comes straight out of the pages.
            disk = self._disk()
            if offset + length > disk.size:
                raise OSError(errno.EINVAL, f"{offset}+{length} is past the disk ({disk.size})")
            data = await self._issue(BLKIF_OP_READ, offset // SECTOR_SIZE, None, length, want_bytes=True)
            assert not isinstance(data, Lent)
            return data
        buf = bytearray(length)
        await self.read_into(offset, memoryview(buf))
        return buf  # handed to the NBD reply as it is: no second copy of a large read

    # -- the short way (`pvio.storage.backend.Submitting`) -----------------------------

    def submit_read(self, offset: int, length: int, done: Submitted) -> bool:
        """Put a READ of whole sectors in the ring now, `done` called with its data; False
        when it cannot go without waiting (then `read` it)."""
        if length <= 0 or (offset | length) % self.unit:
            return False
        disk = self.disk_if_connected()
        if disk is None or offset + length > disk.size:
            return False
        if length > self.max_request_bytes:
            return self._submit_parts(BLKIF_OP_READ, offset, length, None, done)
        return self._submit(BLKIF_OP_READ, offset // SECTOR_SIZE, None, length, done)

    # -- lent reads (`pvio.storage.lent.Lending`) ---------------------------------------

    def submit_read_lent(self, offset: int, length: int, done: LentDone) -> bool:
        """`submit_read`, the data lent in the pages it was read into (`Lent`): they go
        back to the pool when the caller releases the loan.  Without persistent grants
        the data comes as bytes, as from `submit_read`."""
        if length <= 0 or (offset | length) % self.unit:
            return False
        disk = self.disk_if_connected()
        if disk is None or offset + length > disk.size:
            return False
        lend = self.persistent  # (pages claimed per request would hold grant references while lent)
        if length > self.max_request_bytes:
            return self._submit_parts(BLKIF_OP_READ, offset, length, None, done, lend=lend)
        return self._submit(BLKIF_OP_READ, offset // SECTOR_SIZE, None, length, done, lend=lend)

    async def read_lent(self, offset: int, length: int) -> Lent:
        """`read`, the data lent as `submit_read_lent` lends it.  The pages of a READ of
        several requests are all taken from the pool at once, before the first is
        issued: a read holding some pages while it waits for more could leave none for
        the others.  Unaligned reads, reads without persistent grants (pages claimed per
        request would hold grant references while lent) and reads too large for the
        pool are copied out as `read` does."""
        step = self.max_request_bytes
        sizes = [min(step, length - pos) for pos in range(0, length, step)]
        need = [-(-n // PAGE_SIZE) + indirect_pages_for(-(-n // PAGE_SIZE)) for n in sizes]
        cap = self.grants.cap
        if (length <= 0 or (offset | length) % self.unit or offset + length > self._disk().size
                or not self.persistent or (len(sizes) > 1 and (cap is None or 2 * sum(need) > cap))):
            data = await self.read(offset, length)
            return Lent([memoryview(data)], lambda: None)
        pages = await self.grants.take_pooled(sum(need)) if len(sizes) > 1 else []
        parts = []
        for k, n in enumerate(sizes):
            mine = pages[sum(need[:k]) : sum(need[: k + 1])] or None
            sector = (offset + k * step) // SECTOR_SIZE
            parts.append(asyncio.ensure_future(self._issue(BLKIF_OP_READ, sector, None, n, lend=True, pages=mine)))
        try:
            await asyncio.wait(parts)
        except asyncio.CancelledError:
            for t in parts:  # a part answered later is given back then
                t.cancel()
                t.add_done_callback(_release_result)
            raise
        loans = [got for t in parts if not t.cancelled() and t.exception() is None
                 and isinstance(got := t.result(), Lent)]
        if len(loans) != len(parts):
            for loan in loans:
                loan.release()
            failed = next((t.exception() for t in parts if not t.cancelled() and t.exception()), None)
            raise failed or OSError(errno.EIO, "blkfront: a READ was not answered")
        return loans[0] if len(loans) == 1 else Lent.joined(loans)

    def submit_write(self, offset: int, data: bytes | memoryview, done: Submitted) -> bool:
        """Put a WRITE (not FUA) of whole sectors in the ring now; False: `write` it."""
        length = len(data)
        if length <= 0 or (offset | length) % self.unit:
            return False
        disk = self.disk_if_connected()
        if disk is None or disk.read_only or offset + length > disk.size:
            return False
        if length > self.max_request_bytes:
            return self._submit_parts(BLKIF_OP_WRITE, offset, length, memoryview(data), done)
        return self._submit(BLKIF_OP_WRITE, offset // SECTOR_SIZE, data, length, done)

    def _submit_parts(
        self, operation: int, offset: int, length: int, data: memoryview | None, done: Submitted,
        lend: bool = False,
    ) -> bool:
        """A transfer of several requests, all put into the ring now or none: a READ into
        one buffer (or lent: one loan of all the parts' pages), `done` called once, when
        the last is answered (the first error, if any)."""
        step = self.max_request_bytes
        parts = -(-length // step)
        if not self.room(parts, step // PAGE_SIZE):
            return False
        buf = bytearray(length) if data is None and not lend else None
        into = memoryview(buf) if buf is not None else None
        loans: list[Lent | None] = [None] * parts
        left = parts
        failed: BaseException | None = None

        def part_done(k: int, exc: BaseException | None, got: bytes | bytearray | Lent) -> None:
            nonlocal left, failed
            if exc is not None and failed is None:
                failed = exc
            if isinstance(got, Lent):
                loans[k] = got
            left -= 1
            if left:
                return
            if not lend:
                done(failed, b"" if failed is not None or buf is None else buf)
            elif failed is not None:
                for loan in loans:
                    if loan is not None:
                        loan.release()
                done(failed, None)
            else:
                done(None, Lent.joined([loan for loan in loans if loan is not None]))

        for k, pos in enumerate(range(0, length, step)):
            n = min(step, length - pos)
            sector = (offset + pos) // SECTOR_SIZE
            piece = data[pos : pos + n] if data is not None else None
            target = into[pos : pos + n] if into is not None else None
            if not self._submit(operation, sector, piece, n, functools.partial(part_done, k), target, lend):
                # `room` said all would go: a part that does not fails, the others complete
                part_done(k, OSError(errno.EIO, "blkfront: a request could not be put into the ring"), b"")
        return True

    def disk_if_connected(self) -> BackendDisk | None:
        raise NotImplementedError

    async def read_into(self, offset: int, buf: memoryview) -> None:
        length = len(buf)
        if length == 0:
            return
        unit = self.unit
        start = offset - offset % unit
        end = -(-(offset + length) // unit) * unit
        if start == offset and end == offset + length:
            await self._rw_aligned(BLKIF_OP_READ, start, None, buf)
            return
        tmp = bytearray(end - start)
        await self._rw_aligned(BLKIF_OP_READ, start, None, memoryview(tmp))
        buf[:] = tmp[offset - start : offset - start + length]

    async def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        length = len(data)
        if length:
            self._check_writable()
            if offset % self.unit or length % self.unit:
                await self._write_unaligned(offset, data)
            else:
                await self._rw_aligned(BLKIF_OP_WRITE, offset, memoryview(data), None)
        if fua:
            await self.flush()

    async def _write_unaligned(self, offset: int, data: bytes | memoryview) -> None:
        unit = self.unit
        start = offset - offset % unit
        end = -(-(offset + len(data)) // unit) * unit
        async with self._rmw:  # read-modify-write of the partial sectors
            buf = bytearray(end - start)
            await self._rw_aligned(BLKIF_OP_READ, start, None, memoryview(buf))
            buf[offset - start : offset - start + len(data)] = data
            await self._rw_aligned(BLKIF_OP_WRITE, start, memoryview(buf), None)

    async def _rw_aligned(
        self, operation: int, offset: int, data: memoryview | None, into: memoryview | None
    ) -> None:
        length = len(data) if data is not None else len(into) if into is not None else 0
        disk = self._disk()
        if offset + length > disk.size:
            raise OSError(errno.EINVAL, f"{offset}+{length} is past the disk ({disk.size})")
        step = self.max_request_bytes
        jobs = []
        for pos in range(0, length, step):
            n = min(step, length - pos)
            sector = (offset + pos) // SECTOR_SIZE
            if data is not None:
                jobs.append(self._issue(operation, sector, data[pos : pos + n], n))
            else:
                assert into is not None
                jobs.append(self._issue(operation, sector, None, n, into[pos : pos + n]))
        if len(jobs) == 1:
            await jobs[0]
        else:
            await _gather_all(jobs)

    def _check_writable(self) -> None:
        if self._disk().read_only:
            raise OSError(errno.EROFS, "blkfront: the disk is read-only")

    async def flush(self) -> None:
        disk = self._disk()
        if disk.feature_flush_cache:
            await self._issue(BLKIF_OP_FLUSH_DISKCACHE, 0, None, 0)
        elif disk.feature_barrier:
            await self._issue(BLKIF_OP_WRITE_BARRIER, 0, None, 0)

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        disk = self._disk()
        if not disk.feature_discard:
            raise OSError(errno.EOPNOTSUPP, "blkfront: the backend does not discard")
        self._check_writable()
        unit = self.unit
        start = -(-offset // unit) * unit
        end = (offset + length) // unit * unit
        if end > start:
            await self._issue(BLKIF_OP_DISCARD, start // SECTOR_SIZE, None, end - start)
        if fua:
            await self.flush()

    async def write_zeroes(self, offset: int, length: int, fua: bool = False, may_trim: bool = True) -> None:
        step = self.max_request_bytes * 8
        for pos in range(0, length, step):
            await self.write(offset + pos, bytes(min(step, length - pos)))
        if fua:
            await self.flush()


def _release_result(task: asyncio.Future[bytes | Lent]) -> None:
    if not task.cancelled() and task.exception() is None and isinstance(got := task.result(), Lent):
        got.release()


async def _gather_all(jobs: Sequence[Coroutine[Any, Any, object]]) -> None:
    """Await every job; the first failure is raised after all have finished."""
    results = await asyncio.gather(*jobs, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
