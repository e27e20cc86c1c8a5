"""`pvio hypervisor --socket PATH`: the hypervisor as a daemon on a UNIX socket.

Theory of operation
-------------------
One asyncio loop, one listening SOCK_SEQPACKET socket, one `Session` per connection.
A readable connection is drained frame by frame; each frame runs to completion in the
core (hypercalls are short and never block), its reply is sent with its descriptors
(SCM_RIGHTS, then our duplicates are closed), and pushes the frame caused are sent to
their domains.  A connection that closes, or breaks, tears its domain down.

Hostile clients: a frame that does not parse gets an error reply; a frame larger than
MAX_FRAME arrives truncated and gets -E2BIG; descriptors a client sends are closed
unread; a client that does not read its replies fills only its own socket buffer (its
reply waits in its own outbox and its next request is not read until the reply is sent;
pushes to it queue there, and past MAX_OUTBOX the connection is dropped), so it slows no
one else.  Nothing a client sends can raise out of the loop: an unexpected exception in
one session is logged and that connection closed.

Descriptors: the daemon never runs itself out of them.  Its RLIMIT_NOFILE is cut into
parts (`pvio.hypervisor.accounts`): what domains make it hold is charged by the core,
and the duplicates in flight (sent with replies and pushes, then closed) are counted
here, so a reply that would pass their bound fails -ENFILE instead of taking the room
kept for connections.  A connection past the cap is answered (a FRAME_ERROR, -EBUSY) and
closed; an accept() that fails all the same backs off (`pvio.hypervisor.listener`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import resource
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import click

from pvio.hypervisor import wire
from pvio.hypervisor.accounts import HostLimits
from pvio.hypervisor.aio import FrameReceiver, run, send_frame
from pvio.hypervisor.census import census
from pvio.hypervisor.core import Hypervisor
from pvio.hypervisor.errors import HypercallError
from pvio.hypervisor.listener import Acceptor
from pvio.hypervisor.platform import OsPlatform, host_limits
from pvio.hypervisor.session import Session, push_frames
from pvio.hypervisor.wire import Op
from pvio.jsonfile import write_json
from pvio.trace import TRACE_DIR, follow

log = logging.getLogger("pvio.hypervisor.daemon")

#: Replies and pushes one connection may leave unread before it is dropped.
MAX_OUTBOX = 256


class _Conn:
    def __init__(self, sock: socket.socket, session: Session) -> None:
        self.sock = sock
        self.session = session
        self.outbox: list[tuple[bytes, list[int]]] = []
        self.closed = False
        #: not read while its outbox waits for room
        self.paused = False


class HypervisorServer:
    def __init__(self, path: str, limits: HostLimits | None = None) -> None:
        self.path = path
        self.platform = OsPlatform()
        self.limits = limits if limits is not None else host_limits()
        #: duplicates sent with replies and pushes, not yet closed
        self.in_flight = 0
        self.hv = Hypervisor(self.platform, self._dup, limits=self.limits, close_dup=self._close_dup)
        self._conns: dict[int, _Conn] = {}  # fileno -> connection
        self._listener: socket.socket | None = None
        self._acceptor: Acceptor | None = None
        self._receiver = FrameReceiver()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._refused = 0

    @property
    def release_hooks(self) -> list[Callable[[int], None]]:
        return self.hv.release_hooks

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.bind(self.path)
        os.chmod(self.path, 0o600)
        sock.listen(64)
        self._listener = sock
        self._acceptor = Acceptor(sock, self._accepted, log, "pvio hypervisor")
        self._acceptor.start()
        log.info("pvio hypervisor listening on %s", self.path)

    def _dup(self, fd: int) -> int:
        cap = self.limits.transient_fds
        if cap is not None and self.in_flight >= cap:
            raise HypercallError(-errno.ENFILE, f"{cap} descriptors already in flight to domains")
        new = os.dup(fd)
        self.in_flight += 1
        return new

    def _close_dup(self, fd: int) -> None:
        os.close(fd)
        self.in_flight -= 1

    def _accepted(self, sock: socket.socket) -> None:
        assert self._loop is not None
        if len(self._conns) >= self.limits.max_connections:
            # Answered, then closed: the client learns why instead of waiting.
            self._refused += 1
            if self._refused == 1 or self._refused % 1000 == 0:
                log.warning("%d connections served already; refused %d", len(self._conns), self._refused)
            err = Op(0, 0, 0, b"", rc=-errno.EBUSY)
            with contextlib.suppress(OSError):
                sock.send(wire.encode_frame(wire.FRAME_ERROR, 0, [err]), socket.MSG_DONTWAIT)
            sock.close()
            return
        sock.setblocking(False)
        conn = _Conn(sock, Session(self.hv))
        self._conns[sock.fileno()] = conn
        self._loop.add_reader(sock.fileno(), self._on_readable, conn)

    def _on_readable(self, conn: _Conn) -> None:
        # One frame per wake-up: add_reader is level-triggered, so a connection with more
        # frames is called again, after the others had their turn.
        if conn.closed:
            return
        try:
            data, fds, truncated = self._receiver.recv(conn.sock)
        except BlockingIOError:
            return
        except OSError:
            self._close(conn)
            return
        for fd in fds:  # clients never pass descriptors to the hypervisor
            os.close(fd)
        if not data and _at_eof(conn.sock):
            self._close(conn)
            return
        try:
            if truncated or not data:
                conn.session.bad_frames += 1
                seq = int.from_bytes(data[8:12], "little") if len(data) >= 12 else 0
                err = Op(0, 0, 0, b"", rc=-errno.E2BIG if truncated else -errno.EINVAL)
                reply, out_fds = wire.encode_frame(wire.FRAME_ERROR, seq, [err]), list[int]()
            else:
                reply, out_fds = conn.session.handle(data)
        except Exception:
            log.exception("d%s: internal error; closing the connection", conn.session.domid)
            self._close(conn)
            return
        self._send(conn, reply, out_fds)
        if self.hv.has_pushes():
            self._flush_pushes()

    def _send(self, conn: _Conn, data: bytes, fds: list[int]) -> None:
        if conn.closed:
            for fd in fds:
                self._close_dup(fd)
            return
        conn.outbox.append((data, fds))
        self._drain(conn)

    def _drain(self, conn: _Conn) -> None:
        assert self._loop is not None
        while conn.outbox and not conn.closed:
            data, fds = conn.outbox[0]
            try:
                send_frame(conn.sock, data, fds)
            except BlockingIOError:
                if len(conn.outbox) > MAX_OUTBOX:
                    log.warning("d%s does not read its replies; dropping it", conn.session.domid)
                    self._close(conn)
                    return
                if not conn.paused:
                    # Its next request waits until this reply is sent: a client that
                    # does not read holds one reply's descriptors, not a queue of them.
                    conn.paused = True
                    self._loop.remove_reader(conn.sock.fileno())
                    self._loop.add_writer(conn.sock.fileno(), self._writable, conn)
                return
            except OSError:
                self._close(conn)
                return
            conn.outbox.pop(0)
            for fd in fds:
                self._close_dup(fd)

    def _writable(self, conn: _Conn) -> None:
        assert self._loop is not None
        self._drain(conn)
        if not conn.closed and not conn.outbox:
            conn.paused = False
            self._loop.remove_writer(conn.sock.fileno())
            self._loop.add_reader(conn.sock.fileno(), self._on_readable, conn)

    def _flush_pushes(self) -> None:
        by_domid = {c.session.domid: c for c in self._conns.values() if c.session.domid is not None}
        for domid, (frame, fds) in push_frames(self.hv.take_pushes()).items():
            conn = by_domid.get(domid)
            if conn is None:
                for fd in fds:
                    self._close_dup(fd)
            else:
                self._send(conn, frame, fds)

    def _close(self, conn: _Conn) -> None:
        if conn.closed:
            return
        assert self._loop is not None
        conn.closed = True
        fileno = conn.sock.fileno()
        self._loop.remove_reader(fileno)
        self._loop.remove_writer(fileno)
        self._conns.pop(fileno, None)
        for _, fds in conn.outbox:
            for fd in fds:
                self._close_dup(fd)
        conn.outbox.clear()
        conn.sock.close()
        try:
            conn.session.close()
        except Exception:
            log.exception("teardown of d%s failed", conn.session.domid)
        self._flush_pushes()

    async def stop(self) -> None:
        for conn in list(self._conns.values()):
            self._close(conn)
        if self._acceptor is not None:
            self._acceptor.stop()
            self._acceptor = None
        if self._listener is not None and self._loop is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def is_empty(self) -> bool:
        return self.hv.is_empty()


def _at_eof(sock: socket.socket) -> bool:
    """After an empty read: the peer closed (True), or sent an empty message (False)."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


