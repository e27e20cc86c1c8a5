"""A hostile backend against pvio's blkfront: the device breaks, callers fail cleanly."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from blk.pair import asynctest
from pvio.abi.blkif import ABI_NATIVE, BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_RSP_OKAY
from pvio.blk.errors import DeviceBroken
from pvio.blk.frontend import BlkFront
from pvio.blk.keys import backend_disk_keys, parse_backend_disk, parse_frontend_ring
from pvio.blk.request import build_response, parse_request
from pvio.hypervisor.inprocess import InProcessHypervisor
from pvio.ring import BackRing, SharedRing

Answer = Callable[[BackRing, list[int]], None]


def unknown_id(ring: BackRing, ids: list[int]) -> None:
    ring.put_responses([build_response(ABI_NATIVE, 999, BLKIF_OP_READ, BLKIF_RSP_OKAY)])
    ring.push_responses()


def duplicate(ring: BackRing, ids: list[int]) -> None:
    ring.put_responses([build_response(ABI_NATIVE, ids[0], BLKIF_OP_READ, BLKIF_RSP_OKAY)])
    ring.push_responses()
    # answer the same id again in the next slot (the second request's slot)
    ring.put_responses([build_response(ABI_NATIVE, ids[0], BLKIF_OP_READ, BLKIF_RSP_OKAY)])
    ring.push_responses()


def wrong_operation(ring: BackRing, ids: list[int]) -> None:
    ring.put_responses([build_response(ABI_NATIVE, ids[0], BLKIF_OP_WRITE, BLKIF_RSP_OKAY)])
    ring.push_responses()


def impossible_rsp_prod(ring: BackRing, ids: list[int]) -> None:
    ring.sring.indices.push_rsp_prod(ring.rsp_prod_pvt + 500)


@pytest.mark.parametrize("answer", [unknown_id, duplicate, wrong_operation, impossible_rsp_prod])
@asynctest
async def test_hostile_backend_breaks_device(answer: Answer) -> None:
    hv = InProcessHypervisor()
    bdom = await hv.create_domain("driver", 256)
    fdom = await hv.create_domain("guest", 1024)
    front = BlkFront(fdom, bdom.domid)
    keys = await front.setup_ring()
    ring_info = parse_frontend_ring(keys)
    maps = await bdom.map_grants(fdom.domid, list(ring_info.ring_refs))
    back = BackRing(SharedRing.for_blkif([m.view for m in maps if m.view is not None], ABI_NATIVE))
    port = await bdom.bind_interdomain(fdom.domid, ring_info.event_channel)
    front.connect(parse_backend_disk(backend_disk_keys(2048, read_only=False)))
    reads = [asyncio.ensure_future(front.read(i * 4096, 4096)) for i in range(2)]
    await asyncio.wait_for(bdom.wait_event(port), 5)
    ids = [parse_request(ABI_NATIVE, raw).id for raw in back.take_requests()]
    assert len(ids) == 2
    answer(back, ids)
    bdom.notify(port)
    results = await asyncio.wait_for(asyncio.gather(*reads, return_exceptions=True), 5)
    assert front.broken is not None
    assert any(isinstance(r, DeviceBroken) for r in results)
    assert all(isinstance(r, (DeviceBroken, bytes)) for r in results)
    with pytest.raises(DeviceBroken):
        await front.read(0, 512)
    await bdom.unmap_grants(maps)
    await front.close(force=True)
    await fdom.close()
    await bdom.close()
