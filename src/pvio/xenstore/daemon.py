"""`pvio xenstored`: the XenStore server core behind UNIX sockets, on asyncio.

Theory of operation
-------------------
The daemon is a thin adapter around `pvio.xenstore.server.XenStoreServer`: each accepted
connection becomes an `asyncio.Protocol` whose `data_received` feeds the core and whose
outputs (replies, watch events for any connection, closes) are written to the right
transports.  asyncio waits with epoll, so a thousand idle connections cost nothing to the
busy one; there is no per-connection task.

Identity.  Every connection on the main socket (`--socket`, mode 0600, the path
libxenstore finds in XENSTORED_PATH) is the privileged dom0, as in Xen.  A domain's
connection is established by the toolstack, not claimed by the client: the toolstack
(which may open the 0600 *control* socket, `--control`, default ``<socket>.control``)
first INTRODUCEs the domain over XenStore, then creates a socketpair and sends one end
over the control socket with SCM_RIGHTS and the line ``attach <domid>``; the daemon
adopts that end as a connection of that domain and answers ``ok`` (or ``error ENOENT``).
The toolstack hands the other end to the domain process.  `attach_domain` below does
the toolstack's half.  The core only ever sees (connection id, domid, bytes), so Xen's
real transport -- the byte rings of a granted page plus an event channel -- can be added
as another adapter.

Back-pressure.  What a connection can make the daemon hold is its unsent output, and
that is bounded for every connection, dom0's included (in `pvio up` the driver domain is
dom0: a stalled backend must not be a way for a guest to grow the daemon):

- replies: when a connection's unsent output passes `REPLY_BACKLOG`, the daemon stops
  reading its requests until it drains (XSA-326, XSA-416), so its replies are never
  dropped and a client that never reads holds at most that plus one request's output;
- watch events, which other connections' requests cause: an event for a connection
  already `EVENT_BACKLOG` bytes behind is dropped and counted, with one log line per
  episode.  When the connection has drained (the transport's low-water mark), each of its
  watches that lost events fires once on its own path (`watches.rescan_event`), which
  every client takes as "read again"; then events flow as before.  The writer is never
  slowed down by a watcher that does not read.

Rejected: stalling the writer until the watcher reads (oxenstored queues per watch and
then stops reading the writer; C xenstored keeps a domain's request outstanding until its
events are read), which lets a stuck dom0 client stop a guest or the toolstack; closing
the connection (a dom0 toolstack would lose its transactions and watches); dropping
silently (a backend would miss a frontend's state change and the device would hang).

Durability (`--db FILE`).  The store (tree, permissions, introduced domains) is written
as one JSON snapshot to ``FILE.tmp``, fsync'ed, renamed over FILE, and the directory
fsync'ed: a crash leaves either the old or the new snapshot, never a torn one.  With
``sync_interval=0`` (the default) the snapshot is written before the replies of the
request that changed the store are sent, so an acknowledged write survives a crash;
a positive interval coalesces snapshots (faster, may lose the last interval's writes).
Rejected: an append-only log (needs compaction and replay code for a store that is small).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import resource
import socket
from pathlib import Path
from typing import Any, cast

from pvio.hypervisor.client import Domain
from pvio.hypervisor.listener import Acceptor
from pvio.xenstore.daemon_ring import RingService, connect_as_domain
from pvio.xenstore.domains import XsDomain
from pvio.xenstore.errors import XsError
from pvio.xenstore.perms import Perm
from pvio.xenstore.quotas import Quotas
from pvio.xenstore.server import Close, Output, Send, XenStoreServer
from pvio.xenstore.store import Store
from pvio.xenstore.watches import Watch, rescan_event

log = logging.getLogger("pvio.xenstore.daemon")

#: A connection this many bytes behind loses its watch events (until it drains).  About
#: 10,000 events of typical size (16-byte header, path, token): a client that reads at
#: all never lags that far in the bursts pvio makes (tens of nodes for a device or a
#: domain), and it is below C xenstored's 2 MiB memory quota per domain, which holds a
#: domain's queued events with everything else it owns.
EVENT_BACKLOG = 1 << 20
#: Past this much unsent output the daemon stops reading a connection's requests (the
#: transport's high-water mark; it resumes below a quarter of it).
REPLY_BACKLOG = 256 << 10
DB_VERSION = 1
#: The key holding the daemon's own domid when it serves rings (Xen's, read by libxl).
XENSTORED_DOMID = "/tool/xenstored/domid"


def raise_nofile() -> None:
    """A server holds one fd per connection: lift the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def fresh_store() -> Store:
    """The tree a new daemon starts with: "/" and /tool/xenstored, as Xen's has."""
    store = Store()
    store.put("/tool", b"", (Perm("n", 0),))
    store.put("/tool/xenstored", b"", (Perm("n", 0),))
    return store


