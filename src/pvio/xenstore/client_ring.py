"""A domain's XenStore client over its shared page and event channel.

Theory of operation
-------------------
`RingStream` gives `pvio.xenstore.client.AsyncClient` what a socket gives it -- `read`,
`write`, `close` -- over a `GuestEnd` (`pvio.xenstore.ring`): `write` copies as much as
fits into the request ring and keeps the rest for when the daemon has made room (it
kicks us after consuming), `read` returns what the reply ring holds or waits for the
port.  Every call that moved an index kicks the daemon, as Linux's xenbus does.

`ring_connector` is the client's connector: its first call returns the first stream;
every later call -- made when a stream ended because the daemon put an error in the
page, which a restarted daemon does, or because our own ring was found broken -- runs
the reconnection of docs/misc/xenstore-ring.txt (`connection` = XENSTORE_RECONNECT,
kick, wait for XENSTORE_CONNECTED) and returns a stream over the emptied rings.  The
client then registers its watches again and resends its requests that were outside a
transaction, exactly as after a socket reconnection.  A daemon that does not offer
XENSTORE_SERVER_FEATURE_RECONNECTION gets no reconnection: the connector refuses.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from pvio.abi.grant_table import GNTTAB_RESERVED_XENSTORE
from pvio.abi.xs_wire import XENSTORE_SERVER_FEATURE_RECONNECTION
from pvio.hypervisor.client import Domain
from pvio.ring.errors import RingBroken
from pvio.xenstore.client import AsyncClient, ByteStream, Connector
from pvio.xenstore.ring import GuestEnd


@dataclass(frozen=True)
class StorePage:
    """A domain's XenStore page and port, as its domain builder made them."""

    frame: int  # what INTRODUCE names (and store/ring-ref holds)
    port: int  # store/port
    view: memoryview


async def build_store_page(dom: Domain, xenstored_domid: int) -> StorePage:
    """What a Xen domain builder does for XenStore (libxl, xc_dom_gnttab_init): a zeroed
    page granted at GNTTAB_RESERVED_XENSTORE to xenstored's domain, and a port unbound
    for it.  A shareable page: the daemon maps it live whatever its transport."""
    (frame,) = await dom.alloc_shareable_pages(1)
    dom.gnttab.grant_foreign_access_ref(GNTTAB_RESERVED_XENSTORE, xenstored_domid, frame)
    port = await dom.alloc_unbound(xenstored_domid)
    return StorePage(frame, port, dom.frame(frame))


class RingStream:
    """One connection's worth of the page: reader and writer for AsyncClient."""

    def __init__(self, dom: Domain, end: GuestEnd, port: int) -> None:
        self.dom = dom
        self.end = end
        self.port = port
        self._out = bytearray()
        self._wake = asyncio.Event()
        self._closed = False
        self._broken = False
        dom.set_handler(port, self._on_event)

    def _on_event(self, _port: int) -> None:
        self._flush()
        self._wake.set()

    def _kick(self) -> None:
        with contextlib.suppress(Exception):  # no port: the domain is leaving
            self.dom.notify(self.port)

    def _flush(self) -> None:
        if not self._out or self._closed or self._broken:
            return
        try:
            n = self.end.send(self._out)
        except RingBroken:
            self._broken = True
            self._wake.set()
            return
        if n:
            del self._out[:n]
            self._kick()

    def write(self, data: bytes) -> None:
        self._out += data
        self._flush()

    async def read(self, n: int = -1) -> bytes:
        """Reply bytes; b"" once the connection is over (closed, broken, or the daemon
        reported an error: the client reconnects)."""
        while True:
            self._wake.clear()
            if self._closed or self._broken or self.end.server_error():
                return b""
            try:
                data = self.end.receive(n if n > 0 else None)
            except RingBroken:
                self._broken = True
                return b""
            if data:
                if len(data) >= self.end.rings.rx.size:
                    self._kick()  # it was full: the daemon may wait for room
                return data
            await self._wake.wait()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._wake.set()
            with contextlib.suppress(Exception):
                self.dom.set_handler(self.port, None)


async def reconnect(dom: Domain, end: GuestEnd, port: int) -> RingStream:
    """The ring reconnection: ask, kick, wait until the daemon has emptied the rings."""
    if not end.features() & XENSTORE_SERVER_FEATURE_RECONNECTION:
        raise ConnectionRefusedError("xenstored does not offer ring reconnection")
    done = asyncio.Event()
    dom.set_handler(port, lambda _p: done.set())
    try:
        end.request_reconnect()
        dom.notify(port)
        while not end.connected():
            done.clear()
            if end.connected():
                break
            await done.wait()
    finally:
        dom.set_handler(port, None)
    end.fresh_rings()
    return RingStream(dom, end, port)


def ring_connector(dom: Domain, page: memoryview, port: int) -> Connector:
    """The connector of a domain's client over its page (see the module notes)."""
    end = GuestEnd(page)
    first = True

    async def connect() -> ByteStream:
        nonlocal first
        if first:
            first = False
            return RingStream(dom, end, port)
        return await reconnect(dom, end, port)

    return connect


async def open_ring_client(dom: Domain, page: memoryview, port: int) -> AsyncClient:
    """A XenStore client over the domain's page `page` and event channel `port`, which
    reconnects when the daemon asks it to (a restarted xenstored)."""
    return await AsyncClient.open(reconnect=True, connector=ring_connector(dom, page, port))
