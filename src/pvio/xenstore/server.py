"""The XenStore server core: connections, requests, watches, domains, quotas.  Sans-IO.

Theory of operation
-------------------
`XenStoreServer` is transport-agnostic.  An adapter (the asyncio daemon, a test, later
the shared-page ring of a domain) registers each connection with the domid pvio has
established for it -- `connect(domid)`; a plain socket is dom0 -- and then feeds it bytes
with `receive(conn_id, data)`.  Back come `Send(conn_id, bytes)` and `Close(conn_id)`
outputs, possibly for *other* connections (watch events).  The server never reads a
domid from the peer: identity is a property of the connection.

Each request is decoded once (`pvio.xenstore.wire`), its arguments parsed like the C
daemon parses them, its paths canonicalised and checked (`pvio.xenstore.paths`), then
executed against the tree through an access (`pvio.xenstore.store`): direct, or through
the connection's transaction named by `tx_id`.  Every error is an `XsError` and becomes
an XS_ERROR reply; a framing violation closes only that connection.

Semantics follow Xen 4.17's C daemon (the reference notes list them), with two
deliberate improvements: transactions merge (see `pvio.xenstore.store`), and watch
dispatch looks up the watches of the changed path and its ancestors in an index, so its
cost does not grow with the number of connections.

What this module deliberately does not do: any I/O, timers, write-rate limiting (XSA-206:
the adapter serves connections fairly instead), or the CONTROL commands beyond `check`,
`help` and `quota`.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from pvio.abi.xs_wire import (
    XENSTORE_PAYLOAD_MAX,
    XENSTORE_REL_PATH_MAX,
    XSD_SOCKMSG,
    XsdSockmsgType,
)
from pvio.xenstore import paths
from pvio.xenstore.errors import Fault, ProtocolViolation, XsError
from pvio.xenstore.perms import (
    PERM_OWNER,
    PERM_READ,
    PERM_WRITE,
    Perm,
    Perms,
    Who,
    encode_perms,
    inherit,
    parse_perm,
    perm_for,
)
from pvio.xenstore.store import (
    Access,
    Node,
    Store,
    StoreAccess,
    Transaction,
    TxAccess,
    apply,
    conflicts,
)
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
DOMID_SELF = 0x7FF0
DOMID_FIRST_RESERVED = 0x7FF0

PRIVILEGED_OPS = frozenset(
    {T.XS_INTRODUCE, T.XS_RELEASE, T.XS_IS_DOMAIN_INTRODUCED, T.XS_RESUME, T.XS_SET_TARGET,
     T.XS_CONTROL}
)
#: Requests that ignore tx_id (the C daemon does not look it up for them).
TX_AGNOSTIC = frozenset({T.XS_WATCH, T.XS_UNWATCH, T.XS_RESET_WATCHES})


@dataclass(frozen=True)
class Quotas:
    """Per-domain limits; the defaults are Xen 4.17's C daemon's.  dom0 is exempt."""

    nodes_per_domain: int = 1000  # -E, ENOSPC
    node_size: int = 2048  # -S, ENOSPC (header + perms + value + children names)
    watches_per_domain: int = 128  # -W, E2BIG (as 4.17 answers)
    transactions_per_conn: int = 10  # -t, ENOSPC
    nodes_per_transaction: int = 1024  # ENOSPC
    perms_per_node: int = 5  # -A, ENOSPC
    path_max: int = XENSTORE_REL_PATH_MAX  # -M, EINVAL


class Send(NamedTuple):
    """Write `data` to connection `conn_id`."""

    conn_id: int
    data: bytes


class Close(NamedTuple):
    """Close connection `conn_id` (after what was sent before)."""

    conn_id: int
    reason: str


Output = Send | Close


@dataclass(frozen=True, slots=True)
class Change:
    """A modification to report to watches: `exact` = only watches on the path itself
    (descendants deleted by RM); `perms` = a watcher must be able to read one of these."""

    path: str
    exact: bool
    perms: tuple[Perms, ...]


@dataclass(eq=False, slots=True)
class Watch:
    conn_id: int
    path: str  # canonical
    token: bytes
    relative: bool


@dataclass(eq=False)
class Connection:
    conn_id: int
    domid: int
    privileged: bool
    decoder: FrameDecoder = field(default_factory=FrameDecoder)
    watches: dict[tuple[str, bytes], Watch] = field(default_factory=dict)
    transactions: dict[int, Transaction] = field(default_factory=dict)
    next_tx_id: int = 1
    closed: bool = False
    who: Who = field(default_factory=lambda: Who(0, True))


@dataclass(eq=False)
class Domain:
    domid: int
    gfn: int = 0
    evtchn: int = 0
    target: int | None = None
    conns: set[int] = field(default_factory=set)


_ATOI = re.compile(rb"\s*([+-]?\d+)")


def atoi(raw: bytes) -> int:
    """C's atoi() as the 4.17 daemon uses it for domids: garbage is 0, -1 wraps."""
    m = _ATOI.match(raw)
    value = int(m.group(1)) if m else 0
    return value & 0xFFFFFFFF


