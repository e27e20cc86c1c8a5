"""Byte builders shared by the NBD tests: what a client sends, parsed server answers."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pvio.nbd import wire as w
from pvio.nbd.server_asyncio import NbdServer
from pvio.storage.backend import BlockBackend


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for `condition` to hold, checking every millisecond, at most `timeout` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.001)


def option(opt: int, data: bytes = b"") -> bytes:
    return w.NEW_OPTION.pack(version=w.IHAVEOPT, option=opt, optlen=len(data)) + data


def go_data(name: str, infos: tuple[int, ...] = (w.NBD_INFO_BLOCK_SIZE,)) -> bytes:
    raw = name.encode()
    return (
        len(raw).to_bytes(4, "big")
        + raw
        + len(infos).to_bytes(2, "big")
        + b"".join(i.to_bytes(2, "big") for i in infos)
    )


def request(cmd: int, offset: int = 0, length: int = 0, cookie: int = 1, flags: int = 0) -> bytes:
    return w.REQUEST.packer.pack(w.NBD_REQUEST_MAGIC, flags, cmd, cookie, offset, length)


def client_flags(flags: int = w.NBD_FLAG_C_FIXED_NEWSTYLE | w.NBD_FLAG_C_NO_ZEROES) -> bytes:
    return w.CLIENT_FLAGS.pack(cflags=flags)


@dataclass
class OptReply:
    option: int
    reply: int
    data: bytes


def parse_option_replies(buf: bytes) -> list[OptReply]:
    out = []
    pos = 0
    while pos < len(buf):
        h = w.FIXED_NEW_OPTION_REPLY.unpack(buf, pos)
        assert h["magic"] == w.NBD_REP_MAGIC
        pos += w.FIXED_NEW_OPTION_REPLY.size
        out.append(OptReply(h["option"], h["reply"], buf[pos : pos + h["replylen"]]))
        pos += h["replylen"]
    assert pos == len(buf)
    return out


def parse_simple_replies(buf: bytes) -> list[tuple[int, int]]:
    """(cookie, error) of each reply; only for replies without data."""
    assert len(buf) % w.SIMPLE_REPLY.size == 0
    out = []
    for pos in range(0, len(buf), w.SIMPLE_REPLY.size):
        magic, error, cookie = w.SIMPLE_REPLY.packer.unpack_from(buf, pos)
        assert magic == w.NBD_SIMPLE_REPLY_MAGIC
        out.append((cookie, error))
    return out


class ServerThread:
    """An `NbdServer` on its own event loop in a thread, for tests driving real clients.

    `make_exports` is an async factory run on that loop (so backends such as `NbdClient`
    belong to it).  `stop()` closes the server and joins the thread; use as a context
    manager so that it always runs.
    """

    def __init__(
        self,
        make_exports: Callable[[], Awaitable[dict[str, BlockBackend]]],
        socket_path: str,
        **server_kw: Any,
    ) -> None:
        self.make_exports = make_exports
        self.socket_path = socket_path
        self.server_kw = server_kw
        self.server: NbdServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="nbd-test-server", daemon=True)

    def uri(self, export: str = "") -> str:
        return f"nbd+unix:///{export}?socket={self.socket_path}"

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported by start()
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        exports = await self.make_exports()
        self.server = NbdServer(exports, **self.server_kw)
        await self.server.listen_unix(self.socket_path)
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await self.server.close()
            for backend in exports.values():
                close = getattr(backend, "close", None)
                if close is not None:
                    result = close()
                    if asyncio.iscoroutine(result):
                        await result

    def start(self) -> ServerThread:
        self._thread.start()
        if not self._ready.wait(20):
            raise TimeoutError("NBD test server did not start")
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(20)
        assert not self._thread.is_alive(), "NBD test server did not stop"

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
