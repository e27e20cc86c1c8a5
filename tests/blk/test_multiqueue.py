"""Multi-queue vbds: several rings, one device, as Linux's blkfront and blkback do them.

blkback advertises multi-queue-max-queues; a frontend that wants several writes
multi-queue-num-queues and each ring's keys under queue-<i>/ (ring-page-order and
protocol stay at the top); blkback serves each ring with its own engine, and refuses a
frontend asking for 0 queues or more than its maximum, as Linux's connect_ring does.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from blk.pair import asynctest, make_image
from blk.test_xenbus import BE, FE, world
from pvio.abi.xenbus import XenbusState as S
from pvio.domains.xen_guest import attach_disk, detach_disk


@pytest.mark.parametrize("want", [1, 3, 8])
@asynctest
async def test_frontend_asks_one_or_several_queues(tmp_path: Path, want: int) -> None:
    img = make_image(tmp_path / "d.img", 4 << 20)
    async with world(tmp_path, img) as w:
        await w.until(f"{BE}/state", "2")
        assert await w.read(f"{BE}/multi-queue-max-queues") == "4"
        d = await attach_disk(w.gdom, w.gxs, "xvda", 51712, queues=want, ring_order=1)
        n = min(want, 4)
        assert len(d.front.queues) == n
        driver = w.service.devices[BE].driver
        assert len(driver.rings) == n
        if n == 1:
            assert await w.read(f"{FE}/multi-queue-num-queues") is None
            assert await w.read(f"{FE}/ring-ref0") is not None
        else:
            assert await w.read(f"{FE}/multi-queue-num-queues") == str(n)
            assert await w.read(f"{FE}/ring-page-order") == "1"
            for i in range(n):
                assert await w.read(f"{FE}/queue-{i}/ring-ref0") is not None
                assert await w.read(f"{FE}/queue-{i}/event-channel") is not None
        blocks = [os.urandom(4096) for _ in range(256)]
        await asyncio.gather(*(d.front.write(i * 4096, b) for i, b in enumerate(blocks)))
        got = await asyncio.gather(*(d.front.read(i * 4096, 4096) for i in range(len(blocks))))
        assert got == blocks
        per_ring = [r.stats.wr_req for r in driver.rings]
        assert sum(per_ring) == 256 and all(per_ring), per_ring  # every ring carried writes
        total = driver.stats()
        assert total is not None and total.rd_req == 256
        # a reconnection (suspend/resume) keeps the geometry
        await d.end.renegotiate()
        await d.front.write(0, b"z" * 4096)
        assert len(w.service.devices[BE].driver.rings) == n
        await detach_disk(d)
    assert img.read_bytes()[4096 : 256 * 4096] == b"".join(blocks[1:])


@pytest.mark.parametrize("asked", ["0", "5", "4294967295"])
@asynctest
async def test_backend_refuses_zero_or_too_many_queues(tmp_path: Path, asked: str) -> None:
    img = make_image(tmp_path / "d.img", 1 << 20)
    async with world(tmp_path, img) as w:
        await w.until(f"{BE}/state", "2")

        async def publish(tx: int) -> None:
            await w.gxs.write(f"{FE}/multi-queue-num-queues", asked, tx)
            await w.gxs.write(f"{FE}/queue-0/ring-ref", "8", tx)
            await w.gxs.write(f"{FE}/queue-0/event-channel", "1", tx)
            await w.gxs.write(f"{FE}/state", str(int(S.Initialised)), tx)

        await w.gxs.transact(publish)
        await w.until(f"{BE}/state", "5")  # Closing
        err = await w.read("/local/domain/0/error/backend/vbd/1/51712/error")
        assert err is not None and "queues" in err and "maximum of 4" in err
        assert not w.service.devices[BE].driver.rings
