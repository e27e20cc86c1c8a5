"""The asyncio adapter: a domain's hypercall socket (SOCK_SEQPACKET, SCM_RIGHTS).

Each `call` sends one request frame and awaits the reply with the same sequence number;
several calls may be in flight.  The socket is read from the event loop
(``loop.add_reader``): replies resolve their futures, pushes go to the `Domain`.  A
frame that does not parse, or that arrives truncated, fails nothing but itself: its
descriptors are closed and it is dropped.  If the hypervisor goes away, every pending
call fails with ConnectionError.
"""

from __future__ import annotations

import array
import asyncio
import os
import socket
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from pvio.hypervisor import wire
from pvio.hypervisor.client import Domain, create_domain
from pvio.hypervisor.client_core import HypercallProtocol
from pvio.hypervisor.errors import HypercallError, ProtocolError
from pvio.hypervisor.wire import Op

_FD_SIZE = array.array("i").itemsize
#: recvmsg's flags for a frame that did not fit, as a plain int (an operation on the
#: socket module's IntFlag members costs about a microsecond, on every frame)
_TRUNCATED = int(socket.MSG_TRUNC | socket.MSG_CTRUNC)
T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], *, loop: str = "uvloop") -> T:
    """Run a domain's (or the daemon's) main coroutine.

    On uvloop by default: a domain spends its life waiting in the loop for eventfds and
    hypercall replies, and uvloop's C loop wakes a callback in about half the time of the
    pure-Python one (``pvio bench hypervisor --loop`` shows both).  Everything in pvio also
    runs on the standard loop (``loop="asyncio"``), and the tests use both.
    """
    if loop == "uvloop":
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)


class FrameReceiver:
    """recvmsg_into a buffer kept for the socket (a fresh 128 KiB buffer per frame would
    cost an mmap/munmap pair in malloc each time)."""

    def __init__(self) -> None:
        self._buf = bytearray(wire.MAX_FRAME + 1)
        self._anc = socket.CMSG_SPACE(wire.MAX_FDS * _FD_SIZE)

    def recv(self, sock: socket.socket) -> tuple[bytes, list[int], bool]:
        """One frame: (data, fds, truncated).  Raises BlockingIOError if none."""
        n, anc, flags, _ = sock.recvmsg_into([self._buf], self._anc)
        fds: list[int] = []
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(payload[: len(payload) - len(payload) % _FD_SIZE])
                fds.extend(arr)
        truncated = bool(flags & _TRUNCATED) or n > wire.MAX_FRAME
        return bytes(self._buf[:n]), fds, truncated


def recv_frame(sock: socket.socket) -> tuple[bytes, list[int], bool]:
    """recvmsg one frame with a one-off buffer (tests, tools): see FrameReceiver."""
    return FrameReceiver().recv(sock)


