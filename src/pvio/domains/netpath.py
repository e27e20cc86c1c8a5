"""A network device's frames between a TAP and the LAN, on a domain's event loop.

Theory of operation
-------------------
`NetPath` joins one `NetDriver` (a guest's network device, or the host's peer on a LAN)
to a TAP through `TapLink`, and runs the driver's data path on the asyncio loop of the
domain process that owns it: the driver only touches that domain's memory, and its
SEND_DMAs go to the hypervisor as coroutines of the domain's client, so no thread is on
a frame's path.

Sending: frames read from the TAP are queued in the driver (at most `pending_limit`;
more are dropped and counted).  Once the TAP has been read — a pump scheduled with
call_soon, so the frames of one wake-up share batches — `NetDriver.stage` writes the
next batch into transmit buffers and its SEND_DMAs go as one hypervisor request; when
the replies come, `NetDriver.account` counts them and the next batch goes.  One batch
is in flight at a time (the driver's transmit buffers are one batch's).  A batch in
which a peer had no free buffer pauses the pump for `retry_delay` seconds, so the peer
can drain before the frames it missed are sent again.

Receiving: the owner calls `interrupt()` where the device's interrupt push arrives; the
driver takes its filled buffers and the frames go straight into the TAP.

`failed` is asked before every batch and interrupt: a device its Launcher marked FAILED
sends and receives nothing more (its queue is dropped).

Rejected: two batches in flight on two sets of transmit buffers (measured no faster:
smaller batches, and more frames finding the receiver full).
"""

from __future__ import annotations

import asyncio
import errno
import functools
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Protocol

from pvio.domains.tap import Frame, TapInterface, TapLink
from pvio.lguest.net import NetDriver, TxBatch

#: Frames from the TAP waiting for the driver before they are dropped.
PENDING_LIMIT = 256
#: How long the pump waits after a batch in which a peer had no free buffer (seconds):
#: about the time a peer takes to empty its buffers after its interrupt.
RETRY_DELAY = 0.0003


class BatchSender(Protocol):
    """The part of a domain's hypervisor client a NetPath needs."""

    def send_dma_many(self, sends: Sequence[tuple[int, int]]) -> Coroutine[Any, Any, list[int]]: ...


class NetPath:
    """One network device's frames between its TAP and its LAN, on the event loop."""

    def __init__(self, net: NetDriver, client: BatchSender, tap: TapInterface, *,
                 failed: Callable[[], bool] = lambda: False, pending_limit: int = PENDING_LIMIT,
                 retry_delay: float = RETRY_DELAY) -> None:
        self.net = net
        self.client = client
        self.tap = tap
        self.failed = failed
        self.pending_limit = pending_limit
        self.retry_delay = retry_delay
        self.link = TapLink(tap, self.from_tap)
        self.tx_dropped = 0  # frames from the TAP beyond pending_limit
        self.tx_batches = 0  # batches sent (one hypercall round trip each)
        self.refused = 0  # batches that got no answer (the hypervisor's channel went)
        self._inflight = False
        self._scheduled = False
        self._paused = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.link.start(loop)

    def stop(self) -> None:
        self.link.stop()

    # T:899 A frame's path through a domain process, on the event loop
    # A network device's data path never leaves the event loop: a frame read from the
    # TAP is queued in the driver; when no batch is in flight, `stage` writes the next
    # batch into transmit buffers in the domain's memory and its SEND_DMAs go to the
    # hypervisor as one request, whose replies `account` counts before the next batch
    # goes (after a pause, if a peer was full).  A receive interrupt is handled right
    # where its push arrives: the driver takes the filled buffers (memory reads and one
    # used_len write each) and the frames go straight into the TAP.  A guest's disk
    # requests take the same kind of path (`pvio.domains.lguest_aio.LguestDisk`); its console
    # driver, whose calls wait for hypercalls, stays in its worker thread.
    # :T
    def from_tap(self, frame: Frame) -> None:
        if self.net.queued() >= self.pending_limit:
            self.tx_dropped += 1
            return
        self.net.queue((frame,))
        if not self._scheduled and self._loop is not None:
            self._scheduled = True
            self._loop.call_soon(self._pump)

    def _pump(self) -> None:
        self._scheduled = False
        if self._paused or self._inflight:
            return
        if self.failed():
            self.net.drop_queue()
            return
        batch = self.net.stage()
        if not batch:
            return
        self._inflight = True
        self.tx_batches += 1
        fut = asyncio.ensure_future(self.client.send_dma_many(batch.sends))
        fut.add_done_callback(functools.partial(self._done, batch))

    def _done(self, batch: TxBatch, fut: asyncio.Future[list[int]]) -> None:
        self._inflight = False
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            self.refused += 1
        results = [-errno.EIO] * len(batch.sends) if exc is not None else fut.result()
        self.net.account(batch, results)
        if 0 in results and self._loop is not None:
            # A peer's buffers were all full: an immediate retry would only miss again
            # (and count as drops toward the flood rule).
            self._paused = True
            self._loop.call_later(self.retry_delay, self._resume)
            return
        self._pump()

    def _resume(self) -> None:
        self._paused = False
        self._pump()

    def interrupt(self) -> None:
        """The device's interrupt: its filled buffers go into the TAP."""
        if self.failed():
            return
        self.net.interrupt()
        for frame in self.net.take_frames():
            self.link.send(frame)
