"""A frontend that breaks io/netif.h, as xen-netback sees it: frames it can refuse are
answered NETIF_RSP_ERROR and the vif carries on; a frontend that cannot be reasoned with has
its vif disabled (carrier off, the device failed) while another vif of the same driver
domain carries on.  Nothing raises out of netback."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator

import pytest

from net.pair import NetPair, net_pair, wait_for
from pvio.abi import netif as n
from pvio.net.backend import NetbackQueue
from pvio.net.frontend import BackendFeatures, NetFront
from pvio.net.keys import parse_frontend_rings
from pvio.net.slots import FATAL_SLOTS, MAX_SLOTS, NetifFatal
from pvio.ring import RingBroken

_REQ = n.TX_REQUEST


def run(coro: object) -> None:
    asyncio.run(asyncio.wait_for(coro, 30))  # type: ignore[arg-type]


def raw_send(pair: NetPair, slots: list[dict[str, int]]) -> list[int]:
    """Put hand-made tx requests on the ring; each dict may name gref/offset/flags/size
    (an id and, unless given, the id's granted page are filled in).  Returns the ids."""
    front = pair.front
    ids = []
    raws = []
    for s in slots:
        if s.get("extra") is not None:
            raws.append(s["extra"].to_bytes(8, "little") + bytes(4))  # type: ignore[union-attr]
            continue
        i = front._tx_free.pop()
        front._tx_busy.add(i)
        ids.append(i)
        raws.append(_REQ.pack(gref=s.get("gref", front._tx_refs[i]), offset=s.get("offset", 0),
                              flags=s.get("flags", 0), id=i, size=s["size"]))
    assert front._tx is not None
    front._tx.put_requests(raws)
    front._push()
    return ids


@contextlib.asynccontextmanager
async def neighbour(pair: NetPair) -> AsyncIterator[tuple[NetbackQueue, NetFront, list[bytes]]]:
    """A second vif served by the same driver domain."""
    dom = await pair.hv.create_domain("neighbour", 2048)
    got: list[bytes] = []
    back = NetbackQueue(pair.back_dom, dom.domid, lambda d, f: got.append(b"".join(d)))
    front = NetFront(dom, pair.back_dom.domid, lambda d, m: None)
    await back.connect(parse_frontend_rings(await front.setup_rings(BackendFeatures(sg=True))))
    try:
        yield back, front, got
    finally:
        await back.disconnect()
        await front.close()
        await dom.close()


async def _good_frame_still_passes(pair: NetPair) -> None:
    frame = os.urandom(1514)
    before = len(pair.to_host)
    assert pair.front.send(frame)
    await wait_for(lambda: len(pair.to_host) == before + 1)
    assert pair.to_host[-1][0] == frame


def _more(size: int, **kw: int) -> dict[str, int]:
    return {"size": size, "flags": n.NETTXF_more_data, **kw}


# -- refused frames: NETIF_RSP_ERROR, and the vif carries on --------------------------

DROPS = {
    "first slot shorter than an Ethernet header": [{"size": 10}],
    "first slot's own bytes shorter than a header": [_more(4100), {"size": 4096}],
    "later slots larger than the frame": [_more(2000), {"size": 3000}],
    "more slots than the backend takes": [_more(MAX_SLOTS * 100)] + [_more(100)] * (MAX_SLOTS - 1)
    + [{"size": 100}],
    "a grant not granted": [{"size": 1514, "gref": 4000}],
}


@pytest.mark.parametrize("case", sorted(DROPS))
def test_refused_frame_is_answered_in_error_and_the_vif_goes_on(case: str) -> None:
    async def body() -> None:
        async with net_pair() as pair:
            ids = raw_send(pair, DROPS[case])
            await wait_for(lambda: pair.front.stats.tx_errors == len(ids))
            assert pair.back.stats.tx_dropped == 1 and not pair.to_host
            assert pair.back.disabled is None and pair.back.carrier
            assert pair.front.broken is None
            await _good_frame_still_passes(pair)

    run(body())


# -- a frontend that cannot be reasoned with: the vif is disabled ----------------------

GSO_EXTRA = n.XEN_NETIF_EXTRA_TYPE_GSO
FATALS = {
    "a slot crossing its page": [{"size": 200, "offset": 4000}],
    "a later slot crossing its page": [_more(3000), {"size": 1000, "offset": 3500}],
    "too many slots": [_more(FATAL_SLOTS * 100)] + [_more(100)] * (FATAL_SLOTS - 1) + [{"size": 100}],
    "more_data past the published requests": [_more(3000)],
    "an unknown extra-info type": [{"size": 1514, "flags": n.NETTXF_extra_info}, {"extra": 9}],
    "a missing extra-info slot": [{"size": 1514, "flags": n.NETTXF_extra_info}],
    "a GSO extra with size 0": [{"size": 1514, "flags": n.NETTXF_extra_info}, {"extra": GSO_EXTRA}],
    "a GSO extra of an unknown type": [
        {"size": 1514, "flags": n.NETTXF_extra_info},
        {"extra": GSO_EXTRA | (1448 << 16) | (7 << 32)},
    ],
}


@pytest.mark.parametrize("case", sorted(FATALS))
def test_fatal_frame_disables_only_that_vif(case: str) -> None:
    async def body() -> None:
        async with net_pair() as pair, neighbour(pair) as (nback, nfront, got):
            broken: list[BaseException] = []
            pair.back.on_broken = broken.append
            raw_send(pair, FATALS[case])
            await wait_for(lambda: pair.back.disabled is not None)
            assert isinstance(pair.back.disabled, NetifFatal), pair.back.disabled
            assert broken == [pair.back.disabled]
            assert not pair.back.carrier and not pair.back.connected
            assert not pair.back.transmit(os.urandom(100))
            # the driver domain's other vif carries on
            frame = os.urandom(3000)
            assert nfront.send(frame)
            await wait_for(lambda: got == [frame])
            assert nback.disabled is None

    run(body())


def test_impossible_ring_index_disables_the_vif() -> None:
    async def body() -> None:
        async with net_pair() as pair, neighbour(pair) as (_nback, nfront, got):
            front = pair.front
            assert front._tx is not None
            front._tx.sring.indices.push_req_prod(1000)  # far beyond the ring's size
            pair.front_dom.notify(front.port)
            await wait_for(lambda: pair.back.disabled is not None)
            assert isinstance(pair.back.disabled, RingBroken)
            assert nfront.send(os.urandom(60))
            await wait_for(lambda: len(got) == 1)

    run(body())
