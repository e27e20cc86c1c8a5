"""NetPath: a network device's frames between a TAP and the LAN, on an event loop.

Both ends run in one process: each guest's "TAP" is one end of a datagram socketpair
(what a TAP is to its reader: one frame per read), its driver is the real NetDriver,
and its hypercalls go to the hypervisor's core through an asyncio client
(`pvio.testing.lguest_world`).  No root, no hypervisor process: the adapter's own logic
— batches, one in flight, the pause after a full receiver, interrupts into the TAP.
Every wait is on a condition, with a deadline."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Sequence

from pvio.domains.netpath import NetPath
from pvio.domains.tap import TapInterface
from pvio.lguest.net import NUM_SKBS, TX_BATCH
from pvio.testing.lguest_world import (
    AsyncDomainClient,
    InProcessLguest,
    Lan,
    LguestWorld,
    build_guest,
)

#: The pause after a batch that found the receiver full; long next to the few
#: milliseconds a check takes, so "nothing was sent during the pause" is checked inside it.
PAUSE = 0.5


class _Counting(AsyncDomainClient):
    """The asyncio client, recording the size and the time of each batch."""

    def __init__(self, rig: InProcessLguest) -> None:
        super().__init__(rig.port)
        self.batches: list[int] = []
        self.times: list[float] = []

    async def send_dma_many(self, sends: Sequence[tuple[int, int]]) -> list[int]:
        self.batches.append(len(sends))
        self.times.append(asyncio.get_running_loop().time())
        return await super().send_dma_many(sends)


async def _until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.001)


def _pair(rig: InProcessLguest) -> tuple[TapInterface, socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)
    theirs.setblocking(False)
    assert rig.net is not None
    tap = TapInterface("", "test0", os.dup(ours.fileno()), rig.net.mac, "")
    ours.close()
    return tap, theirs


def _two_guests() -> tuple[InProcessLguest, InProcessLguest]:
    lan = Lan(LguestWorld())
    a, b = (build_guest(lan.world, name, lan=lan, console=False) for name in ("a", "b"))
    for rig in (a, b):
        assert rig.net is not None
        rig.net.open()
    return a, b


def _frame(dest: bytes, src: bytes, n: int) -> bytes:
    return dest + src + b"\x08\x00" + bytes([n % 256]) * 100


def _received(end: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(end.recv(65536))
        except BlockingIOError:
            return out


def test_frames_cross_in_batches_and_a_full_receiver_is_retried_after_a_pause() -> None:
    async def main() -> None:
        a, b = _two_guests()
        assert a.net is not None and b.net is not None
        loop = asyncio.get_running_loop()
        tap_a, wire_a = _pair(a)
        tap_b, wire_b = _pair(b)
        client_a = _Counting(a)
        path_a = NetPath(a.net, client_a, tap_a, retry_delay=PAUSE)
        path_b = NetPath(b.net, AsyncDomainClient(b.port), tap_b)  # b's interrupts: by hand
        path_a.start(loop)
        path_b.start(loop)
        frames = [_frame(b.net.mac, a.net.mac, i) for i in range(20)]
        for f in frames:  # the kernel writes 20 frames into a's TAP at once
            wire_a.send(f)
        # b has eight buffers and nobody has taken its interrupt yet: the first batch
        # fills them, the second finds b full and the path pauses
        await _until(lambda: a.net.stats.tx_retries >= TX_BATCH)
        assert client_a.batches[:2] == [TX_BATCH, TX_BATCH]
        assert a.net.stats.tx_packets == NUM_SKBS  # b is full: nothing more gets through
        # A frame from the TAP during the pause waits too: it is read and queued; the
        # next batch leaves only once the pause is over, however slow the machine.
        frames.append(_frame(b.net.mac, a.net.mac, 20))
        wire_a.send(frames[-1])
        await _until(lambda: len(client_a.batches) > 2)
        assert client_a.times[2] - client_a.times[1] >= PAUSE * 0.99
        # b takes its interrupts: its buffers go into its TAP, and after the pause the
        # retries get through, all of them, in order
        got: list[bytes] = []

        def b_drains() -> bool:
            path_b.interrupt()
            got.extend(_received(wire_b))
            return len(got) >= len(frames)

        await _until(b_drains)
        assert got == frames
        # a counts a batch when its SEND_DMA results come back, which can be after b
        # already holds the frames: wait until every frame is accounted for
        st = a.net.stats
        await _until(lambda: st.tx_packets + st.tx_carrier_errors + st.tx_errors >= len(frames))
        assert st.tx_carrier_errors == 0 and st.tx_errors == 0 and st.tx_packets == 21
        assert path_a.tx_batches == len(client_a.batches) and path_a.refused == 0
        path_a.stop()
        path_b.stop()
        for tap in (tap_a, tap_b):
            tap.close()
        wire_a.close()
        wire_b.close()

    asyncio.run(main())


def test_a_failed_device_drops_its_queue_and_takes_no_interrupt() -> None:
    async def main() -> None:
        a, b = _two_guests()
        assert a.net is not None and b.net is not None
        tap_a, wire_a = _pair(a)
        client = _Counting(a)
        path = NetPath(a.net, client, tap_a, failed=lambda: True)
        path.start(asyncio.get_running_loop())
        wire_a.send(_frame(b.net.mac, a.net.mac, 1))
        await _until(lambda: a.net is not None and a.net.stats.tx_dropped == 1)  # read, then dropped
        assert client.batches == [] and a.net.queued() == 0
        # A frame waits in a's buffers; a FAILED device's interrupt takes nothing.
        assert b.transmit(_frame(a.net.mac, b.net.mac, 2)) == 1
        path.interrupt()
        assert a.net.stats.rx_packets == 0 and _received(wire_a) == []
        path.stop()
        tap_a.close()
        wire_a.close()

    asyncio.run(main())
