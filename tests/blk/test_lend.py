"""blkfront lending a READ's data in its granted pages (`pvio.storage.lent`): the bytes
are right, the pages stay out of the pool until the loan is released and come back
then, and the pool never grows past what blkback keeps mapped (no deadlock, no churn)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from blk.pair import asynctest, blk_pair, make_image
from pvio.storage.backend import MemoryBackend
from pvio.storage.lent import Lending, Lent

MiB = 1 << 20


class LentDone:
    """A `done` callback for `submit_read_lent`."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.exc: BaseException | None = None
        self.lent: Lent | None = None

    def __call__(self, exc: BaseException | None, lent: Lent | None) -> None:
        assert not self.event.is_set(), "called twice"
        self.exc, self.lent = exc, lent
        self.event.set()

    async def wait(self) -> Lent:
        await asyncio.wait_for(self.event.wait(), 10)
        assert self.exc is None and self.lent is not None
        return self.lent


@asynctest
async def test_a_lent_read_holds_its_pages_until_released(tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.img", 4 * MiB, fill=False)
    data = os.urandom(MiB)
    async with blk_pair(img, persistent=True) as p:
        assert isinstance(p.front, Lending)
        await p.front.write(0, data)  # fills the pool
        pool = len(p.front.grants.pool)
        for length in (4096, 64 * 1024, MiB):  # one page, one INDIRECT request, 8 requests
            done = LentDone()
            assert p.front.submit_read_lent(0, length, done)
            lent = await done.wait()
            assert lent.nbytes == length and lent.tobytes() == data[:length]
            assert len(p.front.grants.pool) < pool  # its pages are still out
            lent.release()
            lent.release()  # a second release does nothing
            assert len(p.front.grants.pool) == pool
        # The awaiting way lends too, and agrees.
        lent = await p.front.read_lent(4096, MiB - 4096)
        assert lent.tobytes() == data[4096:MiB] and len(p.front.grants.pool) < pool
        lent.release()
        assert len(p.front.grants.pool) == pool


@asynctest
async def test_the_pool_waits_at_its_cap_instead_of_growing(tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.img", 16 * MiB, fill=True)
    async with blk_pair(img, persistent=True) as p:
        cap = p.front.grants.cap
        assert cap == p.front.queues[0].nr_ents * 33  # 32 segments and their indirect page
        # Loans held by a caller that is slow to send them: 1 MiB reads up to the cap.
        held = [await p.front.read_lent(i * MiB, MiB) for i in range(cap // 264)]
        assert p.front.grants.pool_size <= cap
        # The next read needs pages the pool has not got: it waits rather than growing
        # the pool past what blkback keeps mapped...
        waiting = asyncio.ensure_future(p.front.read_lent(8 * MiB, MiB))
        for _ in range(50):
            await asyncio.sleep(0)
        assert not waiting.done() and p.front.grants.pool_waiters
        assert p.front.grants.pool_size <= cap
        # ...and goes once a loan comes back (it could have gone all along: only the pages
        # were missing).
        held.pop().release()
        lent = await asyncio.wait_for(waiting, 10)
        assert lent.tobytes() == img.read_bytes()[8 * MiB : 9 * MiB]
        for loan in [*held, lent]:
            loan.release()
        assert len(p.front.grants.pool) == p.front.grants.pool_size <= cap
        assert p.back.stats.err_req == 0


@asynctest
async def test_many_large_lent_reads_at_once_all_complete(tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.img", 16 * MiB, fill=True)
    want = img.read_bytes()
    async with blk_pair(img, persistent=True) as p:
        await p.front.read(0, 4096)  # connected

        async def one(i: int) -> None:
            lent = await p.front.read_lent(i * MiB, MiB)
            try:
                assert lent.tobytes() == want[i * MiB : (i + 1) * MiB]
                await asyncio.sleep(0.001)  # sent a little later, as a busy export would
            finally:
                lent.release()

        # 16 MiB at once: 128 requests of 32 pages for a ring of 32 slots.
        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(16))), 30)
        grants = p.front.grants
        assert len(grants.pool) == grants.pool_size and grants.cap is not None and grants.pool_size <= grants.cap


@asynctest
async def test_a_cancelled_or_failed_lent_read_gives_its_pages_back(tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.img", 4 * MiB, fill=False)
    disk = MemoryBackend(4 * MiB, fail_at=MiB + 300 * 1024)  # inside the third part of [1, 2) MiB
    async with blk_pair(img, persistent=True, disk=disk) as p:
        await p.front.write(2 * MiB, bytes(MiB))
        pool = len(p.front.grants.pool)
        try:
            await p.front.read_lent(MiB, MiB)
        except OSError:
            pass
        else:
            raise AssertionError("the failing part should fail the read")
        assert len(p.front.grants.pool) == pool  # the parts that worked gave theirs back too
        task = asyncio.ensure_future(p.front.read_lent(2 * MiB, MiB))
        await asyncio.sleep(0)  # issued, not answered
        assert len(p.front.grants.pool) < pool
        task.cancel()
        for _ in range(500):  # the answers still come; their pages go back to the pool
            if len(p.front.grants.pool) == pool and not p.front.in_flight():
                break
            await asyncio.sleep(0.01)
        assert len(p.front.grants.pool) == pool


@asynctest
async def test_reads_holding_the_whole_pool_and_writes_holding_every_slot_do_not_deadlock(tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.img", 16 * MiB, fill=True)
    async with blk_pair(img, persistent=True) as p:
        grants = p.front.grants
        held = [await p.front.read_lent(i * MiB, MiB) for i in range(4)]  # the pool at its cap
        for loan in held:
            loan.release()
        assert grants.cap is not None and len(grants.pool) == grants.pool_size == grants.cap

        async def read(i: int) -> bytes:
            lent = await p.front.read_lent(i * MiB, MiB)
            try:
                return lent.tobytes()
            finally:
                lent.release()

        # In one turn of the loop: four 1 MiB reads take every pooled page, then a ring's
        # worth of single-page writes arrive; each side then waits for what the other holds
        # unless pages and slots are taken in one order.
        reads = [asyncio.ensure_future(read(i)) for i in range(4)]
        writes = [asyncio.ensure_future(p.front.write(8 * MiB + i * 4096, b"w" * 4096))
                  for i in range(p.front.queues[0].nr_ents)]
        got = await asyncio.wait_for(asyncio.gather(*reads), 10)
        await asyncio.wait_for(asyncio.gather(*writes), 10)
        want = img.read_bytes()
        assert got == [want[i * MiB : (i + 1) * MiB] for i in range(4)]
        assert want[8 * MiB : 8 * MiB + 4096] == b"w" * 4096
        assert len(grants.pool) == grants.pool_size <= grants.cap
