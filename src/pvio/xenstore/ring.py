"""Both ends of a domain's XenStore page: the byte rings plus their signalling words.  Sans-IO.

Theory of operation
-------------------
A domain reaches XenStore through one shared page, `xenstore_domain_interface`
(io/xs_wire.h): a 1 KiB request ring, a 1 KiB reply ring and three words, laid out and
used as docs/misc/xenstore-ring.txt describes (Xen 4.17):

    server_features  set by the server before it touches either ring, never cleared:
                     XENSTORE_SERVER_FEATURE_RECONNECTION (1), _ERROR (2)
    connection       XENSTORE_CONNECTED (0); the guest sets XENSTORE_RECONNECT (1) and
                     waits for the server to empty both rings, forget the connection's
                     requests, watches and transactions, and set it back to 0
    error            0, or why the server stopped serving this ring: COMM (1),
                     RINGIDX (2: impossible indices), PROTO (3: a packet too long);
                     a reconnection clears it

`ServerEnd` is xenstored's view, `GuestEnd` the domain's.  Both only copy bytes and
read or write the words (`pvio.ring.bytering`, whose index checks raise `RingBroken`);
the adapters around them (`pvio.xenstore.daemon_ring`, `pvio.xenstore.client_ring`)
own the event channel and the event loop, and kick the peer whenever a call moved an
index or a word.

The server keeps its own record of whether it serves the ring (`ServerEnd.stopped`):
the page's `error` word is written by the server for the guest to read, never trusted
back, since the guest can write anything there.

What this deliberately does not do: parse XenStore packets (the shared `FrameDecoder`
does, on each side), or decide when to reconnect (the client does, when the server
reports an error: that is how it learns that a restarted xenstored lost its state).
"""

from __future__ import annotations

from pvio.abi.xs_wire import (
    XENSTORE_CONNECTED,
    XENSTORE_ERROR_NONE,
    XENSTORE_RECONNECT,
    XENSTORE_SERVER_FEATURE_ERROR,
    XENSTORE_SERVER_FEATURE_RECONNECTION,
)
from pvio.ring.bytering import ByteRingPair, xenstore_control, xenstore_guest, xenstore_server

#: What pvio's xenstored offers on every page, before it reads or writes a byte.
SERVER_FEATURES = XENSTORE_SERVER_FEATURE_RECONNECTION | XENSTORE_SERVER_FEATURE_ERROR


class ServerEnd:
    """xenstored's end of one domain's page."""

    def __init__(self, page: memoryview) -> None:
        self._page = page
        self.ctl = xenstore_control(page)
        self.rings: ByteRingPair = xenstore_server(page)
        #: The error this end reported and stopped on (XENSTORE_ERROR_*), 0 while serving.
        self.stopped = XENSTORE_ERROR_NONE
        # The features are offered before anything else is done with the rings.
        self.ctl.server_features.store(self.ctl.server_features.load() | SERVER_FEATURES)

    def reconnect_requested(self) -> bool:
        """The guest set `connection` to XENSTORE_RECONNECT and waits for us."""
        return self.ctl.connection.load() == XENSTORE_RECONNECT

    def reconnected(self) -> None:
        """Finish a reconnection: both rings empty, no error, `connection` back to
        XENSTORE_CONNECTED (in that order: the guest reads nothing before the last)."""
        self.ctl.empty_rings()
        self.rings = xenstore_server(self._page)  # a ring found broken is usable again
        self.stopped = XENSTORE_ERROR_NONE
        self.ctl.error.store(XENSTORE_ERROR_NONE)
        self.ctl.connection.store(XENSTORE_CONNECTED)

    def stop(self, error: int) -> None:
        """Stop serving the ring and say why in the `error` word."""
        self.stopped = error
        self.ctl.error.store(error)

    def receive(self, max_bytes: int | None = None) -> bytes:
        """The guest's request bytes waiting in the ring (RingBroken if its indices lie)."""
        return self.rings.rx.read(max_bytes)

    def send(self, data: bytes | bytearray | memoryview) -> int:
        """Copy as much of `data` into the reply ring as fits; how many bytes."""
        return self.rings.tx.write(data)


class GuestEnd:
    """The domain's end of its page."""

    def __init__(self, page: memoryview) -> None:
        self._page = page
        self.ctl = xenstore_control(page)
        self.rings: ByteRingPair = xenstore_guest(page)

    def features(self) -> int:
        return self.ctl.server_features.load()

    def server_error(self) -> int:
        """Why the server stopped serving us (0: it serves)."""
        return self.ctl.error.load()

    def connected(self) -> bool:
        return self.ctl.connection.load() == XENSTORE_CONNECTED

    def request_reconnect(self) -> None:
        """Ask for the reset (then kick the server and wait for `connected`)."""
        self.ctl.connection.store(XENSTORE_RECONNECT)

    def fresh_rings(self) -> None:
        """After a reconnection: ring state as new (a broken ring is usable again)."""
        self.rings = xenstore_guest(self._page)

    def send(self, data: bytes | bytearray | memoryview) -> int:
        return self.rings.tx.write(data)

    def receive(self, max_bytes: int | None = None) -> bytes:
        return self.rings.rx.read(max_bytes)
