"""How a domain gets a new XenStore connection when xenstored has restarted.

Each domain process inherits, besides its XenStore connection, one end of a
SOCK_SEQPACKET pair (`DomainSpec.toolstack_fd`); pvio up keeps the other.  When the
domain's XenStore connection drops, its client sends ``xenstore`` on the channel and
waits; pvio up answers, once xenstored serves again, with a connection bound to that
domain's domid (xenstored's control socket, as at the domain's start), passed with
SCM_RIGHTS.  A domain never chooses its own identity: the channel is its only way back,
and the toolstack decides which domid is behind each channel.

A domain that reaches XenStore over its ring uses the same channel once, at its start:
``introduce store-ring-ref=<frame> store-port=<port> ...`` (`pvio.domains.xen_pages`);
pvio up INTRODUCEs the domid behind the channel with them, writes its directories and
answers ``ok``.  It never asks for a socket: a restarted xenstored maps its page again.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable

#: pvio up's part of an introduction: (domid, {"store-ring-ref": frame, ...}).
Introduce = Callable[[int, dict[str, int]], Awaitable[None]]


class XenstoreHandover:
    """pvio up's end of every domain's channel."""

    def __init__(self, attach: Callable[[int], Awaitable[socket.socket]],
                 introduce: Introduce | None = None) -> None:
        self.attach = attach  # a new connection bound to a domid
        self.introduce = introduce  # a domain built its pages: introduce it
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
            request = channel.recv(512)  # "xenstore", or an introduce line
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
        if request.startswith(b"introduce"):
            coro = self._introduce(domid, channel, request)
        else:
            coro = self._hand_over(domid, channel)
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _introduce(self, domid: int, channel: socket.socket, request: bytes) -> None:
        try:
            if self.introduce is None:
                raise ValueError("this toolstack introduces no ring domains")
            pages = parse_introduce(request)
            await self.xenstored_up.wait()
            await self.introduce(domid, pages)
            answer = b"ok"
        except Exception as e:
            answer = f"error: {e}".encode()[:200]
        with contextlib.suppress(OSError):
            channel.send(answer)

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


def parse_introduce(request: bytes) -> dict[str, int]:
    """``introduce k=v ...`` -> {k: v}; only the keys a domain builder knows, as numbers."""
    words = request.split()
    if not words or words[0] != b"introduce":
        raise ValueError("not an introduce request")
    pages: dict[str, int] = {}
    for word in words[1:]:
        key, sep, value = word.partition(b"=")
        name = key.decode("ascii", "replace")
        if not sep or name not in PAGE_KEYS or not value.isdigit() or len(value) > 20:
            raise ValueError(f"bad introduce field {word[:40]!r}")
        pages[name] = int(value)
    if "store-ring-ref" not in pages or "store-port" not in pages:
        raise ValueError("introduce needs store-ring-ref and store-port")
    return pages


#: What a domain may name when it asks to be introduced.
PAGE_KEYS = frozenset({"store-ring-ref", "store-port", "console-ring-ref", "console-port"})
