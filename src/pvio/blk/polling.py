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
truly idle device costs at most one window of CPU after its last request.

`poll_for` is blkback's (a coroutine in its ring loop); `PollWindow` is blkfront's (the
response handler is a callback).  blkback in the copy transport does not poll: there
every batch waits on GNTTABOP_copy in a third process, the hypervisor, and the CPU a
window spins away on two cores is the CPU that process needs.  `POLL_WINDOW_US` = 0 turns both off; the environment
variable ``PVIO_BLK_POLL_US`` sets it for the domain processes (for measurements).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable

#: blkfront polls only while this few requests are in flight: a deep queue is already
#: answered in batches with few kicks, and its polling would take CPU from the work
POLL_MAX_IN_FLIGHT = int(os.environ.get("PVIO_BLK_POLL_DEPTH", "4"))
#: Microseconds an end keeps looking at its ring before it arms the event and sleeps
POLL_WINDOW_US = int(os.environ.get("PVIO_BLK_POLL_US", "200"))


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
# whose hypervisor needs that CPU), and blkfront, while a few
# requests are in flight, keeps looking for their responses (`PollWindow`): what comes
# meanwhile is taken with no kick, since the other end sees a stale event index.  Only
# a window that ends empty arms the event; blkfront never leaves requests in flight with
# neither a window looking nor the event armed (`BlkFront._settle`).
# :T
class PollWindow:
    """blkfront's window: while 1..`max_depth` requests are in flight (`outstanding()`),
    calls `take()` (consume responses without arming; True if it found any) once per turn
    of the loop until `window_us` pass with nothing found, then `done()` (consume and arm
    the event: the final check).  With nothing in flight it just stops, unarmed: no
    response can come, and the next request pushed starts a window again."""

    def __init__(self, take: Callable[[], bool], outstanding: Callable[[], int], done: Callable[[], None],
                 window_us: int = POLL_WINDOW_US, max_depth: int = POLL_MAX_IN_FLIGHT) -> None:
        self.take, self.outstanding, self.done = take, outstanding, done
        self.window_ns = window_us * 1000
        self.max_depth = max_depth
        self.active = False
        self.polls = 0  # looks taken

    def start(self) -> None:
        if self.window_ns > 0 and not self.active and 0 < self.outstanding() <= self.max_depth:
            self.active = True
            asyncio.get_running_loop().call_soon(self._tick, time.monotonic_ns() + self.window_ns)

    def _tick(self, deadline: int) -> None:
        self.polls += 1
        now = time.monotonic_ns()
        if self.take():
            deadline = now + self.window_ns
        n = self.outstanding()
        if n and n <= self.max_depth and now < deadline:
            asyncio.get_running_loop().call_soon(self._tick, deadline)
            return
        self.active = False
        if n:
            self.done()