def send_frame(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    sock.sendmsg([data], anc)


class SocketChannel:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._proto = HypercallProtocol()
        self._calls: dict[int, asyncio.Future[list[Op]]] = {}
        self._on_push: Callable[[Op], None] | None = None
        self._early: list[Op] = []
        self._readers: set[int] = set()
        self._receiver = FrameReceiver()
        self.closed = False
        sock.setblocking(False)
        self._loop.add_reader(sock.fileno(), self._on_readable)

    @classmethod
    async def connect(cls, path: str) -> SocketChannel:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, path)
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    def start(self, on_push: Callable[[Op], None]) -> None:
        self._on_push = on_push
        early, self._early = self._early, []
        for op in early:
            on_push(op)

    async def call(self, ops: list[Op]) -> list[Op]:
        if self.closed:
            raise ConnectionError("hypercall channel is closed")
        seq, data = self._proto.request(ops)
        fut: asyncio.Future[list[Op]] = self._loop.create_future()
        self._calls[seq] = fut
        try:
            try:
                send_frame(self._sock, data, [])  # the usual case: the socket has room
            except BlockingIOError:
                await self._send(data)
            replies = await fut
        finally:
            self._calls.pop(seq, None)
        if len(replies) != len(ops):
            for op in replies:
                for fd in op.fds:
                    os.close(fd)
            raise ProtocolError(f"{len(replies)} replies to {len(ops)} ops")
        return replies

    async def _send(self, data: bytes) -> None:
        while True:
            try:
                send_frame(self._sock, data, [])
                return
            except BlockingIOError:
                ready = self._loop.create_future()
                self._loop.add_writer(self._sock.fileno(), ready.set_result, None)
                try:
                    await ready
                finally:
                    self._loop.remove_writer(self._sock.fileno())

    def _on_readable(self) -> None:
        # One frame per wake-up: add_reader is level-triggered, so the loop calls again
        # while frames remain, and no read is spent on EAGAIN.
        if self.closed:
            return
        try:
            data, fds, truncated = self._receiver.recv(self._sock)
        except BlockingIOError:
            return
        except OSError as exc:
            self._broken(self._refusal() or ConnectionError(f"hypercall socket: {exc}"))
            return
        if not data and not fds:
            self._broken(ConnectionError("the hypervisor closed the connection"))
            return
        if truncated:
            for fd in fds:
                os.close(fd)
            return
        try:
            received = self._proto.receive(data, fds)
        except ProtocolError:
            for fd in fds:
                os.close(fd)
            return
        for fd in received.stray_fds:
            os.close(fd)
        frame = received.frame
        if frame.kind == wire.FRAME_PUSH:
            for op in frame.ops:
                if self._on_push is None:
                    self._early.append(op)
                else:
                    self._on_push(op)
            return
        if frame.kind == wire.FRAME_ERROR and frame.seq == 0 and frame.ops:
            # Not an answer to a request: the hypervisor refused the connection (it
            # serves as many as it may: -EBUSY), and closes it.
            self._broken(HypercallError(frame.ops[0].rc, "the hypervisor refused the connection"))
            return
        fut = self._calls.get(frame.seq)
        if fut is None or fut.done():
            for op in frame.ops:
                for fd in op.fds:
                    os.close(fd)
            return
        if frame.kind == wire.FRAME_ERROR:
            rc = frame.ops[0].rc if frame.ops else -1
            fut.set_exception(HypercallError(rc, "the hypervisor rejected the frame"))
        else:
            fut.set_result(frame.ops)

    def _refusal(self) -> HypercallError | None:
        """After a reset: the hypervisor's last frame, if it said why (a connection it
        refused, closed before it read our request, arrives as ECONNRESET first)."""
        try:
            data, fds, _ = self._receiver.recv(self._sock)
        except OSError:
            return None
        for fd in fds:
            os.close(fd)
        try:
            frame = wire.decode_frame(data)
        except ProtocolError:
            return None
        if frame.kind == wire.FRAME_ERROR and frame.seq == 0 and frame.ops:
            return HypercallError(frame.ops[0].rc, "the hypervisor refused the connection")
        return None

    def _broken(self, exc: Exception) -> None:
        for fut in self._calls.values():
            if not fut.done():
                fut.set_exception(exc)
        self._shutdown()

    def _shutdown(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._loop.remove_reader(self._sock.fileno())
        for fd in list(self._readers):
            self._loop.remove_reader(fd)
        self._readers.clear()
        self._sock.close()

    def add_reader(self, fd: int, callback: Callable[..., None], *args: object) -> None:
        self._readers.add(fd)
        self._loop.add_reader(fd, callback, *args)

    def remove_reader(self, fd: int) -> None:
        if fd in self._readers:
            self._readers.discard(fd)
            self._loop.remove_reader(fd)

    async def close(self) -> None:
        self._broken(ConnectionError("closed"))


async def connect(
    path: str,
    name: str,
    nr_pages: int = 4096,
    *,
    transport: str = "map",
    max_grant_frames: int = 64,
    domid: int | None = None,
) -> Domain:
    """Connect to `pvio hypervisor --socket PATH` and become a new domain."""
    channel = await SocketChannel.connect(path)
    try:
        return await create_domain(
            channel, name, nr_pages, transport=transport, max_grant_frames=max_grant_frames, domid=domid
        )
    except BaseException:
        await channel.close()
        raise