#: Seconds between rewrites of the status file (`--status`).
STATUS_INTERVAL = 1.0


async def report(server: HypervisorServer, path: str) -> None:
    """The census of every domain into `path`, now and every STATUS_INTERVAL seconds;
    tracing follows the session of the stack whose state directory holds `path`."""
    trace_dir = Path(path).resolve().parent.parent / TRACE_DIR
    while True:
        write_json(path, {"pid": os.getpid(), "time": time.time(), **census(server.hv)})
        follow(trace_dir, "hypervisor")
        await asyncio.sleep(STATUS_INTERVAL)


async def serve(path: str, ready: Callable[[], None] | None = None, *, max_memory: int | None = None,
                status: str | None = None) -> None:
    server = HypervisorServer(path, host_limits(max_memory))
    await server.start()
    reporter = asyncio.get_running_loop().create_task(report(server, status)) if status else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready()
    try:
        await stop.wait()
    finally:
        if reporter is not None:
            reporter.cancel()
        await server.stop()


@click.command("hypervisor")
@click.option("--socket", "path", required=True, type=click.Path(dir_okay=False), help="UNIX socket to serve.")
@click.option(
    "--max-memory",
    metavar="SIZE",
    default=None,
    help="Memory to promise to domains, in all (e.g. 16G; default: the host's MemAvailable at start).",
)
@click.option("--status", type=click.Path(dir_okay=False), default=None,
              help="Write what each domain holds (pages, grants, event channels) here every second, for pvio top.")
@click.option("-v", "--verbose", count=True, help="Log more (-v info, -vv debug).")
def hypervisor(path: str, max_memory: str | None, status: str | None, verbose: int) -> None:
    """Run pvio's hypervisor: domains, grant tables, event channels, lguest DMA."""
    limit = None if max_memory is None else _parse_size(max_memory)
    # Every port and every domain's memory is a descriptor: allow as many as we may (the
    # accounts are cut from the limit as it is after this).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s")
    run(serve(path, ready=lambda: print(f"pvio hypervisor: listening on {path}", flush=True), max_memory=limit,
              status=status))


_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*$", re.I)


def _parse_size(text: str) -> int:
    m = _SIZE.match(text)
    if not m or int(m.group(1)) == 0:
        raise click.BadParameter(f"{text!r} is not a size such as 4096M or 16G", param_hint="--max-memory")
    return int(m.group(1)) << (10 * " KMGT".index((m.group(2) or " ").upper()))
