"""NetPath: a network device's frames between a TAP and the LAN, on an event loop.

Both ends run in one process: each guest's "TAP" is one end of a datagram socketpair
(what a TAP is to its reader: one frame per read), its driver is the real NetDriver
over the in-process DMA host, and its hypercalls are an async client that runs each
SEND_DMA on that host.  No root, no hypervisor process: the adapter's own logic —
batches, one in flight, the pause after a full receiver, interrupts into the TAP."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Sequence

from pvio.domains.netpath import NetPath
from pvio.domains.tap import TapInterface
from pvio.lguest.dma import LguestError
from pvio.lguest.net import NUM_SKBS, TX_BATCH
from pvio.testing.lguest_dma import InProcessDmaHost
from pvio.testing.lguest_guest import InProcessLguest, Lan, build_guest


class _Client:
    """send_dma_many on the in-process host, after a yield (as a round trip would)."""

    def __init__(self, rig: InProcessLguest) -> None:
        self.rig = rig
        self.batches: list[int] = []

    async def send_dma_many(self, sends: Sequence[tuple[int, int]]) -> list[int]:
        await asyncio.sleep(0)
        self.batches.append(len(sends))
        out = []
        for key, dma in sends:
            try:
                out.append(self.rig.guest.send_dma(key, dma))
            except LguestError as exc:
                out.append(-exc.errno)
        return out


def _pair(rig: InProcessLguest) -> tuple[TapInterface, socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)
    assert rig.net is not None
    tap = TapInterface("", "test0", os.dup(ours.fileno()), rig.net.mac, "")
    ours.close()
    return tap, theirs


def _two_guests() -> tuple[InProcessLguest, InProcessLguest]:
    host, lan = InProcessDmaHost(), Lan()
    a, b = (build_guest(host, name, lan=lan, console=False) for name in ("a", "b"))
    for rig in (a, b):
        assert rig.net is not None
        rig.net.open()
    return a, b


def _frame(dest: bytes, src: bytes, n: int) -> bytes:
    return dest + src + b"\x08\x00" + bytes([n % 256]) * 100


def test_frames_cross_in_batches_and_a_full_receiver_is_retried_after_a_pause() -> None:
    async def main() -> None:
        a, b = _two_guests()
        assert a.net is not None and b.net is not None
        loop = asyncio.get_running_loop()
        tap_a, wire_a = _pair(a)
        tap_b, wire_b = _pair(b)
        client_a = _Client(a)
        path_a = NetPath(a.net, client_a, tap_a, retry_delay=0.02)
        path_b = NetPath(b.net, _Client(b), tap_b)
        path_a.start(loop)
        path_b.start(loop)
        frames = [_frame(b.net.mac, a.net.mac, i) for i in range(20)]
        for f in frames:  # the kernel writes 20 frames into a's TAP at once
            wire_a.send(f)
        await asyncio.sleep(0.005)
        # b has eight buffers and nobody has taken its interrupt yet: the first batch
        # fills them, the second finds b full and the path pauses
        assert client_a.batches[:2] == [TX_BATCH, TX_BATCH]
        assert a.net.stats.tx_packets == NUM_SKBS and a.net.stats.tx_retries == TX_BATCH
        paused_at = len(client_a.batches)
        frames.append(_frame(b.net.mac, a.net.mac, 20))
        wire_a.send(frames[-1])  # a frame from the TAP during the pause waits too
        await asyncio.sleep(0.005)
        assert len(client_a.batches) == paused_at  # nothing sent during the pause
        # b's interrupt: its buffers go into its TAP, and the retries get through
        b.guest.take_irqs()
        path_b.interrupt()
        await asyncio.sleep(0.05)
        b.guest.take_irqs()
        path_b.interrupt()
        await asyncio.sleep(0.05)
        b.guest.take_irqs()
        path_b.interrupt()
        wire_b.setblocking(False)
        got = []
        while True:
            try:
                got.append(wire_b.recv(65536))
            except BlockingIOError:
                break
        assert got == frames  # all of them, in order
        assert a.net.stats.tx_carrier_errors == 0 and a.net.stats.tx_packets == 21
        assert path_a.tx_batches == len(client_a.batches) and path_a.refused == 0
        path_a.stop()
        path_b.stop()
        for tap in (tap_a, tap_b):
            tap.close()

    asyncio.run(main())


def test_a_failed_device_drops_its_queue_and_takes_no_interrupt() -> None:
    async def main() -> None:
        a, b = _two_guests()
        assert a.net is not None and b.net is not None
        tap_a, wire_a = _pair(a)
        failed = [True]
        client = _Client(a)
        path = NetPath(a.net, client, tap_a, failed=lambda: failed[0])
        path.start(asyncio.get_running_loop())
        wire_a.send(_frame(b.net.mac, a.net.mac, 1))
        await asyncio.sleep(0.01)
        assert client.batches == [] and a.net.stats.tx_dropped == 1 and a.net.queued() == 0
        path.interrupt()  # nothing taken from a FAILED device
        path.stop()
        tap_a.close()

    asyncio.run(main())
