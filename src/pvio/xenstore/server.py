"""XenStore's server core: connections and dispatch.  Sans-IO.

Theory of operation
-------------------
`XenStoreServer` is transport-agnostic.  An adapter (the asyncio daemon, a test, later
the shared-page ring of a domain) registers each connection with the domid pvio has
established for it -- `connect(domid)`; a plain socket is dom0 -- and then feeds it bytes
with `receive(conn_id, data)`.  Back come `Send(conn_id, bytes)` and `Close(conn_id)`
outputs, possibly for *other* connections (watch events).  The server never reads a
domid from the peer: identity is a property of the connection.

Each request is decoded once (`pvio.xenstore.wire`) and dispatched to its handler, which
parses its arguments like the C daemon parses them and acts.  Every error is an
`XsError` and becomes an XS_ERROR reply; a framing violation closes only that
connection.

The server is split the way ocaml-xenstore splits its own.  This module keeps the
connections and dispatches; the requests on the tree and transactions are
`pvio.xenstore.nodes`; who hears about which change is `pvio.xenstore.watches`; what a
domain is and what it leaves behind is `pvio.xenstore.domains`; the limits are
`pvio.xenstore.quotas`.  The requests that act on connections as much as on that state
-- WATCH, UNWATCH, RESET_WATCHES, the domain requests and CONTROL -- are handled here,
over those modules' pieces.

Semantics follow Xen 4.17's C daemon (the reference notes list them), with two
deliberate improvements: transactions merge (see `pvio.xenstore.store`), and watch
dispatch looks up the watches of the changed path and its ancestors in an index, so its
cost does not grow with the number of connections.

What this module deliberately does not do: any I/O, timers, write-rate limiting (XSA-206:
the adapter serves connections fairly instead), or the CONTROL commands beyond `check`,
`help` and `quota`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from pvio.abi.fault import Fault
from pvio.abi.xs_wire import XENSTORE_PAYLOAD_MAX, XSD_SOCKMSG, XsdSockmsgType
from pvio.trace import TRACE
from pvio.xenstore import paths
from pvio.xenstore.domains import DOMID_SELF, XsDomain, atoi, forget, parse_introduce
from pvio.xenstore.errors import ProtocolViolation, XsError
from pvio.xenstore.nodes import NodeOps
from pvio.xenstore.perms import Who
from pvio.xenstore.quotas import Quotas
from pvio.xenstore.store import Store, Transaction
from pvio.xenstore.watches import Change, Watch, WatchTable, event
from pvio.xenstore.wire import (
    HEADER_SIZE,
    OK,
    FrameDecoder,
    Packet,
    encode,
    error_payload,
    one_arg,
    split_args,
)

_HEADER = XSD_SOCKMSG.packer

T = XsdSockmsgType

PRIVILEGED_OPS = frozenset(
    {T.XS_INTRODUCE, T.XS_RELEASE, T.XS_IS_DOMAIN_INTRODUCED, T.XS_RESUME, T.XS_SET_TARGET,
     T.XS_CONTROL}
)
#: Requests that ignore tx_id (the C daemon does not look it up for them).
TX_AGNOSTIC = frozenset({T.XS_WATCH, T.XS_UNWATCH, T.XS_RESET_WATCHES})


class Send(NamedTuple):
    """Write `data` to connection `conn_id`; `watch` is the watch when `data` is one of
    its events (an adapter may drop an event, never a reply: see `pvio.xenstore.daemon`)."""

    conn_id: int
    data: bytes
    watch: Watch | None = None


class Close(NamedTuple):
    """Close connection `conn_id` (after what was sent before)."""

    conn_id: int
    reason: str


Output = Send | Close


@dataclass(eq=False)
class Connection:
    """One client of the server: who it is, its unparsed bytes, its transactions.  (Its
    watches are in the server's `WatchTable`.)"""

    conn_id: int
    domid: int
    privileged: bool
    decoder: FrameDecoder = field(default_factory=FrameDecoder)
    transactions: dict[int, Transaction] = field(default_factory=dict)
    next_tx_id: int = 1
    closed: bool = False
    who: Who = field(default_factory=lambda: Who(0, True))
    requests: int = 0  # requests handled (for pvio top)


Handler = Callable[[Connection, Packet, Transaction | None], bytes]


class XenStoreServer:
    """Feed it bytes per connection; it answers with outputs.  See the module docstring."""

    def __init__(self, store: Store | None = None, quotas: Quotas | None = None) -> None:
        self.store = store or Store()
        self.quotas = quotas or Quotas()
        self.conns: dict[int, Connection] = {}
        self.domains: dict[int, XsDomain] = {}
        self.watches = WatchTable(self.quotas)
        self.nodes = NodeOps(self.store, self.quotas, self.domains, self._committed,
                             self._touched)
        #: Bumped on every committed change to the tree (the daemon persists on change).
        self.mutations = 0
        #: Requests that hit a bug and were answered EIO (tests assert it stays 0).
        self.internal_errors = 0
        #: Told the domid after INTRODUCE or RELEASE changed a domain (the ring transport
        #: maps or unmaps its page: `pvio.xenstore.daemon_ring`).
        self.on_domain: Callable[[int], None] | None = None
        self._next_conn = 1
        self._out: list[Output] = []
        self._after: list[Output] = []
        nodes = self.nodes
        self._handlers: dict[int, Handler] = {
            T.XS_CONTROL: self._control,
            T.XS_DIRECTORY: nodes.directory,
            T.XS_READ: nodes.read,
            T.XS_GET_PERMS: nodes.get_perms,
            T.XS_WATCH: self._watch,
            T.XS_UNWATCH: self._unwatch,
            T.XS_TRANSACTION_START: nodes.transaction_start,
            T.XS_TRANSACTION_END: nodes.transaction_end,
            T.XS_INTRODUCE: self._introduce,
            T.XS_RELEASE: self._release,
            T.XS_GET_DOMAIN_PATH: self._get_domain_path,
            T.XS_WRITE: nodes.write,
            T.XS_MKDIR: nodes.mkdir,
            T.XS_RM: nodes.rm,
            T.XS_SET_PERMS: nodes.set_perms,
            T.XS_IS_DOMAIN_INTRODUCED: self._is_domain_introduced,
            T.XS_RESUME: self._resume,
            T.XS_SET_TARGET: self._set_target,
            T.XS_RESET_WATCHES: self._reset_watches,
            T.XS_DIRECTORY_PART: nodes.directory_part,
        }

    # -- connections -----------------------------------------------------------------

    def connect(self, domid: int = 0, *, of_domain: bool | None = None) -> int:
        """A new connection for `domid` (0: the privileged toolstack).  A domain must have
        been introduced first: pvio decides who a connection is, never the peer.
        `of_domain`: the connection is the domain's own (its ring, or a socket attached
        for it), which INTRODUCE resets and RELEASE closes; by default every connection
        but dom0's sockets (the toolstack and its tools are no domain's connection)."""
        if domid != 0 and domid not in self.domains:
            raise XsError("ENOENT", f"domain {domid} is not introduced", fault=Fault.LOCAL)
        conn_id = self._next_conn
        self._next_conn += 1
        conn = Connection(conn_id, domid, privileged=(domid == 0))
        self.conns[conn_id] = conn
        if domid in self.domains and (of_domain if of_domain is not None else domid != 0):
            self.domains[domid].conns.add(conn_id)
        conn.who = self._who(conn)
        return conn_id

    def disconnect(self, conn_id: int) -> None:
        """Forget a connection: its watches and transactions go with it."""
        conn = self.conns.pop(conn_id, None)
        if conn is None:
            return
        conn.closed = True
        self.watches.drop(conn)
        conn.transactions.clear()
        dom = self.domains.get(conn.domid)
        if dom is not None:
            dom.conns.discard(conn_id)

    def _who(self, conn: Connection) -> Who:
        dom = self.domains.get(conn.domid)
        return Who(conn.domid, conn.privileged, dom.target if dom is not None else None)

    def _refresh_who(self) -> None:
        for conn in self.conns.values():
            conn.who = self._who(conn)

    # T:420 One request, start to finish
    # `receive` feeds the connection's decoder and handles each whole packet in order.
    # A packet is dispatched like the C daemon does: unknown types get ENOSYS, the
    # toolstack-only operations EACCES from anyone else, then `tx_id` must name an open
    # transaction *of this connection* (ENOENT otherwise; WATCH, UNWATCH and
    # RESET_WATCHES ignore it).  The handler parses its arguments, acts, and returns the
    # reply payload; an XsError anywhere becomes XS_ERROR with the errno name.  A reply
    # over 4096 bytes becomes E2BIG (XSA-72), which is how a client learns to fall back
    # to DIRECTORY_PART.  Watch events caused by the request are queued *before* the
    # reply, as Xen does, so a client watching its own write sees the event first.
    # :T
    def receive(self, conn_id: int, data: bytes | bytearray | memoryview) -> list[Output]:
        """Feed bytes and handle every whole request they complete."""
        self.feed(conn_id, data)
        out: list[Output] = []
        while (step := self.step(conn_id)) is not None:
            out.extend(step)
        return out

    def feed(self, conn_id: int, data: bytes | bytearray | memoryview) -> None:
        """Buffer bytes for a connection without handling them yet (see `step`)."""
        conn = self.conns.get(conn_id)
        if conn is not None and not conn.closed:
            conn.decoder.feed(data)

    def step(self, conn_id: int) -> list[Output] | None:
        """Handle the next buffered request; None when there is no whole one.  Adapters
        that apply back-pressure call this one request at a time."""
        conn = self.conns.get(conn_id)
        if conn is None or conn.closed or conn.decoder.buffered < HEADER_SIZE:
            return None
        try:
            pkt = conn.decoder.next_packet()
        except ProtocolViolation as e:
            out = self._take()
            out.append(Close(conn_id, str(e)))
            self.disconnect(conn_id)
            return out
        if not isinstance(pkt, Packet):
            return None
        return self.handle(conn_id, pkt)

    def census(self) -> dict[str, Any]:
        """Connections, their watches, transactions and requests, for pvio top."""
        return {
            "nodes": len(self.store.nodes),
            "connections": [
                {"conn": c.conn_id, "domid": c.domid, "privileged": c.privileged, "requests": c.requests,
                 "watches": self.watches.watching(c.conn_id), "transactions": len(c.transactions)}
                for c in self.conns.values()
            ],
        }

    def handle(self, conn_id: int, pkt: Packet) -> list[Output]:
        """Handle one decoded request on a connection."""
        conn = self.conns[conn_id]
        conn.requests += 1
        type_, req_id, tx_id, _ = pkt
        t0 = time.monotonic_ns() if TRACE.on else 0
        try:
            handler = self._handlers.get(type_)
            if handler is None:
                raise XsError("ENOSYS", f"no operation {type_}", field="type")
            if not conn.privileged and type_ in PRIVILEGED_OPS:
                raise XsError("EACCES", "toolstack-only operation", field="type")
            tx: Transaction | None = None
            if tx_id and type_ not in TX_AGNOSTIC:
                tx = conn.transactions.get(tx_id)
                if tx is None:
                    raise XsError("ENOENT", f"no transaction {tx_id}", field="tx_id")
            payload = handler(conn, pkt, tx)
            if len(payload) > XENSTORE_PAYLOAD_MAX:
                raise XsError("E2BIG", "reply too large", field="len")
            reply = _HEADER.pack(type_, req_id, tx_id, len(payload)) + payload
        except XsError as e:
            self._after.clear()
            reply = encode(T.XS_ERROR, error_payload(e.errno), req_id=req_id, tx_id=tx_id)
        except Exception:  # a bug of ours must not take the daemon down: EIO, counted
            self.internal_errors += 1
            self._after.clear()
            reply = encode(T.XS_ERROR, error_payload("EIO"), req_id=req_id, tx_id=tx_id)
        out = self._out
        self._out = []
        if not conn.closed:
            out.append(Send(conn_id, reply))
        if self._after:
            out.extend(self._after)
            self._after.clear()
        if t0:
            TRACE.span(f"xs {_type_name(type_)}", "xenstore", t0, args={"domid": conn.domid, "tx": tx_id})
        return out

    def _take(self) -> list[Output]:
        out, self._out = self._out, []
        return out

    # -- changes and watches ---------------------------------------------------------

    def _committed(self, change: Change) -> None:
        self.mutations += 1
        self._fire(change)

    def _touched(self) -> None:
        self.mutations += 1

    def _fire(self, change: Change) -> None:
        """Queue the watch events of `change` (they go out before the request's reply)."""
        for w, packet in self.watches.events(change, self.conns):
            self._out.append(Send(w.conn_id, packet, w))

    def _fire_special(self, path: str) -> None:
        self._fire(Change(path, True, (self.store.specials[path],)))

    def _watch_args(self, conn: Connection, pkt: Packet) -> tuple[str, bool, bytes, bytes]:
        args = split_args(pkt.payload)
        if len(args) < 2:
            raise XsError("EINVAL", "expected a path and a token", field="payload")
        path, relative = self.nodes.path(conn, args[0], special=True)
        return path, relative, args[1], args[0]

    def _watch(self, conn: Connection, pkt: Packet, tx: Transaction | None) -> bytes:
        path, relative, token, given = self._watch_args(conn, pkt)
        w = self.watches.add(conn, path, token, relative)
        first = event(given, token)  # fires once at once, after the OK
        if first is not None:
            self._after.append(Send(conn.conn_id, first, w))
        return OK

    def _unwatch(self, conn: Connection, pkt: Packet, tx: Transaction | None) -> bytes:
        path, _, token, _ = self._watch_args(conn, pkt)
        self.watches.remove(conn, path, token)
        return OK

    def _reset_watches(self, conn: Connection, pkt: Packet, tx: Transaction | None) -> bytes:
        # Drops the transactions too -- including the one the request may name (XSA-484).
        self.watches.drop(conn)
        conn.transactions.clear()
        return OK

    # -- domains ---------------------------------------------------------------------

    def _introduce(self, conn: Connection, pkt: Packet, tx: Transaction | None) -> bytes:
        domid, gfn, evtchn = parse_introduce(pkt.payload)
        self.introduce(domid, gfn=gfn, evtchn=evtchn)
        return OK

    def introduce(self, domid: int, *, gfn: int = 0, evtchn: int = 1) -> None:
        """Make `domid` known (INTRODUCE).  Again for a known domain: reset its
        connections' watches and transactions, as a re-introduction does in Xen."""
        dom = self.domains.get(domid)
        if dom is not None:
            if (dom.gfn, dom.evtchn) != (gfn, evtchn):
                self.mutations += 1
            dom.gfn, dom.evtchn = gfn, evtchn
            for cid in dom.conns:
                c = self.conns[cid]
                self.watches.drop(c)
                c.transactions.clear()
        else:
            self.domains[domid] = XsDomain(domid, gfn, evtchn)
            self.mutations += 1
            if domid != 0:
                self._fire_special(paths.INTRODUCE_DOMAIN)
        if self.on_domain is not None:
            self.on_domain(domid)

    def _release(self, conn: Connection, pkt: Packet, tx: Transaction | None) -> bytes:
        domid = atoi(one_arg(pkt.payload, field="domid"))
        if domid == 0:
            raise XsError("EINVAL", "cannot release dom0", field="domid")
        if domid not in self.domains:
            raise XsError("ENOENT", f"domain {domid} not introduced", field="domid")
        self.release(domid)
        return OK

    # T:470 A domain goes away
    # RELEASE closes the domain's connections (their watches and transactions go with
    # them), deletes every node the domain owns wherever it is (XSA-419: a guest must not
    # leave nodes behind that pile up over reboots), strips its entries from the ACLs of
    # the nodes that remain and resets its quota accounting (XSA-322, 417, 483).  A new
    # domain given the same domid starts from nothing.  Then @releaseDomain fires.
    # :T
    def release(self, domid: int) -> None:
        """Forget `domid` (RELEASE); see `pvio.xenstore.domains.forget`."""
        dom = self.domains.pop(domid)
        if self.on_domain is not None:
            self.on_domain(domid)
        for cid in sorted(dom.conns):
            self._out.append(Close(cid, f"domain {domid} released"))
            self.disconnect(cid)
        for change in forget(self.store, domid):
            self._fire(change)
        for d in self.domains.values():
            if d.target == domid:
                d.target = None
        self._refresh_who()
        self.mutations += 1
        self._fire_special(paths.RELEASE_DOMAIN)

    def _get_domain_path(self, conn: Connection, pkt: Packet, tx: Transaction | None) -> bytes:
        domid = atoi(one_arg(pkt.payload, field="domid"))
        return paths.home(domid).encode() + b"\0"

    def _is_domain_introduced(self, conn: Connection, pkt: Packet, tx: Transaction | None) -> bytes:
        domid = atoi(one_arg(pkt.payload, field="domid"))
        known = domid in (0, DOMID_SELF) or domid in self.domains
        return b"T\0" if known else b"F\0"

    def _resume(self, conn: Connection, pkt: Packet, tx: Transaction | None) -> bytes:
        domid = atoi(one_arg(pkt.payload, field="domid"))
        if domid not in self.domains:
            raise XsError("ENOENT", f"domain {domid} not introduced", field="domid")
        return OK

    def _set_target(self, conn: Connection, pkt: Packet, tx: Transaction | None) -> bytes:
        args = split_args(pkt.payload)
        if len(args) != 2:
            raise XsError("EINVAL", "expected domid and target", field="payload")
        domid, target = atoi(args[0]), atoi(args[1])
        if domid not in self.domains or target not in self.domains:
            raise XsError("ENOENT", "both domains must be introduced", field="domid")
        if domid == target:
            raise XsError("EINVAL", "a domain cannot target itself", field="domid")
        self.domains[domid].target = target
        self.mutations += 1
        self._refresh_who()
        return OK

    # -- control ---------------------------------------------------------------------

    def _control(self, conn: Connection, pkt: Packet, tx: Transaction | None) -> bytes:
        args = split_args(pkt.payload)
        if not args:
            raise XsError("EINVAL", "expected a command", field="payload")
        cmd = args[0]
        if cmd == b"check":
            problems = self.store.check()
            if problems:
                return ("\n".join(problems) + "\n").encode() + b"\0"
            return OK
        if cmd == b"help":
            return b"check\nhelp\nquota\n\0"
        if cmd == b"quota":
            return self.quotas.describe().encode() + b"\0"
        raise XsError("EINVAL", f"unknown control command {cmd!r}", field="payload")


def _type_name(type_: int) -> str:
    try:
        return T(type_).name
    except ValueError:
        return str(type_)
