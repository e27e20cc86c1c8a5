"""XenStore clients for pvio itself: a sans-IO core, a blocking and an asyncio adapter.

Theory of operation
-------------------
`ClientProtocol` is the sans-IO half: it numbers requests (req_id counts up, so replies
can be matched even with several in flight, as pyxs does), frames them, and turns
received bytes into `XsReply` and `WatchEvent` values with the shared `FrameDecoder`.
`reply_payload` turns an XS_ERROR into an `XsError` (an unknown errno name is EINVAL,
as libxenstore maps it).

`Client` (blocking) sends one request and reads until its reply, queueing watch events
that arrive meanwhile for `wait_event`.  `AsyncClient` runs one reader task that resolves
a future per req_id and routes watch events to the `WatchStream` that owns the token;
streams are async iterators.  With `reconnect=True` the async client survives a daemon
restart: it reconnects with back-off and re-registers every live watch (each fires once
on registration, as Xen's watches do, so a consumer re-reads state after a reconnect).
A domain's connection is not opened by path but handed over by the toolstack: it
reconnects through a `connector` that asks the toolstack for a new one.  Requests in
flight outside a transaction are sent again once reconnected (each request's effect is
the same done twice); those in a transaction fail with `ConnectionResetError` (the
daemon's transaction is gone), and `transact` retries its whole function on that and
on EAGAIN.

What this deliberately does not do: follow libxenstore's one-request-at-a-time rule
(the daemon echoes req_id, so pipelining is safe), or hide a watch's immediate event.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import NamedTuple, Protocol, TypeVar

from pvio.abi.fault import Fault
from pvio.abi.xs_wire import XENSTORE_PAYLOAD_MAX, XSD_ERRORS, XSD_SOCKMSG, XsdSockmsgType
from pvio.xenstore.errors import XsError
from pvio.xenstore.wire import (
    HEADER_SIZE,
    NEED_DATA,
    FrameDecoder,
    Packet,
    join_args,
    split_args,
)

T = XsdSockmsgType
R = TypeVar("R")
_HEADER = XSD_SOCKMSG.packer

DEFAULT_PATH = "/var/run/xenstored/socket"


def default_path() -> str:
    """$XENSTORED_PATH, else $XENSTORED_RUNDIR/socket, else Xen's default (as xs_open)."""
    if p := os.environ.get("XENSTORED_PATH"):
        return p
    if d := os.environ.get("XENSTORED_RUNDIR"):
        return os.path.join(d, "socket")
    return DEFAULT_PATH


class WatchEvent(NamedTuple):
    path: str
    token: str


class XsReply(NamedTuple):
    packet: Packet


def reply_payload(pkt: Packet, expected: int) -> bytes:
    """The payload of a reply to a request of type `expected`, or the XsError it carries."""
    if pkt.type == T.XS_ERROR:
        name = pkt.payload.rstrip(b"\0").decode("ascii", "replace")
        raise XsError(name if name in XSD_ERRORS else "EINVAL", f"daemon answered {name}")
    if pkt.type != expected:
        raise XsError("EIO", f"reply type {pkt.type} to request {expected}", field="type")
    return pkt.payload


class ClientProtocol:
    """Frames requests and parses replies and watch events.  No I/O."""

    def __init__(self) -> None:
        self.decoder = FrameDecoder()
        self._ids = itertools.count(1)

    def request(self, type_: int, payload: bytes, tx_id: int = 0) -> tuple[int, bytes]:
        if len(payload) > XENSTORE_PAYLOAD_MAX:
            raise XsError("E2BIG", "request too large", field="payload", fault=Fault.LOCAL)
        req_id = next(self._ids) & 0xFFFFFFFF
        return req_id, _HEADER.pack(type_, req_id, tx_id, len(payload)) + payload

    def receive(self, data: bytes) -> list[XsReply | WatchEvent]:
        self.decoder.feed(data)
        out: list[XsReply | WatchEvent] = []
        while (pkt := self.decoder.next_packet()) is not NEED_DATA:
            assert isinstance(pkt, Packet)
            if pkt.type == T.XS_WATCH_EVENT:
                parts = split_args(pkt.payload)
                if len(parts) >= 2:
                    out.append(WatchEvent(parts[0].decode(), parts[1].decode()))
            else:
                out.append(XsReply(pkt))
        return out


