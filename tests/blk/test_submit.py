"""blkfront's short way (`submit_read`/`submit_write`): a request put into the ring in
the caller's own turn of the loop, its completion a callback; and what makes it say no."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from blk.pair import asynctest, blk_pair, make_image
from pvio.blk import front_queue
from pvio.blk.errors import DeviceBroken
from pvio.storage.backend import MemoryBackend

MiB = 1 << 20


class Done:
    """A `done` callback that remembers what it was called with."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.exc: BaseException | None = None
        self.data = b""

    def __call__(self, exc: BaseException | None, data: bytes) -> None:
        assert not self.event.is_set(), "called twice"
        self.exc, self.data = exc, data
        self.event.set()

    async def wait(self) -> None:
        await asyncio.wait_for(self.event.wait(), 10)


@asynctest
async def test_submitted_reads_and_writes_complete_through_the_callback(tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.img", 4 * MiB, fill=False)
    data = os.urandom(8192)
    async with blk_pair(img, persistent=True) as p:
        # No pooled pages yet: the short way says no, the awaiting way grows the pool.
        assert not p.front.grants.pool
        assert not p.front.submit_read(0, 4096, Done())
        await p.front.write(0, bytes(64 * 1024))
        assert len(p.front.grants.pool) >= 2
        wrote, requests = Done(), p.front.stats.requests
        assert p.front.submit_write(4096, data, wrote)
        assert p.front.stats.requests == requests + 1  # in the ring before anything awaited
        await wrote.wait()
        assert wrote.exc is None and wrote.data == b""
        read = Done()
        assert p.front.submit_read(4096, 8192, read)
        await read.wait()
        assert read.exc is None and read.data == data
        assert await p.front.read(4096, 8192) == data  # the awaiting way agrees


@asynctest
async def test_an_indirect_request_takes_the_short_way(tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.img", 4 * MiB, fill=False)
    data = os.urandom(64 * 1024)  # 16 pages: one BLKIF_OP_INDIRECT
    for persistent in (True, False):
        async with blk_pair(img, persistent=persistent) as p:
            await p.front.write(0, bytes(MiB))  # fills the pool
            assert p.front.max_indirect_segments >= 16
            wrote, requests = Done(), p.front.stats.requests
            assert p.front.submit_write(MiB, data, wrote)
            assert p.front.stats.requests == requests + 1
            await wrote.wait()
            read = Done()
            assert p.front.submit_read(MiB, len(data), read)
            await read.wait()
            assert wrote.exc is None and read.exc is None and read.data == data
            assert p.back.stats.err_req == 0


@asynctest
async def test_a_transfer_of_several_requests_goes_whole_or_not_at_all(tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.img", 4 * MiB, fill=False)
    data = os.urandom(MiB)  # 8 requests of 32 segments
    async with blk_pair(img, persistent=True) as p:
        await p.front.write(0, bytes(2 * MiB))  # a pool for two such transfers
        step = p.front.max_request_bytes
        assert len(data) // step == 8
        wrote, requests = Done(), p.front.stats.requests
        assert p.front.submit_write(MiB, data, wrote)
        assert p.front.stats.requests == requests + 8  # all in the ring at once
        await wrote.wait()
        read = Done()
        assert p.front.submit_read(MiB, MiB, read)
        await read.wait()
        assert wrote.exc is None and read.exc is None and read.data == data
        # With fewer free slots than parts, none goes: the caller takes the awaiting way.
        nr_ents = p.front.queues[0].nr_ents
        singles = [Done() for _ in range(nr_ents - 4)]
        assert all(p.front.submit_read(i * 4096, 4096, d) for i, d in enumerate(singles))
        requests = p.front.stats.requests
        assert not p.front.submit_read(MiB, MiB, Done())
        assert p.front.stats.requests == requests
        for d in singles:
            await d.wait()
        assert await p.front.read(MiB, MiB) == data


@asynctest
async def test_a_failing_part_fails_the_transfer_once(tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.img", 4 * MiB, fill=False)
    disk = MemoryBackend(4 * MiB, fail_at=MiB + 300 * 1024)  # inside the third part
    async with blk_pair(img, persistent=True, disk=disk) as p:
        await p.front.write(0, bytes(MiB))
        read = Done()  # called once (Done asserts it), after every part is answered
        assert p.front.submit_read(MiB, MiB, read)
        await read.wait()
        assert isinstance(read.exc, OSError) and read.data == b""
        assert p.front.queues[0].shadows.free == p.front.queues[0].nr_ents


@asynctest
async def test_submit_says_no_to_what_must_wait_or_cannot_be_one_request(tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.img", 4 * MiB, fill=False)
    async with blk_pair(img, persistent=True) as p:
        await p.front.write(0, bytes(MiB))  # a pool bigger than the ring
        nr_ents = p.front.queues[0].nr_ents
        assert len(p.front.grants.pool) > nr_ents
        assert not p.front.submit_read(100, 4096, Done())  # not whole sectors
        assert not p.front.submit_read(4 * MiB - 512, 4096, Done())  # past the end
        assert not p.front.submit_write(0, b"", Done())
        # A slot per request: the ring's worth goes in at once, the next one must wait.
        dones = [Done() for _ in range(nr_ents)]
        assert all(p.front.submit_read(i * 4096, 4096, d) for i, d in enumerate(dones))
        assert not p.front.submit_read(0, 4096, Done())
        for d in dones:
            await d.wait()
            assert d.exc is None and len(d.data) == 4096
        assert p.front.submit_read(0, 4096, Done())  # slots free again


@asynctest
async def test_submit_refuses_a_write_to_a_read_only_disk(tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.img", 4 * MiB, fill=True)
    async with blk_pair(img, persistent=True, read_only=True) as p:
        await p.front.read(0, 64 * 1024)
        assert p.front.grants.pool
        assert p.front.submit_read(0, 4096, Done())
        assert not p.front.submit_write(0, bytes(4096), Done())


@asynctest
async def test_submitted_requests_fail_when_the_device_breaks(tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.img", 4 * MiB, fill=False)
    async with blk_pair(img, persistent=True) as p:
        await p.front.write(0, bytes(64 * 1024))
        first = Done()
        assert p.front.submit_read(0, 4096, first)  # completes: the pair works
        await first.wait()
        assert first.exc is None
        broken = Done()
        assert p.front.submit_read(0, 4096, broken)
        p.front._break("a test breaks it before the backend sees the request")
        await broken.wait()
        assert isinstance(broken.exc, DeviceBroken)
        assert not p.front.submit_read(0, 4096, Done())  # and says no from now on


@asynctest
async def test_without_persistent_grants_submit_grants_pages_of_its_own(tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.img", 4 * MiB, fill=False)
    data = os.urandom(4096)
    async with blk_pair(img, persistent=False, transport="copy") as p:
        free = p.front.domain.gnttab.free_count
        wrote = Done()
        assert p.front.submit_write(0, data, wrote)
        assert p.front.domain.gnttab.free_count == free - 1
        await wrote.wait()
        read = Done()
        assert p.front.submit_read(0, 4096, read)
        await read.wait()
        assert wrote.exc is None and read.exc is None and read.data == data
        assert not p.front.grants.pool
        # The grants end with the response: the references come back.
        assert p.front.domain.gnttab.free_count == free


@asynctest
async def test_requests_put_in_one_turn_are_pushed_every_8_pages_the_rest_at_the_turns_end(
        tmp_path: Path) -> None:
    assert front_queue.EARLY_PUSH_READ_PAGES == front_queue.EARLY_PUSH_WRITE_PAGES == 8
    img = make_image(tmp_path / "d.img", 4 * MiB)
    async with blk_pair(img, persistent=True) as p:
        first = os.urandom(MiB)
        await p.front.write(0, first)  # grows the pool for what follows
        q = p.front.queues[0]
        for submit, args in ((p.front.submit_read, lambda k: (k * 4096, 4096)),
                             (p.front.submit_write, lambda k: (k * 4096, os.urandom(4096)))):
            pushes = p.front.stats.pushes
            done = [Done() for _ in range(20)]
            for k, d in enumerate(done):  # twenty 4 KiB requests in this turn
                assert submit(*args(k), d)
            # pushed at 8 and 16; the last four wait for the turn's end
            assert p.front.stats.pushes == pushes + 2 and q.push_scheduled
            for d in done:
                await d.wait()
                assert d.exc is None
            assert p.front.stats.pushes == pushes + 3
            if submit == p.front.submit_read:
                assert b"".join(d.data for d in done) == first[: 20 * 4096]


@asynctest
async def test_with_no_early_push_requests_wait_for_the_turns_end(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(front_queue, "EARLY_PUSH_WRITE_PAGES", 0)
    img = make_image(tmp_path / "d.img", 4 * MiB)
    async with blk_pair(img, persistent=True) as p:
        await p.front.write(0, os.urandom(MiB))
        pushes = p.front.stats.pushes
        writes = [Done() for _ in range(4)]
        for k, d in enumerate(writes):  # 64 pages of writes, none pushed early
            assert p.front.submit_write(k * 65536, bytes(65536), d)
        assert p.front.stats.pushes == pushes and p.front.queues[0].push_scheduled
        for d in writes:
            await d.wait()
        assert p.front.stats.pushes == pushes + 1
        assert (await p.front.read(0, 4 * 65536)) == bytes(4 * 65536)
