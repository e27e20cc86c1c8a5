"""The line a domain's hypercalls travel, as every part of the client sees it.

Theory of operation
-------------------
A `Channel` is what an adapter supplies: `pvio.hypervisor.aio.SocketChannel` over the
hypercall socket, or `pvio.hypervisor.inprocess.InProcessChannel` straight into a core
in the same process.  It carries batches of ops and their replies, delivers pushes, and
lends its event loop's reader registration to the event-channel part.

`Hypercalls` is the one place every part of the client calls through, so that a round
trip (one batch, whatever its length) is counted once, and a failed reply is checked the
same way everywhere: `check` closes any descriptors the failed reply carried (nobody
else will) and raises `HypercallError` with the hypercall's name.

Deliberately not here: what a batch contains.  Each part builds its own ops from the
layouts in `pvio.abi` and `pvio.hypervisor.wire`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Protocol

from pvio.hypervisor.errors import HypercallError
from pvio.hypervisor.wire import Op


class Channel(Protocol):
    """What carries a domain's hypercalls and wakes it (socket or in-process)."""

    async def call(self, ops: list[Op]) -> list[Op]:
        """Run a batch; one reply op (rc, args, fds) per request op."""
        ...

    def start(self, on_push: Callable[[Op], None]) -> None: ...

    def add_reader(self, fd: int, callback: Callable[..., None], *args: object) -> None: ...

    def remove_reader(self, fd: int) -> None: ...

    async def close(self) -> None: ...


def check(reply: Op, what: str) -> Op:
    """Return `reply` if it succeeded; else close its descriptors and raise."""
    if reply.rc:
        for fd in reply.fds:
            os.close(fd)
        raise HypercallError(reply.rc, what)
    return reply


class Hypercalls:
    """A domain's hypercalls over its channel, counted (one round trip per batch)."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        #: Hypercall round trips made (one per batch).
        self.round_trips = 0

    async def batch(self, ops: list[Op]) -> list[Op]:
        """Send a batch (a multicall); one reply op per op, unchecked."""
        self.round_trips += 1
        return await self.channel.call(ops)

    async def one(self, op: Op, what: str) -> Op:
        """Send one op and return its reply, checked (see `check`)."""
        (reply,) = await self.batch([op])
        return check(reply, what)
