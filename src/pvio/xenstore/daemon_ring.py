"""xenstored's ring transport: each introduced domain served over its shared page.

Theory of operation
-------------------
With a hypervisor (``pvio xenstored --hypervisor SOCKET --domid N``) the daemon is a
domain itself, as Xen's xenstore stub domain is: its domid is fixed by the toolstack
(`XENSTORE_DOMID` in `pvio up`) and written to ``/tool/xenstored/domid``, where a domain
builder looks for whom to grant the page to (libxl reads the same key).  A domain grants
its XenStore page at grant reference 1 (GNTTAB_RESERVED_XENSTORE) to that domid and
allocates an event channel port unbound for it; the toolstack INTRODUCEs the domain
with the page's frame and the port, as libxl does.  The daemon then maps grant 1 of the
domain -- as Xen 4.17's C xenstored does, mapping by grant rather than by frame -- binds
the port, and serves the domain there.  Why a domain of the hypervisor rather than
being handed the page by the toolstack: mapping a grant and binding a port are the
hypervisor's checks of who may reach whose memory; a toolstack passing page fds around
would bypass them, and a restarted daemon could not get the pages back by itself.

Each ring is an asyncio-transport look-alike (`RingTransport`) under the same protocol
object as a socket connection (`pvio.xenstore.daemon._Conn`), so replies, watch events,
back-pressure and the event backlog are exactly the socket's: replies wait in a bounded
buffer while the reply ring is full (past REPLY_BACKLOG the requests are no longer
read), watch events past EVENT_BACKLOG are dropped and the watches fire again once the
guest catches up.  Requests are read only when the port fires, at most a ring's worth
per event, so a flooding guest is served like any other.

A guest that breaks the ring -- impossible indices (XENSTORE_ERROR_RINGIDX), a packet
longer than XENSTORE_PAYLOAD_MAX (XENSTORE_ERROR_PROTO) -- loses its connection: the
error goes into the page's `error` word and the ring is not read again until the guest
asks for a reconnection (`connection` = XENSTORE_RECONNECT), which gives it a new,
empty connection.  RELEASE, a new INTRODUCE with another page or port, and the death
of the domain (the hypervisor's domain_dead push, to every domain that maps its grants)
end the connection and give back the mapping and the port.

Restart.  A daemon restarted from its database maps every domain's page again; it does
not know where in a packet the old daemon stopped, so it reports XENSTORE_ERROR_COMM and
waits for the guest's reconnection.  pvio's ring client (`pvio.xenstore.client_ring`)
answers that by reconnecting, registering its watches again and sending its requests
that were outside a transaction again -- what it does over a socket after a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from pvio.abi.grant_table import GNTTAB_RESERVED_XENSTORE
from pvio.abi.xs_wire import XENSTORE_ERROR_COMM, XENSTORE_ERROR_PROTO, XENSTORE_ERROR_RINGIDX
from pvio.hypervisor.client import Domain, GrantMapping
from pvio.ring.errors import RingBroken
from pvio.xenstore.ring import ServerEnd

if TYPE_CHECKING:
    from pvio.xenstore.daemon import XenStoreDaemon, _Conn

log = logging.getLogger("pvio.xenstore.ring")

#: The daemon reads at most this much of a ring per event (the ring's size).
READ_CHUNK = 1024


# T:485 A domain's own page
# Xen guests do not get sockets: each finds XenStore through a page granted at grant
# reference 1 and an event channel, both named by the toolstack's INTRODUCE.  With a
# hypervisor the daemon is a domain too (Xen's xenstore stub domain): it maps grant 1 of
# the domain, binds the port, and puts the page under the same protocol object as a
# socket, so replies, watch events and every bound behave alike.  Requests are read only
# when the port fires, a ring's worth at a time; a guest that lies in its indices, or
# sends a packet over 4096 bytes, finds the reason in the page's `error` word and is
# served again only after it asks for a reconnection -- and so is every guest after the
# daemon restarts, which is how their clients learn to register their watches again.
# :T
class RingTransport:
    """One domain's page and port, looking like an asyncio transport to `_Conn`."""

    def __init__(self, dom: Domain, domid: int, end: ServerEnd, port: int) -> None:
        self.dom = dom
        self.domid = domid
        self.end = end
        self.port = port
        self.protocol: _Conn | None = None
        self.make_protocol: Callable[[], _Conn] | None = None
        self._out = bytearray()
        self._high = 64 << 10
        self._low = self._high // 4
        self._reading = True
        self._writing_paused = False
        self._closing = False
        self.ended = False  # unmapped, or about to be: nothing more is done

    # -- what _Conn calls ----------------------------------------------------------

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high = high if high is not None else self._high
        self._low = low if low is not None else self._high // 4

    def get_write_buffer_size(self) -> int:
        return len(self._out)

    def write(self, data: bytes) -> None:
        if self._closing or self.ended:
            return
        self._out += data
        self._flush()
        if not self._writing_paused and len(self._out) > self._high and self.protocol is not None:
            self._writing_paused = True
            self.protocol.pause_writing()

    def pause_reading(self) -> None:
        self._reading = False

    def resume_reading(self) -> None:
        if not self._reading:
            self._reading = True
            asyncio.get_running_loop().call_soon(self.kick)

    def is_closing(self) -> bool:
        return self._closing or self.ended

    def close(self) -> None:
        """The server closes the connection: a protocol violation (or the end)."""
        self._stop(XENSTORE_ERROR_PROTO)

    # -- the ring ------------------------------------------------------------------

    def start(self, make_protocol: Callable[[], _Conn], *, restored: bool) -> None:
        self.make_protocol = make_protocol
        self.dom.set_handler(self.port, lambda _port: self.kick())
        if restored and not self.end.reconnect_requested():
            # We do not know where the old daemon stopped: the guest must reconnect.
            self.end.stop(XENSTORE_ERROR_COMM)
            self._closing = True
            self._notify()
            return
        self._new_protocol()
        self.kick()

    def _new_protocol(self) -> None:
        assert self.make_protocol is not None
        self._out.clear()
        self._closing = False
        self._reading = True
        self._writing_paused = False
        self.protocol = self.make_protocol()
        self.protocol.connection_made(self)  # type: ignore[arg-type]

    def kick(self) -> None:
        """The port fired (or reading resumed): reconnect, take space and requests."""
        if self.ended:
            return
        end = self.end
        if end.reconnect_requested():
            self._reconnect()
            return
        if end.stopped or self._closing:
            return
        try:
            self._flush()
            if self._reading and self.protocol is not None:
                data = end.receive(READ_CHUNK)
                if data:
                    if len(data) >= end.rings.rx.size:
                        # It was full: the guest may wait for room (as Linux's xenbus,
                        # we kick for that only then; a reply kicks it anyway).
                        self._notify()
                    self.protocol.data_received(data)
        except RingBroken as e:
            log.warning("domain %d broke its XenStore ring: %s", self.domid, e)
            self._stop(e.wire_error or XENSTORE_ERROR_RINGIDX)

    def _flush(self) -> None:
        if not self._out or self.end.stopped:
            return
        n = self.end.send(self._out)
        if n:
            del self._out[:n]
            self._notify()
            if self._writing_paused and len(self._out) <= self._low and self.protocol is not None:
                self._writing_paused = False
                self.protocol.resume_writing()

    def _notify(self) -> None:
        with contextlib.suppress(Exception):  # the port is gone: the domain is dying
            self.dom.notify(self.port)

    def _stop(self, error: int) -> None:
        """Stop serving: `error` in the page, the connection (watches, transactions) gone."""
        if self._closing or self.ended:
            return
        self._closing = True
        if not self.end.stopped:
            self.end.stop(error)
        self._out.clear()
        self._lose_protocol()
        self._notify()

    def _lose_protocol(self) -> None:
        protocol, self.protocol = self.protocol, None
        if protocol is not None:
            protocol.connection_lost(None)

    def _reconnect(self) -> None:
        """xenstore-ring.txt: drop partial packets, in-flight requests, watches and
        transactions; empty both rings; `connection` back to 0; kick the guest."""
        self._lose_protocol()
        self.end.reconnected()
        self._new_protocol()
        self._notify()

    def end_connection(self) -> None:
        """No more serving (RELEASE, death, a new page): the protocol is dropped."""
        self.ended = True
        self._closing = True
        self._out.clear()
        self._lose_protocol()


