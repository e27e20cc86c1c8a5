"""`NbdServer`: named exports on a UNIX socket (and optionally TCP, with TLS), asyncio.

Theory of operation
-------------------
One `asyncio.BufferedProtocol` per connection feeds received bytes to its sans-IO
`NbdServerConnection` and acts on the events (a large write's payload is read straight
into its own buffer, `payload_view`, not copied through a read buffer twice): each validated `Command` becomes a task that
awaits the export's `BlockBackend` and writes the reply the moment it completes, so a
connection has many requests in flight and replies leave in completion order (the cookie
pairs them up on the client's side).  Rejected requests were already answered by the
core.

Flow control is the core's, enforced while parsing: it hands out no command past
`max_in_flight` commands or `max_in_flight_bytes` of read and write data; and while the
transport has asked us to pause writing (the client is not reading its replies:
`pause_writing`, above the transport's high-water mark) it parses nothing.  Whenever the core says `reading_wanted` is False the socket stops being
read; it is read again once a command is answered or the transport drains.  Memory per
connection is therefore bounded by max_in_flight_bytes, plus the transport's high-water
mark, plus one received chunk and the request being assembled.

Connections are bounded three ways: `max_connections` per server (more are closed on
arrival), `max_connections_per_export` in transmission (NBD_OPT_GO is answered
NBD_REP_ERR_POLICY with a message), and time — `handshake_timeout` to choose an export —
so no client holds a slot for ever.  A client in transmission may sit idle as long as it
likes (a mounted file system through nbdfuse does, for hours) while nobody needs its slot;
when a new client finds the server or the export full, the connection idle longest, if
idle for at least `idle_timeout` seconds, is closed to let it in.

TLS (`listen_tcp(..., tls=context)`, see `pvio.nbd.tls`) is the protocol's FORCEDTLS
mode: the core refuses every option until NBD_OPT_STARTTLS, then this adapter upgrades
the same connection with `loop.start_tls` and haggling continues encrypted.

A client that disconnects mid-request disturbs nobody: its running commands finish (a
write half-done is worse than a write done), their replies are dropped, and no other
connection shares any state with it but the backend.  `close()` stops listening, answers
new options and requests with a shutdown error, waits (bounded) for in-flight commands,
then closes every connection and removes the socket file.

Alternatives rejected: asyncio streams (`readexactly` per field costs a coroutine switch
per header and makes the parser I/O-shaped); a thread per connection (does not pipeline
without a thread per request).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import socket
import ssl
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any, cast

from pvio.nbd import wire as w
from pvio.nbd.events import (
    Command,
    CommandRejected,
    Disconnect,
    Event,
    Export,
    ExportChosen,
    OptionRejected,
    StartTls,
)
from pvio.nbd.replies import JOIN_LIMIT, ReplyData, release_all, send_replies
from pvio.nbd.requests import nbd_error_for
from pvio.nbd.server import DEFAULT_MAX_IN_FLIGHT, DEFAULT_MAX_IN_FLIGHT_BYTES, NbdServerConnection
from pvio.storage.backend import BlockBackend, Submitting
from pvio.storage.buffers import BufferPool
from pvio.storage.lent import Lending, Lent
from pvio.trace import CURRENT_FLOW, TRACE

log = logging.getLogger("pvio.nbd")

# T:740 Many requests in flight, replies in any order
# The adapter is an `asyncio.BufferedProtocol`: received bytes go into the sans-IO core and each
# `Command` it returns becomes a task awaiting the export's backend.  A task writes its
# reply the moment it completes; replies therefore leave in completion order and the
# client pairs them up by cookie.  Replies completed in the same turn of the event loop
# are gathered and sent with one system call at the end of that turn (at queue depth 32
# that is one send for many replies instead of one each).  A
# connection that has `max_in_flight` commands running, or whose replies the client is
# not reading, stops being read until it drains: memory stays bounded whatever a client
# sends (the bounds themselves are the core's, T:735).  A backend exception becomes EIO (ENOSPC, EPERM where the errno says so) for that
# request only; a client that vanishes mid-request only loses its own replies.
# :T


#: Connections served at once; more are closed on arrival.
DEFAULT_MAX_CONNECTIONS = 128
#: Connections in transmission on one export; NBD_OPT_GO beyond it: NBD_REP_ERR_POLICY.
DEFAULT_MAX_CONNECTIONS_PER_EXPORT = 64
#: Seconds a connection may take to choose an export before it is closed.
DEFAULT_HANDSHAKE_TIMEOUT = 30.0
#: Seconds a connection in transmission may go without a command (and with none running)
#: before it is closed; None: never.
DEFAULT_IDLE_TIMEOUT = 300.0
#: The send buffer asked for on every connection (the kernel may grant less).
SOCKET_SEND_BUFFER = 4 << 20
#: Reads go into a buffer this large, unless a write's payload is due...
_READ_CHUNK = 256 << 10
#: ...with at least this much left to come: then straight into the payload's buffer.
_PAYLOAD_DIRECT = 64 << 10


class _Connection(asyncio.BufferedProtocol):
    def __init__(self, server: NbdServer, tls: ssl.SSLContext | None = None) -> None:
        self.loop = asyncio.get_running_loop()  # kept: each get_running_loop() is a getpid()
        self.server = server
        self.tls = tls
        self.core = NbdServerConnection(
            server.exports,
            server.default_export,
            max_in_flight=server.max_in_flight,
            max_in_flight_bytes=server.max_in_flight_bytes,
            tls_required=tls is not None,
            admit=self._admit,
            buffers=server.buffers,
        )
        self.backend: BlockBackend | None = None
        self.export_name: str | None = None  # the export whose slot this connection holds
        self.transport: asyncio.Transport | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        #: the backend's short way (`Submitting`), if it has one, and the commands it runs
        self.fast: Submitting | None = None
        #: ...and whether it lends reads (sent from its pages: not over TLS)
        self.lender: Lending | None = None
        self.fd: int | None = None  # the socket, for sending lent data in place
        self.fast_in_flight = 0
        self.fast_idle: asyncio.Future[None] | None = None  # shutdown waits on it
        self.feed_scheduled = False
        self.replies: list[ReplyData] = []
        self.flush_scheduled = False
        self.lost = False
        self.closing = False  # close once the in-flight commands are answered
        self.read_paused = False
        self.handshake_timer: asyncio.TimerHandle | None = None
        self.last_command = 0.0
        self.tls_task: asyncio.Task[None] | None = None
        self.tls_early = b""
        self.scratch = memoryview(bytearray(_READ_CHUNK))  # what `get_buffer` reads into
        self.into: memoryview | None = None  # or a write's payload, from `payload_view`

    # --- asyncio.BufferedProtocol ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # Room for whole large reads in the kernel: with the default (~200 KiB) a 1 MiB
            # reply goes out in pieces, each leaving a remainder the transport must copy
            # and shift in its own buffer.  The kernel caps this at net.core.wmem_max.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_SEND_BUFFER)
            self.fd = sock.fileno() if self.tls is None else None
        if len(self.server._connections) >= self.server.max_connections and not self.server.evict_idle(
                self.server._connections):
            # Refused before the greeting: memory per connection is bounded, so is their number.
            self.server.stats["refused_connections"] += 1
            log.warning("refusing a connection: %d already open", len(self.server._connections))
            self.transport.abort()
            self.lost = True
            return
        self.server._connections.add(self)
        self.server.stats["connections"] += 1
        self.handshake_timer = self.loop.call_later(self.server.handshake_timeout, self._handshake_expired)
        if self.server.closing:
            self.core.start_shutdown()
        self._send()

    def get_buffer(self, sizehint: int) -> memoryview:
        # A large write's payload is read straight into its own buffer (no copy through
        # the transport's bytes and the core's); everything else into `scratch`.
        view = self.core.payload_view() if self.tls_task is None or self.tls_task.done() else None
        if view is not None and len(view) >= _PAYLOAD_DIRECT:
            self.into = view
            return view
        self.into = None
        return self.scratch

    def buffer_updated(self, nbytes: int) -> None:
        if self.into is not None:
            self.into = None
            self.server.stats["payload_bytes_direct"] += nbytes
            if not (self.lost or self.transport is None):
                self._handle(self.core.payload_received(nbytes))
                self._send()
                self._flow()
            return
        data = self.scratch[:nbytes]
        if self.tls_task is not None and not self.tls_task.done():
            # TLS is up and the client has spoken over it, but `_start_tls` has not
            # resumed yet: keep these bytes for it (at most one read: it resumes first).
            self.tls_early += data
            return
        self._feed(data)

    def _feed(self, data: bytes | memoryview = b"") -> None:
        """Parse `data` and whatever the core holds buffered, up to its bounds."""
        if self.lost or self.transport is None:
            return
        self._handle(self.core.receive_data(data))
        self._send()
        self._flow()

    def _handle(self, events: list[Event]) -> None:
        commands = 0
        fast = self.fast if not TRACE.on else None
        for event in events:
            if isinstance(event, Command):
                commands += 1
                self.server.stats[event.name] += 1
                if fast is not None and self._submit(fast, event):
                    continue
                task = self.loop.create_task(self._run(event))
                self.tasks.add(task)
                task.add_done_callback(self._done)
            elif isinstance(event, CommandRejected):
                commands += 1
                self.server.stats["rejected"] += 1
                log.debug("rejected: %s", event.error)
            elif isinstance(event, OptionRejected):
                self.server.stats["rejected"] += 1
                log.debug("rejected: %s", event.error)
            elif isinstance(event, ExportChosen):
                self.backend = self.server.backends[event.export.name]
                self.fast = self.backend if isinstance(self.backend, Submitting) else None
                self.lender = self.backend if isinstance(self.backend, Lending) and self.fd is not None else None
                if self.handshake_timer is not None:
                    self.handshake_timer.cancel()
                commands += 1  # the idle clock starts now
                log.debug("connection chose export %r", event.export.name)
            elif isinstance(event, StartTls):
                self._send()  # the ACK, in plain text, before the TLS handshake
                self.tls_task = asyncio.get_running_loop().create_task(self._start_tls())
            elif isinstance(event, Disconnect):
                if event.error is not None:
                    self.server.stats["protocol_errors"] += 1
                    log.info("closing a connection: %s", event.reason)
                self._send()
                self.closing = True
                self._maybe_close()
        if commands:
            self.last_command = self.loop.time()

    def _admit(self, export: Export) -> str | None:
        """The core asks as a client enters `export`: take one of its slots, or refuse."""
        entered = self.server._entered
        limit = self.server.max_connections_per_export
        if entered[export.name] >= limit and not self.server.evict_idle(
                [c for c in self.server._connections if c.export_name == export.name]):
            self.server.stats["refused_export_full"] += 1
            log.info("refusing NBD_OPT_GO on %r: %d connections already in it", export.name, limit)
            return f"export {export.name!r} is serving {limit} connections, its limit; try again later"
        entered[export.name] += 1
        self.export_name = export.name
        return None

    def _handshake_expired(self) -> None:
        # A client that never finishes the handshake would hold a connection slot forever.
        if self.backend is None and self.transport is not None and not self.lost:
            self.server.stats["handshake_timeouts"] += 1
            log.info("closing a connection: no export chosen in %ss", self.server.handshake_timeout)
            self.transport.abort()

    def idle_for(self, now: float) -> float:
        """Seconds in transmission with no command sent and none running (0: busy, or
        still in the handshake, or gone)."""
        if (self.lost or self.transport is None or self.backend is None or self.tasks or self.fast_in_flight
                or self.closing):
            return 0.0
        return now - self.last_command

    async def _start_tls(self) -> None:
        raw, context = self.transport, self.tls
        assert raw is not None and context is not None
        loop = asyncio.get_running_loop()
        try:
            upgraded = await loop.start_tls(
                raw, self, context, server_side=True, ssl_handshake_timeout=self.server.handshake_timeout
            )
        except OSError as exc:  # ssl.SSLError, ConnectionError, TimeoutError
            # e.g. a client without a certificate the CA signed: nothing to say in plain text
            self.server.stats["tls_failures"] += 1
            log.info("closing a connection: TLS handshake failed: %s", exc or type(exc).__name__)
            raw.abort()
            self.connection_lost(None)
            return
        if upgraded is None or self.lost:
            raw.abort()
            self.connection_lost(None)
            return
        self.transport = upgraded
        self.read_paused = False  # the new transport reads
        self.core.tls_started()
        early, self.tls_early = self.tls_early, b""
        self._feed(early)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost_now()

    def _lost_now(self) -> None:
        """Give the connection's slots back (once; also when closed to make room)."""
        if self.handshake_timer is not None:
            self.handshake_timer.cancel()
        self.lost = True
        self.server._connections.discard(self)
        if self.export_name is not None:
            self.server._entered[self.export_name] -= 1
            self.export_name = None

    def pause_writing(self) -> None:
        # The client is not reading its replies: parse nothing until it does.
        self.core.output_blocked = True
        self._flow()

    def resume_writing(self) -> None:
        self.core.output_blocked = False
        self._feed()

    # --- commands ------------------------------------------------------------------------------

    async def _run(self, cmd: Command) -> None:
        backend = self.backend
        assert backend is not None
        data: ReplyData = b""
        error = 0
        t0 = time.monotonic_ns() if TRACE.on else 0
        if t0:  # the ring requests made for this command put their flows here (this task's own)
            flows: list[int] = []
            CURRENT_FLOW.set(flows)
        try:
            if cmd.type == w.NBD_CMD_READ:
                lender = self.lender if cmd.length >= JOIN_LIMIT else None
                data = await (lender.read_lent if lender else backend.read)(cmd.offset, cmd.length)
                if len(data) != cmd.length:
                    release_all([data])
                    raise OSError(errno.EIO, f"backend returned {len(data)} of {cmd.length} bytes")
            elif cmd.type == w.NBD_CMD_WRITE:
                await backend.write(cmd.offset, cmd.data, cmd.fua)
            elif cmd.type == w.NBD_CMD_FLUSH:
                await backend.flush()
            elif cmd.type == w.NBD_CMD_TRIM:
                await backend.trim(cmd.offset, cmd.length, cmd.fua)
            elif cmd.type == w.NBD_CMD_WRITE_ZEROES:
                may_trim = not cmd.flags & w.NBD_CMD_FLAG_NO_HOLE
                await backend.write_zeroes(cmd.offset, cmd.length, cmd.fua, may_trim)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the backend failed: the client gets an error, the server lives
            error = nbd_error_for(exc)
            self.server.stats["backend_errors"] += 1
            log.warning("%s at %d+%d failed: %r", cmd.name, cmd.offset, cmd.length, exc)
        self._queue_reply(self.core.reply(cmd, error, data))
        if TRACE.on and t0:  # the command's life here; its flows run on into blkfront
            TRACE.span(f"nbd {cmd.name}", "nbd", t0, args={"offset": cmd.offset, "length": cmd.length,
                                                             "error": error}, flow=flows, flow_phase="s")
            TRACE.instant("nbd reply", "nbd", flow=flows, flow_phase="f")

    # T:745 The short way: no task per command
    # A READ or WRITE (not FUA) goes straight to the backend's `submit_read` /
    # `submit_write` when it has them (blkfront does): the request is in the ring before
    # this turn of the loop ends, and its completion callback queues the reply, so a
    # batch of commands read in one turn leaves in one batch of replies, with no task
    # or coroutine per command.  A backend that cannot start it at once says so and the
    # command takes the task above.
    # :T
    def _submit(self, fast: Submitting, cmd: Command) -> bool:
        if cmd.type != w.NBD_CMD_READ and (cmd.type != w.NBD_CMD_WRITE or cmd.fua):
            return False
        done = functools.partial(self._fast_done, cmd)
        self.fast_in_flight += 1  # before: a backend may call `done` before it returns
        if cmd.type == w.NBD_CMD_READ and self.lender is not None and cmd.length >= JOIN_LIMIT:
            started = self.lender.submit_read_lent(cmd.offset, cmd.length, done)
        elif cmd.type == w.NBD_CMD_READ:
            started = fast.submit_read(cmd.offset, cmd.length, done)
        else:
            started = fast.submit_write(cmd.offset, cmd.data, done)
        if not started:
            self.fast_in_flight -= 1
        return started

    def _fast_done(self, cmd: Command, exc: BaseException | None, data: bytes | bytearray | Lent | None) -> None:
        self.fast_in_flight -= 1
        error = 0
        if exc is not None:
            error = nbd_error_for(exc)
            self.server.stats["backend_errors"] += 1
            log.warning("%s at %d+%d failed: %r", cmd.name, cmd.offset, cmd.length, exc)
        elif cmd.type == w.NBD_CMD_READ and (data is None or len(data) != cmd.length):
            error = w.NBD_EIO
            log.warning("%s at %d+%d: the backend returned %d bytes", cmd.name, cmd.offset, cmd.length,
                        len(data or b""))
            release_all([data] if isinstance(data, Lent) else [])
            data = b""
        self._queue_reply(self.core.reply(cmd, error, data if data is not None and not error else b""))
        if not self.fast_in_flight and self.fast_idle is not None and not self.fast_idle.done():
            self.fast_idle.set_result(None)
        if not self.feed_scheduled:  # once per turn: the core may hold commands that fit now
            self.feed_scheduled = True
            self.loop.call_soon(self._after_fast)

    def _after_fast(self) -> None:
        self.feed_scheduled = False
        if not self.closing:
            self._feed()
        self._maybe_close()

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("NBD command task failed", exc_info=task.exception())
        if not self.closing:
            self._feed()  # the core may hold requests that fit now
        self._maybe_close()

    # --- plumbing --------------------------------------------------------------------------------

    def _queue_reply(self, parts: list[ReplyData]) -> None:
        if self.lost or self.transport is None or self.transport.is_closing():
            release_all(parts)  # no one to send them to
            return
        self.replies.extend(parts)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush_replies)

    def _flush_replies(self) -> None:
        self.flush_scheduled = False
        replies, self.replies = self.replies, []
        if self.lost or self.transport is None or self.transport.is_closing():
            release_all(replies)
        elif replies:
            send_replies(self.transport, self.fd, replies, self.server.stats)

    def _send(self) -> None:
        out = self.core.data_to_send()
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out)

    def _flow(self) -> None:
        if self.transport is None or self.lost or self.transport.is_closing():
            return
        want_pause = not self.core.reading_wanted
        if want_pause and not self.read_paused:
            self.transport.pause_reading()
            self.read_paused = True
        elif not want_pause and self.read_paused:
            self.transport.resume_reading()
            self.read_paused = False

    def _maybe_close(self) -> None:
        if self.closing and not self.tasks and not self.fast_in_flight and self.transport is not None:
            self._flush_replies()
            self.transport.close()

    async def shutdown(self, timeout: float) -> None:
        self.core.start_shutdown()
        waits: set[asyncio.Future[Any]] = set(self.tasks)
        if self.fast_in_flight:
            self.fast_idle = asyncio.get_running_loop().create_future()
            waits.add(self.fast_idle)
        if waits:
            await asyncio.wait(waits, timeout=timeout)
        self._flush_replies()
        if self.transport is not None:
            self.transport.close()


