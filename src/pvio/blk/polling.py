"""A short polling window before a process sleeps on its event channel.

Theory of operation
-------------------
io/ring.h's notification avoidance asks for a kick only when a consumer is about to
sleep: it sets req_event (or rsp_event) one past what it consumed, and the producer
kicks when it publishes past that.  On a machine where processes outnumber CPUs, a kick
that wakes a sleeping process is the most expensive thing a request does (tens of
microseconds of the sender's time, and the sleeper's wake-up latency).  So before
arming the event and sleeping, each end keeps looking at the ring for `POLL_WINDOW_US`:
what arrives meanwhile is taken without a kick -- the other end sees the stale event
index and does not send one -- and only a window that ends empty arms the event and
sleeps.  Every look goes through the event loop (`asyncio.sleep(0)` or a `call_soon`
chain), so the process serves its other work (sockets, other rings) while it polls; a
truly idle device costs at most one window of CPU after its last request.  blkfront's
window rests when its windows keep ending empty (responses slower than a window: it
then sleeps on its event at once for a while, and looks again later).

`poll_for` is blkback's (a coroutine in its ring loop); `PollWindow` is blkfront's (the
response handler is a callback).  blkback in the copy transport does not poll: there
every batch waits on GNTTABOP_copy in a third process, the hypervisor, and the CPU a
window spins away on two cores is the CPU that process needs.  `POLL_WINDOW_US` = 0
turns both off; the environment variables ``PVIO_BLK_POLL_US``, ``PVIO_BLK_POLL_DEPTH``,
``PVIO_BLK_POLL_MISSES`` and ``PVIO_BLK_POLL_REST`` set the knobs below for the domain
processes (for measurements).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable

#: blkfront polls only while at most this many requests are in flight: by default at any
#: depth a ring allows (its largest holds 512); see docs/blk.md's levers table
POLL_MAX_IN_FLIGHT = int(os.environ.get("PVIO_BLK_POLL_DEPTH", "1024"))
#: Microseconds an end keeps looking at its ring before it arms the event and sleeps
POLL_WINDOW_US = int(os.environ.get("PVIO_BLK_POLL_US", "200"))
#: blkfront's windows that ended with nothing found, one after another, before it rests:
#: the responses come later than a window (the copy transport, a disk that seeks), so
#: looking only spins away CPU the other processes need ...
POLL_MISSES_TO_REST = int(os.environ.get("PVIO_BLK_POLL_MISSES", "8"))
#: ... and the windows it then skips (arming the event at once) before it looks again
POLL_REST = int(os.environ.get("PVIO_BLK_POLL_REST", "64"))


def backend_window_us(transport: str) -> int:
    """blkback's window in `transport`: none in the copy transport (see the module notes)."""
    return 0 if transport == "copy" else POLL_WINDOW_US


async def poll_for(ready: Callable[[], bool], window_us: int = POLL_WINDOW_US) -> bool:
    """Look for `ready()` once per turn of the loop for up to `window_us`; True if it came."""
    if window_us <= 0:
        return False
    deadline = time.monotonic_ns() + window_us * 1000
    while time.monotonic_ns() < deadline:
        await asyncio.sleep(0)
        if ready():
            return True
    return False


# T:685 Looking before sleeping
# An end with nothing to do would arm its event (the final check) and sleep; a kick that
# wakes it is the dearest thing a request does on a busy machine.  So blkback keeps
# looking at its ring for a short window first (`poll_for`; not in the copy transport,
# whose hypervisor needs that CPU), and blkfront, while requests are in flight, keeps
# looking for their responses (`PollWindow`): what comes
# meanwhile is taken with no kick, since the other end sees a stale event index.  Only
# a window that ends empty arms the event; blkfront never leaves requests in flight with
# neither a window looking nor the event armed (`BlkFront._settle`).
# :T
class PollWindow:
    """blkfront's window: while 1..`max_depth` requests are in flight (`outstanding()`),
    calls `take()` (consume responses without arming; True if it found any) once per turn
    of the loop until `window_us` pass with nothing found, then `done()` (consume and arm
    the event: the final check).  With nothing in flight it just stops, unarmed: no
    response can come, and the next request pushed starts a window again.  After
    `POLL_MISSES_TO_REST` windows in a row that found nothing, the next `POLL_REST`
    starts open none (`rests` counts them): where responses take longer than a window,
    blkfront sleeps on its event as it would with no window at all."""

    def __init__(self, take: Callable[[], bool], outstanding: Callable[[], int], done: Callable[[], None],
                 window_us: int = POLL_WINDOW_US, max_depth: int = POLL_MAX_IN_FLIGHT) -> None:
        self.take, self.outstanding, self.done = take, outstanding, done
        #: the loop the window turns on, kept from its first start (get_running_loop() is a getpid())
        self._loop: asyncio.AbstractEventLoop | None = None
        self.window_ns = window_us * 1000
        self.max_depth = max_depth
        self.active = False
        self.polls = 0  # looks taken
        self.rests = 0  # windows not opened: the earlier ones kept finding nothing
        self._misses = 0  # windows in a row that ended with nothing found
        self._rest = 0  # starts still to skip
        self._found = False  # the open window has found a response

    def start(self) -> None:
        if self.window_ns > 0 and not self.active and 0 < self.outstanding() <= self.max_depth:
            if self._rest:
                self._rest -= 1
                self.rests += 1
                return
            self.active = True
            self._found = False
            loop = self._loop
            if loop is None or loop.is_closed():
                loop = self._loop = asyncio.get_running_loop()
            loop.call_soon(self._tick, time.monotonic_ns() + self.window_ns)

    def _tick(self, deadline: int) -> None:
        self.polls += 1
        now = time.monotonic_ns()
        if self.take():
            deadline = now + self.window_ns
            self._found = True
        n = self.outstanding()
        if n and n <= self.max_depth and now < deadline:
            assert self._loop is not None  # a tick runs on the loop start() scheduled it on
            self._loop.call_soon(self._tick, deadline)
            return
        self.active = False
        if self._found:
            self._misses = 0
        elif n and now >= deadline:  # it ran its whole length and found nothing
            self._misses += 1
            if self._misses >= POLL_MISSES_TO_REST:
                self._misses, self._rest = 0, POLL_REST
        if n:
            self.done()