class RingService:
    """The daemon's rings: maps, binds and serves each introduced domain's page."""

    def __init__(self, daemon: XenStoreDaemon, dom: Domain) -> None:
        self.daemon = daemon
        self.dom = dom
        self.rings: dict[int, tuple[RingTransport, GrantMapping, tuple[int, int]]] = {}
        self._locks: dict[int, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.attach_failures = 0
        dom.on_domain_dead = self.domain_dead

    def restore(self) -> None:
        """After a restart: map every known domain's page again (see the module notes)."""
        for domid in list(self.daemon.server.domains):
            self._schedule(domid, restored=True)

    def domain_changed(self, domid: int) -> None:
        """INTRODUCE or RELEASE changed `domid` (the server's `on_domain` hook)."""
        ring = self.rings.get(domid)
        dom = self.daemon.server.domains.get(domid)
        if ring is not None and (dom is None or (dom.gfn, dom.evtchn) != ring[2]):
            ring[0].end_connection()  # before the server closes the connection itself
        self._schedule(domid, restored=False)

    def domain_dead(self, domid: int) -> None:
        """The hypervisor says `domid` died: its connection ends, its page is unmapped
        (so the dead domain can go); its XenStore record waits for RELEASE."""
        ring = self.rings.get(domid)
        if ring is not None:
            ring[0].end_connection()
            self._schedule(domid, restored=False, dead=True)

    def _schedule(self, domid: int, *, restored: bool, dead: bool = False) -> None:
        task = asyncio.get_running_loop().create_task(self._sync(domid, restored, dead))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _sync(self, domid: int, restored: bool, dead: bool) -> None:
        """Make the ring of `domid` match what the server knows (one at a time per domain)."""
        lock = self._locks.setdefault(domid, asyncio.Lock())
        async with lock:
            dom = self.daemon.server.domains.get(domid)
            want = None if dom is None or dom.gfn == 0 or dead else (dom.gfn, dom.evtchn)
            ring = self.rings.get(domid)
            if ring is not None and (ring[2] != want or ring[0].ended):
                await self._detach(domid)
                ring = None
            if ring is None and want is not None:
                await self._attach(domid, want, restored)

    async def _attach(self, domid: int, want: tuple[int, int], restored: bool) -> None:
        gfn, evtchn = want
        mapping: GrantMapping | None = None
        try:
            (mapping,) = await self.dom.map_grants(domid, [GNTTAB_RESERVED_XENSTORE])
            if mapping.view is None:
                raise OSError("no view of the page")
            if mapping.frame != gfn:
                log.info("domain %d: introduced frame %#x, grant %d maps %#x", domid, gfn,
                         GNTTAB_RESERVED_XENSTORE, mapping.frame)
            port = await self.dom.bind_interdomain(domid, evtchn)
        except Exception as e:
            self.attach_failures += 1
            log.warning("domain %d: cannot reach its XenStore page (grant %d) and port %d: %s",
                        domid, GNTTAB_RESERVED_XENSTORE, evtchn, e)
            if mapping is not None:
                with contextlib.suppress(Exception):
                    await self.dom.unmap_grants([mapping])
            return
        transport = RingTransport(self.dom, domid, ServerEnd(mapping.view), port)
        self.rings[domid] = (transport, mapping, want)
        log.info("domain %d: serving its ring (frame %#x, port %d%s)", domid, gfn, port,
                 ", after a restart" if restored else "")
        from pvio.xenstore.daemon import _Conn

        transport.start(lambda: _Conn(self.daemon, domid, ring=True), restored=restored)

    async def _detach(self, domid: int) -> None:
        transport, mapping, _ = self.rings.pop(domid)
        log.info("domain %d: its ring is no longer served", domid)
        transport.end_connection()
        with contextlib.suppress(Exception):
            self.dom.set_handler(transport.port, None)
            await self.dom.close_port(transport.port)
        with contextlib.suppress(Exception):
            await self.dom.unmap_grants([mapping])

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for domid in list(self.rings):
            await self._detach(domid)

    def statistics(self) -> dict[str, int]:
        return {
            "rings": len(self.rings),
            "rings_stopped": sum(1 for t, _, _ in self.rings.values() if t.end.stopped),
            "ring_attach_failures": self.attach_failures,
        }


#: Pages of memory xenstored asks for as a domain (bounce pages for its grant maps).
XENSTORED_PAGES = 16
#: How long a restarted daemon waits for its previous life's domid to be free.
REBIRTH_TIMEOUT = 15.0


async def connect_as_domain(hypervisor: str, domid: int | None, name: str = "xenstored") -> Domain:
    """Become a service domain (xenstored's, xenconsoled's) in the copy transport: it
    never holds another domain's memory, only the pages granted to it.  A restarted daemon may find its domid still
    taken for a moment (EEXIST): it waits, at most REBIRTH_TIMEOUT."""
    import errno

    from pvio.hypervisor import aio
    from pvio.hypervisor.errors import HypercallError

    deadline = asyncio.get_running_loop().time() + REBIRTH_TIMEOUT
    while True:
        try:
            return await aio.connect(hypervisor, name, XENSTORED_PAGES, transport="copy", domid=domid)
        except HypercallError as e:
            if e.rc != -errno.EEXIST or asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.05)