class NbdServer:
    """Serve named `BlockBackend`s over NBD (see the module docstring).

    `exports` maps export names to backends; `default_export` (by default the first
    name) is what a client asking for the empty name "" gets, as `nbd+unix:///?socket=`
    URIs and fio do.
    """

    def __init__(
        self,
        exports: Mapping[str, BlockBackend],
        *,
        descriptions: Mapping[str, str] | None = None,
        default_export: str | None = None,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        max_in_flight_bytes: int = DEFAULT_MAX_IN_FLIGHT_BYTES,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_connections_per_export: int = DEFAULT_MAX_CONNECTIONS_PER_EXPORT,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
    ) -> None:
        if not exports:
            raise ValueError("an NBD server needs at least one export")
        self.backends = dict(exports)
        descriptions = descriptions or {}
        self.exports = {name: Export(name, b.info, descriptions.get(name, "")) for name, b in self.backends.items()}
        self.default_export = default_export if default_export is not None else next(iter(self.backends))
        if self.default_export not in self.backends:
            raise ValueError(f"default export {self.default_export!r} is not an export")
        self.max_in_flight = max_in_flight
        self.buffers = BufferPool()  # large WRITE payloads are received into these (every connection's)
        self.max_in_flight_bytes = max_in_flight_bytes
        self.max_connections = max_connections
        self.max_connections_per_export = max_connections_per_export
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.closing = False
        self.stats: Counter[str] = Counter()
        self._servers: list[asyncio.Server] = []
        self._unix_paths: list[str] = []
        self._connections: set[_Connection] = set()
        self._entered: Counter[str] = Counter()  # connections in transmission, per export

    async def listen_unix(self, path: str | os.PathLike[str]) -> str:
        """Listen on a UNIX socket (a stale socket file at `path` is replaced)."""
        path = os.fspath(path)
        with contextlib.suppress(FileNotFoundError):
            if os.path.exists(path) and not _is_socket(path):
                raise FileExistsError(f"{path} exists and is not a socket")
            os.unlink(path)
        loop = asyncio.get_running_loop()
        server = await loop.create_unix_server(lambda: _Connection(self), path)
        self._servers.append(server)
        self._unix_paths.append(path)
        return path

    async def listen_tcp(
        self, host: str = "127.0.0.1", port: int = 0, *, tls: ssl.SSLContext | None = None
    ) -> tuple[str, int]:
        """Listen on TCP, on localhost unless told otherwise; returns the bound address.

        With `tls` (`pvio.nbd.tls.server_context`) every client must upgrade with
        NBD_OPT_STARTTLS before anything else; without it, anyone who can reach the port
        can use the exports."""
        loop = asyncio.get_running_loop()
        # Any: `sockets` is a tuple to typeshed (which compiled code checks), a list from uvloop
        server: Any = await loop.create_server(lambda: _Connection(self, tls), host, port, reuse_address=True)
        self._servers.append(server)
        sockname: Any = server.sockets[0].getsockname()
        return str(sockname[0]), int(sockname[1])

    @property
    def connections(self) -> int:
        return len(self._connections)

    def evict_idle(self, candidates: Iterable[_Connection]) -> bool:
        """Make room: close the connection of `candidates` idle longest, if it has been
        idle `idle_timeout` seconds or more; whether one was closed."""
        if not self.idle_timeout:
            return False
        now = asyncio.get_running_loop().time()
        idle = max(candidates, key=lambda c: c.idle_for(now), default=None)
        if idle is None or idle.idle_for(now) < self.idle_timeout or idle.transport is None:
            return False
        self.stats["idle_timeouts"] += 1
        log.info("closing a connection idle for %.0f s to let another client in", idle.idle_for(now))
        idle.transport.abort()
        idle._lost_now()
        return True

    def connections_in(self, export: str) -> int:
        """Connections in transmission on `export` (what max_connections_per_export bounds)."""
        return self._entered[export]

    async def close(self, timeout: float = 5.0) -> None:
        """Stop listening, finish (bounded by `timeout`) in-flight commands, disconnect all."""
        self.closing = True
        for server in self._servers:
            server.close()
        conns = list(self._connections)
        if conns:
            await asyncio.gather(*(c.shutdown(timeout) for c in conns))
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), timeout)
        self._servers.clear()
        for path in self._unix_paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self._unix_paths.clear()

    async def __aenter__(self) -> NbdServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _is_socket(path: str) -> bool:
    import stat

    return stat.S_ISSOCK(os.lstat(path).st_mode)
