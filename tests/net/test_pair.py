"""netfront and netback in one process: frames of every size both ways, multi-slot and GSO,
batching and notification avoidance."""

from __future__ import annotations

import asyncio
import os

import pytest

from net.pair import NetPair, net_pair, wait_for
from pvio.abi import netif as n
from pvio.net import frontend
from pvio.net.frontend import BackendFeatures
from pvio.net.slots import Gso

SIZES = [14, 60, 1514, 4095, 4096, 4097, 9000, 8192 * 3 + 1, 65535]


def _frame(size: int) -> bytes:
    return os.urandom(size)


def run(coro: object) -> None:
    asyncio.run(asyncio.wait_for(coro, 30))  # type: ignore[arg-type]


async def _send_all(pair: NetPair, frames: list[bytes], **kw: object) -> None:
    for f in frames:
        slots = -(-len(f) // 4096) + 1
        await pair.front.wait_tx_room(slots)
        assert pair.front.send(f, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("transport", ["map", "copy"])
def test_guest_to_host_every_size(transport: str) -> None:
    async def body() -> None:
        async with net_pair(transport=transport) as pair:
            frames = [_frame(s) for s in SIZES]
            await _send_all(pair, frames)
            await wait_for(lambda: len(pair.to_host) == len(frames))
            assert [d for d, _ in pair.to_host] == frames
            slots = [len(f.slots) for _, f in pair.to_host]
            assert slots == [-(-s // 4096) for s in SIZES]
            await wait_for(lambda: pair.front.tx_room() == n.NET_TX_RING_SIZE)  # every id answered
            assert pair.back.stats.tx_dropped == 0 and pair.front.stats.tx_errors == 0

    run(body())


@pytest.mark.parametrize("transport", ["map", "copy"])
def test_host_to_guest_every_size(transport: str) -> None:
    async def body() -> None:
        async with net_pair(transport=transport) as pair:
            frames = [_frame(s) for s in SIZES]
            for f in frames:
                assert pair.back.transmit(f)
            await wait_for(lambda: len(pair.to_guest) == len(frames))
            assert [d for d, _ in pair.to_guest] == frames
            assert pair.back.stats.rx_frames == len(frames)

    run(body())


def test_gso_both_ways_carries_the_segment_size() -> None:
    async def body() -> None:
        async with net_pair() as pair:
            big = _frame(65000)
            await _send_all(pair, [big], gso=Gso(1448, n.XEN_NETIF_GSO_TYPE_TCPV4), csum_blank=True)
            await wait_for(lambda: len(pair.to_host) == 1)
            data, frame = pair.to_host[0]
            assert data == big and frame.gso == Gso(1448, n.XEN_NETIF_GSO_TYPE_TCPV4) and frame.csum_blank
            assert pair.back.stats.tx_gso == 1
            assert pair.back.transmit(big, Gso(1440, n.XEN_NETIF_GSO_TYPE_TCPV6), csum_blank=True)
            await wait_for(lambda: len(pair.to_guest) == 1)
            got, meta = pair.to_guest[0]
            assert got == big and meta.gso == Gso(1440, n.XEN_NETIF_GSO_TYPE_TCPV6) and meta.csum_blank
            # a GSO frame of one page: its extra comes after its only data response
            small = [_frame(2900), _frame(60), _frame(4096)]
            for f in small:
                assert pair.back.transmit(f, Gso(1448, n.XEN_NETIF_GSO_TYPE_TCPV4), csum_blank=True)
            await wait_for(lambda: len(pair.to_guest) == 4)
            assert [d for d, _ in pair.to_guest[1:]] == small and pair.front.broken is None
            assert all(m.gso == Gso(1448, n.XEN_NETIF_GSO_TYPE_TCPV4) for _, m in pair.to_guest[1:])
            await _send_all(pair, small, gso=Gso(1448, n.XEN_NETIF_GSO_TYPE_TCPV4), csum_blank=True)
            await wait_for(lambda: len(pair.to_host) == 4)
            assert [d for d, _ in pair.to_host[1:]] == small and pair.back.disabled is None

    run(body())


def test_without_sg_a_frame_is_one_slot() -> None:
    async def body() -> None:
        async with net_pair(features=BackendFeatures(sg=False)) as pair:
            with pytest.raises(ValueError):
                pair.front.send(_frame(5000))
            assert pair.front.send(_frame(1514))
            await wait_for(lambda: len(pair.to_host) == 1)

    run(body())


def test_many_frames_are_batched_with_few_notifications() -> None:
    async def body() -> None:
        async with net_pair() as pair:
            frames = [_frame(1514) for _ in range(2000)]
            await _send_all(pair, frames)
            await wait_for(lambda: len(pair.to_host) == len(frames))
            assert [d for d, _ in pair.to_host] == frames
            st = pair.back.stats
            assert st.tx_batches < len(frames) / 4, st
            assert pair.front.stats.notify_sent < len(frames) / 4
            frames = frames[:500]  # the receive queue's bound (512) is not what is tested here
            for f in frames:
                assert pair.back.transmit(f)
            await wait_for(lambda: len(pair.to_guest) == len(frames))
            assert [d for d, _ in pair.to_guest] == frames
            assert pair.back.stats.rx_batches < len(frames) / 4

    run(body())


def test_a_turns_slots_are_pushed_once_a_large_frames_worth_is_put() -> None:
    async def body() -> None:
        async with net_pair() as pair:
            assert frontend.EARLY_PUSH_TX_SLOTS == 17
            front = pair.front
            pushes = front.stats.pushes
            big = [_frame(65535) for _ in range(2)]  # 16 slots each
            assert front.send(big[0])
            assert front.stats.pushes == pushes  # 16 slots: the push waits for the turn's end
            assert front.send(big[1])
            assert front.stats.pushes == pushes + 1  # 32: pushed at once
            small = [_frame(1514) for _ in range(10)]
            for f in small:
                assert front.send(f)
            assert front.stats.pushes == pushes + 1  # ten slots wait for the turn's end
            await wait_for(lambda: len(pair.to_host) == 12)
            assert [d for d, _ in pair.to_host] == big + small
            assert front.stats.pushes >= pushes + 2

    run(body())


@pytest.mark.parametrize("transport", ["map", "copy"])
def test_a_frame_is_delivered_before_its_slots_are_answered(transport: str) -> None:
    """The pieces netback delivers may be views of the guest's pages, which the guest
    reuses once answered: the delivery sees them unanswered, and whole."""
    async def body() -> None:
        async with net_pair(transport=transport) as pair:
            tx = pair.front._tx
            assert tx is not None
            seen: list[tuple[int, bytes]] = []
            pair.back.deliver = lambda parts, f: seen.append((tx.sring.snapshot()[2], b"".join(parts)))
            frame = _frame(9000)
            assert pair.front.send(frame)
            await wait_for(lambda: bool(seen))
            assert seen == [(0, frame)]  # rsp_prod still 0 while the frame was delivered
            await wait_for(lambda: tx.sring.snapshot()[2] == 3)  # then its three slots answered

    run(body())


def test_transmit_completions_wake_netfront_by_the_half() -> None:
    """netfront's rsp_event on the transmit ring lies half the requests in flight ahead,
    and a ring filled to the last slot is still woken and drained."""
    async def body() -> None:
        async with net_pair() as pair:
            tx = pair.front._tx
            assert tx is not None
            frames = [_frame(60) for _ in range(n.NET_TX_RING_SIZE)]
            for f in frames:  # fill the ring while netback is held back
                assert pair.front.send(f)
            assert not pair.front.send(_frame(60))  # full: this is what the wake-up is for
            await wait_for(lambda: len(pair.to_host) == len(frames))
            await wait_for(lambda: pair.front.tx_room() == n.NET_TX_RING_SIZE)  # woken, drained
            # Now idle: poll sets rsp_event; with 10 in flight it is 5 ahead, not 1.
            for f in frames[:10]:
                assert pair.front.send(f)
            pair.front.poll()
            assert (tx.sring.snapshot()[3] - tx.rsp_cons) & 0xFFFF_FFFF == 5

    run(body())


def test_a_sender_held_by_a_full_ring_is_called_back_once_answers_free_it() -> None:
    """`tx_room_waiters`: the TAP reader's back-pressure.  A waiter registered while the
    ring is full is called once slots come back (and not before), and then fits."""
    async def body() -> None:
        async with net_pair() as pair:
            front = pair.front
            frames = [_frame(60) for _ in range(n.NET_TX_RING_SIZE)]
            for f in frames:  # filled within one loop turn: netback has seen none yet
                assert front.send(f)
            held = _frame(9000)
            assert not front.send(held)  # no room: the caller holds the frame
            called: list[int] = []
            front.tx_room_waiters.append(lambda: called.append(front.tx_room()))
            assert not called
            await wait_for(lambda: bool(called))
            assert called[0] >= 3 and front.tx_room_waiters == []  # called once, with room
            assert front.send(held)
            await wait_for(lambda: len(pair.to_host) == len(frames) + 1)
            assert pair.to_host[-1][0] == held

    run(body())


def test_rx_ring_never_refilled_stalls_then_drops_and_nothing_crashes() -> None:
    async def body() -> None:
        async with net_pair(rx_stall_timeout=0.2, rx_queue_max=1000) as pair:
            pair.front.poll = lambda: None  # type: ignore[method-assign]  # a guest that never consumes
            sent = 0
            while pair.back.carrier and sent < 2000:
                pair.back.transmit(_frame(1514))
                sent += 1
                await asyncio.sleep(0)
            await wait_for(lambda: not pair.back.carrier, 5)
            assert pair.back.stats.rx_stalls == 1 and pair.back.disabled is None
            assert not pair.back.transmit(_frame(60))  # dropped while the carrier is off
            # the transmit side still works
            assert pair.front.send(_frame(100))
            await wait_for(lambda: len(pair.to_host) == 1)

    run(body())


def test_rate_limits_what_the_guest_sends() -> None:
    async def body() -> None:
        # 1 MB/s in 50 ms windows (libxl's "8Mb/s"): 400 KB take at least ~0.3 s
        async with net_pair(rate=(50_000, 0.05)) as pair:
            frames = [_frame(1514) for _ in range(264)]
            loop = asyncio.get_running_loop()
            start = loop.time()
            await _send_all(pair, frames)
            await wait_for(lambda: len(pair.to_host) == len(frames))
            elapsed = loop.time() - start
            assert elapsed >= (len(frames) * 1514 - 50_000) / 1e6 * 0.9, elapsed
            assert [d for d, _ in pair.to_host] == frames

    run(body())


def test_split_event_channels() -> None:
    async def body() -> None:
        feats = BackendFeatures(sg=True, gso_tcpv4=True, split_event_channels=True)
        async with net_pair(features=feats) as pair:
            assert pair.front.rx_port != pair.front.port and pair.back.rx_port != pair.back.port
            frames = [_frame(s) for s in SIZES]
            await _send_all(pair, frames)
            for f in frames:
                assert pair.back.transmit(f)
            await wait_for(lambda: len(pair.to_host) == len(pair.to_guest) == len(frames))
            assert [d for d, _ in pair.to_host] == frames == [d for d, _ in pair.to_guest]

    run(body())
