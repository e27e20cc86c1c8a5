"""netback's multicast filter, both ends in one process: a frontend that wrote
``request-multicast-control`` receives only the multicast groups it listed with
MCAST_ADD (broadcast always), as Linux's xen-netback filters in xenvif_start_xmit; the
list holds XEN_NETBK_MCAST_MAX groups and an ADD past it is answered NETIF_RSP_ERROR."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator

from net.pair import NetPair, net_pair, wait_for
from pvio.abi import netif as n
from pvio.hypervisor.inprocess import InProcessHypervisor
from pvio.net.backend import XEN_NETBK_MCAST_MAX, NetbackQueue
from pvio.net.frontend import BackendFeatures, NetFront, RxMeta
from pvio.net.keys import parse_frontend_rings
from pvio.net.slots import TxFrame

GROUP = bytes.fromhex("01005e000001")  # 224.0.0.1's MAC
OTHER = bytes.fromhex("01005e7f0001")
BROADCAST = b"\xff" * 6
SOURCE = bytes.fromhex("fe0000000001")


def run(coro: object) -> None:
    asyncio.run(asyncio.wait_for(coro, 30))  # type: ignore[arg-type]


def frame_to(dest: bytes) -> bytes:
    return dest + SOURCE + b"\x08\x00" + os.urandom(100)


@contextlib.asynccontextmanager
async def controlled_pair() -> AsyncIterator[NetPair]:
    """netback and netfront connected, the frontend having asked for multicast control."""
    hv = InProcessHypervisor()
    back_dom = await hv.create_domain("driver", 2048)
    front_dom = await hv.create_domain("guest", 4096)
    to_host: list[tuple[bytes, TxFrame]] = []
    to_guest: list[tuple[bytes, RxMeta]] = []
    back = NetbackQueue(back_dom, front_dom.domid, lambda d, f: to_host.append((b"".join(d), f)))
    front = NetFront(front_dom, back_dom.domid, lambda d, m: to_guest.append((b"".join(d), m)))
    keys = await front.setup_rings(BackendFeatures(sg=True, multicast_control=True))
    rings = parse_frontend_rings(keys | {"request-multicast-control": "1"})
    assert rings.multicast_control
    await back.connect(rings)
    try:
        yield NetPair(hv, back_dom, front_dom, back, front, to_host, to_guest)
    finally:
        await back.disconnect()
        await front.close()
        await front_dom.close()
        await back_dom.close()


def mcast_request(pair: NetPair, op: int, addr: bytes) -> int:
    """One multicast control request, as a Windows PV netfront sends it: an empty
    request flagged extra_info, then the MCAST_ADD/DEL extra-info slot."""
    front = pair.front
    i = front._tx_free.pop()
    front._tx_busy.add(i)
    request = n.TX_REQUEST.pack(gref=front._tx_refs[i], offset=0, flags=n.NETTXF_extra_info, id=i, size=0)
    extra = n.EXTRA_MCAST.pack(type=op, addr=addr) + bytes(n.TX_REQUEST.size - n.EXTRA_MCAST.size)
    assert front._tx is not None
    front._tx.put_requests([request, extra])
    front._push()
    return i


async def offer(pair: NetPair, data: bytes) -> bool:
    """The host's frame for the guest: True if the guest received it."""
    before = len(pair.to_guest)
    if not pair.back.transmit(data):
        return False
    await wait_for(lambda: len(pair.to_guest) == before + 1)
    return pair.to_guest[-1][0] == data


def test_a_listed_group_is_delivered_and_an_unlisted_one_is_not() -> None:
    async def body() -> None:
        async with controlled_pair() as pair:
            mcast_request(pair, n.XEN_NETIF_EXTRA_TYPE_MCAST_ADD, GROUP)
            await wait_for(lambda: pair.back.multicast == [GROUP] and not pair.front._tx_busy)
            assert pair.front.stats.tx_errors == 0
            assert await offer(pair, frame_to(GROUP))  # first: the listed group arrives
            dropped = pair.back.stats.rx_dropped
            got = len(pair.to_guest)
            assert not pair.back.transmit(frame_to(OTHER))  # then: the unlisted one does not
            assert pair.back.stats.rx_dropped == dropped + 1
            assert await offer(pair, frame_to(BROADCAST))  # broadcast is never filtered
            assert len(pair.to_guest) == got + 1
            mcast_request(pair, n.XEN_NETIF_EXTRA_TYPE_MCAST_DEL, GROUP)
            await wait_for(lambda: pair.back.multicast == [] and not pair.front._tx_busy)
            assert not pair.back.transmit(frame_to(GROUP))

    run(body())


def test_unicast_passes_the_filter() -> None:
    async def body() -> None:
        async with controlled_pair() as pair:
            assert await offer(pair, frame_to(bytes.fromhex("00163e000a01")))

    run(body())


def test_without_multicast_control_every_group_is_delivered() -> None:
    async def body() -> None:
        async with net_pair() as pair:
            assert not pair.back.features.multicast_control
            assert await offer(pair, frame_to(OTHER))

    run(body())


def test_the_list_holds_xen_netbk_mcast_max_groups() -> None:
    async def body() -> None:
        async with controlled_pair() as pair:
            groups = [bytes([0x01, 0x00, 0x5E, 0x00, 0x01, k]) for k in range(XEN_NETBK_MCAST_MAX + 1)]
            for g in groups:
                await pair.front.wait_tx_room(2)
                mcast_request(pair, n.XEN_NETIF_EXTRA_TYPE_MCAST_ADD, g)
            await wait_for(lambda: not pair.front._tx_busy)
            assert pair.back.multicast == groups[:XEN_NETBK_MCAST_MAX]
            assert pair.front.stats.tx_errors == 1  # the one past the limit: NETIF_RSP_ERROR
            assert not pair.back.transmit(frame_to(groups[-1]))
            assert await offer(pair, frame_to(groups[0]))
            # the vif carries on: a frame from the guest still reaches the host
            data = frame_to(bytes.fromhex("00163e000a02"))
            assert pair.front.send(data)
            await wait_for(lambda: bool(pair.to_host) and pair.to_host[-1][0] == data)

    run(body())