def save_db(path: Path, server: XenStoreServer) -> None:
    data: dict[str, Any] = {
        "version": DB_VERSION,
        "store": server.store.dump(),
        "domains": [[d.domid, d.target, d.gfn, d.evtchn] for d in server.domains.values()],
    }
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(json.dumps(data, separators=(",", ":")).encode())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def load_db(path: Path) -> tuple[Store, list[XsDomain]]:
    """The store and the introduced domains (domid, target, and the page and port of a
    domain served over its ring; a database written before rings has neither)."""
    data = json.loads(path.read_bytes())
    if data.get("version") != DB_VERSION:
        raise ValueError(f"{path}: unknown database version {data.get('version')!r}")
    domains = [XsDomain(int(d[0]), target=d[1], gfn=int(d[2]) if len(d) > 2 else 0,
                        evtchn=int(d[3]) if len(d) > 3 else 0) for d in data["domains"]]
    return Store.load(data["store"]), domains


class _Conn(asyncio.Protocol):
    def __init__(self, daemon: XenStoreDaemon, domid: int, *, ring: bool = False) -> None:
        self.daemon = daemon
        self.domid = domid
        self.ring = ring  # the domain's own ring (dom0's too), not a socket
        self.conn_id = 0
        self.transport: asyncio.Transport | None = None
        self.paused = False
        #: Watches whose events were dropped since the connection fell behind (in order).
        self.lost: dict[Watch, None] = {}
        self.events_dropped = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=REPLY_BACKLOG)
        try:
            self.conn_id = self.daemon.server.connect(self.domid, of_domain=self.ring or None)
        except XsError:
            transport.close()
            return
        self.daemon.transports[self.conn_id] = self

    def data_received(self, data: bytes) -> None:
        if self.conn_id:
            self.daemon.server.feed(self.conn_id, data)
            self._serve()

    def _serve(self) -> None:
        """Handle buffered requests while our replies are being taken; stop reading when
        they pile up (the peer does not read), go on when they drain."""
        t = self.transport
        server = self.daemon.server
        while t is not None and not t.is_closing():
            if t.get_write_buffer_size() > REPLY_BACKLOG:
                self.paused = True
                t.pause_reading()
                return
            outputs = server.step(self.conn_id)
            if outputs is None:
                return
            self.daemon.deliver(outputs)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.conn_id:
            self.daemon.transports.pop(self.conn_id, None)
            self.daemon.server.disconnect(self.conn_id)

    def pause_writing(self) -> None:
        if self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self._rescan()
        if self.paused:
            self.paused = False
            self.transport.resume_reading()
            self._serve()

    # A watcher that stops reading.  Watch events are caused by other connections'
    # requests, so no longer reading the watcher's own requests does not bound them.
    # Past EVENT_BACKLOG bytes of unsent output its events are dropped -- dom0's too: in
    # `pvio up` the driver domain is dom0, and a guest rewriting its own node under a
    # stalled backend's watch must not grow the daemon.  The writer is served as before.
    # The connection remembers which watches lost events; once it has drained, each of
    # them fires once on its own path, as on registration, and a XenStore client takes
    # any event as "read it again".
    def drop_event(self, watch: Watch) -> None:
        """`watch`'s event is not sent: we are EVENT_BACKLOG behind."""
        if not self.lost:
            log.warning(
                "connection %d (domain %d) stopped reading: its watch events are "
                "dropped past %d KiB queued, and each watch that lost some fires once on "
                "its own path when it catches up", self.conn_id, self.domid,
                EVENT_BACKLOG >> 10,
            )
        self.lost[watch] = None
        self.events_dropped += 1
        self.daemon.events_dropped += 1

    def _rescan(self) -> None:
        """Caught up: one event per watch that lost events, on the watch's own path."""
        if not self.lost or self.transport is None:
            return
        watches = self.daemon.server.watches
        for w in self.lost:
            packet = rescan_event(w, self.domid)
            if packet is not None and watches.registered(w):
                self.transport.write(packet)
        self.lost.clear()