def parse_domid(raw: bytes, field: str = "domid") -> int:
    """A strictly decimal domid below DOMID_FIRST_RESERVED."""
    if not raw.isdigit() or len(raw) > 5:
        raise XsError("EINVAL", f"bad domid {raw!r}", field=field)
    domid = int(raw)
    if domid >= DOMID_FIRST_RESERVED:
        raise XsError("EINVAL", f"domid {domid} is reserved", field=field)
    return domid


Handler = Callable[[Connection, Packet, Transaction | None], bytes]


class XenStoreServer:
    """Feed it bytes per connection; it answers with outputs.  See the module docstring."""

    def __init__(self, store: Store | None = None, quotas: Quotas | None = None) -> None:
        self.store = store or Store()
        self.quotas = quotas or Quotas()
        self.conns: dict[int, Connection] = {}
        self.domains: dict[int, Domain] = {}
        self.watch_index: dict[str, list[Watch]] = {}
        self.watch_count: Counter[int] = Counter()
        #: Bumped on every committed change to the tree (the daemon persists on change).
        self.mutations = 0
        #: Requests that hit a bug and were answered EIO (tests assert it stays 0).
        self.internal_errors = 0
        self._next_conn = 1
        self._direct = StoreAccess(self.store)
        # Canonical forms of recently seen raw paths (valid ones only), per home domain.
        self._paths: dict[tuple[bytes, int, bool], tuple[str, bool]] = {}
        self._out: list[Output] = []
        self._after: list[Output] = []
        self._handlers: dict[int, Handler] = {
            T.XS_CONTROL: self._control,
            T.XS_DIRECTORY: self._directory,
            T.XS_READ: self._read,
            T.XS_GET_PERMS: self._get_perms,
            T.XS_WATCH: self._watch,
            T.XS_UNWATCH: self._unwatch,
            T.XS_TRANSACTION_START: self._transaction_start,
            T.XS_TRANSACTION_END: self._transaction_end,
            T.XS_INTRODUCE: self._introduce,
            T.XS_RELEASE: self._release,
            T.XS_GET_DOMAIN_PATH: self._get_domain_path,
            T.XS_WRITE: self._write,
            T.XS_MKDIR: self._mkdir,
            T.XS_RM: self._rm,
            T.XS_SET_PERMS: self._set_perms,
            T.XS_IS_DOMAIN_INTRODUCED: self._is_domain_introduced,
            T.XS_RESUME: self._resume,
            T.XS_SET_TARGET: self._set_target,
            T.XS_RESET_WATCHES: self._reset_watches,
            T.XS_DIRECTORY_PART: self._directory_part,
        }

    # -- connections -----------------------------------------------------------------

    def connect(self, domid: int = 0) -> int:
        """A new connection for `domid` (0: the privileged toolstack).  A domain must have
        been introduced first: pvio decides who a connection is, never the peer."""
        if domid != 0 and domid not in self.domains:
            raise XsError("ENOENT", f"domain {domid} is not introduced", fault=Fault.LOCAL)
        conn_id = self._next_conn
        self._next_conn += 1
        conn = Connection(conn_id, domid, privileged=(domid == 0))
        self.conns[conn_id] = conn
        if domid in self.domains:
            self.domains[domid].conns.add(conn_id)
        conn.who = self._who(conn)
        return conn_id

    def disconnect(self, conn_id: int) -> None:
        """Forget a connection: its watches and transactions go with it."""
        conn = self.conns.pop(conn_id, None)
        if conn is None:
            return
        conn.closed = True
        self._drop_watches(conn)
        conn.transactions.clear()
        dom = self.domains.get(conn.domid)
        if dom is not None:
            dom.conns.discard(conn_id)

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

    def handle(self, conn_id: int, pkt: Packet) -> list[Output]:
        """Handle one decoded request on a connection."""
        conn = self.conns[conn_id]
        type_, req_id, tx_id, _ = pkt
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
        return out

    def _take(self) -> list[Output]:
        out, self._out = self._out, []
        return out

    # -- helpers ---------------------------------------------------------------------

    def who(self, conn: Connection) -> Who:
        return conn.who

    def _who(self, conn: Connection) -> Who:
        dom = self.domains.get(conn.domid)
        return Who(conn.domid, conn.privileged, dom.target if dom is not None else None)

    def _refresh_who(self) -> None:
        for conn in self.conns.values():
            conn.who = self._who(conn)

    def _path(self, conn: Connection, raw: bytes, *, special: bool = False) -> tuple[str, bool]:
        key = (raw, conn.domid, special)
        hit = self._paths.get(key)
        if hit is not None:
            return hit
        result = paths.canonicalize(
            paths.decode(raw), conn.domid, allow_special=special, path_max=self.quotas.path_max
        )
        if len(self._paths) >= 4096:
            self._paths.clear()
        self._paths[key] = result
        return result

    def _access(self, tx: Transaction | None) -> Access:
        return TxAccess(self.store, tx) if tx is not None else self._direct

    def _hide(
        self, acc: Access, who: Who, path: str, bit: int, errno: str, *, record: bool = True
    ) -> str:
        """Errno hiding: an unreadable (unwritable) ancestor makes ENOENT look like EACCES,
        so a domain cannot probe for nodes it may not see."""
        for a in paths.ancestors(path)[1:]:
            if record:
                acc.explicit(a)  # the answer depends on which ancestor exists
            node = acc.node(a)
            if node is not None:
                return "EACCES" if not perm_for(who, node.perms) & bit else errno
        return errno

    def _get(self, acc: Access, who: Who, path: str, bit: int) -> Node:
        acc.explicit(path)
        node = acc.node(path)
        if node is None:
            raise XsError(self._hide(acc, who, path, bit, "ENOENT"), path, field="path")
        if not perm_for(who, node.perms) & bit:
            raise XsError("EACCES", path, field="path")
        return node

    def _changed(self, tx: Transaction | None, change: Change) -> None:
        if tx is not None:
            tx.pending.append(change)
        else:
            self.mutations += 1
            self._fire(change)

    def _check_tx_size(self, conn: Connection, tx: Transaction | None) -> None:
        limit = self.quotas.nodes_per_transaction
        if tx is not None and not conn.privileged and tx.accessed() > limit:
            tx.failed = "ENOSPC"
            raise XsError("ENOSPC", "transaction touches too many nodes", field="tx_id")

    def _check_node_size(self, who: Who, node: Node) -> None:
        if not who.privileged and node.size() >= self.quotas.node_size:
            raise XsError("ENOSPC", "node too large", field="value")

    # -- reading ---------------------------------------------------------------------

    def _read(self, conn: Connection, pkt: Packet, tx: Transaction | None) -> bytes:
        path, _ = self._path(conn, one_arg(pkt.payload))
        if tx is None:  # the common case, kept short
            node = self.store.nodes.get(path)
            if node is not None and (conn.privileged or perm_for(conn.who, node.perms) & PERM_READ):
                return node.value
        acc = self._access(tx)
        node = self._get(acc, conn.who, path, PERM_READ)
        self._check_tx_size(conn, tx)
        return node.value

    def _directory(self, conn: Connection, pkt: Packet, tx: Transaction | None) -> bytes:
        path, _ = self._path(conn, one_arg(pkt.payload))
        acc = self._access(tx)
        self._get(acc, self.who(conn), path, PERM_READ)
        children = acc.children(path)
        self._check_tx_size(conn, tx)
        return b"".join(c.encode() + b"\0" for c in children)

    def _directory_part(self, conn: Connection, pkt: Packet, tx: Transaction | None) -> bytes:
        args = split_args(pkt.payload)
        if len(args) != 2:
            raise XsError("EINVAL", "expected path and offset", field="payload")
        path, _ = self._path(conn, args[0])
        offset = atoi(args[1])
        acc = self._access(tx)
        node = self._get(acc, self.who(conn), path, PERM_READ)
        listing = b"".join(c.encode() + b"\0" for c in acc.children(path))
        gen = str(node.cgen).encode() + b"\0"
        if offset >= len(listing):
            return gen + b"\0"
        end = offset
        while end < len(listing):
            nxt = listing.index(b"\0", end) + 1
            if len(gen) + (nxt - offset) >= XENSTORE_PAYLOAD_MAX:
                break
            end = nxt
        chunk = listing[offset:end]
        return gen + chunk + (b"\0" if end == len(listing) else b"")

    def _get_perms(self, conn: Connection, pkt: Packet, tx: Transaction | None) -> bytes:
        path, _ = self._path(conn, one_arg(pkt.payload), special=True)
        who = self.who(conn)
        if path.startswith("@"):
            perms = self.store.specials.get(path)
            if perms is None:
                raise XsError("ENOENT", path, field="path")
            if not perm_for(who, perms) & PERM_READ:
                raise XsError("EACCES", path, field="path")
            return encode_perms(perms)
        node = self._get(self._access(tx), who, path, PERM_READ)
        return encode_perms(node.perms)

    # -- writing ---------------------------------------------------------------------

    # T:430 Writing creates parents, and who owns what
    # WRITE and MKDIR create every missing parent on the way (empty value).  New nodes
    # copy the permissions of the nearest existing ancestor, where the creator needs
    # write permission; an unprivileged creator becomes the new nodes' owner and is
    # charged for them against its quota (1000 nodes, 2048 bytes a node).  All checks
    # run before the first node is created, so a failed create leaves nothing behind
    # and the per-domain counts stay exact (XSA-414, XSA-415).
    # :T
    def _create(self, conn: Connection, acc: Access, path: str, value: bytes) -> Perms:
        who = self.who(conn)
        missing = [path]
        anc = paths.parent(path)
        while (existing := acc.node(anc)) is None:
            missing.append(anc)
            anc = paths.parent(anc)
        if not perm_for(who, existing.perms) & PERM_WRITE:
            raise XsError("EACCES", f"cannot create below {anc}", field="path")
        perms = inherit(existing.perms, who)
        if not who.privileged:
            owner = perms[0].domid
            total = self.store.owned[owner] + acc.owned_delta(owner) + len(missing)
            if total > self.quotas.nodes_per_domain:
                raise XsError("ENOSPC", "node quota exceeded", field="path")
            self._check_node_size(who, Node(value, perms, [], 0, 0))
            grown = existing.size() + len(paths.basename(missing[-1])) + 1
            if grown >= self.quotas.node_size:
                raise XsError("ENOSPC", f"{anc} would be too large", field="path")
        for p in reversed(missing[1:]):
            acc.ensure(p, perms)
        acc.put(path, value, perms)
        return perms

    def _write(self, conn: Connection, pkt: Packet, tx: Transaction | None) -> bytes:
        cut = pkt.payload.find(b"\0")
        if cut < 0:
            raise XsError("EINVAL", "no NUL after the path", field="payload")
        path, _ = self._path(conn, pkt.payload[:cut])
        value = pkt.payload[cut + 1 :]
        acc = self._access(tx)
        who = self.who(conn)
        acc.explicit(path)
        node = acc.node(path)
        if node is not None:
            if not perm_for(who, node.perms) & PERM_WRITE:
                raise XsError("EACCES", path, field="path")
            self._check_node_size(who, Node(value, node.perms, node.children, 0, 0))
            acc.put(path, value, node.perms)
            perms = node.perms
        else:
            perms = self._create(conn, acc, path, value)
        self._check_tx_size(conn, tx)
        parent = acc.node(paths.parent(path))
        self._changed(tx, Change(path, False, (perms, parent.perms if parent else perms)))
        return OK

    def _mkdir(self, conn: Connection, pkt: Packet, tx: Transaction | None) -> bytes:
        path, _ = self._path(conn, one_arg(pkt.payload))
        acc = self._access(tx)
        who = self.who(conn)
        acc.explicit(path)
        node = acc.node(path)
        if node is not None:
            if not perm_for(who, node.perms) & PERM_WRITE:
                raise XsError("EACCES", path, field="path")
            return OK
        perms = self._create(conn, acc, path, b"")
        self._check_tx_size(conn, tx)
        parent = acc.node(paths.parent(path))
        self._changed(tx, Change(path, False, (perms, parent.perms if parent else perms)))
        return OK

    def _rm(self, conn: Connection, pkt: Packet, tx: Transaction | None) -> bytes:
        path, _ = self._path(conn, one_arg(pkt.payload))
        acc = self._access(tx)
        who = self.who(conn)
        acc.explicit(path)
        node = acc.node(path)
        if node is None:
            # Removing an absent node changes nothing, so inside a transaction its answer
            # (OK, or ENOENT when the parent is absent too) is not re-checked at commit:
            # libxl sends exactly this RM before creating every device and ignores the
            # answer, and two devices created in parallel must not conflict over it.
            errno = self._hide(acc, who, path, PERM_WRITE, "ENOENT", record=False)
            if errno == "ENOENT" and acc.node(paths.parent(path)) is not None:
                return OK
            raise XsError(errno, path, field="path")
        if not perm_for(who, node.perms) & PERM_WRITE:
            raise XsError("EACCES", path, field="path")
        if path == "/":
            raise XsError("EINVAL", "cannot remove /", field="path")
        removed = acc.remove(path)
        self._check_tx_size(conn, tx)
        for r in removed[:-1]:
            self._changed(tx, Change(r.path, True, (r.perms, r.parent_perms)))
        root = removed[-1]
        self._changed(tx, Change(path, False, (root.perms, root.parent_perms)))
        return OK

    def _set_perms(self, conn: Connection, pkt: Packet, tx: Transaction | None) -> bytes:
        args = split_args(pkt.payload)
        if len(args) < 2:
            raise XsError("EINVAL", "expected a path and permissions", field="payload")
        path, _ = self._path(conn, args[0], special=True)
        who = self.who(conn)
        perms = tuple(self._mark_dead(parse_perm(a)) for a in args[1:])
        if not who.privileged and len(perms) > self.quotas.perms_per_node:
            raise XsError("ENOSPC", "too many permission entries", field="perms")
        if path.startswith("@"):
            old_special = self.store.specials.get(path)
            if old_special is None:
                raise XsError("ENOENT", path, field="path")
            if not perm_for(who, old_special) & PERM_OWNER:
                raise XsError("EACCES", path, field="path")
            self.store.specials[path] = perms
            self.mutations += 1
            return OK
        acc = self._access(tx)
        node = self._get(acc, who, path, PERM_WRITE)
        if not perm_for(who, node.perms) & PERM_OWNER:
            raise XsError("EACCES", "only the owner may change permissions", field="path")
        old = node.perms
        if not who.privileged:
            if perms[0].domid != old[0].domid:
                raise XsError("EPERM", "only the toolstack may change the owner", field="perms")
            self._check_node_size(who, Node(node.value, perms, node.children, 0, 0))
        acc.put(path, None, perms)
        self._check_tx_size(conn, tx)
        parent = acc.node(paths.parent(path)) if path != "/" else None
        self._changed(tx, Change(path, False, (old, perms, parent.perms if parent else perms)))
        return OK

    def _mark_dead(self, perm: Perm) -> Perm:
        """An ACL entry naming a domain that does not exist is kept but ignored (XSA-322)."""
        if perm.domid == 0 or perm.domid in self.domains:
            return perm
        return Perm(perm.letter, perm.domid, ignored=True)

    # -- watches ---------------------------------------------------------------------

    # T:440 Watches
    # A watch on W fires for a change at W or anywhere below it; the event carries the
    # changed path (relative again if W was given relative) and the watch's token.  The
    # index maps a watched path to its watches, so a change at P costs one lookup per
    # ancestor of P, whatever the number of connections.  A watcher only hears about
    # nodes it may read, or whose parent it may read (XSA-115).  Registering fires once
    # at once, after the OK; an event that would not fit in 4096 bytes is dropped
    # (XSA-324); a connection without watches never receives an event.
    # :T
    def _fire(self, change: Change) -> None:
        targets = [change.path] if change.exact or change.path.startswith("@") else (
            paths.ancestors(change.path)
        )
        for target in targets:
            for w in self.watch_index.get(target, ()):
                conn = self.conns[w.conn_id]
                if not conn.privileged:
                    who = self.who(conn)
                    if not any(perm_for(who, p) & PERM_READ for p in change.perms):
                        continue
                epath = paths.relative_to_home(change.path, conn.domid) if w.relative else (
                    change.path
                )
                payload = epath.encode() + b"\0" + w.token + b"\0"
                if len(payload) > XENSTORE_PAYLOAD_MAX:
                    continue
                self._out.append(Send(w.conn_id, encode(T.XS_WATCH_EVENT, payload)))

    def _watch_args(self, conn: Connection, pkt: Packet) -> tuple[str, bool, bytes, bytes]:
        args = split_args(pkt.payload)
        if len(args) < 2:
            raise XsError("EINVAL", "expected a path and a token", field="payload")
        path, relative = self._path(conn, args[0], special=True)
        return path, relative, args[1], args[0]

    def _watch(self, conn: Connection, pkt: Packet, tx: Transaction | None) -> bytes:
        path, relative, token, given = self._watch_args(conn, pkt)
        if (path, token) in conn.watches:
            raise XsError("EEXIST", "watch exists", field="token")
        if not conn.privileged and self.watch_count[conn.domid] >= self.quotas.watches_per_domain:
            raise XsError("E2BIG", "watch quota exceeded", field="path")
        w = Watch(conn.conn_id, path, token, relative)
        conn.watches[(path, token)] = w
        self.watch_index.setdefault(path, []).append(w)
        self.watch_count[conn.domid] += 1
        event = given + b"\0" + token + b"\0"
        if len(event) <= XENSTORE_PAYLOAD_MAX:
            self._after.append(Send(conn.conn_id, encode(T.XS_WATCH_EVENT, event)))
        return OK

    def _unwatch(self, conn: Connection, pkt: Packet, tx: Transaction | None) -> bytes:
        path, _, token, _ = self._watch_args(conn, pkt)
        w = conn.watches.pop((path, token), None)
        if w is None:
            raise XsError("ENOENT", "no such watch", field="token")
        self._unindex(w)
        self.watch_count[conn.domid] -= 1
        return OK

    def _unindex(self, w: Watch) -> None:
        lst = self.watch_index.get(w.path)
        if lst is not None:
            lst.remove(w)
            if not lst:
                del self.watch_index[w.path]

    def _drop_watches(self, conn: Connection) -> None:
        for w in conn.watches.values():
            self._unindex(w)
        self.watch_count[conn.domid] -= len(conn.watches)
        if self.watch_count[conn.domid] <= 0:
            del self.watch_count[conn.domid]
        conn.watches.clear()

    def _reset_watches(self, conn: Connection, pkt: Packet, tx: Transaction | None) -> bytes:
        # Drops the transactions too -- including the one the request may name (XSA-484).
        self._drop_watches(conn)
        conn.transactions.clear()
        return OK

    # -- transactions ----------------------------------------------------------------

    # T:450 Transactions
    # TRANSACTION_START hands out the connection's next free id (ids are per connection,
    # from 1, never 0); requests carrying that id see the tree through the transaction's
    # private view.  TRANSACTION_END "T" commits: if anything the transaction depended on
    # changed meanwhile, the answer is EAGAIN and nothing is applied; else its effects
    # are replayed onto the current tree and its queued watch events fire.  Two
    # transactions that only add different children to one directory both commit.
    # :T
    def _transaction_start(self, conn: Connection, pkt: Packet, tx: Transaction | None) -> bytes:
        if tx is not None:
            raise XsError("EBUSY", "transactions do not nest", field="tx_id")
        if not conn.privileged and len(conn.transactions) >= self.quotas.transactions_per_conn:
            raise XsError("ENOSPC", "too many open transactions", field="tx_id")
        tx_id = conn.next_tx_id
        while tx_id == 0 or tx_id in conn.transactions:
            tx_id = (tx_id + 1) & 0xFFFFFFFF
        conn.next_tx_id = (tx_id + 1) & 0xFFFFFFFF
        conn.transactions[tx_id] = Transaction(tx_id, conn.conn_id)
        return f"{tx_id}".encode() + b"\0"

    def _transaction_end(self, conn: Connection, pkt: Packet, tx: Transaction | None) -> bytes:
        arg = one_arg(pkt.payload, field="payload")
        if arg not in (b"T", b"F"):
            raise XsError("EINVAL", "expected T or F", field="payload")
        if tx is None:
            raise XsError("ENOENT", "no transaction", field="tx_id")
        del conn.transactions[tx.tx_id]
        if arg == b"F":
            return OK
        if tx.failed is not None:  # as the C daemon answers a transaction marked failed
            raise XsError("ENOMEM", f"the transaction failed earlier ({tx.failed})",
                          field="tx_id")
        if conflicts(self.store, tx) is not None:
            raise XsError("EAGAIN", "conflict", field="tx_id")
        apply(self.store, tx)
        for change in tx.pending:
            self._changed(None, change)
        return OK

    # -- domains ---------------------------------------------------------------------

    def _introduce(self, conn: Connection, pkt: Packet, tx: Transaction | None) -> bytes:
        args = split_args(pkt.payload)
        if len(args) < 3:
            raise XsError("EINVAL", "expected domid, gfn and event channel", field="payload")
        domid = parse_domid(args[0])
        gfn = atoi(args[1])
        evtchn = atoi(args[2])
        if evtchn == 0 or evtchn >= 0x80000000:
            raise XsError("EINVAL", "bad event channel", field="evtchn")
        self.introduce(domid, gfn=gfn, evtchn=evtchn)
        return OK

    def introduce(self, domid: int, *, gfn: int = 0, evtchn: int = 1) -> None:
        """Make `domid` known (INTRODUCE).  Again for a known domain: reset its
        connections' watches and transactions, as a re-introduction does in Xen."""
        dom = self.domains.get(domid)
        if dom is not None:
            dom.gfn, dom.evtchn = gfn, evtchn
            for cid in dom.conns:
                c = self.conns[cid]
                self._drop_watches(c)
                c.transactions.clear()
            return
        self.domains[domid] = Domain(domid, gfn, evtchn)
        self.mutations += 1
        if domid != 0:
            self._fire_special(paths.INTRODUCE_DOMAIN)

    def _fire_special(self, path: str) -> None:
        self._fire(Change(path, True, (self.store.specials[path],)))

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
        dom = self.domains.pop(domid)
        for cid in sorted(dom.conns):
            self._out.append(Close(cid, f"domain {domid} released"))
            self.disconnect(cid)
        store = self.store
        root = store.nodes["/"]
        owned_roots = [
            path
            for path, node in store.walk()
            if path != "/" and node.perms[0].domid == domid
            and (paths.parent(path) == "/"
                 or store.nodes[paths.parent(path)].perms[0].domid != domid)
        ]
        if root.perms[0].domid == domid:  # "/" cannot go: it returns to dom0
            root.perms = (Perm(root.perms[0].letter, 0), *root.perms[1:])
        for path in owned_roots:
            if path in store.nodes:
                removed = store.remove(path)
                for r in removed[:-1]:
                    self._fire(Change(r.path, True, (r.perms, r.parent_perms)))
                self._fire(Change(path, False, (removed[-1].perms, removed[-1].parent_perms)))
        for node in store.nodes.values():
            if any(p.domid == domid for p in node.perms[1:]):
                node.perms = (node.perms[0], *(p for p in node.perms[1:] if p.domid != domid))
        for k, v in store.specials.items():
            store.specials[k] = (v[0], *(p for p in v[1:] if p.domid != domid))
        store.owned.pop(domid, None)
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
            q = self.quotas
            text = "".join(
                f"{k}: {getattr(q, k)}\n"
                for k in q.__dataclass_fields__
            )
            return text.encode() + b"\0"
        raise XsError("EINVAL", f"unknown control command {cmd!r}", field="payload")