def _b(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else value


def _perms_payload(path: str, perms: list[str]) -> bytes:
    return join_args(path, *perms)


def _list(payload: bytes) -> list[str]:
    return [p.decode() for p in split_args(payload)]


class Client:
    """Blocking XenStore client.  `Client()` connects to `default_path()`; pass `sock=`
    for a domain connection handed over by the toolstack."""

    def __init__(
        self, path: str | None = None, *, sock: socket.socket | None = None, timeout: float = 30
    ) -> None:
        if sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(path or default_path())
        else:
            sock.settimeout(timeout)
        self.sock = sock
        self.proto = ClientProtocol()
        self.events: deque[WatchEvent] = deque()
        self._replies: dict[int, Packet] = {}

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _pump(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionResetError("xenstored closed the connection")
        self._take(data)

    def _take(self, data: bytes) -> None:
        for item in self.proto.receive(data):
            if isinstance(item, WatchEvent):
                self.events.append(item)
            else:
                self._replies[item.packet.req_id] = item.packet

    def call(self, type_: int, payload: bytes, tx: int = 0) -> bytes:
        req_id, data = self.proto.request(type_, payload, tx)
        self.sock.sendall(data)
        if not self._replies and not self.proto.decoder.buffered:
            # Fast path: the reply usually arrives alone, in one piece.
            data = self.sock.recv(65536)
            if len(data) >= HEADER_SIZE:
                rtype, rid, _, length = _HEADER.unpack_from(data)
                if rid == req_id and rtype == type_ and len(data) == HEADER_SIZE + length:
                    return data[HEADER_SIZE:]
            if not data:
                raise ConnectionResetError("xenstored closed the connection")
            self._take(data)
        while req_id not in self._replies:
            self._pump()
        return reply_payload(self._replies.pop(req_id), type_)

    # -- operations ------------------------------------------------------------------

    def read(self, path: str, tx: int = 0) -> bytes:
        return self.call(T.XS_READ, join_args(path), tx)

    def write(self, path: str, value: str | bytes, tx: int = 0) -> None:
        self.call(T.XS_WRITE, _b(path) + b"\0" + _b(value), tx)

    def mkdir(self, path: str, tx: int = 0) -> None:
        self.call(T.XS_MKDIR, join_args(path), tx)

    def rm(self, path: str, tx: int = 0) -> None:
        self.call(T.XS_RM, join_args(path), tx)

    def directory(self, path: str, tx: int = 0) -> list[str]:
        return _list(self.call(T.XS_DIRECTORY, join_args(path), tx))

    def exists(self, path: str, tx: int = 0) -> bool:
        try:
            self.read(path, tx)
        except XsError as e:
            if e.errno == "ENOENT":
                return False
            raise
        return True

    def get_perms(self, path: str, tx: int = 0) -> list[str]:
        return _list(self.call(T.XS_GET_PERMS, join_args(path), tx))

    def set_perms(self, path: str, perms: list[str], tx: int = 0) -> None:
        self.call(T.XS_SET_PERMS, _perms_payload(path, perms), tx)

    def watch(self, path: str, token: str) -> None:
        self.call(T.XS_WATCH, join_args(path, token))

    def unwatch(self, path: str, token: str) -> None:
        self.call(T.XS_UNWATCH, join_args(path, token))

    def wait_event(self, timeout: float | None = None) -> WatchEvent:
        old = self.sock.gettimeout()
        self.sock.settimeout(timeout)
        try:
            while not self.events:
                self._pump()
        finally:
            self.sock.settimeout(old)
        return self.events.popleft()

    def transaction_start(self) -> int:
        return int(self.call(T.XS_TRANSACTION_START, b"\0").rstrip(b"\0"))

    def transaction_end(self, tx: int, commit: bool = True) -> None:
        self.call(T.XS_TRANSACTION_END, b"T\0" if commit else b"F\0", tx)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[int]:
        """`with client.transaction() as tx:` commits at the end (EAGAIN propagates),
        aborts on an exception.  Use `transact` to retry on EAGAIN."""
        tx = self.transaction_start()
        try:
            yield tx
        except BaseException:
            with contextlib.suppress(XsError, OSError):
                self.transaction_end(tx, False)
            raise
        self.transaction_end(tx, True)

    def transact(self, fn: Callable[[int], R], retries: int = 100) -> R:
        """Run `fn(tx)` in a transaction, again from the start while the commit is EAGAIN."""
        for _ in range(retries):
            tx = self.transaction_start()
            try:
                result = fn(tx)
            except BaseException:
                with contextlib.suppress(XsError, OSError):
                    self.transaction_end(tx, False)
                raise
            try:
                self.transaction_end(tx, True)
                return result
            except XsError as e:
                if e.errno != "EAGAIN":
                    raise
        raise XsError("EAGAIN", f"still conflicting after {retries} tries", fault=Fault.LOCAL)

    def get_domain_path(self, domid: int) -> str:
        return self.call(T.XS_GET_DOMAIN_PATH, join_args(str(domid))).rstrip(b"\0").decode()

    def introduce(self, domid: int, gfn: int = 0, evtchn: int = 1) -> None:
        self.call(T.XS_INTRODUCE, join_args(str(domid), str(gfn), str(evtchn)))

    def release(self, domid: int) -> None:
        self.call(T.XS_RELEASE, join_args(str(domid)))

    def is_domain_introduced(self, domid: int) -> bool:
        return self.call(T.XS_IS_DOMAIN_INTRODUCED, join_args(str(domid))) == b"T\0"

    def set_target(self, domid: int, target: int) -> None:
        self.call(T.XS_SET_TARGET, join_args(str(domid), str(target)))

    def reset_watches(self) -> None:
        self.call(T.XS_RESET_WATCHES, b"\0")

    def control(self, *args: str) -> bytes:
        return self.call(T.XS_CONTROL, join_args(*args))


# -- asyncio ---------------------------------------------------------------------------


class WatchStream:
    """The events of one watch, as an async iterator.  `async with` unregisters it."""

    def __init__(self, client: AsyncClient, path: str, token: str) -> None:
        self.client = client
        self.path = path
        self.token = token
        self.queue: asyncio.Queue[WatchEvent] = asyncio.Queue()

    def __aiter__(self) -> AsyncIterator[WatchEvent]:
        return self

    async def __anext__(self) -> WatchEvent:
        return await self.queue.get()

    async def get(self, timeout: float | None = None) -> WatchEvent:
        return await asyncio.wait_for(self.queue.get(), timeout)

    def drain(self) -> list[WatchEvent]:
        out = []
        while not self.queue.empty():
            out.append(self.queue.get_nowait())
        return out

    async def close(self) -> None:
        await self.client.unwatch_stream(self)

    async def __aenter__(self) -> WatchStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class ByteStream(Protocol):
    """What AsyncClient reads from and writes to besides a socket (a XenStore ring)."""

    async def read(self, n: int = -1) -> bytes: ...
    def write(self, data: bytes) -> None: ...
    def close(self) -> None: ...


#: What gives a reconnecting client a new connection: a socket (the toolstack hands
#: domains theirs) or a byte stream (a ring after its reconnection handshake).
Connector = Callable[[], Awaitable[socket.socket | ByteStream]]


class _Request(NamedTuple):
    type: int
    payload: bytes
    tx: int
    future: asyncio.Future[Packet]


# T:490 The client side
# pvio's own components use `AsyncClient`: requests are pipelined and matched by req_id,
# watch events are routed by token to a `WatchStream` (an async iterator), `transact`
# re-runs a function while its commit is EAGAIN, and with reconnect=True a restart of
# the daemon is survived: the client reconnects and re-registers its watches, each of
# which fires once, telling the consumer to re-read what it watches.
# :T
class AsyncClient:
    """asyncio XenStore client with pipelined requests, watch streams and reconnection.

    Use `await AsyncClient.open(path)` (dom0) or `await AsyncClient.open(sock=s)` for a
    domain connection; `reconnect=True` survives daemon restarts (by path, or through
    `connector` for a connection handed over by the toolstack).
    """

    def __init__(self, path: str | None, sock: socket.socket | None, reconnect: bool,
                 connector: Connector | None = None) -> None:
        self.path = path
        self._sock = sock
        self.connector = connector
        self.reconnect = reconnect and (path is not None or connector is not None)
        self.proto = ClientProtocol()
        self._pending: dict[int, _Request] = {}
        self._held: list[_Request] = []  # outside a transaction: sent again on reconnect
        self._streams: dict[str, WatchStream] = {}
        self._tokens = itertools.count(1)
        self._reader: asyncio.StreamReader | ByteStream
        self._writer: asyncio.StreamWriter | ByteStream | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._closed = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.reconnects = 0

    @classmethod
    async def open(
        cls, path: str | None = None, *, sock: socket.socket | None = None, reconnect: bool = False,
        connector: Connector | None = None,
    ) -> AsyncClient:
        self = cls(path or (None if sock or connector else default_path()), sock, reconnect, connector)
        await self._connect()
        self._reader_task = asyncio.create_task(self._read_loop())
        return self

    async def _connect(self) -> None:
        if self._sock is None and self.connector is not None:
            got = await self.connector()
            if not isinstance(got, socket.socket):
                self._reader, self._writer = got, got
                self.proto = ClientProtocol()
                return self._connected.set()
            self._sock = got
        if self._sock is not None:
            reader, writer = await asyncio.open_unix_connection(sock=self._sock)
            self._sock = None
        else:
            assert self.path is not None
            reader, writer = await asyncio.open_unix_connection(self.path)
        self._reader = reader
        self._writer = writer
        self.proto = ClientProtocol()
        self._connected.set()

    async def _read_loop(self) -> None:
        while True:
            try:
                data = await self._reader.read(65536)
            except (ConnectionError, OSError):
                data = b""
            if data:
                try:
                    items = self.proto.receive(data)
                except Exception:
                    items, data = [], b""
                for item in items:
                    self._dispatch(item)
                if data:
                    continue
            self._lost()
            if self._closed or not self.reconnect:
                return
            await self._reconnect()

    def _dispatch(self, item: XsReply | WatchEvent) -> None:
        if isinstance(item, WatchEvent):
            stream = self._streams.get(item.token)
            if stream is not None:
                stream.queue.put_nowait(item)
            return
        entry = self._pending.pop(item.packet.req_id, None)
        if entry is not None and not entry.future.done():
            entry.future.set_result(item.packet)

    def _lost(self) -> None:
        self._connected.clear()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        pending, self._pending = self._pending, {}
        for request in pending.values():
            if request.future.done():
                continue
            if self.reconnect and not self._closed and request.tx == 0:
                self._held.append(request)
            else:
                request.future.set_exception(ConnectionResetError("xenstored connection lost"))

    async def _reconnect(self) -> None:
        delay = 0.01
        while not self._closed:
            try:
                await self._connect()
                break
            except OSError:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
        self.reconnects += 1
        held, self._held = self._held, []
        for request in held:
            if not request.future.done():
                self._send(request)
        for stream in list(self._streams.values()):
            # Re-register; the daemon fires each once, telling the consumer to re-read.
            task = asyncio.get_running_loop().create_task(self._rewatch(stream))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _rewatch(self, stream: WatchStream) -> None:
        with contextlib.suppress(XsError, ConnectionError):
            await self.call(T.XS_WATCH, join_args(stream.path, stream.token))

    async def close(self) -> None:
        self._closed = True
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
        self._lost()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def call(self, type_: int, payload: bytes, tx: int = 0) -> bytes:
        if self._writer is None:
            if not self.reconnect or self._closed:
                raise ConnectionResetError("not connected to xenstored")
            await self._connected.wait()
        fut: asyncio.Future[Packet] = asyncio.get_running_loop().create_future()
        self._send(_Request(type_, payload, tx, fut))
        return reply_payload(await fut, type_)

    def _send(self, request: _Request) -> None:
        assert self._writer is not None
        req_id, data = self.proto.request(request.type, request.payload, request.tx)
        self._pending[req_id] = request
        self._writer.write(data)

    # -- operations ------------------------------------------------------------------

    async def read(self, path: str, tx: int = 0) -> bytes:
        return await self.call(T.XS_READ, join_args(path), tx)

    async def read_or(self, path: str, default: bytes | None = None, tx: int = 0) -> bytes | None:
        try:
            return await self.read(path, tx)
        except XsError as e:
            if e.errno == "ENOENT":
                return default
            raise

    async def write(self, path: str, value: str | bytes, tx: int = 0) -> None:
        await self.call(T.XS_WRITE, _b(path) + b"\0" + _b(value), tx)

    async def mkdir(self, path: str, tx: int = 0) -> None:
        await self.call(T.XS_MKDIR, join_args(path), tx)

    async def rm(self, path: str, tx: int = 0) -> None:
        await self.call(T.XS_RM, join_args(path), tx)

    async def directory(self, path: str, tx: int = 0) -> list[str]:
        return _list(await self.call(T.XS_DIRECTORY, join_args(path), tx))

    async def get_perms(self, path: str, tx: int = 0) -> list[str]:
        return _list(await self.call(T.XS_GET_PERMS, join_args(path), tx))

    async def set_perms(self, path: str, perms: list[str], tx: int = 0) -> None:
        await self.call(T.XS_SET_PERMS, _perms_payload(path, perms), tx)

    async def get_domain_path(self, domid: int) -> str:
        raw = await self.call(T.XS_GET_DOMAIN_PATH, join_args(str(domid)))
        return raw.rstrip(b"\0").decode()

    async def introduce(self, domid: int, gfn: int = 0, evtchn: int = 1) -> None:
        await self.call(T.XS_INTRODUCE, join_args(str(domid), str(gfn), str(evtchn)))

    async def release(self, domid: int) -> None:
        await self.call(T.XS_RELEASE, join_args(str(domid)))

    async def watch(self, path: str, token: str | None = None) -> WatchStream:
        """Register a watch; its events (the first fires at once) come from the stream."""
        token = token or f"pvio-{id(self):x}-{next(self._tokens)}"
        stream = WatchStream(self, path, token)
        self._streams[token] = stream
        try:
            await self.call(T.XS_WATCH, join_args(path, token))
        except BaseException:
            del self._streams[token]
            raise
        return stream

    async def unwatch_stream(self, stream: WatchStream) -> None:
        if self._streams.pop(stream.token, None) is not None:
            with contextlib.suppress(XsError, ConnectionError):
                await self.call(T.XS_UNWATCH, join_args(stream.path, stream.token))

    async def transaction_start(self) -> int:
        return int((await self.call(T.XS_TRANSACTION_START, b"\0")).rstrip(b"\0"))

    async def transaction_end(self, tx: int, commit: bool = True) -> None:
        await self.call(T.XS_TRANSACTION_END, b"T\0" if commit else b"F\0", tx)

    async def transact(
        self, fn: Callable[[int], Awaitable[R]], retries: int = 100
    ) -> R:
        """Run `await fn(tx)` in a transaction; start over on EAGAIN or a lost connection."""
        last: Exception | None = None
        for _ in range(retries):
            try:
                tx = await self.transaction_start()
            except ConnectionResetError as e:
                last = e
                continue
            try:
                result = await fn(tx)
            except ConnectionResetError as e:
                last = e
                continue
            except BaseException:
                with contextlib.suppress(XsError, ConnectionError):
                    await self.transaction_end(tx, False)
                raise
            try:
                await self.transaction_end(tx, True)
                return result
            except XsError as e:
                if e.errno != "EAGAIN":
                    raise
                last = e
            except ConnectionResetError as e:
                last = e
        raise XsError("EAGAIN", f"gave up after {retries} tries: {last}", fault=Fault.LOCAL)