class XenStoreDaemon:
    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        *,
        db: str | os.PathLike[str] | None = None,
        control_path: str | os.PathLike[str] | None = None,
        quotas: Quotas | None = None,
        sync_interval: float = 0.0,
        hypervisor: str | os.PathLike[str] | None = None,
        domid: int | None = None,
        ring_domain: Domain | None = None,
    ) -> None:
        self.socket_path = Path(socket_path)
        self.control_path = Path(control_path or f"{self.socket_path}.control")
        self.db = Path(db) if db is not None else None
        self.sync_interval = sync_interval
        store = fresh_store()
        domains: list[XsDomain] = []
        if self.db is not None and self.db.exists():
            store, domains = load_db(self.db)
        self.server = XenStoreServer(store, quotas)
        for d in domains:
            self.server.domains[d.domid] = d
        # The ring transport: xenstored as a domain of the hypervisor (daemon_ring).
        self.hypervisor = os.fspath(hypervisor) if hypervisor is not None else None
        self.domid = domid
        self.ring_domain = ring_domain
        self._own_ring_domain = False
        self.rings: RingService | None = None
        self.transports: dict[int, _Conn] = {}
        self.events_dropped = 0
        self._saved_mutations = self.server.mutations
        self._save_handle: asyncio.TimerHandle | None = None
        self._main: socket.socket | None = None
        self._main_acceptor: Acceptor | None = None
        self._control: socket.socket | None = None
        self._control_acceptor: Acceptor | None = None
        self._control_conns: set[socket.socket] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- life cycle ------------------------------------------------------------------

    async def start(self) -> None:
        for p in (self.socket_path, self.control_path):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        old = os.umask(0o177)
        try:
            main = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            main.bind(str(self.socket_path))
            ctl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            ctl.bind(str(self.control_path))
        finally:
            os.umask(old)
        main.listen(1024)
        self._main = main
        ctl.listen(16)
        self._control = ctl
        # The privileged socket's connections are dom0's; each runs as a protocol.
        self._main_acceptor = Acceptor(main, self._main_accepted, log, "xenstored socket")
        self._main_acceptor.start()
        # accept() failing for want of descriptors backs off and logs once.
        self._control_acceptor = Acceptor(ctl, self._control_accepted, log, "xenstored control socket")
        self._control_acceptor.start()
        await self._start_rings()

    async def _start_rings(self) -> None:
        """Become a domain of the hypervisor and serve domains over their pages."""
        if self.ring_domain is None and self.hypervisor is not None:
            self.ring_domain = await connect_as_domain(self.hypervisor, self.domid)
            self._own_ring_domain = True
        if self.ring_domain is None:
            return
        # Where a domain builder finds whom to grant the page to (libxl reads it too).
        self.server.store.put(XENSTORED_DOMID, str(self.ring_domain.domid).encode(), (Perm("n", 0),))
        self.rings = RingService(self, self.ring_domain)
        self.server.on_domain = self.rings.domain_changed
        self.rings.restore()

    def _main_accepted(self, sock: socket.socket) -> None:
        task = asyncio.get_running_loop().create_task(
            asyncio.get_running_loop().connect_accepted_socket(lambda: _Conn(self, 0), sock))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        if self._main_acceptor is not None:
            self._main_acceptor.stop()
            self._main_acceptor = None
        if self._main is not None:
            self._main.close()
            self._main = None
        if self._control_acceptor is not None:
            self._control_acceptor.stop()
            self._control_acceptor = None
        if self._control is not None:
            self._control.close()
            self._control = None
        for c in list(self._control_conns):
            self._control_drop(c)
        for conn in list(self.transports.values()):
            if conn.transport is not None:
                conn.transport.close()
        if self.rings is not None:
            self.server.on_domain = None
            await self.rings.close()
            self.rings = None
        if self.ring_domain is not None and self._own_ring_domain:
            await self.ring_domain.close()
            self.ring_domain = None
        await asyncio.sleep(0)
        self.flush()
        for p in (self.socket_path, self.control_path):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    # -- outputs ---------------------------------------------------------------------

    def deliver(self, outputs: list[Output]) -> None:
        if self.db is not None and self.server.mutations != self._saved_mutations:
            if self.sync_interval <= 0:
                self.flush()
            elif self._save_handle is None:
                self._save_handle = asyncio.get_running_loop().call_later(
                    self.sync_interval, self.flush
                )
        for out in outputs:
            conn = self.transports.get(out.conn_id)
            if conn is None or conn.transport is None:
                continue
            if isinstance(out, Send):
                t = conn.transport
                if out.watch is not None and (
                    conn.lost or t.get_write_buffer_size() > EVENT_BACKLOG
                ):
                    conn.drop_event(out.watch)  # a reader this far behind loses events
                    continue
                t.write(out.data)
            elif isinstance(out, Close):
                conn.transport.close()

    def statistics(self) -> dict[str, int]:
        """Watch events dropped since start for connections that stopped reading, and how
        many connections are behind now (their events are being dropped)."""
        return {
            "events_dropped": self.events_dropped,
            "connections_behind": sum(1 for c in self.transports.values() if c.lost),
            **(self.rings.statistics() if self.rings is not None else {}),
        }

    def flush(self) -> None:
        """Write the snapshot now if the store changed since the last one."""
        self._save_handle = None
        if self.db is None or self.server.mutations == self._saved_mutations:
            return
        save_db(self.db, self.server)
        self._saved_mutations = self.server.mutations

    # -- the control socket: the toolstack attaches domain connections ---------------

    def _control_accepted(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._control_conns.add(sock)
        asyncio.get_running_loop().add_reader(sock.fileno(), self._control_read, sock)

    def _control_drop(self, sock: socket.socket) -> None:
        self._control_conns.discard(sock)
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(sock.fileno())
        sock.close()

    def _control_read(self, sock: socket.socket) -> None:
        try:
            msg, fds, _, _ = socket.recv_fds(sock, 256, 4)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._control_drop(sock)
            return
        if not msg:
            for fd in fds:
                os.close(fd)
            self._control_drop(sock)
            return
        answer = self._control_command(msg, fds)
        with contextlib.suppress(OSError):
            sock.send(answer)

    def _control_command(self, msg: bytes, fds: list[int]) -> bytes:
        words = msg.split()
        if len(words) != 2 or words[0] != b"attach" or len(fds) != 1 or not words[1].isdigit():
            for fd in fds:
                os.close(fd)
            return b"error EINVAL\n"
        domid = int(words[1])
        if domid != 0 and domid not in self.server.domains:
            os.close(fds[0])
            return b"error ENOENT\n"
        try:
            sock = socket.socket(fileno=fds[0])
        except OSError:  # not a socket at all
            os.close(fds[0])
            return b"error EINVAL\n"
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            sock.close()
            return b"error EINVAL\n"
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        task = loop.create_task(
            loop.connect_accepted_socket(lambda: _Conn(self, domid), sock=sock)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return b"ok\n"


# T:480 Who is who: the toolstack attaches domains
# A plain connection to the main socket is dom0, as in Xen.  A domain never says who it
# is: the toolstack INTRODUCEs it, makes a socketpair and passes one end to the daemon
# over the 0600 control socket with SCM_RIGHTS ("attach 5"); the daemon adopts it as a
# connection of domain 5 and the toolstack gives the other end to the domain process.
# The core just sees connection ids with a domid, so a domain's own page is another
# transport under the same core (next stop).
# :T
def attach_domain(control_path: str | os.PathLike[str], domid: int, timeout: float = 5.0) -> socket.socket:
    """The toolstack's half of attaching a domain connection: a connected socket that
    xenstored treats as `domid` (which must be INTRODUCEd first).  Give it to the domain."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as ctl:
        ctl.settimeout(timeout)
        ctl.connect(os.fspath(control_path))
        socket.send_fds(ctl, [f"attach {domid}\n".encode()], [theirs.fileno()])
        answer = ctl.recv(64)
    theirs.close()
    if answer.strip() != b"ok":
        ours.close()
        errno = answer.split()[-1].decode() if answer.split() else "EIO"
        raise XsError(errno if errno.startswith("E") else "EIO", f"attach {domid}: {answer!r}")
    return ours


async def run(daemon: XenStoreDaemon, ready: asyncio.Event | None = None) -> None:
    """Serve until cancelled (the CLI cancels on SIGTERM/SIGINT)."""
    await daemon.start()
    if ready is not None:
        ready.set()
    try:
        await asyncio.Event().wait()
    finally:
        await daemon.close()
