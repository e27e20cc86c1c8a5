"""How a domain gets a new XenStore connection when xenstored has restarted.

Each domain process inherits, besides its XenStore connection, one end of a
SOCK_SEQPACKET pair (`DomainSpec.toolstack_fd`); pvio up keeps the other.  When the
domain's XenStore connection drops, its client sends ``xenstore`` on the channel and
waits; pvio up answers, once xenstored serves again, with a connection bound to that
domain's domid (xenstored's control socket, as at the domain's start), passed with
SCM_RIGHTS.  A domain never chooses its own identity: the channel is its only way back,
and the toolstack decides which domid is behind each channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable


class XenstoreHandover:
    """pvio up's end of every domain's channel."""

    def __init__(self, attach: Callable[[int], Awaitable[socket.socket]]) -> None:
        self.attach = attach  # a new connection bound to a domid
        self.xenstored_up = asyncio.Event()  # set while xenstored serves
        self._channels: dict[int, socket.socket] = {}  # domid -> its channel
        self._tasks: set[asyncio.Task[None]] = set()

    def serve(self, domid: int, channel: socket.socket) -> None:
        """Answer `domid`'s requests on `channel` (a restarted domain's replaces the old)."""
        old = self._channels.pop(domid, None)
        loop = asyncio.get_running_loop()
        if old is not None:
            loop.remove_reader(old.fileno())
            old.close()
        channel.setblocking(False)
        self._channels[domid] = channel
        loop.add_reader(channel.fileno(), self._readable, domid, channel)

    def close(self) -> None:
        for channel in self._channels.values():
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(channel.fileno())
            channel.close()
        self._channels.clear()

    def _readable(self, domid: int, channel: socket.socket) -> None:
        try:
            request = channel.recv(64)
        except BlockingIOError:
            return
        except OSError:
            request = b""
        if not request:  # the domain is gone
            asyncio.get_running_loop().remove_reader(channel.fileno())
            if self._channels.get(domid) is channel:
                del self._channels[domid]
            channel.close()
            return
        task = asyncio.get_running_loop().create_task(self._hand_over(domid, channel))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _hand_over(self, domid: int, channel: socket.socket) -> None:
        try:
            await self.xenstored_up.wait()
            sock = await self.attach(domid)
        except Exception as e:
            with contextlib.suppress(OSError):
                channel.send(f"error: {e}".encode()[:200])
            return
        try:
            socket.send_fds(channel, [b"ok"], [sock.fileno()])
        except OSError:
            pass  # the domain went away meanwhile
        finally:
            sock.close()
