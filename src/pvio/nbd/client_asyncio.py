"""`NbdClient`: the sans-IO `NbdClientConnection` over an asyncio socket, pipelined.

Any number of coroutines may call `read`/`write`/`flush`/`trim` at once: each sends its
request straight away and waits on a future that the reply (matched by cookie) resolves,
so requests are pipelined on the one connection and complete in whatever order the server
answers.  A protocol violation or a lost connection fails every waiting request with the
cause.  `NbdClient` implements `pvio.storage.backend.BlockBackend`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import cast

from pvio.nbd import wire as w
from pvio.nbd.address import NbdAddress
from pvio.nbd.client import (
    ClientEvent,
    ClientRequestError,
    ExportDetails,
    ExportList,
    NbdClientConnection,
    NbdCommandError,
    NbdOptionError,
    NbdReply,
    Ready,
    ServerProtocolError,
)
from pvio.storage.backend import BackendInfo


class _ClientProtocol(asyncio.Protocol):
    def __init__(self, client: NbdClient) -> None:
        self.client = client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Set here, not when create_connection returns: the greeting may be read first.
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods
        self.client._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.client._data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client._connection_lost(exc)


# T:780 A remote export as a backend
# `NbdClient` runs the client core on an asyncio socket.  Every call sends its request at
# once and awaits a future the matching reply resolves, so concurrent callers pipeline on
# one connection.  It implements `BlockBackend`: its `info` is derived from what
# NBD_OPT_GO reported.  So an `NbdServer` can serve an `NbdClient` — a qcow2 behind
# qemu-nbd, re-exported by pvio — and pvio's blkback uses the same object as the storage
# behind a guest disk whenever the image is not a raw file.
# :T


class NbdClient:
    """One NBD connection, pipelined; a `BlockBackend` over a remote export."""

    def __init__(self, core: NbdClientConnection) -> None:
        self.core = core
        self._transport: asyncio.Transport | None = None
        self._waiters: dict[int, asyncio.Future[NbdReply]] = {}
        self._handshake: asyncio.Future[ClientEvent] = asyncio.get_running_loop().create_future()
        self._closed: BaseException | None = None

    # --- connecting -------------------------------------------------------------------------------

    @classmethod
    async def connect(cls, address: NbdAddress | str, *, timeout: float = 10.0) -> NbdClient:
        addr = NbdAddress.parse(address) if isinstance(address, str) else address
        client = cls(NbdClientConnection(export_name=addr.export))
        await client._open(addr, timeout)
        event = await asyncio.wait_for(asyncio.shield(client._handshake), timeout)
        assert isinstance(event, Ready)
        return client

    @classmethod
    async def list_exports(cls, address: NbdAddress | str, *, timeout: float = 10.0) -> list[tuple[str, str]]:
        addr = NbdAddress.parse(address) if isinstance(address, str) else address
        client = cls(NbdClientConnection(list_exports=True))
        await client._open(addr, timeout)
        try:
            event = await asyncio.wait_for(asyncio.shield(client._handshake), timeout)
        finally:
            client._abort()
        assert isinstance(event, ExportList)
        return list(event.exports)

    async def _open(self, addr: NbdAddress, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        if addr.socket_path is not None:
            coro = loop.create_unix_connection(lambda: _ClientProtocol(self), addr.socket_path)
        else:
            coro = loop.create_connection(lambda: _ClientProtocol(self), addr.host or "localhost", addr.port)
        transport, _ = await asyncio.wait_for(coro, timeout)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    # --- protocol callbacks -------------------------------------------------------------------

    def _data_received(self, data: bytes) -> None:
        try:
            events = self.core.receive_data(data)
        except (ServerProtocolError, NbdOptionError) as exc:
            self._flush_out()
            self._fail(exc)
            self._abort()
            return
        self._flush_out()
        for event in events:
            if isinstance(event, NbdReply):
                fut = self._waiters.pop(event.cookie, None)
                if fut is not None and not fut.done():
                    fut.set_result(event)
            elif not self._handshake.done():
                self._handshake.set_result(event)

    def _flush_out(self) -> None:
        out = self.core.data_to_send()
        if out and self._transport is not None and not self._transport.is_closing():
            self._transport.write(out)

    def _fail(self, exc: BaseException) -> None:
        self._closed = exc
        if not self._handshake.done():
            self._handshake.set_exception(exc)
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(exc)
        self._waiters.clear()

    def _connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError(f"NBD connection lost: {exc or 'closed by the server'}"))

    def _abort(self) -> None:
        if self._transport is not None:
            self._transport.close()

    # --- commands -----------------------------------------------------------------------------

    @property
    def export(self) -> ExportDetails:
        assert self.core.export is not None
        return self.core.export

    @property
    def info(self) -> BackendInfo:
        return self.export.backend_info()

    async def _command(
        self, type: int, offset: int = 0, length: int = 0, data: bytes | memoryview = b"", flags: int = 0
    ) -> NbdReply:
        if self._closed is not None:
            raise ConnectionError(f"NBD connection is closed: {self._closed}")
        assert self._transport is not None
        cookie, parts = self.core.request(type, offset, length, data, flags)
        fut: asyncio.Future[NbdReply] = asyncio.get_running_loop().create_future()
        self._waiters[cookie] = fut
        self._transport.writelines(parts)
        reply = await fut
        if reply.error:
            name = w.nbd_error_name(reply.error)
            raise NbdCommandError(reply.error, f"{w.NBD_CMD_NAMES[type]} at {offset}+{length}: {name}")
        return reply

    async def read(self, offset: int, length: int) -> bytes:
        return (await self._command(w.NBD_CMD_READ, offset, length)).data

    async def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        flags = w.NBD_CMD_FLAG_FUA if fua else 0
        await self._command(w.NBD_CMD_WRITE, offset, len(data), data, flags)

    async def flush(self) -> None:
        await self._command(w.NBD_CMD_FLUSH)

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await self._command(w.NBD_CMD_TRIM, offset, length, flags=w.NBD_CMD_FLAG_FUA if fua else 0)

    async def write_zeroes(
        self, offset: int, length: int, fua: bool = False, may_trim: bool = True
    ) -> None:
        flags = (w.NBD_CMD_FLAG_FUA if fua else 0) | (0 if may_trim else w.NBD_CMD_FLAG_NO_HOLE)
        await self._command(w.NBD_CMD_WRITE_ZEROES, offset, length, flags=flags)

    async def close(self) -> None:
        """Wait for in-flight commands, send NBD_CMD_DISC, close the socket."""
        if self._waiters:
            await asyncio.gather(*self._waiters.values(), return_exceptions=True)
        if self._transport is not None and self._closed is None and not self._transport.is_closing():
            with contextlib.suppress(ClientRequestError):
                self._transport.write(self.core.disconnect())
            self._transport.close()
        self._closed = self._closed or ConnectionError("closed")

    async def __aenter__(self) -> NbdClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
