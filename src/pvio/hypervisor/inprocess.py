"""The in-process implementation: the hypervisor core and its domains in one process.

Same `Domain` class, same frames (encoded and decoded, so the parser is exercised), same
memfds and eventfds; only the socket is missing.  Pushes are delivered from the event
loop (``call_soon``), as they would arrive from a socket, never inside the call that
caused them.  Used by tests and simulations, and by the conformance suite next to the
daemon.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

from pvio.hypervisor.client import Domain, create_domain
from pvio.hypervisor.client_core import HypercallProtocol
from pvio.hypervisor.core import Hypervisor
from pvio.hypervisor.errors import HypercallError, ProtocolError
from pvio.hypervisor.platform import OsPlatform, host_limits
from pvio.hypervisor.session import Session, push_frames
from pvio.hypervisor.wire import FRAME_ERROR, FRAME_PUSH, Op


class InProcessHypervisor:
    def __init__(self) -> None:
        self.platform = OsPlatform()
        self.hv = Hypervisor(self.platform, os.dup, limits=host_limits())
        self._channels: dict[int, InProcessChannel] = {}

    async def create_domain(
        self,
        name: str,
        nr_pages: int = 4096,
        *,
        transport: str = "map",
        max_grant_frames: int = 64,
        domid: int | None = None,
    ) -> Domain:
        ch = InProcessChannel(self)
        d = await create_domain(
            ch, name, nr_pages, transport=transport, max_grant_frames=max_grant_frames, domid=domid
        )
        self._channels[d.domid] = ch
        return d

    def flush_pushes(self) -> None:
        for domid, (frame, fds) in push_frames(self.hv.take_pushes()).items():
            ch = self._channels.get(domid)
            if ch is None or ch.closed:
                for fd in fds:
                    os.close(fd)
            else:
                ch.loop.call_soon(ch.receive_push, frame, fds)

    def detach(self, domid: int | None) -> None:
        if domid is not None:
            self._channels.pop(domid, None)


class InProcessChannel:
    def __init__(self, owner: InProcessHypervisor) -> None:
        self.owner = owner
        self.session = Session(owner.hv)
        self.loop = asyncio.get_running_loop()
        self._proto = HypercallProtocol()
        self._on_push: Callable[[Op], None] | None = None
        self._early: list[Op] = []
        self._readers: set[int] = set()
        self.closed = False

    def start(self, on_push: Callable[[Op], None]) -> None:
        self._on_push = on_push
        early, self._early = self._early, []
        for op in early:
            on_push(op)

    async def call(self, ops: list[Op]) -> list[Op]:
        if self.closed:
            raise ConnectionError("hypercall channel is closed")
        _, data = self._proto.request(ops)
        reply, fds = self.session.handle(data)
        self.owner.flush_pushes()
        received = self._proto.receive(reply, fds)
        for fd in received.stray_fds:
            os.close(fd)
        if received.frame.kind == FRAME_ERROR:
            raise HypercallError(received.frame.ops[0].rc, "the hypervisor rejected the frame")
        if len(received.frame.ops) != len(ops):
            raise ProtocolError(f"{len(received.frame.ops)} replies to {len(ops)} ops")
        await asyncio.sleep(0)  # a round trip yields to the loop, as a socket would
        return received.frame.ops

    def receive_push(self, frame: bytes, fds: list[int]) -> None:
        if self.closed:
            for fd in fds:
                os.close(fd)
            return
        try:
            received = self._proto.receive(frame, fds)
        except ProtocolError:
            for fd in fds:
                os.close(fd)
            return
        for fd in received.stray_fds:
            os.close(fd)
        if received.frame.kind != FRAME_PUSH:
            return
        for op in received.frame.ops:
            if self._on_push is None:
                self._early.append(op)
            else:
                self._on_push(op)

    def add_reader(self, fd: int, callback: Callable[..., None], *args: object) -> None:
        self._readers.add(fd)
        self.loop.add_reader(fd, callback, *args)

    def remove_reader(self, fd: int) -> None:
        if fd in self._readers:
            self._readers.discard(fd)
            self.loop.remove_reader(fd)

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for fd in list(self._readers):
            self.loop.remove_reader(fd)
        self._readers.clear()
        domid = self.session.domid
        self.session.close()
        self.owner.detach(domid)
        self.owner.flush_pushes()
